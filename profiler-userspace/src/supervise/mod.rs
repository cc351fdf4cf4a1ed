//! Supervisor of the external profilers the agent runs every cycle (py-spy, rbspy,
//! phpspy, jattach): bounded in children, time, output and memory.
//!
//! [`Supervisor::start`] never blocks: it refuses (and counts) a run when the key is
//! busy or backing off, the tool is missing, or `max_concurrent` children are alive.
//! A started child is owned by one tokio task (see `run.rs`) that drains its output
//! into bounded tails, enforces its deadline on its whole process group, reaps it and
//! closes its pipes on every path (and signals the group only while the child is
//! unreaped: after the reap its id may be anyone's, see `run.rs`); the caller only
//! holds a [`ChildHandle`] to await the [`ChildOutcome`], and may drop it. Keys that
//! keep failing back off exponentially. [`Supervisor::shutdown`] kills everything and waits, with a deadline.
//!
//! Must never: create a thread per child, hold a child's pipe or status past its run,
//! let a child's output grow memory, or block the runtime thread (the only blocking
//! calls are fork/exec and, once per tool, a `stat`).

mod keys;
pub mod orphans;
mod run;
mod stats;
mod tail;

use std::{
    collections::HashSet,
    ffi::OsString,
    io,
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};

pub use keys::{MAX_KEY_HISTORY, MAX_TOOLS};

/// Whether `program` can be run as [`Supervisor::start`] would run it (a path, or a
/// bare name searched in our PATH); the error says why not.
pub fn probe_tool(program: &std::path::Path) -> Result<(), String> {
    keys::probe(program, std::env::var_os("PATH").as_deref())
}
pub use run::READ_CHUNK;
pub use stats::{StatsSnapshot, SupervisorStats};

/// Default most children alive at once. Each costs a process (at niceness
/// [`DEFAULT_NICE`]), four fds (two pipes, tokio's pidfd and ours), a task, and in
/// the agent 2 x [`READ_CHUNK`] + 2 x `capture_bytes` (24 KiB at the defaults).
pub const DEFAULT_MAX_CONCURRENT: usize = 2;

/// Default time between SIGTERM and SIGKILL. A child that ignores SIGTERM keeps its
/// slot this long after its deadline, and shutdown may wait this long for it.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// Default bytes kept of the end of each of stdout and stderr, for error messages.
/// Costs this much per stream per live child, and per outcome held by a caller.
pub const DEFAULT_CAPTURE_BYTES: usize = 4 * 1024;

/// Default niceness of children: below the agent, so profiling work yields to the
/// workload. Never higher priority than the agent itself.
pub const DEFAULT_NICE: i32 = 10;

/// Default first back-off of a failing key. A key that always fails costs one run
/// per back-off period.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(30);

/// Default longest back-off: how long a target that recovers may wait for its next
/// run after a long series of failures.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30 * 60);

/// Default time a missing tool is remembered before it is probed again (one `stat`),
/// so installing it while the agent runs takes effect without a restart.
pub const DEFAULT_TOOL_RECHECK: Duration = Duration::from_secs(10 * 60);

/// `t + d`, or about 30 years after `t` if that overflows (as tokio's own sleeps do),
/// so a `Duration::MAX` deadline or grace means "never" rather than a panic.
fn after(t: Instant, d: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    t.checked_add(d.min(FAR)).unwrap_or(t)
}

/// Exponential back-off of a key whose runs keep failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Wait after the first failure; doubled after each further one.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl Backoff {
    /// The wait after `failures` consecutive failures (at least one).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// Bounds of the supervisor; see each `DEFAULT_*` constant for what a bound costs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Most children alive at once (at least 1).
    pub max_concurrent: usize,
    /// SIGTERM at the deadline, then SIGKILL this much later.
    pub kill_grace: Duration,
    /// Bytes kept of the end of stdout, and of stderr, of each run.
    pub capture_bytes: usize,
    /// Niceness of children (never higher priority than the agent's own).
    pub nice: i32,
    /// Back-off of keys whose runs fail (non-zero exit, signal or timeout).
    pub failure_backoff: Backoff,
    /// How long a missing tool is remembered before it is probed again.
    pub tool_recheck: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            kill_grace: DEFAULT_KILL_GRACE,
            capture_bytes: DEFAULT_CAPTURE_BYTES,
            nice: DEFAULT_NICE,
            failure_backoff: Backoff::default(),
            tool_recheck: DEFAULT_TOOL_RECHECK,
        }
    }
}

