//! Upstreams named by DNS host names: `localhost` through keygate's resolver (`/etc/hosts`), a
//! name served by a DNS server the test runs (`[gateway] dns_servers`: TTLs, a changed answer,
//! NXDOMAIN), and a name with several addresses through a fake resolver driven by the test (each
//! address a balancing target; one that stops is taken out while the others serve; a name that
//! does not resolve answers 502 `upstream_unresolved` and keygate starts anyway).

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
            Some(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect::<Vec<_>>().into()),
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

/// Names with their IPv4 addresses and TTL.
type Zone = Arc<parking_lot::Mutex<HashMap<String, (Vec<std::net::Ipv4Addr>, u32)>>>;

/// A DNS server on a UDP port of 127.0.0.1: answers A queries for the names in its zone with
/// their TTL, AAAA queries with no data, other names with NXDOMAIN; counts the queries.
struct FakeDns {
    addr: SocketAddr,
    zone: Zone,
    queries: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeDns {
    async fn start() -> Self {
        use hickory_resolver::proto::op::{Message, ResponseCode};
        use hickory_resolver::proto::rr::rdata::A;
        use hickory_resolver::proto::rr::{RData, Record, RecordType};
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let zone: Zone = Arc::default();
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (z, q) = (zone.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                q.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                for question in &query.queries {
                    answer.add_query(question.clone());
                    let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
                    match z.lock().get(&name) {
                        Some((ips, ttl)) if question.query_type() == RecordType::A => {
                            for ip in ips {
                                answer.add_answer(Record::from_rdata(question.name().clone(), *ttl, RData::A(A(*ip))));
                            }
                        }
                        Some(_) => {}
                        None => answer.metadata.response_code = ResponseCode::NXDomain,
                    }
                }
                let _ = sock.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        Self { addr, zone, queries, task }
    }

    fn set(&self, name: &str, ips: &[[u8; 4]], ttl: u32) {
        self.zone.lock().insert(name.into(), (ips.iter().map(|ip| (*ip).into()).collect(), ttl));
    }

    fn queries(&self) -> usize {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[tokio::test]
async fn keygates_resolver_tells_the_ttl_and_answers_special_names_itself() {
    let dns = FakeDns::start().await;
    dns.set("orders.keygate.test", &[[127, 0, 0, 1], [127, 0, 0, 2]], 7);
    let r = resolve::DnsResolver::new(&[dns.addr]).unwrap();
    let found = r.lookup("orders.keygate.test", 8080).await.unwrap();
    let want: Vec<SocketAddr> = vec!["127.0.0.1:8080".parse().unwrap(), "127.0.0.2:8080".parse().unwrap()];
    assert_eq!(found.addrs, want);
    let ttl = found.ttl.expect("DNS answers tell their TTL");
    assert!(ttl <= std::time::Duration::from_secs(7) && ttl > std::time::Duration::from_secs(5), "{ttl:?}");
    let asked = dns.queries();
    assert!(asked >= 1, "the test's server was asked");

    let missing = r.lookup("missing.keygate.test", 80).await.unwrap_err();
    assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");

    // RFC 6761 names and /etc/hosts never reach the DNS server.
    let asked = dns.queries();
    assert!(r.lookup("svc.keygate.invalid", 80).await.is_err());
    let local = r.lookup("localhost", 80).await.unwrap();
    assert!(local.addrs.contains(&"127.0.0.1:80".parse().unwrap()), "{local:?}");
    assert_eq!(dns.queries(), asked, "asked nothing for .invalid and localhost");
    // `dns_servers` values are checked.
    let bad = keygate_gateway::config::GatewayConfig { dns_servers: vec!["dns.example".into()], ..Default::default() };
    let e = bad.validate().unwrap_err();
    assert!(e.contains("gateway.dns_servers") && e.contains("\"dns.example\""), "{e}");
    let ok = keygate_gateway::config::GatewayConfig {
        dns_servers: vec!["10.0.0.2".into(), "127.0.0.1:8600".into(), "[::1]:53".into()],
        ..Default::default()
    };
    assert_eq!(
        ok.dns_server_addrs().unwrap(),
        ["10.0.0.2:53".parse::<SocketAddr>().unwrap(), "127.0.0.1:8600".parse().unwrap(), "[::1]:53".parse().unwrap()]
    );
}

#[tokio::test]
async fn an_upstream_name_follows_its_dns_answers_as_their_ttl_runs_out() {
    let dns = FakeDns::start().await;
    let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [127, 0, 0, 2].into());
    let (port, up) = listen_on(&[a, b]).await;
    assert_eq!(up.len(), 2);
    let name = "payments.keygate.test";
    dns.set(name, &[[127, 0, 0, 1]], 0);
    let mut pay = route("pay", "/pay", &format!("http://{name}:{port}"));
    pay.public = true;
    let gateway = keygate_gateway::config::GatewayConfig {
        dns_servers: vec![dns.addr.to_string()],
        demo: false,
        ..Default::default()
    };
    let kg = TestKeygate::start_with(Options { routes: vec![pay], gateway: Some(gateway), ..Options::default() })
        .await
        .unwrap();
    let (status, body) = get(&kg, "/pay/x").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "127.0.0.1"), "resolved by the configured server");

    // The answer changes; its TTL was 0, so the name is due again a second after its lookup
    // (the time given here is past that; the background resolver may have asked already).
    dns.set(name, &[[127, 0, 0, 2]], 300);
    let table = kg.gateway().table.load_full();
    let later = resolve::monotonic_ms() + 1_000;
    resolve::refresh(table.routes.dns(), &kg.gateway().resolver, later, Which::Due).await;
    let (status, body) = get(&kg, "/pay/x").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "127.0.0.2"), "the new address serves");
    // Now a TTL of 300 s caps at the refresh interval (30 s): not due a second later.
    let asked = dns.queries();
    let n = resolve::refresh(table.routes.dns(), &kg.gateway().resolver, later + 1_000, Which::Due).await;
    assert_eq!((n, dns.queries()), (0, asked), "not due before the interval");
    let n = resolve::refresh(table.routes.dns(), &kg.gateway().resolver, later + 30_000, Which::Due).await;
    assert_eq!(n, 1, "due at the refresh interval");
}
