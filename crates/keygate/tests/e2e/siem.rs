//! The audit trail streamed to a SIEM (issue 15): RFC 5424 over TCP to a receiver that reads the
//! octet-counted frames, kept while the receiver is down; JSON lines over HTTP.

use std::time::Duration;

use keygate::config::SiemConfig;
use keygate_testkit::recording::RecordingUpstream;
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// Reads octet-counted frames (`LEN SP MSG`) off every connection accepted.
async fn syslog_receiver(listener: tokio::net::TcpListener, out: tokio::sync::mpsc::UnboundedSender<String>) {
    while let Ok((mut s, _)) = listener.accept().await {
        let out = out.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                while let Some(sp) = buf.iter().position(|b| *b == b' ') {
                    let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().expect("an octet count");
                    if buf.len() < sp + 1 + len {
                        break;
                    }
                    let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                    buf.drain(..sp + 1 + len);
                    let _ = out.send(msg);
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
    }
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a syslog message in time").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_stream_to_syslog_and_http_and_wait_for_a_receiver_that_is_down() {
    // A port with nobody listening yet: the events wait in the outbox.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let http = RecordingUpstream::start().await.unwrap();
    let siem = SiemConfig {
        syslog_url: Some(format!("tcp://127.0.0.1:{port}")),
        http_url: Some(format!("{}/collect", http.url())),
        http_authorization: Some("Bearer collector-key".into()),
        ..SiemConfig::default()
    };
    let kg = TestKeygate::start_with(Options { siem: Some(siem), ..Options::default() }).await.unwrap();
    let c = kg.client();
    let (token, _) = c.create_token(&json!({"name": "streamed"})).await;
    assert_eq!(
        c.post(&format!("/admin/v1/tokens/{token}/revoke"), &json!({"reason": "x\"]y"})).await.status,
        StatusCode::OK
    );

    // HTTP: JSON lines, with the collector's credential.
    let mut lines: Vec<Value> = Vec::new();
    for _ in 0..200 {
        lines = http
            .requests()
            .iter()
            .flat_map(|r| {
                String::from_utf8_lossy(&r.body)
                    .lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        if lines.iter().any(|l| l["action"] == "token.revoke") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let revoke = lines.iter().find(|l| l["action"] == "token.revoke").expect("the revocation streamed over HTTP");
    assert_eq!(revoke["target"], token.as_str());
    assert!(revoke["link"].as_str().unwrap().len() == 64 && revoke["chain_seq"].as_u64().unwrap() > 0);
    let req = &http.requests()[0];
    assert_eq!(req.headers("authorization"), ["Bearer collector-key"]);
    assert_eq!(req.headers("content-type"), ["application/x-ndjson"]);

    // While nobody listens, the backlog shows in /metrics.
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    let backlog: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keygate_siem_backlog{sink=\"syslog\"} "))
        .expect("the syslog backlog gauge")
        .parse()
        .unwrap();
    assert!(backlog >= 2, "{metrics}");
    assert!(metrics.contains("keygate_webhook_deliveries_pending 0") && metrics.contains("keygate_emails_pending 0"));

    // Syslog: the receiver starts late; after the retry pause the waiting events arrive, in order.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(syslog_receiver(listener, tx));
    kg.clock.advance_seconds(120);
    let mut first = next(&mut rx).await;
    assert!(first.contains(" root_key.create "), "the testkit's root key came first: {first}");
    while !first.contains(" token.create ") {
        first = next(&mut rx).await;
    }
    assert!(first.starts_with("<109>1 ") && first.contains(" keygate - token.create [keygate@32473 "), "{first}");
    let second = next(&mut rx).await;
    assert!(second.starts_with("<108>1 "), "a revocation is a warning: {second}");
    assert!(second.contains(&format!("target=\"{token}\"")), "{second}");
    let json: Value = serde_json::from_str(second.split('\u{feff}').nth(1).unwrap()).unwrap();
    assert_eq!(json["after"]["revoke_reason"], "x\"]y");
    assert_eq!(json["action"], "token.revoke");

    // Streaming goes on over the same connection.
    c.create_token(&json!({"name": "later"})).await;
    assert!(next(&mut rx).await.contains("token.create"));
    kg.stop().await;
}

/// A receiver that closes its connection after the first message (a restart, an idle timeout)
/// and takes the next one: the event after the close arrives on a new connection, not written
/// into the closed one and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_after_the_receiver_closed_its_connection_is_not_lost() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            n += 1;
            let (tx, conn) = (tx.clone(), n);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(sp) = buf.iter().position(|b| *b == b' ') {
                        let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
                        if buf.len() < sp + 1 + len {
                            break;
                        }
                        let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
                        buf.drain(..sp + 1 + len);
                        if conn == 1 && msg.contains("first-token") {
                            // The first connection ends after the first token's event: closed
                            // before the test hears of the event, so before the next one is made.
                            drop(s);
                            let _ = tx.send((conn, msg));
                            return;
                        }
                        let _ = tx.send((conn, msg));
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    let siem = SiemConfig { syslog_url: Some(format!("tcp://127.0.0.1:{port}")), ..SiemConfig::default() };
    let kg = TestKeygate::start_with(Options { siem: Some(siem), ..Options::default() }).await.unwrap();
    let c = kg.client();
    let until = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<(usize, String)>, name: &str| loop {
        let (conn, msg) =
            tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a message in time").unwrap();
        if msg.contains(name) {
            return conn;
        }
    };
    c.create_token(&json!({"name": "first-token"})).await;
    assert_eq!(until(&mut rx, "first-token").await, 1);
    // The receiver has closed the first connection: the next event comes on the second.
    c.create_token(&json!({"name": "second-token"})).await;
    assert_eq!(until(&mut rx, "second-token").await, 2, "the event after the close arrived");
    kg.stop().await;
}
