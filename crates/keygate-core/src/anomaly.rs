//! Anomaly detection on token usage (issue 15): per-token baselines and the detectors that compare
//! what a token does now with what it did before.
//!
//! The gateway counts, per token and per short window (a second), what it saw: requests, refusals
//! of a known token (scope, address, stopped or rotated-away secret), server errors, the source
//! networks (/24 for IPv4, /48 for IPv6), the route-and-method pairs and the user agents
//! ([`Activity`]). The detector folds each window into the token's [`Baseline`] and reports
//! [`Finding`]s:
//!
//! | kind             | fires when                                                         | severity |
//! |------------------|--------------------------------------------------------------------|----------|
//! | `rate_spike`     | the rate over the last 10 s (or this minute's count) is `spike_factor` × the baseline of this hour of the day, and at least `spike_min_per_minute` | medium; high at 4 × the factor or with a network first seen in the last 10 minutes |
//! | `new_network`    | an established token is used from a network it never used           | low      |
//! | `many_networks`  | `many_networks` distinct networks (and 3 × the usual) within 10 minutes | high     |
//! | `new_route`      | an established token calls a route or method it never called        | low      |
//! | `refusal_burst`  | `refusal_burst` refusals of the token within a minute, the majority of its requests | medium |
//! | `dormant_use`    | the first use after `dormant_days` without any                       | medium   |
//! | `old_secret`     | a secret replaced by a rotation is presented after its grace period   | high     |
//!
//! A token is *established* once it was active in `warmup_minutes` distinct minutes over at
//! least an hour: the first uses of a new token define its baseline instead of raising alerts.
//! Whether a network, route or user agent is new is decided by the store (a first sighting is
//! recorded once across nodes) and passed in as [`NewSightings`]. Everything here is a pure
//! function of its inputs and the times they carry, so it is tested with a manual clock.

/// Sets of values seen (networks, routes, agents), hashed with foldhash (seeded per process).
pub type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::{AlertId, AppId, TokenId, WorkspaceId};
use crate::model::{NewAuditEvent, Page, PageRequest};

/// How alarming an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub const ALL: [Self; 3] = [Self::Low, Self::Medium, Self::High];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a detector found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    RateSpike,
    NewNetwork,
    ManyNetworks,
    NewRoute,
    RefusalBurst,
    DormantUse,
    OldSecret,
}

impl AlertKind {
    pub const ALL: [Self; 7] = [
        Self::RateSpike,
        Self::NewNetwork,
        Self::ManyNetworks,
        Self::NewRoute,
        Self::RefusalBurst,
        Self::DormantUse,
        Self::OldSecret,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateSpike => "rate_spike",
            Self::NewNetwork => "new_network",
            Self::ManyNetworks => "many_networks",
            Self::NewRoute => "new_route",
            Self::RefusalBurst => "refusal_burst",
            Self::DormantUse => "dormant_use",
            Self::OldSecret => "old_secret",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
    /// A sentence for people: what the kind means.
    pub fn describe(self) -> &'static str {
        match self {
            Self::RateSpike => "request rate far above the token's usual rate for this hour",
            Self::NewNetwork => "first use from a network the token never used",
            Self::ManyNetworks => "used from many networks at once (a shared or stolen token)",
            Self::NewRoute => "first call of a route or method the token never called",
            Self::RefusalBurst => "a burst of refused requests (scope, address, stopped token)",
            Self::DormantUse => "used again after a long dormancy",
            Self::OldSecret => "a secret replaced by a rotation was presented after its grace period",
        }
    }
}

