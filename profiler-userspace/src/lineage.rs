//! Stage 3a: which process forked which, as the eBPF fork and exec events tell it
//! (`profiler_common::ProcessEvent`).
//!
//! A process forked without an exec runs its parent's program with its parent's
//! mappings. If it exits before the capture worker reads its own (a shell's
//! subshell, a worker that handles one job), [`crate::process::ProcessTable`] names
//! its frames from its parent's instead of leaving them `[unknown]`.
//!
//! Each process has an incarnation: the sequence number of the fork or exec that
//! began the program it runs now (0: one that began before we watched). A child
//! records its parent's incarnation at the fork, and names from the parent only
//! while the parent still runs that incarnation: a parent that exec'd since, or
//! whose pid now belongs to another process, is not used.
//!
//! A child that exec'd ran its parent's program until the exec: samples taken
//! before it (the work between fork and exec, the exec itself) are named from the
//! parent's mappings ([`Lineage::parent_before_exec`]); the drain marks them as
//! they arrive ([`Lineage::runs_forked_program`]), since the lineage it keeps is
//! applied in the ring's order.
//!
//! Bounded: [`MAX_LINEAGE_ENTRIES`]; when full the oldest entry is forgotten (its
//! children then stay unnamed if they exit early, never misnamed) and counted.

use std::collections::{HashMap, VecDeque};

/// Processes remembered: 8 192 x (~56 bytes in the map + up to 2 x 16 bytes of
/// order) is ~0.7 MiB at most. A fork storm of 1 000 processes a second keeps ~8 s
/// of them, many times the capture worker's delay.
pub const MAX_LINEAGE_ENTRIES: usize = 8192;

/// How far up the tree a gone process looks for a living (or captured) ancestor.
pub const MAX_ANCESTORS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Entry {
    incarnation: u64,
    /// The parent and its incarnation at the fork; `None` after an exec.
    parent: Option<(u32, u64)>,
    /// After the first exec that followed a fork: that fork's parent and its
    /// incarnation, whose program the process ran until the exec.
    before_exec: Option<(u32, u64)>,
}

/// What the fork and exec events said, for [`Lineage::parent_of`].
#[derive(Debug, Default)]
pub struct Lineage {
    entries: HashMap<u32, Entry>,
    /// (pid, incarnation) in the order entries were written: the oldest is
    /// forgotten first. Entries overwritten since are stale here and skipped.
    order: VecDeque<(u32, u64)>,
    next: u64,
    /// Entries forgotten to stay within the bound.
    pub forgotten: u64,
}

/// A change of the process tree, from one event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessChange {
    /// `pid` was forked by `parent` (both tgids).
    Forked { pid: u32, parent: u32 },
    /// `pid` exec'd a new program.
    Execed { pid: u32 },
}

impl Lineage {
    pub fn apply(&mut self, change: ProcessChange) {
        match change {
            ProcessChange::Forked { pid, parent } => {
                let parent = Some((parent, self.incarnation(parent)));
                self.write(pid, parent, None);
            }
            ProcessChange::Execed { pid } => {
                let before_exec = self.entries.get(&pid).and_then(|e| e.parent);
                self.write(pid, None, before_exec);
            }
        }
    }

    /// The process whose mappings `pid` shares: its parent, if `pid` was forked
    /// without an exec and the parent still runs the program it forked from.
    pub fn parent_of(&self, pid: u32) -> Option<u32> {
        let (parent, incarnation) = self.entries.get(&pid)?.parent?;
        (self.incarnation(parent) == incarnation).then_some(parent)
    }

    /// True if `pid` was forked (while we watched) and has not exec'd since: it
    /// still runs the program it was forked with.
    pub fn runs_forked_program(&self, pid: u32) -> bool {
        self.entries.get(&pid).is_some_and(|e| e.parent.is_some())
    }

