//! The AI gateway: on a route of kind `ai` keygate serves the OpenAI-compatible API
//! (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`, `/v1/models`)
//! and Anthropic's Messages API (`/v1/messages`) itself, and calls the LLM providers
//! (`[[providers]]`) with their keys, which callers never see: a keygate token is a *virtual key*.
//!
//! - [`AiRoute`]: a route's models (aliases → deployments `provider/model`, tried in order on 429,
//!   5xx or no answer), its tokens-per-minute limit and its budget in money, per virtual key;
//! - [`Ai`]: the providers, the HTTP client that calls them, the spending and the LLM usage
//!   counted so far;
//! - [`serve`]: the request path of an `ai` route (after the admit phase: the token, its IP
//!   allowlist, DPoP, the route's scopes and request limits are checked as on every route);
//! - [`wire`]: usage in the answers and the translation between OpenAI's chat format and
//!   Anthropic's; [`sse`]: streamed events.

pub mod messages;
pub mod prompt;
pub mod serve;
pub mod sse;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use keygate_core::policy::{QuotaPeriod, RateLimit};
use keygate_core::token_format::PUBLIC_ID_LEN;
use parking_lot::Mutex;

use crate::config::{ModelPrice, ProviderConfig, ProviderKind, RouteConfig, RouteKind};
use crate::limiter::Limiter;
pub use wire::Usage;

/// A model served by a provider: `openai/gpt-4o-mini` is `gpt-4o-mini` at provider `openai`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub provider: Arc<str>,
    pub model: Arc<str>,
}

impl Deployment {
    /// `provider/model` (the model may hold more slashes: `together/meta-llama/Llama-3-8b`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((p, m)) if valid_provider_id(p) && !m.is_empty() && m.bytes().all(|b| b > b' ' && b != 0x7f) => {
                Ok(Self { provider: Arc::from(p), model: Arc::from(m) })
            }
            _ => Err(format!("{s:?} is not provider/model (such as \"openai/gpt-4o-mini\")")),
        }
    }

    pub fn name(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

fn valid_provider_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// A budget in micro-dollars per period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub micro_usd: u64,
    pub period: QuotaPeriod,
}

/// An `ai` route, compiled.
#[derive(Debug)]
pub struct AiRoute {
    pub models: BTreeMap<String, Vec<Deployment>>,
    pub aliases_only: bool,
    /// LLM tokens per minute per virtual key, as a GCRA limit (a bucket of a minute's worth).
    pub tokens_per_minute: Option<RateLimit>,
    /// Per virtual key, per app (shared by its keys), per workspace.
    pub budget: Option<Budget>,
    pub app_budget: Option<Budget>,
    pub workspace_budget: Option<Budget>,
    pub first_byte_timeout: Duration,
    /// Each call starts with the next deployment in turn (`balance = "round_robin"`).
    pub round_robin: bool,
    /// Calls so far, for the turn.
    turn: std::sync::atomic::AtomicUsize,
    /// Prompts published as REST endpoints, by name (`POST {path}/{name}`).
    pub prompts: BTreeMap<String, prompt::Prompt>,
    /// Calls' requests and answers are logged, kept this many milliseconds.
    pub log_retention_ms: Option<i64>,
}

/// Days a logged call is kept by default.
pub const DEFAULT_LOG_RETENTION_DAYS: u32 = 7;

/// How long a provider may take to start answering by default (a non-streamed answer starts
/// when it is complete).
pub const DEFAULT_FIRST_BYTE_TIMEOUT_MS: u64 = 120_000;

