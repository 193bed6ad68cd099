//! Events that are not changes anyone makes (issue 15): a token expiring soon, a token that
//! expired, a token that used 80% or 100% of its quota, a virtual key, app or workspace that spent
//! 80% or 100% of an AI route's budget. Every node looks for them every minute;
//! each is recorded once (an audit event, which raises the notification), whichever node finds
//! it first, through the same once-only record as the rotation reminders.

use keygate_core::model::{Actor, NewAuditEvent, PageRequest, TokenFilter, TokenStatus};
use keygate_core::notify::quota_threshold_reached;
use keygate_core::{Result, Timestamp};

use crate::service::Admin;

/// Expired tokens older than this are not announced (a store upgraded with old tokens, a node
/// that was down for long).
const EXPIRED_LOOKBACK_MS: i64 = 7 * 86_400_000;

/// What one sweep recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoticeSweep {
    pub expiring: usize,
    pub expired: usize,
    pub quota: usize,
    /// `budget.threshold` events (AI routes' budgets).
    pub budget: usize,
}

impl Admin {
    /// Records `token.expiring` (`expiring_days` before), `token.expired` and `quota.threshold`
    /// events not recorded yet.
    pub async fn sweep_notices(&self) -> Result<NoticeSweep> {
        let now = self.now();
        let mut sweep = NoticeSweep::default();
        let actor = Actor { id: "system".into(), source: None, owner: true };
        let days = self.notify_settings().expiring_days;
        for ws in self.store().list_workspaces().await? {
            let expiring = TokenFilter {
                status: Some(TokenStatus::Active),
                expiring_before: Some(now.plus_seconds(i64::from(days) * 86_400)),
                ..TokenFilter::default()
            };
            let expired = TokenFilter {
                status: Some(TokenStatus::Expired),
                expired_after: Some(Timestamp::from_millis(now.as_millis() - EXPIRED_LOOKBACK_MS)),
                ..TokenFilter::default()
            };
            for (filter, kind, action) in
                [(expiring, "expiring", "token.expiring"), (expired, "expired", "token.expired")]
            {
                let mut cursor = None;
                loop {
                    let page =
                        self.store().list_tokens(&ws.id, &filter, now, &PageRequest { limit: 500, cursor }).await?;
                    for t in &page.items {
                        let Some(at) = t.expires_at else { continue };
                        let audit = NewAuditEvent::new(&ws.id, &actor, action, t.id.as_str(), now).with_after(
                            serde_json::json!({"name": t.name, "app_id": t.app_id, "expires_at": at.to_rfc3339()}),
                        );
                        if self.store().record_rotation_notice(&t.id, kind, now, &audit).await? {
                            if kind == "expiring" {
                                sweep.expiring += 1;
                            } else {
                                sweep.expired += 1;
                            }
                        }
                    }
                    match page.next_cursor {
                        Some(c) => cursor = Some(c),
                        None => break,
                    }
                }
            }
        }
        for s in self.store().quota_standings().await? {
            let (start, end) = s.quota.period.window(now.as_millis());
            if s.period_start != start {
                continue; // a count of a period that is over
            }
            let Some(percent) = quota_threshold_reached(s.count, s.quota.requests) else { continue };
            // One notice per threshold and period; 100% implies 80% was passed (not sent again).
            let kind = format!("quota{percent}@{start}");
            let audit = NewAuditEvent::new(&s.workspace_id, &actor, "quota.threshold", s.token_id.as_str(), now)
                .with_after(serde_json::json!({
                    "threshold_percent": percent,
                    "used": s.count,
                    "limit": s.quota.requests,
                    "period": s.quota.period.as_str(),
                    "period_start": Timestamp::from_millis(start).to_rfc3339(),
                    "resets_at": (end != i64::MAX).then(|| Timestamp::from_millis(end).to_rfc3339()),
                }));
            if self.store().record_rotation_notice(&s.token_id, &kind, now, &audit).await? {
                sweep.quota += 1;
            }
        }
        sweep.budget = self.sweep_budgets(now).await?;
        Ok(sweep)
    }
}
