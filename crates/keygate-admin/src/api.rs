//! The admin REST API (`/admin/v1/…`): JSON over HTTP, authenticated by root keys, with its
//! OpenAPI 3.1 document generated from the handlers and an embedded explorer at `/admin/docs`.

mod apps;
mod dto;
mod error;
mod extract;
mod misc;
mod oauth;
mod root_keys;
mod tokens;

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
        (name = "tokens", description = "API tokens: create, list, update, suspend, resume, revoke, rotate"),
        (name = "apps", description = "Apps: the API consumers that hold tokens"),
        (name = "plans", description = "Plans and the scope catalog"),
        (name = "audit", description = "The audit trail"),
        (name = "oauth", description = "OAuth2 clients of apps and the instance's signing keys"),
        (name = "root keys", description = "The admin API's own credentials: list and revoke"),
        (name = "system", description = "Health")
    )
)]
struct ApiDoc;

struct BearerAuth;

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
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::get_token, tokens::update_token))
        .routes(routes!(tokens::suspend_token))
        .routes(routes!(tokens::resume_token))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(tokens::rotate_token))
        .routes(routes!(tokens::report_exposures))
        .routes(routes!(tokens::token_usage))
        .routes(routes!(apps::create_app, apps::list_apps))
        .routes(routes!(apps::get_app, apps::update_app, apps::delete_app))
        .routes(routes!(misc::create_plan, misc::list_plans))
        .routes(routes!(misc::list_scopes))
        .routes(routes!(misc::put_scope, misc::delete_scope))
        .routes(routes!(misc::list_audit_events))
        .routes(routes!(misc::health))
        .routes(routes!(oauth::create_client, oauth::get_client))
        .routes(routes!(oauth::rotate_client_secret))
        .routes(routes!(oauth::list_keys))
        .routes(routes!(oauth::rotate_keys))
        .routes(routes!(root_keys::list_root_keys))
        .routes(routes!(root_keys::revoke_root_key))
        .split_for_parts()
}

/// The whole admin listener's router: the API, its OpenAPI document and the explorer.
pub fn router(state: AdminState) -> Router {
    let (api, openapi) = api_router();
    let docs: Router<AdminState> = SwaggerUi::new("/admin/docs").url("/admin/v1/openapi.json", openapi).into();
    api.merge(docs)
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        // Our own extractors enforce MAX_BODY_BYTES with a JSON error.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

#[cfg(test)]
mod tests;