/// Where an alert stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertStatus {
    pub const ALL: [Self; 3] = [Self::Open, Self::Acknowledged, Self::Resolved];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Acknowledged => "acknowledged",
            Self::Resolved => "resolved",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// The detectors' thresholds (`[anomaly] sensitivity`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensitivity {
    /// A rate this many times the baseline is a spike.
    pub spike_factor: f64,
    /// ... and only from this many requests a minute (a token at 2 a minute going to 20 is not).
    pub spike_min_per_minute: f64,
    /// Distinct networks within 10 minutes that make `many_networks`.
    pub many_networks: usize,
    /// Refusals within a minute that make `refusal_burst`.
    pub refusal_burst: u64,
    /// Days without use after which a use is `dormant_use`.
    pub dormant_days: u32,
    /// Distinct active minutes (over at least an hour) before a token is established.
    pub warmup_minutes: u32,
}

impl Sensitivity {
    pub const NAMES: [&'static str; 3] = ["low", "normal", "high"];

    /// `low` (fewer alerts), `normal` (the default) or `high` (more).
    pub fn preset(name: &str) -> Option<Self> {
        let normal = Self {
            spike_factor: 5.0,
            spike_min_per_minute: 60.0,
            many_networks: 8,
            refusal_burst: 20,
            dormant_days: 30,
            warmup_minutes: 30,
        };
        match name {
            "normal" => Some(normal),
            "low" => Some(Self {
                spike_factor: 10.0,
                spike_min_per_minute: 120.0,
                many_networks: 16,
                refusal_burst: 50,
                dormant_days: 90,
                warmup_minutes: 60,
            }),
            "high" => Some(Self {
                spike_factor: 3.0,
                spike_min_per_minute: 30.0,
                many_networks: 5,
                refusal_burst: 10,
                dormant_days: 14,
                warmup_minutes: 15,
            }),
            _ => None,
        }
    }
}

impl Default for Sensitivity {
    fn default() -> Self {
        Self::preset("normal").unwrap_or(Self {
            spike_factor: 5.0,
            spike_min_per_minute: 60.0,
            many_networks: 8,
            refusal_burst: 20,
            dormant_days: 30,
            warmup_minutes: 30,
        })
    }
}

/// The network an address belongs to, as baselines keep it: the /24 of an IPv4 address, the
/// /48 of an IPv6 one (`203.0.113.0/24`, `2001:db8:1::/48`).
pub fn network_of(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
            format!("{net}/48")
        }
    }
}

/// What baselines and alerts are about: an API key, or an OAuth client whose JWT access tokens
/// the gateway saw (a JWT lives minutes; the client that obtains them is the credential that can
/// leak). A JWT exchanged from an API key counts as that key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Watched {
    Token(TokenId),
    Client(String),
}

impl Default for Watched {
    fn default() -> Self {
        Self::Token(TokenId::from_trusted(String::new()))
    }
}

impl Watched {
    /// The id: `tok_…` or the client's id.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Token(t) => t.as_str(),
            Self::Client(c) => c,
        }
    }

    /// `token` or `client`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::Client(_) => "client",
        }
    }

    /// Read back from a store's column, which holds [`Self::as_str`]: a token's id begins
    /// `tok_`, which a client's (`{prefix}c_…`) never does.
    pub fn from_stored(id: String) -> Self {
        if id.starts_with("tok_") { Self::Token(TokenId::from_trusted(id)) } else { Self::Client(id) }
    }

    pub fn token(&self) -> Option<&TokenId> {
        match self {
            Self::Token(t) => Some(t),
            Self::Client(_) => None,
        }
    }

    pub fn client(&self) -> Option<&str> {
        match self {
            Self::Token(_) => None,
            Self::Client(c) => Some(c),
        }
    }
}

