//! Retention: which snapshots a replica keeps, and what can go (docs/configuration.md,
//! "Retention").
//!
//! [`plan`] is pure: the replica's listing, the current generation, a time and a
//! [`RetentionPolicy`] in; the keys to delete out. [`apply`] lists, plans and deletes. The
//! replicator runs it only after it uploaded a snapshot, so an idle database costs nothing.
//!
//! A snapshot is kept when any rule keeps it: among the newest `keep_last`, younger than
//! `keep_within`, the newest of one of the last `keep_daily` days (UTC), or the newest of one
//! of the last `keep_weekly` weeks (ISO, Monday to Sunday, UTC). Whatever the rules say:
//!
//! - the newest snapshot of the current generation, and of the generation holding the
//!   newest object, are kept, with every segment after them (the newest restorable point);
//! - a generation's segments go only when they end at or before its oldest kept snapshot
//!   (no kept snapshot, and so no point-in-time restore from one, needs them);
//! - a generation without a kept snapshot goes whole only when it is superseded: it is not
//!   the current one and all its objects are older than the current generation's newest
//!   snapshot;
//! - keys that are not walship objects are never deleted.

use std::collections::HashSet;
use std::time::Duration;

use walship_format::key::{GenerationId, ObjectKey};

use crate::error::EngineResult;
use crate::replica::{GenerationObjects, Listed, Replica};

/// Which snapshots to keep. All `None` keeps everything (retention off).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest N snapshots.
    pub keep_last: Option<u32>,
    /// Keep snapshots younger than this.
    pub keep_within: Option<Duration>,
    /// Keep the newest snapshot of each of the last D days (UTC), today included.
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last W ISO weeks (UTC), this one included.
    pub keep_weekly: Option<u32>,
}

impl RetentionPolicy {
    /// True when no rule is set: nothing is ever deleted.
    pub fn keeps_everything(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_within.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
    }
}

/// What [`plan`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keys to delete, in listing order.
    pub delete: Vec<String>,
    /// Snapshots kept, newest first.
    pub keep: Vec<String>,
    /// Generations deleted whole.
    pub generations_deleted: Vec<GenerationId>,
}

const DAY_MS: i64 = 86_400_000;

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS)
}

/// ISO week index: weeks start on Monday; 1970-01-01 was a Thursday.
fn week_of(ms: i64) -> i64 {
    (day_of(ms) + 3).div_euclid(7)
}

fn position_of(k: &ObjectKey) -> u64 {
    match k {
        ObjectKey::Snapshot { position, .. } => *position,
        ObjectKey::Segment { end, .. } => *end,
    }
}

fn newest_ms(objs: &GenerationObjects) -> Option<i64> {
    objs.snapshots
        .iter()
        .chain(&objs.segments)
        .map(|l| l.key.timestamp_ms())
        .max()
}

