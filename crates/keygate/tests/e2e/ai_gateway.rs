//! The AI gateway end to end: a keygate with an `ai` route in front of the testkit's stand-in
//! provider (OpenAI's and Anthropic's wire formats), called with keygate tokens as virtual
//! keys. What the provider receives, what the client gets back, the limits and the budget, the
//! usage counted, and the failures: a provider's 429 (fallback), a refused provider key, a
//! suspended virtual key, a client that goes away in the middle of a stream.

use std::collections::BTreeMap;
use std::time::Duration;

use keygate_core::policy::QuotaPeriod;
use keygate_gateway::config::{AiBudget, AiRouteConfig, ModelPrice, ProviderConfig, ProviderKind, RouteKind};
use keygate_testkit::llm::LlmStandIn;
use keygate_testkit::{Options, StatusCode, TestKeygate, route};
use serde_json::{Value, json};

const OPENAI_KEY: &str = "sk-provider-openai-0123456789";
const ANTHROPIC_KEY: &str = "sk-ant-provider-0123456789";

/// The stand-in's providers, their keys in files (as mounted secrets are).
fn providers(s: &LlmStandIn, dir: &std::path::Path) -> Vec<ProviderConfig> {
    let (okey, akey) = (dir.join("openai.key"), dir.join("anthropic.key"));
    std::fs::write(&okey, format!("{OPENAI_KEY}\n")).unwrap();
    std::fs::write(&akey, ANTHROPIC_KEY).unwrap();
    let mut prices = BTreeMap::new();
    prices.insert("gpt-mini".to_owned(), ModelPrice { input: 1.0, output: 2.0, cached_input: None });
    let mut aprices = BTreeMap::new();
    aprices.insert("claude-small".to_owned(), ModelPrice { input: 3.0, output: 15.0, cached_input: None });
    vec![
        ProviderConfig {
            id: "openai".into(),
            kind: ProviderKind::Openai,
            base_url: s.openai_url(),
            api_key_env: None,
            api_key_file: Some(okey),
            api_version: None,
            prices,
        },
        ProviderConfig {
            id: "anthropic".into(),
            kind: ProviderKind::Anthropic,
            base_url: s.anthropic_url(),
            api_key_env: None,
            api_key_file: Some(akey),
            api_version: None,
            prices: aprices,
        },
    ]
}

fn ai_route(ai: AiRouteConfig) -> keygate::config::RouteConfig {
    let mut r = route("llm", "/llm", "http://unused.invalid");
    r.upstream = None;
    r.kind = RouteKind::Ai;
    r.ai = Some(ai);
    r
}

fn models() -> AiRouteConfig {
    let mut ai = AiRouteConfig::default();
    ai.models.insert("gpt-mini".into(), vec!["openai/gpt-mini".into()]);
    ai.models.insert("claude".into(), vec!["anthropic/claude-small".into()]);
    ai.models.insert("fast".into(), vec!["openai/gpt-mini".into(), "anthropic/claude-small".into()]);
    ai
}

async fn start(ai: AiRouteConfig) -> (TestKeygate, LlmStandIn, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = LlmStandIn::start(OPENAI_KEY, ANTHROPIC_KEY).await.unwrap();
    let providers = providers(&s, dir.path());
    let kg =
        TestKeygate::start_with(Options { routes: vec![ai_route(ai)], providers, ..Options::default() }).await.unwrap();
    (kg, s, dir)
}

async fn key(kg: &TestKeygate, scopes: &[&str]) -> (String, String) {
    let (id, secret) = kg.client().create_token(&json!({"name": "app", "scopes": scopes})).await;
    kg.sync_index().await.unwrap();
    (id, secret)
}

struct Got {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn call(kg: &TestKeygate, key: &str, path: &str, body: &Value) -> Got {
    let r = reqwest::Client::new()
        .post(format!("{}/llm{path}", kg.gateway_url()))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    Got { status, headers, text: r.text().await.unwrap() }
}

fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]})
}

/// The `data:` payloads of an SSE body.
fn data_lines(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn a_virtual_key_calls_openai_and_anthropic_models_in_the_openai_format() {
    let (kg, s, _dir) = start(models()).await;
    let (vk_id, vk) = key(&kg, &["llm:*"]).await;

    let g = call(&kg, &vk, "/v1/chat/completions", &chat("gpt-mini", "hello there")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let v = g.json();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello there");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(g.header("x-keygate-deployment"), Some("openai/gpt-mini"));
    // 4 input tokens at $1 and 3 output tokens at $2 a million: 10 micro-dollars.
    assert_eq!(g.header("x-keygate-cost-usd"), Some("0.000010"));
    // The provider saw keygate's key for it, never the virtual key, and the deployment's model.
    let got = s.received();
    let last = got.last().unwrap();
    assert_eq!(last.headers["authorization"], format!("Bearer {OPENAI_KEY}"));
    assert!(!format!("{:?}", last.headers).contains(&vk), "the virtual key reached the provider");
    assert_eq!(last.body["model"], "gpt-mini");

    // The same request to an Anthropic model: translated both ways.
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("claude", "hi you")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let v = g.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude");
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hi you");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let last = s.received().pop().unwrap();
    assert_eq!(last.path, "/anthropic/v1/messages");
    assert_eq!(last.headers["x-api-key"], ANTHROPIC_KEY);
    assert_eq!(last.body["system"], "be brief");
    assert_eq!(last.body["model"], "claude-small");
    assert!(last.body["max_tokens"].as_u64().is_some());

    // Tools: the Anthropic model's tool_use comes back as an OpenAI tool call.
    let mut req = chat("claude", "weather?");
    req["tools"] = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    let v = g.json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "weather");
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"q\":\"x\"}");

    // Embeddings and the model list.
    let g = call(&kg, &vk, "/v1/embeddings", &json!({"model": "gpt-mini", "input": ["a b", "c"]})).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert_eq!(g.json()["data"].as_array().unwrap().len(), 2);
    let list = reqwest::Client::new()
        .get(format!("{}/llm/v1/models", kg.gateway_url()))
        .bearer_auth(&vk)
        .send()
        .await
        .unwrap();
    let list: Value = list.json().await.unwrap();
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["claude", "fast", "gpt-mini"]);

    // Usage counted per deployment.
    let ai = kg.gateway().ai.clone().unwrap();
    let totals = ai.totals();
    let openai = totals.iter().find(|t| t.1 == "openai/gpt-mini").unwrap();
    assert_eq!(openai.2.requests, 2);
    assert_eq!(openai.2.input, 4 + 3);
    // The token's LLM usage through the admin API, before it reaches the store.
    let u = kg.client().get(&format!("/admin/v1/tokens/{vk_id}/llm-usage")).await;
    assert_eq!(u.status, StatusCode::OK, "{:?}", u.body);
    assert_eq!(u.body["total_requests"], 4, "{:?}", u.body);
    let rows = u.body["data"].as_array().unwrap();
    let gpt = rows.iter().find(|r| r["deployment"] == "openai/gpt-mini").unwrap();
    assert_eq!(gpt["requests"], 2);
    assert_eq!(gpt["input_tokens"], 7);
    assert!(u.body["total_cost_usd"].as_f64().unwrap() > 0.0);
    let bad = kg.client().get(&format!("/admin/v1/tokens/{vk_id}/llm-usage?from=yesterday")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let metrics = reqwest::get(format!("{}/metrics", kg.url())).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("keygate_llm_requests_total{route=\"llm\",deployment=\"openai/gpt-mini\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("keygate_llm_input_tokens_total{route=\"llm\",deployment=\"anthropic/claude-small\"}"));
    kg.stop().await;
}

