#!/usr/bin/env python3
"""Overhead benchmark: our profiler beside `perf record` and `bpftrace`.

Runs a CPU-bound workload (bench/workload.c) on every CPU as interleaved
baseline / profiled pairs and prints medians of:

  * workload throughput loss of each profiled run against the baselines
    around it, and the baseline-vs-baseline noise;
  * profiler CPU as % of the host: its process tree (user+sys) plus the run
    time of its BPF programs (kernel.bpf_stats_enabled);
  * BPF ns per sample (run_time_ns / run_cnt of its BPF programs);
  * peak RSS and BPF map memory (memlock of the maps it holds);

then paired rounds with ours and bpftrace attached to the same workload run
(their BPF ns per sample under the same conditions), a separate check that
ours loses no samples at 997 Hz on busy CPUs, and the targets as PASS/FAIL
text. This is a report, not a test: it exits 0
whatever the figures are, and non-zero only when a run crashed.

Needs root, python3 (stdlib only), gcc, perf and bpftrace.
See bench/README.md.
"""

import argparse
import ctypes
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from benchlib import (build_workload, forget, kill_all_children, log, median, parse_fdinfo,
                      read_text, spawn, vlog)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NCPU = os.sysconf("SC_NPROCESSORS_ONLN")
CLK_TCK = os.sysconf("SC_CLK_TCK")
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
BPFTRACE_SCRIPT = "profile:hz:{hz} {{ @[kstack, ustack, pid] = count(); }}"
PROFILERS = ("ours", "perf", "bpftrace")
MIB = 1024 * 1024

# Targets from the issue (at the nominal frequency of 97 Hz).
TARGET_CPU_PCT = 0.1
TARGET_BPF_NS_RATIO = 0.5
TARGET_RSS_MIB = 40.0
TARGET_MAPS_MIB = 32.0
# Throughput verdicts: a bootstrap interval of the difference of median losses.
CI_LEVEL = 0.90
BOOTSTRAP_RESAMPLES = 2000


class RunError(Exception):
    """A run crashed: the profiler or the workload did not behave."""


def reap(p, timeout):
    """Wait for p with wait4 (to get its rusage). Returns (exit_code, rusage) or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        except ChildProcessError:
            return (p.returncode, None)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            forget(p)
            return (p.returncode, ru)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


# --------------------------------------------------------------------------
# /proc readers

def parse_stat(text):
    """(ppid, utime+stime+cutime+cstime ticks) from /proc/PID/stat text."""
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14.
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks


def process_tree(root):
    """root and all its descendants (by ppid), found by scanning /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        text = read_text(f"/proc/{name}/stat")
        if not text:
            continue
        try:
            ppid, _ = parse_stat(text)
        except (ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def vm_hwm_kib(pid):
    text = read_text(f"/proc/{pid}/status")
    if text:
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, re.M)
        if m:
            return int(m.group(1))
    return None


# BPF programs that a process only reaches through a bpf_link (its program fd
# closed) are opened by id with bpf(BPF_PROG_GET_FD_BY_ID) to read their stats.
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_BPF_PROG_GET_FD_BY_ID = 13
_libc = None


