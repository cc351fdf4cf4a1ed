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
//!
//! # Which group we may signal
//!
//! The child leads its own process group, whose id is the child's pid. That id is
//! ours only while the child is unreaped: the kernel gives a pid to a new process (or
//! group) only once no process, zombies included, has it as pid or group id. Open
//! pipes prove nothing: a descendant that called `setsid` may hold one after every
//! member of the group has exited, and its id may then be reused by anyone who
//! becomes a group leader (as root, we would SIGKILL that). So the reap comes last:
//!
//! - the task learns that the child exited from a pidfd (polled if there is none),
//!   without reaping it: the zombie keeps the group id ours;
//! - while a pipe is still open it keeps draining, and when the grace has passed it
//!   SIGKILLs the group (what is left of it) and drops the pipes;
//! - only then it reaps, and never signals the group again.
//!
//! [`signal_group`] checks the rule itself: it sends nothing unless the kernel says
//! (`waitid` with `WNOWAIT`) that the leader is still our unreaped child.
//!
//! A `setsid` descendant escapes the group kill. It cannot keep a run alive: its
//! pipes are dropped when the grace has passed, and where orphans are adopted it
//! became our child when the child exited, which the sweep at the run's end SIGKILLs
//! and reaps (`orphans.rs`: it signals only its own unreaped children, by pid).

use std::{
    io,
    os::{
        fd::{FromRawFd, OwnedFd, RawFd},
        unix::process::ExitStatusExt,
    },
    process::{ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{unix::AsyncFd, AsyncRead, AsyncReadExt, Interest},
    process::{Child, Command},
    sync::{oneshot, watch},
};

use super::{after, tail::Tail, ChildOutcome, ChildSpec, Exit, RunEnd, Shared};

/// Bytes read from a pipe per read call (one buffer per stream per live child).
pub const READ_CHUNK: usize = 8 * 1024;

/// How often a child's exit is looked for when no pidfd could be opened.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// Group signals [`signal_group`] did not send because the leader was not (or no
/// longer) our unreaped child. Zero unless something reaps our children behind our
/// back, or a bug signals after the reap.
pub(super) static GROUP_SIGNALS_REFUSED: AtomicU64 = AtomicU64::new(0);

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

/// Child `pid`'s state as its parent sees it, without reaping it: `Some(true)` if it
/// has exited (a zombie until reaped), `Some(false)` if it runs or is stopped, `None`
/// if it is not our unreaped child (reaped already, or never ours).
pub(super) fn exit_state(pid: libc::pid_t) -> Option<bool> {
    // SAFETY: siginfo_t is plain data, valid when zeroed.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only into `info`, which we own. WNOWAIT leaves an exited
    // child unreaped; WNOHANG never blocks; P_PID never touches other children.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: waitid succeeded; si_pid is set if a child exited, left 0 otherwise.
    Some(unsafe { info.si_pid() } != 0)
}

/// Sends `sig` to every process of the group led by our child `pgid`, but only if
/// the kernel confirms that the child is still ours and unreaped (running, stopped or
/// a zombie), so that no other process can have `pgid` as its group id; otherwise
/// nothing is sent (counted in [`GROUP_SIGNALS_REFUSED`]). A group already gone is
/// not an error.
pub(super) fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    if exit_state(pgid).is_none() {
        GROUP_SIGNALS_REFUSED.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            pgid,
            sig,
            "not signalling a process group whose leader was reaped"
        );
        return;
    }
    // SAFETY: kill has no memory-safety preconditions. Nothing reaps the leader
    // between the check and here: only its run's task does, and not concurrently.
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

/// Wakes the task when its child exits, without reaping it.
enum ExitWatch {
    /// The child's pidfd: readable once it has exited.
    Pidfd(AsyncFd<OwnedFd>),
    /// No pidfd (none left, or a kernel without pidfd_open): the state is polled.
    Poll,
}

