//! Anthropic's Messages API (`/v1/messages`) for OpenAI-compatible models: the request
//! translated to a chat completion, the answer back to a message, and a streamed answer's
//! chunks back to Anthropic's named events — so the `anthropic` client library (and tools
//! built on it) can call any model. The other direction is in `wire.rs`. Pure functions over
//! JSON values, following the published shapes of both APIs.

use serde_json::{Map, Value, json};

use super::wire::{DEFAULT_MAX_TOKENS, Untranslatable, Usage, assistant_message, usage_of};

fn bad(m: &str) -> Untranslatable {
    Untranslatable(m.to_owned())
}

/// The text of an Anthropic content value: a string, or the text blocks of an array.
fn text_of(c: Option<&Value>) -> String {
    match c {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => {
            blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
        }
        _ => String::new(),
    }
}

/// An Anthropic image block as a chat `image_url` part.
fn image_part(b: &Value) -> Result<Value, Untranslatable> {
    let src = b.get("source").ok_or_else(|| bad("an image block needs a source"))?;
    let url = match src.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            src.get("media_type").and_then(Value::as_str).unwrap_or("image/png"),
            src.get("data").and_then(Value::as_str).unwrap_or_default()
        ),
        Some("url") => src.get("url").and_then(Value::as_str).unwrap_or_default().to_owned(),
        _ => return Err(bad("an image's source is base64 or url")),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// An Anthropic Messages request as a chat-completions request for `model`.
pub fn messages_to_chat(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    let msgs = req.get("messages").and_then(Value::as_array).ok_or_else(|| bad("messages must be an array"))?;
    let mut out: Vec<Value> = Vec::new();
    match req.get("system") {
        None | Some(Value::Null) => {}
        s @ Some(Value::String(_) | Value::Array(_)) => out.push(json!({"role": "system", "content": text_of(s)})),
        Some(_) => return Err(bad("system must be a string or an array of text blocks")),
    }
    for m in msgs {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad("each message needs a role"))?;
        let content = m.get("content");
        match role {
            "user" => {
                let Some(Value::Array(blocks)) = content else {
                    out.push(json!({"role": "user", "content": text_of(content)}));
                    continue;
                };
                let mut parts = Vec::new();
                for b in blocks {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            parts.push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or_default()}))
                        }
                        Some("image") => parts.push(image_part(b)?),
                        // Each tool result is a message of the tool role, before the user's text.
                        Some("tool_result") => out.push(json!({
                            "role": "tool",
                            "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null),
                            "content": text_of(b.get("content")),
                        })),
                        other => {
                            return Err(Untranslatable(format!(
                                "content blocks of type {other:?} cannot be sent to this model"
                            )));
                        }
                    }
                }
                if !parts.is_empty() {
                    out.push(json!({"role": "user", "content": parts}));
                }
            }
            "assistant" => match content {
                Some(Value::Array(blocks)) => out.push(assistant_message(blocks)),
                c => out.push(json!({"role": "assistant", "content": text_of(c)})),
            },
            other => return Err(Untranslatable(format!("unknown message role {other:?}"))),
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), Value::from(model));
    body.insert("messages".into(), Value::Array(out));
    let max = req.get("max_tokens").and_then(Value::as_u64).unwrap_or(DEFAULT_MAX_TOKENS);
    body.insert("max_tokens".into(), Value::from(max));
    for k in ["temperature", "top_p"] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            body.insert(k.into(), v.clone());
        }
    }
    if let Some(s) = req.get("stop_sequences").and_then(Value::as_array).filter(|a| !a.is_empty()) {
        body.insert("stop".into(), Value::Array(s.clone()));
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        body.insert("stream".into(), Value::Bool(true));
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter(|t| t.get("input_schema").is_some())
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), t.get("name").cloned().unwrap_or(Value::Null));
                if let Some(d) = t.get("description") {
                    f.insert("description".into(), d.clone());
                }
                f.insert("parameters".into(), t.get("input_schema").cloned().unwrap_or_default());
                json!({"type": "function", "function": Value::Object(f)})
            })
            .collect();
        if !tools.is_empty() {
            body.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = req.get("tool_choice") {
        let c = match choice.get("type").and_then(Value::as_str) {
            Some("auto") => Some(Value::from("auto")),
            Some("any") => Some(Value::from("required")),
            Some("none") => Some(Value::from("none")),
            Some("tool") => Some(json!({"type": "function", "function": {"name": choice.get("name")}})),
            _ => None,
        };
        if let Some(c) = c {
            body.insert("tool_choice".into(), c);
        }
    }
    if let Some(u) = req.get("metadata").and_then(|m| m.get("user_id")).and_then(Value::as_str) {
        body.insert("user".into(), Value::from(u));
    }
    Ok(Value::Object(body))
}

