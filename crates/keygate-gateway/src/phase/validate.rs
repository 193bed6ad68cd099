//! Validate: on a route that validates requests (issue 17, [`crate::validate`]), the step between
//! admit and forward — after the credential, scopes and limits (a caller who is not let in learns
//! nothing of the API's document), before anything is sent upstream. The operation is looked up
//! from the method and the path the upstream would receive, its parameters are checked from the
//! head, and a JSON body the operation describes is read whole (within the route's
//! `max_body_bytes`), checked, and then forwarded from memory. A refusal is an RFC 9457 problem
//! document ([`Refuse::problem`]), counted in the refusal metrics by its code.

use bytes::Bytes;
use smallvec::SmallVec;

use crate::answer::{Code, Problem, Refuse};
use crate::body::{BodySource, BodyState, BoxError};
use crate::ctx::RequestCtx;
use crate::gateway::Gateway;
use crate::routes::Route;
use crate::validate::{BodyCheck, Lookup, Rejection, RouteValidation, Violation};

/// A body read whole to be checked, sent upstream from memory.
pub(crate) struct MemoryBody {
    data: Option<Bytes>,
    len: u64,
}

impl MemoryBody {
    pub(crate) fn new(data: Bytes) -> Self {
        let len = data.len() as u64;
        Self { data: (len > 0).then_some(data), len }
    }
}

impl BodySource for MemoryBody {
    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn exact_len(&self) -> Option<u64> {
        Some(if self.data.is_some() { self.len } else { 0 })
    }

    async fn data(&mut self) -> Option<Result<Bytes, BoxError>> {
        self.data.take().map(Ok)
    }
}

/// The refusal of an invalid request: 400, its first error in the message, all in `errors`.
fn invalid(errors: Vec<Violation>) -> Refuse {
    let mut message = errors.first().map(Violation::describe).unwrap_or_else(|| "the request is not valid".into());
    if errors.len() > 1 {
        message.push_str(&format!(" (and {} more: see errors)", errors.len() - 1));
    }
    Refuse::problem(Code::RequestInvalid, message, Problem { errors, allow: None })
}

fn rejected(r: Rejection) -> Refuse {
    match r {
        Rejection::Invalid(errors) => invalid(errors),
        Rejection::MediaType(m) => Refuse::problem(Code::UnsupportedMediaType, m, Problem::default()),
    }
}

impl Gateway {
    /// Checks the request against the route's API document. `Ok(Some(body))`: the body was read
    /// to be checked, and is what goes upstream; `Ok(None)`: the body is untouched.
    pub(crate) async fn validate_request<B: BodySource>(
        &self,
        ctx: &RequestCtx<'_, '_>,
        route: &Route,
        validation: &RouteValidation,
        body: &mut Option<B>,
        state: &BodyState,
    ) -> Result<Option<Bytes>, Refuse> {
        let counted = |r: Refuse| {
            ctx.table.metrics.refusal(r.code);
            r
        };
        let validator = match validation {
            RouteValidation::Ready(v) => v,
            RouteValidation::Unavailable(_) => {
                return Err(counted(Refuse::problem(
                    Code::ValidationUnavailable,
                    "this route checks requests against its API's OpenAPI document, which it cannot use now (the gateway's log says why)",
                    Problem::default(),
                )));
            }
        };
        let path = if route.strip_prefix { ctx.path.get(route.prefix.len()..).unwrap_or("") } else { &ctx.path };
        let path = if path.is_empty() { "/" } else { path };
        let head = ctx.head;
        let m = match validator.find(&head.method, path) {
            Lookup::Found(m) => m,
            Lookup::NoPath => {
                return Err(counted(Refuse::problem(
                    Code::OperationNotFound,
                    "no path of this API's OpenAPI document matches the request's path",
                    Problem::default(),
                )));
            }
            Lookup::NoMethod(allow) => {
                let message = format!("this path of the API takes {allow}, not {}", head.method);
                return Err(counted(Refuse::problem(
                    Code::MethodNotAllowed,
                    message,
                    Problem { errors: Vec::new(), allow: Some(allow) },
                )));
            }
        };
        let header = |name: &str| -> SmallVec<[&[u8]; 2]> {
            head.fields.iter().filter(|f| f.name.eq_ignore_ascii_case(name)).map(|f| f.value).collect()
        };
        validator.check_params(&m, head.query, &header).map_err(|r| counted(rejected(r)))?;
        let has_body = body.as_ref().is_some_and(|b| !b.is_end_stream());
        let content_type = head.fields.iter().find(|f| f.name.eq_ignore_ascii_case("content-type")).map(|f| f.value);
        match validator.body_check(&m, content_type, has_body).map_err(|r| counted(rejected(r)))? {
            BodyCheck::None => Ok(None),
            BodyCheck::Json { schema, required } => {
                let bytes = crate::ai::serve::read_all(body, route.max_body_bytes, state).await?;
                validator.check_body(schema, required, &bytes).map_err(|r| counted(rejected(r)))?;
                Ok(Some(Bytes::from(bytes)))
            }
        }
    }
}
