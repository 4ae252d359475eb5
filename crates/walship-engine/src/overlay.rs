//! The WAL overlay: for each page with a shipped frame in the current WAL incarnation, the
//! index of its latest such frame. A snapshot takes those pages from the WAL instead of the
//! database file (see [`crate::snapshot`]).
//!
//! It grows with the distinct pages the WAL holds, not with the database: a replicator far
//! behind a slow store can have a WAL of gigabytes that never restarts, and a hash map of
//! 20-byte entries for a million pages took 22 MiB (44 MiB while it grew). So the overlay
//! keeps only each page's frame index, and once the pages it holds are a large enough part
//! of the page numbers up to the highest one, it switches from a hash map (about 9 bytes a
//! page, twice that right after growing) to a plain array indexed by page number (4 bytes
//! a page number); a page far past that array's end switches it back.

use std::collections::HashMap;

/// Frame indexes by page number (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// Few pages, or pages spread over a wide range of numbers; `max` is the highest page
    /// number held.
    Sparse { map: HashMap<u32, u32>, max: u32 },
    /// `frames[pgno]`: the frame index, 0 for a page without one (frame indexes start at
    /// 1, page numbers at 1; slot 0 is unused).
    Dense { frames: Vec<u32>, len: usize },
}

impl Default for Overlay {
    fn default() -> Self {
        Overlay::Sparse {
            map: HashMap::new(),
            max: 0,
        }
    }
}

/// A dense array is used once it costs at most this many bytes per page held: 4 bytes per
/// page number against about 9 to 18 per page in the hash map.
const DENSE_MAX_BYTES_PER_PAGE: usize = 8;

/// Pages below which the hash map is always kept (its size does not matter then).
const SPARSE_PAGES: usize = 4096;

impl Overlay {
    /// Records `index` as the latest frame of `pgno` (page numbers start at 1).
    pub fn insert(&mut self, pgno: u32, index: u32) {
        debug_assert!(pgno > 0 && index > 0);
        match self {
            Overlay::Sparse { map, max } => {
                map.insert(pgno, index);
                *max = (*max).max(pgno);
                let slots = *max as usize + 1;
                // Looked at as the map doubles: the switch is as rare as its growth.
                if map.len() >= SPARSE_PAGES
                    && map.len().is_power_of_two()
                    && dense_pays(slots, map.len())
                {
                    let mut frames = vec![0u32; slots];
                    for (&p, &i) in map.iter() {
                        frames[p as usize] = i;
                    }
                    *self = Overlay::Dense {
                        frames,
                        len: map.len(),
                    };
                }
            }
            Overlay::Dense { frames, len } => {
                let p = pgno as usize;
                if p >= frames.len() {
                    if !dense_pays(p + 1, *len + 1) {
                        let mut map: HashMap<u32, u32> = HashMap::with_capacity(*len + 1);
                        for (q, &i) in frames.iter().enumerate() {
                            if i != 0 {
                                map.insert(q as u32, i);
                            }
                        }
                        map.insert(pgno, index);
                        *self = Overlay::Sparse { map, max: pgno };
                        return;
                    }
                    // Grow by half again at least, as a vector would.
                    let want = (p + 1).max(frames.len() + frames.len() / 2);
                    frames.resize(want, 0);
                }
                if frames[p] == 0 {
                    *len += 1;
                }
                frames[p] = index;
            }
        }
    }

    /// The latest frame index of `pgno`, if it has one.
    pub fn get(&self, pgno: u32) -> Option<u32> {
        match self {
            Overlay::Sparse { map, .. } => map.get(&pgno).copied(),
            Overlay::Dense { frames, .. } => frames.get(pgno as usize).copied().filter(|&i| i != 0),
        }
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        match self {
            Overlay::Sparse { map, .. } => map.len(),
            Overlay::Dense { len, .. } => *len,
        }
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every page (a new WAL incarnation), releasing the memory.
    pub fn clear(&mut self) {
        *self = Overlay::default();
    }
}

/// Whether an array of `slots` page numbers costs at most [`DENSE_MAX_BYTES_PER_PAGE`] per
/// page for `pages` pages.
fn dense_pays(slots: usize, pages: usize) -> bool {
    slots.saturating_mul(4) <= pages.saturating_mul(DENSE_MAX_BYTES_PER_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_as_a_map(ops: &[(u32, u32)]) -> Overlay {
        let mut o = Overlay::default();
        let mut m = HashMap::new();
        for &(p, i) in ops {
            o.insert(p, i);
            m.insert(p, i);
        }
        assert_eq!(o.len(), m.len());
        for (&p, &i) in &m {
            assert_eq!(o.get(p), Some(i), "page {p}");
        }
        // Pages never inserted: every number up to the highest held below 100,000, and
        // around each page held.
        let probes = (1..100_000u32).chain(m.keys().flat_map(|&p| [p - 1, p.saturating_add(1)]));
        for p in probes {
            if !m.contains_key(&p) {
                assert_eq!(o.get(p), None, "page {p}");
            }
        }
        o
    }

    #[test]
    fn a_few_pages_stay_in_a_map() {
        let o = same_as_a_map(&[(5, 1), (9, 2), (5, 3), (1_000_000, 4)]);
        assert!(matches!(o, Overlay::Sparse { .. }));
    }

    #[test]
    fn most_pages_of_a_range_become_an_array_and_answer_the_same() {
        // Every page of a growing database written twice, as a WAL far behind holds them.
        let mut ops = Vec::new();
        let mut index = 0;
        for round in 0..2 {
            for p in 1..=20_000u32 {
                index += 1;
                ops.push((if round == 0 { p } else { 20_001 - p }, index));
            }
        }
        let o = same_as_a_map(&ops);
        match &o {
            Overlay::Dense { frames, len } => {
                assert_eq!(*len, 20_000);
                // 4 bytes a page, not the map's 9 to 18.
                assert!(frames.len() * 4 <= 20_000 * 6, "{} slots", frames.len());
            }
            Overlay::Sparse { .. } => panic!("still a map"),
        }
    }

    #[test]
    fn a_page_far_past_the_array_turns_it_back_into_a_map() {
        let mut ops: Vec<(u32, u32)> = (1..=8192u32).map(|p| (p, p)).collect();
        ops.push((4_000_000_000, 9000));
        ops.push((7, 9001));
        let o = same_as_a_map(&ops);
        assert!(matches!(o, Overlay::Sparse { .. }));
    }

    #[test]
    fn clearing_forgets_every_page() {
        let mut o = same_as_a_map(&(1..=10_000u32).map(|p| (p, p)).collect::<Vec<_>>());
        assert!(matches!(o, Overlay::Dense { .. }));
        o.clear();
        assert!(o.is_empty());
        assert_eq!(o.get(1), None);
    }
}
