//! Object keys (docs/format.md, "Keys"): they sort so that one LIST finds the newest
//! generation and its newest snapshot, and parse back without downloading anything.

use std::fmt;

/// Directory of all generations.
pub const GENERATIONS_DIR: &str = "generations/";
/// Extension of snapshot objects.
pub const SNAPSHOT_EXT: &str = ".wsnap";
/// Extension of segment objects.
pub const SEGMENT_EXT: &str = ".wseg";

/// A generation id. Newer generations have larger ids; their key names sort first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GenerationId(pub u64);

impl GenerationId {
    /// The id for a generation created at `unix_ms` with 20 random bits `rand`.
    pub fn new(unix_ms: i64, rand: u32) -> GenerationId {
        GenerationId(((unix_ms.max(0) as u64) << 20) | u64::from(rand & 0xF_FFFF))
    }

    /// A new id that is newer than `newest_existing` even if the clock went back (or the
    /// creator of `newest_existing` had a clock ahead): when the clock's id is not above it,
    /// the id two milliseconds after it, with `rand` as its random bits, which leaves at
    /// least 2^20 unused ids below (room for [`GenerationId::below`]).
    pub fn new_after(unix_ms: i64, rand: u32, newest_existing: Option<GenerationId>) -> Self {
        let fresh = GenerationId::new(unix_ms, rand);
        match newest_existing {
            Some(old) if old >= fresh => {
                let ms = (old.0 >> 20).saturating_add(2).min(u64::MAX >> 20);
                GenerationId((ms << 20) | u64::from(rand & 0xF_FFFF))
                    .max(GenerationId(old.0.saturating_add(1)))
            }
            _ => fresh,
        }
    }

    /// An unused id just below `newest`, for a generation that must rank below it and above
    /// every older one (a one-shot snapshot taken while a replicator writes into `newest`):
    /// the midpoint between `newest` and the highest of `existing` below it (`newest - 2^21`
    /// when there is none). When no id is free between the two, the highest unused id below
    /// `newest`. `None` only when every id below `newest` is taken.
    pub fn below(newest: GenerationId, existing: &[GenerationId]) -> Option<GenerationId> {
        let floor = existing
            .iter()
            .copied()
            .filter(|g| *g < newest)
            .max()
            .map_or(newest.0.saturating_sub(1 << 21), |g| g.0);
        let mid = floor + (newest.0 - floor) / 2;
        if mid > floor && mid < newest.0 {
            return Some(GenerationId(mid));
        }
        let taken: std::collections::HashSet<u64> = existing.iter().map(|g| g.0).collect();
        (0..newest.0)
            .rev()
            .take(taken.len() + 1)
            .find(|id| !taken.contains(id))
            .map(GenerationId)
    }

    /// Milliseconds since the epoch encoded in the id (the creator's clock).
    pub fn created_ms(&self) -> i64 {
        (self.0 >> 20) as i64
    }

    /// The 16-hex-digit name used in keys (inverted, so newer sorts first).
    pub fn name(&self) -> String {
        format!("{:016x}", u64::MAX - self.0)
    }

    /// Parses a name made by [`GenerationId::name`].
    pub fn parse_name(s: &str) -> Option<GenerationId> {
        parse_hex16(s).map(|v| GenerationId(u64::MAX - v))
    }

    /// The key prefix of this generation, e.g. `generations/ffff.../`.
    pub fn prefix(&self) -> String {
        format!("{GENERATIONS_DIR}{}/", self.name())
    }

    /// The prefix of its snapshots.
    pub fn snapshots_prefix(&self) -> String {
        format!("{}snapshots/", self.prefix())
    }

    /// The prefix of its segments.
    pub fn segments_prefix(&self) -> String {
        format!("{}segments/", self.prefix())
    }
}

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A parsed object key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKey {
    /// A snapshot at `position`.
    Snapshot {
        /// Generation.
        generation: GenerationId,
        /// Position of the image.
        position: u64,
        /// Write time, ms since the epoch.
        timestamp_ms: i64,
    },
    /// A segment covering `(start, end]`.
    Segment {
        /// Generation.
        generation: GenerationId,
        /// Position it continues from.
        start: u64,
        /// Position after it.
        end: u64,
        /// Write time, ms since the epoch.
        timestamp_ms: i64,
    },
}

impl ObjectKey {
    /// The generation of the object.
    pub fn generation(&self) -> GenerationId {
        match self {
            ObjectKey::Snapshot { generation, .. } | ObjectKey::Segment { generation, .. } => {
                *generation
            }
        }
    }

