//! Streaming the audit trail to a SIEM (`[siem]`): every audit event, as it is committed, to a
//! syslog receiver (RFC 5424 messages, RFC 6587 octet counting, over TCP or TLS) and/or as JSON
//! lines POSTed to an HTTP collector. Events wait in the store's outbox (written with the event),
//! so a receiver that is down loses nothing: the batch is sent again, with growing pauses, until
//! it is taken. A syslog connection kept between batches is checked before each one: a receiver
//! that closed it (a restart, an idle timeout) gets a new connection rather than a batch written
//! into the old one and lost.

use std::sync::Arc;
use std::time::Duration;

use keygate_core::Clock;
use keygate_core::siem::{Sink, frame, rfc5424};
use keygate_core::store::Store;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::config::SiemConfig;

/// How many events one batch holds at most.
const BATCH: u32 = 500;
/// How long a claimed batch is reserved for this node.
const LEASE_MS: i64 = 60_000;

/// Where one sink's batches go.
#[async_trait::async_trait]
trait Sender: Send + Sync {
    async fn send(&self, events: &[String]) -> Result<(), String>;
}

/// A syslog receiver over TCP, or TLS (`tls://`), kept connected between batches.
struct Syslog {
    host: String,
    port: u16,
    tls: Option<keygate_gateway::upstream_tls::RouteTls>,
    hostname: String,
    conn: tokio::sync::Mutex<Option<keygate_gateway::upstream_tls::UpstreamStream>>,
}

impl Syslog {
    fn new(url: &str, ca_file: Option<&str>, hostname: &str) -> anyhow::Result<Self> {
        let (tls, rest) = match (url.strip_prefix("tcp://"), url.strip_prefix("tls://")) {
            (Some(r), _) => (false, r),
            (_, Some(r)) => (true, r),
            _ => anyhow::bail!("siem.syslog_url must be tcp://host:port or tls://host:port"),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("siem.syslog_url needs a port: tcp://host:514 or tls://host:6514"))?;
        let tls = if tls {
            // The same TLS client as `https://` upstreams: the system's roots, or `syslog_ca_file`.
            let mut route = crate::config::RouteConfig::new("siem", "/", &format!("https://{host}:{port}"));
            route.tls_ca_file = ca_file.map(str::to_owned);
            keygate_gateway::upstream_tls::RouteTls::from_config(&route, true, false)
                .map_err(|e| anyhow::anyhow!("siem: {e}"))?
        } else {
            None
        };
        Ok(Self { host, port, tls, hostname: hostname.to_owned(), conn: tokio::sync::Mutex::new(None) })
    }
}

#[async_trait::async_trait]
impl Sender for Syslog {
    async fn send(&self, events: &[String]) -> Result<(), String> {
        use keygate_gateway::upstream_tls::UpstreamStream;
        let mut conn = self.conn.lock().await;
        if let Some(stream) = conn.as_mut()
            && closed(stream).await
        {
            // Closed by the receiver while idle (restarted, or an idle timeout): a write into it
            // would be taken by the kernel and lost with the connection, and the batch
            // acknowledged. Connect again instead.
            *conn = None;
        }
        if conn.is_none() {
            let tcp = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| format!("cannot connect: {e}"))?;
            let stream = match &self.tls {
                Some(tls) => {
                    let (target, _) =
                        tls.target(&self.host, &format!("{}:{}", self.host, self.port)).map_err(|e| e.to_string())?;
                    UpstreamStream::handshake(tcp, &target).await.map_err(|e| format!("TLS handshake failed: {e}"))?
                }
                None => UpstreamStream::Plain(tcp),
            };
            *conn = Some(stream);
        }
        let mut out = String::new();
        for e in events {
            let event: serde_json::Value = serde_json::from_str(e).unwrap_or_default();
            out.push_str(&frame(&rfc5424(&event, &self.hostname)));
        }
        let Some(stream) = conn.as_mut() else { return Err("no connection".into()) };
        let wrote = tokio::time::timeout(Duration::from_secs(10), async {
            stream.write_all(out.as_bytes()).await?;
            stream.flush().await
        })
        .await;
        match wrote {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                *conn = None;
                Err(format!("write failed: {e}"))
            }
            Err(_) => {
                *conn = None;
                Err("write timed out".into())
            }
        }
    }
}