/// As its id ([`Watched::as_str`]), read back with [`Watched::from_stored`].
impl Serialize for Watched {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Watched {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(Self::from_stored)
    }
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the gateway saw of one token (or OAuth client, [`Watched`]) in one window. Serialized
/// when a node ships it to the node that runs the detectors ([`AlertStore::ship_activity`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub subject: Watched,
    pub workspace_id: WorkspaceId,
    pub app_id: AppId,
    /// The window, in milliseconds since the epoch.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Requests made with the token (refused ones included).
    pub requests: u64,
    /// Refused for the token's scope or address, or because it is suspended or expired.
    pub refused: u64,
    /// Answered 5xx.
    pub errors: u64,
    /// Presentations of the token's secret after a rotation replaced it and its grace ended.
    pub old_secret: u64,
    /// Networks (see [`network_of`]) and their requests.
    pub networks: Vec<(String, u64)>,
    /// `METHOD route` and their requests.
    pub routes: Vec<(String, u64)>,
    /// User agents (cut to 80 printable characters) and their requests.
    pub agents: Vec<(String, u64)>,
}

impl Activity {
    /// Adds `other` (the same token, another node or window) into this one.
    pub fn merge(&mut self, other: Activity) {
        self.from_ms = self.from_ms.min(other.from_ms);
        self.to_ms = self.to_ms.max(other.to_ms);
        self.requests += other.requests;
        self.refused += other.refused;
        self.errors += other.errors;
        self.old_secret += other.old_secret;
        for (list, more) in
            [(&mut self.networks, other.networks), (&mut self.routes, other.routes), (&mut self.agents, other.agents)]
        {
            for (k, n) in more {
                match list.iter_mut().find(|(x, _)| *x == k) {
                    Some((_, m)) => *m += n,
                    None => list.push((k, n)),
                }
            }
        }
    }
}

/// The values of an activity that the store recorded as first seen for the token just now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewSightings {
    pub networks: Vec<String>,
    pub routes: Vec<String>,
    pub agents: Vec<String>,
}

/// Kinds of sightings, as the store names them.
pub const SIGHTING_KINDS: [&str; 3] = ["network", "route", "agent"];

/// Sightings kept per token and kind at most; past it nothing more is recorded as new (and no
/// `new_*` alert raised), while `many_networks` still counts.
pub const MAX_SIGHTINGS: usize = 64;

/// The window over which a short-term rate is measured, and `many_networks` counted.
const RATE_WINDOW_MS: i64 = 10_000;
const NETWORK_WINDOW_MS: i64 = 600_000;
/// Weight of a new minute in the moving averages (about the last 20 active minutes of an hour).
const ALPHA: f64 = 0.05;
/// Samples of an hour of the day before its own average is trusted over the overall one.
const HOUR_SAMPLES: u32 = 20;

/// A token's usage as the detectors remember it (kept in the store as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// First and last use seen, in milliseconds.
    pub first_ms: i64,
    pub last_ms: i64,
    /// Minutes in which the token was used.
    pub active_minutes: u32,
    /// Moving average of requests per active minute, per hour of the day (UTC), and overall.
    pub hourly: Vec<f64>,
    pub hourly_n: Vec<u32>,
    pub overall: f64,
    /// Moving average of the distinct networks seen per 10 minutes.
    pub usual_networks: f64,
    /// The minute being counted (minutes since the epoch) and its requests and refusals so far.
    pub minute: i64,
    pub minute_requests: u64,
    pub minute_refused: u64,
    /// The short window being counted.
    pub window_from_ms: i64,
    pub window_requests: u64,
    /// Networks seen in the last 10 minutes, with when each was last seen and whether it was new.
    pub recent_networks: Vec<RecentNetwork>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecentNetwork {
    pub network: String,
    pub last_ms: i64,
    /// When it was first seen by this token, if within the last 10 minutes.
    #[serde(default)]
    pub new_at_ms: Option<i64>,
}

/// One thing a detector found in an activity.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: AlertKind,
    pub severity: Severity,
    /// What makes two findings of a kind the same alert (a network, a route; empty for the rest).
    pub key: String,
    pub summary: String,
    pub evidence: serde_json::Value,
}

impl Baseline {
    /// Whether the first uses of the token are behind it.
    pub fn established(&self, s: &Sensitivity, now_ms: i64) -> bool {
        self.active_minutes >= s.warmup_minutes && now_ms.saturating_sub(self.first_ms) >= 3_600_000
    }

