//! Time limits renewed on every request of a connection (keep-alive idle time, the upstream's
//! answer time) without a trip through the runtime's timer wheel per request. A [`Deadline`]
//! keeps one registered timer per connection and moves it lazily: a new deadline later than the
//! registered one leaves the timer alone, and when the timer fires before the deadline it is set
//! again. Deadlines therefore never fire early, and a connection that sees thousands of requests
//! a second re-arms its timer about once per time-out period instead of once per request.
//!
//! Also here: the stop signal of a gateway worker, which its connections wait on without a
//! lock per request.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
