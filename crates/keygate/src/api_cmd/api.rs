//! `keygate api …`: the workspace's APIs and their lifecycle through the admin API — list, show,
//! create (a draft), update (fields, the state of the API or of one version, sunset, successor)
//! and delete.

use reqwest::Method;
use serde_json::{Value, json};

use super::{Layout, Shown, read_object};
use crate::UsageError;
use crate::cli::{ApiCommand, ApiLifecycleCommand};
use crate::client::AdminClient;

const COLUMNS: &[&str] = &["id", "name", "state", "sunset", "successor", "versions", "routes"];

/// An API id as a path segment.
fn path(id: &str) -> anyhow::Result<String> {
    let ok = id.strip_prefix("api_").is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    if !ok {
        return Err(UsageError(format!("{id:?} is not an API id (api_…); `keygate api list` shows them")).into());
    }
    Ok(format!("/admin/v1/apis/{id}"))
}

/// A version name as a path segment.
fn version_path(id: &str, version: &str) -> anyhow::Result<String> {
    let ok = !version.is_empty()
        && version.len() <= 32
        && version.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !version.bytes().all(|b| b == b'.');
    if !ok {
        return Err(UsageError(format!("{version:?} is not a version name (such as v1)")).into());
    }
    Ok(format!("{}/versions/{version}", path(id)?))
}

/// `--sunset none` clears the sunset; anything else is sent as given (the API checks it).
fn nullable(s: &Option<String>) -> Option<Value> {
    s.as_ref().map(|v| if v == "none" { Value::Null } else { json!(v) })
}

pub async fn run(args: ApiCommand<ApiLifecycleCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let shown = match &args.command {
        ApiLifecycleCommand::List => Shown::rows(client.send(Method::GET, "/admin/v1/apis", None).await?, COLUMNS),
        ApiLifecycleCommand::Show { id } => Shown::rows(client.send(Method::GET, &path(id)?, None).await?, COLUMNS),
        ApiLifecycleCommand::Create { name, description, versions, successor, openapi } => {
            let mut body = json!({"name": name, "versions": versions});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(s) = successor {
                body["successor"] = json!(s);
            }
            if let Some(o) = openapi {
                body["openapi"] = read_object("--openapi", o)?;
            }
            Shown::rows(client.send(Method::POST, "/admin/v1/apis", Some(body)).await?, COLUMNS)
        }
        ApiLifecycleCommand::Update { id, version, name, description, state, sunset, successor, versions, openapi } => {
            let mut body = json!({});
            if let Some(s) = state {
                body["state"] = json!(s);
            }
            if let Some(v) = nullable(sunset) {
                body["sunset"] = v;
            }
            if let Some(v) = nullable(successor) {
                body["successor"] = v;
            }
            let target = match version {
                Some(v) => {
                    if name.is_some() || description.is_some() || !versions.is_empty() || openapi.is_some() {
                        return Err(UsageError(
                            "with --version, only --state, --sunset and --successor change (the version's own)".into(),
                        )
                        .into());
                    }
                    version_path(id, v)?
                }
                None => {
                    if let Some(n) = name {
                        body["name"] = json!(n);
                    }
                    if let Some(d) = description {
                        body["description"] = json!(d);
                    }
                    if !versions.is_empty() {
                        body["versions"] = json!(versions);
                    }
                    if let Some(o) = openapi {
                        body["openapi"] = if o == "none" { Value::Null } else { read_object("--openapi", o)? };
                    }
                    path(id)?
                }
            };
            Shown::rows(client.send(Method::PATCH, &target, Some(body)).await?, COLUMNS)
        }
        ApiLifecycleCommand::Delete { id } => {
            let answer = client.send(Method::DELETE, &path(id)?, None).await?;
            Shown { answer, layout: Layout::Done(format!("deleted API {id}")) }
        }
    };
    shown.print(args.api.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_versions_cannot_escape_the_path() {
        assert_eq!(path("api_abc1").unwrap(), "/admin/v1/apis/api_abc1");
        assert_eq!(version_path("api_abc1", "v1").unwrap(), "/admin/v1/apis/api_abc1/versions/v1");
        for bad in ["", "api_", "app_x", "api_a/b", "api_..", "api_a?b"] {
            assert!(path(bad).is_err(), "{bad}");
        }
        for bad in ["", "..", "a/b", "a?b"] {
            assert!(version_path("api_x", bad).is_err(), "{bad}");
        }
        assert_eq!(nullable(&Some("none".into())), Some(Value::Null));
    }
}
