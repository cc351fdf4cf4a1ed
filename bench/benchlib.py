"""What the benchmark scripts share: logging, the children they start (tracked so
every exit path can kill them), tolerant /proc reads (fdinfo parsed), a thread
that watches a process through them, the CPU-bound workload's build, and a
least-squares slope.

Imported by the bench/*.py scripts (run from any directory: Python puts the
script's own directory on sys.path).
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

# Set from the script's --verbose.
VERBOSE = False


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def vlog(msg):
    if VERBOSE:
        log(msg)


def script_options(ap, figures="write the raw figures to FILE",
                   kept="keep the temporary directory", verbose=None):
    """Adds the options every benchmark has and `start_script`, `guarded` and
    `finish_script` read: --json FILE, --keep and --verbose/-v, with the script's
    own help texts."""
    ap.add_argument("--json", metavar="FILE", help=figures)
    ap.add_argument("--keep", action="store_true", help=kept)
    ap.add_argument("--verbose", "-v", action="store_true", help=verbose)


def start_script(name, why_root, verbose):
    """What every benchmark's main() does first: set the log level, flush stdout
    by line, refuse to run without root (returns 2 to exit with, else None), and
    turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt so one cleanup path
    kills every child. SIGINT too: a script started in the background of a
    non-interactive shell inherits SIGINT ignored, and would pass that on to
    what it starts."""
    global VERBOSE
    VERBOSE = verbose
    sys.stdout.reconfigure(line_buffering=True)
    if os.geteuid() != 0:
        log(f"{name} needs root ({why_root})")
        return 2

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    return None


class PollThread:
    """A daemon thread running the subclass's `_loop` until stop(); `_loop` waits on
    `self._stop` between polls, and takes `self.lock` around what it records."""

    def __init__(self):
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self):
        raise NotImplementedError


def finish_script(results, json_path, tmp, keep, indent):
    """What every benchmark's main() does last: write the raw figures to
    `json_path` (if given), then keep or delete the temporary directory."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=indent, default=str)
        log(f"raw figures written to {json_path}")
    if keep:
        log(f"temporary files kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def guarded(body, results, args, tmp, errors):
    """Runs `body()` (returns the exit status) as a script's main does: an `errors`
    exception (what the script calls a crash) is logged and gives 1, an interrupt
    130; either way every child is killed, then `finish_script` runs with the
    script's --json and --keep."""
    try:
        return body()
    except errors as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        kill_all_children()
        finish_script(results, args.json, tmp, args.keep, indent=1)


# --------------------------------------------------------------------------
# Children: everything we start is tracked so every exit path can kill it.

_children = []
_children_lock = threading.Lock()


def spawn(cmd, **kw):
    """Starts `cmd` in its own session (its pid is its process group) and tracks it."""
    vlog("$ " + " ".join(str(c) for c in cmd))
    p = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **kw)
    with _children_lock:
        _children.append(p)
    return p


def forget(p):
    with _children_lock:
        if p in _children:
            _children.remove(p)


def kill(p):
    """SIGKILL p's process group (its own session: pid == pgid) and reap it."""
    if p.returncode is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=10)
        except Exception:
            pass
    forget(p)


def kill_all_children():
    with _children_lock:
        procs = list(_children)
    for p in procs:
        kill(p)


# --------------------------------------------------------------------------
# Reading /proc (and other files) without failing on a process that went away.

def read_text(path):
    try:
        with open(path, "r") as f:
            return f.read()
    except OSError:
        return None


def parse_fdinfo(text):
    """The `key: value` lines of a /proc/PID/fdinfo/FD file, as a dict of strings."""
    out = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            out[key.strip()] = val.strip()
    return out