/// Whether the receiver has closed the kept connection (or it failed) since the last batch. A
/// syslog receiver sends nothing, so whatever is readable is the end of the stream, a reset, or
/// stray bytes (dropped: the connection is still open).
async fn closed(stream: &mut keygate_gateway::upstream_tls::UpstreamStream) -> bool {
    use std::task::Poll;
    use tokio::io::AsyncRead;
    let mut buf = [0u8; 512];
    std::future::poll_fn(|cx| {
        for _ in 0..16 {
            let mut read = tokio::io::ReadBuf::new(&mut buf);
            match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Ready(false),
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(true),
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(true),
            }
        }
        Poll::Ready(false)
    })
    .await
}

/// An HTTP collector: each batch one POST of JSON lines (`application/x-ndjson`); 2xx is taken.
struct Http {
    client: reqwest::Client,
    url: String,
    authorization: Option<String>,
}

#[async_trait::async_trait]
impl Sender for Http {
    async fn send(&self, events: &[String]) -> Result<(), String> {
        let mut body = events.join("\n");
        body.push('\n');
        let mut req = self.client.post(&self.url).header("content-type", "application/x-ndjson").body(body);
        if let Some(a) = &self.authorization {
            req = req.header("authorization", a);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the collector answered {}", r.status().as_u16())),
            Err(e) => Err(if e.is_timeout() { "timed out".into() } else { "request failed".into() }),
        }
    }
}

/// Starts one streaming task per configured sink and tells the store to queue events for them.
pub fn start(
    cfg: &SiemConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    node: &str,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut sinks: Vec<(Sink, Arc<dyn Sender>)> = Vec::new();
    if let Some(url) = &cfg.syslog_url {
        sinks.push((Sink::Syslog, Arc::new(Syslog::new(url, cfg.syslog_ca_file.as_deref(), node)?)));
    }
    if let Some(url) = &cfg.http_url {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        sinks.push((
            Sink::Http,
            Arc::new(Http { client, url: url.clone(), authorization: cfg.http_authorization.clone() }),
        ));
    }
    store.set_siem_sinks(&sinks.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    let max_backlog = cfg.max_backlog;
    Ok(sinks
        .into_iter()
        .map(|(sink, sender)| {
            let (store, clock, node) = (store.clone(), clock.clone(), node.to_owned());
            tokio::spawn(async move { stream(sink, &*sender, &*store, &*clock, &node, max_backlog).await })
        })
        .collect())
}

/// Sends `sink`'s outbox, batch after batch; on failure waits 1 s, doubling to a minute.
/// While the receiver fails, the backlog is held to `max_backlog` events (the oldest dropped).
async fn stream(sink: Sink, sender: &dyn Sender, store: &dyn Store, clock: &dyn Clock, node: &str, max_backlog: u64) {
    loop {
        let batch = match store.claim_siem(sink, clock.now(), LEASE_MS, node, BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, sink = sink.as_str(), "cannot read the SIEM outbox");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.ids.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        match sender.send(&batch.events).await {
            Ok(()) => {
                if let Err(e) = store.ack_siem(&batch.ids).await {
                    tracing::warn!(error = %e, "cannot acknowledge streamed events (they will be sent again)");
                }
            }
            Err(why) => {
                let wait = 1i64 << batch.attempts.min(6);
                if batch.attempts == 0 {
                    tracing::warn!(sink = sink.as_str(), error = %why, "the SIEM receiver did not take the events; keeping them and trying again");
                }
                let next = clock.now().plus_seconds(wait.min(60));
                if let Err(e) = store.retry_siem(&batch.ids, next, &why).await {
                    tracing::warn!(error = %e, "cannot record a failed SIEM batch");
                }
                match store.trim_siem(sink, max_backlog).await {
                    Ok(0) => {}
                    Ok(n) => tracing::error!(
                        sink = sink.as_str(),
                        dropped = n,
                        max_backlog,
                        "the SIEM receiver has been down for long: the oldest waiting events were dropped (they stay in the audit trail; export them with keygate audit export)"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot bound the SIEM backlog"),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}
