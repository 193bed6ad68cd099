//! Prompts published as plain REST endpoints (`[routes.ai.prompts.NAME]`): a template, a model
//! and parameters behind `POST {route}/{NAME}`. The caller sends a JSON object of the template's
//! fields; keygate fills the template, calls the model as a chat completion (through the same
//! limits, budgets, fallbacks and metering as any call), and answers with the model's answer —
//! parsed, as a JSON value, for a `json` prompt. A token needs the prompt's scope (default
//! `prompt:NAME`), not the model's: a key can be given one task without being given the model.
//!
//! Pure: no I/O here; `serve.rs` drives it.

use keygate_core::scope::Scope;
use serde_json::{Map, Value, json};

use crate::config::AiPromptConfig;

/// The longest template (and system prompt), in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 64 * 1024;
/// The most fields a template may have.
pub const MAX_FIELDS: usize = 64;

/// A piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

/// A prompt of an `ai` route, compiled.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub name: String,
    /// The model called (one of the route's names).
    pub model: String,
    pub system: Option<String>,
    parts: Vec<Part>,
    /// The template's fields, each once, in order of first use.
    pub fields: Vec<String>,
    pub json: bool,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub scope: Scope,
    pub description: Option<String>,
}

/// Whether `name` may name a prompt: `a-z 0-9 _ -`, 1 to 64, not `v1` (the route's own API).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "v1"
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

fn valid_field(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits a template at its `{{field}}` places.
fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or("a {{ without its }}")?;
        let field = after[..close].trim();
        if !valid_field(field) {
            return Err(format!("{{{{{field}}}}} is not a field name (letters, digits, _; 1-64)"));
        }
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        parts.push(Part::Field(field.to_owned()));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Ok(parts)
}