    /// Write time of the object.
    pub fn timestamp_ms(&self) -> i64 {
        match self {
            ObjectKey::Snapshot { timestamp_ms, .. } | ObjectKey::Segment { timestamp_ms, .. } => {
                *timestamp_ms
            }
        }
    }

    /// Formats the key.
    pub fn format(&self) -> String {
        match self {
            ObjectKey::Snapshot {
                generation,
                position,
                timestamp_ms,
            } => format!(
                "{}{:016x}_{}{SNAPSHOT_EXT}",
                generation.snapshots_prefix(),
                u64::MAX - position,
                format_time(*timestamp_ms)
            ),
            ObjectKey::Segment {
                generation,
                start,
                end,
                timestamp_ms,
            } => format!(
                "{}{start:016x}_{end:016x}_{}{SEGMENT_EXT}",
                generation.segments_prefix(),
                format_time(*timestamp_ms)
            ),
        }
    }

    /// Parses a key (relative to the replica prefix); `None` for anything not of our forms.
    pub fn parse(key: &str) -> Option<ObjectKey> {
        let rest = key.strip_prefix(GENERATIONS_DIR)?;
        let (gen_name, rest) = rest.split_once('/')?;
        let generation = GenerationId::parse_name(gen_name)?;
        if let Some(file) = rest.strip_prefix("snapshots/") {
            let stem = file.strip_suffix(SNAPSHOT_EXT)?;
            let (rpos, time) = stem.split_once('_')?;
            Some(ObjectKey::Snapshot {
                generation,
                position: u64::MAX - parse_hex16(rpos)?,
                timestamp_ms: parse_time(time)?,
            })
        } else if let Some(file) = rest.strip_prefix("segments/") {
            let stem = file.strip_suffix(SEGMENT_EXT)?;
            let mut parts = stem.split('_');
            let start = parse_hex16(parts.next()?)?;
            let end = parse_hex16(parts.next()?)?;
            let timestamp_ms = parse_time(parts.next()?)?;
            if parts.next().is_some() || end <= start {
                return None;
            }
            Some(ObjectKey::Segment {
                generation,
                start,
                end,
                timestamp_ms,
            })
        } else {
            None
        }
    }
}

/// The key prefix that lists segments starting at or after `position` when used as
/// `StartAfter` (every segment key with `start >= position` sorts after it).
pub fn segments_start_after(generation: GenerationId, position: u64) -> String {
    if position == 0 {
        return generation.segments_prefix();
    }
    format!("{}{:016x}", generation.segments_prefix(), position - 1) + "_~" // `~` sorts after every hex digit: after all segments starting at position - 1
}

/// A position: WAL incarnation (epoch) and frames of it.
pub fn position(epoch: u32, frames: u32) -> u64 {
    (u64::from(epoch) << 32) | u64::from(frames)
}

/// Splits a position into (epoch, frames).
pub fn split_position(p: u64) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

