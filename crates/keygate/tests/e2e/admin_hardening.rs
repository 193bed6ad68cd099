//! Issue 12, the admin plane: root keys (list, revoke, expiry, last use, the permission to manage
//! them), the admin listener's body limit and security headers, CORS validation, the first-run
//! setup's throttle and the portal explorer's caller address. Seen from outside where the finding
//! was: raw sockets, the real binary, the admin API.

use std::io::{Read, Write};
use std::net::TcpStream;

use keygate_testkit::{StatusCode, TestKeygate};

use super::keygate;

#[test]
fn config_check_refuses_cors_wildcard_with_credentials_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("keygate.toml");
    let route = "[[routes]]\nid = \"app\"\npath = \"/app\"\nupstream = \"http://127.0.0.1:9000\"\n[routes.cors]\n";
    std::fs::write(&cfg, format!("{route}allow_origins = [\"*\"]\nallow_credentials = true\n")).unwrap();
    let out = keygate(&["config", "check", cfg.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("route \"app\"") && stderr.contains("cors.allow_credentials"), "{stderr}");
    // Named origins may send credentials; `*` without them stays allowed.
    std::fs::write(&cfg, format!("{route}allow_origins = [\"https://app.example\"]\nallow_credentials = true\n"))
        .unwrap();
    assert_eq!(keygate(&["config", "check", cfg.to_str().unwrap()]).status().unwrap().code(), Some(0));
    std::fs::write(&cfg, format!("{route}allow_origins = [\"*\"]\n")).unwrap();
    assert_eq!(keygate(&["config", "check", cfg.to_str().unwrap()]).status().unwrap().code(), Some(0));
}

/// Every answer of the admin listener carries the security headers, the explorer's included.
#[tokio::test]
async fn every_admin_listener_answer_carries_the_security_headers() {
    let kg = TestKeygate::start().await.unwrap();
    let http = reqwest::Client::new();
    for path in [
        "/admin/docs/",
        "/admin/docs/swagger-ui.css",
        "/admin/docs/swagger-initializer.js",
        "/admin/v1/openapi.json",
        "/admin/v1/health",
        "/admin/v1/tokens",
        "/admin/v1/no-such-thing",
        "/metrics",
        "/login",
    ] {
        let r = http.get(format!("{}{path}", kg.url())).send().await.unwrap();
        let h = r.headers();
        let csp = h.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{path}: {csp:?}");
        assert!(!csp.contains("unsafe-eval") && !csp.contains("script-src 'self' 'unsafe-inline'"), "{path}: {csp}");
        assert_eq!(h.get("x-frame-options").map(|v| v.as_bytes()), Some(&b"DENY"[..]), "{path}");
        assert_eq!(h.get("x-content-type-options").map(|v| v.as_bytes()), Some(&b"nosniff"[..]), "{path}");
        assert_eq!(h.get("referrer-policy").map(|v| v.as_bytes()), Some(&b"same-origin"[..]), "{path}");
        assert!(h.contains_key("cache-control"), "{path}");
    }
    kg.stop().await;
}

/// Sends a request head on a raw connection, then (when `chunk` is given) chunks of that many
/// bytes until `total` bytes went out or a write failed, while another thread reads the answer.
/// Returns the bytes written and the whole answer (read to the connection's end).
fn raw_post(addr: std::net::SocketAddr, head: &str, chunk: usize, total: usize) -> (usize, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    // A guard against a server that never answers, not a measure: the assertions are on bytes.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let read = std::thread::spawn(move || {
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    });
    stream.write_all(head.as_bytes()).unwrap();
    let mut written = 0;
    if chunk > 0 {
        let mut piece = format!("{chunk:x}\r\n").into_bytes();
        piece.extend(std::iter::repeat_n(b' ', chunk));
        piece.extend_from_slice(b"\r\n");
        while written < total {
            if stream.write_all(&piece).is_err() {
                break;
            }
            written += chunk;
        }
        let _ = stream.write_all(b"0\r\n\r\n");
    }
    (written, read.join().unwrap())
}

