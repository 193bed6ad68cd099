//! Issue 12, from outside the process: path spellings against nested routes (with an upstream
//! that records the request lines it receives), tokens hidden in query strings by encoding, the
//! DPoP replay cache under one caller's flood, identity tokens after a scope change, and the
//! bound on exposure reports.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use keygate_testkit::{Options, TestKeygate, route};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that records the request line of every request it receives (as raw bytes) and
/// answers each with `200` and an empty body, keeping the connection open.
struct Recorder {
    addr: std::net::SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Every test request has no body: a head ends the request.
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            buf.drain(..end + 4);
                            seen.lock().push(head.lines().next().unwrap_or_default().to_owned());
                            if sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                                return;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        Self { addr, lines, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock())
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `GET <target>` with `token` on a new connection, exactly as written, and returns the
/// status and the body.
fn raw_get(addr: std::net::SocketAddr, target: &str, token: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn code_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/code").and_then(|c| c.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// Issue 12 #4: with `/orders` (orders:read) and `/orders/admin` (admin:all), no spelling of
/// `/orders/admin/…` is checked as `/orders`: each is refused, or checked as `/orders/admin` and
/// forwarded in its normalized form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_spelling_reaches_a_nested_route_unchecked() {
    let up = Recorder::start().await;
    let mut orders = route("orders", "/orders", &up.url());
    orders.scopes.insert("*".into(), "orders:read".into());
    let mut admin = route("admin", "/orders/admin", &up.url());
    admin.scopes.insert("*".into(), "admin:all".into());
    let mut root = route("root", "/", &up.url());
    root.public = true;
    let kg =
        TestKeygate::start_with(Options { routes: vec![orders, admin, root], ..Options::default() }).await.unwrap();
    let (_, reader) = kg.client().create_token(&json!({"name": "reader", "scopes": ["orders:read"]})).await;
    let (_, boss) = kg.client().create_token(&json!({"name": "boss", "scopes": ["orders:read", "admin:all"]})).await;
    let addr = kg.gateway_addr;

    // Each spelling of /orders/admin/users: the reader never gets through to the upstream.
    let spellings = [
        "/orders/%61dmin/users",
        "/orders/adm%69n/users",
        "/orders/%61%64%6D%69%6E/users",
        "/orders/admin;x/users",
        "/orders/admin;/users",
        "/orders/admin%3Bx/users",
        "/orders/admin%3bx/users",
        "/orders/ADMIN/users",
        "/orders/Admin/users",
        "/orders/%41dmin/users",
        "/orders/%2561dmin/users",
        "/orders/x/..;/admin/users",
        "/orders/..;/orders/admin/users",
        "/orders;x/admin/users",
        "/orders/%2e%2e/orders/admin/users",
        "/orders/admin%2Fusers",
        "/orders/admin%2fusers",
        "/orders/./admin/users",
        "/orders//admin/users",
        "/orders/%252e%252e/orders/admin/users",
        "/orders/admin%253Bx/users",
        "/x/..;/orders/admin/users",
        "/orders/x%2F..%2Fadmin/users",
    ];
    for s in spellings {
        let (status, body) = raw_get(addr, s, &reader);
        assert!(status == 400 || (status == 403 && code_of(&body) == "insufficient_scope"), "{s}: {status} {body}");
    }
    assert_eq!(up.take(), Vec::<String>::new(), "the reader reached the upstream");

    // The same spellings with a token that has the admin scope: refused, or forwarded in the
    // normalized form — never as spelled.
    for s in spellings {
        let (status, body) = raw_get(addr, s, &boss);
        let lines = up.take();
        match status {
            200 => assert_eq!(lines, ["GET /orders/admin/users HTTP/1.1"], "{s}"),
            400 => {
                assert!(lines.is_empty(), "{s}");
                assert!(["ambiguous_path", "bad_request"].contains(&code_of(&body).as_str()), "{s}: {body}");
            }
            other => panic!("{s}: {other} {body}"),
        }
    }

    // The unambiguous spellings are accepted and forwarded normalized.
    for (sent, forwarded) in [
        ("/orders/%61dmin/users", "/orders/admin/users"),
        ("/orders/adm%69n/users", "/orders/admin/users"),
        ("/orders/%2e%2e/orders/admin/users", "/orders/admin/users"),
        ("/orders/admin%2Fusers", "/orders/admin/users"),
    ] {
        let (status, body) = raw_get(addr, sent, &boss);
        assert_eq!(status, 200, "{sent}: {body}");
        assert_eq!(up.take(), [format!("GET {forwarded} HTTP/1.1")], "{sent}");
    }

    // The ambiguous ones are refused with their own code, whoever asks.
    for s in [
        "/orders/admin;x/users",
        "/orders/ADMIN/users",
        "/orders/%2561dmin/users",
        "/orders/x/..;/admin/users",
        "/orders/admin%3Bx/users",
    ] {
        let (status, body) = raw_get(addr, s, &boss);
        assert_eq!((status, code_of(&body).as_str()), (400, "ambiguous_path"), "{s}: {body}");
    }

    // Escapes of what is not unreserved stay escaped, with uppercase hex; unreserved ones are
    // decoded; path parameters that cannot change the route pass as they are.
    for (sent, forwarded) in [
        ("/orders/7", "/orders/7"),
        ("/orders/%7euser", "/orders/~user"),
        ("/orders/a%2bb", "/orders/a%2Bb"),
        ("/orders/caf%c3%a9", "/orders/caf%C3%A9"),
        ("/orders/a%20b", "/orders/a%20b"),
        ("/orders/7;v=2", "/orders/7;v=2"),
        ("/orders/7/items;page=2", "/orders/7/items;page=2"),
        ("/orders/100%25", "/orders/100%25"),
        ("/orders/{id}", "/orders/%7Bid%7D"),
        ("/orders/a|b", "/orders/a%7Cb"),
    ] {
        let (status, body) = raw_get(addr, sent, &reader);
        assert_eq!(status, 200, "{sent}: {body}");
        assert_eq!(up.take(), [format!("GET {forwarded} HTTP/1.1")], "{sent}");
    }

    // Refused outright: NUL, backslashes, malformed escapes, escapes that are not UTF-8
    // (overlong forms of . and / included), raw bytes above ASCII.
    for bad in [
        "/orders/a%00b",
        "/orders/a%5Cb",
        "/orders/a%5cb",
        "/orders/%zz",
        "/orders/%C0%AE%C0%AE/admin",
        "/orders/%C0%AF",
        "/orders/%E0%80%AE",
        "/orders/%ED%A0%80",
        "/orders/%80",
        "/orders/%C3",
        "/orders/%C3%28",
    ] {
        let (status, body) = raw_get(addr, bad, &boss);
        assert_eq!((status, code_of(&body).as_str()), (400, "bad_request"), "{bad}: {body}");
    }
    assert!(up.take().is_empty());
    kg.stop().await;
}

/// Issue 12 #4: a token in the query string is found however it is encoded, in a name or a value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_in_query_strings_are_found_however_encoded() {
    let up = Recorder::start().await;
    let mut open = route("open", "/open", &up.url());
    open.public = true;
    let kg = TestKeygate::start_with(Options { routes: vec![open], ..Options::default() }).await.unwrap();
    let (_, t) = kg.client().create_token(&json!({"name": "leaky"})).await;
    let pct = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
    let (prefix, body) = t.split_once('_').unwrap();
    let cases = [
        format!("a={t}"),
        t.clone(),
        format!("{t}=1"),
        format!("a=1&{t}"),
        format!("a={prefix}%5F{body}"),
        format!("a={prefix}%5f{body}"),
        format!("a={}", pct(&t)),
        format!("{}=x", pct(&t)),
        format!("a=Bearer+{t}"),
        format!("a=Bearer%20{t}"),
        format!("a=+{t}+"),
        format!("auth=%7B%22token%22%3A%22{t}%22%7D"),
        format!("a={}{}", pct(&t[..5]), &t[5..]),
    ];
    for q in &cases {
        let (status, body) = raw_get(kg.gateway_addr, &format!("/open?{q}"), "none");
        assert_eq!((status, code_of(&body).as_str()), (400, "token_in_query"), "?{q}: {body}");
    }
    assert!(up.take().is_empty(), "a query with a token reached the upstream");
    // Not tokens: a broken checksum, another prefix, a token cut short.
    let mut broken = t.clone();
    broken.pop();
    broken.push(if t.ends_with('a') { 'b' } else { 'a' });
    for q in [format!("a={broken}"), format!("a=xx_{body}"), format!("a={}", &t[..40]), "a=%zz&b=%".to_owned()] {
        let (status, body) = raw_get(kg.gateway_addr, &format!("/open?{q}"), "none");
        assert_eq!(status, 200, "?{q}: {body}");
    }
    kg.stop().await;
}

