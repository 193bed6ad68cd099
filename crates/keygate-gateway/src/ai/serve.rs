//! The request path of an `ai` route, after the admit phase: the endpoint, the body read whole
//! (within the route's `max_body_bytes`), the model named in it and the virtual key's scope for
//! it (`llm:<model>`), the budget and the tokens-per-minute limit (both before the provider is
//! called), then the deployments tried in order — the next one on a 429, a 5xx, no connection
//! or no answer in time — and the answer, translated when the client's format is not the
//! provider's, passed on as it streams, its usage counted (an aborted stream for what was
//! delivered).
//!
//! keygate's own errors here take the shape the client's library reads: OpenAI's
//! (`{"error": {"message", "type", "param", "code"}}`) on the OpenAI endpoints, Anthropic's
//! (`{"type": "error", "error": {"type", "message"}}`, with the `code` too) on `/v1/messages`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body, Frame};
use keygate_core::policy::RateLimit;
use keygate_core::token_format::PUBLIC_ID_LEN;
use serde_json::{Value, json};

use super::messages::{self, ChunksToEvents};
use super::prompt::Prompt;
use super::sse::{Events, write_event};
use super::wire::{self, StreamTranslator, Usage};
use super::{Ai, AiRoute, Budget, CallerIds, Deployment, Provider, model_scope};
use crate::answer::{Code, Refuse};
use crate::body::{BodySource, BodyState, BoxError};
use crate::config::ProviderKind;
use crate::ctx::{Caller, Identity, RequestCtx};
use crate::gateway::Gateway;
use crate::proxy::{Answered, HeadSink, UpstreamResponseBody};
use crate::routes::Route;
use crate::shared::SharedLimiter;

/// The largest non-streamed answer read from a provider.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;
/// Output tokens counted before the call for a request that sets no maximum.
pub const DEFAULT_OUTPUT_ESTIMATE: u64 = 256;

/// The endpoints of an `ai` route, under its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Messages,
    Models,
}

impl Op {
    fn of(method: &Method, rest: &str) -> Option<Op> {
        let op = match rest.trim_end_matches('/') {
            "/v1/chat/completions" | "/chat/completions" => Op::Chat,
            "/v1/completions" | "/completions" => Op::Completions,
            "/v1/embeddings" | "/embeddings" => Op::Embeddings,
            "/v1/responses" | "/responses" => Op::Responses,
            "/v1/messages" | "/messages" => Op::Messages,
            "/v1/models" | "/models" => Op::Models,
            _ => return None,
        };
        let method_ok =
            if op == Op::Models { *method == Method::GET || *method == Method::HEAD } else { *method == Method::POST };
        method_ok.then_some(op)
    }

    /// The provider's endpoint, after its base URL (OpenAI's names).
    fn endpoint(self) -> &'static str {
        match self {
            Op::Chat => "chat/completions",
            Op::Completions => "completions",
            Op::Embeddings => "embeddings",
            Op::Responses => "responses",
            Op::Messages => "messages",
            Op::Models => "models",
        }
    }

    fn anthropic_errors(self) -> bool {
        self == Op::Messages
    }
}

/// An error of keygate's on an `ai` route.
struct AiError {
    status: StatusCode,
    code: &'static str,
    /// OpenAI's error type (`invalid_request_error`, `permission_error`, …).
    kind: &'static str,
    message: String,
    retry_after_s: Option<u64>,
}

fn ai_error(status: StatusCode, code: &'static str, kind: &'static str, message: impl Into<String>) -> AiError {
    AiError { status, code, kind, message: message.into(), retry_after_s: None }
}

fn invalid(message: impl Into<String>) -> AiError {
    ai_error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_request_error", message)
}

fn error_answer<S: HeadSink>(op: Op, e: &AiError, sink: &mut S) -> Answered {
    let body = if op.anthropic_errors() {
        let kind = match e.status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            504 => "timeout_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "code": e.code, "message": e.message}})
    } else {
        json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": e.code}})
    };
    sink.status(e.status);
    let _ = sink.field("content-type", b"application/json");
    if let Some(s) = e.retry_after_s {
        let _ = sink.field("retry-after", itoa::Buffer::new().format(s.max(1)).as_bytes());
    }
    let _ = sink.field("x-keygate-error", e.code.as_bytes());
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Answered { status: e.status, body: UpstreamResponseBody::from_memory(Bytes::from(bytes)) }
}

/// What a call's answer settles: its usage counted against the limits and the budget, and in
/// the totals. Settled once (when the answer has been read, or its stream ended or was
/// dropped).
struct Settle {
    ai: Arc<Ai>,
    route: Arc<str>,
    route_key: u32,
    key: [u8; PUBLIC_ID_LEN],
    provider: Arc<Provider>,
    deployment: Deployment,
    now_us: i64,
    /// Tokens taken from the tokens-per-minute limit before the call.
    estimate: u64,
    tpm: Option<RateLimit>,
    /// The tokens-per-minute limit was taken from the nodes' shared bucket (settled there).
    tpm_shared: Option<Arc<SharedLimiter>>,
    /// The budgets the call is held to, and what was set aside for it in each.
    held: Vec<Held>,
    who: CallerIds,
    /// The deployments tried before this one, which answered 429 or 5xx or timed out.
    fallbacks: u64,
    /// A route that logs its calls: what the record starts from.
    log: Option<LogDraft>,
    /// The answer's text, for the log.
    answer: String,
}