/// A chat completion's `finish_reason` as Anthropic's `stop_reason`.
pub fn stop_reason(finish: Option<&str>) -> Value {
    match finish {
        Some("stop") => Value::from("end_turn"),
        Some("length") => Value::from("max_tokens"),
        Some("tool_calls" | "function_call") => Value::from("tool_use"),
        Some("content_filter") => Value::from("refusal"),
        Some(other) => Value::from(other),
        None => Value::Null,
    }
}

/// Anthropic's usage object: input tokens without the cached ones, which are apart.
fn message_usage(u: Usage) -> Value {
    json!({
        "input_tokens": u.input.saturating_sub(u.cached_input),
        "output_tokens": u.output,
        "cache_read_input_tokens": u.cached_input,
        "cache_creation_input_tokens": 0,
    })
}

/// A chat tool call's arguments as a tool_use block's input (an object; `{}` if not one).
fn tool_input(args: Option<&Value>) -> Value {
    let parsed = args.and_then(Value::as_str).and_then(|a| serde_json::from_str::<Value>(a).ok());
    parsed.filter(Value::is_object).unwrap_or_else(|| json!({}))
}

/// A chat completion as an Anthropic message, named `model` (the name the client asked for).
pub fn chat_to_message(chat: &Value, model: &str) -> Value {
    let choice = chat.get("choices").and_then(|c| c.get(0));
    let msg = choice.and_then(|c| c.get("message"));
    let mut content = Vec::new();
    if let Some(t) = msg.and_then(|m| m.get("content")).and_then(Value::as_str).filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for call in msg.and_then(|m| m.get("tool_calls")).and_then(Value::as_array).into_iter().flatten() {
        let f = call.get("function");
        content.push(json!({
            "type": "tool_use",
            "id": call.get("id").cloned().unwrap_or(Value::Null),
            "name": f.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null),
            "input": tool_input(f.and_then(|f| f.get("arguments"))),
        }));
    }
    let usage = chat.get("usage").and_then(usage_of).unwrap_or_default();
    let id = chat.get("id").and_then(Value::as_str).unwrap_or("msg");
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": message_usage(usage),
    })
}

/// A chat-completions error body as Anthropic's (`{"type": "error", "error": {type, message}}`).
pub fn error_to_anthropic(body: &Value) -> Option<Value> {
    let e = body.get("error")?;
    let message = e.get("message").and_then(Value::as_str).unwrap_or("the provider refused the call");
    let kind = e.get("type").and_then(Value::as_str).unwrap_or("api_error");
    Some(json!({"type": "error", "error": {"type": kind, "message": message}}))
}

/// The block a stream has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Text,
    /// A tool call: its index among the chat's tool calls.
    Tool(u64),
}

/// Turns chat-completion chunks into Anthropic's streamed events, one chunk at a time.
#[derive(Debug)]
pub struct ChunksToEvents {
    model: String,
    started: bool,
    /// The index of the next content block.
    next_block: u64,
    open: Open,
    stop: Value,
    pub usage: Usage,
    pub done: bool,
}

