//! Verification for services that check tokens themselves (`POST /admin/v1/verify`), answered
//! from the gateway's own state: the token index (no store round trip), the token's own rate
//! limit (its bucket lives in the index entry, so the gateway's requests and verifications drain
//! one bucket), the quota counts of the [`Limiter`], and the usage meter (metered under the route
//! name [`VERIFY_ROUTE`]). The order of checks is the gateway's: token, IP, scope, limits. With
//! shared limits (Redis) the cost is taken from the token's shared bucket and quota count, the
//! ones the gateway's leases draw from, so services and the gateway share one allowance on every
//! node; a backend that is down or late leaves this node's share, as at the gateway.

use std::sync::Arc;

use keygate_core::Timestamp;
use keygate_core::verify::{
    LimitState, TokenVerifier, VERIFY_ROUTE, Verification, VerifiedToken, VerifyCode, VerifyRequest,
};

use crate::gateway::Gateway;
use crate::index::{IndexedToken, Refusal, TokenIndex};
use crate::limiter::Limiter;
use crate::shared::{CostDecision, SharedLimiter};
use crate::usage::{Sample, UsageMeter};

/// The route index verifications are metered under: past any route of a table.
const VERIFY_ROUTE_INDEX: usize = u32::MAX as usize;

/// The parts of the gateway a verification reads and counts in.
pub struct VerifyState<'a> {
    pub index: &'a TokenIndex,
    pub limiter: &'a Limiter,
    pub meter: &'a UsageMeter,
    /// The shared limits, when the nodes share them.
    pub shared: Option<&'a Arc<SharedLimiter>>,
    /// The route name of the usage rows (one shared `Arc`, not one per request).
    pub route: &'a Arc<str>,
}

impl VerifyState<'_> {
    /// Verifies `req` at `now`.
    pub async fn verify(&self, req: &VerifyRequest<'_>, now: Timestamp) -> Verification {
        let entry = match self.index.verify_in(req.token, now, req.workspace.as_str()) {
            Ok(e) => e,
            Err(r) => {
                return Verification::refused(match r {
                    Refusal::Malformed(_) => VerifyCode::MalformedToken,
                    Refusal::Unknown => VerifyCode::UnknownToken,
                    Refusal::Suspended => VerifyCode::TokenSuspended,
                    Refusal::Expired => VerifyCode::TokenExpired,
                });
            }
        };
        let mut out = Verification {
            code: VerifyCode::Ok,
            token: Some(VerifiedToken {
                token_id: entry.token_id().to_string(),
                app_id: entry.app_id.to_string(),
                workspace_id: entry.workspace_id.to_string(),
                scopes: entry.scopes.iter().map(ToString::to_string).collect(),
                expires_at: entry.expires_at(),
            }),
            rate_limit: None,
            quota: None,
        };
        if req.ip.is_some_and(|ip| !entry.allows_ip(ip)) {
            out.code = VerifyCode::IpNotAllowed;
        } else if req.scope.is_some_and(|s| !entry.has_scope(s)) {
            out.code = VerifyCode::InsufficientScope;
        } else {
            self.count(&entry, req.cost, now, &mut out).await;
        }
        // Metered as the gateway meters a request of the token: one row per minute under the
        // route `verify`, with the status the gateway would have answered.
        let status = match out.code {
            VerifyCode::Ok => 200,
            VerifyCode::RateLimited | VerifyCode::QuotaExceeded => 429,
            _ => 403,
        };
        self.meter.record(&Sample {
            public_id: entry.public_id(),
            workspace_id: &entry.workspace_id,
            route_index: VERIFY_ROUTE_INDEX,
            route_id: self.route,
            status,
            bytes_in: 0,
            bytes_out: 0,
            latency_us: 0,
            at: now,
            client_ip: req.ip.unwrap_or(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
        });
        out
    }

    /// Counts `cost` against the token's rate limit, then (if that allowed it) its quota, as the
    /// gateway does for a request.
    async fn count(&self, entry: &IndexedToken, cost: u32, now: Timestamp, out: &mut Verification) {
        let now_us = now.as_millis().saturating_mul(1000);
        let id = entry.public_id();
        if let Some(limit) = entry.rate_limit {
            let d = match self.shared {
                None => {
                    let d = Limiter::check_cell_cost(entry.rate_state(), &limit, now_us, cost);
                    CostDecision { allowed: d.allowed, remaining: d.remaining, reset_after_us: d.reset_after }
                }
                Some(shared) => match shared.take_rate_cost(id, &limit, cost, now_us).await {
                    Some(d) => d,
                    // Alone: the bucket the gateway uses alone, with this node's share.
                    None => {
                        let d = self.limiter.check_rate_cost(id, 0, &shared.scaled(&limit), now_us, cost);
                        CostDecision { allowed: d.allowed, remaining: d.remaining, reset_after_us: d.reset_after }
                    }
                },
            };
            out.rate_limit = Some(LimitState {
                limit: limit.capacity(),
                remaining: d.remaining,
                reset_at: Some(Timestamp::from_millis(now.as_millis() + (d.reset_after_us.max(0) + 999) / 1000)),
            });
            if !d.allowed {
                out.code = VerifyCode::RateLimited;
            }
        }
        if out.code == VerifyCode::Ok
            && let Some(q) = entry.quota
        {
            let now_ms = now.as_millis();
            let d = match self.shared {
                None => self.limiter.check_quota_cost(id, &q, now_ms, u64::from(cost)),
                Some(shared) => {
                    let (start, _) = q.period.window(now_ms);
                    let known = self.limiter.quota_count(id, start);
                    match shared.take_quota_cost(id, &q, u64::from(cost), now_ms, known).await {
                        Some(d) => {
                            if d.allowed {
                                // Counted here too, for the store (usage and the count a restart loads).
                                self.limiter.count_quota_cost(id, &q, now_ms, u64::from(cost));
                            }
                            crate::limiter::QuotaDecision {
                                allowed: d.allowed,
                                remaining: d.remaining,
                                reset_after_ms: if d.reset_after_us == i64::MAX {
                                    i64::MAX
                                } else {
                                    d.reset_after_us / 1000
                                },
                            }
                        }
                        None => self.limiter.check_quota_cost(id, &shared.scaled_quota(&q), now_ms, u64::from(cost)),
                    }
                }
            };
            out.quota = Some(LimitState {
                limit: q.requests,
                remaining: d.remaining,
                reset_at: (d.reset_after_ms != i64::MAX)
                    .then(|| Timestamp::from_millis(now.as_millis().saturating_add(d.reset_after_ms))),
            });
            if !d.allowed {
                out.code = VerifyCode::QuotaExceeded;
            }
        }
    }
}

/// The gateway as the control plane's verifier.
pub struct GatewayVerifier {
    gateway: Arc<Gateway>,
    route: Arc<str>,
}

impl GatewayVerifier {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway, route: Arc::from(VERIFY_ROUTE) }
    }
}

#[async_trait::async_trait]
impl TokenVerifier for GatewayVerifier {
    async fn verify(&self, req: &VerifyRequest<'_>) -> Verification {
        let gw = &self.gateway;
        let state = VerifyState {
            index: &gw.index,
            limiter: &gw.limiter,
            meter: &gw.meter,
            route: &self.route,
            shared: gw.shared.as_ref(),
        };
        state.verify(req, gw.clock.now()).await
    }
}
