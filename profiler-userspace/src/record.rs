//! `profiler record`: sample for a while, then symbolize and write the profile.
//!
//! The order on every path: start sampling -> drain until the duration ends or
//! Ctrl-C/SIGTERM -> detach the program -> drain what is left -> join the capture
//! worker -> symbolize -> write all files atomically -> summary.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::IsTerminal as _,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use profiler_common::MappingsCounter;

use crate::{
    aggregate::{AggregateLimits, AggregateStats},
    collector::Collector,
    config::RecordConfig,
    delivery::Delivery,
    ebpf::{KernelCounters, ProgramStats, SamplerConfig},
    export::{self, Written},
    profile::UnknownCounts,
    runtime_profilers::{self, RuntimeProfilers},
    symbolize::{IntervalMeta, JitCounts, Symbolizer},
};

/// Threads for blocking work (symbolization, file writes): the pool never grows past
/// this, whatever the number of processes.
pub const MAX_BLOCKING_THREADS: usize = 2;

/// The runtime the profiler runs on: one thread for the drain and timers, a small
/// fixed pool for blocking work.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("profiler-blocking")
        .build()
}

/// What happened during a recording.
#[derive(Debug)]
pub struct RecordSummary {
    pub written: Written,
    pub elapsed: Duration,
    pub interrupted: bool,
    pub frequency_hz: u64,
    pub cpus: usize,
    pub pids: Vec<u32>,
    /// In-kernel counters (events, emitted, losses).
    pub kernel: KernelCounters,
    /// Timer events the kernel handed the program against those expected.
    pub delivery: Delivery,
    /// Records the drain read.
    pub records: u64,
    /// Records that failed to parse.
    pub malformed: u64,
    /// Samples whose user stack was cut at an impossible return address.
    pub user_walks_derailed: u64,
    /// Samples with a stack at the depth limit, its root cut.
    pub stacks_at_depth_limit: u64,
    pub aggregate: AggregateStats,
    pub stacks: usize,
    pub processes: usize,
    pub gone_before_capture: u64,
    /// Of the processes that exited before capture, those named from the parent
    /// they were forked from without an exec.
    pub named_from_parent: u64,
    /// Processes whose samples from before their exec were named from the parent
    /// they were forked from (once per process and symbolized interval).
    pub named_before_exec: u64,
    /// Of the processes that exited before capture, those named from the
    /// mappings the kernel read for their samples.
    pub named_from_kernel: u64,
    /// Mappings records of young processes lost to a full ring buffer (their
    /// samples were kept).
    pub mappings_lost: u64,
    /// Captures given up because another capture of the process was stuck.
    pub captures_stuck: u64,
    /// Fork and exec events lost in the kernel (ring buffer full).
    pub process_events_lost: u64,
    /// Processes the lineage forgot to stay within its bound.
    pub lineage_forgotten: u64,
    pub unknown: UnknownCounts,
    pub bpf: ProgramStats,
    pub runtimes: RuntimeSummary,
}

/// What the runtime profilers added to a recording.
#[derive(Debug, Default)]
pub struct RuntimeSummary {
    /// Tools that could not be found (one sentence).
    pub missing_tools: Option<String>,
    /// Runs of py-spy, rbspy, phpspy; those that gave stacks; failed or refused.
    pub runs: u64,
    pub runs_parsed: u64,
    pub runs_failed: u64,
    /// Runs ended by Ctrl-C (not failures).
    pub runs_stopped: u64,
    /// Runs whose child did not end even after SIGKILL; the recording went on.
    pub runs_abandoned: u64,
    /// Runs the supervisor refused (target still busy, backing off after failures,
    /// no slot): skipped, not failed.
    pub runs_refused: u64,
    /// Lines of tool output skipped as malformed, and the samples they (or the
    /// stack bound) cost.
    pub malformed_lines: u64,
    pub samples_dropped: u64,
    /// The latest failed run, described (tool, pid, how it ended, its last line).
    pub last_failure: Option<String>,
    /// Samples from the runtime profilers, merged into the profile.
    pub samples: u64,
    /// jattach runs (JVM perf maps written).
    pub jit_refreshes: u64,
    /// JVMs not asked for a perf map because jattach could harm them.
    pub jit_attach_skipped: u64,
    /// Processes not looked at for a runtime: more than one round classifies.
    pub candidates_skipped: u64,
    pub jit: JitCounts,
}

