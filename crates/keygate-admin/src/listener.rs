//! What every answer of the admin listener goes through, whichever part of it answers (the admin
//! API, its OpenAPI explorer, the dashboard, `/metrics`): the request-body bound and the security
//! headers. Applied once, around the merged router, so that no route can be added without them.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

use crate::api::{ApiError, MAX_BODY_BYTES};

/// Wraps the admin listener's whole router (`app`): bodies are bounded and every answer carries
/// the security headers. `secure`: the listener is reached over HTTPS (adds HSTS).
pub fn layers(app: Router, secure: bool) -> Router {
    // The last layer added is the outermost: a body refused by the bound gets the headers too.
    app.layer(middleware::from_fn(bound_body)).layer(middleware::from_fn_with_state(secure, security_headers))
}

/// The body bound, enforced before any handler buffers a byte. A request that announces more than
/// [`MAX_BODY_BYTES`] is refused from its head, without reading the body; any other body (chunked,
/// or shorter than announced) is read through `Limited`, which fails the read at the bound, so an
/// extractor never holds more than the bound however much the client sends. Refusing before the
/// body is read leaves unread bytes on the connection: the answer says `Connection: close`, and the
/// server closes it instead of draining what the client keeps sending (RFC 9112 §9.6).
async fn bound_body(req: Request, next: Next) -> Response {
    let bound = body_bound(req.uri().path());
    let announced =
        req.headers().get(header::CONTENT_LENGTH).map(|v| v.to_str().ok().and_then(|s| s.parse::<u64>().ok()));
    match announced {
        // hyper refuses a malformed Content-Length before this runs; a value past u64 lands here.
        Some(None) => return body_too_large(),
        Some(Some(n)) if n > bound as u64 => return body_too_large(),
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let bounded = Body::new(http_body_util::Limited::new(body, bound));
    let mut resp = next.run(Request::from_parts(parts, bounded)).await;
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE {
        // The handler stopped reading at the bound: what the client still sends is not read.
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The largest body a request to `path` may have: [`MAX_BODY_BYTES`], but for the APIs'
/// endpoints, whose bodies may carry an OpenAPI document (their extractor, `LargeJson`, holds
/// them to its own bound).
fn body_bound(path: &str) -> usize {
    if path == "/admin/v1/apis" || path.starts_with("/admin/v1/apis/") {
        crate::api::MAX_LARGE_BODY_BYTES
    } else {
        MAX_BODY_BYTES
    }
}

/// 413 `body_too_large`, closing the connection.
pub(crate) fn body_too_large() -> Response {
    let mut resp = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than {MAX_BODY_BYTES} bytes; send a smaller one"),
    )
    .into_response();
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The dashboard's policy: nothing from another host, no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The OpenAPI explorer's: Swagger UI's own files only, as for the dashboard, except that its
/// React components set `style` attributes, which `style-src` must allow (`'unsafe-inline'` for
/// styles only; scripts stay `'self'`, so injected markup still cannot run code).
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn security_headers(State(secure): State<bool>, req: Request, next: Next) -> Response {
    let docs = req.uri().path().starts_with("/admin/docs");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(if docs { DOCS_CSP } else { CSP }));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // `same-origin`, not `no-referrer`: with no referrer at all, browsers send `Origin: null` on
    // the dashboard's own form posts, and its origin check needs the real one.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        // Answers carry secrets (a new token, a root key) and tenants' data: never cached.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if secure {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    }
    resp
}
