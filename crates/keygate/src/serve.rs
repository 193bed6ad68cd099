//! `keygate serve`: opens the store, loads the pepper, creates the default workspace, loads the
//! token index and keeps it current, and runs the admin listener until SIGTERM or Ctrl-C, then
//! drains in-flight requests within `shutdown_grace_seconds`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keygate_admin::oauth::OAuth;
use keygate_admin::{Admin, AdminSettings, AdminState};
use keygate_core::secret::{OsRandom, Pepper};
use keygate_core::store::{ChangeFeed, RootKeyStore, Store};
use keygate_core::{Clock, SystemClock};
use keygate_gateway::gateway::Gateway;
use keygate_gateway::index::TokenIndex;
use keygate_gateway::server::GatewayServer;
use keygate_store::{SqlStore, StoreLocation};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;

/// The configured store and the service layer on it.
pub struct Opened {
    pub admin: Arc<Admin>,
    pub store: Arc<SqlStore>,
    pub pepper: Pepper,
}

/// Opens the configured store and builds the service layer on it. `pepper_env` is the value of
/// `KEYGATE_PEPPER`, if set.
pub async fn open(cfg: &Config, pepper_env: Option<String>) -> anyhow::Result<Opened> {
    open_with_clock(cfg, pepper_env, Arc::new(SystemClock)).await
}

