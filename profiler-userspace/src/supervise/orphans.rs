//! Orphans: descendants of our children that outlive them.
//!
//! A run's deadline and its end signal the child's process group, which covers
//! what the child forks; a descendant that left the group (`setsid`, `setpgid`) and
//! closed its pipes escapes that, and once its parent exits it is reparented to
//! init, out of our reach. [`adopt_orphans`] makes the process a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`): such descendants are reparented to us instead, and
//! [`sweep`] (run when a run starts or ends, and at shutdown) SIGKILLs every child of
//! ours that is neither a supervised child nor in the group of one, and reaps it.
//!
//! Only for a process whose children are all the supervisor's (`profiler agent`
//! and `profiler record`): anything else it forked would be swept too. Off until
//! [`adopt_orphans`] is called, so library users and tests are unaffected.

use std::{
    collections::HashSet,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
};

/// Pids of the supervised children whose runs have not ended, of every supervisor
/// of the process (the agent has two), and of the orphans killed but not reaped
/// yet. Memory: one entry per live child or dying orphan.
static LIVE: Mutex<Registry> = Mutex::new(Registry {
    live: None,
    killed: None,
});

struct Registry {
    live: Option<HashSet<i32>>,
    /// Killed by a sweep, not reaped yet: counted once, not killed again.
    killed: Option<HashSet<i32>>,
}

/// Set by [`adopt_orphans`].
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// Most children looked at in one sweep: far more than the agent ever has, and a
/// bound on the work if something forks without end.
const MAX_CHILDREN_SWEPT: usize = 4096;

fn registry() -> MutexGuard<'static, Registry> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes this process the reaper of its children's orphaned descendants, and turns
/// [`sweep`] on. Call once, early, from a process whose only children are the
/// supervisor's.
pub fn adopt_orphans() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    ADOPTING.store(true, Ordering::Relaxed);
    Ok(())
}

/// Runs `spawn` (a fork and exec) with the registry locked and records the pid it
/// returns, so a concurrent [`sweep`] never sees a child before it is registered.
pub(super) fn spawn_registered<T>(
    spawn: impl FnOnce() -> io::Result<T>,
    pid: impl Fn(&T) -> Option<u32>,
) -> io::Result<T> {
    let mut registry = registry();
    let child = spawn()?;
    if let Some(pid) = pid(&child) {
        registry
            .live
            .get_or_insert_with(HashSet::new)
            .insert(pid as i32);
    }
    Ok(child)
}

/// The run of child `pid` ended: reaped, and its pipes closed (until then, its
/// group's members, which may hold them, are left to the run).
pub(super) fn ended(pid: i32) {
    if let Some(set) = registry().live.as_mut() {
        set.remove(&pid);
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Orphans that were running (or stopped) and got SIGKILL.
    pub killed: u64,
    /// Orphans reaped (dead ones, and those killed earlier).
    pub reaped: u64,
}

/// SIGKILLs every child of this process that is not a supervised child or in the
/// group of one, and reaps those already dead. A child killed now is reaped by a
/// later sweep. Does nothing unless [`adopt_orphans`] was called.
pub fn sweep() -> Swept {
    let mut swept = Swept::default();
    if !ADOPTING.load(Ordering::Relaxed) {
        return swept;
    }
    let mut registry = registry();
    let Registry { live, killed } = &mut *registry;
    let empty = HashSet::new();
    let live = live.as_ref().unwrap_or(&empty);
    let killed = killed.get_or_insert_with(HashSet::new);
    for pid in children().into_iter().take(MAX_CHILDREN_SWEPT) {
        if live.contains(&pid) {
            continue;
        }
        let Some((state, pgid)) = state_and_group(pid) else {
            continue; // gone meanwhile
        };
        if live.contains(&pgid) {
            // Still in a live run's group: that run's end signals it.
            continue;
        }
        // SAFETY: kill has no memory-safety preconditions; `pid` is our child
        // and unreaped, so it cannot have been reused.
        if state != 'Z' && !killed.contains(&pid) && unsafe { libc::kill(pid, libc::SIGKILL) } == 0
        {
            killed.insert(pid);
            swept.killed += 1;
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status we own; only this pid, never -1, so
        // the children tokio waits for are left alone.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            killed.remove(&pid);
            swept.reaped += 1;
        }
    }
    swept
}

/// Orphans killed and not reaped yet.
pub fn dying() -> usize {
    registry().killed.as_ref().map_or(0, HashSet::len)
}

/// This process's children, zombies included, from each thread's
/// `/proc/self/task/TID/children` (a reparented orphan belongs to one thread).
fn children() -> Vec<i32> {
    let mut pids: Vec<i32> = procfs::process::Process::myself()
        .and_then(|me| me.tasks())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| task.children().ok())
        .flatten()
        .filter_map(|pid| i32::try_from(pid).ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// State letter and process group of `pid`, from `/proc/PID/stat`.
fn state_and_group(pid: i32) -> Option<(char, i32)> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    Some((stat.state, stat.pgrp))
}