#[tokio::test]
async fn streams_pass_as_they_come_with_their_usage_counted() {
    let (kg, s, _dir) = start(models()).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    let ai = kg.gateway().ai.clone().unwrap();

    // OpenAI: keygate asks for the usage chunk and keeps it from a client that did not.
    let mut req = chat("gpt-mini", "one two three");
    req["stream"] = json!(true);
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.header("content-type"), Some("text/event-stream"));
    let lines = data_lines(&g.text);
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    assert!(!g.text.contains("\"usage\""), "the client did not ask for usage: {}", g.text);
    assert_eq!(s.received().last().unwrap().body["stream_options"]["include_usage"], true);
    let t = ai.totals().into_iter().find(|t| t.1 == "openai/gpt-mini").unwrap().2;
    assert_eq!((t.input, t.output), (5, 4));

    // A client that asked for it gets it.
    req["stream_options"] = json!({"include_usage": true});
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    assert!(g.text.contains("\"usage\""), "{}", g.text);

    // Anthropic, streamed in the OpenAI format.
    let mut req = chat("claude", "alpha beta");
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    assert_eq!(g.status, StatusCode::OK);
    let lines = data_lines(&g.text);
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> =
        lines.iter().filter(|l| *l != "[DONE]").map(|l| serde_json::from_str(l).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "echo: alpha beta");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.iter().find(|c| c.get("usage").is_some()).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 4);
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    let t = ai.totals().into_iter().find(|t| t.1 == "anthropic/claude-small").unwrap().2;
    assert_eq!((t.input, t.output), (4, 3));

    // Anthropic's own Messages API passes through, its events as they are.
    let g = call(
        &kg,
        &vk,
        "/v1/messages",
        &json!({"model": "claude", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "x y"}]}),
    )
    .await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert!(g.text.contains("event: message_start"));
    assert!(g.text.contains("event: message_stop"));
    kg.stop().await;
}

#[tokio::test]
async fn models_need_their_scope_and_unknown_ones_are_named() {
    let (kg, _s, _dir) = start(models()).await;
    let (_, vk) = key(&kg, &["llm:gpt-mini"]).await;
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("gpt-mini", "hi")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("claude", "hi")).await;
    assert_eq!(g.status, StatusCode::FORBIDDEN);
    assert_eq!(g.json()["error"]["code"], "model_not_allowed");
    assert!(g.json()["error"]["message"].as_str().unwrap().contains("llm:claude"));
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("nope", "hi")).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    assert_eq!(g.json()["error"]["code"], "model_not_found");
    // Anthropic-shaped errors on the Messages API.
    let g = call(&kg, &vk, "/v1/messages", &json!({"model": "claude", "max_tokens": 5, "messages": []})).await;
    assert_eq!(g.status, StatusCode::FORBIDDEN);
    assert_eq!(g.json()["type"], "error");
    assert_eq!(g.json()["error"]["type"], "permission_error");
    // Malformed bodies.
    let g = call(&kg, &vk, "/v1/chat/completions", &json!(["not", "an", "object"])).await;
    assert_eq!(g.status, StatusCode::BAD_REQUEST);
    let g = call(&kg, &vk, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(g.status, StatusCode::BAD_REQUEST);
    let g = call(&kg, &vk, "/v1/unknown", &json!({})).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    assert_eq!(g.json()["error"]["code"], "unknown_endpoint");
    // A key without any llm scope.
    let (_, other) = key(&kg, &["orders:read"]).await;
    let g = call(&kg, &other, "/v1/chat/completions", &chat("gpt-mini", "hi")).await;
    assert_eq!(g.status, StatusCode::FORBIDDEN);
    kg.stop().await;
}

#[tokio::test]
async fn a_429_of_the_first_deployment_falls_back_to_the_next() {
    let (kg, s, _dir) = start(models()).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    s.fail_next("/chat/completions", 429, 1);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("fast", "go")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert_eq!(g.header("x-keygate-deployment"), Some("anthropic/claude-small"));
    assert_eq!(g.header("x-keygate-fallbacks"), Some("1"));
    assert_eq!(g.json()["choices"][0]["message"]["content"], "echo: go");
    // A 429 of the last deployment reaches the client as it is.
    s.fail_next("/messages", 429, 1);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("claude", "go")).await;
    assert_eq!(g.status, StatusCode::TOO_MANY_REQUESTS);
    let ai = kg.gateway().ai.clone().unwrap();
    let t = ai.totals().into_iter().find(|t| t.1 == "anthropic/claude-small").unwrap().2;
    assert_eq!((t.requests, t.fallbacks, t.errors), (2, 1, 1));
    kg.stop().await;
}

#[tokio::test]
async fn the_budget_is_spent_and_then_refused_before_the_provider_is_called() {
    let mut ai = models();
    // claude-small: $3 in, $15 out a million tokens; a call here costs about 100 micro-dollars.
    ai.budget = Some(AiBudget { usd: 0.0002, period: QuotaPeriod::Month });
    let (kg, s, _dir) = start(ai).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    let mut n = 0;
    let refused = loop {
        let mut req = chat("claude", "a b c d e f g h");
        req["max_tokens"] = json!(10);
        let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
        if g.status != StatusCode::OK {
            break g;
        }
        n += 1;
        let left: f64 = g.header("x-keygate-budget-remaining-usd").unwrap().parse().unwrap();
        assert!(left < 0.0002);
        assert!(n < 10, "the budget was never reached");
    };
    assert!(n >= 1);
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json()["error"]["code"], "budget_exceeded");
    assert_eq!(refused.json()["error"]["type"], "insufficient_quota");
    assert!(refused.header("retry-after").is_some());
    let calls_before = s.received().len();
    let again = call(&kg, &vk, "/v1/chat/completions", &chat("claude", "x")).await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(s.received().len(), calls_before, "a refused call reached the provider");
    // Another key has its own budget.
    let (_, other) = key(&kg, &["llm:*"]).await;
    assert_eq!(call(&kg, &other, "/v1/chat/completions", &chat("claude", "x")).await.status, StatusCode::OK);
    // The next month starts again.
    kg.clock.advance_seconds(32 * 86_400);
    assert_eq!(call(&kg, &vk, "/v1/chat/completions", &chat("claude", "x")).await.status, StatusCode::OK);
    kg.stop().await;
}

