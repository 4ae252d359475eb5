//! What a restore left out, decided from the listing alone: the objects at or before its
//! target that lie beyond the point it reached ([`find_gap`]), and whether an object's header
//! agrees with the key it is stored under ([`disagreement`]). Plain functions over plain
//! data; the restore around them does the I/O.

use walship_format::key::{GenerationId, ObjectKey};
use walship_format::object::{Kind, ObjectHeader};

use crate::replica::{GenerationObjects, Listed};

/// The part of a replica a restore did not reach although objects exist beyond it: the
/// restore is partial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The position restored (in the restored generation): what is missing begins after it.
    pub from: u64,
    /// Where the objects found beyond `from` in the restored generation begin: the lowest
    /// start (or snapshot position) after `from`; when each of them covers `from` (a
    /// damaged segment), the furthest end they reach. `None` when every object beyond lies
    /// in another generation.
    pub to: Option<u64>,
    /// The objects at or before the target that were not applied and lie beyond `from`:
    /// those of the restored generation that end after it, then every object of the
    /// generations ranked ahead of it that restored nothing. In key order.
    pub beyond: Vec<String>,
}

impl Gap {
    /// One phrase for a result line: what is missing and what lies beyond it.
    pub fn describe(&self) -> String {
        let first = self.beyond.first().map(String::as_str).unwrap_or("?");
        let n = self.beyond.len();
        let objects = if n == 1 { "object" } else { "objects" };
        match self.to {
            Some(to) => format!(
                "positions {:#x} to {to:#x} are missing; {n} {objects} beyond them could not be \
                 applied (first {first})",
                self.from
            ),
            None => format!(
                "{n} {objects} of newer generations could not be restored (first {first}); \
                 restored up to position {:#x} of an older one",
                self.from
            ),
        }
    }
}

/// The gap a restore that reached position `reached` of generation `restored` leaves, given
/// the generations the restore tried before it (`ahead`: each restored nothing) and its
/// target time; `None` when the restore is whole.
///
/// Counted as beyond, among objects written at or before `target_ms` (a point-in-time
/// restore is partial only relative to what existed then):
/// - a segment of the restored generation that ends after `reached` (after a deleted one,
///   or one that failed to verify or disagreed with its key);
/// - a snapshot of the restored generation past `reached` (a damaged newest snapshot
///   that forced an older point the segments could not bring forward);
/// - any object of a generation ranked ahead (its snapshots were all unusable).
///
/// Segments ending at or before `reached` (applied, or merged parts a merged segment
/// covers) and objects written after the target are not.
pub fn find_gap(
    reached: u64,
    restored: &GenerationObjects,
    ahead: &[GenerationObjects],
    target_ms: i64,
) -> Option<Gap> {
    let in_time = |l: &&Listed| l.key.timestamp_ms() <= target_ms;
    let mine: Vec<&Listed> = restored
        .snapshots
        .iter()
        .chain(&restored.segments)
        .filter(in_time)
        .filter(|l| match l.key {
            ObjectKey::Snapshot { position, .. } => position > reached,
            ObjectKey::Segment { end, .. } => end > reached,
        })
        .collect();
    let to = mine
        .iter()
        .map(|l| begins(&l.key))
        .filter(|b| *b > reached)
        .min()
        .or_else(|| mine.iter().map(|l| ends(&l.key)).max());
    let mut beyond: Vec<String> = mine.iter().map(|l| l.name.clone()).collect();
    beyond.sort();
    for g in ahead {
        let mut theirs: Vec<String> = g
            .snapshots
            .iter()
            .chain(&g.segments)
            .filter(in_time)
            .map(|l| l.name.clone())
            .collect();
        theirs.sort();
        beyond.append(&mut theirs);
    }
    if beyond.is_empty() {
        return None;
    }
    Some(Gap {
        from: reached,
        to,
        beyond,
    })
}

fn begins(k: &ObjectKey) -> u64 {
    match k {
        ObjectKey::Snapshot { position, .. } => *position,
        ObjectKey::Segment { start, .. } => *start,
    }
}

fn ends(k: &ObjectKey) -> u64 {
    match k {
        ObjectKey::Snapshot { position, .. } => *position,
        ObjectKey::Segment { end, .. } => *end,
    }
}