/// A body larger than the bound is refused while it is read (chunked) or from its head
/// (Content-Length), with 413 `body_too_large`, and the connection is closed: the server stops
/// reading instead of buffering what the client sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bodies_are_bounded_while_read_and_refused_by_length() {
    let kg = TestKeygate::start().await.unwrap();
    let addr = kg.admin_addr;
    let key = kg.root_key.clone();
    const TOTAL: usize = 256 << 20;
    let head = format!(
        "POST /admin/v1/tokens HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let (written, answer) = tokio::task::spawn_blocking(move || raw_post(addr, &head, 64 << 10, TOTAL)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"body_too_large\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    // The server closed the connection: the client could not send the rest (socket buffers hold a
    // few MiB at most, far from the 256 MiB it tried).
    assert!(written < TOTAL, "the whole body was accepted ({written} bytes): it was read, not cut");

    // A Content-Length over the bound: refused from the head, no body sent at all.
    let head = format!(
        "POST /admin/v1/tokens HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 300000000\r\n\r\n"
    );
    let (_, answer) = tokio::task::spawn_blocking(move || raw_post(addr, &head, 0, 0)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("\"body_too_large\""), "{answer}");
    // Without a credential, too: the bound comes before anything else.
    let head = format!("POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 300000000\r\n\r\n");
    let (_, answer) = tokio::task::spawn_blocking(move || raw_post(addr, &head, 0, 0)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413") && answer.contains("\"body_too_large\""), "{answer}");
    // The dashboard's forms are read under the same bound when streamed.
    let head = format!(
        "POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    );
    let (written, answer) = tokio::task::spawn_blocking(move || raw_post(addr, &head, 64 << 10, TOTAL)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(written < TOTAL, "the dashboard read the whole form ({written} bytes)");

    // A body within the bound still works.
    let ok = kg.client().post("/admin/v1/tokens", &serde_json::json!({"name": "small"})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.body);
    kg.stop().await;
}

/// Whoever reaches `/setup` cannot lock the owner out by hammering wrong codes: the throttle
/// counts per source address (the attacker here connects from 127.0.0.2, the owner from
/// 127.0.0.1), and the code is long enough that guessing is hopeless.
#[tokio::test]
async fn wrong_setup_codes_from_elsewhere_do_not_lock_the_owner_out() {
    let kg = TestKeygate::start().await.unwrap();
    let code = kg.setup_code().unwrap();
    let symbols: String = code.chars().filter(|c| *c != '-').collect();
    assert!(symbols.len() >= 20 && symbols.chars().all(|c| c.is_ascii_alphanumeric()), "{code}");
    let no_redirects = || reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    let attacker = no_redirects().local_address(std::net::IpAddr::from([127, 0, 0, 2])).build().unwrap();
    let url = format!("{}/setup", kg.url());
    let form = |code: &str| {
        vec![
            ("code", code.to_owned()),
            ("name", "Mallory".to_owned()),
            ("email", "m@example.com".to_owned()),
            ("password", "a long enough password".to_owned()),
        ]
    };
    let mut throttled = false;
    for i in 0..40 {
        let r = attacker.post(&url).form(&form(&format!("wrong-{i}"))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        throttled |= r.text().await.unwrap().contains("too many");
    }
    assert!(throttled, "the attacker's own address is throttled");
    let owner = no_redirects().build().unwrap();
    let mut fields = form(&code);
    fields[1].1 = "Olivia".into();
    fields[2].1 = "olivia@example.com".into();
    let r = owner.post(&url).form(&fields).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "the owner still sets up: {}", r.text().await.unwrap());
    kg.stop().await;
}

/// The portal's explorer sends its request as the person using the dashboard: the gateway checks
/// a token's IP allowlist against their address (here 127.0.0.2), not against keygate's own
/// (127.0.0.1), so an allowlist naming the keygate host lets nobody in through the explorer.
#[tokio::test]
async fn the_explorer_is_checked_against_the_address_of_the_person_using_it() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (_, host_bound) = c.create_token(&serde_json::json!({"name": "host", "ip_allowlist": ["127.0.0.1/32"]})).await;
    let (id, person_bound) =
        c.create_token(&serde_json::json!({"name": "person", "ip_allowlist": ["127.0.0.2/32"]})).await;
    kg.sync_index().await.unwrap();
    let mut b = super::dashboard::owner(&kg).await;
    b.http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let try_with = |token: String| [("method", "GET".to_owned()), ("path", "/demo/echo".to_owned()), ("token", token)];
    let fields = try_with(host_bound);
    let form: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let p = b.submit("/portal/demo", "/portal/demo/try", &form).await;
    assert!(p.body.contains("HTTP 403") && p.body.contains("ip_not_allowed"), "{}", p.body);
    let fields = try_with(person_bound);
    let form: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let p = b.submit("/portal/demo", "/portal/demo/try", &form).await;
    assert!(p.body.contains("HTTP 200"), "{}", p.body);
    kg.flush_usage().await;
    let shown = c.get(&format!("/admin/v1/tokens/{id}")).await;
    assert_eq!(shown.str("/last_used_ip"), "127.0.0.2", "the gateway recorded the person's address");
    kg.stop().await;
}