/// One run to start.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// What is being profiled, e.g. `py-spy:1234`: at most one run per key at once,
    /// and failures back off per key.
    pub key: String,
    /// A path, or a bare name searched in PATH.
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// From the start: SIGTERM then, SIGKILL `kill_grace` later.
    pub deadline: Duration,
    /// Set in the child's environment, on top of the agent's.
    pub env: Vec<(OsString, OsString)>,
}

/// Why [`Supervisor::start`] did not start a run. Every refusal is counted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// `max_concurrent` children are already alive; try at the next cycle.
    #[error("the most children allowed at once are already running")]
    AtCapacity,
    /// A run with the same key is still alive.
    #[error("a run for this target is still in progress")]
    Busy,
    /// The key's recent runs failed; it may run again at `until`.
    #[error(
        "the last runs for this target failed; next try in {}s",
        until.saturating_duration_since(Instant::now()).as_secs()
    )]
    BackingOff { until: Instant },
    /// The program cannot be run: not installed, not found in PATH, or not
    /// executable. Found once and remembered for `tool_recheck`.
    #[error("`{}` is not installed: {reason}", program.display())]
    MissingTool { program: PathBuf, reason: String },
    /// The supervisor is shutting down.
    #[error("the supervisor is shutting down")]
    ShuttingDown,
    /// fork or exec failed for another reason (out of processes or memory, or no
    /// tokio runtime to run it on).
    #[error("could not start the child: {0}")]
    Spawn(#[source] io::Error),
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal (ours at the deadline, or its own crash). Also
    /// reported as SIGKILL when the run was abandoned: the runtime dropped its task
    /// (which SIGKILLs the group), or its status was reaped by someone else.
    Signal(i32),
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct ChildOutcome {
    pub exit: Exit,
    /// The deadline passed and the child was signalled.
    pub timed_out: bool,
    /// From the start to the reap.
    pub elapsed: Duration,
    /// The last `capture_bytes` of stdout.
    pub stdout_tail: Vec<u8>,
    /// The last `capture_bytes` of stderr.
    pub stderr_tail: Vec<u8>,
    /// All bytes the child wrote to stdout, kept or not.
    pub stdout_bytes: u64,
    /// All bytes the child wrote to stderr, kept or not.
    pub stderr_bytes: u64,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Exit::Code(code) => write!(f, "exited with status {code}"),
            Exit::Signal(signal) => {
                let name = match signal {
                    libc::SIGKILL => "SIGKILL",
                    libc::SIGTERM => "SIGTERM",
                    libc::SIGSEGV => "SIGSEGV",
                    libc::SIGABRT => "SIGABRT",
                    libc::SIGBUS => "SIGBUS",
                    libc::SIGILL => "SIGILL",
                    libc::SIGINT => "SIGINT",
                    libc::SIGPIPE => "SIGPIPE",
                    _ => return write!(f, "was killed by signal {signal}"),
                };
                write!(f, "was killed by {name}")
            }
        }
    }
}

/// Longest line of a child's output quoted in a failure description.
pub const MAX_FAILURE_LINE: usize = 240;

impl ChildOutcome {
    /// Exited with code 0 before its deadline.
    pub fn success(&self) -> bool {
        self.exit == Exit::Code(0) && !self.timed_out
    }

    /// Why the run failed, for a log line: how it ended and the last line it wrote
    /// (stderr first), e.g. `exited with status 1: Error: No such process`. `None`
    /// for a success.
    pub fn failure(&self) -> Option<String> {
        if self.success() {
            return None;
        }
        let mut text = if self.timed_out {
            format!("ran past its deadline and {}", self.exit)
        } else {
            self.exit.to_string()
        };
        if let Some(line) = last_line(&self.stderr_tail).or_else(|| last_line(&self.stdout_tail)) {
            text.push_str(": ");
            text.push_str(&line);
        }
        Some(text)
    }
}

/// The last non-blank line of `tail`, without control characters, at most
/// [`MAX_FAILURE_LINE`] characters.
fn last_line(tail: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(tail);
    let line = text.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    Some(
        line.chars()
            .filter(|c| !c.is_control())
            .take(MAX_FAILURE_LINE)
            .collect(),
    )
}

/// The caller's view of a started run. Dropping it does not stop the run: its task
/// still enforces the deadline, reaps and closes, and discards the outcome.
#[derive(Debug)]
pub struct ChildHandle {
    key: String,
    pid: u32,
    started: Instant,
    done: oneshot::Receiver<ChildOutcome>,
}

