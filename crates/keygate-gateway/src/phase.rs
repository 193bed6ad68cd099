//! The request path's phases, in the order every request goes through them, whichever front end
//! ([`crate::h1`] for HTTP/1.1, [`crate::h2`] for HTTP/2) it came in on (cf. pingora's request
//! phases): [`admit`] decides from the head whether the request goes on, [`validate`] checks it
//! against its API's OpenAPI document on a route that asks for it, [`forward`] sends it
//! upstream (through [`cache`] on a route with a response cache), [`record`] counts it. Each
//! takes the per-request context ([`crate::ctx::RequestCtx`]) the front end made. A phase that stops a request returns a
//! [`crate::answer::Refuse`]; the front end writes it with [`crate::answer`], the one place
//! refusals and upstream errors become answers.

pub mod admit;
pub mod cache;
pub mod forward;
pub mod record;
pub mod validate;