fn parse_hex16(s: &str) -> Option<u64> {
    if s.len() != 16
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Formats ms since the epoch as RFC 3339 with milliseconds, UTC
/// (`YYYY-MM-DDTHH:MM:SS.mmmZ`), clamped as [`format_time`] does.
pub fn format_rfc3339(ms: i64) -> String {
    let k = format_time(ms);
    format!(
        "{}-{}-{}T{}:{}:{}.{}Z",
        &k[0..4],
        &k[4..6],
        &k[6..8],
        &k[9..11],
        &k[11..13],
        &k[13..15],
        &k[15..18]
    )
}

/// Formats ms since the epoch as `YYYYMMDDTHHMMSSmmmZ` (UTC). Times before 1970 or after
/// 9999 are clamped into range.
pub fn format_time(ms: i64) -> String {
    let ms = ms.clamp(0, 253_402_300_799_999);
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}{milli:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Parses what [`format_time`] writes.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 19 || b[8] != b'T' || b[18] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se, ms) = (num(9..11)?, num(11..13)?, num(13..15)?, num(15..18)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    let t = ((days * 86_400 + h * 3600 + mi * 60 + se) * 1000) + ms;
    // Refuse dates like Feb 31 that do not round-trip.
    (format_time(t) == s).then_some(t)
}

// Howard Hinnant's civil calendar algorithms (public domain).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newer_generations_and_snapshots_sort_first() {
        let old = GenerationId::new(1_000, 5);
        let new = GenerationId::new(2_000, 1);
        assert!(new.name() < old.name());
        let s_old = ObjectKey::Snapshot {
            generation: new,
            position: 10,
            timestamp_ms: 5,
        };
        let s_new = ObjectKey::Snapshot {
            generation: new,
            position: 11,
            timestamp_ms: 6,
        };
        assert!(s_new.format() < s_old.format());
    }

    #[test]
    fn segments_sort_in_log_order() {
        let g = GenerationId::new(1, 1);
        let a = ObjectKey::Segment {
            generation: g,
            start: position(0, 5),
            end: position(0, 9),
            timestamp_ms: 99,
        };
        let b = ObjectKey::Segment {
            generation: g,
            start: position(0, 9),
            end: position(1, 2),
            timestamp_ms: 1,
        };
        assert!(a.format() < b.format());
        assert!(segments_start_after(g, position(0, 9)) < b.format());
        assert!(segments_start_after(g, position(0, 9)) > a.format());
    }

    #[test]
    fn a_clock_that_went_back_still_makes_a_newer_generation() {
        let existing = GenerationId::new(5_000_000, 7);
        let next = GenerationId::new_after(1_000, 3, Some(existing));
        assert!(next > existing);
        assert!(next.name() < existing.name());
    }

    #[test]
    fn a_forced_id_leaves_room_below_it() {
        let existing = GenerationId::new(5_000_000, 0xF_FFFF);
        let next = GenerationId::new_after(1_000, 0, Some(existing));
        assert!(next.0 - existing.0 > 1 << 20, "{next:?}");
        assert_eq!(next.created_ms(), 5_000_002);
        // A clock ahead of the newest keeps its own id.
        let fresh = GenerationId::new_after(6_000_000, 3, Some(existing));
        assert_eq!(fresh, GenerationId::new(6_000_000, 3));
    }

    #[test]
    fn an_id_below_ranks_between_the_newest_and_everything_older() {
        let older = GenerationId::new(1_000, 9);
        let newest = GenerationId::new_after(900, 1, Some(older));
        let a = GenerationId::below(newest, &[older, newest]).unwrap();
        assert!(older < a && a < newest, "{a:?}");
        // A later one ranks above the earlier one, still below the newest.
        let b = GenerationId::below(newest, &[older, a, newest]).unwrap();
        assert!(a < b && b < newest, "{b:?}");
        // Alone: just below it.
        let c = GenerationId::below(newest, &[newest]).unwrap();
        assert!(c < newest && newest.0 - c.0 <= 1 << 21);
        // No room between: the highest unused id below.
        let tight = [GenerationId(100), GenerationId(101)];
        assert_eq!(
            GenerationId::below(GenerationId(101), &tight),
            Some(GenerationId(99))
        );
        assert_eq!(
            GenerationId::below(GenerationId(0), &[GenerationId(0)]),
            None
        );
    }

    #[test]
    fn time_formats_like_the_spec() {
        assert_eq!(format_time(0), "19700101T000000000Z");
        assert_eq!(format_time(1_700_000_000_123), "20231114T221320123Z");
        assert_eq!(
            format_rfc3339(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(parse_time("20231114T221320123Z"), Some(1_700_000_000_123));
        assert_eq!(parse_time("20230231T000000000Z"), None);
    }

    #[test]
    fn foreign_keys_do_not_parse() {
        for k in [
            "",
            "generations/",
            "generations/zz/snapshots/x.wsnap",
            "backups/app_20240101.db",
            "generations/0000000000000001/other/a",
            "generations/0000000000000001/segments/0000000000000002_0000000000000001_20231114T221320123Z.wseg",
        ] {
            assert_eq!(ObjectKey::parse(k), None, "{k}");
        }
    }

    proptest! {
        #[test]
        fn key_format_then_parse_is_identity(
            g in any::<u64>(),
            a in any::<u64>(),
            len in 1u64..1000,
            ts in 0i64..253_402_300_799_999,
            snapshot in any::<bool>(),
        ) {
            let generation = GenerationId(g);
            let key = if snapshot {
                ObjectKey::Snapshot { generation, position: a, timestamp_ms: ts }
            } else {
                let start = a.min(u64::MAX - len);
                ObjectKey::Segment { generation, start, end: start + len, timestamp_ms: ts }
            };
            prop_assert_eq!(ObjectKey::parse(&key.format()), Some(key));
        }

        #[test]
        fn parsing_arbitrary_strings_never_panics(s in ".{0,120}") {
            let _ = ObjectKey::parse(&s);
            let _ = parse_time(&s);
        }

        #[test]
        fn time_round_trips(ts in 0i64..253_402_300_799_999) {
            prop_assert_eq!(parse_time(&format_time(ts)), Some(ts));
        }
    }
}
