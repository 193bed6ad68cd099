//! The audit trail's hash chain from outside (issue 15): `keygate audit head` and `keygate audit
//! verify`, as processes, against a running keygate and against its store directly; a row changed
//! in the database behind keygate's back is named, with a non-zero exit.

use std::process::Command;

use keygate_testkit::{Options, StatusCode, TestKeygate};
use serde_json::{Value, json};

use crate::BIN;

fn keygate(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("KEYGATE_ADMIN_KEY").env_remove("KEYGATE_PEPPER").env_remove("KEYGATE_DATA_DIR");
    cmd
}

fn run(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_a_row_changed_in_the_database() {
    let db = crate::sqlx_free_pg::TempPg::create().await;
    // A data directory (the pepper) that outlives the server, for the offline check at the end.
    let kept = tempfile::tempdir().unwrap();
    let opts =
        Options { database_url: Some(db.url.clone()), data_dir: Some(kept.path().to_owned()), ..Options::default() };
    let kg = TestKeygate::start_with(opts).await.unwrap();
    let data_dir = kg.data_dir().to_str().unwrap().to_owned();
    let (_, out, err) = run(&mut keygate(&[
        "root-key",
        "create",
        "--name",
        "auditor",
        "--output",
        "json",
        "--data-dir",
        &data_dir,
        "--database-url",
        &db.url,
    ]));
    let key = serde_json::from_str::<Value>(&out).unwrap_or_else(|_| panic!("{out} {err}"))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let c = kg.client();
    let mut owner = crate::dashboard::owner(&kg).await;
    let (id, _) = c.create_token(&json!({"name": "a"})).await;
    assert_eq!(c.post(&format!("/admin/v1/tokens/{id}/revoke"), &json!({})).await.status, StatusCode::OK);
    let page = owner.get("/audit?verify=1").await;
    assert!(page.body.contains("The audit chain is intact"), "{}", page.body);
    let url = kg.url();
    let api = |args: &[&str]| {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--url", url.as_str()]);
        run(keygate(&all).env("KEYGATE_ADMIN_KEY", &key))
    };

    // The head, saved; the chain verifies, checkpoint included.
    let (code, head, err) = api(&["head"]);
    assert_eq!(code, Some(0), "{err}");
    let saved: Value = serde_json::from_str(&head).unwrap();
    assert!(saved["seq"].as_u64().unwrap() >= 3 && saved["link"].as_str().unwrap().len() == 64, "{saved}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("head.json");
    std::fs::write(&file, &head).unwrap();
    let file = file.to_str().unwrap();
    let (code, out, err) = api(&["verify", "--checkpoint", file]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("audit chain intact") && out.contains("checkpoint: found in the chain"), "{out}");

    // Someone with the database, not the pepper, softens the revocation's record.
    let revoked_event: i64 = {
        let a = c.get(&format!("/admin/v1/audit-events?target={id}&action=token.revoke")).await;
        a.body["data"][0]["id"].as_i64().unwrap()
    };
    keygate_store::admin_sql(&db.url, &format!("UPDATE audit_events SET actor = 'cli' WHERE id = {revoked_event}"))
        .await
        .unwrap();
    let (code, out, _) = api(&["verify"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BROKEN") && out.contains(&format!("first broken link: event {revoked_event}")), "{out}");
    let (code, out, _) = api(&["verify", "--output", "json"]);
    assert_eq!(code, Some(1));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["intact"].as_bool(), report["broken"]["code"].as_str()),
        (Some(false), Some("altered")),
        "{report}"
    );
    assert_eq!(report["broken"]["event_id"].as_i64(), Some(revoked_event));
    // The dashboard says so too, naming the event.
    let page = owner.get("/audit?verify=1").await;
    assert!(
        page.body.contains("The audit chain is broken") && page.body.contains(&format!("event {revoked_event}")),
        "{}",
        page.body
    );

    // The same on the store directly, with no server in the way; every workspace is checked.
    kg.stop().await;
    let (code, out, err) =
        run(&mut keygate(&["audit", "verify", "--data-dir", &data_dir, "--database-url", &db.url, "--output", "json"]));
    assert_eq!(code, Some(1), "{out} {err}");
    let reports: Value = serde_json::from_str(&out).unwrap();
    let broken: Vec<&Value> = reports.as_array().unwrap().iter().filter(|r| r["intact"] == false).collect();
    assert_eq!(broken.len(), 1, "{reports}");
    assert_eq!(broken[0]["broken"]["event_id"].as_i64(), Some(revoked_event));
    // Put back, it verifies again; a checkpoint file that is not one is a usage error (exit 2).
    keygate_store::admin_sql(&db.url, &format!("UPDATE audit_events SET actor = (SELECT actor FROM audit_events WHERE action = 'token.create' LIMIT 1) WHERE id = {revoked_event}"))
        .await
        .unwrap();
    let (code, out, err) = run(&mut keygate(&["audit", "verify", "--data-dir", &data_dir, "--database-url", &db.url]));
    assert_eq!(code, Some(0), "{out} {err}");
    std::fs::write(dir.path().join("bad.json"), "{\"seq\": 1}").unwrap();
    let bad = dir.path().join("bad.json");
    let (code, _, err) = run(&mut keygate(&[
        "audit",
        "verify",
        "--data-dir",
        &data_dir,
        "--database-url",
        &db.url,
        "--checkpoint",
        bad.to_str().unwrap(),
    ]));
    assert_eq!(code, Some(2), "{err}");
    db.drop_db().await;
}

/// `keygate audit export`: every event, as JSON lines or CSV (RFC 4180, with spreadsheet formulas
/// defused), the list's filters applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_writes_json_lines_and_csv() {
    let kg = TestKeygate::start().await.unwrap();
    let data_dir = kg.data_dir().to_str().unwrap().to_owned();
    let (_, out, err) =
        run(&mut keygate(&["root-key", "create", "--name", "exporter", "--output", "json", "--data-dir", &data_dir]));
    let key = serde_json::from_str::<Value>(&out).unwrap_or_else(|_| panic!("{out} {err}"))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let c = kg.client();
    c.create_token(&json!({"name": "=HYPERLINK(\"http://evil\")"})).await;
    c.create_token(&json!({"name": "plain, with a comma"})).await;
    let url = kg.url();
    let export = |args: &[&str]| {
        let mut all = vec!["audit", "export", "--url", url.as_str()];
        all.extend_from_slice(args);
        run(keygate(&all).env("KEYGATE_ADMIN_KEY", &key))
    };
    let listed = c.get("/admin/v1/audit-events?limit=500").await.body["data"].as_array().unwrap().len();
    let (code, out, err) = export(&[]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), listed, "every event, one per line");
    assert!(lines.iter().all(|l| l["id"].is_i64() && l["action"].is_string()));
    let (code, out, _) = export(&["--format", "csv", "--action", "token.create"]);
    assert_eq!(code, Some(0));
    let mut rows = out.split("\r\n").filter(|r| !r.is_empty());
    assert_eq!(rows.next(), Some("id,at,actor,action,target,source,before,after"));
    let rows: Vec<&str> = rows.collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows.iter().all(|r| r.contains("\"token.create\",\"tok_")), "{out}");
    assert!(out.contains("plain, with a comma") && out.contains("\"\"name\"\""), "quoted: {out}");
    let (code, _, err) = export(&["--format", "xml"]);
    assert_eq!(code, Some(2), "a usage error: {err}");
    // Without an admin key, `audit verify` reads the store of the environment directly, and says
    // what to do when there is none.
    let (code, out, err) = run(keygate(&["audit", "verify"]).env("KEYGATE_DATA_DIR", &data_dir));
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("audit chain intact"), "{out}");
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = run(keygate(&["audit", "verify"]).current_dir(empty.path()));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("KEYGATE_ADMIN_KEY") && !empty.path().join("keygate-data").exists(), "{err}");
    let r = c.get("/admin/v1/audit-events/export?format=xml").await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_query"));
    kg.stop().await;
}

