#!/usr/bin/env python3
"""Agent benchmark: memory through a backend outage, and bytes on the wire.

Phase A (outage): bench/many_stacks.c keeps every CPU busy on thousands of
distinct stacks while `profiler agent` runs with its default settings against
an OTLP endpoint where nothing listens, for --outage-minutes (10). The agent's
/proc status is read every second: VmRSS, VmHWM, the RSS breakdown, fds,
threads and child processes, and /proc/PID/smaps_rollup every minute (the
agent resets its VmHWM when each cycle starts, for its memory budget: the
peak is the largest VmHWM read, which holds each cycle's peak until the next
cycle begins, and the exit's ru_maxrss). Its log
(stderr) is parsed for warnings and for "export queue full" (drops began).
Then SIGTERM: the exit code must be 0; the time to exit is reported.

Phase B (wire): the tests' OTLP receiver (tests/otlp/receiver.py) runs, the
agent exports to it for --wire-minutes (2) under the same workload, and the
requests it received give samples, uncompressed protobuf bytes and gzip bytes
per sample, and requests per interval.

Prints a report and the target lines (peak RSS <= 64 MiB, RSS flat, growth
within the configured queue bound). A report, not a test: exits 0 whatever
the figures are; 1 when something crashed (the agent died or did not exit 0
on SIGTERM, the receiver or the workload failed), 130 when interrupted.

Needs root (BPF, /proc/PID/io), python3 (standard library only), gcc, and
the receiver's venv (target/tools/otlp-venv, `cargo xtask setup --all`).
See bench/README.md.
"""

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import benchlib
from benchlib import (Monitor, cpu_seconds, forget, kill, log, median, read_io,
                      slope_per_min, spawn, vlog)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NCPU = os.sysconf("SC_NPROCESSORS_ONLN")
KIB = 1024
MIB = 1024 * 1024

# Target from the issue: userspace RSS with default settings, through an outage.
TARGET_RSS_MIB = 64.0
# "Flat": RSS growth not explained by the export queue filling, in KiB per minute
# over the last half of the outage (1 MiB per 16 minutes).
DEFAULT_FLAT_KIB_PER_MIN = 64.0
# Agent defaults, used when `profiler agent --help` cannot be read.
FALLBACK_DEFAULTS = {"interval": 15, "queue-kib": 20480, "shutdown-timeout": 10, "frequency": 97}


class RunError(Exception):
    """Something crashed: the agent, the receiver or the workload."""


def alive(p):
    """True while p has not exited. Does not reap it (so /proc/PID stays readable)."""
    if p.returncode is not None:
        return False
    try:
        info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return info is None


