//! Stage 3b: the runtime profilers that see inside interpreters and JITs, run each
//! interval through the [`Supervisor`].
//!
//! Per interval, a *round*: the processes of interest (those on CPU in the last
//! interval, or the `--pid` targets) are classified ([`crate::runtimes::detect`]);
//! Python, Ruby and PHP processes get a `py-spy` / `rbspy` / `phpspy` run, at most
//! `max_children` at once, each short enough that the round ends inside the interval.
//! Their output files are parsed (bounded, garbage counted) into
//! [`InterpretedSamples`] that the symbolizer merges into the interval's profile.
//! When there are more targets than fit, runs get shorter (down to
//! [`MIN_RUN_SECS`]) and the rest wait for the next round, in turn; they are counted.
//! Before an interval is symbolized, JVMs are asked (`jattach PID jcmd
//! Compiler.perfmap`) to write their perf map when their code cache grew; Node
//! writes its own with `--perf-basic-prof`.
//!
//! Rounds never overlap: a round still running when the next one is due makes that
//! one miss its slot (counted). Every child is owned by the supervisor, which reaps
//! it and closes its pipes on every path and kills it at its deadline.
//!
//! Owns: which runs to start and when, their output files (in one private
//! directory, each removed once parsed), the per-process runtime cache (bounded by
//! [`MAX_TRACKED_PROCESSES`]). Must never: start more than `max_children`
//! children, block the drain (detection and parsing run on the blocking pool), or
//! keep a run's output past its round.

use std::{
    collections::HashMap,
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    sync::{oneshot, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    runtimes::{
        detect::{detect, TargetProcess},
        jattach::{self, AttachCheck, JitSnapshot, RefreshDecision, RefreshPolicy},
        phpspy::{self, PhpSpyRecord},
        pyspy::{self, PySpyRecord},
        rbspy::{self, RbSpyRecord},
        InterpretedSamples, ParseLimits, Parsed, Runtime,
    },
    supervise::{probe_tool, ChildHandle, ChildSpec, Refused, Supervisor, SupervisorConfig},
};

/// Processes whose runtime is remembered between rounds (~200 bytes each with their
/// JIT snapshot: ~0.8 MiB at the bound). When full, entries of exited processes are
/// dropped first, then everything (it is a cache: detection simply runs again).
pub const MAX_TRACKED_PROCESSES: usize = 4096;

/// Classifications (two per interval: the round and the JVM refresh) after which a
/// process no longer among the candidates is forgotten: exited processes leave the
/// cache within a few intervals, not only when it is full.
pub const FORGET_AFTER_CLASSIFICATIONS: u64 = 16;

/// Processes looked at per round: candidates beyond it wait for a later round.
/// Bounds the blocking detection work of one round (one read of /proc/PID/maps
/// each, for new processes).
pub const MAX_CANDIDATES_PER_ROUND: usize = 1024;

/// Memory the interpreted stacks of one round may take, all its runs together (as
/// [`crate::runtimes::ParseLimits::max_stored_bytes`] counts it): the round holds
/// them until the cycle symbolizes the interval. Each parse may use its share
/// (this divided by `--max-runtime-children`, at most
/// [`crate::runtimes::MAX_STORED_BYTES_PER_PARSE`]) of what is left; stacks past
/// it go to the `[stack table full]` stack, their samples still counted.
pub const MAX_STORED_BYTES_PER_ROUND: usize = 16 << 20;

/// Shortest run of a runtime profiler: the tools take whole seconds.
pub const MIN_RUN_SECS: u64 = 1;

/// Time a run may take beyond its sampling duration (the tool's start-up and
/// writing its output) before the supervisor stops it.
pub const RUN_DEADLINE_SLACK: Duration = Duration::from_secs(3);

/// Part of an interval a round leaves free, so that it ends before the next one.
pub const ROUND_MARGIN: Duration = Duration::from_secs(1);

/// Time a jattach run may take (attaching and the JVM writing its map).
pub const JATTACH_DEADLINE: Duration = Duration::from_secs(10);

/// jattach runs at once, beside the `--max-runtime-children` of the interpreted
/// runtimes' profilers. Their own slot: py-spy runs that fill the interval would
/// otherwise keep the short jattach runs waiting, and the cycle waits for those
/// before symbolizing. A run is ~1 s of a mostly idle child.
pub const JATTACH_MAX_CONCURRENT: usize = 1;

/// Time past its last run's deadline and twice the kill grace after which a round
/// (or a JIT refresh) stops waiting for its runs. Only a child that even SIGKILL
/// does not end (uninterruptible sleep: a hung NFS or FUSE read) gets there; without
/// this limit the cycle waiting for the round would wait with it, and every later
/// interval would be skipped. The abandoned run keeps its supervisor slot until its
/// child really ends, so the cap on live children still holds.
pub const ABANDON_AFTER: Duration = Duration::from_secs(2);

/// Default most runtime profiler children alive at once.
pub const DEFAULT_MAX_CHILDREN: usize = crate::supervise::DEFAULT_MAX_CONCURRENT;

/// Which runtimes to look inside, and with what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Runtimes profiled; empty: none (native stacks only).
    pub runtimes: Vec<Runtime>,
    /// Samples per second asked of py-spy, rbspy and phpspy.
    pub rate_hz: u32,
    /// Most children alive at once.
    pub max_children: usize,
    pub tools: ToolPaths,
}

/// The external programs, as paths or names searched in PATH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolPaths {
    pub py_spy: PathBuf,
    pub rbspy: PathBuf,
    pub phpspy: PathBuf,
    pub jattach: PathBuf,
}

impl Default for ToolPaths {
    fn default() -> Self {
        ToolPaths {
            py_spy: pyspy::PROGRAM.into(),
            rbspy: rbspy::PROGRAM.into(),
            phpspy: phpspy::PROGRAM.into(),
            jattach: jattach::PROGRAM.into(),
        }
    }
}

