//! Time limits renewed on every request of a connection (keep-alive idle time, the upstream's
//! answer time) without a trip through the runtime's timer wheel per request. A [`Deadline`]
//! keeps one registered timer per connection and moves it lazily: a new deadline later than the
//! registered one leaves the timer alone, and when the timer fires before the deadline it is set
//! again. Deadlines therefore never fire early, and a connection that sees thousands of requests
//! a second re-arms its timer about once per time-out period instead of once per request.
//!
//! Also here: the stop signal of a gateway worker, which its connections wait on without a
//! lock per request; and [`SendDeadline`], which ends a connection whose client stops reading.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// A deadline for one connection's successive waits.
pub(crate) struct Deadline {
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    pub(crate) fn new() -> Self {
        // Not registered until first polled; the first `run` sets the real deadline.
        Self { sleep: Box::pin(tokio::time::sleep_until(Instant::now() + Duration::from_secs(365 * 86_400))) }
    }

    /// Runs `fut` until `deadline`; `None` if the deadline passed first.
    pub(crate) async fn run<F: Future>(&mut self, deadline: Instant, fut: F) -> Option<F::Output> {
        if self.sleep.deadline() > deadline {
            self.sleep.as_mut().reset(deadline);
        }
        let mut fut = pin!(fut);
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return Some(r),
                () = &mut self.sleep => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    self.sleep.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// A worker's stop signal: a flag read on every request, and a notification idle connections
/// wait on (each registers once, when it starts).
#[derive(Default)]
pub(crate) struct Shutdown {
    flag: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sets the flag, then wakes every waiter.
    pub(crate) fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// A future that completes when [`Shutdown::trigger`] is called; already registered when
    /// returned, so a trigger between its creation and its first poll is not missed.
    pub(crate) fn waiter(&self) -> Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut w = Box::pin(self.notify.notified());
        w.as_mut().enable();
        w
    }
}

/// A writer to a client that fails when a write makes no progress for `limit`: a client that
/// stops reading (its receive window full) must not hold the connection, its task and the
/// upstream connection behind it forever. The timer is armed only when the socket cannot take
/// more (a write returned `Pending`), so a client that keeps up costs nothing; it is one timer
/// per connection, allocated at the first stall and moved after.
pub(crate) struct SendDeadline<W> {
    inner: W,
    limit: Duration,
    /// Armed while a write waits; `None` until the first wait.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl<W> SendDeadline<W> {
    pub(crate) fn new(inner: W, limit: Duration) -> Self {
        Self { inner, limit, timer: None, waiting: false }
    }

    /// Called when the inner writer returned `Pending`: fails once the wait has lasted `limit`.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let deadline = Instant::now() + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            self.waiting = true;
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing of the answer for the send time-out",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SendDeadline<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.stalled(cx).map(Err),
            ready => {
                this.waiting = false;
                ready
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.stalled(cx).map(Err),
            ready => {
                this.waiting = false;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.stalled(cx).map(Err),
            ready => {
                this.waiting = false;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.stalled(cx).map(Err),
            ready => {
                this.waiting = false;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_never_fire_early_and_move_lazily() {
        let mut d = Deadline::new();
        let t0 = Instant::now();
        // Done in time.
        assert_eq!(d.run(t0 + Duration::from_secs(10), async { 1 }).await, Some(1));
        // A later deadline: the timer registered for t0+10 fires first and is moved, so the wait
        // ends at t0+12, not before.
        let later = t0 + Duration::from_secs(12);
        assert_eq!(d.run(later, std::future::pending::<()>()).await, None);
        assert!(Instant::now() >= later);
        // An earlier deadline than the registered one moves the timer back.
        let now = Instant::now();
        assert_eq!(d.run(now + Duration::from_secs(1), std::future::pending::<()>()).await, None);
        assert_eq!(Instant::now(), now + Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_at_the_send_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let mut w = SendDeadline::new(server, Duration::from_secs(5));
        // Progress: the reader takes what is written, so writes go on whatever the time.
        let mut client = client;
        w.write_all(&[1; 64]).await.unwrap();
        let mut got = [0u8; 64];
        client.read_exact(&mut got).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        w.write_all(&[2; 64]).await.unwrap();
        // No progress: the buffer is full and nobody reads.
        let t0 = Instant::now();
        let e = w.write_all(&[3; 64]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(Instant::now() - t0, Duration::from_secs(5), "neither early nor late");
    }

    #[tokio::test]
    async fn a_trigger_wakes_waiters_registered_before_it() {
        let s = Shutdown::default();
        let w = s.waiter();
        assert!(!s.is_set());
        s.trigger();
        w.await;
        assert!(s.is_set());
    }
}
