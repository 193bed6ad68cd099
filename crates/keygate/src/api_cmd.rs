//! The commands that work through a running keygate's admin API (`token`, `app`, `oauth-client`,
//! `signing-key`, `plan`, `scope`, `audit`, `route`, `provider`, `api`, `workspace`): each builds one request (or, with `--all`, one per
//! page), and prints the answer as a table for people or, with `--output json`, as the API's own
//! JSON for scripts. Secrets the API shows once (a new token, a client secret) are printed once.

pub mod api;
pub mod app;
pub mod apply;
pub mod audit;
pub mod oauth;
pub mod plan;
pub mod policy;
pub mod provider;
pub mod report;
pub mod route;
pub mod subscription;
pub mod token;
pub mod workspace;

use anyhow::Context;
use serde_json::{Map, Value, json};

use crate::UsageError;
use crate::cli::{Output, PageArgs};
use crate::client::{AdminClient, Answer, Query};

/// What a command prints: the API's answer and how a table lays it out.
pub struct Shown {
    pub answer: Answer,
    pub layout: Layout,
}

/// How an answer is laid out as a table.
pub enum Layout {
    /// One row per item of `data` (or one row for a single object), with these fields as columns;
    /// `secret` names a field the API shows only in this answer.
    Rows { columns: &'static [&'static str], secret: Option<&'static str> },
    /// A usage report: its buckets, its routes and its total.
    Usage,
    /// An answer without a body (204): this sentence instead.
    Done(String),
}

impl Shown {
    pub fn rows(answer: Answer, columns: &'static [&'static str]) -> Self {
        Self { answer, layout: Layout::Rows { columns, secret: None } }
    }

    pub fn with_secret(answer: Answer, columns: &'static [&'static str], secret: &'static str) -> Self {
        Self { answer, layout: Layout::Rows { columns, secret: Some(secret) } }
    }

    /// Prints to stdout. JSON is the API's answer (its fields and values); an answer without a body prints
    /// nothing in JSON (the exit code 0 is the answer).
    pub fn print(&self, output: Output) -> anyhow::Result<()> {
        match output {
            Output::Json => {
                if let Some(v) = &self.answer {
                    println!("{}", serde_json::to_string_pretty(v)?);
                }
            }
            Output::Table => {
                let v = self.answer.clone().unwrap_or(Value::Null);
                match &self.layout {
                    Layout::Rows { columns, secret } => print_rows(&v, columns, *secret),
                    Layout::Usage => print_usage(&v),
                    Layout::Done(sentence) => println!("{sentence}"),
                }
            }
        }
        Ok(())
    }
}

/// A list: one page (`--limit`, `--cursor`) or every page (`--all`, page size `--limit`).
pub async fn list(client: &AdminClient, path: &str, mut query: Query, page: &PageArgs) -> anyhow::Result<Answer> {
    query.push("limit", page.limit.to_string());
    if page.all {
        return Ok(Some(client.list_all(path, &query).await?));
    }
    query.push_opt("cursor", page.cursor.as_deref());
    client.send(reqwest::Method::GET, &format!("{path}{}", query.to_query_string()), None).await
}

/// `100/60` or `100/60+20` (requests/seconds+burst) as the API's `rate_limit` object.
pub fn parse_rate_limit(s: &str) -> anyhow::Result<Value> {
    let err =
        || UsageError(format!("--rate-limit must look like 100/60 or 100/60+20 (requests/seconds+burst), not {s:?}"));
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

/// `10000/month` (requests/period) as the API's `quota` object.
pub fn parse_quota(s: &str) -> anyhow::Result<Value> {
    let err = || UsageError(format!("--quota must look like 10000/month (period day, month or total), not {s:?}"));
    let (req, period) = s.split_once('/').ok_or_else(err)?;
    if !matches!(period, "day" | "month" | "total") {
        return Err(err().into());
    }
    Ok(json!({"requests": req.parse::<u64>().map_err(|_| err())?, "period": period}))
}

/// A flag's JSON object, such as `--metadata '{"team":"billing"}'`.
pub fn parse_object(flag: &str, s: &str) -> anyhow::Result<Value> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(UsageError(format!("{flag} must be a JSON object, such as '{{\"team\":\"billing\"}}'")).into()),
    }
}

/// A flag's JSON object given inline or as `@FILE`.
pub fn read_object(flag: &str, s: &str) -> anyhow::Result<Value> {
    match s.strip_prefix('@') {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{flag}: cannot read {path}"))
                .map_err(|e| UsageError(format!("{e:#}")))?;
            parse_object(flag, &text)
        }
        None => parse_object(flag, s),
    }
}

/// Inserts `value` under `key` when it is given.
pub fn put_opt<T: serde::Serialize>(body: &mut Map<String, Value>, key: &str, value: Option<T>) {
    if let Some(v) = value {
        body.insert(key.into(), json!(v));
    }
}

