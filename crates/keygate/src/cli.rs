//! The command line: `keygate serve | root-key | token | scan | config`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "keygate", version, about = "API token authority, gateway and dashboard in one program")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run keygate: the admin API (and gateway) on the configured listeners.
    Serve(StoreArgs),
    /// Manage root keys (admin API credentials), directly on the store.
    #[command(subcommand)]
    RootKey(RootKeyCommand),
    /// Manage tokens through a running keygate's admin API (key from KEYGATE_ADMIN_KEY).
    Token(TokenArgs),
    /// Find keygate tokens in files and git history; exits 1 when one is confirmed.
    Scan(ScanArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// Where the configuration and the store are.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// A TOML configuration file.
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// The data directory (SQLite database and pepper file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A postgres:// URL, to use PostgreSQL instead of SQLite.
    #[arg(long)]
    pub database_url: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RootKeyCommand {
    /// Create a root key and print it once.
    Create {
        /// A name to recognize the key by.
        #[arg(long)]
        name: String,
        /// A permission (repeatable): tokens:read, tokens:write, apps:read, apps:write,
        /// plans:read, plans:write, audit:read, keys:write, root_keys:read, root_keys:write, or *
        /// for all. Default: all.
        #[arg(long = "permission", value_name = "P")]
        permissions: Vec<String>,
        /// The workspace the key belongs to; created if missing.
        #[arg(long, default_value = "default")]
        workspace: String,
        /// Lifetime in seconds from now; the key is refused after it (root_key_expired).
        /// Default: no expiry.
        #[arg(long, value_name = "SECONDS", conflicts_with = "expires_at")]
        expires_in: Option<i64>,
        /// Expiry as an RFC 3339 date-time, such as 2030-01-31T00:00:00Z.
        #[arg(long, value_name = "DATE_TIME")]
        expires_at: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List root keys (never their secrets), newest first: every workspace's, or one's.
    List {
        /// Only this workspace's keys.
        #[arg(long)]
        workspace: Option<String>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a root key for good: refused from its next request on, on every node.
    Revoke {
        /// The key's id (rk_…), as `root-key list` shows it.
        id: String,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        store: StoreArgs,
    },
}

impl RootKeyCommand {
    /// Where the store is.
    pub fn store(&self) -> &StoreArgs {
        match self {
            Self::Create { store, .. } | Self::List { store, .. } | Self::Revoke { store, .. } => store,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The admin API's base URL.
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8081", global = true)]
    pub url: String,
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: TokenCommand,
}

/// Limits and policy given on the command line.
#[derive(Debug, Clone, Default, Args)]
pub struct TokenPolicyArgs {
    /// A granted scope (repeatable), such as orders:read or orders:*.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Lifetime in seconds from now.
    #[arg(long, conflicts_with = "expires_at")]
    pub expires_in: Option<i64>,
    /// Expiry as an RFC 3339 date-time.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// An allowed client address or CIDR (repeatable).
    #[arg(long = "ip", value_name = "CIDR")]
    pub ip_allowlist: Vec<String>,
    /// Rate limit as REQUESTS/SECONDS or REQUESTS/SECONDS+BURST, such as 100/60+20.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Quota as REQUESTS/PERIOD with PERIOD day, month or total, such as 10000/month.
    #[arg(long)]
    pub quota: Option<String>,
    /// Metadata as a JSON object.
    #[arg(long)]
    pub metadata: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// The app that holds it (default: the workspace's default app).
        #[arg(long)]
        app: Option<String>,
        #[command(flatten)]
        policy: TokenPolicyArgs,
    },
    /// List tokens, newest first.
    List {
        #[arg(long)]
        app: Option<String>,
        /// active, suspended, revoked or expired.
        #[arg(long)]
        status: Option<String>,
        /// Part of the name.
        #[arg(long)]
        search: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one token (never its secret).
    Show { id: String },
    /// Change a token without reissuing it. Given lists replace the old ones.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        policy: TokenPolicyArgs,
        /// Remove the expiry.
        #[arg(long, conflicts_with_all = ["expires_in", "expires_at"])]
        no_expiry: bool,
        /// Remove the IP allowlist.
        #[arg(long, conflicts_with = "ip_allowlist")]
        clear_ip_allowlist: bool,
        /// Remove every scope.
        #[arg(long, conflicts_with = "scopes")]
        clear_scopes: bool,
        /// Remove the rate limit.
        #[arg(long, conflicts_with = "rate_limit")]
        no_rate_limit: bool,
        /// Remove the quota.
        #[arg(long, conflicts_with = "quota")]
        no_quota: bool,
    },
    /// Suspend a token until it is resumed.
    Suspend { id: String },
    /// Resume a suspended token.
    Resume { id: String },
    /// Revoke a token for good.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Issue a new secret; the old one works for the grace period, then stops.
    Rotate {
        id: String,
        /// Seconds the old secret keeps working.
        #[arg(long, default_value_t = 0)]
        grace_period: u64,
    },
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Files or directories to scan.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Token prefix to look for (repeatable); root keys (<prefix>root) are always included.
    #[arg(long = "prefix", default_value = "kg")]
    pub prefixes: Vec<String>,
    /// Do not scan git history.
    #[arg(long)]
    pub no_history: bool,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Ask the server (KEYGATE_URL, KEYGATE_ADMIN_KEY) which found tokens are live, and mark
    /// them exposed in their audit trail.
    #[arg(long)]
    pub online: bool,
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file without starting; exits 2 when it is invalid.
    Check { file: PathBuf },
}