impl AiRoute {
    /// The `ai` side of a route: `None` for an `http` route. Errors say what to change.
    pub fn from_config(c: &RouteConfig) -> Result<Option<Self>, String> {
        match (c.kind, &c.ai) {
            (RouteKind::Http, None) => return Ok(None),
            (RouteKind::Http, Some(_)) => return Err("[routes.ai] is for routes of kind = \"ai\"".into()),
            (RouteKind::Ai, _) => {}
        }
        let cfg = c.ai.clone().unwrap_or_default();
        if c.public {
            return Err("an ai route cannot be public: every call is made with a virtual key".into());
        }
        if c.cache.is_some() {
            return Err("an ai route cannot have [routes.cache]".into());
        }
        let mut models = BTreeMap::new();
        for (alias, deployments) in &cfg.models {
            if alias.is_empty() || alias.len() > 256 || alias.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(format!("ai.models: {alias:?} is not a model name (1-256 visible characters)"));
            }
            if deployments.is_empty() {
                return Err(format!("ai.models.{alias}: name at least one deployment (\"provider/model\")"));
            }
            let d = deployments
                .iter()
                .map(|d| Deployment::parse(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("ai.models.{alias}: {e}"))?;
            models.insert(alias.clone(), d);
        }
        if cfg.aliases_only && models.is_empty() {
            return Err("ai.aliases_only needs ai.models".into());
        }
        let tokens_per_minute = match cfg.tokens_per_minute {
            Some(0) => return Err("ai.tokens_per_minute must be at least 1".into()),
            Some(n) => Some(RateLimit { requests: n, per_seconds: 60, burst: 0 }),
            None => None,
        };
        let budget = budget_of("budget", cfg.budget)?;
        let app_budget = budget_of("app_budget", cfg.app_budget)?;
        let workspace_budget = budget_of("workspace_budget", cfg.workspace_budget)?;
        let first_byte_timeout =
            Duration::from_millis(cfg.first_byte_timeout_ms.unwrap_or(DEFAULT_FIRST_BYTE_TIMEOUT_MS).max(1));
        let serves = |m: &str| models.contains_key(m) || (!cfg.aliases_only && Deployment::parse(m).is_ok());
        let prompts = cfg
            .prompts
            .iter()
            .map(|(name, p)| prompt::Prompt::from_config(name, p, &serves).map(|p| (name.clone(), p)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let log_retention_ms = match (cfg.log_prompts, cfg.log_retention_days) {
            (_, Some(d)) if !(1..=3650).contains(&d) => {
                return Err("ai.log_retention_days is from 1 to 3650".into());
            }
            (false, Some(_)) => return Err("ai.log_retention_days needs ai.log_prompts = true".into()),
            (true, d) => Some(i64::from(d.unwrap_or(DEFAULT_LOG_RETENTION_DAYS)) * 86_400_000),
            (false, None) => None,
        };
        Ok(Some(Self {
            models,
            aliases_only: cfg.aliases_only,
            tokens_per_minute,
            budget,
            app_budget,
            workspace_budget,
            first_byte_timeout,
            round_robin: cfg.balance == crate::config::AiBalance::RoundRobin,
            turn: std::sync::atomic::AtomicUsize::new(0),
            prompts,
            log_retention_ms,
        }))
    }

    /// The deployments that serve `name` on this route: an alias's, or the deployment the name
    /// is (unless the route serves its aliases only). `None`: the route does not serve it.
    pub fn deployments(&self, name: &str) -> Option<Vec<Deployment>> {
        if let Some(d) = self.models.get(name) {
            let mut d = d.clone();
            if self.round_robin && d.len() > 1 {
                let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let by = turn % d.len();
                d.rotate_left(by);
            }
            return Some(d);
        }
        if self.aliases_only {
            return None;
        }
        Deployment::parse(name).ok().map(|d| vec![d])
    }
}

/// A budget of `[routes.ai]`, checked: dollars from 0 to 10^12, a day or a month.
fn budget_of(name: &str, b: Option<crate::config::AiBudget>) -> Result<Option<Budget>, String> {
    match b {
        Some(b) if !b.usd.is_finite() || b.usd < 0.0 || b.usd > 1e12 => {
            Err(format!("ai.{name}.usd must be a number of dollars from 0 to 10^12"))
        }
        Some(b) if b.period == QuotaPeriod::Total => Err(format!("ai.{name}.period must be \"day\" or \"month\"")),
        Some(b) => Ok(Some(Budget { micro_usd: (b.usd * 1e6).round() as u64, period: b.period })),
        None => Ok(None),
    }
}

/// The scope a virtual key needs to call model `name`: `llm:` and the name in lower case, each
/// character outside `a-z 0-9 _ - .` (such as the `/` of `openai/gpt-4o`) written as `.`, at
/// most 64 characters. `llm:*` covers every model.
pub fn model_scope(name: &str) -> keygate_core::scope::Scope {
    let action: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.') { c } else { '.' })
        .take(64)
        .collect();
    let action = if action.is_empty() { ".".to_owned() } else { action };
    keygate_core::scope::Scope::parse(&format!("llm:{action}"))
        .unwrap_or_else(|_| keygate_core::scope::Scope::parse("llm:.").unwrap_or_else(|_| unreachable_scope()))
}

#[allow(clippy::panic)]
fn unreachable_scope() -> keygate_core::scope::Scope {
    // `llm:.` is a valid scope: parts of `a-z 0-9 _ - .`, 1-64 characters.
    panic!("llm:. is a valid scope")
}

/// A provider's key, never shown (not in `Debug`, not in logs).
pub struct ProviderKey(Box<str>);

impl std::fmt::Debug for ProviderKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProviderKey(…)")
    }
}

