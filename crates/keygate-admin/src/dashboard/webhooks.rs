//! The workspace's webhook endpoints for its owners and admins (`/settings/webhooks`): the list,
//! adding an endpoint (its signing secret shown once), and per endpoint its delivery log with
//! every attempt, redelivery, a test event, enabling and disabling, a new secret, deletion. The
//! same service calls as the admin API, audited with the person as actor.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::ids::WebhookId;
use keygate_core::model::PageRequest;
use keygate_core::notify::{Delivery, EVENT_TYPES, WebhookEndpoint};
use minijinja::{Value, context};

use super::pages::{MsgQuery, ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::webhooks::{CreatedWebhook, NewWebhook, WebhookUpdate};

fn manager(v: &Viewer) -> Result<(), PageError> {
    if v.role.manages_all() { Ok(()) } else { Err(PageError::forbidden(v, "manage webhooks")) }
}

/// An endpoint as the pages show it at `now` (an overlap that has ended is not shown).
fn endpoint_row(w: &WebhookEndpoint, now: keygate_core::Timestamp) -> Value {
    context! {
        id => w.id.to_string(),
        url => w.url.clone(),
        description => w.description.clone(),
        events => if w.event_types.is_empty() { "every event".to_owned() } else { w.event_types.join(", ") },
        event_types => w.event_types.clone(),
        enabled => w.enabled,
        disabled_reason => w.disabled_reason.clone(),
        failing_since => w.failing_since.map(|t| t.to_rfc3339()),
        previous_secret_until => w.previous_secret_until.filter(|t| *t > now).map(|t| t.to_rfc3339()),
        created_at => w.created_at.to_rfc3339(),
    }
}

fn delivery_row(d: &Delivery) -> Value {
    let pending = d.state == keygate_core::notify::DeliveryState::Pending;
    context! {
        id => d.id,
        message_id => d.message_id.clone(),
        event_type => d.event_type.clone(),
        state => d.state.as_str(),
        attempts => d.attempts,
        last_status => d.last_status,
        last_error => d.last_error.clone(),
        next_at => d.next_at.filter(|_| pending).map(|t| t.to_rfc3339()),
        created_at => d.created_at.to_rfc3339(),
    }
}

fn event_types() -> Vec<Value> {
    EVENT_TYPES.iter().map(|t| context! { name => t.name, description => t.description }).collect()
}

async fn list_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<String>,
) -> Result<Response, PageError> {
    manager(v)?;
    let list = st.admin.list_webhooks(v.workspace()).await.map_err(ctx_err(v))?;
    Ok(st.render(
        if error.is_some() { StatusCode::BAD_REQUEST } else { StatusCode::OK },
        "webhooks.html",
        Some(v),
        "settings",
        context! {
            title => "Webhooks",
            endpoints => list.iter().map(|w| endpoint_row(w, st.admin.now())).collect::<Vec<_>>(),
            event_types => event_types(),
            notice => error.map(|text| context!{ kind => "error", text }).unwrap_or_else(|| notice(msg)),
        },
    ))
}

pub async fn list(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    list_inner(&st, &v, q.msg.as_deref(), None).await.unwrap_or_else(|e| st.error(e))
}

fn created_page(st: &DashboardState, v: &Viewer, c: &CreatedWebhook, title: &str) -> Response {
    st.render(
        StatusCode::CREATED,
        "webhook_created.html",
        Some(v),
        "settings",
        context! { title, endpoint => endpoint_row(&c.endpoint, st.admin.now()), secret => c.secret.clone() },
    )
}

pub async fn create(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if let Err(e) = manager(&v) {
        return st.error(e);
    }
    let new = NewWebhook {
        url: f.get("url").to_owned(),
        description: f.opt("description").map(str::to_owned),
        event_types: f.all("event_type"),
    };
    match st.admin.create_webhook(v.workspace(), &v.actor(), new).await {
        Ok(c) => created_page(&st, &v, &c, "Webhook endpoint added"),
        Err(e) if e.kind == keygate_core::ErrorKind::InvalidInput || e.kind == keygate_core::ErrorKind::Conflict => {
            list_inner(&st, &v, None, Some(e.message.into_owned())).await.unwrap_or_else(|e| st.error(e))
        }
        Err(e) => st.error(PageError::from_error(e, Some(&v))),
    }
}

fn id_of(v: &Viewer, raw: &str) -> Result<WebhookId, PageError> {
    WebhookId::parse(raw).ok_or_else(|| PageError::not_found(v))
}

async fn page_inner(st: &DashboardState, v: &Viewer, id: &str, msg: Option<&str>) -> Result<Response, PageError> {
    manager(v)?;
    let id = id_of(v, id)?;
    let w = st.admin.webhook(v.workspace(), &id).await.map_err(ctx_err(v))?;
    let page = st
        .admin
        .list_deliveries(v.workspace(), Some(&id), &PageRequest { limit: 50, cursor: None })
        .await
        .map_err(ctx_err(v))?;
    Ok(st.render(
        StatusCode::OK,
        "webhook.html",
        Some(v),
        "settings",
        context! {
            title => "Webhook endpoint",
            endpoint => endpoint_row(&w, st.admin.now()),
            deliveries => page.items.iter().map(delivery_row).collect::<Vec<_>>(),
            notice => notice(msg),
        },
    ))
}

