//! Crash-consistency torture: a writer process commits deterministic transactions (with its
//! own checkpoints of every mode, a tiny autocheckpoint, long readers, VACUUM), while the
//! `walship replicate` process is SIGKILLed at random instants and restarted. Restores taken
//! mid-way must equal the state after some prefix of committed transactions; the restore
//! after the final SIGTERM must equal the state after the last one.
//!
//! `WALSHIP_TORTURE_TRIALS` (default 40 on a local directory, a quarter of it on S3) and
//! `WALSHIP_TORTURE_SEED` (start seed) control the run; every failure prints its seed.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use walship_storage::testkit::MotoServer;

#[test]
fn writer_child() {
    writer_main_if_child();
}

fn trials(default: u64) -> u64 {
    std::env::var("WALSHIP_TORTURE_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn base_seed() -> u64 {
    std::env::var("WALSHIP_TORTURE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        })
}

/// One randomized trial. Returns the number of replicator kills.
fn trial(seed: u64, url: &str, dir: &Path, extra: &[&str]) -> u32 {
    let mut r = Rng::new(seed);
    let db = dir.join("app.db");
    let wlog = dir.join("writer.log");
    let rlog = dir.join("replicator.log");
    create_db(&db);
    let spec = WriterSpec {
        db: db.clone(),
        seed,
        duration: Duration::from_millis(1500 + r.below(1500)),
        rate: [0, 50, 200, 1000][r.below(4) as usize],
        autocheckpoint: [1000, 10, 0, 100][r.below(4) as usize],
        checkpoint_every: [0, 7, 25, 60][r.below(4) as usize],
        vacuum_every: if r.chance(0.3) { 40 + r.below(100) } else { 0 },
        long_reader: r.chance(0.4),
        reopen_every: [0, 0, 5, 50][r.below(4) as usize],
        log: wlog.clone(),
    };
    let checkpoint_frames = [20u64, 100, 1000][r.below(3) as usize].to_string();
    let snapshot_interval = format!("{}ms", 300 + r.below(2000));
    // Compaction merging every few segments and deleting the parts at once, or as shipped.
    let fan_in = ["2", "4", "16"][r.below(3) as usize];
    let keep_parts = ["0s", "5m"][r.below(2) as usize];
    let mut args = vec![
        "--sync-interval",
        "200ms",
        "--snapshot-interval",
        snapshot_interval.as_str(),
        "--checkpoint-frames",
        checkpoint_frames.as_str(),
        "--compaction-fan-in",
        fan_in,
        "--compaction-keep-parts",
        keep_parts,
    ];
    args.extend_from_slice(extra);
    let ctx = format!(
        "seed {seed} ({spec:?}, checkpoint-frames {checkpoint_frames}, compaction fan-in {fan_in} keep {keep_parts})"
    );
    let mut writer = spawn_writer(&spec, "writer_child");
    // Sometimes the replicator starts late, after many writes.
    if r.chance(0.3) {
        std::thread::sleep(Duration::from_millis(200 + r.below(600)));
    }
    let mut kills = 0;
    let mut rep = Some(Replicator::start(&db, url, &args, &rlog));
    let mut prev_prefix = 0;
    while writer.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(100 + r.below(600)));
        if r.chance(0.6) {
            if let Some(p) = rep.take() {
                p.kill9();
                kills += 1;
            }
            // A restore now must be a consistent prefix (it may lag behind the writer).
            let out = dir.join(format!("mid-{kills}.db"));
            let o = restore(url, &out, extra);
            if o.status.success() {
                let n = assert_prefix_state(&out, seed, &ctx);
                let committed = last_committed(&wlog);
                assert!(
                    n <= committed,
                    "{ctx}: restored txn {n} was never committed (last {committed})"
                );
                prev_prefix = prev_prefix.max(n);
            } else {
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(
                    err.contains("no restorable backup"),
                    "{ctx}: mid-trial restore failed: {err}\nreplicator log:\n{}",
                    tail(&rlog)
                );
            }
            // Stay down for a while sometimes: the app checkpoints and restarts the WAL.
            if r.chance(0.5) {
                std::thread::sleep(Duration::from_millis(r.below(500)));
            }
            rep = Some(Replicator::start(&db, url, &args, &rlog));
        }
    }
    assert!(writer.wait().unwrap().success(), "{ctx}: writer failed");
    let committed = last_committed(&wlog);
    let rep = rep.unwrap_or_else(|| Replicator::start(&db, url, &args, &rlog));
    std::thread::sleep(Duration::from_millis(300));
    let st = rep.terminate(Duration::from_secs(30));
    assert!(
        st.success(),
        "{ctx}: replicate exited {st:?}; log:\n{}",
        tail(&rlog)
    );
    let out = dir.join("final.db");
    let o = restore(url, &out, extra);
    assert!(
        o.status.success(),
        "{ctx}: final restore failed: {}\nreplicator log:\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&rlog)
    );
    let n = assert_prefix_state(&out, seed, &ctx);
    assert_eq!(
        n,
        committed,
        "{ctx}: after SIGTERM the replica must hold the last committed transaction; log:\n{}",
        tail(&rlog)
    );
    // While a replicator runs, a restart of the WAL is either proven continuous or cannot
    // happen: a break for want of proof would be a needless full snapshot. (One that was
    // down while the app restarted the WAL starts a new generation as it starts, without
    // this message. Nor is it needless when a resumed replicator's backlog was overwritten
    // by the restarted WAL before it could be shipped — the copy of it failing its checksum
    // chain says so just before: those frames are only in the database file now.)
    let log = std::fs::read_to_string(&rlog).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    if let Some(i) = (0..lines.len()).find(|&i| {
        lines[i].contains("without proof that nothing was lost")
            && !lines[i.saturating_sub(3)..i]
                .iter()
                .any(|p| p.contains("changed while being read (the WAL was restarted)"))
    }) {
        let line = lines[i];
        let around = lines[i.saturating_sub(60)..(i + 3).min(lines.len())].join("\n");
        panic!("{ctx}: a WAL restart was taken for a break: {line}\nlog before it:\n{around}");
    }
    kills
}