    /// The usual requests per minute at the hour of `at_ms`.
    pub fn expected_per_minute(&self, at_ms: i64) -> f64 {
        let h = hour_of(at_ms);
        match (self.hourly.get(h), self.hourly_n.get(h)) {
            (Some(rate), Some(n)) if *n >= HOUR_SAMPLES => rate.max(self.overall * 0.5),
            _ => self.overall,
        }
    }

    /// Folds the finished minute into the averages.
    fn close_minute(&mut self) {
        if self.minute_requests == 0 {
            return;
        }
        if self.hourly.len() != 24 || self.hourly_n.len() != 24 {
            self.hourly = vec![0.0; 24];
            self.hourly_n = vec![0; 24];
        }
        let n = self.minute_requests as f64;
        let h = hour_of(self.minute * 60_000);
        let first = self.active_minutes == 0;
        self.active_minutes = self.active_minutes.saturating_add(1);
        self.overall = if first { n } else { self.overall + ALPHA * (n - self.overall) };
        if let (Some(rate), Some(count)) = (self.hourly.get_mut(h), self.hourly_n.get_mut(h)) {
            *rate = if *count == 0 { n } else { *rate + ALPHA * (n - *rate) };
            *count = count.saturating_add(1);
        }
    }

    /// Folds one window of activity into the baseline and returns what it found.
    pub fn observe(&mut self, a: &Activity, new: &NewSightings, s: &Sensitivity) -> Vec<Finding> {
        let now = a.to_ms;
        let mut found = Vec::new();
        if a.requests == 0 && a.old_secret == 0 {
            return found;
        }
        // Judged against the baseline before this window.
        let established = self.established(s, a.from_ms);
        if self.last_ms > 0 && a.requests > 0 {
            let idle_ms = a.from_ms.saturating_sub(self.last_ms);
            if idle_ms >= i64::from(s.dormant_days) * 86_400_000 {
                found.push(Finding {
                    kind: AlertKind::DormantUse,
                    severity: Severity::Medium,
                    key: String::new(),
                    summary: format!("used again after {} days without any use", idle_ms / 86_400_000),
                    evidence: json!({
                        "last_used_at_ms": self.last_ms,
                        "idle_days": idle_ms / 86_400_000,
                        "dormant_days": s.dormant_days,
                        "networks": a.networks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                    }),
                });
            }
        }
        if a.old_secret > 0 {
            found.push(Finding {
                kind: AlertKind::OldSecret,
                severity: Severity::High,
                key: String::new(),
                summary: format!(
                    "the secret this token had before its rotation was presented {} time(s) after its grace period",
                    a.old_secret
                ),
                evidence: json!({
                    "presented": a.old_secret,
                    "networks": a.networks,
                    "user_agents": a.agents.iter().map(|(u, _)| u).collect::<Vec<_>>(),
                }),
            });
        }
        if a.requests == 0 {
            return found;
        }
        if self.first_ms == 0 {
            self.first_ms = a.from_ms;
        }
        self.last_ms = self.last_ms.max(now);

        // Networks of the last 10 minutes.
        self.recent_networks.retain(|r| now - r.last_ms < NETWORK_WINDOW_MS);
        for r in &mut self.recent_networks {
            if r.new_at_ms.is_some_and(|t| now - t >= NETWORK_WINDOW_MS) {
                r.new_at_ms = None;
            }
        }
        for (net, _) in &a.networks {
            let is_new = new.networks.contains(net);
            let room = self.recent_networks.len() < 4 * MAX_SIGHTINGS;
            match self.recent_networks.iter_mut().find(|r| &r.network == net) {
                Some(r) => {
                    r.last_ms = now;
                    if is_new && established {
                        r.new_at_ms = Some(now);
                    }
                }
                None if room => self.recent_networks.push(RecentNetwork {
                    network: net.clone(),
                    last_ms: now,
                    new_at_ms: (is_new && established).then_some(now),
                }),
                None => {}
            }
        }
        let distinct = self.recent_networks.len();
        let fresh: Vec<String> =
            self.recent_networks.iter().filter(|r| r.new_at_ms.is_some()).map(|r| r.network.clone()).collect();

        // The rate: this minute's count, and the last 10 seconds'.
        let minute = now.div_euclid(60_000);
        if minute != self.minute {
            self.close_minute();
            self.minute = minute;
            self.minute_requests = 0;
            self.minute_refused = 0;
        }
        self.minute_requests += a.requests;
        self.minute_refused += a.refused;
        if self.window_from_ms == 0 || now - self.window_from_ms > 2 * RATE_WINDOW_MS {
            self.window_from_ms = a.from_ms;
            self.window_requests = 0;
        }
        self.window_requests += a.requests;
        let window_ms = now - self.window_from_ms;
        let mut rate = self.minute_requests as f64;
        if window_ms >= RATE_WINDOW_MS {
            rate = rate.max(self.window_requests as f64 * 60_000.0 / window_ms as f64);
            self.window_from_ms = now;
            self.window_requests = 0;
        }
        if established {
            let expected = self.expected_per_minute(now).max(1.0);
            let threshold = (s.spike_factor * expected).max(s.spike_min_per_minute);
            if rate >= threshold {
                let ratio = rate / expected;
                let severity =
                    if ratio >= 4.0 * s.spike_factor || !fresh.is_empty() { Severity::High } else { Severity::Medium };
                let from_new = if fresh.is_empty() {
                    String::new()
                } else {
                    format!(", from a network first seen minutes ago ({})", fresh.join(", "))
                };
                found.push(Finding {
                    kind: AlertKind::RateSpike,
                    severity,
                    key: String::new(),
                    summary: format!(
                        "{rate:.0} requests a minute, {ratio:.1} times the usual {expected:.1} for this hour{from_new}"
                    ),
                    evidence: json!({
                        "rate_per_minute": rate.round(),
                        "usual_per_minute": (expected * 10.0).round() / 10.0,
                        "times_usual": (ratio * 10.0).round() / 10.0,
                        "spike_factor": s.spike_factor,
                        "hour_utc": hour_of(now),
                        "new_networks": fresh,
                        "networks": a.networks,
                    }),
                });
            }
        }

        if established {
            for net in &new.networks {
                found.push(Finding {
                    kind: AlertKind::NewNetwork,
                    severity: Severity::Low,
                    key: net.clone(),
                    summary: format!("first use from the network {net}"),
                    evidence: json!({
                        "network": net,
                        "requests": a.networks.iter().find(|(n, _)| n == net).map_or(0, |(_, c)| *c),
                        "new_user_agents": new.agents,
                    }),
                });
            }
            for route in &new.routes {
                found.push(Finding {
                    kind: AlertKind::NewRoute,
                    severity: Severity::Low,
                    key: route.clone(),
                    summary: format!("first call of {route}"),
                    evidence: json!({
                        "route": route,
                        "requests": a.routes.iter().find(|(r, _)| r == route).map_or(0, |(_, c)| *c),
                    }),
                });
            }
            let threshold = s.many_networks.max((3.0 * self.usual_networks).ceil() as usize);
            if distinct >= threshold {
                found.push(Finding {
                    kind: AlertKind::ManyNetworks,
                    severity: Severity::High,
                    key: String::new(),
                    summary: format!(
                        "used from {distinct} networks within 10 minutes (usually {:.1})",
                        self.usual_networks
                    ),
                    evidence: json!({
                        "networks": self.recent_networks.iter().map(|r| &r.network).collect::<Vec<_>>(),
                        "usual": (self.usual_networks * 10.0).round() / 10.0,
                        "threshold": threshold,
                    }),
                });
            }
        }
        // The usual number of networks, learnt after the check (a burst does not raise its own bar
        // before it is judged).
        self.usual_networks += ALPHA * (distinct as f64 - self.usual_networks);

        if self.minute_refused >= s.refusal_burst && self.minute_refused * 2 > self.minute_requests {
            found.push(Finding {
                kind: AlertKind::RefusalBurst,
                severity: Severity::Medium,
                key: String::new(),
                summary: format!(
                    "{} of {} requests refused within a minute",
                    self.minute_refused, self.minute_requests
                ),
                evidence: json!({
                    "refused": self.minute_refused,
                    "requests": self.minute_requests,
                    "errors": a.errors,
                    "networks": a.networks,
                }),
            });
        }
        found
    }
}

