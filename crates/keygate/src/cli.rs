//! The command line: `keygate serve | root-key | token | app | oauth-client | signing-key | plan |
//! scope | audit | route | workspace | apply | export | scan | config | completions`. Exit codes are set in one place,
//! [`crate::exit_code`].

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
    Token(ApiCommand<TokenCommand>),
    /// Manage apps (the holders of tokens) through the admin API.
    App(ApiCommand<AppCommand>),
    /// Manage an app's OAuth2 client through the admin API; secrets are printed once.
    OauthClient(ApiCommand<OAuthClientCommand>),
    /// List and rotate the OAuth2 server's signing keys through the admin API.
    SigningKey(ApiCommand<SigningKeyCommand>),
    /// Manage plans (the scopes and default limits of apps) through the admin API.
    Plan(ApiCommand<PlanCommand>),
    /// Manage the workspace's scope catalog through the admin API.
    Scope(ApiCommand<ScopeCommand>),
    /// Read the workspace's audit trail through the admin API.
    Audit(ApiCommand<AuditCommand>),
    /// Manage the gateway's routes through the admin API; changes apply on every node at once.
    Route(ApiCommand<RouteCommand>),
    /// Manage the AI gateway's LLM providers through the admin API; keys are sealed and never
    /// shown again.
    Provider(ApiCommand<ProviderCommand>),
    /// Manage the workspace's APIs and their lifecycle (draft, published, deprecated, retired)
    /// through the admin API.
    Api(ApiCommand<ApiLifecycleCommand>),
    /// The workspace's token rules (expiry, allowlist and DPoP requirements, tokens per app,
    /// denied addresses, dormancy) through the admin API.
    Policy(ApiCommand<PolicyCommand>),
    /// Apps' subscriptions to APIs through the admin API: subscribe, list, approve, reject,
    /// cancel.
    Subscription(ApiCommand<SubscriptionCommand>),
    /// Reports for providers through the admin API: consumption by API, route, app, developer
    /// or token, and refusals by reason.
    Report(ApiCommand<ReportCommand>),
    /// Manage workspaces (tenants) through the admin API; needs an instance-level root key.
    Workspace(ApiCommand<WorkspaceCommand>),
    /// Make the workspace match a file: its scope catalog, plans, apps and API-managed routes.
    Apply(ApplyArgs),
    /// Write the workspace's scope catalog, plans, apps and API-managed routes as a file for
    /// `keygate apply`.
    Export(ExportArgs),
    /// Find keygate tokens in files and git history; exits 1 when one is confirmed.
    Scan(ScanArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script to stdout, such as
    /// `keygate completions bash > /etc/bash_completion.d/keygate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
        /// plans:read, plans:write, audit:read, keys:write, root_keys:read, root_keys:write,
        /// routes:read, routes:write, workspaces:read, workspaces:write, tokens:verify, webhooks:read,
        /// webhooks:write, providers:read, providers:write, apis:read, apis:write, or * for all.
        /// Default: all.
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

/// A command group that works through a running keygate's admin API. The root key comes from
/// `KEYGATE_ADMIN_KEY` only: a flag would show in `ps` and in shell history.
#[derive(Debug, Args)]
pub struct ApiCommand<C: Subcommand> {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: C,
}

/// Where the admin API is and how to print its answers; accepted before or after the subcommand.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The admin API's base URL.
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8081", global = true)]
    pub url: String,
    /// `table` for people; `json` for scripts: the API's own JSON (its fields and values).
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// A page of a list: `--limit` and `--cursor`, or `--all` pages.
#[derive(Debug, Clone, Args)]
pub struct PageArgs {
    /// Items per page, 1 to 500.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub limit: u32,
    /// Start after this cursor (the `next_cursor` of the previous page).
    #[arg(long, conflicts_with = "all")]
    pub cursor: Option<String>,
    /// Follow `next_cursor` to the last page and print every item as one list.
    #[arg(long)]
    pub all: bool,
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
    /// What the token may spend on LLM calls over every `ai` route, as DOLLARS/PERIOD with
    /// PERIOD day or month, such as 20/month.
    #[arg(long)]
    pub llm_budget: Option<String>,
    /// How many requests the token may make in all (1: a single-use token).
    #[arg(long, value_name = "N")]
    pub max_uses: Option<u64>,
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
    /// The access review: every token that is not revoked, its app and owner, scopes, status,
    /// last use and whether it is dormant, the longest unused first (`--csv` for a spreadsheet).
    Review {
        /// Print CSV instead of a table.
        #[arg(long)]
        csv: bool,
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
        #[command(flatten)]
        page: PageArgs,
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
        /// Remove the token's own LLM budget.
        #[arg(long, conflicts_with = "llm_budget")]
        no_llm_budget: bool,
        /// Remove the limit on uses.
        #[arg(long, conflicts_with = "max_uses")]
        no_max_uses: bool,
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
    /// The requests the gateway counted for a token, in time buckets and per route.
    Usage {
        id: String,
        /// Start, an RFC 3339 date-time (default: `--to` minus 24 hours); rounded down to its bucket.
        #[arg(long)]
        from: Option<String>,
        /// End, an RFC 3339 date-time, exclusive (default: now).
        #[arg(long)]
        to: Option<String>,
        /// Bucket size (default: hour).
        #[arg(long, value_parser = ["minute", "hour", "day"])]
        granularity: Option<String>,
    },
}

/// An app's limits, shared by all of its tokens (each token's own apply too).
#[derive(Debug, Clone, Default, Args)]
pub struct AppLimitArgs {
    /// Shared rate limit as REQUESTS/SECONDS or REQUESTS/SECONDS+BURST, such as 100/60+20.
    #[arg(long)]
    pub rate_limit: Option<String>,
    /// Shared quota as REQUESTS/PERIOD with PERIOD day, month or total, such as 10000/month.
    #[arg(long)]
    pub quota: Option<String>,
    /// What all of the app's keys may spend on LLM calls together, over every `ai` route, as
    /// DOLLARS/PERIOD with PERIOD day or month, such as 200/month.
    #[arg(long)]
    pub llm_budget: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionCommand {
    /// Subscribe an app to an API (or one version): active at once, or pending where the
    /// API's access is `approval` and the key does not hold apis:write.
    Create {
        /// The app (app_…).
        app: String,
        /// The API, by id (api_…) or name.
        #[arg(long)]
        api: String,
        /// One version of it (default: every version).
        #[arg(long)]
        version: Option<String>,
        /// The plan whose limits hold the app's calls to the API (default: the app's).
        #[arg(long, value_name = "PLAN_ID")]
        plan: Option<String>,
    },
    /// The workspace's subscriptions, newest first.
    List {
        #[arg(long, value_name = "APP_ID")]
        app: Option<String>,
        #[arg(long, value_name = "API_ID")]
        api: Option<String>,
        #[arg(long, value_parser = ["pending", "active", "rejected", "cancelled"])]
        status: Option<String>,
    },
    /// Approve a pending subscription (needs apis:write).
    Approve { id: String },
    /// Reject a pending subscription (needs apis:write).
    Reject {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Cancel a pending or active subscription.
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// The workspace's requests grouped by `--by`, the top consumers first (or, with `--by
    /// reason`, its refusals by reason), with errors and latency percentiles.
    Usage {
        /// api, route, app, developer, token or reason.
        #[arg(long, default_value = "api", value_parser = ["api", "route", "app", "developer", "token", "reason"])]
        by: String,
        /// Start of the range (RFC 3339; default: 30 days before --to; at most 90 days).
        #[arg(long)]
        from: Option<String>,
        /// End of the range (RFC 3339; default: now).
        #[arg(long)]
        to: Option<String>,
        /// Print the groups as CSV instead of a table.
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the token rules.
    Show,
    /// Replace the token rules with those of a JSON file (fields of GET /admin/v1/policy/rules;
    /// a field left out takes its default), `-` for standard input.
    Set {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
    },
    /// Show the workspace's security and governance settings, or change those given (the rest
    /// stay): what happens to exposed tokens and on anomaly alerts, the rotation policy, the
    /// longest token lifetime, and which changes wait for approval.
    Settings(PolicySettingsArgs),
}

/// `keygate policy settings` flags; `none` clears an optional one.
#[derive(Debug, Args)]
pub struct PolicySettingsArgs {
    /// A token found exposed is `notify` (only marked and its owners told), `suspend` or `revoke`.
    #[arg(long, value_parser = ["notify", "suspend", "revoke"])]
    pub exposure_action: Option<String>,
    /// Anomaly alerts of this severity or above suspend their token or OAuth client: `low`,
    /// `medium`, `high`, or `none` (alerts only notify).
    #[arg(long, value_parser = ["low", "medium", "high", "none"])]
    pub anomaly_suspend: Option<String>,
    /// Tokens are to be rotated within this many days of their creation (`none`: no policy).
    #[arg(long)]
    pub max_token_age_days: Option<String>,
    /// Suspend tokens past that age (otherwise they are only flagged).
    #[arg(long)]
    pub suspend_unrotated: Option<bool>,
    /// The longest lifetime a new token may be given, in days (`none`: no limit).
    #[arg(long)]
    pub max_token_lifetime_days: Option<String>,
    /// Developers' plan changes wait for an admin's approval.
    #[arg(long)]
    pub plan_changes_need_approval: Option<bool>,
    /// Publishing an API or version by anyone but an owner waits for an owner's approval.
    #[arg(long)]
    pub api_publish_needs_approval: Option<bool>,
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// An app's statement for a calendar month: its usage and what its plan charges for it.
    Statement {
        id: String,
        /// The month as YYYY-MM (default: the current one).
        #[arg(long)]
        period: Option<String>,
        /// Print CSV (the charged lines and the total) instead of a table.
        #[arg(long)]
        csv: bool,
    },
    /// Create an app.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// The app's plan (plan_…).
        #[arg(long, value_name = "PLAN_ID")]
        plan: Option<String>,
        /// Metadata as a JSON object.
        #[arg(long)]
        metadata: Option<String>,
        #[command(flatten)]
        limits: AppLimitArgs,
    },
    /// List apps, newest first.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one app.
    Show { id: String },
    /// Change an app. Options not given stay as they are.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Remove the description.
        #[arg(long, conflicts_with = "description")]
        no_description: bool,
        /// Move the app to this plan (plan_…). Its tokens keep their scopes; limits above the
        /// plan's ceilings are lowered to them (and listed).
        #[arg(long, value_name = "PLAN_ID")]
        plan: Option<String>,
        /// Take the app off its plan.
        #[arg(long, conflicts_with = "plan")]
        no_plan: bool,
        /// Metadata as a JSON object; replaces the whole object.
        #[arg(long)]
        metadata: Option<String>,
        #[command(flatten)]
        limits: AppLimitArgs,
        /// Remove the shared rate limit.
        #[arg(long, conflicts_with = "rate_limit")]
        no_rate_limit: bool,
        /// Remove the shared quota.
        #[arg(long, conflicts_with = "quota")]
        no_quota: bool,
        /// Remove the app's LLM budget.
        #[arg(long, conflicts_with = "llm_budget")]
        no_llm_budget: bool,
    },
    /// Delete an app. An app that holds tokens that are not revoked is refused (app_has_tokens)
    /// unless --revoke-tokens is given. The default app is never deleted.
    Delete {
        id: String,
        /// Revoke the app's tokens and remove them with it (audited as token.revoke).
        #[arg(long)]
        revoke_tokens: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum OAuthClientCommand {
    /// Register the app's OAuth2 client; its secret is printed once.
    Create {
        /// The app (app_…).
        app_id: String,
        /// A grant type (repeatable): client_credentials, refresh_token,
        /// urn:ietf:params:oauth:grant-type:token-exchange. Default: the server's.
        #[arg(long = "grant-type", value_name = "GRANT")]
        grant_types: Vec<String>,
        /// A scope the client may ask for (repeatable).
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// client_secret_basic, client_secret_post or private_key_jwt.
        #[arg(long, value_name = "METHOD")]
        auth_method: Option<String>,
        /// The client's public keys for private_key_jwt: a JWK Set as JSON, or @FILE to read it.
        #[arg(long)]
        jwks: Option<String>,
        /// jwt or opaque.
        #[arg(long, value_name = "FORMAT")]
        access_token_format: Option<String>,
        /// EdDSA or ES256.
        #[arg(long, value_name = "ALG")]
        signing_alg: Option<String>,
        #[arg(long, value_name = "SECONDS")]
        access_token_ttl: Option<u32>,
        #[arg(long, value_name = "SECONDS")]
        refresh_token_ttl: Option<u32>,
        /// An app whose credentials this client may exchange (repeatable).
        #[arg(long = "exchange-subject-app", value_name = "APP_ID")]
        exchange_subject_apps: Vec<String>,
    },
    /// Show the app's OAuth2 client (never its secret).
    Show { app_id: String },
    /// Change token exchange's delegation rule: the given list replaces the old one.
    Update {
        app_id: String,
        /// An app whose credentials this client may exchange (repeatable).
        #[arg(
            long = "exchange-subject-app",
            value_name = "APP_ID",
            required_unless_present = "no_exchange_subject_apps"
        )]
        exchange_subject_apps: Vec<String>,
        /// Exchange only the client's own app's credentials.
        #[arg(long, conflicts_with = "exchange_subject_apps")]
        no_exchange_subject_apps: bool,
    },
    /// Issue a new client secret, printed once; the old one works for the grace period.
    RotateSecret {
        app_id: String,
        /// Seconds the old secret keeps working.
        #[arg(long, default_value_t = 0)]
        grace_period: u64,
    },
    /// Suspend the client: it is issued no token, and its access tokens are refused, until it is
    /// resumed (its refresh tokens are kept).
    Suspend {
        app_id: String,
        /// Why; shown with the client and kept in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a suspended client.
    Resume { app_id: String },
}

#[derive(Debug, Subcommand)]
pub enum SigningKeyCommand {
    /// List the signing keys (published, signing, retired).
    List,
    /// Publish new signing keys; they sign after `oauth.key_publish_ahead_seconds`. Needs a root
    /// key of the default workspace with keys:write.
    Rotate {
        /// Only this algorithm's key (EdDSA or ES256); default: every algorithm in use.
        #[arg(long)]
        alg: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Create a plan.
    Create {
        /// Unique in the workspace.
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// A scope the plan allows (repeatable); wildcards allowed, such as orders:*.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Default rate limit of its apps' new tokens, as REQUESTS/SECONDS[+BURST].
        #[arg(long)]
        rate_limit: Option<String>,
        /// Default quota of its apps' new tokens, as REQUESTS/PERIOD (day, month or total).
        #[arg(long)]
        quota: Option<String>,
    },
    /// List plans, sorted by name.
    List,
    /// Change a plan. Options not given stay as they are; its apps' tokens keep their scopes and
    /// limits (the limits are the defaults of tokens created from now on).
    Update {
        /// The plan (plan_…).
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Remove the description.
        #[arg(long, conflicts_with = "description")]
        no_description: bool,
        /// A scope the plan allows (repeatable); the scopes given replace the old list.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Allow no scope at all.
        #[arg(long, conflicts_with = "scopes")]
        clear_scopes: bool,
        /// Default rate limit, as REQUESTS/SECONDS[+BURST].
        #[arg(long)]
        rate_limit: Option<String>,
        /// Remove the default rate limit.
        #[arg(long, conflicts_with = "rate_limit")]
        no_rate_limit: bool,
        /// Default quota, as REQUESTS/PERIOD (day, month or total).
        #[arg(long)]
        quota: Option<String>,
        /// Remove the default quota.
        #[arg(long, conflicts_with = "quota")]
        no_quota: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScopeCommand {
    /// List the scope catalog, sorted by scope.
    List,
    /// Add a scope to the catalog, or replace its description and API (an option not given
    /// becomes empty).
    Put {
        /// An exact scope, such as orders:read.
        scope: String,
        #[arg(long)]
        description: Option<String>,
        /// A grouping name, such as orders.
        #[arg(long)]
        api: Option<String>,
    },
    /// Remove a scope from the catalog; tokens keep it.
    Delete { scope: String },
}

/// The audit trail's filters, as `audit list` and `audit export` take them.
#[derive(Debug, Clone, Args)]
pub struct AuditFilterArgs {
    /// Exact actor: rk_… (a root key), usr_… (a person), cli or gateway.
    #[arg(long)]
    pub actor: Option<String>,
    /// Exact action, such as token.create.
    #[arg(long)]
    pub action: Option<String>,
    /// Exact target: the changed object's id, or the scope.
    #[arg(long)]
    pub target: Option<String>,
    /// Events at or after this RFC 3339 date-time.
    #[arg(long)]
    pub from: Option<String>,
    /// Events before this RFC 3339 date-time.
    #[arg(long)]
    pub to: Option<String>,
}

impl AuditFilterArgs {
    /// The filters as the API's query parameters.
    pub fn query(&self) -> crate::client::Query {
        let mut q = crate::client::Query::default();
        q.push_opt("actor", self.actor.as_deref());
        q.push_opt("action", self.action.as_deref());
        q.push_opt("target", self.target.as_deref());
        q.push_opt("from", self.from.as_deref());
        q.push_opt("to", self.to.as_deref());
        q
    }
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit events, newest first.
    List {
        #[command(flatten)]
        filter: AuditFilterArgs,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Write the workspace's audit trail to stdout as JSON lines or CSV, newest first, with the
    /// list's filters (every event: the export's pages are followed).
    Export {
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl", "csv"])]
        format: String,
        #[command(flatten)]
        filter: AuditFilterArgs,
    },
    /// Print the head of the workspace's audit chain as JSON: keep it outside keygate
    /// (`keygate audit head > head.json`) to check the trail against it later.
    Head,
    /// Check every link of the workspace's audit chain; names the first broken link and exits 1.
    /// With `--data-dir` or `--database-url`, or without KEYGATE_ADMIN_KEY, it reads the store
    /// directly (no server needed; the store and pepper as `keygate serve` finds them, by default
    /// ./keygate-data) and checks every workspace, or `--workspace`.
    Verify {
        /// A head saved earlier with `keygate audit head`: the trail must still contain it.
        #[arg(long, value_name = "FILE")]
        checkpoint: Option<PathBuf>,
        /// Read this data directory's store directly.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Read this PostgreSQL database directly (the pepper from KEYGATE_PEPPER or --data-dir).
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// With the store read directly: only this workspace (by name).
        #[arg(long)]
        workspace: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// List the workspace's routes and the shared ones, those of the config file included.
    List,
    /// Show one route with every field, defaults filled in.
    Show { id: String },
    /// Create a route from a file: one `[[routes]]` table (or its fields at the top level) in
    /// TOML, or the route as a JSON object; `-` reads stdin.
    Create {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Replace an API-managed route's fields with those of a file (a field left out takes its
    /// default, as in the config file); `keygate route show ID --output json` is a starting point.
    Update {
        id: String,
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// Delete an API-managed route; its requests get 404 from the next request on, on every node.
    Delete { id: String },
}

/// Where a provider's key comes from: never the command line (shell history, `ps`).
#[derive(Debug, Clone, Args)]
pub struct ProviderKeyArgs {
    /// Read the key from this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "api_key_stdin")]
    pub api_key_env: Option<String>,
    /// Read the key from standard input (its first line).
    #[arg(long)]
    pub api_key_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// List the providers the workspace's routes may call: the config file's and its own.
    List,
    /// Show one provider (never its key; its fingerprint).
    Show { id: String },
    /// Add a provider; its key is sealed and never shown again.
    Create {
        /// The name deployments start with (`openai` in `openai/gpt-4o-mini`).
        #[arg(long)]
        id: String,
        /// openai (and every OpenAI-compatible server), anthropic or azure.
        #[arg(long)]
        kind: String,
        /// https://… (a public host unless [ai] allow_private_providers is set).
        #[arg(long)]
        base_url: String,
        /// Anthropic: anthropic-version; Azure: api-version (required).
        #[arg(long)]
        api_version: Option<String>,
        /// A model's price in dollars per million tokens: MODEL=INPUT,OUTPUT[,CACHED_INPUT].
        /// Repeatable.
        #[arg(long = "price", value_name = "MODEL=IN,OUT[,CACHED]")]
        prices: Vec<String>,
        #[command(flatten)]
        key: ProviderKeyArgs,
    },
    /// Give a provider a new key (used from the next call on); then revoke the old one at the
    /// provider.
    RotateKey {
        id: String,
        #[command(flatten)]
        key: ProviderKeyArgs,
    },
    /// Delete a provider with its sealed key (refused while a route calls it).
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum ApiLifecycleCommand {
    /// List the workspace's APIs with their state, versions and routes.
    List,
    /// Show one API.
    Show { id: String },
    /// Create an API, as a draft (its routes serve only this workspace until it is published).
    Create {
        /// Unique in the workspace; routes name the API by it or by its id.
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// A version's name (such as v1), made a draft. Repeatable.
        #[arg(long = "version", value_name = "NAME")]
        versions: Vec<String>,
        /// What replaces it: an http(s):// URL or an absolute path.
        #[arg(long)]
        successor: Option<String>,
        /// Its OpenAPI document: JSON inline or @FILE.
        #[arg(long, value_name = "JSON|@FILE")]
        openapi: Option<String>,
    },
    /// Change an API (or, with --version, one of its versions): its state (draft, published,
    /// deprecated, retired), sunset and successor, and the API's own fields.
    Update {
        id: String,
        /// Change this version of the API instead of the API as a whole.
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// published, deprecated or retired (draft → published → deprecated → retired).
        #[arg(long)]
        state: Option<String>,
        /// When it goes away: an RFC 3339 time in the future, or `none`.
        #[arg(long)]
        sunset: Option<String>,
        /// What replaces it (an http(s):// URL or an absolute path), or `none`.
        #[arg(long)]
        successor: Option<String>,
        /// The whole list of the API's versions (new ones are drafts). Repeatable.
        #[arg(long = "versions", value_name = "NAME")]
        versions: Vec<String>,
        /// Its OpenAPI document: JSON inline or @FILE, or `none`.
        #[arg(long, value_name = "JSON|@FILE")]
        openapi: Option<String>,
    },
    /// Delete an API (refused while a route names it).
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// List the instance's workspaces.
    List,
    /// Show one workspace.
    Show { id: String },
    /// Create a workspace.
    Create { name: String },
    /// Rename a workspace; its id, tokens and routes stay.
    Rename { id: String, name: String },
    /// Delete a workspace with its root keys, routes, members and OAuth clients. One that still
    /// holds tokens is deleted only with --revoke-tokens, which revokes them.
    Delete {
        id: String,
        /// Revoke the workspace's tokens with it.
        #[arg(long)]
        revoke_tokens: bool,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The file (TOML: [[scopes]], [[plans]], [[apps]], [[routes]]), or - for standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: PathBuf,
    /// Print what would change, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also delete what the file does not have, in the sections it has (never plans or the default
    /// app; an app with tokens stops the run).
    #[arg(long)]
    pub prune: bool,
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// `table`: one line per change; `json`: {"changes": […], "applied": bool}.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Write to this file instead of standard output.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[arg(long, env = "KEYGATE_URL", default_value = "http://127.0.0.1:8081")]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Files or directories to scan (with --staged: the repositories or parts of them; default
    /// the current directory's).
    #[arg(required_unless_present = "staged")]
    pub paths: Vec<PathBuf>,
    /// Scan only what is staged for the next commit (`git diff --cached`), for a git pre-commit
    /// hook: exit 1 when a token would be committed.
    #[arg(long, conflicts_with = "no_history")]
    pub staged: bool,
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