pub async fn open_with_clock(
    cfg: &Config,
    pepper_env: Option<String>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Opened> {
    if let Some(v) = &pepper_env {
        crate::pepper::from_env(v)?;
    }
    let location =
        StoreLocation::from_settings(cfg.database_url.as_deref(), &cfg.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = keygate_store::open(&location).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let (keys, tokens) = store.credential_counts().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let pepper = crate::pepper::load(pepper_env, &cfg.data_dir, keys + tokens > 0)?;
    let settings = AdminSettings {
        prefix: cfg.prefix()?,
        max_grace_period_seconds: cfg.tokens.max_grace_period_seconds,
        node_timeout_ms: i64::try_from(cfg.cluster.node_timeout_seconds.saturating_mul(1_000)).unwrap_or(i64::MAX),
    };
    let dyn_store: Arc<dyn Store> = store.clone();
    let admin = Arc::new(Admin::new(dyn_store, pepper.clone(), settings, clock, Arc::new(OsRandom)));
    admin.bootstrap().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(Opened { admin, store, pepper })
}

/// A keygate whose listeners are running.
pub struct Running {
    pub admin_addr: SocketAddr,
    /// The probes' own listener (`[health] listen`), if configured.
    pub health_addr: Option<SocketAddr>,
    pub gateway_addr: SocketAddr,
    pub admin: Arc<Admin>,
    pub oauth: Arc<OAuth>,
    pub store: Arc<SqlStore>,
    pub index: TokenIndex,
    pub gateway: Arc<Gateway>,
    /// The gateway's route table and its sources (the file, the store).
    pub routes: Arc<crate::live_routes::LiveRoutes>,
    /// The gateway's TLS settings, when it serves TLS (swapped on certificate reload).
    pub tls: Option<keygate_gateway::server::TlsSource>,
    /// The dashboard's one-time setup code, while no account exists (printed on the terminal).
    pub setup_code: Option<String>,
    /// This node in the node registry.
    pub cluster: Arc<crate::cluster::Cluster>,
    /// The anomaly detector, when `[anomaly] enabled`.
    pub detector: Option<Arc<keygate_admin::alerts::Detector>>,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    gateway_server: GatewayServer,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// Starts keygate's listeners (port 0 picks a free port) and background tasks. `config_path`
/// is watched for route changes.
pub async fn start(
    cfg: &Config,
    config_path: Option<&Path>,
    pepper_env: Option<String>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Running> {
    let opened = open_with_clock(cfg, pepper_env, clock.clone()).await?;
    let store = opened.store.clone();
    tracing::info!(engine = store.engine(), data_dir = %cfg.data_dir.display(), "store opened");

    let listener = TcpListener::bind(cfg.admin.listen).await.with_context(|| {
        format!("cannot listen on {} (admin.listen); is another keygate running?", cfg.admin.listen)
    })?;
    let admin_addr = listener.local_addr()?;
    let health_listener = match cfg.health.listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (health.listen)"))?)
        }
        None => None,
    };

    // The in-memory token index the gateway answers from, kept current by the change feed.
    let dyn_store: Arc<dyn Store> = store.clone();
    let index = TokenIndex::new(cfg.prefix()?, opened.pepper.clone());
    let follower = keygate_gateway::follow::start(index.clone(), dyn_store.clone(), clock.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot load the token index: {}", e.message))?;
    tracing::info!(tokens = index.len(), "token index loaded");

    let bound = GatewayServer::bind(cfg.gateway.listen, cfg.gateway.threads)
        .with_context(|| format!("cannot listen on {} (gateway.listen)", cfg.gateway.listen))?;
    // This node in the registry: the answer to a token change waits for the live nodes.
    let cluster = crate::cluster::Cluster::register(
        &cfg.cluster,
        cfg.audit.retention_days,
        dyn_store.clone(),
        clock.clone(),
        index.clone(),
        bound.addr,
        admin_addr,
    )
    .await?;
    opened.admin.set_change_hook(Arc::new(crate::gateway::IndexHook {
        index: index.clone(),
        store: dyn_store.clone(),
        cluster: cluster.clone(),
    }));
    // The OAuth authorization server: its issuer is the gateway's URL.
    let issuer = cfg.oauth_issuer(bound.addr);
    let oauth = Arc::new(
        OAuth::new(opened.admin.clone(), crate::gateway::oauth_settings(cfg, &issuer))
            .map_err(|e| anyhow::anyhow!("cannot start the OAuth server: {}", e.message))?,
    );
    oauth.reload_keys().await.map_err(|e| anyhow::anyhow!("cannot read the OAuth signing keys: {}", e.message))?;
    oauth
        .ensure_key(keygate_core::jose::Alg::EdDSA)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create an OAuth signing key: {}", e.message))?;
    let gw =
        crate::gateway::build(cfg, opened.admin.clone(), index.clone(), clock.clone(), Some(oauth.clone())).await?;
    if let Some(shared) = &gw.shared {
        cluster.set_shared(shared.clone());
    }
    cluster.set_admin(opened.admin.clone());
    opened.admin.set_notify_settings(cfg.notify_settings());
    let transport = crate::notify::HttpTransport::new(
        cfg.webhooks.allow_private,
        Duration::from_secs(cfg.webhooks.timeout_seconds),
    )
    .context("cannot build the webhook client")?;
    opened.admin.set_pending_usage(Arc::new(crate::gateway::MeterUsage(gw.clone())));
    opened.admin.set_verifier(Arc::new(keygate_gateway::verify::GatewayVerifier::new(gw.clone())));
    opened.admin.set_index(Arc::new(gw.index.clone()));
    // The route table: the file's routes and the stored ones, each with its workspace, built
    // before the listener serves a request.
    let issuer_workspaces = (cfg.oauth.trusted_issuers.iter())
        .map(|t| {
            (t.issuer.clone(), t.workspace.clone().unwrap_or_else(|| keygate_core::model::DEFAULT_WORKSPACE.into()))
        })
        .collect();
    let routes = crate::live_routes::LiveRoutes::start(
        gw.clone(),
        dyn_store.clone(),
        cfg.routes.clone(),
        cfg.gateway.clone(),
        issuer_workspaces,
        crate::live_routes::ProviderSettings {
            file: cfg.providers.clone(),
            allow_private: cfg.ai.allow_private_providers,
            admin: opened.admin.clone(),
        },
    )
    .await?;
    opened.admin.set_route_rules(routes.clone());
    let tls = crate::gateway::tls_source(cfg)?;
    let tls_handle = tls.as_ref().map(|t| t.0.clone());
    let grace = Duration::from_secs(cfg.shutdown_grace_seconds);
    // Budgets start from what was spent this month (by every node, before this start).
    if let Some(ai) = &gw.ai {
        ai.sync(&*store, gw.clock.now().as_millis()).await;
    }
    let gateway_server = bound
        .start(gw.clone(), tls.as_ref().map(|t| t.0.clone()), grace, cfg.gateway.conn_settings())
        .with_context(|| format!("cannot start the gateway on {}", cfg.gateway.listen))?;
    let mut tasks = vec![
        crate::gateway::spawn_oauth_maintenance(oauth.clone()),
        follower,
        keygate_gateway::tasks::spawn_flusher(gw.clone(), dyn_store, Duration::from_secs(cfg.usage_flush_seconds)),
        keygate_gateway::tasks::spawn_health_checks(gw.clone()),
        keygate_gateway::tasks::spawn_resolver(gw.clone()),
        crate::gateway::spawn_reloader(routes.clone(), config_path.map(Path::to_owned), tls),
        routes.spawn_follower(),
        cluster.spawn(),
        crate::notify::spawn_worker(opened.admin.clone(), Arc::new(transport), cluster.id().to_owned()),
    ];
    tasks.extend(crate::siem::start(&cfg.siem, store.clone(), clock.clone(), cluster.id())?);
    if gw.calls.is_some() {
        let retention = Duration::from_secs(u64::from(cfg.call_log.retention_days) * 86_400);
        tasks.push(keygate_gateway::tasks::spawn_call_writer(gw.clone(), store.clone(), retention));
    }
    // On a shared store the detectors run where the detector lease is, over every node's activity.
    let detector = gw.watch.as_ref().map(|_| {
        let det = keygate_admin::alerts::Detector::new(cfg.anomaly.settings());
        Arc::new(if store.engine() == "sqlite" { det } else { det.in_cluster(cluster.id()) })
    });
    if let (Some(watch), Some(det)) = (&gw.watch, &detector) {
        tasks.push(spawn_detector(opened.admin.clone(), watch.clone(), det.clone(), cfg.anomaly.alert_retention_days));
    }
    if let Some(mailer) = crate::notify::SmtpMailer::new(&cfg.email)? {
        opened.admin.enable_email();
        tasks.push(crate::notify::spawn_email_worker(opened.admin.clone(), Arc::new(mailer), cluster.id().to_owned()));
        tracing::info!("email notifications on");
    }

    let metrics_gw = gw.clone();
    let metrics_store = store.clone();
    let metrics_detector = detector.clone();
    let metrics_conns = gateway_server.connections();
    let metrics = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let gw = metrics_gw.clone();
            let store = metrics_store.clone();
            let conns = metrics_conns.clone();
            let detector = metrics_detector.clone();
            async move {
                let lag = store.position().saturating_sub(gw.index.seq());
                let table = gw.table.load();
                let body = table.metrics.render(&[
                    ("keygate_token_index_size", "Tokens resident in the gateway's index.", gw.index.len() as f64),
                    (
                        "keygate_change_feed_position",
                        "Change-feed position the index is current to.",
                        gw.index.seq() as f64,
                    ),
                    ("keygate_change_feed_lag", "Committed token changes the index has not applied yet.", lag as f64),
                ]) + &keygate_gateway::cache::render(table.routes.caches())
                    + &conns.render()
                    + &keygate_gateway::resolve::render_metrics(table.routes.dns())
                    + &gw.shared.as_ref().map(|s| s.render()).unwrap_or_default()
                    + &outbox_metrics(&*store).await
                    + &alert_metrics(&*store, gw.watch.as_deref(), detector.as_deref()).await
                    + &call_log_metrics(gw.calls.as_deref())
                    + &gw
                        .ai
                        .as_ref()
                        .map(|ai| {
                            let mut out = String::new();
                            ai.render_metrics(&mut out);
                            out
                        })
                        .unwrap_or_default();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
            }
        }),
    );
    let account_settings = keygate_admin::accounts::AccountSettings {
        idle_timeout_ms: i64::from(cfg.dashboard.idle_timeout_minutes.max(1)) * 60_000,
        absolute_timeout_ms: i64::from(cfg.dashboard.session_hours.max(1)) * 3_600_000,
        ..Default::default()
    };
    let accounts = Arc::new(
        keygate_admin::accounts::Accounts::new(opened.admin.clone(), account_settings)
            .map_err(|e| anyhow::anyhow!("cannot start the dashboard: {}", e.message))?,
    );
    if let Some(shared) = &gw.shared {
        let (backend, prefix) = shared.backend();
        accounts.set_shared_throttle(backend.clone(), prefix);
        oauth.set_shared_replay(backend, prefix);
    }
    tasks.push(spawn_session_purge(store.clone(), clock.clone(), accounts.settings().idle_timeout_ms));
    let setup_code = accounts.open_setup().await.map_err(|e| anyhow::anyhow!("cannot read accounts: {}", e.message))?;
    let gateway_url = cfg.dashboard.gateway_url.clone().unwrap_or_else(|| format!("http://{}", gateway_server.addr));
    let dashboard = keygate_admin::dashboard::DashboardState::new(
        opened.admin.clone(),
        accounts.clone(),
        cfg.dashboard.secure_cookies,
        gateway_url,
    )
    .map_err(|e| anyhow::anyhow!(e))?
    .with_public_url(cfg.dashboard.public_url.clone())
    .with_oauth(oauth.clone())
    .with_catalog(Arc::new(crate::catalog::Catalog::new(
        gw.clone(),
        gateway_server.addr,
        config_path.and_then(Path::parent).map(Path::to_owned).unwrap_or_default(),
    )));
    tasks.extend(crate::gateway::spawn_jwks_fetchers(&gw, cfg));
    // One router for the admin listener, and the body bound and security headers around all of it.
    let app = keygate_admin::listener::layers(
        keygate_admin::router(AdminState { admin: opened.admin.clone(), oauth: oauth.clone() })
            .merge(metrics)
            .merge(keygate_admin::dashboard::router(dashboard)),
        cfg.dashboard.secure_cookies,
    );
    let (stop, mut stop_rx) = watch::channel(false);
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    );
    let server = tokio::spawn(async move { server.await });
    // The probes' own listener, if configured: it stops with the admin listener.
    let mut health_addr = None;
    if let Some(l) = health_listener {
        health_addr = Some(l.local_addr()?);
        let probes = keygate_admin::listener::layers(
            keygate_admin::probes_router(AdminState { admin: opened.admin.clone(), oauth: oauth.clone() }),
            cfg.dashboard.secure_cookies,
        );
        let mut stop_rx = stop.subscribe();
        let serve = axum::serve(l, probes.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "health listener failed");
            }
        }));
        tracing::info!(health = ?health_addr, "probes listening");
    }
    let gateway_addr = gateway_server.addr;
    tracing::info!(admin = %admin_addr, gateway = %gateway_addr, "keygate is listening");
    Ok(Running {
        admin_addr,
        health_addr,
        gateway_addr,
        admin: opened.admin,
        oauth,
        store,
        index,
        gateway: gw,
        routes,
        tls: tls_handle,
        setup_code,
        cluster,
        detector,
        stop,
        server,
        gateway_server,
        tasks,
        grace,
    })
}