fn hour_of(ms: i64) -> usize {
    usize::try_from(ms.div_euclid(3_600_000).rem_euclid(24)).unwrap_or(0)
}

/// The values of `a` not in `known` (the token's sightings this node knows), per kind, capped so
/// that a token never has more than [`MAX_SIGHTINGS`] of a kind.
pub fn unknown_values(a: &Activity, known: &KnownValues) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (kind, list, set) in [
        ("network", &a.networks, &known.networks),
        ("route", &a.routes, &known.routes),
        ("agent", &a.agents, &known.agents),
    ] {
        let room = MAX_SIGHTINGS.saturating_sub(set.len());
        out.extend(list.iter().filter(|(v, _)| !set.contains(v)).take(room).map(|(v, _)| (kind, v.clone())));
    }
    out
}

/// The sightings of a token a node knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownValues {
    pub networks: HashSet<String>,
    pub routes: HashSet<String>,
    pub agents: HashSet<String>,
}

impl KnownValues {
    pub fn insert(&mut self, kind: &str, value: String) {
        match kind {
            "network" => self.networks.insert(value),
            "route" => self.routes.insert(value),
            _ => self.agents.insert(value),
        };
    }
}

/// A user agent as baselines keep it: printable ASCII, at most 80 characters.
pub fn agent_label(ua: &[u8]) -> String {
    let s: String = ua.iter().take(80).map(|b| if (0x20..0x7f).contains(b) { char::from(*b) } else { '?' }).collect();
    if s.is_empty() { "-".to_owned() } else { s }
}