/// Plans what to delete. `gens` is every generation with its objects; `current` is the
/// generation the replicator writes (if any); `now_ms` is the time to judge ages by.
pub fn plan(
    gens: &[(GenerationId, GenerationObjects)],
    current: Option<GenerationId>,
    now_ms: i64,
    policy: &RetentionPolicy,
) -> Plan {
    let mut out = Plan::default();
    if policy.keeps_everything() {
        out.keep = gens
            .iter()
            .flat_map(|(_, o)| o.snapshots.iter().map(|s| s.name.clone()))
            .collect();
        return out;
    }
    // Every snapshot, newest first (time, then generation, then position).
    let mut snaps: Vec<(&GenerationId, &Listed)> = gens
        .iter()
        .flat_map(|(g, o)| o.snapshots.iter().map(move |s| (g, s)))
        .collect();
    snaps.sort_by_key(|(g, s)| std::cmp::Reverse((s.key.timestamp_ms(), g.0, position_of(&s.key))));

    let mut keep: HashSet<&str> = HashSet::new();
    if let Some(n) = policy.keep_last {
        for (_, s) in snaps.iter().take(n as usize) {
            keep.insert(&s.name);
        }
    }
    if let Some(age) = policy.keep_within {
        let cutoff = now_ms.saturating_sub(age.as_millis().min(i64::MAX as u128) as i64);
        for (_, s) in &snaps {
            if s.key.timestamp_ms() >= cutoff {
                keep.insert(&s.name);
            }
        }
    }
    let mut tier = |count: Option<u32>, bucket: fn(i64) -> i64| {
        let Some(n) = count else { return };
        let now_b = bucket(now_ms);
        let mut seen = HashSet::new();
        for (_, s) in &snaps {
            let b = bucket(s.key.timestamp_ms());
            if now_b - b < i64::from(n) && seen.insert(b) {
                keep.insert(&s.name);
            }
        }
    };
    tier(policy.keep_daily, day_of);
    tier(policy.keep_weekly, week_of);

    // The newest restorable point: the current generation and the one with the newest
    // object keep their newest snapshot whatever the rules say.
    let newest_gen = gens
        .iter()
        .filter_map(|(g, o)| newest_ms(o).map(|t| (t, g.0, *g)))
        .max()
        .map(|(_, _, g)| g);
    let protected: HashSet<GenerationId> = current.into_iter().chain(newest_gen).collect();
    for (g, o) in gens {
        if protected.contains(g)
            && let Some(s) = o.snapshots.first()
        {
            keep.insert(&s.name);
        }
    }
    // Whole generations are superseded only by a snapshot of the current (else the newest)
    // generation.
    let anchor = current.or(newest_gen);
    let anchor_snapshot_ms = anchor.and_then(|a| {
        gens.iter()
            .find(|(g, _)| *g == a)
            .and_then(|(_, o)| o.snapshots.iter().map(|s| s.key.timestamp_ms()).max())
    });

    for (g, o) in gens {
        let kept: Vec<&Listed> = o
            .snapshots
            .iter()
            .filter(|s| keep.contains(s.name.as_str()))
            .collect();
        if kept.is_empty() {
            let superseded = !protected.contains(g)
                && anchor_snapshot_ms.is_some_and(|a| newest_ms(o).is_none_or(|t| t < a));
            if superseded {
                out.generations_deleted.push(*g);
                out.delete
                    .extend(o.snapshots.iter().map(|s| s.name.clone()));
                out.delete.extend(o.segments.iter().map(|s| s.name.clone()));
            }
            continue;
        }
        let oldest_kept = kept.iter().map(|s| position_of(&s.key)).min().unwrap_or(0);
        out.delete.extend(
            o.snapshots
                .iter()
                .filter(|s| !keep.contains(s.name.as_str()))
                .map(|s| s.name.clone()),
        );
        out.delete.extend(
            o.segments
                .iter()
                .filter(|s| position_of(&s.key) <= oldest_kept)
                .map(|s| s.name.clone()),
        );
    }
    out.keep = snaps
        .iter()
        .filter(|(_, s)| keep.contains(s.name.as_str()))
        .map(|(_, s)| s.name.clone())
        .collect();
    out
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Objects deleted.
    pub deleted: usize,
    /// Snapshots kept.
    pub kept_snapshots: usize,
    /// Generations deleted whole.
    pub generations_deleted: usize,
}