/// What a logged call's record starts from (the route logs its prompts and answers).
#[derive(Debug, Clone)]
struct LogDraft {
    /// The model the client named.
    model: String,
    /// The request body (for a prompt endpoint: the chat request made of its template).
    request: String,
    retention_ms: i64,
    status: u16,
}

impl LogDraft {
    /// The record of the call.
    #[allow(clippy::too_many_arguments)]
    fn into_log(
        self,
        who: &CallerIds,
        route: &str,
        deployment: String,
        at: i64,
        answer: String,
        usage: &Usage,
        cost: u64,
    ) -> keygate_core::llm::LlmLog {
        keygate_core::llm::LlmLog {
            id: 0,
            workspace_id: keygate_core::ids::WorkspaceId::from_trusted(who.workspace.to_string()),
            route: route.to_owned(),
            caller: who.caller.to_string(),
            app_id: who.app.to_string(),
            model: self.model,
            deployment,
            at,
            status: self.status,
            request: self.request,
            answer: clip(answer),
            input_tokens: usage.input,
            output_tokens: usage.output,
            micro_usd: cost,
            expires_at: at.saturating_add(self.retention_ms),
        }
    }
}

/// `s` cut at [`keygate_core::llm::MAX_LOGGED_BYTES`], on a character boundary.
fn clip(mut s: String) -> String {
    let max = keygate_core::llm::MAX_LOGGED_BYTES;
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// A budget a call is held to: whose (the key's, its app's, its workspace's), its spending key,
/// its period and what was set aside for the call.
#[derive(Debug, Clone, Copy)]
struct Held {
    key: [u8; PUBLIC_ID_LEN],
    /// Whose spending it is counted in: the route's (its limiter key), or every route's
    /// ([`EVERY_ROUTE`], a token's own budget).
    route: u32,
    budget: Budget,
    period_start: i64,
    reserved: u64,
}

/// The spending "route" of a token's or an app's own budget, which counts its calls on every
/// route (no route's limiter key is 0).
pub const EVERY_ROUTE: u32 = 0;

impl Held {
    fn remaining(&self, ai: &Ai) -> u64 {
        self.budget.micro_usd.saturating_sub(ai.spend.spent(&self.key, self.route, self.period_start))
    }
}

/// Gives back what was set aside in each budget for a call that was not made.
fn release(spend: &super::Spend, held: &[Held]) {
    for h in held {
        spend.refund(&h.key, h.route, h.period_start, h.reserved);
    }
}

/// The spending key of an app's or a workspace's budget: the first bytes of a SHA-256 of its
/// kind and id (apart from every key's own, which is its public id).
fn spend_key(kind: &str, id: &str) -> [u8; PUBLIC_ID_LEN] {
    use sha2::Digest;
    let d = sha2::Sha256::new().chain_update(kind.as_bytes()).chain_update(b":").chain_update(id.as_bytes()).finalize();
    let mut k = [0u8; PUBLIC_ID_LEN];
    k.copy_from_slice(d.get(..PUBLIC_ID_LEN).unwrap_or(&[0u8; PUBLIC_ID_LEN]));
    k
}

/// Who `caller` is, as the usage in the store names it.
fn caller_ids(caller: &Caller) -> CallerIds {
    let token = match (&caller.who, &caller.subject) {
        (Identity::Key(t), _) | (Identity::Jwt(_), Some(t)) => Some(t),
        (Identity::Jwt(_), None) => None,
    };
    match (token, &caller.who) {
        (Some(t), _) => CallerIds {
            workspace: t.workspace_id.clone(),
            caller: Arc::from(t.token_id().as_str()),
            app: t.app_id.clone(),
        },
        (None, Identity::Jwt(j)) => CallerIds {
            workspace: j.workspace_id.clone().unwrap_or_else(|| Arc::from("")),
            caller: Arc::from(format!("jwt:{}", j.sub).as_str()),
            app: j.app_id.clone().unwrap_or_else(|| Arc::from("")),
        },
        (None, Identity::Key(t)) => CallerIds {
            workspace: t.workspace_id.clone(),
            caller: Arc::from(t.token_id().as_str()),
            app: t.app_id.clone(),
        },
    }
}

impl Settle {
    fn done(self, usage: Usage) -> u64 {
        self.done_with(usage, true)
    }

    fn done_with(self, usage: Usage, ok: bool) -> u64 {
        let cost = self.provider.cost_micro_usd(&self.deployment.model, &usage);
        for h in &self.held {
            // What was set aside comes back, and the cost is counted.
            self.ai.spend.add(&h.key, h.route, h.period_start, cost);
            self.ai.spend.refund(&h.key, h.route, h.period_start, h.reserved);
        }
        if let Some(limit) = &self.tpm {
            let delta = i64::try_from(usage.total()).unwrap_or(i64::MAX) - i64::try_from(self.estimate).unwrap_or(0);
            settle_tpm(&self.ai, self.tpm_shared.as_deref(), &self.key, self.route_key, limit, self.now_us, delta);
        }
        let name = self.deployment.name();
        self.ai.record(&self.who, &self.route, &name, self.now_us / 1000, &usage, cost, ok, self.fallbacks);
        if let Some(d) = self.log {
            let log = d.into_log(&self.who, &self.route, name.clone(), self.now_us / 1000, self.answer, &usage, cost);
            self.ai.log(log);
        }
        self.ai.count(&self.route, &name, |t| {
            t.input += usage.input;
            t.output += usage.output;
            t.cached_input += usage.cached_input;
            t.micro_usd += cost;
        });
        cost
    }
}

impl Gateway {
    /// Serves a request of an `ai` route (see the module's documentation).
    pub(crate) async fn forward_ai<B: BodySource, S: HeadSink>(
        &self,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        air: &AiRoute,
        body: &mut Option<B>,
        state: &BodyState,
        sink: &mut S,
    ) -> Result<Answered, Refuse> {
        let rest = ctx.path.get(route.prefix.len()..).unwrap_or_default();
        // A prompt published as an endpoint: `POST {path}/{name}`.
        let prompt = (ctx.head.method == Method::POST)
            .then(|| rest.strip_prefix('/'))
            .flatten()
            .and_then(|name| air.prompts.get(name));
        let Some(op) = prompt.map(|_| Op::Chat).or_else(|| Op::of(&ctx.head.method, rest)) else {
            let e = ai_error(
                StatusCode::NOT_FOUND,
                "unknown_endpoint",
                "invalid_request_error",
                format!(
                    "{} {rest} is not an endpoint of this AI route: POST /v1/chat/completions, /v1/completions, \
                     /v1/embeddings, /v1/responses or /v1/messages, GET /v1/models",
                    ctx.head.method
                ),
            );
            return Ok(error_answer(Op::Chat, &e, sink));
        };
        let Some(ai) = self.ai.clone().filter(|ai| ai.has_providers()) else {
            let e = ai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_providers",
                "api_error",
                "this keygate has no LLM providers: an operator adds one (POST /admin/v1/providers, the dashboard's AI page, or [[providers]] in the configuration)",
            );
            return Ok(error_answer(op, &e, sink));
        };
        let Some(caller) = ctx.caller.as_ref() else {
            // An ai route is never public (routes::build refuses it): a caller is always known.
            let e = ai_error(StatusCode::UNAUTHORIZED, "missing_token", "authentication_error", "a token is needed");
            return Ok(error_answer(op, &e, sink));
        };
        if op == Op::Models {
            return Ok(models(air, caller, sink));
        }
        let mut bytes = read_all(body, route.max_body_bytes, state).await?;
        if let Some(p) = prompt {
            match p.render(&bytes) {
                Ok(req) => bytes = serde_json::to_vec(&req).unwrap_or_default(),
                Err(m) => return Ok(error_answer(op, &invalid(m), sink)),
            }
        }
        match self.call_ai(&ai, ctx, route, air, op, caller, &bytes, prompt, sink).await {
            Ok(a) => Ok(a),
            Err(e) => Ok(error_answer(op, &e, sink)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_ai<S: HeadSink>(
        &self,
        ai: &Arc<Ai>,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        air: &AiRoute,
        op: Op,
        caller: &Caller,
        bytes: &[u8],
        prompt: Option<&Prompt>,
        sink: &mut S,
    ) -> Result<Answered, AiError> {
        let req: Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("the request body is not JSON: {e}")))?;
        if !req.is_object() {
            return Err(invalid("the request body must be a JSON object"));
        }
        let name = req
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("the request names no model: give \"model\""))?
            .to_owned();
        let deployments = air.deployments(&name).ok_or_else(|| {
            ai_error(
                StatusCode::NOT_FOUND,
                "model_not_found",
                "invalid_request_error",
                format!("this route serves no model {name:?}: GET /v1/models lists the ones it serves"),
            )
        })?;
        if let Some(p) = prompt {
            // A prompt's scope stands for its model's: the key is given the task, not the model.
            if !caller.has_scope(&p.scope) {
                return Err(ai_error(
                    StatusCode::FORBIDDEN,
                    "prompt_not_allowed",
                    "permission_error",
                    format!("this key may not call the prompt {:?}: it needs the scope {}", p.name, p.scope.as_str()),
                ));
            }
        } else {
            let scope = model_scope(&name);
            if !caller.has_scope(&scope) {
                return Err(ai_error(
                    StatusCode::FORBIDDEN,
                    "model_not_allowed",
                    "permission_error",
                    format!("this key may not call {name:?}: it needs the scope {} (or llm:*)", scope.as_str()),
                ));
            }
        }
        let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false) && op != Op::Embeddings;
        let log_draft = air.log_retention_ms.map(|retention_ms| LogDraft {
            model: name.clone(),
            request: clip(String::from_utf8_lossy(bytes).into_owned()),
            retention_ms,
            status: 0,
        });
        let now_ms = self.clock.now().as_millis();
        let now_us = now_ms.saturating_mul(1000);
        let key = *caller.limit_key();
        let route_key = route.limiter_key;
        // The budget: refused once spent; what the call may cost is set aside meanwhile, so that
        // calls in flight at once cannot all spend the last of it.
        let estimate_in = wire::estimate_input_tokens(bytes.len());
        let estimate_out =
            if op == Op::Embeddings { 0 } else { wire::max_output_tokens(&req).unwrap_or(DEFAULT_OUTPUT_ESTIMATE) };
        let estimate = Usage { input: estimate_in, output: estimate_out, cached_input: 0 };
        let first =
            deployments.first().and_then(|d| ai.provider(&d.provider, route.workspace_id.as_deref()).map(|p| (d, p)));
        let who = caller_ids(caller);
        // (whose, spending key, spending route, budget)
        let mut budgets: Vec<(&str, [u8; PUBLIC_ID_LEN], u32, Budget)> = Vec::new();
        if let Some(b) = caller.key().and_then(|t| t.llm_budget()) {
            budgets.push(("key", key, EVERY_ROUTE, Budget { micro_usd: b.micro_usd, period: b.period }));
        }
        // The app's own budget, over every ai route (shared by all of its keys).
        if let Some(b) = ctx.table.apps.get(&*who.app).and_then(|a| a.llm_budget) {
            budgets.push((
                "app",
                spend_key("app", &who.app),
                EVERY_ROUTE,
                Budget { micro_usd: b.micro_usd, period: b.period },
            ));
        }
        if let Some(b) = air.budget {
            budgets.push(("key", key, route_key, b));
        }
        if let Some(b) = air.app_budget
            && !who.app.is_empty()
        {
            budgets.push(("app", spend_key("app", &who.app), route_key, b));
        }
        if let Some(b) = air.workspace_budget {
            budgets.push(("workspace", spend_key("workspace", &who.workspace), route_key, b));
        }
        let mut held: Vec<Held> = Vec::with_capacity(budgets.len());
        for (whose, k, route, b) in budgets {
            let (start, end) = b.period.window(now_ms);
            let spent = ai.spend.spent(&k, route, start);
            if spent >= b.micro_usd {
                release(&ai.spend, &held);
                let scope =
                    if route == EVERY_ROUTE { "its own budget for LLM calls" } else { "its budget on this route" };
                let mut e = ai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "budget_exceeded",
                    "insufficient_quota",
                    format!(
                        "this {whose} has spent {scope} (${:.2} a {}); it starts again at the next {}",
                        b.micro_usd as f64 / 1e6,
                        period_name(b.period),
                        period_name(b.period)
                    ),
                );
                e.retry_after_s = Some(u64::try_from(end - now_ms).unwrap_or(0).div_ceil(1000));
                return Err(e);
            }
            let reserved =
                first.as_ref().map_or(0, |(d, p)| p.cost_micro_usd(&d.model, &estimate)).min(b.micro_usd - spent);
            ai.spend.add(&k, route, start, reserved);
            held.push(Held { key: k, route, budget: b, period_start: start, reserved });
        }
        let mut taken = 0;
        // The tokens-per-minute limit: from the nodes' shared bucket when there is one (Redis),
        // else (or while it cannot be reached) this node's, with its share of the limit.
        let mut tpm: Option<RateLimit> = None;
        let mut tpm_shared: Option<Arc<SharedLimiter>> = None;
        if let Some(limit) = &air.tokens_per_minute {
            taken = estimate.total().min(limit.capacity());
            let cost = u32::try_from(taken).unwrap_or(u32::MAX);
            let shared = match &self.shared {
                Some(s) => s.take_llm_tokens(&key, route_key, limit, cost, now_us).await.map(|d| (d, s.clone())),
                None => None,
            };
            let (allowed, retry_after) = match shared {
                Some((d, s)) => {
                    tpm = Some(*limit);
                    tpm_shared = Some(s);
                    let short = i64::try_from(taken.saturating_sub(d.remaining)).unwrap_or(i64::MAX);
                    (d.allowed, short.saturating_mul(limit.emission_interval_us()))
                }
                None => {
                    let local = self.shared.as_ref().map_or(*limit, |s| s.scaled(limit));
                    tpm = Some(local);
                    let d = ai.tpm.check_rate_cost(&key, route_key, &local, now_us, cost);
                    (d.allowed, d.retry_after)
                }
            };
            if !allowed {
                release(&ai.spend, &held);
                let mut e = ai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "llm_tokens_per_minute_exceeded",
                    "tokens",
                    format!(
                        "this key has used its {} LLM tokens a minute on this route; try again in {} s",
                        limit.requests,
                        (retry_after / 1_000_000).max(1)
                    ),
                );
                e.retry_after_s = Some(u64::try_from(retry_after).unwrap_or(0).div_ceil(1_000_000));
                return Err(e);
            }
        }
        let settle_base = |provider: Arc<Provider>, deployment: Deployment, fallbacks: u64| Settle {
            ai: ai.clone(),
            route: route.id.clone(),
            route_key,
            key,
            provider,
            deployment,
            now_us,
            estimate: taken,
            tpm,
            tpm_shared: tpm_shared.clone(),
            held: held.clone(),
            who: who.clone(),
            fallbacks,
            log: None,
            answer: String::new(),
        };
        let mut last: Option<AiError> = None;
        let mut fallbacks = 0u64;
        let n = deployments.len();
        for (i, d) in deployments.iter().enumerate() {
            let name_d = d.name();
            let Some(provider) = ai.provider(&d.provider, route.workspace_id.as_deref()) else {
                last = Some(ai_error(
                    StatusCode::BAD_GATEWAY,
                    "provider_unknown",
                    "api_error",
                    format!("the deployment {name_d:?} names a provider this keygate does not have"),
                ));
                continue;
            };
            let built = build_request(op, &provider, d, &req, stream, ctx)?;
            let Some(client) = super::client() else {
                return Err(ai_error(StatusCode::BAD_GATEWAY, "provider_unavailable", "api_error", "no HTTP client"));
            };
            let send = client.execute(built.request);
            let answer = tokio::time::timeout(air.first_byte_timeout, send).await;
            let failed = match answer {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => {
                    tracing::warn!(route = %route.id, deployment = %name_d, error = %without_url(&e), "LLM provider call failed");
                    Err(ai_error(
                        StatusCode::BAD_GATEWAY,
                        "provider_unavailable",
                        "api_error",
                        format!("the provider of {name_d:?} could not be reached"),
                    ))
                }
                Err(_) => Err(ai_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "provider_timeout",
                    "timeout_error",
                    format!("the provider of {name_d:?} did not answer in time"),
                )),
            };
            let resp = match failed {
                Ok(r) => r,
                Err(e) => {
                    last = Some(e);
                    fallbacks += u64::from(i + 1 < n);
                    continue;
                }
            };
            let status = resp.status();
            let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            if retryable && i + 1 < n {
                fallbacks += 1;
                tracing::info!(route = %route.id, deployment = %name_d, status = status.as_u16(), "LLM deployment refused; trying the next");
                continue;
            }
            let fb = fallbacks;
            ai.count(&route.id, &name_d, |t| {
                t.requests += 1;
                t.fallbacks += fb;
                if !status.is_success() {
                    t.errors += 1;
                }
            });
            let mut settle = settle_base(provider.clone(), d.clone(), fallbacks);
            settle.log = log_draft.clone().map(|l| LogDraft { status: status.as_u16(), ..l });
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                // The provider refused keygate's key: the caller's key is fine, the operator's
                // is not (revoked, rotated at the provider).
                settle.done_with(Usage::default(), false);
                tracing::error!(route = %route.id, deployment = %name_d, status = status.as_u16(), "the LLM provider refused keygate's key for it");
                return Err(ai_error(
                    StatusCode::BAD_GATEWAY,
                    "provider_auth_failed",
                    "api_error",
                    format!(
                        "the provider of {name_d:?} refused keygate's key; an operator must update the provider's key"
                    ),
                ));
            }
            let head = AnswerHead { status, name: &name, deployment: &name_d, fallbacks, prompt };
            if stream && status.is_success() {
                return Ok(stream_answer(resp, built.mode, settle, &head, estimate_in, sink));
            }
            return whole_answer(resp, built.mode, settle, &head, sink).await;
        }
        release(&ai.spend, &held);
        if let Some(limit) = &tpm {
            settle_tpm(ai, tpm_shared.as_deref(), &key, route_key, limit, now_us, -i64::try_from(taken).unwrap_or(0));
        }
        let name_last = deployments.last().map(Deployment::name).unwrap_or_default();
        ai.record(&who, &route.id, &name_last, now_ms, &Usage::default(), 0, false, fallbacks);
        let fb = fallbacks;
        ai.count(&route.id, &name_last, |t| {
            t.requests += 1;
            t.errors += 1;
            t.fallbacks += fb;
        });
        let last = last.unwrap_or_else(|| {
            ai_error(
                StatusCode::BAD_GATEWAY,
                "provider_unavailable",
                "api_error",
                "no deployment of the model answered",
            )
        });
        if let Some(d) = log_draft {
            let d = LogDraft { status: last.status.as_u16(), ..d };
            let answer = format!("{}: {}", last.code, last.message);
            ai.log(d.into_log(&who, &route.id, name_last, now_ms, answer, &Usage::default(), 0));
        }
        Err(last)
    }
}

