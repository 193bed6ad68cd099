//! Typed identifiers: `ws_…`, `app_…`, `tok_…`, `rk_…`, `plan_…`, `usr_…`, `inv_…`, `wh_…`, `api_…`. An id is never confused with
//! another kind of id, and a malformed id is refused before it reaches a store.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::secret::Randomness;
use crate::token_format::random_base62;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $tag:literal) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const TAG: &'static str = $tag;

            /// A fresh random id.
            pub fn random(rng: &dyn Randomness) -> Result<Self> {
                Ok(Self(format!("{}_{}", $tag, random_base62(rng, 16)?)))
            }
            /// Accepts `<tag>_<letters and digits>`; anything else is `None`.
            pub fn parse(s: &str) -> Option<Self> {
                let rest = s.strip_prefix($tag)?.strip_prefix('_')?;
                let ok = !rest.is_empty() && rest.len() <= 40 && rest.bytes().all(|b| b.is_ascii_alphanumeric());
                ok.then(|| Self(s.to_owned()))
            }
            /// Wraps a value read back from the store, which only ever holds valid ids.
            pub fn from_trusted(s: String) -> Self {
                Self(s)
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

typed_id!(/// A workspace (tenant).
    WorkspaceId, "ws");
typed_id!(/// An app: an API consumer that holds tokens.
    AppId, "app");
typed_id!(/// A token; its suffix is the token's public id.
    TokenId, "tok");
typed_id!(/// A root key (admin API credential); its suffix is the key's public id.
    RootKeyId, "rk");
typed_id!(/// A dashboard account (a person).
    UserId, "usr");
typed_id!(/// An invitation to join a workspace.
    InvitationId, "inv");
typed_id!(/// A request to move an app to a plan, waiting for an admin's decision.
    PlanRequestId, "preq");
typed_id!(/// A plan (tier of scopes and default limits).
    PlanId, "plan");
typed_id!(/// A webhook endpoint: a URL that receives the workspace's events, signed.
    WebhookId, "wh");
typed_id!(/// An anomaly alert raised on a token's usage.
    AlertId, "al");
typed_id!(/// An API: a workspace's named, versioned set of routes with a lifecycle.
    ApiId, "api");
typed_id!(/// A request to publish an API, waiting for an owner's decision.
    ApiPublishRequestId, "apreq");
typed_id!(/// An app's subscription to an API (or one of its versions).
    SubscriptionId, "sub");

impl TokenId {
    pub fn from_public_id(public_id: &str) -> Self {
        Self(format!("tok_{public_id}"))
    }
}

impl RootKeyId {
    pub fn from_public_id(public_id: &str) -> Self {
        Self(format!("rk_{public_id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_format::SeededRandom;

    #[test]
    fn ids_are_typed_and_validated() {
        let id = AppId::random(&SeededRandom::new(3)).unwrap();
        assert!(id.as_str().starts_with("app_"));
        assert_eq!(AppId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(TokenId::parse(id.as_str()), None);
        for bad in ["app_", "app", "app_a-b", "app_ä", "xapp_abc", "app_abc'--"] {
            assert_eq!(AppId::parse(bad), None, "{bad}");
        }
    }
}
