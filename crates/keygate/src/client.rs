//! The admin API client the CLI's API commands (and `scan --online`) share. It tells the three ways
//! a call can fail apart, because each has its own exit code (see [`crate::exit_code`]): the
//! server refused ([`ApiFailure`], 1), the server could not be reached ([`TransportError`], 3), or
//! the command was given something it cannot send ([`crate::UsageError`], 2).

use anyhow::Context;
use serde_json::Value;

use crate::UsageError;

/// An admin API client.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// An error answer of the admin API: its stable code and its message. Shown as
/// `token_not_found: no token with this id exists`, and a command's `hint` on the next line.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// What to do, in terms of the command line (the API's message speaks of the API).
    pub hint: Option<String>,
}

impl ApiFailure {
    /// Adds `hint` when `err` is the API's refusal with `code`.
    pub fn hint(mut err: anyhow::Error, code: &str, hint: &str) -> anyhow::Error {
        if let Some(f) = err.downcast_mut::<ApiFailure>()
            && f.code == code
        {
            f.hint = Some(hint.to_owned());
        }
        err
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiFailure {}

/// The server could not be reached, or the connection broke before a whole answer came back.
#[derive(Debug)]
pub struct TransportError(pub String);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransportError {}

/// The API's answer to one call: its JSON, or `None` for an answer without a body (204).
pub type Answer = Option<Value>;

impl AdminClient {
    /// A client with the root key from `KEYGATE_ADMIN_KEY`; without it, a usage error.
    pub fn from_env(url: &str) -> anyhow::Result<Self> {
        let key = std::env::var("KEYGATE_ADMIN_KEY").ok().filter(|k| !k.trim().is_empty()).ok_or_else(|| {
            UsageError(
                "set KEYGATE_ADMIN_KEY to a root key (create one with `keygate root-key create --name NAME`)".into(),
            )
        })?;
        Self::new(url, key.trim().to_owned())
    }

    pub fn new(url: &str, key: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { http, base: url.trim_end_matches('/').to_owned(), key })
    }

    /// One call; a success answer's JSON (`None` when it has no body), or the error that says
    /// who failed.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_builder() {
                anyhow::Error::from(UsageError(format!(
                    "--url {:?} is not a usable URL: {}",
                    self.base,
                    error_chain(&e)
                )))
            } else {
                TransportError(format!("cannot reach keygate at {}: {}", self.base, error_chain(&e))).into()
            }
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| TransportError(format!("the answer from {} broke off: {}", self.base, error_chain(&e))))?;
        let value = if text.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&text).unwrap_or(Value::String(text)))
        };
        if status.is_success() {
            return Ok(value);
        }
        Err(failure(status, value))
    }

    /// A GET whose answer is text (an export): the body, and the path of its `next` link.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<(String, Option<String>)> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| TransportError(format!("cannot reach keygate at {}: {}", self.base, error_chain(&e))))?;
        let status = resp.status();
        let next = resp.headers().get(reqwest::header::LINK).and_then(|v| v.to_str().ok()).and_then(|v| {
            let (target, params) = v.split_once(';')?;
            params
                .contains("rel=\"next\"")
                .then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_owned())
        });
        let text = resp
            .text()
            .await
            .map_err(|e| TransportError(format!("the answer from {} broke off: {}", self.base, error_chain(&e))))?;
        if status.is_success() {
            return Ok((text, next));
        }
        Err(failure(status, serde_json::from_str(&text).ok()))
    }

    /// One call whose answer has a JSON body.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        Ok(self.send(method, path, body).await?.unwrap_or(Value::Null))
    }

    /// Every page of a list: follows `next_cursor` from `query` (which holds no cursor) and
    /// answers in the API's own shape, `{"data": [all items], "next_cursor": null}`.
    pub async fn list_all(&self, path: &str, query: &Query) -> anyhow::Result<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = query.clone();
            q.push_opt("cursor", cursor.as_deref());
            let page = self.call(reqwest::Method::GET, &format!("{path}{}", q.to_query_string()), None).await?;
            if let Some(data) = page.get("data").and_then(Value::as_array) {
                items.extend(data.iter().cloned());
            }
            match page.get("next_cursor").and_then(Value::as_str) {
                // A cursor that does not move would loop for ever; the API never hands one out.
                Some(next) if cursor.as_deref() != Some(next) => cursor = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(serde_json::json!({"data": items, "next_cursor": null}))
    }
}

/// reqwest's error with its sources, such as `error sending request: … Connection refused`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A query string, percent-encoded.
#[derive(Debug, Clone, Default)]
pub struct Query(Vec<(&'static str, String)>);

impl Query {
    pub fn push(&mut self, key: &'static str, value: impl Into<String>) {
        self.0.push((key, value.into()));
    }

    pub fn push_opt(&mut self, key: &'static str, value: Option<&str>) {
        if let Some(v) = value {
            self.push(key, v);
        }
    }

    /// `?a=1&b=2`, or nothing when empty.
    pub fn to_query_string(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect();
        format!("?{}", parts.join("&"))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An object id as a path segment (`tok_…`, `app_…`): letters, digits and `_` only, so that it
/// cannot reach another path (`../apps`) or add a query.
pub fn id_segment(id: &str, what: &str) -> anyhow::Result<String> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(UsageError(format!("{id:?} is not {what}")).into());
    }
    Ok(id.to_owned())
}

/// The error of an answer that is not a success: its stable code and message.
fn failure(status: reqwest::StatusCode, body: Option<Value>) -> anyhow::Error {
    let value = body.unwrap_or(Value::Null);
    let code = value.pointer("/error/code").and_then(Value::as_str).unwrap_or("http_error").to_owned();
    let message = value
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map_or_else(|| format!("unexpected answer with status {status}"), str::to_owned);
    ApiFailure { status: status.as_u16(), code, message, hint: None }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_escape_the_path() {
        assert_eq!(id_segment("tok_abc", "a token id").unwrap(), "tok_abc");
        assert!(id_segment("../apps", "an app id").is_err());
        assert!(id_segment("tok_a?x=1", "a token id").is_err());
        assert!(id_segment("", "a token id").unwrap_err().downcast_ref::<UsageError>().is_some());
    }

    #[test]
    fn queries_are_encoded() {
        let mut q = Query::default();
        assert_eq!(q.to_query_string(), "");
        q.push("limit", "5");
        q.push_opt("cursor", None);
        q.push_opt("from", Some("2026-01-01T00:00:00+01:00"));
        assert_eq!(q.to_query_string(), "?limit=5&from=2026-01-01T00%3A00%3A00%2B01%3A00");
    }

    #[test]
    fn failures_read_as_code_and_message() {
        let f = ApiFailure {
            status: 404,
            code: "token_not_found".into(),
            message: "no token with this id exists".into(),
            hint: None,
        };
        assert_eq!(f.to_string(), "token_not_found: no token with this id exists");
        let hinted = ApiFailure::hint(f.into(), "token_not_found", "list them");
        assert_eq!(hinted.to_string(), "token_not_found: no token with this id exists\nhint: list them");
        let other = ApiFailure::hint(anyhow::anyhow!("x"), "token_not_found", "list them");
        assert_eq!(other.to_string(), "x");
    }
}