impl ChildHandle {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The child's pid, also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the child is reaped and its pipes closed.
    pub async fn wait(self) -> ChildOutcome {
        match self.done.await {
            Ok(outcome) => outcome,
            // The task was dropped before the end (its runtime is shutting down);
            // its guard SIGKILLed the group.
            Err(_) => ChildOutcome {
                exit: Exit::Signal(libc::SIGKILL),
                timed_out: false,
                elapsed: self.started.elapsed(),
                stdout_tail: vec![],
                stderr_tail: vec![],
                stdout_bytes: 0,
                stderr_bytes: 0,
            },
        }
    }
}

/// Shutdown did not see every child reaped before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("{remaining} child process(es) were still alive at the shutdown deadline")]
pub struct ShutdownIncomplete {
    pub remaining: usize,
}

/// How a run ended, for the counters and the key's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

/// Everything behind the lock.
struct State {
    /// Keys with a live child: at most `max_concurrent`.
    running: HashSet<String>,
    history: keys::KeyHistory,
    tools: keys::ToolCache,
    shutting_down: bool,
}

/// Shared by the supervisor and its child tasks (which never hold the shutdown
/// sender, so dropping the [`Supervisor`] reaches them).
struct Shared {
    state: Mutex<State>,
    stats: Arc<SupervisorStats>,
    /// The number of live children, for waiters.
    live: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; recover the data if something did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_live(&self, n: usize) {
        self.stats.live.store(n as u64, Ordering::Relaxed);
        self.live.send_replace(n);
    }

