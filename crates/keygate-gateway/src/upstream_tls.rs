//! TLS to upstreams (`https://` upstream URLs): each route's rustls client configuration (its
//! trust anchors, its client certificate, its session cache), the errors its `tls_*` fields can
//! have (each with a stable code), and [`UpstreamStream`], the byte stream of an upstream
//! connection, plain or TLS.
//!
//! Invariants: certificate and host name verification is on unless a route says
//! `tls_insecure_skip_verify = true`, and then a warning names the route every time its table is
//! built; a connection is pooled under a key that holds the whole TLS identity (scheme, server
//! name, trust anchors, client certificate), so a plain and a TLS connection, or two identities,
//! never share one. Only `http/1.1` is offered by ALPN for now: the stream is an enum so that an
//! HTTP/2 variant can be added later.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{RouteConfig, UpstreamProtocol};

/// TLS sessions remembered per route for resumption (one entry per server name, bounded).
pub const SESSION_CACHE_SIZE: usize = 256;

/// What is wrong with a route's `tls_*` fields. Each has a stable code, first in its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTlsError {
    /// A `tls_*` field on a route whose upstreams are `http://`.
    TlsOnHttp,
    /// `tls_client_key` without `tls_client_cert`, or the other way round.
    KeyWithoutCert,
    /// A file named by `field` cannot be read.
    Unreadable { field: &'static str, path: String, reason: String },
    /// A file named by `field` holds no usable PEM (certificate or key).
    BadPem { field: &'static str, path: String, reason: String },
    /// The client certificate and key do not go together, or rustls refused them.
    BadClientIdentity(String),
    /// `tls_server_name` (or the upstream host) is not a DNS name or IP address.
    BadServerName(String),
}

impl UpstreamTlsError {
    /// The stable code.
    pub const fn code(&self) -> &'static str {
        match self {
            Self::TlsOnHttp => "upstream_tls_on_http",
            Self::KeyWithoutCert => "upstream_tls_key_without_cert",
            Self::Unreadable { .. } => "upstream_tls_file_unreadable",
            Self::BadPem { .. } => "upstream_tls_bad_pem",
            Self::BadClientIdentity(_) => "upstream_tls_bad_client_identity",
            Self::BadServerName(_) => "upstream_tls_bad_server_name",
        }
    }
}

impl fmt::Display for UpstreamTlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.code())?;
        match self {
            Self::TlsOnHttp => {
                f.write_str("tls_* fields apply to https:// upstreams; use https:// for every upstream of this route, or remove them")
            }
            Self::KeyWithoutCert => {
                f.write_str("tls_client_cert and tls_client_key go together: give both (PEM files) or neither")
            }
            Self::Unreadable { field, path, reason } => write!(f, "{field} {path:?} cannot be read: {reason}"),
            Self::BadPem { field, path, reason } => write!(f, "{field} {path:?}: {reason}"),
            Self::BadClientIdentity(reason) => {
                write!(f, "tls_client_cert and tls_client_key cannot be used together: {reason}")
            }
            Self::BadServerName(name) => {
                write!(f, "{name:?} is not a DNS name or IP address to verify the upstream's certificate for")
            }
        }
    }
}

impl std::error::Error for UpstreamTlsError {}

/// Whether a route sets any `tls_*` field.
fn sets_tls(c: &RouteConfig) -> bool {
    c.tls_ca_file.is_some()
        || c.tls_server_name.is_some()
        || c.tls_client_cert.is_some()
        || c.tls_client_key.is_some()
        || c.tls_insecure_skip_verify
}

/// A route's TLS client side, shared by its `https://` upstreams (and so is its session cache).
pub struct RouteTls {
    config: Arc<ClientConfig>,
    /// `tls_server_name`, if given: the name sent (SNI) and verified instead of the host.
    server_name: Option<ServerName<'static>>,
    /// Hex SHA-256 over what decides the identity of a connection besides its address: the
    /// trust anchors, the client certificate, whether verification is skipped.
    identity: String,
}

impl fmt::Debug for RouteTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTls").field("server_name", &self.server_name).field("identity", &self.identity).finish()
    }
}