/// An event: its name and its data.
pub type Event = (&'static str, Value);

impl ChunksToEvents {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_owned(),
            started: false,
            next_block: 0,
            open: Open::None,
            stop: Value::Null,
            usage: Usage::default(),
            done: false,
        }
    }

    fn start(&mut self, id: &str, out: &mut Vec<Event>) {
        if self.started {
            return;
        }
        self.started = true;
        out.push((
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null, "usage": message_usage(self.usage)}}),
        ));
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if self.open != Open::None {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": self.next_block.saturating_sub(1)}),
            ));
            self.open = Open::None;
        }
    }

    fn open_block(&mut self, block: Value, open: Open, out: &mut Vec<Event>) -> u64 {
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = open;
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    /// The events for one chunk's data.
    pub fn chunk(&mut self, data: &Value) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(u) = data.get("usage").and_then(usage_of) {
            self.usage.merge_max(u);
        }
        let id = data.get("id").and_then(Value::as_str).unwrap_or("msg").to_owned();
        self.start(&id, &mut out);
        let Some(choice) = data.get("choices").and_then(|c| c.get(0)) else { return out };
        let delta = choice.get("delta").cloned().unwrap_or_default();
        if let Some(t) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            let index = if self.open == Open::Text {
                self.next_block - 1
            } else {
                self.open_block(json!({"type": "text", "text": ""}), Open::Text, &mut out)
            };
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}}),
            ));
        }
        for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let i = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = call.get("function");
            let index = if self.open == Open::Tool(i) {
                self.next_block - 1
            } else {
                let block = json!({"type": "tool_use", "id": call.get("id").cloned().unwrap_or(Value::Null),
                    "name": f.and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null), "input": {}});
                self.open_block(block, Open::Tool(i), &mut out)
            };
            if let Some(args) = f.and_then(|f| f.get("arguments")).and_then(Value::as_str).filter(|a| !a.is_empty()) {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": args}}),
                ));
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop = stop_reason(Some(f));
            self.close(&mut out);
        }
        out
    }

    /// The events that end the message (at the stream's `[DONE]`).
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.done = true;
        self.start("msg", &mut out);
        self.close(&mut out);
        let stop = if self.stop.is_null() { Value::from("end_turn") } else { self.stop.clone() };
        out.push((
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": message_usage(self.usage)}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_request_becomes_a_chat_request() {
        let req = json!({
            "model": "fast", "max_tokens": 100, "system": [{"type": "text", "text": "be brief"}],
            "stop_sequences": ["END"], "temperature": 0.5, "stream": true, "metadata": {"user_id": "u1"},
            "tools": [{"name": "weather", "description": "w", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "weather"},
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "let me look"},
                    {"type": "tool_use", "id": "tu_1", "name": "weather", "input": {"q": "x"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1", "content": "sunny"},
                    {"type": "text", "text": "and?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}}]}
            ]
        });
        let c = messages_to_chat(&req, "gpt-4o").unwrap();
        assert_eq!(c["model"], "gpt-4o");
        assert_eq!(c["messages"][0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(c["messages"][1], json!({"role": "user", "content": "hi"}));
        assert_eq!(c["messages"][2]["content"], "let me look");
        assert_eq!(c["messages"][2]["tool_calls"][0]["function"]["arguments"], "{\"q\":\"x\"}");
        assert_eq!(c["messages"][3], json!({"role": "tool", "tool_call_id": "tu_1", "content": "sunny"}));
        assert_eq!(c["messages"][4]["content"][0], json!({"type": "text", "text": "and?"}));
        assert_eq!(c["messages"][4]["content"][1]["image_url"]["url"], "data:image/png;base64,AAA");
        assert_eq!(c["max_tokens"], 100);
        assert_eq!(c["stop"], json!(["END"]));
        assert_eq!(c["stream_options"]["include_usage"], true);
        assert_eq!(c["tools"][0]["function"]["parameters"], json!({"type": "object"}));
        assert_eq!(c["tool_choice"]["function"]["name"], "weather");
        assert_eq!(c["user"], "u1");
        assert!(messages_to_chat(&json!({"messages": [{"role": "robot"}]}), "m").is_err());
        assert!(messages_to_chat(&json!({}), "m").is_err());
    }

    #[test]
    fn a_chat_completion_becomes_a_message() {
        let chat = json!({"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "ok", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": "{\"q\":\"x\"}"}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 3}}});
        let m = chat_to_message(&chat, "fast");
        assert_eq!(m["type"], "message");
        assert_eq!(m["model"], "fast");
        assert_eq!(m["content"][0], json!({"type": "text", "text": "ok"}));
        assert_eq!(m["content"][1]["input"], json!({"q": "x"}));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 7, "output_tokens": 4, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0})
        );
        assert_eq!(usage_of(&m["usage"]), usage_of(&chat["usage"]), "the same usage read back");
        assert_eq!(stop_reason(Some("length")), "max_tokens");
    }

    #[test]
    fn chunks_become_anthropic_events() {
        let mut t = ChunksToEvents::new("fast");
        let mut names = Vec::new();
        let mut text = String::new();
        let chunks = [
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "hel"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1",
                "function": {"name": "weather", "arguments": "{\"q\""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                "function": {"arguments": ":1}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 6}}),
        ];
        for c in &chunks {
            for (name, data) in t.chunk(c) {
                names.push(name);
                if let Some(s) = data.pointer("/delta/text").and_then(Value::as_str) {
                    text.push_str(s);
                }
            }
        }
        let end = t.finish();
        names.extend(end.iter().map(|e| e.0));
        assert_eq!(text, "hello");
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(end[0].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(end[0].1["usage"]["output_tokens"], 6);
        assert_eq!(end[0].1["usage"]["input_tokens"], 5);
        assert!(t.finish().is_empty(), "once");
    }
}
