//! The gateway listener: one worker thread per core, each with its own single-threaded runtime,
//! its own `SO_REUSEPORT` socket and its own upstream connections; what workers share (the token
//! index, limiter and usage meter) is sharded, so they rarely meet on a lock. HTTP/1.1 is served
//! by keygate's own server ([`crate::h1`]); HTTP/2 — h2c with prior knowledge, or ALPN `h2`
//! under TLS — by hyper, on the same port. Graceful shutdown stops accepting, closes idle
//! connections and lets in-flight requests finish within a deadline.
//!
//! Nothing a client holds is held forever: a connection is admitted only under the worker's and
//! its address's caps ([`crate::conns`]); an HTTP/1.1 connection waits at most its keep-alive
//! time for a request and its header time for a head; an HTTP/2 connection is closed when it has
//! had no open stream for its idle time, or when a PING goes unanswered.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::answer::{AnswerExtra, Code, GatewayBody, Refuse};
use crate::body::BoxError;
use crate::conns::{ConnSlot, ConnStats, Refused};
use crate::ctx::ConnInfo;
use crate::gateway::Gateway;
use crate::h1;
use crate::timer::Shutdown;

/// Where TLS settings come from; swapped when the certificate files change.
pub type TlsSource = Arc<arc_swap::ArcSwapOption<TlsAcceptor>>;

/// The HTTP/2 connection preface (RFC 9113 §3.4): how an h2c client with prior knowledge begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 reset-stream flood protection (RFC 9113 §10.5; CVE-2023-44487, "rapid reset"):
/// streams the client reset before keygate accepted them, and streams keygate had to reset for
/// the client's errors, beyond which the connection is ended with GOAWAY. hyper's defaults,
/// pinned here so that an upgrade of hyper cannot loosen them unnoticed.
const H2_MAX_PENDING_ACCEPT_RESETS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

pub use crate::config::{ConnSettings, Http2Settings};

/// A running gateway listener.
pub struct GatewayServer {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    conns: Arc<ConnStats>,
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
        settings: ConnSettings,
    ) -> std::io::Result<Self> {
        Self::bind(addr, threads)?.start(gw, tls, grace, settings)
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
        settings: ConnSettings,
    ) -> std::io::Result<GatewayServer> {
        let BoundGateway { addr, sockets } = self;
        let threads = sockets.len();
        let (stop, stop_rx) = watch::channel(false);
        let conns = Arc::new(ConnStats::new(threads, settings.max_per_worker, settings.max_per_address));
        let mut workers = Vec::with_capacity(threads);
        for (i, socket) in sockets.into_iter().enumerate() {
            let gw = gw.clone();
            let tls = tls.clone();
            let stop_rx = stop_rx.clone();
            let conns = conns.clone();
            let worker = std::thread::Builder::new().name(format!("keygate-gw-{i}")).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "gateway worker cannot start its runtime");
                        return;
                    }
                };
                let worker = Worker { gw, tls, settings, index: i, conns };
                rt.block_on(worker.run(socket, stop_rx, grace));
            })?;
            workers.push(worker);
        }
        Ok(GatewayServer { addr, stop, workers, conns })
    }
}

