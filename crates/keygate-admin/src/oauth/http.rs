//! The OAuth endpoints over HTTP: `/oauth2/token`, `/oauth2/introspect`, `/oauth2/revoke`,
//! `/.well-known/oauth-authorization-server` and `/.well-known/jwks.json`. Requests are
//! `application/x-www-form-urlencoded` with each parameter at most once (RFC 6749 §3.2);
//! answers are JSON that caches must not keep (RFC 6749 §5.1), errors in RFC 6749 §5.2 form.
//! keygate serves this router on the gateway listener, where clients reach it.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{OAuth, OAuthError, OAuthRequest};

/// The largest form body the OAuth endpoints read.
pub const MAX_FORM_BYTES: usize = 64 * 1024;

/// The client's address, put on the request by whoever serves the router.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub IpAddr);

/// The paths this router serves (the gateway hands these to it).
pub fn serves(path: &str) -> bool {
    matches!(
        path,
        "/oauth2/token"
            | "/oauth2/introspect"
            | "/oauth2/revoke"
            | "/.well-known/oauth-authorization-server"
            | "/.well-known/jwks.json"
    )
}

pub fn router(oauth: Arc<OAuth>) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/oauth2/introspect", post(introspect))
        .route("/oauth2/revoke", post(revoke))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/.well-known/jwks.json", get(jwks))
        .fallback(|| async { error(&OAuthError::new(404, "not_found", "no OAuth endpoint here")) })
        .method_not_allowed_fallback(|| async {
            error(&OAuthError::new(405, "invalid_request", "use POST for the OAuth endpoints and GET for the metadata"))
        })
        .with_state(oauth)
}

/// JSON that must not be cached.
fn no_store(status: StatusCode, body: &Value) -> Response {
    let mut r = (status, axum::Json(body)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn error(e: &OAuthError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = no_store(status, &json!({"error": e.error, "error_description": e.description}));
    if let Some(w) = e.www_authenticate {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(w));
    }
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(v) = e.dpop_nonce.as_deref().and_then(|n| HeaderValue::from_str(n).ok()) {
        r.headers_mut().insert("dpop-nonce", v);
    }
    r
}

/// The form, the credentials and the caller's address of a request.
fn parse_form(headers: &HeaderMap, peer: Option<IpAddr>, body: &[u8]) -> Result<OAuthRequest, OAuthError> {
    let bad = |d: &'static str| OAuthError::new(400, "invalid_request", d);
    let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = ctype.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(bad("send the parameters as application/x-www-form-urlencoded"));
    }
    let mut form = std::collections::HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        if form.insert(k.into_owned(), v.into_owned()).is_some() {
            return Err(bad("a parameter appears more than once"));
        }
    }
    let one = |name: header::HeaderName| -> Result<Option<String>, OAuthError> {
        let mut all = headers.get_all(&name).iter();
        let first = all.next().map(|v| v.to_str().map(str::to_owned).map_err(|_| bad("a header is not text")));
        if all.next().is_some() {
            return Err(bad("a header appears more than once"));
        }
        first.transpose()
    };
    Ok(OAuthRequest {
        form,
        authorization: one(header::AUTHORIZATION)?,
        dpop: one(header::HeaderName::from_static("dpop"))?,
        peer,
    })
}

async fn read(req: axum::extract::Request) -> Result<OAuthRequest, OAuthError> {
    let (mut parts, body) = req.into_parts();
    let peer = axum::Extension::<PeerAddr>::from_request_parts(&mut parts, &()).await.ok().map(|p| p.0.0);
    let bytes: Bytes = axum::body::to_bytes(Body::new(body), MAX_FORM_BYTES)
        .await
        .map_err(|_| OAuthError::new(413, "invalid_request", "the request body is larger than 64 KiB"))?;
    parse_form(&parts.headers, peer, &bytes)
}

async fn token(State(o): State<Arc<OAuth>>, req: axum::extract::Request) -> Response {
    let req = match read(req).await {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    let mut resp = match o.token(&req).await {
        Ok(t) => no_store(StatusCode::OK, &serde_json::to_value(t).unwrap_or(Value::Null)),
        Err(e) => error(&e),
    };
    // RFC 9449 §8: the nonce for the client's next proof, with every answer.
    if let Some(v) = o.dpop_nonce().and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("dpop-nonce", v);
    }
    resp
}

async fn introspect(State(o): State<Arc<OAuth>>, req: axum::extract::Request) -> Response {
    let req = match read(req).await {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    match o.introspect(&req).await {
        Ok(v) => no_store(StatusCode::OK, &v),
        Err(e) => error(&e),
    }
}

async fn revoke(State(o): State<Arc<OAuth>>, req: axum::extract::Request) -> Response {
    let req = match read(req).await {
        Ok(r) => r,
        Err(e) => return error(&e),
    };
    match o.revoke(&req).await {
        Ok(()) => no_store(StatusCode::OK, &json!({})),
        Err(e) => error(&e),
    }
}

async fn metadata(State(o): State<Arc<OAuth>>) -> Response {
    let mut r = axum::Json(o.metadata()).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r
}

async fn jwks(State(o): State<Arc<OAuth>>) -> Response {
    let mut r = axum::Json(o.jwks()).into_response();
    // Short: a new key is published well before it signs (key_publish_ahead_seconds).
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r
}
