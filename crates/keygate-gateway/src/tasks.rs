//! The gateway's own background loops (the binary only starts them): the usage flusher, which
//! writes what the meter counted, `last_used_at` and quota counts to the store and puts them
//! back when the store refuses, the active health checks of the routes' upstreams, and the
//! refresh of their DNS names. The usage flush writes the AI gateway's usage and spending too. Also the unflushed usage of one token, for live usage reports.

use std::sync::Arc;
use std::time::Duration;

use keygate_core::ids::TokenId;
use keygate_core::model::{LastUse, UsageRecord};
use keygate_core::store::Store;
use keygate_core::token_format::PUBLIC_ID_LEN;
use tokio::task::JoinHandle;

use crate::gateway::Gateway;

/// The usage counted for `token` and not flushed yet (live usage reports).
pub fn pending_usage(gw: &Gateway, token: &TokenId) -> Vec<UsageRecord> {
    let Some(id) = token.as_str().strip_prefix("tok_") else { return Vec::new() };
    let Ok(public_id) = <[u8; PUBLIC_ID_LEN]>::try_from(id.as_bytes()) else {
        return Vec::new();
    };
    gw.meter.peek(&public_id)
}

/// The latest unflushed use of each of `tokens` (`last_used_at` as soon as usage shows it).
pub fn pending_last_uses(gw: &Gateway, tokens: &[TokenId]) -> Vec<LastUse> {
    gw.meter.peek_last_uses(tokens)
}

/// Writes counted usage, `last_used_at` and quota counts to the store; puts usage back if the
/// store refuses, so nothing is lost.
pub async fn flush(gw: &Gateway, store: &dyn Store) {
    write(gw, store, gw.meter.drain()).await;
}

/// The periodic flush: quota counts every time (they bound what a crash can let through);
/// usage of finished minutes and `last_used_at` once a minute, so each row is written once.
async fn flush_finished(gw: &Gateway, store: &dyn Store, last_minute: &mut i64) {
    let minute = gw.clock.now().as_millis().div_euclid(60_000) * 60_000;
    let new_minute = minute != *last_minute;
    *last_minute = minute;
    write(gw, store, if new_minute { gw.meter.drain_before(minute, true) } else { (Vec::new(), Vec::new()) }).await;
    if new_minute {
        // Once a minute: route buckets back at rest and quota counts of ended periods go.
        gw.limiter.prune(gw.clock.now().as_millis());
        if let Some(shared) = &gw.shared {
            shared.prune(gw.clock.now().as_millis().saturating_mul(1000));
        }
    }
}

async fn write(gw: &Gateway, store: &dyn Store, (usage, last): (Vec<UsageRecord>, Vec<LastUse>)) {
    let quota = gw.limiter.take_quota_deltas();
    if let Err(e) = store.record_usage(&usage, &last, &quota).await {
        tracing::warn!(error = %e, records = usage.len(), "cannot flush usage; keeping it for the next try");
        gw.meter.restore(usage, last);
        gw.limiter.restore_quota_deltas(&quota);
    }
    let refusals = gw.meter.drain_refusals();
    if !refusals.is_empty()
        && let Err(e) = store.record_refusals(&refusals).await
    {
        tracing::warn!(error = %e, records = refusals.len(), "cannot flush refusal counts; keeping them for the next try");
        gw.meter.restore_refusals(refusals);
    }
    // The AI gateway's usage and spending, and every node's spending read back (budgets).
    if let Some(ai) = &gw.ai {
        ai.sync(store, gw.clock.now().as_millis()).await;
    }
}

/// Flushes every `every` until aborted.
pub fn spawn_flusher(gw: Arc<Gateway>, store: Arc<dyn Store>, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        let mut last_minute = 0;
        loop {
            tick.tick().await;
            flush_finished(&gw, &*store, &mut last_minute).await;
        }
    })
}

/// Writes the call log's chunks that are ready to the store ([`crate::calls::CallLog::ready_chunks`]):
/// those held long enough or full, or every one when `everything` (tests, and the shutdown). A
/// batch the store refuses is dropped and counted (the call log is bounded; the access log and
/// the metrics still have the requests).
pub async fn write_calls(gw: &Gateway, store: &dyn Store, everything: bool) {
    let Some(calls) = &gw.calls else { return };
    let chunks = calls.ready_chunks(gw.clock.now().as_millis(), everything);
    if chunks.is_empty() {
        return;
    }
    let n = chunks.iter().map(|c| c.calls as u64).sum::<u64>();
    match store.insert_chunks(&chunks).await {
        Ok(()) => {
            calls.written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => {
            calls.dropped.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, calls = n, "cannot write the call log; these calls are dropped from it");
        }
    }
}

/// Writes the call log's ready chunks every second, and deletes calls older than `retention` every ten minutes
/// (in slices, so that a long backlog does not hold the table).
pub fn spawn_call_writer(gw: Arc<Gateway>, store: Arc<dyn Store>, retention: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            write_calls(&gw, &*store, false).await;
            n += 1;
            if n % 600 == 1 {
                let ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
                let before = keygate_core::Timestamp::from_millis(gw.clock.now().as_millis().saturating_sub(ms));
                loop {
                    match store.trim_calls(before, 10_000).await {
                        Ok(10_000) => tokio::task::yield_now().await,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot delete old calls from the call log");
                            break;
                        }
                    }
                }
            }
        }
    })
}

/// Active health checks of every route that asks for them.
pub fn spawn_health_checks(gw: Arc<Gateway>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut elapsed: u64 = 0;
        loop {
            tick.tick().await;
            elapsed += 1;
            health_check_round(&gw, elapsed).await;
        }
    })
}

/// Looks up the upstreams' DNS names again as they fall due (their TTL, within
/// `dns_refresh_seconds`), on the current table (so a removed route's names are no longer
/// looked up), once a second, with the gateway's resolver.
pub fn spawn_resolver(gw: Arc<Gateway>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let table = gw.table.load_full();
            let now = crate::resolve::monotonic_ms();
            crate::resolve::refresh(table.routes.dns(), &gw.resolver, now, crate::resolve::Which::Due).await;
        }
    })
}

/// Probes every upstream of every route whose health-check interval divides `elapsed_seconds`
/// (the background task calls this once a second; tests call it directly).
pub async fn health_check_round(gw: &Gateway, elapsed_seconds: u64) {
    let table = gw.table.load_full();
    for route in &table.routes.routes {
        let Some(hc) = &route.health_check else { continue };
        if !elapsed_seconds.is_multiple_of(hc.interval_seconds.max(1)) {
            continue;
        }
        // Each balancing target: each address of an upstream named by a DNS name.
        for u in route.targets().iter() {
            let ok = crate::upstream::probe(u, &hc.path, Duration::from_secs(2)).await;
            crate::proxy::note_probe(u, ok, hc.healthy_threshold, hc.unhealthy_threshold);
        }
    }
}
