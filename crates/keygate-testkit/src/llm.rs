//! A stand-in LLM provider on an ephemeral port, following the published wire formats: OpenAI's
//! chat completions, completions, embeddings and Responses API under `/openai/v1`, and
//! Anthropic's Messages API under `/anthropic/v1`, streaming included (OpenAI's `data:` chunks
//! with `stream_options.include_usage`, Anthropic's named events). Its answers are
//! deterministic: the text is `echo: ` and the last user message's words; a token is a word
//! (input: the words of every message; output: the words of the answer). With `tools` in the
//! request and no tool result yet, it calls the first tool. In JSON mode (`response_format` of
//! type `json_object`) the chat answer is `{"echo": "<the words>"}`.
//!
//! Knobs for tests: the key each API accepts, [`LlmStandIn::fail_next`] (the next calls answer
//! a status), and a user message holding `[slow]` streams a word every 50 ms.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// A request the stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Default)]
struct Shared {
    received: Vec<Received>,
    /// (path suffix, status, how many more).
    failures: Vec<(String, u16, u32)>,
    openai_key: String,
    anthropic_key: String,
    /// Streams that ended early (the client went away).
    aborted: u32,
}

/// The stand-in provider.
pub struct LlmStandIn {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

type St = Arc<Mutex<Shared>>;

impl LlmStandIn {
    /// Starts it, accepting `openai_key` (as `Authorization: Bearer`) and `anthropic_key` (as
    /// `x-api-key`).
    pub async fn start(openai_key: &str, anthropic_key: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared {
            openai_key: openai_key.into(),
            anthropic_key: anthropic_key.into(),
            ..Shared::default()
        }));
        let app = axum::Router::new()
            .route("/openai/v1/chat/completions", post(chat))
            .route("/openai/v1/completions", post(completions))
            .route("/openai/v1/embeddings", post(embeddings))
            .route("/openai/v1/responses", post(responses))
            .route("/anthropic/v1/messages", post(messages))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// The base URL of its OpenAI API (`…/openai/v1`).
    pub fn openai_url(&self) -> String {
        format!("http://{}/openai/v1", self.addr)
    }

    /// The base URL of its Anthropic API (`…/anthropic/v1`).
    pub fn anthropic_url(&self) -> String {
        format!("http://{}/anthropic/v1", self.addr)
    }

    /// The next `n` calls to a path ending in `path_suffix` answer `status`.
    pub fn fail_next(&self, path_suffix: &str, status: u16, n: u32) {
        self.shared.lock().failures.push((path_suffix.into(), status, n));
    }

    /// Changes the key the OpenAI API accepts (as a provider does when a key is revoked).
    pub fn set_openai_key(&self, key: &str) {
        self.shared.lock().openai_key = key.into();
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// Streams that ended because their client went away.
    pub fn aborted(&self) -> u32 {
        self.shared.lock().aborted
    }
}

impl Drop for LlmStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Records the request; answers the failure or the refusal of a wrong key, if any.
fn admit(st: &St, path: &str, headers: &HeaderMap, body: &Value, anthropic: bool) -> Option<Response> {
    let mut s = st.lock();
    s.received.push(Received { path: path.into(), headers: headers.clone(), body: body.clone() });
    if let Some(f) = s.failures.iter_mut().find(|f| path.ends_with(&f.0) && f.2 > 0) {
        f.2 -= 1;
        let status = StatusCode::from_u16(f.1).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Some(error(status, "rate_limit_error", "the stand-in was told to fail", anthropic));
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let ok = if anthropic {
        h("x-api-key") == s.anthropic_key && !h("anthropic-version").is_empty()
    } else {
        h("authorization") == format!("Bearer {}", s.openai_key)
    };
    (!ok).then(|| error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key", anthropic))
}

fn error(status: StatusCode, kind: &str, message: &str, anthropic: bool) -> Response {
    let body = if anthropic {
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
    };
    (status, axum::Json(body)).into_response()
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// The text of a message content (a string, or parts / blocks with text).
fn text(c: &Value) -> String {
    match c {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").or_else(|| p.get("content")).and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The input words of a request's messages (and system prompt) and the last user text.
fn read_messages(body: &Value) -> (u64, String, bool) {
    let mut input = body.get("system").map_or(0, |s| words(&text(s)));
    let mut last_user = String::new();
    let mut tool_result = false;
    for m in body.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let t = text(m.get("content").unwrap_or(&Value::Null));
        input += words(&t);
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        let blocks = m.get("content").and_then(Value::as_array);
        let has_result =
            blocks.is_some_and(|b| b.iter().any(|x| x.get("type").and_then(Value::as_str) == Some("tool_result")));
        if role == "tool" || has_result {
            tool_result = true;
        }
        if role == "user" && !has_result {
            last_user = t;
            tool_result = false;
        }
    }
    (input.max(1), last_user, tool_result)
}

fn reply_words(last_user: &str) -> Vec<String> {
    std::iter::once("echo:".to_owned()).chain(last_user.split_whitespace().map(str::to_owned)).collect()
}

fn first_tool(body: &Value) -> Option<String> {
    let t = body.get("tools")?.as_array()?.first()?;
    t.get("function").and_then(|f| f.get("name")).or_else(|| t.get("name")).and_then(Value::as_str).map(str::to_owned)
}

fn sse(events: Vec<(Option<String>, String)>, slow: bool, st: St) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for (name, data) in events {
            let mut s = String::new();
            if let Some(n) = name {
                s.push_str(&format!("event: {n}\n"));
            }
            s.push_str(&format!("data: {data}\n\n"));
            if tx.send(Ok(bytes::Bytes::from(s))).await.is_err() {
                st.lock().aborted += 1;
                return;
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let stream = futures_stream(rx);
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn futures_stream(
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    ReceiverStream(rx)
}

struct ReceiverStream(tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>);

impl futures_core::Stream for ReceiverStream {
    type Item = Result<bytes::Bytes, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

async fn chat(State(st): State<St>, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if let Some(r) = admit(&st, "/openai/v1/chat/completions", &headers, &body, false) {
        return r;
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
    let (input, last_user, tool_result) = read_messages(&body);
    let tool = if tool_result { None } else { first_tool(&body) };
    let reply = reply_words(&last_user);
    let output = if tool.is_some() { 5 } else { reply.len() as u64 };
    let usage = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output,
        "prompt_tokens_details": {"cached_tokens": 0}});
    let id = "chatcmpl-standin";
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let message = match &tool {
            Some(name) => {
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": name, "arguments": "{\"q\":\"x\"}"}}]})
            }
            // JSON mode (`response_format: {"type": "json_object"}`): the same words as a JSON
            // object, as OpenAI's JSON mode answers an object.
            None if body.pointer("/response_format/type").and_then(Value::as_str) == Some("json_object") => {
                json!({"role": "assistant", "content": json!({"echo": reply[1..].join(" ")}).to_string()})
            }
            None => json!({"role": "assistant", "content": reply.join(" ")}),
        };
        let finish = if tool.is_some() { "tool_calls" } else { "stop" };
        return axum::Json(json!({
            "id": id, "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let mut events = vec![(None, chunk(json!({"role": "assistant", "content": ""}), Value::Null))];
    match &tool {
        Some(name) => {
            events.push((
                None,
                chunk(
                    json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                "function": {"name": name, "arguments": ""}}]}),
                    Value::Null,
                ),
            ));
            events.push((
                None,
                chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":\"x\"}"}}]}), Value::Null),
            ));
            events.push((None, chunk(json!({}), json!("tool_calls"))));
        }
        None => {
            for (i, w) in reply.iter().enumerate() {
                let piece = if i == 0 { w.clone() } else { format!(" {w}") };
                events.push((None, chunk(json!({"content": piece}), Value::Null)));
            }
            events.push((None, chunk(json!({}), json!("stop"))));
        }
    }
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    if include_usage {
        events.push((
            None,
            json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "choices": [], "usage": usage})
            .to_string(),
        ));
    }
    events.push((None, "[DONE]".into()));
    sse(events, last_user.contains("[slow]"), st)
}

