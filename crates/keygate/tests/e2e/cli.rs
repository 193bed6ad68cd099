//! The command line against a running keygate: every admin API command group through the real
//! binary, JSON output parsed as JSON, and the documented exit codes (0 ok, 1 refused with the
//! stable code on stderr, 2 usage, 3 unreachable). `cli_root_keys_tokens_scan_and_config` in
//! main.rs covers `token`'s lifecycle, `root-key`, `scan` and `config check`.

use keygate_testkit::TestKeygate;
use serde_json::{Value, json};

use super::keygate;

/// The CLI pointed at a test server, with its default root key.
struct Cli {
    url: String,
    key: String,
}

/// One run of the binary.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn new(kg: &TestKeygate) -> Self {
        Self { url: kg.url(), key: kg.root_key.clone() }
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = keygate(args).env("KEYGATE_URL", &self.url).env("KEYGATE_ADMIN_KEY", &self.key).output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs with `--output json`, expects exit code 0 and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let r = self.run(&all);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", r.stdout))
    }

    /// Runs with table output and expects exit code 0.
    fn table(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
        r.stdout
    }

    /// Expects the server to refuse: exit code 1 and `error: CODE: …` on stderr.
    fn refused(&self, args: &[&str], code: &str) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(1), "{args:?}: {} {}", r.stdout, r.stderr);
        assert!(r.stderr.starts_with(&format!("error: {code}: ")), "{args:?}: {}", r.stderr);
        r.stderr
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["data"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect()
}

