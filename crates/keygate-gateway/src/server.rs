//! The gateway listener: one worker thread per core, each with its own single-threaded runtime,
//! its own `SO_REUSEPORT` socket and its own upstream connections; what workers share (the token
//! index, limiter and usage meter) is sharded, so they rarely meet on a lock. HTTP/1.1 and HTTP/2 (h2c, or ALPN under TLS) on the same port. Graceful
//! shutdown stops accepting and lets in-flight requests finish within a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::handler::{ConnInfo, Gateway};

/// Where TLS settings come from; swapped when the certificate files change.
pub type TlsSource = Arc<arc_swap::ArcSwapOption<TlsAcceptor>>;

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

impl GatewayServer {
    /// Binds `threads` sockets on `addr` (port 0 picks one free port for all) and starts the
    /// workers.
    pub fn start(
        gw: Arc<Gateway>,
        addr: SocketAddr,
        threads: usize,
        tls: Option<TlsSource>,
        grace: Duration,
    ) -> std::io::Result<Self> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let first = bind(addr)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..threads {
            sockets.push(bind(addr)?);
        }
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
                rt.block_on(worker(gw, socket, tls, stop_rx, grace));
            })?;
            workers.push(worker);
        }
        Ok(Self { addr, stop, workers })
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

async fn worker(
    gw: Arc<Gateway>,
    socket: std::net::TcpListener,
    tls: Option<TlsSource>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let listener = match TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "gateway worker cannot use its socket");
            return;
        }
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
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
        let acceptor = tls.as_ref().and_then(|t| t.load_full());
        serve(&gw, &builder, &graceful, stream, remote, acceptor);
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("gateway: in-flight requests did not finish within the grace period");
    }
}

fn serve(
    gw: &Arc<Gateway>,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: Option<Arc<TlsAcceptor>>,
) {
    let info = ConnInfo { remote, tls: acceptor.is_some() };
    let gw = gw.clone();
    let service = service_fn(move |req| {
        let gw = gw.clone();
        async move { Ok::<_, std::convert::Infallible>(gw.handle(info, req).await) }
    });
    match acceptor {
        None => {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
            });
        }
        Some(acceptor) => {
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    _ => return,
                };
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
            });
        }
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
