//! Bounded memory at run time: the agent's memory budget, and the allocator's part
//! (what the profiler frees goes back to the system instead of staying resident as
//! free heap).
//!
//! ## The budget
//!
//! Most of the agent's memory is bounded by fixed constants (stacks per interval,
//! tracked processes, caches; ARCHITECTURE.md lists them with their cost). One part
//! grows with time instead: the export queue, while the backend is down. The budget
//! ([`MemoryBudget`], `--memory-budget-mib`) sheds load there: after each cycle the
//! agent reads the peak RSS of that cycle ([`ProcessMemory`], with the peak reset at
//! the cycle's start by [`reset_peak`]), takes the export queue out of it, and gives
//! the queue only what the largest of the last [`PEAK_WINDOW_CYCLES`] such peaks
//! leaves of the budget. So an agent whose intervals are small keeps its whole
//! queue (`--queue-kib`), and one at its stack bounds keeps fewer profiles through
//! an outage instead of going over the budget. Measured with bench/stack_bound.py
//! (every interval at its bounds, endpoint down, default 64 MiB budget on 2 CPUs):
//! peak RSS 63.8 MiB with the queue held to 10.2 MiB; 80.1 MiB with 18.3 MiB queued
//! before the budget (and ~82 MiB projected with the queue full).
//!
//! ## The allocator (glibc; with another allocator these are no-ops)
//!
//! - Arenas: by default every thread that allocates may get an arena of its own (up
//!   to 8 per CPU), and memory freed in one is not reused by the others: the agent's
//!   handful of threads (drain, capture, cycle, exporter, blocking pool) each kept
//!   their own high-water mark. [`MALLOC_ARENAS`] caps them.
//! - Large blocks: glibc maps a block of `M_MMAP_THRESHOLD` (128 KiB at first) or
//!   more on its own, but raises that threshold each time such a block is freed, up
//!   to 32 MiB. The agent's periodic large allocations (the kernel's symbol table,
//!   ~4.5 MB, read again every 40 cycles; blazesym's parsed files, dropped as often)
//!   then land in a heap after their first round, and the holes they leave stay
//!   resident. [`MMAP_THRESHOLD`] fixes the threshold.
//! - Free pages in the middle of a heap stay resident until `malloc_trim`, which
//!   the agent calls after every cycle ([`release_free_memory`]).
//!
//! Measured with bench/agent_outage.py, 30 minutes of outage at the defaults with a
//! 4 MiB queue (full after 13 minutes), before the last two: the agent's anonymous
//! memory rose by ~2.8 MiB at every 40-cycle reload and by nothing between them
//! (README has the figures after).

use std::{collections::VecDeque, io};

/// Default `--memory-budget-mib`, apart from the ring buffer: the budget is this
/// plus the RSS of the kernel's ring buffer as the reader maps it
/// ([`default_budget`]), 64 MiB on 2 CPUs, the agent's RSS target there. Without a
/// backend or with intervals far from their stack bounds the agent stays well under
/// it (~35-40 MiB measured, README); the budget matters at the bounds during an
/// outage. The ring buffer grows with the CPUs (512 KiB each, rounded up to a power
/// of two, shown twice in RSS:
/// 64 MiB of RSS on 64 CPUs), so a fixed default would leave big hosts no queue.
pub const DEFAULT_MEMORY_BUDGET_BEYOND_RING: u64 = 62 << 20;

/// The default budget for a ring buffer of `ring_bytes`: mapped twice by the
/// reader, it counts twice in RSS.
pub const fn default_budget(ring_bytes: u64) -> u64 {
    DEFAULT_MEMORY_BUDGET_BEYOND_RING + 2 * ring_bytes
}

/// Cycles whose peak RSS the budget remembers: the queue's room follows the
/// largest, so one small interval after large ones does not let the queue grow
/// into the room the next large one needs. 8 cycles are 2 minutes at the default
/// interval. Memory: 8 integers.
pub const PEAK_WINDOW_CYCLES: usize = 8;

/// The agent's own memory, from `/proc/self/status`, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident set (VmRSS).
    pub rss: u64,
    /// Largest resident set since start or since the last [`reset_peak`] (VmHWM).
    pub peak: u64,
}

impl ProcessMemory {
    pub fn read() -> io::Result<ProcessMemory> {
        let status = procfs::process::Process::myself()
            .and_then(|me| me.status())
            .map_err(io::Error::other)?;
        match (status.vmrss, status.vmhwm) {
            (Some(rss), Some(peak)) => Ok(ProcessMemory {
                rss: rss << 10,
                peak: peak << 10,
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "/proc/self/status has no VmRSS or VmHWM line",
            )),
        }
    }
}

/// Resets the kernel's record of this process's peak RSS (VmHWM) to its current
/// RSS (`/proc/self/clear_refs`, Linux 4.0+), so the next [`ProcessMemory::read`]
/// gives the peak since now. Where that fails the peak stays the one since start:
/// larger, so the budget errs towards a smaller queue.
pub fn reset_peak() -> io::Result<()> {
    std::fs::write("/proc/self/clear_refs", b"5")
}

