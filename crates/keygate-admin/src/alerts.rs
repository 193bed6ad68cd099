//! Anomaly alerts (issue 15): what the detectors of [`keygate_core::anomaly`] find in the
//! gateway's activity becomes an alert, with its `anomaly.detected` event (webhooks, email, SIEM
//! through the outboxes), and the workspace's policy may suspend the token.
//!
//! On a single node (SQLite) the [`Detector`] runs over what its own gateway saw. On a shared store
//! (several nodes) each node's gateway sees only its share of a token's traffic (a spike of three
//! times the rate spread over three nodes is no spike on any one of them), so the detectors run on
//! one node at a time, the holder of the detector lease ([`LEASE_MS`]): the others ship what they
//! counted each turn through the store (`anomaly_activity`) and the holder merges it per token
//! with its own before judging. The holder's baselines of the tokens it
//! sees are held in memory (at most `max_tokens`, the least recently seen written back and let
//! go of first), read from the store when a token first shows up and written back every minute.
//! Whether a network, route or user agent is new for a token is decided by the store (a first
//! sighting is recorded once, whichever node sees it), so two nodes do not both call the same
//! network new; an alert repeated while it is unresolved counts an occurrence instead of opening
//! another.

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::atomic::{AtomicU64, Ordering};

use keygate_core::anomaly::{
    Activity, Alert, AlertFilter, AlertKind, AlertStatus, Baseline, Finding, KnownValues, NewSightings, Raised,
    Sensitivity, Severity, Watched, unknown_values,
};
use keygate_core::ids::{AlertId, WorkspaceId};
use keygate_core::model::{Actor, NewAuditEvent, Page, PageRequest, TokenState};
use keygate_core::{Error, ErrorKind, Result, Timestamp};
use parking_lot::Mutex;

use crate::service::Admin;

/// How often the baselines a node holds are written back.
const SAVE_EVERY_MS: i64 = 60_000;
/// How long the detector lease lasts unless renewed (each turn renews it: a turn comes every one
/// to five seconds); another node takes over this long after the holder stops.
pub const LEASE_MS: i64 = 15_000;
/// Shipped activity older than this is dropped, not judged (no holder took it in time).
const STALE_MS: i64 = 60_000;
/// Turns of shipped activity the holder takes per turn of its own.
const TAKE_TURNS: u32 = 256;

/// Anomaly detection settings (`[anomaly]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnomalySettings {
    pub sensitivity: Sensitivity,
    /// Baselines held in memory per node.
    pub max_tokens: usize,
}

impl Default for AnomalySettings {
    fn default() -> Self {
        Self { sensitivity: Sensitivity::default(), max_tokens: 100_000 }
    }
}

struct Held {
    workspace_id: WorkspaceId,
    baseline: Baseline,
    known: KnownValues,
    /// Last seen (for eviction) and whether it changed since it was written.
    seen_ms: i64,
    dirty: bool,
}

/// One node's detector: the baselines it holds and what it raised.
pub struct Detector {
    settings: AnomalySettings,
    /// On a shared store: this node's id, under which it takes the detector lease or ships its
    /// activity. `None`: judges its own gateway's activity, alone.
    node: Option<String>,
    /// Whether this node held the lease at its last turn.
    holder: std::sync::atomic::AtomicBool,
    /// Shipped turns dropped as stale (for `/metrics`).
    stale: AtomicU64,
    held: Mutex<HashMap<Watched, Held>>,
    saved_at_ms: AtomicU64,
    /// Alerts opened by this node, by kind and severity (for `/metrics`).
    raised: Mutex<HashMap<(AlertKind, Severity), u64>>,
    /// One run at a time, each over what was counted before it began (windows in order).
    run: tokio::sync::Mutex<()>,
}

impl Detector {
    pub fn new(settings: AnomalySettings) -> Self {
        Self {
            settings,
            node: None,
            holder: std::sync::atomic::AtomicBool::new(false),
            stale: AtomicU64::new(0),
            held: Mutex::new(HashMap::default()),
            saved_at_ms: AtomicU64::new(0),
            raised: Mutex::new(HashMap::default()),
            run: tokio::sync::Mutex::new(()),
        }
    }

