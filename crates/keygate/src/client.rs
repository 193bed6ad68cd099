//! `keygate token …`: the admin API from the command line, with table or JSON output. The root
//! key comes from `KEYGATE_ADMIN_KEY` only (a flag would show in `ps` and shell history).

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use crate::cli::{Output, TokenArgs, TokenCommand, TokenPolicyArgs};

/// An admin API client.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// An error answer of the admin API.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.message)
    }
}

impl std::error::Error for ApiFailure {}

impl AdminClient {
    pub fn from_env(url: &str) -> anyhow::Result<Self> {
        let key = std::env::var("KEYGATE_ADMIN_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
            .context("set KEYGATE_ADMIN_KEY to a root key (create one with `keygate root-key create --name NAME`)")?;
        Self::new(url, key.trim().to_owned())
    }

    pub fn new(url: &str, key: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { http, base: url.trim_end_matches('/').to_owned(), key })
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("cannot reach keygate at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if status.is_success() {
            return Ok(value);
        }
        let code = value.pointer("/error/code").and_then(Value::as_str).unwrap_or("http_error").to_owned();
        let message = value.pointer("/error/message").and_then(Value::as_str).unwrap_or("unexpected answer").to_owned();
        Err(ApiFailure { status: status.as_u16(), code, message }.into())
    }
}

fn parse_rate_limit(s: &str) -> anyhow::Result<Value> {
    let err = || anyhow::anyhow!("--rate-limit must look like 100/60 or 100/60+20 (requests/seconds+burst), not {s:?}");
    let (rate, burst) = match s.split_once('+') {
        Some((r, b)) => (r, b.parse::<u32>().map_err(|_| err())?),
        None => (s, 0),
    };
    let (req, secs) = rate.split_once('/').ok_or_else(err)?;
    Ok(json!({
        "requests": req.parse::<u32>().map_err(|_| err())?,
        "per_seconds": secs.parse::<u32>().map_err(|_| err())?,
        "burst": burst,
    }))
}

fn parse_quota(s: &str) -> anyhow::Result<Value> {
    let err = || anyhow::anyhow!("--quota must look like 10000/month (period day, month or total), not {s:?}");
    let (req, period) = s.split_once('/').ok_or_else(err)?;
    if !matches!(period, "day" | "month" | "total") {
        return Err(err());
    }
    Ok(json!({"requests": req.parse::<u64>().map_err(|_| err())?, "period": period}))
}

fn policy_body(p: &TokenPolicyArgs, body: &mut Map<String, Value>, for_update: bool) -> anyhow::Result<()> {
    if !p.scopes.is_empty() || !for_update {
        body.insert("scopes".into(), json!(p.scopes));
    }
    if let Some(s) = p.expires_in {
        body.insert("expires_in".into(), json!(s));
    }
    if let Some(s) = &p.expires_at {
        body.insert("expires_at".into(), json!(s));
    }
    if !p.ip_allowlist.is_empty() {
        body.insert("ip_allowlist".into(), json!(p.ip_allowlist));
    }
    if let Some(r) = &p.rate_limit {
        body.insert("rate_limit".into(), parse_rate_limit(r)?);
    }
    if let Some(q) = &p.quota {
        body.insert("quota".into(), parse_quota(q)?);
    }
    if let Some(m) = &p.metadata {
        let v: Value = serde_json::from_str(m).context("--metadata must be a JSON object")?;
        if !v.is_object() {
            bail!("--metadata must be a JSON object, such as '{{\"team\":\"billing\"}}'");
        }
        body.insert("metadata".into(), v);
    }
    Ok(())
}

