#!/usr/bin/env python3
"""A/B of two builds of the profiler: BPF time per sample, both attached at once.

    sudo python3 bench/ab_builds.py OLD_BINARY NEW_BINARY [--rounds 6] [--duration 15]

Each round starts both builds' `record`, waits for them to attach, runs the
benchmark workload (bench/workload.c) on every CPU, and reads the run time and run
count of each one's perf_event programs (kernel.bpf_stats_enabled, which the
profiler turns on) over the workload window. It prints each round's ns per sample
and NEW/OLD, then the median ratio and the geometric mean of consecutive pairs of
rounds.

Why both at once: this VM's speed drifts by tens of percent within minutes, so
figures from separate runs compare badly, while the ratio of two programs that saw
the same minutes is steady. Which build attaches first alternates by round: the
first-attached one has run ~20 % cheaper, whichever it was, and a pair of rounds
(one each way) cancels that out; so use an even number of rounds.

What the eBPF figures in ARCHITECTURE.md section 2 were measured with.
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (build_workload, guarded, log, parse_fdinfo, read_text, script_options, spawn,
                      start_script)

PERF_EVENT_PROG_TYPE = 7


class RunError(Exception):
    """A build did not attach or stay up."""


def perf_event_prog_stats(pid):
    """(run_time_ns, run_cnt) summed over the perf_event programs `pid` holds fds to."""
    run_time = runs = 0
    fd_dir = f"/proc/{pid}/fdinfo"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return 0, 0
    for fd in fds:
        info = parse_fdinfo(read_text(f"{fd_dir}/{fd}") or "")
        if info.get("prog_type") == str(PERF_EVENT_PROG_TYPE):
            run_time += int(info.get("run_time_ns", 0))
            runs += int(info.get("run_cnt", 0))
    return run_time, runs


def wait_attached(p, timeout):
    """Waits until `p` holds a perf_event program that has run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RunError(f"{p.args[0]} exited with {p.returncode} before attaching")
        if perf_event_prog_stats(p.pid)[1] > 0:
            return
        time.sleep(0.2)
    raise RunError(f"{p.args[0]} did not attach within {timeout} s")


def one_round(builds, workload, args, tmp):
    procs = []
    for i, build in enumerate(builds):
        procs.append(spawn([build, "record", "--duration", str(int(args.duration) + 60),
                            "--output-dir", Path(tmp) / f"out{i}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for p in procs:
            wait_attached(p, args.attach_timeout)
        time.sleep(1)
        before = [perf_event_prog_stats(p.pid) for p in procs]
        subprocess.run([workload, "--duration", str(args.duration)],
                       stdout=subprocess.DEVNULL, check=True)
        after = [perf_event_prog_stats(p.pid) for p in procs]
        for p in procs:
            if p.poll() is not None:
                raise RunError(f"{p.args[0]} exited with {p.returncode} during the workload")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(2)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    ns = []
    for b, a in zip(before, after):
        runs = a[1] - b[1]
        if runs <= 0:
            raise RunError("a build's program did not run during the workload")
        ns.append((a[0] - b[0]) / runs)
    return ns


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="the build to compare against (A)")
    ap.add_argument("new", help="the build under test (B)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (default 6; keep it even)")
    ap.add_argument("--duration", type=float, default=15, help="seconds of workload per round")
    ap.add_argument("--attach-timeout", type=float, default=60)
    script_options(ap)
    args = ap.parse_args()
    status = start_script("ab_builds.py", "it loads eBPF programs", args.verbose)
    if status is not None:
        return status
    for build in (args.old, args.new):
        if not os.access(build, os.X_OK):
            log(f"{build}: not an executable file")
            return 2
    tmp = tempfile.mkdtemp(prefix="ab-builds-")
    results = {"old": args.old, "new": args.new, "rounds": []}

    def body():
        workload = build_workload(tmp)
        ratios = []
        for r in range(args.rounds):
            new_first = r % 2 == 1
            builds = [args.new, args.old] if new_first else [args.old, args.new]
            ns = one_round(builds, workload, args, tmp)
            old_ns, new_ns = (ns[1], ns[0]) if new_first else (ns[0], ns[1])
            ratios.append(new_ns / old_ns)
            results["rounds"].append({"old_ns": old_ns, "new_ns": new_ns,
                                      "first": "new" if new_first else "old"})
            print(f"round {r + 1}/{args.rounds} ({'new' if new_first else 'old'} attached first): "
                  f"old {old_ns:.0f} ns, new {new_ns:.0f} ns per sample, new/old {ratios[-1]:.3f}")
        pairs = [math.sqrt(ratios[i] * ratios[i + 1]) for i in range(0, len(ratios) - 1, 2)]
        print(f"new/old: median {statistics.median(ratios):.3f} over {len(ratios)} rounds "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
        if pairs:
            print("geometric mean of each pair of rounds (one each way): "
                  + ", ".join(f"{x:.3f}" for x in pairs))
        return 0

    return guarded(body, results, args, tmp, (RunError, subprocess.CalledProcessError))


if __name__ == "__main__":
    sys.exit(main())
