//! Forward on a route with a response cache ([`crate::cache`]): a fresh stored answer is served
//! from memory; anything else goes upstream ([`Gateway::forward_upstream`]) and its answer is kept
//! when RFC 9111 allows. It runs after admit, so a hit has been authenticated, scope-checked and
//! limited like any request, and the front end records it as a forwarded answer.

use std::sync::Arc;

use http::Method;

use crate::answer::Refuse;
use crate::body::{BodySource, BodyState};
use crate::cache::{Before, Collect, RouteCache};
use crate::config::CacheKeyBy;
use crate::ctx::{Caller, Identity, RequestCtx};
use crate::gateway::Gateway;
use crate::head::ReqHead;
use crate::proxy::{Answered, HeadSink};
use crate::routes::Route;

impl Gateway {
    /// The forward phase on a route with `cache`.
    pub(crate) async fn forward_cached<B: BodySource, S: HeadSink>(
        &self,
        cache: &Arc<RouteCache>,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        body: &mut Option<B>,
        state: &BodyState,
        sink: &mut S,
    ) -> Result<Answered, Refuse> {
        let head = ctx.head;
        if head.method != Method::GET && head.method != Method::HEAD {
            let answered = self.forward_upstream(ctx, route, body, state, sink).await?;
            cache.after_other(head, &ctx.path, answered.status, sink);
            return Ok(answered);
        }
        let partition = partition(cache.key_by(), ctx.caller.as_ref());
        let miss = match cache.before(head, &ctx.path, partition, self.clock.now().as_millis(), sink) {
            Before::Hit(answered) => return Ok(answered),
            Before::Forward(miss) => miss,
        };
        let mut collect = Collect::new(sink);
        let mut answered = self.forward_upstream(ctx, route, body, state, &mut collect).await?;
        let (sink, fields) = collect.into_parts();
        let authenticated = !route.public || self.carries_credential(head);
        cache.after(miss, head, authenticated, (&mut answered, fields), self.clock.now().as_millis(), sink);
        Ok(answered)
    }

    /// Whether the request carries a credential keygate passes on (on a public route, an
    /// `Authorization` or API-key field goes to the upstream): RFC 9111 §3.5 applies to it.
    fn carries_credential(&self, head: &ReqHead<'_>) -> bool {
        let key = self.settings.api_key_header.as_ref().map(http::HeaderName::as_str);
        head.fields.iter().any(|f| {
            f.name.eq_ignore_ascii_case("authorization") || key.is_some_and(|k| f.name.eq_ignore_ascii_case(k))
        })
    }
}

/// Who shares the entries, as a key: empty for every caller of the route (and every request
/// of a public route made without a credential).
fn partition(key_by: CacheKeyBy, caller: Option<&Caller>) -> String {
    let Some(c) = caller else { return String::new() };
    match (key_by, &c.who) {
        (CacheKeyBy::Route, _) => String::new(),
        (CacheKeyBy::Token, Identity::Key(t)) => format!("tok:{}", String::from_utf8_lossy(t.public_id())),
        (CacheKeyBy::Token, Identity::Jwt(j)) => {
            format!("jwt:{}\n{}", j.issuer, j.jti.as_deref().unwrap_or(&j.sub))
        }
        (CacheKeyBy::App, Identity::Key(t)) => format!("app:{}", t.app_id),
        (CacheKeyBy::App, Identity::Jwt(j)) => {
            let app = j.app_id.as_deref().or(j.client_id.as_deref()).unwrap_or(&j.sub);
            format!("app:{}\n{app}", j.issuer)
        }
    }
}
