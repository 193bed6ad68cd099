//! The providers' wire formats: the usage an answer reports, and the translation between the
//! OpenAI chat-completions format (which every model can be called in) and Anthropic's Messages
//! API — requests, answers and streamed events. Pure functions over JSON values, tested against
//! the published shapes (OpenAI's chat-completions and Anthropic's Messages references).

use serde_json::{Map, Value, json};

/// LLM tokens an answer used. `input` counts every input token, those read from a prompt cache
/// (`cached_input`) included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// Takes the larger of each count (streamed counts are cumulative).
    pub fn merge_max(&mut self, other: Usage) {
        self.input = self.input.max(other.input);
        self.output = self.output.max(other.output);
        self.cached_input = self.cached_input.max(other.cached_input);
    }
}

fn num(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}

/// The usage in a `usage` object of any of the formats: OpenAI chat and completions
/// (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens`), embeddings
/// (`prompt_tokens`), the Responses API (`input_tokens`, `output_tokens`,
/// `input_tokens_details.cached_tokens`), and Anthropic's (`input_tokens` without the cache's
/// `cache_read_input_tokens` and `cache_creation_input_tokens`, which are added).
pub fn usage_of(u: &Value) -> Option<Usage> {
    let u = u.as_object()?;
    if u.contains_key("prompt_tokens") || u.contains_key("completion_tokens") {
        return Some(Usage {
            input: num(u.get("prompt_tokens")),
            output: num(u.get("completion_tokens")),
            cached_input: num(u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens"))),
        });
    }
    if u.contains_key("input_tokens") || u.contains_key("output_tokens") {
        if let Some(d) = u.get("input_tokens_details") {
            // The Responses API: input_tokens includes the cached ones.
            return Some(Usage {
                input: num(u.get("input_tokens")),
                output: num(u.get("output_tokens")),
                cached_input: num(d.get("cached_tokens")),
            });
        }
        let read = num(u.get("cache_read_input_tokens"));
        let created = num(u.get("cache_creation_input_tokens"));
        return Some(Usage {
            input: num(u.get("input_tokens")).saturating_add(read).saturating_add(created),
            output: num(u.get("output_tokens")),
            cached_input: read,
        });
    }
    None
}

/// A rough count of the input tokens of a request, before the call (about four bytes a token),
/// for the tokens-per-minute limit; settled from the answer's usage.
pub fn estimate_input_tokens(body_len: usize) -> u64 {
    (body_len as u64).div_ceil(4)
}

/// The most output tokens a request allows (`max_completion_tokens`, `max_tokens`,
/// `max_output_tokens`), if it says.
pub fn max_output_tokens(req: &Value) -> Option<u64> {
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| req.get(*k).and_then(Value::as_u64))
}

/// Why the translation of a request failed: said to the client as a 400.
#[derive(Debug, PartialEq, Eq)]
pub struct Untranslatable(pub String);