    /// The detector of node `node` of several sharing one store: the detectors run where the
    /// lease is, over every node's activity.
    pub fn in_cluster(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    pub fn settings(&self) -> &AnomalySettings {
        &self.settings
    }

    /// Whether this node judged at its last turn: it is alone, or holds the lease.
    pub fn judges(&self) -> bool {
        self.node.is_none() || self.holder.load(Ordering::Relaxed)
    }

    /// Turns of activity shipped by nodes and dropped as stale, seen by this node.
    pub fn stale(&self) -> u64 {
        self.stale.load(Ordering::Relaxed)
    }

    /// Alerts this node opened since it started, by kind and severity.
    pub fn raised(&self) -> Vec<(AlertKind, Severity, u64)> {
        let mut v: Vec<_> = self.raised.lock().iter().map(|((k, s), n)| (*k, *s, *n)).collect();
        v.sort_by_key(|(k, s, _)| (k.as_str(), *s));
        v
    }

    /// Baselines held in memory.
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }
}

/// `own` with `more` added, one activity per token or client.
fn merge_by_subject(mut own: Vec<Activity>, more: Vec<Activity>) -> Vec<Activity> {
    if more.is_empty() {
        return own;
    }
    let mut at: HashMap<Watched, usize> = own.iter().enumerate().map(|(i, a)| (a.subject.clone(), i)).collect();
    for a in more {
        match at.get(&a.subject).and_then(|i| own.get_mut(*i)) {
            Some(have) => have.merge(a),
            None => {
                at.insert(a.subject.clone(), own.len());
                own.push(a);
            }
        }
    }
    own
}

/// The actor of alerts and of what the policy does.
fn detector_actor() -> Actor {
    Actor { id: "anomaly-detector".into(), source: None, owner: true }
}

impl Admin {
    /// Runs the detectors over what `take` drains of the gateway's activity (drained once this
    /// run has its turn, so windows are judged in order): returns the alerts opened.
    pub async fn detect(&self, det: &Detector, take: impl FnOnce() -> Vec<Activity> + Send) -> Result<Vec<Alert>> {
        let _turn = det.run.lock().await;
        let Some(activities) = self.gather(det, take).await? else { return Ok(Vec::new()) };
        let mut opened = Vec::new();
        let s = det.settings.sensitivity;
        for a in activities {
            let now = Timestamp::from_millis(a.to_ms);
            if !det.held.lock().contains_key(&a.subject) {
                let (baseline, known) = self.store().load_baseline(&a.subject).await?;
                let held = Held {
                    workspace_id: a.workspace_id.clone(),
                    baseline: baseline.unwrap_or_default(),
                    known,
                    seen_ms: a.to_ms,
                    dirty: false,
                };
                det.held.lock().entry(a.subject.clone()).or_insert(held);
            }
            let unknown = det.held.lock().get(&a.subject).map(|h| unknown_values(&a, &h.known)).unwrap_or_default();
            let mut new = NewSightings::default();
            if !unknown.is_empty() {
                for (kind, v) in self.store().record_sightings(&a.subject, &unknown, now).await? {
                    match kind {
                        "network" => new.networks.push(v),
                        "route" => new.routes.push(v),
                        _ => new.agents.push(v),
                    }
                }
            }
            let findings = {
                let mut held = det.held.lock();
                let Some(h) = held.get_mut(&a.subject) else { continue };
                for (kind, v) in unknown {
                    h.known.insert(kind, v);
                }
                h.seen_ms = a.to_ms;
                h.dirty = true;
                h.baseline.observe(&a, &new, &s)
            };
            for f in findings {
                if let Some(alert) = self.raise(det, &a, f, now).await? {
                    opened.push(alert);
                }
            }
        }
        self.keep_baselines(det).await?;
        Ok(opened)
    }

