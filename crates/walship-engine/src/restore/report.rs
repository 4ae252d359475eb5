//! What a restore did: its report, and the warning when object times run backwards across
//! generations.

use walship_format::key::{GenerationId, format_rfc3339};

use super::gap::Gap;
use crate::replica::GenerationObjects;

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Generation restored from.
    pub generation: Option<GenerationId>,
    /// Snapshot used.
    pub snapshot: String,
    /// Position of the restored state.
    pub position: u64,
    /// Write time of the last object applied (ms since the epoch).
    pub timestamp_ms: i64,
    /// Segments applied.
    pub segments: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Database size in pages.
    pub pages: u32,
    /// Objects skipped, with why.
    pub skipped: Vec<(String, String)>,
    /// Wall time in milliseconds.
    pub elapsed_ms: u64,
    /// The segment at which the chain stopped early (it failed to verify, or was deleted
    /// while the restore ran, again and again), if any.
    pub stopped_at: Option<String>,
    /// What the restore did not reach although the replica holds it (at or before the
    /// target): `Some` makes the restore partial.
    pub gap: Option<Gap>,
    /// With a target time: a generation ranked below the one restored holds a later object
    /// (at or before the target) than any of it, so writers' clocks disagree.
    pub times_backwards: Option<TimesBackwards>,
}

/// Object times that run backwards across generations (docs/format.md, "Restore"): a
/// generation with a lower id holds an object written, by its writer's clock, after every
/// object of the generation restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimesBackwards {
    /// The generation restored.
    pub restored: GenerationId,
    /// Its newest object's time (at or before the target).
    pub restored_newest_ms: i64,
    /// The lower generation with the latest object.
    pub lower: GenerationId,
    /// That object's time.
    pub lower_newest_ms: i64,
}

impl std::fmt::Display for TimesBackwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "object times run backwards across generations: generation {} (lower id) holds an \
             object written at {}, after every object of generation {} (restored, up to {}); a \
             writer's clock was off, or the lower one is a one-shot snapshot taken while a \
             replicator ran. Restore goes by generation id, not by time",
            self.lower,
            format_rfc3339(self.lower_newest_ms),
            self.restored,
            format_rfc3339(self.restored_newest_ms),
        )
    }
}

impl RestoreReport {
    /// Whether objects exist beyond the point restored ([`RestoreReport::gap`]).
    pub fn partial(&self) -> bool {
        self.gap.is_some()
    }

    /// Objects applied: the snapshot and the segments.
    pub fn objects_applied(&self) -> usize {
        self.segments + usize::from(!self.snapshot.is_empty())
    }
}

/// Whether a generation ranked below `restored` holds a later object (at or before
/// `target`; `i64::MAX` for any) than any of `restored`'s. `generations` as listed.
pub fn times_backwards(
    generations: &[(GenerationId, GenerationObjects)],
    restored: GenerationId,
    target: i64,
) -> Option<TimesBackwards> {
    let newest = |o: &GenerationObjects| {
        o.snapshots
            .iter()
            .chain(&o.segments)
            .map(|l| l.key.timestamp_ms())
            .filter(|t| *t <= target)
            .max()
    };
    let restored_newest_ms = generations
        .iter()
        .find(|(g, _)| *g == restored)
        .and_then(|(_, o)| newest(o))?;
    generations
        .iter()
        .filter(|(g, _)| *g < restored)
        .filter_map(|(g, o)| newest(o).map(|t| (t, *g)))
        .filter(|(t, _)| *t > restored_newest_ms)
        .max()
        .map(|(lower_newest_ms, lower)| TimesBackwards {
            restored,
            restored_newest_ms,
            lower,
            lower_newest_ms,
        })
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::replica::Listed;
    use walship_format::key::ObjectKey;

    fn listed(key: ObjectKey) -> Listed {
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    /// A generation holding one snapshot at position 0 written at `t`.
    fn generation(id: u64, t: i64) -> (GenerationId, GenerationObjects) {
        let g = GenerationId(id);
        let objs = GenerationObjects {
            snapshots: vec![listed(ObjectKey::Snapshot {
                generation: g,
                position: 0,
                timestamp_ms: t,
            })],
            ..Default::default()
        };
        (g, objs)
    }

    #[test]
    fn times_run_backwards_only_when_a_lower_generation_holds_later_times() {
        // Listed by id, highest first. A writer with its clock ahead made generation 1.
        let gens = vec![generation(2, 1_000), generation(1, 5_000)];
        let b = times_backwards(&gens, GenerationId(2), i64::MAX).unwrap();
        assert_eq!((b.lower, b.lower_newest_ms), (GenerationId(1), 5_000));
        assert_eq!(b.restored_newest_ms, 1_000);
        assert!(b.to_string().contains("times run backwards"), "{b}");
        // Before the lower generation's time, nothing disagrees.
        assert_eq!(times_backwards(&gens, GenerationId(2), 4_000), None);
        // In order: no warning.
        let gens = vec![generation(2, 5_000), generation(1, 1_000)];
        assert_eq!(times_backwards(&gens, GenerationId(2), i64::MAX), None);
    }
}