/// Anthropic requires `max_tokens`; a chat request that gives none gets this many.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// A chat-completions request as an Anthropic Messages request for `model`.
pub fn chat_to_messages(req: &Value, model: &str) -> Result<Value, Untranslatable> {
    let bad = |m: &str| Untranslatable(m.to_owned());
    let msgs = req.get("messages").and_then(Value::as_array).ok_or_else(|| bad("messages must be an array"))?;
    let mut system: Vec<String> = Vec::new();
    let mut out: Vec<Value> = Vec::new();
    for m in msgs {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad("each message needs a role"))?;
        let (role, blocks) = match role {
            "system" | "developer" => {
                system.push(text_of(m.get("content")));
                continue;
            }
            "user" => ("user", content_blocks(m.get("content"))?),
            "assistant" => {
                let mut blocks = match m.get("content") {
                    None | Some(Value::Null) => Vec::new(),
                    c => content_blocks(c)?,
                };
                for call in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                    let f = call.get("function").ok_or_else(|| bad("a tool call needs a function"))?;
                    let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
                    let input: Value = serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
                        .map_err(|_| bad("a tool call's arguments must be a JSON object"))?;
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": f.get("name").cloned().unwrap_or(Value::Null),
                        "input": input,
                    }));
                }
                ("assistant", blocks)
            }
            "tool" => {
                let id = m.get("tool_call_id").cloned().ok_or_else(|| bad("a tool message needs tool_call_id"))?;
                ("user", vec![json!({"type": "tool_result", "tool_use_id": id, "content": text_of(m.get("content"))})])
            }
            other => return Err(Untranslatable(format!("unknown message role {other:?}"))),
        };
        // Anthropic wants turns that alternate: consecutive messages of one role become one.
        match out.last_mut() {
            Some(last) if last.get("role").and_then(Value::as_str) == Some(role) => {
                if let Some(Value::Array(c)) = last.get_mut("content") {
                    c.extend(blocks);
                }
            }
            _ => out.push(json!({"role": role, "content": blocks})),
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), Value::from(model));
    body.insert("messages".into(), Value::Array(out));
    if !system.is_empty() {
        body.insert("system".into(), Value::from(system.join("\n\n")));
    }
    body.insert("max_tokens".into(), Value::from(max_output_tokens(req).unwrap_or(DEFAULT_MAX_TOKENS)));
    for k in ["temperature", "top_p", "stream"] {
        if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
            body.insert(k.into(), v.clone());
        }
    }
    match req.get("stop") {
        Some(Value::String(s)) => {
            body.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) => {
            body.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if let Some(tools) = req.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| {
                let mut t = Map::new();
                t.insert("name".into(), f.get("name").cloned().unwrap_or(Value::Null));
                if let Some(d) = f.get("description") {
                    t.insert("description".into(), d.clone());
                }
                t.insert(
                    "input_schema".into(),
                    f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                );
                Value::Object(t)
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    match req.get("tool_choice") {
        Some(Value::String(s)) if s == "auto" => {
            body.insert("tool_choice".into(), json!({"type": "auto"}));
        }
        Some(Value::String(s)) if s == "required" => {
            body.insert("tool_choice".into(), json!({"type": "any"}));
        }
        Some(Value::String(s)) if s == "none" => {
            body.insert("tool_choice".into(), json!({"type": "none"}));
        }
        Some(Value::Object(o)) => {
            if let Some(name) = o.get("function").and_then(|f| f.get("name")) {
                body.insert("tool_choice".into(), json!({"type": "tool", "name": name}));
            }
        }
        _ => {}
    }
    if let Some(u) = req.get("user").and_then(Value::as_str) {
        body.insert("metadata".into(), json!({"user_id": u}));
    }
    Ok(Value::Object(body))
}

/// The text of a message's content: a string, or the text parts of an array.
fn text_of(c: Option<&Value>) -> String {
    match c {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
        }
        _ => String::new(),
    }
}

/// A chat message's content as Anthropic content blocks: text, and images (`data:` URLs become
/// base64 sources, others URL sources).
fn content_blocks(c: Option<&Value>) -> Result<Vec<Value>, Untranslatable> {
    match c {
        Some(Value::String(s)) => Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Ok(json!({"type": "text", "text": p.get("text").cloned().unwrap_or_default()})),
                Some("image_url") => {
                    let url = p
                        .get("image_url")
                        .and_then(|i| i.get("url").or(Some(i)))
                        .and_then(Value::as_str)
                        .ok_or_else(|| Untranslatable("an image_url part needs a url".into()))?;
                    Ok(image_source(url))
                }
                other => Err(Untranslatable(format!("content parts of type {other:?} cannot be sent to this model"))),
            })
            .collect(),
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(_) => Err(Untranslatable("content must be a string or an array of parts".into())),
    }
}

fn image_source(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((meta, data)) = rest.split_once(',')
        && let Some(media) = meta.strip_suffix(";base64")
    {
        return json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}});
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

/// Anthropic's `stop_reason` as a chat completion's `finish_reason`.
pub fn finish_reason(stop_reason: Option<&str>) -> Value {
    match stop_reason {
        Some("end_turn" | "stop_sequence" | "pause_turn") => Value::from("stop"),
        Some("max_tokens") => Value::from("length"),
        Some("tool_use") => Value::from("tool_calls"),
        Some("refusal") => Value::from("content_filter"),
        Some(other) => Value::from(other),
        None => Value::Null,
    }
}

