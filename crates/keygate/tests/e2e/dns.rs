//! Upstreams named by DNS host names: `localhost` through the system resolver (`/etc/hosts`),
//! and a name with several addresses through a fake resolver driven by the test (each address a
//! balancing target; one that stops is taken out while the others serve; a name that does not
//! resolve answers 502 `upstream_unresolved` and keygate starts anyway).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use keygate_gateway::resolve::{self, Lookup, Resolve, Which};
use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An upstream on `listener` that answers every request with the address it was reached at.
fn answer_with_address(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        let me = listener.local_addr().unwrap().ip().to_string();
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let me = me.clone();
            tokio::spawn(async move {
                if !crate::read_request_head(&mut s).await {
                    return;
                }
                let answer =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{me}", me.len());
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    })
}

/// Listens on one port at each of `ips` (the first picks the port).
async fn listen_on(ips: &[IpAddr]) -> (u16, Vec<(IpAddr, JoinHandle<()>)>) {
    let mut port = 0;
    let mut up = Vec::new();
    for ip in ips {
        match TcpListener::bind(SocketAddr::new(*ip, port)).await {
            Ok(l) => {
                port = l.local_addr().unwrap().port();
                up.push((*ip, answer_with_address(l)));
            }
            Err(e) => assert!(port != 0, "cannot listen on {ip}: {e}"),
        }
    }
    (port, up)
}

