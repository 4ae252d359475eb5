//! Writer fencing: one replicator per replica prefix (docs/format.md, "Lease").
//!
//! The lease is a series of small JSON objects `lease/<SEQ>` (sequence inverted, so the
//! newest sorts first), each written once with `if_none_match`. Whoever writes sequence
//! `n + 1` after `n` holds the lease; two writers racing for the same next sequence cannot
//! both win. The holder renews by writing the next sequence, but only when it is about to
//! upload and more than half its time-to-live has passed: an idle replicator makes no
//! request, and its lease lapses.
//!
//! A newcomer finds the newest lease and, by [`OnConflict`], waits until it is released or
//! has not been renewed for its time-to-live (measured on the newcomer's own clock, from when
//! it first saw that sequence), takes it over at once, or refuses. A newcomer may continue
//! the replica's newest generation only when the lease was released cleanly or its holder is
//! provably gone (a process on this host that no longer exists); after any other takeover it
//! starts a new generation. So even a holder that goes on writing after it lost its lease
//! (a stalled process, a slow upload) writes only into its own generation: two writers never
//! interleave objects in one generation, whatever the clocks say. The old holder notices at
//! its next renewal and stops with [`EngineError::LeaseLost`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walship_storage::{ListRequest, ObjectStore, PutBody, PutOptions, StorageError};

use crate::error::{EngineError, EngineResult};

/// The directory of lease objects under the replica prefix.
pub const LEASE_DIR: &str = "lease/";

/// Version of the lease object's JSON.
pub const LEASE_VERSION: u32 = 1;

/// What a newcomer does when another live replicator holds the lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnConflict {
    /// Wait until the holder releases the lease or lets it lapse (default).
    #[default]
    Wait,
    /// Take the lease at once; the old holder stops at its next renewal. The newcomer starts
    /// a new generation.
    Takeover,
    /// Refuse to start ([`EngineError::LeaseHeld`]).
    Fail,
}

impl std::str::FromStr for OnConflict {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wait" => Ok(OnConflict::Wait),
            "takeover" => Ok(OnConflict::Takeover),
            "fail" => Ok(OnConflict::Fail),
            other => Err(format!("`{other}` is not wait, takeover or fail")),
        }
    }
}

/// Settings of the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseOptions {
    /// How long a lease stays valid without renewal. Default 30 s.
    pub ttl: Duration,
    /// What to do when another replicator holds it.
    pub on_conflict: OnConflict,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            ttl: Duration::from_secs(30),
            on_conflict: OnConflict::Wait,
        }
    }
}

/// The state a lease object records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Held by its owner until `ttl_ms` after it was written.
    Held,
    /// Given up by its owner after its final sync: anyone may take it and continue.
    Released,
}

/// One lease object (docs/format.md, "Lease").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Format version, [`LEASE_VERSION`].
    pub version: u32,
    /// The sequence number; equal to the one in the key.
    pub seq: u64,
    /// Random id of the writing process (per replicator).
    pub owner: String,
    /// Host name of the writer.
    pub host: String,
    /// Process id of the writer.
    pub pid: u32,
    /// The Linux boot id of the writer's host, if known.
    #[serde(default)]
    pub boot_id: String,
    /// The writer's pid namespace (`pid:[inode]`), if known.
    #[serde(default)]
    pub pid_ns: String,
    /// The writer's start time in clock ticks since boot (`/proc/self/stat`), if known.
    #[serde(default)]
    pub start_ticks: u64,
    /// Held or released.
    pub state: LeaseState,
    /// Time-to-live in milliseconds from the write.
    pub ttl_ms: u64,
    /// Wall-clock time of the write, ms since the Unix epoch (informational: nobody's
    /// decision depends on another machine's clock).
    pub written_ms: i64,
}

impl LeaseRecord {
    /// A short description for messages: `host (pid N), owner X`.
    pub fn describe(&self) -> String {
        format!("{} (pid {}, owner {})", self.host, self.pid, self.owner)
    }
}