impl RuntimeConfig {
    /// Every runtime, tools from PATH, at `rate_hz`.
    pub fn all(rate_hz: u32) -> Self {
        RuntimeConfig {
            runtimes: Runtime::ALL.to_vec(),
            rate_hz,
            max_children: DEFAULT_MAX_CHILDREN,
            tools: ToolPaths::default(),
        }
    }

    /// Native stacks only.
    pub fn none() -> Self {
        RuntimeConfig {
            runtimes: vec![],
            ..Self::all(1)
        }
    }

    fn tool(&self, runtime: Runtime) -> Option<&Path> {
        match runtime {
            Runtime::Python => Some(&self.tools.py_spy),
            Runtime::Ruby => Some(&self.tools.rbspy),
            Runtime::Php => Some(&self.tools.phpspy),
            Runtime::Java => Some(&self.tools.jattach),
            Runtime::Node => None,
        }
    }

    /// The enabled runtimes whose tool cannot be found, as one sentence to say once
    /// at start (`None`: every tool is there). The runtimes stay enabled (the
    /// supervisor refuses their runs cheaply and probes again now and then), so
    /// installing a tool later takes effect without a restart.
    pub fn missing_tools(&self) -> Option<String> {
        let missing: Vec<String> = self
            .runtimes
            .iter()
            .filter_map(|&r| {
                let tool = self.tool(r)?;
                let why = probe_tool(tool).err()?;
                // A path the user gave says what is wrong with it; a name not in
                // PATH says how to install it.
                Some(if tool.as_os_str().as_encoded_bytes().contains(&b'/') {
                    format!("{why} (for {r})")
                } else {
                    format!("{} for {r}{}", tool.display(), install_hint(r))
                })
            })
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "not found: {}; those runtimes are profiled natively only (their interpreter's frames, not their functions)",
                missing.join(", ")
            )
        })
    }
}

fn install_hint(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python => " (pip install py-spy)",
        Runtime::Ruby => " (cargo install rbspy)",
        Runtime::Php => " (https://github.com/adsr/phpspy)",
        Runtime::Java => " (apt-get install jattach)",
        Runtime::Node => "",
    }
}

/// Counters of the runtime profilers (the supervisor counts its children itself).
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Rounds started.
    pub rounds: AtomicU64,
    /// Rounds not started because the previous one was still running.
    pub rounds_missed: AtomicU64,
    /// Runs started (py-spy, rbspy, phpspy).
    pub runs: AtomicU64,
    /// Runs whose output was read (it may hold no stacks: an idle target).
    pub runs_parsed: AtomicU64,
    /// Runs that failed, timed out or wrote unreadable output.
    pub runs_failed: AtomicU64,
    /// Runs (jattach included) still not ended when their round stopped waiting
    /// (see [`ABANDON_AFTER`]): their children ignored even SIGKILL so far.
    pub runs_abandoned: AtomicU64,
    /// Runs ended by our own shutdown (Ctrl-C, SIGTERM), jattach runs included: not
    /// failures.
    pub runs_stopped: AtomicU64,
    /// Runs the supervisor refused (target busy, backing off, tool missing),
    /// jattach runs included.
    pub runs_refused: AtomicU64,
    /// Targets that did not fit in their round (or JVMs that found no jattach
    /// slot in time) and wait for a later one.
    pub targets_deferred: AtomicU64,
    /// Lines of tool output skipped as malformed.
    pub malformed_lines: AtomicU64,
    /// Samples a tool reported that were thrown away (malformed) or folded into the
    /// overflow stack.
    pub samples_dropped: AtomicU64,
    /// Candidates past [`MAX_CANDIDATES_PER_ROUND`] not looked at in a round (they
    /// are in a later one's window).
    pub candidates_skipped: AtomicU64,
    /// Processes that could not be classified (exited, unreadable).
    pub detect_errors: AtomicU64,
    /// jattach runs asking a JVM for its perf map.
    pub jit_refreshes: AtomicU64,
    /// Of those, runs that failed or after which no map could be looked at.
    pub jit_refresh_failures: AtomicU64,
    /// JVM refreshes not asked for because jattach could harm the JVM: attach
    /// disabled, or no SIGQUIT handler yet (see [`jattach::attach_check`]).
    pub jit_attach_skipped: AtomicU64,
    /// The latest failed run, described (one line, a few hundred bytes at most).
    pub last_failure: Mutex<Option<String>>,
}

impl RuntimeStats {
    /// The latest failed run, described.
    pub fn last_failure(&self) -> Option<String> {
        self.last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What is remembered of a process between rounds.
struct Tracked {
    process: TargetProcess,
    /// The classification that last saw it among the candidates.
    seen: u64,
    /// Taken right after our last successful jattach run.
    jit_refreshed: Option<JitSnapshot>,
    /// Its JVM options disable attaching: never asked (checked once).
    attach_disabled: bool,
}

/// State the round tasks share.
struct Shared {
    config: RuntimeConfig,
    supervisor: Supervisor,
    /// jattach's children, apart (see [`JATTACH_MAX_CONCURRENT`]).
    jit_supervisor: Supervisor,
    tracked: Mutex<HashMap<u32, Tracked>>,
    /// Classifications so far (what `Tracked::seen` counts in).
    generation: AtomicU64,
    /// Classifications by each consumer, which move its own candidate window: shared
    /// with the other, a window would move on twice per interval, and with an even
    /// number of windows each consumer would see the same half for ever.
    windows: [AtomicU64; 2],
    stats: Arc<RuntimeStats>,
    /// Where runs write their output: private to this agent, removed on drop.
    scratch: tempfile::TempDir,
    /// Run counter, for unique output names.
    seq: AtomicU64,
    /// Round-robin start among this round's targets.
    turn: AtomicUsize,
    /// Runtimes whose first failure was logged (bit `Runtime as u8`); later ones
    /// go to debug, so a tool that always fails is one warning, not one per cycle.
    warned: std::sync::atomic::AtomicU8,
    /// Set by [`RuntimeProfilers::shutdown`]: runs it ends are not failures.
    stopping: std::sync::atomic::AtomicBool,
    /// A JVM with attaching disabled was reported (later ones go to debug).
    warned_attach_disabled: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Counts nothing (callers count); remembers `why` as the latest failure and
    /// logs it, at warn the first time for this runtime. Returns false, and only
    /// logs at debug, for a run our own shutdown ended: that is not a failure.
    fn note_failure(&self, runtime: Runtime, program: &Path, pid: u32, why: &str) -> bool {
        let text = format!("{} for pid {pid} ({runtime}) {why}", program.display());
        if self.stopping.load(Ordering::Relaxed) {
            tracing::debug!("{text} (stopped with us)");
            return false;
        }
        let bit = 1u8 << (runtime as u8);
        if self.warned.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                "{text} (later failures of {runtime} runs are logged at debug and counted)"
            );
        } else {
            tracing::debug!("{text}");
        }
        *self
            .stats
            .last_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(text);
        true
    }
}