impl RecordSummary {
    /// Samples lost anywhere (in the kernel or unreadable).
    pub fn lost(&self) -> u64 {
        self.kernel.lost() + self.malformed
    }

    /// The end-of-run report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let scope = if self.pids.is_empty() {
            "whole host".to_string()
        } else {
            format!("pid {}", join(&self.pids))
        };
        let _ = writeln!(
            s,
            "Recorded {:.1} s at {} Hz on {} CPUs ({scope}){}",
            self.elapsed.as_secs_f64(),
            self.frequency_hz,
            self.cpus,
            if self.interrupted {
                ", stopped early"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "  samples: {} in {} distinct stacks from {} processes",
            self.aggregate.samples, self.stacks, self.processes
        );
        let _ = writeln!(
            s,
            "  lost: {} (ring buffer full {}, unreadable records {})",
            self.lost(),
            self.kernel.get(profiler_common::Counter::RingBufferFull),
            self.malformed
        );
        if self.kernel.get(profiler_common::Counter::RingBufferFull) > 0 {
            let _ = writeln!(
                s,
                "  the reader fell behind the kernel at {} Hz; a lower --frequency loses fewer",
                self.frequency_hz
            );
        }
        render_delivery(&mut s, &self.delivery);
        if self.aggregate.folded_samples > 0 {
            let _ = writeln!(
                s,
                "  stack table full: {} samples kept without their stacks",
                self.aggregate.folded_samples
            );
        }
        let walk_errors = [
            self.kernel.get(profiler_common::Counter::KernelStackError),
            self.kernel.get(profiler_common::Counter::UserStackError),
        ];
        if walk_errors.iter().any(|&n| n > 0) {
            let _ = writeln!(
                s,
                "  stack walks that failed in the kernel: {} kernel, {} user (the samples are kept without those frames)",
                walk_errors[0], walk_errors[1]
            );
        }
        let cut_in_kernel = self.kernel.get(profiler_common::Counter::UserWalkCut);
        if cut_in_kernel > 0 {
            let _ = writeln!(
                s,
                "  user stacks cut at a frame pointer the walk could not follow: {cut_in_kernel} (code built without frame pointers; the frames above it are kept)"
            );
        }
        if self.user_walks_derailed > 0 {
            let _ = writeln!(
                s,
                "  user stacks cut at an impossible return address: {} (a frame-pointer walk through code built without frame pointers)",
                self.user_walks_derailed
            );
        }
        if self.stacks_at_depth_limit > 0 {
            let _ = writeln!(
                s,
                "  stacks deeper than {} frames: {} samples, their outer frames cut (under a {} frame)",
                profiler_common::MAX_STACK_DEPTH,
                self.stacks_at_depth_limit,
                crate::symbolize::TRUNCATED_FRAME
            );
        }
        if self.gone_before_capture > 0 {
            let _ = writeln!(
                s,
                "  processes that exited before their binaries were read: {}",
                self.gone_before_capture
            );
        }
        if self.named_from_parent > 0 {
            let _ = writeln!(
                s,
                "  forked processes that exited before their binaries were read, named from their parent's: {}",
                self.named_from_parent
            );
        }
        if self.captures_stuck > 0 {
            let _ = writeln!(
                s,
                "  captures given up because another capture of the process was stuck reading its /proc entry or binaries (a locked memory map, a hung file system): {}",
                self.captures_stuck
            );
        }
        if self.named_before_exec > 0 {
            let _ = writeln!(
                s,
                "  exec'd processes whose samples from before the exec were named from their parent's binaries: {}",
                self.named_before_exec
            );
        }
        if self.named_from_kernel > 0 {
            let _ = writeln!(
                s,
                "  exec'd processes that exited before their binaries were read, named from the kernel's view of their mappings: {}",
                self.named_from_kernel
            );
        }
        if self.mappings_lost > 0 {
            let _ = writeln!(
                s,
                "  young processes' mappings lost (ring buffer full): {}",
                self.mappings_lost
            );
        }
        if self.process_events_lost > 0 || self.lineage_forgotten > 0 {
            let _ = writeln!(
                s,
                "  fork and exec events lost (ring buffer full): {}; forgotten (over {} processes): {}",
                self.process_events_lost,
                crate::lineage::MAX_LINEAGE_ENTRIES,
                self.lineage_forgotten
            );
        }
        let reasons = self.unknown.reasons();
        if !reasons.is_empty() {
            let detail: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            let _ = writeln!(
                s,
                "  unnamed addresses: {} ({})",
                self.unknown.total(),
                detail.join(", ")
            );
        }
        if self.bpf.run_count > 0 {
            let _ = writeln!(
                s,
                "  eBPF program: {:.2} us per sample, {:.3} s in total",
                self.bpf.run_time_ns as f64 / self.bpf.run_count as f64 / 1000.0,
                self.bpf.run_time_ns as f64 / 1e9
            );
        }
        let rt = &self.runtimes;
        if rt.runs > 0 || rt.jit_refreshes > 0 || rt.jit.named > 0 {
            let _ = writeln!(
                s,
                "  runtimes: {} runtime profiler runs ({} failed{}), {} interpreted samples; {} JVM perf maps requested, {} distinct JIT frames named",
                rt.runs,
                rt.runs_failed,
                [
                    (rt.runs_stopped, "stopped early"),
                    (rt.runs_abandoned, "abandoned, their child unkillable"),
                    (rt.runs_refused, "skipped, their target busy or backing off")
                ]
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, what)| format!(", {n} {what}"))
                .collect::<String>(),
                rt.samples,
                rt.jit_refreshes,
                rt.jit.named
            );
        }
        if rt.jit_attach_skipped > 0 {
            let _ = writeln!(
                s,
                "  JVMs left alone: {} perf map requests skipped (attaching disabled, or no SIGQUIT handler yet: jattach would have signalled the JVM)",
                rt.jit_attach_skipped
            );
        }
        if rt.candidates_skipped > 0 {
            let _ = writeln!(
                s,
                "  {} processes not looked at for an interpreter: at most {} are (the newest first); name targets with --pid",
                rt.candidates_skipped,
                crate::runtime_profilers::MAX_CANDIDATES_PER_ROUND
            );
        }
        if rt.malformed_lines > 0 || rt.samples_dropped > 0 {
            let _ = writeln!(
                s,
                "  runtime profiler output: {} malformed lines skipped, {} samples dropped (malformed or past the stack bound)",
                rt.malformed_lines, rt.samples_dropped
            );
        }
        if let Some(why) = &rt.last_failure {
            let _ = writeln!(s, "  last runtime profiler failure: {why}");
        }
        if rt.jit.maps_refused > 0 || rt.jit.malformed_lines > 0 {
            let _ = writeln!(
                s,
                "  perf maps: {} refused (a symbolic link, another owner, not a regular file, left by an earlier process, unreadable), {} malformed lines skipped",
                rt.jit.maps_refused, rt.jit.malformed_lines
            );
        }
        if self.aggregate.samples == 0 {
            let _ = writeln!(
                s,
                "  no samples: nothing ran on the CPUs that were sampled (is the process busy?)"
            );
        }
        let _ = writeln!(s, "Wrote:");
        let _ = writeln!(
            s,
            "  {}  (open in a browser)",
            self.written.flamegraph.display()
        );
        let _ = writeln!(s, "  {}  (pprof -http=: {0})", self.written.pprof.display());
        let _ = writeln!(s, "  {}", self.written.folded.display());
        s
    }
}

