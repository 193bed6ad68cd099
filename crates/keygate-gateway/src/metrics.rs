//! Gateway metrics in the Prometheus text format: requests by route and status class, latency
//! histograms by route, refusals by reason, limiter decisions, upstream errors. No per-token
//! labels (their number is unbounded). Counters are relaxed atomics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use keygate_core::model::LATENCY_BUCKETS_MS;

/// Refusal reasons counted by `keygate_gateway_refusals_total`.
pub const REASONS: [&str; 14] = [
    "missing_token",
    "malformed_token",
    "unknown_token",
    "token_suspended",
    "token_expired",
    "ip_not_allowed",
    "insufficient_scope",
    "rate_limited",
    "quota_exceeded",
    "token_in_query",
    "bad_request",
    "route_not_found",
    "body_too_large",
    "cors_origin_not_allowed",
];

#[derive(Default)]
struct RouteMetrics {
    status: [AtomicU64; 5],
    latency: [AtomicU64; 10],
    latency_sum_us: AtomicU64,
    upstream_errors: AtomicU64,
    upstream_timeouts: AtomicU64,
}

/// All counters of one route table's lifetime (replaced with the table on reload).
pub struct Metrics {
    routes: Vec<(String, RouteMetrics)>,
    refusals: [AtomicU64; REASONS.len()],
    limiter_allowed: AtomicU64,
    limiter_refused: AtomicU64,
    unrouted: AtomicU64,
}

impl Metrics {
    pub fn new(route_ids: impl IntoIterator<Item = String>) -> Self {
        Self {
            routes: route_ids.into_iter().map(|id| (id, RouteMetrics::default())).collect(),
            refusals: Default::default(),
            limiter_allowed: AtomicU64::new(0),
            limiter_refused: AtomicU64::new(0),
            unrouted: AtomicU64::new(0),
        }
    }

    pub fn request(&self, route: Option<usize>, status: u16, latency_us: u64) {
        let Some((_, r)) = route.and_then(|i| self.routes.get(i)) else {
            self.unrouted.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(c) = r.status.get(usize::from((status / 100).clamp(1, 5) - 1)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let ms = latency_us / 1000;
        let b = LATENCY_BUCKETS_MS.iter().position(|b| ms < *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        if let Some(c) = r.latency.get(b) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        r.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
    }

    pub fn refusal(&self, reason: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason)
            && let Some(c) = self.refusals.get(i)
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn limiter(&self, allowed: bool) {
        let c = if allowed { &self.limiter_allowed } else { &self.limiter_refused };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_error(&self, route: usize, timeout: bool) {
        if let Some((_, r)) = self.routes.get(route) {
            let c = if timeout { &r.upstream_timeouts } else { &r.upstream_errors };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Renders every metric; `extra` adds gauges owned elsewhere (index size, feed lag).
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP keygate_gateway_requests_total Requests answered, by route and status class.");
        let _ = writeln!(out, "# TYPE keygate_gateway_requests_total counter");
        for (id, r) in &self.routes {
            for (i, c) in r.status.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "keygate_gateway_requests_total{{route=\"{id}\",status=\"{}xx\"}} {}",
                    i + 1,
                    c.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "keygate_gateway_requests_total{{route=\"\",status=\"unrouted\"}} {}",
            self.unrouted.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP keygate_gateway_request_duration_seconds Time to answer, by route.");
        let _ = writeln!(out, "# TYPE keygate_gateway_request_duration_seconds histogram");
        for (id, r) in &self.routes {
            let mut cumulative = 0;
            for (i, c) in r.latency.iter().enumerate() {
                cumulative += c.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS_MS.get(i).map_or("+Inf".to_owned(), |ms| format!("{}", *ms as f64 / 1000.0));
                let _ = writeln!(
                    out,
                    "keygate_gateway_request_duration_seconds_bucket{{route=\"{id}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = r.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "keygate_gateway_request_duration_seconds_sum{{route=\"{id}\"}} {sum}");
            let _ = writeln!(out, "keygate_gateway_request_duration_seconds_count{{route=\"{id}\"}} {cumulative}");
        }
        let _ = writeln!(out, "# HELP keygate_gateway_refusals_total Requests refused by the gateway, by reason.");
        let _ = writeln!(out, "# TYPE keygate_gateway_refusals_total counter");
        for (reason, c) in REASONS.iter().zip(&self.refusals) {
            let _ =
                writeln!(out, "keygate_gateway_refusals_total{{reason=\"{reason}\"}} {}", c.load(Ordering::Relaxed));
        }
        let _ = writeln!(out, "# HELP keygate_gateway_limiter_decisions_total Rate-limit and quota decisions.");
        let _ = writeln!(out, "# TYPE keygate_gateway_limiter_decisions_total counter");
        let _ = writeln!(
            out,
            "keygate_gateway_limiter_decisions_total{{decision=\"allowed\"}} {}",
            self.limiter_allowed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "keygate_gateway_limiter_decisions_total{{decision=\"refused\"}} {}",
            self.limiter_refused.load(Ordering::Relaxed)
        );
        let _ =
            writeln!(out, "# HELP keygate_gateway_upstream_errors_total Upstream connection failures and time-outs.");
        let _ = writeln!(out, "# TYPE keygate_gateway_upstream_errors_total counter");
        for (id, r) in &self.routes {
            let _ = writeln!(
                out,
                "keygate_gateway_upstream_errors_total{{route=\"{id}\",kind=\"unavailable\"}} {}",
                r.upstream_errors.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "keygate_gateway_upstream_errors_total{{route=\"{id}\",kind=\"timeout\"}} {}",
                r.upstream_timeouts.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in extra {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}