fn period_name(p: keygate_core::policy::QuotaPeriod) -> &'static str {
    match p {
        keygate_core::policy::QuotaPeriod::Day => "day",
        keygate_core::policy::QuotaPeriod::Month => "month",
        keygate_core::policy::QuotaPeriod::Total => "period",
    }
}

/// A client error's text without its URL (which holds nothing secret here, but a provider's
/// address is the operator's business).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "<provider>");
    }
    s
}

/// `GET /v1/models`: the route's model names that the key may call.
fn models<S: HeadSink>(air: &AiRoute, caller: &Caller, sink: &mut S) -> Answered {
    let data: Vec<Value> = air
        .models
        .keys()
        .filter(|m| caller.has_scope(&model_scope(m)))
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "keygate"}))
        .collect();
    let body = serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default();
    sink.status(StatusCode::OK);
    let _ = sink.field("content-type", b"application/json");
    Answered { status: StatusCode::OK, body: UpstreamResponseBody::from_memory(Bytes::from(body)) }
}

/// Reads the client's body whole, within `limit` (also request validation's, [`crate::phase::validate`]).
pub(crate) async fn read_all<B: BodySource>(
    body: &mut Option<B>,
    limit: u64,
    state: &BodyState,
) -> Result<Vec<u8>, Refuse> {
    let mut out = Vec::new();
    let Some(b) = body.as_mut() else { return Ok(out) };
    if let Some(n) = b.exact_len() {
        out.reserve(usize::try_from(n.min(limit)).unwrap_or(0));
    }
    while let Some(piece) = b.data().await {
        match piece {
            Ok(d) => out.extend_from_slice(&d),
            Err(_) if state.too_large.load(std::sync::atomic::Ordering::Relaxed) => {
                return Err(Refuse::of(Code::BodyTooLarge, "the request body is larger than this route takes"));
            }
            Err(_) => return Err(Refuse::bad_framing("the request body is malformed")),
        }
    }
    Ok(out)
}