#[tokio::test]
async fn llm_tokens_per_minute_are_settled_from_the_usage() {
    let mut ai = models();
    ai.tokens_per_minute = Some(200);
    let (kg, _s, _dir) = start(ai).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    // Each call is estimated at its bytes / 4 plus max_tokens (60), about 90: without the
    // settling the third would not fit in 200; its real usage (5 tokens) gives most back.
    let mut req = chat("gpt-mini", "hello");
    req["max_tokens"] = json!(60);
    for i in 0..3 {
        let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
        assert_eq!(g.status, StatusCode::OK, "call {i}: {}", g.text);
    }
    // A call whose estimate is over what is left is refused, with when to try again.
    req["max_tokens"] = json!(190);
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    assert_eq!(g.status, StatusCode::TOO_MANY_REQUESTS, "{}", g.text);
    assert_eq!(g.json()["error"]["code"], "llm_tokens_per_minute_exceeded");
    assert!(g.header("retry-after").is_some());
    kg.clock.advance_seconds(60);
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    kg.stop().await;
}

#[tokio::test]
async fn suspended_virtual_keys_and_refused_provider_keys() {
    let (kg, s, _dir) = start(models()).await;
    let (id, vk) = key(&kg, &["llm:*"]).await;
    let c = kg.client();
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/suspend"), &json!({})).await.status, StatusCode::OK);
    kg.sync_index().await.unwrap();
    let calls = s.received().len();
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("gpt-mini", "hi")).await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.received().len(), calls);

    let (_, vk2) = key(&kg, &["llm:*"]).await;
    // The provider revokes keygate's key: the caller is told it is not its own key's fault.
    s.set_openai_key("sk-rotated");
    let g = call(&kg, &vk2, "/v1/chat/completions", &chat("gpt-mini", "hi")).await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY, "{}", g.text);
    assert_eq!(g.json()["error"]["code"], "provider_auth_failed");
    assert!(!g.text.contains(OPENAI_KEY));
    kg.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_is_counted_for_what_it_got() {
    let (kg, s, _dir) = start(models()).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    let words = "[slow] ".to_owned() + &"w ".repeat(200);
    let mut req = chat("claude", &words);
    req["stream"] = json!(true);
    let mut r = reqwest::Client::new()
        .post(format!("{}/llm/v1/chat/completions", kg.gateway_url()))
        .bearer_auth(&vk)
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A few pieces, then away.
    let mut got = 0;
    while got < 3 {
        if r.chunk().await.unwrap().is_some() {
            got += 1;
        }
    }
    drop(r);
    let ai = kg.gateway().ai.clone().unwrap();
    // Settled when keygate notices (its next write fails): wait for it, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let t = loop {
        if let Some(t) = ai.totals().into_iter().find(|t| t.1 == "anthropic/claude-small").map(|t| t.2)
            && t.input > 0
        {
            break t;
        }
        assert!(tokio::time::Instant::now() < deadline, "the aborted stream was never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The input was known from message_start; the output counts the pieces delivered, not the
    // 201 words of the whole answer.
    assert!(t.input > 200, "{t:?}");
    assert!(t.output >= 1 && t.output < 201, "{t:?}");
    assert!(t.micro_usd > 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while s.aborted() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the provider's stream was not ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kg.stop().await;
}

#[tokio::test]
async fn spending_and_usage_are_stored_and_budgets_hold_across_a_restart() {
    let mut ai = models();
    ai.budget = Some(AiBudget { usd: 0.0002, period: QuotaPeriod::Month });
    let dir = tempfile::tempdir().unwrap();
    let s = LlmStandIn::start(OPENAI_KEY, ANTHROPIC_KEY).await.unwrap();
    let opts = Options {
        routes: vec![ai_route(ai)],
        providers: providers(&s, dir.path()),
        data_dir: Some(dir.path().join("data")),
        ..Options::default()
    };
    let kg = TestKeygate::start_with(opts.clone()).await.unwrap();
    let (id, vk) = key(&kg, &["llm:*"]).await;
    let mut n = 0;
    while call(&kg, &vk, "/v1/chat/completions", &chat("claude", "a b c d e f g h")).await.status == StatusCode::OK {
        n += 1;
        assert!(n < 10);
    }
    kg.flush_usage().await;
    let token = keygate_core::ids::TokenId::from_trusted(id.clone());
    let ws = kg.store().workspace_by_name("default").await.unwrap().unwrap().id;
    let stored = kg.store().llm_usage(&ws, &token, 0, i64::MAX).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].deployment, "anthropic/claude-small");
    assert_eq!(stored[0].requests, n);
    assert_eq!(stored[0].input_tokens, 10 * n, "be brief + 8 words, each call");
    assert!(stored[0].micro_usd > 0);
    let u = kg.client().get(&format!("/admin/v1/tokens/{id}/llm-usage")).await;
    assert_eq!(u.body["total_requests"], n, "the stored usage is not counted twice: {:?}", u.body);
    kg.stop().await;

    // A new start reads what was spent: the key is still over its budget.
    let kg = TestKeygate::start_with(opts).await.unwrap();
    kg.sync_index().await.unwrap();
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("claude", "x")).await;
    assert_eq!(g.status, StatusCode::TOO_MANY_REQUESTS, "{}", g.text);
    assert_eq!(g.json()["error"]["code"], "budget_exceeded");
    kg.stop().await;
}

#[tokio::test]
async fn an_app_budget_is_shared_by_the_apps_keys() {
    let mut ai = models();
    ai.app_budget = Some(AiBudget { usd: 0.0002, period: QuotaPeriod::Day });
    let (kg, _s, _dir) = start(ai).await;
    let c = kg.client();
    let app = |name: &'static str| {
        let c = c.clone();
        async move {
            let a = c.post("/admin/v1/apps", &json!({"name": name})).await;
            assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
            a.str("/id")
        }
    };
    let (a1, a2) = (app("one").await, app("two").await);
    let (_, k1) = c.create_token(&json!({"name": "k1", "app_id": a1, "scopes": ["llm:*"]})).await;
    let (_, k2) = c.create_token(&json!({"name": "k2", "app_id": a1, "scopes": ["llm:*"]})).await;
    let (_, k3) = c.create_token(&json!({"name": "k3", "app_id": a2, "scopes": ["llm:*"]})).await;
    kg.sync_index().await.unwrap();
    let mut n = 0;
    while call(&kg, &k1, "/v1/chat/completions", &chat("claude", "a b c d e f g h")).await.status == StatusCode::OK {
        n += 1;
        assert!(n < 10);
    }
    // The other key of the same app finds the budget spent; a key of another app does not.
    let g = call(&kg, &k2, "/v1/chat/completions", &chat("claude", "x")).await;
    assert_eq!(g.status, StatusCode::TOO_MANY_REQUESTS, "{}", g.text);
    assert!(g.json()["error"]["message"].as_str().unwrap().contains("this app"), "{}", g.text);
    let g = call(&kg, &k3, "/v1/chat/completions", &chat("claude", "x")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    // The next day starts again.
    kg.clock.advance_seconds(86_400);
    assert_eq!(call(&kg, &k2, "/v1/chat/completions", &chat("claude", "x")).await.status, StatusCode::OK);
    kg.stop().await;
}

