//! Compaction end to end: a replicator merging its small segments while the app writes, and
//! restores from the merged replica (newest, point in time, around a corrupt merged segment,
//! from a snapshot taken inside a merged run, encrypted), against a local directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app_db, digest};
use rusqlite::Connection;
use tokio_util::sync::CancellationToken;
use walship_engine::replicate::ReplicatorHandle;
use walship_engine::{CompactionOptions, Replica, ReplicateOptions, RestoreOptions};
use walship_format::crypto::{Key, KeyRing};
use walship_format::key::ObjectKey;
use walship_storage::{LocalStore, ObjectStore};

fn opts(fan_in: u32, keep_parts: Duration) -> ReplicateOptions {
    ReplicateOptions {
        sync_interval: Duration::from_millis(100),
        min_sync_gap: Duration::from_millis(10),
        snapshot_interval: Duration::from_secs(3600),
        checkpoint_frames: 100_000,
        compaction: CompactionOptions {
            fan_in,
            keep_parts,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn local(dir: &Path) -> Replica {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.join("replica")).unwrap());
    Replica::new(store)
}

/// One transaction of `bytes` random bytes, shipped as one segment.
async fn commit(app: &Connection, h: &ReplicatorHandle, bytes: usize) {
    app.execute("INSERT INTO t(v) VALUES (randomblob(?1))", [bytes as i64])
        .unwrap();
    h.sync().await.unwrap();
}

async fn wait_for(what: &str, h: &ReplicatorHandle, f: impl Fn(&walship_engine::Status) -> bool) {
    let t0 = Instant::now();
    while !f(&h.status()) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {:?}",
            h.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (start, end) of every segment of the newest generation.
async fn segments(replica: &Replica) -> Vec<(u64, u64, String)> {
    let g = replica.generations().await.unwrap()[0];
    replica
        .objects(g)
        .await
        .unwrap()
        .segments
        .into_iter()
        .filter_map(|l| match l.key {
            ObjectKey::Segment { start, end, .. } => Some((start, end, l.name)),
            _ => None,
        })
        .collect()
}

async fn restore(
    replica: &Replica,
    out: &Path,
    target_ms: Option<i64>,
) -> walship_engine::RestoreReport {
    let _ = std::fs::remove_file(out);
    walship_engine::restore::restore(
        replica,
        out,
        &RestoreOptions {
            target_ms,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A replicator running on a fresh database, with the app's connection.
struct Rig {
    db: PathBuf,
    app: Connection,
    h: ReplicatorHandle,
    task: tokio::task::JoinHandle<walship_engine::EngineResult<()>>,
    cancel: CancellationToken,
}

impl Rig {
    /// Starts replicating `db` (created if missing) into `replica`, synced once.
    async fn start(dir: &Path, replica: &Replica, opts: ReplicateOptions) -> Rig {
        let db = dir.join("app.db");
        if !db.exists() {
            app_db(dir);
        }
        let cancel = CancellationToken::new();
        let (h, task) =
            walship_engine::replicate::spawn(db.clone(), replica.clone(), opts, cancel.clone());
        let app = Connection::open(&db).unwrap();
        h.sync().await.unwrap();
        Rig {
            db,
            app,
            h,
            task,
            cancel,
        }
    }

    async fn commit(&self, bytes: usize) {
        commit(&self.app, &self.h, bytes).await;
    }

    /// Stops the replicator (final sync).
    async fn stop(self) -> Connection {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
        self.app
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_segments_are_merged_by_levels_their_parts_deleted_and_restore_applies_few() {
    let dir = tempfile::tempdir().unwrap();
    let replica = local(dir.path());
    let rig = Rig::start(dir.path(), &replica, opts(4, Duration::ZERO)).await;
    let db = rig.db.clone();
    for _ in 0..32 {
        rig.commit(500).await;
    }
    // 32 segments at a fan-in of 4: 8 level-1 merges, 2 level-2 merges (and the first
    // snapshot's segment-free start); parts go at the next shipment after their merge.
    wait_for("10 merges", &rig.h, |s| s.segments_merged >= 10).await;
    rig.commit(500).await;
    wait_for("parts deleted", &rig.h, |s| s.merged_parts_deleted >= 32).await;
    let segs = segments(&replica).await;
    assert!(segs.len() <= 4, "segments left: {segs:?}");
    let out = dir.path().join("out.db");
    let report = restore(&replica, &out, None).await;
    assert!(
        report.segments <= 4,
        "segments applied: {}",
        report.segments
    );
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(digest(&out), digest(&db));
    // The app stays open (closing the last connection would checkpoint and delete the WAL,
    // and a restarted replicator could not prove the log continuous).
    let _app = rig.stop().await;

    // A restarted replicator finds the end of the replica through the merged segments and
    // continues the generation.
    let rig = Rig::start(dir.path(), &replica, opts(4, Duration::ZERO)).await;
    let st = rig.h.status();
    assert_eq!(st.generations_started, 0, "{st:?}");
    rig.commit(500).await;
    rig.stop().await;
    restore(&replica, &out, None).await;
    assert_eq!(digest(&out), digest(&db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_parts_give_point_in_time_restores_and_stand_in_for_a_corrupt_merged_segment() {
    let dir = tempfile::tempdir().unwrap();
    let replica = local(dir.path());
    let rig = Rig::start(dir.path(), &replica, opts(8, Duration::from_secs(3600))).await;
    let db = rig.db.clone();
    let mut states = Vec::new();
    for _ in 0..8 {
        rig.commit(400).await;
        // Segment keys have millisecond times: keep commits apart.
        tokio::time::sleep(Duration::from_millis(5)).await;
        states.push((now_ms(), digest(&db)));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for("one merge", &rig.h, |s| s.segments_merged >= 1).await;
    rig.stop().await;
    let segs = segments(&replica).await;
    assert_eq!(segs.len(), 9, "8 parts and their merge: {segs:?}");

    // Between the parts' times, the parts are the chain.
    let out = dir.path().join("out.db");
    for (t, want) in &states[..7] {
        restore(&replica, &out, Some(*t)).await;
        assert_eq!(digest(&out), *want, "restore as of {t}");
    }
    let report = restore(&replica, &out, None).await;
    assert_eq!(report.segments, 1, "the merged segment alone");
    assert_eq!(digest(&out), digest(&db));

    // Flip a byte inside the merged segment's body: restore reports it and uses the parts.
    let (s, e, merged) = segs.iter().max_by_key(|(s, e, _)| e - s).cloned().unwrap();
    assert_eq!(
        e - s,
        segs.iter().map(|(s, e, _)| e - s).sum::<u64>() - (e - s)
    );
    let path = dir.path().join("replica").join(&merged);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();
    let report = restore(&replica, &out, None).await;
    assert_eq!(report.segments, 8, "the parts");
    assert!(
        report.skipped.iter().any(|(k, _)| *k == merged),
        "{:?}",
        report.skipped
    );
    assert_eq!(digest(&out), digest(&db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_inside_a_merged_run_restores_through_the_merged_segment() {
    let dir = tempfile::tempdir().unwrap();
    let replica = local(dir.path());
    let rig = Rig::start(dir.path(), &replica, opts(4, Duration::ZERO)).await;
    let db = rig.db.clone();
    rig.commit(300).await;
    rig.commit(300).await;
    // A snapshot after two parts of a run of four.
    rig.h.snapshot().await.unwrap();
    rig.commit(300).await;
    rig.commit(300).await;
    wait_for("a merge", &rig.h, |s| s.segments_merged >= 1).await;
    rig.commit(300).await;
    wait_for("parts deleted", &rig.h, |s| s.merged_parts_deleted >= 4).await;
    rig.stop().await;
    let g = replica.generations().await.unwrap()[0];
    let objs = replica.objects(g).await.unwrap();
    let ObjectKey::Snapshot { position, .. } = objs.snapshots[0].key else {
        panic!("a snapshot first")
    };
    // The only segment reaching past the snapshot starts before it.
    let segs = segments(&replica).await;
    assert!(
        segs.iter().any(|(s, e, _)| *s < position && *e > position),
        "{segs:?} around {position}"
    );
    assert!(!segs.iter().any(|(s, _, _)| *s == position), "{segs:?}");
    let out = dir.path().join("out.db");
    let report = restore(&replica, &out, None).await;
    assert_eq!(report.snapshot, objs.snapshots[0].name);
    assert_eq!(digest(&out), digest(&db));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_and_large_parts_merge_streaming_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::from_bytes(&[7u8; 32]).unwrap();
    let replica = local(dir.path()).with_keys(KeyRing::new(key));
    // Larger merges than the defaults allow, to reach the streaming upload.
    let mut o = opts(16, Duration::from_secs(3600));
    o.compaction.small_bytes = 4 << 20;
    o.compaction.max_bytes = 64 << 20;
    let rig = Rig::start(dir.path(), &replica, o).await;
    let db = rig.db.clone();
    // 16 segments of ~640 KiB of incompressible pages: a merge of over 8 MiB streams.
    for _ in 0..16 {
        rig.commit(600 * 1024).await;
    }
    wait_for("a merge", &rig.h, |s| s.segments_merged >= 1).await;
    rig.stop().await;
    let segs = segments(&replica).await;
    let widest = segs.iter().map(|(s, e, _)| e - s).max().unwrap();
    assert_eq!(
        widest,
        segs.iter().map(|(s, e, _)| e - s).sum::<u64>() - widest,
        "one segment spans the 16 others: {segs:?}"
    );
    let out = dir.path().join("out.db");
    let report = restore(&replica, &out, None).await;
    assert_eq!(report.segments, 1);
    assert_eq!(digest(&out), digest(&db));
    // Without the key, nothing is restored.
    let plain = local(dir.path());
    let e = walship_engine::restore::restore(
        &plain,
        &dir.path().join("x.db"),
        &RestoreOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("encrypt"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_off_leaves_every_segment() {
    let dir = tempfile::tempdir().unwrap();
    let replica = local(dir.path());
    let rig = Rig::start(dir.path(), &replica, opts(0, Duration::ZERO)).await;
    for _ in 0..20 {
        rig.commit(300).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.h.status().segments_merged, 0);
    rig.stop().await;
    assert_eq!(segments(&replica).await.len(), 20);
}

/// What a restore told its progress, in order: ('s', total), ('a', bytes), ('v', 0).
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<(char, u64)>>);

impl walship_engine::RestoreProgress for Recorder {
    fn start(&self, total: u64) {
        self.0.lock().unwrap().push(('s', total));
    }
    fn advance(&self, bytes: u64) {
        self.0.lock().unwrap().push(('a', bytes));
    }
    fn verifying(&self) {
        self.0.lock().unwrap().push(('v', 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_tells_its_progress_up_to_every_byte_it_planned_then_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let replica = local(dir.path());
    let rig = Rig::start(dir.path(), &replica, opts(0, Duration::ZERO)).await;
    let db = rig.db.clone();
    for i in 0..12 {
        rig.commit(if i % 4 == 0 { 200_000 } else { 300 }).await;
    }
    let _app = rig.stop().await;
    let out = dir.path().join("out.db");
    let rec = Arc::new(Recorder::default());
    let report = walship_engine::restore::restore(
        &replica,
        &out,
        &RestoreOptions {
            progress: Some(rec.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(digest(&out), digest(&db));
    assert!(
        report.segments >= 12,
        "segments applied: {}",
        report.segments
    );
    let events = rec.0.lock().unwrap().clone();
    assert_eq!(events.first().map(|e| e.0), Some('s'), "{events:?}");
    assert_eq!(events.last(), Some(&('v', 0)), "{events:?}");
    assert_eq!(
        events.iter().filter(|e| e.0 != 'a').count(),
        2,
        "{events:?}"
    );
    let total = events[0].1;
    let read: u64 = events.iter().filter(|e| e.0 == 'a').map(|e| e.1).sum();
    assert_eq!(total, report.bytes, "planned bytes = bytes read");
    assert_eq!(read, total, "the bar ends full");
    assert!(
        events.len() > report.segments + 2,
        "advances: {}",
        events.len() - 2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_span_wal_restarts_and_restore_checks_every_part_inside() {
    let dir = tempfile::tempdir().unwrap();
    let replica = local(dir.path());
    // A handoff every 20 frames: the WAL restarts every few transactions.
    let o = ReplicateOptions {
        checkpoint_frames: 20,
        ..opts(8, Duration::ZERO)
    };
    let rig = Rig::start(dir.path(), &replica, o).await;
    let db = rig.db.clone();
    for _ in 0..40 {
        rig.commit(20_000).await;
        // Let a handoff (at most four per sync interval of 100 ms) restart the WAL in between.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    wait_for("merges", &rig.h, |s| s.segments_merged >= 3).await;
    rig.commit(500).await;
    wait_for("parts deleted", &rig.h, |s| s.merged_parts_deleted >= 16).await;
    rig.stop().await;
    // Some merged segment spans more than one WAL incarnation (epochs in the high bits).
    let segs = segments(&replica).await;
    assert!(
        segs.iter().any(|(s, e, _)| (s >> 32) + 1 < (e >> 32)),
        "{segs:?}"
    );
    let out = dir.path().join("out.db");
    let report = restore(&replica, &out, None).await;
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(digest(&out), digest(&db));

    // One flipped bit in an inner segment's frames is found by its own checksum chain.
    let (_, _, widest) = segs.iter().max_by_key(|(s, e, _)| e - s).cloned().unwrap();
    let path = dir.path().join("replica").join(&widest);
    let bytes = std::fs::read(&path).unwrap();
    let raw = walship_format::object::decode_from_slice(&bytes).unwrap().1;
    let mut h = walship_format::object::ObjectHeader::decode(&bytes).unwrap();
    let mut raw2 = raw.clone();
    // A page byte of the first inner segment's first frame (after its header and the
    // frame header).
    raw2[96 + 24 + 100] ^= 1;
    h.flags = walship_format::object::FLAG_LZ4;
    let forged = walship_format::object::encode_to_vec(&h, &raw2).unwrap();
    std::fs::write(&path, forged).unwrap();
    // Its parts are deleted: the history it held is missing, and the restore is partial.
    let _ = std::fs::remove_file(&out);
    let refused = walship_engine::restore::restore(&replica, &out, &RestoreOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, walship_engine::EngineError::Partial { report } if report.partial()),
        "{refused}"
    );
    let _ = std::fs::remove_file(&out);
    let report = walship_engine::restore::restore(
        &replica,
        &out,
        &RestoreOptions {
            allow_partial: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(report.partial());
    assert!(
        report
            .skipped
            .iter()
            .any(|(k, why)| *k == widest && why.contains("checksum")),
        "{:?}",
        report.skipped
    );
}
