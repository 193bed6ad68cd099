//! A client of keygate's verification endpoint (`POST /admin/v1/verify`) for Rust services that
//! check the tokens their callers present themselves, instead of sitting behind keygate's
//! gateway. The root key it holds needs only the `tokens:verify` permission.
//!
//! ```no_run
//! # async fn run() -> Result<(), keygate_client::Error> {
//! let client = keygate_client::Client::new("http://127.0.0.1:8081", "kgroot_…")?;
//! let v = client.verify("kg_…", "orders:read").cost(2).ip("203.0.113.7".parse().unwrap()).send().await?;
//! if !v.valid {
//!     // Refuse the call; `v.code` says why (`rate_limited`, `insufficient_scope`, …).
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

/// Why a verification could not be answered (a refused token is not an error: it is a
/// [`Verification`] with `valid: false`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The base URL does not parse.
    #[error("the base URL is not valid: {0}")]
    InvalidUrl(String),
    /// keygate could not be reached, or its answer could not be read.
    #[error("cannot reach keygate: {0}")]
    Transport(#[from] reqwest::Error),
    /// keygate refused the request itself (bad root key, missing permission, invalid input),
    /// with the admin API's stable error code.
    #[error("keygate answered {status}: {code}: {message}")]
    Api { status: u16, code: String, message: String },
}

/// What a verification decided. `code` is `ok` when `valid`, else one of `malformed_token`,
/// `unknown_token`, `token_suspended`, `token_expired`, `ip_not_allowed`, `insufficient_scope`,
/// `rate_limited`, `quota_exceeded` (codes added later arrive as they are).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Verification {
    pub valid: bool,
    pub code: String,
    pub token_id: Option<String>,
    pub app_id: Option<String>,
    pub workspace_id: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub rate_limit: Option<Limit>,
    pub quota: Option<Limit>,
}

/// One of the token's limits after the verification.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Limit {
    pub limit: u64,
    pub remaining: u64,
    /// RFC 3339; absent for a quota that never resets.
    pub reset_at: Option<String>,
}

/// A client of one keygate's admin listener, holding a root key. Cheap to clone (one
/// connection pool).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    url: reqwest::Url,
    root_key: String,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the root key.
        f.debug_struct("Client").field("url", &self.url.as_str()).finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the admin listener at `base_url` (such as `http://127.0.0.1:8081`).
    pub fn new(base_url: &str, root_key: impl Into<String>) -> Result<Self, Error> {
        let base = reqwest::Url::parse(base_url).map_err(|e| Error::InvalidUrl(e.to_string()))?;
        let url = base.join("/admin/v1/verify").map_err(|e| Error::InvalidUrl(e.to_string()))?;
        Ok(Self { http: reqwest::Client::new(), url, root_key: root_key.into() })
    }

    /// A verification of `token` for a call that needs `scope` (empty: any scope), counting one
    /// request; change it with [`VerifyBuilder::cost`] and [`VerifyBuilder::ip`], then
    /// [`VerifyBuilder::send`].
    pub fn verify<'a>(&'a self, token: &'a str, scope: &'a str) -> VerifyBuilder<'a> {
        VerifyBuilder { client: self, token, scope, cost: None, ip: None }
    }
}

/// A verification to send.
#[must_use = "a verification does nothing until sent"]
pub struct VerifyBuilder<'a> {
    client: &'a Client,
    token: &'a str,
    scope: &'a str,
    cost: Option<u32>,
    ip: Option<IpAddr>,
}

impl VerifyBuilder<'_> {
    /// How many requests to count against the token's rate limit and quota (0 to 1000; 0 only
    /// reads them). Default 1.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = Some(cost);
        self
    }

    /// The caller's address, checked against the token's IP allowlist.
    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub async fn send(self) -> Result<Verification, Error> {
        let mut body = serde_json::Map::new();
        body.insert("token".into(), self.token.into());
        if !self.scope.is_empty() {
            body.insert("scope".into(), self.scope.into());
        }
        if let Some(c) = self.cost {
            body.insert("cost".into(), c.into());
        }
        if let Some(ip) = self.ip {
            body.insert("ip".into(), ip.to_string().into());
        }
        let c = self.client;
        let resp = c.http.post(c.url.clone()).bearer_auth(&c.root_key).json(&body).send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let err: serde_json::Value = resp.json().await.unwrap_or_default();
        let field =
            |name: &str| err.pointer(&format!("/error/{name}")).and_then(|v| v.as_str()).unwrap_or("").to_owned();
        Err(Error::Api { status: status.as_u16(), code: field("code"), message: field("message") })
    }
}
