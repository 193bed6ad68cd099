//! The gateway end to end: a whole keygate in front of a mock upstream, driven with real HTTP
//! clients and raw sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use keygate_core::Clock;
use keygate_core::policy::RateLimit;
use keygate_testkit::{MockUpstream, Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

async fn kit(upstream: &MockUpstream) -> TestKeygate {
    let mut orders = route("orders", "/orders", &upstream.url());
    orders.scopes.insert("GET".into(), "orders:read".into());
    orders.scopes.insert("*".into(), "orders:write".into());
    let mut status = route("status", "/status", &upstream.url());
    status.public = true;
    let mut limited = route("limited", "/limited", &upstream.url());
    limited.rate_limit = Some(RateLimit { requests: 2, per_seconds: 60, burst: 0 });
    let mut stripped = route("stripped", "/api/v1", &format!("{}/internal", upstream.url()));
    stripped.strip_prefix = true;
    let mut slow = route("slow", "/hold", &upstream.url());
    slow.request_timeout_ms = Some(300);
    let dead = route("dead", "/dead", "http://127.0.0.1:1");
    let mut plain = route("plain", "/plain", &upstream.url());
    plain.cors = Some(keygate_gateway::config::CorsConfig {
        allow_origins: vec!["https://app.example".into()],
        allow_methods: vec!["GET".into(), "POST".into()],
        allow_headers: vec!["authorization".into()],
        expose_headers: vec!["ratelimit".into()],
        allow_credentials: false,
        max_age_seconds: 600,
    });
    let mut failover = route("failover", "/failover", "http://127.0.0.1:1");
    failover.upstreams = vec![upstream.url()];
    failover.balance = keygate_gateway::config::Balance::RoundRobin;
    let mut gw =
        keygate_gateway::config::GatewayConfig { api_key_header: Some("X-API-Key".into()), ..Default::default() };
    gw.max_body_bytes = 1024;
    TestKeygate::start_with(Options {
        routes: vec![
            orders,
            status,
            limited,
            stripped,
            slow,
            dead,
            failover,
            plain,
            // The mock upstream's upgrade is its own "echo" protocol (issue 12: routes list the
            // protocols they tunnel).
            keygate::config::RouteConfig {
                upgrades: vec!["echo".into()],
                ..route("upgrade", "/upgrade", &upstream.url())
            },
        ],
        gateway: Some(gw),
        ..Options::default()
    })
    .await
    .unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

async fn get(kg: &TestKeygate, path: &str, token: Option<&str>) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = http().get(format!("{}{path}", kg.gateway_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_reason_and_rfc6750_answers() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let c = kg.client();
    let (_, reader) = c.create_token(&json!({"name": "reader", "scopes": ["orders:read"]})).await;

    // No token: 401 with a bare challenge.
    let (s, h, b) = get(&kg, "/orders/1", None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("missing_token")));
    assert_eq!(h["www-authenticate"], "Bearer realm=\"keygate\"");
    // Malformed and unknown tokens: 401 invalid_token.
    // The reader's token with its last character changed (to one it is not already).
    let last = if reader.ends_with('x') { 'y' } else { 'x' };
    let altered = format!("{}{last}", &reader[..reader.len() - 1]);
    for bad in ["kg_nope", "not-a-token", &altered] {
        let (s, h, b) = get(&kg, "/orders/1", Some(bad)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(h["www-authenticate"].to_str().unwrap().contains("error=\"invalid_token\""), "{bad}");
        assert_eq!(b["error"]["code"], "malformed_token");
    }
    let forged = {
        let m = keygate_core::token_format::mint(&Default::default(), &keygate_core::secret::OsRandom).unwrap();
        m.secret.expose().to_owned()
    };
    let (s, _, b) = get(&kg, "/orders/1", Some(&forged)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_token")));

    // Scope: GET needs orders:read (held), POST needs orders:write (not held).
    let (s, _, b) = get(&kg, "/orders/1", Some(&reader)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let resp = http().post(format!("{}/orders", kg.gateway_url())).bearer_auth(&reader).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("error=\"insufficient_scope\"") && challenge.contains("scope=\"orders:write\""),
        "{challenge}"
    );

    // The API-key header works like Bearer.
    let resp = http().get(format!("{}/orders/1", kg.gateway_url())).header("x-api-key", &reader).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    // IP allowlist: the socket address decides.
    let (_, far) =
        c.create_token(&json!({"name": "far", "ip_allowlist": ["203.0.113.0/24"], "scopes": ["orders:read"]})).await;
    let (s, _, b) = get(&kg, "/orders/1", Some(&far)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("ip_not_allowed")));
    let spoofed = http()
        .get(format!("{}/orders/1", kg.gateway_url()))
        .bearer_auth(&far)
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), StatusCode::FORBIDDEN, "X-Forwarded-For from an untrusted peer is ignored");

    // Suspension, revocation and scope changes apply to the very next request.
    let (id, t) = c.create_token(&json!({"name": "live", "scopes": ["orders:read"]})).await;
    assert_eq!(get(&kg, "/orders/1", Some(&t)).await.0, StatusCode::OK);
    c.post(&format!("/admin/v1/tokens/{id}/suspend"), &json!({})).await;
    let (s, _, b) = get(&kg, "/orders/1", Some(&t)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_suspended")));
    c.post(&format!("/admin/v1/tokens/{id}/resume"), &json!({})).await;
    assert_eq!(get(&kg, "/orders/1", Some(&t)).await.0, StatusCode::OK);
    c.patch(&format!("/admin/v1/tokens/{id}"), &json!({"scopes": ["users:read"]})).await;
    assert_eq!(get(&kg, "/orders/1", Some(&t)).await.0, StatusCode::FORBIDDEN);
    let started = std::time::Instant::now();
    c.post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await;
    let (s, _, b) = get(&kg, "/status/200", Some(&t)).await;
    assert_eq!(s, StatusCode::OK, "a public route needs no token: {b}");
    let (s, _, b) = get(&kg, "/orders/1", Some(&t)).await;
    let delay = started.elapsed();
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unknown_token")));
    println!("revocation: admin call to first refusal took {delay:?}");

    // Expiry by the clock.
    let (_, short) = c.create_token(&json!({"name": "short", "expires_in": 30, "scopes": ["orders:read"]})).await;
    assert_eq!(get(&kg, "/orders/1", Some(&short)).await.0, StatusCode::OK);
    kg.clock.advance_seconds(30);
    let (s, _, b) = get(&kg, "/orders/1", Some(&short)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_expired")));

    // Unknown route.
    let (s, _, b) = get(&kg, "/nowhere", Some(&reader)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("route_not_found")));

    // A token in the query string: refused and marked exposed.
    let (qid, qt) = c.create_token(&json!({"name": "query", "scopes": ["orders:read"]})).await;
    let (s, _, b) = get(&kg, &format!("/orders/1?access_token={qt}"), None).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("token_in_query")));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = c.get(&format!("/admin/v1/tokens/{qid}")).await;
        if t.body["exposed_at"].is_string() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the token was never marked exposed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_rewrites_headers_and_paths() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let (id, t) = kg.client().create_token(&json!({"name": "fw", "scopes": ["orders:*"]})).await;
    let resp = http()
        .get(format!("{}/orders/7?x=1", kg.gateway_url()))
        .bearer_auth(&t)
        .header("connection", "x-secret-hop, keep-alive")
        .header("x-secret-hop", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("x-keygate-token-id", "tok_forged")
        .header("x-keygate-scopes", "admin:*")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: Value = resp.json().await.unwrap();
    let h = &seen["headers"];
    assert_eq!(seen["uri"], "/orders/7?x=1");
    assert_eq!(h["x-keygate-token-id"], id.as_str());
    assert_eq!(h["x-keygate-scopes"], "orders:*");
    assert!(h["x-keygate-app-id"].as_str().unwrap().starts_with("app_"));
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "a client's X-Forwarded-For from an untrusted peer is replaced");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["host"], up.addr.to_string());
    assert_eq!(h["x-custom"], "kept");
    for gone in ["x-secret-hop", "keep-alive", "authorization"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream");
    }

    // strip_prefix with an upstream base path.
    let (s, _, b) = get(&kg, "/api/v1/things?id=3", Some(&t)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["uri"], "/internal/things?id=3");

    // Normalization happens before matching: none of these reach /orders unchecked.
    let (_, other) = kg.client().create_token(&json!({"name": "other", "scopes": ["users:read"]})).await;
    for sneaky in ["/status/../orders/1", "//orders/1", "/status/%2e%2e/orders/1", "/status%2F..%2Forders/1"] {
        let resp = http().get(format!("{}{sneaky}", kg.gateway_url())).bearer_auth(&other).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{sneaky} bypassed the scope check");
    }

    // Upstream down, slow, and failover on connection failure.
    let (s, _, b) = get(&kg, "/dead", Some(&t)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("upstream_unavailable")));
    let (s, _, b) = get(&kg, "/hold", Some(&t)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::GATEWAY_TIMEOUT, Some("upstream_timeout")));
    up.release();
    for _ in 0..4 {
        let (s, _, _) = get(&kg, "/failover/x", Some(&t)).await;
        assert_eq!(s, StatusCode::OK, "a GET is retried on the healthy upstream");
    }

    // Body limits: by Content-Length before forwarding, and while streaming.
    let resp = http()
        .post(format!("{}/orders", kg.gateway_url()))
        .bearer_auth(&t)
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let small =
        http().post(format!("{}/orders", kg.gateway_url())).bearer_auth(&t).body(vec![b'a'; 100]).send().await.unwrap();
    assert_eq!(small.json::<Value>().await.unwrap()["body_len"], 100);

    // HTTP/2 (h2c with prior knowledge).
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let resp = h2.get(format!("{}/orders/9", kg.gateway_url())).bearer_auth(&t).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["uri"], "/orders/9");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_quotas_and_exact_usage() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let c = kg.client();
    let (id, t) = c
        .create_token(&json!({"name": "metered", "rate_limit": {"requests": 5, "per_seconds": 1, "burst": 0}, "quota": {"requests": 8, "period": "day"}}))
        .await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let (s, h, _) = get(&kg, "/plain/x", Some(&t)).await;
        codes.push(s.as_u16());
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(h.contains_key("retry-after"));
            assert_eq!(h["ratelimit-policy"], "\"token\";q=5;w=1");
        } else {
            assert!(h.get_all("ratelimit").iter().any(|v| v.to_str().unwrap().starts_with("\"token\";r=")));
        }
    }
    assert_eq!(codes, vec![200, 200, 200, 200, 200, 429], "5 at once, then refused");
    kg.clock.advance_seconds(1);
    let mut ok = 0;
    for _ in 0..5 {
        if get(&kg, "/plain/x", Some(&t)).await.0 == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "the day's quota of 8 is used up");
    kg.clock.advance_seconds(1);
    let (s, h, b) = get(&kg, "/plain/x", Some(&t)).await;
    assert_eq!((s, b["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("quota_exceeded")));
    assert!(h["ratelimit-policy"].to_str().is_ok());
    kg.clock.advance_seconds(86_400);
    assert_eq!(get(&kg, "/plain/x", Some(&t)).await.0, StatusCode::OK, "a new day, a new quota");

    // A route's own limit tightens the token's.
    let (_, free) = c.create_token(&json!({"name": "free"})).await;
    let codes: Vec<u16> = futures_codes(&kg, "/limited/x", &free, 3).await;
    assert_eq!(codes, vec![200, 200, 429]);

    // Usage is exact after a flush: 6 + 5 + 1 + 1 requests on /plain by this token (13 in all).
    kg.flush_usage().await;
    let u = c
        .get(&format!("/admin/v1/tokens/{id}/usage?granularity=day&from=2030-01-01T00:00:00Z&to=2030-06-01T00:00:00Z"))
        .await;
    assert_eq!(u.status, StatusCode::OK, "{:?}", u.body);
    assert_eq!(u.body["total"]["requests"], 13);
    assert_eq!(u.body["total"]["status_2xx"], 9);
    assert_eq!(u.body["total"]["status_4xx"], 4);
    assert_eq!(u.body["routes"][0]["route"], "plain");
    let shown = c.get(&format!("/admin/v1/tokens/{id}")).await;
    assert_eq!(shown.body["last_used_ip"], "127.0.0.1");
    let minute = c.get(&format!("/admin/v1/tokens/{id}/usage?granularity=minute")).await;
    assert_eq!(minute.code(), "", "default range works: {:?}", minute.body);

    // CORS: a preflight needs no token; answers carry the allow headers, errors too.
    let pre = http()
        .request(reqwest::Method::OPTIONS, format!("{}/plain/x", kg.gateway_url()))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), StatusCode::NO_CONTENT);
    assert_eq!(pre.headers()["access-control-allow-origin"], "https://app.example");
    assert_eq!(pre.headers()["access-control-allow-methods"], "GET, POST");
    let evil = http()
        .request(reqwest::Method::OPTIONS, format!("{}/plain/x", kg.gateway_url()))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), StatusCode::FORBIDDEN);
    let denied = http()
        .get(format!("{}/plain/x", kg.gateway_url()))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(denied.headers()["access-control-allow-origin"], "https://app.example");

    // Metrics carry no token ids.
    let m = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(m.contains("keygate_gateway_requests_total{route=\"plain\",status=\"2xx\"}"));
    assert!(m.contains("keygate_gateway_refusals_total{reason=\"rate_limited\"}"));
    assert!(!m.contains("tok_"));
    kg.stop().await;
}

