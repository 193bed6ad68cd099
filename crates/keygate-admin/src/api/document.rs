//! What the generated OpenAPI document cannot say from the Rust types alone, added to it in one
//! place: the limits the service layer enforces (lengths, characters, ranges, enumerations, the
//! grammar of scopes, addresses and cursors, fields that exclude each other). The document is the
//! contract schemathesis holds the API to (`scripts/api-fuzz`): a request that fits it must not be
//! refused for its shape, and one that does not fit it must be refused.

use serde_json::{Value, json};

/// Text without control characters (Unicode `Cc`: C0, DEL, C1) but line feeds, as
/// `validate_text` wants.
const TEXT_LINES: &str = r"^[^\u0000-\u0009\u000b-\u001f\u007f-\u009f]*$";
/// A name: text with at least one character that is not white space (names are trimmed).
const NAME: &str = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$";
/// A scope a token may be granted: `resource:action[:qualifier]`, `resource:*`.
const SCOPE: &str = r"^[a-z0-9_.\-]{1,64}:([a-z0-9_.\-]{1,64}(:([a-z0-9_.\-]{1,64}|\*))?|\*)$";
/// A scope a route may require, as the catalog holds them: no wildcard.
const EXACT_SCOPE: &str = r"^[a-z0-9_.\-]{1,64}:[a-z0-9_.\-]{1,64}(:[a-z0-9_.\-]{1,64})?$";
/// An IPv4 CIDR (IPv4 and IPv6 addresses are given by `format`).
const IPV4_CIDR: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])$";
/// A cursor of a list by creation time: `<ms>.<id>`.
const TIME_CURSOR: &str = r"^[0-9]{1,15}\.[a-z]{2,4}_[A-Za-z0-9]{1,64}$";
/// A cursor of the audit trail: an event id.
const AUDIT_CURSOR: &str = r"^[0-9]{1,15}$";
/// The longest lifetime `expires_in` takes (100 years).
const MAX_EXPIRES_IN: i64 = 100 * 365 * 86_400;

fn nullable(mut v: Value) -> Value {
    if let Some(t) = v.get("type").cloned() {
        v["type"] = json!([t, "null"]);
    }
    v
}

fn name() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 200, "pattern": NAME})
}

fn scopes() -> Value {
    json!({"type": "array", "maxItems": 100, "items": {"type": "string", "pattern": SCOPE}})
}

fn allowlist() -> Value {
    json!({"type": "array", "maxItems": 100, "items": {"anyOf": [
        {"type": "string", "format": "ipv4"},
        {"type": "string", "format": "ipv6"},
        {"type": "string", "pattern": IPV4_CIDR}
    ]}})
}

/// A client's public keys: a JWK Set of 1 to 10 Ed25519 or P-256 public keys. (That an EC key's
/// coordinates are a point on the curve cannot be said in a schema; see `scripts/api-fuzz`.)
fn jwks() -> Value {
    let coord = json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{43}$"});
    // Members keygate does not use are ignored, as RFC 7517 §4 asks; private-key members refuse
    // the key.
    let private = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"].map(|m| json!({"required": [m]}));
    let key = |kty: &str, crv: &str, y: Value, algs: Value| {
        json!({"type": "object", "required": ["kty", "crv", "x"], "not": {"anyOf": private},
            "properties": {"kty": {"const": kty}, "crv": {"const": crv}, "x": coord, "y": y,
                "kid": {"type": ["string", "null"]}, "alg": {"enum": algs}, "use": {"enum": ["sig", null]}}})
    };
    let mut ec = key("EC", "P-256", coord.clone(), json!(["ES256", null]));
    ec["required"] = json!(["kty", "crv", "x", "y"]);
    json!({"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "minItems": 1, "maxItems": 10,
        "items": {"oneOf": [key("OKP", "Ed25519", json!({"type": "null"}), json!(["EdDSA", "Ed25519", null])), ec]}}}})
}