    /// What this turn judges: this node's activity alone, or on a shared store, if this node
    /// holds the lease, its own merged per token with what the others shipped; `None` if another
    /// node holds it (this node's activity shipped to it).
    async fn gather(
        &self,
        det: &Detector,
        take: impl FnOnce() -> Vec<Activity> + Send,
    ) -> Result<Option<Vec<Activity>>> {
        let Some(node) = &det.node else { return Ok(Some(take())) };
        // The lease and the age of shipped activity are about the nodes' liveness, so they are
        // measured on the system clock, not on the service's (a test's manual clock jumps
        // minutes at a time; the activity's windows carry the service's times).
        let now = keygate_core::Clock::now(&keygate_core::SystemClock);
        let holds = self
            .store()
            .claim_detector(node, now, Timestamp::from_millis(now.as_millis().saturating_add(LEASE_MS)))
            .await?;
        if !holds {
            if det.holder.swap(false, Ordering::Relaxed) {
                // Another node took over: what this one holds goes back to the store, for it.
                self.save_baselines(det).await?;
                det.held.lock().clear();
                tracing::info!(node = %node, "anomaly detection: another node holds the detector lease now");
            }
            let activities = take();
            if !activities.is_empty() {
                self.store().ship_activity(node, &activities, now).await?;
            }
            return Ok(None);
        }
        if !det.holder.swap(true, Ordering::Relaxed) {
            tracing::info!(node = %node, "anomaly detection: this node holds the detector lease and judges every node's activity");
        }
        let (shipped, stale) = self
            .store()
            .take_activity(TAKE_TURNS, Timestamp::from_millis(now.as_millis().saturating_sub(STALE_MS)))
            .await?;
        if stale > 0 {
            det.stale.fetch_add(stale, Ordering::Relaxed);
            tracing::warn!(turns = stale, "anomaly detection: activity shipped by other nodes was too old to judge");
        }
        Ok(Some(merge_by_subject(take(), shipped)))
    }

    /// Lets go of the detector lease (at shutdown), so that another node takes over at once.
    pub async fn release_detector(&self, det: &Detector) -> Result<()> {
        match &det.node {
            Some(node) => self.store().release_detector(node).await,
            None => Ok(()),
        }
    }

    /// Writes back the baselines that changed, once a minute, and lets go of the least recently
    /// seen beyond the bound.
    async fn keep_baselines(&self, det: &Detector) -> Result<()> {
        let now = self.now().as_millis();
        let due =
            now.saturating_sub(i64::try_from(det.saved_at_ms.load(Ordering::Relaxed)).unwrap_or(0)) >= SAVE_EVERY_MS;
        let over = det.held.lock().len().saturating_sub(det.settings.max_tokens);
        if !due && over == 0 {
            return Ok(());
        }
        let (rows, gone) = {
            let mut held = det.held.lock();
            let mut gone = std::collections::HashSet::new();
            if over > 0 {
                // A tenth more than the excess, so that a full map is not sorted again each second.
                let evict = over + det.settings.max_tokens / 10;
                let mut by_age: Vec<(i64, Watched)> = held.iter().map(|(t, h)| (h.seen_ms, t.clone())).collect();
                by_age.sort();
                gone = by_age.into_iter().take(evict).map(|(_, t)| t).collect();
            }
            let mut rows = Vec::new();
            for (t, h) in held.iter_mut() {
                if h.dirty && (due || gone.contains(t)) {
                    h.dirty = false;
                    rows.push((t.clone(), h.workspace_id.clone(), h.baseline.clone()));
                }
            }
            for t in &gone {
                held.remove(t);
            }
            (rows, gone)
        };
        drop(gone);
        if due {
            det.saved_at_ms.store(u64::try_from(now).unwrap_or(0), Ordering::Relaxed);
        }
        self.store().save_baselines(&rows, self.now()).await
    }

    /// Writes back every baseline that changed (at shutdown).
    pub async fn save_baselines(&self, det: &Detector) -> Result<()> {
        let rows: Vec<_> = det
            .held
            .lock()
            .iter_mut()
            .filter(|(_, h)| h.dirty)
            .map(|(t, h)| {
                h.dirty = false;
                (t.clone(), h.workspace_id.clone(), h.baseline.clone())
            })
            .collect();
        self.store().save_baselines(&rows, self.now()).await
    }