impl ExitWatch {
    /// For our unreaped child `pid`.
    fn new(pid: libc::pid_t) -> ExitWatch {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return ExitWatch::Poll;
        }
        // SAFETY: a new fd (close-on-exec) that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // SAFETY: an OwnedFd keeps its fd open, and the same, until the AsyncFd drops it.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => ExitWatch::Pidfd(fd),
            Err(_) => ExitWatch::Poll,
        }
    }

    /// Returns once child `pid` has exited: true while it is still ours to reap (a
    /// zombie), false if something else reaped it.
    async fn exited(&self, pid: libc::pid_t) -> bool {
        loop {
            match exit_state(pid) {
                Some(true) => return true,
                None => return false,
                Some(false) => {}
            }
            match self {
                ExitWatch::Pidfd(fd) => match fd.readable().await {
                    // Readable means it exited; should a look say otherwise, wait
                    // for the next wake-up rather than spin.
                    Ok(mut ready) => {
                        if exit_state(pid) == Some(false) {
                            ready.clear_ready();
                        }
                    }
                    Err(_) => tokio::time::sleep(EXIT_POLL).await,
                },
                ExitWatch::Poll => tokio::time::sleep(EXIT_POLL).await,
            }
        }
    }
}

/// A run's place in the supervisor: released exactly once, by [`Slot::finish`] on
/// every normal path, or by `Drop` if the task is dropped before the end.
pub(super) struct Slot {
    pub shared: Arc<Shared>,
    pub key: String,
    pub pgid: libc::pid_t,
    /// The child, leader of the group `pgid`, until it is reaped (then `None`): held
    /// unreaped, even as a zombie, it keeps `pgid` ours.
    pub child: Option<Child>,
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
        let unreaped = self.child.is_some();
        if let Some(child) = self.child.take() {
            // Still unreaped, so the group is ours: killed before the child goes to
            // tokio's orphan queue (kill_on_drop), which reaps it.
            signal_group(self.pgid, libc::SIGKILL);
            drop(child);
        }
        if !self.released {
            super::orphans::ended(self.pgid);
            self.shared.finish(&self.key, RunEnd::Cancelled, unreaped);
        }
    }
}

/// What the task needs besides the child (which is in the slot).
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
    /// SIGKILL sent; only the exit is awaited.
    Killed,
    /// Exited (not reaped yet, so the group is still ours), but a pipe is still open
    /// (a descendant holds it); the timer is when the group is SIGKILLed and the
    /// pipes closed.
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

/// Owns the slot's child until it is reaped and its pipes closed; reports the outcome.
pub(super) async fn supervise(run: Run) {
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
    let (mut stdout, mut stderr) = match slot.child.as_mut() {
        Some(child) => (child.stdout.take(), child.stderr.take()),
        None => (None, None),
    };
    let (mut out_tail, mut err_tail) = (Tail::new(capture_bytes), Tail::new(capture_bytes));
    let (mut out_buf, mut err_buf) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);

    let timer = tokio::time::sleep_until(after(started, deadline).into());
    tokio::pin!(timer);
    let watch = ExitWatch::new(pgid);
    let exit = watch.exited(pgid);
    tokio::pin!(exit);
    let mut phase = Phase::Running;
    // Whether the child has exited; and whether something else reaped it (then its
    // status is lost and the group id is no longer ours).
    let (mut exited, mut lost) = (false, false);
    let (mut timed_out, mut cancelled, mut killed) = (false, false, false);
    let mut watching_shutdown = true;

    while !exited || stdout.is_some() || stderr.is_some() {
        tokio::select! {
            ours = &mut exit, if !exited => {
                exited = true;
                if !ours {
                    // Something else reaped it: its status is lost, and its pid and
                    // group id may be anyone's. Not signalled again, not even by
                    // kill_on_drop: the Child is forgotten (its few bytes and
                    // tokio's pidfd), in a case that is a bug elsewhere.
                    tracing::error!(pid = pgid, "child reaped by someone else");
                    lost = true;
                    std::mem::forget(slot.child.take());
                }
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
                    if !lost {
                        signal_group(pgid, libc::SIGKILL);
                    }
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
                        if !lost {
                            signal_group(pgid, libc::SIGKILL);
                        }
                        (stdout, stderr) = (None, None);
                    }
                    Phase::Killed => {}
                }
            }
        }
    }
    // Exited and both pipes dropped: the group is done with, so now the reap. From
    // here on `pgid` may be anyone's.
    let reaped = match slot.child.as_mut() {
        Some(child) => child.wait().await.ok(),
        None => None,
    };
    let child = slot.child.take();
    let status = match reaped {
        Some(status) => status,
        None => {
            // Lost (see above), or reaped elsewhere since: forgotten likewise.
            std::mem::forget(child);
            ExitStatus::from_raw(libc::SIGKILL)
        }
    };
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