impl Running {
    /// Writes counted usage to the store now.
    pub async fn flush_usage(&self) {
        keygate_gateway::tasks::flush(&self.gateway, &*self.store).await;
    }

    /// Writes every call the call log holds to the store now (tests; a task writes the chunks
    /// that are ready every second).
    pub async fn write_calls(&self) {
        keygate_gateway::tasks::write_calls(&self.gateway, &*self.store, true).await;
    }

    /// Runs the anomaly detectors now over what the watch counted (tests; the detector task does
    /// it every second). Returns the alerts opened.
    pub async fn detect_now(&self) -> Vec<keygate_core::anomaly::Alert> {
        let (Some(watch), Some(det)) = (&self.gateway.watch, &self.detector) else { return Vec::new() };
        match self.admin.detect(det, || watch.drain()).await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(error = %e, "anomaly detection failed");
                Vec::new()
            }
        }
    }

    /// Stops accepting, lets in-flight requests finish within the grace period, flushes usage,
    /// then closes the store.
    pub async fn shutdown(self) {
        tracing::info!(grace_seconds = self.grace.as_secs(), "shutting down; draining in-flight requests");
        // Both listeners drain at once, within one grace period.
        let deadline = tokio::time::Instant::now() + self.grace;
        let _ = self.stop.send(true);
        self.gateway_server.shutdown().await;
        match tokio::time::timeout_at(deadline, self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin listener failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "admin listener task failed"),
            Err(_) => tracing::warn!("in-flight requests did not finish within the grace period"),
        }
        for t in &self.tasks {
            t.abort();
        }
        keygate_gateway::tasks::flush(&self.gateway, &*self.store).await;
        keygate_gateway::tasks::write_calls(&self.gateway, &*self.store, true).await;
        if let (Some(watch), Some(det)) = (&self.gateway.watch, &self.detector) {
            let last = self.admin.detect(det, || watch.drain()).await.map(|_| ());
            if let Err(e) = last.and(self.admin.save_baselines(det).await) {
                tracing::warn!(error = %e, "cannot write the anomaly baselines back");
            }
            if let Err(e) = self.admin.release_detector(det).await {
                tracing::warn!(error = %e, "cannot let go of the detector lease; another node takes over when it runs out");
            }
        }
        self.cluster.stopped().await;
        self.store.close().await;
        tracing::info!("stopped");
    }
}