    /// Records a finding as an alert (or a repeat of one) and applies the workspace's policy to
    /// a new one: returns the alert if it is new.
    async fn raise(&self, det: &Detector, a: &Activity, f: Finding, now: Timestamp) -> Result<Option<Alert>> {
        let alert = Alert::open(AlertId::random(self.rng())?, (&a.workspace_id, &a.subject, &a.app_id), f, now);
        let audit =
            NewAuditEvent::new(&alert.workspace_id, &detector_actor(), "anomaly.detected", alert.subject.as_str(), now)
                .with_after(serde_json::json!({
                    "alert_id": alert.id,
                    "subject": alert.subject.kind(),
                    "kind": alert.kind,
                    "severity": alert.severity,
                    "summary": alert.summary,
                    "app_id": alert.app_id,
                    "evidence": alert.evidence,
                }));
        let Raised::New(mut alert) = self.store().raise_alert(&alert, &audit).await? else { return Ok(None) };
        *det.raised.lock().entry((alert.kind, alert.severity)).or_insert(0) += 1;
        tracing::warn!(alert_id = %alert.id, subject = %alert.subject, kind = alert.kind.as_str(),
            severity = alert.severity.as_str(), summary = %alert.summary, "anomaly alert");
        // The policy: suspend at or above the workspace's severity — the token, or the OAuth
        // client whose JWTs were used (its access tokens are revoked at every gateway, and the
        // token endpoint issues it nothing, until a person resumes it: a JWT lives minutes, and
        // the credential that leaked is the client's secret). An old secret's token is refused
        // already (its successor is not suspected), so it only notifies.
        let policy = self.store().workspace_policy(&alert.workspace_id).await?;
        if policy.anomaly_suspend.is_some_and(|min| alert.severity >= min) && alert.kind != AlertKind::OldSecret {
            let actor = Actor { id: POLICY_ACTOR.into(), source: None, owner: true };
            let reason = format!(
                "{}{}, {}): {}",
                alert_reason_prefix(&alert),
                alert.kind.as_str(),
                alert.severity,
                alert.summary
            );
            let suspended = match &alert.subject {
                Watched::Token(token_id) => {
                    let token = self.token(&alert.workspace_id, token_id).await?;
                    let active = token.state == TokenState::Active;
                    if active {
                        self.suspend_token_because(&alert.workspace_id, &actor, token_id, &reason).await?;
                    }
                    active
                }
                Watched::Client(client_id) => {
                    // A client deleted (with its app) since its tokens were used: nothing to stop.
                    let active = match self.oauth_client(&alert.workspace_id, client_id).await {
                        Ok(client) => !client.is_suspended(),
                        Err(e) if e.kind == ErrorKind::NotFound => false,
                        Err(e) => return Err(e),
                    };
                    if active {
                        self.suspend_oauth_client_because(&alert.workspace_id, &actor, client_id, Some(&reason))
                            .await?;
                    }
                    active
                }
            };
            if suspended {
                self.store().set_alert_action(&alert.id, "suspended").await?;
                alert.action = Some("suspended".into());
                tracing::warn!(alert_id = %alert.id, subject = %alert.subject, "the workspace's anomaly policy suspended the alert's subject");
            }
        }
        Ok(Some(alert))
    }

    pub async fn alert(&self, ws: &WorkspaceId, id: &AlertId) -> Result<Alert> {
        self.store().alert(ws, id).await?.ok_or_else(|| Error::not_found("alert"))
    }

    pub async fn list_alerts(&self, ws: &WorkspaceId, filter: &AlertFilter, page: &PageRequest) -> Result<Page<Alert>> {
        self.store().list_alerts(ws, filter, page).await
    }

