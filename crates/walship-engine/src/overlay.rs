//! The WAL overlay: for each page with a shipped frame in the current WAL incarnation, the
//! index of its latest such frame. A snapshot takes those pages from the WAL instead of the
//! database file (see [`crate::snapshot`]), reading the overlay in page order.
//!
//! Its memory is bounded whatever the sizes of the WAL and the database. A replicator far
//! behind a slow store, or beside an app that writes faster than the disk copies back, can
//! have a WAL of gigabytes that never restarts and holds every page of a database of many
//! gigabytes: millions of pages. So the overlay keeps at most [`SPILL_PAGES`] pages in
//! memory — a hash map (about 9 bytes a page), or, once those pages are a large enough part
//! of the page numbers up to the highest one, a plain array indexed by page number (4 bytes
//! a page number) — and writes them out as a *run* when it holds that many: a file of
//! (page number, frame index) pairs in page order, unnamed, in the database's directory,
//! gone when the last handle to it drops. Runs are merged into one past [`MAX_RUNS`]. A
//! page's latest frame is the one in memory, else the one in the newest run holding it.
//!
//! A run that cannot be written (a full disk) is logged and the pages stay in memory: the
//! overlay is then larger, never wrong.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Pages kept in memory before they are written out as a run: a map of this many entries
/// fits in 2^18 slots of 9 bytes (2.3 MiB); the array, 4 bytes per page number, at most
/// twice that. Sorting them to write a run takes 8 bytes a page for a moment.
pub const SPILL_PAGES: usize = 229_376;

/// Runs kept before they are merged into one: a snapshot reads each through a buffer of
/// [`RUN_READ_BYTES`].
pub const MAX_RUNS: usize = 8;

/// Bytes read from a run at a time.
const RUN_READ_BYTES: usize = 64 << 10;

/// Bytes of one run entry: page number and frame index, little-endian.
const ENTRY: usize = 8;

/// Frame indexes by page number (see the module documentation).
#[derive(Debug, Clone)]
pub struct Overlay {
    mem: Mem,
    /// Written out, oldest first; shared with clones (a snapshot reading them).
    runs: Vec<Arc<Run>>,
    /// Where runs are written; the system's temporary directory if unset.
    dir: Option<PathBuf>,
    /// Pages in memory that trigger a run (doubled after a failed write).
    spill_at: usize,
    /// `spill_at` as set.
    limit: usize,
}

impl Default for Overlay {
    fn default() -> Self {
        Overlay {
            mem: Mem::default(),
            runs: Vec::new(),
            dir: None,
            spill_at: SPILL_PAGES,
            limit: SPILL_PAGES,
        }
    }
}

impl Overlay {
    /// An empty overlay that keeps up to `pages` pages in memory ([`SPILL_PAGES`] by
    /// default) and writes the rest as runs into `dir` (the database's directory).
    pub fn spilling_every(dir: &Path, pages: usize) -> Self {
        Overlay {
            dir: Some(dir.to_path_buf()),
            spill_at: pages.max(1),
            limit: pages.max(1),
            ..Overlay::default()
        }
    }

    /// Records `index` as the latest frame of `pgno` (page numbers start at 1). Frame
    /// indexes only grow within an incarnation.
    pub fn insert(&mut self, pgno: u32, index: u32) {
        self.mem.insert(pgno, index);
        if self.mem.len() >= self.spill_at {
            self.spill();
        }
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.mem.len() == 0 && self.runs.is_empty()
    }

    /// Pages held in memory (the runs' are on disk).
    #[cfg(test)]
    fn in_memory(&self) -> usize {
        self.mem.len()
    }