async fn get(kg: &TestKeygate, path: &str) -> (StatusCode, String) {
    let r = reqwest::get(format!("{}{path}", kg.gateway_url())).await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn metrics(kg: &TestKeygate) -> String {
    reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn localhost_is_resolved_and_every_address_it_has_serves() {
    // What the system resolver says localhost is (127.0.0.1, and ::1 where /etc/hosts has it).
    let ips: BTreeSet<IpAddr> = tokio::net::lookup_host(("localhost", 0)).await.unwrap().map(|a| a.ip()).collect();
    let ips: Vec<IpAddr> = ips.into_iter().collect();
    let (port, up) = listen_on(&ips).await;
    let serving: BTreeSet<String> = up.iter().map(|(ip, _)| ip.to_string()).collect();
    let mut local = route("local", "/local", &format!("http://localhost:{port}"));
    local.public = true;
    let kg = TestKeygate::start_with(Options { routes: vec![local], ..Options::default() }).await.unwrap();

    let mut seen = BTreeSet::new();
    for _ in 0..4 * ips.len() {
        let (status, body) = get(&kg, "/local/x").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.insert(body);
    }
    assert_eq!(seen, serving, "each address of localhost is a target");
    let m = metrics(&kg).await;
    let line =
        format!("keygate_gateway_upstream_addresses{{route=\"local\",upstream=\"localhost:{port}\"}} {}", ips.len());
    assert!(m.contains(&line), "{line} in\n{m}");

    // A route made through the admin API with a name is looked up before it serves.
    let created = kg
        .client()
        .post(
            "/admin/v1/routes",
            &json!({"id": "api-local", "path": "/api-local", "upstream": format!("http://localhost:{port}"),
                    "public": true, "dns_refresh_seconds": 5}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["dns_refresh_seconds"], 5);
    let (status, body) = get(&kg, "/api-local/y").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(serving.contains(&body));
    let table = kg.gateway().table.load();
    let r = table.routes.routes.iter().find(|r| &*r.id == "api-local").unwrap();
    assert_eq!(r.dns.as_ref().unwrap().refresh().as_secs(), 5);
}

/// Answers for the names the test sets; none for the others.
#[derive(Default)]
struct Fake(parking_lot::Mutex<HashMap<String, Vec<IpAddr>>>);

impl Resolve for Fake {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        let r = match self.0.lock().get(host) {
            Some(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no such name")),
        };
        Box::pin(async move { r })
    }
}

#[tokio::test]
async fn a_name_with_two_addresses_balances_and_one_stopping_leaves_the_other_serving() {
    let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
    let (port, mut up) = listen_on(&[a, b]).await;
    assert_eq!(up.len(), 2, "127.0.0.2 is a loopback address too");
    let name = "svc.keygate.invalid";
    let mut svc = route("svc", "/svc", &format!("http://{name}:{port}"));
    svc.public = true;
    // The same name on a route with active health checks.
    let mut checked = route("checked", "/checked", &format!("http://{name}:{port}"));
    checked.public = true;
    checked.health_check = Some(keygate_gateway::config::HealthCheckConfig {
        path: "/healthz".into(),
        interval_seconds: 5,
        unhealthy_threshold: 1,
        healthy_threshold: 1,
    });
    // The name does not resolve at start (.invalid never does): keygate starts anyway.
    let kg = TestKeygate::start_with(Options { routes: vec![svc, checked], ..Options::default() }).await.unwrap();
    let r = reqwest::get(format!("{}/svc/x", kg.gateway_url())).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unresolved", "{body}");

    // The name now resolves to both addresses (the time is past any due time the background
    // resolver set).
    let fake = Arc::new(Fake::default());
    fake.0.lock().insert(name.into(), vec![a, b]);
    let resolver: Arc<dyn Resolve> = fake.clone();
    let mut now = 1_000_000_000;
    let refresh = async |now: u64| {
        let table = kg.gateway().table.load_full();
        resolve::refresh(table.routes.dns(), &resolver, now, Which::Due).await
    };
    assert_eq!(refresh(now).await, 2, "the name of each route");
    let mut seen = BTreeSet::new();
    for _ in 0..6 {
        let (status, body) = get(&kg, "/svc/x").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        seen.insert(body);
    }
    assert_eq!(seen, BTreeSet::from([a.to_string(), b.to_string()]), "round robin over both addresses");

    // 127.0.0.2 stops: GETs retry on 127.0.0.1, and its failures take 127.0.0.2 out.
    let health = |id: &str| {
        let table = kg.gateway().table.load_full();
        let route = table.routes.routes.iter().find(|r| &*r.id == id).unwrap().clone();
        route.targets().iter().map(|u| (u.addr.unwrap().ip(), u.is_healthy())).collect::<Vec<_>>()
    };
    keygate_gateway::tasks::health_check_round(kg.gateway(), 5).await;
    assert_eq!(health("checked"), [(a, true), (b, true)], "each address passes its check");
    let (_, task) = up.pop().unwrap();
    task.abort();
    let _ = task.await;
    // Active checks probe each address: 127.0.0.2 fails its check, 127.0.0.1 passes.
    keygate_gateway::tasks::health_check_round(kg.gateway(), 10).await;
    assert_eq!(health("checked"), [(a, true), (b, false)], "the stopped address fails its check");
    for _ in 0..4 {
        let (status, body) = get(&kg, "/checked/x").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "127.0.0.1"));
    }
    for _ in 0..12 {
        let (status, body) = get(&kg, "/svc/x").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "127.0.0.1"));
    }
    assert_eq!(health("svc"), [(a, true), (b, false)], "passive checks took the stopped address out");
    let m = metrics(&kg).await;
    let line = format!("keygate_gateway_upstream_healthy_addresses{{route=\"svc\",upstream=\"{name}:{port}\"}} 1");
    assert!(m.contains(&line), "{line} in\n{m}");

    // The name loses 127.0.0.2: 127.0.0.1 keeps its target; a failed lookup then keeps it.
    fake.0.lock().insert(name.into(), vec![a]);
    now += 60_000;
    refresh(now).await;
    assert_eq!(health("svc"), [(a, true)]);
    fake.0.lock().remove(name);
    now += 60_000;
    refresh(now).await;
    assert_eq!(health("svc"), [(a, true)], "a failed lookup keeps the last address");
    let (status, _) = get(&kg, "/svc/x").await;
    assert_eq!(status, StatusCode::OK);
}
