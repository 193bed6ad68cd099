//! Forward: the phase that sends an admitted request upstream — the choice of upstream (the
//! route's balancing, passive health, retries of requests that can be sent again), the request
//! head the upstream receives ([`UpstreamHead`]: the client's fields minus the credential,
//! hop-by-hop fields and client-supplied identity fields, then `X-Forwarded-*`, `Forwarded`,
//! `X-Real-IP` and keygate's identity fields, or a short-lived identity token), and the attempts.
//! The head is written here, whole, into the buffer of the upstream connection
//! ([`crate::proxy::open`]); the upstream client ([`crate::proxy::send`]) only carries bytes. A
//! failure becomes a refusal through [`Refuse::forward_failed`], the one place upstream errors
//! get their answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::header::HeaderName;
use keygate_core::scope::Scope;

use crate::answer::Refuse;
use crate::body::{BodySource, BodyState};
use crate::ctx::{Caller, ConnInfo, Identity, IpText, RequestCtx, client_ip, is_trusted, origin};
use crate::gateway::{Gateway, IDENTITY_TTL_S, IdentityKey, Minted, Pinned};
use crate::head::{self, ReqHead, upgrade_requested};
use crate::proxy::{self, Answered, HeadSink, RequestFraming, UpstreamError, UpstreamRequest};
use crate::routes::Route;
use crate::target::Upstream;
use crate::upstream::Opened;
use crate::upstream_h2;

