//! The call log (issue 15): every gateway call recorded off the request path, searched and
//! exported through the admin API and the dashboard; never a query value or a secret.

use keygate_testkit::recording::RecordingUpstream;
use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

async fn call(kg: &TestKeygate, path: &str, secret: Option<&str>, method: reqwest::Method) -> u16 {
    let mut r = reqwest::Client::new()
        .request(method, format!("{}{path}", kg.gateway_url()))
        .header("x-forwarded-for", "203.0.113.50");
    if let Some(s) = secret {
        r = r.bearer_auth(s);
    }
    r.send().await.unwrap().status().as_u16()
}

/// A gateway with the route `orders` (as `edit` leaves it) to a recording upstream, behind a
/// trusted proxy on 127.0.0.1 (so that `X-Forwarded-For` gives the client's address).
async fn start(edit: impl FnOnce(&mut keygate::config::RouteConfig)) -> (TestKeygate, RecordingUpstream) {
    let upstream = RecordingUpstream::start().await.unwrap();
    let mut orders = route("orders", "/orders", &upstream.url());
    edit(&mut orders);
    let kg = TestKeygate::start_with(Options {
        routes: vec![orders],
        gateway: Some(keygate::config::GatewayConfig {
            trusted_proxies: vec!["127.0.0.1".into()],
            ..Default::default()
        }),
        ..Options::default()
    })
    .await
    .unwrap();
    (kg, upstream)
}

