//! Subscriptions in the dashboard (issue 17): on an app's page its subscriptions and a form to
//! subscribe it to an API of the portal (pending when the API wants approval and the person may
//! not approve); on the APIs page each API's access and the subscriptions waiting for an owner or
//! admin, approved or rejected there. The same service calls as the admin API, audited with the
//! person as actor.

use axum::extract::{Path, State};
use axum::response::Response;
use keygate_core::ids::{ApiId, PlanId, SubscriptionId};
use keygate_core::subscriptions::{ApiAccess, SubscriptionStatus};

use super::oauth::{app_inner, writable_app};
use super::pages::see_other;
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::apis::ApiChange;
use crate::subscriptions::NewSubscription;

/// `POST /apps/{id}/subscriptions`: subscribes the app to an API (`api`, optional `version`
/// and `plan`). Owners and admins may approve, so theirs are active at once.
pub async fn subscribe(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let app = match writable_app(&st, &v, &id).await {
        Ok(a) => a,
        Err(e) => return st.error(e),
    };
    let new = NewSubscription {
        api: f.get("api").trim().to_owned(),
        version: f.opt("version").map(str::to_owned),
        plan_id: f.opt("plan").and_then(PlanId::parse),
    };
    let may_approve = v.role.manages_all();
    match st.admin.subscribe(v.workspace(), &v.actor(), &app.id, new, may_approve).await {
        Ok(s) if s.status == SubscriptionStatus::Pending => {
            see_other(&format!("/apps/{}?msg=subscription_requested", app.id))
        }
        Ok(_) => see_other(&format!("/apps/{}?msg=subscribed", app.id)),
        Err(e) => {
            app_inner(&st, &v, &id, None, Some(e.message.into_owned()), None).await.unwrap_or_else(|e| st.error(e))
        }
    }
}

/// `POST /subscriptions/{id}/{approve|reject|cancel}`: owners and admins approve and reject
/// (back to the APIs page); whoever may change the app cancels (back to the app's page).
pub async fn decide(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
    CsrfForm(f): CsrfForm,
) -> Response {
    let Some(id) = SubscriptionId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    let ws = v.workspace();
    let sub = match st.admin.subscription(ws, &id).await {
        Ok(s) => s,
        Err(e) => return st.error(PageError::from_error(e, Some(&v))),
    };
    let (to, back) = match action.as_str() {
        "approve" | "reject" => {
            if !v.role.manages_all() {
                return st.error(PageError::forbidden(&v, "decide subscriptions (owners and admins do)"));
            }
            let to = if action == "approve" { SubscriptionStatus::Active } else { SubscriptionStatus::Rejected };
            (to, "/apis".to_owned())
        }
        "cancel" => {
            // Only someone who may change the app (its developer, owners, admins).
            if let Err(e) = writable_app(&st, &v, sub.app_id.as_str()).await {
                return st.error(e);
            }
            (SubscriptionStatus::Cancelled, format!("/apps/{}", sub.app_id))
        }
        _ => return st.error(PageError::not_found(&v)),
    };
    let msg = match to {
        SubscriptionStatus::Active => "subscription_approved",
        SubscriptionStatus::Rejected => "subscription_rejected",
        _ => "subscription_cancelled",
    };
    let reason = f.opt("reason").map(str::to_owned);
    match st.admin.decide_subscription(ws, &v.actor(), &id, to, reason).await {
        Ok(_) => see_other(&format!("{back}?msg={msg}")),
        Err(e) if to == SubscriptionStatus::Cancelled => {
            app_inner(&st, &v, sub.app_id.as_str(), None, Some(e.message.into_owned()), None)
                .await
                .unwrap_or_else(|e| st.error(e))
        }
        Err(e) => super::apis::again(&st, &v, e).await,
    }
}