/// The budget's view of the agent: how much the cycles need, so how much the export
/// queue may hold.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    /// Peak RSS of the last [`PEAK_WINDOW_CYCLES`] cycles, export queue excluded.
    recent: VecDeque<u64>,
    /// The largest ever seen, for the stopped line.
    largest: u64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes; 0 turns it off (the queue keeps its own bound).
    pub fn new(limit: u64) -> MemoryBudget {
        MemoryBudget {
            limit,
            recent: VecDeque::with_capacity(PEAK_WINDOW_CYCLES),
            largest: 0,
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Records a cycle's peak RSS apart from the export queue.
    pub fn observe(&mut self, peak_without_queue: u64) {
        if self.recent.len() == PEAK_WINDOW_CYCLES {
            self.recent.pop_front();
        }
        self.recent.push_back(peak_without_queue);
        self.largest = self.largest.max(peak_without_queue);
    }

    /// What the cycles need: the largest recent peak without the queue.
    pub fn working_set(&self) -> u64 {
        self.recent.iter().copied().max().unwrap_or(0)
    }

    /// The largest cycle peak ever observed, export queue excluded.
    pub fn largest(&self) -> u64 {
        self.largest
    }

    /// Bytes the export queue may hold: what the cycles leave of the budget, at
    /// most `queue_bound` (`--queue-kib`); `queue_bound` when the budget is off.
    pub fn queue_room(&self, queue_bound: u64) -> u64 {
        if self.limit == 0 {
            return queue_bound;
        }
        self.limit
            .saturating_sub(self.working_set())
            .min(queue_bound)
    }

    /// The cycles alone need more than the budget.
    pub fn exceeded(&self) -> bool {
        self.limit != 0 && self.working_set() > self.limit
    }
}

/// glibc malloc arenas the process may use. Two cost nothing measurable in
/// contention at our allocation rate; they took the agent's peak RSS through
/// bench/agent_outage.py from 44.2 to 39.6 MiB, and through bench/churn.py from 43.8
/// to 39.6 MiB. An explicit `MALLOC_ARENA_MAX` in the environment wins.
pub const MALLOC_ARENAS: i32 = 2;

/// Allocations of this size or more get their own mapping, returned to the system
/// when freed. What the agent allocates per cycle that is this large (tables of an
/// interval's stacks, encoded requests, symbol tables) is short-lived or replaced
/// as a whole. An explicit `MALLOC_MMAP_THRESHOLD_` in the environment wins.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// Sets [`MALLOC_ARENAS`] and [`MMAP_THRESHOLD`]. Call first thing in `main`, before
/// any other thread exists.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only tunes malloc; no other thread exists yet.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) };
        }
    }
}

/// Gives the heaps' free pages back to the system (glibc's `malloc_trim`: a walk of
/// the free lists of each heap).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds as free.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own figures are there and plausible: a peak at least the RSS.
    #[test]
    fn own_memory_is_readable_and_the_peak_resets() {
        let before = ProcessMemory::read().expect("/proc/self/status");
        assert!(before.rss > 0 && before.peak >= before.rss, "{before:?}");
        // Touch 32 MiB, free it, and reset: the peak falls back near the RSS.
        let block = vec![1u8; 32 << 20];
        assert!(block.iter().step_by(4096).all(|&b| b == 1));
        let touched = ProcessMemory::read().expect("status").peak;
        drop(block);
        release_free_memory();
        reset_peak().expect("clear_refs");
        let after = ProcessMemory::read().expect("status");
        assert!(
            touched >= before.rss + (32 << 20) - (1 << 20),
            "{touched} vs {before:?}"
        );
        assert!(
            after.peak < touched,
            "peak {} not reset below {touched}",
            after.peak
        );
    }

    /// The queue gets what the largest recent cycle leaves of the budget, never more
    /// than its own bound; an old large cycle stops counting once out of the window.
    #[test]
    fn queue_room_follows_the_largest_recent_cycle() {
        const MIB: u64 = 1 << 20;
        let mut budget = MemoryBudget::new(64 * MIB);
        assert_eq!(budget.queue_room(20 * MIB), 20 * MIB, "no cycle yet");
        budget.observe(40 * MIB);
        assert_eq!(budget.queue_room(20 * MIB), 20 * MIB);
        budget.observe(58 * MIB);
        assert_eq!(budget.queue_room(20 * MIB), 6 * MIB);
        for _ in 1..PEAK_WINDOW_CYCLES {
            budget.observe(40 * MIB);
            assert_eq!(budget.queue_room(20 * MIB), 6 * MIB);
        }
        budget.observe(40 * MIB);
        assert_eq!(
            budget.queue_room(20 * MIB),
            20 * MIB,
            "the large cycle left the window"
        );
        budget.observe(70 * MIB);
        assert!(budget.exceeded());
        assert_eq!(budget.queue_room(20 * MIB), 0);
        assert_eq!(budget.largest(), 70 * MIB);
        assert_eq!(MemoryBudget::new(0).queue_room(20 * MIB), 20 * MIB, "off");
    }

    /// The default is 64 MiB with the 1 MiB ring of a 2-CPU host, and grows by the
    /// ring's double mapping on larger hosts.
    #[test]
    fn default_budget_follows_the_ring_buffer() {
        let ring = |cpus| u64::from(profiler_common::ring_buffer_bytes(cpus));
        assert_eq!(default_budget(ring(2)), 64 << 20);
        assert_eq!(default_budget(ring(64)), (62 + 64) << 20);
    }
}