async fn futures_codes(kg: &TestKeygate, path: &str, token: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(kg, path, Some(token)).await.0.as_u16());
    }
    out
}

/// Sends raw bytes and returns the status line of the answer (or "closed").
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or("closed").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let (_, t) = kg.client().create_token(&json!({"name": "raw", "scopes": ["orders:*"]})).await;
    let addr = kg.gateway_addr;
    let auth = format!("Authorization: Bearer {t}\r\n");
    let ok = format!("GET /orders/1 HTTP/1.1\r\nHost: a\r\n{auth}\r\n");
    assert!(raw(addr, ok.as_bytes()).contains("200"), "a plain request passes");
    // Content-Length and Transfer-Encoding together: hyper lets Transfer-Encoding win, drops
    // Content-Length and closes the connection after the answer (RFC 9112 §6.3), so a request
    // smuggled behind it is never read.
    let smuggle = format!(
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /orders/smuggled HTTP/1.1\r\nHost: a\r\n{auth}\r\n"
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(smuggle.as_bytes()).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let all = String::from_utf8_lossy(&all);
    assert_eq!(all.matches("HTTP/1.1 ").count(), 1, "exactly one answer, then the connection closes: {all}");
    assert!(!all.contains("smuggled"));
    let cases = [
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        "POST /orders HTTP/1.0\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: +5\r\n\r\nabcde",
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 0x5\r\n\r\nabcde",
        "GET /orders/1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n{auth}\r\n",
        "GET /orders/1 HTTP/1.1\r\nHost : a\r\n{auth}\r\n",
        "GET /orders/1 HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n{auth}\r\n",
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\n\r\n-5\r\nabcde\r\n0\r\n\r\n",
        "POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\n\r\n0x5\r\nabcde\r\n0\r\n\r\n",
    ];
    for case in cases {
        let req = case.replace("{auth}", &auth);
        let status = raw(addr, req.as_bytes());
        assert!(status.contains("400") || status == "closed", "not refused: {case:?} -> {status}");
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_and_graceful_shutdown() {
    let up = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keygate.toml");
    let write = |path: &str| {
        std::fs::write(&file, format!("[[routes]]\nid = \"r\"\npath = \"{path}\"\nupstream = \"{}\"\n", up.url()))
            .unwrap();
    };
    write("/one");
    let routes = keygate::config::Config::from_file(&file).unwrap().routes;
    let kg = TestKeygate::start_with(Options { routes, config_path: Some(file.clone()), ..Options::default() })
        .await
        .unwrap();
    let (_, t) = kg.client().create_token(&json!({"name": "r"})).await;
    assert_eq!(get(&kg, "/one", Some(&t)).await.0, StatusCode::OK);
    write("/two");
    keygate::gateway::reload_routes(kg.routes(), &file).await;
    assert_eq!(get(&kg, "/two", Some(&t)).await.0, StatusCode::OK);
    assert_eq!(get(&kg, "/one", Some(&t)).await.0, StatusCode::NOT_FOUND);
    std::fs::write(&file, "[[routes]]\nid = \"broken\"\npath = \"/x\"\n").unwrap();
    keygate::gateway::reload_routes(kg.routes(), &file).await;
    assert_eq!(get(&kg, "/two", Some(&t)).await.0, StatusCode::OK, "an invalid config keeps the old routes");

    // A request in flight when shutdown starts still completes.
    write("/hold");
    keygate::gateway::reload_routes(kg.routes(), &file).await;
    let url = format!("{}/hold", kg.gateway_url());
    let t2 = t.clone();
    let in_flight = tokio::spawn(async move { http().get(url).bearer_auth(&t2).send().await.map(|r| r.status()) });
    up.held.notified().await;
    let stopping = tokio::spawn(kg.stop());
    tokio::task::yield_now().await;
    up.release();
    assert_eq!(in_flight.await.unwrap().unwrap(), StatusCode::OK);
    stopping.await.unwrap();
    let _ = Clock::now(&keygate_core::SystemClock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_alpn_h2() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let gw = keygate_gateway::config::GatewayConfig {
        tls: Some(keygate_gateway::config::TlsConfig { cert: cert_path, key: key_path }),
        ..Default::default()
    };
    let kg = TestKeygate::start_with(Options { gateway: Some(gw), ..Options::default() }).await.unwrap();
    let (_, t) = kg.client().create_token(&json!({"name": "tls"})).await;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", kg.gateway_addr)
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{}/demo/echo", kg.gateway_addr.port()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    let body: Value = resp.json().await.unwrap();
    assert!(body["identity"]["token_id"].as_str().unwrap().starts_with("tok_"));

    // A new certificate in the files is served to new connections after a reload.
    let renewed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, renewed.cert.pem()).unwrap();
    std::fs::write(&key_path, renewed.signing_key.serialize_pem()).unwrap();
    keygate::gateway::reload_tls(kg.tls().unwrap(), &cert_path, &key_path);
    let trusting = |pem: String| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .resolve("localhost", kg.gateway_addr)
            .build()
            .unwrap()
    };
    let url = format!("https://localhost:{}/demo/echo", kg.gateway_addr.port());
    let new = trusting(renewed.cert.pem()).get(&url).bearer_auth(&t).send().await.unwrap();
    assert_eq!(new.status(), StatusCode::OK);
    assert!(trusting(cert.cert.pem()).get(&url).bearer_auth(&t).send().await.is_err(), "the old certificate is gone");
    // A broken file is refused and the current certificate keeps serving.
    std::fs::write(&cert_path, "not a certificate").unwrap();
    keygate::gateway::reload_tls(kg.tls().unwrap(), &cert_path, &key_path);
    assert_eq!(trusting(renewed.cert.pem()).get(&url).bearer_auth(&t).send().await.unwrap().status(), StatusCode::OK);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let (_, t) = kg.client().create_token(&json!({"name": "ws"})).await;
    let addr = kg.gateway_addr;
    let got = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = format!("GET /upgrade HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {t}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        s.write_all(b"ping over the tunnel").unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < 20 {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            echoed.extend_from_slice(&buf[..n]);
        }
        (head, String::from_utf8_lossy(&echoed).into_owned())
    })
    .await
    .unwrap();
    assert!(got.0.starts_with("HTTP/1.1 101"), "{}", got.0);
    assert_eq!(got.1, "ping over the tunnel");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_quota_counts_survive_a_restart() {
    let up = MockUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts = || Options {
        data_dir: Some(data.clone()),
        routes: vec![route("plain", "/plain", &up.url())],
        ..Options::default()
    };
    let kg = TestKeygate::start_with(opts()).await.unwrap();
    let (id, t) = kg.client().create_token(&json!({"name": "q", "quota": {"requests": 5, "period": "total"}})).await;
    for _ in 0..3 {
        assert_eq!(get(&kg, "/plain/x", Some(&t)).await.0, StatusCode::OK);
    }
    // No explicit flush: a graceful stop writes everything.
    kg.stop().await;

    let kg = TestKeygate::start_with(opts()).await.unwrap();
    let u = kg
        .client()
        .get(&format!("/admin/v1/tokens/{id}/usage?granularity=day&from=2030-01-01T00:00:00Z&to=2031-01-01T00:00:00Z"))
        .await;
    assert_eq!(u.body["total"]["requests"], 3, "{:?}", u.body);
    let codes = futures_codes(&kg, "/plain/x", &t, 3).await;
    assert_eq!(codes, vec![200, 200, 429], "the quota counted before the restart still holds");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let up = MockUpstream::start().await.unwrap();
    let gw = keygate_gateway::config::GatewayConfig { trusted_proxies: vec!["127.0.0.1".into()], ..Default::default() };
    let kg = TestKeygate::start_with(Options {
        routes: vec![route("plain", "/plain", &up.url())],
        gateway: Some(gw),
        ..Options::default()
    })
    .await
    .unwrap();
    let (_, t) = kg.client().create_token(&json!({"name": "office", "ip_allowlist": ["203.0.113.0/24"]})).await;
    let send = |xff: &'static str| {
        let url = format!("{}/plain/x", kg.gateway_url());
        let t = t.clone();
        async move { http().get(url).bearer_auth(t).header("x-forwarded-for", xff).send().await.unwrap() }
    };
    let ok = send("203.0.113.7").await;
    assert_eq!(ok.status(), StatusCode::OK);
    let seen: Value = ok.json().await.unwrap();
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1", "the chain is extended");
    assert_eq!(send("198.51.100.1").await.status(), StatusCode::FORBIDDEN);
    // The rightmost untrusted hop decides, not whatever the client put first.
    assert_eq!(send("203.0.113.7, 198.51.100.1").await.status(), StatusCode::FORBIDDEN);
    kg.stop().await;
}

