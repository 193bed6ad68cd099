//! keygate's store: one implementation of the `keygate-core` store traits over SQLite (the
//! embedded default) and PostgreSQL (several nodes), the migrations of each engine, and the
//! change feed (token changes and access-token revocations). The engine is chosen once, from the
//! URL, in [`open`]; no query branches on it afterwards.
#![forbid(unsafe_code)]

mod accounts;
mod anomaly;
mod apis;
mod audit;
mod calls;
mod feed;
mod llm;
mod nodes;
mod notify;
mod oauth;
pub mod redis_limits;
mod routes;
mod rows;
mod siem;
mod sql;
mod subscriptions;
mod workspaces;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use keygate_core::{Error, Result};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};

pub use sql::SqlStore;

/// How long a PostgreSQL caller waits for a pooled connection before `store_unavailable`.
pub const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// The engines keygate runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// SQLite in `<dir>/keygate.db`, created with the directory if missing.
    DataDir(std::path::PathBuf),
    /// A `postgres://` (or `postgresql://`) URL.
    Postgres(String),
}

impl StoreLocation {
    /// A database URL if one is given and is PostgreSQL's, else the data directory.
    pub fn from_settings(database_url: Option<&str>, data_dir: &Path) -> Result<Self> {
        match database_url {
            None | Some("") => Ok(Self::DataDir(data_dir.to_owned())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Self::Postgres(url.to_owned()))
            }
            Some(_) => Err(Error::invalid(
                "invalid_database_url",
                "database_url must be a postgres:// URL; leave it unset to use SQLite in the data directory",
            )),
        }
    }
}

/// Opens the store at `location`, creating the SQLite file if needed, and runs the engine's
/// migrations. Failures are clear errors (`store_unavailable`, `store_corrupt`), never panics.
pub async fn open(location: &StoreLocation) -> Result<Arc<SqlStore>> {
    sqlx::any::install_default_drivers();
    let (engine, url, max_conns) = match location {
        StoreLocation::DataDir(dir) => {
            create_private_dir(dir)?;
            let file = dir.join("keygate.db");
            let url = format!("sqlite://{}?mode=rwc", file.display());
            (Engine::Sqlite, url, 8)
        }
        StoreLocation::Postgres(url) => (Engine::Postgres, url.clone(), 16),
    };
    let options = AnyConnectOptions::from_str(&url)
        .map_err(|e| Error::invalid("invalid_database_url", format!("the database URL is not valid: {e}")))?
        .disable_statement_logging();
    // One connection first, so a damaged file or an unreachable server is reported as such
    // rather than as a pool time-out.
    let mut probe = sqlx::AnyConnection::connect_with(&options).await.map_err(|e| open_error(engine, &e))?;
    if engine == Engine::Sqlite {
        probe.execute(SQLITE_PRAGMAS).await.map_err(|e| open_error(engine, &e))?;
    }
    probe.execute("SELECT 1").await.map_err(|e| open_error(engine, &e))?;
    let _ = probe.close().await;
    let pool = AnyPoolOptions::new()
        .max_connections(max_conns)
        // A PostgreSQL that is gone makes callers wait this long for a connection, then answer
        // `store_unavailable` (the admin API's 503): bounded, not hanging. SQLite waits longer
        // (its only cause is a long write holding the file).
        .acquire_timeout(match engine {
            Engine::Postgres => PG_ACQUIRE_TIMEOUT,
            Engine::Sqlite => Duration::from_secs(10),
        })
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if engine == Engine::Sqlite {
                    conn.execute(SQLITE_PRAGMAS).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| open_error(engine, &e))?;
    let migrator = match engine {
        Engine::Sqlite => sqlx::migrate!("migrations/sqlite"),
        Engine::Postgres => sqlx::migrate!("migrations/postgres"),
    };
    migrator.run(&pool).await.map_err(|e| {
        Error::new(
            keygate_core::ErrorKind::Unavailable,
            "store_migration_failed",
            format!(
                "the {} store could not be migrated: {e}; is this a keygate database of a newer version, or damaged?",
                engine.as_str()
            ),
        )
    })?;
    SqlStore::start(pool, engine, url).await
}

/// WAL lets readers run beside the writer; busy_timeout makes writers queue instead of failing.
const SQLITE_PRAGMAS: &str =
    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;";

fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::unavailable(format!("cannot create the data directory {}: {e}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

fn open_error(engine: Engine, e: &sqlx::Error) -> Error {
    let text = e.to_string();
    if text.contains("file is not a database") || text.contains("malformed") {
        return Error::new(
            keygate_core::ErrorKind::Unavailable,
            "store_corrupt",
            format!(
                "the SQLite database in the data directory is damaged or not a keygate database ({text}); restore it from a backup or point --data-dir elsewhere"
            ),
        );
    }
    Error::unavailable(format!("cannot open the {} store: {text}", engine.as_str()))
}

/// Maps a driver error to a domain error. Details of unexpected failures are logged here and
/// never reach an API answer.
pub(crate) fn db_error(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            tracing::warn!(error = %e, "store unavailable");
            Error::unavailable("the store is not reachable right now; retry shortly")
        }
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            Error::conflict("already_exists", "an object with this name or key already exists")
        }
        _ => {
            tracing::error!(error = %e, "store error");
            Error::internal("the store failed; see the server log")
        }
    }
}

#[cfg(test)]
mod conformance;

/// Runs one administrative statement (such as `CREATE DATABASE`) on a PostgreSQL server, outside
/// any transaction. For tests and tooling that create and drop their own databases.
#[doc(hidden)]
pub async fn admin_sql(url: &str, sql: &str) -> Result<()> {
    let mut conn = sqlx::postgres::PgConnection::connect(url).await.map_err(|e| open_error(Engine::Postgres, &e))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.map_err(db_error)?;
    let _ = conn.close().await;
    Ok(())
}