#[tokio::test]
async fn round_robin_spreads_calls_over_a_models_deployments() {
    let mut ai = models();
    ai.balance = keygate_gateway::config::AiBalance::RoundRobin;
    let (kg, s, _dir) = start(ai).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    let mut served = Vec::new();
    for _ in 0..4 {
        let g = call(&kg, &vk, "/v1/chat/completions", &chat("fast", "hi")).await;
        assert_eq!(g.status, StatusCode::OK, "{}", g.text);
        served.push(g.header("x-keygate-deployment").unwrap().to_owned());
    }
    assert_eq!(served, ["openai/gpt-mini", "anthropic/claude-small", "openai/gpt-mini", "anthropic/claude-small"]);
    // A deployment that refuses still falls back to the other.
    s.fail_next("/chat/completions", 503, 1);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("fast", "hi")).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.header("x-keygate-deployment"), Some("anthropic/claude-small"));
    kg.stop().await;
}

/// Every file under `dir`, read whole: whether `needle` is in any of them.
fn any_file_holds(dir: &std::path::Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            any_file_holds(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[tokio::test]
async fn providers_made_through_the_api_keep_their_keys_sealed_serve_at_once_and_rotate() {
    let s = LlmStandIn::start(OPENAI_KEY, ANTHROPIC_KEY).await.unwrap();
    let kg = TestKeygate::start_with(Options {
        ai: Some(keygate::config::AiConfig { allow_private_providers: true }),
        ..Options::default()
    })
    .await
    .unwrap();
    let c = kg.client();
    let body = json!({
        "id": "oa", "kind": "openai", "base_url": s.openai_url(), "api_key": OPENAI_KEY,
        "prices": {"gpt-mini": {"input": 1.0, "output": 2.0}}
    });
    let made = c.post("/admin/v1/providers", &body).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    assert_eq!(made.body["source"], "api");
    assert_eq!(made.body["key_fingerprint"].as_str().unwrap().len(), 12);
    assert!(!made.body.to_string().contains(OPENAI_KEY), "the key is never shown again");
    let again = c.post("/admin/v1/providers", &body).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "provider_exists"));
    for (bad, code) in [
        (json!({"id": "x", "kind": "openai", "base_url": "ftp://h", "api_key": "k"}), "invalid_provider"),
        (json!({"id": "x", "kind": "azure", "base_url": "https://h.example", "api_key": "k"}), "invalid_provider"),
        (
            json!({"id": "x", "kind": "openai", "base_url": "https://h.example", "api_key": "a\nb"}),
            "invalid_provider_key",
        ),
        (
            json!({"id": "x", "kind": "openai", "base_url": "https://h.example", "api_key_env": "HOME"}),
            "invalid_provider",
        ),
        (json!({"id": "x", "kind": "openai", "base_url": "https://h.example", "colour": "red"}), "invalid_provider"),
    ] {
        let r = c.post("/admin/v1/providers", &bad).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, code), "{bad}: {:?}", r.body);
    }

    // An ai route made through the API calls it; the provider gets the key that was sealed.
    let route = json!({"id": "llm", "path": "/llm", "kind": "ai", "ai": {"models": {"m": ["oa/gpt-mini"]}}});
    let r = c.post("/admin/v1/routes", &route).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let unknown = json!({"id": "llm2", "path": "/llm2", "kind": "ai", "ai": {"models": {"m": ["nope/gpt-mini"]}}});
    let r = c.post("/admin/v1/routes", &unknown).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{:?}", r.body);
    let (_, vk) = key(&kg, &["llm:*"]).await;
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("m", "hello")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert_eq!(g.header("x-keygate-cost-usd"), Some("0.000007"), "3 tokens in at $1, 2 out at $2 a million");
    assert_eq!(s.received().last().unwrap().headers["authorization"], format!("Bearer {OPENAI_KEY}"));

    // The key is nowhere in the clear: not in the database's files, not in the audit trail.
    assert!(!any_file_holds(kg.data_dir(), OPENAI_KEY.as_bytes()), "the provider key is stored in the clear");
    let audit = c.get("/admin/v1/audit-events?limit=50").await;
    assert!(audit.body.to_string().contains("provider.create"), "{:?}", audit.body);
    assert!(!audit.body.to_string().contains(OPENAI_KEY));

    // The provider changes its key: calls fail until keygate has the new one, then go on.
    const NEW_KEY: &str = "sk-provider-openai-rotated-42";
    s.set_openai_key(NEW_KEY);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("m", "hello")).await;
    assert!(g.status.is_server_error() || g.status == StatusCode::UNAUTHORIZED, "{} {}", g.status, g.text);
    let rotated = c.post("/admin/v1/providers/oa/rotate-key", &json!({"api_key": NEW_KEY})).await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    assert_ne!(rotated.body["key_fingerprint"], made.body["key_fingerprint"]);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("m", "hello")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    assert_eq!(s.received().last().unwrap().headers["authorization"], format!("Bearer {NEW_KEY}"));

    // Fields change (the key stays); a price change shows in the next call's cost.
    let p = c
        .send(
            reqwest::Method::PATCH,
            "/admin/v1/providers/oa",
            Some(&json!({"prices": {"gpt-mini": {"input": 2.0, "output": 2.0}}})),
        )
        .await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    assert_eq!(p.body["key_fingerprint"], rotated.body["key_fingerprint"]);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("m", "hello")).await;
    assert_eq!(g.header("x-keygate-cost-usd"), Some("0.000010"));
    let p = c.send(reqwest::Method::PATCH, "/admin/v1/providers/oa", Some(&json!({"api_key": "x"}))).await;
    assert_eq!((p.status, p.code()), (StatusCode::BAD_REQUEST, "use_rotate_key"));

    // Another workspace neither sees it nor can route to it, not even by naming the deployment.
    let ws = c.post("/admin/v1/workspaces", &json!({"name": "other"})).await;
    assert_eq!(ws.status, StatusCode::CREATED, "{:?}", ws.body);
    let (_, other_key) = kg
        .admin()
        .create_root_key(
            "other",
            "o",
            keygate_core::model::Permission::ALL.to_vec(),
            &keygate_core::model::Actor::cli(),
        )
        .await
        .unwrap();
    let oc = kg.client_with(Some(other_key.expose()));
    assert_eq!(oc.get("/admin/v1/providers/oa").await.status, StatusCode::NOT_FOUND);
    let theirs = json!({"id": "theirs", "path": "/theirs", "kind": "ai", "ai": {"models": {"m": ["oa/gpt-mini"]}}});
    let r = oc.post("/admin/v1/routes", &theirs).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_route"), "{:?}", r.body);
    let open = json!({"id": "theirs", "path": "/theirs", "kind": "ai", "ai": {"models": {}}});
    let r = oc.post("/admin/v1/routes", &open).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let (_, their_vk) = oc.create_token(&json!({"name": "t", "scopes": ["llm:*"]})).await;
    kg.sync_index().await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/theirs/v1/chat/completions", kg.gateway_url()))
        .bearer_auth(&their_vk)
        .json(&chat("oa/gpt-mini", "hi"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(!status.is_success(), "another workspace's provider was called: {text}");
    assert!(text.contains("provider_unknown"), "{text}");

    // In use: not deleted; once no route names it, deleted with its key.
    let d = c.delete("/admin/v1/providers/oa").await;
    assert_eq!((d.status, d.code()), (StatusCode::CONFLICT, "provider_in_use"));
    assert_eq!(c.delete("/admin/v1/routes/llm").await.status, StatusCode::NO_CONTENT);
    assert_eq!(c.delete("/admin/v1/providers/oa").await.status, StatusCode::NO_CONTENT);
    assert_eq!(c.get("/admin/v1/providers/oa").await.status, StatusCode::NOT_FOUND);
    kg.stop().await;
}

#[tokio::test]
async fn providers_made_through_the_api_call_public_hosts_only_by_default() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    for url in [
        "http://127.0.0.1:9/v1",
        "https://10.1.2.3/v1",
        "https://169.254.169.254",
        "https://[::1]:8443",
        "https://localhost",
    ] {
        let r =
            c.post("/admin/v1/providers", &json!({"id": "p", "kind": "openai", "base_url": url, "api_key": "k"})).await;
        assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_provider"), "{url}: {:?}", r.body);
        assert!(r.body.to_string().contains("allow_private_providers"), "{:?}", r.body);
    }
    let ok = c
        .post(
            "/admin/v1/providers",
            &json!({"id": "p", "kind": "openai", "base_url": "https://api.example.com/v1", "api_key": "k"}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{:?}", ok.body);
    kg.stop().await;
}

#[tokio::test]
async fn owners_manage_providers_and_read_llm_usage_and_budgets_in_the_dashboard() {
    use crate::dashboard::{member, owner};
    let dir = tempfile::tempdir().unwrap();
    let s = LlmStandIn::start(OPENAI_KEY, ANTHROPIC_KEY).await.unwrap();
    let file = providers(&s, dir.path()).into_iter().filter(|p| p.id == "anthropic").collect();
    let kg = TestKeygate::start_with(Options {
        providers: file,
        ai: Some(keygate::config::AiConfig { allow_private_providers: true }),
        ..Options::default()
    })
    .await
    .unwrap();
    let mut own = owner(&kg).await;
    let mut dev = member(&kg, &mut own, "dev@example.com", "developer").await;
    assert_eq!(dev.get("/ai").await.status, StatusCode::FORBIDDEN, "developers do not manage providers");

    let page = own.get("/ai").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("id=\"provider-anthropic\"") && page.body.contains("config file"), "{}", page.body);
    let base = s.openai_url();
    let form = [
        ("id", "oa"),
        ("kind", "openai"),
        ("base_url", base.as_str()),
        ("api_key", OPENAI_KEY),
        ("api_version", ""),
        ("prices", "gpt-mini 1 2"),
    ];
    let p = own.submit("/ai", "/ai/providers", &form).await;
    assert_eq!(p.location.as_deref(), Some("/ai?msg=provider_created"), "{}", p.body);
    let page = own.get("/ai?msg=provider_created").await;
    assert!(page.body.contains("id=\"provider-oa\"") && page.body.contains("sha256 "), "{}", page.body);
    assert!(!page.body.contains(OPENAI_KEY), "the key is never shown again");
    let p = own.submit("/ai", "/ai/providers", &form).await;
    assert_eq!(p.status, StatusCode::CONFLICT, "{}", p.body);
    assert!(p.body.contains("already exists"));

    // A route with a budget per key calls it; the usage shows per provider and model, and on
    // the token's page with what is left of its budget.
    let route = json!({"id": "llm", "path": "/llm", "kind": "ai",
        "ai": {"models": {"m": ["oa/gpt-mini"]}, "budget": {"usd": 1.0, "period": "month"}}});
    assert_eq!(kg.client().post("/admin/v1/routes", &route).await.status, StatusCode::CREATED);
    let (vk_id, vk) = key(&kg, &["llm:*"]).await;
    for _ in 0..2 {
        assert_eq!(call(&kg, &vk, "/v1/chat/completions", &chat("m", "hello")).await.status, StatusCode::OK);
    }
    kg.flush_usage().await;
    let page = own.get("/ai").await;
    let row = page.between("<code>oa/gpt-mini</code>", "</tr>");
    assert!(row.starts_with("</td><td>2</td><td>0</td><td>0</td>"), "2 calls, none failed, no fallback: {row}");
    assert!(page.between("id=\"llm-total-cost\">", "<").starts_with("$0.0000"), "{}", page.body);
    assert!(page.body.contains("id=\"llm-chart\""));
    let token_page = own.get(&format!("/tokens/{vk_id}")).await;
    assert!(token_page.body.contains("LLM usage, last 30 days"), "{}", token_page.body);
    let budget = token_page.between("id=\"budget-llm\">", "</tr>");
    assert!(
        budget.contains("$1.00 a month") && budget.contains("$0.000014") && budget.contains("$0.999986"),
        "{budget}"
    );

    // A new key from the form; deleting a provider a route calls is refused with the reason.
    const NEW_KEY: &str = "sk-dashboard-rotated-7";
    s.set_openai_key(NEW_KEY);
    let p = own.submit("/ai", "/ai/providers/oa/rotate-key", &[("api_key", NEW_KEY)]).await;
    assert_eq!(p.location.as_deref(), Some("/ai?msg=provider_key_rotated"), "{}", p.body);
    assert_eq!(call(&kg, &vk, "/v1/chat/completions", &chat("m", "hello")).await.status, StatusCode::OK);
    let p = own.submit("/ai", "/ai/providers/oa/delete", &[]).await;
    assert_eq!(p.status, StatusCode::CONFLICT, "{}", p.body);
    assert!(
        p.body.contains("route &quot;llm&quot; calls provider") || p.body.contains("route \"llm\" calls provider"),
        "{}",
        p.body
    );
    let trail = kg.client().get("/admin/v1/audit-events?limit=50").await.body.to_string();
    assert!(trail.contains("provider.rotate_key") && !trail.contains(NEW_KEY), "{trail}");
    kg.stop().await;
}

#[tokio::test]
async fn budget_thresholds_are_announced_once_per_key_app_and_workspace() {
    let mut ai = models();
    // 7 micro-dollars a call ("hello": 3 tokens in at $1, 2 out at $2 a million).
    ai.budget = Some(AiBudget { usd: 0.00001, period: QuotaPeriod::Month });
    ai.app_budget = Some(AiBudget { usd: 0.00005, period: QuotaPeriod::Month });
    ai.workspace_budget = Some(AiBudget { usd: 0.000016, period: QuotaPeriod::Day });
    let (kg, _s, _dir) = start(ai).await;
    let app = kg.client().post("/admin/v1/apps", &json!({"name": "bot"})).await;
    let app_id = app.body["id"].as_str().unwrap().to_owned();
    let (tok, secret) = kg.client().create_token(&json!({"name": "k", "scopes": ["llm:*"], "app_id": app_id})).await;
    kg.sync_index().await.unwrap();
    let g = call(&kg, &secret, "/v1/chat/completions", &chat("gpt-mini", "hello")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    kg.flush_usage().await;
    let s = kg.admin().sweep_notices().await.unwrap();
    assert_eq!(s.budget, 0, "7 of 10 micro-dollars is under 80%");
    let g = call(&kg, &secret, "/v1/chat/completions", &chat("gpt-mini", "hello")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    kg.flush_usage().await;
    // The key: 14 of 10 (100%); the app: 14 of 50 (none); the workspace: 14 of 16 (80%).
    let s = kg.admin().sweep_notices().await.unwrap();
    assert_eq!(s.budget, 2, "{s:?}");
    assert_eq!(kg.admin().sweep_notices().await.unwrap().budget, 0, "each once");
    let trail = kg.client().get("/admin/v1/audit-events?limit=100").await.body;
    let events: Vec<&Value> =
        trail["data"].as_array().unwrap().iter().filter(|e| e["action"] == "budget.threshold").collect();
    assert_eq!(events.len(), 2, "{trail}");
    let key = events.iter().find(|e| e["target"] == tok.as_str()).expect("the key's budget");
    assert_eq!(key["after"]["threshold_percent"], 100);
    assert_eq!(key["after"]["budget_of"], "key");
    assert_eq!(key["after"]["route"], "llm");
    let ws = events.iter().find(|e| e["target"] == "llm").expect("the workspace's budget");
    assert_eq!(ws["after"]["threshold_percent"], 80);
    assert_eq!(ws["after"]["period"], "day");
    // The event type is one webhooks can subscribe to.
    let types = kg.client().get("/admin/v1/webhook-event-types").await.body.to_string();
    assert!(types.contains("budget.threshold"), "{types}");
    kg.stop().await;
}

#[tokio::test]
async fn a_prompt_is_a_rest_endpoint_with_its_own_scope_and_in_the_portal() {
    use keygate_gateway::config::AiPromptConfig;
    let mut ai = models();
    let prompt = |model: &str, json: bool| AiPromptConfig {
        model: model.into(),
        system: Some("Say what the text feels.".into()),
        template: "Text: {{text}}".into(),
        json,
        max_tokens: Some(20),
        temperature: Some(0.0),
        scope: None,
        description: Some("The sentiment of a text".into()),
    };
    ai.prompts.insert("sentiment".into(), prompt("gpt-mini", true));
    ai.prompts.insert("summary".into(), prompt("claude", false));
    let (kg, s, _dir) = start(ai).await;
    let (_, task) = key(&kg, &["prompt:sentiment"]).await;
    let post = |path: &'static str, key: String, body: Value| {
        let url = format!("{}/llm{path}", kg.gateway_url());
        async move {
            let r = reqwest::Client::new().post(url).bearer_auth(key).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // The endpoint fills the template, asks for JSON, and answers with the model's JSON.
    let (status, v) = post("/sentiment", task.clone(), json!({"text": "I love it"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"echo": "Text: I love it"}));
    let sent = s.received().pop().unwrap();
    assert_eq!(sent.body["messages"][0]["content"], "Say what the text feels.");
    assert_eq!(sent.body["messages"][1]["content"], "Text: I love it");
    assert_eq!(sent.body["response_format"]["type"], "json_object");
    assert_eq!(sent.body["max_tokens"], 20);
    // The prompt's scope is not the model's: the key cannot call the model itself, nor another prompt.
    let (status, v) = post("/v1/chat/completions", task.clone(), chat("gpt-mini", "hi")).await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("model_not_allowed")));
    let (status, v) = post("/summary", task.clone(), json!({"text": "x"})).await;
    assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("prompt_not_allowed")), "{v}");
    // Bad input names the field.
    let (status, v) = post("/sentiment", task.clone(), json!({"txt": "x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().unwrap().contains("\"txt\" is not a field"), "{v}");
    // A text prompt on an Anthropic model answers {"text": …}; the call is metered like any other.
    let (_, both) = key(&kg, &["prompt:*"]).await;
    let (status, v) = post("/summary", both, json!({"text": "long story"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"text": "echo: Text: long story"}));
    let totals = kg.gateway().ai.clone().unwrap().totals();
    assert!(totals.iter().any(|t| t.1 == "anthropic/claude-small" && t.2.requests == 1), "{totals:?}");

    // The developer portal shows the prompts as the API's operations.
    let mut own = crate::dashboard::owner(&kg).await;
    let page = own.get("/portal/llm").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("/llm/sentiment") && page.body.contains("The sentiment of a text"), "{}", page.body);
    kg.stop().await;
}

