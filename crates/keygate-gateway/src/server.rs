//! The gateway listener: one worker thread per core, each with its own single-threaded runtime,
//! its own `SO_REUSEPORT` socket and its own upstream connections; what workers share (the token
//! index, limiter and usage meter) is sharded, so they rarely meet on a lock. HTTP/1.1 is served
//! by keygate's own server ([`crate::h1`]); HTTP/2 — h2c with prior knowledge, or ALPN `h2`
//! under TLS — by hyper, on the same port. Graceful shutdown stops accepting, closes idle
//! connections and lets in-flight requests finish within a deadline.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::h1::{self, Timeouts};
use crate::handler::{ConnInfo, Gateway};
use crate::timer::Shutdown;

/// Where TLS settings come from; swapped when the certificate files change.
pub type TlsSource = Arc<arc_swap::ArcSwapOption<TlsAcceptor>>;

/// The HTTP/2 connection preface (RFC 9113 §3.4): how an h2c client with prior knowledge begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A running gateway listener.
pub struct GatewayServer {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The listener's sockets, bound and not served yet (so what is built before serving can know
/// the address, such as the OAuth issuer on a port picked at random).
pub struct BoundGateway {
    pub addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

impl GatewayServer {
    /// Binds and serves at once.
    pub fn start(
        gw: Arc<Gateway>,
        addr: SocketAddr,
        threads: usize,
        tls: Option<TlsSource>,
        grace: Duration,
        timeouts: Timeouts,
    ) -> std::io::Result<Self> {
        Self::bind(addr, threads)?.start(gw, tls, grace, timeouts)
    }

    /// Binds `threads` sockets on `addr` (port 0 picks one free port for all).
    pub fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<BoundGateway> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let first = bind(addr)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..threads {
            sockets.push(bind(addr)?);
        }
        Ok(BoundGateway { addr, sockets })
    }
}

impl BoundGateway {
    /// Starts one worker per socket.
    pub fn start(
        self,
        gw: Arc<Gateway>,
        tls: Option<TlsSource>,
        grace: Duration,
        timeouts: Timeouts,
    ) -> std::io::Result<GatewayServer> {
        let BoundGateway { addr, sockets } = self;
        let threads = sockets.len();
        let (stop, stop_rx) = watch::channel(false);
        let mut workers = Vec::with_capacity(threads);
        for (i, socket) in sockets.into_iter().enumerate() {
            let gw = gw.clone();
            let tls = tls.clone();
            let stop_rx = stop_rx.clone();
            let worker = std::thread::Builder::new().name(format!("keygate-gw-{i}")).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "gateway worker cannot start its runtime");
                        return;
                    }
                };
                let worker = Worker { gw, tls, timeouts };
                rt.block_on(worker.run(socket, stop_rx, grace));
            })?;
            workers.push(worker);
        }
        Ok(GatewayServer { addr, stop, workers })
    }
}

impl GatewayServer {
    /// Stops accepting, then waits for in-flight requests (at most the grace period).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
    }
}

/// One worker thread's share of the listener.
struct Worker {
    gw: Arc<Gateway>,
    tls: Option<TlsSource>,
    timeouts: Timeouts,
}

/// What a connection task holds: the stop signal of its worker (not shared with the other
/// workers, so waiting on it touches no other core's memory) and a token whose drop tells the
/// worker the connection is over.
#[derive(Clone)]
struct ConnTicket {
    stop: Arc<Shutdown>,
    _alive: mpsc::Sender<()>,
}

impl Worker {
    async fn run(self, socket: std::net::TcpListener, mut stop: watch::Receiver<bool>, grace: Duration) {
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "gateway worker cannot use its socket");
                return;
            }
        };
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let local_stop = Arc::new(Shutdown::default());
        let (alive, mut all_done) = mpsc::channel::<()>(1);
        let ticket = ConnTicket { stop: local_stop.clone(), _alive: alive };
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = this.tls.as_ref().and_then(|t| t.load_full());
            let info = ConnInfo::new(remote, acceptor.is_some());
            let watcher = graceful.watcher();
            let (this, ticket) = (this.clone(), ticket.clone());
            tokio::spawn(async move {
                match acceptor {
                    None => this.plain(stream, info, ticket, watcher).await,
                    Some(acceptor) => this.tls(stream, info, acceptor, ticket, watcher).await,
                }
            });
        }
        drop(listener);
        local_stop.trigger();
        drop(ticket);
        let drained = async {
            graceful.shutdown().await;
            let _ = all_done.recv().await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("gateway: in-flight requests did not finish within the grace period");
        }
    }

    /// A plain TCP connection: HTTP/2 if it opens with the preface, HTTP/1.1 otherwise.
    async fn plain(
        &self,
        mut stream: TcpStream,
        info: ConnInfo,
        ticket: ConnTicket,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let mut rbuf = BytesMut::with_capacity(8 * 1024);
        let mut stopping = ticket.stop.waiter();
        let h2 = loop {
            if rbuf.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&rbuf) {
                break rbuf.starts_with(H2_PREFACE);
            }
            let read = tokio::select! {
                r = tokio::time::timeout(self.timeouts.keep_alive, stream.read_buf(&mut rbuf)) => r,
                () = &mut stopping => return,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        };
        if h2 {
            let io = Prefixed { prefix: rbuf.freeze(), io: stream };
            self.h2(io, info, watcher).await;
        } else {
            let (rd, wr) = stream.split();
            h1::serve(self.gw.clone(), info, rd, wr, rbuf, ticket.stop.clone(), self.timeouts).await;
        }
    }

    /// A TLS connection: HTTP/2 when ALPN chose it, HTTP/1.1 otherwise.
    async fn tls(
        &self,
        stream: TcpStream,
        info: ConnInfo,
        acceptor: Arc<TlsAcceptor>,
        ticket: ConnTicket,
        watcher: hyper_util::server::graceful::Watcher,
    ) {
        let tls = match tokio::time::timeout(self.timeouts.header, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            self.h2(tls, info, watcher).await;
        } else {
            let (rd, wr) = tokio::io::split(tls);
            h1::serve(self.gw.clone(), info, rd, wr, BytesMut::new(), ticket.stop.clone(), self.timeouts).await;
        }
    }

    async fn h2<IO>(&self, io: IO, info: ConnInfo, watcher: hyper_util::server::graceful::Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let gw = self.gw.clone();
        let service = service_fn(move |req| {
            let gw = gw.clone();
            async move { Ok::<_, std::convert::Infallible>(gw.handle(info, req).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(256)
            .serve_connection(TokioIo::new(io), service);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            if let Some(head) = self.prefix.get(..n) {
                buf.put_slice(head);
            }
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Builds a TLS acceptor from PEM files, offering h2 and http/1.1 by ALPN.
pub fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate {} is not valid PEM: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("cannot read the private key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not fit together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
