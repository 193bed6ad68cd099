//! APIs with a lifecycle (issue 17): an API is a first-class object of a workspace — a name, a
//! description, an OpenAPI document, and versions — whose routes follow its state. A draft
//! serves only its own workspace; a published API is listed in the portal; a deprecated one
//! still answers, with `Deprecation` (RFC 9745), `Sunset` (RFC 8594) and a `Link` to its
//! successor; a retired one answers 410 `api_retired`. The API as a whole and each of its
//! versions have a state of their own, and a route (`api`, `version`) follows the stricter of the
//! two ([`Lifecycle::of`]).
//!
//! The rules here are pure: which moves between states are allowed, what a name, a version and a
//! successor may be, and the effective lifecycle of a route. The store keeps APIs; the admin
//! service decides, audits and announces; the gateway applies.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ids::{ApiId, ApiPublishRequestId, WorkspaceId};
use crate::model::NewAuditEvent;
use crate::{Error, Result, Timestamp};

/// The largest OpenAPI document an API may carry, in bytes of JSON.
pub const MAX_OPENAPI_BYTES: usize = 1024 * 1024;
/// The longest API name, version name and description.
pub const MAX_NAME_LEN: usize = 64;
pub const MAX_VERSION_LEN: usize = 32;
pub const MAX_DESCRIPTION_LEN: usize = 2000;
/// The longest successor (a URL or an absolute path), in bytes.
pub const MAX_SUCCESSOR_LEN: usize = 512;
/// The most versions one API has.
pub const MAX_VERSIONS: usize = 50;
/// The most APIs one workspace has.
pub const MAX_APIS_PER_WORKSPACE: usize = 1000;

/// Where an API (or one of its versions) is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiState {
    /// Being designed: its routes serve only its own workspace's credentials, and the portal
    /// does not list it.
    Draft,
    /// Listed in the portal; served to whoever the route admits.
    Published,
    /// Still served, every answer saying when it was deprecated, when it goes away and what
    /// replaces it.
    Deprecated,
    /// Gone: its routes answer 410 `api_retired` before any token work. Final.
    Retired,
}

impl ApiState {
    pub const ALL: [ApiState; 4] = [Self::Draft, Self::Published, Self::Deprecated, Self::Retired];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Published => "published",
            Self::Deprecated => "deprecated",
            Self::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the lifecycle allows moving from `self` to `to`: draft → published → deprecated →
    /// retired, and back from deprecated to published (a deprecation withdrawn). Retired is
    /// final: clients were told it is gone and moved on; serving it again would be a new
    /// version. Staying in a state is allowed (to change a sunset or successor).
    pub fn may_become(self, to: ApiState) -> bool {
        use ApiState::*;
        self == to
            || matches!(
                (self, to),
                (Draft, Published) | (Published, Deprecated) | (Deprecated, Published) | (Deprecated, Retired)
            )
    }

    /// The audit action of a move to this state.
    pub fn action(self) -> &'static str {
        match self {
            Self::Draft => "api.draft",
            Self::Published => "api.publish",
            Self::Deprecated => "api.deprecate",
            Self::Retired => "api.retire",
        }
    }
}

/// A refusal of a move the lifecycle does not allow.
pub fn transition_error(from: ApiState, to: ApiState) -> Error {
    let hint = match from {
        ApiState::Draft => "a draft can only be published",
        ApiState::Published => "a published API can only be deprecated (retire it after that)",
        ApiState::Deprecated => "a deprecated API can be published again or retired",
        ApiState::Retired => "a retired API is final; publish a new version instead",
    };
    Error::conflict(
        "invalid_state_transition",
        format!("the state cannot change from {} to {}: {hint}", from.as_str(), to.as_str()),
    )
}

/// One version of an API (`v1`, `v2` …), with a state of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiVersion {
    pub name: String,
    pub state: ApiState,
    /// When it was last deprecated (the `Deprecation` header's date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deprecated_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
    /// The routes serving this version check requests against the API's OpenAPI document
    /// (request validation, as a route's own `validate`). Stored with the versions (JSON): no
    /// migration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub validate: bool,
}

impl ApiVersion {
    /// A new version, in the draft state.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: ApiState::Draft,
            deprecated_at: None,
            sunset: None,
            successor: None,
            validate: false,
        }
    }
}