/// One `https://` upstream's TLS: the route's client side and the name to verify.
pub struct TlsTarget {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTarget").field("server_name", &self.server_name).finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The operating system's trust store, read once per process. Certificates that do not parse
/// are skipped (a system store often holds a few); read errors are logged.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's trust store for https upstreams");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system trust anchors for https upstreams");
            Arc::new(roots)
        })
        .clone()
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, UpstreamTlsError> {
    std::fs::read(Path::new(path)).map_err(|e| UpstreamTlsError::Unreadable {
        field,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn certs(field: &'static str, path: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, UpstreamTlsError> {
    let bad = |reason: String| UpstreamTlsError::BadPem { field, path: path.to_owned(), reason };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certs)
}

/// Parses a server name for verification: a DNS name or an IP address (brackets of an IPv6
/// literal removed).
pub fn server_name(host: &str) -> Result<ServerName<'static>, UpstreamTlsError> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(bare.to_owned()).map_err(|_| UpstreamTlsError::BadServerName(host.to_owned()))
}

impl RouteTls {
    /// The route's TLS client side from its `tls_*` fields, or `None` if it has no `https://`
    /// upstream. `has_https` / `has_http`: whether some upstream is of that scheme.
    pub fn from_config(c: &RouteConfig, has_https: bool, has_http: bool) -> Result<Option<Self>, UpstreamTlsError> {
        if sets_tls(c) && has_http {
            return Err(UpstreamTlsError::TlsOnHttp);
        }
        if c.tls_client_cert.is_some() != c.tls_client_key.is_some() {
            return Err(UpstreamTlsError::KeyWithoutCert);
        }
        if !has_https {
            return Ok(None);
        }
        let server_name = c.tls_server_name.as_deref().map(server_name).transpose()?;
        let mut id = Sha256::new();
        let roots = match &c.tls_ca_file {
            Some(path) => {
                let pem = read("tls_ca_file", path)?;
                id.update(b"ca\0");
                id.update(&pem);
                let mut roots = RootCertStore::empty();
                for cert in certs("tls_ca_file", path, &pem)? {
                    roots.add(cert).map_err(|e| UpstreamTlsError::BadPem {
                        field: "tls_ca_file",
                        path: path.clone(),
                        reason: format!("a certificate is not a usable trust anchor ({e})"),
                    })?;
                }
                Arc::new(roots)
            }
            None => {
                id.update(b"system\0");
                system_roots()
            }
        };
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamTlsError::BadClientIdentity(e.to_string()))?;
        let builder = if c.tls_insecure_skip_verify {
            id.update(b"insecure\0");
            tracing::warn!(
                route = %c.id,
                "DANGER: tls_insecure_skip_verify = true: the upstream's certificate and name are NOT verified on this \
                 route; anyone on the path to the upstream can read and change its traffic. Use tls_ca_file instead"
            );
            builder.dangerous().with_custom_certificate_verifier(Arc::new(SkipVerify(provider)))
        } else {
            builder.with_root_certificates(roots)
        };
        let mut config = match (&c.tls_client_cert, &c.tls_client_key) {
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("tls_client_cert", cert_path)?;
                let chain = certs("tls_client_cert", cert_path, &cert_pem)?;
                let key_pem = read("tls_client_key", key_path)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| UpstreamTlsError::BadPem {
                    field: "tls_client_key",
                    path: key_path.clone(),
                    // The error names what was missing or malformed, never the key's bytes.
                    reason: format!("holds no usable PEM private key ({e})"),
                })?;
                id.update(b"client\0");
                id.update(&cert_pem);
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| UpstreamTlsError::BadClientIdentity(e.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        // What ALPN offers follows `upstream_protocol`; the choice is part of the pool key, so
        // connections negotiated for one route's protocol are not handed to another's.
        config.alpn_protocols = match c.upstream_protocol {
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
            UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        for p in &config.alpn_protocols {
            id.update(b"alpn\0");
            id.update(p);
        }
        config.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE_SIZE);
        let identity = id.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Some(Self { config: Arc::new(config), server_name, identity }))
    }

    /// The TLS of an upstream at `host` (`authority` is `host:port`) and its pool key.
    pub fn target(&self, host: &str, authority: &str) -> Result<(TlsTarget, String), UpstreamTlsError> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => server_name(host)?,
        };
        let key = format!("https://{authority}#{}#{}", name.to_str(), self.identity);
        Ok((TlsTarget { connector: tokio_rustls::TlsConnector::from(self.config.clone()), server_name: name }, key))
    }
}

/// `tls_insecure_skip_verify`: any certificate for any name is accepted. The handshake's
/// signatures are still checked (the peer holds the key of the certificate it sent), which
/// proves nothing about who it is.
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The bytes of one upstream connection.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Makes the TLS handshake over `tcp` for `target`.
    pub async fn handshake(tcp: TcpStream, target: &TlsTarget) -> io::Result<Self> {
        let tls = target.connector.connect(target.server_name.clone(), tcp).await?;
        Ok(Self::Tls(Box::new(tls)))
    }

    /// TLS with ALPN `h2` agreed: the connection speaks HTTP/2.
    pub fn is_h2(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }

    /// Still open with nothing unread. A plain stream is probed with the readiness the runtime
    /// already knows (no system call unless it became readable); a TLS one is polled once, which
    /// also takes in records that are not data (a session ticket) and sees a close.
    pub(crate) fn is_reusable(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Self::Plain(s) => matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            Self::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = ReadBuf::new(&mut probe);
                matches!(Pin::new(&mut **s).poll_read(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
