//! Faults survived (issue 14), against a PostgreSQL of the test's own (initdb + pg_ctl on a free
//! port; never the machine's shared server): the database stopped and started again at the same
//! address (a failover to a new primary looks the same to keygate), and a node that was down
//! while another revoked a token.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use keygate_core::Clock;
use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::json;

/// A PostgreSQL server in a temporary directory, run as the `postgres` user when the tests run
/// as root (initdb refuses root).
struct OwnPg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn as_postgres(bin: &std::path::Path, args: &[&str]) -> Command {
    // SAFETY-free check of root: the effective uid from /proc.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin).args(args);
        c
    } else {
        let mut c = Command::new(bin);
        c.args(args);
        c
    }
}

impl OwnPg {
    fn init() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().unwrap();
        let _ = Command::new("chown").args(["postgres"]).arg(dir.path()).status();
        let data = dir.path().join("data");
        let ok = as_postgres(&bin.join("initdb"), &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres"])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Self { dir, bin, port }
    }
    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let mut all = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-o", &opts, "-w"];
        all.extend_from_slice(args);
        let ok =
            as_postgres(&self.bin.join("pg_ctl"), &all).stdout(std::process::Stdio::null()).status().unwrap().success();
        assert!(ok, "pg_ctl {args:?} failed");
    }
    fn start(&self) {
        self.pg_ctl(&["start"]);
    }
    fn stop(&self) {
        self.pg_ctl(&["-m", "fast", "stop"]);
    }
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for OwnPg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&self.bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn call(kg: &TestKeygate, token: &str) -> StatusCode {
    reqwest::Client::new()
        .get(format!("{}/demo/echo", kg.gateway_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn until<F: AsyncFnMut() -> bool>(mut f: F) -> bool {
    for _ in 0..200 {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// PostgreSQL stopped: both gateways keep serving from memory and keep counting; the admin API
/// answers 503 `store_unavailable`; nothing counted is lost. Started again at the same address:
/// a revocation made then reaches the other node, and the counts reach the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_served_through_and_caught_up_after() {
    let pg = OwnPg::init();
    pg.start();
    let opts = Options { database_url: Some(pg.url()), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (id, token) = a.client().create_token(&json!({"name": "t"})).await;
    let (leak_id, leak) = a.client().create_token(&json!({"name": "leaked"})).await;
    b.sync_index().await.unwrap();
    a.sync_index().await.unwrap();

    pg.stop();
    for _ in 0..10 {
        assert_eq!(call(&a, &token).await, StatusCode::OK);
        assert_eq!(call(&b, &token).await, StatusCode::OK);
    }
    let down = a.client().get("/admin/v1/tokens").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", down.body);
    assert_eq!(down.code(), "store_unavailable");
    let ready = reqwest::get(format!("{}/readyz", a.url())).await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "ready: serving from memory by design");
    // A flush while the store is gone keeps the counts for the next one.
    a.flush_usage().await;
    b.flush_usage().await;
    // A second token seen in a query string during the outage: refused at once, marked exposed
    // (with its audit event) once the store is back — the report is kept, not lost.
    let leaked = reqwest::get(format!("{}/demo/echo?access_token={leak}", a.gateway_url())).await.unwrap();
    assert_eq!(leaked.status(), StatusCode::BAD_REQUEST);

    pg.start(); // the same address: to keygate, a failover to a new primary looks the same
    let mut revoked = None;
    let back = until(async || {
        let r = a.client().post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await;
        let ok = r.status == StatusCode::OK;
        if ok {
            revoked = Some(r.body);
        }
        ok
    })
    .await;
    assert!(back, "the admin API works again once the database is back");
    assert_eq!(revoked.unwrap()["status"], "revoked");
    let now = b.clock.now();
    let caught_up = until(async || b.index().verify(&token, now).is_err()).await;
    assert!(caught_up, "node b applies the revocation from the feed after the outage");
    assert_eq!(call(&b, &token).await, StatusCode::UNAUTHORIZED);
    let exposed = until(async || {
        let t = a.client().get(&format!("/admin/v1/tokens/{leak_id}")).await;
        t.body["exposed_at"].is_string()
    })
    .await;
    assert!(exposed, "the exposure seen during the outage is recorded once the database is back");
    let trail = a.client().get(&format!("/admin/v1/audit-events?target={leak_id}&action=token.exposed")).await;
    assert_eq!(trail.body["data"].as_array().map(Vec::len), Some(1), "{}", trail.body);

    // Every request counted during the outage reached the store: the 20 it served (the refusal
    // after the revocation is of a token no longer in the index, counted for no token).
    a.flush_usage().await;
    b.flush_usage().await;
    let usage = a.client().get(&format!("/admin/v1/tokens/{id}/usage?granularity=day")).await;
    assert_eq!(usage.status, StatusCode::OK, "{:?}", usage.body);
    assert_eq!(usage.body["total"]["requests"], 20, "{}", usage.body);
    a.stop().await;
    b.stop().await;
}

/// A node that is down while another revokes a token misses nothing: started again, it loads
/// the index (and the feed since) and refuses the token from its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_a_revocation_refuses_the_token_when_it_is_back() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let opts = Options { database_url: Some(db.url.clone()), ..Options::default() };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let dir = a.data_dir().to_owned();
    let b = TestKeygate::start_with(Options { data_dir: Some(dir.clone()), ..opts.clone() }).await.unwrap();
    let (id, token) = a.client().create_token(&json!({"name": "t"})).await;
    b.sync_index().await.unwrap();
    assert_eq!(call(&b, &token).await, StatusCode::OK);
    b.stop().await;
    let r = a.client().post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await;
    assert_eq!(r.body["propagation"]["nodes"], 1, "the stopped node is not waited for: {}", r.body);
    let b = TestKeygate::start_with(Options { data_dir: Some(dir), ..opts }).await.unwrap();
    assert_eq!(call(&b, &token).await, StatusCode::UNAUTHORIZED, "refused from the first request");
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}
