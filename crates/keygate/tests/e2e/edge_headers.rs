//! What reaches an upstream, seen from outside (issue 12: #3, #5, #9, the low items on headers
//! and framing, DPoP behind a TLS-terminating proxy): raw HTTP/1.1 sockets and an HTTP/2 client
//! in front, an upstream that records every byte it receives behind.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use keygate_core::jose::{Alg, SigningKey};
use keygate_testkit::{Options, RecordingUpstream, StatusCode, TestKeygate, route};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDP: &str = "https://idp.example";

/// A keygate in front of `up`: `/pub` (public), `/keyed` (`GET` needs `orders:read`; API keys
/// in `Authorization` or `X-API-Key`, and JWTs of the trusted issuer [`IDP`]), and, with
/// `trusted`, 127.0.0.1 as a trusted proxy.
async fn kit(up: &RecordingUpstream, trusted: bool, access_log: bool) -> (TestKeygate, SigningKey) {
    let mut public = route("pub", "/pub", &up.url());
    public.public = true;
    let mut keyed = route("keyed", "/keyed", &up.url());
    keyed.scopes.insert("GET".into(), "orders:read".into());
    let gw = keygate_gateway::config::GatewayConfig {
        api_key_header: Some("X-API-Key".into()),
        trusted_proxies: if trusted { vec!["127.0.0.1".into()] } else { Vec::new() },
        ..Default::default()
    };
    let oauth = keygate::config::OAuthConfig {
        trusted_issuers: vec![keygate::config::TrustedIssuerConfig {
            issuer: IDP.into(),
            audience: "orders-api".into(),
            // Never fetched successfully: the test sets the keys itself, so no waiting.
            jwks_url: "http://127.0.0.1:1/jwks".into(),
            workspace: None,
        }],
        ..Default::default()
    };
    let kg = TestKeygate::start_with(Options {
        routes: vec![public, keyed],
        gateway: Some(gw),
        oauth: Some(oauth),
        access_log,
        ..Options::default()
    })
    .await
    .unwrap();
    let idp_key = SigningKey::generate(Alg::ES256, "idp-1").unwrap();
    let verifier = kg.gateway().jwt.as_ref().unwrap();
    let issuer = verifier.issuers().iter().find(|i| i.issuer == IDP).unwrap();
    issuer.set_keys([("idp-1".to_owned(), idp_key.public_jwk().clone())]);
    (kg, idp_key)
}

fn now_s(kg: &TestKeygate) -> i64 {
    use keygate_core::Clock as _;
    kg.clock.now().as_millis() / 1000
}

/// A token of the trusted issuer with `extra` claims over sane defaults.
fn idp_jwt(kg: &TestKeygate, key: &SigningKey, extra: Value) -> String {
    let now = now_s(kg);
    let mut claims = json!({"iss": IDP, "sub": "user-7", "aud": "orders-api", "exp": now + 300, "iat": now,
        "jti": "jwt-1", "azp": "web-app", "scope": "orders:read"});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    key.sign_claims(&json!({"typ": "JWT"}), &claims).unwrap()
}

/// Sends `req` on a new connection and reads until the gateway closes it (or 5 s pass).
async fn h1(addr: std::net::SocketAddr, req: &[u8]) -> String {
    h1_pieces(addr, &[req]).await
}

