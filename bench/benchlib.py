"""What the benchmark scripts share: logging, the children they start (tracked so
every exit path can kill them), and tolerant /proc reads.

Imported by bench/overhead.py, bench/agent_outage.py and bench/churn.py (run
from any directory: Python puts the script's own directory on sys.path).
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading

# Set from the script's --verbose.
VERBOSE = False


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def vlog(msg):
    if VERBOSE:
        log(msg)


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


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