def reap(p, timeout):
    """Waits up to `timeout` s for p to exit; returns (exit_code, rusage, io) or None.

    The exit is first seen without reaping (waitid WNOWAIT), so the zombie's
    /proc/PID/io (lifetime I/O counters) can still be read; then it is reaped.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return (p.returncode, None, None)
        if info is not None:
            io = read_io(p.pid)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            forget(p)
            return (p.returncode, ru, io)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def stop(p, sig, timeout):
    """Sends `sig` to p (not its group) and reaps it; returns (code, rusage, io, seconds)."""
    t0 = time.monotonic()
    try:
        os.kill(p.pid, sig)  # not p.send_signal: it may reap p first (poll)
    except ProcessLookupError:
        pass
    r = reap(p, timeout)
    if r is None:
        kill(p)
        return (None, None, None, time.monotonic() - t0)
    return (*r, time.monotonic() - t0)


# --------------------------------------------------------------------------
# Helpers

def free_port():
    """A loopback TCP port with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_defaults(profiler):
    """Defaults of `profiler agent` from its --help (so the report names the real bound)."""
    out = dict(FALLBACK_DEFAULTS)
    try:
        text = subprocess.run([str(profiler), "agent", "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    text = re.sub(r"\s+", " ", text)
    for key in out:
        m = re.search(r"--" + re.escape(key) + r" <[^>]*>.*?\[default: (\d+)\]", text)
        if m and "--" not in text[m.start() + 2:m.start(1)]:
            out[key] = int(m.group(1))
    return out


def agent_env():
    # Defaults only: none of ours OTEL_* or RUST_LOG reach the agent.
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "RUST_LOG"}


def build_workload(tmp, name="many_stacks", defines=()):
    """bench/many_stacks.c built as tmp/NAME, with extra `-D` flags."""
    exe = tmp / name
    cmd = ["gcc", "-O1", "-fno-omit-frame-pointer", "-pthread", *defines, "-o", str(exe),
           str(BENCH_DIR / "many_stacks.c")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RunError(f"building many_stacks failed:\n{r.stderr}")
    return exe


def start_workload(exe, seconds, out):
    with open(out, "w") as f:
        return spawn([exe, "--threads", NCPU, "--duration", int(seconds)],
                     stdout=f, stderr=subprocess.STDOUT)


def ensure_running(name, agent, agent_log, wl, wl_out):
    """Raises RunError if the agent or the workload has exited during phase `name`."""
    if not alive(agent):
        r = reap(agent, 5)
        raise RunError(f"the agent exited during the {name} phase "
                       f"(code {r[0] if r else '?'}):\n{tail(agent_log)}")
    if not alive(wl):
        raise RunError(f"many_stacks exited early: {tail(wl_out)}")


def tail(path, n=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def at_time(samples, t):
    return min(samples, key=lambda s: abs(s["t"] - t)) if samples else None


def mib(kib):
    return None if kib is None else kib / KIB


def fmt(v, spec="{:.1f}", none="n/a"):
    return none if v is None else spec.format(v)


# --------------------------------------------------------------------------
# The agent's log (tracing's fmt: "TIMESTAMP  LEVEL message key=value ...")

LOG_LINE = re.compile(r"^(\S+)\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(.*)$")
FIELD = re.compile(r"\s([a-z_][a-z0-9_.]*)=(\"(?:[^\"\\]|\\.)*\"|\S+)")


def parse_ts(s):
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def split_message(rest):
    """(message, {field: value}) of one log line's text after the level."""
    m = FIELD.search(" " + rest)
    message = (" " + rest)[:m.start()].strip() if m else rest.strip()
    fields = {k: v.strip('"') for k, v in FIELD.findall(" " + rest)}
    return message, fields


def parse_agent_log(path):
    out = {"levels": {}, "warnings": {}, "errors": {}, "drops_began_s": [], "drops_ended": [],
           "started_ts": None, "stopped": None, "unparsed": 0}
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = LOG_LINE.match(line)
        if not m:
            out["unparsed"] += 1
            continue
        ts, level, rest = parse_ts(m.group(1)), m.group(2), m.group(3)
        out["levels"][level] = out["levels"].get(level, 0) + 1
        message, fields = split_message(rest)
        if message.startswith("profiling started") and out["started_ts"] is None:
            out["started_ts"] = ts
        rel = None if (ts is None or out["started_ts"] is None) else round(ts - out["started_ts"], 1)
        if level in ("WARN", "ERROR"):
            bucket = out["warnings" if level == "WARN" else "errors"]
            e = bucket.setdefault(message, {"count": 0, "first_s": rel})
            e["count"] += 1
        if message.startswith("export queue full"):
            out["drops_began_s"].append(rel)
        if message.startswith("export queue has room again"):
            out["drops_ended"].append({"t_s": rel, "dropped": fields.get("dropped")})
        if message == "stopped":
            out["stopped"] = fields
    return out


# --------------------------------------------------------------------------
# Phase A: outage

def recover(args, tmp, res, agent, agent_log, mon, port):
    """The backend comes back on the outage port: waits until the queue has drained into it.

    Every request the agent queued during the outage arrives, so the queue's content
    over time is known exactly. Returns the receiver (still running) and its output.
    """
    out = tmp / "recovered.jsonl"
    rx, _ = start_receiver(args, tmp, out, port=port)
    t0 = time.monotonic()
    res["recovery"] = {"receiver_started_s": round(t0 - mon.t0, 1)}
    reachable_at = None
    last_count, last_change = 0, time.monotonic()
    deadline = t0 + args.recover_timeout
    while time.monotonic() < deadline:
        if not alive(agent):
            raise RunError(f"the agent exited while the backend came back:\n{tail(agent_log)}")
        if reachable_at is None:
            with open(agent_log, errors="replace") as f:
                if any("reachable again" in line for line in f):
                    reachable_at = time.monotonic()
        count = len(read_requests(out))
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        # Drained: delivering again, and no new request for 5 s (the backlog goes out
        # back to back; after it only one request per interval arrives).
        if reachable_at is not None and count > 0 and time.monotonic() - last_change >= 5.0:
            break
        time.sleep(0.5)
    else:
        log(f"  [recover] the queue had not drained after {args.recover_timeout:g} s")
    mon.sample()
    res["recovery"].update({
        "reachable_after_s": None if reachable_at is None else round(reachable_at - t0, 1),
        "drained_after_s": round(last_change - t0, 1),
        "requests": last_count,
        "rss_after_drain_kib": (mon.snapshot()[-1:] or [{}])[0].get("VmRSS"),
        "anon_after_drain_kib": (mon.snapshot()[-1:] or [{}])[0].get("RssAnon"),
    })
    return rx, out


def run_agent_phase(args, name, profiler, workload_exe, tmp, endpoint, minutes, defaults,
                    recover_port=None):
    """Workload + agent against `endpoint` for `minutes`; then SIGTERM. Returns raw figures.

    With `recover_port`, the backend comes back on that port before the SIGTERM and
    the queue drains into it (see `recover`).
    """
    seconds = minutes * 60.0
    wl = start_workload(workload_exe, seconds + 120, tmp / f"{name}-workload.out")
    time.sleep(0.5)
    if not alive(wl):
        raise RunError(f"many_stacks exited at once: {tail(tmp / f'{name}-workload.out')}")
    wl_cpu0, wl_t0 = cpu_seconds(wl.pid), time.monotonic()
    agent_log = tmp / f"{name}-agent.log"
    cmd = [profiler, "agent", "--endpoint", endpoint, "--log-level", args.log_level]
    if args.queue_kib is not None:
        cmd += ["--queue-kib", args.queue_kib]
    if args.only_workload:
        cmd += ["--pid", wl.pid]
    with open(agent_log, "w") as err:
        agent = spawn(cmd, stdout=subprocess.DEVNULL, stderr=err, env=agent_env(), cwd=tmp)
    mon = Monitor(agent.pid).start()
    t_start = time.monotonic()
    res = {"command": [str(c) for c in cmd], "endpoint": endpoint, "minutes": minutes}
    next_progress = 60.0 if name == "outage" else 30.0
    try:
        while True:
            elapsed = time.monotonic() - t_start
            if elapsed >= seconds:
                break
            ensure_running(name, agent, agent_log, wl, tmp / f"{name}-workload.out")
            if elapsed >= next_progress:
                s = mon.snapshot()[-1:] or [None]
                s = s[0]
                with open(agent_log, errors="replace") as f:
                    warns = sum(1 for line in f if " WARN " in line)
                log(f"  [{name}] {elapsed / 60:4.1f} min: RSS {fmt(mib(s and s['VmRSS']))} MiB, "
                    f"peak {fmt(mib(s and s['VmHWM']))} MiB, threads {s and s['threads']}, "
                    f"fds {s and s['fds']}, warnings so far {warns}")
                next_progress += 60.0 if name == "outage" else 30.0
            time.sleep(min(1.0, max(0.05, seconds - elapsed)))
        mon.sample()
        mon.rollup()
        res["outage_end_s"] = round(time.monotonic() - mon.t0, 3)
        res["monitor_wall0"] = mon.wall0
        rx = None
        if recover_port is not None:
            log(f"  [{name}] backend back on port {recover_port}: waiting for the queue to drain")
            rx, rx_out = recover(args, tmp, res, agent, agent_log, mon, recover_port)
    finally:
        mon.stop()
    res["wl_cpu_share"] = None
    c1 = cpu_seconds(wl.pid)
    if wl_cpu0 is not None and c1 is not None:
        res["wl_cpu_share"] = (c1 - wl_cpu0) / (NCPU * (time.monotonic() - wl_t0))
    res["log_bytes_at_sigterm"] = agent_log.stat().st_size
    res["wchar_at_sigterm"] = (read_io(agent.pid) or {}).get("wchar")
    res["sigterm_at_s"] = round(time.monotonic() - t_start, 1)
    timeout = defaults["shutdown-timeout"] + 30
    code, ru, io, took = stop(agent, signal.SIGTERM, timeout)
    kill(wl)
    if rx is not None:
        time.sleep(0.5)
        stop(rx, signal.SIGTERM, 15)
        res["recovered"] = request_intervals(read_requests(rx_out))
    res.update({
        "exit_code": code,
        "shutdown_s": round(took, 2),
        "ru_maxrss_kib": ru.ru_maxrss if ru else None,
        "life_cpu_s": (ru.ru_utime + ru.ru_stime) if ru else None,
        "io_at_exit": io,
        "log_bytes": agent_log.stat().st_size,
        "samples": mon.snapshot(),
        "rollups": mon.rollups,
        "log": parse_agent_log(agent_log),
        "log_tail": tail(agent_log, 20),
    })
    if code is None:
        raise RunError(f"the agent did not exit within {timeout} s of SIGTERM:\n{tail(agent_log)}")
    return res


def analyse_outage(res, args, defaults, wire):
    end_s = res.get("outage_end_s", float("inf"))
    samples = [s for s in res["samples"] if s["t"] <= end_s]
    if not samples:
        raise RunError("no /proc samples of the agent")
    dur = samples[-1]["t"]
    half = [s for s in samples if s["t"] >= dur / 2]
    start = at_time(samples, min(5.0, dur))
    one_min = at_time(samples, 60.0)
    end = samples[-1]
    a = {
        "duration_s": dur,
        "rss_1min_kib": one_min["VmRSS"],
        "rss_1min_t": one_min["t"],
        "rss_median_last_half_kib": median(s["VmRSS"] for s in half),
        "rss_min_last_half_kib": min(s["VmRSS"] for s in half),
        "rss_max_last_half_kib": max(s["VmRSS"] for s in half),
        "rss_final_kib": end["VmRSS"],
        "hwm_kib": max(s["VmHWM"] or 0 for s in samples),
        "peak_anon_kib": max(s["RssAnon"] or 0 for s in samples),
        "peak_file_kib": max(s["RssFile"] or 0 for s in samples),
        "ru_maxrss_kib": res.get("ru_maxrss_kib"),
        "slope_kib_per_min": slope_per_min([(s["t"], s["VmRSS"]) for s in half]),
        "anon_slope_kib_per_min": slope_per_min([(s["t"], s["RssAnon"]) for s in half]),
        "start": {k: start[k] for k in ("t", "threads", "fds", "children", "VmRSS", "RssAnon",
                                        "RssFile", "RssShmem", "VmData")},
        "end": {k: end[k] for k in ("t", "threads", "fds", "children", "VmRSS", "RssAnon",
                                    "RssFile", "RssShmem", "VmData")},
        "max_threads": max(s["threads"] or 0 for s in samples),
        "max_fds": max(s["fds"] or 0 for s in samples),
        "max_children": max(s["children"] or 0 for s in samples),
    }
    bound_kib = args.queue_kib if args.queue_kib is not None else defaults["queue-kib"]
    a["queue_bound_kib"] = bound_kib
    # What the export queue should hold: every finished interval's requests, up to the bound.
    interval = defaults["interval"]
    a["expected_queue_slope_kib_per_min"] = None
    a["expected_queue_end_kib"] = None
    a["queue_full_after_min"] = None
    if wire and wire.get("bytes_per_full_interval"):
        per_interval_kib = wire["bytes_per_full_interval"] / KIB
        per_min = per_interval_kib * 60.0 / interval
        a["queue_full_after_min"] = bound_kib / per_min
        cycles_at = lambda t: int(t // interval)  # noqa: E731
        q_end = min(bound_kib, cycles_at(dur) * per_interval_kib)
        a["expected_queue_end_kib"] = q_end
        q_half = min(bound_kib, cycles_at(dur / 2) * per_interval_kib)
        a["expected_queue_slope_kib_per_min"] = (q_end - q_half) / ((dur - dur / 2) / 60.0)
    a["queue_source"] = "estimate from phase B" if a["expected_queue_end_kib"] is not None else None
    slope = a["slope_kib_per_min"]
    a["residual_slope_kib_per_min"] = None
    if slope is not None:
        a["residual_slope_kib_per_min"] = slope - (a["expected_queue_slope_kib_per_min"] or 0.0)
    recovered = res.get("recovered")
    if recovered:
        # Exact: each interval's requests entered the queue when the interval ended.
        wall0, end_s = res["monitor_wall0"], res["outage_end_s"]
        enq = sorted((iv["end_ns"] / 1e9 - wall0, iv["bytes"]) for iv in recovered.values())
        enq = [(t, b) for t, b in enq if t <= end_s]

        def queue_kib(t):
            return min(bound_kib, sum(b for te, b in enq if te <= t) / KIB)
        outage = [s for s in samples if s["t"] <= end_s]
        half = [s for s in outage if s["t"] >= end_s / 2]
        a["queue_source"] = "exact, drained after the outage (--recover)"
        a["expected_queue_end_kib"] = queue_kib(end_s)
        a["expected_queue_slope_kib_per_min"] = slope_per_min([(s["t"], queue_kib(s["t"])) for s in half])
        a["residual_slope_kib_per_min"] = slope_per_min(
            [(s["t"], s["VmRSS"] - queue_kib(s["t"])) for s in half])
        a["anon_residual_slope_kib_per_min"] = slope_per_min(
            [(s["t"], s["RssAnon"] - queue_kib(s["t"])) for s in half])
        per_interval = [b for _, b in enq]
        if per_interval:
            per_min = statistics.median(per_interval) / KIB * 60.0 / interval
            a["queue_full_after_min"] = bound_kib / per_min
        a["recovery"] = res.get("recovery")
    a["growth_after_1min_kib"] = a["hwm_kib"] - a["rss_1min_kib"]
    lg = res["log"]
    a["warnings"] = sum(e["count"] for e in lg["warnings"].values())
    a["errors"] = sum(e["count"] for e in lg["errors"].values())
    a["drops_began_s"] = lg["drops_began_s"]
    # RSS breakdown, first and last smaps_rollup
    if res["rollups"]:
        a["rollup_first"] = res["rollups"][0]
        a["rollup_last"] = res["rollups"][-1]
    return a


# --------------------------------------------------------------------------
# Phase B: wire bytes

def start_receiver(args, tmp, out, port=0):
    venv = Path(args.receiver_python)
    if not venv.exists():
        raise RunError(f"{venv} is missing: run `cargo xtask setup --all` to create the receiver's venv")
    env = dict(os.environ, GRPC_VERBOSITY="NONE")
    with open(tmp / "receiver.err", "w") as err:
        rx = spawn([venv, REPO_DIR / "tests" / "otlp" / "receiver.py", "--port", port, "--out", out],
                   stdout=subprocess.PIPE, stderr=err, env=env)
    deadline = time.monotonic() + 60
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([rx.stdout], [], [], 0.5)
        if r:
            chunk = os.read(rx.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"LISTENING (\d+)", buf)
            if m:
                return rx, int(m.group(1))
        if not alive(rx):
            break
    raise RunError(f"the OTLP receiver did not start:\n{tail(tmp / 'receiver.err')}")


def read_requests(path):
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def request_intervals(reqs):
    """{start_ns: {"end_ns", "bytes", "requests"}}: what each interval put in the export queue."""
    out = {}
    for r in reqs:
        profs = [p for res in r.get("resources", []) for p in res.get("profiles", [])]
        if not profs:
            continue
        start = min(p["time_unix_nano"] for p in profs)
        end = max(p["time_unix_nano"] + p["duration_nano"] for p in profs)
        iv = out.setdefault(start, {"end_ns": end, "bytes": 0, "requests": 0})
        iv["end_ns"] = max(iv["end_ns"], end)
        iv["bytes"] += r.get("bytes") or 0
        iv["requests"] += 1
    return out


def analyse_wire(out_path, res, defaults):
    reqs = read_requests(out_path)
    w = {"requests": len(reqs)}
    if not reqs:
        return w
    per_req = []
    intervals = {}
    by_exe = {}
    errors = []
    for r in reqs:
        samples = stacks = 0
        times = set()
        for res_ in r.get("resources", []):
            exe = res_.get("attributes", {}).get("process.executable.name") or "?"
            for prof in res_.get("profiles", []):
                times.add(prof.get("time_unix_nano"))
                n = sum((smp.get("values") or [0])[0] for smp in prof.get("samples", []))
                samples += n
                stacks += len(prof.get("samples", []))
                by_exe[exe] = by_exe.get(exe, 0) + n
        errors.extend(r.get("errors", []))
        per_req.append({"bytes": r.get("bytes"), "gzip_bytes": r.get("gzip_bytes"),
                        "samples": samples, "sample_entries": stacks, "status": r.get("status"),
                        "times": sorted(t for t in times if t is not None)})
        # A request belongs to the interval of its profiles' start time.
        key = min((t for t in times if t is not None), default=None)
        iv = intervals.setdefault(key, {"requests": 0, "bytes": 0, "gzip_bytes": 0, "samples": 0,
                                        "sample_entries": 0})
        iv["requests"] += 1
        iv["bytes"] += r.get("bytes") or 0
        iv["gzip_bytes"] += r.get("gzip_bytes") or 0
        iv["samples"] += samples
        iv["sample_entries"] += stacks
    total_samples = sum(p["samples"] for p in per_req)
    total_bytes = sum(p["bytes"] or 0 for p in per_req)
    have_gzip = all(p["gzip_bytes"] is not None for p in per_req)
    total_gzip = sum(p["gzip_bytes"] or 0 for p in per_req) if have_gzip else None
    keys = sorted(k for k in intervals if k is not None)
    # The last interval is the partial one flushed at SIGTERM; the full ones are the rest.
    full = [intervals[k] for k in keys[:-1]] if len(keys) > 1 else []
    w.update({
        "statuses": sorted({p["status"] for p in per_req}),
        "decode_errors": errors[:20],
        "samples": total_samples,
        "bytes": total_bytes,
        "gzip_bytes": total_gzip,
        "bytes_per_sample": total_bytes / total_samples if total_samples else None,
        "gzip_bytes_per_sample": (total_gzip / total_samples
                                  if total_samples and total_gzip is not None else None),
        "intervals": len(keys),
        "full_intervals": len(full),
        "requests_per_interval": len(reqs) / len(keys) if keys else None,
        "bytes_per_full_interval": median(iv["bytes"] for iv in full),
        "gzip_bytes_per_full_interval": median(iv["gzip_bytes"] for iv in full) if have_gzip else None,
        "samples_per_full_interval": median(iv["samples"] for iv in full),
        "sample_entries_per_full_interval": median(iv["sample_entries"] for iv in full),
        "max_request_bytes": max(p["bytes"] or 0 for p in per_req),
        "samples_by_executable": dict(sorted(by_exe.items(), key=lambda kv: -kv[1])[:8]),
        "per_interval": [dict(iv, time_unix_nano=k) for k, iv in sorted(
            intervals.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))],
    })
    # What the agent really wrote on its socket (HTTP/2 frames of gzipped requests):
    # its lifetime write() bytes (/proc/PID/io wchar at exit) minus its log on stderr.
    io = res.get("io_at_exit") or {}
    if io.get("wchar") is not None:
        written = io["wchar"] - res.get("log_bytes", 0)
        w["agent_written_bytes"] = written
        w["agent_written_bytes_per_sample"] = written / total_samples if total_samples else None
    return w


# --------------------------------------------------------------------------
# Report

def check_line(label, verdict, detail):
    print(f"  {verdict:<5} {label}: {detail}")


def report(results, args, defaults):
    a = results.get("outage_figures")
    w = results.get("wire_figures")
    oa = results.get("outage")
    print()
    print(f"Agent under many distinct stacks ({NCPU} CPUs busy with many_stacks, "
          f"{'only many_stacks profiled' if args.only_workload else 'whole host profiled'}, "
          f"{defaults['frequency']} Hz, interval {defaults['interval']} s, "
          f"queue bound {fmt(mib(a['queue_bound_kib']) if a else None)} MiB)")
    if a:
        print()
        print(f"Phase A: backend down (nothing listening on {oa['endpoint']}) for "
              f"{a['duration_s'] / 60:.1f} min")
        print(f"  RSS at 1 min            {fmt(mib(a['rss_1min_kib']))} MiB")
        print(f"  RSS median, last half   {fmt(mib(a['rss_median_last_half_kib']))} MiB "
              f"(min {fmt(mib(a['rss_min_last_half_kib']))}, max {fmt(mib(a['rss_max_last_half_kib']))})")
        print(f"  RSS peak (VmHWM)        {fmt(mib(a['hwm_kib']))} MiB "
              f"(ru_maxrss incl. shutdown: {fmt(mib(a['ru_maxrss_kib']))} MiB)")
        print(f"  RSS final               {fmt(mib(a['rss_final_kib']))} MiB")
        print(f"  RSS slope, last half    {fmt(a['slope_kib_per_min'], '{:+.1f}')} KiB/min "
              f"(anonymous memory: {fmt(a['anon_slope_kib_per_min'], '{:+.1f}')} KiB/min)")
        if a["expected_queue_slope_kib_per_min"] is not None:
            print(f"  export queue            {fmt(a['expected_queue_slope_kib_per_min'], '{:+.1f}')} KiB/min "
                  f"over the last half, {fmt(mib(a['expected_queue_end_kib']))} MiB at the end "
                  f"({a['queue_source']}); the bound is reached after "
                  f"{fmt(a['queue_full_after_min'])} min of outage")
            print(f"  RSS slope beyond queue  {fmt(a['residual_slope_kib_per_min'], '{:+.1f}')} KiB/min"
                  + (f" (anonymous: {a['anon_residual_slope_kib_per_min']:+.1f} KiB/min)"
                     if a.get("anon_residual_slope_kib_per_min") is not None else ""))
        s, e = a["start"], a["end"]
        print(f"  threads                 {s['threads']} at {s['t']:.0f} s -> {e['threads']} at end "
              f"(max {a['max_threads']})")
        print(f"  fds                     {s['fds']} at {s['t']:.0f} s -> {e['fds']} at end (max {a['max_fds']})")
        print(f"  child processes         {s['children']} -> {e['children']} (max {a['max_children']})")
        print(f"  RSS breakdown (KiB)     anon {s['RssAnon']} -> {e['RssAnon']}, file {s['RssFile']} -> "
              f"{e['RssFile']}, shmem {s['RssShmem']} -> {e['RssShmem']}; VmData {s['VmData']} -> {e['VmData']}")
        print(f"  peak anon / file RSS    {fmt(mib(a['peak_anon_kib']))} / {fmt(mib(a['peak_file_kib']))} MiB "
              "(file: binaries mapped to symbolize them, clean page cache)")
        if a.get("rollup_last", {}).get("top"):
            print("  largest mappings at the end (RSS KiB / size KiB):")
            for path, rss, size in a["rollup_last"]["top"][:8]:
                print(f"    {rss:>7} / {size:>7}  {path}")
        drops = a["drops_began_s"]
        print("  export queue full       "
              + (f"yes: drops began at {', '.join(fmt(d, '{:.0f}') + ' s' for d in drops)}" if drops
                 else "never (no \"export queue full\" in the log)"))
        lg = oa["log"]
        print(f"  log                     {a['warnings']} warnings, {a['errors']} errors "
              f"({', '.join(f'{k} {v}' for k, v in sorted(lg['levels'].items()))})")
        for msg, e_ in list(lg["warnings"].items())[:8]:
            print(f"    WARN x{e_['count']} (first at {fmt(e_['first_s'], '{:.0f}')} s): {msg[:110]}")
        for msg, e_ in list(lg["errors"].items())[:8]:
            print(f"    ERROR x{e_['count']} (first at {fmt(e_['first_s'], '{:.0f}')} s): {msg[:110]}")
        rec = a.get("recovery")
        if rec:
            print(f"  backend back            reachable again after {fmt(rec['reachable_after_s'])} s, "
                  f"queue drained after {fmt(rec['drained_after_s'])} s ({rec['requests']} requests); "
                  f"RSS after the drain {fmt(mib(rec['rss_after_drain_kib']))} MiB "
                  f"(anon {fmt(mib(rec['anon_after_drain_kib']))} MiB)")
        st = lg.get("stopped") or {}
        if rec:
            print(f"  SIGTERM                 exit code {oa['exit_code']} after {oa['shutdown_s']:.1f} s "
                  f"(after the drain, backend up)")
        else:
            print(f"  SIGTERM                 exit code {oa['exit_code']} after {oa['shutdown_s']:.1f} s "
                  f"(--shutdown-timeout {defaults['shutdown-timeout']} s; the backend is down, so the "
                  f"exporter retries until that deadline)")
        if st:
            print(f"  agent's own counters    cycles {st.get('cycles')}, skipped {st.get('skipped_cycles')}, "
                  f"samples {st.get('samples')}, lost {st.get('lost')}, exported {st.get('exported_requests')}")
        print(f"  workload CPU share      {fmt(oa['wl_cpu_share'] and oa['wl_cpu_share'] * 100)} % "
              f"(below ~97 %: other load on the host)")
    if w:
        ob = results["wire"]
        print()
        print(f"Phase B: receiver up, {ob['minutes']:g} min")
        if not w.get("requests"):
            print("  no request received")
        else:
            print(f"  requests                {w['requests']} in {w['intervals']} intervals "
                  f"({fmt(w['requests_per_interval'], '{:.2f}')} per interval; the last is the "
                  f"partial interval flushed at SIGTERM); largest {w['max_request_bytes']} B; "
                  f"statuses {','.join(w['statuses'])}")
            print(f"  samples                 {w['samples']} "
                  f"({fmt(w['samples_per_full_interval'], '{:.0f}')} per full interval in "
                  f"{fmt(w['sample_entries_per_full_interval'], '{:.0f}')} distinct stacks)")
            print("  by executable           " + ", ".join(f"{k} {v}" for k, v in
                                                            w["samples_by_executable"].items()))
            print(f"  bytes, uncompressed     {w['bytes']} B: {fmt(w['bytes_per_sample'])} B/sample, "
                  f"{fmt(w['bytes_per_full_interval'] and w['bytes_per_full_interval'] / KIB)} KiB per full interval")
            if w.get("gzip_bytes") is not None:
                print(f"  bytes, gzip (level 6)   {w['gzip_bytes']} B: {fmt(w['gzip_bytes_per_sample'])} B/sample, "
                      f"{fmt(w['gzip_bytes_per_full_interval'] and w['gzip_bytes_per_full_interval'] / KIB)} "
                      f"KiB per full interval")
            else:
                print("  bytes, gzip             n/a (the receiver wrote no gzip_bytes)")
            if w.get("agent_written_bytes") is not None:
                print(f"  agent write() bytes     {w['agent_written_bytes']} B: "
                      f"{fmt(w['agent_written_bytes_per_sample'])} B/sample (HTTP/2 frames of the "
                      f"gzipped requests: wchar minus the log)")
            if w.get("decode_errors"):
                print(f"  receiver decode errors  {w['decode_errors'][:3]}")
        print(f"  SIGTERM                 exit code {ob['exit_code']} after {ob['shutdown_s']:.1f} s")
    print()
    print("Targets:")
    if a:
        peak = mib(max(a["hwm_kib"], a["ru_maxrss_kib"] or 0))
        check_line(f"peak RSS <= {TARGET_RSS_MIB:g} MiB", "PASS" if peak <= TARGET_RSS_MIB else "FAIL",
                   f"{peak:.1f} MiB")
        resid = a["residual_slope_kib_per_min"]
        label = f"RSS flat over the last half (growth beyond the export queue <= {args.flat_kib_per_min:g} KiB/min)"
        if resid is None:
            check_line(label, "N/A", "too few samples")
        else:
            check_line(label, "PASS" if resid <= args.flat_kib_per_min else "FAIL",
                       f"{resid:+.1f} KiB/min (raw slope {a['slope_kib_per_min']:+.1f})")
        anon_resid = a.get("anon_residual_slope_kib_per_min")
        if anon_resid is None and a["anon_slope_kib_per_min"] is not None:
            anon_resid = a["anon_slope_kib_per_min"] - (a["expected_queue_slope_kib_per_min"] or 0.0)
        if anon_resid is not None:
            print(f"  info  anonymous memory beyond the export queue, last half: {anon_resid:+.1f} KiB/min; "
                  f"peak anon {mib(a['peak_anon_kib']):.1f} MiB, peak file-backed {mib(a['peak_file_kib']):.1f} MiB")
        g = a["growth_after_1min_kib"]
        check_line("within the configured bound (RSS growth after 1 min <= queue bound)",
                   "PASS" if g <= a["queue_bound_kib"] else "FAIL",
                   f"{mib(g):.1f} MiB <= {mib(a['queue_bound_kib']):.1f} MiB")
        if a.get("expected_queue_end_kib") is not None and not a["drops_began_s"]:
            proj = mib(a["rss_final_kib"] + a["queue_bound_kib"] - a["expected_queue_end_kib"])
            print(f"        projection: once the queue is full (after ~{a['queue_full_after_min']:.0f} min "
                  f"of outage) RSS ~ {proj:.1f} MiB "
                  f"({'<=' if proj <= TARGET_RSS_MIB else '>'} {TARGET_RSS_MIB:g} MiB)")
        check_line("SIGTERM exits 0", "PASS" if oa["exit_code"] == 0 else "FAIL",
                   f"code {oa['exit_code']} after {oa['shutdown_s']:.1f} s")
    if w and w.get("bytes_per_sample") is not None:
        print(f"  info  bytes on the wire per sample: {w['bytes_per_sample']:.1f} uncompressed, "
              f"{fmt(w.get('gzip_bytes_per_sample'))} gzip")


# --------------------------------------------------------------------------

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-minutes", type=float, default=10.0,
                    help="length of phase A, the backend outage (default 10; 0 skips it)")
    ap.add_argument("--wire-minutes", type=float, default=2.0,
                    help="length of phase B, export to the receiver (default 2; 0 skips it)")
    ap.add_argument("--profiler", default=str(REPO_DIR / "target" / "release" / "profiler"),
                    help="the profiler binary (default target/release/profiler); copied first, "
                         "so a rebuild during the run does not change it")
    ap.add_argument("--queue-kib", type=int,
                    help="pass --queue-kib to the agent (default: the agent's default)")
    ap.add_argument("--only-workload", action="store_true",
                    help="profile only many_stacks (agent --pid), not the whole host: the figures "
                         "then do not depend on what else runs (default: whole host, as deployed)")
    ap.add_argument("--recover", action="store_true",
                    help="after the outage, bring the backend back on the same port and wait for the "
                         "queue to drain before the SIGTERM: measures the queue's exact content, "
                         "the reconnection time and RSS after the drain")
    ap.add_argument("--recover-timeout", type=float, default=180.0,
                    help="seconds to wait for the drain with --recover (default %(default)s)")
    ap.add_argument("--log-level", default="info", help="the agent's --log-level (default info)")
    ap.add_argument("--flat-kib-per-min", type=float, default=DEFAULT_FLAT_KIB_PER_MIN,
                    help="the flatness threshold (default %(default)s KiB/min)")
    ap.add_argument("--receiver-python",
                    default=str(REPO_DIR / "target" / "tools" / "otlp-venv" / "bin" / "python"))
    benchlib.script_options(ap, figures="write every raw figure to FILE (the 1 s samples too)",
                            kept="keep the temporary directory (logs, requests)")
    args = ap.parse_args()
    if args.outage_minutes < 0 or args.wire_minutes < 0:
        ap.error("minutes must be >= 0")
    return args


def benchmark(args, tmp, results):
    src = Path(args.profiler)
    if not src.exists():
        raise RunError(f"{src} not found: build it with `cargo build --release -p profiler-userspace`")
    profiler = tmp / "profiler"
    shutil.copy2(src, profiler)
    defaults = agent_defaults(profiler)
    results["agent_defaults"] = defaults
    exe = build_workload(tmp)
    wire_res = None
    if args.outage_minutes > 0:
        port = free_port()
        log(f"phase A: {args.outage_minutes:g} min outage (endpoint 127.0.0.1:{port}, nothing listening)")
        results["outage"] = run_agent_phase(args, "outage", profiler, exe, tmp,
                                            f"http://127.0.0.1:{port}", args.outage_minutes, defaults,
                                            recover_port=port if args.recover else None)
    if args.wire_minutes > 0:
        out = tmp / "requests.jsonl"
        rx, port = start_receiver(args, tmp, out)
        log(f"phase B: {args.wire_minutes:g} min exporting to the receiver on 127.0.0.1:{port}")
        try:
            wire_res = run_agent_phase(args, "wire", profiler, exe, tmp, f"http://127.0.0.1:{port}",
                                       args.wire_minutes, defaults)
        finally:
            time.sleep(0.5)
            rcode = stop(rx, signal.SIGTERM, 15)[0]
        results["wire"] = wire_res
        results["wire"]["receiver_exit_code"] = rcode
        results["wire_figures"] = analyse_wire(out, wire_res, defaults)
        if args.keep:
            vlog(f"requests in {out}")
    if "outage" in results:
        results["outage_figures"] = analyse_outage(results["outage"], args, defaults,
                                                   results.get("wire_figures"))
    report(results, args, defaults)
    crashed = False
    for name in ("outage", "wire"):
        r = results.get(name)
        if r and r["exit_code"] != 0:
            log(f"the agent exited {r['exit_code']} on SIGTERM in phase {name}:\n{r['log_tail']}")
            crashed = True
    return 1 if crashed else 0


def main():
    args = parse_args()
    refused = benchlib.start_script("agent_outage.py", "the agent loads BPF programs; /proc/PID/io", args.verbose)
    if refused is not None:
        return refused

    results = {"config": vars(args), "ncpu": NCPU, "kernel": platform.release(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = Path(tempfile.mkdtemp(prefix="profiler-agent-bench-"))
    return benchlib.guarded(lambda: benchmark(args, tmp, results), results, args, tmp, RunError)


if __name__ == "__main__":
    sys.exit(main())