fn id_path(id: &str) -> anyhow::Result<String> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        bail!("{id:?} is not a token id (tok_…)");
    }
    Ok(format!("/admin/v1/tokens/{id}"))
}

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    use reqwest::Method;
    let client = AdminClient::from_env(&args.url)?;
    let (value, shows_secret) = match &args.command {
        TokenCommand::Create { name, app, policy } => {
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            if let Some(a) = app {
                body.insert("app_id".into(), json!(a));
            }
            policy_body(policy, &mut body, false)?;
            (client.call(Method::POST, "/admin/v1/tokens", Some(Value::Object(body))).await?, true)
        }
        TokenCommand::List { app, status, search, limit, cursor } => {
            let mut q = vec![("limit", limit.to_string())];
            for (k, v) in [("app_id", app), ("status", status), ("q", search), ("cursor", cursor)] {
                if let Some(v) = v {
                    q.push((k, v.clone()));
                }
            }
            let qs = q.iter().map(|(k, v)| format!("{k}={}", urlencode(v))).collect::<Vec<_>>().join("&");
            (client.call(Method::GET, &format!("/admin/v1/tokens?{qs}"), None).await?, false)
        }
        TokenCommand::Show { id } => (client.call(Method::GET, &id_path(id)?, None).await?, false),
        TokenCommand::Update {
            id,
            name,
            policy,
            no_expiry,
            clear_ip_allowlist,
            clear_scopes,
            no_rate_limit,
            no_quota,
        } => {
            let mut body = Map::new();
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            policy_body(policy, &mut body, true)?;
            if *no_expiry {
                body.insert("expires_at".into(), Value::Null);
            }
            if *clear_ip_allowlist {
                body.insert("ip_allowlist".into(), json!([]));
            }
            if *clear_scopes {
                body.insert("scopes".into(), json!([]));
            }
            if *no_rate_limit {
                body.insert("rate_limit".into(), Value::Null);
            }
            if *no_quota {
                body.insert("quota".into(), Value::Null);
            }
            if body.is_empty() {
                bail!("nothing to update: give at least one option, such as --name or --scope");
            }
            (client.call(Method::PATCH, &id_path(id)?, Some(Value::Object(body))).await?, false)
        }
        TokenCommand::Suspend { id } => {
            (client.call(Method::POST, &format!("{}/suspend", id_path(id)?), None).await?, false)
        }
        TokenCommand::Resume { id } => {
            (client.call(Method::POST, &format!("{}/resume", id_path(id)?), None).await?, false)
        }
        TokenCommand::Revoke { id, reason } => {
            let body = json!({ "reason": reason });
            (client.call(Method::POST, &format!("{}/revoke", id_path(id)?), Some(body)).await?, false)
        }
        TokenCommand::Rotate { id, grace_period } => {
            let body = json!({ "grace_period_seconds": grace_period });
            (client.call(Method::POST, &format!("{}/rotate", id_path(id)?), Some(body)).await?, true)
        }
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => print_table(&value, shows_secret),
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned)).collect::<Vec<_>>().join(",")
        }
        Some(other) => other.to_string(),
    }
}

const COLUMNS: [&str; 7] = ["id", "name", "display", "status", "scopes", "expires_at", "last_used_at"];

fn print_table(v: &Value, shows_secret: bool) {
    let rows: Vec<&Value> = match v.get("data").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None => vec![v],
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|r| COLUMNS.iter().map(|c| cell(r, c)).collect()).collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells.iter().filter_map(|r| r.get(i)).map(|s| s.chars().count()).chain([c.len()]).max().unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<String>| {
        vals.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    println!("{}", line(COLUMNS.iter().map(|c| c.to_uppercase()).collect()));
    for r in cells {
        println!("{}", line(r));
    }
    if let Some(next) = v.get("next_cursor").and_then(Value::as_str) {
        println!("more: --cursor {next}");
    }
    if shows_secret && let Some(secret) = v.get("token").and_then(Value::as_str) {
        println!();
        println!("token: {secret}");
        println!("Store this token now: it is shown only once.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse() {
        assert_eq!(parse_rate_limit("100/60+20").unwrap(), json!({"requests": 100, "per_seconds": 60, "burst": 20}));
        assert_eq!(parse_rate_limit("5/1").unwrap()["burst"], 0);
        for bad in ["", "100", "a/b", "100/60+x", "-1/5"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_quota("10/day").unwrap(), json!({"requests": 10, "period": "day"}));
        assert!(parse_quota("10/week").is_err());
    }

    #[test]
    fn ids_cannot_escape_the_path() {
        assert!(id_path("tok_abc").is_ok());
        assert!(id_path("../apps").is_err());
        assert!(id_path("tok_a?x=1").is_err());
    }
}