async fn metric(kg: &TestKeygate, name: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Issue 12 (low): made-up well-formed tokens in query strings cost bounded work — beyond a
/// small rate their reports are dropped and counted — and never crowd out the report of a token
/// that can authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposure_reports_are_bounded_and_live_tokens_come_first() {
    use keygate_core::secret::OsRandom;
    use keygate_core::token_format::{TokenPrefix, mint};
    let up = Recorder::start().await;
    let mut open = route("open", "/open", &up.url());
    open.public = true;
    let kg = TestKeygate::start_with(Options { routes: vec![open], ..Options::default() }).await.unwrap();
    let addr = kg.gateway_addr;
    // The manual clock does not move: no more made-up tokens are taken than the burst allows.
    let fakes: Vec<String> =
        (0..200).map(|_| mint(&TokenPrefix::default(), &OsRandom).unwrap().secret.expose().to_owned()).collect();
    for f in &fakes {
        let (status, body) = raw_get(addr, &format!("/open?t={f}"), "none");
        assert_eq!((status, code_of(&body).as_str()), (400, "token_in_query"), "{body}");
    }
    let dropped = metric(&kg, "keygate_gateway_exposure_reports_dropped_total").await;
    assert!((150..=200).contains(&dropped), "{dropped} of 200 made-up tokens dropped");
    // The ones taken are remembered: sending them again queues nothing and drops nothing.
    for f in fakes.iter().take(5) {
        raw_get(addr, &format!("/open?t={f}"), "none");
    }
    let again = metric(&kg, "keygate_gateway_exposure_reports_dropped_total").await;
    assert!(again <= dropped + 5, "{again}");

    // A live token after the flood is marked exposed all the same.
    let (id, live) = kg.client().create_token(&json!({"name": "live"})).await;
    let (status, _) = raw_get(addr, &format!("/open?t={live}"), "none");
    assert_eq!(status, 400);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t = kg.client().get(&format!("/admin/v1/tokens/{id}")).await;
        if t.body["exposed_at"].is_string() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the live token was never marked exposed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(metric(&kg, "keygate_gateway_exposure_reports_dropped_total").await, again);
    kg.stop().await;
}