impl Prompt {
    /// Compiles `[routes.ai.prompts.NAME]`; `serves` says whether the route serves a model name.
    /// Errors say what to change.
    pub fn from_config(name: &str, c: &AiPromptConfig, serves: &dyn Fn(&str) -> bool) -> Result<Self, String> {
        let err = |m: String| format!("ai.prompts.{name}: {m}");
        if !valid_name(name) {
            return Err(err("a prompt's name is 1-64 of a-z, 0-9, _ and - (and not v1)".into()));
        }
        if !serves(&c.model) {
            return Err(err(format!("model {:?} is not one this route serves (ai.models)", c.model)));
        }
        if c.template.trim().is_empty() || c.template.len() > MAX_TEMPLATE_BYTES {
            return Err(err(format!("template must hold text, at most {MAX_TEMPLATE_BYTES} bytes")));
        }
        if c.system.as_ref().is_some_and(|s| s.len() > MAX_TEMPLATE_BYTES) {
            return Err(err(format!("system is at most {MAX_TEMPLATE_BYTES} bytes")));
        }
        let parts = parse_template(&c.template).map_err(|e| err(format!("template: {e}")))?;
        let mut fields: Vec<String> = Vec::new();
        for p in &parts {
            if let Part::Field(f) = p
                && !fields.contains(f)
            {
                fields.push(f.clone());
            }
        }
        if fields.len() > MAX_FIELDS {
            return Err(err(format!("a template has at most {MAX_FIELDS} fields")));
        }
        if c.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(err("temperature is from 0 to 2".into()));
        }
        if c.max_tokens == Some(0) {
            return Err(err("max_tokens must be at least 1".into()));
        }
        let scope_text = c.scope.clone().unwrap_or_else(|| format!("prompt:{name}"));
        let scope = Scope::parse_required(&scope_text).map_err(|e| err(format!("scope: {}", e.message)))?;
        Ok(Self {
            name: name.to_owned(),
            model: c.model.clone(),
            system: c.system.clone(),
            parts,
            fields,
            json: c.json,
            max_tokens: c.max_tokens,
            temperature: c.temperature,
            scope,
            description: c.description.clone(),
        })
    }

    /// The chat-completions request for a call with `body` (a JSON object of the fields).
    /// Errors are the caller's (a field missing or unknown, a body that is not an object).
    pub fn render(&self, body: &[u8]) -> Result<Value, String> {
        let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?
        };
        let Value::Object(given) = v else {
            return Err(format!("the request body is a JSON object of the prompt's fields: {}", self.fields_text()));
        };
        if let Some(unknown) = given.keys().find(|k| !self.fields.contains(k)) {
            return Err(format!("{unknown:?} is not a field of this prompt; its fields: {}", self.fields_text()));
        }
        let mut user = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => user.push_str(t),
                Part::Field(f) => match given.get(f) {
                    None | Some(Value::Null) => {
                        return Err(format!(
                            "the field {f:?} is missing; this prompt's fields: {}",
                            self.fields_text()
                        ));
                    }
                    Some(Value::String(s)) => user.push_str(s),
                    Some(other) => user.push_str(&other.to_string()),
                },
            }
        }
        let mut messages = Vec::new();
        if let Some(s) = &self.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": user}));
        let mut req = json!({"model": self.model, "messages": messages});
        if let Some(m) = self.max_tokens {
            req["max_tokens"] = json!(m);
        }
        if let Some(t) = self.temperature {
            req["temperature"] = json!(t);
        }
        if self.json {
            req["response_format"] = json!({"type": "json_object"});
        }
        Ok(req)
    }

    fn fields_text(&self) -> String {
        if self.fields.is_empty() { "none".to_owned() } else { self.fields.join(", ") }
    }

    /// The endpoint's answer from the model's chat completion: the parsed JSON value of its text
    /// (`json` prompts; a fenced block is unwrapped), or `{"text": …}`. `Err`: the model's answer
    /// is not what the prompt promises (no text, or not JSON).
    pub fn answer(&self, completion: &Value) -> Result<Value, String> {
        let text = completion
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or("the model's answer holds no text")?;
        if !self.json {
            return Ok(json!({"text": text}));
        }
        let t = text.trim();
        let t = t
            .strip_prefix("```json")
            .or_else(|| t.strip_prefix("```"))
            .and_then(|x| x.strip_suffix("```"))
            .map_or(t, str::trim);
        serde_json::from_str(t).map_err(|_| "the model's answer is not the JSON this prompt asks for".to_owned())
    }

    /// The OpenAPI operation of the endpoint (for the developer portal).
    pub fn operation(&self) -> Value {
        let props: Map<String, Value> = self.fields.iter().map(|f| (f.clone(), json!({"type": "string"}))).collect();
        let answer = if self.json {
            json!({"description": "The model's answer: the JSON value it gave", "content": {"application/json": {"schema": {}}}})
        } else {
            json!({"description": "The model's answer", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}})
        };
        json!({
            "operationId": format!("prompt_{}", self.name),
            "summary": self.description.clone().unwrap_or_else(|| format!("The {} prompt", self.name)),
            "description": format!("Calls the model {:?} with this prompt. Needs the scope {}.", self.model, self.scope.as_str()),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "properties": props, "required": self.fields, "additionalProperties": false}}}},
            "responses": {
                "200": answer,
                "400": {"description": "A field is missing or unknown"},
                "403": {"description": "The token lacks the prompt's scope"},
                "429": {"description": "A limit or the budget is spent"},
                "502": {"description": "The model's answer is not what the prompt asks for, or the provider failed"}
            }
        })
    }
}