    /// Acknowledges (someone is looking) or resolves an alert, with its audit event
    /// (`alert.acknowledge`, `alert.resolve`). Acknowledging a resolved alert, or moving an alert
    /// to where it is, is a conflict.
    pub async fn set_alert_status(
        &self,
        ws: &WorkspaceId,
        actor: &Actor,
        id: &AlertId,
        status: AlertStatus,
    ) -> Result<Alert> {
        let current = self.alert(ws, id).await?;
        let action = match status {
            AlertStatus::Acknowledged => "alert.acknowledge",
            AlertStatus::Resolved => "alert.resolve",
            AlertStatus::Open => {
                return Err(Error::invalid(
                    "invalid_alert_status",
                    "an alert can be acknowledged or resolved; a new finding opens a new one",
                ));
            }
        };
        let now = self.now();
        let audit = NewAuditEvent::new(ws, actor, action, id.as_str(), now).with_after(serde_json::json!({
            "subject": current.subject.as_str(), "kind": current.kind, "status": status,
        }));
        if !self.store().set_alert_status(ws, id, status, &actor.id, now, &audit).await? {
            return Err(Error::conflict(
                "alert_status_conflict",
                format!("the alert is {}; it can no longer become {}", current.status.as_str(), status.as_str()),
            ));
        }
        self.alert(ws, id).await
    }

    /// The one-click answer to a false alarm: resumes the token or OAuth client this alert's
    /// policy suspended (audited as `token.resume` or `oauth_client.resume`) and resolves the
    /// alert. It lifts only that suspension: a subject stopped for another reason — by a person,
    /// by the exposure or rotation policy, by another alert, or found exposed since — is left
    /// stopped and the call is refused (409 `suspended_for_another_reason`), so that a click on an
    /// anomaly alert can never undo a leak response. A subject that is not suspended is left as
    /// it is, and the alert resolved.
    pub async fn resume_from_alert(&self, ws: &WorkspaceId, actor: &Actor, id: &AlertId) -> Result<Alert> {
        let alert = self.alert(ws, id).await?;
        match &alert.subject {
            Watched::Token(token_id) => {
                // The token as it is before the check: resumed only if still so after it, so that
                // an exposure reported meanwhile is not undone.
                let token = self.token(ws, token_id).await?;
                if let Some(refusal) = self.resume_refusal(ws, &alert).await? {
                    return Err(refusal);
                }
                if token.state == TokenState::Suspended {
                    self.resume_token_at(ws, actor, token_id, token.version).await?;
                }
            }
            Watched::Client(client_id) => {
                if let Some(refusal) = self.resume_refusal(ws, &alert).await? {
                    return Err(refusal);
                }
                // Resuming an active client changes nothing.
                self.resume_oauth_client(ws, actor, client_id).await?;
            }
        }
        if alert.status == AlertStatus::Resolved {
            return Ok(alert);
        }
        self.set_alert_status(ws, actor, id, AlertStatus::Resolved).await
    }