/// A DPoP proof (RFC 9449 §4.2) by `key` for `GET url`, with the token's hash.
fn dpop_proof(key: &keygate_core::jose::SigningKey, url: &str, token: &str, jti: &str, iat: i64) -> String {
    let jwk: serde_json::Value = serde_json::from_str(&key.public_jwk().to_json()).unwrap();
    let claims = json!({"jti": jti, "htm": "GET", "htu": url, "iat": iat, "ath": keygate_core::dpop::ath(token)});
    key.sign_claims(&json!({"typ": "dpop+jwt", "jwk": jwk}), &claims).unwrap()
}

/// Issue 12 #6: one token holder flooding the gateway with DPoP proofs can neither lock other
/// DPoP clients out nor make the gateway forget their proofs (so a replay of theirs is still
/// refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_holder_cannot_lock_out_dpop_clients() {
    use keygate_core::jose::{Alg, SigningKey};
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    // Room for about 30 proofs in all, 10 per caller.
    let gw = keygate_gateway::config::GatewayConfig {
        dpop_replay_max_bytes: 30 * keygate_core::dpop::ReplayCache::ENTRY_BYTES
            + 8 * keygate_core::dpop::ReplayCache::CALLER_BYTES,
        dpop_replay_max_per_caller: 10,
        ..Default::default()
    };
    let kg = TestKeygate::start_with(Options {
        routes: vec![route("orders", "/orders", &up.url())],
        gateway: Some(gw),
        ..Options::default()
    })
    .await
    .unwrap();
    let url = format!("{}/orders/1", kg.gateway_url());
    let now = keygate_core::Clock::now(&kg.clock).as_millis() / 1000;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let call = |token: String, proof: String| {
        let req = http.get(&url).header("authorization", format!("DPoP {token}")).header("dpop", proof);
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap_or_default())
        }
    };

    // A client whose API key is bound to its key.
    let key = SigningKey::generate(Alg::EdDSA, "").unwrap();
    let (_, victim) =
        kg.client().create_token(&json!({"name": "victim", "dpop_jkt": key.public_jwk().thumbprint()})).await;
    let first = dpop_proof(&key, &url, &victim, "v-1", now);
    assert_eq!(call(victim.clone(), first.clone()).await.0, 200);

    // Two holders of unbound keys send fresh proofs, far more than the whole memory holds.
    let mut attackers = Vec::new();
    for i in 0..2 {
        attackers.push(kg.client().create_token(&json!({"name": format!("flood-{i}")})).await.1);
    }
    let junk = SigningKey::generate(Alg::EdDSA, "").unwrap();
    for i in 0..120 {
        let t = attackers[i % 2].clone();
        let (status, body) = call(t.clone(), dpop_proof(&junk, &url, &t, &format!("a-{i}"), now)).await;
        assert_eq!(status, 200, "{body}");
    }

    // The bound client still gets in, and its first proof is still remembered.
    assert_eq!(call(victim.clone(), dpop_proof(&key, &url, &victim, "v-2", now)).await.0, 200);
    let (status, body) = call(victim.clone(), first).await;
    assert_eq!((status, code_of(&body).as_str()), (401, "invalid_dpop_proof"), "{body}");
    assert!(body.contains("already used"), "{body}");
    // A flooder's own replays are refused while it keeps within its share.
    let t = attackers[0].clone();
    let p = dpop_proof(&junk, &url, &t, "again", now);
    assert_eq!(call(t.clone(), p.clone()).await.0, 200);
    assert_eq!(call(t, p).await.0, 401);
    kg.stop().await;
}