/// How an object's header disagrees with its key (generation, kind, start, end), if it
/// does: such an object is refused, whatever its body holds (a valid segment copied under a
/// key naming a wider range would otherwise stand for history it does not carry).
pub fn disagreement(key: &ObjectKey, h: &ObjectHeader) -> Option<String> {
    let mut diffs = Vec::new();
    if h.generation != key.generation().0 {
        diffs.push(format!(
            "generation {} in the header, {} in the key",
            GenerationId(h.generation),
            key.generation()
        ));
    }
    let (kind_ok, kind_name, start, end) = match *key {
        ObjectKey::Snapshot { position, .. } => {
            (h.kind == Kind::Snapshot, "snapshot", position, position)
        }
        ObjectKey::Segment { start, end, .. } => (h.kind.has_frames(), "segment", start, end),
    };
    if !kind_ok {
        diffs.push(format!("a {:?} header under a {kind_name} key", h.kind));
    }
    if h.start != start {
        diffs.push(format!(
            "start {:#x} in the header, {start:#x} in the key",
            h.start
        ));
    }
    if h.end != end {
        diffs.push(format!(
            "end {:#x} in the header, {end:#x} in the key",
            h.end
        ));
    }
    if diffs.is_empty() {
        None
    } else {
        Some(format!(
            "header disagrees with its key: {}",
            diffs.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const G: GenerationId = GenerationId(7);

    fn seg(g: GenerationId, start: u64, end: u64, ts: i64) -> Listed {
        let key = ObjectKey::Segment {
            generation: g,
            start,
            end,
            timestamp_ms: ts,
        };
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    fn snap(g: GenerationId, position: u64, ts: i64) -> Listed {
        let key = ObjectKey::Snapshot {
            generation: g,
            position,
            timestamp_ms: ts,
        };
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    fn generation(snapshots: Vec<Listed>, segments: Vec<Listed>) -> GenerationObjects {
        GenerationObjects {
            snapshots,
            segments,
            foreign: vec!["generations/x/junk".into()],
        }
    }

    /// Snapshot at 10, segments (10,20] (20,30] (30,40], written at times 1..=4.
    fn whole() -> GenerationObjects {
        generation(
            vec![snap(G, 10, 1)],
            vec![seg(G, 10, 20, 2), seg(G, 20, 30, 3), seg(G, 30, 40, 4)],
        )
    }

    #[test]
    fn a_restore_that_reached_the_last_segment_is_whole() {
        assert_eq!(find_gap(40, &whole(), &[], i64::MAX), None);
    }

    #[test]
    fn a_deleted_middle_segment_leaves_a_gap_up_to_the_next_start() {
        let mut g = whole();
        g.segments.remove(1); // (20,30]
        let gap = find_gap(20, &g, &[], i64::MAX).unwrap();
        assert_eq!(gap.from, 20);
        assert_eq!(gap.to, Some(30));
        assert_eq!(gap.beyond, vec![seg(G, 30, 40, 4).name]);
        assert!(
            gap.describe().contains("0x14 to 0x1e"),
            "{}",
            gap.describe()
        );
    }

    #[test]
    fn a_segment_that_covers_the_reached_point_but_was_not_applied_is_beyond() {
        // (30,40] failed to verify: the restore stopped at 30.
        let gap = find_gap(30, &whole(), &[], i64::MAX).unwrap();
        assert_eq!(gap.to, Some(40), "nothing starts later: its end");
        assert_eq!(gap.beyond, vec![seg(G, 30, 40, 4).name]);
        // With a later one, the gap ends where the later one starts.
        let mut g = whole();
        g.segments.push(seg(G, 40, 50, 5));
        let gap = find_gap(30, &g, &[], i64::MAX).unwrap();
        assert_eq!(gap.to, Some(40));
        assert_eq!(gap.beyond.len(), 2);
    }

    #[test]
    fn objects_written_after_the_target_do_not_make_a_point_in_time_restore_partial() {
        // As of time 3, (30,40] did not exist yet.
        assert_eq!(find_gap(30, &whole(), &[], 3), None);
        // But one that existed then, past a missing segment, does.
        let mut g = whole();
        g.segments.remove(1);
        let gap = find_gap(20, &g, &[], 4).unwrap();
        assert_eq!(gap.beyond, vec![seg(G, 30, 40, 4).name]);
        assert_eq!(find_gap(20, &g, &[], 3), None);
    }

    #[test]
    fn segments_ending_at_or_before_the_reached_point_are_not_beyond() {
        // Parts of a merged segment (10,40] that restore took whole, and a segment from
        // before the snapshot.
        let mut g = whole();
        g.segments.push(seg(G, 10, 40, 4));
        g.segments.push(seg(G, 0, 10, 0));
        assert_eq!(find_gap(40, &g, &[], i64::MAX), None);
    }

    #[test]
    fn a_damaged_newest_snapshot_that_forced_an_older_point_is_a_gap() {
        // Snapshots at 10 and 50 (the newer one damaged); segments only up to 40.
        let mut g = whole();
        g.snapshots.insert(0, snap(G, 50, 6));
        let gap = find_gap(40, &g, &[], i64::MAX).unwrap();
        assert_eq!(gap.to, Some(50));
        assert_eq!(gap.beyond, vec![snap(G, 50, 6).name]);
        // The segments after the older snapshot reach past it: whole (the damaged one is
        // reported as skipped, not as missing).
        g.segments.push(seg(G, 40, 50, 5));
        g.segments.push(seg(G, 50, 60, 7));
        assert_eq!(find_gap(60, &g, &[], i64::MAX), None);
        // Written after the target: not missing.
        let mut g = whole();
        g.snapshots.insert(0, snap(G, 50, 6));
        assert_eq!(find_gap(40, &g, &[], 5), None);
    }

    #[test]
    fn a_newer_generation_that_restored_nothing_is_beyond() {
        let newer = GenerationId(9);
        let ahead = vec![generation(
            vec![snap(newer, 0, 10)],
            vec![seg(newer, 0, 5, 11)],
        )];
        let gap = find_gap(40, &whole(), &ahead, i64::MAX).unwrap();
        assert_eq!(gap.from, 40);
        assert_eq!(gap.to, None, "nothing missing in the restored generation");
        assert_eq!(gap.beyond.len(), 2);
        assert!(
            gap.describe().contains("newer generations"),
            "{}",
            gap.describe()
        );
        // Its objects written after the target do not count.
        assert_eq!(find_gap(40, &whole(), &ahead, 9), None);
        let gap = find_gap(40, &whole(), &ahead, 10).unwrap();
        assert_eq!(gap.beyond, vec![snap(newer, 0, 10).name]);
    }

    #[test]
    fn objects_beyond_are_listed_restored_generation_first_in_key_order() {
        let mut g = whole();
        g.segments.remove(0);
        let newer = GenerationId(9);
        let ahead = vec![generation(vec![], vec![seg(newer, 0, 5, 11)])];
        let gap = find_gap(10, &g, &ahead, i64::MAX).unwrap();
        assert_eq!(
            gap.beyond,
            vec![
                seg(G, 20, 30, 3).name,
                seg(G, 30, 40, 4).name,
                seg(newer, 0, 5, 11).name
            ]
        );
        assert_eq!(gap.to, Some(20));
    }

    fn header(kind: Kind, generation: u64, start: u64, end: u64) -> ObjectHeader {
        ObjectHeader {
            kind,
            flags: walship_format::object::FLAG_LZ4,
            generation,
            start,
            end,
            page_size: 4096,
            db_pages: 1,
            timestamp_ms: 0,
            wal: Default::default(),
            start_checksum: Default::default(),
            frames: 1,
            raw_len: 0,
        }
    }

    #[test]
    fn a_header_that_matches_its_key_is_accepted() {
        assert_eq!(
            disagreement(&seg(G, 10, 20, 1).key, &header(Kind::Segment, 7, 10, 20)),
            None
        );
        assert_eq!(
            disagreement(&seg(G, 10, 40, 1).key, &header(Kind::Merged, 7, 10, 40)),
            None
        );
        assert_eq!(
            disagreement(&snap(G, 30, 1).key, &header(Kind::Snapshot, 7, 30, 30)),
            None
        );
    }

    #[test]
    fn a_segment_under_a_key_naming_a_wider_range_is_refused_naming_the_end() {
        let why = disagreement(&seg(G, 10, 30, 1).key, &header(Kind::Segment, 7, 10, 20)).unwrap();
        assert!(
            why.contains("end 0x14 in the header, 0x1e in the key"),
            "{why}"
        );
        let why = disagreement(&seg(G, 5, 20, 1).key, &header(Kind::Segment, 7, 10, 20)).unwrap();
        assert!(
            why.contains("start 0xa in the header, 0x5 in the key"),
            "{why}"
        );
    }

    #[test]
    fn a_header_of_another_generation_or_kind_is_refused() {
        let why = disagreement(&seg(G, 10, 20, 1).key, &header(Kind::Segment, 8, 10, 20)).unwrap();
        assert!(why.contains("generation"), "{why}");
        let why = disagreement(&seg(G, 10, 20, 1).key, &header(Kind::Snapshot, 7, 10, 20)).unwrap();
        assert!(why.contains("Snapshot header under a segment key"), "{why}");
        let why = disagreement(&snap(G, 20, 1).key, &header(Kind::Segment, 7, 10, 20)).unwrap();
        assert!(
            why.contains("Segment header under a snapshot key") && why.contains("start"),
            "{why}"
        );
        let why = disagreement(&snap(G, 30, 1).key, &header(Kind::Snapshot, 7, 20, 20)).unwrap();
        assert!(why.contains("end 0x14 in the header, 0x1e"), "{why}");
    }
}
