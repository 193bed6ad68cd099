//! Gateway metrics in the Prometheus text format: requests by route and status class, latency
//! histograms by route, refusals by reason, limiter decisions, upstream errors. No per-token
//! labels (their number is unbounded). Counters are relaxed atomics, kept in one shard per
//! thread (up to [`SHARDS`]) so that the gateway's workers never write to the same cache line;
//! a scrape sums the shards.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counter shards; a thread keeps the one it was given first.
const SHARDS: usize = 8;

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

use keygate_core::model::{LATENCY_BUCKETS_MS, latency_bucket};

/// Refusal reasons counted by `keygate_gateway_refusals_total`.
pub const REASONS: [&str; 28] = [
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
    "token_in_path",
    "bad_request",
    "ambiguous_path",
    "ambiguous_header",
    "route_not_found",
    "body_too_large",
    "cors_origin_not_allowed",
    "upgrade_not_allowed",
    "request_timeout",
    "address_denied",
    "uses_exhausted",
    "api_retired",
    "subscription_required",
    "request_invalid",
    "operation_not_found",
    "method_not_allowed",
    "unsupported_media_type",
    "validation_unavailable",
];

#[derive(Default)]
struct RouteMetrics {
    status: [AtomicU64; 5],
    latency: [AtomicU64; 10],
    latency_sum_us: AtomicU64,
    upstream_errors: AtomicU64,
    upstream_timeouts: AtomicU64,
}

/// One thread's share of a route's counters, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct RouteShard(RouteMetrics);

/// One route's counters, a shard per thread. Shared by every table that has the route (by id),
/// so that a request finishing on a table a reload replaced still counts where a scrape reads.
struct RouteCounters {
    shards: [RouteShard; SHARDS],
}

impl Default for RouteCounters {
    fn default() -> Self {
        Self { shards: std::array::from_fn(|_| RouteShard::default()) }
    }
}

/// One thread's table-wide counters, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    refusals: [AtomicU64; REASONS.len()],
    limiter_allowed: AtomicU64,
    limiter_refused: AtomicU64,
    unrouted: AtomicU64,
    exposure_dropped: AtomicU64,
}

/// The counters of a route table. A table that replaces another on reload shares its
/// predecessor's counters ([`Metrics::succeeding`]) rather than copying them, so nothing counted
/// during the swap is lost: a counter only ever grows, as Prometheus expects of one.
pub struct Metrics {
    route_ids: Vec<String>,
    routes: Vec<Arc<RouteCounters>>,
    shards: Arc<[Shard; SHARDS]>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    pub fn new(route_ids: impl IntoIterator<Item = String>) -> Self {
        let route_ids: Vec<String> = route_ids.into_iter().collect();
        let routes = route_ids.iter().map(|_| Arc::default()).collect();
        Self { route_ids, routes, shards: Arc::new(std::array::from_fn(|_| Shard::default())) }
    }

    /// The counters of a table that replaces `old`'s: the same counters for a route id `old`
    /// has (a removed route's go with it, a new route's start at zero), and the same
    /// table-wide ones.
    pub fn succeeding(route_ids: impl IntoIterator<Item = String>, old: &Metrics) -> Self {
        let route_ids: Vec<String> = route_ids.into_iter().collect();
        let routes = route_ids
            .iter()
            .map(|id| {
                old.route_ids.iter().position(|o| o == id).and_then(|j| old.routes.get(j)).cloned().unwrap_or_default()
            })
            .collect();
        Self { route_ids, routes, shards: old.shards.clone() }
    }

    /// This thread's shard index.
    fn shard() -> usize {
        SHARD.with(|s| *s)
    }

    /// This thread's table-wide counters.
    fn mine(&self) -> Option<&Shard> {
        self.shards.get(Self::shard())
    }

    /// This thread's counters of route `i`.
    fn route_mine(&self, i: usize) -> Option<&RouteMetrics> {
        self.routes.get(i).and_then(|r| r.shards.get(Self::shard())).map(|s| &s.0)
    }

