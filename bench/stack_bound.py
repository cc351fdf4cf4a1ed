#!/usr/bin/env python3
"""The agent's memory with every interval at its stack bounds.

The aggregate of one interval holds at most 32 768 distinct stacks and 1 Mi
stored frames (aggregate.rs); symbolizing that much, encoding it and writing it
is the most a cycle can cost. At 97 Hz on 2 CPUs a 15 s interval holds ~2 900
samples, far below those bounds, so the other benchmarks never reach them. This
one does: many_stacks built with 70 to 110 calls deep paths (a new stack at
nearly every sample) at 997 Hz on every CPU fills an interval's 1 Mi frames
(~30 000 samples x ~45 frames) every cycle. It runs the agent with default
settings apart from --frequency, in two phases:

  * files: no endpoint, the default rotating local files (pprof + folded);
  * outage: an endpoint where nothing listens, so every interval is symbolized,
    encoded as OTLP and queued, and the export queue fills up on top of the
    cycle's own memory, to its bound (--queue-kib, 20 MiB) or to what the memory
    budget (--memory-budget-mib, 64 MiB) leaves it: the worst case of the default
    settings.

and prints for each: RSS (median, last, peak VmHWM), threads and fds, the
distinct stacks of each cycle and the samples folded into `[stack table full]`
stacks (proof the bound was reached), skipped cycle slots, and the agent's CPU.
A report, not a test: it exits 0 whatever the figures, non-zero only when
something crashed.

Needs root, gcc, python3 (stdlib only) and a release build
(cargo build --release -p profiler-userspace). See bench/README.md.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from agent_outage import (agent_defaults, agent_env, alive, build_workload, ensure_running,
                          free_port, parse_agent_log, split_message, start_workload, stop,
                          tail, LOG_LINE, RunError)
from benchlib import Monitor, kill, log, median, script_options, spawn

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
NCPU = os.sysconf("SC_NPROCESSORS_ONLN")
KIB = 1024
# Target of the outage issue: userspace RSS <= 64 MiB with default settings.
TARGET_RSS_MIB = 64.0
# Paths of 70 to 110 calls: samples land at every depth of a path, ~45 frames on average.
MIN_DEPTH, MAX_DEPTH = 70, 110


def cycles_of(log_path):
    """The `stacks` and `samples` fields of every `cycle done` debug line."""
    out = []
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = LOG_LINE.match(line)
        if not m or m.group(2) != "DEBUG":
            continue
        message, fields = split_message(m.group(3))
        if message == "cycle done":
            out.append({k: int(fields[k]) for k in ("stacks", "samples") if k in fields})
    return out


def run_phase(args, name, exe, tmp, endpoint):
    seconds = args.minutes * 60.0
    wl_out = tmp / f"{name}-workload.out"
    wl = start_workload(exe, seconds + 120, wl_out)
    time.sleep(0.5)
    if not alive(wl):
        raise RunError(f"many_stacks exited at once: {tail(wl_out)}")
    agent_log = tmp / f"{name}-agent.log"
    # debug: the per-cycle `cycle done` lines carry each cycle's distinct stacks.
    cmd = [args.profiler, "agent", "--frequency", args.frequency, "--log-level", "debug"]
    cmd += ["--endpoint", endpoint] if endpoint else ["--output-dir", tmp / f"{name}-profiles"]
    with open(agent_log, "w") as err:
        agent = spawn(cmd, stdout=subprocess.DEVNULL, stderr=err, env=agent_env(), cwd=tmp)
    mon = Monitor(agent.pid).start()
    t0 = time.monotonic()
    next_progress = 30.0
    try:
        while (elapsed := time.monotonic() - t0) < seconds:
            ensure_running(name, agent, agent_log, wl, wl_out)
            if elapsed >= next_progress:
                s = (mon.snapshot()[-1:] or [{}])[0]
                done = cycles_of(agent_log)
                log(f"  [{name}] {elapsed / 60:4.1f} min: RSS {fmt_mib(s.get('VmRSS'))} MiB, "
                    f"peak {fmt_mib(s.get('VmHWM'))} MiB, cycles done {len(done)}, last with "
                    f"{done[-1].get('stacks', '?') if done else '?'} stacks")
                next_progress += 30.0
            time.sleep(1.0)
        mon.sample()
    finally:
        mon.stop()
    cpu_s = benchlib.cpu_seconds(agent.pid)
    code, ru, _, took = stop(agent, signal.SIGTERM, 60)
    kill(wl)
    if code is None:
        raise RunError(f"the agent did not exit within 60 s of SIGTERM:\n{tail(agent_log)}")
    if code != 0:
        raise RunError(f"the agent exited with {code}:\n{tail(agent_log)}")
    samples = mon.snapshot()
    parsed = parse_agent_log(agent_log)
    stopped = parsed["stopped"] or {}
    # Warm-up: the first two cycles (blazesym's caches, the process table filling).
    warm = [s for s in samples if s["t"] >= 2 * args.interval]
    rss = [s["VmRSS"] for s in warm if s.get("VmRSS")]
    return {
        "command": [str(c) for c in cmd],
        "seconds": round(time.monotonic() - t0, 1),
        "shutdown_s": round(took, 2),
        "cycles": cycles_of(agent_log),
        "rss_median_kib": median(rss) if rss else None,
        "rss_last_kib": rss[-1] if rss else None,
        "rss_max_kib": max(rss) if rss else None,
        "hwm_kib": max([s["VmHWM"] for s in samples if s.get("VmHWM")] + [ru.ru_maxrss if ru else 0]),
        "rss_anon_median_kib": median([s["RssAnon"] for s in warm if s.get("RssAnon")] or [0]),
        "threads_max": max((s["threads"] or 0) for s in samples) if samples else None,
        "fds_max": max((s["fds"] or 0) for s in samples) if samples else None,
        "cpu_s": cpu_s,
        "stopped": stopped,
        "warnings": parsed["warnings"],
        "errors": parsed["errors"],
        "log_tail": tail(agent_log, 10),
    }


def fmt_mib(kib, spec="{:.1f}"):
    return "n/a" if kib is None else spec.format(kib / KIB)


def report(results, args):
    print()
    print(f"Agent at its stack bounds: many_stacks {MIN_DEPTH}-{MAX_DEPTH} calls deep on {NCPU} "
          f"CPU(s), {args.frequency} Hz, {args.minutes:g} min per phase, default settings otherwise")
    print(f"{'phase':<8} {'cycles':>6} {'stacks/cycle':>13} {'folded':>9} {'skipped':>7} "
          f"{'RSS med':>8} {'RSS max':>8} {'peak':>8} {'anon med':>9} {'thr':>4} {'fds':>4} {'CPU %':>6}")
    for name, r in results["phases"].items():
        st = r["stopped"]
        stacks = [c.get("stacks") for c in r["cycles"] if c.get("stacks") is not None]
        cpu = (r["cpu_s"] / (r["seconds"] * NCPU) * 100) if r.get("cpu_s") is not None else None
        print(f"{name:<8} {len(r['cycles']):>6} {median(stacks) if stacks else 'n/a':>13} "
              f"{st.get('folded_samples', 'n/a'):>9} {st.get('skipped_cycles', 'n/a'):>7} "
              f"{fmt_mib(r['rss_median_kib']):>8} {fmt_mib(r['rss_max_kib']):>8} "
              f"{fmt_mib(r['hwm_kib']):>8} {fmt_mib(r['rss_anon_median_kib']):>9} "
              f"{r['threads_max']:>4} {r['fds_max']:>4} {'n/a' if cpu is None else f'{cpu:.1f}':>6}")
    print()
    print("  stacks/cycle  median distinct stacks a cycle symbolized (from the debug `cycle done` lines)")
    print("  folded        samples counted under `[stack table full]` (the stopped line): > 0 means")
    print("                intervals reached the bound")
    print("  skipped       interval ends that found the previous cycle still running")
    print("  RSS med/max   VmRSS after the first two intervals; peak = VmHWM over the whole run")
    print("  anon med      RssAnon (heap) median after warm-up: RSS less the mapped binary and files")
    print("  CPU %         the agent's user+sys over the phase, % of the host's CPUs")
    for name, r in results["phases"].items():
        if r["warnings"]:
            print(f"  {name} warnings: " + "; ".join(f"{m} (x{w['count']})" for m, w in r["warnings"].items()))
        st = r["stopped"]
        queue = st.get("queue_peak_bytes")
        if queue:
            print(f"  {name}: export queue peak {int(queue) / KIB / KIB:.1f} MiB, dropped "
                  f"{st.get('queue_dropped_requests', '?')} requests "
                  f"({st.get('queue_dropped_for_budget', '?')} for the memory budget)")
        if st.get("largest_cycle_peak_kib") is not None:
            print(f"  {name}: largest cycle peak without the export queue "
                  f"{fmt_mib(int(st['largest_cycle_peak_kib']))} MiB (the memory budget's measure)")
    print()
    print("Checks:")
    for name, r in results["phases"].items():
        folded = int(r["stopped"].get("folded_samples", 0) or 0)
        reached = "PASS" if folded > 0 else "FAIL"
        print(f"  [{reached:^6}] {name}: intervals reached the stack bound "
              f"({folded} samples folded)")
        peak = r["hwm_kib"] / KIB
        verdict = "PASS" if peak <= TARGET_RSS_MIB else "FAIL"
        print(f"  [{verdict:^6}] {name}: peak RSS {peak:.1f} MiB <= {TARGET_RSS_MIB:.0f} MiB")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="minutes per phase (default 3)")
    ap.add_argument("--frequency", type=int, default=997, help="sampling Hz (default 997)")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: files,outage")
    ap.add_argument("--profiler", default=str(REPO_DIR / "target" / "release" / "profiler"))
    script_options(ap, figures="write every raw figure to FILE")
    args = ap.parse_args()
    if args.minutes <= 0 or args.frequency <= 0:
        ap.error("--minutes and --frequency must be positive")
    return args


def main():
    args = parse_args()
    code = benchlib.start_script("stack_bound.py", "the agent loads eBPF programs", args.verbose)
    if code is not None:
        return code
    if not Path(args.profiler).exists():
        log(f"{args.profiler} is missing: run `cargo build --release -p profiler-userspace` first")
        return 2
    args.interval = agent_defaults(args.profiler)["interval"]
    tmp = Path(tempfile.mkdtemp(prefix="profiler-stack-bound-"))
    results = {"config": vars(args) | {"ncpu": NCPU, "min_depth": MIN_DEPTH, "max_depth": MAX_DEPTH},
               "phases": {}}

    def benchmark():
        exe = build_workload(tmp, "many_stacks_deep",
                             (f"-DMIN_DEPTH={MIN_DEPTH}", f"-DMAX_DEPTH={MAX_DEPTH}"))
        for name in ("files", "outage"):
            if name in args.skip.split(","):
                continue
            log(f"phase {name}: {args.minutes:g} min at {args.frequency} Hz")
            endpoint = f"http://127.0.0.1:{free_port()}" if name == "outage" else None
            results["phases"][name] = run_phase(args, name, exe, tmp, endpoint)
        report(results, args)
        return 0
    return benchlib.guarded(benchmark, results, args, tmp, RunError)


if __name__ == "__main__":
    sys.exit(main())