/// What waits in the outboxes (webhooks, email, SIEM), in the Prometheus text format: a growing
/// number means a receiver is down or slow. Read from the store, so every node shows the same.
async fn outbox_metrics(store: &dyn Store) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Ok((webhooks, emails)) = store.outbox_pending().await {
        let _ = write!(
            out,
            "# HELP keygate_webhook_deliveries_pending Webhook deliveries waiting for an attempt or a retry.\n\
             # TYPE keygate_webhook_deliveries_pending gauge\nkeygate_webhook_deliveries_pending {webhooks}\n\
             # HELP keygate_emails_pending Emails waiting to be sent or retried.\n\
             # TYPE keygate_emails_pending gauge\nkeygate_emails_pending {emails}\n"
        );
    }
    let _ = write!(
        out,
        "# HELP keygate_siem_backlog Audit events waiting to be streamed, per sink.\n# TYPE keygate_siem_backlog gauge\n"
    );
    for sink in keygate_core::siem::Sink::ALL {
        if let Ok(n) = store.siem_backlog(sink).await {
            let _ = writeln!(out, "keygate_siem_backlog{{sink=\"{}\"}} {n}", sink.as_str());
        }
    }
    out
}

/// Anomaly alerts in the Prometheus text format: every workspace's by severity and status (from
/// the store, the same on every node), the alerts this node opened by kind and severity, the
/// baselines it holds and the requests its watch could not count.
async fn alert_metrics(
    store: &dyn Store,
    watch: Option<&keygate_gateway::watch::Watch>,
    det: Option<&keygate_admin::alerts::Detector>,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Ok(counts) = store.alert_counts().await {
        out.push_str(
            "# HELP keygate_alerts Anomaly alerts by severity and status.
# TYPE keygate_alerts gauge
",
        );
        for sev in keygate_core::anomaly::Severity::ALL {
            for st in keygate_core::anomaly::AlertStatus::ALL {
                let n = counts.iter().find(|(s, t, _)| *s == sev && *t == st).map_or(0, |c| c.2);
                let _ = writeln!(out, "keygate_alerts{{severity=\"{sev}\",status=\"{}\"}} {n}", st.as_str());
            }
        }
    }
    if let (Some(watch), Some(det)) = (watch, det) {
        out.push_str(
            "# HELP keygate_anomaly_alerts_raised_total Anomaly alerts this node opened, by kind and severity.
\
             # TYPE keygate_anomaly_alerts_raised_total counter
",
        );
        for (kind, sev, n) in det.raised() {
            let _ = writeln!(
                out,
                "keygate_anomaly_alerts_raised_total{{kind=\"{}\",severity=\"{sev}\"}} {n}",
                kind.as_str()
            );
        }
        let _ = write!(
            out,
            "# HELP keygate_anomaly_baselines Token baselines this node holds in memory.
\
             # TYPE keygate_anomaly_baselines gauge
keygate_anomaly_baselines {}
\
             # HELP keygate_anomaly_watch_dropped_total Requests the watch could not count (its window was full).
\
             # TYPE keygate_anomaly_watch_dropped_total counter
keygate_anomaly_watch_dropped_total {}
\
             # HELP keygate_anomaly_detector_judging Whether this node runs the detectors (alone, or holding the detector lease of a cluster).
\
             # TYPE keygate_anomaly_detector_judging gauge
keygate_anomaly_detector_judging {}
\
             # HELP keygate_anomaly_activity_stale_total Turns of activity other nodes shipped that were too old to judge when this node took them.
\
             # TYPE keygate_anomaly_activity_stale_total counter
keygate_anomaly_activity_stale_total {}
",
            det.held(),
            watch.dropped.load(std::sync::atomic::Ordering::Relaxed),
            u8::from(det.judges()),
            det.stale()
        );
    }
    out
}