    /// The process whose program `pid` ran before its exec: the parent it was
    /// forked from, if `pid` exec'd right after that fork and the parent still runs
    /// the program it forked from.
    pub fn parent_before_exec(&self, pid: u32) -> Option<u32> {
        let (parent, incarnation) = self.entries.get(&pid)?.before_exec?;
        (self.incarnation(parent) == incarnation).then_some(parent)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn incarnation(&self, pid: u32) -> u64 {
        self.entries.get(&pid).map_or(0, |e| e.incarnation)
    }

    fn write(&mut self, pid: u32, parent: Option<(u32, u64)>, before_exec: Option<(u32, u64)>) {
        self.next += 1;
        let incarnation = self.next;
        self.entries.insert(
            pid,
            Entry {
                incarnation,
                parent,
                before_exec,
            },
        );
        self.order.push_back((pid, incarnation));
        while self.entries.len() > MAX_LINEAGE_ENTRIES || self.order.len() > 2 * MAX_LINEAGE_ENTRIES
        {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&old).is_some_and(|e| e.incarnation == at) {
                self.entries.remove(&old);
                self.forgotten += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forked(l: &mut Lineage, pid: u32, parent: u32) {
        l.apply(ProcessChange::Forked { pid, parent });
    }

    /// A forked child names from its parent, a grandchild from its own parent.
    #[test]
    fn forked_children_know_their_parent() {
        let mut l = Lineage::default();
        forked(&mut l, 20, 10);
        forked(&mut l, 30, 20);
        assert_eq!(l.parent_of(20), Some(10));
        assert_eq!(l.parent_of(30), Some(20));
        assert_eq!(l.parent_of(10), None);
    }

    /// A child that exec'd runs a program of its own.
    #[test]
    fn exec_ends_sharing() {
        let mut l = Lineage::default();
        forked(&mut l, 20, 10);
        l.apply(ProcessChange::Execed { pid: 20 });
        assert_eq!(l.parent_of(20), None);
    }

    /// A child that exec'd right after its fork ran its parent's program until
    /// then; one that exec'd twice, or was not seen forked, has no such parent.
    #[test]
    fn exec_after_fork_remembers_the_parent_before_it() {
        let mut l = Lineage::default();
        forked(&mut l, 20, 10);
        assert!(l.runs_forked_program(20));
        assert!(!l.runs_forked_program(10), "not seen forked");
        assert_eq!(l.parent_before_exec(20), None, "not exec'd yet");
        l.apply(ProcessChange::Execed { pid: 20 });
        assert!(!l.runs_forked_program(20));
        assert_eq!(l.parent_before_exec(20), Some(10));
        l.apply(ProcessChange::Execed { pid: 20 });
        assert_eq!(l.parent_before_exec(20), None, "its second program");

        l.apply(ProcessChange::Execed { pid: 30 });
        assert_eq!(l.parent_before_exec(30), None, "forked before we watched");

        forked(&mut l, 21, 11);
        l.apply(ProcessChange::Execed { pid: 21 });
        l.apply(ProcessChange::Execed { pid: 11 });
        assert_eq!(l.parent_before_exec(21), None, "the parent exec'd since");
    }

    /// A parent that exec'd after the fork, or whose pid was reused by a new
    /// process, no longer has the child's mappings; one that exec'd before the
    /// fork has them.
    #[test]
    fn parent_that_changed_since_the_fork_is_not_used() {
        let mut l = Lineage::default();
        forked(&mut l, 20, 10);
        l.apply(ProcessChange::Execed { pid: 10 });
        assert_eq!(l.parent_of(20), None);

        forked(&mut l, 21, 11);
        forked(&mut l, 11, 1); // pid 11 reused
        assert_eq!(l.parent_of(21), None);

        l.apply(ProcessChange::Execed { pid: 12 });
        forked(&mut l, 22, 12);
        assert_eq!(l.parent_of(22), Some(12));
    }

    /// The oldest entries are forgotten past the bound, and counted; a child whose
    /// parent's entry was forgotten is not named from whatever now has that pid.
    #[test]
    fn bounded_oldest_first() {
        let mut l = Lineage::default();
        l.apply(ProcessChange::Execed { pid: 1 });
        forked(&mut l, 2, 1);
        for pid in 100..100 + MAX_LINEAGE_ENTRIES as u32 - 1 {
            forked(&mut l, pid, 99);
        }
        assert_eq!(l.len(), MAX_LINEAGE_ENTRIES);
        assert_eq!(l.forgotten, 1);
        assert_eq!(l.parent_of(2), None, "its parent's entry went first");
        // Rewriting one pid over and over leaves the order queue bounded too.
        for _ in 0..4 * MAX_LINEAGE_ENTRIES {
            forked(&mut l, 7, 99);
        }
        assert!(l.order.len() <= 2 * MAX_LINEAGE_ENTRIES);
        assert_eq!(l.parent_of(7), Some(99));
    }
}