pub async fn page(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    Query(q): Query<MsgQuery>,
) -> Response {
    page_inner(&st, &v, &id, q.msg.as_deref()).await.unwrap_or_else(|e| st.error(e))
}

/// `POST /settings/webhooks/{id}/{action}`: `test`, `enable`, `disable`, `rotate`, `delete`.
pub async fn action(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
    form: CsrfForm,
) -> Response {
    let run = async {
        manager(&v)?;
        let id = id_of(&v, &id)?;
        let (ws, actor) = (v.workspace(), v.actor());
        let back = |msg: &str| see_other(&format!("/settings/webhooks/{id}?msg={msg}"));
        let enable = |on: bool| WebhookUpdate { enabled: Some(on), ..WebhookUpdate::default() };
        Ok::<_, PageError>(match action.as_str() {
            "test" => {
                st.admin.test_webhook(ws, &actor, &id).await.map_err(ctx_err(&v))?;
                back("webhook_test_sent")
            }
            "enable" => {
                st.admin.update_webhook(ws, &actor, &id, enable(true)).await.map_err(ctx_err(&v))?;
                back("webhook_enabled")
            }
            "disable" => {
                st.admin.update_webhook(ws, &actor, &id, enable(false)).await.map_err(ctx_err(&v))?;
                back("webhook_disabled")
            }
            "rotate" => {
                // The old secret's overlap, from the form's choice (seconds; none: at once).
                let overlap = form.0.get("overlap").parse::<u64>().unwrap_or(0);
                let c = st.admin.rotate_webhook_secret(ws, &actor, &id, overlap).await.map_err(ctx_err(&v))?;
                created_page(&st, &v, &c, "New signing secret")
            }
            "delete" => {
                st.admin.delete_webhook(ws, &actor, &id).await.map_err(ctx_err(&v))?;
                see_other("/settings/webhooks?msg=webhook_deleted")
            }
            _ => return Err(PageError::not_found(&v)),
        })
    };
    run.await.unwrap_or_else(|e| st.error(e))
}

pub async fn delivery(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, delivery)): Path<(String, i64)>,
) -> Response {
    let run = async {
        manager(&v)?;
        let id = id_of(&v, &id)?;
        let (d, attempts) = st.admin.delivery(v.workspace(), delivery).await.map_err(ctx_err(&v))?;
        if d.endpoint_id != id {
            return Err(PageError::not_found(&v));
        }
        let pretty = serde_json::from_str::<serde_json::Value>(&d.payload)
            .and_then(|p| serde_json::to_string_pretty(&p))
            .unwrap_or_else(|_| d.payload.clone());
        let attempts: Vec<Value> = attempts
            .iter()
            .map(|a| context! { at => a.at.to_rfc3339(), status => a.status, error => a.error.clone(), duration_ms => a.duration_ms })
            .collect();
        Ok(st.render(
            StatusCode::OK,
            "webhook_delivery.html",
            Some(&v),
            "settings",
            context! { title => "Webhook delivery", endpoint_id => id.to_string(), delivery => delivery_row(&d), payload => pretty, attempts },
        ))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}

pub async fn redeliver(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, delivery)): Path<(String, i64)>,
    _form: CsrfForm,
) -> Response {
    let run = async {
        manager(&v)?;
        let id = id_of(&v, &id)?;
        let (d, _) = st.admin.delivery(v.workspace(), delivery).await.map_err(ctx_err(&v))?;
        if d.endpoint_id != id {
            return Err(PageError::not_found(&v));
        }
        st.admin.redeliver(v.workspace(), delivery).await.map_err(ctx_err(&v))?;
        Ok(see_other(&format!("/settings/webhooks/{id}?msg=webhook_redelivered")))
    };
    run.await.unwrap_or_else(|e| st.error(e))
}

#[cfg(test)]
mod tests {
    use keygate_core::Timestamp;
    use keygate_core::ids::{WebhookId, WorkspaceId};

    use super::*;

    #[test]
    fn an_overlap_is_shown_only_while_it_lasts() {
        let t = Timestamp::from_millis(1_000_000);
        let w = WebhookEndpoint {
            id: WebhookId::from_trusted("wh_1".into()),
            workspace_id: WorkspaceId::from_trusted("ws_1".into()),
            url: "https://hooks.example.com/in".into(),
            description: None,
            event_types: Vec::new(),
            enabled: true,
            disabled_reason: None,
            sealed_secret: vec![1],
            previous_sealed_secret: Some(vec![2]),
            previous_secret_until: Some(t.plus_seconds(60)),
            failing_since: None,
            created_at: t,
            updated_at: t,
        };
        let hidden = |now: Timestamp| endpoint_row(&w, now).get_attr("previous_secret_until").unwrap().is_none();
        assert!(!hidden(t), "shown during the overlap");
        assert!(hidden(t.plus_seconds(60)), "hidden once it has ended");
    }
}