/// The summary's line on timer events delivered against expected; a line on those
/// that did not come while the CPUs were idle (nothing lost); and when the shortfall
/// of busy time is more than attach and detach explain, its likely causes.
fn render_delivery(s: &mut String, d: &Delivery) {
    let _ = writeln!(
        s,
        "  kernel delivered {} of ~{} expected timer events ({:.1}%)",
        thousands(d.delivered),
        thousands(d.expected),
        d.percent()
    );
    if d.missed_while_idle() > d.tolerance() {
        let _ = writeln!(
            s,
            "  {} of them did not come while CPUs were idle (this kernel does not fire the timer on an idle CPU): they would have sampled the idle task, which is not kept without --include-idle, so nothing is lost",
            thousands(d.missed_while_idle())
        );
    }
    if d.short() {
        // With idle time not reckoned apart, an idle CPU whose timer does not fire
        // is one more cause.
        let (which, idle_cause) = if d.idle_apart {
            ("timer events expected while CPUs were busy", "")
        } else {
            (
                "expected timer events",
                "; or an idle CPU whose timer this kernel does not fire (its idle samples, asked for with --include-idle, are then missing)",
            )
        };
        let _ = writeln!(
            s,
            "  {} {which} never reached the eBPF program (attach and detach explain at most {}), uncounted by it: the likely causes are perf throttling (see `dmesg` for \"perf: interrupt took too long\"; kernel.perf_cpu_time_max_percent), another BPF program running on that CPU at the time (the kernel then skips ours), a CPU taken offline, or a vCPU descheduled for longer than a period (its timer skips the periods it missed){idle_cause}",
            thousands(d.missing()),
            thousands(d.tolerance())
        );
    }
    if let Some(runs) = d.runs.filter(|&runs| runs != d.delivered) {
        let _ = writeln!(
            s,
            "  the kernel's BPF statistics count {} runs of the program, its counters {} events",
            thousands(runs),
            thousands(d.delivered)
        );
    }
}

