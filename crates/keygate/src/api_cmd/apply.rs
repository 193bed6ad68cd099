//! `keygate export` and `keygate apply -f FILE`: a workspace's scope catalog, plans, apps and
//! API-managed routes as one TOML file that can live in git. `export` writes the file from a
//! running keygate; `apply` makes a keygate match it, in the order that lets each part refer to
//! the ones before (scopes, plans, apps, routes), and `--dry-run` prints what it would change.
//!
//! Objects are matched by their natural key: a scope by its name, a plan and an app by their
//! names (so the file holds no generated ids), a route by its id. A field left out of the file
//! means "none" (or the route default), as in the configuration file. Nothing is deleted unless
//! `--prune` is given; plans and the default app are never deleted, and an app that still holds
//! tokens stops the run (its tokens are not revoked by a file: delete it with
//! `keygate app delete --revoke-tokens`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::UsageError;
use crate::cli::{ApplyArgs, ExportArgs, Output};
use crate::client::{AdminClient, Query, urlencode};

/// The sections of the file, in the order they are applied.
const KINDS: [&str; 4] = ["scopes", "plans", "apps", "routes"];

/// The fields each kind may have in the file (routes take those of `[[routes]]`, checked by the
/// server).
fn allowed(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "scopes" => Some(&["scope", "description", "api"]),
        "plans" => Some(&["name", "description", "scopes", "rate_limit", "quota"]),
        "apps" => Some(&["name", "description", "plan", "metadata"]),
        _ => None,
    }
}

/// A route's fields as the API fills them in when they are left out. Any other field left out is
/// compared with "nothing" (null, false, 0, empty).
fn route_default(key: &str) -> Option<Value> {
    Some(match key {
        "balance" => json!("round_robin"),
        "retries" => json!(1),
        "upgrades" => json!(["websocket"]),
        _ => return None,
    })
}

/// Fields of an answer that the file does not hold.
const SERVER_FIELDS: [&str; 7] = ["id", "created_at", "updated_at", "is_default", "plan_id", "source", "workspace"];

fn is_nothing(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(true) => false,
    }
}

/// Whether `want` (from the file: a field left out is "nothing" or its default) says the same as
/// `have` (from the API: every field present).
fn same(want: &Value, have: &Value, default: Option<Value>) -> bool {
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => {
            w.iter().all(|(k, v)| same(v, h.get(k).unwrap_or(&Value::Null), None))
                && h.iter().filter(|(k, _)| !w.contains_key(*k)).all(|(_, v)| is_nothing(v))
        }
        (Value::Null, h) => default.as_ref().map_or_else(|| is_nothing(h), |d| d == h),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (w, h) => w == h,
    }
}

/// One change `apply` makes (or, with `--dry-run`, would make).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
struct Change {
    kind: &'static str,
    /// The scope, the plan's or app's name, or the route's id.
    key: String,
    /// `create`, `update` or `delete`.
    action: &'static str,
    /// For an update, the fields that change.
    fields: Vec<String>,
    /// Why an object is left alone (a prune that cannot be made).
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

/// The workspace as the file describes it: per kind, objects by their key.
type Desired = BTreeMap<&'static str, Vec<(String, Map<String, Value>)>>;

fn key_field(kind: &str) -> &'static str {
    match kind {
        "scopes" => "scope",
        "routes" => "id",
        _ => "name",
    }
}

