//! The supervisor's counters: atomics any thread may read, and a plain snapshot.

use std::sync::atomic::{AtomicU64, Ordering};

use super::Refused;

/// Counters of the supervisor, readable at any time. Every started run ends in
/// exactly one of `succeeded`, `failed`, `timed_out` and `cancelled`, so
/// `started == succeeded + failed + timed_out + cancelled + live`.
#[derive(Debug, Default)]
pub struct SupervisorStats {
    pub started: AtomicU64,
    /// Exited 0 before the deadline.
    pub succeeded: AtomicU64,
    /// Exited non-zero or died of a signal before the deadline.
    pub failed: AtomicU64,
    /// Hit the deadline.
    pub timed_out: AtomicU64,
    /// Ended by shutdown or abandoned with the runtime.
    pub cancelled: AtomicU64,
    /// Needed SIGKILL: ignored SIGTERM for the whole grace (or abandoned).
    pub killed: AtomicU64,
    pub refused_at_capacity: AtomicU64,
    pub refused_busy: AtomicU64,
    pub refused_backing_off: AtomicU64,
    pub refused_missing_tool: AtomicU64,
    pub refused_shutting_down: AtomicU64,
    pub refused_spawn: AtomicU64,
    /// Failing keys forgotten because the history was full ([`MAX_KEY_HISTORY`](super::MAX_KEY_HISTORY)).
    pub keys_evicted: AtomicU64,
    /// Children alive now (a gauge).
    pub live: AtomicU64,
    /// Descendants of children that outlived them outside their group, killed by
    /// a sweep (see `orphans.rs`; only where orphans are adopted).
    pub orphans_killed: AtomicU64,
    /// Such descendants reaped.
    pub orphans_reaped: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    pub killed: u64,
    pub refused_at_capacity: u64,
    pub refused_busy: u64,
    pub refused_backing_off: u64,
    pub refused_missing_tool: u64,
    pub refused_shutting_down: u64,
    pub refused_spawn: u64,
    pub keys_evicted: u64,
    pub live: u64,
    pub orphans_killed: u64,
    pub orphans_reaped: u64,
}

impl SupervisorStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            started: g(&self.started),
            succeeded: g(&self.succeeded),
            failed: g(&self.failed),
            timed_out: g(&self.timed_out),
            cancelled: g(&self.cancelled),
            killed: g(&self.killed),
            refused_at_capacity: g(&self.refused_at_capacity),
            refused_busy: g(&self.refused_busy),
            refused_backing_off: g(&self.refused_backing_off),
            refused_missing_tool: g(&self.refused_missing_tool),
            refused_shutting_down: g(&self.refused_shutting_down),
            refused_spawn: g(&self.refused_spawn),
            keys_evicted: g(&self.keys_evicted),
            live: g(&self.live),
            orphans_killed: g(&self.orphans_killed),
            orphans_reaped: g(&self.orphans_reaped),
        }
    }

    pub(super) fn add_swept(&self, swept: super::orphans::Swept) {
        self.orphans_killed
            .fetch_add(swept.killed, Ordering::Relaxed);
        self.orphans_reaped
            .fetch_add(swept.reaped, Ordering::Relaxed);
    }

    pub(super) fn refusal(&self, refused: &Refused) -> &AtomicU64 {
        match refused {
            Refused::AtCapacity => &self.refused_at_capacity,
            Refused::Busy => &self.refused_busy,
            Refused::BackingOff { .. } => &self.refused_backing_off,
            Refused::MissingTool { .. } => &self.refused_missing_tool,
            Refused::ShuttingDown => &self.refused_shutting_down,
            Refused::Spawn(_) => &self.refused_spawn,
        }
    }
}
