//! Scopes and how a granted scope covers a required one. The rules are written out for users in
//! `docs/scopes.md`; property tests below pin them.
//!
//! A scope is `resource:action` with an optional `:qualifier` (`orders:read`, `invoice:read:own`).
//! Each part is 1–64 characters of `a-z 0-9 _ - .`. A *granted* scope may use `*` as its action
//! or qualifier; a *required* scope (what a route demands) never has a wildcard.
//!
//! A granted scope covers a required one when the resources are equal and:
//! - the actions are equal or the granted action is `*` (which covers any action and qualifier);
//! - and, if the grant has a qualifier, the requirement has the same one (or the grant's is `*`);
//!   a grant without a qualifier covers every qualified form (`invoice:read` covers
//!   `invoice:read:own`), since a qualifier only narrows.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const MAX_PART_LEN: usize = 64;
pub const WILDCARD: &str = "*";

/// A validated scope string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Scope(String);

impl Scope {
    /// Validates a scope that may be granted (wildcards allowed after the resource).
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let shape_ok = matches!(parts.len(), 2 | 3);
        let parts_ok = parts.iter().enumerate().all(|(i, p)| {
            (i > 0 && *p == WILDCARD) || (!p.is_empty() && p.len() <= MAX_PART_LEN && p.bytes().all(is_part_byte))
        });
        // `orders:*:own` makes no sense: after a wildcard action nothing may follow.
        let wildcard_last = parts.get(1) != Some(&WILDCARD) || parts.len() == 2;
        if !(shape_ok && parts_ok && wildcard_last) {
            return Err(invalid(s));
        }
        Ok(Self(s.to_owned()))
    }

    /// Validates a scope a route may require: no wildcards.
    pub fn parse_required(s: &str) -> Result<Self> {
        let scope = Self::parse(s)?;
        if scope.0.split(':').any(|p| p == WILDCARD) {
            return Err(Error::invalid(
                "invalid_scope",
                format!("a required scope cannot contain a wildcard: {s:?}; name the exact scope, such as orders:read"),
            ));
        }
        Ok(scope)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parts(&self) -> (&str, &str, Option<&str>) {
        let mut it = self.0.splitn(3, ':');
        let resource = it.next().unwrap_or_default();
        let action = it.next().unwrap_or_default();
        (resource, action, it.next())
    }

    /// Whether this granted scope covers `required`.
    pub fn covers(&self, required: &Scope) -> bool {
        let (gr, ga, gq) = self.parts();
        let (rr, ra, rq) = required.parts();
        if gr != rr {
            return false;
        }
        if ga == WILDCARD {
            return true;
        }
        if ga != ra {
            return false;
        }
        match (gq, rq) {
            (None, _) => true,
            (Some(WILDCARD), Some(_)) => true,
            (Some(g), Some(r)) => g == r,
            (Some(_), None) => false,
        }
    }
}

fn is_part_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
}

fn invalid(s: &str) -> Error {
    Error::invalid(
        "invalid_scope",
        format!(
            "{s:?} is not a valid scope: use resource:action or resource:action:qualifier, lowercase letters, digits, _ - . (for example orders:read)"
        ),
    )
}

impl TryFrom<String> for Scope {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<Scope> for String {
    fn from(s: Scope) -> Self {
        s.0
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether any of `granted` covers `required`.
pub fn any_covers(granted: &[Scope], required: &Scope) -> bool {
    granted.iter().any(|g| g.covers(required))
}

/// The most scopes one list (a token's, a plan's, an OAuth client's) may hold.
pub const MAX_SCOPES: usize = 100;
/// Parses, deduplicates and sorts a list of granted scopes.
pub fn parse_scope_list(raw: &[String]) -> Result<Vec<Scope>> {
    // Counted as given, before duplicates go: the bound is on what a request may send.
    if raw.len() > MAX_SCOPES {
        return Err(crate::Error::invalid("invalid_scope", format!("a list holds at most {MAX_SCOPES} scopes")));
    }
    let mut out = raw.iter().map(|s| Scope::parse(s)).collect::<Result<Vec<_>>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(x: &str) -> Scope {
        Scope::parse(x).unwrap()
    }

    #[test]
    fn examples_from_the_docs() {
        assert!(s("orders:*").covers(&s("orders:read")));
        assert!(s("orders:*").covers(&s("orders:read:own")));
        assert!(s("orders:read").covers(&s("orders:read")));
        assert!(s("invoice:read").covers(&s("invoice:read:own")));
        assert!(!s("invoice:read:own").covers(&s("invoice:read")));
        assert!(s("invoice:read:*").covers(&s("invoice:read:own")));
        assert!(!s("invoice:read:*").covers(&s("invoice:read")));
        assert!(!s("orders:read").covers(&s("orders:write")));
        assert!(!s("orders:*").covers(&s("invoices:read")));
        assert!(!s("order:*").covers(&s("orders:read")));
    }

    #[test]
    fn invalid_scopes_are_refused() {
        for bad in [
            "",
            "orders",
            ":read",
            "orders:",
            "Orders:read",
            "orders:read:own:extra",
            "*:read",
            "*",
            "orders:*:own",
            "or ders:read",
            "orders:réad",
            "orders::read",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Scope::parse_required("orders:*").is_err());
        assert!(Scope::parse_required("invoice:read:*").is_err());
        assert_eq!(Scope::parse("Orders:x").unwrap_err().code, "invalid_scope");
    }

    fn part() -> impl Strategy<Value = String> {
        "[a-z0-9_.-]{1,8}"
    }

    fn concrete() -> impl Strategy<Value = Scope> {
        (part(), part(), proptest::option::of(part())).prop_map(|(r, a, q)| match q {
            Some(q) => s(&format!("{r}:{a}:{q}")),
            None => s(&format!("{r}:{a}")),
        })
    }

    fn granted() -> impl Strategy<Value = Scope> {
        prop_oneof![
            concrete(),
            part().prop_map(|r| s(&format!("{r}:*"))),
            (part(), part()).prop_map(|(r, a)| s(&format!("{r}:{a}:*"))),
        ]
    }

    proptest! {
        #[test]
        fn every_concrete_scope_covers_itself(x in concrete()) {
            prop_assert!(x.covers(&x));
        }

        #[test]
        fn resource_wildcard_covers_everything_of_its_resource(x in concrete()) {
            let (r, _, _) = x.parts();
            let wildcard = s(&format!("{r}:*"));
            prop_assert!(wildcard.covers(&x));
        }

        #[test]
        fn nothing_crosses_resources(g in granted(), x in concrete()) {
            if g.parts().0 != x.parts().0 {
                prop_assert!(!g.covers(&x));
            }
        }

        #[test]
        fn coverage_is_transitive(a in granted(), b in concrete(), c in concrete()) {
            if a.covers(&b) && b.covers(&c) {
                prop_assert!(a.covers(&c));
            }
        }

        #[test]
        fn a_qualified_grant_never_covers_the_unqualified_scope(r in part(), a in part(), q in part()) {
            let qualified = s(&format!("{r}:{a}:{q}"));
            let plain = s(&format!("{r}:{a}"));
            prop_assert!(!qualified.covers(&plain));
            prop_assert!(plain.covers(&qualified));
        }

        #[test]
        fn parse_never_panics_and_valid_scopes_round_trip(raw in "\\PC{0,40}") {
            if let Ok(x) = Scope::parse(&raw) {
                prop_assert_eq!(x.as_str(), raw.as_str());
            }
        }
    }
}