/// The runtime profilers of one agent (or recording).
pub struct RuntimeProfilers {
    shared: Arc<Shared>,
    /// Held by the running round: rounds never overlap.
    round_slot: Arc<Semaphore>,
}

/// A round in progress; its stacks arrive when every run has ended.
pub struct Round {
    done: oneshot::Receiver<Vec<InterpretedSamples>>,
}

impl Round {
    /// Waits, on a thread outside the runtime, for the round's stacks. A round whose
    /// task was dropped (shutdown) gives none.
    pub fn wait_blocking(self) -> Vec<InterpretedSamples> {
        self.done.blocking_recv().unwrap_or_default()
    }

    /// Waits for the round's stacks in async code.
    pub async fn wait(self) -> Vec<InterpretedSamples> {
        self.done.await.unwrap_or_default()
    }
}

/// JVM perf map refreshes in progress.
pub struct JitRefresh {
    done: oneshot::Receiver<()>,
}

impl JitRefresh {
    /// Waits, on a thread outside the runtime, until the JVMs have written their maps.
    pub fn wait_blocking(self) {
        let _ = self.done.blocking_recv();
    }

    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

impl RuntimeProfilers {
    /// Must be called within the tokio runtime the rounds will run on.
    pub fn new(config: RuntimeConfig) -> std::io::Result<RuntimeProfilers> {
        let tmp = std::env::temp_dir();
        let swept = sweep_scratch(&tmp);
        if swept > 0 {
            tracing::info!(
                swept,
                "removed the runtime profilers' directories of profilers that are gone"
            );
        }
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
            .tempdir_in(&tmp)?;
        let supervisor = Supervisor::new(SupervisorConfig {
            max_concurrent: config.max_children.max(1),
            ..SupervisorConfig::default()
        });
        let jit_supervisor = Supervisor::new(SupervisorConfig {
            max_concurrent: JATTACH_MAX_CONCURRENT,
            ..SupervisorConfig::default()
        });
        Ok(RuntimeProfilers {
            shared: Arc::new(Shared {
                config,
                supervisor,
                jit_supervisor,
                tracked: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
                windows: Default::default(),
                stats: Arc::new(RuntimeStats::default()),
                scratch,
                seq: AtomicU64::new(0),
                turn: AtomicUsize::new(0),
                warned: Default::default(),
                stopping: Default::default(),
                warned_attach_disabled: Default::default(),
            }),
            round_slot: Arc::new(Semaphore::new(1)),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.shared.config.runtimes.is_empty()
    }

    pub fn stats(&self) -> &Arc<RuntimeStats> {
        &self.shared.stats
    }

    /// The supervisor of the interpreted runtimes' profilers (py-spy, rbspy, phpspy).
    pub fn supervisor(&self) -> &Supervisor {
        &self.shared.supervisor
    }

    /// Children alive now, of both supervisors.
    pub fn live_children(&self) -> usize {
        self.shared.supervisor.live() + self.shared.jit_supervisor.live()
    }

    /// Descendants of children, of both supervisors, killed because they outlived
    /// their run outside its process group (`supervise::orphans`).
    pub fn orphans_killed(&self) -> u64 {
        [&self.shared.supervisor, &self.shared.jit_supervisor]
            .iter()
            .map(|s| s.stats().orphans_killed.load(Ordering::Relaxed))
            .sum()
    }

    /// Starts a round over `pids` that ends within `window`; `None` when no
    /// interpreted runtime is enabled, or the previous round still runs (counted).
    pub fn start_round(&self, pids: Vec<u32>, window: Duration) -> Option<Round> {
        let shared = &self.shared;
        let interpreted = shared
            .config
            .runtimes
            .iter()
            .any(|r| matches!(r, Runtime::Python | Runtime::Ruby | Runtime::Php));
        if !interpreted {
            return None;
        }
        let Ok(permit) = self.round_slot.clone().try_acquire_owned() else {
            shared.stats.rounds_missed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        shared.stats.rounds.fetch_add(1, Ordering::Relaxed);
        let (tx, done) = oneshot::channel();
        let shared = shared.clone();
        let end = Instant::now() + window;
        tokio::spawn(async move {
            let stacks = round(shared, pids, end, permit).await;
            let _ = tx.send(stacks);
        });
        Some(Round { done })
    }

    /// Asks the JVMs among `pids` whose code changed since their last map to write
    /// it again; `None` when Java is not enabled.
    pub fn refresh_jit(&self, pids: Vec<u32>) -> Option<JitRefresh> {
        if !self.shared.config.runtimes.contains(&Runtime::Java) || pids.is_empty() {
            return None;
        }
        let (tx, done) = oneshot::channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            refresh_jit(shared, pids).await;
            let _ = tx.send(());
        });
        Some(JitRefresh { done })
    }

    /// Kills every child and waits for them, until `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = tokio::join!(
            self.shared.supervisor.shutdown(deadline),
            self.shared.jit_supervisor.shutdown(deadline)
        );
    }
}