// Multi-threaded: the CLI runs as a blocking child process while the server answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_plans_scopes_apps_and_oauth_clients() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);

    // Plans: create (limits in the flags' syntax), list.
    let plan = cli.json(&[
        "plan",
        "create",
        "--name",
        "starter",
        "--description",
        "Read-only",
        "--scope",
        "orders:read",
        "--scope",
        "catalog:*",
        "--rate-limit",
        "10/1",
        "--quota",
        "1000/month",
    ]);
    let plan_id = plan["id"].as_str().unwrap().to_owned();
    assert_eq!(plan["scopes"], json!(["catalog:*", "orders:read"]));
    assert_eq!(plan["rate_limit"], json!({"requests": 10, "per_seconds": 1, "burst": 0}));
    assert_eq!(cli.json(&["plan", "list"])["data"][0]["id"], plan_id.as_str());
    let table = cli.table(&["plan", "list"]);
    assert!(table.contains("starter") && table.contains("10/1+0") && table.contains("1000/month"), "{table}");
    cli.refused(&["plan", "create", "--name", "starter"], "plan_exists");
    let changed = cli.json(&["plan", "update", &plan_id, "--scope", "orders:*", "--no-rate-limit", "--no-description"]);
    assert_eq!(changed["scopes"], json!(["orders:*"]));
    assert_eq!((&changed["rate_limit"], &changed["description"]), (&Value::Null, &Value::Null));
    assert_eq!(changed["quota"], plan["quota"], "options not given stay as they are");
    let changed = cli.json(&["plan", "update", &plan_id, "--rate-limit", "5/1+1", "--name", "basic"]);
    assert_eq!((changed["name"].as_str(), changed["rate_limit"]["burst"].as_u64()), (Some("basic"), Some(1)));
    assert_eq!(cli.run(&["plan", "update", &plan_id]).code, Some(2), "nothing to update");
    cli.refused(&["plan", "update", "plan_0000000000000000", "--name", "x"], "plan_not_found");

    // The scope catalog: put, list, delete.
    let put = cli.json(&["scope", "put", "orders:read", "--description", "Read orders", "--api", "orders"]);
    assert_eq!((put["scope"].as_str(), put["api"].as_str()), (Some("orders:read"), Some("orders")));
    cli.json(&["scope", "put", "orders:write"]);
    let scopes = cli.json(&["scope", "list"]);
    assert_eq!(scopes["data"].as_array().unwrap().len(), 2);
    assert!(cli.table(&["scope", "list"]).contains("Read orders"));
    let deleted = cli.run(&["scope", "delete", "orders:write", "--output", "json"]);
    assert_eq!((deleted.code, deleted.stdout.as_str()), (Some(0), ""), "a 204 prints nothing as JSON");
    assert!(cli.table(&["scope", "delete", "orders:read"]).contains("removed orders:read"));
    cli.refused(&["scope", "delete", "orders:read"], "scope_not_found");
    assert_eq!(cli.json(&["scope", "list"])["data"], json!([]));

    // Apps: create, show, update, list (one page, the next, all pages). The clock moves between
    // creations so that "newest first" is one order.
    kg.clock.advance_seconds(1);
    let app = cli.json(&[
        "app",
        "create",
        "--name",
        "Mobile",
        "--description",
        "iOS",
        "--plan",
        &plan_id,
        "--metadata",
        r#"{"team":"mobile"}"#,
    ]);
    let app_id = app["id"].as_str().unwrap().to_owned();
    assert_eq!((app["plan_id"].as_str(), app["metadata"]["team"].as_str()), (Some(plan_id.as_str()), Some("mobile")));
    assert_eq!(cli.json(&["app", "show", &app_id])["name"], "Mobile");
    let updated = cli.json(&["app", "update", &app_id, "--name", "Mobile 2", "--no-description", "--no-plan"]);
    assert_eq!(
        (updated["name"].as_str(), &updated["description"], &updated["plan_id"]),
        (Some("Mobile 2"), &Value::Null, &Value::Null)
    );
    kg.clock.advance_seconds(1);
    let other = cli.json(&["app", "create", "--name", "Web"])["id"].as_str().unwrap().to_owned();
    let first = cli.json(&["app", "list", "--limit", "1"]);
    assert_eq!(ids(&first), vec![other.clone()], "newest first");
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = cli.json(&["app", "list", "--limit", "1", "--cursor", cursor]);
    assert_eq!(ids(&second), vec![app_id.clone()]);
    let all = cli.json(&["app", "list", "--limit", "1", "--all"]);
    assert_eq!(all["data"].as_array().unwrap().len(), 3, "both apps and the default app: {all}");
    assert_eq!(all["next_cursor"], Value::Null);
    let table = cli.table(&["app", "list", "--limit", "1"]);
    assert!(table.contains("Web") && table.contains("more: --cursor"), "{table}");
    cli.refused(&["app", "show", "app_000000000000"], "app_not_found");

    // OAuth clients: the secret is printed once, by create and by rotate-secret only.
    let client = cli.json(&["oauth-client", "create", &app_id, "--grant-type", "client_credentials"]);
    let secret = client["client_secret"].as_str().unwrap().to_owned();
    assert_eq!(client["grant_types"], json!(["client_credentials"]));
    let shown = cli.json(&["oauth-client", "show", &app_id]);
    assert!(shown.get("client_secret").is_none() && !shown.to_string().contains(&secret));
    assert_eq!(shown["client_id"], client["client_id"]);
    assert!(!cli.table(&["oauth-client", "show", &app_id]).contains(&secret));
    cli.refused(&["oauth-client", "create", &app_id], "oauth_client_exists");
    let changed = cli.json(&["oauth-client", "update", &app_id, "--exchange-subject-app", &other]);
    assert_eq!(changed["exchange_subject_apps"], json!([other]));
    let cleared = cli.json(&["oauth-client", "update", &app_id, "--no-exchange-subject-apps"]);
    assert_eq!(cleared["exchange_subject_apps"], json!([]));
    let rotated = cli.table(&["oauth-client", "rotate-secret", &app_id, "--grace-period", "60"]);
    assert!(rotated.contains("client_secret: ") && rotated.contains("shown only once"), "{rotated}");
    assert!(!rotated.contains(&secret), "a new secret");
    cli.refused(&["oauth-client", "show", &other], "oauth_client_not_found");
    // Suspended with a reason (shown in the table too), suspended again (nothing changes), resumed.
    let suspended = cli.json(&["oauth-client", "suspend", &app_id, "--reason", "secret in a CI log"]);
    assert_eq!(suspended["suspended_reason"], "secret in a CI log");
    let since = suspended["suspended_at"].as_str().expect("suspended_at").to_owned();
    let table = cli.table(&["oauth-client", "suspend", &app_id]);
    assert!(
        table.contains("SUSPENDED_AT") && table.contains(&since) && table.contains("secret in a CI log"),
        "{table}"
    );
    assert_eq!(cli.json(&["oauth-client", "show", &app_id])["suspended_at"], since.as_str());
    let resumed = cli.json(&["oauth-client", "resume", &app_id]);
    assert_eq!((&resumed["suspended_at"], &resumed["suspended_reason"]), (&Value::Null, &Value::Null));
    cli.refused(&["oauth-client", "suspend", &other], "oauth_client_not_found");

    // Signing keys: list, rotate (a new key is published beside the old one).
    assert_eq!(cli.json(&["signing-key", "list"])["data"].as_array().unwrap().len(), 1);
    let new_keys = cli.json(&["signing-key", "rotate"]);
    assert_eq!(new_keys["data"].as_array().unwrap().len(), 1, "{new_keys}");
    assert_eq!(cli.json(&["signing-key", "list"])["data"].as_array().unwrap().len(), 2);

    // Deleting an app that holds a token is refused unless --revoke-tokens says so.
    let token = cli.json(&["token", "create", "--name", "m", "--app", &app_id]);
    let token_id = token["id"].as_str().unwrap().to_owned();
    let refusal = cli.refused(&["app", "delete", &app_id], "app_has_tokens");
    assert!(refusal.contains(&format!("hint: `keygate app delete {app_id} --revoke-tokens`")), "{refusal}");
    assert_eq!(cli.json(&["token", "show", &token_id])["status"], "active", "nothing was revoked");
    let deleted = cli.table(&["app", "delete", &app_id, "--revoke-tokens"]);
    assert!(deleted.contains(&format!("deleted {app_id}")), "{deleted}");
    cli.refused(&["token", "show", &token_id], "token_not_found");
    let default_app = ids(&all).into_iter().find(|id| *id != app_id && *id != other).unwrap();
    cli.refused(&["app", "delete", &default_app, "--revoke-tokens"], "default_app");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_reads_the_audit_trail_and_token_usage() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);
    let token = cli.json(&["token", "create", "--name", "metered"]);
    let (id, secret) = (token["id"].as_str().unwrap().to_owned(), token["token"].as_str().unwrap().to_owned());
    cli.json(&["token", "suspend", &id]);
    cli.json(&["token", "resume", &id]);

    // Filters and pagination, as the API has them.
    let trail = cli.json(&["audit", "list", "--target", &id]);
    let actions: Vec<&str> = trail["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["token.resume", "token.suspend", "token.create"]);
    let page = cli.json(&["audit", "list", "--target", &id, "--limit", "2"]);
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let next = cli.json(&[
        "audit",
        "list",
        "--target",
        &id,
        "--limit",
        "2",
        "--cursor",
        page["next_cursor"].as_str().unwrap(),
    ]);
    assert_eq!(next["data"][0]["action"], "token.create");
    assert_eq!(next["next_cursor"], Value::Null);
    let all = cli.json(&["audit", "list", "--target", &id, "--limit", "1", "--all"]);
    assert_eq!(all["data"], trail["data"], "--all follows every cursor");
    let suspends = cli.json(&["audit", "list", "--action", "token.suspend"]);
    assert_eq!(suspends["data"].as_array().unwrap().len(), 1);
    let actor = trail["data"][0]["actor"].as_str().unwrap();
    assert!(actor.starts_with("rk_"), "{actor}");
    let by_actor = cli.json(&["audit", "list", "--actor", actor]);
    assert_eq!(by_actor["data"].as_array().unwrap().len(), 3, "{by_actor}");
    assert_eq!(cli.json(&["audit", "list", "--actor", "cli"])["data"].as_array().unwrap().len(), 1, "root_key.create");
    let early = cli.json(&["audit", "list", "--to", "2000-01-01T00:00:00Z"]);
    assert_eq!(early["data"], json!([]));
    let table = cli.table(&["audit", "list", "--target", &id]);
    assert!(table.contains("token.suspend") && table.contains("ACTOR"), "{table}");
    cli.refused(&["audit", "list", "--from", "yesterday"], "invalid_query");

    // Usage: one request through the gateway, counted after a flush.
    kg.sync_index().await.unwrap();
    let answer = reqwest::Client::new()
        .get(format!("{}/demo/echo", kg.gateway_url()))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    kg.flush_usage().await;
    let range = ["--from", "2030-01-01T00:00:00Z", "--to", "2031-01-01T00:00:00Z", "--granularity", "day"];
    let mut args = vec!["token", "usage", id.as_str()];
    args.extend(range);
    let usage = cli.json(&args);
    assert_eq!((usage["token_id"].as_str(), usage["granularity"].as_str()), (Some(id.as_str()), Some("day")));
    assert_eq!(usage["total"]["requests"], 1, "{usage}");
    assert_eq!(usage["routes"][0]["route"], "demo");
    let table = cli.table(&args);
    assert!(table.contains("total") && table.contains("demo") && table.contains("REQUESTS"), "{table}");
    let bad = cli.run(&["token", "usage", &id, "--granularity", "week"]);
    assert_eq!(bad.code, Some(2), "clap refuses an unknown granularity: {}", bad.stderr);
    cli.refused(&["token", "usage", "tok_000000000000"], "token_not_found");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exit_codes_and_completions() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);

    // 1: the server refused; its stable code and message on stderr, nothing on stdout.
    let r = cli.run(&["token", "show", "tok_000000000000", "--output", "json"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(1), ""));
    assert_eq!(r.stderr.trim_end(), "error: token_not_found: no token with this id exists");
    let narrow = kg.root_key("default", &[keygate_core::model::Permission::TokensRead]).await.unwrap();
    let r = Cli { url: kg.url(), key: narrow }.run(&["app", "list"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.starts_with("error: missing_permission: "), "{}", r.stderr);

    // 2: usage errors, clap's and ours; nothing is sent.
    for args in [
        &["app", "list", "--limit", "0"][..],
        &["app", "list", "--cursor", "x", "--all"],
        &["app", "frobnicate"],
        &["app", "update", "app_x"],
        &["app", "create", "--name", "x", "--metadata", "[1]"],
        &["app", "show", "../tokens"],
        &["plan", "create", "--name", "x", "--rate-limit", "fast"],
        &["completions", "tcsh"],
        &["app", "list", "--url", "notaurl"],
    ] {
        let r = cli.run(args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
    }
    let no_key = keygate(&["app", "list", "--url", &kg.url()]).output().unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_key.stderr).contains("KEYGATE_ADMIN_KEY"));

    // 3: nothing listens there (a port just released by the OS).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    for args in [&["app", "list"][..], &["token", "list"], &["audit", "list", "--all"]] {
        let mut all = args.to_vec();
        all.extend(["--url", closed.as_str()]);
        let r = cli.run(&all);
        assert_eq!(r.code, Some(3), "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with(&format!("error: cannot reach keygate at {closed}")), "{}", r.stderr);
    }

    // 3 too: a server that closes the connection without answering.
    let closing = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closing_url = format!("http://{}", closing.local_addr().unwrap());
    let closer = std::thread::spawn(move || closing.incoming().take(1).for_each(drop));
    let r = cli.run(&["scope", "list", "--url", &closing_url]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    closer.join().unwrap();

    // Completions: a script on stdout for every shell clap_complete knows.
    let bash = cli.table(&["completions", "bash"]);
    assert!(bash.contains("_keygate()") && bash.contains("oauth-client") && bash.contains("rotate-secret"), "{bash}");
    for shell in ["zsh", "fish", "powershell", "elvish"] {
        assert!(cli.table(&["completions", shell]).contains("keygate"), "{shell}");
    }
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_routes_and_workspaces() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let kg = TestKeygate::start_with(keygate_testkit::Options {
        routes: vec![keygate_testkit::route("orders", "/orders", &up.url())],
        ..keygate_testkit::Options::default()
    })
    .await
    .unwrap();
    let cli = Cli::new(&kg);
    let dir = tempfile::tempdir().unwrap();

    // A route written as in the config file, created, served, listed beside the file's.
    let toml = dir.path().join("billing.toml");
    std::fs::write(
        &toml,
        format!("[[routes]]\nid = \"billing\"\npath = \"/billing\"\nupstream = \"{}\"\npublic = true\n", up.url()),
    )
    .unwrap();
    let created = cli.json(&["route", "create", "-f", toml.to_str().unwrap()]);
    assert_eq!((created["id"].as_str(), created["source"].as_str()), (Some("billing"), Some("api")));
    let served = reqwest::get(format!("{}/billing/1", kg.gateway_url())).await.unwrap();
    assert_eq!(served.status(), 200, "the route serves as soon as the command returns");
    let list = cli.json(&["route", "list"]);
    assert_eq!(ids(&list), ["orders", "billing"]);
    let table = cli.table(&["route", "list"]);
    assert!(table.starts_with("ID") && table.contains("billing") && table.contains("file"), "{table}");

    // `show --output json` is a starting point for `update -f`: the answer goes back as it is.
    let mut shown = cli.json(&["route", "show", "billing"]);
    shown["path"] = json!("/invoices");
    shown["public"] = json!(false);
    let json_file = dir.path().join("billing.json");
    std::fs::write(&json_file, shown.to_string()).unwrap();
    let updated = cli.json(&["route", "update", "billing", "-f", json_file.to_str().unwrap()]);
    assert_eq!(updated["path"], "/invoices");
    assert_eq!(reqwest::get(format!("{}/invoices/1", kg.gateway_url())).await.unwrap().status(), 401);

    // Refusals keep the API's codes; the file's routes say where to change them.
    cli.refused(&["route", "update", "orders", "-f", json_file.to_str().unwrap()], "route_from_file");
    let stderr = cli.refused(&["route", "delete", "orders"], "route_from_file");
    assert!(stderr.contains("config file"), "{stderr}");
    std::fs::write(&json_file, json!({"id": "other", "path": "/o", "upstream": up.url()}).to_string()).unwrap();
    cli.refused(&["route", "update", "billing", "-f", json_file.to_str().unwrap()], "route_id_mismatch");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "id = \"x\"\npath = \"/x\"\nupstream = \"ftp://example.com\"\n").unwrap();
    cli.refused(&["route", "create", "-f", bad.to_str().unwrap()], "invalid_route");
    std::fs::write(&bad, "[[routes]]\nid = \"a\"\n[[routes]]\nid = \"b\"\n").unwrap();
    let r = cli.run(&["route", "create", "-f", bad.to_str().unwrap()]);
    assert_eq!(r.code, Some(2), "two routes in one file is a usage error: {}", r.stderr);
    assert_eq!(cli.run(&["route", "show", ".."]).code, Some(2));
    assert_eq!(cli.run(&["route", "create", "-f", "/nonexistent/route.toml"]).code, Some(2));

    cli.table(&["route", "delete", "billing"]);
    cli.refused(&["route", "show", "billing"], "route_not_found");

    // Workspaces: created, renamed, listed; deleting one with tokens needs --revoke-tokens.
    let ws = cli.json(&["workspace", "create", "team-a"]);
    let ws_id = ws["id"].as_str().unwrap().to_owned();
    let renamed = cli.json(&["workspace", "rename", &ws_id, "team-b"]);
    assert_eq!(renamed["name"], "team-b");
    let names: Vec<Value> =
        cli.json(&["workspace", "list"])["data"].as_array().unwrap().iter().map(|w| w["name"].clone()).collect();
    assert_eq!(names, [json!("default"), json!("team-b")]);
    cli.refused(&["workspace", "create", "team-b"], "workspace_exists");

    // A root key of the new workspace, a token in it, then the deletion.
    let b_key = kg.root_key("team-b", &keygate_core::model::Permission::ALL).await.unwrap();
    let team = Cli { url: kg.url(), key: b_key };
    team.json(&["token", "create", "--name", "t"]);
    let stderr = team.refused(&["workspace", "list"], "instance_key_required");
    assert!(stderr.contains("hint: workspaces are managed with a root key of the default workspace"), "{stderr}");
    let stderr = cli.refused(&["workspace", "delete", &ws_id], "workspace_has_tokens");
    assert!(stderr.contains("--revoke-tokens"), "{stderr}");
    let gone = cli.json(&["workspace", "delete", &ws_id, "--revoke-tokens"]);
    assert_eq!((gone["tokens_revoked"].as_u64(), gone["root_keys_revoked"].as_u64()), (Some(1), Some(1)));
    cli.refused(&["workspace", "show", &ws_id], "workspace_not_found");
    cli.refused(&["workspace", "delete", "ws_default_is_not_an_id"], "workspace_not_found");
}