/// The usage object of a chat completion.
pub fn chat_usage(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.total(),
        "prompt_tokens_details": {"cached_tokens": u.cached_input},
    })
}

/// Anthropic content blocks as a chat assistant message: the text blocks as its content, the
/// `tool_use` blocks as its `tool_calls` (other blocks, such as thinking, are the model's own and
/// left out).
pub fn assistant_message(blocks: &[Value]) -> Value {
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default()),
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": b.get("input").map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let mut message = Map::new();
    message.insert("role".into(), Value::from("assistant"));
    message
        .insert("content".into(), if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::from(text) });
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    Value::Object(message)
}

/// An Anthropic message as a chat completion, named `model` (the name the client asked for).
pub fn message_to_chat(msg: &Value, model: &str, created: i64) -> Value {
    let blocks = msg.get("content").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let message = assistant_message(blocks);
    let usage = msg.get("usage").and_then(usage_of).unwrap_or_default();
    json!({
        "id": msg.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(msg.get("stop_reason").and_then(Value::as_str)),
            "logprobs": null,
        }],
        "usage": chat_usage(usage),
    })
}

/// Turns Anthropic's streamed events into chat-completion chunks, one event at a time.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    pub id: String,
    pub model: String,
    pub created: i64,
    /// The client asked for a last chunk with the usage (`stream_options.include_usage`).
    pub include_usage: bool,
    pub usage: Usage,
    /// Tool calls so far; the index of the current one.
    tools: usize,
    /// The content block index of each tool call → its index among the calls.
    tool_blocks: Vec<(u64, usize)>,
    pub done: bool,
}

impl StreamTranslator {
    /// A translator for a stream answered as `model`, made at `created` (Unix seconds).
    pub fn new(model: &str, created: i64, include_usage: bool) -> Self {
        Self { model: model.to_owned(), created, include_usage, ..Self::default() }
    }

    fn chunk(&self, delta: Value, finish: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
    }

