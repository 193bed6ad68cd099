//! The AI gateway's page for a workspace's owners and admins (`/ai`): its LLM providers (the
//! config file's, read-only, and those made here: add one with its key, give it a new key,
//! delete it; keys are sealed and never shown again), and its LLM usage over the last 30 days
//! per provider and model (requests, errors, fallbacks, tokens in and out, cost) and per day,
//! and the latest logged calls of the routes that log their prompts and answers.
//! The same service calls as the admin API, audited with the person as actor.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use keygate_core::llm::LlmUsage;
use minijinja::{Value, context};
use serde_json::json;

use super::chart::{self, Bar};
use super::pages::{MsgQuery, ctx_err, notice, see_other};
use super::{CsrfForm, DashboardState, PageError, SignedIn};
use crate::accounts::Viewer;
use crate::providers::ProviderEntry;

/// Days of usage the page shows.
const DAYS: i64 = 30;

fn manager(v: &Viewer) -> Result<(), PageError> {
    if v.role.manages_all() { Ok(()) } else { Err(PageError::forbidden(v, "manage the AI gateway")) }
}

/// Dollars from micro-dollars, as the page shows them.
pub(super) fn usd(micro: u64) -> String {
    format!("${:.6}", micro as f64 / 1e6)
}

fn provider_row(p: &ProviderEntry) -> Value {
    let field = |k: &str| p.config.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
    let key = if p.from_file {
        match (field("api_key_env"), field("api_key_file")) {
            (Some(var), _) => format!("from ${var}"),
            (_, Some(path)) => format!("from {path}"),
            _ => "none".to_owned(),
        }
    } else {
        p.key_fingerprint.as_ref().map_or_else(|| "none".to_owned(), |f| format!("sha256 {f}…"))
    };
    let prices: Vec<String> = p
        .config
        .get("prices")
        .and_then(serde_json::Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(model, price)| format!("{model}: ${} in, ${} out", price["input"], price["output"]))
                .collect()
        })
        .unwrap_or_default();
    context! {
        id => p.id.clone(),
        kind => field("kind"),
        base_url => field("base_url"),
        from_file => p.from_file,
        key,
        prices,
        key_rotated_at => p.key_rotated_at.map(|t| t.to_rfc3339()),
    }
}

fn usage_row(u: &LlmUsage) -> Value {
    context! {
        deployment => u.deployment.clone(),
        requests => u.requests,
        errors => u.errors,
        fallbacks => u.fallbacks,
        input_tokens => u.input_tokens,
        output_tokens => u.output_tokens,
        cached_tokens => u.cached_tokens,
        cost => usd(u.micro_usd),
    }
}

async fn page_inner(
    st: &DashboardState,
    v: &Viewer,
    msg: Option<&str>,
    error: Option<(StatusCode, String)>,
) -> Result<Response, PageError> {
    manager(v)?;
    let providers = st.admin.list_providers(v.workspace()).await.map_err(ctx_err(v))?;
    let usage = st.admin.workspace_llm_usage(v.workspace(), DAYS).await.map_err(ctx_err(v))?;
    let day = |ms: i64| {
        let s = keygate_core::Timestamp::from_millis(ms).to_rfc3339();
        s.get(..10).unwrap_or(&s).to_owned()
    };
    let bars: Vec<Bar> =
        usage.by_day.iter().map(|(d, u)| Bar { label: day(*d), requests: u.requests, errors: u.errors }).collect();
    let svg = chart::requests("llm-chart", "LLM calls and failed calls per day", &bars);
    let days: Vec<Value> = usage
        .by_day
        .iter()
        .rev()
        .filter(|(_, u)| u.requests > 0)
        .map(|(d, u)| context! { day => day(*d), requests => u.requests, cost => usd(u.micro_usd), tokens => u.input_tokens + u.output_tokens })
        .collect();
    let total: u64 = usage.by_deployment.iter().map(|u| u.micro_usd).sum();
    let logs: Vec<Value> = st
        .admin
        .llm_logs(v.workspace(), None, None, None, 20)
        .await
        .map_err(ctx_err(v))?
        .into_iter()
        .map(|l| {
            context! {
                id => l.id,
                at => keygate_core::Timestamp::from_millis(l.at).to_rfc3339(),
                route => l.route,
                token_link => l.caller.starts_with("tok_"),
                token => l.caller,
                model => l.model,
                deployment => l.deployment,
                status => l.status,
                tokens => l.input_tokens + l.output_tokens,
                cost => usd(l.micro_usd),
                request => l.request,
                answer => l.answer,
            }
        })
        .collect();
    Ok(st.render(
        error.as_ref().map_or(StatusCode::OK, |e| e.0),
        "ai.html",
        Some(v),
        "ai",
        context! {
            title => "AI gateway",
            providers => providers.iter().map(provider_row).collect::<Vec<_>>(),
            usage => usage.by_deployment.iter().map(usage_row).collect::<Vec<_>>(),
            total_cost => usd(total),
            days,
            logs,
            chart => Value::from_safe_string(svg),
            notice => error.map(|(_, text)| context!{ kind => "error", text }).unwrap_or_else(|| notice(msg)),
        },
    ))
}