/// An OpenAPI document of an `ai` route's prompts, under the route's path `prefix`.
pub fn openapi(route_id: &str, prefix: &str, prompts: &[&Prompt]) -> Value {
    let mut paths = Map::new();
    for p in prompts {
        paths.insert(format!("{prefix}/{}", p.name), json!({"post": p.operation()}));
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": format!("{route_id}: prompts"),
            "version": "1",
            "description": "Prompts of this AI route, each a REST endpoint. The route also serves the OpenAI-compatible API (/v1/chat/completions, /v1/embeddings, /v1/models, …) and Anthropic's /v1/messages."
        },
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(template: &str) -> AiPromptConfig {
        AiPromptConfig {
            model: "fast".into(),
            system: Some("Classify sentiment.".into()),
            template: template.into(),
            json: true,
            max_tokens: Some(50),
            temperature: Some(0.0),
            scope: None,
            description: None,
        }
    }

    fn serves(m: &str) -> bool {
        m == "fast"
    }

    #[test]
    fn a_template_is_filled_with_the_request_fields() {
        let p =
            Prompt::from_config("sentiment", &config("Text: {{ text }} ({{lang}}), again {{text}}"), &serves).unwrap();
        assert_eq!(p.fields, ["text", "lang"]);
        assert_eq!(p.scope.as_str(), "prompt:sentiment");
        let req = p.render(br#"{"text": "I love it", "lang": 2}"#).unwrap();
        assert_eq!(req["model"], "fast");
        assert_eq!(req["messages"][0], json!({"role": "system", "content": "Classify sentiment."}));
        assert_eq!(req["messages"][1]["content"], "Text: I love it (2), again I love it");
        assert_eq!(req["response_format"]["type"], "json_object");
        assert_eq!(req["max_tokens"], 50);
        assert!(p.render(br#"{"text": "x"}"#).unwrap_err().contains("\"lang\" is missing"));
        assert!(p.render(br#"{"text": "x", "lang": "en", "extra": 1}"#).unwrap_err().contains("\"extra\""));
        assert!(p.render(b"[1]").unwrap_err().contains("JSON object"));
        assert!(p.render(b"{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn answers_are_parsed_as_the_prompt_promises() {
        let p = Prompt::from_config("s", &config("{{t}}"), &serves).unwrap();
        let c = |t: &str| json!({"choices": [{"message": {"content": t}}]});
        assert_eq!(p.answer(&c(r#"{"sentiment": "positive"}"#)).unwrap(), json!({"sentiment": "positive"}));
        assert_eq!(p.answer(&c("```json\n{\"a\": 1}\n```")).unwrap(), json!({"a": 1}));
        assert!(p.answer(&c("I think it is positive")).is_err());
        assert!(p.answer(&json!({})).is_err());
        let mut text = config("{{t}}");
        text.json = false;
        let p = Prompt::from_config("s", &text, &serves).unwrap();
        assert_eq!(p.answer(&c("hi")).unwrap(), json!({"text": "hi"}));
    }

    #[test]
    fn bad_prompts_are_refused_with_the_reason() {
        let bad = |name: &str, c: AiPromptConfig| Prompt::from_config(name, &c, &serves).unwrap_err();
        assert!(bad("v1", config("{{t}}")).contains("name"));
        assert!(bad("Upper", config("{{t}}")).contains("name"));
        assert!(bad("s", config("{{t")).contains("without its"));
        assert!(bad("s", config("{{a b}}")).contains("field name"));
        assert!(bad("s", config("  ")).contains("template"));
        let mut c = config("{{t}}");
        c.model = "other".into();
        assert!(bad("s", c).contains("not one this route serves"));
        let mut c = config("{{t}}");
        c.scope = Some("x:*".into());
        assert!(bad("s", c).contains("wildcard"));
        let mut c = config("{{t}}");
        c.temperature = Some(3.0);
        assert!(bad("s", c).contains("temperature"));
    }

    #[test]
    fn the_portal_gets_an_operation_per_prompt() {
        let p = Prompt::from_config("sentiment", &config("{{text}}"), &serves).unwrap();
        let doc = openapi("llm", "/llm", &[&p]);
        let op = &doc["paths"]["/llm/sentiment"]["post"];
        assert_eq!(op["requestBody"]["content"]["application/json"]["schema"]["required"], json!(["text"]));
        assert!(op["description"].as_str().unwrap().contains("prompt:sentiment"));
    }
}