/// The claims of a compact JWS, unverified (the upstream's view is what is checked here).
fn jwt_claims(jwt: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// Issue 12 (low): a scope change shows in the very next identity token an upstream receives,
/// and each route's identity token names that route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_tokens_follow_scope_changes_at_once() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let mut a = route("phantom-a", "/a", &up.url());
    a.identity_token = true;
    let mut b = route("phantom-b", "/b", &up.url());
    b.identity_token = true;
    let kg = TestKeygate::start_with(Options { routes: vec![a, b], ..Options::default() }).await.unwrap();
    let (id, t) = kg.client().create_token(&json!({"name": "id", "scopes": ["orders:read"]})).await;
    let http = reqwest::Client::new();
    let seen = |path: &'static str| {
        let req = http.get(format!("{}{path}", kg.gateway_url())).bearer_auth(&t);
        async move {
            let echo: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            let authz = echo["headers"]["authorization"].as_str().unwrap().to_owned();
            jwt_claims(authz.strip_prefix("Bearer ").unwrap())
        }
    };
    let first = seen("/a").await;
    assert_eq!(first["scope"], "orders:read");
    assert_eq!(first["aud"], "keygate-route:phantom-a");
    assert_eq!(seen("/b").await["aud"], "keygate-route:phantom-b");
    let changed = kg.client().patch(&format!("/admin/v1/tokens/{id}"), &json!({"scopes": ["orders:write"]})).await;
    assert_eq!(changed.status.as_u16(), 200, "{:?}", changed.body);
    let after = seen("/a").await;
    assert_eq!(after["scope"], "orders:write", "the upstream got the old scopes after a change");
    // Unchanged, the token is reused while it has a while to live.
    assert_eq!(seen("/a").await["jti"], after["jti"]);
    kg.stop().await;
}

/// Issue 17: denied addresses are refused before any token work — on one route (`deny`), and on
/// every route (`[gateway] deny`) — with a stable code and a metric.
#[tokio::test]
async fn denied_addresses_are_refused_before_any_token_work() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let mut closed = route("closed", "/closed", &up.url());
    closed.deny = vec!["127.0.0.0/8".into(), "2001:db8::/32".into()];
    let kg = TestKeygate::start_with(Options {
        routes: vec![route("orders", "/orders", &up.url()), closed],
        ..Options::default()
    })
    .await
    .unwrap();
    let (_, token) = kg.client().create_token(&json!({"name": "t"})).await;
    kg.sync_index().await.unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut req = http.get(format!("{}{path}", kg.gateway_url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let (status, body) = get("/closed/1", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("address_denied")), "no token asked for: {body}");
    let (status, _) = get("/closed/1", Some(&token)).await;
    assert_eq!(status, 403, "a good token does not open it");
    assert_eq!(get("/orders/1", Some(&token)).await.0, 200, "other routes serve");
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keygate_gateway_refusals_total{reason=\"address_denied\"} 2"), "{metrics}");
    // Through the API: validated as the file is.
    let bad = json!({"id": "x", "path": "/x", "upstream": up.url(), "deny": ["not-an-address"]});
    let r = kg.client().post("/admin/v1/routes", &bad).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_route"));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("not-an-address"), "{:?}", r.body);
    let listed = kg.client().get("/admin/v1/routes/closed").await;
    assert_eq!(listed.body["deny"], json!(["127.0.0.0/8", "2001:db8::/32"]));
    kg.stop().await;

    // [gateway] deny: every route, and paths no route serves.
    let gw = keygate_gateway::config::GatewayConfig { deny: vec!["127.0.0.1".into()], ..Default::default() };
    let kg = TestKeygate::start_with(Options {
        routes: vec![route("orders", "/orders", &up.url())],
        gateway: Some(gw),
        ..Options::default()
    })
    .await
    .unwrap();
    for path in ["/orders/1", "/nowhere"] {
        let r = reqwest::get(format!("{}{path}", kg.gateway_url())).await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
    }
    kg.stop().await;
}