/// How a provider's answer goes back to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As it is (the same format).
    Pass,
    /// As it is, but without the usage chunk keygate asked for and the client did not.
    PassWithoutUsage,
    /// Anthropic's answer as a chat completion.
    FromAnthropic { include_usage: bool },
    /// A chat completion as Anthropic's answer (`/v1/messages` to an OpenAI-compatible model).
    ToAnthropic,
}

struct Built {
    request: reqwest::Request,
    mode: Mode,
}

fn build_request(
    op: Op,
    p: &Provider,
    d: &Deployment,
    req: &Value,
    stream: bool,
    ctx: &RequestCtx<'_, '_>,
) -> Result<Built, AiError> {
    let mismatch = |what: &str| {
        invalid(format!("{what} cannot be sent to {:?}, a model of an {:?} provider", d.name(), p.kind).to_lowercase())
    };
    let mut mode = Mode::Pass;
    let (url, body) = match (p.kind, op) {
        (ProviderKind::Anthropic, Op::Chat) => {
            let include_usage = req
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            mode = Mode::FromAnthropic { include_usage };
            let body = wire::chat_to_messages(req, &d.model).map_err(|e| invalid(e.0))?;
            (format!("{}/messages", p.base_url), body)
        }
        (ProviderKind::Anthropic, Op::Messages) => {
            let mut body = req.clone();
            body["model"] = Value::from(&*d.model);
            (format!("{}/messages", p.base_url), body)
        }
        (ProviderKind::Anthropic, _) => return Err(mismatch(&format!("/v1/{}", op.endpoint()))),
        (kind, _) => {
            let mut body = if op == Op::Messages {
                // Anthropic's Messages API to an OpenAI-compatible model: as a chat completion,
                // and its answer back (the usage chunk is asked for by the translation).
                mode = Mode::ToAnthropic;
                messages::messages_to_chat(req, &d.model).map_err(|e| invalid(e.0))?
            } else {
                req.clone()
            };
            body["model"] = Value::from(&*d.model);
            if stream && matches!(op, Op::Chat | Op::Completions) {
                let asked = req
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                if !asked {
                    body["stream_options"] = json!({"include_usage": true});
                    mode = Mode::PassWithoutUsage;
                }
            }
            let endpoint = if op == Op::Messages { "chat/completions" } else { op.endpoint() };
            let url = if kind == ProviderKind::Azure {
                if op == Op::Responses {
                    return Err(mismatch("/v1/responses"));
                }
                if !d.model.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
                    return Err(invalid(format!("{:?} is not an Azure deployment name", &*d.model)));
                }
                format!(
                    "{}/deployments/{}/{}?api-version={}",
                    p.base_url,
                    d.model,
                    endpoint,
                    p.api_version.as_deref().unwrap_or_default()
                )
            } else {
                format!("{}/{}", p.base_url, endpoint)
            };
            (url, body)
        }
    };
    let url: reqwest::Url = url.parse().map_err(|_| invalid("the provider's URL for this model is not valid"))?;
    let mut r = reqwest::Request::new(reqwest::Method::POST, url);
    let h = r.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    if stream {
        h.insert(http::header::ACCEPT, http::HeaderValue::from_static("text/event-stream"));
    }
    let secret = |v: String| -> Result<http::HeaderValue, AiError> {
        let mut v = http::HeaderValue::from_str(&v).map_err(|_| invalid("the provider's key is not a header value"))?;
        v.set_sensitive(true);
        Ok(v)
    };
    match p.kind {
        ProviderKind::Openai => {
            if let Some(k) = &p.key {
                h.insert(http::header::AUTHORIZATION, secret(format!("Bearer {}", k.expose()))?);
            }
        }
        ProviderKind::Azure => {
            if let Some(k) = &p.key {
                h.insert("api-key", secret(k.expose().to_owned())?);
            }
        }
        ProviderKind::Anthropic => {
            if let Some(k) = &p.key {
                h.insert("x-api-key", secret(k.expose().to_owned())?);
            }
            let version = p.api_version.as_deref().unwrap_or("2023-06-01");
            if let Ok(v) = http::HeaderValue::from_str(version) {
                h.insert("anthropic-version", v);
            }
            if op == Op::Messages
                && let Some(beta) = ctx.head.all("anthropic-beta").next()
                && let Ok(v) = http::HeaderValue::from_bytes(beta)
            {
                h.insert("anthropic-beta", v);
            }
        }
    }
    let bytes = serde_json::to_vec(&body).map_err(|_| invalid("the request could not be written"))?;
    *r.body_mut() = Some(reqwest::Body::from(bytes));
    Ok(Built { request: r, mode })
}