/// The call log's export through the admin API (`query`: the query string, with its `?`).
async fn export(kg: &TestKeygate, query: &str) -> String {
    let url = format!("{}/admin/v1/calls/export{query}", kg.url());
    let r = reqwest::Client::new().get(url).bearer_auth(&kg.root_key).send().await.unwrap();
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_recorded_searched_and_exported_without_its_query() {
    let (kg, _upstream) = start(|orders| {
        orders.scopes.insert("DELETE".into(), "orders:delete".into());
    })
    .await;
    let c = kg.client();
    let (token, secret) = c.create_token(&json!({"name": "caller"})).await;
    let (other, other_secret) = c.create_token(&json!({"name": "quiet"})).await;
    kg.sync_index().await.unwrap();

    use reqwest::Method;
    assert_eq!(call(&kg, "/orders/7?password=hunter2&page=2", Some(&secret), Method::GET).await, 200);
    kg.clock.advance_seconds(1);
    assert_eq!(call(&kg, "/orders/./8/../9", Some(&secret), Method::GET).await, 200);
    kg.clock.advance_seconds(1);
    assert_eq!(call(&kg, "/orders/9", Some(&secret), Method::DELETE).await, 403);
    kg.clock.advance_seconds(1);
    assert_eq!(call(&kg, "/orders/1", None, Method::GET).await, 401);
    kg.clock.advance_seconds(1);
    assert_eq!(call(&kg, "/orders/2", Some(&other_secret), Method::POST).await, 200);
    // Written in batches off the request path (the test writes now instead of waiting a second).
    kg.write_calls(5).await;

    let mine = c.get(&format!("/admin/v1/calls?token_id={token}")).await;
    assert_eq!(mine.status, StatusCode::OK, "{:?}", mine.body);
    let list = mine.body["data"].as_array().unwrap().clone();
    assert_eq!(list.len(), 3, "{list:?}");
    let (del, norm, first) = (&list[0], &list[1], &list[2]);
    assert_eq!((first["method"].as_str(), first["path"].as_str()), (Some("GET"), Some("/orders/7")));
    assert_eq!(norm["path"], "/orders/9", "normalized");
    assert_eq!((first["status"].as_u64(), first["route"].as_str()), (Some(200), Some("orders")));
    assert_eq!(first["client_ip"], "203.0.113.50");
    assert!(first["latency_us"].as_u64().unwrap() > 0);
    assert!(first["app_id"].as_str().unwrap().starts_with("app_"));
    assert_eq!((del["status"].as_u64(), del["refusal"].as_str()), (Some(403), Some("insufficient_scope")));
    let all = c.get("/admin/v1/calls").await.body["data"].clone();
    assert_eq!(all.as_array().unwrap().len(), 5);
    let anonymous = all.as_array().unwrap().iter().find(|x| x["status"] == 401).unwrap();
    assert_eq!((anonymous["token_id"].clone(), anonymous["refusal"].as_str()), (Value::Null, Some("missing_token")));
    assert!(!all.to_string().contains("hunter2") && !all.to_string().contains(&secret), "no query, no secret");

    // Filters and pages.
    assert_eq!(c.get("/admin/v1/calls?status=4xx").await.body["data"].as_array().unwrap().len(), 2);
    assert_eq!(c.get("/admin/v1/calls?status=403").await.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(c.get("/admin/v1/calls?refused=false").await.body["data"].as_array().unwrap().len(), 3);
    assert_eq!(c.get(&format!("/admin/v1/calls?token_id={other}")).await.body["data"][0]["method"], "POST");
    let page = c.get("/admin/v1/calls?limit=2").await;
    let next = page.body["next_cursor"].as_str().unwrap().to_owned();
    let rest = c.get(&format!("/admin/v1/calls?limit=10&cursor={next}")).await;
    assert_eq!(rest.body["data"].as_array().unwrap().len(), 3);
    assert_eq!(c.get("/admin/v1/calls?status=7xx").await.code(), "invalid_query");
    assert_eq!(c.get("/admin/v1/calls?from=yesterday").await.code(), "invalid_query");

    // Export: JSON lines and CSV.
    let key = &kg.root_key;
    let jsonl = reqwest::Client::new()
        .get(format!("{}/admin/v1/calls/export?token_id={token}", kg.url()))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(jsonl.headers()["content-type"], "application/x-ndjson");
    let text = jsonl.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["path"], "/orders/7");
    let csv = export(&kg, "?format=csv&status=4xx").await;
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "id,at,token_id,app_id,route,method,path,status,latency_us,client_ip,refusal");
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows.iter().any(|r| r.contains(",\"401\",") && r.ends_with(",\"missing_token\"")), "{rows:?}");

    // Another workspace sees none of them.
    let ws2 = c.post("/admin/v1/workspaces", &json!({"name": "other"})).await;
    assert_eq!(ws2.status, StatusCode::CREATED, "{:?}", ws2.body);
    let key2 = kg.root_key("other", &[keygate_core::model::Permission::AuditRead]).await.unwrap();
    assert_eq!(kg.client_with(Some(&key2)).get("/admin/v1/calls").await.body["data"], json!([]));

    // The dashboard: the token's calls, and the same as a CSV download.
    let mut own = crate::dashboard::owner(&kg).await;
    let page = own.get(&format!("/calls?token_id={token}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("/orders/7") && page.body.contains("insufficient_scope"), "{}", page.body);
    assert!(!page.body.contains("hunter2"));
    let file = own.get(&format!("/calls/export?format=csv&token_id={token}")).await;
    assert_eq!(file.status, StatusCode::OK);
    assert_eq!(file.body.lines().count(), 4, "{}", file.body);
    let bad = own.get("/calls?status=nope").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

/// A token sent in the path (`/orders/<token>`), plainly or percent-encoded, is refused before
/// anything else and marked exposed, and neither the call log nor its export ever holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_the_path_is_refused_marked_exposed_and_never_recorded() {
    let (kg, upstream) = start(|_| {}).await;
    let c = kg.client();
    let (token, secret) = c.create_token(&json!({"name": "pasted"})).await;
    kg.sync_index().await.unwrap();
    use reqwest::Method;
    let encoded: String = secret.bytes().map(|b| format!("%{b:02X}")).collect();
    for path in [format!("/orders/{secret}"), format!("/orders/by-key/{encoded}/items")] {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", kg.gateway_url()))
            .bearer_auth(&secret)
            .header("x-forwarded-for", "203.0.113.50")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "token_in_path", "{body}");
    }
    // Over HTTP/2 (prior knowledge) too: `:path` goes through the same check.
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2.get(format!("{}/orders/{secret}", kg.gateway_url())).bearer_auth(&secret).send().await.unwrap();
    assert_eq!((r.version(), r.status()), (reqwest::Version::HTTP_2, StatusCode::BAD_REQUEST));
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "token_in_path");
    // Refused before the framing is checked, so the connection is closed after the answer: a
    // body of two lengths is never read as a next request (no smuggling past the refusal).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = kg.gateway_url().trim_start_matches("http://").to_owned();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /orders/{secret} HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\nContent-Length: 0\r\n\r\n\
             GET /orders/2 HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "the connection was closed");
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 400 ") && text.contains("token_in_path"), "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "one answer, then closed: {text}");
    }
    assert!(upstream.requests().is_empty(), "nothing was forwarded");
    // A call of the same token the right way is recorded as usual, beside them.
    assert_eq!(call(&kg, "/orders/1", Some(&secret), Method::GET).await, 200);
    kg.write_calls(1).await;

    // Marked exposed, with where (never the path itself) in the audit trail.
    let mut exposed = Value::Null;
    for _ in 0..400 {
        exposed = c.get(&format!("/admin/v1/audit-events?target={token}&action=token.exposed")).await.body;
        if exposed["data"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(exposed["data"][0]["after"]["location"], "gateway: path of a GET request", "{exposed}");
    assert!(c.get(&format!("/admin/v1/tokens/{token}")).await.body["exposed_at"].is_string());

    // Neither the call log nor its export holds the secret, in any encoding.
    let all = c.get("/admin/v1/calls").await.body.to_string();
    let exported = export(&kg, "").await;
    assert!(exported.contains("/orders/1"), "{exported}");
    for text in [&all, &exported, &exposed.to_string()] {
        assert!(!text.contains(&secret) && !text.contains(&encoded), "no secret: {text}");
    }
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keygate_gateway_refusals_total{reason=\"token_in_path\"} 4"), "{metrics}");
}