/// Runs `sql` on the SQLite store in `data_dir`, as someone with the database file (not the
/// pepper) would.
async fn sqlite(data_dir: &std::path::Path, sql: &str) {
    use sqlx::Connection as _;
    let url = format!("sqlite://{}", data_dir.join("keygate.db").display());
    let mut conn = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// Retention's anchor is authenticated. The trail pruned by `audit.retention_days` still verifies,
/// a checkpoint older than the anchor reported as pruned; but the start of the trail deleted in
/// the database file and the anchor moved past it by hand (to the stored link of the last event
/// deleted, as retention would have) is a break that names the anchor, with exit 1 — where a
/// checkpoint inside the deletion used to be reported "pruned" on an intact chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_an_anchor_moved_in_the_database() {
    let kept = tempfile::tempdir().unwrap();
    let opts = Options {
        data_dir: Some(kept.path().to_owned()),
        audit: Some(keygate::config::AuditConfig { retention_days: 1 }),
        ..Options::default()
    };
    let kg = TestKeygate::start_with(opts).await.unwrap();
    let data_dir = kg.data_dir().to_owned();
    let c = kg.client();
    let (url, key) = (kg.url(), kg.root_key.clone());
    let files = tempfile::tempdir().unwrap();
    let head = |name: &str| {
        let (code, out, err) = run(keygate(&["audit", "head", "--url", &url]).env("KEYGATE_ADMIN_KEY", &key));
        assert_eq!(code, Some(0), "{err}");
        let path = files.path().join(name);
        std::fs::write(&path, &out).unwrap();
        (path.to_str().unwrap().to_owned(), serde_json::from_str::<Value>(&out).unwrap())
    };
    let verify_api = |checkpoint: &str| {
        run(keygate(&["audit", "verify", "--url", &url, "--checkpoint", checkpoint]).env("KEYGATE_ADMIN_KEY", &key))
    };

    c.create_token(&json!({"name": "old-1"})).await;
    let (early, _) = head("early.json");
    c.create_token(&json!({"name": "old-2"})).await;
    // Two days on, the hourly housekeeping deletes the events older than a day.
    kg.clock.advance_seconds(2 * 86_400);
    c.create_token(&json!({"name": "new-1"})).await;
    kg.cluster().housekeeping().await;
    let anchor = c.get("/admin/v1/audit-chain").await.body["anchor_seq"].as_u64().unwrap();
    assert!(anchor >= 3, "the old events were deleted: anchor #{anchor}");
    let (code, out, err) = verify_api(&early);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(
        out.contains("audit chain intact")
            && out.contains("deleted by retention")
            && out.contains("checkpoint: older than the events kept"),
        "{out}"
    );
    let (checkpoint, saved) = head("checkpoint.json");
    c.create_token(&json!({"name": "new-2"})).await;
    c.create_token(&json!({"name": "new-3"})).await;
    let (code, out, err) = verify_api(&checkpoint);
    assert_eq!(code, Some(0), "{out} {err}");
    kg.stop().await;

    // Someone with the database file deletes the events up to one past the checkpoint and moves
    // the anchor there, to that event's stored link.
    let ws = saved["workspace_id"].as_str().unwrap();
    let cut = saved["seq"].as_u64().unwrap() + 1;
    sqlite(
        &data_dir,
        &format!(
            "UPDATE audit_chains SET anchor_seq = {cut}, anchor_link = (SELECT link FROM audit_events \
             WHERE workspace_id = '{ws}' AND chain_seq = {cut}) WHERE workspace_id = '{ws}';
             DELETE FROM audit_events WHERE workspace_id = '{ws}' AND chain_seq <= {cut};"
        ),
    )
    .await;
    let offline = |checkpoint: &str| {
        let dir = data_dir.to_str().unwrap();
        run(&mut keygate(&["audit", "verify", "--data-dir", dir, "--checkpoint", checkpoint]))
    };
    let (code, out, err) = offline(&checkpoint);
    assert_eq!(code, Some(1), "{out} {err}");
    assert!(
        out.contains(&format!("BROKEN at #{cut}"))
            && out.contains(&format!("anchor (#{cut}) does not match its authentication code"))
            && out.contains("(altered)"),
        "{out}"
    );
    assert!(!out.contains("checkpoint: older"), "not reported as pruned: {out}");
    // Without a code at all, it is a break too.
    sqlite(&data_dir, &format!("UPDATE audit_chains SET anchor_mac = NULL WHERE workspace_id = '{ws}'")).await;
    let (code, out, err) = offline(&checkpoint);
    assert_eq!(code, Some(1), "{out} {err}");
    assert!(out.contains(&format!("anchor (#{cut}) is not authenticated")), "{out}");
}