pub async fn page(State(st): State<DashboardState>, SignedIn(v): SignedIn, Query(q): Query<MsgQuery>) -> Response {
    page_inner(&st, &v, q.msg.as_deref(), None).await.unwrap_or_else(|e| st.error(e))
}

/// The prices typed in the form, one model a line: `model input output [cached_input]`, in
/// dollars per million tokens.
fn parse_prices(text: &str) -> Result<serde_json::Value, String> {
    let mut out = serde_json::Map::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let num = |s: &str| s.trim_start_matches('$').parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0);
        let (model, nums) = match parts.split_first() {
            Some((m, rest)) if (2..=3).contains(&rest.len()) => (*m, rest),
            _ => return Err(format!("prices: {line:?} is not \"model input output [cached_input]\"")),
        };
        let nums: Option<Vec<f64>> = nums.iter().map(|n| num(n)).collect();
        let Some(nums) = nums else {
            return Err(format!("prices: {line:?}: the prices are dollars per million tokens, such as 0.15"));
        };
        let mut price = json!({"input": nums[0], "output": nums[1]});
        if let Some(c) = nums.get(2) {
            price["cached_input"] = json!(c);
        }
        out.insert(model.to_owned(), price);
    }
    Ok(serde_json::Value::Object(out))
}

/// An error the person can fix (a field, a taken id): the page again, with the message.
async fn again(st: &DashboardState, v: &Viewer, e: keygate_core::Error) -> Response {
    let status = match e.kind {
        keygate_core::ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        keygate_core::ErrorKind::Conflict => StatusCode::CONFLICT,
        _ => return st.error(PageError::from_error(e, Some(v))),
    };
    page_inner(st, v, None, Some((status, e.message.into_owned()))).await.unwrap_or_else(|e| st.error(e))
}

/// `POST /ai/providers`: a new provider, its key sealed.
pub async fn create(State(st): State<DashboardState>, SignedIn(v): SignedIn, CsrfForm(f): CsrfForm) -> Response {
    if let Err(e) = manager(&v) {
        return st.error(e);
    }
    let mut body = json!({"id": f.get("id").trim(), "kind": f.get("kind"), "base_url": f.get("base_url").trim()});
    if let Some(k) = f.opt("api_key").map(str::trim).filter(|k| !k.is_empty()) {
        body["api_key"] = json!(k);
    }
    if let Some(ver) = f.opt("api_version").map(str::trim).filter(|x| !x.is_empty()) {
        body["api_version"] = json!(ver);
    }
    match parse_prices(f.opt("prices").unwrap_or_default()) {
        Ok(p) => body["prices"] = p,
        Err(m) => {
            return page_inner(&st, &v, None, Some((StatusCode::BAD_REQUEST, m))).await.unwrap_or_else(|e| st.error(e));
        }
    }
    match st.admin.create_provider(v.workspace(), &v.actor(), body).await {
        Ok(_) => see_other("/ai?msg=provider_created"),
        Err(e) => again(&st, &v, e).await,
    }
}

/// `POST /ai/providers/{id}/{action}`: `rotate-key` (with `api_key`) or `delete`.
pub async fn action(
    State(st): State<DashboardState>,
    SignedIn(v): SignedIn,
    Path((id, action)): Path<(String, String)>,
    CsrfForm(f): CsrfForm,
) -> Response {
    if let Err(e) = manager(&v) {
        return st.error(e);
    }
    let (ws, actor) = (v.workspace(), v.actor());
    let done = match action.as_str() {
        "rotate-key" => {
            let key = f.opt("api_key").map(str::trim).filter(|k| !k.is_empty());
            st.admin.rotate_provider_key(ws, &actor, &id, key).await.map(|_| "provider_key_rotated")
        }
        "delete" => st.admin.delete_provider(ws, &actor, &id).await.map(|()| "provider_deleted"),
        _ => return st.error(PageError::not_found(&v)),
    };
    match done {
        Ok(msg) => see_other(&format!("/ai?msg={msg}")),
        Err(e) => again(&st, &v, e).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_read_one_model_a_line() {
        let p = parse_prices("gpt-4o-mini 0.15 0.6\n\n claude $3 $15 0.3 ").unwrap();
        assert_eq!(p["gpt-4o-mini"], json!({"input": 0.15, "output": 0.6}));
        assert_eq!(p["claude"], json!({"input": 3.0, "output": 15.0, "cached_input": 0.3}));
        assert!(parse_prices("gpt 1").unwrap_err().contains("model input output"));
        assert!(parse_prices("gpt one two").unwrap_err().contains("dollars per million"));
        assert!(parse_prices("gpt 1 -2").is_err());
        assert_eq!(parse_prices("").unwrap(), json!({}));
    }
}