/// An upstream that answers every request with 200 or 503, as the test switches it.
async fn switchable_upstream(up: std::sync::Arc<std::sync::atomic::AtomicBool>) -> String {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let up = up.clone();
            tokio::spawn(async move {
                if !crate::read_request_head(&mut s).await {
                    return;
                }
                let status = if up.load(std::sync::atomic::Ordering::SeqCst) { "200 OK" } else { "503 Busy" };
                let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn active_health_checks_take_an_upstream_out_and_put_it_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let healthy = MockUpstream::start().await.unwrap();
    let flag = std::sync::Arc::new(AtomicBool::new(false));
    let flaky = switchable_upstream(flag.clone()).await;
    let mut checked = route("checked", "/checked", &flaky);
    checked.upstreams = vec![healthy.url()];
    checked.health_check = Some(keygate_gateway::config::HealthCheckConfig {
        path: "/healthz".into(),
        interval_seconds: 5,
        unhealthy_threshold: 2,
        healthy_threshold: 2,
    });
    let kg = TestKeygate::start_with(Options { routes: vec![checked], ..Options::default() }).await.unwrap();
    let flaky_is_healthy = || {
        let table = kg.gateway().table.load();
        let route = table.routes.routes.iter().find(|r| &*r.id == "checked").unwrap().clone();
        route.upstreams[0].is_healthy()
    };
    // Rounds run only when the interval divides the elapsed seconds.
    keygate_gateway::tasks::health_check_round(kg.gateway(), 3).await;
    assert!(flaky_is_healthy(), "no check at second 3 of a 5-second interval");
    keygate_gateway::tasks::health_check_round(kg.gateway(), 5).await;
    assert!(flaky_is_healthy(), "one failed check is below the threshold of 2");
    keygate_gateway::tasks::health_check_round(kg.gateway(), 10).await;
    assert!(!flaky_is_healthy(), "two failed checks take it out");

    // Out of rotation: every request goes to the healthy upstream.
    let (_, secret) = kg.client().create_token(&json!({"name": "hc"})).await;
    kg.sync_index().await.unwrap();
    for _ in 0..4 {
        let r = http().get(format!("{}/checked/x", kg.gateway_url())).bearer_auth(&secret).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "the healthy upstream answers");
    }

    flag.store(true, Ordering::SeqCst);
    keygate_gateway::tasks::health_check_round(kg.gateway(), 15).await;
    assert!(!flaky_is_healthy(), "one success is below the healthy threshold of 2");
    keygate_gateway::tasks::health_check_round(kg.gateway(), 20).await;
    assert!(flaky_is_healthy(), "two successes put it back");
}

/// One HTTP/1.1 answer read off a raw socket: status code, lowercase header lines, body.
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Reads `n` answers (or fewer, if the connection closes first) from `s`; `head` marks answers
/// to HEAD requests (no body) by position.
fn read_answers(s: &mut TcpStream, n: usize, head: &[usize]) -> (Vec<RawAnswer>, bool) {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 8192];
    while out.len() < n {
        // Parse what is buffered.
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = text.split("\r\n");
            let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse::<usize>().unwrap());
            let no_body = head.contains(&out.len()) || status == 100 || status == 204 || status == 304;
            let body_len = if no_body { 0 } else { len.unwrap_or(0) };
            if buf.len() >= end + 4 + body_len {
                let body = buf[end + 4..end + 4 + body_len].to_vec();
                buf.drain(..end + 4 + body_len);
                if status != 100 {
                    out.push(RawAnswer { status, headers, body });
                } else {
                    out.push(RawAnswer { status, headers, body: Vec::new() });
                }
                continue;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    if !closed {
        // Whether the server closed right after: a short read that sees the end.
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        closed = matches!(s.read(&mut chunk), Ok(0));
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    (out, closed)
}

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_follow_rfc_9112() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let (_, t) = kg.client().create_token(&json!({"name": "h1", "scopes": ["orders:*"]})).await;
    let addr = kg.gateway_addr;
    let auth = format!("Authorization: Bearer {t}\r\n");
    tokio::task::spawn_blocking(move || {
        // Pipelined requests are answered in order on one connection.
        let mut s = connect(addr);
        let two = format!("GET /orders/1 HTTP/1.1\r\nHost: a\r\n{auth}\r\nGET /orders/2?x=1 HTTP/1.1\r\nHost: a\r\n{auth}\r\n");
        s.write_all(two.as_bytes()).unwrap();
        let (answers, closed) = read_answers(&mut s, 2, &[]);
        assert_eq!(answers.len(), 2);
        let uris: Vec<String> = answers
            .iter()
            .map(|a| serde_json::from_slice::<Value>(&a.body).unwrap()["uri"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(uris, ["/orders/1", "/orders/2?x=1"]);
        assert!(!closed, "HTTP/1.1 keeps the connection");

        // A chunked request body is de-chunked, counted and re-framed for the upstream; an
        // absolute-form target is served like its path.
        let body = format!(
            "POST http://a/orders HTTP/1.1\r\nHost: a\r\n{auth}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        );
        s.write_all(body.as_bytes()).unwrap();
        let (a, _) = read_answers(&mut s, 1, &[]);
        assert_eq!(a[0].status, 200);
        assert_eq!(serde_json::from_slice::<Value>(&a[0].body).unwrap()["body_len"], 11);

        // Expect: 100-continue gets its interim answer once the body is wanted.
        let expect = format!("POST /orders HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 4\r\nExpect: 100-continue\r\n\r\n");
        s.write_all(expect.as_bytes()).unwrap();
        let (a, _) = read_answers(&mut s, 1, &[]);
        assert_eq!(a[0].status, 100, "100 Continue before the body is sent");
        s.write_all(b"data").unwrap();
        let (a, _) = read_answers(&mut s, 1, &[]);
        assert_eq!(serde_json::from_slice::<Value>(&a[0].body).unwrap()["body_len"], 4);

        // HEAD: the length of the resource, no body, and the connection goes on.
        let head = format!("HEAD /orders/3 HTTP/1.1\r\nHost: a\r\n{auth}\r\nGET /orders/4 HTTP/1.1\r\nHost: a\r\n{auth}\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let (a, _) = read_answers(&mut s, 2, &[0]);
        assert_eq!((a[0].status, a[1].status), (200, 200));
        assert!(a[0].header("content-length").is_some_and(|l| l != "0"));
        assert!(a[0].body.is_empty());

        // A refusal whose small body arrived whole leaves the connection usable.
        s.write_all(b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /status HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let (a, closed) = read_answers(&mut s, 2, &[]);
        assert_eq!((a[0].status, a[1].status), (401, 200));
        assert!(!closed);

        // HTTP/1.0: closed after the answer, unless it asks to keep the connection.
        let mut s = connect(addr);
        s.write_all(format!("GET /orders/5 HTTP/1.0\r\n{auth}\r\n").as_bytes()).unwrap();
        let (a, closed) = read_answers(&mut s, 1, &[]);
        assert_eq!(a[0].status, 200);
        assert!(closed, "HTTP/1.0 without keep-alive ends the connection");
        let mut s = connect(addr);
        s.write_all(format!("GET /orders/6 HTTP/1.0\r\nConnection: keep-alive\r\n{auth}\r\n").as_bytes()).unwrap();
        let (a, closed) = read_answers(&mut s, 1, &[]);
        assert_eq!(a[0].header("connection"), Some("keep-alive"));
        assert!(!closed);

        // Heads beyond the limits: 431 and the connection ends.
        let many: String = (0..101).map(|i| format!("x-h{i}: v\r\n")).collect();
        let mut s = connect(addr);
        s.write_all(format!("GET /orders/7 HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes()).unwrap();
        let (a, closed) = read_answers(&mut s, 1, &[]);
        assert_eq!(a[0].status, 431);
        assert!(closed);
        let mut s = connect(addr);
        let huge = format!("GET /orders/8 HTTP/1.1\r\nHost: a\r\nx-big: {}\r\n", "a".repeat(70 * 1024));
        let _ = s.write_all(huge.as_bytes());
        let (a, _) = read_answers(&mut s, 1, &[]);
        assert_eq!(a.first().map(|a| a.status), Some(431));

        // Not HTTP/1.x: refused.
        let mut s = connect(addr);
        s.write_all(b"GET /orders/9 HTTP/3.0\r\nHost: a\r\n\r\n").unwrap();
        let (a, closed) = read_answers(&mut s, 1, &[]);
        assert_eq!(a[0].status, 400);
        assert!(closed);
    })
    .await
    .unwrap();
    kg.stop().await;
}

/// A token shows its last use as soon as its usage shows the request: the gateway's uses not yet
/// written (once a minute) are added to what the store holds, on the token and in lists.
#[tokio::test]
async fn last_use_shows_as_soon_as_usage_does() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let c = kg.client();
    let (id, t) = c.create_token(&json!({"name": "fresh"})).await;
    assert!(c.get(&format!("/admin/v1/tokens/{id}")).await.body["last_used_at"].is_null());
    kg.clock.advance_seconds(7);
    assert_eq!(get(&kg, "/plain/x", Some(&t)).await.0, StatusCode::OK);

    let shown = c.get(&format!("/admin/v1/tokens/{id}")).await.body;
    let at = shown["last_used_at"].as_str().expect("the use is shown before any flush").to_owned();
    assert_eq!(shown["last_used_ip"], "127.0.0.1");
    let listed = c.get("/admin/v1/tokens").await.body;
    let row = listed["data"].as_array().unwrap().iter().find(|r| r["id"] == id.as_str()).unwrap().clone();
    assert_eq!(row["last_used_at"].as_str(), Some(at.as_str()), "lists show it too");
    let usage = c.get(&format!("/admin/v1/tokens/{id}/usage")).await.body;
    assert_eq!(usage["total"]["requests"], 1, "as the usage does");

    kg.flush_usage().await;
    assert_eq!(c.get(&format!("/admin/v1/tokens/{id}")).await.body["last_used_at"].as_str(), Some(at.as_str()));
}

/// keygate's own refusals of a gRPC call are gRPC statuses (a gRPC client reads no JSON): HTTP
/// 200, Trailers-Only, `grpc-status` 16/7/8/12/14 and `grpc-message` with the stable code.
#[tokio::test]
async fn grpc_calls_get_grpc_statuses() {
    let up = MockUpstream::start().await.unwrap();
    let kg = kit(&up).await;
    let c = kg.client();
    let (_, reader) = c.create_token(&json!({"name": "r", "scopes": ["orders:read"]})).await;
    kg.sync_index().await.unwrap();
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let call = |path: &str, token: Option<&str>, content_type: &str| {
        let mut req = h2
            .post(format!("{}{path}", kg.gateway_url()))
            .header("content-type", content_type)
            .header("te", "trailers")
            .body(vec![0u8, 0, 0, 0, 0]);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    for (path, token, status, code) in [
        ("/orders/pkg.Service/Get", None, "16", "missing_token"),
        ("/orders/pkg.Service/Get", Some("kg_notatoken"), "16", "malformed_token"),
        ("/orders/pkg.Service/Get", Some(reader.as_str()), "7", "insufficient_scope"),
        ("/nowhere.Service/Get", Some(reader.as_str()), "12", "route_not_found"),
    ] {
        let resp = call(path, token, "application/grpc").await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers().clone();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], status, "{path} {code}");
        assert!(h["grpc-message"].to_str().unwrap().starts_with(&format!("{code}: ")), "{h:?}");
        assert!(resp.bytes().await.unwrap().is_empty(), "Trailers-Only: no body");
    }
    // Limits: RESOURCE_EXHAUSTED, with the limit headers a JSON refusal has.
    let (_, writer) = c.create_token(&json!({"name": "w"})).await;
    kg.sync_index().await.unwrap();
    let mut last = None;
    for _ in 0..3 {
        last = Some(call("/limited/pkg.S/M", Some(&writer), "application/grpc+proto").await.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.headers()["grpc-status"], "8");
    assert!(last.headers().contains_key("retry-after"));
    // An upstream that cannot be reached: UNAVAILABLE.
    let resp = call("/dead/pkg.S/M", Some(&writer), "application/grpc").await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.headers()["grpc-status"].to_str().unwrap()), (200, "14"));
    // Not gRPC (or a look-alike type): JSON as ever.
    let resp = call("/orders/x", None, "application/grpcx").await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("grpc-status").is_none());
}