/// Settles the LLM tokens a call took before its answer: `delta` more or fewer, in the bucket
/// they were taken from (the nodes' shared one, or this node's).
fn settle_tpm(
    ai: &Ai,
    shared: Option<&SharedLimiter>,
    key: &[u8; PUBLIC_ID_LEN],
    route_key: u32,
    limit: &RateLimit,
    now_us: i64,
    delta: i64,
) {
    match shared {
        Some(s) => s.settle_llm_tokens(key, route_key, limit, delta, now_us),
        None => ai.tpm.settle_cost(key, route_key, limit, now_us, delta),
    }
}

/// The head of an answer of keygate's AI gateway.
struct AnswerHead<'a> {
    status: StatusCode,
    /// The model the client asked for.
    name: &'a str,
    deployment: &'a str,
    fallbacks: u64,
    /// A prompt endpoint's call: the answer is the prompt's result, not the completion.
    prompt: Option<&'a Prompt>,
}

fn write_head<S: HeadSink>(h: &AnswerHead<'_>, content_type: &[u8], sink: &mut S) {
    sink.status(h.status);
    let _ = sink.field("content-type", content_type);
    if crate::head::is_field_value(h.deployment.as_bytes()) {
        let _ = sink.field("x-keygate-deployment", h.deployment.as_bytes());
    }
    if h.fallbacks > 0 {
        let _ = sink.field("x-keygate-fallbacks", itoa::Buffer::new().format(h.fallbacks).as_bytes());
    }
}

