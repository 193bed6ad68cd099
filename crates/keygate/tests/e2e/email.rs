//! Email notifications seen from the SMTP side: a minimal SMTP receiver on an ephemeral port
//! (shared with the other tests that read emails), and what keygate's email worker does when the
//! server it talks to stalls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keygate_core::notify::{DeliveryState, Email};
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::json;

/// A minimal SMTP receiver (RFC 5321, plain, no extensions): what keygate's mailer sends to it,
/// each message's DATA as received. Its first `stall_first` connections are accepted and then
/// left silent — no greeting, no answer, never closed — as a stuck server would.
pub(crate) struct SmtpReceiver {
    /// `smtp://127.0.0.1:<port>`.
    pub url: String,
    pub messages: Arc<parking_lot::Mutex<Vec<String>>>,
    /// The connections accepted and left silent so far.
    pub stalled: Arc<AtomicUsize>,
}

impl SmtpReceiver {
    pub(crate) async fn start(stall_first: usize) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("smtp://{}", listener.local_addr().unwrap());
        let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stalled = Arc::new(AtomicUsize::new(0));
        let (messages, silent) = (got.clone(), stalled.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                if silent.load(Ordering::SeqCst) < stall_first {
                    silent.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _held = conn;
                        std::future::pending::<()>().await;
                    });
                    continue;
                }
                let messages = messages.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = conn.into_split();
                    let mut lines = BufReader::new(rd).lines();
                    let _ = wr.write_all(b"220 test ESMTP\r\n").await;
                    while let Ok(Some(line)) = lines.next_line().await {
                        let verb = line.split(' ').next().unwrap_or_default().to_ascii_uppercase();
                        let answer: &[u8] = match verb.as_str() {
                            "EHLO" | "HELO" => b"250 test\r\n",
                            "DATA" => {
                                let _ = wr.write_all(b"354 go ahead\r\n").await;
                                let mut body = String::new();
                                while let Ok(Some(l)) = lines.next_line().await {
                                    if l == "." {
                                        break;
                                    }
                                    body.push_str(&l);
                                    body.push('\n');
                                }
                                messages.lock().push(body);
                                b"250 queued\r\n"
                            }
                            "QUIT" => {
                                let _ = wr.write_all(b"221 bye\r\n").await;
                                break;
                            }
                            _ => b"250 ok\r\n",
                        };
                        let _ = wr.write_all(answer).await;
                    }
                });
            }
        });
        Self { url, messages: got, stalled }
    }

    /// The messages received that contain `text` (waits for one, bounded).
    pub(crate) async fn with(&self, text: &str) -> Vec<String> {
        for _ in 0..400 {
            let got: Vec<String> = self.messages.lock().iter().filter(|m| m.contains(text)).cloned().collect();
            if !got.is_empty() {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no email with {text:?}");
    }
}

/// The workspace's email about `token` once `done` holds for it (polls the outbox, bounded).
async fn email_about(kg: &TestKeygate, token: &str, done: impl Fn(&Email) -> bool) -> Email {
    let ws = kg.store().workspace_by_name("default").await.unwrap().unwrap().id;
    let mut last = None;
    for _ in 0..400 {
        let emails = kg.admin().list_emails(&ws, 50).await.unwrap();
        last = emails.into_iter().find(|e| e.payload.contains(token));
        if let Some(e) = last.as_ref().filter(|e| done(e)) {
            return e.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the email about {token} never got there: {last:?}");
}

/// An SMTP server that accepts the connection and then says nothing (no greeting) costs one
/// failed attempt after `email.timeout_seconds`, retried on the schedule; the worker goes on, so
/// the next email reaches a server that answers while the silent connection is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_smtp_server_costs_one_failed_attempt_and_holds_up_no_other_email() {
    let smtp = SmtpReceiver::start(1).await;
    let kg = TestKeygate::start_with(Options {
        email: Some(keygate::config::EmailConfig {
            smtp_url: Some(smtp.url.clone()),
            from: Some("keygate <keygate@example.com>".into()),
            timeout_seconds: 1,
        }),
        ..Options::default()
    })
    .await
    .unwrap();
    let _owner = crate::dashboard::owner(&kg).await;
    let c = kg.client();
    let expose = async |name: &str| {
        let (id, secret) = c.create_token(&json!({"name": name})).await;
        let r = c
            .post("/admin/v1/tokens/exposures", &json!({"findings": [{"token": secret, "location": "a paste"}]}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        id
    };

    let first = expose("first").await;
    let failed = email_about(&kg, &first, |e| e.attempts >= 1).await;
    assert_eq!(smtp.stalled.load(Ordering::SeqCst), 1, "the worker met the silent server");
    assert_eq!(failed.state, DeliveryState::Pending, "retried later: {failed:?}");
    let why = failed.last_error.clone().unwrap_or_default();
    assert!(why.contains("timed out") && why.contains("email.timeout_seconds"), "{why}");
    assert!(!why.contains("smtp://"), "no URL in the error: {why}");

    // The worker is free: the next email goes out at once.
    let second = expose("second").await;
    assert_eq!(smtp.with(&second).await.len(), 1);
    email_about(&kg, &second, |e| e.state == DeliveryState::Delivered).await;

    // The first, retried a minute later, goes out too, once.
    kg.clock.advance_seconds(61);
    email_about(&kg, &first, |e| e.state == DeliveryState::Delivered).await;
    assert_eq!(smtp.with(&first).await.len(), 1);
    kg.stop().await;
}

/// SMTP credentials go only over TLS (`smtps://`, or STARTTLS required by `?tls=required`), or to
/// a relay on loopback: `keygate config check` and `keygate serve` refuse a URL that would send
/// them in the clear, with the code first and what to write instead, never the password.
#[test]
fn smtp_credentials_without_tls_are_refused_unless_the_relay_is_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.toml");
    let check = |url: &str| {
        std::fs::write(&cfg, format!("[email]\nsmtp_url = \"{url}\"\nfrom = \"keygate <keygate@example.com>\"\n"))
            .unwrap();
        let out = crate::keygate(&["config", "check", cfg.to_str().unwrap()])
            .env_remove("KEYGATE_SMTP_URL")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for clear in [
        "smtp://keygate:hunter2-smtp@mail.example.com:587",
        "smtp://keygate:hunter2-smtp@mail.example.com:587?tls=opportunistic",
        "smtp://:hunter2-smtp@192.0.2.7:25",
    ] {
        let (code, err) = check(clear);
        assert_eq!(code, Some(2), "{clear}: {err}");
        assert!(err.contains("smtp_credentials_without_tls") && err.contains("?tls=required"), "{clear}: {err}");
        assert!(err.contains("smtps://"), "{clear}: {err}");
        assert!(!err.contains("hunter2"), "no password in the message: {err}");
    }
    for fine in [
        "smtps://keygate:hunter2-smtp@mail.example.com:465",
        "smtp://keygate:hunter2-smtp@mail.example.com:587?tls=required",
        "smtp://keygate:hunter2-smtp@127.0.0.1:2525",
        "smtp://keygate:hunter2-smtp@localhost:2525",
        "smtp://keygate:hunter2-smtp@[::1]:2525",
        "smtp://mail.example.com:25",
    ] {
        let (code, err) = check(fine);
        assert_eq!(code, Some(0), "{fine}: {err}");
    }
    // The same from the environment, at start: refused before anything is opened (a keygate
    // that started after all is stopped, and the test fails).
    std::fs::write(&cfg, "[email]\nfrom = \"keygate <keygate@example.com>\"\n").unwrap();
    let data = dir.path().join("data");
    let mut child = crate::keygate(&["serve", "--config", cfg.to_str().unwrap(), "--data-dir", data.to_str().unwrap()])
        .env("KEYGATE_SMTP_URL", "smtp://keygate:hunter2-smtp@mail.example.com:587")
        .env("KEYGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KEYGATE_GATEWAY_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..600 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("keygate serve started with SMTP credentials in the clear");
    }
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.unwrap().code(), Some(2), "{err}");
    assert!(err.contains("smtp_credentials_without_tls") && !err.contains("hunter2"), "{err}");
    assert!(!data.exists(), "nothing was created");
}