/// The tokens-per-minute limit of a virtual key holds across nodes that share Redis: what one
/// node took, another cannot take again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_tokens_per_minute_hold_across_nodes_that_share_redis() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    let dir = tempfile::tempdir().unwrap();
    let s = LlmStandIn::start(OPENAI_KEY, ANTHROPIC_KEY).await.unwrap();
    let prefix =
        format!("kgtest{}", keygate_core::token_format::random_base62(&keygate_core::secret::OsRandom, 10).unwrap());
    let redis_url = std::env::var("KEYGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = keygate::config::RedisConfig {
        url: Some(redis_url),
        key_prefix: prefix,
        wait_ms: 1_000,
        ..keygate::config::RedisConfig::default()
    };
    let mut ai = models();
    ai.tokens_per_minute = Some(12);
    let opts = Options {
        database_url: Some(db.url.clone()),
        redis: Some(redis),
        routes: vec![ai_route(ai)],
        providers: providers(&s, dir.path()),
        ..Options::default()
    };
    let a = TestKeygate::start_with(opts.clone()).await.unwrap();
    let b = TestKeygate::start_with(Options { data_dir: Some(a.data_dir().to_owned()), ..opts }).await.unwrap();
    let (_, vk) = a.client().create_token(&json!({"name": "k", "scopes": ["llm:*"]})).await;
    a.sync_index().await.unwrap();
    b.sync_index().await.unwrap();
    // The first call's estimate takes the whole minute's 12 tokens; its 7 used are settled.
    let g = call(&a, &vk, "/v1/chat/completions", &chat("gpt-mini", "hello there")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    // Another node has no minute of its own to give: refused (each node alone would admit it).
    let g = call(&b, &vk, "/v1/chat/completions", &chat("gpt-mini", "hello there")).await;
    assert_eq!(g.status, StatusCode::TOO_MANY_REQUESTS, "{}", g.text);
    assert_eq!(g.json()["error"]["code"], "llm_tokens_per_minute_exceeded");
    assert!(g.header("retry-after").is_some());
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_route_logs_prompts_and_answers_when_asked_and_only_then() {
    let mut ai = models();
    ai.log_prompts = true;
    ai.log_retention_days = Some(2);
    let (kg, _s, _dir) = start(ai).await;
    let (vk_id, vk) = key(&kg, &["llm:*"]).await;
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("gpt-mini", "secret plans")).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    // Streamed, through the Anthropic translation: the answer's text is put together.
    let mut req = chat("claude", "stream me");
    req["stream"] = json!(true);
    let g = call(&kg, &vk, "/v1/chat/completions", &req).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let g = call(&kg, &vk, "/v1/chat/completions", &chat("nope", "x")).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND, "a refusal before any call is not logged");
    kg.flush_usage().await;

    let logs = kg.client().get("/admin/v1/llm-logs?route=llm").await;
    assert_eq!(logs.status, StatusCode::OK, "{:?}", logs.body);
    let data = logs.body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2, "{:?}", logs.body);
    let streamed = &data[0];
    assert_eq!(streamed["model"], "claude");
    assert_eq!(streamed["deployment"], "anthropic/claude-small");
    assert_eq!(streamed["answer"], "echo: stream me");
    assert!(streamed["request"].as_str().unwrap().contains("stream me"));
    let plain = &data[1];
    assert_eq!(plain["token_id"], vk_id.as_str());
    assert_eq!(plain["status"], 200);
    assert!(plain["answer"].as_str().unwrap().contains("echo: secret plans"));
    assert_eq!(plain["input_tokens"], 4);
    assert!(!logs.body.to_string().contains(&vk), "the virtual key is never logged");
    assert!(!logs.body.to_string().contains(OPENAI_KEY), "nor the provider's key");
    // Kept for the route's retention, then gone.
    let at = plain["at"].as_str().unwrap().to_owned();
    let expires = plain["expires_at"].as_str().unwrap();
    assert!(expires > at.as_str());
    let page = kg.client().get(&format!("/admin/v1/llm-logs?limit=1&token_id={vk_id}")).await;
    assert_eq!(page.body["data"].as_array().unwrap().len(), 1);
    let next = page.body["next_cursor"].as_str().unwrap().to_owned();
    let page = kg.client().get(&format!("/admin/v1/llm-logs?limit=1&cursor={next}")).await;
    assert_eq!(page.body["data"][0]["model"], "gpt-mini");
    assert_eq!(kg.client().get("/admin/v1/llm-logs?cursor=x").await.status, StatusCode::BAD_REQUEST);
    // Owners read them on the AI page.
    let mut own = crate::dashboard::owner(&kg).await;
    let page = own.get("/ai").await;
    assert!(page.body.contains("id=\"llm-log-") && page.body.contains("echo: stream me"), "{}", page.body);
    kg.clock.advance_seconds(3 * 86_400);
    kg.cluster().housekeeping().await;
    let logs = kg.client().get("/admin/v1/llm-logs").await;
    assert!(logs.body["data"].as_array().unwrap().is_empty(), "{:?}", logs.body);
    kg.stop().await;
}