    /// Runs written out.
    #[cfg(test)]
    fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Forgets every page (a new WAL incarnation), releasing the memory and the runs (a
    /// snapshot still reading them keeps them until it is done).
    pub fn clear(&mut self) {
        self.mem = Mem::default();
        self.runs.clear();
        self.spill_at = self.limit;
    }

    /// A reader of the overlay in ascending page order.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            mem: &self.mem,
            // Newest first: the first run holding a page has its latest frame.
            runs: self.runs.iter().rev().map(RunCursor::new).collect(),
            last: 0,
        }
    }

    /// Writes the pages in memory out as a run, and merges the runs if there are too many.
    fn spill(&mut self) {
        let dir = self.dir.clone().unwrap_or_else(std::env::temp_dir);
        let pages = self.mem.len();
        let t0 = std::time::Instant::now();
        match write_run(&dir, self.mem.sorted()) {
            Ok(run) => {
                self.runs.push(Arc::new(run));
                self.mem = Mem::default();
            }
            Err(e) => {
                self.spill_at = self.spill_at.saturating_mul(2);
                tracing::warn!(dir = %dir.display(), pages, error = %e, "could not write the WAL overlay's pages to disk; keeping them in memory");
                return;
            }
        }
        if self.runs.len() > MAX_RUNS {
            match merge_runs(&dir, &self.runs) {
                Ok(run) => self.runs = vec![Arc::new(run)],
                // The runs stay as they are: reading them costs a buffer each.
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), runs = self.runs.len(), error = %e, "could not merge the WAL overlay's runs")
                }
            }
        }
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(
            pages,
            runs = self.runs.len(),
            elapsed_ms,
            "WAL overlay pages written out"
        );
    }
}

/// Reads the overlay in ascending page order (see [`Overlay::cursor`]).
pub struct Cursor<'a> {
    mem: &'a Mem,
    runs: Vec<RunCursor>,
    last: u32,
}

impl Cursor<'_> {
    /// The latest frame index of `pgno`, if it has one. Page numbers must grow from one
    /// call to the next.
    pub fn frame_of(&mut self, pgno: u32) -> io::Result<Option<u32>> {
        if pgno <= self.last {
            return Err(io::Error::other(format!(
                "WAL overlay read out of order (page {pgno} after {})",
                self.last
            )));
        }
        self.last = pgno;
        let mut found = self.mem.get(pgno);
        for r in &mut self.runs {
            let f = r.frame_of(pgno)?;
            if found.is_none() {
                found = f;
            }
        }
        Ok(found)
    }
}

/// A run: entries sorted by page number, one per page, in an unnamed file.
#[derive(Debug)]
struct Run {
    file: File,
    entries: u64,
}

/// Reads one run forward.
struct RunCursor {
    run: Arc<Run>,
    buf: Vec<u8>,
    /// Entries in `buf`, and the next one to look at.
    len: usize,
    at: usize,
    /// Entries read from the file so far.
    read: u64,
}

impl RunCursor {
    fn new(run: &Arc<Run>) -> Self {
        RunCursor {
            run: run.clone(),
            buf: Vec::new(),
            len: 0,
            at: 0,
            read: 0,
        }
    }

    /// The entry under the cursor, reading more of the file when the buffer is used up;
    /// `None` at the end of the run.
    fn current(&mut self) -> io::Result<Option<(u32, u32)>> {
        if self.at == self.len {
            let left = self.run.entries - self.read;
            if left == 0 {
                return Ok(None);
            }
            let n = left.min((RUN_READ_BYTES / ENTRY) as u64) as usize;
            self.buf.resize(n * ENTRY, 0);
            self.run
                .file
                .read_exact_at(&mut self.buf, self.read * ENTRY as u64)?;
            self.read += n as u64;
            self.len = n;
            self.at = 0;
        }
        let e = &self.buf[self.at * ENTRY..(self.at + 1) * ENTRY];
        Ok(Some(entry(e)))
    }