    /// Releases `key`'s slot and records how its run ended.
    fn finish(&self, key: &str, end: RunEnd, killed: bool) {
        let mut state = self.lock();
        state.running.remove(key);
        let counter = match end {
            RunEnd::Succeeded => {
                state.history.success(key);
                &self.stats.succeeded
            }
            RunEnd::Failed | RunEnd::TimedOut => {
                if state.history.failure(key, Instant::now()) {
                    self.stats.keys_evicted.fetch_add(1, Ordering::Relaxed);
                }
                if end == RunEnd::Failed {
                    &self.stats.failed
                } else {
                    &self.stats.timed_out
                }
            }
            RunEnd::Cancelled => &self.stats.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if killed {
            self.stats.killed.fetch_add(1, Ordering::Relaxed);
        }
        self.set_live(state.running.len());
    }
}

/// Starts, bounds and reaps the agent's child processes. Dropping it kills every
/// live child (SIGTERM, SIGKILL after the grace) as [`Supervisor::shutdown`] does,
/// without waiting.
pub struct Supervisor {
    config: SupervisorConfig,
    shared: Arc<Shared>,
    /// `Some(kill_at)` once shutting down; dropped with the supervisor.
    shutdown: watch::Sender<Option<Instant>>,
}

impl Supervisor {
    pub fn new(mut config: SupervisorConfig) -> Supervisor {
        config.max_concurrent = config.max_concurrent.max(1);
        let state = State {
            running: HashSet::with_capacity(config.max_concurrent),
            history: keys::KeyHistory::new(MAX_KEY_HISTORY, config.failure_backoff),
            tools: keys::ToolCache::new(config.tool_recheck),
            shutting_down: false,
        };
        Supervisor {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                stats: Arc::new(SupervisorStats::default()),
                live: watch::Sender::new(0),
            }),
            shutdown: watch::Sender::new(None),
            config,
        }
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.config
    }

    pub fn stats(&self) -> &Arc<SupervisorStats> {
        &self.shared.stats
    }

    /// Children alive now.
    pub fn live(&self) -> usize {
        *self.shared.live.borrow()
    }

    /// Waits until fewer than `max_concurrent` children are alive.
    pub async fn capacity_available(&self) {
        let max = self.config.max_concurrent;
        let mut live = self.shared.live.subscribe();
        // The sender lives in `shared`, which we hold: this cannot fail.
        let _ = live.wait_for(|n| *n < max).await;
    }

    /// Waits until no child is alive (including runs whose handles were dropped).
    pub async fn idle(&self) {
        let mut live = self.shared.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Starts `spec` now, or says why not. Never blocks beyond fork/exec; must be
    /// called within a tokio runtime with IO and time enabled.
    pub fn start(&self, spec: ChildSpec) -> Result<ChildHandle, Refused> {
        let result = self.try_start(spec);
        if let Err(refused) = &result {
            self.shared
                .stats
                .refusal(refused)
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn try_start(&self, spec: ChildSpec) -> Result<ChildHandle, Refused> {
        let now = Instant::now();
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Refused::Spawn(io::Error::other(e)))?;
        let shutdown = {
            let mut state = self.shared.lock();
            if state.shutting_down {
                return Err(Refused::ShuttingDown);
            }
            let path = spec
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var_os("PATH"));
            if let Err(missing) = state.tools.check(&spec.program, path.as_deref(), now) {
                // The owner says it once at start (RuntimeConfig::missing_tools);
                // here only at debug, so a missing tool is never a warning per cycle.
                if missing.new {
                    tracing::debug!(program = %spec.program.display(), reason = %missing.reason,
                        "tool not installed; its runs are refused");
                }
                return Err(Refused::MissingTool {
                    program: spec.program,
                    reason: missing.reason,
                });
            }
            if state.running.contains(&spec.key) {
                return Err(Refused::Busy);
            }
            if let Some(until) = state.history.backing_off(&spec.key, now) {
                return Err(Refused::BackingOff { until });
            }
            if state.running.len() >= self.config.max_concurrent {
                return Err(Refused::AtCapacity);
            }
            // Reserve the slot, then fork outside the lock.
            state.running.insert(spec.key.clone());
            self.shared.set_live(state.running.len());
            // Subscribed under the lock: a shutdown after this is seen by the task.
            self.shutdown.subscribe()
        };
        self.shared.stats.add_swept(orphans::sweep());
        let child = match run::spawn(&spec, self.config.nice) {
            Ok(child) => child,
            Err(err) => {
                let mut state = self.shared.lock();
                state.running.remove(&spec.key);
                self.shared.set_live(state.running.len());
                let kind = err.kind();
                if matches!(
                    kind,
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) {
                    let reason = format!("exec failed: {err}");
                    tracing::debug!(program = %spec.program.display(), %reason,
                        "tool not installed; its runs are refused");
                    state.tools.mark_missing(&spec.program, reason.clone(), now);
                    return Err(Refused::MissingTool {
                        program: spec.program,
                        reason,
                    });
                }
                // tokio can fail after the fork and exec succeeded (registering the
                // child's pidfd or SIGCHLD handler): that child is ours but no run's;
                // the sweep kills it now rather than at the next spawn.
                drop(state);
                self.shared.stats.add_swept(orphans::sweep());
                return Err(Refused::Spawn(err));
            }
        };
        let started = Instant::now();
        self.shared.stats.started.fetch_add(1, Ordering::Relaxed);
        let pid = child.id().expect("a child just spawned has a pid");
        let (done_tx, done_rx) = oneshot::channel();
        let slot = run::Slot {
            shared: Arc::clone(&self.shared),
            key: spec.key.clone(),
            pgid: pid as libc::pid_t,
            child: Some(child),
            released: false,
        };
        runtime.spawn(run::supervise(run::Run {
            slot,
            started,
            deadline: spec.deadline,
            kill_grace: self.config.kill_grace,
            capture_bytes: self.config.capture_bytes,
            shutdown,
            done: done_tx,
        }));
        Ok(ChildHandle {
            key: spec.key,
            pid,
            started,
            done: done_rx,
        })
    }

    /// Refuses new starts, sends SIGTERM to every live child's group (SIGKILL after
    /// `kill_grace`, or half of `deadline` if that is sooner) and waits for all of
    /// them to be reaped, at most `deadline`.
    pub async fn shutdown(&self, deadline: Duration) -> Result<(), ShutdownIncomplete> {
        let kill_at = after(Instant::now(), self.config.kill_grace.min(deadline / 2));
        self.shared.lock().shutting_down = true;
        self.shutdown.send_replace(Some(kill_at));
        let mut live = self.shared.live.subscribe();
        let started = Instant::now();
        let all_reaped = tokio::time::timeout(deadline, live.wait_for(|n| *n == 0))
            .await
            .is_ok();
        // Orphans the last runs left: killed, then reaped, within what is left.
        loop {
            let swept = orphans::sweep();
            self.shared.stats.add_swept(swept);
            let done = swept == orphans::Swept::default() && orphans::dying() == 0;
            if done || started.elapsed() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if all_reaped {
            Ok(())
        } else {
            Err(ShutdownIncomplete {
                remaining: self.live(),
            })
        }
    }
}

#[cfg(test)]
mod tests;
