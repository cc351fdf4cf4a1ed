#!/usr/bin/env python3
"""Process churn: agent RSS and fds while short-lived processes come and go, and
whether a process that starts after them is still captured.

Runs `profiler agent` (whole host, local files, --interval 2, no runtime
profilers) while --loops (2) shell loops each start 10 short-lived shells at a
time, again and again, for --minutes (5): thousands of processes a minute, most
of them gone before the agent can read their /proc entries. Those shells exec;
--fork-loops (1) more loops start 10 subshells at a time, forked without an exec,
which the agent can name from their parent's mappings when they are gone. Every 5 s the agent's
VmRSS, open fds and threads are read. At the end the churn stops, a late process
(`md5sum /dev/zero`) runs for a few seconds, and the agent is stopped with
SIGTERM. The last profiles must name the late process's binary: before first
sight handed gone processes back, ~8 200 of them filled its set and no process
was captured again.

Prints RSS after 1 min / median of the second half / peak, the RSS slope over the
second half, the fd range, how many processes exited before capture (and how many
of those were named from their parent, or from the mappings the kernel saw), how
many samples of the shells kept frames of an unnamed process, and whether the late
process was captured. A report, not a test: exits 0 whatever the figures
are (2 without root). See bench/README.md.
"""

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (Monitor, finish_script, kill, kill_all_children, log, median, read_text,
                      script_options, slope_per_min, spawn, start_script)

REPO = Path(__file__).resolve().parent.parent
CHURN = ("while :; do for i in 1 2 3 4 5 6 7 8 9 10; do "
         "sh -c 'i=0; while [ $i -lt 200 ]; do i=$((i+1)); done' & done; wait; done")
