#!/usr/bin/env python3
"""Runtime profilers soak: agent RSS, fds, threads and children over many cycles
with many Python processes, and the CPU the supervision itself costs.

Starts --processes (50) Python processes that are on CPU now and then, then runs
`profiler agent --interval 1 --runtimes python` (whole host, local files) for
--cycles (1000) intervals: every cycle a round classifies the busy processes and
runs py-spy on them, at most --max-runtime-children (2) at once. Every second
the agent's /proc entries are read: VmRSS, open fds, threads, live children,
and its own CPU time (utime+stime) apart from its children's (cutime+cstime:
py-spy itself). A baseline phase with --runtimes none, --baseline-cycles long,
gives the agent's CPU without runtime profilers; the difference per cycle is what
the rounds and the supervisor cost the agent.

Prints RSS/fds/threads at checkpoints, the RSS slope after warm-up, and the CPU
figures. A report, not a test: exits 0 whatever the figures are.

Needs root, python3 and py-spy (`cargo xtask test` installs it in
target/tools/pyspy-venv). See bench/README.md.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import Monitor, slope_per_min

REPO = Path(__file__).resolve().parent.parent
WORKER = "import time\nwhile True:\n    sum(range(60000))\n    time.sleep(0.05)\n"


def run_agent(profiler, args, cycles, label, every=100):
    out_dir = tempfile.mkdtemp(prefix="profiler-soak-")
    cmd = [profiler, "agent", "--interval", "1", "--output-dir", out_dir, "--max-files", "5",
           "--log-level", "info"] + args
    log = open(Path(out_dir) / "agent.log", "wb")
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    monitor = Monitor(agent.pid)
    samples = []
    try:
        next_report = every
        while True:
            s = monitor.sample()
            if s is None:
                print(f"  [{label}] the agent exited early (code {agent.poll()})", file=sys.stderr)
                break
            samples.append(s)
            if s["t"] >= cycles:
                break
            if s["t"] >= next_report:
                print(f"  [{label}] cycle {int(s['t']):5d}: RSS {s['VmRSS'] / 1024:6.1f} MiB, "
                      f"fds {s['fds']:3d}, threads {s['threads']:2d}, children {s['children']}, "
                      f"agent CPU {s['cpu_s']:.1f} s, py-spy CPU {s['cpu_children_s']:.1f} s",
                      flush=True)
                next_report += every
            time.sleep(1.0)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            code = agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            code = agent.wait()
        log.close()
    log_text = (Path(out_dir) / "agent.log").read_text(errors="replace")
    stopped = [l for l in log_text.splitlines() if " stopped " in l or l.endswith("stopped")]
    return samples, code, stopped[-1] if stopped else "", out_dir


def slope_kib_per_100(samples, warmup):
    """RSS slope after warm-up, in KiB per 100 cycles of 1 s."""
    slope = slope_per_min([(s["t"], s["VmRSS"]) for s in samples if s["t"] >= warmup])
    return float("nan") if slope is None else slope * 100 / 60


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiler", default=str(REPO / "target/release/profiler"))
    ap.add_argument("--py-spy", default=str(REPO / "target/tools/pyspy-venv/bin/py-spy"))
    ap.add_argument("--processes", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--baseline-cycles", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=100, help="cycles before the RSS slope is measured")
    ap.add_argument("--max-runtime-children", type=int, default=2)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (BPF)")
    for path in (a.profiler, a.py_spy):
        if not Path(path).is_file():
            sys.exit(f"{path} is missing (cargo build --release; cargo xtask test installs py-spy)")

    workers = [subprocess.Popen([sys.executable, "-c", WORKER]) for _ in range(a.processes)]
    try:
        time.sleep(1)
        print(f"{a.processes} Python processes on {os.cpu_count()} CPUs; agent interval 1 s, whole host")
        print(f"phase A: --runtimes none, {a.baseline_cycles} cycles")
        base, base_code, _, _ = run_agent(a.profiler, ["--runtimes", "none"], a.baseline_cycles, "none", every=60)
        print(f"phase B: --runtimes python, py-spy at most {a.max_runtime_children} at once, {a.cycles} cycles")
        rt, rt_code, stopped, out_dir = run_agent(
            a.profiler,
            ["--runtimes", "python", "--py-spy", a.py_spy,
             "--max-runtime-children", str(a.max_runtime_children)],
            a.cycles, "python")
    finally:
        for w in workers:
            w.kill()
        for w in workers:
            w.wait()

    def at(samples, t):
        for s in samples:
            if s["t"] >= t:
                return s
        return samples[-1]

    print()
    print("Results")
    if not rt:
        sys.exit("no samples of the agent")
    warm = at(rt, a.warmup)
    last = rt[-1]
    print(f"  RSS after warm-up ({a.warmup} cycles) {warm['VmRSS'] / 1024:.1f} MiB, at the end {last['VmRSS'] / 1024:.1f} MiB, "
          f"peak (VmHWM) {last.get('VmHWM', 0) / 1024:.1f} MiB")
    rss_after = [s["VmRSS"] for s in rt if s["t"] >= a.warmup]
    print(f"  RSS median after warm-up {statistics.median(rss_after) / 1024:.1f} MiB, "
          f"slope {slope_kib_per_100(rt, a.warmup):+.1f} KiB per 100 cycles")
    fds_after = [s["fds"] for s in rt if s["t"] >= a.warmup]
    thr = [s["threads"] for s in rt]
    ch = [s["children"] for s in rt]
    print(f"  fds after warm-up: min {min(fds_after)}, median {statistics.median(fds_after):.0f}, max {max(fds_after)}; "
          f"at warm-up {warm['fds']}, at the end {last['fds']}")
    print(f"  threads: max {max(thr)}; children alive at once: max {max(ch)} (cap {a.max_runtime_children})")
    if base:
        base_per = base[-1]["cpu_s"] / max(base[-1]["t"], 1)
        rt_per = last["cpu_s"] / max(last["t"], 1)
        print(f"  agent CPU per cycle: {base_per * 1000:.1f} ms without runtime profilers, "
              f"{rt_per * 1000:.1f} ms with them: the rounds and supervision cost "
              f"{(rt_per - base_per) * 1000:.1f} ms per cycle ({(rt_per - base_per) * 100 / os.cpu_count():.2f}% of the host)")
        print(f"  py-spy children CPU: {last['cpu_children_s'] / max(last['t'], 1) * 1000:.1f} ms per cycle")
    print(f"  exit codes: baseline {base_code}, python {rt_code}")
    print(f"  agent's last log line: {stopped.strip()}")
    print(f"  logs and profiles in {out_dir}")


if __name__ == "__main__":
    main()
