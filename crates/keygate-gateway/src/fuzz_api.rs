//! Entry points for the coverage-guided fuzz targets in `fuzz/` (`docs/fuzzing.md`). Not an API:
//! hidden from the docs, and each function here only wraps the crate-private code the server
//! runs, so that a target exercises exactly that code and nothing written for it.

use std::io;
use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, Method, Version};

use crate::h1::{BodyFraming, MAX_FIELDS, parse_head};
use crate::head::{Field, Known};
use crate::phase::admit::check_framing;
use crate::proxy::{Chunked, Step, step_chunked};

/// What keygate's HTTP/1.1 server makes of the bytes at the start of its read buffer, up to the
/// point where the request path (routes, credentials) takes over.
#[derive(Debug)]
pub enum HeadOutcome {
    /// Not a whole head yet: the server reads more.
    Partial,
    /// Refused: the server answers `status` with the error `code` (and closes the connection if
    /// `closes`).
    Refused { status: u16, code: &'static str, closes: bool },
    /// A head whose framing the request path lets through.
    Accepted(AcceptedHead),
}

/// A request head that parsed and passed the framing checks.
#[derive(Debug)]
pub struct AcceptedHead {
    /// The head's length in bytes; what follows is body or the next request.
    pub len: usize,
    pub method: Method,
    pub version: Version,
    /// The path as sent (not normalized), without the query.
    pub path: String,
    pub query: Option<String>,
    /// The authority of an absolute-form target.
    pub authority: Option<String>,
    /// The header fields, as received.
    pub fields: Vec<(String, Vec<u8>)>,
    /// What the one pass over the fields found.
    pub known: Known,
    /// The host the request is for (target authority, else `Host`), without a port.
    pub host: Option<String>,
    pub keep_alive: bool,
    pub body: RequestBody,
}

/// How an accepted request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

/// Reads a request head as `h1::serve` does: `h1::parse_head`, then `phase::admit::check_framing`,
/// then the body framing. `api_key` is the configured API-key header, if any.
pub fn request_head(buf: &[u8], api_key: Option<&HeaderName>) -> HeadOutcome {
    let mut slots = [const { MaybeUninit::<Field<'_>>::uninit() }; MAX_FIELDS];
    let (len, head) = match parse_head(buf, &mut slots, api_key) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => return HeadOutcome::Partial,
        // `h1::refuse_bare`: a head that does not parse always ends the connection.
        Err(r) => return HeadOutcome::Refused { status: r.status.as_u16(), code: r.code, closes: true },
    };
    if let Err(r) = check_framing(&head) {
        return HeadOutcome::Refused { status: r.status.as_u16(), code: r.code, closes: r.closes() };
    }
    let body = match BodyFraming::of(&head) {
        BodyFraming::Done => RequestBody::None,
        BodyFraming::Length(n) => RequestBody::Length(n),
        BodyFraming::Chunked(_) => RequestBody::Chunked,
    };
    HeadOutcome::Accepted(AcceptedHead {
        len,
        method: head.method.clone(),
        version: head.version,
        path: head.path.to_owned(),
        query: head.query.map(str::to_owned),
        authority: head.authority.map(str::to_owned),
        fields: head.fields.iter().map(|f| (f.name.to_owned(), f.value.to_vec())).collect(),
        known: head.known,
        host: head.host().map(str::to_owned),
        keep_alive: head.keep_alive(),
        body,
    })
}

/// The chunked decoder of request and answer bodies (`proxy::step_chunked`), from its start.
#[derive(Debug)]
pub struct ChunkedDecoder(Chunked);

/// What one step of the decoder gave.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkedStep {
    /// Body bytes (taken from the front of the buffer).
    Data(Bytes),
    /// The buffered bytes end before the next decision: read more, then step again.
    NeedMore,
    /// The trailer fields passed on (names lowercase, values as sent), the last chunk and the
    /// trailer section consumed; `End` comes next.
    Trailers(Vec<(String, Vec<u8>)>),
    /// The body ended (last chunk and trailers consumed); the buffer holds what follows it.
    End,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self(Chunked::Size)
    }
}

impl ChunkedDecoder {
    /// One step over the bytes buffered so far, consuming from the front of `buf`.
    pub fn step(&mut self, buf: &mut BytesMut) -> io::Result<ChunkedStep> {
        step_chunked(&mut self.0, buf).map(|s| match s {
            Step::Data(d) => ChunkedStep::Data(d),
            Step::Trailers(t) => {
                ChunkedStep::Trailers(t.iter().map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec())).collect())
            }
            Step::NeedMore => ChunkedStep::NeedMore,
            Step::End => ChunkedStep::End,
        })
    }
}