/// An API of a workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Api {
    pub id: ApiId,
    pub workspace_id: WorkspaceId,
    /// Unique in the workspace; routes of the config file name the API by it.
    pub name: String,
    pub description: String,
    /// The OpenAPI document, as JSON text (at most [`MAX_OPENAPI_BYTES`]).
    pub openapi: Option<String>,
    pub state: ApiState,
    pub deprecated_at: Option<Timestamp>,
    pub sunset: Option<Timestamp>,
    /// A URL or an absolute path of what replaces it (the `Link: rel="successor-version"`).
    pub successor: Option<String>,
    pub versions: Vec<ApiVersion>,
    /// Who may call its routes: every admitted token, or only subscribed apps' (issue 17).
    pub access: crate::subscriptions::ApiAccess,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl Api {
    pub fn version(&self, name: &str) -> Option<&ApiVersion> {
        self.versions.iter().find(|v| v.name == name)
    }
}

/// Checks an API's name: 1 to 64 letters, digits, `-`, `_`, `.`. (A route's `api` is looked up
/// as an id first, then as a name.)
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("invalid_api_name", format!("an API's name is 1 to {MAX_NAME_LEN} letters, digits, - _ .")))
    }
}

/// Checks a version's name: 1 to 32 letters, digits, `-`, `_`, `.`.
pub fn check_version_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VERSION_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.bytes().all(|b| b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "invalid_api_version",
            format!("a version's name (such as v1) is 1 to {MAX_VERSION_LEN} letters, digits, - _ ."),
        ))
    }
}

/// A URL's authority without user information: a host name (letters, digits, `-`, `.`, `_`,
/// `~`) or an IPv6 address in brackets, then optionally `:` and a port (RFC 3986 §3.2). Anything
/// else (an unclosed bracket, an `@`) would make the `Link` a URL its reader cannot parse.
fn is_authority(a: &str) -> bool {
    let (host_ok, port) = match a.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, port)) => (addr.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let (host, port) = a.split_at(a.find(':').unwrap_or(a.len()));
            let name = host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
            (!host.is_empty() && name, port)
        }
    };
    // An empty port is allowed (`host:`), as RFC 3986 allows it.
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|n| {
            n.is_empty() || (n.len() <= 5 && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u16>().is_ok())
        });
    host_ok && port_ok
}

/// Checks a successor: an `https://` or `http://` URL or an absolute path, made only of the
/// characters a URI may hold (RFC 3986) — it is sent in a `Link` header between `<` and `>`, so
/// it must be a valid field value and must not close the brackets.
pub fn check_successor(s: &str) -> Result<()> {
    // A URL names a host (and no user); a path is absolute and not `//host` (a network-path
    // reference).
    let shape = match s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) {
        Some(rest) => is_authority(rest.split(['/', '?', '#']).next().unwrap_or_default()),
        None => s.starts_with('/') && !s.starts_with("//"),
    };
    let chars = s.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'/'
                    | b'?'
                    | b'#'
                    | b'['
                    | b']'
                    | b'@'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            )
    });
    if shape && chars && s.len() <= MAX_SUCCESSOR_LEN {
        Ok(())
    } else {
        Err(Error::invalid(
            "invalid_successor",
            format!(
                "successor is an http(s):// URL or an absolute path (such as /v2/orders), at most {MAX_SUCCESSOR_LEN} characters of a URI (no spaces, quotes or angle brackets)"
            ),
        ))
    }
}

/// Checks an OpenAPI document: a JSON object of at most [`MAX_OPENAPI_BYTES`] with an
/// `openapi` field naming a version 3.x.
pub fn check_openapi(doc: &serde_json::Value) -> Result<String> {
    let text = serde_json::to_string(doc).map_err(|e| Error::internal(e.to_string()))?;
    let versioned = doc.get("openapi").and_then(serde_json::Value::as_str).is_some_and(|v| v.starts_with('3'));
    if !doc.is_object() || !versioned {
        return Err(Error::invalid(
            "invalid_openapi",
            "openapi is an OpenAPI document: a JSON object with an \"openapi\": \"3.x\" field",
        ));
    }
    if text.len() > MAX_OPENAPI_BYTES {
        return Err(Error::invalid(
            "openapi_too_large",
            format!("the OpenAPI document is larger than {MAX_OPENAPI_BYTES} bytes; trim it or split the API"),
        ));
    }
    Ok(text)
}

/// What a route of an API (and, if it names one, a version) does, from both states: the route
/// follows the stricter. Retired if either is; a draft (own workspace only) if either is;
/// deprecated if either is, with the version's dates and successor when the version itself is
/// deprecated, else the API's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lifecycle {
    pub retired: bool,
    pub draft: bool,
    /// When it was deprecated (`Deprecation: @<seconds>`), if it is.
    pub deprecated_at: Option<Timestamp>,
    pub sunset: Option<Timestamp>,
    pub successor: Option<String>,
}