/// Reads and checks the file: known sections, known fields (routes' are checked by the server),
/// each object with its key, no key twice.
fn parse_file(text: &str) -> Result<Desired, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| format!("not valid TOML: {e}"))?;
    let Value::Object(top) = serde_json::to_value(&table).map_err(|e| e.to_string())? else {
        return Err("the file is not a table".into());
    };
    let mut desired = Desired::new();
    for (section, items) in top {
        let Some(kind) = KINDS.iter().copied().find(|k| *k == section) else {
            return Err(format!(
                "unknown section {section:?}: the file has [[scopes]], [[plans]], [[apps]] and [[routes]]"
            ));
        };
        let Value::Array(items) = items else {
            return Err(format!("{section} must be written as [[{section}]] tables"));
        };
        let mut seen = BTreeSet::new();
        let mut objects = Vec::with_capacity(items.len());
        for item in items {
            let Value::Object(fields) = item else { return Err(format!("each [[{section}]] entry must be a table")) };
            let key = fields
                .get(key_field(kind))
                .and_then(Value::as_str)
                .ok_or_else(|| format!("a [[{section}]] entry has no {} (a string)", key_field(kind)))?
                .to_owned();
            if let Some(names) = allowed(kind)
                && let Some(bad) = fields.keys().find(|f| !names.contains(&f.as_str()))
            {
                return Err(format!("[[{section}]] {key:?}: unknown field {bad:?} (known: {})", names.join(", ")));
            }
            if !seen.insert(key.clone()) {
                return Err(format!("[[{section}]] {key:?} is written twice"));
            }
            objects.push((key, fields));
        }
        desired.insert(kind, objects);
    }
    Ok(desired)
}

