//! Keeps a [`TokenIndex`] current: loads the store's snapshot, then applies the change feed in
//! order whenever the store signals a commit (and every few seconds regardless, so a missed
//! signal only delays). Changes are applied by re-reading each token's current state, so applying
//! one twice is harmless.

use std::sync::Arc;
use std::time::Duration;

use keygate_core::store::Store;
use keygate_core::{Clock, Result, Timestamp};
use tokio::task::JoinHandle;

use crate::index::TokenIndex;

const BATCH: u32 = 1000;
const POLL_EVERY: Duration = Duration::from_secs(5);
/// How often expired tokens are dropped from the index (they are refused either way).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Loads the index from a snapshot and applies every change committed since.
pub async fn load(index: &TokenIndex, store: &dyn Store, clock: &dyn Clock) -> Result<()> {
    let seq = store.feed_position().await?;
    load_pages(index, store, clock.now(), |_| {}).await?;
    index.shrink_to_fit();
    index.set_seq(seq);
    index.revoke_jtis(store.revoked_jtis(clock.now()).await?.into_iter().map(|r| (r.jti, r.expires_at)));
    index.set_jti_seq(seq);
    catch_up(index, store).await
}

/// Tokens read per page of a snapshot.
const PAGE: u32 = 20_000;

/// Puts every token of a snapshot at `now` into the index, a page at a time (the next page is
/// read while this one is applied), telling `seen` each hash; returns how many.
async fn load_pages(
    index: &TokenIndex,
    store: &dyn Store,
    now: Timestamp,
    mut seen: impl FnMut(&[u8; 32]),
) -> Result<usize> {
    let mut n = 0;
    let mut page = store.snapshot_page(now, None, PAGE).await?;
    loop {
        let Some(last) = page.last().map(|t| t.id.clone()) else { return Ok(n) };
        let full = page.len() == PAGE as usize;
        // Read the next page while this one goes into the index.
        let next = async { if full { store.snapshot_page(now, Some(&last), PAGE).await } else { Ok(Vec::new()) } };
        let apply = async {
            for t in &page {
                index.upsert(t);
                seen(&t.hash.0);
            }
            tokio::task::yield_now().await;
        };
        let (next, ()) = tokio::join!(next, apply);
        n += page.len();
        page = next?;
    }
}

/// Applies every change after the index's position; returns when there are none left. Callers
/// take turns: a batch read before a commit is applied before a batch read after it.
pub async fn catch_up(index: &TokenIndex, store: &dyn Store) -> Result<()> {
    let _turn = index.apply_lock().await;
    // Every change up to this committed position is visible to the reads below, so once both
    // streams are read to their end, it is applied (a later change read on the way is applied
    // too, but a revocation committed after the first loop may not be).
    let target = store.position();
    // JWT revocations share the feed's sequence but have their own position (each stream has
    // gaps where the other's entries are).
    loop {
        let revoked = store.revocations_since(index.jti_seq(), BATCH).await?;
        let Some(last) = revoked.last().map(|r| r.seq) else { break };
        let n = revoked.len();
        index.revoke_jtis(revoked.into_iter().map(|r| (r.jti, r.expires_at)));
        index.set_jti_seq(last);
        if n < BATCH as usize {
            break;
        }
    }
    loop {
        let from = index.seq();
        let changes = store.changes_since(from, BATCH).await?;
        // Read after the changes: if the feed was pruned above where this read started, the
        // read may have missed changes, and only a snapshot tells the current state.
        if store.feed_floor().await? > from {
            return reload(index, store, target).await;
        }
        let Some(last) = changes.last().map(|c| c.seq) else {
            index.mark_caught_up();
            index.set_applied(target);
            return Ok(());
        };
        for c in &changes {
            match &c.record {
                Some(t) => index.upsert(t),
                None => index.remove(&c.hash),
            }
        }
        index.set_seq(last);
        if changes.len() < BATCH as usize {
            index.mark_caught_up();
            index.set_applied(target);
            return Ok(());
        }
    }
}

/// Replaces the index's content with a snapshot (a node that was away for longer than the feed
/// is kept): every token of the snapshot is put in, every other one taken out. Expired tokens
/// are included (the sweep drops them; they are refused anyway).
async fn reload(index: &TokenIndex, store: &dyn Store, target: u64) -> Result<()> {
    let seq = store.feed_position().await?;
    let mut keep: std::collections::HashSet<[u8; 32]> = std::collections::HashSet::new();
    let tokens = load_pages(index, store, Timestamp::from_millis(0), |h| {
        keep.insert(*h);
    })
    .await?;
    let dropped = index.retain_only(&keep);
    index.set_seq(seq);
    index.revoke_jtis(store.revoked_jtis(Timestamp::from_millis(0)).await?.into_iter().map(|r| (r.jti, r.expires_at)));
    index.set_jti_seq(index.jti_seq().max(seq));
    tracing::warn!(
        tokens,
        dropped,
        position = seq,
        "token index: this node was behind the pruned change feed; reloaded a snapshot"
    );
    index.mark_caught_up();
    index.set_applied(target.min(seq));
    Ok(())
}

/// Loads the index, then follows the feed in a background task until it is aborted.
pub async fn start(index: TokenIndex, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<JoinHandle<()>> {
    // Subscribe before the snapshot, so no commit can fall between the two unnoticed.
    let mut signal = store.subscribe();
    load(&index, &*store, &*clock).await?;
    Ok(tokio::spawn(async move {
        let mut poll = tokio::time::interval(POLL_EVERY);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                open = signal.changed() => if !open { return },
                _ = poll.tick() => {}
                _ = sweep.tick() => {
                    index.sweep_expired(clock.now());
                    continue;
                }
            }
            if let Err(e) = catch_up(&index, &*store).await {
                tracing::warn!(error = %e, "token index: cannot read the change feed; keeping the last known state");
            }
        }
    }))
}