/// `POST /apis/{id}/access`: who may call the API's routes (owners and admins).
pub async fn change_access(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path(id): Path<String>,
    CsrfForm(f): CsrfForm,
) -> Response {
    if !v.role.manages_all() {
        return st.error(PageError::forbidden(&v, "manage APIs"));
    }
    let Some(id) = ApiId::parse(&id) else { return st.error(PageError::not_found(&v)) };
    let access = match ApiAccess::from_field(f.get("access")) {
        Ok(a) => a,
        Err(e) => return super::apis::again(&st, &v, e).await,
    };
    let change = ApiChange { access: Some(access), ..ApiChange::default() };
    match st.admin.update_api(v.workspace(), &v.actor(), &id, change, v.role.is_owner()).await {
        Ok(_) => see_other("/apis?msg=api_access_changed"),
        Err(e) => super::apis::again(&st, &v, e).await,
    }
}

/// The rows of an app's subscriptions for its page, with the APIs' names, the APIs it may
/// subscribe to (those of the portal; drafts too for owners and admins), and the plans a
/// subscription may name (owners and admins only).
pub(super) async fn for_app(
    st: &DashboardState,
    v: &crate::accounts::Viewer,
    app: &keygate_core::ids::AppId,
) -> Result<(Vec<minijinja::Value>, Vec<minijinja::Value>, Vec<minijinja::Value>), PageError> {
    use keygate_core::apis::ApiState;
    use minijinja::context;
    let ws = v.workspace();
    let err = |e| PageError::from_error(e, Some(v));
    let apis = st.admin.list_apis(ws).await.map_err(err)?;
    let filter = keygate_core::subscriptions::SubscriptionFilter { app_id: Some(app.clone()), ..Default::default() };
    let subs = st.admin.list_subscriptions(ws, &filter).await.map_err(err)?;
    let rows = subs
        .into_iter()
        .map(|s| {
            let api = apis.iter().find(|a| a.api.id == s.api_id).map(|a| a.api.name.clone());
            context! {
                id => s.id.to_string(),
                api => api.unwrap_or_else(|| s.api_id.to_string()),
                version => s.version,
                plan => s.plan_id.map(|p| p.to_string()),
                status => s.status.as_str(),
                reason => s.reason,
                live => s.status.is_live(),
            }
        })
        .collect();
    let manager = v.role.manages_all();
    let choices = apis
        .iter()
        .filter(|a| match a.api.state {
            ApiState::Published | ApiState::Deprecated => true,
            ApiState::Draft => manager,
            ApiState::Retired => false,
        })
        .map(|a| {
            context! {
                name => a.api.name.clone(),
                access => a.api.access.as_str(),
                versions => a.api.versions.iter().filter(|x| x.state != ApiState::Retired).map(|x| x.name.clone()).collect::<Vec<_>>(),
            }
        })
        .collect();
    // Another plan than the app's is for those who may approve.
    let plans = if manager {
        st.admin
            .list_plans(ws)
            .await
            .map_err(err)?
            .into_iter()
            .map(|p| context! { id => p.id.to_string(), name => p.name })
            .collect()
    } else {
        Vec::new()
    };
    Ok((rows, choices, plans))
}

/// The workspace's subscriptions waiting for approval, for the APIs page.
pub(super) async fn pending(
    st: &DashboardState,
    v: &crate::accounts::Viewer,
    names: &std::collections::HashMap<String, String>,
) -> Result<Vec<minijinja::Value>, PageError> {
    use minijinja::context;
    let filter = keygate_core::subscriptions::SubscriptionFilter {
        status: Some(SubscriptionStatus::Pending),
        ..Default::default()
    };
    let list =
        st.admin.list_subscriptions(v.workspace(), &filter).await.map_err(|e| PageError::from_error(e, Some(v)))?;
    let mut out = Vec::with_capacity(list.len());
    for s in list {
        // Shown to owners and admins only, who see every app.
        let app = st.admin.app(v.workspace(), &s.app_id).await.map(|a| a.name).unwrap_or_else(|_| s.app_id.to_string());
        out.push(context! {
            id => s.id.to_string(),
            app,
            api => names.get(s.api_id.as_str()).cloned().unwrap_or_else(|| s.api_id.to_string()),
            version => s.version,
            plan => s.plan_id.map(|p| p.to_string()),
            requested_by => s.requested_by,
            created_at => s.created_at.to_rfc3339(),
        });
    }
    Ok(out)
}