impl Lifecycle {
    /// The lifecycle of a route of `api`'s version `version` (`None`: the API as a whole).
    pub fn of(api: &Api, version: Option<&ApiVersion>) -> Self {
        let states = [Some(api.state), version.map(|v| v.state)];
        let any = |s: ApiState| states.contains(&Some(s));
        let mut out = Lifecycle { retired: any(ApiState::Retired), draft: any(ApiState::Draft), ..Self::default() };
        let (deprecated_at, sunset, successor) = match version {
            Some(v) if v.state == ApiState::Deprecated || v.state == ApiState::Retired => {
                (v.deprecated_at, v.sunset, v.successor.clone().or_else(|| api.successor.clone()))
            }
            _ => (api.deprecated_at, api.sunset, api.successor.clone()),
        };
        if any(ApiState::Deprecated) || out.retired {
            out.deprecated_at = deprecated_at;
            out.sunset = sunset;
            out.successor = successor;
        }
        out
    }

    /// Whether the route answers with the deprecation headers.
    pub fn deprecated(&self) -> bool {
        !self.retired && self.deprecated_at.is_some()
    }
}

/// Where a request to publish an API stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishRequestStatus {
    Pending,
    Approved,
    Rejected,
}

impl PublishRequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Approved, Self::Rejected].into_iter().find(|v| v.as_str() == s)
    }
}

/// A request to publish an API (or one of its versions), filed when the workspace wants
/// publishing approved (`api_publish_needs_approval`) and the person is not an owner; an owner
/// approves (the API is published then) or rejects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPublishRequest {
    pub id: ApiPublishRequestId,
    pub workspace_id: WorkspaceId,
    pub api_id: ApiId,
    /// The version to publish; `None`: the API as a whole.
    pub version: Option<String>,
    /// The actor who asked (`usr_…`).
    pub requested_by: String,
    pub status: PublishRequestStatus,
    pub created_at: Timestamp,
    pub decided_by: Option<String>,
    pub decided_at: Option<Timestamp>,
}

#[async_trait]
pub trait ApiStore: Send + Sync {
    /// Adds an API; `conflict` (`api_exists`) if the workspace has one of its name. Like a route
    /// change, it takes a change-feed position (`api:<id>`), so every node's gateway reloads.
    async fn insert_api(&self, api: &Api, audit: &NewAuditEvent) -> Result<()>;
    /// Replaces an API's fields with `audits` (the change, and a state change's own event);
    /// `not_found` if the workspace has no API with its id, `api_exists` if its new name is
    /// taken.
    async fn update_api(&self, api: &Api, audits: &[NewAuditEvent]) -> Result<()>;
    /// Deletes an API (and its publish requests and subscriptions); `false` if the workspace has
    /// none with this id.
    async fn delete_api(&self, ws: &WorkspaceId, id: &ApiId, audit: &NewAuditEvent) -> Result<bool>;
    async fn api(&self, ws: &WorkspaceId, id: &ApiId) -> Result<Option<Api>>;
    /// The workspace's APIs, by name, without their OpenAPI documents (`openapi` is `None`).
    async fn list_apis(&self, ws: &WorkspaceId) -> Result<Vec<Api>>;
    /// Every API of every workspace (the gateway's table), without their OpenAPI documents.
    async fn all_apis(&self) -> Result<Vec<Api>>;
    async fn insert_publish_request(&self, r: &ApiPublishRequest, audit: &NewAuditEvent) -> Result<()>;
    async fn publish_request(&self, ws: &WorkspaceId, id: &ApiPublishRequestId) -> Result<Option<ApiPublishRequest>>;
    /// The workspace's requests, newest first; only those with `status` if given.
    async fn publish_requests(
        &self,
        ws: &WorkspaceId,
        status: Option<PublishRequestStatus>,
    ) -> Result<Vec<ApiPublishRequest>>;
    /// Records the decision on a pending request (`conflict` `request_decided` if it was decided
    /// already) and, when approved, the API as published (`api`), with `audits`, in one
    /// transaction.
    async fn decide_publish_request(
        &self,
        decided: &ApiPublishRequest,
        api: Option<&Api>,
        audits: &[NewAuditEvent],
    ) -> Result<()>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn api(state: ApiState) -> Api {
        Api {
            id: ApiId::from_trusted("api_x".into()),
            workspace_id: WorkspaceId::from_trusted("ws_x".into()),
            name: "orders".into(),
            description: String::new(),
            openapi: None,
            state,
            deprecated_at: None,
            sunset: None,
            successor: None,
            versions: vec![],
            access: Default::default(),
            created_at: Timestamp::from_millis(0),
            updated_at: Timestamp::from_millis(0),
        }
    }