/// `x-keygate-budget-remaining-usd`: what is left of the tightest budget the call is held to.
fn remaining_budget<S: HeadSink>(settle_ai: &Ai, held: &[Held], sink: &mut S) {
    if let Some(left) = held.iter().map(|h| h.remaining(settle_ai)).min() {
        let _ = sink.field("x-keygate-budget-remaining-usd", format!("{:.6}", left as f64 / 1e6).as_bytes());
    }
}

/// Reads a non-streamed answer whole, counts its usage, translates it if need be.
async fn whole_answer<S: HeadSink>(
    mut resp: reqwest::Response,
    mode: Mode,
    mut settle: Settle,
    head: &AnswerHead<'_>,
    sink: &mut S,
) -> Result<Answered, AiError> {
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_else(|| b"application/json".to_vec());
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > MAX_ANSWER_BYTES {
                    settle.done(Usage::default());
                    return Err(ai_error(
                        StatusCode::BAD_GATEWAY,
                        "provider_answer_too_large",
                        "api_error",
                        "the provider's answer is larger than keygate reads (64 MiB)",
                    ));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => break,
            Err(_) => {
                settle.done(Usage::default());
                return Err(ai_error(
                    StatusCode::BAD_GATEWAY,
                    "provider_unavailable",
                    "api_error",
                    "the provider's answer broke off",
                ));
            }
        }
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let usage = parsed.as_ref().and_then(|v| v.get("usage")).and_then(wire::usage_of).unwrap_or_default();
    let mut content_type = content_type;
    if head.status.is_success()
        && let Mode::FromAnthropic { .. } = mode
        && let Some(v) = &parsed
    {
        let created = settle.now_us / 1_000_000;
        body = serde_json::to_vec(&wire::message_to_chat(v, head.name, created)).unwrap_or_default();
        content_type = b"application/json".to_vec();
    }
    if mode == Mode::ToAnthropic
        && let Some(v) = &parsed
    {
        let translated = if head.status.is_success() {
            Some(messages::chat_to_message(v, head.name))
        } else {
            messages::error_to_anthropic(v)
        };
        if let Some(t) = translated {
            body = serde_json::to_vec(&t).unwrap_or_default();
            content_type = b"application/json".to_vec();
        }
    }
    if let Some(p) = head.prompt
        && head.status.is_success()
    {
        let completion: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match p.answer(&completion) {
            Ok(result) => {
                body = serde_json::to_vec(&result).unwrap_or_default();
                content_type = b"application/json".to_vec();
            }
            Err(m) => {
                // The call was made and is paid for: counted, then the caller is told.
                if settle.log.is_some() {
                    settle.answer = String::from_utf8_lossy(&body).into_owned();
                }
                settle.done_with(usage, false);
                return Err(ai_error(StatusCode::BAD_GATEWAY, "prompt_answer_invalid", "api_error", m));
            }
        }
    }
    if settle.log.is_some() {
        settle.answer = String::from_utf8_lossy(&body).into_owned();
    }
    write_head(head, &content_type, sink);
    let cost_known = settle.provider.prices.contains_key(&*settle.deployment.model);
    // Settled first, so that the remaining budget shown counts this call.
    let (ai, held) = (settle.ai.clone(), settle.held.clone());
    let cost = settle.done_with(usage, head.status.is_success());
    remaining_budget(&ai, &held, sink);
    if cost_known {
        let _ = sink.field("x-keygate-cost-usd", format!("{:.6}", cost as f64 / 1e6).as_bytes());
    }
    Ok(Answered { status: head.status, body: UpstreamResponseBody::from_memory(Bytes::from(body)) })
}

