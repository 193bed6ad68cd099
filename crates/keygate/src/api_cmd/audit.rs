//! `keygate audit list`: the workspace's audit trail, with the API's filters.

use super::{Shown, list};
use crate::cli::{ApiCommand, AuditCommand};
use crate::client::{AdminClient, Query};

const COLUMNS: &[&str] = &["id", "at", "actor", "action", "target", "source"];

pub async fn run(args: ApiCommand<AuditCommand>) -> anyhow::Result<()> {
    let client = AdminClient::from_env(&args.api.url)?;
    let AuditCommand::List { actor, action, target, from, to, page } = &args.command;
    let mut q = Query::default();
    q.push_opt("actor", actor.as_deref());
    q.push_opt("action", action.as_deref());
    q.push_opt("target", target.as_deref());
    q.push_opt("from", from.as_deref());
    q.push_opt("to", to.as_deref());
    Shown::rows(list(&client, "/admin/v1/audit-events", q, page).await?, COLUMNS).print(args.api.output)
}
