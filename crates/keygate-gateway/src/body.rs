//! Body types of the data plane. Bodies stream in both directions; nothing is buffered whole.
//! The request body is counted and cut at the route's size limit; the response body is counted
//! and, when it ends or is dropped, finishes the request's metering and hands its upstream
//! connection back to the pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The error of a body cut at its size limit.
#[derive(Debug)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body is larger than the route allows")
    }
}

impl std::error::Error for BodyTooLarge {}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What happened to a request body while it streamed upstream; shared with the front end.
#[derive(Debug, Default)]
pub struct BodyState {
    /// Bytes read from the client.
    pub seen: AtomicU64,
    /// The body went over the route's limit.
    pub too_large: AtomicBool,
    /// The client's body did not parse (a bad chunk size, …).
    pub broken: AtomicBool,
    /// The body was read to its end (HTTP/1.1: the connection can take the next request).
    pub finished: AtomicBool,
}

/// A request body on its way upstream, whichever protocol it came in: data until the end, with
/// its length when the client announced one.
pub trait BodySource {
    /// Nothing (more) to send.
    fn is_end_stream(&self) -> bool;
    /// The whole length, when it is known before the body is read.
    fn exact_len(&self) -> Option<u64>;
    /// The next piece of data; `None` at the end.
    fn data(&mut self) -> impl Future<Output = Option<Result<Bytes, BoxError>>> + Send;
    /// The body as an owned stream that can outlive the request's task (an HTTP/2 upstream
    /// stream reads it on its own, both directions then flowing at once), if this kind of body
    /// can be one; what is left here is then empty.
    fn take_owned(&mut self) -> Option<UpstreamBody> {
        None
    }
}

/// What the gateway sends upstream of an HTTP/2 request (served by hyper).
pub enum UpstreamBody {
    Empty,
    Stream { inner: Incoming, limit: u64, state: Arc<BodyState> },
}

impl UpstreamBody {
    /// The client's body, cut at `limit` bytes; `state` hears how it went.
    pub fn new(inner: Incoming, limit: u64, state: Arc<BodyState>) -> Self {
        if inner.is_end_stream() { Self::Empty } else { Self::Stream { inner, limit, state } }
    }
}

impl BodySource for UpstreamBody {
    fn is_end_stream(&self) -> bool {
        Body::is_end_stream(self)
    }

    fn exact_len(&self) -> Option<u64> {
        self.size_hint().exact()
    }

    fn take_owned(&mut self) -> Option<UpstreamBody> {
        Some(std::mem::replace(self, Self::Empty))
    }

    async fn data(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            match http_body_util::BodyExt::frame(self).await? {
                Ok(frame) => {
                    // Trailers are not forwarded.
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Stream { inner, limit, state } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let total = state.seen.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                        if total > *limit {
                            state.too_large.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    // The client sent a body that does not parse (a bad chunk size, …).
                    state.broken.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Stream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Stream { inner, .. } => inner.size_hint(),
        }
    }
}