    #[test]
    fn the_lifecycle_moves_forward_and_back_from_deprecated_only() {
        use ApiState::*;
        assert!(Draft.may_become(Published));
        assert!(Published.may_become(Deprecated));
        assert!(Deprecated.may_become(Published));
        assert!(Deprecated.may_become(Retired));
        assert!(Deprecated.may_become(Deprecated));
        for (a, b) in
            [(Draft, Deprecated), (Draft, Retired), (Published, Draft), (Published, Retired), (Retired, Published)]
        {
            assert!(!a.may_become(b), "{a:?} -> {b:?}");
        }
        assert_eq!(transition_error(Retired, Published).code, "invalid_state_transition");
    }

    #[test]
    fn names_versions_and_successors_are_checked() {
        assert!(check_name("orders-v2.internal").is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_version_name("v1").is_ok());
        assert!(check_version_name("..").is_err());
        for good in ["/v2/orders", "https://api.example.com/v2", "http://h:8080/a?b=c", "/", "/a:///b"] {
            assert!(check_successor(good).is_ok(), "{good}");
        }
        for good in ["https://[2001:db8::1]:8443/v2", "https://h:/v2", "http://a.b_c~d#x", "https://h?q"] {
            assert!(check_successor(good).is_ok(), "{good}");
        }
        // Not a host: an unclosed or bad IPv6 literal, a user, a bad port (schemathesis found the
        // first kept and then sent back in the `Link` header, which no client could parse).
        for bad in [
            "https://ey0p'GG1jn0,X+[o",
            "https://X~*kxc$Ad]T#;hx",
            "https://[::1/v2",
            "https://[nothost]/v2",
            "https://user:pw@h/v2",
            "https://h:99999/v2",
            "https://h:+80/v2",
            "https://h:8a/v2",
            "https://h:000080/v2",
            "https://:80/v2",
        ] {
            assert_eq!(check_successor(bad).unwrap_err().code, "invalid_successor", "{bad}");
        }
        for bad in ["v2", "//evil", "https://", "https:///x", "/a b", "/a>b", "/a\"b", "ftp://x", "/\r\n"] {
            assert_eq!(check_successor(bad).unwrap_err().code, "invalid_successor", "{bad}");
        }
    }

    #[test]
    fn a_route_follows_the_stricter_of_api_and_version() {
        let mut a = api(ApiState::Published);
        assert_eq!(Lifecycle::of(&a, None), Lifecycle::default());
        a.state = ApiState::Deprecated;
        a.deprecated_at = Some(Timestamp::from_millis(1_000));
        a.sunset = Some(Timestamp::from_millis(9_000));
        a.successor = Some("/v2".into());
        let l = Lifecycle::of(&a, None);
        assert!(l.deprecated() && !l.retired && !l.draft);
        assert_eq!(l.successor.as_deref(), Some("/v2"));
        // A retired version of a deprecated API is retired, with the version's own successor.
        let mut v = ApiVersion::new("v1");
        v.state = ApiState::Retired;
        v.successor = Some("/v3".into());
        let l = Lifecycle::of(&a, Some(&v));
        assert!(l.retired && !l.deprecated());
        assert_eq!(l.successor.as_deref(), Some("/v3"));
        // A draft version of a published API serves its workspace only.
        a.state = ApiState::Published;
        let l = Lifecycle::of(&a, Some(&ApiVersion::new("v9")));
        assert!(l.draft && !l.deprecated());
    }

    #[test]
    fn openapi_documents_are_objects_of_a_known_version_and_bounded() {
        assert!(check_openapi(&serde_json::json!({"openapi": "3.1.0", "paths": {}})).is_ok());
        assert_eq!(check_openapi(&serde_json::json!([1])).unwrap_err().code, "invalid_openapi");
        assert_eq!(check_openapi(&serde_json::json!({"x": 1})).unwrap_err().code, "invalid_openapi");
        let big = serde_json::json!({"openapi": "3.0.0", "x": "a".repeat(MAX_OPENAPI_BYTES)});
        assert_eq!(check_openapi(&big).unwrap_err().code, "openapi_too_large");
    }
}
