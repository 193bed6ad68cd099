//! `keygate serve`: opens the store, loads the pepper, creates the default workspace, and runs
//! the admin listener until SIGTERM or Ctrl-C, then drains in-flight requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keygate_admin::{Admin, AdminSettings, AdminState};
use keygate_core::secret::OsRandom;
use keygate_core::store::{RootKeyStore, Store};
use keygate_core::SystemClock;
use keygate_gateway::index::TokenIndex;
use keygate_store::StoreLocation;
use tokio::net::TcpListener;

use crate::config::Config;

/// Everything `serve` and `root-key create` share: the configured store and the service layer.
pub struct Opened {
    pub admin: Arc<Admin>,
    pub store: Arc<keygate_store::SqlStore>,
}

/// Opens the configured store and builds the service layer on it.
pub async fn open(cfg: &Config) -> anyhow::Result<Opened> {
    let location = StoreLocation::from_settings(cfg.database_url.as_deref(), &cfg.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = keygate_store::open(&location).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let pepper = crate::pepper::load(std::env::var("KEYGATE_PEPPER").ok(), &cfg.data_dir)?;
    let settings = AdminSettings { prefix: cfg.prefix()?, max_grace_period_seconds: cfg.tokens.max_grace_period_seconds };
    let dyn_store: Arc<dyn Store> = store.clone();
    let admin = Arc::new(Admin::new(dyn_store, pepper, settings, Arc::new(SystemClock), Arc::new(OsRandom)));
    admin.bootstrap().await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    Ok(Opened { admin, store })
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let opened = open(&cfg).await?;
    let store = opened.store.clone();
    tracing::info!(engine = store.engine(), data_dir = %cfg.data_dir.display(), "store opened");

    let admin_listener = TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin.listen); is another keygate running?", cfg.admin.listen))?;

    // The in-memory token index the gateway answers from, kept current by the change feed.
    let dyn_store: Arc<dyn Store> = store.clone();
    let index = TokenIndex::new(cfg.prefix()?, opened_pepper(&cfg)?);
    let follower = keygate_gateway::follow::start(index.clone(), dyn_store, Arc::new(SystemClock))
        .await
        .map_err(|e| anyhow::anyhow!("cannot load the token index: {}", e.message))?;
    tracing::info!(tokens = index.len(), "token index loaded");

    if store.root_key_count().await.map_err(|e| anyhow::anyhow!("{e}"))? == 0 {
        first_run_hint(&cfg);
    }
    let state = AdminState { admin: opened.admin.clone() };
    let app = keygate_admin::router(state);
    tracing::info!(admin = %cfg.admin.listen, "keygate is listening");
    eprintln!("keygate: admin API on http://{}/admin/v1 (explorer: http://{}/admin/docs)", cfg.admin.listen, cfg.admin.listen);

    let grace = Duration::from_secs(cfg.shutdown_grace_seconds);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(admin_listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        });
    let server = tokio::spawn(async move { server.await });
    shutdown_signal().await;
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down; draining in-flight requests");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin listener failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "admin listener task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish within the grace period"),
    }
    follower.abort();
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

fn opened_pepper(cfg: &Config) -> anyhow::Result<keygate_core::secret::Pepper> {
    crate::pepper::load(std::env::var("KEYGATE_PEPPER").ok(), &cfg.data_dir)
}

/// Says how to get the first root key: on the terminal only, never into the log.
fn first_run_hint(cfg: &Config) {
    let target = match &cfg.database_url {
        Some(_) => "--database-url \"$KEYGATE_DATABASE_URL\"".to_owned(),
        None => format!("--data-dir {}", cfg.data_dir.display()),
    };
    eprintln!();
    eprintln!("keygate: no root key exists yet. Create the first one (it is printed once) with:");
    eprintln!();
    eprintln!("    keygate root-key create --name admin {target}");
    eprintln!();
    eprintln!("then call the admin API with `Authorization: Bearer <key>`, or export KEYGATE_ADMIN_KEY for `keygate token`.");
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
