//! `keygate route …`: the gateway's routes through the admin API. A route is written as in the
//! config file (a `[[routes]]` table) or as the API's JSON, so a route moves between the file,
//! the CLI and the API unchanged.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

use super::{Layout, Shown};
use crate::UsageError;
use crate::cli::{ApiCommand, RouteCommand};
use crate::client::AdminClient;

const COLUMNS: &[&str] = &["id", "path", "host", "upstream", "upstreams", "workspace", "shared", "public", "source"];

/// A route id as a path segment: the characters a route id may have, and not dots alone (which a
/// URL would normalize away).
fn path(id: &str) -> anyhow::Result<String> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.bytes().all(|b| b == b'.');
    if !ok {
        return Err(UsageError(format!("{id:?} is not a route id (letters, digits, - _ .)")).into());
    }
    Ok(format!("/admin/v1/routes/{id}"))
}

/// Reads a route from `file` (`-` is stdin): a JSON object, or TOML with the route's fields at
/// the top level or in exactly one `[[routes]]` table.
fn read_route(file: &Path) -> anyhow::Result<Value> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the route from stdin")?;
        s
    } else {
        std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))
            .map_err(|e| UsageError(format!("{e:#}")))?
    };
    parse_route(&text).map_err(|m| UsageError(format!("{}: {m}", file.display())).into())
}

fn parse_route(text: &str) -> Result<Value, String> {
    if text.trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(v @ Value::Object(_)) => Ok(v),
            Ok(_) => Err("a route in JSON is an object".into()),
            Err(e) => Err(format!("not valid JSON: {e}")),
        };
    }
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| format!("not valid TOML or JSON: {e}"))?;
    let value = serde_json::to_value(&table).map_err(|e| format!("cannot be read as a route: {e}"))?;
    let Value::Object(mut top) = value else { return Err("a route is a table".into()) };
    match top.remove("routes") {
        None => Ok(Value::Object(top)),
        Some(Value::Array(mut routes)) if routes.len() == 1 && top.is_empty() => Ok(routes.remove(0)),
        Some(Value::Array(routes)) if top.is_empty() => {
            Err(format!("holds {} [[routes]] tables; give one route per file", routes.len()))
        }
        Some(_) => Err("give either one [[routes]] table or the route's fields at the top level".into()),
    }
}

pub async fn run(args: ApiCommand<RouteCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        RouteCommand::List => Shown::rows(client.send(Method::GET, "/admin/v1/routes", None).await?, COLUMNS),
        RouteCommand::Show { id } => Shown::rows(client.send(Method::GET, &path(id)?, None).await?, COLUMNS),
        RouteCommand::Create { file } => {
            let body = read_route(file)?;
            Shown::rows(client.send(Method::POST, "/admin/v1/routes", Some(body)).await?, COLUMNS)
        }
        RouteCommand::Update { id, file } => {
            let mut body = read_route(file)?;
            if let Value::Object(fields) = &mut body {
                fields.entry("id").or_insert_with(|| Value::String(id.clone()));
            }
            Shown::rows(client.send(Method::PUT, &path(id)?, Some(body)).await?, COLUMNS)
        }
        RouteCommand::Delete { id } => {
            let answer = client.send(Method::DELETE, &path(id)?, None).await?;
            Shown { answer, layout: Layout::Done(format!("deleted route {id}")) }
        }
    };
    shown.print(args.api.output)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_route_is_read_from_toml_or_json() {
        let table = "[[routes]]\nid = \"orders\"\npath = \"/orders\"\nupstream = \"http://127.0.0.1:9000\"\n\
                     [routes.scopes]\nGET = \"orders:read\"\n";
        let top = "id = \"orders\"\npath = \"/orders\"\nupstream = \"http://127.0.0.1:9000\"\n\
                   [scopes]\nGET = \"orders:read\"\n";
        let json = r#"{"id": "orders", "path": "/orders", "upstream": "http://127.0.0.1:9000", "scopes": {"GET": "orders:read"}}"#;
        let want = json!({"id": "orders", "path": "/orders", "upstream": "http://127.0.0.1:9000", "scopes": {"GET": "orders:read"}});
        for text in [table, top, json] {
            assert_eq!(parse_route(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn a_file_that_is_not_one_route_says_so() {
        let two = "[[routes]]\nid = \"a\"\n[[routes]]\nid = \"b\"\n";
        assert!(parse_route(two).unwrap_err().contains("one route per file"));
        assert!(parse_route("id = \"a\"\n[[routes]]\nid = \"b\"\n").unwrap_err().contains("either one"));
        assert!(parse_route("[1, 2]").unwrap_err().contains("TOML or JSON"));
        assert!(parse_route("{\"id\": ").unwrap_err().contains("not valid JSON"));
        assert!(parse_route("id = ").unwrap_err().contains("not valid TOML"));
    }

    #[test]
    fn route_ids_cannot_escape_the_path() {
        assert_eq!(path("orders.v2").unwrap(), "/admin/v1/routes/orders.v2");
        for bad in ["", ".", "..", "../apps", "a/b", "a?b", "a b"] {
            assert!(path(bad).unwrap_err().downcast_ref::<UsageError>().is_some(), "{bad}");
        }
    }
}