/// The call log's counters in the Prometheus text format.
fn call_log_metrics(calls: Option<&keygate_gateway::calls::CallLog>) -> String {
    let Some(c) = calls else { return String::new() };
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    format!(
        "# HELP keygate_call_log_written_total Calls written to the call log.\n\
         # TYPE keygate_call_log_written_total counter\nkeygate_call_log_written_total {}\n\
         # HELP keygate_call_log_dropped_total Calls not kept in the call log (its buffer full, or the store refused the batch).\n\
         # TYPE keygate_call_log_dropped_total counter\nkeygate_call_log_dropped_total {}\n\
         # HELP keygate_call_log_pending Calls waiting to be written.\n\
         # TYPE keygate_call_log_pending gauge\nkeygate_call_log_pending {}\n",
        load(&c.written),
        load(&c.dropped),
        c.pending()
    )
}

/// How long the detector waits before its next turn, after a turn that judged `tokens` tokens:
/// a second while few are active, up to five under many (2,000 more for each second), since a
/// turn's work is per active token and not per request. Alerts come within seconds either way
/// (the rate detectors look at 10-second windows).
fn detector_wait(tokens: usize) -> Duration {
    Duration::from_secs(1 + (tokens as u64 / 2_000).min(4))
}

/// Runs the anomaly detectors over what the gateway's watch counted, every one to five seconds
/// ([`detector_wait`]). Once an hour (and a minute after the start) it also deletes what
/// detection keeps for tokens that can no longer be used, and the alerts resolved more than
/// `alert_retention_days` ago.
fn spawn_detector(
    admin: Arc<keygate_admin::service::Admin>,
    watch: Arc<keygate_gateway::watch::Watch>,
    det: Arc<keygate_admin::alerts::Detector>,
    alert_retention_days: u32,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(1);
        // The state of unusable tokens is purged a minute after start, then hourly.
        let mut purge_at = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            tokio::time::sleep(wait).await;
            let mut tokens = 0;
            let turn = admin.detect(&det, || {
                let activities = watch.drain();
                tokens = activities.len();
                activities
            });
            if let Err(e) = turn.await {
                tracing::warn!(error = %e, "anomaly detection: cannot read or write the store; this turn's activity is skipped");
            }
            wait = detector_wait(tokens);
            if tokio::time::Instant::now() >= purge_at {
                purge_at += Duration::from_secs(3_600);
                let now = admin.now().as_millis();
                let expired_before = keygate_core::Timestamp::from_millis(now - keygate_core::model::ROTATED_KEPT_MS);
                let resolved_before =
                    keygate_core::Timestamp::from_millis(now - i64::from(alert_retention_days) * 86_400_000);
                match admin.store().purge_anomaly_state(expired_before, resolved_before).await {
                    Ok(p) => tracing::debug!(
                        baselines = p.baselines,
                        sightings = p.sightings,
                        alerts = p.alerts,
                        "anomaly detection: state of unusable tokens and old resolved alerts deleted"
                    ),
                    Err(e) => tracing::warn!(error = %e, "anomaly detection: cannot delete old state"),
                }
            }
        }
    })
}