/// `keygate export` writes a workspace as a file; `keygate apply -f` makes another keygate match
/// it (a dry run first, which changes nothing), again and again without change; `--prune` deletes
/// what the file no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exports_a_workspace_and_applies_it_elsewhere() {
    let up = keygate_testkit::MockUpstream::start().await.unwrap();
    let source = TestKeygate::start().await.unwrap();
    let c = source.client();
    assert_eq!(
        c.send(
            reqwest::Method::PUT,
            "/admin/v1/scopes/orders:read",
            Some(&json!({"description": "Read orders", "api": "orders"}))
        )
        .await
        .status,
        200
    );
    let plan = c
        .post(
            "/admin/v1/plans",
            &json!({"name": "starter", "scopes": ["orders:read"], "rate_limit": {"requests": 10, "per_seconds": 1}}),
        )
        .await;
    assert_eq!(plan.status, 201, "{:?}", plan.body);
    let app = c
        .post("/admin/v1/apps", &json!({"name": "billing", "plan_id": plan.str("/id"), "metadata": {"team": "b"}}))
        .await;
    assert_eq!(app.status, 201, "{:?}", app.body);
    let route = json!({"id": "orders", "path": "/orders", "upstream": up.url(), "scopes": {"GET": "orders:read"}, "retries": 0});
    assert_eq!(c.post("/admin/v1/routes", &route).await.status, 201);

    let exported = Cli::new(&source).table(&["export"]);
    for part in [
        "[[scopes]]",
        "scope = \"orders:read\"",
        "[[plans]]",
        "name = \"starter\"",
        "[[apps]]",
        "plan = \"starter\"",
        "[[routes]]",
        "retries = 0",
    ] {
        assert!(exported.contains(part), "{part} in:\n{exported}");
    }
    assert!(!exported.contains("created_at") && !exported.contains("plan_"), "no server fields or ids:\n{exported}");

    let target = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&target);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("workspace.toml");
    std::fs::write(&file, &exported).unwrap();
    let f = file.to_str().unwrap();

    let dry = cli.table(&["apply", "-f", f, "--dry-run"]);
    assert!(
        dry.contains("+ scope orders:read")
            && dry.contains("+ plan starter")
            && dry.contains("+ app billing")
            && dry.contains("+ route orders"),
        "{dry}"
    );
    assert!(dry.contains("(dry run: nothing was changed)"), "{dry}");
    assert_eq!(target.client().get("/admin/v1/plans").await.body["data"], json!([]), "a dry run changes nothing");

    let applied = cli.table(&["apply", "-f", f]);
    assert!(applied.ends_with("4 created, 0 changed, 0 deleted\n"), "{applied}");
    assert_eq!(cli.table(&["export"]), exported, "the target now exports the same file");
    let again = cli.json(&["apply", "-f", f]);
    assert_eq!(again["changes"], json!([]), "applying twice changes nothing");
    let (_, token) = target.client().create_token(&json!({"name": "t", "scopes": ["orders:read"]})).await;
    target.sync_index().await.unwrap();
    let served = reqwest::Client::new()
        .get(format!("{}/orders/1", target.gateway_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200, "the applied route serves");

    // The file changes: the route moves, the app goes, the plan loses its limit.
    let mut doc: toml::Table = exported.parse().unwrap();
    doc["routes"][0]["path"] = "/v2/orders".into();
    doc["plans"][0].as_table_mut().unwrap().remove("rate_limit");
    doc["apps"].as_array_mut().unwrap().retain(|a| a["name"].as_str() != Some("billing"));
    let edited = toml::to_string(&doc).unwrap();
    assert_ne!(edited, exported);
    std::fs::write(&file, &edited).unwrap();
    let pruned = cli.json(&["apply", "-f", f, "--prune"]);
    let lines: Vec<(String, String)> = pruned["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["action"].as_str().unwrap().to_owned(), c["key"].as_str().unwrap().to_owned()))
        .collect();
    assert!(lines.contains(&("update".into(), "starter".into())), "{pruned}");
    assert!(lines.contains(&("update".into(), "orders".into())), "{pruned}");
    assert!(lines.contains(&("delete".into(), "billing".into())), "{pruned}");
    let apps = target.client().get("/admin/v1/apps").await.body;
    assert_eq!(apps["data"].as_array().unwrap().len(), 1, "billing deleted, the default app kept: {apps}");
    assert!(target.client().get("/admin/v1/plans").await.body["data"][0]["rate_limit"].is_null());
    let r = cli.json(&["route", "show", "orders"]);
    assert_eq!(r["path"], "/v2/orders");

    // A file with a mistake is refused before anything is sent.
    std::fs::write(&file, "[[plans]]\nname = \"x\"\ncolour = 1\n").unwrap();
    let r = cli.run(&["apply", "-f", f]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("unknown field \"colour\""), "{}", r.stderr);
}

/// The documented pre-commit hook (`docs/examples/pre-commit`), installed in a real repository:
/// a commit that would add a token is refused with the finding named, a clean one goes through.
#[test]
fn the_pre_commit_hook_refuses_a_commit_that_adds_a_token() {
    let token = keygate_core::token_format::mint(
        &keygate_core::token_format::TokenPrefix::default(),
        &keygate_core::secret::OsRandom,
    )
    .unwrap()
    .secret
    .expose()
    .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    let bin_dir = std::path::Path::new(crate::BIN).parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    assert!(git(&["init", "-q"]).status.success());
    let hook = repo.join(".git/hooks/pre-commit");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/examples/pre-commit"), &hook).unwrap();
    std::fs::write(repo.join("README"), "hello\n").unwrap();
    assert!(git(&["add", "-A"]).status.success());
    let clean = git(&["commit", "-q", "-m", "clean"]);
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stderr));
    std::fs::write(repo.join("app.env"), format!("a=1\nb=2\nKEY={token}\n")).unwrap();
    assert!(git(&["add", "app.env"]).status.success());
    let leak = git(&["commit", "-q", "-m", "config"]);
    let out = String::from_utf8_lossy(&leak.stdout).into_owned() + &String::from_utf8_lossy(&leak.stderr);
    assert!(!leak.status.success(), "the hook let the token through: {out}");
    assert!(out.contains("staged app.env:3"), "{out}");
    assert!(!out.contains(&token), "the finding never shows the secret: {out}");
    let log = git(&["log", "--oneline"]);
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 1, "only the clean commit was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_llm_providers_without_keys_on_the_command_line() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);
    let made = {
        let out = keygate(&[
            "provider",
            "create",
            "--id",
            "oa",
            "--kind",
            "openai",
            "--base-url",
            "https://api.example.com/v1",
            "--price",
            "gpt-4o-mini=0.15,0.6",
            "--api-key-env",
            "PROVIDER_KEY",
            "--output",
            "json",
        ])
        .env("KEYGATE_URL", &cli.url)
        .env("KEYGATE_ADMIN_KEY", &cli.key)
        .env("PROVIDER_KEY", "sk-from-the-environment")
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    assert_eq!(made["prices"]["gpt-4o-mini"]["output"], 0.6);
    assert!(!made.to_string().contains("sk-from-the-environment"), "the key is never printed");
    let list = cli.table(&["provider", "list"]);
    assert!(list.contains("oa") && list.contains(made["key_fingerprint"].as_str().unwrap()), "{list}");

    // A new key from standard input.
    let mut child = keygate(&["provider", "rotate-key", "oa", "--api-key-stdin", "--output", "json"])
        .env("KEYGATE_URL", &cli.url)
        .env("KEYGATE_ADMIN_KEY", &cli.key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"sk-rotated-from-stdin\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(rotated["key_fingerprint"], made["key_fingerprint"]);

    cli.refused(
        &["provider", "create", "--id", "oa", "--kind", "openai", "--base-url", "https://x.example"],
        "provider_exists",
    );
    let r = cli.run(&[
        "provider",
        "create",
        "--id",
        "p",
        "--kind",
        "openai",
        "--base-url",
        "https://x.example",
        "--price",
        "m=1",
    ]);
    assert_eq!(r.code, Some(2), "a malformed price is a usage error: {}", r.stderr);
    let r = cli.run(&[
        "provider",
        "create",
        "--id",
        "p",
        "--kind",
        "openai",
        "--base-url",
        "https://x.example",
        "--api-key-env",
        "NOT_SET_ANYWHERE",
    ]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(cli.table(&["provider", "delete", "oa"]).contains("deleted provider oa"));
    cli.refused(&["provider", "show", "oa"], "provider_not_found");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_apis_and_their_lifecycle() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);
    let made = cli.json(&["api", "create", "--name", "orders", "--version", "v1", "--version", "v2"]);
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["state"], "draft");
    assert_eq!(made["versions"][1]["name"], "v2");
    let published = cli.json(&["api", "update", &id, "--state", "published", "--description", "Orders"]);
    assert_eq!((published["state"].as_str(), published["description"].as_str()), (Some("published"), Some("Orders")));
    let v1 = cli.json(&["api", "update", &id, "--version", "v1", "--state", "published"]);
    assert_eq!(v1["versions"][0]["state"], "published");
    let dep = cli.json(&[
        "api",
        "update",
        &id,
        "--version",
        "v1",
        "--state",
        "deprecated",
        "--sunset",
        "2031-01-01T00:00:00Z",
        "--successor",
        "/v2/orders",
    ]);
    assert_eq!(dep["versions"][0]["sunset"], "2031-01-01T00:00:00Z");
    let table = cli.table(&["api", "list"]);
    assert!(table.contains("orders") && table.contains("published"), "{table}");
    assert_eq!(cli.json(&["api", "show", &id])["versions"][0]["successor"], "/v2/orders");
    cli.refused(&["api", "update", &id, "--version", "v2", "--state", "retired"], "invalid_state_transition");
    cli.refused(&["api", "update", &id, "--state", "gone"], "invalid_state");
    let usage = cli.run(&["api", "update", &id, "--version", "v1", "--name", "x"]);
    assert_eq!(usage.code, Some(2), "a version takes only its own fields: {}", usage.stderr);
    assert_eq!(cli.run(&["api", "show", "../x"]).code, Some(2));
    assert!(cli.table(&["api", "delete", &id]).contains(&format!("deleted API {id}")));
    cli.refused(&["api", "show", &id], "api_not_found");
    kg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_governs_limits_rules_reviews_and_statements() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);
    // A plan with a ceiling; an app on it with a shared limit; a limited-use token.
    let plan = cli.json(&["plan", "create", "--name", "starter", "--scope", "orders:*", "--rate-limit", "10/60"]);
    let plan_id = plan["id"].as_str().unwrap().to_owned();
    let app = cli.json(&[
        "app",
        "create",
        "--name",
        "shop",
        "--plan",
        &plan_id,
        "--rate-limit",
        "5/60",
        "--quota",
        "100/day",
    ]);
    let app_id = app["id"].as_str().unwrap().to_owned();
    assert_eq!(app["rate_limit"], json!({"requests": 5, "per_seconds": 60, "burst": 0}));
    assert_eq!(app["quota"], json!({"requests": 100, "period": "day"}));
    let token = cli.json(&["token", "create", "--name", "once", "--app", &app_id, "--max-uses", "1"]);
    assert_eq!(token["max_uses"], 1);
    let id = token["id"].as_str().unwrap().to_owned();
    assert_eq!(cli.json(&["token", "update", &id, "--no-max-uses"])["max_uses"], Value::Null);
    // Lowering the plan lowers the token, and says so on stderr.
    let r = cli.run(&["plan", "update", &plan_id, "--rate-limit", "2/60"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("lowered to the plan's ceiling: {id} rate_limit")), "{}", r.stderr);
    assert!(r.stderr.contains(&format!("{app_id} rate_limit")), "the app's shared limit too: {}", r.stderr);

    // Token rules from a file, shown back; a token against them is refused with the stable code.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.json");
    std::fs::write(&file, r#"{"require_expiry": true, "dormant_days": 90}"#).unwrap();
    let rules = cli.json(&["policy", "set", "-f", file.to_str().unwrap()]);
    assert_eq!((rules["require_expiry"].as_bool(), rules["dormant_days"].as_u64()), (Some(true), Some(90)));
    assert_eq!(cli.json(&["policy", "show"])["dormant_days"], 90);
    cli.refused(&["token", "create", "--name", "forever"], "expiry_required");
    std::fs::write(&file, r#"{"dormant_days": 0}"#).unwrap();
    cli.refused(&["policy", "set", "-f", file.to_str().unwrap()], "invalid_policy");

    // The access review and the statement, as tables, JSON and CSV.
    let review = cli.table(&["token", "review"]);
    assert!(review.contains("once") && review.contains("shop"), "{review}");
    let csv = cli.table(&["token", "review", "--csv"]);
    assert!(csv.starts_with("token_id,name,app_id,app_name,owner,scopes,status,dormant"), "{csv}");
    let statement = cli.json(&["app", "statement", &app_id]);
    assert_eq!((statement["requests"].as_u64(), statement["closed"].as_bool()), (Some(0), Some(false)));
    let csv = cli.table(&["app", "statement", &app_id, "--period", "2030-01", "--csv"]);
    assert!(csv.starts_with("period,item,quantity,unit_price,amount,currency"), "{csv}");
    cli.refused(&["app", "statement", &app_id, "--period", "2030-13"], "invalid_period");

    // The providers' report, as a table, JSON and CSV (by reason: nothing refused yet).
    let table = cli.table(&["report", "usage", "--by", "app"]);
    assert!(table.contains("KEY") || table.contains("key"), "{table}");
    let report = cli.json(&["report", "usage", "--by", "reason"]);
    assert_eq!((report["by"].as_str(), report["groups"].as_array().map(Vec::len)), (Some("reason"), Some(0)));
    let csv = cli.table(&["report", "usage", "--by", "route", "--csv"]);
    assert!(csv.starts_with("key,requests,ok,client_errors,server_errors,p50_ms"), "{csv}");
    cli.refused(&["report", "usage", "--from", "yesterday"], "invalid_query");
    kg.stop().await;
}

/// `keygate subscription`: subscribe an app to an API that wants approval (the CLI's key holds
/// apis:write, so it counts as the owner and the subscription is active at once), list, cancel;
/// refusals with their codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_subscribes_apps_to_apis() {
    let kg = TestKeygate::start().await.unwrap();
    let cli = Cli::new(&kg);
    let api = cli.json(&["api", "create", "--name", "orders"]);
    let api_id = api["id"].as_str().unwrap().to_owned();
    kg.client()
        .patch(&format!("/admin/v1/apis/{api_id}"), &serde_json::json!({"state": "published", "access": "approval"}))
        .await;
    let app = cli.json(&["app", "create", "--name", "shop"]);
    let app_id = app["id"].as_str().unwrap().to_owned();
    let sub = cli.json(&["subscription", "create", &app_id, "--api", "orders"]);
    assert_eq!(sub["status"], "active", "a key holding apis:write approves as it subscribes: {sub}");
    let id = sub["id"].as_str().unwrap().to_owned();
    cli.refused(&["subscription", "create", &app_id, "--api", "orders"], "subscription_exists");
    let table = cli.table(&["subscription", "list", "--app", &app_id]);
    assert!(table.contains(&id) && table.contains("active"), "{table}");
    let ended = cli.json(&["subscription", "cancel", &id, "--reason", "moved to v2"]);
    assert_eq!((ended["status"].as_str(), ended["reason"].as_str()), (Some("cancelled"), Some("moved to v2")));
    cli.refused(&["subscription", "approve", &id], "invalid_subscription_transition");
    cli.refused(&["subscription", "create", &app_id, "--api", "nothing"], "api_not_found");
    kg.stop().await;
}

