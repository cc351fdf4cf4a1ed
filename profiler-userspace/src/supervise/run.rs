//! One run of one child: started here, then owned by a single tokio task until it is
//! reaped and both its pipes are closed.
//!
//! The task drains stdout and stderr into bounded tails as fast as the child writes
//! (a chatty child never blocks on a full pipe, and never costs more than its tails),
//! enforces the deadline on the child's process group (SIGTERM and SIGCONT, then
//! SIGKILL after the grace), and always reaps. It ends only when the child is reaped
//! and both pipes are closed, whatever happens: exit, crash, deadline, supervisor
//! shutdown, or the caller dropping its handle. If the task itself is dropped (the
//! runtime shuts down first) the [`Slot`] guard SIGKILLs the group and tokio's orphan
//! queue reaps it. It never blocks the thread and creates no threads.

use std::{
    io,
    os::unix::process::ExitStatusExt,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt},
    process::{Child, Command},
    sync::{oneshot, watch},
};

use super::{after, tail::Tail, ChildOutcome, ChildSpec, Exit, RunEnd, Shared};

/// Bytes read from a pipe per read call (one buffer per stream per live child).
pub const READ_CHUNK: usize = 8 * 1024;

/// Starts `spec` as the leader of its own process group, at niceness `nice` or the
/// agent's own if that is lower priority, with stdin closed and both outputs piped.
/// The child is SIGKILLed if the thread that started it dies (PR_SET_PDEATHSIG), so
/// an agent killed outright does not leave it running.
pub(super) fn spawn(spec: &ChildSpec, nice: i32) -> io::Result<Child> {
    super::orphans::spawn_registered(|| spawn_unregistered(spec, nice), Child::id)
}

fn spawn_unregistered(spec: &ChildSpec, nice: i32) -> io::Result<Child> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (getpriority, setpriority, prctl, getppid, errno access); it does not
    // allocate or take locks.
    unsafe {
        cmd.pre_exec(move || {
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS as _, 0);
            let current = if current == -1 && *libc::__errno_location() != 0 {
                0
            } else {
                current
            };
            if libc::setpriority(libc::PRIO_PROCESS as _, 0, nice.max(current)) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nothing would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to every process of the group led by `pgid`. Only called while the
/// leader is unreaped (its pid, hence the group id, cannot be reused), or while its
/// pipes show that members remain. A group already gone is not an error.
pub(super) fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(-pgid, sig) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, sig, %err, "could not signal child process group");
        }
    }
}

/// Asks a group to stop: SIGTERM, and SIGCONT so a stopped member can act on it.
fn terminate(pgid: libc::pid_t) {
    signal_group(pgid, libc::SIGTERM);
    signal_group(pgid, libc::SIGCONT);
}

/// A run's place in the supervisor: released exactly once, by [`Slot::finish`] on
/// every normal path, or by `Drop` if the task is dropped before the child is reaped.
pub(super) struct Slot {
    pub shared: Arc<Shared>,
    pub key: String,
    pub pgid: libc::pid_t,
    pub reaped: bool,
    pub released: bool,
}

impl Slot {
    fn finish(mut self, end: RunEnd, killed: bool) {
        self.released = true;
        super::orphans::ended(self.pgid);
        self.shared.finish(&self.key, end, killed);
        // What the run left behind outside its group goes now.
        self.shared.stats.add_swept(super::orphans::sweep());
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.reaped {
            signal_group(self.pgid, libc::SIGKILL);
        }
        if !self.released {
            super::orphans::ended(self.pgid);
        }
        if !self.released {
            self.shared
                .finish(&self.key, RunEnd::Cancelled, !self.reaped);
        }
    }
}

/// What the task needs besides the child.
pub(super) struct Run {
    pub slot: Slot,
    pub started: Instant,
    pub deadline: Duration,
    pub kill_grace: Duration,
    pub capture_bytes: usize,
    /// `Some(kill_at)` once the supervisor shuts down; closed if it is dropped.
    pub shutdown: watch::Receiver<Option<Instant>>,
    pub done: oneshot::Sender<ChildOutcome>,
}

/// Where a run is on its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the deadline; the timer is the deadline.
    Running,
    /// SIGTERM sent; the timer is when SIGKILL follows.
    Terminating,
    /// SIGKILL sent; only the reap is awaited.
    Killed,
    /// Reaped, but a pipe is still open (a descendant holds it); the timer is when
    /// the group is SIGKILLed and the pipes closed.
    Lingering,
}