/// Start of the name of a profiler's scratch directory in the temporary directory,
/// followed by its pid and `-`.
const SCRATCH_PREFIX: &str = "profiler-runtimes-";

/// Removes from `tmp` the scratch directories whose profiler is gone: one killed
/// by SIGKILL or the OOM killer leaves its own behind, with the outputs of the runs
/// it had in flight. Only directories (not symlinks) owned by us are touched, and
/// only when no process has their pid. Returns how many were removed.
fn sweep_scratch(tmp: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return 0;
    };
    // SAFETY: geteuid has no preconditions.
    let us = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let ours = entry
            .path()
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir() && m.uid() == us);
        let owner_alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if ours && !owner_alive && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Pids `all_pids` lists at most: 256 KiB.
pub const MAX_HOST_PIDS: usize = 64 * 1024;

/// The live pids of the host (for `record` of the whole host, which has no previous
/// interval to learn the busy processes from), newest first (highest pids first;
/// user workloads tend to be younger than the system's daemons), at most
/// [`MAX_HOST_PIDS`]. A round looks at [`MAX_CANDIDATES_PER_ROUND`] of them and
/// counts the rest as skipped. Kernel threads (no executable) are left out.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .take(MAX_HOST_PIDS)
        .collect();
    pids.sort_unstable_by(|a, b| b.cmp(a));
    pids.retain(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok());
    pids
}

/// Which of `len` candidates a classification looks at: all of them up to
/// [`MAX_CANDIDATES_PER_ROUND`]; past it, a window that moves on by its width each
/// time, so every candidate gets its turn. Returns (start, count).
fn candidate_window(len: usize, generation: u64) -> (usize, usize) {
    if len <= MAX_CANDIDATES_PER_ROUND {
        return (0, len);
    }
    let start =
        (generation.saturating_sub(1) as usize).wrapping_mul(MAX_CANDIDATES_PER_ROUND) % len;
    (start, MAX_CANDIDATES_PER_ROUND)
}

/// Who classifies: each moves its own candidate window.
#[derive(Clone, Copy, Debug)]
enum Classifier {
    /// A round of interpreted-runtime profilers.
    Round = 0,
    /// A JIT (JVM perf map) refresh.
    Jit = 1,
}

impl Shared {
    /// The runtime of each pid (cached while pid, start time and executable stay:
    /// see [`TargetProcess::is_alive`], so a process that execs an interpreter is
    /// classified again), for the enabled runtimes only. Blocking: reads /proc.
    fn classify(
        &self,
        by: Classifier,
        pids: &[u32],
        wanted: impl Fn(Runtime) -> bool,
    ) -> Vec<TargetProcess> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let window = self.windows[by as usize].fetch_add(1, Ordering::Relaxed) + 1;
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let (start, count) = candidate_window(pids.len(), window);
        self.stats
            .candidates_skipped
            .fetch_add((pids.len() - count) as u64, Ordering::Relaxed);
        for &pid in pids.iter().cycle().skip(start).take(count) {
            if pid == 0 || pid == std::process::id() {
                continue;
            }
            let known = tracked.get_mut(&pid).filter(|t| t.process.is_alive());
            let process = match known {
                Some(t) => {
                    t.seen = generation;
                    t.process.clone()
                }
                None => match detect(pid) {
                    Ok(process) => {
                        if tracked.len() >= MAX_TRACKED_PROCESSES {
                            tracked.retain(|_, t| t.process.is_alive());
                            if tracked.len() >= MAX_TRACKED_PROCESSES {
                                tracked.clear();
                            }
                        }
                        tracked.insert(
                            pid,
                            Tracked {
                                process: process.clone(),
                                seen: generation,
                                jit_refreshed: None,
                                attach_disabled: false,
                            },
                        );
                        process
                    }
                    Err(_) => {
                        self.stats.detect_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                },
            };
            if process
                .runtime
                .is_some_and(|r| self.config.runtimes.contains(&r) && wanted(r))
            {
                out.push(process);
            }
        }
        tracked.retain(|_, t| t.seen + FORGET_AFTER_CLASSIFICATIONS > generation);
        out
    }

    /// Starts `spec`, waiting for a free slot until `latest_start`. `None`: no slot
    /// came free in time; `Some(Err)`: refused for another reason (the supervisor
    /// counts it).
    async fn start_by(
        supervisor: &Supervisor,
        spec: &ChildSpec,
        latest_start: Instant,
    ) -> Option<Result<ChildHandle, Refused>> {
        loop {
            if Instant::now() > latest_start {
                return None;
            }
            match supervisor.start(spec.clone()) {
                Err(Refused::AtCapacity) => {
                    let _ = tokio::time::timeout_at(latest_start, supervisor.capacity_available())
                        .await;
                }
                other => return Some(other),
            }
        }
    }