# The same work in subshells: dash forks for `( ... ) &` and does not exec.
FORK_CHURN = ("while :; do for i in 1 2 3 4 5 6 7 8 9 10; do "
              "( i=0; while [ $i -lt 200 ]; do i=$((i+1)); done ) & done; wait; done")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="minutes of churn (default 5)")
    ap.add_argument("--loops", type=int, default=2, help="churning shell loops (default 2)")
    ap.add_argument("--fork-loops", type=int, default=1,
                    help="loops of subshells forked without exec (default 1)")
    ap.add_argument("--interval", type=int, default=2, help="agent --interval (default 2)")
    ap.add_argument("--profiler", default=str(REPO / "target/release/profiler"),
                    help="profiler binary (default target/release/profiler)")
    script_options(ap)
    args = ap.parse_args()
    code = start_script("churn.py", "the agent loads eBPF programs", args.verbose)
    if code is not None:
        return code

    tmp = tempfile.mkdtemp(prefix="profiler-churn-")
    out_dir = Path(tmp) / "profiles"
    agent_log = Path(tmp) / "agent.log"
    results = {"config": vars(args)}
    try:
        with open(agent_log, "wb") as f:
            agent = spawn([args.profiler, "agent", "--interval", str(args.interval),
                           "--output-dir", out_dir, "--runtimes", "none",
                           "--log-level", "info"], stdout=subprocess.DEVNULL, stderr=f)
        monitor = Monitor(agent.pid, period=5.0).start()
        log(f"churn: {args.loops} shell loop(s) and {args.fork_loops} subshell loop(s) "
            f"for {args.minutes:g} min beside the agent")
        loops = [spawn(["sh", "-c", script], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
                 for script in [CHURN] * args.loops + [FORK_CHURN] * args.fork_loops]
        time.sleep(args.minutes * 60)
        for p in loops:
            kill(p)
        log("churn over: a late process runs for 3 intervals")
        late = spawn(["md5sum", "/dev/zero"], stdout=subprocess.DEVNULL)
        time.sleep(3 * args.interval + 1)
        kill(late)
        time.sleep(args.interval + 1)
        os.kill(agent.pid, signal.SIGTERM)
        agent.wait(timeout=60)
        monitor.stop()

        text = read_text(agent_log) or ""
        stopped = next((l for l in text.splitlines() if " stopped " in l), "")
        gone = re.search(r"processes_exited_before_capture=(\d+)", stopped)
        from_parent = re.search(r"processes_named_from_parent=(\d+)", stopped)
        from_kernel = re.search(r"processes_named_from_kernel=(\d+)", stopped)
        # Every sample of the churned shells (process name `sh`) over the run, and
        # those with a frame of a process gone before anything named it.
        sh_lines = [l for f in sorted(glob.glob(str(out_dir / "*.folded")))
                    for l in (read_text(f) or "").splitlines() if l.startswith("sh;")]
        sh_unnamed = [l for l in sh_lines if "[unknown process]" in l]
        late_lines = [l for f in sorted(glob.glob(str(out_dir / "*.folded")))[-4:]
                      for l in (read_text(f) or "").splitlines() if l.startswith("md5sum;")]
        named = [l for l in late_lines if "[unknown process]" not in l]

        samples = monitor.snapshot()
        points = [(x["t"], x["VmRSS"], x["fds"], x["threads"]) for x in samples
                  if None not in (x["fds"], x["threads"])]
        half = [(t, r) for t, r, _, _ in points if t >= points[-1][0] / 2] if points else []
        after_1min = next((r for t, r, _, _ in points if t >= 60), None)
        results.update({
            "samples": samples,
            "rss_after_1min_kib": after_1min,
            "rss_median_second_half_kib": median([r for _, r in half]),
            "rss_peak_kib": max((r for _, r, _, _ in points), default=None),
            "rss_slope_second_half_kib_per_min": slope_per_min(half),
            "fds_min": min((f for _, _, f, _ in points), default=None),
            "fds_max": max((f for _, _, f, _ in points), default=None),
            "threads_max": max((th for _, _, _, th in points), default=None),
            "exited_before_capture": int(gone.group(1)) if gone else None,
            "named_from_parent": int(from_parent.group(1)) if from_parent else None,
            "named_from_kernel": int(from_kernel.group(1)) if from_kernel else None,
            "sh_samples": sum(int(l.rsplit(" ", 1)[1]) for l in sh_lines),
            "sh_samples_of_unnamed_processes": sum(int(l.rsplit(" ", 1)[1]) for l in sh_unnamed),
            "late_samples": sum(int(l.rsplit(" ", 1)[1]) for l in late_lines),
            "late_samples_named": sum(int(l.rsplit(" ", 1)[1]) for l in named),
            "agent_exit_code": agent.returncode,
        })
        r = results
        mib = lambda kib: "n/a" if kib is None else f"{kib / 1024:.1f} MiB"
        print(f"\nChurn for {args.minutes:g} min, {args.loops} loop(s) + {args.fork_loops} subshell "
              f"loop(s), agent --interval {args.interval}:")
        print(f"  RSS after 1 min / median of the second half / peak: "
              f"{mib(r['rss_after_1min_kib'])} / {mib(r['rss_median_second_half_kib'])} / {mib(r['rss_peak_kib'])}")
        s = r["rss_slope_second_half_kib_per_min"]
        print(f"  RSS slope over the second half: {'n/a' if s is None else f'{s:+.0f} KiB/min'}")
        print(f"  open fds {r['fds_min']} to {r['fds_max']}, threads at most {r['threads_max']}")
        print(f"  processes that exited before capture: {r['exited_before_capture']} unnamed, "
              f"{r['named_from_parent']} named from their parent (forked without exec), "
              f"{r['named_from_kernel']} from the kernel's view of their mappings (exec'd)")
        print(f"  samples of `sh`: {r['sh_samples']}, of them {r['sh_samples_of_unnamed_processes']} "
              f"with frames of a process gone unnamed")
        print(f"  late process: {r['late_samples_named']} of {r['late_samples']} samples in its captured binary"
              f" ({'captured' if r['late_samples_named'] else 'NOT captured'})")
        print(f"  agent exit code after SIGTERM: {r['agent_exit_code']}")
    except KeyboardInterrupt:
        log("interrupted")
    finally:
        kill_all_children()
    finish_script(results, args.json, tmp, args.keep, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