def prog_stats_by_id(prog_id):
    global _libc
    if _BPF_SYSCALL is None:
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()  # union bpf_attr, zeroed; prog_id is the first u32
    attr[0] = prog_id
    fd = _libc.syscall(_BPF_SYSCALL, _BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        return None
    try:
        return parse_fdinfo(read_text(f"/proc/self/fdinfo/{fd}") or "")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Monitor: polls a process tree while it runs.

class Monitor(benchlib.PollThread):
    """Polls the process tree rooted at `pid` every `interval` seconds.

    Keeps the last values seen: CPU ticks of the tree, VmHWM, the BPF
    programs (by prog_id: run_time_ns, run_cnt) and maps (by map_id: memlock)
    that the tree holds fds to, and the number of perf events it holds (as
    perf_event fds or perf_event bpf_links).
    """

    # Seconds between /proc scans for new descendants: often while the
    # profiler starts, rarely afterwards (a scan costs ~1 ms of CPU).
    TREE_RESCAN_START, TREE_RESCAN = 0.5, 5.0

    def __init__(self, pid, interval=0.2):
        super().__init__()
        self.pid = pid
        self.interval = interval
        self.tree = [pid]
        self.tree_scanned = 0.0
        self.started = time.monotonic()
        self.cpu_ticks = 0
        self.task_ns = {}  # (pid, tid) -> last sum_exec_runtime seen (ns), dead tasks kept
        self.hwm_main_kib = 0
        self.hwm_tree_kib = 0
        self.progs = {}  # prog_id -> dict(run_time_ns, run_cnt, type)
        self.maps = {}  # map_id -> dict(memlock, type, max_entries)
        self.maps_now_bytes = 0
        self.maps_peak_bytes = 0
        self.perf_event_fds = 0
        self.polls = 0
        self.self_cpu = 0.0  # CPU seconds the polling thread spent

    def _loop(self):
        t0 = time.thread_time()
        while not self._stop.is_set():
            self.sample()
            self.self_cpu = time.thread_time() - t0
            self._stop.wait(self.interval)

    def sample(self, rescan=False):
        """Take one sample; returns a snapshot dict (wall time, cpu ticks, bpf ns)."""
        with self.lock:
            now = time.monotonic()
            every = self.TREE_RESCAN_START if now - self.started < 10 else self.TREE_RESCAN
            if rescan or now - self.tree_scanned >= every:
                if os.path.exists(f"/proc/{self.pid}"):
                    self.tree = process_tree(self.pid)
                self.tree_scanned = now
            ticks, hwm_tree, alive = 0, 0, False
            maps_now, link_progs, fd_progs, perf_fds, perf_links = {}, set(), set(), 0, 0
            for pid in self.tree:
                text = read_text(f"/proc/{pid}/stat")
                if not text:
                    continue
                alive = True
                try:
                    ticks += parse_stat(text)[1]
                except (ValueError, IndexError):
                    pass
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    tids = ()
                for tid in tids:
                    st = read_text(f"/proc/{pid}/task/{tid}/schedstat")
                    if st:
                        self.task_ns[(pid, tid)] = int(st.split()[0])
                hwm = vm_hwm_kib(pid)
                if hwm:
                    hwm_tree += hwm
                    if pid == self.pid:
                        self.hwm_main_kib = max(self.hwm_main_kib, hwm)
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    except OSError:
                        continue
                    if not target.startswith("anon_inode:"):
                        continue
                    kind = target[len("anon_inode:"):]
                    if kind == "[perf_event]":
                        perf_fds += 1
                        continue
                    if kind not in ("bpf-prog", "bpf-map", "bpf_link"):
                        continue
                    info = parse_fdinfo(read_text(f"/proc/{pid}/fdinfo/{fd}") or "")
                    if kind == "bpf-prog" and "prog_id" in info:
                        fd_progs.add(int(info["prog_id"]))
                        self._note_prog(info)
                    elif kind == "bpf-map" and "map_id" in info:
                        mid = int(info["map_id"])
                        rec = {"memlock": int(info.get("memlock", 0)),
                               "type": info.get("map_type"),
                               "max_entries": int(info.get("max_entries", 0))}
                        maps_now[mid] = rec
                        self.maps[mid] = rec
                    elif kind == "bpf_link":
                        if info.get("prog_id"):
                            link_progs.add(int(info["prog_id"]))
                        # perf_event links (aya may close the perf_event fd once linked)
                        if "perf" in info.get("link_type", ""):
                            perf_links += 1
            # Programs reachable only through a link: open them by id.
            for prog_id in link_progs - fd_progs:
                info = prog_stats_by_id(prog_id)
                if info and "prog_id" in info:
                    self._note_prog(info)
            if alive:
                self.cpu_ticks = max(self.cpu_ticks, ticks)
                self.hwm_tree_kib = max(self.hwm_tree_kib, hwm_tree)
                # perf events it is attached to: one fd or one link per event
                self.perf_event_fds = max(perf_fds, perf_links)
                self.maps_now_bytes = sum(m["memlock"] for m in maps_now.values())
                self.maps_peak_bytes = max(self.maps_peak_bytes, self.maps_now_bytes)
            self.polls += 1
            return {"t": now, "cpu_ticks": self.cpu_ticks, "task_ns": dict(self.task_ns),
                    "bpf_ns": self.bpf_run_time_ns(),
                    "bpf_cnt": self.bpf_run_cnt(), "alive": alive}

    def _note_prog(self, info):
        pid = int(info["prog_id"])
        rt = int(info.get("run_time_ns", 0))
        cnt = int(info.get("run_cnt", 0))
        old = self.progs.get(pid, {"run_time_ns": 0, "run_cnt": 0})
        self.progs[pid] = {"run_time_ns": max(rt, old["run_time_ns"]),
                           "run_cnt": max(cnt, old["run_cnt"]),
                           "type": info.get("prog_type")}

    def bpf_run_time_ns(self):
        return sum(p["run_time_ns"] for p in self.progs.values())

    def bpf_run_cnt(self):
        return sum(p["run_cnt"] for p in self.progs.values())


# --------------------------------------------------------------------------
# Workload

def run_workload(exe, threads, duration, monitor=True):
    """Run the workload; returns dict(rate, iterations, elapsed, cpu_share_pct, monitor_cpu_s).

    With monitor=True (baselines) the same poller that watches a profiler
    during a profiled run watches the workload, so both kinds of run carry the
    poller's small cost.
    """
    with tempfile.TemporaryFile() as out:
        p = spawn([str(exe), "--threads", str(threads), "--duration", str(duration)],
                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        mon = Monitor(p.pid).start() if monitor else None
        try:
            res = reap(p, duration + 60)
        finally:
            if mon:
                mon.stop()
        if res is None:
            raise RunError("workload did not finish in time")
        code, ru = res
        out.seek(0)
        text = out.read().decode(errors="replace")
    if code != 0:
        raise RunError(f"workload exited with {code}: {text.strip()}")
    m = re.search(r"iterations=(\d+) elapsed=([\d.]+) threads=(\d+) rate=([\d.]+)", text)
    if not m:
        raise RunError(f"cannot parse workload output: {text!r}")
    elapsed = float(m.group(2))
    cpu_s = (ru.ru_utime + ru.ru_stime) if ru else None
    return {"iterations": int(m.group(1)), "elapsed": elapsed, "rate": float(m.group(4)),
            "cpu_s": cpu_s,
            # Iterations per CPU-second it got: insensitive to other load taking
            # CPUs away, but blind to CPU the profiler's own process takes.
            "rate_cpu": int(m.group(1)) / cpu_s if cpu_s else None,
            # Share of the CPUs it could use that it got: well below 100 % means
            # something else (not the profiler's few ms) competed for the CPUs.
            "cpu_share_pct": cpu_s / (elapsed * min(threads, NCPU)) * 100 if cpu_s else None,
            "monitor_cpu_s": mon.self_cpu if mon else 0.0}


def host_busy_pct(seconds=1.0):
    """Busy % of all CPUs over `seconds` from /proc/stat (to warn about a busy machine)."""
    def snap():
        f = [int(x) for x in (read_text("/proc/stat") or "cpu 0 0 0 0").splitlines()[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f), idle
    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


# --------------------------------------------------------------------------
# Profilers

class Profiler:
    def __init__(self, name, has_bpf):
        self.name = name
        self.has_bpf = has_bpf

    def command(self, hz, duration, outdir):
        raise NotImplementedError


class Ours(Profiler):
    def __init__(self, path):
        super().__init__("ours", True)
        self.path = path

    def command(self, hz, duration, outdir):
        # --duration only has to outlast the run: we stop it with SIGINT.
        return [str(self.path), "record", "--duration", str(int(duration) + 120),
                "--frequency", str(hz), "--output-dir", str(outdir)]


class Perf(Profiler):
    def __init__(self):
        super().__init__("perf", False)

    def command(self, hz, duration, outdir):
        return ["perf", "record", "-e", "cpu-clock", "-F", str(hz), "-a", "-g",
                "-o", str(outdir / "perf.data")]


class Bpftrace(Profiler):
    def __init__(self):
        super().__init__("bpftrace", True)

    def command(self, hz, duration, outdir):
        return ["bpftrace", "-e", BPFTRACE_SCRIPT.format(hz=hz)]


def tail(path, n):
    text = read_text(path) or ""
    return text.splitlines()[-n:]


class Started:
    """A profiler process started by start_profiler, with its monitor and output files."""

    def __init__(self, prof, p, mon, t_launch, out_path, err_path):
        self.prof, self.p, self.mon, self.t_launch = prof, p, mon, t_launch
        self.out_path, self.err_path = out_path, err_path


def start_profiler(prof, args, tmp, tag, hz, duration):
    outdir = tmp / tag
    outdir.mkdir()
    out_path, err_path = outdir / "stdout", outdir / "stderr"
    cmd = prof.command(hz, duration, outdir)
    vlog(f"  [{tag}] " + " ".join(cmd))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t_launch = time.monotonic()
        p = spawn(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=outdir)
    return Started(prof, p, Monitor(p.pid, interval=args.poll).start(), t_launch, out_path, err_path)


def wait_attached(run, args):
    """Waits until `run` is attached; returns the seconds it took from launch.

    Attached means it holds a perf event per CPU (all three profilers open one
    per CPU; as an fd or a bpf_link) and, for BPF profilers, a BPF program; and
    at least --settle s have passed since launch.
    """
    prof, p, mon = run.prof, run.p, run.mon
    deadline = run.t_launch + args.attach_timeout
    ready_at = None
    while True:
        if p.poll() is not None:
            raise RunError(f"{prof.name} exited with {p.returncode} before the workload started:\n  "
                           + "\n  ".join(tail(run.err_path, 15)))
        now = time.monotonic()
        if ready_at is None:
            with mon.lock:
                attached = mon.perf_event_fds >= NCPU and (not prof.has_bpf or mon.progs)
            if attached:
                ready_at = now
        if ready_at is not None and now - run.t_launch >= args.settle and now - ready_at >= 0.3:
            break
        if now >= deadline:
            log(f"  warning: {prof.name} shows no attachment after {args.attach_timeout:.0f} s "
                f"(perf_event fds {mon.perf_event_fds}, BPF programs {len(mon.progs)}); "
                "running the workload anyway")
            break
        time.sleep(0.05)
    return (ready_at or time.monotonic()) - run.t_launch


def check_alive(run):
    if run.p.poll() is not None:
        raise RunError(f"{run.prof.name} exited with {run.p.returncode} during the workload:\n  "
                       + "\n  ".join(tail(run.err_path, 15)))


def stop_profiler(run, args, tag):
    """SIGINT, reap, check the exit code; returns (code, rusage, exit_s, t_exit, stderr tail)."""
    t_stop = time.monotonic()
    run.p.send_signal(signal.SIGINT)
    res = reap(run.p, args.exit_timeout)
    if res is None:
        raise RunError(f"{run.prof.name} did not exit within {args.exit_timeout:.0f} s of SIGINT")
    code, ru = res
    t_exit = time.monotonic()
    err_tail = tail(run.err_path, 15)
    if benchlib.VERBOSE:
        log(f"  [{tag}] {run.prof.name} exited with {code} {t_exit - t_stop:.2f} s after SIGINT; "
            "stderr tail:")
        for line in err_tail:
            log("    | " + line)
    if code not in (0, 130, -signal.SIGINT):
        raise RunError(f"{run.prof.name} exited with {code} after SIGINT:\n  " + "\n  ".join(err_tail))
    return code, ru, t_exit - t_stop, t_exit, err_tail


def profiled_run(prof, args, exe, tmp, tag, hz, duration):
    """Start prof, wait for it to attach, run the workload, stop prof with SIGINT.

    Returns a dict of raw figures for the run.
    """
    run = start_profiler(prof, args, tmp, tag, hz, duration)
    mon = run.mon
    try:
        attach_s = wait_attached(run, args)
        s0 = mon.sample(rescan=True)
        work = run_workload(exe, args.threads, duration, monitor=False)
        s1 = mon.sample(rescan=True)
        check_alive(run)
        code, ru, exit_s, t_exit, err_tail = stop_profiler(run, args, tag)
    finally:
        mon.stop()
        if run.p.returncode is None:
            kill_all_children()

    window = s1["t"] - s0["t"]
    host_s = window * NCPU
    # Process CPU in the window: per-thread sum_exec_runtime (ns, from
    # /proc/PID/task/TID/schedstat) when the kernel has it; /proc/PID/stat
    # utime+stime(+cutime+cstime) only counts whole clock ticks (10 ms = 0.025 %
    # of a 2-CPU host over 20 s), so it is kept as a cross-check.
    tick_cpu_s = (s1["cpu_ticks"] - s0["cpu_ticks"]) / CLK_TCK
    if s1["task_ns"]:
        proc_cpu_s = sum(ns - s0["task_ns"].get(k, 0) for k, ns in s1["task_ns"].items()) / 1e9
    else:
        proc_cpu_s = tick_cpu_s
    bpf_s = (s1["bpf_ns"] - s0["bpf_ns"]) / 1e9
    run_cnt = mon.bpf_run_cnt()
    run_ns = mon.bpf_run_time_ns()
    life_cpu_s = (ru.ru_utime + ru.ru_stime) if ru else mon.cpu_ticks / CLK_TCK
    rss_kib = max(mon.hwm_tree_kib, ru.ru_maxrss if ru else 0)
    return {
        "profiler": prof.name,
        "tag": tag,
        "hz": hz,
        "rate": work["rate"],
        "workload_cpu_share_pct": work["cpu_share_pct"],
        "rate_cpu": work["rate_cpu"],
        "iterations": work["iterations"],
        "workload_elapsed_s": work["elapsed"],
        "attach_s": attach_s,
        "exit_s": exit_s,
        "exit_code": code,
        "window_s": window,
        "proc_cpu_s": proc_cpu_s,
        "proc_cpu_pct": proc_cpu_s / host_s * 100,
        "proc_cpu_ticks_s": tick_cpu_s,
        "bpf_cpu_s": bpf_s if prof.has_bpf else None,
        "bpf_cpu_pct": bpf_s / host_s * 100 if prof.has_bpf else None,
        "total_cpu_pct": (proc_cpu_s + (bpf_s if prof.has_bpf else 0)) / host_s * 100,
        "bpf_run_time_ns": run_ns if prof.has_bpf else None,
        "bpf_run_cnt": run_cnt if prof.has_bpf else None,
        "bpf_run_cnt_window": (s1["bpf_cnt"] - s0["bpf_cnt"]) if prof.has_bpf else None,
        "bpf_ns_per_sample": (run_ns / run_cnt) if prof.has_bpf and run_cnt else None,
        # the same over the workload window only (every CPU busy)
        "bpf_ns_per_sample_window": ((s1["bpf_ns"] - s0["bpf_ns"]) / (s1["bpf_cnt"] - s0["bpf_cnt"])
                                     if prof.has_bpf and s1["bpf_cnt"] > s0["bpf_cnt"] else None),
        "bpf_progs": mon.progs,
        "bpf_maps": mon.maps,
        "bpf_map_mib": mon.maps_peak_bytes / MIB if prof.has_bpf else None,
        "rss_peak_mib": rss_kib / 1024,
        "rss_main_hwm_mib": (ru.ru_maxrss if ru else mon.hwm_main_kib) / 1024,
        "lifetime_cpu_s": life_cpu_s,
        "lifetime_s": t_exit - run.t_launch,
        "monitor_cpu_s": mon.self_cpu,
        "monitor_polls": mon.polls,
        "stderr_tail": err_tail,
    }


def paired_bpf_rounds(args, exe, tmp, ours, bt, crashed):
    """Ours and bpftrace attached together to the same workload runs.

    The BPF cost of a sample here swings by tens of percent from one minute to
    the next (a nested VM: cold caches and TLBs after every exit), so figures
    from different runs compare badly. With both attached at once, each sees
    the same conditions and the ratio of their ns per sample is steadier.
    Returns one dict per round that finished.
    """
    rounds = []
    for r in range(args.paired_rounds):
        pair = (ours, bt) if r % 2 == 0 else (bt, ours)  # alternate who attaches first
        tag = f"p{r + 1}"
        log(f"paired round {r + 1}/{args.paired_rounds}: ours and bpftrace together at "
            f"{args.frequency} Hz")
        started = []
        try:
            for prof in pair:
                started.append(start_profiler(prof, args, tmp, f"{tag}-{prof.name}",
                                              args.frequency, args.paired_duration))
            for run in started:
                wait_attached(run, args)
            s0 = {run.prof.name: run.mon.sample(rescan=True) for run in started}
            run_workload(exe, args.threads, args.paired_duration, monitor=False)
            s1 = {run.prof.name: run.mon.sample(rescan=True) for run in started}
            for run in started:
                check_alive(run)
            for run in started:
                stop_profiler(run, args, f"{tag}-{run.prof.name}")
        except RunError as e:
            log(f"  ERROR: {e}")
            crashed.append({"tag": tag, "error": str(e)})
            continue
        finally:
            for run in started:
                run.mon.stop()
            if any(run.p.returncode is None for run in started):
                kill_all_children()
        cnt = {n: s1[n]["bpf_cnt"] - s0[n]["bpf_cnt"] for n in s1}
        ns = {n: (s1[n]["bpf_ns"] - s0[n]["bpf_ns"]) / cnt[n] if cnt[n] > 0 else None for n in s1}
        if ns["ours"] is None or not ns["bpftrace"]:
            log("  no BPF runs seen in the window: round skipped")
            continue
        row = {"round": r + 1, "first": pair[0].name, "ours_ns": ns["ours"],
               "bpftrace_ns": ns["bpftrace"], "ours_runs": cnt["ours"],
               "bpftrace_runs": cnt["bpftrace"], "ratio": ns["ours"] / ns["bpftrace"]}
        rounds.append(row)
        log(f"  ours {row['ours_ns']:.0f} ns, bpftrace {row['bpftrace_ns']:.0f} ns per sample "
            f"({row['ours_runs']} and {row['bpftrace_runs']} runs): ratio {row['ratio']:.3f}")
    return rounds


def summarize_paired(rounds):
    if not rounds:
        return None
    ratios = [r["ratio"] for r in rounds]
    return {"rounds": len(rounds), "ours_ns": median(r["ours_ns"] for r in rounds),
            "bpftrace_ns": median(r["bpftrace_ns"] for r in rounds),
            "ratio": median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


# --------------------------------------------------------------------------
# Statistics and report

def pct_diff(a, b):
    """|a - b| as % of their mean."""
    return abs(a - b) / ((a + b) / 2) * 100


def fmt(v, spec="{:.2f}"):
    return "n/a" if v is None else spec.format(v)


def diff_of_medians_ci(a, b, level=None, resamples=BOOTSTRAP_RESAMPLES):
    """Percentile bootstrap interval of median(a) - median(b).

    The runs of each profiler are resampled independently (each run's loss is
    already taken against the baselines beside it, so slow drift of the host is
    out of it). Seeded, so the same figures give the same interval.
    """
    level = CI_LEVEL if level is None else level
    rng = random.Random(0)
    diffs = sorted(median(rng.choices(a, k=len(a))) - median(rng.choices(b, k=len(b)))
                   for _ in range(resamples))
    tail = (1 - level) / 2
    return diffs[int(tail * (resamples - 1))], diffs[int((1 - tail) * (resamples - 1))]


def summarize(name, runs):
    return {
        "runs": len(runs),
        "loss_pct": median(r["loss_pct"] for r in runs),
        "loss_runs": [r["loss_pct"] for r in runs],
        "loss_cpu_pct": median(r["loss_cpu_pct"] for r in runs),
        "noise_pct": median(r["noise_pct"] for r in runs),
        "proc_cpu_pct": median(r["proc_cpu_pct"] for r in runs),
        "bpf_cpu_pct": median(r["bpf_cpu_pct"] for r in runs),
        "total_cpu_pct": median(r["total_cpu_pct"] for r in runs),
        # Over the workload window only (every CPU busy: samples, not the cheap
        # idle-skipped runs of the settling time); the whole life where no window.
        "bpf_ns_per_sample": median(r["bpf_ns_per_sample_window"] if r.get("bpf_ns_per_sample_window")
                                    is not None else r["bpf_ns_per_sample"] for r in runs),
        "bpf_ns_per_sample_life": median(r["bpf_ns_per_sample"] for r in runs),
        "rss_peak_mib": median(r["rss_peak_mib"] for r in runs),
        "bpf_map_mib": median(r["bpf_map_mib"] for r in runs),
        "lifetime_cpu_s": median(r["lifetime_cpu_s"] for r in runs),
        "attach_s": median(r["attach_s"] for r in runs),
        "exit_s": median(r["exit_s"] for r in runs),
    }


def print_table(summary, noise_all, noise_cpu, args):
    cols = [
        ("profiler", 9, None, None),
        ("loss %", 8, "loss_pct", "{:+.2f}"),
        ("noise %", 8, "noise_pct", "{:.2f}"),
        ("loss/CPU %", 10, "loss_cpu_pct", "{:+.2f}"),
        ("proc %", 8, "proc_cpu_pct", "{:.3f}"),
        ("BPF %", 8, "bpf_cpu_pct", "{:.3f}"),
        ("total %", 8, "total_cpu_pct", "{:.3f}"),
        ("BPF ns/smp", 11, "bpf_ns_per_sample", "{:.0f}"),
        ("RSS MiB", 8, "rss_peak_mib", "{:.1f}"),
        ("maps MiB", 9, "bpf_map_mib", "{:.2f}"),
        ("life CPU s", 11, "lifetime_cpu_s", "{:.2f}"),
    ]
    print()
    print(f"Medians over {args.rounds} round(s), {args.duration:g} s workload runs on {args.threads} "
          f"thread(s), {NCPU} CPU(s), {args.frequency} Hz:")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _, _) in enumerate(cols)))
    for name, s in summary.items():
        cells = [name.ljust(cols[0][1])]
        for h, w, key, spec in cols[1:]:
            cells.append(fmt(s[key], spec).rjust(w))
        print("  ".join(cells))
    print(f"baseline-vs-baseline noise (all consecutive baselines): {fmt(noise_all)} % "
          f"(per CPU-second: {fmt(noise_cpu)} %)")
    print()
    print("  loss %     workload throughput lost vs the mean of the baselines before and after the run")
    print("  noise %    |difference| between those two baselines (what 'no loss' looks like)")
    print("  loss/CPU % the same loss in iterations per CPU-second the workload got (robust to other")
    print("             load on the machine, but leaves out CPU taken by the profiler's own process)")
    print("  proc %     profiler process tree user+sys CPU during the workload, % of host (all CPUs)")
    print("  BPF %      run time of its BPF programs during the workload (bpf_stats), % of host")
    print("  total %    proc % + BPF %")
    print("  BPF ns/smp BPF program run_time_ns / run_cnt")
    print("  RSS MiB    peak resident set (VmHWM / ru_maxrss) of the profiler process tree")
    print("  maps MiB   memlock of the BPF maps it holds fds to (peak, deduplicated by map id)")
    print("  life CPU s profiler CPU seconds over its whole life (start-up, run, shutdown/output)")


def check_line(label, verdict, detail):
    print(f"  [{verdict:^12}] {label}: {detail}")


def print_checks(summary, loss, paired, args):
    print()
    print(f"Targets (at {args.frequency} Hz):")
    checks = {}
    ours = summary.get("ours")
    if ours is None:
        print("  (ours was not run: no target can be checked)")
        return checks

    for peer in ("perf", "bpftrace"):
        s = summary.get(peer)
        label = f"throughput loss <= {peer}'s"
        if s is None or ours["loss_pct"] is None or s["loss_pct"] is None:
            check_line(label, "N/A", f"{peer} not run")
            checks[label] = "n/a"
            continue
        a, b = ours["loss_pct"], s["loss_pct"]
        lo, hi = diff_of_medians_ci(ours["loss_runs"], s["loss_runs"])
        if a <= b:
            v = "PASS"
        elif lo <= 0:
            # Worse at the medians, but the interval holds "no worse": not
            # shown to be met, nor missed; more rounds narrow it.
            v = "INCONCLUSIVE"
        else:
            v = "FAIL"
        check_line(label, v, f"ours {a:+.2f} % vs {peer} {b:+.2f} %: difference {a - b:+.2f} %, "
                   f"{CI_LEVEL:.0%} interval {lo:+.2f} to {hi:+.2f} % over "
                   f"{len(ours['loss_runs'])} and {len(s['loss_runs'])} runs")
        checks[label] = v

    def simple(label, value, limit, unit, spec="{:.3f}"):
        if value is None:
            check_line(label, "N/A", "not measured")
            checks[label] = "n/a"
            return
        v = "PASS" if value <= limit else "FAIL"
        check_line(label, v, f"{spec.format(value)} {unit} (target <= {spec.format(limit)} {unit})")
        checks[label] = v

    simple("our CPU (process + BPF) <= 0.1 % of host", ours["total_cpu_pct"], TARGET_CPU_PCT, "%")
    bt = summary.get("bpftrace")
    label = "BPF ns per sample <= half of bpftrace's, sequential rounds"
    if bt is None or bt["bpf_ns_per_sample"] is None or ours["bpf_ns_per_sample"] is None:
        check_line(label, "N/A", "bpftrace not run" if bt is None else "not measured")
        checks[label] = "n/a"
    else:
        limit = bt["bpf_ns_per_sample"] * TARGET_BPF_NS_RATIO
        simple(label, ours["bpf_ns_per_sample"], limit, "ns", "{:.0f}")
    label = "BPF ns per sample <= half of bpftrace's, paired rounds"
    if paired is None:
        check_line(label, "N/A", "paired rounds not run")
        checks[label] = "n/a"
    else:
        v = "PASS" if paired["ratio"] <= TARGET_BPF_NS_RATIO else "FAIL"
        check_line(label, v, f"median ratio {paired['ratio']:.3f} over {paired['rounds']} round(s), "
                   f"per round {paired['ratio_min']:.3f} to {paired['ratio_max']:.3f} "
                   f"(target <= {TARGET_BPF_NS_RATIO})")
        checks[label] = v
    simple("peak RSS <= 40 MiB", ours["rss_peak_mib"], TARGET_RSS_MIB, "MiB", "{:.1f}")
    simple("BPF maps <= 32 MiB", ours["bpf_map_mib"], TARGET_MAPS_MIB, "MiB", "{:.2f}")

    label = f"zero lost samples at {args.loss_frequency} Hz on {args.threads} busy CPU(s)"
    if loss is None:
        check_line(label, "N/A", "loss check not run")
        checks[label] = "n/a"
    elif loss.get("lost") is None:
        check_line(label, "N/A", "no 'lost' line in our summary")
        checks[label] = "n/a"
    else:
        v = "PASS" if loss["lost"] == 0 else "FAIL"
        extra = f", summary samples {fmt(loss.get('samples'), '{}')}"
        if loss.get("bpf_run_cnt_window") is not None:
            extra += (f", BPF runs in the busy window {loss['bpf_run_cnt_window']} of "
                      f"~{loss['expected_samples']:.0f} expected (Hz x CPUs x {loss['window_s']:.1f} s)")
        check_line(label, v, f"lost {loss['lost']}{extra}")
        checks[label] = v
    return checks


# --------------------------------------------------------------------------

def parse_summary(text):
    """(lost, samples) from our profiler's end-of-run summary: its `  lost: N (...)`
    and `  samples: N in ...` lines (the last of each wins). Anchored to the start
    of those lines: other lines of the summary also count samples ("stacks deeper
    than 127 frames: N samples") or losses ("fork and exec events lost").
    """
    lost = samples = None
    for line in text.splitlines():
        m = re.match(r"\s*lost:\s*([0-9]+)", line)
        if m:
            lost = int(m.group(1))
        m = re.match(r"\s*samples:\s*([0-9]+)", line)
        if m:
            samples = int(m.group(1))
    return lost, samples


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="baseline/profiled pairs per profiler (default 5)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per workload run (default 20)")
    ap.add_argument("--frequency", type=int, default=97, help="sampling frequency in Hz (default 97)")
    ap.add_argument("--profiler", default=str(REPO_DIR / "target/release/profiler"),
                    help="our profiler binary (default target/release/profiler)")
    ap.add_argument("--skip", default="", help="comma-separated: ours,perf,bpftrace,paired,loss")
    ap.add_argument("--threads", type=int, default=NCPU, help=f"workload threads (default: CPUs = {NCPU})")
    ap.add_argument("--settle", type=float, default=1.5,
                    help="minimum seconds between starting a profiler and starting the workload (default 1.5)")
    ap.add_argument("--attach-timeout", type=float, default=30.0,
                    help="seconds to wait for a profiler to attach before running anyway (default 30)")
    ap.add_argument("--exit-timeout", type=float, default=120.0,
                    help="seconds a profiler may take to exit after SIGINT (default 120)")
    ap.add_argument("--poll", type=float, default=0.2, help="poll interval in seconds (default 0.2)")
    ap.add_argument("--loss-duration", type=float, default=10.0, help="seconds of the loss check (default 10)")
    ap.add_argument("--loss-frequency", type=int, default=997, help="Hz of the loss check (default 997)")
    ap.add_argument("--paired-rounds", type=int, default=5,
                    help="rounds with ours and bpftrace attached together, for BPF ns per sample (default 5)")
    ap.add_argument("--paired-duration", type=float,
                    help="seconds per paired round (default: --duration)")
    benchlib.script_options(ap, kept="keep the temporary directory (outputs, stderr)",
                            verbose="show commands and profiler stderr tails")
    args = ap.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = args.skip - set(PROFILERS) - {"loss", "paired"}
    if bad:
        ap.error(f"unknown --skip value(s): {', '.join(sorted(bad))}")
    if args.rounds < 1 or args.duration <= 0 or args.threads < 1:
        ap.error("--rounds, --duration and --threads must be positive")
    if args.paired_duration is None:
        args.paired_duration = args.duration
    return args