    /// Whether jattach may be run against `jvm` now; counts and reports a refusal
    /// (a JVM with attaching disabled once, and never asked again). Blocking: reads
    /// /proc.
    fn attach_allowed(&self, jvm: &TargetProcess) -> bool {
        let check = jattach::attach_check(jvm);
        if check == AttachCheck::Safe {
            return true;
        }
        self.stats
            .jit_attach_skipped
            .fetch_add(1, Ordering::Relaxed);
        let pid = jvm.pid;
        match check {
            AttachCheck::Disabled => {
                let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = tracked.get_mut(&pid) {
                    t.attach_disabled = true;
                }
                let text = format!(
                    "JVM {pid} runs with -XX:+DisableAttachMechanism: its JIT frames stay unnamed (asking for its perf map would make it print a thread dump)"
                );
                if self.warned_attach_disabled.swap(true, Ordering::Relaxed) {
                    tracing::debug!("{text}");
                } else {
                    tracing::warn!("{text} (later such JVMs are logged at debug and counted)");
                }
            }
            AttachCheck::NotReady => tracing::debug!(
                "JVM {pid} has no attach socket and no SIGQUIT handler yet: not asked for its perf map this cycle"
            ),
            AttachCheck::Safe => unreachable!("returned above"),
        }
        false
    }

    /// How long past its deadline a run of `supervisor` is waited for: its kill
    /// grace twice (SIGTERM to SIGKILL, SIGKILL to reaped) and [`ABANDON_AFTER`].
    fn abandon_grace(supervisor: &Supervisor) -> Duration {
        supervisor.config().kill_grace * 2 + ABANDON_AFTER
    }

    /// Counts runs a round stopped waiting for, with a warning the first time.
    fn note_abandoned(&self, abandoned: usize) {
        if abandoned == 0 {
            return;
        }
        let before = self
            .stats
            .runs_abandoned
            .fetch_add(abandoned as u64, Ordering::Relaxed);
        let text = format!(
            "{abandoned} runtime profiler runs did not end even after SIGKILL (uninterruptible sleep?): profiling goes on without them, each keeping its child slot until it ends"
        );
        if before == 0 {
            tracing::warn!("{text} (later ones are logged at debug and counted)");
        } else {
            tracing::debug!("{text}");
        }
    }

    fn output_path(&self, runtime: Runtime, pid: u32, suffix: &str) -> PathBuf {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.scratch
            .path()
            .join(format!("{runtime}-{pid}-{seq}{suffix}"))
    }
}

/// One planned run: its spec and the files it writes.
struct PlannedRun {
    target: TargetProcess,
    runtime: Runtime,
    spec: ChildSpec,
    output: PathBuf,
    /// Other files the tool writes that we remove (rbspy's raw samples).
    extra: Option<PathBuf>,
    /// The rate the tool samples at.
    rate_hz: u32,
}

/// The supervisor key of `program`'s runs on `target`: one run at a time, one
/// back-off. With the start time, so a later process given the same pid does not
/// inherit this one's back-off.
fn run_key(program: &Path, target: &TargetProcess) -> String {
    format!("{}:{}:{}", program.display(), target.pid, target.start_time)
}

fn plan(shared: &Shared, target: TargetProcess, run_secs: u64) -> Option<PlannedRun> {
    let runtime = target.runtime?;
    let config = &shared.config;
    let rate_hz = config.rate_hz.min(match runtime {
        Runtime::Python => pyspy::MAX_RATE_HZ,
        Runtime::Ruby => rbspy::MAX_RATE_HZ,
        Runtime::Php => phpspy::MAX_RATE_HZ,
        Runtime::Java | Runtime::Node => return None,
    });
    let output = shared.output_path(runtime, target.pid, ".txt");
    let mut extra = None;
    let (program, args): (&Path, Vec<OsString>) = match runtime {
        Runtime::Python => (
            &config.tools.py_spy,
            PySpyRecord {
                pid: target.pid,
                rate_hz,
                duration_secs: run_secs,
                output: &output,
                threads: false,
            }
            .args()
            .ok()?,
        ),
        Runtime::Ruby => {
            let raw = shared.output_path(runtime, target.pid, ".raw.gz");
            let args = RbSpyRecord {
                pid: target.pid,
                rate_hz,
                duration_secs: run_secs,
                output: &output,
                raw_output: &raw,
            }
            .args()
            .ok()?;
            extra = Some(raw);
            (&config.tools.rbspy, args)
        }
        Runtime::Php => (
            &config.tools.phpspy,
            PhpSpyRecord {
                pid: target.pid,
                rate_hz,
                duration_ms: run_secs * 1000,
                output: &output,
            }
            .args()
            .ok()?,
        ),
        Runtime::Java | Runtime::Node => return None,
    };
    Some(PlannedRun {
        spec: ChildSpec {
            key: run_key(program, &target),
            program: program.to_path_buf(),
            args,
            deadline: Duration::from_secs(run_secs) + RUN_DEADLINE_SLACK,
            env: vec![],
        },
        target,
        runtime,
        output,
        extra,
        rate_hz,
    })
}

/// What is left of a round's [`MAX_STORED_BYTES_PER_ROUND`].
struct RoundBudget {
    left: Mutex<usize>,
    share: usize,
}

impl RoundBudget {
    fn new(total: usize, slots: usize) -> Self {
        RoundBudget {
            left: Mutex::new(total),
            share: (total / slots.max(1)).min(crate::runtimes::MAX_STORED_BYTES_PER_PARSE),
        }
    }

    /// Takes one parse's share (or what is left); [`RoundBudget::give_back`] returns
    /// what it did not use.
    fn take(&self) -> usize {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let taken = (*left).min(self.share);
        *left -= taken;
        taken
    }

    fn give_back(&self, unused: usize) {
        *self.left.lock().unwrap_or_else(|p| p.into_inner()) += unused;
    }
}