/// What the server has now, per kind, by key, in the file's terms (an app names its plan).
struct Current {
    objects: BTreeMap<&'static str, BTreeMap<String, Map<String, Value>>>,
    /// Plan names by id, and ids by name.
    plan_names: BTreeMap<String, String>,
    /// The ids of apps and plans by name (the API addresses them by id).
    ids: BTreeMap<(&'static str, String), String>,
    /// The name of the workspace's default app, which cannot be deleted.
    default_app: Option<String>,
}

async fn read_current(client: &AdminClient) -> anyhow::Result<Current> {
    let mut objects = BTreeMap::new();
    let mut ids = BTreeMap::new();
    let mut default_app = None;
    let data = |v: Option<Value>| -> Vec<Value> {
        v.and_then(|mut v| v.get_mut("data").map(Value::take)).and_then(|d| d.as_array().cloned()).unwrap_or_default()
    };
    let scopes = data(client.send(Method::GET, "/admin/v1/scopes", None).await?);
    let plans = data(client.send(Method::GET, "/admin/v1/plans", None).await?);
    let mut page = Query::default();
    page.push("limit", "500");
    let apps = data(Some(client.list_all("/admin/v1/apps", &page).await?));
    let routes = data(client.send(Method::GET, "/admin/v1/routes", None).await?);
    let plan_names: BTreeMap<String, String> =
        plans.iter().filter_map(|p| Some((p["id"].as_str()?.to_owned(), p["name"].as_str()?.to_owned()))).collect();
    for (kind, items) in [("scopes", scopes), ("plans", plans), ("apps", apps), ("routes", routes)] {
        let mut by_key = BTreeMap::new();
        for item in items {
            let Value::Object(mut fields) = item else { continue };
            if kind == "routes" && fields.get("source").and_then(Value::as_str) == Some("file") {
                continue; // the config file's: not this file's to change
            }
            let key = fields.get(key_field(kind)).and_then(Value::as_str).unwrap_or_default().to_owned();
            if let Some(id) = fields.get("id").and_then(Value::as_str)
                && matches!(kind, "plans" | "apps")
                && ids.insert((kind, key.clone()), id.to_owned()).is_some()
            {
                anyhow::bail!(UsageError(format!(
                    "two {kind} are named {key:?} on the server; apply and export name {kind} by name, so rename one first"
                )));
            }
            if kind == "apps" && fields.get("is_default") == Some(&Value::Bool(true)) {
                default_app = Some(key.clone());
            }
            if kind == "apps" {
                let plan = fields.get("plan_id").and_then(Value::as_str).and_then(|p| plan_names.get(p)).cloned();
                fields.insert("plan".into(), plan.map_or(Value::Null, Value::String));
            }
            for f in SERVER_FIELDS {
                if f != key_field(kind) {
                    fields.remove(f);
                }
            }
            by_key.insert(key, fields);
        }
        objects.insert(kind, by_key);
    }
    Ok(Current { objects, plan_names, ids, default_app })
}

/// The changes that make `current` match `desired`, in the order they are made.
fn plan_changes(desired: &Desired, current: &Current, prune: bool) -> Vec<Change> {
    let mut changes = Vec::new();
    for kind in KINDS {
        let have = current.objects.get(kind).cloned().unwrap_or_default();
        let want = desired.get(kind).cloned().unwrap_or_default();
        for (key, fields) in &want {
            match have.get(key) {
                None => {
                    changes.push(Change { kind, key: key.clone(), action: "create", fields: vec![], skipped: None })
                }
                Some(now) => {
                    let mut differ: Vec<String> = now
                        .keys()
                        .chain(fields.keys())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .filter(|f| {
                            let default = if kind == "routes" { route_default(f) } else { None };
                            !same(fields.get(*f).unwrap_or(&Value::Null), now.get(*f).unwrap_or(&Value::Null), default)
                        })
                        .cloned()
                        .collect();
                    differ.dedup();
                    if !differ.is_empty() {
                        changes.push(Change {
                            kind,
                            key: key.clone(),
                            action: "update",
                            fields: differ,
                            skipped: None,
                        });
                    }
                }
            }
        }
        // The file can be partial: a kind it does not mention is left alone even with --prune.
        if prune && desired.contains_key(kind) {
            for key in have.keys().filter(|k| !want.iter().any(|(w, _)| w == *k)) {
                let skipped = match kind {
                    "plans" => Some("plans cannot be deleted through the API".to_owned()),
                    "apps" if current.default_app.as_deref() == Some(key) => {
                        Some("the default app cannot be deleted".to_owned())
                    }
                    _ => None,
                };
                changes.push(Change { kind, key: key.clone(), action: "delete", fields: vec![], skipped });
            }
        }
    }
    changes
}

/// The body the API takes for `fields` of the file (an app's plan by name becomes its id).
fn body(kind: &str, fields: &Map<String, Value>, current: &Current, update: bool) -> anyhow::Result<Value> {
    let mut body = fields.clone();
    if kind == "apps" {
        match body.remove("plan") {
            Some(Value::String(name)) => {
                let id = current
                    .ids
                    .get(&("plans", name.clone()))
                    .ok_or_else(|| UsageError(format!("app {:?}: no plan is named {name:?}", fields["name"])))?;
                body.insert("plan_id".into(), json!(id));
            }
            _ if update => {
                body.insert("plan_id".into(), Value::Null);
            }
            _ => {}
        }
    }
    if update && kind != "routes" {
        // A PATCH changes what it names: name every field, null for "none".
        for f in allowed(kind).unwrap_or_default() {
            let f = if *f == "plan" { "plan_id" } else { f };
            body.entry(f.to_owned()).or_insert(match f {
                "scopes" => json!([]),
                "metadata" => json!({}),
                _ => Value::Null,
            });
        }
    }
    if kind == "scopes" {
        body.remove("scope");
    }
    Ok(Value::Object(body))
}

async fn make(client: &AdminClient, c: &Change, desired: &Desired, current: &mut Current) -> anyhow::Result<()> {
    let fields = || {
        desired
            .get(c.kind)
            .and_then(|objs| objs.iter().find(|(k, _)| *k == c.key))
            .map(|(_, f)| f.clone())
            .unwrap_or_default()
    };
    let id = |current: &Current| current.ids.get(&(c.kind, c.key.clone())).cloned().unwrap_or_default();
    match (c.kind, c.action) {
        ("scopes", "create" | "update") => {
            let path = format!("/admin/v1/scopes/{}", urlencode(&c.key));
            client.send(Method::PUT, &path, Some(body(c.kind, &fields(), current, false)?)).await?;
        }
        ("scopes", "delete") => {
            client.send(Method::DELETE, &format!("/admin/v1/scopes/{}", urlencode(&c.key)), None).await?;
        }
        ("plans" | "apps", "create") => {
            let made = client
                .send(Method::POST, &format!("/admin/v1/{}", c.kind), Some(body(c.kind, &fields(), current, false)?))
                .await?;
            if let Some(new_id) = made.as_ref().and_then(|m| m["id"].as_str()) {
                current.ids.insert((c.kind, c.key.clone()), new_id.to_owned());
                if c.kind == "plans" {
                    current.plan_names.insert(new_id.to_owned(), c.key.clone());
                }
            }
        }
        ("plans" | "apps", "update") => {
            let path = format!("/admin/v1/{}/{}", c.kind, id(current));
            client.send(Method::PATCH, &path, Some(body(c.kind, &fields(), current, true)?)).await?;
        }
        ("apps", "delete") => {
            client.send(Method::DELETE, &format!("/admin/v1/apps/{}", id(current)), None).await?;
        }
        ("routes", "create") => {
            client.send(Method::POST, "/admin/v1/routes", Some(Value::Object(fields()))).await?;
        }
        ("routes", "update") => {
            let path = format!("/admin/v1/routes/{}", urlencode(&c.key));
            client.send(Method::PUT, &path, Some(Value::Object(fields()))).await?;
        }
        ("routes", "delete") => {
            client.send(Method::DELETE, &format!("/admin/v1/routes/{}", urlencode(&c.key)), None).await?;
        }
        _ => {}
    }
    Ok(())
}

fn describe(c: &Change) -> String {
    let sign = match c.action {
        "create" => "+",
        "delete" => "-",
        _ => "~",
    };
    let kind = c.kind.trim_end_matches('s');
    let mut line = format!("{sign} {kind} {}", c.key);
    if !c.fields.is_empty() {
        line.push_str(&format!(" ({})", c.fields.join(", ")));
    }
    if let Some(why) = &c.skipped {
        line.push_str(&format!(": left alone, {why}"));
    }
    line
}

fn read_text(file: &Path) -> anyhow::Result<String> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {}", file.display()))
        .map_err(|e| UsageError(format!("{e:#}")).into())
}

