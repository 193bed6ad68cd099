//! The node registry: this process registers itself in the store, beats every
//! `heartbeat_seconds` with the change-feed position its token index has applied (and at once
//! whenever that position moves, so that a waiting node hears of it within milliseconds), and
//! marks itself stopped on a graceful shutdown. [`Cluster::wait_applied`] is what a token change
//! waits on before it is answered.

use std::sync::Arc;
use std::time::Duration;

use keygate_admin::service::NodeState;
use keygate_core::model::{NodeRecord, Propagation};
use keygate_core::secret::Randomness;
use keygate_core::store::Store;
use keygate_core::{Clock, Timestamp};
use keygate_gateway::index::TokenIndex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::ClusterConfig;

/// Nodes without a heartbeat for this long are forgotten.
const FORGET_AFTER_MS: i64 = 24 * 3_600_000;
/// The longest pause between two reads of the registry while a change is waited on.
const MAX_POLL: Duration = Duration::from_millis(20);
/// A registry read or write that takes longer than this counts as failed (the store is down).
const STORE_BOUND: Duration = Duration::from_secs(2);

pub struct Cluster {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    index: TokenIndex,
    id: String,
    instance: String,
    heartbeat: Duration,
    timeout_ms: i64,
    retention_ms: i64,
    /// `audit.retention_days` in milliseconds, if events are deleted at all.
    audit_retention_ms: Option<i64>,
    /// The service layer, for the rotation policies.
    admin: std::sync::OnceLock<Arc<keygate_admin::Admin>>,
    wait: Duration,
    /// What registration wrote, to register again if the row is lost.
    record: NodeRecord,
    /// The shared limits, told how many nodes are live (their budgets are divided by it while
    /// Redis is down).
    shared: std::sync::OnceLock<Arc<keygate_gateway::shared::SharedLimiter>>,
}

/// The default node id: the host name and the gateway port.
fn default_id(gateway: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
        .unwrap_or_else(|| "keygate".into());
    let mut id = format!("{host}:{}", gateway.port());
    id.truncate(128);
    id
}

impl Cluster {
    /// Registers this process (replacing an earlier process's row with the same id).
    pub async fn register(
        cfg: &ClusterConfig,
        audit_retention_days: u64,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        index: TokenIndex,
        gateway: std::net::SocketAddr,
        admin: std::net::SocketAddr,
    ) -> anyhow::Result<Arc<Self>> {
        let id = cfg.node_id.clone().unwrap_or_else(|| default_id(gateway));
        let mut nonce = [0u8; 12];
        keygate_core::secret::OsRandom.fill(&mut nonce).map_err(|e| anyhow::anyhow!("{e}"))?;
        let instance: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
        let now = clock.now();
        let record = NodeRecord {
            id: id.clone(),
            instance: instance.clone(),
            gateway_address: gateway.to_string(),
            admin_address: admin.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: now,
            applied_seq: index.applied(),
            heartbeat_at: now,
            stopped_at: None,
        };
        store.register_node(&record).await.map_err(|e| anyhow::anyhow!("cannot register this node: {e}"))?;
        tracing::info!(node = %id, "registered in the node registry");
        Ok(Arc::new(Self {
            store,
            clock,
            index,
            id,
            instance,
            heartbeat: Duration::from_secs(cfg.heartbeat_seconds),
            timeout_ms: i64::try_from(cfg.node_timeout_seconds.saturating_mul(1_000)).unwrap_or(i64::MAX),
            retention_ms: i64::try_from(cfg.feed_retention_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX),
            audit_retention_ms: (audit_retention_days > 0)
                .then(|| i64::try_from(audit_retention_days.saturating_mul(86_400_000)).unwrap_or(i64::MAX)),
            wait: Duration::from_millis(cfg.propagation_timeout_ms),
            record,
            shared: std::sync::OnceLock::new(),
            admin: std::sync::OnceLock::new(),
        }))
    }

    /// Runs the workspaces' rotation policies with the hourly housekeeping (set once).
    pub fn set_admin(&self, admin: Arc<keygate_admin::Admin>) {
        let _ = self.admin.set(admin);
    }

