//! Streaming the audit trail to a SIEM (issue 15): each audit event as a syslog message (RFC 5424,
//! framed by octet counting per RFC 6587 over TCP or TLS) or as a line of JSON (an HTTP POST of
//! JSON lines). The event is written to an outbox in its own transaction, so nothing is lost while
//! the receiver is down; the formats here are pure functions.

use serde_json::Value;

use crate::clock::Timestamp;

/// The structured-data id keygate's fields travel under. 32473 is the private enterprise number
/// RFC 5612 reserves for examples and documentation; keygate has no number of its own.
pub const SD_ID: &str = "keygate@32473";

/// Syslog facility 13, "log audit" (RFC 5424, table 1).
const FACILITY_LOG_AUDIT: u8 = 13;

/// The severity of an audit action: warning (4) for what stops or exposes a credential, notice (5)
/// for other changes, informational (6) for sign-ins and reads.
pub fn severity(action: &str) -> u8 {
    match action {
        "token.exposed"
        | "token.revoke"
        | "token.suspend"
        | "root_key.revoke"
        | "webhook.disable"
        | "anomaly.detected"
        | "oauth.family_revoke"
        | "workspace.delete" => 4,
        a if a.starts_with("user.sign") => 6,
        _ => 5,
    }
}

/// Escapes a structured-data parameter value: `"`, `\` and `]` get a backslash (RFC 5424 6.3.3).
fn sd_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A header field of printable US-ASCII without spaces, at most `max` characters, or `-`.
fn header_field(v: &str, max: usize) -> String {
    let s: String = v.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if s.is_empty() { "-".into() } else { s }
}

/// One audit event (the JSON of [`event_json`]) as an RFC 5424 message, without framing:
/// `<PRI>1 TIMESTAMP HOST keygate - ACTION [keygate@32473 …] BOM{json}`.
pub fn rfc5424(event: &Value, hostname: &str) -> String {
    let action = event["action"].as_str().unwrap_or_default();
    let pri = u16::from(FACILITY_LOG_AUDIT) * 8 + u16::from(severity(action));
    let at = event["at"].as_str().unwrap_or("-");
    let mut sd = format!("[{SD_ID}");
    for key in ["id", "workspace_id", "actor", "target", "source"] {
        if let Some(v) = event[key].as_str() {
            sd.push_str(&format!(" {key}=\"{}\"", sd_escape(v)));
        }
    }
    sd.push(']');
    format!(
        "<{pri}>1 {at} {} keygate - {} {sd} \u{feff}{}",
        header_field(hostname, 255),
        header_field(action, 32),
        event
    )
}

/// RFC 6587 octet-counting framing: the message's length in bytes, a space, the message.
pub fn frame(message: &str) -> String {
    format!("{} {message}", message.len())
}

/// Where streamed events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sink {
    /// RFC 5424 over TCP or TLS.
    Syslog,
    /// JSON lines over HTTP(S).
    Http,
}

impl Sink {
    pub const ALL: [Sink; 2] = [Sink::Syslog, Sink::Http];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syslog => "syslog",
            Self::Http => "http",
        }
    }
}

/// Events of the outbox, taken by one node for one sink.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The rows' ids (to acknowledge).
    pub ids: Vec<i64>,
    /// The events' JSON, oldest first.
    pub events: Vec<String>,
    /// The attempts made so far of the oldest row.
    pub attempts: u32,
}

/// The outbox of streamed events.
#[async_trait::async_trait]
pub trait SiemStore: Send + Sync {
    /// Which sinks events are written for (set once at start, from the configuration).
    fn set_siem_sinks(&self, sinks: &[Sink]);
    /// Leases up to `limit` due events of `sink`, oldest first, to `owner` until `now + lease_ms`.
    async fn claim_siem(
        &self,
        sink: Sink,
        now: Timestamp,
        lease_ms: i64,
        owner: &str,
        limit: u32,
    ) -> crate::Result<Batch>;
    /// The sink has them: deletes the rows.
    async fn ack_siem(&self, ids: &[i64]) -> crate::Result<()>;
    /// The sink failed: the rows are due again at `next_at`.
    async fn retry_siem(&self, ids: &[i64], next_at: Timestamp, error: &str) -> crate::Result<()>;
    /// Rows waiting, per sink (for /metrics).
    async fn siem_backlog(&self, sink: Sink) -> crate::Result<u64>;
    /// Deletes the oldest rows of `sink` beyond the newest `keep`; returns how many.
    async fn trim_siem(&self, sink: Sink, keep: u64) -> crate::Result<u64>;
}

/// An audit event as the SIEM gets it (the same fields as the admin API's audit events).
pub struct StreamedEvent<'a> {
    pub id: i64,
    pub workspace_id: &'a str,
    pub at: Timestamp,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub source: Option<&'a str>,
    pub before: Option<&'a str>,
    pub after: Option<&'a str>,
    pub chain_seq: u64,
    pub link: &'a str,
}

/// The JSON of a streamed event; its chain position and link let the receiver check it against
/// `keygate audit verify` later.
pub fn event_json(e: &StreamedEvent<'_>) -> Value {
    let parse = |t: Option<&str>| t.and_then(|t| serde_json::from_str::<Value>(t).ok());
    serde_json::json!({
        "id": format!("evt_{}", e.id),
        "workspace_id": e.workspace_id,
        "at": e.at.to_rfc3339(),
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "source": e.source,
        "before": parse(e.before),
        "after": parse(e.after),
        "chain_seq": e.chain_seq,
        "link": e.link,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_rfc5424_message() {
        let e = StreamedEvent {
            id: 7,
            workspace_id: "ws_a",
            at: Timestamp::from_millis(1_900_000_000_000),
            actor: "rk_x",
            action: "token.revoke",
            target: "tok_\"]\\y",
            source: Some("203.0.113.9"),
            before: Some(r#"{"state":"active"}"#),
            after: None,
            chain_seq: 3,
            link: "ab",
        };
        let m = rfc5424(&event_json(&e), "node 1");
        assert!(
            m.starts_with("<108>1 2030-03-17T17:46:40Z node1 keygate - token.revoke [keygate@32473 id=\"evt_7\""),
            "{m}"
        );
        assert!(m.contains(r#"target="tok_\"\]\\y""#), "{m}");
        let json = m.split('\u{feff}').nth(1).unwrap();
        let back: Value = serde_json::from_str(json).unwrap();
        assert_eq!((back["chain_seq"].as_u64(), back["before"]["state"].as_str()), (Some(3), Some("active")));
        assert_eq!(frame("abc"), "3 abc");
        assert_eq!(frame("é"), "2 é", "octets, not characters");
        assert_eq!(severity("user.sign_in"), 6);
    }
}