/// `n` with its thousands separated by commas: 19,310.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records according to `config` and writes the profile.
pub async fn run(config: &RecordConfig) -> anyhow::Result<RecordSummary> {
    let start_wall = SystemTime::now();
    let started = Instant::now();
    let collector = Collector::start(
        &SamplerConfig {
            frequency_hz: config.frequency_hz,
            pids: config.pids.clone(),
            include_idle: config.include_idle,
            ring_buffer_bytes: config.ring_buffer_bytes,
            // The summary reports BPF time per sample.
            bpf_stats: true,
        },
        AggregateLimits::default(),
    )?;

    let profilers = RuntimeProfilers::new(config.runtimes.clone())
        .context("cannot create the runtime profilers' directory")?;
    let missing_tools = config.runtimes.missing_tools();
    if let (true, Some(missing)) = (config.progress, &missing_tools) {
        eprintln!("note: runtime profilers {missing}");
    }
    // Said even with --quiet: without them the profile is mostly `[unknown]`.
    for limit in crate::ebpf::naming_limits()
        .into_iter()
        .chain(collector.process_events_warning())
        .chain(collector.mappings_warning())
    {
        eprintln!("warning: {limit}");
    }
    // The whole host has no previous interval to tell the busy processes: look at
    // every process now.
    let candidates = if config.pids.is_empty() {
        runtime_profilers::all_pids()
    } else {
        config.pids.clone()
    };
    let round = profilers.start_round(candidates, config.duration);

    let mut interrupted = wait_for_end(config, &collector).await;

    let stopped = collector
        .stop(crate::collector::CAPTURE_WORKER_STOP_WAIT)
        .await?;
    let elapsed = started.elapsed();
    if stopped.capture_worker_stuck {
        eprintln!(
            "warning: reading a process's /proc entry or binaries is stuck (a locked memory map or a hung file system): symbolizing without waiting for it"
        );
    }
    let aggregate = stopped.aggregate;
    if interrupted {
        // Stopped early: the runs end now, and what they wrote is lost.
        profilers.shutdown(Duration::from_secs(2)).await;
    }
    let interpreted = match round {
        Some(round) => {
            let live = profilers.live_children();
            if config.progress && !interrupted && live > 0 {
                eprintln!(
                    "waiting for {live} runtime profiler(s) to finish (Ctrl-C stops them)..."
                );
            }
            let mut round = std::pin::pin!(round.wait());
            match or_interrupt(&mut round).await {
                Some(stacks) => stacks,
                None => {
                    // Ctrl-C: the runs end now; what finished is kept.
                    interrupted = true;
                    if config.progress {
                        eprintln!("stopping the runtime profilers: writing what was recorded");
                    }
                    profilers.shutdown(Duration::from_secs(2)).await;
                    tokio::time::timeout(Duration::from_secs(3), round)
                        .await
                        .unwrap_or_default()
                }
            }
        }
        None => vec![],
    };
    let tgids = aggregate.distinct_tgids();
    // JVMs write their perf map now, covering the code that ran (after Ctrl-C the
    // supervisor is already shut down: maps already on disk are still read).
    if !interrupted {
        if let Some(jit) = profilers.refresh_jit(tgids.clone()) {
            if or_interrupt(jit.wait()).await.is_none() {
                interrupted = true;
            }
        }
    }
    profilers.shutdown(Duration::from_secs(2)).await;
    let rt_stats = profilers.stats();
    let mut runtimes = RuntimeSummary {
        missing_tools,
        runs: rt_stats.runs.load(Ordering::Relaxed),
        runs_parsed: rt_stats.runs_parsed.load(Ordering::Relaxed),
        runs_failed: rt_stats.runs_failed.load(Ordering::Relaxed),
        runs_stopped: rt_stats.runs_stopped.load(Ordering::Relaxed),
        runs_abandoned: rt_stats.runs_abandoned.load(Ordering::Relaxed),
        runs_refused: rt_stats.runs_refused.load(Ordering::Relaxed),
        malformed_lines: rt_stats.malformed_lines.load(Ordering::Relaxed),
        samples_dropped: rt_stats.samples_dropped.load(Ordering::Relaxed),
        last_failure: rt_stats.last_failure(),
        samples: interpreted
            .iter()
            .flat_map(|s| &s.stacks)
            .map(|s| s.count)
            .sum(),
        jit_refreshes: rt_stats.jit_refreshes.load(Ordering::Relaxed),
        jit_attach_skipped: rt_stats.jit_attach_skipped.load(Ordering::Relaxed),
        candidates_skipped: rt_stats.candidates_skipped.load(Ordering::Relaxed),
        jit: JitCounts::default(),
    };
    if config.progress {
        eprintln!(
            "symbolizing {} stacks from {} processes...",
            aggregate.len(),
            tgids.len()
        );
    }
    let meta = IntervalMeta {
        start: start_wall,
        duration: elapsed,
        frequency_hz: config.frequency_hz,
    };
    let title = title(config, stopped.cpus, elapsed);
    let output_dir = config.output_dir.clone();
    let table = stopped.table;
    let publish = Arc::new(export::Publish::default());
    let mut handle = tokio::task::spawn_blocking({
        let publish = publish.clone();
        move || {
            let profile = Symbolizer::default().symbolize(&aggregate, &table, meta, &interpreted);
            let written = export::write_all(&profile, &output_dir, &title, &publish);
            (profile, written, aggregate.stats(), aggregate.len())
        }
    });
    // Ctrl-C or SIGTERM now finishes the files if it is the first (the recording
    // ran its whole duration: a user who stops it at the end wants it written);
    // a second one (or the first after one stopped the recording) gives up. The
    // files are renamed into place only when complete, so none is half-written,
    // and none appears once we say it was not written.
    let mut work = match or_interrupt(&mut handle).await {
        None if !interrupted => {
            eprintln!("finishing the profile; interrupt again to abandon it");
            or_interrupt(&mut handle).await
        }
        done => done,
    };
    if work.is_none() && !publish.abandon() {
        // Too late to abandon: the files are in place, and the writer is done.
        work = Some(handle.await);
    }
    let Some(work) = work else {
        export::remove_temporaries(&config.output_dir);
        anyhow::bail!("interrupted while symbolizing: the profile was not written");
    };
    let (profile, written, aggregate_stats, stacks) = work.context("symbolization failed")?;
    let written = written?;
    runtimes.jit = profile.jit;

    Ok(RecordSummary {
        written,
        elapsed,
        interrupted,
        frequency_hz: config.frequency_hz,
        cpus: stopped.cpus,
        pids: config.pids.clone(),
        kernel: stopped.kernel,
        delivery: stopped.delivery,
        records: stopped.drain_stats.records(),
        malformed: stopped.drain_stats.malformed(),
        user_walks_derailed: stopped.drain_stats.user_walks_derailed(),
        stacks_at_depth_limit: stopped.drain_stats.stacks_at_depth_limit(),
        aggregate: aggregate_stats,
        stacks,
        processes: profile
            .stacks
            .iter()
            .map(|s| s.pid)
            .collect::<HashSet<_>>()
            .len(),
        gone_before_capture: stopped
            .process_stats
            .gone_before_capture
            .load(Ordering::Relaxed),
        named_from_parent: stopped
            .process_stats
            .named_from_parent
            .load(Ordering::Relaxed),
        named_from_kernel: stopped
            .process_stats
            .named_from_kernel
            .load(Ordering::Relaxed),
        named_before_exec: stopped
            .process_stats
            .named_before_exec
            .load(Ordering::Relaxed),
        mappings_lost: stopped.mappings[MappingsCounter::RingBufferFull as usize],
        captures_stuck: stopped.process_stats.captures_stuck.load(Ordering::Relaxed),
        process_events_lost: stopped.process_events_lost,
        lineage_forgotten: stopped.lineage_forgotten,
        unknown: profile.unknown,
        bpf: stopped.bpf,
        runtimes,
    })
}

