//! Retrying failed sync rounds: when to try again, and what to log.
//!
//! A *failure episode* runs from a replicator's first failed round to its next successful
//! one. Within it, rounds are retried after the sync interval, then twice as long each time,
//! up to [`MAX_RETRY_DELAY`], whatever the app writes meanwhile (before, a round ran at every
//! write, and a replica that failed for 30 s under a busy app logged 1,276 warnings). A
//! `sync()` or `snapshot()` call and the final sync at shutdown still try at once.
//!
//! The log gets one warning when the episode starts, a reminder with a count
//! ([`Report::Reminder`]) [`FIRST_REMINDER`] in, then at doubling intervals up to every
//! [`MAX_REMINDER_GAP`], and one line when it ends. [`Backoff`] is that decision, over plain
//! data and the time it is given.

use std::time::{Duration, Instant};

/// The longest wait between two retries of a failing replica (unless the sync interval is
/// longer).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// When, after an episode's first failure, the first reminder is logged.
pub const FIRST_REMINDER: Duration = Duration::from_secs(10);
/// The longest gap between two reminders.
pub const MAX_REMINDER_GAP: Duration = Duration::from_secs(300);

/// One failure episode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Episode {
    /// When the first failed round started.
    pub since: Instant,
    /// Failed rounds so far.
    pub attempts: u64,
    /// No round of the loop before this.
    pub retry_at: Instant,
    /// The next reminder is due at this time.
    pub remind_at: Instant,
    /// The gap after that reminder.
    pub remind_gap: Duration,
}

/// What to log about a failed round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The first failure of an episode: one warning, with the delay before the next try.
    First { retry_in: Duration },
    /// Still failing: a reminder with the count so far.
    Reminder { attempts: u64, over: Duration },
    /// Nothing above debug level.
    Quiet { retry_in: Duration },
}

/// The back-off state of one replicator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backoff {
    episode: Option<Episode>,
}

/// The delay after the `attempts`-th failed round in a row: the sync interval, doubling,
/// capped at [`MAX_RETRY_DELAY`] (or the sync interval, if longer).
pub fn retry_delay(sync_interval: Duration, attempts: u64) -> Duration {
    let cap = MAX_RETRY_DELAY.max(sync_interval);
    let doublings = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(20);
    sync_interval.saturating_mul(1 << doublings).min(cap)
}

impl Backoff {
    /// When the loop may run its next round on its own (`None`: whenever it likes).
    pub fn retry_at(&self) -> Option<Instant> {
        self.episode.map(|e| e.retry_at)
    }

    /// Whether the loop may run a round on its own at `now`.
    pub fn may_retry(&self, now: Instant) -> bool {
        self.episode.is_none_or(|e| now >= e.retry_at)
    }

    /// A round that started at `started` failed at `now` (a round against a store that
    /// stopped answering can take many seconds of retries and timeouts: the episode counts
    /// from its start).
    pub fn failed(&mut self, started: Instant, now: Instant, sync_interval: Duration) -> Report {
        match &mut self.episode {
            None => {
                let retry_in = retry_delay(sync_interval, 1);
                self.episode = Some(Episode {
                    since: started,
                    attempts: 1,
                    retry_at: now + retry_in,
                    remind_at: started + FIRST_REMINDER,
                    remind_gap: FIRST_REMINDER,
                });
                Report::First { retry_in }
            }
            Some(e) => {
                e.attempts += 1;
                let retry_in = retry_delay(sync_interval, e.attempts);
                e.retry_at = now + retry_in;
                if now >= e.remind_at {
                    e.remind_gap = (e.remind_gap * 2).min(MAX_REMINDER_GAP);
                    e.remind_at = now + e.remind_gap;
                    Report::Reminder {
                        attempts: e.attempts,
                        over: now.saturating_duration_since(e.since),
                    }
                } else {
                    Report::Quiet { retry_in }
                }
            }
        }
    }