/// The same, written in pieces.
async fn h1_pieces(addr: std::net::SocketAddr, pieces: &[&[u8]]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for p in pieces {
        if s.write_all(p).await.is_err() {
            break;
        }
        let _ = s.flush().await;
    }
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn code_of(answer: &str) -> String {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn h2() -> reqwest::Client {
    reqwest::Client::builder().http2_prior_knowledge().build().unwrap()
}

/// The last request the upstream read, after checking that nothing else came.
fn only_request(up: &RecordingUpstream) -> keygate_testkit::recording::Recorded {
    let all = up.requests();
    assert_eq!(all.len(), 1, "exactly one request reached the upstream: {all:#?}");
    up.clear();
    all.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identity_headers_never_reach_upstreams() {
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, idp) = kit(&up, false, false).await;
    let (_, key) = kg.client().create_token(&json!({"name": "k", "scopes": ["orders:read"]})).await;
    let jwt = idp_jwt(&kg, &idp, json!({}));
    // Every X-Keygate-* name a client might send, keygate's own and names it does not use (yet),
    // and near-spellings an upstream framework folds into the same name.
    let forged = [
        "X-Keygate-Subject",
        "X-Keygate-Token-Id",
        "x-keygate-app-id",
        "X-KEYGATE-SCOPES",
        "X-Keygate-Workspace",
        "X-Keygate-Anything-New",
        "X_Keygate_Subject",
        "X-Keygate--Subject",
        "x-keygate_scopes",
    ];
    let forged_fields: String = forged.iter().enumerate().map(|(i, n)| format!("{n}: forged-{i}\r\n")).collect();
    for (what, path, auth) in [
        ("public", "/pub/x", String::new()),
        ("API key", "/keyed/x", format!("Authorization: Bearer {key}\r\n")),
        ("API key header", "/keyed/x", format!("X-API-Key: {key}\r\n")),
        ("JWT", "/keyed/x", format!("Authorization: Bearer {jwt}\r\n")),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: gw\r\n{forged_fields}{auth}Connection: close\r\n\r\n");
        let answer = h1(kg.gateway_addr, req.as_bytes()).await;
        assert_eq!(status_of(&answer), 200, "{what}: {answer}");
        let seen = only_request(&up);
        assert!(!seen.head_text().contains("forged"), "HTTP/1.1, {what}: a forged field passed:\n{}", seen.head_text());
        if what == "JWT" {
            assert_eq!(seen.headers("x-keygate-subject"), vec!["user-7"], "keygate's own, once");
        }
    }
    // HTTP/2: the same, through hyper.
    for (what, path, auth) in [
        ("public", "/pub/x", None),
        ("API key", "/keyed/x", Some(format!("Bearer {key}"))),
        ("JWT", "/keyed/x", Some(format!("Bearer {jwt}"))),
    ] {
        let mut req = h2().get(format!("{}{path}", kg.gateway_url()));
        for (i, n) in forged.iter().enumerate() {
            req = req.header(n.to_ascii_lowercase(), format!("forged-{i}"));
        }
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK, "HTTP/2, {what}");
        let seen = only_request(&up);
        assert!(!seen.head_text().contains("forged"), "HTTP/2, {what}: a forged field passed:\n{}", seen.head_text());
        if what == "JWT" {
            assert_eq!(seen.headers("x-keygate-subject"), vec!["user-7"]);
        }
    }
    kg.stop().await;
}

/// Collects every log line of this process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_claims_with_control_characters_never_reach_a_head_or_the_log() {
    let log = Captured::default();
    // The plain-text format: a raw line break in a value would split its line.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, idp) = kit(&up, false, true).await;
    // A whole second request behind a CRLF, and lone control characters.
    let smuggle = "x\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: up\r\nx-pad: ";
    for claim in ["sub", "jti", "azp", "client_id"] {
        for value in [smuggle, "a\nkeygate::access: forged line", "a\u{1}b", "a\u{7f}b", "a\u{85}b", "a\rb"] {
            let jwt = idp_jwt(&kg, &idp, json!({ claim: value }));
            // Over a pooled upstream connection: first a good request, then the forged one.
            let good = format!(
                "GET /keyed/1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
                idp_jwt(&kg, &idp, json!({}))
            );
            let bad = format!(
                "GET /keyed/2 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {jwt}\r\nConnection: close\r\n\r\n"
            );
            let answer = h1(kg.gateway_addr, format!("{good}{bad}").as_bytes()).await;
            let second = answer.rsplit("HTTP/1.1 ").next().map(|a| format!("HTTP/1.1 {a}")).unwrap_or_default();
            assert_eq!(status_of(&second), 401, "{claim}={value:?}: {answer}");
            assert_eq!(code_of(&second), "invalid_identity_claim", "{claim}={value:?}");
        }
    }
    let requests = up.requests();
    assert!(requests.iter().all(|r| r.request_line() == "GET /keyed/1 HTTP/1.1"), "{requests:#?}");
    assert!(!up.raw().iter().any(|r| String::from_utf8_lossy(r).contains("smuggled")));
    // Text beyond ASCII is a valid field value (obs-text) and passes as it is.
    let jwt = idp_jwt(&kg, &idp, json!({"sub": "Jürgen"}));
    let answer = h1(
        kg.gateway_addr,
        format!("GET /keyed/3 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {jwt}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let last = up.requests().pop().unwrap();
    assert!(last.head.windows("Jürgen".len()).any(|w| w == "Jürgen".as_bytes()));
    kg.stop().await;
    let text = String::from_utf8_lossy(&log.0.lock()).into_owned();
    assert!(text.contains("keygate::access"), "the access log was written: {text}");
    for line in text.lines() {
        assert!(
            !line.starts_with("GET /smuggled") && !line.starts_with("keygate::access: forged"),
            "a split log line: {line:?}"
        );
    }
    assert!(!text.contains("smuggled") && !text.contains("forged line"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_read_with_ports_and_never_past_an_unreadable_hop() {
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, _) = kit(&up, true, false).await;
    let (_, key) = kg
        .client()
        .create_token(&json!({"name": "office", "scopes": ["orders:read"], "ip_allowlist": ["203.0.113.0/24", "2001:db8:7::/48"]}))
        .await;
    let send = |xff: &'static str| {
        let req = format!(
            "GET /keyed/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
        );
        let addr = kg.gateway_addr;
        async move {
            let a = h1(addr, req.as_bytes()).await;
            match status_of(&a) {
                403 => {
                    assert_eq!(code_of(&a), "ip_not_allowed", "{xff}");
                    403
                }
                s => s,
            }
        }
    };
    // The proxy wrote the client's address with its port: read, not skipped.
    assert_eq!(send("198.51.100.1, 203.0.113.7:5555").await, 200);
    assert_eq!(send("198.51.100.1, [2001:db8:7::1]:443").await, 200);
    assert_eq!(send("198.51.100.1, [2001:db8:7::1]").await, 200);
    assert_eq!(send("198.51.100.1, 2001:db8:7::1").await, 200);
    assert_eq!(send("203.0.113.7, 198.51.100.1:4444").await, 403, "a spoofed address behind a port form");
    assert_eq!(send("203.0.113.7, [2001:db8:9::1]:443").await, 403);
    // An entry that cannot be read ends the walk: never skipped to land on one the client wrote.
    for garbage in ["unknown", "_hidden", "203.0.113.7:x", "[2001:db8:7::1", "1.2.3.4.5", ""] {
        let xff: &'static str = Box::leak(format!("203.0.113.7, {garbage}").into_boxed_str());
        assert_eq!(send(xff).await, 403, "{xff:?}");
    }
    // The upstream is told the address keygate decided.
    up.clear();
    assert_eq!(send("198.51.100.1, 203.0.113.7:5555").await, 200);
    let seen = only_request(&up);
    assert_eq!(seen.headers("x-real-ip"), vec!["203.0.113.7"]);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_and_override_headers_of_clients_are_stripped_or_rewritten() {
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, _) = kit(&up, false, false).await;
    let fields = "Forwarded: for=6.6.6.6;proto=https;host=evil\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Port: 6666\r\n\
        X-Forwarded-Prefix: /evil\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
        X-Forwarded-For: 6.6.6.6\r\nX-Original-URL: /admin/evil\r\nX-Rewrite-URL: /admin/evil\r\n\
        X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n\
        X_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nx-forwarded_host: evil.example\r\nX-Original_URL: /admin/evil\r\n";
    let req = format!("GET /pub/x HTTP/1.1\r\nHost: gw.example\r\n{fields}Connection: close\r\n\r\n");
    assert_eq!(status_of(&h1(kg.gateway_addr, req.as_bytes()).await), 200);
    let seen = only_request(&up);
    let head = seen.head_text();
    for bad in ["6.6.6.6", "6666", "evil", "DELETE", "https"] {
        assert!(!head.contains(bad), "{bad} reached the upstream:\n{head}");
    }
    assert_eq!(seen.headers("x-real-ip"), vec!["127.0.0.1"], "rewritten from what keygate knows");
    assert_eq!(seen.headers("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen.headers("x-forwarded-proto"), vec!["http"]);
    assert_eq!(seen.headers("x-forwarded-host"), vec!["gw.example"]);
    assert!(seen.headers("forwarded").is_empty());
    // HTTP/2 the same.
    let mut req = h2().get(format!("{}/pub/x", kg.gateway_url()));
    for l in fields.split("\r\n").filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(": ").unwrap();
        req = req.header(k.to_ascii_lowercase(), v);
    }
    assert_eq!(req.send().await.unwrap().status(), StatusCode::OK);
    let head = only_request(&up).head_text();
    for bad in ["6.6.6.6", "6666", "evil", "DELETE", "https"] {
        assert!(!head.contains(bad), "HTTP/2: {bad} reached the upstream:\n{head}");
    }
    kg.stop().await;

    // From a trusted proxy, its Forwarded is kept and extended (RFC 7239 §4), and other
    // X-Forwarded-* fields it asserts pass.
    let (kg, _) = kit(&up, true, false).await;
    let req = "GET /pub/x HTTP/1.1\r\nHost: gw\r\nForwarded: for=203.0.113.7;proto=https\r\nX-Forwarded-Prefix: /shop\r\n\
        X-Real-IP: 6.6.6.6\r\nX-HTTP-Method-Override: DELETE\r\nConnection: close\r\n\r\n";
    assert_eq!(status_of(&h1(kg.gateway_addr, req.as_bytes()).await), 200);
    let seen = only_request(&up);
    assert_eq!(seen.headers("forwarded"), vec!["for=203.0.113.7;proto=https, for=127.0.0.1"]);
    assert_eq!(seen.headers("x-forwarded-prefix"), vec!["/shop"]);
    assert_eq!(seen.headers("x-real-ip"), vec!["127.0.0.1"], "never the client's own");
    assert!(seen.headers("x-http-method-override").is_empty());
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_can_name_any_number_of_fields() {
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, _) = kit(&up, false, false).await;
    let names: Vec<String> = (0..40).map(|i| format!("x-hop-{i}")).collect();
    let fields: String = names.iter().map(|n| format!("{n}: secret\r\n")).collect();
    let req = format!(
        "GET /pub/x HTTP/1.1\r\nHost: gw\r\nConnection: close, {}\r\nConnection: {}\r\n{fields}X-Kept: yes\r\n\r\n",
        names[..20].join(", "),
        names[20..].join(",")
    );
    assert_eq!(status_of(&h1(kg.gateway_addr, req.as_bytes()).await), 200);
    let seen = only_request(&up);
    assert!(!seen.head_text().contains("secret"), "{}", seen.head_text());
    assert_eq!(seen.headers("x-kept"), vec!["yes"]);
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_near_spellings_lengths_and_trailers_are_refused() {
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, _) = kit(&up, false, false).await;
    let (_, key) = kg.client().create_token(&json!({"name": "k", "scopes": ["orders:read"]})).await;
    let post = "POST /pub/x HTTP/1.1\r\nHost: gw\r\n";
    for (what, req) in [
        ("a length past u64", format!("{post}Content-Length: 18446744073709551616\r\n\r\nabc")),
        ("a length far past u64", format!("{post}Content-Length: 99999999999999999999999\r\n\r\nabc")),
        ("Content_Length", format!("{post}Content_Length: 3\r\n\r\nabc")),
        ("Content--Length", format!("{post}Content--Length: 3\r\n\r\nabc")),
        ("Transfer_Encoding", format!("{post}Transfer_Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc")),
        ("TRANSFER__ENCODING", format!("{post}TRANSFER__ENCODING: chunked\r\n\r\n0\r\n\r\n")),
        ("Content-Length_", format!("{post}Content-Length_: 3\r\n\r\nabc")),
        (
            "a bare LF in a trailer",
            format!(
                "{post}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\nGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"
            ),
        ),
        ("a control byte in a trailer", format!("{post}Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\x01b\r\n\r\n")),
        ("a trailer without a colon", format!("{post}Transfer-Encoding: chunked\r\n\r\n0\r\nX-T\r\n\r\n")),
        ("a folded trailer", format!("{post}Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\r\n b\r\n\r\n")),
        ("a trailer name with a space", format!("{post}Transfer-Encoding: chunked\r\n\r\n0\r\nX T: a\r\n\r\n")),
        ("too many trailers", format!("{post}Transfer-Encoding: chunked\r\n\r\n0\r\n{}\r\n", "X-T: a\r\n".repeat(200))),
        (
            "a control byte in a chunk extension",
            format!("{post}Transfer-Encoding: chunked\r\n\r\n3;a=\x01\r\nabc\r\n0\r\n\r\n"),
        ),
    ] {
        let answer = h1(kg.gateway_addr, req.as_bytes()).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer}");
        assert!(!answer.contains("HTTP/1.1 200"), "{what}: {answer}");
    }
    assert!(up.requests().iter().all(|r| r.body.is_empty() || r.body == b"hello"), "{:#?}", up.requests());
    assert!(!up.raw().iter().any(|r| String::from_utf8_lossy(r).contains("smuggled")));
    up.clear();
    // A well-formed trailer section passes (trailers are not forwarded).
    let ok = format!(
        "{post}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-T: a\r\nX-U: b c\r\n\r\n"
    );
    assert_eq!(status_of(&h1(kg.gateway_addr, ok.as_bytes()).await), 200);
    assert_eq!(only_request(&up).body, b"hello");
    // HTTP/2: a near-spelling of a framing field is refused there too.
    let resp = h2()
        .post(format!("{}/pub/x", kg.gateway_url()))
        .header("content_length", "3")
        .body("abc")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Near-spellings of fields that are stripped are stripped like them.
    let req = format!(
        "GET /keyed/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nX_API_Key: {key}\r\nX-Api_Key: {key}\r\n\
         Proxy_Authorization: Basic c2VjcmV0\r\nKeep_Alive: timeout=5\r\nProxy__Connection: secret-pc\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(status_of(&h1(kg.gateway_addr, req.as_bytes()).await), 200);
    let head = only_request(&up).head_text();
    for bad in [&key[10..], "c2VjcmV0", "timeout=5", "secret-pc"] {
        assert!(!head.contains(bad), "{bad} reached the upstream:\n{head}");
    }
    assert!(up.requests().is_empty());
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_size_limit_is_exact_however_the_bytes_arrive() {
    let up = RecordingUpstream::start().await.unwrap();
    let (kg, _) = kit(&up, false, false).await;
    let head_of = |len: usize| {
        let start = "GET /pub/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Pad: ";
        let pad = len - start.len() - 4;
        format!("{start}{}\r\n\r\n", "p".repeat(pad)).into_bytes()
    };
    for (len, want) in [(64 * 1024, 200), (64 * 1024 + 1, 431), (90 * 1024, 431)] {
        let req = head_of(len);
        assert_eq!(req.len(), len);
        let whole = h1(kg.gateway_addr, &req).await;
        assert_eq!(status_of(&whole), want, "{len} bytes in one write");
        let pieces: Vec<&[u8]> = req.chunks(1000).collect();
        let trickled = h1_pieces(kg.gateway_addr, &pieces).await;
        assert_eq!(status_of(&trickled), want, "{len} bytes in pieces of 1000");
        let halves: Vec<&[u8]> = req.chunks(len / 2 + 7).collect();
        assert_eq!(status_of(&h1_pieces(kg.gateway_addr, &halves).await), want, "{len} bytes in two writes");
    }
    kg.stop().await;
}

/// A DPoP proof (RFC 9449 §4.2) by `key`.
fn proof(key: &SigningKey, method: &str, url: &str, token: &str, jti: &str, iat: i64) -> String {
    let jwk: Value = serde_json::from_str(&key.public_jwk().to_json()).unwrap();
    let claims = json!({"jti": jti, "htm": method, "htu": url, "iat": iat, "ath": keygate_core::dpop::ath(token)});
    key.sign_claims(&json!({"typ": "dpop+jwt", "jwk": jwk}), &claims).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_proofs_name_the_url_a_trusted_tls_proxy_was_asked_for() {
    let up = RecordingUpstream::start().await.unwrap();
    let dpop_key = SigningKey::generate(Alg::ES256, "").unwrap();
    let jkt = dpop_key.public_jwk().thumbprint();
    for trusted in [true, false] {
        let (kg, _) = kit(&up, trusted, false).await;
        let (_, key) =
            kg.client().create_token(&json!({"name": "bound", "scopes": ["orders:read"], "dpop_jkt": jkt})).await;
        let now = now_s(&kg);
        let send = |jti: &str, proto: &str, host: &str| {
            let p = proof(&dpop_key, "GET", "https://api.example/keyed/1", &key, jti, now);
            let req = format!(
                "GET /keyed/1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: DPoP {key}\r\nDPoP: {p}\r\n\
                 X-Forwarded-Proto: {proto}\r\nX-Forwarded-Host: {host}\r\nConnection: close\r\n\r\n"
            );
            let addr = kg.gateway_addr;
            async move { h1(addr, req.as_bytes()).await }
        };
        let answer = send("p-1", "https", "api.example").await;
        if trusted {
            assert_eq!(status_of(&answer), 200, "{answer}");
            let seen = only_request(&up);
            assert_eq!(seen.headers("x-forwarded-proto"), vec!["https"]);
            assert_eq!(seen.headers("x-forwarded-host"), vec!["api.example"]);
            // Or, without them, from the element the proxy added to Forwarded (RFC 7239).
            let p = proof(&dpop_key, "GET", "https://api.example/keyed/1", &key, "f-1", now);
            let req = format!(
                "GET /keyed/1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: DPoP {key}\r\nDPoP: {p}\r\n\
                 Forwarded: for=198.51.100.1;proto=http, for=203.0.113.7;proto=https;host=\"api.example\"\r\n\
                 Connection: close\r\n\r\n"
            );
            let a = h1(kg.gateway_addr, req.as_bytes()).await;
            assert_eq!(status_of(&a), 200, "{a}");
            let seen = only_request(&up);
            assert_eq!(seen.headers("x-forwarded-proto"), vec!["https"]);
            assert_eq!(seen.headers("x-forwarded-host"), vec!["api.example"]);
            // The proxy's values are checked: ones that are not a scheme or a host are not used.
            for (jti, proto, host) in [
                ("p-2", "gopher", "api.example"),
                ("p-3", "https, http", "api.example"),
                ("p-4", "https", "api.example/x"),
            ] {
                let a = send(jti, proto, host).await;
                assert_eq!((status_of(&a), code_of(&a).as_str()), (401, "dpop_url_mismatch"), "{proto} {host}");
            }
        } else {
            // From anyone else, the forwarded scheme and host are not believed.
            assert_eq!((status_of(&answer), code_of(&answer).as_str()), (401, "dpop_url_mismatch"), "{answer}");
        }
        up.clear();
        kg.stop().await;
    }
}