type ChunkFuture = Pin<Box<dyn Future<Output = (reqwest::Response, reqwest::Result<Option<Bytes>>)> + Send>>;

fn next_chunk(mut r: reqwest::Response) -> ChunkFuture {
    Box::pin(async move {
        let c = r.chunk().await;
        (r, c)
    })
}

fn stream_answer<S: HeadSink>(
    resp: reqwest::Response,
    mode: Mode,
    settle: Settle,
    head: &AnswerHead<'_>,
    estimate_in: u64,
    sink: &mut S,
) -> Answered {
    write_head(head, b"text/event-stream", sink);
    let _ = sink.field("cache-control", b"no-cache");
    remaining_budget(&settle.ai, &settle.held, sink);
    let translator = match mode {
        Mode::FromAnthropic { include_usage } => {
            Some(StreamTranslator::new(head.name, settle.now_us / 1_000_000, include_usage))
        }
        _ => None,
    };
    let body = AiStream {
        next: Some(next_chunk(resp)),
        mode,
        events: Events::default(),
        translator,
        to_messages: (mode == Mode::ToAnthropic).then(|| ChunksToEvents::new(head.name)),
        usage: Usage::default(),
        deltas: 0,
        estimate_in,
        text: settle.log.as_ref().map(|_| String::new()),
        settle: Some(settle),
    };
    Answered { status: head.status, body: UpstreamResponseBody::from_body(Box::pin(body)) }
}