    pub fn request(&self, route: Option<usize>, status: u16, latency_us: u64) {
        let Some(r) = route.and_then(|i| self.route_mine(i)) else {
            if let Some(shard) = self.mine() {
                add(&shard.unrouted, 1);
            }
            return;
        };
        if let Some(c) = r.status.get(usize::from((status / 100).clamp(1, 5) - 1)) {
            add(c, 1);
        }
        if let Some(c) = r.latency.get(latency_bucket(latency_us)) {
            add(c, 1);
        }
        add(&r.latency_sum_us, latency_us);
    }

    pub fn refusal(&self, reason: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason)
            && let Some(c) = self.mine().and_then(|s| s.refusals.get(i))
        {
            add(c, 1);
        }
    }

    pub fn limiter(&self, allowed: bool) {
        if let Some(s) = self.mine() {
            add(if allowed { &s.limiter_allowed } else { &s.limiter_refused }, 1);
        }
    }

    /// A token found in a query string whose exposure report was dropped (too many reports).
    pub fn exposure_report_dropped(&self) {
        if let Some(s) = self.mine() {
            add(&s.exposure_dropped, 1);
        }
    }

    pub fn upstream_error(&self, route: usize, timeout: bool) {
        if let Some(r) = self.route_mine(route) {
            add(if timeout { &r.upstream_timeouts } else { &r.upstream_errors }, 1);
        }
    }

    /// The sum of one of route `i`'s counters over the shards.
    fn route_sum(&self, i: usize, f: impl Fn(&RouteMetrics) -> Option<&AtomicU64>) -> u64 {
        self.routes
            .get(i)
            .map_or(0, |r| r.shards.iter().filter_map(|s| f(&s.0)).map(|c| c.load(Ordering::Relaxed)).sum())
    }

    /// The sum of one counter over the shards.
    fn sum(&self, f: impl Fn(&Shard) -> Option<&AtomicU64>) -> u64 {
        self.shards.iter().filter_map(f).map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Renders every metric; `extra` adds gauges owned elsewhere (index size, feed lag).
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        let route = |i: usize, f: &dyn Fn(&RouteMetrics) -> &AtomicU64| self.route_sum(i, |r| Some(f(r)));
        let _ = writeln!(out, "# HELP keygate_gateway_requests_total Requests answered, by route and status class.");
        let _ = writeln!(out, "# TYPE keygate_gateway_requests_total counter");
        for (i, id) in self.route_ids.iter().enumerate() {
            for class in 0..5 {
                let n = self.route_sum(i, |r| r.status.get(class));
                let _ =
                    writeln!(out, "keygate_gateway_requests_total{{route=\"{id}\",status=\"{}xx\"}} {n}", class + 1);
            }
        }
        let _ = writeln!(
            out,
            "keygate_gateway_requests_total{{route=\"\",status=\"unrouted\"}} {}",
            self.sum(|s| Some(&s.unrouted))
        );
        let _ = writeln!(out, "# HELP keygate_gateway_request_duration_seconds Time to answer, by route.");
        let _ = writeln!(out, "# TYPE keygate_gateway_request_duration_seconds histogram");
        for (i, id) in self.route_ids.iter().enumerate() {
            let mut cumulative = 0;
            for b in 0..=LATENCY_BUCKETS_MS.len() {
                cumulative += self.route_sum(i, |r| r.latency.get(b));
                let le = LATENCY_BUCKETS_MS.get(b).map_or("+Inf".to_owned(), |ms| format!("{}", *ms as f64 / 1000.0));
                let _ = writeln!(
                    out,
                    "keygate_gateway_request_duration_seconds_bucket{{route=\"{id}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = route(i, &|r| &r.latency_sum_us) as f64 / 1e6;
            let _ = writeln!(out, "keygate_gateway_request_duration_seconds_sum{{route=\"{id}\"}} {sum}");
            let _ = writeln!(out, "keygate_gateway_request_duration_seconds_count{{route=\"{id}\"}} {cumulative}");
        }
        let _ = writeln!(out, "# HELP keygate_gateway_refusals_total Requests refused by the gateway, by reason.");
        let _ = writeln!(out, "# TYPE keygate_gateway_refusals_total counter");
        for (i, reason) in REASONS.iter().enumerate() {
            let n = self.sum(|s| s.refusals.get(i));
            let _ = writeln!(out, "keygate_gateway_refusals_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP keygate_gateway_limiter_decisions_total Rate-limit and quota decisions.");
        let _ = writeln!(out, "# TYPE keygate_gateway_limiter_decisions_total counter");
        let _ = writeln!(
            out,
            "keygate_gateway_limiter_decisions_total{{decision=\"allowed\"}} {}",
            self.sum(|s| Some(&s.limiter_allowed))
        );
        let _ = writeln!(
            out,
            "keygate_gateway_limiter_decisions_total{{decision=\"refused\"}} {}",
            self.sum(|s| Some(&s.limiter_refused))
        );
        let _ =
            writeln!(out, "# HELP keygate_gateway_upstream_errors_total Upstream connection failures and time-outs.");
        let _ = writeln!(out, "# TYPE keygate_gateway_upstream_errors_total counter");
        for (i, id) in self.route_ids.iter().enumerate() {
            let _ = writeln!(
                out,
                "keygate_gateway_upstream_errors_total{{route=\"{id}\",kind=\"unavailable\"}} {}",
                route(i, &|r| &r.upstream_errors)
            );
            let _ = writeln!(
                out,
                "keygate_gateway_upstream_errors_total{{route=\"{id}\",kind=\"timeout\"}} {}",
                route(i, &|r| &r.upstream_timeouts)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keygate_gateway_exposure_reports_dropped_total Tokens found in query strings whose exposure report was dropped (too many reports at once)."
        );
        let _ = writeln!(out, "# TYPE keygate_gateway_exposure_reports_dropped_total counter");
        let _ =
            writeln!(out, "keygate_gateway_exposure_reports_dropped_total {}", self.sum(|s| Some(&s.exposure_dropped)));
        for (name, help, value) in extra {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_every_thread_are_summed() {
        let m = std::sync::Arc::new(Metrics::new(["orders".to_owned()]));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    m.request(Some(0), 200, 1500);
                    m.request(Some(0), 200, 1000);
                    m.request(None, 404, 10);
                    m.refusal("unknown_token");
                    m.limiter(false);
                    m.upstream_error(0, true);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.render(&[("keygate_gateway_index_tokens", "Tokens resident.", 7.0)]);
        for line in [
            "keygate_gateway_requests_total{route=\"orders\",status=\"2xx\"} 6",
            "keygate_gateway_requests_total{route=\"\",status=\"unrouted\"} 3",
            // Exactly 1 ms is within `le="0.001"` (bounds are inclusive).
            "keygate_gateway_request_duration_seconds_bucket{route=\"orders\",le=\"0.001\"} 3",
            "keygate_gateway_request_duration_seconds_bucket{route=\"orders\",le=\"0.005\"} 6",
            "keygate_gateway_request_duration_seconds_count{route=\"orders\"} 6",
            "keygate_gateway_refusals_total{reason=\"unknown_token\"} 3",
            "keygate_gateway_limiter_decisions_total{decision=\"refused\"} 3",
            "keygate_gateway_upstream_errors_total{route=\"orders\",kind=\"timeout\"} 3",
            "keygate_gateway_index_tokens 7",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn a_successor_shares_the_counters_so_requests_finishing_on_the_old_table_count() {
        let old = Metrics::new(["orders".to_owned(), "gone".to_owned()]);
        old.request(Some(0), 200, 10);
        old.refusal("unknown_token");
        let new = Metrics::succeeding(["users".to_owned(), "orders".to_owned()], &old);
        // Requests that began on the old table finish after the swap.
        old.request(Some(0), 503, 10);
        old.refusal("unknown_token");
        old.limiter(true);
        old.request(Some(1), 200, 10);
        new.request(Some(1), 200, 10);
        new.request(Some(0), 404, 10);
        let text = new.render(&[]);
        for line in [
            "keygate_gateway_requests_total{route=\"orders\",status=\"2xx\"} 2",
            "keygate_gateway_requests_total{route=\"orders\",status=\"5xx\"} 1",
            "keygate_gateway_requests_total{route=\"users\",status=\"4xx\"} 1",
            "keygate_gateway_requests_total{route=\"users\",status=\"2xx\"} 0",
            "keygate_gateway_refusals_total{reason=\"unknown_token\"} 2",
            "keygate_gateway_limiter_decisions_total{decision=\"allowed\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("gone"), "a removed route's counters go with it");
    }
}