async fn completions(State(st): State<St>, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if let Some(r) = admit(&st, "/openai/v1/completions", &headers, &body, false) {
        return r;
    }
    let prompt = body.get("prompt").and_then(Value::as_str).unwrap_or_default();
    let reply = reply_words(prompt);
    let (input, output) = (words(prompt).max(1), reply.len() as u64);
    axum::Json(json!({
        "id": "cmpl-standin", "object": "text_completion", "created": 1_700_000_000, "model": body.get("model"),
        "choices": [{"text": reply.join(" "), "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output},
    }))
    .into_response()
}

async fn embeddings(State(st): State<St>, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if let Some(r) = admit(&st, "/openai/v1/embeddings", &headers, &body, false) {
        return r;
    }
    let inputs: Vec<String> = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap_or_default().to_owned()).collect(),
        _ => Vec::new(),
    };
    let tokens: u64 = inputs.iter().map(|s| words(s).max(1)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v: Vec<f64> = (0..8).map(|k| ((s.len() + k) % 7) as f64 / 7.0).collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data, "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
    .into_response()
}

async fn responses(State(st): State<St>, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if let Some(r) = admit(&st, "/openai/v1/responses", &headers, &body, false) {
        return r;
    }
    let input = text(body.get("input").unwrap_or(&Value::Null));
    let reply = reply_words(&input);
    let (i, o) = (words(&input).max(1), reply.len() as u64);
    axum::Json(json!({
        "id": "resp_standin", "object": "response", "created_at": 1_700_000_000, "status": "completed",
        "model": body.get("model"),
        "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": reply.join(" "), "annotations": []}]}],
        "usage": {"input_tokens": i, "output_tokens": o, "total_tokens": i + o,
            "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
    }))
    .into_response()
}

async fn messages(State(st): State<St>, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if let Some(r) = admit(&st, "/anthropic/v1/messages", &headers, &body, true) {
        return r;
    }
    if body.get("max_tokens").and_then(Value::as_u64).is_none() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "max_tokens: Field required", true);
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
    let (input, last_user, tool_result) = read_messages(&body);
    let tool = if tool_result { None } else { first_tool(&body) };
    let reply = reply_words(&last_user);
    let output = if tool.is_some() { 5 } else { reply.len() as u64 };
    let stop = if tool.is_some() { "tool_use" } else { "end_turn" };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        let content = match &tool {
            Some(name) => json!([{"type": "tool_use", "id": "toolu_1", "name": name, "input": {"q": "x"}}]),
            None => json!([{"type": "text", "text": reply.join(" ")}]),
        };
        return axum::Json(json!({
            "id": "msg_standin", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output, "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0},
        }))
        .into_response();
    }
    let ev = |name: &str, data: Value| (Some(name.to_owned()), data.to_string());
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_standin", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    match &tool {
        Some(name) => {
            events.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}}),
            ));
            events.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "{\"q\":\"x\"}"}}),
            ));
        }
        None => {
            events.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            for (i, w) in reply.iter().enumerate() {
                let piece = if i == 0 { w.clone() } else { format!(" {w}") };
                events.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
        }
    }
    events.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
        "usage": {"output_tokens": output}}),
    ));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    sse(events, last_user.contains("[slow]"), st)
}