pub async fn run_apply(args: ApplyArgs) -> anyhow::Result<()> {
    let desired =
        parse_file(&read_text(&args.file)?).map_err(|m| UsageError(format!("{}: {m}", args.file.display())))?;
    let client = AdminClient::from_env(&args.url)?;
    let mut current = read_current(&client).await?;
    let changes = plan_changes(&desired, &current, args.prune);
    let mut done = Vec::new();
    if !args.dry_run {
        for c in changes.iter().filter(|c| c.skipped.is_none()) {
            make(&client, c, &desired, &mut current)
                .await
                .map_err(|e| e.context(format!("while applying `{}` ({} done before it)", describe(c), done.len())))?;
            done.push(c.clone());
        }
    }
    match args.output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&json!({"changes": changes, "applied": !args.dry_run}))?);
        }
        Output::Table => {
            for c in &changes {
                println!("{}", describe(c));
            }
            let count = |a: &str| changes.iter().filter(|c| c.action == a && c.skipped.is_none()).count();
            let (create, update, delete) = (count("create"), count("update"), count("delete"));
            if changes.is_empty() {
                println!("no changes: the workspace matches {}", args.file.display());
            } else if args.dry_run {
                println!("{create} to create, {update} to change, {delete} to delete (dry run: nothing was changed)");
            } else {
                println!("{create} created, {update} changed, {delete} deleted");
            }
        }
    }
    Ok(())
}