/// The client asked for trailers (`TE: trailers`, as gRPC clients do): an HTTP/2 upstream is told
/// so (HTTP/1.1 upstreams are not: `TE` is hop-by-hop there; their trailers pass all the same).
fn te_trailers(head: &ReqHead<'_>) -> bool {
    head.all("te").any(|v| {
        v.split(|b| *b == b',').any(|t| {
            let coding = t.split(|b| *b == b';').next().unwrap_or_default();
            coding.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
    })
}

impl Gateway {
    /// Forward: on a route with a response cache, a fresh stored answer, else (and on every
    /// other route) the request sent upstream ([`Gateway::forward_upstream`]). The answer's head
    /// goes to `sink`; on failure, the refusal to give the client.
    pub(crate) async fn forward<B: BodySource, S: HeadSink>(
        &self,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        body: &mut Option<B>,
        state: &BodyState,
        sink: &mut S,
    ) -> Result<Answered, Refuse> {
        // Request validation first, on a route that asks for it: a body read to be checked goes
        // upstream from memory.
        if let Some(v) = &route.validation
            && let Some(read) = self.validate_request(ctx, route, v, body, state).await?
        {
            let mut memory = Some(crate::phase::validate::MemoryBody::new(read));
            return self.forward_checked(ctx, route, &mut memory, state, sink).await;
        }
        self.forward_checked(ctx, route, body, state, sink).await
    }

    /// Forward, once the request is checked.
    async fn forward_checked<B: BodySource, S: HeadSink>(
        &self,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        body: &mut Option<B>,
        state: &BodyState,
        sink: &mut S,
    ) -> Result<Answered, Refuse> {
        if let Some(ai) = &route.ai {
            return self.forward_ai(ctx, route, ai, body, state, sink).await;
        }
        match &route.cache {
            Some(cache) => self.forward_cached(cache, ctx, route, body, state, sink).await,
            None => self.forward_upstream(ctx, route, body, state, sink).await,
        }
    }

    /// Sends the request to the route's upstreams, one attempt, or more for a request without a
    /// body when a connection cannot be made. The answer's head goes to `sink`; on failure, the
    /// refusal to give the client.
    pub(crate) async fn forward_upstream<B: BodySource, S: HeadSink>(
        &self,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        body: &mut Option<B>,
        state: &BodyState,
        sink: &mut S,
    ) -> Result<Answered, Refuse> {
        let (head, conn, caller) = (ctx.head, &ctx.conn, ctx.caller.as_ref());
        let has_body = body.as_ref().is_some_and(|b| !b.is_end_stream());
        let trusted = &self.settings.trusted_proxies;
        let peer_trusted = !trusted.is_empty() && is_trusted(trusted, &conn.remote.ip());
        let client = match caller {
            Some(c) => c.ip,
            None if peer_trusted => client_ip(conn.remote, head, trusted),
            None => conn.remote.ip(),
        };
        let identity = if route.identity_token { caller.and_then(|c| self.identity_token(c, route)) } else { None };
        let out = UpstreamHead {
            head,
            path: &ctx.path,
            route,
            caller,
            conn,
            api_key: self.settings.api_key_header.as_ref(),
            peer_trusted,
            client,
            identity: identity.as_deref(),
        };
        let framing = proxy::request_framing(&head.method, body.as_ref());
        let deadline = tokio::time::Instant::from_std(ctx.start) + route.request_timeout;
        // Upstreams already tried; allocated only when a retry happens.
        let mut tried: Vec<usize> = Vec::new();
        let mut last_err = UpstreamError::Connect("no upstream".into());
        // Only a request without a body can be sent again, and only a safe one after it left.
        let attempts = if has_body || !head.method.is_idempotent() { 1 } else { route.retries as usize + 1 };
        // The balancing targets: the upstreams, or the addresses their DNS names resolve to.
        let targets = route.targets();
        if targets.is_empty() {
            ctx.table.metrics.upstream_error(route.index, false);
            return Err(Refuse::upstream_unresolved());
        }
        for _ in 0..attempts {
            let Some(ui) = targets.pick(route.balance, &tried) else { break };
            let Some(upstream) = targets.get(ui) else { break };
            let req =
                UpstreamRequest { method: &head.method, framing, connect_timeout: route.connect_timeout, deadline };
            let sent = match crate::upstream::open(upstream, route.connect_timeout).await {
                Ok(Opened::H1(mut conn)) => {
                    // The head is written here, whole, into the connection's own buffer; the
                    // upstream client only sends it.
                    out.write(upstream, framing, conn.head_buf());
                    proxy::send(upstream, conn, &req, body, sink).await
                }
                Ok(Opened::H2(conn)) => {
                    // The same head, read back into an HTTP/2 request by the HTTP/2 client.
                    let mut buf = Vec::with_capacity(512);
                    out.write(upstream, framing, &mut buf);
                    upstream_h2::send(upstream, conn, &req, &buf, te_trailers(head), body, sink).await
                }
                Err(e) => Err(proxy::SendError::Upstream(e)),
            };
            match sent {
                Ok(answered) => return Ok(answered),
                // The client's own body failed (too large, malformed): nothing to say about the
                // upstream.
                Err(proxy::SendError::Body(_)) => break,
                Err(proxy::SendError::Upstream(e)) => {
                    let client_fault = state.broken.load(Ordering::Relaxed) || state.too_large.load(Ordering::Relaxed);
                    // A failure before sending was counted when the connection was opened.
                    if !client_fault && !e.before_sending() {
                        proxy::note_failure(upstream);
                    }
                    if !client_fault {
                        ctx.table.metrics.upstream_error(route.index, matches!(e, UpstreamError::Timeout));
                        tracing::warn!(route = %route.id, upstream = %upstream.authority, address = ?upstream.addr, error = ?e, "upstream request failed");
                    }
                    let retry = e.before_sending();
                    last_err = e;
                    if !retry {
                        break;
                    }
                    tried.push(ui);
                }
            }
        }
        Err(Refuse::forward_failed(&last_err, state, route.max_body_bytes))
    }

    /// The identity token for `caller` on `route`: reused from the cache while it has at least
    /// [`IDENTITY_REUSE_S`] to live, else minted.
    fn identity_token(&self, caller: &Caller, route: &Route) -> Option<Arc<str>> {
        let signer = self.identity.as_ref()?;
        let now_s = self.clock.now().as_millis() / 1000;
        let (who, pinned) = match &caller.who {
            Identity::Key(t) => (Arc::as_ptr(t) as usize, Pinned::Key(t.clone())),
            Identity::Jwt(j) => (Arc::as_ptr(j) as usize, Pinned::Jwt(j.clone())),
        };
        let key = IdentityKey { who, route: route.id.clone(), ip: caller.ip };
        if let Some(jwt) = self.identity_cache.get(&key, now_s) {
            return Some(jwt);
        }
        let (id, sub, extra) = match &caller.who {
            Identity::Key(t) => (
                t.token_id().to_string(),
                t.app_id.to_string(),
                serde_json::json!({"token_id": t.token_id().to_string(), "workspace_id": &*t.workspace_id}),
            ),
            Identity::Jwt(j) => (
                format!("jwt:{}", j.jti.as_deref().unwrap_or(&j.sub)),
                j.app_id.as_deref().unwrap_or(&j.sub).to_owned(),
                serde_json::json!({"token_id": j.jti.as_deref(), "client_id": j.client_id.as_deref(), "token_issuer": &*j.issuer, "workspace_id": j.workspace_id.as_deref()}),
            ),
        };
        let scopes: Vec<&str> = caller.scopes().iter().map(Scope::as_str).collect();
        let mut claims = serde_json::json!({
            "iss": signer.issuer(),
            "sub": sub,
            "aud": format!("keygate-route:{}", route.id),
            "iat": now_s,
            "exp": now_s + IDENTITY_TTL_S,
            "jti": format!("{id}.{}.{now_s}", route.id),
            "scope": scopes.join(" "),
            "client_ip": caller.ip.to_string(),
        });
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())));
        }
        let jwt: Arc<str> = signer.sign(&claims)?.into();
        self.identity_cache.put(key, Minted { pinned, jwt: jwt.clone(), exp: now_s + IDENTITY_TTL_S });
        Some(jwt)
    }
}