    /// A round succeeded: the episode it ends, if any.
    pub fn succeeded(&mut self) -> Option<Episode> {
        self.episode.take()
    }
}

/// A duration for people: `850 ms`, `12 s`, `3 min 5 s`, `2 h 10 min`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        1..=59 => format!("{s} s"),
        60..=3599 if s.is_multiple_of(60) => format!("{} min", s / 60),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ if s % 3600 / 60 == 0 => format!("{} h", s / 3600),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn retries_start_at_the_sync_interval_and_double_up_to_the_cap() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(SECOND, n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(
            retry_delay(Duration::from_millis(200), 1),
            Duration::from_millis(200)
        );
        assert_eq!(retry_delay(SECOND, u64::MAX), MAX_RETRY_DELAY);
        // A sync interval longer than the cap is the cap.
        let long = Duration::from_secs(120);
        assert_eq!(retry_delay(long, 5), long);
    }

    #[test]
    fn the_loop_waits_out_the_delay_and_a_success_ends_the_episode() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(b.may_retry(t0));
        assert_eq!(b.failed(t0, t0, SECOND), Report::First { retry_in: SECOND });
        assert!(!b.may_retry(t0 + Duration::from_millis(999)));
        assert!(b.may_retry(t0 + SECOND));
        assert_eq!(
            b.failed(t0 + SECOND, t0 + SECOND, SECOND),
            Report::Quiet {
                retry_in: 2 * SECOND
            }
        );
        assert_eq!(b.retry_at(), Some(t0 + 3 * SECOND));
        let ended = b.succeeded().unwrap_or_else(|| panic!("no episode"));
        assert_eq!((ended.since, ended.attempts), (t0, 2));
        assert!(b.may_retry(t0 + SECOND));
        assert_eq!(b.succeeded(), None);
        // The next failure starts a new episode, with a warning of its own.
        assert!(matches!(
            b.failed(t0 + 5 * SECOND, t0 + 5 * SECOND, SECOND),
            Report::First { .. }
        ));
    }

    #[test]
    fn one_warning_per_episode_then_reminders_at_doubling_gaps() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let mut reminders = Vec::new();
        let mut firsts = 0;
        // A round every 100 ms for an hour (commands bypass the back-off and fail too).
        for i in 0..36_000u64 {
            let now = t0 + Duration::from_millis(i * 100);
            match b.failed(now, now, SECOND) {
                Report::First { .. } => firsts += 1,
                Report::Reminder { attempts, over } => {
                    assert_eq!(attempts, i + 1);
                    reminders.push(over.as_secs());
                }
                Report::Quiet { .. } => {}
            }
        }
        assert_eq!(firsts, 1);
        assert_eq!(reminders[..6], [10, 30, 70, 150, 310, 610]);
        // Then every 5 minutes: 15 reminders in the hour.
        assert!(reminders.windows(2).skip(5).all(|w| w[1] - w[0] == 300));
        assert_eq!(reminders.len(), 15);
    }

    #[test]
    fn a_slow_failing_round_counts_from_its_start() {
        // A store that stopped answering: each round spends 12 s in retries and timeouts.
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let twelve = Duration::from_secs(12);
        assert!(matches!(
            b.failed(t0, t0 + twelve, SECOND),
            Report::First { .. }
        ));
        assert_eq!(b.retry_at(), Some(t0 + twelve + SECOND));
        let start = t0 + twelve + SECOND;
        assert_eq!(
            b.failed(start, start + twelve, SECOND),
            Report::Reminder {
                attempts: 2,
                over: Duration::from_secs(25)
            }
        );
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(human(Duration::from_millis(850)), "850 ms");
        assert_eq!(human(Duration::from_secs(12)), "12 s");
        assert_eq!(human(Duration::from_secs(120)), "2 min");
        assert_eq!(human(Duration::from_secs(185)), "3 min 5 s");
        assert_eq!(human(Duration::from_secs(7200)), "2 h");
        assert_eq!(human(Duration::from_secs(7800)), "2 h 10 min");
    }
}
