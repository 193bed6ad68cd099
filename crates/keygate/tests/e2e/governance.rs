//! Issue 17 (governance), from outside the process: plans whose limits are ceilings, limits an
//! app's tokens share, and tokens good for a number of uses.

use keygate_core::model::Permission;
use keygate_testkit::{Options, TestKeygate, route};
use serde_json::{Value, json};

/// `GET path` on the gateway with `token`: the status, the `RateLimit-Policy` and `RateLimit`
/// fields (joined), and the body.
async fn call(kg: &TestKeygate, path: &str, token: &str) -> (u16, String, String, Value) {
    let r = reqwest::Client::new().get(format!("{}{path}", kg.gateway_url())).bearer_auth(token).send().await.unwrap();
    let status = r.status().as_u16();
    let join = |name: &str| {
        r.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (policy, left) = (join("ratelimit-policy"), join("ratelimit"));
    (status, policy, left, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_limits_are_ceilings_below_the_owner() {
    let kg = TestKeygate::start().await.unwrap();
    let owner = kg.client();
    let plan = owner
        .post(
            "/admin/v1/plans",
            &json!({"name": "starter", "scopes": ["orders:*"],
                "rate_limit": {"requests": 10, "per_seconds": 60}, "quota": {"requests": 1000, "period": "day"}}),
        )
        .await;
    assert_eq!(plan.status.as_u16(), 201, "{:?}", plan.body);
    let plan_id = plan.str("/id");
    let app = owner.post("/admin/v1/apps", &json!({"name": "shop", "plan_id": plan_id})).await;
    let app_id = app.str("/id");

    // A key that may manage tokens and apps but not plans: held to the plan.
    let dev_key = kg
        .root_key(
            "default",
            &[Permission::TokensRead, Permission::TokensWrite, Permission::AppsRead, Permission::AppsWrite],
        )
        .await
        .unwrap();
    let dev = kg.client_with(Some(&dev_key));
    let above = json!({"name": "greedy", "app_id": app_id, "scopes": ["orders:read"],
        "rate_limit": {"requests": 20, "per_seconds": 60}});
    let r = dev.post("/admin/v1/tokens", &above).await;
    assert_eq!((r.status.as_u16(), r.code()), (403, "limit_above_plan"), "{:?}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("starter"), "names the plan: {:?}", r.body);
    let burst =
        json!({"name": "bursty", "app_id": app_id, "rate_limit": {"requests": 10, "per_seconds": 60, "burst": 1}});
    assert_eq!(dev.post("/admin/v1/tokens", &burst).await.code(), "limit_above_plan", "a larger bucket is more");
    let daily = json!({"name": "q", "app_id": app_id, "quota": {"requests": 40000, "period": "month"}});
    assert_eq!(
        dev.post("/admin/v1/tokens", &daily).await.code(),
        "limit_above_plan",
        "40000 a month can be 40000 a day"
    );

    // Within the plan, or nothing said (the plan's limits are the defaults): created.
    let (within, _) = dev
        .create_token(&json!({"name": "within", "app_id": app_id, "quota": {"requests": 900, "period": "month"}}))
        .await;
    let (plain, _) = dev.create_token(&json!({"name": "plain", "app_id": app_id})).await;
    let t = dev.get(&format!("/admin/v1/tokens/{plain}")).await;
    assert_eq!(t.body["rate_limit"], json!({"requests": 10, "per_seconds": 60, "burst": 0}));
    assert_eq!(t.body["quota"], json!({"requests": 1000, "period": "day"}));

    // Changes too: no raising, no taking the limit off; lowering is fine.
    let r = dev.patch(&format!("/admin/v1/tokens/{plain}"), &json!({"rate_limit": null})).await;
    assert_eq!((r.status.as_u16(), r.code()), (403, "limit_above_plan"), "no limit is more than the plan's");
    let r = dev
        .patch(&format!("/admin/v1/tokens/{plain}"), &json!({"rate_limit": {"requests": 5, "per_seconds": 60}}))
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    // The app's shared limit is held to the plan as well.
    let r = dev
        .patch(&format!("/admin/v1/apps/{app_id}"), &json!({"rate_limit": {"requests": 100, "per_seconds": 60}}))
        .await;
    assert_eq!(r.code(), "limit_above_plan");

    // The owner (a key that may change plans) may go above.
    let (generous, _) = owner
        .create_token(&json!({"name": "generous", "app_id": app_id, "rate_limit": {"requests": 50, "per_seconds": 60}}))
        .await;

    // Lowering the plan lowers what is above it, and says what it changed.
    let r = owner
        .patch(&format!("/admin/v1/plans/{plan_id}"), &json!({"rate_limit": {"requests": 4, "per_seconds": 60}}))
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    let adjusted = r.body["adjusted"].as_array().unwrap().clone();
    let lowered: Vec<(&str, &str)> =
        adjusted.iter().map(|a| (a["target"].as_str().unwrap(), a["field"].as_str().unwrap())).collect();
    for id in [&within, &plain, &generous] {
        assert!(lowered.contains(&(id.as_str(), "rate_limit")), "{id} lowered: {adjusted:?}");
    }
    assert!(!lowered.iter().any(|(_, f)| *f == "quota"), "the quota did not change: {adjusted:?}");
    let g = adjusted.iter().find(|a| a["target"] == generous.as_str()).unwrap();
    assert_eq!(g["before"]["requests"], 50);
    assert_eq!(g["after"], json!({"requests": 4, "per_seconds": 60, "burst": 0}));
    let t = owner.get(&format!("/admin/v1/tokens/{generous}")).await;
    assert_eq!(t.body["rate_limit"]["requests"], 4, "stored lowered");
    let audit = owner.get(&format!("/admin/v1/audit-events?target={generous}")).await;
    let events = audit.body["data"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["actor"] == "plan-policy" && e["action"] == "token.update"),
        "the lowering is audited: {events:?}"
    );
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_tokens_share_its_rate_limit_and_quota() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let kg =
        TestKeygate::start_with(Options { routes: vec![route("orders", "/orders", &up.url())], ..Options::default() })
            .await
            .unwrap();
    let c = kg.client();
    // Four requests an hour for the whole app, whichever of its tokens sends them.
    let app =
        c.post("/admin/v1/apps", &json!({"name": "team", "rate_limit": {"requests": 4, "per_seconds": 3600}})).await;
    assert_eq!(app.status.as_u16(), 201, "{:?}", app.body);
    assert_eq!(app.body["rate_limit"], json!({"requests": 4, "per_seconds": 3600, "burst": 0}));
    let app_id = app.str("/id");
    let (_, a) = c.create_token(&json!({"name": "a", "app_id": app_id})).await;
    let (_, b) = c.create_token(&json!({"name": "b", "app_id": app_id})).await;
    kg.sync_index().await.unwrap();
    kg.routes().rebuild().await.unwrap();
    let mut statuses = Vec::new();
    for t in [&a, &b, &a, &b, &a, &b] {
        let (status, policy, left, body) = call(&kg, "/orders/1", t).await;
        if statuses.len() == 3 {
            assert_eq!(policy, "\"app\";q=4;w=3600", "the app's limit is the one shown");
            assert_eq!(left.split(';').nth(1), Some("r=0"), "{left}");
        }
        if status == 429 {
            assert_eq!(body["error"]["code"], "rate_limited");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "four in all, not four each");

    // With the app's spent, its refusal is what shows, whatever the token's own says.
    let (_, own) = c
        .create_token(&json!({"name": "own", "app_id": app_id, "rate_limit": {"requests": 1, "per_seconds": 3600}}))
        .await;
    kg.sync_index().await.unwrap();
    let (status, policy, ..) = call(&kg, "/orders/1", &own).await;
    assert_eq!((status, policy.as_str()), (429, "\"app\";q=4;w=3600"), "the app is spent: its refusal shows");

    // The shared quota: three a day across the tokens, counted exactly.
    let r = c
        .patch(
            &format!("/admin/v1/apps/{app_id}"),
            &json!({"rate_limit": null, "quota": {"requests": 3, "period": "day"}}),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    kg.routes().rebuild().await.unwrap();
    let mut statuses = Vec::new();
    for t in [&a, &b, &a, &b] {
        let (status, policy, _, body) = call(&kg, "/orders/1", t).await;
        assert!(policy.contains("\"app_quota\";q=3;w=86400"), "{policy}");
        if status == 429 {
            assert_eq!(body["error"]["code"], "quota_exceeded");
            assert!(body["error"]["message"].as_str().unwrap().contains("app's shared"), "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 429]);

    // Invalid shared limits are refused like a token's.
    let r = c.patch(&format!("/admin/v1/apps/{app_id}"), &json!({"quota": {"requests": 0, "period": "day"}})).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_quota"));
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_use_token_stops_after_its_uses() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (id, once) = c.create_token(&json!({"name": "once", "max_uses": 1})).await;
    let (_, twice) = c.create_token(&json!({"name": "twice", "max_uses": 2})).await;
    kg.sync_index().await.unwrap();
    let (status, policy, left, _) = call(&kg, "/demo/echo", &once).await;
    assert_eq!(status, 200);
    assert!(policy.contains("\"uses\";q=1;w=0") && left.contains("\"uses\";r=0;t=0"), "{policy} / {left}");
    let (status, _, _, body) = call(&kg, "/demo/echo", &once).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("uses_exhausted")), "{body}");
    assert_eq!(call(&kg, "/demo/echo", &twice).await.0, 200);
    assert_eq!(call(&kg, "/demo/echo", &twice).await.0, 200);
    assert_eq!(call(&kg, "/demo/echo", &twice).await.0, 403);
    // Raising it gives the token more uses; the count so far stands.
    let r = c.patch(&format!("/admin/v1/tokens/{id}"), &json!({"max_uses": 2})).await;
    assert_eq!(r.body["max_uses"], 2);
    kg.sync_index().await.unwrap();
    assert_eq!(call(&kg, "/demo/echo", &once).await.0, 200);
    assert_eq!(call(&kg, "/demo/echo", &once).await.0, 403);
    for bad in [json!(0), json!(-1), json!(2_000_000_000u64)] {
        let r = c.post("/admin/v1/tokens", &json!({"name": "x", "max_uses": bad})).await;
        assert_eq!(r.status.as_u16(), 400, "{bad}: {:?}", r.body);
    }
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keygate_gateway_refusals_total{reason=\"uses_exhausted\"} 3"), "{metrics}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_token_rules_hold_for_every_creation_and_change() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let kg =
        TestKeygate::start_with(Options { routes: vec![route("orders", "/orders", &up.url())], ..Options::default() })
            .await
            .unwrap();
    let c = kg.client();
    let rules = json!({"require_expiry": true, "allowlist_required_for": ["payments:*"],
        "dpop_required_for": ["admin:write"], "max_active_tokens_per_app": 2});
    let r = c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/rules", Some(&rules)).await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    assert_eq!(c.get("/admin/v1/policy/rules").await.body["max_active_tokens_per_app"], 2);

    let refused = |body: Value, code: &'static str| {
        let c = c.clone();
        async move {
            let r = c.post("/admin/v1/tokens", &body).await;
            assert_eq!((r.status.as_u16(), r.code()), (409, code), "{body}: {:?}", r.body);
        }
    };
    refused(json!({"name": "forever"}), "expiry_required").await;
    refused(json!({"name": "p", "expires_in": 3600, "scopes": ["payments:charge"]}), "allowlist_required").await;
    refused(json!({"name": "p", "expires_in": 3600, "scopes": ["payments:*"]}), "allowlist_required").await;
    refused(json!({"name": "a", "expires_in": 3600, "scopes": ["admin:*"]}), "dpop_required").await;
    let (pay, _) = c
        .create_token(
            &json!({"name": "pay", "expires_in": 3600, "scopes": ["payments:charge"], "ip_allowlist": ["10.0.0.0/8"]}),
        )
        .await;
    c.create_token(&json!({"name": "read", "expires_in": 3600, "scopes": ["orders:read"]})).await;
    refused(json!({"name": "third", "expires_in": 3600}), "too_many_tokens").await;
    // Changes are checked too: the rules for the fields they touch.
    let r = c.patch(&format!("/admin/v1/tokens/{pay}"), &json!({"ip_allowlist": []})).await;
    assert_eq!(r.code(), "allowlist_required");
    let r = c.patch(&format!("/admin/v1/tokens/{pay}"), &json!({"expires_at": null})).await;
    assert_eq!(r.code(), "expiry_required");
    assert_eq!(c.patch(&format!("/admin/v1/tokens/{pay}"), &json!({"name": "payments"})).await.status.as_u16(), 200);
    let r = c.post(&format!("/admin/v1/tokens/{pay}/revoke"), &json!({})).await;
    assert_eq!(r.status.as_u16(), 200);
    c.create_token(&json!({"name": "third", "expires_in": 3600})).await;

    // The workspace's denylist: every route of the workspace, before any token work.
    let r =
        c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/rules", Some(&json!({"deny": ["127.0.0.0/8"]}))).await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    kg.routes().rebuild().await.unwrap();
    let get = || reqwest::get(format!("{}/orders/1", kg.gateway_url()));
    let r = get().await.unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "address_denied");
    let r = c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/rules", Some(&json!({}))).await;
    assert_eq!(r.body["deny"], json!([]));
    kg.routes().rebuild().await.unwrap();
    assert_eq!(get().await.unwrap().status().as_u16(), 401, "served again: asks for a token");
    for bad in [json!({"deny": ["nowhere"]}), json!({"allowlist_required_for": ["Not A Scope"]})] {
        let r = c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/rules", Some(&bad)).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_policy"), "{bad}");
    }
    let audit = c.get("/admin/v1/audit-events?action=workspace.policy_changed").await;
    assert_eq!(audit.body["data"].as_array().unwrap().len(), 3, "each change audited");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_tokens_are_flagged_suspended_and_reviewed() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let (idle, _) = c.create_token(&json!({"name": "idle", "scopes": ["orders:read"]})).await;
    let (busy, busy_secret) = c.create_token(&json!({"name": "busy", "scopes": ["orders:write"]})).await;
    let r = c
        .send(
            keygate_testkit::Method::PUT,
            "/admin/v1/policy/rules",
            Some(&json!({"dormant_days": 30, "suspend_dormant": true})),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    kg.sync_index().await.unwrap();
    kg.clock.advance_seconds(20 * 86_400);
    assert_eq!(call(&kg, "/demo/echo", &busy_secret).await.0, 200);
    // The gateway meters a call once it has answered it: wait until the use is recorded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        kg.flush_usage().await;
        if !c.get(&format!("/admin/v1/tokens/{busy}")).await.body["last_used_at"].is_null() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the call's use was never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    kg.clock.advance_seconds(15 * 86_400);
    // 35 days after creation: `idle` was never used, `busy` 15 days ago.
    let listed = c.get("/admin/v1/tokens?unused_days=30").await;
    let ids: Vec<&str> = listed.body["data"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [idle.as_str()], "only the unused token is dormant");
    let sweep = kg.admin().enforce_dormancy().await.unwrap();
    assert_eq!((sweep.flagged, sweep.suspended), (1, 1));
    assert_eq!(kg.admin().enforce_dormancy().await.unwrap().flagged, 0, "flagged once per dormant spell");
    let t = c.get(&format!("/admin/v1/tokens/{idle}")).await;
    assert_eq!(t.body["status"], "suspended");
    let audit = c.get(&format!("/admin/v1/audit-events?target={idle}")).await;
    let actions: Vec<&str> =
        audit.body["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"token.dormant") && actions.contains(&"token.suspend"), "{actions:?}");
    assert_eq!(c.get(&format!("/admin/v1/tokens/{busy}")).await.body["status"], "active");

    // The access review: every token, who holds it, its scopes and last use, oldest use first.
    let review = c.get("/admin/v1/access-review").await;
    let rows = review.body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["token"]["id"], idle.as_str());
    assert_eq!((rows[0]["dormant"].as_bool(), rows[1]["dormant"].as_bool()), (Some(true), Some(false)));
    assert_eq!(rows[1]["app_name"], "Default app");
    let csv = reqwest::Client::new()
        .get(format!("{}/admin/v1/access-review?format=csv", kg.url()))
        .bearer_auth(&kg.root_key)
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("token_id,name,app_id,app_name,owner,scopes,status,dormant"), "{text}");
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[1].contains(&format!("\"{idle}\"")) && lines[1].contains("\"suspended\",\"true\""), "{text}");
    assert!(lines[2].contains("\"orders:write\""), "{text}");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_adds_up_to_the_requests_sent_and_closes_with_the_month() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let mut orders = route("orders", "/orders", &up.url());
    orders.strip_prefix = true;
    let kg = TestKeygate::start_with(Options { routes: vec![orders], ..Options::default() }).await.unwrap();
    let c = kg.client();
    // 10.00 a month with 3 requests included, then 0.50 a request.
    let plan = c
        .post(
            "/admin/v1/plans",
            &json!({"name": "metered", "scopes": ["orders:*"],
                "pricing": {"currency": "USD", "flat_fee": 10, "included_requests": 3, "price_per_request": 0.5}}),
        )
        .await;
    assert_eq!(plan.status.as_u16(), 201, "{:?}", plan.body);
    assert_eq!(plan.body["pricing"]["price_per_request"], 0.5);
    let plan_id = plan.str("/id");
    let app = c.post("/admin/v1/apps", &json!({"name": "shop", "plan_id": plan_id})).await;
    let app_id = app.str("/id");
    let (a_id, a) = c.create_token(&json!({"name": "a", "app_id": app_id})).await;
    let (b_id, b) = c.create_token(&json!({"name": "b", "app_id": app_id})).await;
    let (_, other) = c.create_token(&json!({"name": "elsewhere"})).await;
    kg.sync_index().await.unwrap();
    for _ in 0..5 {
        assert_eq!(call(&kg, "/orders/1", &a).await.0, 200);
    }
    assert_eq!(call(&kg, "/orders/2", &b).await.0, 200);
    assert_eq!(call(&kg, "/orders/status/500", &b).await.0, 500, "counted, not charged");
    assert_eq!(call(&kg, "/orders/1", &other).await.0, 200, "another app's: not on this statement");

    // The gateway meters a call once it has answered it: flush until all seven are written.
    let period = keygate_core::billing::month_of(keygate_core::Clock::now(&kg.clock).as_millis());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let s = loop {
        kg.flush_usage().await;
        let s = c.get(&format!("/admin/v1/apps/{app_id}/statement?period={period}")).await;
        assert_eq!(s.status.as_u16(), 200, "{:?}", s.body);
        if s.body["requests"].as_u64() >= Some(7) || std::time::Instant::now() > deadline {
            break s.body;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!((s["requests"].as_u64(), s["billable_requests"].as_u64()), (Some(7), Some(6)));
    assert_eq!(s["server_errors"], 1);
    assert_eq!((s["closed"].as_bool(), s["currency"].as_str()), (Some(false), Some("USD")));
    let lines = s["lines"].as_array().unwrap();
    assert_eq!(lines[0]["amount"], "10.00");
    assert_eq!((lines[1]["quantity"].as_u64(), lines[1]["amount"].as_str()), (Some(3), Some("1.50")), "6 - 3 included");
    assert_eq!(s["total"], "11.50");
    let per_token: Vec<(String, u64)> = s["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_owned(), t["requests"].as_u64().unwrap()))
        .collect();
    let mut expected = vec![(a_id.clone(), 5), (b_id.clone(), 2)];
    expected.sort();
    assert_eq!(per_token, expected, "the totals add up from the tokens' requests");

    let csv = reqwest::Client::new()
        .get(format!("{}/admin/v1/apps/{app_id}/statement?period={period}&format=csv", kg.url()))
        .bearer_auth(&kg.root_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 4, "header, two lines, the total: {csv}");
    assert!(csv.lines().last().unwrap().contains("\"total\",\"\",\"\",\"11.50\",\"USD\""), "{csv}");

    // The month ends: its statement is closed once, with the prices of then.
    let next = keygate_core::billing::month(&period).unwrap().1;
    kg.clock.set(keygate_core::Timestamp::from_millis(next + 20 * 60_000));
    assert_eq!(kg.admin().close_billing_periods().await.unwrap(), 1);
    assert_eq!(kg.admin().close_billing_periods().await.unwrap(), 0, "once");
    let r =
        c.patch(&format!("/admin/v1/plans/{plan_id}"), &json!({"pricing": {"currency": "USD", "flat_fee": 99}})).await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    let closed = c.get(&format!("/admin/v1/apps/{app_id}/statement?period={period}")).await.body;
    assert_eq!((closed["closed"].as_bool(), closed["total"].as_str()), (Some(true), Some("11.50")));
    let events = c.get(&format!("/admin/v1/audit-events?action=billing.period_closed&target={app_id}")).await.body;
    let e = &events["data"][0];
    assert_eq!((e["after"]["period"].as_str(), e["after"]["total"].as_str()), (Some(period.as_str()), Some("11.50")));
    // The new month is priced by the new prices.
    let open = c.get(&format!("/admin/v1/apps/{app_id}/statement")).await.body;
    assert_eq!((open["requests"].as_u64(), open["total"].as_str()), (Some(0), Some("99.00")));
    for bad in ["2026-13", "26-01", "x"] {
        let r = c.get(&format!("/admin/v1/apps/{app_id}/statement?period={bad}")).await;
        assert_eq!(r.status.as_u16(), 400, "{bad}");
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_report_groups_consumption_by_api_app_token_and_day() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let api = c.post("/admin/v1/apis", &json!({"name": "orders", "versions": ["v1", "v2"]})).await;
    assert_eq!(api.status.as_u16(), 201, "{:?}", api.body);
    for (id, path, version) in [("orders-v1", "/v1/orders", "v1"), ("orders-v2", "/v2/orders", "v2")] {
        let r = c
            .post(
                "/admin/v1/routes",
                &json!({"id": id, "path": path, "upstream": up.url(), "api": "orders", "version": version}),
            )
            .await;
        assert_eq!(r.status.as_u16(), 201, "{:?}", r.body);
    }
    let r = c.post("/admin/v1/routes", &json!({"id": "misc", "path": "/misc", "upstream": up.url()})).await;
    assert_eq!(r.status.as_u16(), 201, "{:?}", r.body);
    let shop = c.post("/admin/v1/apps", &json!({"name": "shop"})).await.str("/id");
    let (a_id, a) = c.create_token(&json!({"name": "a", "app_id": shop})).await;
    let (_, b) = c.create_token(&json!({"name": "b"})).await;
    kg.sync_index().await.unwrap();
    let sent = [(&a, "/v1/orders/1", 3), (&a, "/v2/orders/1", 2), (&b, "/v1/orders/1", 1), (&b, "/misc/x", 4)];
    for (t, path, n) in sent {
        for _ in 0..n {
            assert_eq!(call(&kg, path, t).await.0, 200);
        }
    }
    let report = |by: &'static str| {
        let c = c.clone();
        async move { c.get(&format!("/admin/v1/reports/usage?by={by}")).await.body }
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        kg.flush_usage().await;
        if report("route").await["totals"]["requests"] == 10 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let pairs = |r: &Value| -> Vec<(String, u64)> {
        r["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (g["key"].as_str().unwrap().to_owned(), g["requests"].as_u64().unwrap()))
            .collect()
    };
    let by_api = report("api").await;
    assert_eq!(by_api["totals"]["requests"], 10);
    assert_eq!(
        pairs(&by_api),
        [("(no API)".to_owned(), 4), ("orders v1".to_owned(), 4), ("orders v2".to_owned(), 2)],
        "the top consumers first (ties by name)"
    );
    let by_app = pairs(&report("app").await);
    assert!(by_app.contains(&(shop.clone(), 5)), "{by_app:?}");
    let by_token = pairs(&report("token").await);
    assert!(by_token.contains(&(a_id, 5)), "{by_token:?}");
    let days = report("route").await["days"].clone();
    assert_eq!(days.as_array().unwrap().len(), 1);
    assert_eq!(days[0]["requests"], 10);
    assert!(days[0]["p50_ms"].is_u64(), "latency percentiles from the histogram: {days}");
    let by_dev = pairs(&report("developer").await);
    assert_eq!(by_dev.iter().map(|(_, n)| n).sum::<u64>(), 10, "{by_dev:?}");
    let csv = reqwest::Client::new()
        .get(format!("{}/admin/v1/reports/usage?by=api&format=csv", kg.url()))
        .bearer_auth(&kg.root_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with("key,requests,ok,client_errors,server_errors,p50_ms"), "{csv}");
    assert!(csv.contains("\"orders v1\",\"4\",\"4\",\"0\",\"0\""), "{csv}");
    assert_eq!(c.get("/admin/v1/reports/usage?by=planet").await.status.as_u16(), 400);

    // Refusals by reason: a revoked token three times, a missing token twice, on the
    // workspace's routes; a path no route serves belongs to no workspace and is not counted.
    let (revoked_id, revoked) = c.create_token(&json!({"name": "gone"})).await;
    c.post(&format!("/admin/v1/tokens/{revoked_id}/revoke"), &json!({})).await;
    kg.sync_index().await.unwrap();
    for _ in 0..3 {
        assert_eq!(call(&kg, "/misc/x", &revoked).await.0, 401);
    }
    for _ in 0..2 {
        let r = reqwest::Client::new().get(format!("{}/v1/orders/1", kg.gateway_url())).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    assert_eq!(call(&kg, "/nowhere", &a).await.0, 404);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let by_reason = loop {
        kg.flush_usage().await;
        let r = report("reason").await;
        if r["totals"]["requests"] == 5 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert_eq!(pairs(&by_reason), [("unknown_token".to_owned(), 3), ("missing_token".to_owned(), 2)], "{by_reason}");
    assert_eq!((by_reason["by"].as_str(), by_reason["totals"]["client_errors"].as_u64()), (Some("reason"), Some(5)));
    assert_eq!(by_reason["days"][0]["requests"], 5);
    kg.stop().await;
}

/// api-fuzz found it: an OAuth client's scopes were counted after duplicates went, so a list
/// longer than the document's 100 was accepted. Every scope list is bounded as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_lists_are_bounded_as_sent_for_oauth_clients_too() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let app = c.post("/admin/v1/apps", &json!({"name": "svc"})).await.str("/id");
    let many: Vec<&str> = vec!["orders:*"; 101];
    let r = c.post(&format!("/admin/v1/apps/{app}/oauth-client"), &json!({"scopes": many})).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_scope"), "{:?}", r.body);
    let r = c.post("/admin/v1/tokens", &json!({"name": "t", "scopes": many})).await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_scope"), "{:?}", r.body);
    let hundred: Vec<&str> = vec!["orders:*"; 100];
    let r = c.post(&format!("/admin/v1/apps/{app}/oauth-client"), &json!({"scopes": hundred})).await;
    assert_eq!(r.status.as_u16(), 201, "{:?}", r.body);
    kg.stop().await;
}