    fn frame_of(&mut self, pgno: u32) -> io::Result<Option<u32>> {
        while let Some((p, f)) = self.current()? {
            if p > pgno {
                return Ok(None);
            }
            self.at += 1;
            if p == pgno {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }
}

fn entry(b: &[u8]) -> (u32, u32) {
    let word = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    (word(0), word(4))
}

/// Writes `entries` (sorted by page number, one per page) as a run in `dir`.
fn write_run(dir: &Path, entries: impl Iterator<Item = (u32, u32)>) -> io::Result<Run> {
    let file = tempfile::tempfile_in(dir)?;
    let mut w = BufWriter::with_capacity(RUN_READ_BYTES, &file);
    let mut n = 0u64;
    for (p, f) in entries {
        w.write_all(&p.to_le_bytes())?;
        w.write_all(&f.to_le_bytes())?;
        n += 1;
    }
    w.flush()?;
    drop(w);
    Ok(Run { file, entries: n })
}

/// Merges `runs` (oldest first) into one: each page once, with its frame from the newest
/// run holding it.
fn merge_runs(dir: &Path, runs: &[Arc<Run>]) -> io::Result<Run> {
    let mut cursors: Vec<RunCursor> = runs.iter().rev().map(RunCursor::new).collect();
    let mut err = None;
    let merged = std::iter::from_fn(|| {
        let mut lowest: Option<u32> = None;
        for c in &mut cursors {
            match c.current() {
                Ok(Some((p, _))) => lowest = Some(lowest.map_or(p, |l| l.min(p))),
                Ok(None) => {}
                Err(e) => {
                    err = Some(e);
                    return None;
                }
            }
        }
        let p = lowest?;
        let mut frame = None;
        for c in &mut cursors {
            match c.frame_of(p) {
                Ok(f) => frame = frame.or(f),
                Err(e) => {
                    err = Some(e);
                    return None;
                }
            }
        }
        frame.map(|f| (p, f))
    });
    let run = write_run(dir, merged);
    match err {
        Some(e) => Err(e),
        None => run,
    }
}

/// The pages in memory.
#[derive(Debug, Clone)]
enum Mem {
    /// Few pages, or pages spread over a wide range of numbers; `max` is the highest page
    /// number held.
    Sparse { map: HashMap<u32, u32>, max: u32 },
    /// `frames[pgno]`: the frame index, 0 for a page without one (frame indexes start at
    /// 1, page numbers at 1; slot 0 is unused).
    Dense { frames: Vec<u32>, len: usize },
}

impl Default for Mem {
    fn default() -> Self {
        Mem::Sparse {
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

impl Mem {
    fn insert(&mut self, pgno: u32, index: u32) {
        debug_assert!(pgno > 0 && index > 0);
        match self {
            Mem::Sparse { map, max } => {
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
                    *self = Mem::Dense {
                        frames,
                        len: map.len(),
                    };
                }
            }
            Mem::Dense { frames, len } => {
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
                        *self = Mem::Sparse { map, max: pgno };
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

    fn get(&self, pgno: u32) -> Option<u32> {
        match self {
            Mem::Sparse { map, .. } => map.get(&pgno).copied(),
            Mem::Dense { frames, .. } => frames.get(pgno as usize).copied().filter(|&i| i != 0),
        }
    }

    fn len(&self) -> usize {
        match self {
            Mem::Sparse { map, .. } => map.len(),
            Mem::Dense { len, .. } => *len,
        }
    }

    /// The pages held, in ascending order.
    fn sorted(&self) -> Box<dyn Iterator<Item = (u32, u32)> + '_> {
        match self {
            Mem::Sparse { map, .. } => {
                let mut v: Vec<(u32, u32)> = map.iter().map(|(&p, &i)| (p, i)).collect();
                v.sort_unstable();
                Box::new(v.into_iter())
            }
            Mem::Dense { frames, .. } => Box::new(
                frames
                    .iter()
                    .enumerate()
                    .filter(|&(_, &i)| i != 0)
                    .map(|(p, &i)| (p as u32, i)),
            ),
        }
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

    /// Inserts `ops` into `o` and into a map, then reads every page up to past the highest
    /// (and around each page held) through a cursor: the overlay must answer as the map does.
    fn same_as_a_map(mut o: Overlay, ops: &[(u32, u32)]) -> Overlay {
        let mut m = HashMap::new();
        for &(p, i) in ops {
            o.insert(p, i);
            m.insert(p, i);
        }
        let mut probes: Vec<u32> = (1..100_000u32)
            .chain(
                m.keys()
                    .flat_map(|&p| [p - 1, p, p.saturating_add(1)])
                    .filter(|&p| p > 0),
            )
            .collect();
        probes.sort_unstable();
        probes.dedup();
        let mut c = o.cursor();
        for p in probes {
            assert_eq!(c.frame_of(p).unwrap(), m.get(&p).copied(), "page {p}");
        }
        o
    }

    fn in_mem(ops: &[(u32, u32)]) -> Overlay {
        same_as_a_map(Overlay::default(), ops)
    }

    #[test]
    fn a_few_pages_stay_in_a_map() {
        let o = in_mem(&[(5, 1), (9, 2), (5, 3), (1_000_000, 4)]);
        assert!(matches!(o.mem, Mem::Sparse { .. }));
        assert_eq!(o.runs(), 0);
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
        let o = in_mem(&ops);
        match &o.mem {
            Mem::Dense { frames, len } => {
                assert_eq!(*len, 20_000);
                // 4 bytes a page, not the map's 9 to 18.
                assert!(frames.len() * 4 <= 20_000 * 6, "{} slots", frames.len());
            }
            Mem::Sparse { .. } => panic!("still a map"),
        }
    }

    #[test]
    fn a_page_far_past_the_array_turns_it_back_into_a_map() {
        let mut ops: Vec<(u32, u32)> = (1..=8192u32).map(|p| (p, p)).collect();
        ops.push((4_000_000_000, 9000));
        ops.push((7, 9001));
        let o = in_mem(&ops);
        assert!(matches!(o.mem, Mem::Sparse { .. }));
    }

    #[test]
    fn clearing_forgets_every_page_and_every_run() {
        let dir = tempfile::tempdir().unwrap();
        let ops: Vec<(u32, u32)> = (1..=10_000u32).map(|p| (p, p)).collect();
        let mut o = same_as_a_map(Overlay::spilling_every(dir.path(), 3000), &ops);
        assert_eq!(o.runs(), 3);
        o.clear();
        assert!(o.is_empty());
        assert_eq!(o.runs(), 0);
        assert_eq!(o.cursor().frame_of(1).unwrap(), None);
    }

    #[test]
    fn pages_past_the_limit_go_to_runs_and_the_newest_frame_wins() {
        // Fresh pages appended, the low pages (the b-tree's top) rewritten in every
        // transaction, and older pages rewritten now and then: the latest frame of a page
        // may be in memory, in any run, or in an older run than one holding an older frame.
        let dir = tempfile::tempdir().unwrap();
        let mut ops = Vec::new();
        let mut index = 0u32;
        let mut next_fresh = 100u32;
        for t in 0..3000u32 {
            for p in 1..=4u32 {
                index += 1;
                ops.push((p, index));
            }
            for _ in 0..20 {
                index += 1;
                ops.push((next_fresh, index));
                next_fresh += 1;
            }
            if t % 5 == 0 {
                index += 1;
                ops.push((100 + (t * 7919) % (next_fresh - 100), index));
            }
        }
        let o = same_as_a_map(Overlay::spilling_every(dir.path(), 1000), &ops);
        // 60,000 fresh pages, 1,000 at a time: merged whenever there were more than 8.
        assert!(o.runs() >= 1 && o.runs() <= MAX_RUNS, "{} runs", o.runs());
        assert!(o.in_memory() < 1000);
    }

    #[test]
    fn memory_stays_under_the_limit_whatever_the_wal_holds() {
        // Four million distinct pages, as in a WAL of 16 GB that never restarted.
        let dir = tempfile::tempdir().unwrap();
        let mut o = Overlay::spilling_every(dir.path(), SPILL_PAGES);
        for p in 1..=4_000_000u32 {
            o.insert(p, p);
            assert!(o.in_memory() < SPILL_PAGES);
        }
        assert!(o.runs() <= MAX_RUNS);
        let mut c = o.cursor();
        for p in [1, 2, 229_376, 229_377, 3_999_999, 4_000_000] {
            assert_eq!(c.frame_of(p).unwrap(), Some(p), "page {p}");
        }
        assert_eq!(c.frame_of(4_000_001).unwrap(), None);
    }

    #[test]
    fn a_clone_reads_its_runs_after_the_original_clears() {
        // A snapshot reads a clone while the loop moves on to a new incarnation.
        let dir = tempfile::tempdir().unwrap();
        let mut o = Overlay::spilling_every(dir.path(), 100);
        for p in 1..=250u32 {
            o.insert(p, p + 10);
        }
        let snap = o.clone();
        o.clear();
        o.insert(3, 1);
        let mut c = snap.cursor();
        for p in 1..=250u32 {
            assert_eq!(c.frame_of(p).unwrap(), Some(p + 10));
        }
    }

    #[test]
    fn a_run_that_cannot_be_written_keeps_the_pages_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let ops: Vec<(u32, u32)> = (1..=500u32).map(|p| (p, p)).collect();
        let o = same_as_a_map(Overlay::spilling_every(&missing, 100), &ops);
        assert_eq!(o.runs(), 0);
        assert_eq!(o.in_memory(), 500);
        assert!(o.spill_at > 100);
    }

    #[test]
    fn reading_backwards_is_refused() {
        let o = in_mem(&[(5, 1)]);
        let mut c = o.cursor();
        assert_eq!(c.frame_of(5).unwrap(), Some(1));
        assert!(c.frame_of(5).is_err());
        assert!(c.frame_of(4).is_err());
    }
}