/// Lists the replica, plans with [`plan`] and deletes (in batches of 1000).
pub async fn apply(
    replica: &Replica,
    current: Option<GenerationId>,
    now_ms: i64,
    policy: &RetentionPolicy,
) -> EngineResult<Applied> {
    if policy.keeps_everything() {
        return Ok(Applied::default());
    }
    let mut gens = Vec::new();
    for g in replica.generations().await? {
        gens.push((g, replica.objects(g).await?));
    }
    let p = plan(&gens, current, now_ms, policy);
    for chunk in p.delete.chunks(1000) {
        replica.store().delete_many(chunk).await?;
    }
    Ok(Applied {
        deleted: p.delete.len(),
        kept_snapshots: p.keep.len(),
        generations_deleted: p.generations_deleted.len(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const H: i64 = 3_600_000;
    /// 2026-03-02T00:00:00Z, a Monday.
    const MONDAY: i64 = 1_772_409_600_000;

    fn snap(g: GenerationId, pos: u64, t: i64) -> Listed {
        let key = ObjectKey::Snapshot {
            generation: g,
            position: pos,
            timestamp_ms: t,
        };
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    fn seg(g: GenerationId, start: u64, end: u64, t: i64) -> Listed {
        let key = ObjectKey::Segment {
            generation: g,
            start,
            end,
            timestamp_ms: t,
        };
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    /// A generation with a snapshot every `every` ms from `t0` (positions 10, 20, ...) and a
    /// segment between each two (and after the last).
    fn generation(id: u64, t0: i64, n: u64, every: i64) -> (GenerationId, GenerationObjects) {
        let g = GenerationId(id);
        let mut o = GenerationObjects::default();
        for i in 0..n {
            let t = t0 + i as i64 * every;
            o.snapshots.push(snap(g, 10 * (i + 1), t));
            o.segments
                .push(seg(g, 10 * (i + 1), 10 * (i + 2), t + every / 2));
        }
        o.snapshots.reverse();
        (g, o)
    }

    fn snapshot_positions(p: &Plan, gens: &[(GenerationId, GenerationObjects)]) -> Vec<u64> {
        let mut v: Vec<u64> = gens
            .iter()
            .flat_map(|(_, o)| o.snapshots.iter())
            .filter(|s| !p.delete.contains(&s.name))
            .map(|s| position_of(&s.key))
            .collect();
        v.sort();
        v
    }

    fn remaining_segments(p: &Plan, gens: &[(GenerationId, GenerationObjects)]) -> Vec<u64> {
        let mut v: Vec<u64> = gens
            .iter()
            .flat_map(|(_, o)| o.segments.iter())
            .filter(|s| !p.delete.contains(&s.name))
            .map(|s| match s.key {
                ObjectKey::Segment { start, .. } => start,
                _ => 0,
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn no_rule_keeps_everything() {
        let gens = vec![generation(1, MONDAY, 5, H)];
        let p = plan(
            &gens,
            Some(GenerationId(1)),
            MONDAY + 100 * H,
            &Default::default(),
        );
        assert!(p.delete.is_empty());
        assert_eq!(p.keep.len(), 5);
    }

    #[test]
    fn keep_last_deletes_older_snapshots_and_the_segments_before_the_oldest_kept() {
        let gens = vec![generation(1, MONDAY, 6, H)];
        let policy = RetentionPolicy {
            keep_last: Some(2),
            ..Default::default()
        };
        let p = plan(&gens, Some(GenerationId(1)), MONDAY + 6 * H, &policy);
        assert_eq!(snapshot_positions(&p, &gens), vec![50, 60]);
        // Segments from 50 on stay (they continue the kept snapshots); earlier ones go.
        assert_eq!(remaining_segments(&p, &gens), vec![50, 60]);
        assert!(p.generations_deleted.is_empty());
    }

    #[test]
    fn keep_within_is_by_age_on_the_given_clock() {
        let gens = vec![generation(1, MONDAY, 10, H)];
        let policy = RetentionPolicy {
            keep_within: Some(Duration::from_secs(3 * 3600)),
            ..Default::default()
        };
        // Snapshots at +0h..+9h; now = +10h: those at +7h, +8h, +9h are younger than 3h.
        let p = plan(&gens, Some(GenerationId(1)), MONDAY + 10 * H, &policy);
        assert_eq!(snapshot_positions(&p, &gens), vec![80, 90, 100]);
        // Later, with no new snapshot, the newest is still kept: it is the newest
        // restorable point.
        let p = plan(&gens, Some(GenerationId(1)), MONDAY + 100 * H, &policy);
        assert_eq!(snapshot_positions(&p, &gens), vec![100]);
        assert_eq!(remaining_segments(&p, &gens), vec![100]);
    }

    #[test]
    fn daily_and_weekly_tiers_keep_the_newest_of_each_period() {
        // A snapshot every 6 hours for 30 days.
        let gens = vec![generation(1, MONDAY, 4 * 30, 6 * H)];
        let now = MONDAY + 30 * 24 * H; // the Wednesday, 30 days later, at midnight
        let policy = RetentionPolicy {
            keep_daily: Some(3),
            ..Default::default()
        };
        let p = plan(&gens, Some(GenerationId(1)), now, &policy);
        // Today has no snapshot yet (it is midnight); the last two days' newest (18:00)
        // are kept: days 28 and 29.
        let kept: Vec<i64> = p
            .keep
            .iter()
            .map(|k| ObjectKey::parse(k).unwrap().timestamp_ms())
            .collect();
        assert_eq!(
            kept,
            vec![MONDAY + (29 * 24 + 18) * H, MONDAY + (28 * 24 + 18) * H]
        );

        let policy = RetentionPolicy {
            keep_weekly: Some(3),
            ..Default::default()
        };
        let p = plan(&gens, Some(GenerationId(1)), now, &policy);
        let kept: Vec<i64> = p
            .keep
            .iter()
            .map(|k| ObjectKey::parse(k).unwrap().timestamp_ms())
            .collect();
        // Weeks start on Mondays: day 28 (Monday) starts this week; the newest of this week
        // (day 29, 18:00), of last week (day 27, Sunday 18:00) and the one before (day 20).
        assert_eq!(
            kept,
            vec![
                MONDAY + (29 * 24 + 18) * H,
                MONDAY + (27 * 24 + 18) * H,
                MONDAY + (20 * 24 + 18) * H
            ]
        );

        // Tiers add up (union).
        let policy = RetentionPolicy {
            keep_last: Some(1),
            keep_daily: Some(3),
            keep_weekly: Some(3),
            ..Default::default()
        };
        let p = plan(&gens, Some(GenerationId(1)), now, &policy);
        assert_eq!(p.keep.len(), 4);
        // Segments before the oldest kept snapshot (day 20, 18:00) are gone; after it, all
        // stay (point-in-time restore between kept snapshots).
        let oldest_pos = 10 * (20 * 4 + 3 + 1);
        let segs = remaining_segments(&p, &gens);
        assert_eq!(segs.first(), Some(&oldest_pos));
        assert_eq!(segs.len() as u64, 120 - (oldest_pos / 10 - 1));
    }

    #[test]
    fn superseded_generations_go_only_after_the_current_one_has_a_snapshot() {
        let old = generation(1, MONDAY, 3, H);
        let current = generation(2, MONDAY + 5 * H, 2, H);
        let policy = RetentionPolicy {
            keep_last: Some(1),
            ..Default::default()
        };
        let gens = vec![current.clone(), old.clone()];
        let p = plan(&gens, Some(GenerationId(2)), MONDAY + 10 * H, &policy);
        assert_eq!(p.generations_deleted, vec![GenerationId(1)]);
        for s in old.1.snapshots.iter().chain(&old.1.segments) {
            assert!(p.delete.contains(&s.name));
        }
        assert_eq!(snapshot_positions(&p, &gens), vec![20]);

        // The current generation has no snapshot yet (never true of a replicator, but a
        // listing can be odd): nothing of the old one goes.
        let mut bare = current.clone();
        bare.1.snapshots.clear();
        let gens = vec![bare, old.clone()];
        let p = plan(&gens, Some(GenerationId(2)), MONDAY + 10 * H, &policy);
        assert!(p.generations_deleted.is_empty());
        assert!(!p.delete.contains(&old.1.snapshots[0].name));
    }

    #[test]
    fn a_generation_with_newer_objects_than_the_current_snapshot_is_not_superseded() {
        // A one-shot snapshot (generation 3) was taken after the current generation's last
        // snapshot; and generation 1 still received a segment after it too.
        let current = generation(2, MONDAY, 2, H); // snapshots at 0h, 1h
        let g3 = (GenerationId(3), {
            let mut o = GenerationObjects::default();
            o.snapshots.push(snap(GenerationId(3), 5, MONDAY + 2 * H));
            o
        });
        let mut g1 = generation(1, MONDAY - 10 * H, 1, H);
        g1.1.segments
            .push(seg(GenerationId(1), 20, 30, MONDAY + 3 * H));
        let policy = RetentionPolicy {
            keep_last: Some(1),
            ..Default::default()
        };
        let gens = vec![g3.clone(), current.clone(), g1.clone()];
        let p = plan(&gens, Some(GenerationId(2)), MONDAY + 4 * H, &policy);
        // Generation 1 holds the newest object: protected, its newest snapshot kept.
        assert!(p.generations_deleted.is_empty());
        assert!(!p.delete.contains(&g1.1.snapshots[0].name));
        // The current generation keeps its newest snapshot and what follows it.
        assert!(!p.delete.contains(&current.1.snapshots[0].name));
        assert!(!p.delete.contains(&current.1.segments[1].name));
        // Generation 3's snapshot is the newest snapshot overall: kept by keep_last.
        assert!(!p.delete.contains(&g3.1.snapshots[0].name));
        // The current generation's older snapshot and the segment before its newest go.
        assert!(p.delete.contains(&current.1.snapshots[1].name));
        assert!(p.delete.contains(&current.1.segments[0].name));
    }

    #[test]
    fn without_a_current_generation_the_newest_one_is_protected() {
        let gens = vec![
            generation(2, MONDAY + 5 * H, 3, H),
            generation(1, MONDAY, 3, H),
        ];
        let policy = RetentionPolicy {
            keep_last: Some(0),
            ..Default::default()
        };
        let p = plan(&gens, None, MONDAY + 100 * H, &policy);
        assert_eq!(p.generations_deleted, vec![GenerationId(1)]);
        assert_eq!(snapshot_positions(&p, &gens), vec![30]);
        assert_eq!(remaining_segments(&p, &gens), vec![30]);
    }

    #[test]
    fn snapshots_from_the_future_count_as_young() {
        // A clock that jumped back: the snapshot's time is after `now`.
        let gens = vec![generation(1, MONDAY + 50 * H, 3, H)];
        let policy = RetentionPolicy {
            keep_within: Some(Duration::from_secs(3600)),
            keep_daily: Some(1),
            ..Default::default()
        };
        let p = plan(&gens, Some(GenerationId(1)), MONDAY, &policy);
        assert!(p.delete.is_empty(), "{:?}", p.delete);
    }
}