#[tokio::test]
async fn routes_log_nothing_unless_they_ask() {
    let (kg, _s, _dir) = start(models()).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    assert_eq!(call(&kg, &vk, "/v1/chat/completions", &chat("gpt-mini", "hi")).await.status, StatusCode::OK);
    kg.flush_usage().await;
    let logs = kg.client().get("/admin/v1/llm-logs").await;
    assert!(logs.body["data"].as_array().unwrap().is_empty(), "{:?}", logs.body);
    kg.stop().await;
}

#[tokio::test]
async fn anthropic_messages_reach_openai_models_translated_both_ways() {
    let (kg, s, _dir) = start(models()).await;
    let (_, vk) = key(&kg, &["llm:*"]).await;
    let req = json!({"model": "gpt-mini", "max_tokens": 50, "system": "be brief",
        "messages": [{"role": "user", "content": "hello there"}]});
    let g = call(&kg, &vk, "/v1/messages", &req).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let m = g.json();
    assert_eq!(m["type"], "message");
    assert_eq!(m["model"], "gpt-mini");
    assert_eq!(m["content"][0], json!({"type": "text", "text": "echo: hello there"}));
    assert_eq!(m["stop_reason"], "end_turn");
    assert_eq!(m["usage"]["output_tokens"], 3);
    let sent = s.received().pop().unwrap();
    assert_eq!(sent.path, "/openai/v1/chat/completions");
    assert_eq!(sent.body["messages"][0], json!({"role": "system", "content": "be brief"}));
    assert_eq!(sent.headers["authorization"], format!("Bearer {OPENAI_KEY}"));

    // Streamed: Anthropic's named events, the text and the usage at the end.
    let mut req = req.clone();
    req["stream"] = json!(true);
    let g = call(&kg, &vk, "/v1/messages", &req).await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.text);
    let names: Vec<&str> = g.text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(names.contains(&"content_block_delta") && names.contains(&"message_delta"), "{names:?}");
    let events: Vec<Value> = data_lines(&g.text).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String =
        events.iter().filter_map(|e| e.pointer("/delta/text").and_then(Value::as_str)).collect::<Vec<_>>().join("");
    assert_eq!(text, "echo: hello there");
    let end = events.iter().find(|e| e["type"] == "message_delta").unwrap();
    assert_eq!(end["usage"]["output_tokens"], 3);
    assert_eq!(end["delta"]["stop_reason"], "end_turn");
    assert_eq!(s.received().pop().unwrap().body["stream_options"]["include_usage"], true);

    // A provider's error comes back in Anthropic's shape.
    s.fail_next("/chat/completions", 400, 1);
    let g = call(
        &kg,
        &vk,
        "/v1/messages",
        &json!({"model": "gpt-mini", "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(g.status, StatusCode::BAD_REQUEST, "{}", g.text);
    assert_eq!(g.json()["type"], "error", "{}", g.text);
    kg.stop().await;
}

/// A virtual key bound to a DPoP key (RFC 9449) works on an `ai` route only with a proof by that
/// key, for that request; a stolen key without it is refused before any provider is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_bound_virtual_key_needs_its_proof() {
    use keygate_core::jose::{Alg, SigningKey};
    let (kg, s, _dir) = start(models()).await;
    let holder = SigningKey::generate(Alg::EdDSA, "").unwrap();
    let (_, vk) = kg
        .client()
        .create_token(&json!({"name": "bound", "scopes": ["llm:*"], "dpop_jkt": holder.public_jwk().thumbprint()}))
        .await;
    kg.sync_index().await.unwrap();
    let url = format!("{}/llm/v1/chat/completions", kg.gateway_url());
    let now = keygate_core::Clock::now(&kg.clock).as_millis() / 1000;
    let proof = |key: &SigningKey, jti: &str| {
        let jwk: Value = serde_json::from_str(&key.public_jwk().to_json()).unwrap();
        let claims = json!({"jti": jti, "htm": "POST", "htu": url, "iat": now, "ath": keygate_core::dpop::ath(&vk)});
        key.sign_claims(&json!({"typ": "dpop+jwt", "jwk": jwk}), &claims).unwrap()
    };
    let send = |proof: Option<String>| {
        let mut req = reqwest::Client::new()
            .post(&url)
            .header("authorization", format!("DPoP {vk}"))
            .json(&chat("gpt-mini", "hello"));
        if let Some(p) = proof {
            req = req.header("dpop", p);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    let before = s.received().len();
    let (status, body) = send(None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let thief = SigningKey::generate(Alg::EdDSA, "").unwrap();
    let (status, body) = send(Some(proof(&thief, "t-1"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "another key's proof: {body}");
    assert_eq!(s.received().len(), before, "no provider was called for a refused key");
    let good = proof(&holder, "h-1");
    let (status, body) = send(Some(good.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("echo: hello"));
    let (status, body) = send(Some(good)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a replayed proof: {body}");
    kg.stop().await;
}

#[tokio::test]
async fn a_tokens_own_budget_holds_over_every_route() {
    let (kg, _s, _dir) = start(models()).await;
    let c = kg.client();
    let second = json!({"id": "llm2", "path": "/llm2", "kind": "ai", "ai": {"models": {"m": ["openai/gpt-mini"]}}});
    assert_eq!(c.post("/admin/v1/routes", &second).await.status, StatusCode::CREATED);
    // 10 micro-dollars a month; a call costs 7.
    let made = c
        .post(
            "/admin/v1/tokens",
            &json!({"name": "capped", "scopes": ["llm:*"], "llm_budget": {"usd": 0.00001, "period": "month"}}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    assert_eq!(made.body["llm_budget"], json!({"usd": 0.00001, "period": "month"}));
    let (id, vk) = (made.body["id"].as_str().unwrap().to_owned(), made.body["token"].as_str().unwrap().to_owned());
    kg.sync_index().await.unwrap();
    let on = |path: &'static str| {
        let (url, vk) = (format!("{}{path}/v1/chat/completions", kg.gateway_url()), vk.clone());
        let model = if path == "/llm" { "gpt-mini" } else { "m" };
        async move {
            let r = reqwest::Client::new().post(url).bearer_auth(vk).json(&chat(model, "hello")).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    assert_eq!(on("/llm").await.0, StatusCode::OK);
    let (status, body) = on("/llm2").await;
    assert_eq!(status, StatusCode::OK, "7 of 10 spent: the other route may still spend: {body}");
    let (status, body) = on("/llm").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("budget_exceeded") && body.contains("its own budget"), "{body}");
    assert_eq!(on("/llm2").await.0, StatusCode::TOO_MANY_REQUESTS, "spent on every route");

    // The notice names no route; the token's page shows the budget spent.
    kg.flush_usage().await;
    assert_eq!(kg.admin().sweep_notices().await.unwrap().budget, 1);
    let trail = c.get("/admin/v1/audit-events?limit=50").await.body;
    let notice = trail["data"].as_array().unwrap().iter().find(|e| e["action"] == "budget.threshold").unwrap().clone();
    assert_eq!((notice["target"].as_str(), notice["after"]["route"].is_null()), (Some(id.as_str()), true));
    let mut own = crate::dashboard::owner(&kg).await;
    let page = own.get(&format!("/tokens/{id}")).await;
    let row = page.between("id=\"budget-own\">", "</tr>");
    assert!(row.contains("every route") && row.contains("$0.000014"), "{row}");

    // Lifted: calls go on.
    let r = c.send(reqwest::Method::PATCH, &format!("/admin/v1/tokens/{id}"), Some(&json!({"llm_budget": null}))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["llm_budget"].is_null());
    kg.sync_index().await.unwrap();
    assert_eq!(on("/llm").await.0, StatusCode::OK);
    for bad in [json!({"usd": -1, "period": "month"}), json!({"usd": 1, "period": "total"}), json!({"usd": 1})] {
        let r = c.post("/admin/v1/tokens", &json!({"name": "x", "llm_budget": bad})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {:?}", r.body);
    }
    kg.stop().await;
}

/// An app's own LLM budget (issue 17): all of its keys spend from it together, over every ai
/// route; once spent each is refused, whatever its own budget says; the notice names the app.
#[tokio::test]
async fn an_apps_own_budget_is_shared_by_its_keys_over_every_route() {
    let (kg, _s, _dir) = start(models()).await;
    let c = kg.client();
    let second = json!({"id": "llm2", "path": "/llm2", "kind": "ai", "ai": {"models": {"m": ["openai/gpt-mini"]}}});
    assert_eq!(c.post("/admin/v1/routes", &second).await.status, StatusCode::CREATED);
    // 10 micro-dollars a month for the whole app; a call costs 7.
    let app =
        c.post("/admin/v1/apps", &json!({"name": "team", "llm_budget": {"usd": 0.00001, "period": "month"}})).await;
    assert_eq!(app.status, StatusCode::CREATED, "{:?}", app.body);
    assert_eq!(app.body["llm_budget"], json!({"usd": 0.00001, "period": "month"}));
    let app_id = app.str("/id");
    let mut keys = Vec::new();
    for name in ["a", "b"] {
        let made = c.post("/admin/v1/tokens", &json!({"name": name, "scopes": ["llm:*"], "app_id": app_id})).await;
        keys.push(made.str("/token"));
    }
    kg.sync_index().await.unwrap();
    kg.routes().rebuild().await.unwrap();
    let on = |path: &'static str, vk: String| {
        let url = format!("{}{path}/v1/chat/completions", kg.gateway_url());
        let model = if path == "/llm" { "gpt-mini" } else { "m" };
        async move {
            let r = reqwest::Client::new().post(url).bearer_auth(vk).json(&chat(model, "hello")).send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    };
    assert_eq!(on("/llm", keys[0].clone()).await.0, StatusCode::OK);
    let (status, body) = on("/llm2", keys[1].clone()).await;
    assert_eq!(status, StatusCode::OK, "7 of 10 spent: the other key may still spend: {body}");
    let (status, body) = on("/llm", keys[1].clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("budget_exceeded") && body.contains("this app has spent its own budget"), "{body}");
    assert_eq!(on("/llm2", keys[0].clone()).await.0, StatusCode::TOO_MANY_REQUESTS, "spent for every key and route");

    // The notice names the app and no route.
    kg.flush_usage().await;
    assert_eq!(kg.admin().sweep_notices().await.unwrap().budget, 1);
    let trail = c.get("/admin/v1/audit-events?limit=50").await.body;
    let notice = trail["data"].as_array().unwrap().iter().find(|e| e["action"] == "budget.threshold").unwrap().clone();
    assert_eq!(
        (notice["target"].as_str(), notice["after"]["budget_of"].as_str()),
        (Some(app_id.as_str()), Some("app"))
    );
    assert!(notice["after"]["route"].is_null());

    // Lifted through the API: calls go on.
    let r = c.patch(&format!("/admin/v1/apps/{app_id}"), &json!({"llm_budget": null})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.body["llm_budget"].is_null());
    kg.routes().rebuild().await.unwrap();
    assert_eq!(on("/llm", keys[0].clone()).await.0, StatusCode::OK);
    let bad = c.post("/admin/v1/apps", &json!({"name": "x", "llm_budget": {"usd": -1, "period": "day"}})).await;
    assert_eq!((bad.status, bad.code()), (StatusCode::BAD_REQUEST, "invalid_llm_budget"));
    kg.stop().await;
}