/// Sets `value` at `pointer` (whose parent must exist); a missing parent is skipped, so a renamed
/// field shows up in the schemathesis run rather than here.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    if let Some(obj) = doc.pointer_mut(parent).and_then(Value::as_object_mut) {
        obj.insert(key.replace("~1", "/"), value);
    }
}

/// Merges `value`'s members into the object at `pointer`.
fn merge(doc: &mut Value, pointer: &str, value: Value) {
    if let (Some(obj), Value::Object(add)) = (doc.pointer_mut(pointer).and_then(Value::as_object_mut), value) {
        obj.extend(add);
    }
}

/// The schema of the query parameter `name` of `method` on `path`.
fn query_param(doc: &mut Value, path: &str, method: &str, name: &str, schema: Value) {
    let pointer = format!("/paths/{}/{method}/parameters", path.replace('/', "~1"));
    if let Some(params) = doc.pointer_mut(&pointer).and_then(Value::as_array_mut) {
        for p in params.iter_mut().filter(|p| p["name"] == name) {
            p["schema"] = schema.clone();
        }
    }
}

/// Refines the generated document in place.
pub(crate) fn refine(doc: &mut Value, max_grace_period_seconds: u64, max_access_token_ttl_seconds: u32) {
    let s = "/components/schemas";
    // Tokens.
    let t = format!("{s}/CreateTokenRequest/properties");
    set(doc, &format!("{t}/name"), name());
    set(doc, &format!("{t}/scopes"), scopes());
    set(doc, &format!("{t}/ip_allowlist"), allowlist());
    set(doc, &format!("{t}/expires_in"), json!({"type": ["integer", "null"], "minimum": 1, "maximum": MAX_EXPIRES_IN}));
    merge(
        doc,
        &format!("{s}/CreateTokenRequest"),
        json!({"not": {"required": ["expires_in", "expires_at"],
                       "properties": {"expires_in": {"type": "integer"}, "expires_at": {"type": "string"}}}}),
    );
    let u = format!("{s}/UpdateTokenRequest/properties");
    set(doc, &format!("{u}/name"), nullable(name()));
    set(doc, &format!("{u}/scopes"), nullable(scopes()));
    set(doc, &format!("{u}/ip_allowlist"), nullable(allowlist()));
    set(doc, &format!("{u}/expires_in"), json!({"type": ["integer", "null"], "minimum": 1, "maximum": MAX_EXPIRES_IN}));
    merge(
        doc,
        &format!("{s}/UpdateTokenRequest"),
        json!({"not": {"required": ["expires_in", "expires_at"],
                       "properties": {"expires_in": {"type": "integer"}}}}),
    );
    // Verification: what the handler refuses with 400 is outside the schema.
    let v = format!("{s}/VerifyRequestBody/properties");
    set(doc, &format!("{v}/token"), json!({"type": "string", "minLength": 1, "maxLength": 256}));
    // An empty scope is no scope (the handler's rule, for clients that cannot leave a field out).
    set(doc, &format!("{v}/scope"), json!({"type": ["string", "null"], "pattern": format!("^$|{EXACT_SCOPE}")}));
    set(
        doc,
        &format!("{v}/cost"),
        json!({"type": ["integer", "null"], "minimum": 0, "maximum": keygate_core::verify::MAX_COST}),
    );
    set(
        doc,
        &format!("{v}/ip"),
        json!({"type": ["string", "null"], "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}),
    );
    // `validate_text` allows line feeds in these.
    let lines = |max: u32| json!({"type": ["string", "null"], "maxLength": max, "pattern": TEXT_LINES});
    set(doc, &format!("{s}/RevokeTokenRequest/properties/reason"), lines(500));
    set(doc, &format!("{s}/SuspendClientRequest/properties/reason"), lines(500));
    set(doc, &format!("{s}/FindingBody/properties/location"), lines(500));
    set(doc, &format!("{s}/ReportExposuresRequest/properties/findings/maxItems"), json!(100));
    // Apps and plans.
    for (schema, required) in [
        ("CreateAppRequest", true),
        ("UpdateAppRequest", false),
        ("CreatePlanRequest", true),
        ("UpdatePlanRequest", false),
    ] {
        let p = format!("{s}/{schema}/properties");
        set(doc, &format!("{p}/name"), if required { name() } else { nullable(name()) });
        set(
            doc,
            &format!("{p}/description"),
            json!({"type": ["string", "null"], "maxLength": 2000, "pattern": TEXT_LINES}),
        );
    }
    set(doc, &format!("{s}/CreatePlanRequest/properties/scopes"), scopes());
    // Token rules: scopes in the grant grammar, the denylist as addresses and CIDRs.
    set(doc, &format!("{s}/TokenRulesBody/properties/allowlist_required_for"), scopes());
    set(doc, &format!("{s}/TokenRulesBody/properties/dpop_required_for"), scopes());
    let mut deny = allowlist();
    deny["maxItems"] = json!(keygate_core::account::MAX_WORKSPACE_DENY);
    set(doc, &format!("{s}/TokenRulesBody/properties/deny"), deny);
    set(doc, &format!("{s}/UpdatePlanRequest/properties/scopes"), nullable(scopes()));
    // Routes: an upstream (or several) unless the route is of kind `ai`.
    merge(
        doc,
        &format!("{s}/RouteBody"),
        json!({"anyOf": [
            {"required": ["upstream"], "properties": {"upstream": {"type": "string"}}},
            {"required": ["upstreams"], "properties": {"upstreams": {"minItems": 1}}},
            {"required": ["kind"], "properties": {"kind": {"const": "ai"}}}
        ]}),
    );
    // Lists: page sizes and the cursors they hand out.
    let limit = json!({"type": "integer", "minimum": 1, "maximum": 500});
    for path in ["/admin/v1/tokens", "/admin/v1/apps", "/admin/v1/audit-events"] {
        query_param(doc, path, "get", "limit", limit.clone());
    }
    query_param(doc, "/admin/v1/tokens", "get", "cursor", json!({"type": "string", "pattern": TIME_CURSOR}));
    query_param(doc, "/admin/v1/apps", "get", "cursor", json!({"type": "string", "pattern": TIME_CURSOR}));
    for path in ["/admin/v1/audit-events", "/admin/v1/audit-events/export", "/admin/v1/webhooks/{id}/deliveries"] {
        query_param(doc, path, "get", "cursor", json!({"type": "string", "pattern": AUDIT_CURSOR}));
    }
    query_param(doc, "/admin/v1/webhooks/{id}/deliveries", "get", "limit", limit.clone());
    query_param(doc, "/admin/v1/alerts", "get", "limit", limit.clone());
    query_param(doc, "/admin/v1/llm-logs", "get", "limit", json!({"type": "integer", "minimum": 1, "maximum": 200}));
    query_param(doc, "/admin/v1/llm-logs", "get", "cursor", json!({"type": "string", "pattern": "^[1-9][0-9]{0,17}$"}));
    query_param(
        doc,
        "/admin/v1/llm-logs",
        "get",
        "token_id",
        json!({"type": "string", "pattern": "^tok_[0-9A-Za-z]{1,40}$"}),
    );
    query_param(doc, "/admin/v1/alerts", "get", "cursor", json!({"type": "string", "pattern": TIME_CURSOR}));
    query_param(
        doc,
        "/admin/v1/alerts",
        "get",
        "status",
        json!({"type": "string", "enum": ["open", "acknowledged", "resolved"]}),
    );
    query_param(
        doc,
        "/admin/v1/alerts",
        "get",
        "severity",
        json!({"type": "string", "enum": ["low", "medium", "high"]}),
    );
    query_param(
        doc,
        "/admin/v1/alerts",
        "get",
        "token_id",
        json!({"type": "string", "pattern": "^tok_[0-9A-Za-z]{1,40}$"}),
    );
    query_param(
        doc,
        "/admin/v1/alerts",
        "get",
        "client_id",
        json!({"type": "string", "pattern": "^[0-9A-Za-z_-]{1,128}$"}),
    );
    query_param(
        doc,
        "/admin/v1/tokens",
        "get",
        "expiring_within",
        json!({"type": "integer", "minimum": 1, "maximum": MAX_EXPIRES_IN}),
    );
    query_param(doc, "/admin/v1/access-review", "get", "format", json!({"type": "string", "enum": ["json", "csv"]}));
    query_param(doc, "/admin/v1/reports/usage", "get", "format", json!({"type": "string", "enum": ["json", "csv"]}));
    query_param(
        doc,
        "/admin/v1/reports/usage",
        "get",
        "by",
        json!({"type": "string", "enum": ["token", "route", "api", "app", "developer", "reason"]}),
    );
    query_param(
        doc,
        "/admin/v1/apps/{id}/statement",
        "get",
        "period",
        json!({"type": "string", "pattern": "^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$"}),
    );
    query_param(
        doc,
        "/admin/v1/apps/{id}/statement",
        "get",
        "format",
        json!({"type": "string", "enum": ["json", "csv"]}),
    );
    query_param(
        doc,
        "/admin/v1/tokens",
        "get",
        "unused_days",
        json!({"type": "integer", "minimum": 1, "maximum": 3650}),
    );
    query_param(
        doc,
        "/admin/v1/tokens",
        "get",
        "status",
        json!({"type": "string", "enum": ["active", "suspended", "revoked", "expired"]}),
    );
    let date_time = json!({"type": "string", "format": "date-time"});
    for path in ["/admin/v1/calls", "/admin/v1/calls/export"] {
        query_param(doc, path, "get", "cursor", json!({"type": "string", "pattern": AUDIT_CURSOR}));
        query_param(doc, path, "get", "status", json!({"type": "string", "pattern": "^([1-5]xx|[1-5][0-9][0-9])$"}));
        query_param(doc, path, "get", "token_id", json!({"type": "string", "pattern": "^tok_[0-9A-Za-z]{1,40}$"}));
        query_param(doc, path, "get", "app_id", json!({"type": "string", "pattern": "^app_[0-9A-Za-z]{1,40}$"}));
        query_param(doc, path, "get", "from", date_time.clone());
        query_param(doc, path, "get", "to", date_time.clone());
    }
    query_param(doc, "/admin/v1/calls", "get", "limit", limit.clone());
    query_param(doc, "/admin/v1/calls/export", "get", "format", json!({"type": "string", "enum": ["jsonl", "csv"]}));
    for name in ["from", "to"] {
        query_param(doc, "/admin/v1/audit-events", "get", name, date_time.clone());
        query_param(doc, "/admin/v1/audit-events/export", "get", name, date_time.clone());
        query_param(doc, "/admin/v1/tokens/{id}/usage", "get", name, date_time.clone());
        query_param(doc, "/admin/v1/tokens/{id}/llm-usage", "get", name, date_time.clone());
        query_param(doc, "/admin/v1/reports/usage", "get", name, date_time.clone());
    }
    query_param(
        doc,
        "/admin/v1/tokens/{id}/usage",
        "get",
        "granularity",
        json!({"type": "string", "enum": ["minute", "hour", "day"]}),
    );
    // The scope catalog's path parameter is a scope.
    let pointer = "/paths/~1admin~1v1~1scopes~1{scope}";
    for method in ["put", "delete"] {
        if let Some(params) = doc.pointer_mut(&format!("{pointer}/{method}/parameters")).and_then(Value::as_array_mut) {
            for p in params.iter_mut().filter(|p| p["name"] == "scope") {
                p["schema"] = json!({"type": "string", "pattern": EXACT_SCOPE});
            }
        }
    }
    // OAuth clients: the values keygate serves.
    let c = format!("{s}/CreateClientRequest/properties");
    set(
        doc,
        &format!("{c}/grant_types"),
        json!({"type": "array", "items": {"type": "string",
            "enum": ["client_credentials", "refresh_token", "urn:ietf:params:oauth:grant-type:token-exchange"]}}),
    );
    set(doc, &format!("{c}/scopes"), scopes());
    set(
        doc,
        &format!("{c}/access_token_ttl_seconds"),
        json!({"type": ["integer", "null"], "minimum": 1, "maximum": max_access_token_ttl_seconds}),
    );
    set(
        doc,
        &format!("{c}/refresh_token_ttl_seconds"),
        json!({"type": ["integer", "null"], "minimum": 1, "maximum": u32::MAX}),
    );
    set(
        doc,
        &format!("{c}/token_endpoint_auth_method"),
        json!({"type": ["string", "null"], "enum": ["client_secret_basic", "client_secret_post", "private_key_jwt", null]}),
    );
    set(doc, &format!("{c}/access_token_format"), json!({"type": ["string", "null"], "enum": ["jwt", "opaque", null]}));
    set(doc, &format!("{c}/signing_alg"), json!({"type": ["string", "null"], "enum": ["EdDSA", "ES256", null]}));
    // Limits.
    let rate_limit = json!({"type": "object", "additionalProperties": false, "required": ["requests", "per_seconds"],
        "description": "At most `requests` per `per_seconds` seconds, with `burst` extra requests allowed at once.",
        "properties": {
            "requests": {"type": "integer", "minimum": 1, "maximum": u32::MAX},
            "per_seconds": {"type": "integer", "minimum": 1, "maximum": 31 * 86_400},
            "burst": {"type": "integer", "minimum": 0, "maximum": u32::MAX}}});
    set(doc, &format!("{s}/RateLimitBody"), rate_limit);
    set(
        doc,
        &format!("{s}/QuotaBody/properties/requests"),
        json!({"type": "integer", "minimum": 1, "maximum": u64::MAX}),
    );
    let grace = json!({"type": "integer", "minimum": 0, "maximum": max_grace_period_seconds});
    set(doc, &format!("{s}/RotateTokenRequest/properties/grace_period_seconds"), grace.clone());
    set(doc, &format!("{s}/RotateSecretRequest/properties/grace_period_seconds"), grace);
    let jkt = json!({"type": ["string", "null"], "pattern": "^[A-Za-z0-9_-]{43}$"});
    set(doc, &format!("{t}/dpop_jkt"), jkt.clone());
    set(doc, &format!("{u}/dpop_jkt"), jkt);
    set(
        doc,
        &format!("{s}/RotateKeysRequest/properties/alg"),
        json!({"type": ["string", "null"], "enum": ["EdDSA", "ES256", null]}),
    );
    let p = format!("{s}/PutScopeRequest/properties");
    set(doc, &format!("{p}/api"), nullable(name()));
    set(
        doc,
        &format!("{p}/description"),
        json!({"type": ["string", "null"], "maxLength": 2000, "pattern": TEXT_LINES}),
    );
    // private_key_jwt needs the client's keys; the secret methods take none.
    merge(
        doc,
        &format!("{s}/CreateClientRequest"),
        json!({
            "if": {"required": ["token_endpoint_auth_method"],
                   "properties": {"token_endpoint_auth_method": {"const": "private_key_jwt"}}},
            "then": {"required": ["jwks"], "properties": {"jwks": jwks()}},
            "else": {"properties": {"jwks": {"type": "null"}}}
        }),
    );
    apis(doc);
    // Request bodies whose every field is optional may be left out (an empty body reads as `{}`).
    optional_bodies(doc);
}

/// A character a URI may hold (RFC 3986), and the same but `/`.
const URI_CHAR: &str = r"A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%";
const URI_CHAR_NOT_SLASH: &str = r"A-Za-z0-9\-._~:?#\[\]@!$&'()*+,;=%";

/// APIs (issue 17): names, versions, successors (sent in a `Link` header), descriptions,
/// states and OpenAPI documents, as `keygate_core::apis` checks them.
fn apis(doc: &mut Value) {
    let s = "/components/schemas";
    let api_name = json!({"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"});
    let version = json!({"type": "string", "minLength": 1, "maxLength": 32,
        "pattern": "^[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*$"});
    let versions =
        json!({"type": "array", "maxItems": keygate_core::apis::MAX_VERSIONS, "uniqueItems": true, "items": version});
    let successor = json!({"type": "string", "maxLength": keygate_core::apis::MAX_SUCCESSOR_LEN,
    // A URL's host as `check_successor` reads it (a name, or an IPv6 address in brackets,
    // which the pattern only approximates, as it does the port's range).
    "pattern": format!(
        "^(https?://([A-Za-z0-9._~-]+|\\[[0-9A-Fa-f:.]+\\])(:[0-9]{{0,5}})?([/?#][{URI_CHAR}]*)?|/([{URI_CHAR_NOT_SLASH}][{URI_CHAR}]*)?)$"
    )});
    let description =
        json!({"type": "string", "maxLength": keygate_core::apis::MAX_DESCRIPTION_LEN, "pattern": TEXT_LINES});
    let openapi = json!({"type": "object", "required": ["openapi"],
        "properties": {"openapi": {"type": "string", "pattern": "^3"}}});
    let state = json!({"type": ["string", "null"], "enum": ["draft", "published", "deprecated", "retired", null]});
    let sunset = json!({"type": ["string", "null"], "format": "date-time"});
    let c = format!("{s}/CreateApiRequest/properties");
    set(doc, &format!("{c}/name"), api_name.clone());
    set(doc, &format!("{c}/description"), nullable(description.clone()));
    set(doc, &format!("{c}/versions"), versions.clone());
    set(doc, &format!("{c}/successor"), nullable(successor.clone()));
    set(doc, &format!("{c}/openapi"), nullable(openapi.clone()));
    let u = format!("{s}/UpdateApiRequest/properties");
    set(doc, &format!("{u}/name"), nullable(api_name));
    set(doc, &format!("{u}/description"), nullable(description));
    set(doc, &format!("{u}/versions"), nullable(versions));
    set(doc, &format!("{u}/successor"), nullable(successor.clone()));
    set(doc, &format!("{u}/openapi"), nullable(openapi));
    set(doc, &format!("{u}/state"), state.clone());
    set(doc, &format!("{u}/sunset"), sunset.clone());
    let v = format!("{s}/UpdateApiVersionRequest/properties");
    set(doc, &format!("{v}/successor"), nullable(successor));
    set(doc, &format!("{v}/state"), state);
    set(doc, &format!("{v}/sunset"), sunset);
    let access = json!({"type": ["string", "null"], "enum": ["open", "subscription", "approval", null]});
    set(doc, &format!("{c}/access"), access.clone());
    set(doc, &format!("{u}/access"), access);
    // A subscription's reason: one line, at most 500 characters (`subscriptions::check_reason`).
    let reason = json!({"type": ["string", "null"], "maxLength": keygate_core::subscriptions::MAX_REASON_LEN,
        "pattern": r"^[^\u0000-\u001f\u007f-\u009f]*$"});
    set(doc, &format!("{s}/SubscriptionDecisionRequest/properties/reason"), reason);
}

/// Marks a request body not required when its schema requires no field: the API reads an empty
/// body as `{}`, so leaving it out is valid.
fn optional_bodies(doc: &mut Value) {
    let schemas = doc.pointer("/components/schemas").cloned().unwrap_or(Value::Null);
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for op in item.values_mut() {
            let Some(body) = op.get_mut("requestBody") else { continue };
            let name = body
                .pointer("/content/application~1json/schema/$ref")
                .and_then(Value::as_str)
                .and_then(|r| r.rsplit('/').next())
                .map(str::to_owned);
            let requires_nothing = name
                .and_then(|n| schemas.get(&n))
                .is_some_and(|s| s.get("required").and_then(Value::as_array).is_none_or(Vec::is_empty));
            if requires_nothing {
                body["required"] = json!(false);
            }
        }
    }
}