impl GatewayServer {
    /// The connection counts (for `/metrics`).
    pub fn connections(&self) -> Arc<ConnStats> {
        self.conns.clone()
    }

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
    settings: ConnSettings,
    /// This worker's position, which keys its connection count.
    index: usize,
    conns: Arc<ConnStats>,
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
        let local_stop = Arc::new(Shutdown::default());
        let (alive, mut all_done) = mpsc::channel::<()>(1);
        let ticket = ConnTicket { stop: local_stop.clone(), _alive: alive };
        let this = Arc::new(self);
        // The answers to connections refused at a cap, made once (the refusal path is the one
        // a flood of connections takes).
        let refusals = [Refused::Worker, Refused::Address].map(refusal_bytes);
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
            let acceptor = this.tls.as_ref().and_then(|t| t.load_full());
            let slot = match this.conns.admit(this.index, remote.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    // Refused before a byte is read: a plain client gets a 503 it can read
                    // (nothing of its own is unread yet, so the close is orderly); under TLS
                    // there is no handshake to answer in, so the connection is only closed.
                    if acceptor.is_none() {
                        let answer = if why == Refused::Worker { &refusals[0] } else { &refusals[1] };
                        let _ = stream.try_write(answer);
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let info = ConnInfo::new(remote, acceptor.is_some());
            let (this, ticket) = (this.clone(), ticket.clone());
            tokio::spawn(async move {
                // Counted until the connection's task ends, however it ends.
                let _slot: ConnSlot = slot;
                match acceptor {
                    None => this.plain(stream, info, ticket).await,
                    Some(acceptor) => this.tls(stream, info, acceptor, ticket).await,
                }
            });
        }
        drop(listener);
        local_stop.trigger();
        drop(ticket);
        if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
            tracing::warn!("gateway: in-flight requests did not finish within the grace period");
        }
    }

    /// A plain TCP connection: HTTP/2 if it opens with the preface, HTTP/1.1 otherwise.
    async fn plain(&self, mut stream: TcpStream, info: ConnInfo, ticket: ConnTicket) {
        let mut rbuf = BytesMut::with_capacity(8 * 1024);
        let mut stopping = ticket.stop.waiter();
        // The first bytes within the keep-alive time; once they came, the rest of the preface
        // within the header time, as a head (a client feeding it a byte at a time must not
        // hold the connection for a keep-alive time per byte).
        let mut deadline = tokio::time::Instant::now() + self.settings.timeouts.keep_alive;
        let mut begun = false;
        let h2 = loop {
            if rbuf.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&rbuf) {
                break rbuf.starts_with(H2_PREFACE);
            }
            if !begun && !rbuf.is_empty() {
                begun = true;
                deadline = deadline.min(tokio::time::Instant::now() + self.settings.timeouts.header);
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.read_buf(&mut rbuf)) => r,
                () = &mut stopping => return,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        };
        if h2 {
            let io = Prefixed { prefix: rbuf.freeze(), io: stream };
            self.h2(io, info, &ticket.stop).await;
        } else {
            let (rd, wr) = stream.split();
            h1::serve(self.gw.clone(), info, (rd, wr), rbuf, ticket.stop.clone(), self.settings.timeouts).await;
        }
    }

    /// A TLS connection: HTTP/2 when ALPN chose it, HTTP/1.1 otherwise.
    async fn tls(&self, stream: TcpStream, info: ConnInfo, acceptor: Arc<TlsAcceptor>, ticket: ConnTicket) {
        let tls = match tokio::time::timeout(self.settings.timeouts.header, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            _ => return,
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            self.h2(tls, info, &ticket.stop).await;
        } else {
            let (rd, wr) = tokio::io::split(tls);
            h1::serve(self.gw.clone(), info, (rd, wr), BytesMut::new(), ticket.stop.clone(), self.settings.timeouts)
                .await;
        }
    }

    /// An HTTP/2 connection, served by hyper with keygate's limits, until the client closes it,
    /// it has had no open stream for the idle time, a PING goes unanswered (hyper ends it), or
    /// the worker stops.
    async fn h2<IO>(&self, io: IO, info: ConnInfo, stop: &Shutdown)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let h2 = self.settings.http2;
        let streams = Arc::new(OpenStreams::new(h2.max_concurrent_streams));
        let send = self.settings.timeouts.send;
        let gw = self.gw.clone();
        let body_timeout = self.settings.timeouts.body;
        let counted = streams.clone();
        let service = service_fn(move |req| {
            let gw = gw.clone();
            // Open from the moment hyper hands the stream over until its answer's body is
            // done or dropped (a stream the client resets drops both).
            let open = counted.open();
            async move {
                // Boxed: hyper spawns each stream's future as a task, and moves it (and tokio
                // copies it when the task ends) whole several times; the request path's future
                // is a few KiB, a box is a pointer (measured with perf under h2load: those
                // copies were the largest user-space cost of an HTTP/2 request).
                let resp = Box::pin(gw.handle(info, req, body_timeout)).await;
                // From here the answer waits for hyper to take it.
                open.waiting();
                Ok::<_, std::convert::Infallible>(resp.map(|body| CountedBody { body, open }))
            }
        });
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_concurrent_streams)
            // One limit on request heads for both protocols (RFC 9113 §6.5.2
            // SETTINGS_MAX_HEADER_LIST_SIZE; hyper refuses a larger list with 431).
            .max_header_list_size(u32::try_from(h1::MAX_HEAD).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
            .keep_alive_interval(h2.keep_alive_interval)
            .keep_alive_timeout(h2.keep_alive_timeout);
        let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
        let mut stopping = stop.waiter();
        // Every wait is at most the send time: open streams are checked for answers their client
        // takes nothing of, as an HTTP/1.1 write is.
        let mut timer = pin!(tokio::time::sleep(h2.idle.min(send)));
        // Set once a GOAWAY was sent because the connection was idle: when it has not ended
        // one keep-alive timeout later (a client that does not answer the PING of the
        // graceful close) and still has no stream, it is dropped.
        let mut idle_closing = false;
        let mut stop_closing = false;
        // A stop signalled before the waiter was registered is seen by the flag.
        if stop.is_set() {
            conn.as_mut().graceful_shutdown();
            stop_closing = true;
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    return;
                }
                () = &mut stopping, if !stop_closing => {
                    // In-flight streams finish within the worker's grace period.
                    conn.as_mut().graceful_shutdown();
                    stop_closing = true;
                }
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    match streams.idle_since() {
                        Some(_) if idle_closing => return,
                        Some(since) if now >= since + h2.idle => {
                            tracing::debug!("closing an idle HTTP/2 connection");
                            conn.as_mut().graceful_shutdown();
                            idle_closing = true;
                            timer.as_mut().reset(now + h2.keep_alive_timeout);
                        }
                        Some(since) => timer.as_mut().reset((since + h2.idle).min(now + send)),
                        None => match streams.waiting_since() {
                            // An answer has waited for its client's flow-control window (the
                            // client read nothing) for the send time: the client is gone or
                            // slow-reading on purpose; its streams and the upstream
                            // connections behind them go with the connection.
                            Some(since) if now >= since + send => {
                                tracing::debug!("closing an HTTP/2 connection whose client takes no data");
                                return;
                            }
                            Some(since) => timer.as_mut().reset(since + send),
                            None => timer.as_mut().reset(now + send),
                        },
                    }
                }
            }
        }
    }
}

