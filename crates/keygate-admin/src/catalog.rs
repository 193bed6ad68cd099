//! What the developer portal shows: the APIs behind the gateway (from the live route table),
//! their OpenAPI documents, and an explorer that sends a real request through the gateway. The
//! binary implements [`ApiCatalog`]; the admin crate knows nothing of the gateway.

/// One API of the catalog: a route of the gateway.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiEntry {
    pub id: String,
    /// The path prefix callers use.
    pub path: String,
    pub host: Option<String>,
    /// Header fields a request must carry to reach this route (an API version told apart by a
    /// header): `(name, values)`, any one of the values.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, Vec<String>)>,
    /// No token needed.
    pub public: bool,
    pub description: Option<String>,
    /// `(method, scope)`: the scope each method needs (`*`: the other methods).
    pub scopes: Vec<(String, String)>,
    /// Where the route's OpenAPI document comes from (a file or URL), if any.
    pub openapi: Option<String>,
    /// The workspace (id) whose credentials the route accepts; `None`: a route known to no
    /// workspace (the built-in demo route).
    pub workspace_id: Option<String>,
    /// Accepts the credentials of every workspace, so every workspace's portal lists it.
    pub shared: bool,
    /// The lifecycle state of the route's API (`draft`, `published`, `deprecated`, `retired`;
    /// the stricter of the API's and its version's), if the route names an API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_state: Option<String>,
    /// The API's name and the version the route serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// When a deprecated API goes away (RFC 3339), and what replaces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sunset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
    /// The route's API admits only subscribed apps' tokens (its access is `subscription` or
    /// `approval`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub subscription_required: bool,
    /// A document the gateway made for the route (an `ai` route's prompts), shown when the
    /// route names none of its own.
    #[serde(skip)]
    pub document: Option<serde_json::Value>,
}

impl ApiEntry {
    /// Whether the portal of workspace `ws` lists this API: the workspace's own routes and
    /// shared ones (issue 13: a person sees only what their workspace's credentials can call).
    pub fn serves_workspace(&self, ws: &str) -> bool {
        self.shared || self.workspace_id.as_deref().is_none_or(|own| own == ws)
    }

    /// Whether the portal lists it at all: not while its API is a draft (issue 17: the
    /// workspace's APIs page shows drafts), nor once it is retired.
    pub fn in_portal(&self) -> bool {
        !matches!(self.api_state.as_deref(), Some("draft" | "retired"))
    }
}

/// The answer to an explorer request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TryAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The body was longer than what is shown.
    pub truncated: bool,
}

#[async_trait::async_trait]
pub trait ApiCatalog: Send + Sync {
    /// The APIs the gateway serves now.
    fn apis(&self) -> Vec<ApiEntry>;
    /// The OpenAPI document at `source` (a file path or an http(s) URL), parsed.
    async fn openapi(&self, source: &str) -> Result<serde_json::Value, String>;
    /// Sends a request through the gateway with `token` (never logged) and returns its answer.
    /// The path (normalized as the gateway does) must be one the API `api_id` serves; the answer
    /// body is cut at 64 KiB. `caller` is the address of the person using the explorer: the
    /// gateway sees the request as coming from it (IP allowlists, limits, `last_used_ip`), never
    /// from keygate's own address.
    async fn send(
        &self,
        caller: std::net::IpAddr,
        api_id: &str,
        method: &str,
        path_and_query: &str,
        token: Option<&str>,
        body: Option<String>,
    ) -> Result<TryAnswer, String>;
}