/// Deletes ended dashboard sessions every ten minutes.
fn spawn_session_purge(store: Arc<dyn Store>, clock: Arc<dyn Clock>, idle_ms: i64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            let now = clock.now();
            match store.purge_sessions(now, keygate_core::Timestamp::from_millis(now.as_millis() - idle_ms)).await {
                Ok(n) if n > 0 => tracing::debug!(sessions = n, "ended dashboard sessions deleted"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot delete ended dashboard sessions"),
            }
        }
    })
}

/// `keygate serve`: runs until SIGTERM or Ctrl-C.
pub async fn run(cfg: Config, config_path: Option<&Path>, pepper_env: Option<String>) -> anyhow::Result<()> {
    let running = start(&cfg, config_path, pepper_env, Arc::new(SystemClock)).await?;
    let (root_keys, _) = running.store.credential_counts().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let a = running.admin_addr;
    let g = running.gateway_addr;
    // On the terminal, for people (never in the log); tests read the addresses from these lines.
    eprintln!();
    eprintln!("keygate: dashboard on http://{a}/");
    if let Some(code) = &running.setup_code {
        // It creates the first owner account, once.
        eprintln!("keygate: dashboard setup code: {code} (open http://{a}/setup)");
    }
    eprintln!("keygate: admin API on http://{a}/admin/v1 (explorer: http://{a}/admin/docs)");
    // The scheme the gateway listener speaks: TLS when `[gateway.tls]` is set.
    let scheme = if running.tls.is_some() { "https" } else { "http" };
    eprintln!("keygate: gateway on {scheme}://{g} (try {scheme}://{g}/demo/echo with a token)");
    if root_keys == 0 {
        first_run_hint(&cfg);
    }
    shutdown_signal().await;
    running.shutdown().await;
    Ok(())
}

/// Says how to get the first root key: on the terminal only, never into the log.
fn first_run_hint(cfg: &Config) {
    let target = match &cfg.database_url {
        Some(_) => "--database-url \"$KEYGATE_DATABASE_URL\"".to_owned(),
        None => format!("--data-dir {}", cfg.data_dir.display()),
    };
    eprintln!();
    eprintln!(
        "keygate: for automation, no admin API root key exists yet. Create the first one (it is printed once) with:"
    );
    eprintln!();
    eprintln!("    keygate root-key create --name admin {target}");
    eprintln!();
    eprintln!(
        "then call the admin API with `Authorization: Bearer <key>`, or export KEYGATE_ADMIN_KEY for `keygate token`."
    );
    eprintln!();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detector_waits_longer_only_under_many_active_tokens() {
        let secs = |n| detector_wait(n).as_secs();
        assert_eq!([secs(0), secs(1_999), secs(2_000), secs(7_999), secs(8_000), secs(1_000_000)], [1, 1, 2, 4, 5, 5]);
    }
}
