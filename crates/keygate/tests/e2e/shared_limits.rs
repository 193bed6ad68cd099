//! Limits that hold across nodes (issue 14): three nodes on one PostgreSQL draw from one Redis
//! bucket per limit, so a token gets its limit once, not once per node; with Redis gone each node
//! enforces its share and the nodes keep serving.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use keygate::config::RedisConfig;
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::json;

/// A key prefix of this test's own, so tests sharing the machine's Redis never meet.
fn prefix() -> String {
    format!("kgtest{}", keygate_core::token_format::random_base62(&keygate_core::secret::OsRandom, 10).unwrap())
}

async fn metrics(kg: &TestKeygate) -> String {
    reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap()
}

fn redis_url() -> String {
    std::env::var("KEYGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn three_nodes(db: &str, redis: Option<RedisConfig>) -> Vec<TestKeygate> {
    let opts = Options { database_url: Some(db.to_owned()), redis, ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let dir = a.data_dir().to_owned();
    let b = TestKeygate::start_with(Options { data_dir: Some(dir.clone()), ..opts.clone() }).await.unwrap();
    let c = TestKeygate::start_with(Options { data_dir: Some(dir), ..opts }).await.unwrap();
    let nodes = vec![a, b, c];
    for n in &nodes {
        n.cluster().beat_now().await; // each learns that three nodes are live
    }
    nodes
}

/// Sends `n` requests with `token`, spread round-robin over `nodes`, 30 at a time; counts the
/// answers by status.
async fn drive(nodes: &[TestKeygate], token: &str, n: usize) -> (usize, usize) {
    let http = reqwest::Client::new();
    let urls: Vec<String> = nodes.iter().map(|k| format!("{}/demo/echo", k.gateway_url())).collect();
    let (mut ok, mut limited) = (0, 0);
    for chunk in (0..n).collect::<Vec<_>>().chunks(30) {
        let calls = chunk.iter().map(|i| {
            let req = http.get(&urls[i % urls.len()]).bearer_auth(token);
            async move { req.send().await.unwrap().status() }
        });
        for s in futures_join(calls).await {
            match s {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => limited += 1,
                other => panic!("unexpected status {other}"),
            }
        }
    }
    (ok, limited)
}

async fn futures_join<F: std::future::Future<Output = StatusCode> + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<StatusCode> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// The figure the issue starts from, and the fix: a token limited to 60 requests a minute,
/// driven concurrently through three nodes. Alone, each node lets 60 through (180 in all, 3×);
/// sharing Redis, the three let through 60 (1.00×). The quota holds the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_holds_across_three_nodes_when_they_share_redis() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let shared = RedisConfig { url: Some(redis_url()), key_prefix: prefix(), wait_ms: 1_000, ..RedisConfig::default() };
    let nodes = three_nodes(&db.url, Some(shared)).await;
    let body = json!({"name": "limited", "rate_limit": {"requests": 60, "per_seconds": 60}});
    let (_, token) = nodes[0].client().create_token(&body).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
    }
    let (ok, limited) = drive(&nodes, &token, 300).await;
    eprintln!("shared limit of 60 through 3 nodes: {ok} admitted ({:.2}×), {limited} refused", ok as f64 / 60.0);
    assert_eq!((ok, limited), (60, 240), "exactly the limit, across all three nodes");

    // A quota of 100 a day, through the three nodes: 100.
    let body = json!({"name": "quota", "quota": {"requests": 100, "period": "day"}});
    let (_, token) = nodes[1].client().create_token(&body).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
    }
    let http = reqwest::Client::new();
    let mut ok = 0;
    for i in 0..150 {
        let s = http.get(format!("{}/demo/echo", nodes[i % 3].gateway_url())).bearer_auth(&token).send().await.unwrap();
        if s.status() == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(s.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(s.headers()["ratelimit"].to_str().unwrap().contains("r=0"), "{:?}", s.headers());
        }
    }
    assert_eq!(ok, 100, "the quota counted once across the nodes");

    // A token good for 5 uses, through the three nodes: 5 (issue 17).
    let (_, token) = nodes[2].client().create_token(&json!({"name": "five", "max_uses": 5})).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
    }
    let mut ok = 0;
    for i in 0..30 {
        let s = http.get(format!("{}/demo/echo", nodes[i % 3].gateway_url())).bearer_auth(&token).send().await.unwrap();
        match s.status() {
            StatusCode::OK => ok += 1,
            other => assert_eq!(other, StatusCode::FORBIDDEN, "uses_exhausted"),
        }
    }
    assert_eq!(ok, 5, "the uses counted once across the nodes");

    // An app's shared limit of 60 a minute, through three nodes and two of its tokens: 60.
    let app = nodes[0]
        .client()
        .post("/admin/v1/apps", &json!({"name": "team", "rate_limit": {"requests": 60, "per_seconds": 60}}))
        .await;
    let app_id = app.str("/id");
    let (_, a) = nodes[0].client().create_token(&json!({"name": "a", "app_id": app_id})).await;
    let (_, b) = nodes[0].client().create_token(&json!({"name": "b", "app_id": app_id})).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
        n.routes().rebuild().await.unwrap();
    }
    let (ok_a, limited_a) = drive(&nodes, &a, 150).await;
    let (ok_b, limited_b) = drive(&nodes, &b, 150).await;
    assert_eq!((ok_a + ok_b, limited_a + limited_b), (60, 240), "the app's limit, once for both tokens and all nodes");
    let text = metrics(&nodes[0]).await;
    assert!(text.contains("keygate_shared_limits_up 1"), "{text}");
    for n in nodes {
        n.stop().await;
    }
    db.drop_db().await;
}