#[test]
fn sigkill_at_random_points_never_loses_or_tears_on_a_local_replica() {
    let n = trials(40);
    let seed0 = base_seed();
    let mut kills = 0;
    for t in 0..n {
        let seed = seed0.wrapping_add(t);
        let dir = tempfile::tempdir().unwrap();
        let url = file_url(&dir.path().join("replica"));
        eprintln!(
            "torture trial {t} seed {seed} (WALSHIP_TORTURE_SEED={seed} WALSHIP_TORTURE_TRIALS=1 to rerun)"
        );
        kills += trial(seed, &url, dir.path(), &[]);
    }
    eprintln!(
        "{n} trials, {kills} SIGKILLs, seeds {seed0}..{}",
        seed0.wrapping_add(n)
    );
}

#[test]
fn sigkill_at_random_points_never_loses_or_tears_on_s3() {
    let n = (trials(40) / 4).max(1);
    let seed0 = base_seed().wrapping_add(1_000_000);
    let moto = MotoServer::shared();
    let mut kills = 0;
    for t in 0..n {
        let seed = seed0.wrapping_add(t);
        let dir = tempfile::tempdir().unwrap();
        let prefix = MotoServer::unique_prefix("torture");
        let url = moto.url(moto.bucket(), &prefix).to_string();
        eprintln!("s3 torture trial {t} seed {seed}");
        kills += trial(seed, &url, dir.path(), &[]);
    }
    eprintln!(
        "{n} S3 trials, {kills} SIGKILLs, seeds {seed0}..{}",
        seed0.wrapping_add(n)
    );
}

#[test]
fn encrypted_replicas_survive_sigkill_trials_on_both_backends() {
    let n = (trials(40) / 8).max(2);
    let seed0 = base_seed().wrapping_add(2_000_000);
    let moto = MotoServer::shared();
    for t in 0..n {
        let seed = seed0.wrapping_add(t);
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(
            &key,
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        )
        .unwrap();
        let key_arg = key.to_str().unwrap().to_string();
        let extra = ["--encryption-key-file", key_arg.as_str()];
        let url = if t % 2 == 0 {
            file_url(&dir.path().join("replica"))
        } else {
            moto.url(moto.bucket(), &MotoServer::unique_prefix("enc-torture"))
                .to_string()
        };
        eprintln!("encrypted torture trial {t} seed {seed} on {url}");
        trial(seed, &url, dir.path(), &extra);
    }
}
