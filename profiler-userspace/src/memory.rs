//! The allocator's part of bounded memory: what the profiler frees goes back to the
//! system instead of staying resident as free heap (glibc; with another allocator
//! these are no-ops).
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