/// Without Redis each node counts alone: the same token gets its limit on each of the three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_node_counts_alone() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let nodes = three_nodes(&db.url, None).await;
    let body = json!({"name": "limited", "rate_limit": {"requests": 60, "per_seconds": 60}});
    let (_, token) = nodes[0].client().create_token(&body).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
    }
    let (ok, _) = drive(&nodes, &token, 300).await;
    assert_eq!(ok, 180, "three nodes, three buckets: the documented single-node behaviour");
    for n in nodes {
        n.stop().await;
    }
    db.drop_db().await;
}

/// A throwaway Redis on a free port, which this test may stop.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the fault tests");
        let me = Self { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return me;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    fn stop(self) {
        drop(self);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Redis stopped: every node keeps serving and enforces its share (60 / 3 = 20 each: 60 in all);
/// Redis back: shared accounting again, with no burst of refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_each_node_enforces_its_share_and_recovers() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let port = free_port();
    let redis = OwnRedis::start(port);
    let cfg = RedisConfig { url: Some(redis.url()), key_prefix: prefix(), wait_ms: 1_000, ..RedisConfig::default() };
    let nodes = three_nodes(&db.url, Some(cfg)).await;
    let body = json!({"name": "limited", "rate_limit": {"requests": 60, "per_seconds": 60}});
    let (_, token) = nodes[0].client().create_token(&body).await;
    let (_, other) = nodes[0].client().create_token(&body).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
    }
    assert_eq!(drive(&nodes, &token, 30).await, (30, 0));
    redis.stop();
    // The first request on each node finds Redis gone and is decided alone; then every node
    // decides alone with 20 of the 60.
    let (ok, limited) = drive(&nodes, &other, 300).await;
    eprintln!("Redis down: {ok} admitted of a limit of 60 through 3 nodes, {limited} refused");
    assert_eq!(ok, 60, "each node its share: 20 + 20 + 20");
    let text = metrics(&nodes[0]).await;
    assert!(text.contains("keygate_shared_limits_up 0"), "{text}");
    assert!(text.contains("keygate_shared_limits_nodes 3"), "{text}");

    // Back (an empty Redis: it kept nothing): shared again once the pause after a failure is
    // over; the bucket is full again, so nobody is refused for what happened meanwhile.
    let redis = OwnRedis::start(port);
    for n in &nodes {
        n.clock.advance_seconds(2);
    }
    let (_, fresh) = nodes[0].client().create_token(&body).await;
    for n in &nodes {
        n.sync_index().await.unwrap();
    }
    let mut recovered = false;
    for _ in 0..50 {
        let (ok, _) = drive(&nodes, &fresh, 3).await;
        assert_eq!(ok, 3, "no refusals while the connection comes back");
        let text = metrics(&nodes[0]).await;
        if text.contains("keygate_shared_limits_up 1") {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the nodes use Redis again");
    for n in nodes {
        n.stop().await;
    }
    redis.stop();
    db.drop_db().await;
}

/// Dashboard sign-in throttling is shared too: ten wrong passwords for one account, spread over
/// two nodes, lock it on both (each node alone would allow ten of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_throttling_counts_across_nodes() {
    use crate::dashboard::{Browser, PASSWORD, owner};
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let shared = RedisConfig { url: Some(redis_url()), key_prefix: prefix(), ..RedisConfig::default() };
    let opts = Options { database_url: Some(db.url.clone()), redis: Some(shared), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let _owner = owner(&a).await;
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (mut on_a, mut on_b) = (Browser::new(&a), Browser::new(&b));
    for i in 0..10 {
        let browser = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let p = browser.post("/login", &[("email", "olivia@example.com"), ("password", "wrong password!!")]).await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    for browser in [&mut on_a, &mut on_b] {
        let p = browser.post("/login", &[("email", "olivia@example.com"), ("password", PASSWORD)]).await;
        assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "locked on both nodes");
    }
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// One-time values are one-time across nodes: a DPoP proof the token endpoint of one node
/// accepted is refused by another's (each node alone would take it once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_proof_used_on_one_node_is_refused_on_another() {
    use crate::oauth::{client, proof, token};
    use keygate_core::jose::{Alg, SigningKey};
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let shared = RedisConfig { url: Some(redis_url()), key_prefix: prefix(), ..RedisConfig::default() };
    // One issuer for both, as behind a load balancer: the proof names the same token endpoint.
    let oauth = keygate::config::OAuthConfig { issuer: Some("http://keys.test".into()), ..Default::default() };
    let opts =
        Options { database_url: Some(db.url.clone()), redis: Some(shared), oauth: Some(oauth), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (_, id, secret) = client(&a, json!({"scopes": []})).await;
    let key = SigningKey::generate(Alg::ES256, "").unwrap();
    let now = keygate_core::Clock::now(&a.clock).as_millis() / 1000;
    let p = proof(&key, "POST", "http://keys.test/oauth2/token", None, "once-1", now);
    let form = [("grant_type", "client_credentials")];
    let (s, body) = token(&a, &id, &secret, &form, Some(p.clone())).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = token(&b, &id, &secret, &form, Some(p)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_dpop_proof", "{body}");
    let fresh = proof(&key, "POST", "http://keys.test/oauth2/token", None, "once-2", now);
    let (s, issued) = token(&b, &id, &secret, &form, Some(fresh)).await;
    assert_eq!(s, StatusCode::OK, "a fresh proof is fine: {issued}");

    // At the gateway too: a proof for a request that node a let through is refused by node b,
    // asked for the same URL (as behind a load balancer, one host name for both).
    let at = issued["access_token"].as_str().unwrap();
    let host = a.gateway_url().trim_start_matches("http://").to_owned();
    let url = format!("http://{host}/demo/echo");
    let p = proof(&key, "GET", &url, Some(at), "call-1", now);
    let send = |kg: &TestKeygate, p: &str| {
        reqwest::Client::new()
            .get(format!("{}/demo/echo", kg.gateway_url()))
            .header("host", host.as_str())
            .header("authorization", format!("DPoP {at}"))
            .header("dpop", p)
            .send()
    };
    let first = send(&a, &p).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK, "{:?}", first.text().await);
    let replayed = send(&b, &p).await.unwrap();
    assert_eq!(replayed.status(), StatusCode::UNAUTHORIZED);
    let challenge = replayed.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.contains("already used"), "{challenge}");
    let p2 = proof(&key, "GET", &url, Some(at), "call-2", now);
    assert_eq!(send(&b, &p2).await.unwrap().status(), StatusCode::OK, "a fresh proof is fine on b");
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// Failed client authentications count on every node: a guesser spreading wrong secrets over two
/// nodes is slowed down after the one allowance (20 in a burst), not after one per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_client_authentications_count_across_nodes() {
    use crate::oauth::{client, token};
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let shared = RedisConfig { url: Some(redis_url()), key_prefix: prefix(), ..RedisConfig::default() };
    let opts = Options { database_url: Some(db.url.clone()), redis: Some(shared), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (_, id, _) = client(&a, json!({"scopes": []})).await;
    let form = [("grant_type", "client_credentials")];
    let mut statuses = Vec::new();
    for i in 0..24 {
        let node = if i % 2 == 0 { &a } else { &b };
        statuses.push(token(node, &id, "kgcs_wrong", &form, None).await.0.as_u16());
    }
    let refused = statuses.iter().filter(|s| **s == 401).count();
    let slowed = statuses.iter().filter(|s| **s == 429).count();
    // The clock stands still: 20 failures in all (a burst of 19 and one), then slow_down on both.
    assert_eq!((refused, slowed), (20, 4), "{statuses:?}");
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

/// `POST /admin/v1/verify` counts its cost in the shared bucket and quota, the ones the gateway's
/// leases draw from: what one node's services took is gone on the others, and gateway traffic and
/// verifications share one allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_costs_count_across_nodes() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let shared = RedisConfig { url: Some(redis_url()), key_prefix: prefix(), wait_ms: 1_000, ..RedisConfig::default() };
    let opts = Options { database_url: Some(db.url.clone()), redis: Some(shared), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    for n in [&a, &b] {
        n.cluster().beat_now().await;
    }
    let body = json!({"name": "svc", "rate_limit": {"requests": 10, "per_seconds": 60},
        "quota": {"requests": 25, "period": "day"}});
    let (_, token) = a.client().create_token(&body).await;
    b.sync_index().await.unwrap();
    let verify = async |kg: &TestKeygate, cost: u32| {
        let r = kg.client().post("/admin/v1/verify", &json!({"token": token, "cost": cost})).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body
    };
    let first = verify(&a, 6).await;
    assert_eq!((first["code"].as_str(), first["rate_limit"]["remaining"].as_u64()), (Some("ok"), Some(4)), "{first}");
    let second = verify(&b, 6).await;
    assert_eq!(second["code"], "rate_limited", "6 of 10 were taken on node a: {second}");
    assert_eq!(second["rate_limit"]["remaining"], 4, "{second}");
    let rest = verify(&b, 4).await;
    assert_eq!(rest["code"], "ok", "{rest}");
    assert_eq!(rest["quota"]["remaining"], 15, "the quota counted a's 6 and b's 4: {rest}");
    // The gateway draws from the same bucket: nothing left for a request on either node.
    let r = reqwest::Client::new().get(format!("{}/demo/echo", a.gateway_url())).bearer_auth(&token).send().await;
    assert_eq!(r.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}
