//! The per-route response cache end to end: a keygate with a cached route in front of an origin
//! that counts the requests it sees and answers with the caching directives its path names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keygate_gateway::config::{CacheConfig, CacheKeyBy};
use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use serde_json::json;

/// An origin: `/…/public/…` answers `public, max-age=60` and `ETag: "v1"`, `/…/private/…` `private, max-age=60`,
/// `/…/vary/…` `public, max-age=60` with `Vary: Accept-Language`, `/…/cookie/…` the same as
/// public with a `Set-Cookie`, anything else no directive. The body names the method, the
/// request's number and its `Accept-Language`.
struct Origin {
    addr: SocketAddr,
    seen: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    async fn start() -> Self {
        use axum::extract::Request;
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let app = axum::Router::new().fallback(axum::routing::any(move |req: Request| {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let path = req.uri().path().to_owned();
                let lang = req.headers().get("accept-language").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                let mut b = axum::http::Response::builder().header("content-type", "text/plain");
                if path.contains("/public/") || path.contains("/vary/") || path.contains("/cookie/") {
                    b = b.header("cache-control", "public, max-age=60");
                }
                if path.contains("/public/") {
                    b = b.header("etag", "\"v1\"");
                }
                if path.contains("/private/") {
                    b = b.header("cache-control", "private, max-age=60");
                }
                if path.contains("/vary/") {
                    b = b.header("vary", "Accept-Language");
                }
                if path.contains("/cookie/") {
                    b = b.header("set-cookie", "session=1");
                }
                b.body(axum::body::Body::from(format!("{} #{n} {lang}", req.method()))).unwrap()
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn kit(origin: &Origin) -> TestKeygate {
    let mut cached = route("cached", "/c", &origin.url());
    cached.scopes.insert("GET".into(), "c:read".into());
    cached.scopes.insert("*".into(), "c:write".into());
    cached.cache = Some(CacheConfig::default());
    let mut shared = route("shared", "/s", &origin.url());
    shared.cache = Some(CacheConfig { key_by: CacheKeyBy::Route, ..CacheConfig::default() });
    let mut per_app = route("per-app", "/a", &origin.url());
    per_app.cache = Some(CacheConfig { key_by: CacheKeyBy::App, ..CacheConfig::default() });
    TestKeygate::start_with(Options { routes: vec![cached, shared, per_app], ..Options::default() }).await.unwrap()
}

/// A request's status, `Cache-Status`, `Age` and body.
struct Got {
    status: StatusCode,
    cache: String,
    age: Option<String>,
    body: String,
    headers: reqwest::header::HeaderMap,
}

async fn send(client: &reqwest::Client, req: reqwest::RequestBuilder) -> Got {
    let resp = client.execute(req.build().unwrap()).await.unwrap();
    let headers = resp.headers().clone();
    let text = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    Got {
        status: resp.status(),
        cache: text("cache-status").unwrap_or_default(),
        age: text("age"),
        headers: headers.clone(),
        body: resp.text().await.unwrap(),
    }
}

async fn get(kg: &TestKeygate, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Got {
    let client = reqwest::Client::new();
    let mut req = client.get(format!("{}{path}", kg.gateway_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    send(&client, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_get_is_a_hit_that_is_still_checked_limited_and_metered() {
    let origin = Origin::start().await;
    let kg = kit(&origin).await;
    let c = kg.client();
    let (rw_id, rw) = c.create_token(&json!({"name": "rw", "scopes": ["c:read", "c:write"]})).await;
    let (_, other) = c.create_token(&json!({"name": "other", "scopes": ["elsewhere:read"]})).await;

    let first = get(&kg, "/c/public/1", Some(&rw), &[]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.cache, "keygate; fwd=uri-miss; stored; ttl=60");
    assert_eq!(first.body, "GET #1 -");
    let hit = get(&kg, "/c/public/1", Some(&rw), &[]).await;
    assert_eq!(
        (hit.status, hit.cache.as_str(), hit.age.as_deref()),
        (StatusCode::OK, "keygate; hit; ttl=60", Some("0"))
    );
    assert_eq!(hit.body, "GET #1 -", "the stored answer");
    assert_eq!(hit.headers["cache-control"], "public, max-age=60");
    assert_eq!(origin.seen(), 1, "the origin saw one request");
    kg.clock.advance_seconds(5);
    let later = get(&kg, "/c/public/1", Some(&rw), &[]).await;
    assert_eq!((later.cache.as_str(), later.age.as_deref()), ("keygate; hit; ttl=55", Some("5")));

    // Hits are still checked: no token, a token without the scope.
    let none = get(&kg, "/c/public/1", None, &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(none.cache.is_empty(), "refused before the cache: {}", none.cache);
    assert_eq!(get(&kg, "/c/public/1", Some(&other), &[]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(origin.seen(), 1);

    // A HEAD is answered from the GET's entry, with its length and no body.
    let client = reqwest::Client::new();
    let head = send(&client, client.head(format!("{}/c/public/1", kg.gateway_url())).bearer_auth(&rw)).await;
    assert_eq!((head.status, head.cache.as_str()), (StatusCode::OK, "keygate; hit; ttl=55"));
    assert_eq!(head.headers["content-length"], "8");
    assert!(head.body.is_empty());

    // The client's copy is the stored one: 304 from the cache.
    let not_modified = get(&kg, "/c/public/1", Some(&rw), &[("if-none-match", "W/\"v0\", \"v1\"")]).await;
    assert_eq!(
        (not_modified.status, not_modified.cache.as_str(), not_modified.body.as_str()),
        (StatusCode::NOT_MODIFIED, "keygate; hit; ttl=55", "")
    );
    assert_eq!(not_modified.headers["etag"], "\"v1\"");
    assert!(not_modified.headers.get("content-type").is_none(), "a 304 carries no representation fields");
    assert_eq!(get(&kg, "/c/public/1", Some(&rw), &[("if-none-match", "\"v2\"")]).await.body, "GET #1 -");
    assert_eq!(origin.seen(), 1);

    // Another token has entries of its own (key_by = "token", the default).
    let (_, reader) = c.create_token(&json!({"name": "reader", "scopes": ["c:read"]})).await;
    let theirs = get(&kg, "/c/public/1", Some(&reader), &[]).await;
    assert_eq!((theirs.cache.as_str(), theirs.body.as_str()), ("keygate; fwd=uri-miss; stored; ttl=60", "GET #2 -"));

    // Not shareable: private, or no directive on an authenticated request; Set-Cookie.
    for (path, detail) in [("/c/private/1", "private"), ("/c/bare/1", "authenticated"), ("/c/cookie/1", "set-cookie")] {
        for _ in 0..2 {
            let g = get(&kg, path, Some(&rw), &[]).await;
            assert_eq!(g.cache, format!("keygate; fwd=uri-miss; detail={detail}"), "{path}");
        }
    }
    assert_eq!(origin.seen(), 2 + 6);

    // Vary: each Accept-Language its own variant.
    let fr = [("accept-language", "fr")];
    assert_eq!(get(&kg, "/c/vary/1", Some(&rw), &fr).await.cache, "keygate; fwd=uri-miss; stored; ttl=60");
    let again = get(&kg, "/c/vary/1", Some(&rw), &fr).await;
    assert_eq!((again.cache.as_str(), again.body.as_str()), ("keygate; hit; ttl=60", "GET #9 fr"));
    let de = get(&kg, "/c/vary/1", Some(&rw), &[("accept-language", "de")]).await;
    assert_eq!((de.cache.as_str(), de.body.as_str()), ("keygate; fwd=vary-miss; stored; ttl=60", "GET #10 de"));
    assert_eq!(get(&kg, "/c/vary/1", Some(&rw), &fr).await.body, "GET #9 fr");

    // The client's no-cache goes upstream, and its answer replaces the entry.
    let fresh = get(&kg, "/c/public/1", Some(&rw), &[("cache-control", "no-cache")]).await;
    assert_eq!((fresh.cache.as_str(), fresh.body.as_str()), ("keygate; fwd=request; stored; ttl=60", "GET #11 -"));
    assert_eq!(get(&kg, "/c/public/1", Some(&rw), &[]).await.body, "GET #11 -");
    // A request's no-store keeps its answer out.
    let kept_out = get(&kg, "/c/public/2", Some(&rw), &[("cache-control", "no-store")]).await;
    assert_eq!(kept_out.cache, "keygate; fwd=uri-miss; detail=request-no-store");

    // A successful POST invalidates the URI's entries, every caller's.
    let client = reqwest::Client::new();
    let post = send(&client, client.post(format!("{}/c/public/1", kg.gateway_url())).bearer_auth(&rw)).await;
    assert_eq!((post.status, post.cache.as_str()), (StatusCode::OK, "keygate; fwd=method"));
    assert_eq!(get(&kg, "/c/public/1", Some(&rw), &[]).await.cache, "keygate; fwd=uri-miss; stored; ttl=60");
    assert_eq!(get(&kg, "/c/public/1", Some(&reader), &[]).await.cache, "keygate; fwd=uri-miss; stored; ttl=60");

    // Past its freshness an entry is stale: forwarded, and replaced.
    kg.clock.advance_seconds(61);
    let stale = get(&kg, "/c/public/1", Some(&rw), &[]).await;
    assert_eq!(stale.cache, "keygate; fwd=stale; stored; ttl=60");
    let seen = origin.seen();

    // Hits are rate limited like any request.
    let (_, limited) = c
        .create_token(&json!({"name": "limited", "scopes": ["c:read"], "rate_limit": {"requests": 2, "per_seconds": 60, "burst": 0}}))
        .await;
    let codes = [
        get(&kg, "/c/public/3", Some(&limited), &[]).await,
        get(&kg, "/c/public/3", Some(&limited), &[]).await,
        get(&kg, "/c/public/3", Some(&limited), &[]).await,
    ];
    assert_eq!(codes.iter().map(|g| g.status.as_u16()).collect::<Vec<_>>(), [200, 200, 429]);
    assert_eq!(codes[1].cache, "keygate; hit; ttl=60");
    assert_eq!(origin.seen(), seen + 1);

    // Hits are metered: every one of rw's requests that reached the route is in its usage.
    kg.flush_usage().await;
    let u = c
        .get(&format!(
            "/admin/v1/tokens/{rw_id}/usage?granularity=day&from=2030-01-01T00:00:00Z&to=2030-06-01T00:00:00Z"
        ))
        .await;
    assert_eq!(u.status, StatusCode::OK, "{:?}", u.body);
    // 3 public + HEAD + 2 conditional + 6 not shareable + 4 vary + 2 no-cache + 1 no-store + POST
    // + GET + stale.
    assert_eq!(u.body["total"]["requests"], 22, "{:?}", u.body);

    let m = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    for line in [
        "keygate_gateway_cache_hits_total{route=\"cached\"} 9",
        "keygate_gateway_cache_stores_total{route=\"cached\"} 9",
        "keygate_gateway_cache_entries{route=\"cached\"} 5",
        "keygate_gateway_cache_hits_total{route=\"shared\"} 0",
        "keygate_gateway_requests_total{route=\"cached\",status=\"2xx\"}",
    ] {
        assert!(m.contains(line), "missing {line} in\n{m}");
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_hits_and_a_shared_route_shares() {
    let origin = Origin::start().await;
    let kg = kit(&origin).await;
    let c = kg.client();
    let (_, a) = c.create_token(&json!({"name": "a"})).await;
    let (_, b) = c.create_token(&json!({"name": "b"})).await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let url = format!("{}/s/public/1", kg.gateway_url());
    let first = send(&h2, h2.get(&url).bearer_auth(&a)).await;
    assert_eq!((first.status, first.cache.as_str()), (StatusCode::OK, "keygate; fwd=uri-miss; stored; ttl=60"));
    // key_by = "route": another caller gets the same entry.
    let second = send(&h2, h2.get(&url).bearer_auth(&b)).await;
    assert_eq!((second.cache.as_str(), second.age.as_deref()), ("keygate; hit; ttl=60", Some("0")));
    assert_eq!(second.body, first.body);
    let over_h1 = get(&kg, "/s/public/1", Some(&a), &[]).await;
    assert_eq!((over_h1.cache.as_str(), over_h1.body.as_str()), ("keygate; hit; ttl=60", first.body.as_str()));
    assert_eq!(origin.seen(), 1);
    // A HEAD over HTTP/2: the GET's entry, its length, no body.
    let head = send(&h2, h2.head(&url).bearer_auth(&a)).await;
    assert_eq!((head.status, head.cache.as_str()), (StatusCode::OK, "keygate; hit; ttl=60"));
    let len = first.body.len().to_string();
    assert_eq!(head.headers.get("content-length").map(|v| v.to_str().unwrap()), Some(len.as_str()));
    assert!(head.body.is_empty());
    assert_eq!(origin.seen(), 1);
    // Still a token is needed.
    assert_eq!(send(&h2, h2.get(&url)).await.status, StatusCode::UNAUTHORIZED);
    kg.stop().await;
}

/// A route changed through the admin API starts with an empty cache: no answer of its old
/// definition is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_route_drops_its_entries_and_bad_sizes_are_refused() {
    let origin = Origin::start().await;
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let body = |max_bytes: u64| json!({"id": "api", "path": "/api", "upstream": origin.url(), "cache": {"max_bytes": max_bytes, "key_by": "route"}});
    let created = c.post("/admin/v1/routes", &body(1 << 20)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["cache"], json!({"max_bytes": 1 << 20, "max_entry_bytes": 1 << 20, "key_by": "route"}));
    kg.routes().rebuild().await.unwrap();
    let (_, t) = c.create_token(&json!({"name": "t"})).await;
    assert_eq!(get(&kg, "/api/public/1", Some(&t), &[]).await.cache, "keygate; fwd=uri-miss; stored; ttl=60");
    assert_eq!(get(&kg, "/api/public/1", Some(&t), &[]).await.cache, "keygate; hit; ttl=60");
    // An unrelated change keeps the entries.
    let other = c.post("/admin/v1/routes", &json!({"id": "other", "path": "/other", "upstream": origin.url()})).await;
    assert_eq!(other.status, StatusCode::CREATED);
    kg.routes().rebuild().await.unwrap();
    assert_eq!(get(&kg, "/api/public/1", Some(&t), &[]).await.cache, "keygate; hit; ttl=60");
    // Changing the route drops them.
    let put = c.send(keygate_testkit::Method::PUT, "/admin/v1/routes/api", Some(&body(2 << 20))).await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    kg.routes().rebuild().await.unwrap();
    assert_eq!(get(&kg, "/api/public/1", Some(&t), &[]).await.cache, "keygate; fwd=uri-miss; stored; ttl=60");

    let bad = c
        .post(
            "/admin/v1/routes",
            &json!({"id": "bad", "path": "/bad", "upstream": origin.url(), "cache": {"max_bytes": 10}}),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body["error"]["message"].as_str().unwrap().contains("cache_max_bytes_too_small"), "{:?}", bad.body);
    let bad = c
        .post(
            "/admin/v1/routes",
            &json!({"id": "bad", "path": "/bad", "upstream": origin.url(), "cache": {"max_entry_bytes": 1 << 30}}),
        )
        .await;
    assert!(bad.body["error"]["message"].as_str().unwrap().contains("cache_entry_larger_than_cache"), "{:?}", bad.body);
    kg.stop().await;
}

/// An answer whose upstream body is cut short is never stored, though its head (sent before the
/// body) said it would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_upstream_body_is_never_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                // 100 bytes announced, 9 sent, then the connection closes.
                let head =
                    b"HTTP/1.1 200 OK\r\ncache-control: public, max-age=60\r\ncontent-length: 100\r\n\r\nonly part";
                let _ = s.write_all(head).await;
            });
        }
    });
    let mut cut = route("cut", "/cut", &format!("http://{addr}"));
    cut.cache = Some(CacheConfig::default());
    let kg = TestKeygate::start_with(Options { routes: vec![cut], ..Options::default() }).await.unwrap();
    let (_, t) = kg.client().create_token(&json!({"name": "t"})).await;
    for _ in 0..2 {
        let resp =
            reqwest::Client::new().get(format!("{}/cut/1", kg.gateway_url())).bearer_auth(&t).send().await.unwrap();
        assert_eq!(resp.headers()["cache-status"], "keygate; fwd=uri-miss; stored; ttl=60");
        assert!(resp.bytes().await.is_err(), "the client sees the body cut short");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 2, "nothing was stored: the second request went upstream");
    let m = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(m.contains("keygate_gateway_cache_stores_total{route=\"cut\"} 0"), "{m}");
    task.abort();
    kg.stop().await;
}

/// `key_by = "app"`: the tokens of one app share entries, another app's tokens do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_tokens_share_entries_with_key_by_app() {
    let origin = Origin::start().await;
    let kg = kit(&origin).await;
    let c = kg.client();
    let other = c.post("/admin/v1/apps", &json!({"name": "other"})).await;
    assert_eq!(other.status, StatusCode::CREATED, "{:?}", other.body);
    let (_, a1) = c.create_token(&json!({"name": "a1"})).await;
    let (_, a2) = c.create_token(&json!({"name": "a2"})).await;
    let (_, b1) = c.create_token(&json!({"name": "b1", "app_id": other.str("/id")})).await;
    assert_eq!(get(&kg, "/a/public/1", Some(&a1), &[]).await.cache, "keygate; fwd=uri-miss; stored; ttl=60");
    let same_app = get(&kg, "/a/public/1", Some(&a2), &[]).await;
    assert_eq!((same_app.cache.as_str(), same_app.body.as_str()), ("keygate; hit; ttl=60", "GET #1 -"));
    let other_app = get(&kg, "/a/public/1", Some(&b1), &[]).await;
    assert_eq!(
        (other_app.cache.as_str(), other_app.body.as_str()),
        ("keygate; fwd=uri-miss; stored; ttl=60", "GET #2 -")
    );
    assert_eq!(origin.seen(), 2);
    kg.stop().await;
}