/// The streams of one HTTP/2 connection that are open, since when none has been, and since
/// when each answer has waited for hyper to take it.
struct OpenStreams {
    epoch: tokio::time::Instant,
    open: AtomicUsize,
    /// Milliseconds from `epoch` to when the last stream closed.
    idle_since_ms: AtomicU64,
    /// One slot per stream that can be open at once (allocated with the connection, so a
    /// stream allocates nothing): 0 while free or while its answer is not waiting for the
    /// client, else 1 + the milliseconds from `epoch` to when it began to wait.
    slots: Box<[StreamSlot]>,
}

#[derive(Default)]
struct StreamSlot {
    used: AtomicBool,
    waiting_since: AtomicU64,
}

impl OpenStreams {
    fn new(max_streams: u32) -> Self {
        // A few more than the streams that may be open, for answers hyper drops a moment after
        // their stream closed.
        let n = usize::try_from(max_streams).unwrap_or(usize::MAX).saturating_add(16).min(4096);
        Self {
            epoch: tokio::time::Instant::now(),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            slots: (0..n).map(|_| StreamSlot::default()).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::AcqRel);
        let slot = self
            .slots
            .iter()
            .position(|s| s.used.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok());
        OpenStream { streams: self.clone(), slot }
    }

    /// When the connection became idle; `None` while a stream is open.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        (self.open.load(Ordering::Acquire) == 0)
            .then(|| self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)))
    }

    /// Since when the answer that has waited longest for the client has waited.
    fn waiting_since(&self) -> Option<tokio::time::Instant> {
        let oldest = self.slots.iter().map(|s| s.waiting_since.load(Ordering::Acquire)).filter(|w| *w > 0).min()?;
        Some(self.epoch + Duration::from_millis(oldest - 1))
    }
}

/// One open stream; dropping it closes it.
struct OpenStream {
    streams: Arc<OpenStreams>,
    /// Its slot, if one was free.
    slot: Option<usize>,
}

impl OpenStream {
    fn slot(&self) -> Option<&StreamSlot> {
        self.streams.slots.get(self.slot?)
    }

    /// The answer waits for hyper to take its next piece (the client's window permitting).
    fn waiting(&self) {
        if let Some(s) = self.slot() {
            s.waiting_since.store(self.streams.now_ms().saturating_add(1), Ordering::Release);
        }
    }

    /// hyper takes the answer's next piece.
    fn taken(&self) {
        if let Some(s) = self.slot() {
            s.waiting_since.store(0, Ordering::Release);
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(s) = self.slot() {
            s.waiting_since.store(0, Ordering::Release);
            s.used.store(false, Ordering::Release);
        }
        let s = &self.streams;
        if s.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.idle_since_ms.store(s.now_ms(), Ordering::Release);
        }
    }
}

/// An HTTP/2 answer's body, which keeps its stream counted as open until it is done, and says
/// when it waits for hyper to take it: from the answer's start until hyper asks for data, and
/// from each piece given until hyper asks for the next (hyper asks only when the client's
/// flow-control window has room). While the body waits for its upstream, it is not waiting for
/// the client.
struct CountedBody {
    body: GatewayBody,
    open: OpenStream,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.open.taken();
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r {
            self.open.waiting();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The whole answer to a connection refused at a cap: 503 `too_many_connections`.
fn refusal_bytes(why: Refused) -> Vec<u8> {
    let message = match why {
        Refused::Worker => "the gateway holds as many connections as it serves; retry shortly",
        Refused::Address => "your address holds as many connections as the gateway allows one client; close some first",
    };
    let r = Refuse::of(Code::TooManyConnections, message);
    let mut out = Vec::with_capacity(256);
    r.answer().write_h1(&AnswerExtra::default(), false, Some("close"), &mut out);
    out
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