/// Reads a finished run's output and removes its files. `failure` says why the run
/// itself failed, if it did. The stacks kept take at most what `budget` gives.
fn collect(
    shared: &Shared,
    run: &PlannedRun,
    failure: Option<String>,
    budget: &RoundBudget,
) -> Option<InterpretedSamples> {
    let reserved = budget.take();
    let limits = ParseLimits {
        max_stored_bytes: reserved,
        ..ParseLimits::default()
    };
    let parsed: Result<Parsed, String> = match failure {
        Some(why) => Err(why),
        None => match run.runtime {
            Runtime::Python => pyspy::read_output(&run.output, &limits).map_err(|e| e.to_string()),
            Runtime::Ruby => rbspy::read_output(&run.output, &limits).map_err(|e| e.to_string()),
            Runtime::Php => phpspy::read_output(&run.output, &limits).map_err(|e| e.to_string()),
            Runtime::Java | Runtime::Node => Err("has no output to read".into()),
        }
        .map_err(|e| format!("succeeded but its output is unreadable: {e}")),
    };
    let _ = std::fs::remove_file(&run.output);
    if let Some(extra) = &run.extra {
        let _ = std::fs::remove_file(extra);
    }
    budget.give_back(reserved - parsed.as_ref().map_or(0, |p| p.stored_bytes.min(reserved)));
    let stats = &shared.stats;
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(why) => {
            let failed = shared.note_failure(run.runtime, &run.spec.program, run.target.pid, &why);
            let counter = if failed {
                &stats.runs_failed
            } else {
                &stats.runs_stopped
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    stats.runs_parsed.fetch_add(1, Ordering::Relaxed);
    stats
        .malformed_lines
        .fetch_add(parsed.malformed_lines, Ordering::Relaxed);
    stats.samples_dropped.fetch_add(
        parsed.malformed_samples + parsed.overflow_samples,
        Ordering::Relaxed,
    );
    (!parsed.stacks.is_empty()).then_some(InterpretedSamples {
        pid: run.target.pid,
        runtime: run.runtime,
        rate_hz: run.rate_hz,
        stacks: parsed.stacks,
    })
}

/// Length of each run so that `targets` runs, `slots` at a time, sample within
/// `window` (each run's start-up and output may take [`RUN_DEADLINE_SLACK`] more).
pub fn run_secs(window: Duration, targets: usize, slots: usize) -> u64 {
    let window = window.as_secs();
    if targets == 0 {
        return window.max(MIN_RUN_SECS);
    }
    let waves = targets.div_ceil(slots.max(1)) as u64;
    (window / waves).clamp(MIN_RUN_SECS, window.max(MIN_RUN_SECS))
}

async fn round(
    shared: Arc<Shared>,
    pids: Vec<u32>,
    end: Instant,
    _permit: OwnedSemaphorePermit,
) -> Vec<InterpretedSamples> {
    let classify = shared.clone();
    let Ok(mut targets) = tokio::task::spawn_blocking(move || {
        classify.classify(Classifier::Round, &pids, |r| {
            matches!(r, Runtime::Python | Runtime::Ruby | Runtime::Php)
        })
    })
    .await
    else {
        return vec![];
    };
    if targets.is_empty() {
        return vec![];
    }
    // Whoever waited longest goes first.
    let turn = shared.turn.load(Ordering::Relaxed) % targets.len();
    targets.rotate_left(turn);
    let slots = shared.supervisor.config().max_concurrent;
    let secs = run_secs(
        end.saturating_duration_since(Instant::now()),
        targets.len(),
        slots,
    );
    // A run may start while its sampling still ends inside the window (with a
    // tolerance for the time classification took).
    let run_time = Duration::from_secs(secs).saturating_sub(Duration::from_millis(500));
    let latest_start = end.checked_sub(run_time).unwrap_or_else(Instant::now);

    let mut runs = tokio::task::JoinSet::new();
    let budget = Arc::new(RoundBudget::new(MAX_STORED_BYTES_PER_ROUND, slots));
    // Targets given their turn: run, refused, or nothing to run.
    let mut started = 0usize;
    let total = targets.len();
    for target in targets {
        let Some(run) = plan(&shared, target, secs) else {
            started += 1;
            continue;
        };
        let handle = match Shared::start_by(&shared.supervisor, &run.spec, latest_start).await {
            // No time left in this round: the rest wait.
            None => break,
            Some(Ok(handle)) => handle,
            Some(Err(_)) => {
                shared.stats.runs_refused.fetch_add(1, Ordering::Relaxed);
                started += 1;
                continue;
            }
        };
        started += 1;
        shared.stats.runs.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let budget = budget.clone();
        runs.spawn(async move {
            let failure = handle.wait().await.failure();
            tokio::task::spawn_blocking(move || collect(&shared, &run, failure, &budget))
                .await
                .ok()
                .flatten()
        });
    }
    let deferred = total - started;
    shared
        .stats
        .targets_deferred
        .fetch_add(deferred as u64, Ordering::Relaxed);
    shared.turn.fetch_add(started, Ordering::Relaxed);

    let give_up = latest_start
        + Duration::from_secs(secs)
        + RUN_DEADLINE_SLACK
        + Shared::abandon_grace(&shared.supervisor);
    let (results, abandoned) = join_until(&mut runs, give_up).await;
    shared.note_abandoned(abandoned);
    results.into_iter().flatten().collect()
}

/// The results of the tasks in `set` that end by `give_up`, and how many did not:
/// those are detached, to end on their own.
async fn join_until<T: 'static>(
    set: &mut tokio::task::JoinSet<T>,
    give_up: Instant,
) -> (Vec<T>, usize) {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(give_up, set.join_next()).await {
            Ok(Some(Ok(value))) => out.push(value),
            Ok(Some(Err(_))) => {}
            Ok(None) => return (out, 0),
            Err(_) => {
                let abandoned = set.len();
                set.detach_all();
                return (out, abandoned);
            }
        }
    }
}