/// Reads from `pipe` if it is still open; pending forever otherwise.
async fn read_some<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> usize {
    match pipe {
        // A read error (EIO and the like) ends the stream like EOF.
        Some(p) => p.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

/// Owns `child` until it is reaped and its pipes closed; reports the outcome.
pub(super) async fn supervise(mut child: Child, run: Run) {
    let Run {
        mut slot,
        started,
        deadline,
        kill_grace,
        capture_bytes,
        mut shutdown,
        done,
    } = run;
    let pgid = slot.pgid;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (mut out_tail, mut err_tail) = (Tail::new(capture_bytes), Tail::new(capture_bytes));
    let (mut out_buf, mut err_buf) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);

    let timer = tokio::time::sleep_until(after(started, deadline).into());
    tokio::pin!(timer);
    let mut phase = Phase::Running;
    let mut status: Option<ExitStatus> = None;
    let (mut timed_out, mut cancelled, mut killed) = (false, false, false);
    let mut watching_shutdown = true;

    while status.is_none() || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            res = child.wait(), if status.is_none() => {
                status = Some(res.unwrap_or_else(|err| {
                    // Only if someone else reaped it: the status is lost.
                    tracing::error!(pid = pgid, %err, "could not wait for child");
                    signal_group(pgid, libc::SIGKILL);
                    ExitStatus::from_raw(libc::SIGKILL)
                }));
                slot.reaped = true;
                if stdout.is_some() || stderr.is_some() {
                    phase = Phase::Lingering;
                    timer.as_mut().reset(after(Instant::now(), kill_grace).into());
                }
            }
            n = read_some(&mut stdout, &mut out_buf) => match n {
                0 => stdout = None,
                n => out_tail.push(&out_buf[..n]),
            },
            n = read_some(&mut stderr, &mut err_buf) => match n {
                0 => stderr = None,
                n => err_tail.push(&err_buf[..n]),
            },
            () = &mut timer, if phase != Phase::Killed => match phase {
                Phase::Running => {
                    timed_out = true;
                    terminate(pgid);
                    phase = Phase::Terminating;
                    timer.as_mut().reset(after(Instant::now(), kill_grace).into());
                }
                Phase::Terminating => {
                    killed = true;
                    signal_group(pgid, libc::SIGKILL);
                    phase = Phase::Killed;
                }
                Phase::Lingering => {
                    signal_group(pgid, libc::SIGKILL);
                    (stdout, stderr) = (None, None);
                }
                Phase::Killed => {}
            },
            changed = shutdown.changed(), if watching_shutdown => {
                watching_shutdown = false;
                let kill_at = match changed {
                    Ok(()) => *shutdown.borrow_and_update(),
                    Err(_) => None, // the supervisor was dropped
                }
                .unwrap_or_else(|| after(Instant::now(), kill_grace));
                match phase {
                    Phase::Running => {
                        cancelled = true;
                        terminate(pgid);
                        phase = Phase::Terminating;
                        timer.as_mut().reset(kill_at.into());
                    }
                    Phase::Terminating => {
                        if kill_at < timer.deadline().into_std() {
                            timer.as_mut().reset(kill_at.into());
                        }
                    }
                    Phase::Lingering => {
                        signal_group(pgid, libc::SIGKILL);
                        (stdout, stderr) = (None, None);
                    }
                    Phase::Killed => {}
                }
            }
        }
    }
    // Reaped (the loop ends only then) and both pipes dropped.
    let status = status.expect("loop ends after the reap");
    let exit = match status.code() {
        Some(code) => Exit::Code(code),
        None => Exit::Signal(status.signal().unwrap_or(libc::SIGKILL)),
    };
    let end = if cancelled {
        RunEnd::Cancelled
    } else if timed_out {
        RunEnd::TimedOut
    } else if exit == Exit::Code(0) {
        RunEnd::Succeeded
    } else {
        RunEnd::Failed
    };
    let outcome = ChildOutcome {
        exit,
        timed_out,
        elapsed: started.elapsed(),
        stdout_bytes: out_tail.total(),
        stderr_bytes: err_tail.total(),
        stdout_tail: out_tail.into_vec(),
        stderr_tail: err_tail.into_vec(),
    };
    // Released before the outcome is sent, so a caller that starts the same key again
    // as soon as it has the outcome is not refused as busy.
    slot.finish(end, killed);
    let _ = done.send(outcome); // the caller may have dropped its handle
}