/// Everything the request head sent upstream is made from.
pub(crate) struct UpstreamHead<'a, 'h> {
    head: &'a ReqHead<'h>,
    /// Normalized.
    path: &'a str,
    route: &'a Route,
    caller: Option<&'a Caller>,
    conn: &'a ConnInfo,
    api_key: Option<&'a HeaderName>,
    /// The socket's peer is a trusted proxy (`gateway.trusted_proxies`): its `X-Forwarded-For`
    /// and `Forwarded` are extended, the other `X-Forwarded-*` fields it sends pass, and the
    /// scheme and host it was asked for are believed.
    peer_trusted: bool,
    /// The client's address as keygate decided it ([`client_ip`]).
    client: IpAddr,
    /// The identity token to send in `Authorization` (routes with `identity_token`).
    identity: Option<&'a str>,
}

impl UpstreamHead<'_, '_> {
    /// Writes the request head for `upstream` in one buffer: the client's fields minus those
    /// that must not pass (hop-by-hop ones and any named in `Connection` are removed before
    /// keygate's own are added, see [`head::classify_name`]), then `X-Forwarded-*`,
    /// `Forwarded`, `X-Real-IP`, the identity fields and the framing. Every field goes through
    /// [`crate::answer::line`] (or [`crate::answer::begin`]), which writes only valid field
    /// values.
    pub(crate) fn write(&self, upstream: &Upstream, framing: RequestFraming, buf: &mut Vec<u8>) {
        use crate::answer::{begin, line};
        let head = self.head;
        buf.extend_from_slice(head.method.as_str().as_bytes());
        buf.push(b' ');
        buf.extend_from_slice(upstream.base_path.as_bytes());
        let rest =
            if self.route.strip_prefix { self.path.get(self.route.prefix.len()..).unwrap_or("") } else { self.path };
        buf.extend_from_slice(if rest.is_empty() { b"/" } else { rest.as_bytes() });
        if let Some(q) = head.query {
            buf.push(b'?');
            buf.extend_from_slice(q.as_bytes());
        }
        buf.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        buf.extend_from_slice(upstream.host_header.as_bytes());
        buf.extend_from_slice(b"\r\n");
        let upgrade = upgrade_requested(head);
        let strip_credential = !self.route.public;
        let api_key = self.api_key.filter(|_| strip_credential).map(|k| k.as_str().as_bytes());
        // Fields named in `Connection` (RFC 9110 §7.6.1), looked at only when there is one.
        let mut named = head.known.connection.then(|| head::ConnectionNames::new(head.fields));
        // Names are compared folded (`X_Keygate_Subject` as `x-keygate-subject`) only when some
        // name needs it; the common request takes the plain comparisons.
        let folded = head.known.odd_names
            || api_key.is_some_and(head::needs_fold)
            || named.as_ref().is_some_and(head::ConnectionNames::any_odd);
        if let Some(n) = named.as_mut() {
            n.folded = folded;
        }
        let mut key_buf = [0u8; head::FOLD_LEN];
        let api_key = match api_key {
            Some(k) if folded => Some(head::fold(k, &mut key_buf)),
            k => k,
        };
        let mut name_buf = [0u8; head::FOLD_LEN];
        for f in head.fields {
            let name = f.name.as_bytes();
            let canon = if folded { head::fold(name, &mut name_buf) } else { name };
            let passes = match head::classify_name(canon) {
                head::NameClass::Passes => true,
                head::NameClass::Stripped => false,
                head::NameClass::FromTrustedProxy => self.peer_trusted,
            };
            if !passes
                || named.as_ref().is_some_and(|n| n.lists(canon))
                || (strip_credential
                    && (canon.eq_ignore_ascii_case(b"authorization")
                        || api_key.is_some_and(|k| canon.eq_ignore_ascii_case(k))))
            {
                continue;
            }
            line(buf, name, f.value);
        }
        if upgrade {
            for v in head.all("upgrade") {
                line(buf, b"upgrade", v);
            }
            buf.extend_from_slice(b"connection: upgrade\r\n");
        }
        // X-Forwarded-For: a trusted proxy's chain, extended with the socket's address.
        let mut xff = begin(buf, b"x-forwarded-for");
        if self.peer_trusted && head.known.forwarded_for {
            for v in head.all("x-forwarded-for") {
                xff.push(v).push(b", ");
            }
        }
        xff.push(self.conn.ip_text.as_bytes());
        xff.end();
        let (scheme, host) = origin(head, self.conn, self.peer_trusted);
        line(buf, b"x-forwarded-proto", scheme.as_bytes());
        if let Some(h) = host {
            line(buf, b"x-forwarded-host", h);
        }
        // Forwarded (RFC 7239 §4): a trusted proxy's, extended with this hop; nobody else's.
        if self.peer_trusted && head.fields.iter().any(|f| f.name.eq_ignore_ascii_case("forwarded")) {
            let mut fwd = begin(buf, b"forwarded");
            for v in head.all("forwarded") {
                fwd.push(v).push(b", ");
            }
            // RFC 7239 §6: an IPv6 node is quoted and bracketed.
            match self.conn.remote.ip() {
                IpAddr::V4(_) => fwd.push(b"for=").push(self.conn.ip_text.as_bytes()),
                IpAddr::V6(_) => fwd.push(b"for=\"[").push(self.conn.ip_text.as_bytes()).push(b"]\""),
            };
            fwd.end();
        }
        // X-Real-IP: the client's address as keygate decided it (formatted again only when a
        // trusted proxy's X-Forwarded-For named another).
        if self.client == self.conn.remote.ip() {
            line(buf, b"x-real-ip", self.conn.ip_text.as_bytes());
        } else {
            line(buf, b"x-real-ip", IpText::new(self.client).as_bytes());
        }
        if let Some(c) = self.caller {
            match &c.who {
                Identity::Key(t) => {
                    let mut id = begin(buf, b"x-keygate-token-id");
                    id.push(b"tok_").push(t.public_id());
                    id.end();
                    line(buf, b"x-keygate-app-id", t.app_id.as_bytes());
                }
                Identity::Jwt(j) => {
                    // A JWT's id and its client (keygate's tokens name the app the client belongs
                    // to). Claims with control characters were refused when the token was
                    // verified; `line` would leave them out anyway.
                    line(buf, b"x-keygate-token-id", j.jti.as_deref().unwrap_or("").as_bytes());
                    let app = j.app_id.as_deref().or(j.client_id.as_deref()).unwrap_or(&j.sub);
                    line(buf, b"x-keygate-app-id", app.as_bytes());
                    line(buf, b"x-keygate-subject", j.sub.as_bytes());
                }
            }
            let mut scopes = begin(buf, b"x-keygate-scopes");
            for (i, sc) in c.scopes().iter().enumerate() {
                if i > 0 {
                    scopes.push(b" ");
                }
                scopes.push(sc.as_str().as_bytes());
            }
            scopes.end();
        }
        if let Some(jwt) = self.identity {
            let mut auth = begin(buf, b"authorization");
            auth.push(b"Bearer ").push(jwt.as_bytes());
            auth.end();
        }
        match framing {
            RequestFraming::None => {}
            RequestFraming::Length(n) => {
                buf.extend_from_slice(b"content-length: ");
                buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            RequestFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        }
        buf.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::head::Known;
    use crate::routes::RouteTable;

    #[test]
    fn upstream_heads_carry_what_may_pass_and_keygate_fields() {
        let cfg = crate::config::RouteConfig {
            strip_prefix: true,
            ..crate::config::RouteConfig::new("o", "/orders", "http://127.0.0.1:9000/api")
        };
        let table = RouteTable::build(&[cfg], &crate::config::GatewayConfig::default()).unwrap();
        let route = &table.routes[0];
        let f = |name, value: &'static str| head::Field { name, value: value.as_bytes() };
        let fields = [
            f("Host", "client.example"),
            f("Authorization", "Bearer kg_secret"),
            f("X-Api-Key", "kg_secret"),
            f("Connection", "x-hop, keep-alive"),
            f("X-Hop", "1"),
            f("Keep-Alive", "5"),
            f("Content-Length", "99"),
            f("Expect", "100-continue"),
            f("X-Keygate-Token-Id", "tok_forged"),
            f("X-Forwarded-For", "6.6.6.6"),
            f("X-Custom", "kept"),
        ];
        let key = HeaderName::from_static("x-api-key");
        let head = ReqHead {
            method: Method::POST,
            path: "/orders/7",
            query: Some("a=1"),
            version: http::Version::HTTP_11,
            authority: None,
            fields: &fields,
            known: Known::classify(&fields, Some(&key)),
        };
        let conn = ConnInfo::new("10.0.0.9:5000".parse().unwrap(), true);
        let out = UpstreamHead {
            head: &head,
            path: "/orders/7",
            route,
            caller: None,
            conn: &conn,
            api_key: Some(&key),
            peer_trusted: false,
            client: conn.remote.ip(),
            identity: None,
        };
        let mut buf = Vec::new();
        out.write(&route.upstreams[0], RequestFraming::Length(3), &mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "POST /api/7?a=1 HTTP/1.1\r\nhost: 127.0.0.1:9000\r\nX-Custom: kept\r\nx-forwarded-for: 10.0.0.9\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: client.example\r\nx-real-ip: 10.0.0.9\r\n\
             content-length: 3\r\n\r\n"
        );
        // From a trusted proxy, its X-Forwarded-For is extended.
        let out = UpstreamHead { peer_trusted: true, ..out };
        let mut buf = Vec::new();
        out.write(&route.upstreams[0], RequestFraming::None, &mut buf);
        assert!(String::from_utf8(buf).unwrap().contains("\r\nx-forwarded-for: 6.6.6.6, 10.0.0.9\r\n"));
    }
}
