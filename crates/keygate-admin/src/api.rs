//! The admin REST API (`/admin/v1/…`): JSON over HTTP, authenticated by root keys, with its
//! OpenAPI 3.1 document generated from the handlers and an embedded explorer at `/admin/docs`.

mod apps;
mod document;
mod dto;
mod error;
pub(crate) use error::status_of;
mod alerts;
mod apis;
pub(crate) mod calls;
mod extract;
mod misc;
mod nodes;
mod oauth;
mod providers;
mod root_keys;
mod routes;
mod subscriptions;
mod tokens;
mod verify;
mod webhooks;
mod workspaces;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

pub use dto::*;
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use extract::MAX_LARGE_BODY_BYTES;

use crate::service::Admin;

/// The largest request body the admin API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every admin handler can reach.
#[derive(Clone)]
pub struct AdminState {
    pub admin: Arc<Admin>,
    pub oauth: Arc<crate::oauth::OAuth>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keygate admin API",
        description = "Manage apps, tokens, plans, the scope catalog and read the audit trail of a keygate workspace. \
Authenticate with `Authorization: Bearer <root key>`; each operation names the permission it needs.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerAuth),
    security(("root_key" = [])),
    tags(
        (name = "tokens", description = "API tokens: create, list, update, suspend, resume, revoke, rotate, verify"),
        (name = "apps", description = "Apps: the API consumers that hold tokens"),
        (name = "plans", description = "Plans and the scope catalog"),
        (name = "audit", description = "The audit trail"),
        (name = "oauth", description = "OAuth2 clients of apps and the instance's signing keys"),
        (name = "routes", description = "The gateway's routes: those of the config file (read-only) and those managed here, applied on every node without a restart"),
        (name = "apis", description = "The workspace's APIs and their lifecycle: draft, published, deprecated (Deprecation, Sunset and Link headers at the gateway), retired (410 api_retired); per version too; publish requests an owner decides"),
        (name = "subscriptions", description = "Apps' subscriptions to APIs: an API whose access is subscription or approval admits only subscribed apps' tokens (403 subscription_required); subscriptions that wait for approval; the subscription's plan limits the app's calls to the API"),
        (name = "providers", description = "The LLM providers the AI gateway's routes call: those of the config file (read-only) and those made here, their keys sealed and never shown again"),
        (name = "workspaces", description = "The instance's workspaces (root keys of the default workspace only)"),
        (name = "root keys", description = "The admin API's own credentials: list and revoke"),
        (name = "calls", description = "The call log: every gateway call, searched and exported (JSON lines, CSV)"),
        (name = "alerts", description = "Anomaly alerts on tokens' usage: list, acknowledge, resolve, resume a suspended token"),
        (name = "webhooks", description = "Webhook endpoints: signed events (Standard Webhooks) from a durable outbox, deliveries, redelivery, test events"),
        (name = "nodes", description = "The keygate processes sharing the store, with how far each has applied the change feed (root keys of the default workspace only)"),
        (name = "system", description = "Health")
    )
)]
struct ApiDoc;

struct BearerAuth;

/// The answers every operation can give besides its own, added to each operation of the document
/// in one place, so that none can forget one (schemathesis checks every status code against the
/// document): 401/403 where a root key is needed, 400/413/415 where a body is read, 400 where a
/// query is parsed, 404 where a path names an object, 405 for the methods a path does not take.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            let ops =
                [item.get.as_mut(), item.put.as_mut(), item.post.as_mut(), item.delete.as_mut(), item.patch.as_mut()];
            for op in ops.into_iter().flatten() {
                // `security(())` (one empty requirement) marks an operation without credentials.
                let open = op.security.as_ref().is_some_and(|reqs| {
                    reqs.iter()
                        .all(|r| serde_json::to_value(r).is_ok_and(|v| v.as_object().is_some_and(|o| o.is_empty())))
                });
                let params = op.parameters.as_deref().unwrap_or_default();
                let has = |place: ParameterIn| {
                    params.iter().any(|p| matches!(p, RefOr::T(p) if std::mem::discriminant(&p.parameter_in) == std::mem::discriminant(&place)))
                };
                let mut add = |status: &str, description: &str| {
                    op.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description));
                };
                if !open {
                    add("401", "No root key, or one that is malformed, unknown, revoked or expired");
                    add("403", "The root key lacks the permission this operation needs");
                }
                if has(ParameterIn::Path) {
                    add("404", "No such object in the root key's workspace");
                }
                if has(ParameterIn::Query) {
                    add("400", "A query parameter does not fit");
                }
                if op.request_body.is_some() {
                    add("400", "The body is not valid JSON or does not fit");
                    add("413", "The body is larger than 64 KiB");
                    add("415", "The body is not sent as application/json");
                }
            }
        }
    }
}

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "root_key",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("A root key, as printed by `keygate root-key create`"))
                        .build(),
                ),
            );
        }
    }
}