    /// Why [`Self::resume_from_alert`] would refuse to resume `alert`'s subject: it is
    /// suspended, and not (or no longer) by this alert's policy — its latest suspension
    /// (`token.suspend`, `oauth_client.suspend`) is not the anomaly policy's naming this alert,
    /// or (a token) a `token.exposed` event came after it. `None`: it may be resumed, is not
    /// suspended, or is gone (an OAuth client deleted with its app).
    pub async fn resume_refusal(&self, ws: &WorkspaceId, alert: &Alert) -> Result<Option<Error>> {
        let gone = |e: &Error| e.kind == ErrorKind::NotFound;
        let (what, target, suspended) = match &alert.subject {
            Watched::Client(client_id) => match self.oauth_client(ws, client_id).await {
                Ok(c) => ("OAuth client", client_id.as_str(), c.is_suspended()),
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e),
            },
            Watched::Token(token_id) => match self.token(ws, token_id).await {
                Ok(t) => ("token", token_id.as_str(), t.state == TokenState::Suspended),
                Err(e) if gone(&e) => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        if !suspended {
            return Ok(None);
        }
        let (suspend_action, reason_field) = match &alert.subject {
            Watched::Client(_) => ("oauth_client.suspend", "suspended_reason"),
            Watched::Token(_) => ("token.suspend", "reason"),
        };
        let Some(suspend) = self.latest_audit_event(ws, suspend_action, target).await? else {
            return Ok(Some(another_reason(alert, what, None)));
        };
        let reason = suspend.after.as_ref().and_then(|a| a.get(reason_field)).and_then(|r| r.as_str());
        if !(alert.action.as_deref() == Some("suspended")
            && suspend.actor == POLICY_ACTOR
            && reason.is_some_and(|r| r.starts_with(&alert_reason_prefix(alert))))
        {
            let by = format!("{}{}", suspend.actor, reason.map(|r| format!(": {r}")).unwrap_or_default());
            return Ok(Some(another_reason(alert, what, Some(&by))));
        }
        if let Watched::Token(_) = alert.subject
            && let Some(exposed) = self.latest_audit_event(ws, "token.exposed", target).await?
            && exposed.id > suspend.id
        {
            return Ok(Some(Error::conflict(
                "suspended_for_another_reason",
                format!(
                    "the token was found exposed after alert {} suspended it: rotate or revoke it; resume it from \
                     the token's page only if you are sure the exposure is harmless",
                    alert.id
                ),
            )));
        }
        Ok(None)
    }

    /// Alerts by severity and status across workspaces (for `/metrics`).
    pub async fn alert_counts(&self) -> Result<Vec<(Severity, AlertStatus, u64)>> {
        self.store().alert_counts().await
    }
}

/// The actor of the suspensions the anomaly policy makes.
const POLICY_ACTOR: &str = "anomaly-policy";

/// How the reason of a suspension made by `alert`'s policy begins.
fn alert_reason_prefix(alert: &Alert) -> String {
    format!("anomaly alert {} (", alert.id)
}

/// The refusal to resume, from an alert, a subject suspended for another reason (`by`: who
/// suspended it and why, when known).
fn another_reason(alert: &Alert, what: &str, by: Option<&str>) -> Error {
    Error::conflict(
        "suspended_for_another_reason",
        format!(
            "the {what} is suspended, but not by alert {}'s policy{}: resume it from its own page if that is \
             intended",
            alert.id,
            by.map(|b| format!(" (suspended by {b})")).unwrap_or_default()
        ),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use keygate_core::Clock as _;
    use keygate_core::ids::TokenId;

    use super::*;

    fn activity(ws: &WorkspaceId, i: usize, at: i64) -> Activity {
        Activity {
            subject: Watched::Token(TokenId::from_public_id(&format!("{i:012}"))),
            workspace_id: ws.clone(),
            from_ms: at,
            to_ms: at + 1000,
            requests: 1,
            networks: vec![("198.51.100.0/24".into(), 1)],
            ..Activity::default()
        }
    }

    #[tokio::test]
    async fn baselines_held_are_bounded_and_written_back_before_they_go() {
        let (admin, clock, _dir, ws) = crate::testing::admin().await;
        let det = Detector::new(AnomalySettings { max_tokens: 1000, ..AnomalySettings::default() });
        let now = clock.now().as_millis();
        let batch: Vec<Activity> = (0..1050).map(|i| activity(&ws, i, now + i64::try_from(i).unwrap())).collect();
        assert!(admin.detect(&det, || batch).await.unwrap().is_empty(), "new tokens raise nothing");
        // Over the bound: the least recently seen went (and a tenth more), written back first.
        assert_eq!(det.held(), 1050 - 150);
        let (kept, known) =
            admin.store().load_baseline(&Watched::Token(TokenId::from_public_id("000000000000"))).await.unwrap();
        assert_eq!(kept.unwrap().active_minutes, 0, "the first minute is still being counted");
        assert!(known.networks.contains("198.51.100.0/24"), "its sighting is recorded");
        // Seen again, it is read back from the store.
        clock.advance_seconds(120);
        let at = clock.now().as_millis();
        admin.detect(&det, || vec![activity(&ws, 0, at)]).await.unwrap();
        admin.save_baselines(&det).await.unwrap();
        let (again, _) =
            admin.store().load_baseline(&Watched::Token(TokenId::from_public_id("000000000000"))).await.unwrap();
        let again = again.unwrap();
        assert_eq!((again.active_minutes, again.first_ms), (1, now), "its history carried on");
    }
}