/// A provider's stream on its way to the client: passed on as each piece arrives (re-written
/// event by event when keygate translates it or removes the usage chunk it asked for), its
/// usage read from the events; settled when it ends, or when it is dropped (the client went
/// away: what was delivered is counted).
struct AiStream {
    next: Option<ChunkFuture>,
    mode: Mode,
    events: Events,
    translator: Option<StreamTranslator>,
    /// A chat stream turned into Anthropic's events (`/v1/messages` to an OpenAI-compatible model).
    to_messages: Option<ChunksToEvents>,
    usage: Usage,
    /// Events with content seen: the output estimate of a stream that ends before its usage.
    deltas: u64,
    estimate_in: u64,
    settle: Option<Settle>,
    /// The answer's text so far, when the route logs its calls (at most what a log keeps).
    text: Option<String>,
}

/// The text an event of a stream adds to the answer: a chat chunk's delta, a completion's text,
/// an Anthropic content block's delta, a Responses API text delta.
fn delta_text(v: &Value) -> Option<&str> {
    let choice = v.get("choices").and_then(|c| c.get(0));
    choice
        .and_then(|c| c.get("delta").and_then(|d| d.get("content")).or_else(|| c.get("text")))
        .or_else(|| v.get("delta").and_then(|d| d.get("text").or(Some(d)).filter(|x| x.is_string())))
        .and_then(Value::as_str)
}

impl AiStream {
    /// The bytes to send for a piece of the provider's stream.
    fn piece(&mut self, bytes: &Bytes) -> Bytes {
        let mut out = Vec::new();
        let (mode, usage, deltas, translator) = (self.mode, &mut self.usage, &mut self.deltas, &mut self.translator);
        let text = &mut self.text;
        let to_messages = &mut self.to_messages;
        self.events.feed(bytes, |ev| {
            let data = ev.data.trim();
            if let Some(t) = text.as_mut()
                && t.len() < keygate_core::llm::MAX_LOGGED_BYTES
                && let Ok(v) = serde_json::from_str::<Value>(data)
                && let Some(piece) = delta_text(&v)
            {
                t.push_str(piece);
            }
            if let Some(t) = to_messages.as_mut() {
                let events = if data == "[DONE]" {
                    t.finish()
                } else {
                    let Ok(v) = serde_json::from_str::<Value>(data) else { return };
                    if v.pointer("/choices/0/delta/content").is_some_and(|c| c.as_str().is_some_and(|c| !c.is_empty()))
                    {
                        *deltas += 1;
                    }
                    t.chunk(&v)
                };
                usage.merge_max(t.usage);
                for (name, event) in events {
                    write_event(&mut out, Some(name), &event.to_string());
                }
                return;
            }
            if data == "[DONE]" {
                if mode != Mode::Pass {
                    write_event(&mut out, None, "[DONE]");
                }
                return;
            }
            if let Some(t) = translator.as_mut() {
                let Ok(v) = serde_json::from_str::<Value>(data) else { return };
                if matches!(v.get("type").and_then(Value::as_str), Some("content_block_delta")) {
                    *deltas += 1;
                }
                for chunk in t.event(&v) {
                    write_event(&mut out, None, &chunk.to_string());
                }
                usage.merge_max(t.usage);
                if t.done {
                    write_event(&mut out, None, "[DONE]");
                }
                return;
            }
            if data.contains("\"delta\"") {
                *deltas += 1;
            }
            let mut drop_event = false;
            let mut rewritten = None;
            if data.contains("\"usage\"")
                && let Ok(mut v) = serde_json::from_str::<Value>(data)
            {
                let found = v
                    .get("usage")
                    .or_else(|| v.get("message").and_then(|m| m.get("usage")))
                    .or_else(|| v.get("response").and_then(|r| r.get("usage")))
                    .and_then(wire::usage_of);
                if let Some(u) = found {
                    // Anthropic's message_delta gives the output so far; the input came first.
                    usage.merge_max(u);
                }
                // The usage keygate asked for and the client did not: its own chunk goes, or
                // (as some servers send it) the field of a chunk that also has a choice.
                if mode == Mode::PassWithoutUsage && v.get("usage").is_some_and(|u| !u.is_null()) {
                    if v.get("choices").and_then(Value::as_array).is_none_or(Vec::is_empty) {
                        drop_event = true;
                    } else if let Some(o) = v.as_object_mut() {
                        o.remove("usage");
                        rewritten = Some(v.to_string());
                    }
                }
            }
            if mode == Mode::PassWithoutUsage && !drop_event {
                write_event(&mut out, ev.name.as_deref(), rewritten.as_deref().unwrap_or(&ev.data));
            }
        });
        if self.mode == Mode::Pass { bytes.clone() } else { Bytes::from(out) }
    }

    fn finish(&mut self) {
        let Some(mut s) = self.settle.take() else { return };
        if let Some(t) = self.text.take() {
            s.answer = t;
        }
        let mut u = self.usage;
        if u.input == 0 {
            u.input = self.estimate_in;
        }
        if u.output == 0 {
            u.output = self.deltas;
        }
        s.done(u);
    }
}

impl Body for AiStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(fut) = this.next.as_mut() else { return Poll::Ready(None) };
            let (resp, r) = ready!(fut.as_mut().poll(cx));
            match r {
                Ok(Some(bytes)) => {
                    this.next = Some(next_chunk(resp));
                    let out = this.piece(&bytes);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Ok(None) => {
                    this.next = None;
                    this.finish();
                    return Poll::Ready(None);
                }
                Err(e) => {
                    this.next = None;
                    this.finish();
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.next.is_none()
    }
}

impl Drop for AiStream {
    fn drop(&mut self) {
        self.finish();
    }
}