/// The workspace's security and governance settings, which only the dashboard could change
/// before: through `/admin/v1/policy/settings` and `keygate policy settings`, audited, checked,
/// and applied (an exposure policy set here suspends a leaked token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_api_change_the_security_settings() {
    let kg = TestKeygate::start().await.unwrap();
    let c = kg.client();
    let cli = Cli::new(&kg);
    let got = c.get("/admin/v1/policy/settings").await;
    assert_eq!(
        got.body,
        json!({"exposure_action": "notify", "anomaly_suspend": null, "max_token_age_days": null,
            "suspend_unrotated": false, "max_token_lifetime_days": null,
            "plan_changes_need_approval": false, "api_publish_needs_approval": false})
    );
    // Token rules set first stay as they are.
    let rules =
        c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/rules", Some(&json!({"require_expiry": true}))).await;
    assert_eq!(rules.status.as_u16(), 200);

    // The CLI changes only the flags given.
    let set = cli.json(&[
        "policy",
        "settings",
        "--exposure-action",
        "suspend",
        "--anomaly-suspend",
        "high",
        "--max-token-age-days",
        "90",
    ]);
    assert_eq!((set["exposure_action"].as_str(), set["anomaly_suspend"].as_str()), (Some("suspend"), Some("high")));
    assert_eq!(set["max_token_age_days"], 90);
    let set = cli.json(&["policy", "settings", "--api-publish-needs-approval", "true", "--anomaly-suspend", "none"]);
    assert_eq!((set["exposure_action"].as_str(), set["anomaly_suspend"].clone()), (Some("suspend"), Value::Null));
    assert_eq!(set["api_publish_needs_approval"], true);
    let shown = cli.table(&["policy", "settings"]);
    assert!(shown.contains("EXPOSURE_ACTION") && shown.contains("suspend"), "{shown}");
    assert_eq!(c.get("/admin/v1/policy/rules").await.body["require_expiry"], true, "the rules are untouched");
    let trail = c.get("/admin/v1/audit-events?action=workspace.policy_changed").await;
    assert_eq!(trail.body["data"].as_array().unwrap().len(), 3, "each change audited: {}", trail.body);
    assert_eq!(trail.body["data"][0]["after"]["api_publish_needs_approval"], true);

    // Refused with a stable code, and nothing changed.
    for bad in [json!({"max_token_age_days": 0}), json!({"max_token_lifetime_days": 40000})] {
        let r = c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/settings", Some(&bad)).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_policy"), "{bad}: {:?}", r.body);
    }
    for bad in [json!({"exposure_action": "explode"}), json!({"colour": "red"})] {
        let r = c.send(keygate_testkit::Method::PUT, "/admin/v1/policy/settings", Some(&bad)).await;
        assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_body"), "{bad}: {:?}", r.body);
    }
    cli.refused(&["policy", "settings", "--max-token-lifetime-days", "0"], "invalid_policy");
    assert_eq!(c.get("/admin/v1/policy/settings").await.body["exposure_action"], "suspend");

    // Applied: a token found exposed is suspended under this policy.
    let (id, secret) = c.create_token(&json!({"name": "leaks", "expires_in": 3600})).await;
    let found =
        c.post("/admin/v1/tokens/exposures", &json!({"findings": [{"token": secret, "location": "a paste"}]})).await;
    assert_eq!(found.status.as_u16(), 200, "{:?}", found.body);
    let t = c.get(&format!("/admin/v1/tokens/{id}")).await;
    assert_eq!((t.body["status"].as_str(), t.body["exposed_at"].is_string()), (Some("suspended"), true), "{}", t.body);
    kg.stop().await;
}
