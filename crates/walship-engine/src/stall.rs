//! The stall watchdog: a store that stops answering shows within seconds — a WARN, and in
//! the replicator's [`Status`] (`stalled_since_ms`, `stalled_call`, `last_error`), which
//! health, metrics and alerts read — long before the call's timeouts end it.
//!
//! It looks at the replica's [`CallTracker`] a few times per `after`. A call that has gone
//! `after` without progress starts a stall. The stall lasts until the store answers a call
//! (retries of a call that keeps timing out, and the rounds between them, stay one stall),
//! or until no call has waited on the store for [`IDLE_END`] (nothing is stuck any more).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use walship_storage::{CallTracker, RunningCall};

use crate::AbortOnDrop;
use crate::replicate::Status;

/// A stall ends when no call has run for this long.
const IDLE_END: Duration = Duration::from_secs(60);

/// A stall in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stall {
    /// When the watchdog saw it.
    seen: Instant,
    /// When the stalled call last made progress (ms since the epoch).
    since_ms: i64,
    /// The call, for messages.
    call: String,
}

/// What one look at the calls decides.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    /// This call has gone `after` without progress.
    Began(RunningCall),
    /// The store answered since the stall was seen, or nothing has waited on it for
    /// [`IDLE_END`].
    Ended,
}

/// The decision, as a plain function of what the tracker shows.
fn decide(
    stall: Option<&Stall>,
    idlest: Option<&RunningCall>,
    last_answer: Option<Instant>,
    last_busy: Instant,
    now: Instant,
    after: Duration,
) -> Change {
    match stall {
        None => match idlest {
            Some(c) if c.idle >= after => Change::Began(c.clone()),
            _ => Change::None,
        },
        Some(s) => {
            let answered = last_answer.is_some_and(|t| t > s.seen);
            let quiet = idlest.is_none() && now.duration_since(last_busy) >= IDLE_END;
            if answered || quiet {
                Change::Ended
            } else {
                Change::None
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Starts the watchdog of one replicator; it stops when the returned guard is dropped.
pub(crate) fn spawn(
    tracker: Arc<CallTracker>,
    status: watch::Sender<Status>,
    after: Duration,
    store: String,
) -> AbortOnDrop {
    let period = (after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let task = async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stall: Option<Stall> = None;
        let mut last_busy = Instant::now();
        loop {
            tick.tick().await;
            let now = Instant::now();
            let idlest = tracker.idlest();
            if idlest.is_some() {
                last_busy = now;
            }
            let change = decide(
                stall.as_ref(),
                idlest.as_ref(),
                tracker.last_answer(),
                last_busy,
                now,
                after,
            );
            match change {
                Change::None => {}
                Change::Began(c) => {
                    let idle_ms = u64::try_from(c.idle.as_millis()).unwrap_or(u64::MAX);
                    let since_ms = now_ms() - i64::try_from(idle_ms).unwrap_or(0);
                    tracing::warn!(store = %store, call = %c, idle_ms, "the store has not answered for {}s: stalled (the call goes on until its timeouts)", c.idle.as_secs());
                    let call = format!("{c} on {store}");
                    let error = format!(
                        "{store}: no answer to {c} for {}s (the store is slow or unreachable)",
                        c.idle.as_secs()
                    );
                    status.send_modify(|s| {
                        s.stalled_since_ms = Some(since_ms);
                        s.stalled_call = Some(call.clone());
                        s.stalls += 1;
                        s.last_error = Some(error);
                    });
                    stall = Some(Stall {
                        seen: now,
                        since_ms,
                        call,
                    });
                }
                Change::Ended => {
                    if let Some(s) = stall.take() {
                        let stalled_ms = now_ms() - s.since_ms;
                        tracing::info!(store = %store, call = %s.call, stalled_ms, "the store answers again");
                    }
                    status.send_modify(|s| {
                        s.stalled_since_ms = None;
                        s.stalled_call = None;
                    });
                }
            }
        }
    };
    AbortOnDrop(tokio::spawn(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(10);

    fn call(idle_s: u64) -> RunningCall {
        RunningCall {
            op: "put",
            key: "k".into(),
            started_ms: 0,
            idle: Duration::from_secs(idle_s),
        }
    }

    fn stall(seen: Instant) -> Stall {
        Stall {
            seen,
            since_ms: 0,
            call: "put `k`".into(),
        }
    }

    #[test]
    fn a_call_idle_past_the_threshold_starts_a_stall() {
        let now = Instant::now();
        assert_eq!(decide(None, None, None, now, now, AFTER), Change::None);
        assert_eq!(
            decide(None, Some(&call(9)), None, now, now, AFTER),
            Change::None
        );
        assert_eq!(
            decide(None, Some(&call(10)), None, now, now, AFTER),
            Change::Began(call(10))
        );
    }

    #[test]
    fn a_stall_lasts_across_retries_until_the_store_answers() {
        let seen = Instant::now();
        let later = seen + Duration::from_secs(30);
        let s = stall(seen);
        // Between two rounds no call runs: still stalled.
        assert_eq!(
            decide(Some(&s), None, None, later, later, AFTER),
            Change::None
        );
        // A new attempt that is not idle yet: still stalled.
        assert_eq!(
            decide(
                Some(&s),
                Some(&call(1)),
                Some(seen - Duration::from_secs(1)),
                later,
                later,
                AFTER
            ),
            Change::None
        );
        // An answer after the stall was seen ends it.
        assert_eq!(
            decide(Some(&s), Some(&call(1)), Some(later), later, later, AFTER),
            Change::Ended
        );
    }

    #[test]
    fn a_stall_ends_when_nothing_waits_on_the_store_any_more() {
        let seen = Instant::now();
        let s = stall(seen);
        let quiet = seen + IDLE_END;
        assert_eq!(
            decide(Some(&s), None, None, seen, quiet, AFTER),
            Change::Ended
        );
        assert_eq!(
            decide(Some(&s), Some(&call(70)), None, quiet, quiet, AFTER),
            Change::None
        );
    }
}