async fn refresh_jit(shared: Arc<Shared>, pids: Vec<u32>) {
    let classify = shared.clone();
    let Ok(jvms) = tokio::task::spawn_blocking(move || {
        classify
            .classify(Classifier::Jit, &pids, |r| r == Runtime::Java)
            .into_iter()
            .filter_map(|jvm| {
                // A JVM that is never asked costs no read of its mappings.
                let last = {
                    let tracked = classify.tracked.lock().unwrap_or_else(|p| p.into_inner());
                    let known = tracked.get(&jvm.pid);
                    if known.is_some_and(|t| t.attach_disabled) {
                        return None;
                    }
                    known.and_then(|t| t.jit_refreshed)
                };
                let now = JitSnapshot::capture(&jvm, std::time::Instant::now()).ok()?;
                if let RefreshDecision::Keep =
                    jattach::refresh_decision(last.as_ref(), &now, &RefreshPolicy::default())
                {
                    return None;
                }
                classify.attach_allowed(&jvm).then_some(jvm)
            })
            .collect::<Vec<_>>()
    })
    .await
    else {
        return;
    };
    let end = Instant::now() + JATTACH_DEADLINE;
    let mut runs = tokio::task::JoinSet::new();
    for jvm in jvms {
        let spec = ChildSpec {
            key: run_key(&shared.config.tools.jattach, &jvm),
            program: shared.config.tools.jattach.clone(),
            args: jattach::perfmap_args(jvm.pid),
            deadline: JATTACH_DEADLINE,
            env: vec![],
        };
        let handle = match Shared::start_by(&shared.jit_supervisor, &spec, end).await {
            Some(Ok(handle)) => handle,
            // Busy, backing off, tool missing: not a failed refresh.
            Some(Err(_)) => {
                shared.stats.runs_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // No slot in time: asked again next cycle.
            None => {
                shared
                    .stats
                    .targets_deferred
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        shared.stats.jit_refreshes.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        runs.spawn(async move {
            let failure = handle.wait().await.failure();
            if let Some(why) = &failure {
                let failed =
                    shared.note_failure(Runtime::Java, &shared.config.tools.jattach, jvm.pid, why);
                if !failed {
                    // Our shutdown ended it: not a failed refresh.
                    shared.stats.runs_stopped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Otherwise counted below, as a refresh without a snapshot.
            }
            let ok = failure.is_none();
            let _ = tokio::task::spawn_blocking(move || {
                let snapshot = ok
                    .then(|| JitSnapshot::capture(&jvm, std::time::Instant::now()).ok())
                    .flatten();
                match snapshot {
                    Some(snapshot) => {
                        let mut tracked = shared.tracked.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(t) = tracked.get_mut(&jvm.pid) {
                            t.jit_refreshed = Some(snapshot);
                        }
                    }
                    None => {
                        shared
                            .stats
                            .jit_refresh_failures
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        });
    }
    let give_up = end + JATTACH_DEADLINE + Shared::abandon_grace(&shared.jit_supervisor);
    let (_, abandoned) = join_until(&mut runs, give_up).await;
    shared.note_abandoned(abandoned);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round's runs share its memory budget: each parse gets at most its share,
    /// what a parse did not use goes back, and once it is spent a parse keeps only
    /// the overflow stack, with every sample still counted.
    #[test]
    fn round_budget_is_shared_and_returned() {
        let budget = RoundBudget::new(1000, 2);
        assert_eq!(budget.take(), 500);
        assert_eq!(budget.take(), 500);
        assert_eq!(budget.take(), 0, "spent");
        budget.give_back(300);
        assert_eq!(budget.take(), 300);
        let limits = ParseLimits {
            max_stored_bytes: budget.take(),
            ..ParseLimits::default()
        };
        let parsed = crate::runtimes::rbspy::parse(
            b"main - /a.rb:1;work - /a.rb:2 3\nmain - /a.rb:1;idle - /a.rb:3 2\n",
            &limits,
        );
        assert!(parsed.respects(&limits));
        assert_eq!(parsed.total_samples(), 5);
        assert_eq!(parsed.overflow_samples, 5);
        assert_eq!(parsed.stored_bytes, 0);
        // A parse never gets more than one child's share, nor the per-parse cap.
        assert_eq!(
            RoundBudget::new(usize::MAX, 1).take(),
            crate::runtimes::MAX_STORED_BYTES_PER_PARSE
        );
    }

    /// Past the bound, the window moves on so every candidate is looked at in turn,
    /// each once per lap.
    #[test]
    fn candidate_window_covers_everyone_in_turn() {
        assert_eq!(candidate_window(10, 7), (0, 10));
        let len = MAX_CANDIDATES_PER_ROUND * 2 + 100;
        let laps = len.div_ceil(MAX_CANDIDATES_PER_ROUND) as u64;
        let mut seen = vec![0u32; len];
        for generation in 1..=laps {
            let (start, count) = candidate_window(len, generation);
            assert_eq!(count, MAX_CANDIDATES_PER_ROUND);
            for i in (start..start + count).map(|i| i % len) {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n >= 1), "someone never had a turn");
    }

    /// Rounds and JIT refreshes move their windows apart: a round alternating with
    /// refreshes still reaches a candidate in its second window on its second call.
    #[test]
    fn each_classifier_moves_its_own_window() {
        let p = RuntimeProfilers::new(RuntimeConfig::all(97)).unwrap();
        let mut sleep = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = sleep.id();
        // Two windows' worth of pids that do not exist, with a live process first in
        // the second.
        let mut pids: Vec<u32> = (0..2 * MAX_CANDIDATES_PER_ROUND as u32)
            .map(|i| 0x3f00_0000 + i)
            .collect();
        pids[MAX_CANDIDATES_PER_ROUND] = me;
        let looked_at_me =
            |p: &RuntimeProfilers| p.shared.tracked.lock().unwrap().contains_key(&me);
        p.shared.classify(Classifier::Round, &pids, |_| true);
        assert!(!looked_at_me(&p), "first window");
        p.shared.classify(Classifier::Jit, &pids, |_| true);
        p.shared.tracked.lock().unwrap().clear();
        p.shared.classify(Classifier::Round, &pids, |_| true);
        let reached = looked_at_me(&p);
        let _ = sleep.kill();
        let _ = sleep.wait();
        assert!(reached, "the round's second window was skipped");
    }

    /// Scratch directories of profilers that are gone are removed; ours, other
    /// names and symlinks are left alone.
    #[test]
    fn sweep_removes_only_dead_profilers_scratch() {
        let tmp = tempfile::tempdir().unwrap();
        // Above the largest pid_max: no process has it.
        let dead = tmp.path().join(format!("{SCRATCH_PREFIX}4194304-abc"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("python-1-0.txt"), "stacks").unwrap();
        let alive = tmp
            .path()
            .join(format!("{SCRATCH_PREFIX}{}-def", std::process::id()));
        std::fs::create_dir(&alive).unwrap();
        let other = tmp.path().join(format!("{SCRATCH_PREFIX}notapid"));
        std::fs::create_dir(&other).unwrap();
        let target = tempfile::tempdir().unwrap();
        let link = tmp.path().join(format!("{SCRATCH_PREFIX}4194305-lnk"));
        std::os::unix::fs::symlink(target.path(), &link).unwrap();

        assert_eq!(sweep_scratch(tmp.path()), 1);
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists() && target.path().exists());
        assert!(link.symlink_metadata().is_ok());
    }

    /// Tasks that end by the limit give their results; one that never ends is
    /// counted and left running, and the wait ends at the limit.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn join_until_stops_at_its_limit() {
        let mut set = tokio::task::JoinSet::new();
        set.spawn(async { 1 });
        set.spawn(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            2
        });
        let (tx, rx) = oneshot::channel::<()>();
        set.spawn(async move {
            // Never ends (like a run whose child ignores SIGKILL) until told.
            let _ = rx.await;
            3
        });
        let start = Instant::now();
        let (mut results, abandoned) = join_until(&mut set, start + Duration::from_secs(5)).await;
        results.sort();
        assert_eq!(results, vec![1, 2]);
        assert_eq!(abandoned, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(set.is_empty());
        // The detached task still runs: it can still be told to end.
        assert!(tx.send(()).is_ok());
    }

    /// Runs shrink as targets grow, never below a second, never past the window.
    #[test]
    fn run_length_fits_the_window() {
        let w = Duration::from_secs(15);
        assert_eq!(run_secs(w, 1, 2), 15);
        assert_eq!(run_secs(w, 2, 2), 15);
        assert_eq!(run_secs(w, 4, 2), 7);
        assert_eq!(run_secs(w, 50, 2), MIN_RUN_SECS);
        assert_eq!(run_secs(Duration::from_secs(2), 1, 2), 2);
        assert_eq!(run_secs(Duration::ZERO, 1, 2), MIN_RUN_SECS);
    }

    /// A real Python process is classified as Python; a native one is remembered
    /// but not returned; both are forgotten once no longer among the candidates.
    #[test]
    fn classifies_and_forgets_processes() {
        let p = RuntimeProfilers::new(RuntimeConfig::all(97)).unwrap();
        let mut python = std::process::Command::new("python3")
            .args(["-c", "import time; time.sleep(30)"])
            .spawn()
            .unwrap();
        let mut native = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let pids = [python.id(), native.id()];
        let found = p.shared.classify(Classifier::Round, &pids, |_| true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pid, python.id());
        assert_eq!(found[0].runtime, Some(Runtime::Python));
        assert_eq!(p.shared.tracked.lock().unwrap().len(), 2);
        for _ in 0..FORGET_AFTER_CLASSIFICATIONS {
            p.shared.classify(Classifier::Round, &[], |_| true);
        }
        assert!(p.shared.tracked.lock().unwrap().is_empty());
        for child in [&mut python, &mut native] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// A shell classified as native that then execs Python (same pid, same start
    /// time) is classified again and returned as Python, not kept native from the
    /// cache for as long as it is a candidate.
    #[test]
    fn exec_into_python_is_classified_again() {
        use std::io::Write as _;
        let p = RuntimeProfilers::new(RuntimeConfig::all(97)).unwrap();
        let mut sh = std::process::Command::new("sh")
            .args([
                "-c",
                "read go; exec python3 -c 'import time; time.sleep(30)'",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = sh.id();
        assert!(p
            .shared
            .classify(Classifier::Round, &[pid], |_| true)
            .is_empty());
        assert_eq!(
            p.shared.tracked.lock().unwrap()[&pid].process.runtime,
            None,
            "sh is native"
        );
        writeln!(sh.stdin.as_mut().unwrap(), "go").unwrap();
        // Each round sees it among the candidates, as --pid targets are.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let found = loop {
            let found = p.shared.classify(Classifier::Round, &[pid], |_| true);
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = sh.kill();
        let _ = sh.wait();
        assert_eq!(found.len(), 1, "still cached as native");
        assert_eq!(found[0].runtime, Some(Runtime::Python));
    }

    /// A program is found in PATH or by path; a missing one is reported once per
    /// runtime that needs it.
    #[test]
    fn missing_tools_are_named() {
        assert!(probe_tool(Path::new("sh")).is_ok());
        assert!(probe_tool(Path::new("/bin/sh")).is_ok());
        assert!(probe_tool(Path::new("no-such-tool-here")).is_err());
        let mut config = RuntimeConfig::all(97);
        config.tools.py_spy = "no-such-py-spy".into();
        let missing = config.missing_tools().unwrap();
        assert!(
            missing.starts_with("not found: no-such-py-spy for python"),
            "{missing}"
        );
        let plain = tempfile::NamedTempFile::new().unwrap();
        config.tools.py_spy = plain.path().into();
        let missing = config.missing_tools().unwrap();
        let expected = format!(
            "not found: `{}` is not executable (for python)",
            plain.path().display()
        );
        assert!(missing.starts_with(&expected), "{missing}");
        assert!(RuntimeConfig::none().missing_tools().is_none());
    }
}
