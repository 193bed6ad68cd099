//! `Upgrade` requests and tunnels, from outside the process (issue 12, item 8): h2c is refused,
//! other protocols only when the route lists them, `HTTP2-Settings` never reaches an upstream
//! (which echoes the headers it received), and a tunnel ends when its token stops being valid.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use keygate_gateway::config::GatewayConfig;
use keygate_testkit::{MockUpstream, StatusCode};
use serde_json::{Value, json};

use crate::edge_conn::{connect, read_answer, read_to_close, start};

/// Sends an upgrade request for `path` and returns the answer's head and the open stream.
fn upgrade(addr: SocketAddr, path: &str, token: &str, protocol: &str, extra: &str) -> (String, TcpStream) {
    let mut s = connect(addr);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_answer(&mut s);
    (head, s)
}

/// Sends `ping` through a tunnel and reads it echoed; false if the tunnel ended instead.
fn echoes(s: &mut TcpStream, ping: &[u8]) -> bool {
    if s.write_all(ping).is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < ping.len() {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got == ping
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_unlisted_upgrades_are_refused_and_listed_ones_tunnel() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig::default()).await;
    let (_, t) = kg.client().create_token(&json!({"name": "ws"})).await;
    let addr = kg.gateway_addr;
    tokio::task::spawn_blocking(move || {
        // h2c, on a route that allows "echo" too, with the settings named in Connection or not.
        for (protocol, extra) in [
            ("h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
            ("h2c", "Connection: HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
            ("echo, h2c", ""),
            ("H2C", ""),
        ] {
            let (head, mut s) = upgrade(addr, "/upgrade", &t, protocol, extra);
            assert!(head.starts_with("HTTP/1.1 400"), "{protocol}: {head}");
            assert!(head.contains("\"upgrade_not_allowed\""), "{head}");
            assert!(read_to_close(&mut s).1, "the connection ends after the refusal");
        }
        // Without a valid token, the answer is the token's refusal: the route's list is not
        // told to callers it would not let through.
        let (head, _) = upgrade(addr, "/upgrade", "kg_not_a_token", "h2c", "");
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        // A protocol the route does not list (the default list is websocket only).
        let (head, _) = upgrade(addr, "/ws", &t, "echo", "");
        assert!(head.starts_with("HTTP/1.1 400") && head.contains("upgrade_not_allowed"), "{head}");
        // An upstream that switches to another protocol than the one asked for (the mock always
        // answers "echo") is not followed (RFC 9110 §7.8).
        let (head, _) = upgrade(addr, "/upgrade", &t, "websocket", "");
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
        // One it lists: tunnelled.
        let (head, mut s) = upgrade(addr, "/upgrade", &t, "echo", "");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(echoes(&mut s, b"through the tunnel"));
    })
    .await
    .unwrap();
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_never_reaches_the_upstream() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig::default()).await;
    let (_, t) = kg.client().create_token(&json!({"name": "h"})).await;
    let addr = kg.gateway_addr;
    let t2 = t.clone();
    let echoed = tokio::task::spawn_blocking(move || {
        let mut s = connect(addr);
        let req = format!(
            "GET /headers HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {t2}\r\nHTTP2-Settings: AAMAAABk\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        read_answer(&mut s)
    })
    .await
    .unwrap();
    assert!(echoed.starts_with("HTTP/1.1 200"), "{echoed}");
    let body: Value = serde_json::from_str(echoed.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(body["headers"].get("http2-settings").is_none(), "HTTP/1.1: {body}");
    // The same over HTTP/2.
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let resp = client
        .get(format!("{}/headers", kg.gateway_url()))
        .bearer_auth(&t)
        .header("http2-settings", "AAMAAABk")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert!(body["headers"].get("http2-settings").is_none(), "HTTP/2: {body}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_ends_when_its_token_is_revoked_suspended_or_expired() {
    let up = MockUpstream::start().await.unwrap();
    let kg = start(&up, GatewayConfig::default()).await;
    let c = kg.client();
    let (revoked_id, revoked) = c.create_token(&json!({"name": "revoked"})).await;
    let (suspended_id, suspended) = c.create_token(&json!({"name": "suspended"})).await;
    let (_, expiring) = c.create_token(&json!({"name": "expiring", "expires_in": 60})).await;
    let (_, kept) = c.create_token(&json!({"name": "kept"})).await;
    let addr = kg.gateway_addr;
    let open = |t: String| {
        tokio::task::spawn_blocking(move || {
            let (head, mut s) = upgrade(addr, "/upgrade", &t, "echo", "");
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert!(echoes(&mut s, b"before"));
            s
        })
    };
    let mut tunnels = Vec::new();
    for t in [revoked, suspended, expiring, kept] {
        tunnels.push(open(t).await.unwrap());
    }
    let [mut t_revoked, mut t_suspended, mut t_expiring, mut t_kept]: [TcpStream; 4] = tunnels.try_into().unwrap();

    let a = c.post(&format!("/admin/v1/tokens/{revoked_id}/revoke"), &json!({})).await;
    assert_eq!(a.status, StatusCode::OK);
    let closed = tokio::task::spawn_blocking(move || read_to_close(&mut t_revoked).1).await.unwrap();
    assert!(closed, "the revoked token's tunnel was cut");

    let a = c.post(&format!("/admin/v1/tokens/{suspended_id}/suspend"), &json!({})).await;
    assert_eq!(a.status, StatusCode::OK);
    let closed = tokio::task::spawn_blocking(move || read_to_close(&mut t_suspended).1).await.unwrap();
    assert!(closed, "the suspended token's tunnel was cut");

    // Expiry is checked when its time comes and at every change to the index: the test's clock
    // is a manual one, which wakes nobody, so a change (a token created) makes the tunnel look.
    kg.clock.advance_seconds(60);
    c.create_token(&json!({"name": "any change"})).await;
    let closed = tokio::task::spawn_blocking(move || read_to_close(&mut t_expiring).1).await.unwrap();
    assert!(closed, "the expired token's tunnel was cut");

    let still = tokio::task::spawn_blocking(move || echoes(&mut t_kept, b"after")).await.unwrap();
    assert!(still, "a tunnel of a token still valid stays open");
    kg.stop().await;
}