impl ProviderKey {
    pub fn new(key: &str) -> Self {
        Self(key.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// A provider keygate calls.
#[derive(Debug)]
pub struct Provider {
    pub id: Arc<str>,
    pub kind: ProviderKind,
    /// Without a trailing slash.
    pub base_url: String,
    pub key: Option<ProviderKey>,
    pub api_version: Option<String>,
    pub prices: HashMap<String, ModelPrice>,
    /// A provider made through the admin API: the workspace whose `ai` routes may call it.
    /// `None`: a provider of the config file, which every workspace's routes may call.
    pub workspace: Option<Arc<str>>,
}

impl Provider {
    /// A provider from its configuration, its key read with `env` (from the environment
    /// variable the configuration names) or from its file (unless `read_files` is false: a
    /// configuration check).
    pub fn from_config(
        c: &ProviderConfig,
        env: &dyn Fn(&str) -> Option<String>,
        read_files: bool,
    ) -> Result<Self, String> {
        let err = |m: String| format!("provider {:?}: {m}", c.id);
        let raw = match (&c.api_key_env, &c.api_key_file) {
            (Some(_), Some(_)) => return Err(err("give api_key_env or api_key_file, not both".into())),
            (Some(var), None) => Some(env(var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                err(format!("the environment variable {var} (api_key_env) is not set: set it to the provider's key"))
            })?),
            (None, Some(path)) if read_files => {
                Some(std::fs::read_to_string(path).map_err(|e| err(format!("api_key_file {}: {e}", path.display())))?)
            }
            (None, Some(_)) | (None, None) => None,
        };
        Self::build(c, raw, None)
    }

    /// A provider made through the admin API: its fields, its key (opened from its seal) and
    /// the workspace whose routes may call it.
    pub fn stored(c: &ProviderConfig, key: Option<String>, workspace: &str) -> Result<Self, String> {
        if c.api_key_env.is_some() || c.api_key_file.is_some() {
            return Err(format!(
                "provider {:?}: a provider made through the API takes its key as api_key, not api_key_env or api_key_file",
                c.id
            ));
        }
        Self::build(c, key, Some(Arc::from(workspace)))
    }

    fn build(c: &ProviderConfig, raw: Option<String>, workspace: Option<Arc<str>>) -> Result<Self, String> {
        let err = |m: String| format!("provider {:?}: {m}", c.id);
        if !valid_provider_id(&c.id) {
            return Err(err("id must be 1-64 letters, digits, - or _".into()));
        }
        let url =
            url_parts(&c.base_url).ok_or_else(|| err(format!("base_url {:?} is not an http(s) URL", c.base_url)))?;
        if reqwest::Url::parse(&c.base_url).ok().and_then(|u| u.host_str().map(|h| !h.is_empty())) != Some(true) {
            return Err(err(format!("base_url {:?} is not a valid URL with a host", c.base_url)));
        }
        if !url.https && !url.loopback {
            return Err(err(format!(
                "base_url {:?}: http:// only to a loopback address (127.0.0.1, ::1, localhost); use https://",
                c.base_url
            )));
        }
        if let Some(v) = &c.api_version
            && (v.is_empty()
                || v.len() > 64
                || !v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
        {
            return Err(err(format!(
                "api_version {v:?}: 1-64 letters, digits, '-', '_' or '.' (such as \"2024-10-21\")"
            )));
        }
        if c.kind == ProviderKind::Azure && c.api_version.is_none() {
            return Err(err("an azure provider needs api_version (such as \"2024-10-21\")".into()));
        }
        let key = match raw {
            Some(v) if v.trim().is_empty() => return Err(err("the provider's key is empty".into())),
            Some(v) if !crate::head::is_field_value(v.trim().as_bytes()) => {
                return Err(err("the provider's key is not a valid header value".into()));
            }
            Some(v) => Some(ProviderKey::new(v.trim())),
            None => None,
        };
        for (model, p) in &c.prices {
            let ok = |x: f64| x.is_finite() && (0.0..=1e6).contains(&x);
            if !ok(p.input) || !ok(p.output) || p.cached_input.is_some_and(|x| !ok(x)) {
                return Err(err(format!("prices.{model}: dollars per million tokens from 0 to 10^6")));
            }
        }
        Ok(Self {
            id: Arc::from(c.id.as_str()),
            kind: c.kind,
            base_url: c.base_url.trim_end_matches('/').to_owned(),
            key,
            api_version: c.api_version.clone(),
            prices: c.prices.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            workspace,
        })
    }

    /// What `usage` of `model` costs, in micro-dollars (rounded up); 0 for a model without a
    /// price.
    pub fn cost_micro_usd(&self, model: &str, u: &Usage) -> u64 {
        let Some(p) = self.prices.get(model) else { return 0 };
        let cached = u.cached_input.min(u.input);
        // Dollars per million tokens is micro-dollars per token.
        let micro = (u.input - cached) as f64 * p.input
            + cached as f64 * p.cached_input.unwrap_or(p.input)
            + u.output as f64 * p.output;
        micro.ceil().max(0.0) as u64
    }
}

/// A Prometheus label value: `\\`, `"` and line feeds escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct UrlParts {
    https: bool,
    loopback: bool,
}

fn url_parts(url: &str) -> Option<UrlParts> {
    let (https, rest) =
        if let Some(r) = url.strip_prefix("https://") { (true, r) } else { (false, url.strip_prefix("http://")?) };
    let authority = rest.split('/').next()?;
    if authority.is_empty() || authority.contains('@') || rest.contains(['?', '#']) {
        return None;
    }
    let host =
        if let Some(h) = authority.strip_prefix('[') { h.split(']').next()? } else { authority.split(':').next()? };
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    Some(UrlParts { https, loopback })
}

/// Spending per virtual key and route in the current period, in micro-dollars: checked before a
/// call, counted from its answer. What this node counted goes to the store with every usage flush
/// ([`Ai::sync`]), and every node's totals come back from it, so budgets hold across restarts and,
/// within a flush interval, across nodes. Bounded: at most [`SPEND_KEYS`] keys per shard; when
/// full, the keys of ended periods go, then new keys share one overflow count (limits stay in
/// force).
pub struct Spend {
    shards: Vec<Mutex<HashMap<SpendKey, Spent>>>,
}

type SpendKey = ([u8; PUBLIC_ID_LEN], u32);

#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    period_start: i64,
    /// Every node's total in the store when last read.
    stored: u64,
    /// Counted here and being written.
    in_flight: i64,
    /// Counted here since (set aside for calls in flight, refunds, costs).
    local: i64,
}

impl Spent {
    fn total(&self) -> u64 {
        let t = i128::from(self.stored) + i128::from(self.in_flight) + i128::from(self.local);
        u64::try_from(t.max(0)).unwrap_or(u64::MAX)
    }
}

const SPEND_SHARDS: usize = 16;
/// Keys per shard at most.
pub const SPEND_KEYS: usize = 65_536;
const OVERFLOW: [u8; PUBLIC_ID_LEN] = [0xff; PUBLIC_ID_LEN];

impl Default for Spend {
    fn default() -> Self {
        Self { shards: (0..SPEND_SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; PUBLIC_ID_LEN]> {
    let mut out = [0u8; PUBLIC_ID_LEN];
    if s.len() != 2 * PUBLIC_ID_LEN {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Spend {
    fn shard(&self, id: &[u8; PUBLIC_ID_LEN]) -> Option<&Mutex<HashMap<SpendKey, Spent>>> {
        let i = id.iter().fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(usize::from(*b))) % SPEND_SHARDS;
        self.shards.get(i)
    }

    /// Spent in the period that starts at `period_start`.
    pub fn spent(&self, id: &[u8; PUBLIC_ID_LEN], route: u32, period_start: i64) -> u64 {
        let Some(shard) = self.shard(id) else { return 0 };
        let map = shard.lock();
        let get = |k: &SpendKey| map.get(k).filter(|s| s.period_start == period_start).map_or(0, Spent::total);
        get(&(*id, route)).max(if map.contains_key(&(*id, route)) { 0 } else { get(&(OVERFLOW, route)) })
    }

    /// Takes `micro` back from what was spent in the period that starts at `period_start` (what
    /// was set aside for a call, once its cost is known).
    pub fn refund(&self, id: &[u8; PUBLIC_ID_LEN], route: u32, period_start: i64, micro: u64) {
        self.change(id, route, period_start, -i64::try_from(micro).unwrap_or(i64::MAX));
    }

    /// Adds `micro` to what was spent in the period that starts at `period_start`.
    pub fn add(&self, id: &[u8; PUBLIC_ID_LEN], route: u32, period_start: i64, micro: u64) {
        self.change(id, route, period_start, i64::try_from(micro).unwrap_or(i64::MAX));
    }

    fn change(&self, id: &[u8; PUBLIC_ID_LEN], route: u32, period_start: i64, micro: i64) {
        if micro == 0 {
            return;
        }
        let Some(shard) = self.shard(id) else { return };
        let mut map = shard.lock();
        let mut key = (*id, route);
        if !map.contains_key(&key) && map.len() >= SPEND_KEYS {
            map.retain(|_, s| s.period_start >= period_start || s.in_flight != 0 || s.local != 0);
            if map.len() >= SPEND_KEYS {
                key = (OVERFLOW, route);
            }
        }
        let s = map.entry(key).or_default();
        if s.period_start != period_start {
            // A new period: what this node still has to write of the old one is lost with it
            // only if the period is over, which is what makes it old.
            *s = Spent { period_start, ..Spent::default() };
        }
        s.local = s.local.saturating_add(micro);
    }

    /// What this node counted since the last write, to write now (moved to "in flight").
    pub fn take(&self) -> Vec<keygate_core::llm::Spending> {
        let mut out = Vec::new();
        for shard in &self.shards {
            for ((id, route), s) in shard.lock().iter_mut() {
                if s.local != 0 {
                    s.in_flight = s.in_flight.saturating_add(s.local);
                    out.push(keygate_core::llm::Spending {
                        key: hex(id),
                        route_key: i64::from(*route),
                        period_start: s.period_start,
                        micro_usd: s.local,
                    });
                    s.local = 0;
                }
            }
        }
        out
    }

    /// The store refused `taken`: it is counted as not written yet.
    pub fn restore(&self, taken: &[keygate_core::llm::Spending]) {
        for t in taken {
            let (Some(id), Ok(route)) = (unhex(&t.key), u32::try_from(t.route_key)) else { continue };
            let Some(shard) = self.shard(&id) else { continue };
            if let Some(s) = shard.lock().get_mut(&(id, route)).filter(|s| s.period_start == t.period_start) {
                s.in_flight = s.in_flight.saturating_sub(t.micro_usd);
                s.local = s.local.saturating_add(t.micro_usd);
            }
        }
    }

    /// After a write: every node's `totals` as the store has them now (which include what was in
    /// flight).
    pub fn apply(&self, totals: &[keygate_core::llm::Spending]) {
        let mut newest: HashMap<SpendKey, (i64, u64)> = HashMap::new();
        for t in totals {
            let (Some(id), Ok(route)) = (unhex(&t.key), u32::try_from(t.route_key)) else { continue };
            let total = u64::try_from(t.micro_usd.max(0)).unwrap_or(0);
            let e = newest.entry((id, route)).or_insert((t.period_start, total));
            if t.period_start > e.0 {
                *e = (t.period_start, total);
            }
        }
        for shard in &self.shards {
            for (key, s) in shard.lock().iter_mut() {
                s.stored = s.stored.saturating_add(u64::try_from(s.in_flight.max(0)).unwrap_or(0));
                s.in_flight = 0;
                if let Some((p, total)) = newest.remove(key) {
                    if p == s.period_start {
                        s.stored = total;
                    } else if p > s.period_start {
                        *s = Spent { period_start: p, stored: total, in_flight: 0, local: s.local.min(0) };
                    }
                }
            }
        }
        // Keys that only other nodes (or an earlier run) spent with.
        for ((id, route), (p, total)) in newest {
            let Some(shard) = self.shard(&id) else { continue };
            let mut map = shard.lock();
            if map.len() < SPEND_KEYS {
                map.insert((id, route), Spent { period_start: p, stored: total, in_flight: 0, local: 0 });
            }
        }
    }
}

/// LLM usage counted per route and deployment since the start, for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub fallbacks: u64,
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub micro_usd: u64,
}

/// A metric of the totals: its name, its help text, and the count it shows.
type Series = (&'static str, &'static str, fn(&Totals) -> u64);

/// The most (route, deployment) pairs counted for `/metrics`; later ones are counted under
/// `other`.
pub const MAX_TOTALS: usize = 4096;

fn new_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

thread_local! {
    /// The client of this thread. Each gateway worker runs its own single-threaded runtime, and
    /// a client's connections are driven by the runtime that opened them: one client per worker
    /// keeps a call and its connection on one thread (a client shared by the workers measured
    /// 55 µs of CPU a call and 2.6 ms added at p99, one per worker 43 µs and 1.1 ms:
    /// docs/benchmarks.md).
    static CLIENT: std::cell::OnceCell<Option<reqwest::Client>> = const { std::cell::OnceCell::new() };
}

/// This thread's client for the providers (`None` only if TLS cannot be set up, which
/// [`Ai::new`] has checked already).
pub(crate) fn client() -> Option<reqwest::Client> {
    CLIENT.with(|c| c.get_or_init(|| new_client().ok()).clone())
}

/// Everything the AI gateway keeps: its providers, the client that calls them, the limits'
/// state and what was used.
pub struct Ai {
    /// The config file's providers.
    file: HashMap<String, Arc<Provider>>,
    /// Every provider: the file's, then those made through the admin API (swapped whole when
    /// they change).
    providers: ArcSwap<HashMap<String, Arc<Provider>>>,
    /// LLM tokens per minute, per virtual key and route.
    pub tpm: Limiter,
    pub spend: Spend,
    totals: Mutex<HashMap<(Arc<str>, String), Totals>>,
    /// Usage not written to the store yet, per caller, route, deployment and hour.
    pending: Mutex<HashMap<UsageKey, keygate_core::llm::LlmUsage>>,
    /// Logged calls not written yet (routes with `log_prompts`), at most [`MAX_PENDING_LOGS`].
    logs: Mutex<Vec<keygate_core::llm::LlmLog>>,
    /// Logged calls dropped because the buffer was full (the store could not keep up).
    logs_dropped: std::sync::atomic::AtomicU64,
}

/// Logged calls held for the next write at most; more are dropped (and counted).
pub const MAX_PENDING_LOGS: usize = 10_000;

/// (workspace, caller, route, deployment, hour).
type UsageKey = (Arc<str>, Arc<str>, Arc<str>, String, i64);

/// Usage rows held for the next write at most; more are counted under the caller `other`.
pub const MAX_PENDING: usize = 100_000;

/// Who made an LLM call, as the usage in the store names it.
#[derive(Debug, Clone)]
pub struct CallerIds {
    pub workspace: Arc<str>,
    /// The token id (for a JWT: its subject token's, else `jwt:` and its subject).
    pub caller: Arc<str>,
    pub app: Arc<str>,
}

impl Ai {
    /// The AI gateway of `providers`, their keys read with `env`. Errors name the provider.
    pub fn new(providers: &[ProviderConfig], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut map = HashMap::new();
        for c in providers {
            let p = Provider::from_config(c, env, true)?;
            if map.insert(c.id.clone(), Arc::new(p)).is_some() {
                return Err(format!("provider {:?}: another provider has the same id", c.id));
            }
        }
        new_client().map_err(|e| format!("the providers' HTTP client: {e}"))?;
        Ok(Self {
            providers: ArcSwap::from_pointee(map.clone()),
            file: map,
            tpm: Limiter::default(),
            spend: Spend::default(),
            totals: Mutex::default(),
            pending: Mutex::default(),
            logs: Mutex::default(),
            logs_dropped: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Replaces the providers made through the admin API; one with the id of a file provider is
    /// left out (the file wins).
    pub fn set_stored(&self, stored: Vec<Provider>) {
        let mut all = self.file.clone();
        for p in stored {
            if self.file.contains_key(&*p.id) {
                tracing::error!(provider = %p.id, "a provider of the config file has the id of one made through the admin API; the file's serves");
                continue;
            }
            all.insert(p.id.to_string(), Arc::new(p));
        }
        self.providers.store(Arc::new(all));
    }

    /// Whether the config file defines provider `id`.
    pub fn is_file_provider(&self, id: &str) -> bool {
        self.file.contains_key(id)
    }

    /// Whether there is any provider at all.
    pub fn has_providers(&self) -> bool {
        !self.providers.load().is_empty()
    }

    /// Provider `id` as a route of workspace `ws` may call it: a file provider, or one of that
    /// workspace's.
    pub fn provider(&self, id: &str, ws: Option<&str>) -> Option<Arc<Provider>> {
        let p = self.providers.load().get(id).cloned()?;
        match &p.workspace {
            None => Some(p),
            Some(owner) if Some(&**owner) == ws => Some(p),
            Some(_) => None,
        }
    }

    /// Keeps a logged call for the next write (dropped, and counted, when the buffer is full).
    pub fn log(&self, entry: keygate_core::llm::LlmLog) {
        let mut logs = self.logs.lock();
        if logs.len() >= MAX_PENDING_LOGS {
            self.logs_dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        logs.push(entry);
    }

    /// Counts a call's usage for the store.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        who: &CallerIds,
        route: &Arc<str>,
        deployment: &str,
        now_ms: i64,
        u: &Usage,
        cost: u64,
        ok: bool,
        fallbacks: u64,
    ) {
        let hour = now_ms.div_euclid(3_600_000) * 3_600_000;
        let mut p = self.pending.lock();
        let mut key = (who.workspace.clone(), who.caller.clone(), route.clone(), deployment.to_owned(), hour);
        if !p.contains_key(&key) && p.len() >= MAX_PENDING {
            key.1 = Arc::from("other");
        }
        let row = p.entry(key).or_insert_with(|| {
            keygate_core::llm::LlmUsage::zero(
                keygate_core::ids::WorkspaceId::from_trusted(who.workspace.to_string()),
                &who.caller,
                &who.app,
                route,
                deployment,
                hour,
            )
        });
        row.requests += 1;
        row.fallbacks += fallbacks;
        row.errors += u64::from(!ok);
        row.input_tokens += u.input;
        row.output_tokens += u.output;
        row.cached_tokens += u.cached_input;
        row.micro_usd += cost;
    }

    /// The usage not written yet of `caller` (live reports).
    pub fn pending_usage(&self, caller: &str) -> Vec<keygate_core::llm::LlmUsage> {
        self.pending.lock().values().filter(|r| r.caller == caller).cloned().collect()
    }

    /// Writes the usage and spending counted since the last write, then reads every node's
    /// spending of this month back (the budgets' totals). What the store refuses is kept for
    /// the next try.
    pub async fn sync(&self, store: &dyn keygate_core::llm::LlmStore, now_ms: i64) {
        let usage: Vec<_> = std::mem::take(&mut *self.pending.lock()).into_values().collect();
        let spending = self.spend.take();
        let logs = std::mem::take(&mut *self.logs.lock());
        if !logs.is_empty()
            && let Err(e) = store.insert_llm_logs(&logs).await
        {
            tracing::warn!(error = %e, logs = logs.len(), "cannot write logged LLM calls; keeping them for the next try");
            let mut kept = self.logs.lock();
            let room = MAX_PENDING_LOGS.saturating_sub(kept.len());
            let lost = logs.len().saturating_sub(room);
            self.logs_dropped.fetch_add(lost as u64, std::sync::atomic::Ordering::Relaxed);
            kept.extend(logs.into_iter().take(room));
        }
        if usage.is_empty() && spending.is_empty() && !self.has_providers() {
            // No AI gateway in use: no store round trip.
            return;
        }
        if let Err(e) = store.record_llm(&usage, &spending).await {
            tracing::warn!(error = %e, rows = usage.len(), "cannot write LLM usage; keeping it for the next try");
            self.spend.restore(&spending);
            let mut p = self.pending.lock();
            for r in usage {
                let key = (
                    Arc::from(r.workspace_id.as_str()),
                    Arc::from(r.caller.as_str()),
                    Arc::from(r.route.as_str()),
                    r.deployment.clone(),
                    r.hour,
                );
                let room = p.len() < MAX_PENDING;
                match p.get_mut(&key) {
                    Some(e) => e.add(&r),
                    None if room => {
                        p.insert(key, r);
                    }
                    None => {}
                }
            }
            return;
        }
        let since = QuotaPeriod::Month.window(now_ms).0;
        match store.llm_spending_since(since).await {
            Ok(totals) => self.spend.apply(&totals),
            Err(e) => tracing::warn!(error = %e, "cannot read the LLM spending totals; budgets go on with this node's"),
        }
    }

    /// Adds to the totals of `route` and `deployment`.
    pub fn count(&self, route: &Arc<str>, deployment: &str, f: impl FnOnce(&mut Totals)) {
        let mut t = self.totals.lock();
        let key = (route.clone(), deployment.to_owned());
        if !t.contains_key(&key) && t.len() >= MAX_TOTALS {
            f(t.entry((route.clone(), "other".to_owned())).or_default());
            return;
        }
        f(t.entry(key).or_default());
    }

    /// The totals so far, by route and deployment.
    pub fn totals(&self) -> Vec<(Arc<str>, String, Totals)> {
        let mut v: Vec<_> = self.totals.lock().iter().map(|((r, d), t)| (r.clone(), d.clone(), *t)).collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    /// The totals in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let dropped = self.logs_dropped.load(std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "# HELP keygate_llm_logs_dropped_total Logged LLM calls dropped because the store could not keep up\n\
                 # TYPE keygate_llm_logs_dropped_total counter\nkeygate_llm_logs_dropped_total {dropped}"
            );
        }
        let totals = self.totals();
        if totals.is_empty() {
            return;
        }
        let series: [Series; 6] = [
            ("keygate_llm_requests_total", "Calls to LLM providers", |t| t.requests),
            ("keygate_llm_errors_total", "Calls to LLM providers that failed (after fallbacks)", |t| t.errors),
            ("keygate_llm_fallbacks_total", "Calls moved to the next deployment after a 429, 5xx or time-out", |t| {
                t.fallbacks
            }),
            ("keygate_llm_input_tokens_total", "LLM input tokens, cached ones included", |t| t.input),
            ("keygate_llm_output_tokens_total", "LLM output tokens", |t| t.output),
            ("keygate_llm_cost_microdollars_total", "What LLM calls cost by the price table, in micro-dollars", |t| {
                t.micro_usd
            }),
        ];
        for (name, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (route, deployment, t) in &totals {
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\",deployment=\"{}\"}} {}",
                    route,
                    escape_label(deployment),
                    get(t)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AiRouteConfig;

    fn route(ai: AiRouteConfig) -> RouteConfig {
        let mut c = RouteConfig::new("llm", "/llm", "http://unused");
        c.upstream = None;
        c.kind = RouteKind::Ai;
        c.ai = Some(ai);
        c
    }

    #[test]
    fn routes_name_their_models_and_limits() {
        let mut cfg = AiRouteConfig::default();
        cfg.models.insert("fast".into(), vec!["anthropic/claude-haiku".into(), "openai/gpt-4o-mini".into()]);
        cfg.tokens_per_minute = Some(1000);
        cfg.budget = Some(crate::config::AiBudget { usd: 2.5, period: QuotaPeriod::Month });
        let r = AiRoute::from_config(&route(cfg.clone())).unwrap().unwrap();
        assert_eq!(r.deployments("fast").unwrap().len(), 2);
        assert_eq!(r.deployments("openai/gpt-4o").unwrap()[0].model.as_ref(), "gpt-4o");
        assert_eq!(r.deployments("together/meta/llama").unwrap()[0].model.as_ref(), "meta/llama");
        assert!(r.deployments("gpt-4o").is_none(), "a bare name that is no alias names no provider");
        assert_eq!(r.deployments("fast").unwrap()[0].provider.as_ref(), "anthropic", "fallback: always the first");
        assert_eq!(r.deployments("fast").unwrap()[0].provider.as_ref(), "anthropic");
        let mut rr = cfg.clone();
        rr.balance = crate::config::AiBalance::RoundRobin;
        let r2 = AiRoute::from_config(&route(rr)).unwrap().unwrap();
        let firsts: Vec<String> = (0..4).map(|_| r2.deployments("fast").unwrap()[0].provider.to_string()).collect();
        assert_eq!(firsts, ["anthropic", "openai", "anthropic", "openai"], "round robin: each in turn first");
        assert_eq!(r2.deployments("fast").unwrap().len(), 2, "the others follow as fallbacks");
        assert_eq!(r.budget.unwrap().micro_usd, 2_500_000);
        assert_eq!(r.tokens_per_minute.unwrap().capacity(), 1000);

        cfg.aliases_only = true;
        let r = AiRoute::from_config(&route(cfg.clone())).unwrap().unwrap();
        assert!(r.deployments("openai/gpt-4o").is_none());

        let mut bad = cfg.clone();
        bad.models.insert("x".into(), vec!["no-slash".into()]);
        assert!(AiRoute::from_config(&route(bad)).unwrap_err().contains("provider/model"));
        let mut bad = cfg.clone();
        bad.budget = Some(crate::config::AiBudget { usd: f64::NAN, period: QuotaPeriod::Day });
        assert!(AiRoute::from_config(&route(bad)).is_err());
        let mut bad = cfg;
        bad.tokens_per_minute = Some(0);
        assert!(AiRoute::from_config(&route(bad)).is_err());
        let mut http = RouteConfig::new("r", "/r", "http://127.0.0.1:1");
        http.ai = Some(AiRouteConfig::default());
        assert!(AiRoute::from_config(&http).is_err());
    }

    #[test]
    fn model_scopes_are_valid_scopes() {
        assert_eq!(model_scope("gpt-4o").as_str(), "llm:gpt-4o");
        assert_eq!(model_scope("openai/GPT-4o").as_str(), "llm:openai.gpt-4o");
        assert_eq!(model_scope("").as_str(), "llm:.");
        assert_eq!(model_scope(&"x".repeat(300)).as_str().len(), 4 + 64);
        let all = keygate_core::scope::Scope::parse("llm:*").unwrap();
        assert!(all.covers(&model_scope("anthropic/claude-3-5-haiku-20241022")));
    }

    #[test]
    fn providers_keep_their_keys_and_prices() {
        let mut c = ProviderConfig {
            id: "openai".into(),
            kind: ProviderKind::Openai,
            base_url: "https://api.openai.com/v1/".into(),
            api_key_env: Some("OPENAI_KEY".into()),
            api_key_file: None,
            api_version: None,
            prices: BTreeMap::new(),
        };
        c.prices.insert("gpt-4o-mini".into(), ModelPrice { input: 0.15, output: 0.6, cached_input: Some(0.075) });
        let env = |v: &str| (v == "OPENAI_KEY").then(|| "sk-test".to_owned());
        let p = Provider::from_config(&c, &env, true).unwrap();
        assert_eq!(p.base_url, "https://api.openai.com/v1");
        assert_eq!(format!("{:?}", p.key), "Some(ProviderKey(…))");
        // 1,000 input (400 cached) and 500 output tokens: 600 × 0.15 + 400 × 0.075 + 500 × 0.6.
        let u = Usage { input: 1000, output: 500, cached_input: 400 };
        assert_eq!(p.cost_micro_usd("gpt-4o-mini", &u), 420);
        assert_eq!(p.cost_micro_usd("unpriced", &u), 0);

        let missing = |_: &str| None;
        assert!(Provider::from_config(&c, &missing, true).unwrap_err().contains("OPENAI_KEY"));
        c.base_url = "http://api.example.com/v1".into();
        assert!(Provider::from_config(&c, &env, true).unwrap_err().contains("loopback"));
        c.base_url = "http://127.0.0.1:8000/v1".into();
        assert!(Provider::from_config(&c, &env, true).is_ok());
        c.kind = ProviderKind::Azure;
        assert!(Provider::from_config(&c, &env, true).unwrap_err().contains("api_version"));
    }

    #[test]
    fn spending_is_counted_per_period_and_bounded() {
        let s = Spend::default();
        let id = [1u8; PUBLIC_ID_LEN];
        s.add(&id, 7, 1000, 50);
        s.add(&id, 7, 1000, 25);
        assert_eq!(s.spent(&id, 7, 1000), 75);
        assert_eq!(s.spent(&id, 8, 1000), 0);
        // A new period starts from nothing.
        assert_eq!(s.spent(&id, 7, 2000), 0);
        s.add(&id, 7, 2000, 5);
        assert_eq!(s.spent(&id, 7, 2000), 5);
        s.refund(&id, 7, 2000, 3);
        assert_eq!(s.spent(&id, 7, 2000), 2);
    }

    /// Two nodes and a store (a map of totals): each writes what it counted, then reads
    /// everyone's totals back.
    #[test]
    fn spending_is_shared_through_the_store() {
        use keygate_core::llm::Spending;
        let mut store: HashMap<(String, i64, i64), i64> = HashMap::new();
        let mut write = |taken: &[Spending]| -> Vec<Spending> {
            for t in taken {
                *store.entry((t.key.clone(), t.route_key, t.period_start)).or_default() += t.micro_usd;
            }
            store
                .iter()
                .map(|((k, r, p), m)| Spending { key: k.clone(), route_key: *r, period_start: *p, micro_usd: *m })
                .collect()
        };
        let (a, b) = (Spend::default(), Spend::default());
        let id = [9u8; PUBLIC_ID_LEN];
        a.add(&id, 1, 100, 70);
        b.add(&id, 1, 100, 20);
        let taken = a.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(a.spent(&id, 1, 100), 70, "what is in flight still counts");
        a.add(&id, 1, 100, 5);
        let totals = write(&taken);
        a.apply(&totals);
        assert_eq!(a.spent(&id, 1, 100), 75);
        let totals = write(&b.take());
        b.apply(&totals);
        assert_eq!(b.spent(&id, 1, 100), 90, "node b sees a's 70");
        let totals = write(&a.take());
        a.apply(&totals);
        assert_eq!(a.spent(&id, 1, 100), 95);
        // A write the store refused is counted as not written, and written next time.
        let c = Spend::default();
        c.add(&id, 2, 100, 10);
        let taken = c.take();
        c.restore(&taken);
        assert!(!c.take().is_empty());
        // A node that never saw a key learns it from the totals.
        let fresh = Spend::default();
        fresh.apply(&write(&[]));
        assert_eq!(fresh.spent(&id, 1, 100), 95);
        assert_eq!(unhex(&hex(&id)), Some(id));
        assert_eq!(unhex("zz"), None);
    }
}
