//! Starts a whole keygate in-process on ephemeral ports with a temporary store, and gives tests
//! a typed client for it. Time is a [`ManualClock`] unless a test asks for the wall clock.
#![forbid(unsafe_code)]

pub mod llm;
pub mod recording;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use keygate::config::Config;
use keygate::serve::{self, Running};
use keygate_core::model::{Actor, Permission};
use keygate_core::store::Store;
use keygate_core::{ManualClock, Timestamp};
use keygate_gateway::index::TokenIndex;
pub use recording::RecordingUpstream;
pub use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The instant every test keygate starts at.
pub const START: Timestamp = Timestamp::from_millis(1_900_000_000_000);

/// A running keygate for one test.
pub struct TestKeygate {
    running: Option<Running>,
    pub clock: ManualClock,
    pub admin_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    /// A root key with every permission in the default workspace.
    pub root_key: String,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A `postgres://` URL instead of SQLite in a temporary directory.
    pub database_url: Option<String>,
    /// An existing data directory (kept) instead of a temporary one.
    pub data_dir: Option<PathBuf>,
    /// Routes behind the gateway.
    pub routes: Vec<keygate::config::RouteConfig>,
    /// Gateway settings (its `listen` is replaced by an ephemeral port).
    pub gateway: Option<keygate::config::GatewayConfig>,
    /// A config file to watch for route changes.
    pub config_path: Option<PathBuf>,
    /// `[oauth]` settings.
    pub oauth: Option<keygate::config::OAuthConfig>,
    /// Write the gateway's access log (off by default in tests).
    pub access_log: bool,
    /// `[cluster]` settings (node registry, acknowledged changes).
    pub cluster: Option<keygate::config::ClusterConfig>,
    /// `[redis]` settings (shared limits).
    pub redis: Option<keygate::config::RedisConfig>,
    /// Open the probes' own listener (`[health] listen`) on an ephemeral port.
    pub health_listener: bool,
    /// `[secret_scanning]` settings (the partner endpoint).
    pub secret_scanning: Option<keygate::config::SecretScanningConfig>,
    /// `[webhooks]` settings.
    pub webhooks: Option<keygate::config::WebhooksConfig>,
    /// `[siem]` settings.
    pub siem: Option<keygate::config::SiemConfig>,
    /// `[email]` settings.
    pub email: Option<keygate::config::EmailConfig>,
    /// `[[providers]]` of the AI gateway.
    pub providers: Vec<keygate_gateway::config::ProviderConfig>,
    /// `[ai]` settings.
    pub ai: Option<keygate::config::AiConfig>,
    /// `[audit]` settings (retention).
    pub audit: Option<keygate::config::AuditConfig>,
}