/// A cell: text as it is, lists joined with commas, limits in the flags' syntax, `-` for nothing.
fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.is_empty() => "-".into(),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned)).collect::<Vec<_>>().join(",")
        }
        Some(Value::Object(o)) if key == "rate_limit" => {
            format!(
                "{}/{}+{}",
                o.get("requests").unwrap_or(&Value::Null),
                o.get("per_seconds").unwrap_or(&Value::Null),
                o.get("burst").unwrap_or(&json!(0))
            )
        }
        Some(Value::Object(o)) if key == "quota" => format!(
            "{}/{}",
            o.get("requests").unwrap_or(&Value::Null),
            o.get("period").and_then(Value::as_str).unwrap_or("-")
        ),
        Some(other) => other.to_string(),
    }
}

/// Columns padded to their widest cell.
fn print_table(headers: &[&str], cells: &[Vec<String>]) {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            cells.iter().filter_map(|r| r.get(i)).map(|s| s.chars().count()).chain([h.len()]).max().unwrap_or(0)
        })
        .collect();
    let line = |vals: &[String]| {
        vals.iter().zip(&widths).map(|(s, w)| format!("{s:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    println!("{}", line(&headers.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>()));
    for r in cells {
        println!("{}", line(r));
    }
}

fn print_rows(v: &Value, columns: &[&str], secret: Option<&str>) {
    let rows: Vec<&Value> = match v.get("data").and_then(Value::as_array) {
        Some(items) => items.iter().collect(),
        None => vec![v],
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| cell(r, c)).collect()).collect();
    print_table(columns, &cells);
    if let Some(next) = v.get("next_cursor").and_then(Value::as_str) {
        println!("more: --cursor {next}");
    }
    if let Some(field) = secret
        && let Some(secret) = v.get(field).and_then(Value::as_str)
    {
        println!();
        println!("{field}: {secret}");
        println!("Store this secret now: it is shown only once.");
    }
}

const USAGE_COLUMNS: [&str; 9] = [
    "requests",
    "status_2xx",
    "status_3xx",
    "status_4xx",
    "status_5xx",
    "bytes_in",
    "bytes_out",
    "latency_ms_p50",
    "latency_ms_p95",
];

fn print_usage(v: &Value) {
    let table = |first: &str, items: &[Value], key: &str| {
        let headers: Vec<&str> = [first].into_iter().chain(USAGE_COLUMNS).collect();
        let cells: Vec<Vec<String>> = items
            .iter()
            .map(|item| [cell(item, key)].into_iter().chain(USAGE_COLUMNS.iter().map(|c| cell(item, c))).collect())
            .collect();
        print_table(&headers, &cells);
    };
    println!(
        "token {} from {} to {} by {}",
        cell(v, "token_id"),
        cell(v, "from"),
        cell(v, "to"),
        cell(v, "granularity")
    );
    let mut buckets = v.get("buckets").and_then(Value::as_array).cloned().unwrap_or_default();
    if let Some(total) = v.get("total") {
        let mut total = total.clone();
        if let Some(o) = total.as_object_mut() {
            o.insert("start".into(), json!("total"));
        }
        buckets.push(total);
    }
    table("start", &buckets, "start");
    if let Some(routes) = v.get("routes").and_then(Value::as_array)
        && !routes.is_empty()
    {
        println!();
        table("route", routes, "route");
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
            let err = parse_rate_limit(bad).unwrap_err();
            assert!(err.downcast_ref::<UsageError>().is_some(), "{bad}");
        }
        assert_eq!(parse_quota("10/day").unwrap(), json!({"requests": 10, "period": "day"}));
        assert!(parse_quota("10/week").is_err());
    }

    #[test]
    fn cells_read_like_the_flags() {
        let v = json!({"rate_limit": {"requests": 10, "per_seconds": 1, "burst": 5}, "quota": {"requests": 9, "period": "day"},
            "scopes": ["a:b", "c:d"], "none": null, "empty": []});
        assert_eq!(cell(&v, "rate_limit"), "10/1+5");
        assert_eq!(cell(&v, "quota"), "9/day");
        assert_eq!(cell(&v, "scopes"), "a:b,c:d");
        assert_eq!(cell(&v, "none"), "-");
        assert_eq!(cell(&v, "empty"), "-");
        assert_eq!(cell(&v, "missing"), "-");
    }

    #[test]
    fn objects_are_objects() {
        assert!(parse_object("--metadata", "{\"a\":1}").is_ok());
        for bad in ["[1]", "1", "{", ""] {
            assert!(parse_object("--metadata", bad).unwrap_err().downcast_ref::<UsageError>().is_some(), "{bad}");
        }
    }
}