/// The key of lease sequence `seq`.
pub fn lease_key(seq: u64) -> String {
    format!("{LEASE_DIR}{:016x}", u64::MAX - seq)
}

/// The sequence of a lease key, if it is one.
pub fn parse_lease_key(key: &str) -> Option<u64> {
    let hex = key.strip_prefix(LEASE_DIR)?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(|v| u64::MAX - v)
}

/// Who this process is, for lease objects.
#[derive(Debug, Clone)]
struct Me {
    host: String,
    pid: u32,
    boot_id: String,
    pid_ns: String,
    start_ticks: u64,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 (start time) of `/proc/<pid>/stat`, and whether the process is a zombie.
fn proc_stat(pid: &str) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow the last `)`.
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, matches!(*state, "Z" | "X")))
}

impl Me {
    fn get() -> Me {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| read_trim("/proc/sys/kernel/hostname"));
        Me {
            host: if host.is_empty() {
                "unknown".into()
            } else {
                host
            },
            pid: std::process::id(),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            start_ticks: proc_stat("self").map_or(0, |(t, _)| t),
        }
    }
}

/// Whether the holder of `rec` is provably gone, and if so, whether it is safe to continue
/// its generation (its process is known to be dead) or not (this host rebooted since; the
/// record might be from another machine with the same name).
fn holder_gone(me: &Me, rec: &LeaseRecord) -> Option<bool> {
    if rec.boot_id.is_empty() || me.boot_id.is_empty() {
        return None;
    }
    if rec.boot_id == me.boot_id && rec.pid_ns == me.pid_ns && !rec.pid_ns.is_empty() {
        if rec.pid == me.pid && rec.start_ticks == me.start_ticks {
            // This very process (another replicator of it, or an earlier lease of ours).
            return None;
        }
        return match proc_stat(&rec.pid.to_string()) {
            None => Some(true),
            Some((_, true)) => Some(true),
            Some((start, false)) if rec.start_ticks != 0 && start != rec.start_ticks => Some(true),
            Some(_) => None,
        };
    }
    if rec.boot_id != me.boot_id && rec.host == me.host {
        // The same host name before a reboot.
        return Some(false);
    }
    None
}

/// The lease as held by this replicator.
#[derive(Debug)]
pub struct Lease {
    store: Arc<dyn ObjectStore>,
    opts: LeaseOptions,
    me: Me,
    owner: String,
    seq: u64,
    /// When the write of `seq` was sent: it is valid until `sent + ttl`.
    sent: Instant,
    /// Sequences of ours not yet deleted.
    stale: Vec<u64>,
    released: bool,
}