impl TestKeygate {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> anyhow::Result<Self> {
        let (dir, data_dir) = match opts.data_dir {
            Some(d) => (None, d),
            None => {
                let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
                let path = dir.path().join("data");
                (Some(dir), path)
            }
        };
        let mut cfg = Config {
            data_dir: data_dir.clone(),
            database_url: opts.database_url,
            routes: opts.routes,
            gateway: opts.gateway.unwrap_or_default(),
            oauth: opts.oauth.unwrap_or_default(),
            cluster: opts.cluster.unwrap_or_default(),
            redis: opts.redis.unwrap_or_default(),
            secret_scanning: opts.secret_scanning.unwrap_or_default(),
            webhooks: opts.webhooks.unwrap_or_default(),
            siem: opts.siem.unwrap_or_default(),
            email: opts.email.unwrap_or_default(),
            providers: opts.providers,
            ai: opts.ai.unwrap_or_default(),
            audit: opts.audit.unwrap_or_default(),
            ..Config::default()
        };
        cfg.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        cfg.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        if opts.health_listener {
            cfg.health.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        // Two workers unless the test asks for a number (a per-worker cap is tested on one).
        if cfg.gateway.threads == 0 {
            cfg.gateway.threads = 2;
        }
        cfg.gateway.access_log = opts.access_log;
        cfg.shutdown_grace_seconds = 5;
        let clock = ManualClock::new(START);
        let running = serve::start(&cfg, opts.config_path.as_deref(), None, Arc::new(clock.clone())).await?;
        let (_, secret) = running
            .admin
            .create_root_key("default", "testkit", Permission::ALL.to_vec(), &Actor::cli())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            gateway_addr: running.gateway_addr,
            admin_addr: running.admin_addr,
            running: Some(running),
            clock,
            root_key: secret.expose().to_owned(),
            data_dir,
            _dir: dir,
        })
    }

    fn running(&self) -> &Running {
        // `running` is only taken by `stop`, which consumes self.
        self.running.as_ref().unwrap_or_else(|| unreachable!("TestKeygate used after stop"))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway_addr)
    }

    /// The dashboard's one-time setup code, while no account exists.
    pub fn setup_code(&self) -> Option<String> {
        self.running().setup_code.clone()
    }

    /// Writes the gateway's counted usage to the store now.
    pub async fn flush_usage(&self) {
        self.running().flush_usage().await;
    }

    /// The gateway's TLS settings, when it serves TLS.
    pub fn tls(&self) -> Option<&keygate_gateway::server::TlsSource> {
        self.running().tls.as_ref()
    }

    pub fn gateway(&self) -> &Arc<keygate_gateway::gateway::Gateway> {
        &self.running().gateway
    }

    /// The gateway's live route table (file and stored routes).
    pub fn routes(&self) -> &Arc<keygate::live_routes::LiveRoutes> {
        &self.running().routes
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.running().store.clone()
    }

    pub fn index(&self) -> &TokenIndex {
        &self.running().index
    }

    pub fn admin(&self) -> &Arc<keygate_admin::Admin> {
        &self.running().admin
    }

    pub fn oauth(&self) -> &Arc<keygate_admin::oauth::OAuth> {
        &self.running().oauth
    }

    /// Writes the call log's pending calls to the store until this node has written `total`
    /// calls since it started. A call is recorded just after its answer is sent, so the last
    /// answer a test received may not be in the log yet: this waits for it (10 s at most, then
    /// panics with the count it reached).
    pub async fn write_calls(&self, total: u64) {
        let Some(log) = self.gateway().calls.clone() else { panic!("the call log is off") };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            self.running().write_calls().await;
            let written = log.written.load(std::sync::atomic::Ordering::Relaxed);
            if written >= total {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{written} calls written of the {total} expected");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Runs the anomaly detectors now over what the gateway counted (the background task does it
    /// every second); returns the alerts opened.
    pub async fn detect_now(&self) -> Vec<keygate_core::anomaly::Alert> {
        self.running().detect_now().await
    }

    /// Applies every committed change to the token index now (the background follower does the
    /// same on its own; this makes tests deterministic).
    pub async fn sync_index(&self) -> anyhow::Result<()> {
        keygate_gateway::follow::catch_up(self.index(), &*self.store()).await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Creates a root key in `workspace` with `permissions`.
    pub async fn root_key(&self, workspace: &str, permissions: &[Permission]) -> anyhow::Result<String> {
        let (_, secret) = self
            .admin()
            .create_root_key(workspace, "test key", permissions.to_vec(), &Actor::cli())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(secret.expose().to_owned())
    }

    /// A client authenticated with the default root key.
    pub fn client(&self) -> Client {
        Client::new(&self.url(), Some(self.root_key.clone()))
    }

    pub fn client_with(&self, key: Option<&str>) -> Client {
        Client::new(&self.url(), key.map(str::to_owned))
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// The probes' own listener, if [`Options::health_listener`] asked for one.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.running().health_addr
    }

    /// This node in the node registry.
    pub fn cluster(&self) -> &Arc<keygate::cluster::Cluster> {
        &self.running().cluster
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// An admin API answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Answer {
    /// The `error.code` of an error answer.
    pub fn code(&self) -> &str {
        self.body.pointer("/error/code").and_then(Value::as_str).unwrap_or("")
    }
    pub fn str(&self, pointer: &str) -> String {
        self.body.pointer(pointer).and_then(Value::as_str).unwrap_or_default().to_owned()
    }
}

/// A small admin API client for tests.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Self {
        Self { http: reqwest::Client::new(), base: base.to_owned(), key }
    }

    /// Sends a JSON body (or none) and returns the answer, whatever its status.
    pub async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        self.finish(req).await
    }

    /// Sends raw bytes with a content type.
    pub async fn send_raw(&self, method: Method, path: &str, content_type: &str, body: Vec<u8>) -> Answer {
        let mut req =
            self.http.request(method, format!("{}{path}", self.base)).header("content-type", content_type).body(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        self.finish(req).await
    }

    async fn finish(&self, req: reqwest::RequestBuilder) -> Answer {
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let headers = resp.headers().clone();
                let text = resp.text().await.unwrap_or_default();
                let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                Answer { status, body, headers }
            }
            Err(e) => Answer {
                status: StatusCode::from_u16(599).unwrap_or(StatusCode::BAD_GATEWAY),
                body: Value::String(e.to_string()),
                headers: Default::default(),
            },
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        self.send(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Answer {
        self.send(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        self.send(Method::DELETE, path, None).await
    }

    /// Creates a token and returns (id, secret); panics with the answer if that fails.
    pub async fn create_token(&self, body: &Value) -> (String, String) {
        let a = self.post("/admin/v1/tokens", body).await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        (a.str("/id"), a.str("/token"))
    }
}

/// A route to `upstream` for tests, with everything else at its default.
pub fn route(id: &str, path: &str, upstream: &str) -> keygate::config::RouteConfig {
    keygate::config::RouteConfig::new(id, path, upstream)
}

/// A mock upstream on an ephemeral port. `/hold` waits until [`MockUpstream::release`];
/// `/status/{code}` answers that status; anything else echoes the request as JSON: method,
/// path and query, headers, and the body's length.
pub struct MockUpstream {
    pub addr: SocketAddr,
    release: Arc<tokio::sync::Notify>,
    pub held: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        use axum::extract::{Path as AxPath, Request};
        use axum::routing::{any, get};
        let release = Arc::new(tokio::sync::Notify::new());
        let held = Arc::new(tokio::sync::Notify::new());
        let (r, h) = (release.clone(), held.clone());
        let app = axum::Router::new()
            .route(
                "/hold",
                get(move || {
                    let (r, h) = (r.clone(), h.clone());
                    async move {
                        h.notify_one();
                        r.notified().await;
                        "released"
                    }
                }),
            )
            .route(
                "/upgrade",
                get(|mut req: Request| async move {
                    // A minimal upgraded protocol: echo every byte back.
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = upgrade.await {
                            let io = hyper_util::rt::TokioIo::new(up);
                            let (mut r, mut w) = tokio::io::split(io);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    axum::http::Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "echo")
                        .body(axum::body::Body::empty())
                        .unwrap_or_default()
                }),
            )
            .route(
                "/status/{code}",
                get(|AxPath(code): AxPath<u16>| async move {
                    (axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::OK), "status")
                }),
            )
            .fallback(any(|req: Request| async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
                let headers: serde_json::Map<String, Value> = parts
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned())))
                    .collect();
                axum::Json(serde_json::json!({
                    "method": parts.method.as_str(),
                    "uri": parts.uri.to_string(),
                    "headers": headers,
                    "body_len": bytes.len(),
                }))
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, release, held, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets every held request answer.
    pub fn release(&self) {
        self.release.notify_waiters();
        self.release.notify_one();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
