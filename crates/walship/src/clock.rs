//! Time as the `walship` binary reads, prints and parses it: one clock ([`now_ms`]), one
//! formatter ([`rfc3339`]), one parser ([`parse_rfc3339`]) and human ages ([`age`]).
//!
//! Every time a command prints (text and JSON) comes from [`rfc3339`], and every time it
//! reads (`restore --timestamp`, `dump --timestamp`, the download API's `?timestamp=`) goes
//! through [`parse_rfc3339`]: what one prints, the other accepts, to the millisecond.

use anyhow::{Context, Result};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// Milliseconds since the Unix epoch, by this machine's clock (0 if it is set before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The latest time [`rfc3339`] can write: 9999-12-31T23:59:59.999Z.
const MAX_MS: i64 = 253_402_300_799_999;

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-23T20:30:00.123Z`. Times before 1970 or
/// after 9999 are clamped into that range.
pub fn rfc3339(ms: i64) -> String {
    let ms = ms.clamp(0, MAX_MS);
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 time (any offset, any fraction of a second) into milliseconds since
/// the epoch, rounding a finer fraction down.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// [`parse_rfc3339`] for a `--timestamp` flag: the error says what is expected.
pub fn parse_timestamp(s: &str) -> Result<i64> {
    parse_rfc3339(s).with_context(|| {
        format!("--timestamp `{s}` is not RFC 3339 (for example 2026-11-23T20:30:00Z)")
    })
}

/// How long before `now_ms` a time was, for people: "just now", "42 s ago", "3 min ago",
/// "2 h ago", "5 days ago"; a time more than a second ahead of this clock (a writer's clock
/// ahead of ours, or ours behind) is "in the future (by 1 h)".
pub fn age(then_ms: i64, now_ms: i64) -> String {
    let diff = now_ms.saturating_sub(then_ms);
    if diff < -1000 {
        return format!("in the future (by {})", span(diff.saturating_neg()));
    }
    if diff < 1000 {
        return "just now".to_string();
    }
    format!("{} ago", span(diff))
}

/// A positive span in its largest whole unit: "42 s", "3 min", "2 h", "5 days".
fn span(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        ..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..172_800 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn printed_times_parse_back_to_the_millisecond() {
        for ms in [
            0,
            1,
            999,
            1_000,
            1_700_000_000_123,
            1_790_000_000_000,
            MAX_MS,
        ] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{ms}");
        }
    }

    #[test]
    fn any_rfc3339_time_is_accepted() {
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20Z"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20.123+01:00"),
            Some(1_700_000_000_123)
        );
        // Finer than a millisecond: rounded down, also before 1970.
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.123999Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.9995Z"), Some(-1));
        assert_eq!(parse_rfc3339("20231114T221320123Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert!(parse_timestamp("yesterday").is_err());
    }

    #[test]
    fn ages_are_in_the_largest_whole_unit() {
        let now = 1_700_000_000_000;
        assert_eq!(age(now, now), "just now");
        assert_eq!(age(now - 999, now), "just now");
        assert_eq!(age(now + 900, now), "just now");
        assert_eq!(age(now - 42_500, now), "42 s ago");
        assert_eq!(age(now - 3 * 60_000 - 5, now), "3 min ago");
        assert_eq!(age(now - 59 * 60_000, now), "59 min ago");
        assert_eq!(age(now - 2 * 3_600_000, now), "2 h ago");
        assert_eq!(age(now - 47 * 3_600_000, now), "47 h ago");
        assert_eq!(age(now - 5 * 86_400_000, now), "5 days ago");
    }

    #[test]
    fn a_time_ahead_of_this_clock_is_in_the_future() {
        let now = 1_700_000_000_000;
        assert_eq!(age(now + 3_600_000, now), "in the future (by 1 h)");
        assert_eq!(age(now + 5_000, now), "in the future (by 5 s)");
        // No overflow at the extremes.
        assert!(age(i64::MAX, now).ends_with(" days)"));
        assert_eq!(age(i64::MIN, now), "106751991167 days ago");
    }
}