/// The workspace as a file `apply` takes back unchanged.
pub async fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.url)?;
    let current = read_current(&client).await?;
    let mut top = toml::Table::new();
    for kind in KINDS {
        let items = current.objects.get(kind).cloned().unwrap_or_default();
        let mut list = Vec::new();
        for (_, mut fields) in items {
            // Written as the file would say it: "nothing" and route defaults are left out.
            fields.retain(|k, v| {
                let default = if kind == "routes" { route_default(k) } else { None };
                match default {
                    Some(d) => d != *v,
                    None => !is_nothing(v),
                }
            });
            if kind == "scopes" {
                fields.retain(|k, _| allowed(kind).unwrap_or_default().contains(&k.as_str()));
            }
            let value: toml::Value = serde_json::from_value(Value::Object(fields))
                .with_context(|| format!("a {kind} entry cannot be written as TOML"))?;
            list.push(value);
        }
        if !list.is_empty() {
            top.insert(kind.into(), toml::Value::Array(list));
        }
    }
    let text = toml::to_string(&top).context("the workspace cannot be written as TOML")?;
    match &args.file {
        Some(path) => std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(objects: &[(&'static str, Value)]) -> Current {
        let mut c = Current {
            objects: BTreeMap::new(),
            plan_names: BTreeMap::new(),
            ids: BTreeMap::new(),
            default_app: Some("default".into()),
        };
        for (kind, v) in objects {
            let Value::Object(m) = v.clone() else { panic!() };
            let key = m[key_field(kind)].as_str().unwrap().to_owned();
            c.objects.entry(kind).or_default().insert(key, m);
        }
        c
    }

    #[test]
    fn the_file_is_checked_before_anything_is_sent() {
        assert!(parse_file("[[plans]]\nname = \"a\"\ncolour = 1\n").unwrap_err().contains("unknown field \"colour\""));
        assert!(parse_file("[[things]]\nname = \"a\"\n").unwrap_err().contains("unknown section"));
        assert!(parse_file("[[apps]]\ndescription = \"a\"\n").unwrap_err().contains("has no name"));
        assert!(parse_file("[[routes]]\nid = \"a\"\n[[routes]]\nid = \"a\"\n").unwrap_err().contains("twice"));
        assert!(parse_file("plans = 1\n").unwrap_err().contains("[[plans]]"));
        let ok = parse_file("[[routes]]\nid = \"r\"\npath = \"/r\"\nanything = 1\n").unwrap();
        assert_eq!(ok["routes"][0].0, "r", "routes' fields are the server's to check");
    }

    #[test]
    fn left_out_means_none_or_the_default() {
        let route = json!({"id": "r", "path": "/r", "upstream": "http://u", "retries": 1, "balance": "round_robin",
            "upgrades": ["websocket"], "scopes": {}, "public": false, "rate_limit": null});
        let have = current(&[("routes", route)]);
        let same_file = parse_file("[[routes]]\nid = \"r\"\npath = \"/r\"\nupstream = \"http://u\"\n").unwrap();
        assert!(plan_changes(&same_file, &have, false).is_empty());
        let changed =
            parse_file("[[routes]]\nid = \"r\"\npath = \"/r\"\nupstream = \"http://u\"\nretries = 0\n").unwrap();
        let c = plan_changes(&changed, &have, false);
        assert_eq!((c[0].action, c[0].fields.clone()), ("update", vec!["retries".to_owned()]));

        let plan = json!({"name": "p", "description": "old", "scopes": ["a:b"], "rate_limit": {"requests": 5, "per_seconds": 1, "burst": 0}, "quota": null});
        let have = current(&[("plans", plan)]);
        let file =
            parse_file("[[plans]]\nname = \"p\"\nscopes = [\"a:b\"]\nrate_limit = { requests = 5, per_seconds = 1 }\n")
                .unwrap();
        let c = plan_changes(&file, &have, false);
        assert_eq!(c[0].fields, ["description"], "a description left out is removed; burst 0 is the default");
    }

    #[test]
    fn prune_deletes_only_in_the_sections_the_file_has() {
        let have = current(&[
            ("routes", json!({"id": "gone", "path": "/g"})),
            ("plans", json!({"name": "old"})),
            ("apps", json!({"name": "kept"})),
            ("apps", json!({"name": "default"})),
        ]);
        let file =
            parse_file("[[plans]]\nname = \"new\"\n[[apps]]\nname = \"kept\"\n[[routes]]\nid = \"r\"\npath = \"/r\"\n")
                .unwrap();
        let c: Vec<String> = plan_changes(&file, &have, true).iter().map(describe).collect();
        assert_eq!(
            c,
            [
                "+ plan new",
                "- plan old: left alone, plans cannot be deleted through the API",
                "- app default: left alone, the default app cannot be deleted",
                "+ route r",
                "- route gone",
            ]
        );
        assert!(plan_changes(&file, &have, false).iter().all(|c| c.action == "create"));
    }
}