/// An alert as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub id: AlertId,
    pub workspace_id: WorkspaceId,
    /// The API key or OAuth client the alert is about.
    pub subject: Watched,
    pub app_id: AppId,
    pub kind: AlertKind,
    pub severity: Severity,
    pub status: AlertStatus,
    /// What makes repeats the same alert (a network, a route; empty for the rest).
    pub key: String,
    pub summary: String,
    pub evidence: serde_json::Value,
    pub created_at: Timestamp,
    pub last_seen_at: Timestamp,
    /// Times it was found while not resolved.
    pub occurrences: u64,
    /// What the workspace's policy did (`suspended`), if anything.
    pub action: Option<String>,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<Timestamp>,
    pub resolved_by: Option<String>,
    pub resolved_at: Option<Timestamp>,
}

impl Alert {
    /// A new alert of `finding` on `subject`, open, seen once at `now`.
    pub fn open(id: AlertId, subject: (&WorkspaceId, &Watched, &AppId), finding: Finding, now: Timestamp) -> Self {
        Self {
            id,
            workspace_id: subject.0.clone(),
            subject: subject.1.clone(),
            app_id: subject.2.clone(),
            kind: finding.kind,
            severity: finding.severity,
            status: AlertStatus::Open,
            key: finding.key,
            summary: finding.summary,
            evidence: finding.evidence,
            created_at: now,
            last_seen_at: now,
            occurrences: 1,
            action: None,
            acknowledged_by: None,
            acknowledged_at: None,
            resolved_by: None,
            resolved_at: None,
        }
    }
}

/// Which alerts a list shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertFilter {
    pub status: Option<AlertStatus>,
    pub severity: Option<Severity>,
    /// Only this token's or client's.
    pub subject: Option<Watched>,
}