/// How the lease was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    /// The replica's newest generation may be continued: there was no lease, it was
    /// released, or its holder is provably gone.
    pub may_resume: bool,
    /// The previous holder, if there was one.
    pub previous: Option<LeaseRecord>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads the newest lease, if any: its sequence and record (`None` for an object that is not
/// a readable lease record, which counts as held).
async fn newest(store: &dyn ObjectStore) -> EngineResult<Option<(u64, Option<LeaseRecord>)>> {
    let page = store
        .list_page(&ListRequest {
            prefix: LEASE_DIR.to_string(),
            max_keys: Some(100),
            ..Default::default()
        })
        .await?;
    let Some(seq) = page
        .objects
        .iter()
        .filter_map(|o| parse_lease_key(&o.key))
        .max()
    else {
        return Ok(None);
    };
    Ok(Some((seq, read_record(store, seq).await?)))
}

async fn read_record(store: &dyn ObjectStore, seq: u64) -> EngineResult<Option<LeaseRecord>> {
    let body = match store.get(&lease_key(seq), None).await {
        Ok(b) => b.collect().await?,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(serde_json::from_slice::<LeaseRecord>(&body)
        .ok()
        .filter(|r| r.seq == seq))
}

impl Lease {
    /// Takes the lease of `store`'s prefix, waiting as `opts.on_conflict` says. Cancelling
    /// `cancel` while waiting returns [`EngineError::Cancelled`].
    pub async fn acquire(
        store: Arc<dyn ObjectStore>,
        opts: LeaseOptions,
        cancel: &CancellationToken,
    ) -> EngineResult<(Lease, Acquired)> {
        let me = Me::get();
        let owner = format!("{:016x}", rand::random::<u64>());
        let mut lease = Lease {
            store,
            opts,
            me,
            owner,
            seq: 0,
            sent: Instant::now(),
            stale: Vec::new(),
            released: false,
        };
        // First sight of each (sequence) held by someone else, on our clock.
        let mut seen: HashMap<u64, Instant> = HashMap::new();
        let mut logged_wait = false;
        loop {
            let found = newest(lease.store.as_ref()).await?;
            let (next, may_resume, previous) = match found {
                None => (1, true, None),
                Some((seq, rec)) => {
                    let ttl = rec.as_ref().map_or(lease.opts.ttl, |r| {
                        Duration::from_millis(r.ttl_ms).max(Duration::from_millis(1))
                    });
                    let first = *seen.entry(seq).or_insert_with(Instant::now);
                    match &rec {
                        Some(r) if r.state == LeaseState::Released => (seq + 1, true, rec),
                        Some(r) if r.owner == lease.owner => (seq + 1, true, rec),
                        Some(r) => match holder_gone(&lease.me, r) {
                            Some(safe) => {
                                tracing::info!(holder = %r.describe(), "previous lease holder is gone; taking the lease");
                                (seq + 1, safe, rec)
                            }
                            None => match lease.opts.on_conflict {
                                OnConflict::Fail => {
                                    return Err(EngineError::LeaseHeld {
                                        replica: lease.store.describe(),
                                        holder: r.describe(),
                                    });
                                }
                                OnConflict::Takeover => {
                                    tracing::warn!(holder = %r.describe(), "taking the lease over (--on-conflict takeover); starting a new generation");
                                    (seq + 1, false, rec)
                                }
                                OnConflict::Wait if first.elapsed() >= ttl + ttl / 10 => {
                                    tracing::warn!(holder = %r.describe(), "lease lapsed; taking it over and starting a new generation");
                                    (seq + 1, false, rec)
                                }
                                OnConflict::Wait => {
                                    if !logged_wait {
                                        tracing::warn!(holder = %r.describe(), replica = %lease.store.describe(), "another replicator holds the lease; waiting until it is released or lapses");
                                        logged_wait = true;
                                    }
                                    let left = (ttl + ttl / 10).saturating_sub(first.elapsed());
                                    let poll = (ttl / 6)
                                        .clamp(Duration::from_millis(100), Duration::from_secs(5))
                                        .min(left + Duration::from_millis(10));
                                    tokio::select! {
                                        _ = cancel.cancelled() => return Err(EngineError::Cancelled),
                                        _ = tokio::time::sleep(poll) => {}
                                    }
                                    continue;
                                }
                            },
                        },
                        None => match lease.opts.on_conflict {
                            // An unreadable lease object: treat it as held, with our ttl.
                            OnConflict::Fail => {
                                return Err(EngineError::LeaseHeld {
                                    replica: lease.store.describe(),
                                    holder: format!(
                                        "an unreadable lease object `{}`",
                                        lease_key(seq)
                                    ),
                                });
                            }
                            OnConflict::Takeover => (seq + 1, false, None),
                            OnConflict::Wait if first.elapsed() >= ttl => (seq + 1, false, None),
                            OnConflict::Wait => {
                                tokio::select! {
                                    _ = cancel.cancelled() => return Err(EngineError::Cancelled),
                                    _ = tokio::time::sleep((ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(5))) => {}
                                }
                                continue;
                            }
                        },
                    }
                }
            };
            if lease.write(next, LeaseState::Held).await? {
                // Older sequences are of no use to anyone.
                if next > 1 {
                    lease.stale.extend(next.saturating_sub(100).max(1)..next);
                    lease.prune().await;
                }
                tracing::info!(seq = next, owner = %lease.owner, may_resume, "lease acquired");
                return Ok((
                    lease,
                    Acquired {
                        may_resume,
                        previous,
                    },
                ));
            }
            // Someone else wrote that sequence first: look again.
        }
    }

    /// Writes sequence `seq` with `if_none_match`. `Ok(false)` if another writer has it.
    async fn write(&mut self, seq: u64, state: LeaseState) -> EngineResult<bool> {
        let rec = LeaseRecord {
            version: LEASE_VERSION,
            seq,
            owner: self.owner.clone(),
            host: self.me.host.clone(),
            pid: self.me.pid,
            boot_id: self.me.boot_id.clone(),
            pid_ns: self.me.pid_ns.clone(),
            start_ticks: self.me.start_ticks,
            state,
            ttl_ms: self.opts.ttl.as_millis() as u64,
            written_ms: now_ms(),
        };
        let body = serde_json::to_vec(&rec)
            .map_err(|e| EngineError::Task(format!("encode lease: {e}")))?;
        let sent = Instant::now();
        let key = lease_key(seq);
        let r = self
            .store
            .put_with(
                &key,
                PutBody::Bytes(Bytes::from(body)),
                &PutOptions {
                    if_none_match: true,
                },
            )
            .await;
        let ours = match r {
            Ok(()) => true,
            Err(StorageError::AlreadyExists { .. }) => {
                // Ours if a retried put whose first answer was lost wrote it.
                read_record(self.store.as_ref(), seq)
                    .await?
                    .is_some_and(|r| r.owner == self.owner)
            }
            Err(e) => return Err(e.into()),
        };
        if ours {
            if self.seq != 0 && self.seq != seq {
                self.stale.push(self.seq);
            }
            self.seq = seq;
            self.sent = sent;
        }
        Ok(ours)
    }

    /// Makes sure the lease is held for at least half its time-to-live, renewing it if need
    /// be. Call before every upload or delete. [`EngineError::LeaseLost`] if another writer
    /// took it; a storage error if the store cannot be reached (then do not upload).
    pub async fn ensure(&mut self) -> EngineResult<()> {
        if self.released {
            return Err(EngineError::LeaseLost {
                replica: self.store.describe(),
                holder: "nobody (released)".into(),
            });
        }
        if std::time::Instant::now() < self.write_deadline() {
            return Ok(());
        }
        let next = self.seq + 1;
        if self.write(next, LeaseState::Held).await? {
            tracing::debug!(seq = next, "lease renewed");
            if self.stale.len() >= 16 {
                self.prune().await;
            }
            return Ok(());
        }
        let holder = match read_record(self.store.as_ref(), next).await? {
            Some(r) => r.describe(),
            None => format!("the writer of `{}`", lease_key(next)),
        };
        Err(EngineError::LeaseLost {
            replica: self.store.describe(),
            holder,
        })
    }

    /// Gives the lease up (after a final sync), so a successor can continue at once.
    pub async fn release(&mut self) -> EngineResult<()> {
        if self.released {
            return Ok(());
        }
        let next = self.seq + 1;
        let ok = self.write(next, LeaseState::Released).await?;
        self.released = true;
        if ok {
            tracing::info!(seq = next, "lease released");
            self.prune().await;
        }
        Ok(())
    }

    /// Until when the holder may start writing without renewing (half the TTL after its
    /// last lease write; see [`Lease::ensure`]).
    pub fn write_deadline(&self) -> std::time::Instant {
        self.sent + self.opts.ttl / 2
    }

    /// The current sequence.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// This holder's owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Deletes older sequences (best effort; one request).
    async fn prune(&mut self) {
        if self.stale.is_empty() {
            return;
        }
        let keys: Vec<String> = self.stale.iter().map(|s| lease_key(*s)).collect();
        match self.store.delete_many(&keys).await {
            Ok(()) => self.stale.clear(),
            Err(e) => tracing::debug!(error = %e, "could not delete old lease objects"),
        }
    }
}

/// The newest lease of a replica, for `walship generations` and status pages.
pub async fn current(store: &dyn ObjectStore) -> EngineResult<Option<LeaseRecord>> {
    Ok(newest(store).await?.and_then(|(_, r)| r))
}

/// Who holds the replica's lease, if a replicator may be writing to it now: the newest
/// lease is not released and its holder is not provably gone (an unreadable lease counts as
/// held). Nothing is waited for, so a holder whose lease lapsed still counts: only its
/// release, or its process found dead on this host, proves it stopped.
pub async fn live_holder(store: &dyn ObjectStore) -> EngineResult<Option<String>> {
    Ok(match newest(store).await? {
        None => None,
        Some((seq, None)) => Some(format!("an unreadable lease (seq {seq})")),
        Some((_, Some(rec))) => live(&Me::get(), &rec).then(|| rec.describe()),
    })
}

/// Whether `rec` says a replicator other than a provably gone one holds the lease.
fn live(me: &Me, rec: &LeaseRecord) -> bool {
    rec.state == LeaseState::Held && holder_gone(me, rec).is_none()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walship_storage::LocalStore;

    fn store(dir: &std::path::Path) -> Arc<dyn ObjectStore> {
        Arc::new(LocalStore::new(dir.to_path_buf()).unwrap())
    }

    fn opts(ttl_ms: u64, on_conflict: OnConflict) -> LeaseOptions {
        LeaseOptions {
            ttl: Duration::from_millis(ttl_ms),
            on_conflict,
        }
    }

    #[test]
    fn keys_sort_newest_first_and_parse_back() {
        assert!(lease_key(2) < lease_key(1));
        assert_eq!(parse_lease_key(&lease_key(7)), Some(7));
        assert_eq!(parse_lease_key("lease/xyz"), None);
        assert_eq!(parse_lease_key("lease/0000000000000000x"), None);
    }

    #[tokio::test]
    async fn first_writer_gets_it_and_may_resume_then_release_lets_the_next_resume() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let c = CancellationToken::new();
        let (mut a, got) = Lease::acquire(s.clone(), opts(60_000, OnConflict::Fail), &c)
            .await
            .unwrap();
        assert!(got.may_resume);
        assert_eq!(a.seq(), 1);
        // A second one is refused while the first holds it.
        let e = Lease::acquire(s.clone(), opts(60_000, OnConflict::Fail), &c)
            .await
            .unwrap_err();
        assert!(matches!(e, EngineError::LeaseHeld { .. }), "{e}");
        a.release().await.unwrap();
        let (b, got) = Lease::acquire(s.clone(), opts(60_000, OnConflict::Fail), &c)
            .await
            .unwrap();
        assert!(got.may_resume);
        assert_eq!(b.seq(), 3);
        assert!(a.ensure().await.is_err());
    }

    #[tokio::test]
    async fn takeover_fences_the_old_holder_and_forbids_resuming() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let c = CancellationToken::new();
        let (mut a, _) = Lease::acquire(s.clone(), opts(200, OnConflict::Wait), &c)
            .await
            .unwrap();
        // Make `a`'s record look like another process's on another host.
        let rec = read_record(s.as_ref(), 1).await.unwrap().unwrap();
        assert_eq!(rec.owner, a.owner);
        let foreign = LeaseRecord {
            host: "elsewhere".into(),
            boot_id: "other-boot".into(),
            ..rec
        };
        s.delete_many(&[lease_key(1)]).await.unwrap();
        s.put(&lease_key(1), serde_json::to_vec(&foreign).unwrap().into())
            .await
            .unwrap();
        let (b, got) = Lease::acquire(s.clone(), opts(200, OnConflict::Takeover), &c)
            .await
            .unwrap();
        assert!(!got.may_resume);
        assert_eq!(b.seq(), 2);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let e = a.ensure().await.unwrap_err();
        assert!(matches!(e, EngineError::LeaseLost { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_waiting_newcomer_takes_a_lapsed_lease_without_resuming() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let foreign = LeaseRecord {
            version: 1,
            seq: 5,
            owner: "someone".into(),
            host: "elsewhere".into(),
            pid: 1,
            boot_id: "other-boot".into(),
            pid_ns: String::new(),
            start_ticks: 0,
            state: LeaseState::Held,
            ttl_ms: 300,
            written_ms: 0,
        };
        s.put(&lease_key(5), serde_json::to_vec(&foreign).unwrap().into())
            .await
            .unwrap();
        let c = CancellationToken::new();
        let t0 = Instant::now();
        let (l, got) = Lease::acquire(s.clone(), opts(60_000, OnConflict::Wait), &c)
            .await
            .unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert!(!got.may_resume);
        assert_eq!(l.seq(), 6);
        assert_eq!(got.previous.unwrap().owner, "someone");
        // The old sequence was cleaned up.
        assert!(s.head(&lease_key(5)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_dead_holder_on_this_host_is_taken_over_at_once_and_may_be_continued() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let me = Me::get();
        if me.boot_id.is_empty() || me.pid_ns.is_empty() {
            return; // not Linux
        }
        // A process that has exited (and been reaped).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = LeaseRecord {
            version: 1,
            seq: 1,
            owner: "dead".into(),
            host: me.host.clone(),
            pid,
            boot_id: me.boot_id.clone(),
            pid_ns: me.pid_ns.clone(),
            start_ticks: 1,
            state: LeaseState::Held,
            ttl_ms: 3_600_000,
            written_ms: 0,
        };
        s.put(&lease_key(1), serde_json::to_vec(&dead).unwrap().into())
            .await
            .unwrap();
        let c = CancellationToken::new();
        let t0 = Instant::now();
        let (_l, got) = Lease::acquire(s.clone(), opts(60_000, OnConflict::Fail), &c)
            .await
            .unwrap();
        assert!(got.may_resume);
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_live_holder_is_one_not_released_and_not_provably_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert_eq!(live_holder(s.as_ref()).await.unwrap(), None, "no lease");
        let c = CancellationToken::new();
        let (mut a, _) = Lease::acquire(s.clone(), opts(60_000, OnConflict::Fail), &c)
            .await
            .unwrap();
        let holder = live_holder(s.as_ref()).await.unwrap();
        assert!(holder.is_some_and(|h| h.contains(a.owner())));
        a.release().await.unwrap();
        assert_eq!(live_holder(s.as_ref()).await.unwrap(), None, "released");
        // A held lease of another host, however old, counts; an unreadable one too.
        let foreign = LeaseRecord {
            version: 1,
            seq: 3,
            owner: "someone".into(),
            host: "elsewhere".into(),
            pid: 1,
            boot_id: "other".into(),
            pid_ns: String::new(),
            start_ticks: 0,
            state: LeaseState::Held,
            ttl_ms: 1,
            written_ms: 0,
        };
        s.put(&lease_key(3), serde_json::to_vec(&foreign).unwrap().into())
            .await
            .unwrap();
        assert!(live_holder(s.as_ref()).await.unwrap().is_some());
        s.put(&lease_key(4), Bytes::from_static(b"garbage").into())
            .await
            .unwrap();
        let h = live_holder(s.as_ref()).await.unwrap().unwrap();
        assert!(h.contains("unreadable"), "{h}");
    }

    #[tokio::test]
    async fn cancel_stops_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let foreign = LeaseRecord {
            version: 1,
            seq: 1,
            owner: "someone".into(),
            host: "elsewhere".into(),
            pid: 1,
            boot_id: "other".into(),
            pid_ns: String::new(),
            start_ticks: 0,
            state: LeaseState::Held,
            ttl_ms: 3_600_000,
            written_ms: 0,
        };
        s.put(&lease_key(1), serde_json::to_vec(&foreign).unwrap().into())
            .await
            .unwrap();
        let c = CancellationToken::new();
        let c2 = c.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.cancel();
        });
        let e = Lease::acquire(s.clone(), opts(60_000, OnConflict::Wait), &c)
            .await
            .unwrap_err();
        assert!(matches!(e, EngineError::Cancelled));
    }
}