    /// Keeps `shared` told of the live nodes, at every heartbeat.
    pub fn set_shared(&self, shared: Arc<keygate_gateway::shared::SharedLimiter>) {
        let _ = self.shared.set(shared);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Beats every `heartbeat_seconds`, and at once when the index applies more of the feed.
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut applied = me.index.applied_changes();
            let mut tick = tokio::time::interval(me.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut beats: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = applied.changed() => if changed.is_err() { return },
                }
                me.beat().await;
                beats += 1;
                // About once an hour (and soon after start): forget nodes gone for a day, and
                // prune the change feed.
                if beats % 1_800 == 30 {
                    me.housekeeping().await;
                }
                // About once a minute: tokens expiring or expired, quotas at a threshold.
                if beats % 30 == 29 {
                    me.sweep_notices().await;
                }
            }
        })
    }

    /// Forgets nodes without a heartbeat for a day and deletes change-feed rows older than the
    /// retention. Every node does it; doing it twice is harmless.
    pub async fn housekeeping(&self) {
        let now = self.clock.now().as_millis();
        let before = Timestamp::from_millis(now.saturating_sub(FORGET_AFTER_MS));
        if let Ok(Ok(n)) = tokio::time::timeout(STORE_BOUND, self.store.prune_nodes(before)).await
            && n > 0
        {
            tracing::info!(nodes = n, "forgot nodes without a heartbeat for a day");
        }
        let before = Timestamp::from_millis(now.saturating_sub(self.retention_ms));
        match tokio::time::timeout(Duration::from_secs(60), self.store.prune_feed(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(changes = n, "pruned the change feed"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune the change feed"),
            Err(_) => tracing::warn!("pruning the change feed took more than a minute; stopped waiting"),
        }
        if let Some(admin) = self.admin.get() {
            match tokio::time::timeout(Duration::from_secs(300), admin.enforce_rotation()).await {
                Ok(Ok(s)) if s.reminded + s.overdue > 0 => tracing::info!(
                    reminded = s.reminded,
                    overdue = s.overdue,
                    suspended = s.suspended,
                    "rotation policies: tokens due or overdue for rotation recorded"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot apply the rotation policies"),
                Err(_) => tracing::warn!("applying the rotation policies took more than five minutes; stopped waiting"),
            }
        }
        if let Some(admin) = self.admin.get() {
            match tokio::time::timeout(Duration::from_secs(300), admin.close_billing_periods()).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(apps = n, "billing: last month's statements closed"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot close last month's statements"),
                Err(_) => {
                    tracing::warn!("closing last month's statements took more than five minutes; stopped waiting")
                }
            }
        }
        if let Some(admin) = self.admin.get() {
            match tokio::time::timeout(Duration::from_secs(300), admin.enforce_dormancy()).await {
                Ok(Ok(s)) if s.flagged > 0 => tracing::info!(
                    dormant = s.flagged,
                    suspended = s.suspended,
                    "dormancy rules: tokens found unused for their workspace's dormant_days"
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot apply the dormancy rules"),
                Err(_) => tracing::warn!("applying the dormancy rules took more than five minutes; stopped waiting"),
            }
        }
        if let Some(admin) = self.admin.get() {
            match tokio::time::timeout(Duration::from_secs(300), admin.prune_deliveries()).await {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(deliveries = n, "deleted webhook deliveries older than webhooks.retention_days")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete old webhook deliveries"),
                Err(_) => {
                    tracing::warn!("deleting old webhook deliveries took more than five minutes; stopped waiting")
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(300), self.store.trim_llm_logs(now)).await {
            Ok(Ok(n)) if n > 0 => {
                tracing::info!(logs = n, "deleted logged LLM calls past their route's log_retention_days")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete old logged LLM calls"),
            Err(_) => tracing::warn!("deleting old logged LLM calls took more than five minutes; stopped waiting"),
        }
        if let Some(keep) = self.audit_retention_ms {
            let before = Timestamp::from_millis(now.saturating_sub(keep));
            match tokio::time::timeout(Duration::from_secs(300), self.store.prune_audit(before)).await {
                Ok(Ok(n)) if n > 0 => {
                    tracing::info!(events = n, "deleted audit events older than audit.retention_days")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete old audit events"),
                Err(_) => tracing::warn!("deleting old audit events took more than five minutes; stopped waiting"),
            }
        }
    }

    /// Records the notices due (`token.expiring`, `token.expired`, `quota.threshold`,
    /// `budget.threshold`), once each
    /// whichever node finds them first.
    pub async fn sweep_notices(&self) {
        let Some(admin) = self.admin.get() else { return };
        match tokio::time::timeout(Duration::from_secs(60), admin.sweep_notices()).await {
            Ok(Ok(s)) if s.expiring + s.expired + s.quota + s.budget > 0 => tracing::info!(
                expiring = s.expiring,
                expired = s.expired,
                quota = s.quota,
                budget = s.budget,
                "notices recorded: tokens expiring or expired, quotas at a threshold"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot look for tokens expiring or quotas at a threshold"),
            Err(_) => tracing::warn!("looking for expiring tokens and quota thresholds took more than a minute"),
        }
    }

    /// Writes a heartbeat now (the background task does every `heartbeat_seconds`).
    pub async fn beat_now(&self) {
        self.beat().await;
    }

    /// Writes one heartbeat with the applied position; registers again if the row was lost.
    async fn beat(&self) {
        let applied = self.index.applied();
        let now = self.clock.now();
        let beat = self.store.node_heartbeat(&self.id, &self.instance, applied, now);
        match tokio::time::timeout(STORE_BOUND, beat).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                // Pruned while away, or another process registered with the same id: take it
                // back, and say so, since two processes sharing an id confuse acknowledgements.
                tracing::warn!(node = %self.id, "this node's registry row was gone or taken by another process with the same cluster.node_id; registering again");
                let record = NodeRecord { applied_seq: applied, heartbeat_at: now, ..self.record.clone() };
                if let Err(e) = self.store.register_node(&record).await {
                    tracing::warn!(error = %e, "cannot register this node again");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "node heartbeat failed; the store is unreachable"),
            Err(_) => tracing::warn!("node heartbeat timed out; the store is unreachable"),
        }
        if let Some(shared) = self.shared.get()
            && let Ok(Ok(nodes)) = tokio::time::timeout(STORE_BOUND, self.store.list_nodes()).await
        {
            let live = nodes
                .iter()
                .filter(|n| n.id == self.id || NodeState::of(n, now, self.timeout_ms) == NodeState::Live)
                .count();
            shared.set_nodes(u32::try_from(live).unwrap_or(u32::MAX));
        }
    }

    /// Marks this node stopped (graceful shutdown), so no change waits for it.
    pub async fn stopped(&self) {
        let at = self.clock.now();
        match tokio::time::timeout(STORE_BOUND, self.store.node_stopped(&self.id, &self.instance, at)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark this node stopped in the registry"),
            Err(_) => tracing::warn!("cannot mark this node stopped in the registry: the store did not answer"),
        }
    }

    /// Waits until every live node has applied feed position `seq`, or the configured bound has
    /// passed, and says how far the change got. This node counts as live and as having applied
    /// it when its own index has; the others are read from the registry.
    pub async fn wait_applied(&self, seq: u64) -> Propagation {
        let start = Instant::now();
        let deadline = start + self.wait;
        let mut pause = Duration::from_millis(1);
        // Until the registry answers, only this node is known.
        let mut known = Propagation { nodes: 1, applied: 0, elapsed_ms: 0 };
        loop {
            let mine = u32::from(self.index.applied() >= seq);
            let bound = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
            if let Ok(Ok(nodes)) = tokio::time::timeout(bound.min(STORE_BOUND), self.store.list_nodes()).await {
                let now = self.clock.now();
                let others = nodes
                    .iter()
                    .filter(|n| n.id != self.id && NodeState::of(n, now, self.timeout_ms) == NodeState::Live);
                let (mut live, mut done) = (1u32, mine);
                for n in others {
                    live += 1;
                    done += u32::from(n.applied_seq >= seq);
                }
                known = Propagation { nodes: live, applied: done, elapsed_ms: 0 };
            } else {
                known.applied = known.applied.max(mine);
            }
            let now = Instant::now();
            if known.complete() || now >= deadline {
                known.elapsed_ms = u64::try_from(now.duration_since(start).as_millis()).unwrap_or(u64::MAX);
                return known;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }
}
