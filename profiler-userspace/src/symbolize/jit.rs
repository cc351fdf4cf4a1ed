//! JIT frames: user addresses in anonymous executable memory (a JVM's code cache,
//! V8's code space) named from the `/tmp/perf-PID.map` the runtime writes (Node with
//! `--perf-basic-prof`; a JVM when jattach asks it, see [`crate::runtime_profilers`]).
//!
//! Runs between address resolution and naming: every unnamed user frame of a process
//! that has a perf map is looked up in it. The map is scanned (safely, see
//! [`crate::runtimes::perfmap`]), never held: the memory is one read buffer and the
//! names of this interval's addresses, whatever the size of the file (of which at
//! most [`MAX_PERF_MAP_BYTES`] are read).
//!
//! [`MAX_PERF_MAP_BYTES`]: crate::runtimes::perfmap::MAX_PERF_MAP_BYTES

use std::{collections::HashMap, sync::Arc};

use super::{FrameRef, Reason};
use crate::{
    profile::FrameKind,
    runtimes::{
        detect::{detect, has_perf_map},
        perfmap::{lookup_perf_map, PerfMapError},
        Runtime,
    },
};

/// What naming JIT frames did in one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitCounts {
    /// Frames named from a perf map.
    pub named: u64,
    /// Processes whose perf map was read.
    pub maps_read: u64,
    /// Perf map lines skipped as malformed, over all maps read.
    pub malformed_lines: u64,
    /// Perf maps refused (symlink, wrong owner, not a regular file) or unreadable.
    pub maps_refused: u64,
}

/// The frame kind of JIT code in a process of `runtime`.
fn kind_of(runtime: Option<Runtime>) -> FrameKind {
    match runtime {
        Some(Runtime::Java) => FrameKind::Java,
        Some(Runtime::Node) => FrameKind::JavaScript,
        // Another JIT that writes a perf map (LuaJIT, .NET): named, kind unknown.
        _ => FrameKind::Native,
    }
}

/// Names the frames of `refs` (one list per stack, `tgids[i]` the process of stack
/// `i`) that are in anonymous or unmapped memory, from each process's perf map.
pub(super) fn name_jit_frames(refs: &mut [Vec<FrameRef>], tgids: &[u32]) -> JitCounts {
    let mut counts = JitCounts::default();
    // Stack indices per process with at least one candidate frame.
    let mut by_pid: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, frames) in refs.iter().enumerate() {
        let candidate = frames.iter().any(|f| {
            matches!(
                f,
                FrameRef::Unknown {
                    reason: Reason::Anonymous | Reason::Unmapped,
                    ..
                }
            )
        });
        if candidate && tgids[i] != 0 {
            by_pid.entry(tgids[i]).or_default().push(i);
        }
    }
    for (pid, stacks) in by_pid {
        // A process that exited, or has no perf map, keeps its frames unknown. Most
        // candidates are native code whose frame-pointer walk ran into garbage: the
        // cheap look for a map spares them reading their mappings every interval.
        if !has_perf_map(pid) {
            continue;
        }
        let Ok(target) = detect(pid) else { continue };
        let addrs: Vec<u64> = stacks
            .iter()
            .flat_map(|&i| refs[i].iter())
            .filter_map(|frame| match *frame {
                FrameRef::Unknown {
                    ip,
                    reason: Reason::Anonymous | Reason::Unmapped,
                    ..
                } => Some(ip),
                _ => None,
            })
            .collect();
        let names = match lookup_perf_map(&target, &addrs) {
            Ok(names) => names,
            Err(PerfMapError::NotFound { .. }) | Err(PerfMapError::Gone { .. }) => continue,
            Err(_) => {
                counts.maps_refused += 1;
                continue;
            }
        };
        counts.maps_read += 1;
        counts.malformed_lines += names.stats().malformed_lines;
        let kind = kind_of(target.runtime);
        // One shared name per address, however many stacks hold it.
        let mut shared: HashMap<u64, Option<Arc<str>>> = HashMap::new();
        for i in stacks {
            for frame in &mut refs[i] {
                let FrameRef::Unknown {
                    ip,
                    reason: Reason::Anonymous | Reason::Unmapped,
                    ..
                } = *frame
                else {
                    continue;
                };
                let name = shared
                    .entry(ip)
                    .or_insert_with(|| names.get(ip).map(Arc::from))
                    .clone();
                if let Some(name) = name {
                    counts.named += 1;
                    *frame = FrameRef::Jit {
                        pid,
                        ip,
                        name,
                        kind,
                    };
                }
            }
        }
    }
    counts
}
