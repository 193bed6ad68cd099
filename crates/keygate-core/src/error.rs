//! The one error type of the domain. Every error carries a stable snake_case `code` that users
//! and scripts can rely on, a message that says what to do, and a [`ErrorKind`] from which each
//! plane picks its status code in exactly one place.

use std::borrow::Cow;
use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure this is; the admin plane maps each kind to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or a value is out of range (400/422).
    InvalidInput,
    /// No such object in the caller's workspace (404).
    NotFound,
    /// The object's state forbids the change (409).
    Conflict,
    /// No credential, or an unknown one (401).
    Unauthenticated,
    /// The credential lacks a permission (403).
    Forbidden,
    /// The store cannot be reached (503).
    Unavailable,
    /// A bug or an unexpected store failure (500); details are logged, never returned.
    Internal,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: Cow<'static, str>,
}

impl Error {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self { kind, code, message: message.into() }
    }
    pub fn invalid(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidInput, code, message)
    }
    pub fn conflict(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Conflict, code, message)
    }
    /// `what` is the object kind ("token", "app"): the message never says whether the object
    /// exists in another workspace.
    pub fn not_found(what: &'static str) -> Self {
        let code = match what {
            "token" => "token_not_found",
            "app" => "app_not_found",
            "plan" => "plan_not_found",
            "workspace" => "workspace_not_found",
            "root key" => "root_key_not_found",
            "oauth client" => "oauth_client_not_found",
            "signing key" => "signing_key_not_found",
            "route" => "route_not_found",
            "provider" => "provider_not_found",
            "api" => "api_not_found",
            "api version" => "api_version_not_found",
            "publish request" => "publish_request_not_found",
            "subscription" => "subscription_not_found",
            _ => "not_found",
        };
        Self::new(ErrorKind::NotFound, code, format!("no {what} with this id exists"))
    }
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Internal, "internal_error", message)
    }
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unavailable, "store_unavailable", message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({}: {})", self.kind, self.code, self.message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}