/// The admin API's routes and its OpenAPI document.
pub fn api_router() -> (Router<AdminState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::get_token, tokens::update_token))
        .routes(routes!(tokens::suspend_token))
        .routes(routes!(tokens::resume_token))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(tokens::rotate_token))
        .routes(routes!(tokens::report_exposures))
        .routes(routes!(tokens::token_usage))
        .routes(routes!(tokens::token_llm_usage))
        .routes(routes!(verify::verify_token))
        .routes(routes!(apps::create_app, apps::list_apps))
        .routes(routes!(apps::get_app, apps::update_app, apps::delete_app))
        .routes(routes!(misc::create_plan, misc::list_plans))
        .routes(routes!(misc::update_plan))
        .routes(routes!(tokens::access_review))
        .routes(routes!(tokens::usage_report))
        .routes(routes!(apps::statement))
        .routes(routes!(misc::get_token_rules, misc::put_token_rules))
        .routes(routes!(misc::get_policy_settings, misc::put_policy_settings))
        .routes(routes!(misc::list_scopes))
        .routes(routes!(misc::put_scope, misc::delete_scope))
        .routes(routes!(misc::list_audit_events))
        .routes(routes!(misc::export_audit_events))
        .routes(routes!(misc::audit_chain_head))
        .routes(routes!(misc::verify_audit_chain))
        .routes(routes!(misc::health))
        .routes(routes!(misc::healthz))
        .routes(routes!(misc::readyz))
        .routes(routes!(nodes::list_nodes))
        .routes(routes!(oauth::create_client, oauth::get_client, oauth::update_client))
        .routes(routes!(oauth::rotate_client_secret))
        .routes(routes!(oauth::suspend_client))
        .routes(routes!(oauth::resume_client))
        .routes(routes!(oauth::list_keys))
        .routes(routes!(oauth::rotate_keys))
        .routes(routes!(root_keys::list_root_keys))
        .routes(routes!(root_keys::revoke_root_key))
        .routes(routes!(routes::list_routes, routes::create_route))
        .routes(routes!(routes::get_route, routes::update_route, routes::delete_route))
        .routes(routes!(providers::list_providers, providers::create_provider))
        .routes(routes!(providers::get_provider, providers::update_provider, providers::delete_provider))
        .routes(routes!(providers::rotate_provider_key))
        .routes(routes!(providers::list_llm_logs))
        .routes(routes!(apis::list_apis, apis::create_api))
        .routes(routes!(apis::get_api, apis::update_api, apis::delete_api))
        .routes(routes!(apis::update_api_version))
        .routes(routes!(apis::list_publish_requests))
        .routes(routes!(apis::approve_publish_request))
        .routes(routes!(apis::reject_publish_request))
        .routes(routes!(subscriptions::subscribe))
        .routes(routes!(subscriptions::list_subscriptions))
        .routes(routes!(subscriptions::get_subscription))
        .routes(routes!(subscriptions::approve_subscription))
        .routes(routes!(subscriptions::reject_subscription))
        .routes(routes!(subscriptions::cancel_subscription))
        .routes(routes!(workspaces::list_workspaces, workspaces::create_workspace))
        .routes(routes!(workspaces::get_workspace, workspaces::rename_workspace, workspaces::delete_workspace))
        .routes(routes!(calls::list_calls))
        .routes(routes!(calls::export_calls))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(alerts::get_alert))
        .routes(routes!(alerts::acknowledge_alert))
        .routes(routes!(alerts::resolve_alert))
        .routes(routes!(alerts::resume_from_alert))
        .routes(routes!(webhooks::list_event_types))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::get_webhook, webhooks::update_webhook, webhooks::delete_webhook))
        .routes(routes!(webhooks::rotate_webhook_secret))
        .routes(routes!(webhooks::test_webhook))
        .routes(routes!(webhooks::list_deliveries))
        .routes(routes!(webhooks::get_delivery))
        .routes(routes!(webhooks::redeliver))
        .split_for_parts();
    // After the routes: the modifiers of `ApiDoc` run before any path is in the document.
    CommonResponses.modify(&mut doc);
    (router, doc)
}

/// Only the probes (`GET /healthz`, `GET /readyz`), for a listener of their own (`[health]
/// listen`): what a load balancer on another host may reach while the admin API stays private.
pub fn probes_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", axum::routing::get(misc::healthz))
        .route("/readyz", axum::routing::get(misc::readyz))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}

/// The whole admin listener's router: the API, its OpenAPI document and the explorer.
pub fn router(state: AdminState) -> Router {
    let (api, openapi) = api_router();
    // The document as served: the generated one, refined with what the types cannot say.
    let mut doc = serde_json::to_value(&openapi).unwrap_or_default();
    document::refine(
        &mut doc,
        state.admin.max_grace_period_seconds(),
        state.oauth.settings().max_access_token_ttl_seconds,
    );
    let docs: Router<AdminState> =
        SwaggerUi::new("/admin/docs").external_url_unchecked("/admin/v1/openapi.json", doc).into();
    api.merge(docs)
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        // Our own extractors enforce MAX_BODY_BYTES with a JSON error.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

#[cfg(test)]
mod tests;
