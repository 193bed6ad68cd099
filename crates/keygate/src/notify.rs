//! The delivery side of notifications on this node: the HTTP transport of webhooks, with its
//! address guard (no request to a private, loopback or link-local address unless `[webhooks]
//! allow_private`), and the worker that sends the outbox (`Admin::deliver_due`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keygate_admin::Admin;
use keygate_admin::webhooks::{SendResult, WebhookTransport};
use keygate_core::notify::is_public_ip;
use tokio::task::JoinHandle;

/// Resolves names with the system resolver and keeps only the addresses allowed: a name that
/// resolves only to private addresses is refused, whichever address a later lookup would give
/// (the connection uses the addresses checked here, so re-binding the name cannot slip past).
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                found.iter().copied().filter(|a| allow_private || is_public_ip(a.ip())).collect();
            if allowed.is_empty() {
                let why = if found.is_empty() {
                    format!("{host} has no address")
                } else {
                    format!("{host} resolves only to private, loopback or link-local addresses (refused)")
                };
                return Err(why.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Webhook requests over HTTP(S): no redirects followed, no proxy from the environment (it would
/// resolve names where the guard cannot see), bounded in time.
pub struct HttpTransport {
    client: reqwest::Client,
    allow_private: bool,
}

impl HttpTransport {
    pub fn new(allow_private: bool, timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .pool_max_idle_per_host(2)
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .build()?;
        Ok(Self { client, allow_private })
    }
}

/// What went wrong, without the URL (an endpoint's URL may carry a secret in its query).
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out.chars().take(300).collect()
}

#[async_trait]
impl WebhookTransport for HttpTransport {
    async fn post(&self, url: &str, headers: &[(&'static str, String)], body: &str) -> SendResult {
        let Ok(parsed) = reqwest::Url::parse(url) else { return SendResult::Failed("the URL does not parse".into()) };
        // An address in the URL is not resolved, so the resolver's guard does not see it.
        let host = parsed.host_str().unwrap_or_default();
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        if let Some(ip) = literal
            && !self.allow_private
            && !is_public_ip(ip)
        {
            return SendResult::Failed(format!("{ip} is a private, loopback or link-local address (refused)"));
        }
        let mut req = self.client.post(parsed).body(body.to_owned());
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        match req.send().await {
            Ok(resp) => SendResult::Answered(resp.status().as_u16()),
            Err(e) => SendResult::Failed(describe(&e)),
        }
    }
}

/// Email through an SMTP server (lettre), TLS by `smtps://` or STARTTLS by `?tls=required`.
///
/// lettre's own timeout bounds only the TCP connect: a server that accepts and then never sends
/// its greeting (or an answer) would hold a send for ever. The whole send is bounded by
/// `deadline` instead, by the email worker ([`keygate_admin::email::Mailer::deadline`]).
pub struct SmtpMailer {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
    deadline: Duration,
}

impl SmtpMailer {
    pub fn new(cfg: &crate::config::EmailConfig) -> anyhow::Result<Option<Self>> {
        let Some(url) = &cfg.smtp_url else { return Ok(None) };
        let from = cfg
            .from
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|_| anyhow::anyhow!("email.from is not an address"))?;
        let deadline = Duration::from_secs(cfg.timeout_seconds);
        // The error may quote the URL (and its password): say only what is wrong.
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url)
            .map_err(|_| anyhow::anyhow!("email.smtp_url is not a valid SMTP URL (smtps://user:password@host:465 or smtp://host:587?tls=required)"))?
            .timeout(Some(deadline))
            .build();
        Ok(Some(Self { transport, from, deadline }))
    }
}

#[async_trait]
impl keygate_admin::email::Mailer for SmtpMailer {
    async fn send(&self, m: &keygate_admin::email::Message) -> Result<(), String> {
        use lettre::AsyncTransport;
        use lettre::message::{MultiPart, SinglePart, header::ContentType};
        let to = lettre::message::Mailbox::new(
            Some(m.to_name.clone()),
            m.to_address.parse().map_err(|_| format!("{:?} is not an email address", m.to_address))?,
        );
        let message = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(m.subject.clone())
            .multipart(
                MultiPart::alternative()
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(m.text.clone()))
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(m.html.clone())),
            )
            .map_err(|e| format!("cannot build the message: {e}"))?;
        self.transport.send(message).await.map(|_| ()).map_err(|e| {
            // lettre's errors name the server's answer, never the credentials.
            let mut out = e.to_string();
            out.truncate(300);
            out
        })
    }

    fn deadline(&self) -> Duration {
        self.deadline
    }
}

/// Sends the email outbox from this node, every second (at once again after a full batch). Each
/// send is bounded by the mailer's deadline, and a whole pass by its lease: nothing the SMTP
/// server or the store does can stop the loop.
pub fn spawn_email_worker(
    admin: Arc<Admin>,
    mailer: Arc<dyn keygate_admin::email::Mailer>,
    node: String,
) -> JoinHandle<()> {
    let bound = keygate_admin::email::lease(mailer.deadline());
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(bound, admin.deliver_emails(&*mailer, &node)).await {
                Ok(Ok(pass)) if pass.full => continue,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot send emails; trying again"),
                Err(_) => tracing::warn!("a pass of the email worker outlived its lease; stopped waiting for it"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Sends the outbox from this node: every second (and at once again after a full batch), the
/// deliveries due are claimed and sent. Other nodes do the same; a delivery's lease keeps each
/// with one of them.
pub fn spawn_worker(admin: Arc<Admin>, transport: Arc<dyn WebhookTransport>, node: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match admin.deliver_due(transport.clone(), &node).await {
                Ok(pass) if pass.full => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot deliver webhooks; trying again"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    /// A listener that counts the connections it accepts and answers each with 204.
    async fn listener() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n").await;
                });
            }
        });
        (port, count)
    }

    #[tokio::test]
    async fn private_addresses_are_never_connected_to_unless_allowed() {
        let (port, count) = listener().await;
        let guarded = HttpTransport::new(false, Duration::from_secs(5)).unwrap();
        // By address, and by a name that resolves to loopback: refused before any connection.
        for url in [format!("http://127.0.0.1:{port}/x"), format!("http://localhost:{port}/x")] {
            match guarded.post(&url, &[], "{}").await {
                SendResult::Failed(why) => assert!(why.contains("refused") || why.contains("private"), "{url}: {why}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 0, "no connection was made");
        let open = HttpTransport::new(true, Duration::from_secs(5)).unwrap();
        assert_eq!(open.post(&format!("http://localhost:{port}/x"), &[], "{}").await, SendResult::Answered(204));
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