/// What [`AlertStore::raise_alert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Raised {
    /// A new alert (its `anomaly.detected` event written with it).
    New(Alert),
    /// A repeat of an alert not resolved yet: its occurrences and last sighting updated.
    Repeat(Alert),
}

/// Baselines, sightings and alerts.
#[async_trait::async_trait]
pub trait AlertStore: Send + Sync {
    /// The token's (or client's) baseline, if any, and its sightings.
    async fn load_baseline(&self, subject: &Watched) -> Result<(Option<Baseline>, KnownValues)>;
    /// Writes baselines (token or client, workspace, baseline) at `now`.
    async fn save_baselines(&self, rows: &[(Watched, WorkspaceId, Baseline)], now: Timestamp) -> Result<()>;
    /// Records first sightings; returns those that were new (not recorded before, by any node).
    async fn record_sightings(
        &self,
        subject: &Watched,
        values: &[(&'static str, String)],
        now: Timestamp,
    ) -> Result<Vec<(&'static str, String)>>;
    /// Opens an alert with its audit event (`anomaly.detected`), or counts a repeat of the
    /// token's unresolved alert of the same kind and key.
    async fn raise_alert(&self, alert: &Alert, audit: &NewAuditEvent) -> Result<Raised>;
    /// Records what the policy did with an alert's token.
    async fn set_alert_action(&self, id: &AlertId, action: &str) -> Result<()>;
    async fn alert(&self, ws: &WorkspaceId, id: &AlertId) -> Result<Option<Alert>>;
    /// A page of the workspace's alerts, newest first.
    async fn list_alerts(&self, ws: &WorkspaceId, filter: &AlertFilter, page: &PageRequest) -> Result<Page<Alert>>;
    /// Moves an alert to `status` (acknowledged or resolved) by `by`, with its audit event;
    /// `false` if there is none.
    async fn set_alert_status(
        &self,
        ws: &WorkspaceId,
        id: &AlertId,
        status: AlertStatus,
        by: &str,
        now: Timestamp,
        audit: &NewAuditEvent,
    ) -> Result<bool>;
    /// Alerts by severity and status, across workspaces (for `/metrics`).
    async fn alert_counts(&self) -> Result<Vec<(Severity, AlertStatus, u64)>>;
    /// Takes or renews the detector lease for `node` until `until` (the detectors run on one
    /// node at a time, over every node's activity): true if `node` holds it now, because it held
    /// it or the last holder's ran out before `now`.
    async fn claim_detector(&self, node: &str, now: Timestamp, until: Timestamp) -> Result<bool>;
    /// Lets go of the lease if `node` holds it (at shutdown: another node takes over at once).
    async fn release_detector(&self, node: &str) -> Result<()>;
    /// Ships what `node`'s gateway counted in one turn to the lease holder.
    async fn ship_activity(&self, node: &str, activities: &[Activity], now: Timestamp) -> Result<()>;
    /// Takes (and deletes) what nodes shipped, oldest first, at most `limit` turns' worth; drops
    /// what was shipped before `stale_before` (a window no detector took in time) and returns
    /// how many turns were dropped so.
    async fn take_activity(&self, limit: u32, stale_before: Timestamp) -> Result<(Vec<Activity>, u64)>;
    /// Deletes the baselines and sightings of tokens that can no longer be used (revoked,
    /// deleted, or expired before `expired_before`) and of OAuth clients deleted, and the alerts
    /// resolved before
    /// `resolved_before`; returns how many of each.
    async fn purge_anomaly_state(&self, expired_before: Timestamp, resolved_before: Timestamp) -> Result<Purged>;
}

/// What [`AlertStore::purge_anomaly_state`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub baselines: u64,
    pub sightings: u64,
    pub alerts: u64,
}

#[cfg(test)]
#[path = "anomaly_tests.rs"]
mod tests;