def build_workload(tmp):
    """Builds bench/workload.c (the CPU-bound workload, frame pointers kept) into
    `tmp` and returns the executable's path."""
    exe = Path(tmp) / "workload"
    cmd = ["gcc", "-O2", "-fno-omit-frame-pointer", "-pthread", "-o", str(exe),
           str(BENCH_DIR / "workload.c")]
    vlog("building workload: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    return exe


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------
# /proc readers, and a thread that watches a process with them

CLK_TCK = os.sysconf("SC_CLK_TCK")

def parse_kv_kib(text):
    """`Key:   123 kB` lines (status, smaps_rollup) -> {key: KiB}; other lines ignored."""
    out = {}
    for line in (text or "").splitlines():
        k, sep, v = line.partition(":")
        if not sep:
            continue
        parts = v.split()
        if parts and parts[0].isdigit() and (len(parts) == 1 or parts[1] == "kB"):
            out[k.strip()] = int(parts[0])
    return out


def read_io(pid):
    text = read_text(f"/proc/{pid}/io")
    if text is None:
        return None
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if v.strip().isdigit():
            out[k.strip()] = int(v)
    return out


def count_dir(path):
    try:
        return len(os.listdir(path))
    except OSError:
        return None


def children_of(pid):
    kids = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        text = read_text(f"/proc/{pid}/task/{tid}/children")
        if text:
            kids.extend(int(x) for x in text.split())
    return kids


def top_mappings(pid, n=10):
    """The `n` largest mappings by RSS from /proc/PID/smaps, summed by path: [(path, rss, size)] KiB."""
    text = read_text(f"/proc/{pid}/smaps")
    if not text:
        return []
    by_path = {}
    cur = None
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split(None, 5)
            cur = by_path.setdefault(parts[5].strip() if len(parts) > 5 else "[anon]", [0, 0])
        elif cur is not None and line.startswith("Rss:"):
            cur[0] += int(line.split()[1])
        elif cur is not None and line.startswith("Size:"):
            cur[1] += int(line.split()[1])
    rows = sorted(by_path.items(), key=lambda kv: -kv[1][0])[:n]
    return [(path, rss, size) for path, (rss, size) in rows]


def cpu_seconds(pid, children=False):
    """utime + stime of a whole process (all threads) from /proc/PID/stat; with
    `children`, cutime + cstime instead: its reaped children's CPU."""
    text = read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    # utime stime cutime cstime are fields 14-17 (1-based), 11-14 after comm.
    fields = text[text.rfind(")") + 2:].split()
    first = 13 if children else 11
    return (int(fields[first]) + int(fields[first + 1])) / CLK_TCK


class Monitor(PollThread):
    """Reads the agent's /proc every `period` s on a thread; keeps every sample."""

    STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmData", "VmSize")

    def __init__(self, pid, period=1.0, rollup_every=60.0):
        super().__init__()
        self.pid = pid
        self.period = period
        self.rollup_every = rollup_every
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.samples = []
        self.rollups = []

    def _loop(self):
        # The first sample is taken after `period`: by then the child has exec'ed.
        next_at = time.monotonic() + self.period
        next_rollup = self.t0 + self.rollup_every
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.period
            self.sample()
            if time.monotonic() >= next_rollup:
                next_rollup += self.rollup_every
                self.rollup()

    def sample(self):
        pid = self.pid
        status_text = read_text(f"/proc/{pid}/status")
        if status_text is None:
            return None
        st = parse_kv_kib(status_text)
        threads = re.search(r"^Threads:\s+(\d+)", status_text, re.M)
        kids = children_of(pid)
        s = {
            "t": round(time.monotonic() - self.t0, 3),
            **{k: st.get(k) for k in self.STATUS_KEYS},
            "threads": int(threads.group(1)) if threads else None,
            "fds": count_dir(f"/proc/{pid}/fd"),
            "children": None if kids is None else len(kids),
            "wchar": (read_io(pid) or {}).get("wchar"),
            "cpu_s": cpu_seconds(pid),
            "cpu_children_s": cpu_seconds(pid, children=True),
        }
        if s["VmRSS"] is None:  # a zombie: no memory left to read
            return None
        with self.lock:
            self.samples.append(s)
        return s

    def rollup(self):
        r = parse_kv_kib(read_text(f"/proc/{self.pid}/smaps_rollup"))
        if r:
            r["t"] = round(time.monotonic() - self.t0, 3)
            r["top"] = top_mappings(self.pid)
            with self.lock:
                self.rollups.append(r)

    def snapshot(self):
        with self.lock:
            return list(self.samples)


def slope_per_min(points):
    """Least-squares slope of [(t_seconds, value)], in value units per minute."""
    pts = [(t, v) for t, v in points if v is not None]
    if len(pts) < 3:
        return None
    mt = sum(t for t, _ in pts) / len(pts)
    mv = sum(v for _, v in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in pts) / var * 60.0