def select_profilers(args):
    profs = []
    if "ours" not in args.skip:
        path = Path(args.profiler)
        if path.is_file() and os.access(path, os.X_OK):
            profs.append(Ours(path.resolve()))
        else:
            log(f"note: {path} does not exist (build it with `cargo xtask bench` or "
                "`cargo build --release`): skipping ours and the loss check")
            args.skip |= {"ours", "loss"}
    else:
        args.skip.add("loss")
    for name, cls in (("perf", Perf), ("bpftrace", Bpftrace)):
        if name in args.skip:
            continue
        if shutil.which(name) is None:
            log(f"note: `{name}` not found on PATH: skipping it")
            args.skip.add(name)
            continue
        profs.append(cls())
    return profs


def benchmark(args, tmp, results):
    exe = build_workload(tmp)
    profs = select_profilers(args)
    busy = host_busy_pct()
    results["host_busy_before_pct"] = busy
    if busy > 5:
        log(f"warning: the machine is {busy:.0f} % busy before the benchmark: other load makes "
            "the throughput figures noisy")
    results["profilers"] = [p.name for p in profs]
    crashed = []

    baselines = []  # every baseline, in run order
    runs = []  # every profiled run, with indexes of the baselines around it

    def baseline():
        b = run_workload(exe, args.threads, args.duration)
        b["index"] = len(baselines)
        baselines.append(b)
        vlog(f"  baseline #{b['index']}: {b['rate']:.0f} it/s")
        return b

    if profs:
        log(f"{args.rounds} round(s) x {len(profs)} profiler(s) x 2 runs of {args.duration:g} s "
            f"(~{args.rounds * len(profs) * 2 * (args.duration + 3) / 60:.1f} min)")
    for r in range(args.rounds):
        # Rotate the order each round so no profiler always runs at the same point.
        order = profs[r % len(profs):] + profs[:r % len(profs)] if profs else []
        for prof in order:
            b = baseline()
            tag = f"r{r + 1}-{prof.name}"
            log(f"round {r + 1}/{args.rounds}: {prof.name} at {args.frequency} Hz")
            try:
                run = profiled_run(prof, args, exe, tmp, tag, args.frequency, args.duration)
            except RunError as e:
                log(f"  ERROR: {e}")
                crashed.append({"tag": tag, "error": str(e)})
                continue
            run["round"] = r + 1
            run["baseline_before"] = b["index"]
            runs.append(run)
            vlog(f"  {prof.name}: {run['rate']:.0f} it/s, proc {run['proc_cpu_s']:.4f} s "
                 f"({run['proc_cpu_ticks_s']:.2f} s in ticks), "
                 f"BPF {fmt(run['bpf_cpu_s'], '{:.3f}')} s, BPF ns/smp "
                 f"{fmt(run['bpf_ns_per_sample'], '{:.0f}')}, RSS {run['rss_peak_mib']:.1f} MiB, "
                 f"maps {fmt(run['bpf_map_mib'])} MiB, life CPU {run['lifetime_cpu_s']:.2f} s, "
                 f"attach {run['attach_s']:.2f} s, exit {run['exit_s']:.2f} s")
    if runs:
        baseline()  # closing baseline, so every profiled run has one after it too

    for run in runs:
        before = baselines[run["baseline_before"]]["rate"]
        after_i = run["baseline_before"] + 1
        after = baselines[after_i]["rate"] if after_i < len(baselines) else None
        ref = (before + after) / 2 if after is not None else before
        run["baseline_rate"] = ref
        run["loss_pct"] = (ref - run["rate"]) / ref * 100
        run["noise_pct"] = pct_diff(before, after) if after is not None else None
        cb = baselines[run["baseline_before"]]["rate_cpu"]
        ca = baselines[after_i]["rate_cpu"] if after is not None else None
        cref = (cb + ca) / 2 if cb and ca else cb
        run["loss_cpu_pct"] = (cref - run["rate_cpu"]) / cref * 100 if cref and run["rate_cpu"] else None

    rates = [b["rate"] for b in baselines]
    noise_all = median(pct_diff(a, b) for a, b in zip(rates, rates[1:]))
    crates = [b["rate_cpu"] for b in baselines]
    results["noise_cpu_all_pct"] = median(pct_diff(a, b) for a, b in zip(crates, crates[1:]) if a and b)
    summary = {p.name: summarize(p.name, [r for r in runs if r["profiler"] == p.name])
               for p in profs if any(r["profiler"] == p.name for r in runs)}

    ours = next((p for p in profs if p.name == "ours"), None)
    bt = next((p for p in profs if p.name == "bpftrace"), None)
    paired = None
    if ours and bt and "paired" not in args.skip and args.paired_rounds > 0:
        log(f"{args.paired_rounds} paired round(s) of {args.paired_duration:g} s: ours and bpftrace "
            "attached to the same workload run")
        results["paired_rounds"] = paired_bpf_rounds(args, exe, tmp, ours, bt, crashed)
        paired = summarize_paired(results["paired_rounds"])
        results["paired"] = paired

    loss = None
    if ours and "loss" not in args.skip:
        log(f"loss check: ours at {args.loss_frequency} Hz, {args.loss_duration:g} s, "
            f"{args.threads} busy thread(s)")
        try:
            run = profiled_run(ours, args, exe, tmp, "loss", args.loss_frequency, args.loss_duration)
            lost, samples = parse_summary((read_text(tmp / "loss" / "stdout") or "")
                                          + "\n" + (read_text(tmp / "loss" / "stderr") or ""))
            loss = {
                "lost": lost,
                "samples": samples,
                "expected_samples": args.loss_frequency * min(args.threads, NCPU) * run["window_s"],
                "window_s": run["window_s"],
                "bpf_run_cnt": run["bpf_run_cnt"],
                "bpf_run_cnt_window": run["bpf_run_cnt_window"],
                "bpf_ns_per_sample": run["bpf_ns_per_sample"],
                "total_cpu_pct": run["total_cpu_pct"],
                "rss_peak_mib": run["rss_peak_mib"],
                "stderr_tail": run["stderr_tail"],
            }
            log(f"  lost {fmt(loss['lost'], '{}')}, samples {fmt(loss['samples'], '{}')}, "
                f"BPF runs in the window {fmt(loss['bpf_run_cnt_window'], '{}')} "
                f"(~{loss['expected_samples']:.0f} expected)")
        except RunError as e:
            log(f"  ERROR: {e}")
            crashed.append({"tag": "loss", "error": str(e)})

    results.update({"baselines": baselines, "runs": runs, "summary": summary,
                    "noise_all_pct": noise_all, "loss_check": loss, "crashed": crashed})
    if summary:
        print_table(summary, noise_all, results["noise_cpu_all_pct"], args)
    if paired:
        print()
        print(f"Paired rounds (ours and bpftrace attached to the same {args.paired_duration:g} s "
              f"workload run), BPF ns per sample, medians over {paired['rounds']} round(s):")
        print(f"  ours {paired['ours_ns']:.0f} ns, bpftrace {paired['bpftrace_ns']:.0f} ns; "
              f"ratio {paired['ratio']:.3f} (per round: "
              + ", ".join(f"{r['ratio']:.3f}" for r in results["paired_rounds"]) + ")")
    results["checks"] = print_checks(summary, loss, paired, args)
    if crashed:
        print()
        print(f"{len(crashed)} run(s) crashed:")
        for c in crashed:
            print(f"  {c['tag']}: {c['error'].splitlines()[0]}")
    shares = [(r["tag"], r["workload_cpu_share_pct"]) for r in runs] + \
        [(f"baseline #{b['index']}", b["cpu_share_pct"]) for b in baselines]
    shares = [(t, v) for t, v in shares if v is not None]
    if shares:
        disturbed = [f"{t} ({v:.1f} %)" for t, v in shares if v < 97]
        print()
        print(f"workload CPU share (CPU time it got / its threads x wall): median "
              f"{median(v for _, v in shares):.1f} %, lowest {min(v for _, v in shares):.1f} %")
        if disturbed:
            print(f"WARNING: other load took CPU from {len(disturbed)} run(s): {', '.join(disturbed)}; "
                  "their throughput figures are disturbed (medians resist a few; rerun on an idle machine)")
        results["disturbed_runs"] = disturbed
    monitor_cpu = [r["monitor_cpu_s"] for r in runs] + [b["monitor_cpu_s"] for b in baselines]
    if monitor_cpu:
        vlog(f"(poller CPU per run, median: {median(monitor_cpu):.3f} s; it runs during baselines too)")
    return 1 if crashed else 0


def main():
    args = parse_args()
    refused = benchlib.start_script("overhead.py", "perf -a, bpftrace, BPF stats, /proc/PID/fdinfo", args.verbose)
    if refused is not None:
        return refused

    results = {"config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
               "ncpu": NCPU, "kernel": platform.release()}
    old_stats = read_text(BPF_STATS_SYSCTL)
    tmp = Path(tempfile.mkdtemp(prefix="profiler-bench-"))
    code = 1
    try:
        if old_stats is None:
            log("warning: kernel.bpf_stats_enabled is unavailable: BPF run time cannot be measured")
        else:
            BPF_STATS_SYSCTL.write_text("1\n")
        code = benchmark(args, tmp, results)
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        kill_all_children()
        if old_stats is not None:
            try:
                BPF_STATS_SYSCTL.write_text(old_stats)
            except OSError as e:
                log(f"warning: could not restore kernel.bpf_stats_enabled: {e}")
        benchlib.finish_script(results, args.json if "runs" in results else None, tmp,
                               args.keep, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