    /// The chunks (as SSE `data:` payloads) for one Anthropic event's data.
    pub fn event(&mut self, data: &Value) -> Vec<Value> {
        match data.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(m) = data.get("message") {
                    if self.id.is_empty() {
                        self.id = m.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                    }
                    if let Some(u) = m.get("usage").and_then(usage_of) {
                        self.usage.merge_max(u);
                    }
                }
                vec![self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)]
            }
            Some("content_block_start") => {
                let block = data.get("content_block");
                if block.and_then(|b| b.get("type")).and_then(Value::as_str) != Some("tool_use") {
                    return Vec::new();
                }
                let b = block.cloned().unwrap_or_default();
                let i = self.tools;
                self.tools += 1;
                self.tool_blocks.push((num(data.get("index")), i));
                vec![self.chunk(
                    json!({"tool_calls": [{"index": i, "id": b.get("id"), "type": "function",
                        "function": {"name": b.get("name"), "arguments": ""}}]}),
                    Value::Null,
                )]
            }
            Some("content_block_delta") => {
                let d = data.get("delta").cloned().unwrap_or_default();
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": d.get("text")}), Value::Null)],
                    Some("input_json_delta") => {
                        let block = num(data.get("index"));
                        let i = self.tool_blocks.iter().find(|(b, _)| *b == block).map_or(0, |(_, i)| *i);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": i, "function": {"arguments": d.get("partial_json")}}]}),
                            Value::Null,
                        )]
                    }
                    _ => Vec::new(),
                }
            }
            Some("message_delta") => {
                if let Some(u) = data.get("usage").and_then(usage_of) {
                    // message_delta reports the output so far, and sometimes the input again.
                    self.usage.output = self.usage.output.max(u.output);
                    if u.input > 0 {
                        self.usage.merge_max(u);
                    }
                }
                let reason = data.get("delta").and_then(|d| d.get("stop_reason")).and_then(Value::as_str);
                vec![self.chunk(json!({}), finish_reason(reason))]
            }
            Some("message_stop") => {
                self.done = true;
                if self.include_usage {
                    vec![json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": chat_usage(self.usage),
                    })]
                } else {
                    Vec::new()
                }
            }
            Some("error") => vec![json!({"error": data.get("error").cloned().unwrap_or_default()})],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_every_format() {
        let openai = json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4}});
        assert_eq!(usage_of(&openai), Some(Usage { input: 10, output: 5, cached_input: 4 }));
        let embeddings = json!({"prompt_tokens": 8, "total_tokens": 8});
        assert_eq!(usage_of(&embeddings), Some(Usage { input: 8, output: 0, cached_input: 0 }));
        let responses = json!({"input_tokens": 12, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2}});
        assert_eq!(usage_of(&responses), Some(Usage { input: 12, output: 3, cached_input: 2 }));
        // Anthropic counts cache reads and writes apart from input_tokens.
        let anthropic = json!({"input_tokens": 7, "output_tokens": 9, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20});
        assert_eq!(usage_of(&anthropic), Some(Usage { input: 127, output: 9, cached_input: 100 }));
        assert_eq!(usage_of(&json!({"other": 1})), None);
        assert_eq!(usage_of(&json!(null)), None);
    }

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let req = json!({
            "model": "fast",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4 C"},
                {"role": "user", "content": "And tomorrow?"},
            ],
            "max_completion_tokens": 100,
            "temperature": 0.2,
            "stop": "END",
            "stream": true,
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required",
            "user": "u-1",
        });
        let out = chat_to_messages(&req, "claude-x").unwrap();
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "Be brief.\n\nUse metric units.");
        assert_eq!(out["max_tokens"], 100);
        assert_eq!(out["temperature"], 0.2);
        assert_eq!(out["stream"], true);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["tool_choice"], json!({"type": "any"}));
        assert_eq!(out["metadata"], json!({"user_id": "u-1"}));
        assert_eq!(out["tools"][0]["input_schema"]["properties"]["city"]["type"], "string");
        let msgs = out["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert_eq!(
            msgs[0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "iVBOR"})
        );
        assert_eq!(
            msgs[1]["content"][0],
            json!({"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}})
        );
        // The tool's answer and the next user turn are one user message.
        assert_eq!(msgs[2]["role"], "user");
        assert_eq!(msgs[2]["content"][0], json!({"type": "tool_result", "tool_use_id": "call_1", "content": "4 C"}));
        assert_eq!(msgs[2]["content"][1], json!({"type": "text", "text": "And tomorrow?"}));
    }

    #[test]
    fn requests_that_cannot_be_translated_say_why() {
        assert!(chat_to_messages(&json!({"model": "m"}), "x").is_err());
        assert!(chat_to_messages(&json!({"messages": [{"role": "wizard", "content": "hi"}]}), "x").is_err());
        let bad_args = json!({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "not json"}}]}]});
        assert!(chat_to_messages(&bad_args, "x").is_err());
        let audio = json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]});
        assert!(chat_to_messages(&audio, "x").is_err());
        let out = chat_to_messages(&json!({"messages": [{"role": "user", "content": "hi"}]}), "x").unwrap();
        assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn a_message_becomes_a_chat_completion() {
        let msg = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 20, "output_tokens": 6},
        });
        let out = message_to_chat(&msg, "fast", 1_700_000_000);
        assert_eq!(out["model"], "fast");
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["choices"][0]["message"]["content"], "Let me check.");
        assert_eq!(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(out["usage"]["prompt_tokens"], 20);
        assert_eq!(out["usage"]["total_tokens"], 26);
    }

    #[test]
    fn streamed_events_become_chunks_with_usage() {
        let mut t = StreamTranslator { model: "fast".into(), include_usage: true, ..Default::default() };
        let events = [
            json!({"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 15}}),
            json!({"type": "message_stop"}),
        ];
        let chunks: Vec<Value> = events.iter().flat_map(|e| t.event(e)).collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["id"], "msg_1");
        assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(chunks[2]["choices"][0]["delta"]["tool_calls"][0]["id"], "toolu_1");
        assert_eq!(chunks[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"], "{\"a\":");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[5]["usage"]["prompt_tokens"], 11);
        assert_eq!(chunks[5]["usage"]["completion_tokens"], 15);
        assert_eq!(chunks[5]["choices"], json!([]));
        assert!(t.done);
        assert_eq!(t.usage, Usage { input: 11, output: 15, cached_input: 0 });
    }
}