fn title(config: &RecordConfig, cpus: usize, elapsed: Duration) -> String {
    let scope = if config.pids.is_empty() {
        format!("host, {cpus} CPUs")
    } else {
        format!("pid {}", join(&config.pids))
    };
    format!(
        "CPU flamegraph ({scope}, {:.0} s at {} Hz)",
        elapsed.as_secs_f64(),
        config.frequency_hz
    )
}

/// The next signal of `signal`; never, when it could not be installed.
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// `work`'s output, or `None` if Ctrl-C, SIGTERM or SIGHUP comes first. (Once the
/// recording has listened for them, they no longer end the process by default:
/// every later wait listens here.)
async fn or_interrupt<T>(work: impl std::future::Future<Output = T>) -> Option<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).ok();
    let mut sighup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        out = work => Some(out),
        _ = tokio::signal::ctrl_c() => None,
        _ = recv(&mut sigterm) => None,
        _ = recv(&mut sighup) => None,
    }
}

/// Waits for the duration, Ctrl-C or SIGTERM, printing progress. Returns true when
/// stopped early.
async fn wait_for_end(config: &RecordConfig, collector: &Collector) -> bool {
    let drain = collector.drain_stats();
    let deadline = tokio::time::Instant::now() + config.duration;
    let tty = std::io::stderr().is_terminal();
    // A terminal gets one line rewritten every second; a log gets a line every 5 s.
    let every = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // Made once, before the loop (see the agent's loop).
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    // A closed terminal ends the recording early, and it is still written.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut targets_check = tokio::time::interval(Duration::from_secs(1));
    let interrupted = loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break false,
            // Like `perf record -p`: nothing is left to profile.
            _ = targets_check.tick(), if !config.pids.is_empty() => {
                if !config.pids.iter().any(|&pid| crate::process::is_running(pid)) {
                    if config.progress {
                        if tty {
                            eprintln!();
                        }
                        eprintln!("every --pid target has exited: stopping early");
                    }
                    return true;
                }
            }
            _ = recv(&mut sigint) => break true,
            _ = recv(&mut sigterm) => break true,
            _ = recv(&mut sighup) => break true,
            _ = ticker.tick(), if config.progress => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let lost = collector.kernel_counters().lost() + drain.malformed();
                let line = format!(
                    "recording: {}s left, {} samples, {} lost",
                    left.as_secs_f64().ceil() as u64,
                    drain.records(),
                    lost
                );
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
        }
    };
    if config.progress && tty {
        eprintln!();
    }
    if interrupted && config.progress {
        eprintln!("stopping early: writing what was recorded");
    }
    interrupted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        let cases = [(0, "0"), (999, "999"), (1_000, "1,000"), (19_310, "19,310")];
        for (n, text) in cases {
            assert_eq!(thousands(n), text);
        }
        assert_eq!(thousands(1_234_567_890), "1,234,567,890");
    }

    /// One line of delivered against expected always; the causes only past the
    /// tolerance; the BPF statistics only when they disagree with the counters.
    #[test]
    fn delivery_line_and_shortfall() {
        let rendered = |d: Delivery| {
            let mut s = String::new();
            render_delivery(&mut s, &d);
            s
        };
        let render = |delivered, runs| {
            rendered(Delivery {
                expected: 19_400,
                delivered,
                cpus: 2,
                runs,
                ..Delivery::default()
            })
        };
        let fine = render(19_310, Some(19_310));
        assert_eq!(
            fine,
            "  kernel delivered 19,310 of ~19,400 expected timer events (99.5%)\n"
        );
        let short = render(19_000, None);
        assert!(short.contains("delivered 19,000 of ~19,400"), "{short}");
        // Idle time not reckoned apart (--include-idle): an idle CPU is a cause.
        assert!(
            short.contains("400 expected timer events never reached"),
            "{short}"
        );
        assert!(short.contains("an idle CPU whose timer"), "{short}");
        assert!(short.contains("perf: interrupt took too long"), "{short}");
        assert!(short.contains("another BPF program"), "{short}");
        let counted_apart = render(19_310, Some(19_312));
        assert!(
            counted_apart.contains("count 19,312 runs"),
            "{counted_apart}"
        );
        // Idle time reckoned apart on 2 CPUs, half the expected events in it.
        let render_idle_apart = |delivered| {
            rendered(Delivery {
                expected: 19_400,
                delivered,
                expected_idle: 9_700,
                idle_apart: true,
                cpus: 2,
                tick_slack: 4,
                ..Delivery::default()
            })
        };
        // Half the events missing, all in idle time: said, not a shortfall.
        let s = render_idle_apart(9_700);
        assert!(
            s.contains("9,700 of them did not come while CPUs were idle"),
            "{s}"
        );
        assert!(s.contains("nothing is lost"), "{s}");
        assert!(!s.contains("never reached"), "{s}");

        // Reckoned apart, a busy-time shortfall says so and names no idle cause.
        let s = render_idle_apart(5_000);
        assert!(
            s.contains("4,700 timer events expected while CPUs were busy never reached"),
            "{s}"
        );
        assert!(!s.contains("an idle CPU whose timer"), "{s}");
    }
}
