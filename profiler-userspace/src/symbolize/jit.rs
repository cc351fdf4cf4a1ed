//! JIT frames: user addresses in anonymous executable memory (a JVM's code cache,
//! V8's code space) named from the `/tmp/perf-PID.map` the runtime writes (Node with
//! `--perf-basic-prof`; a JVM when jattach asks it, see [`crate::runtime_profilers`]).
//!
//! Runs between address resolution and naming: every unnamed user frame of a process
//! that has a perf map is looked up in it. The map is scanned (safely, see
//! [`crate::runtimes::perfmap`]), never held: what is kept is the names of the
//! addresses seen, per process, while its map does not change (same size, time and
//! inode), so a process whose JIT is at rest costs one stat per interval. Bounded by
//! [`MAX_JIT_PROCESSES`] and [`MAX_JIT_NAMES_PER_PROCESS`]; the file read is at most
//! [`MAX_PERF_MAP_BYTES`].
//!
//! [`MAX_PERF_MAP_BYTES`]: crate::runtimes::perfmap::MAX_PERF_MAP_BYTES

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    sync::Arc,
};

use super::{FrameRef, Reason};
use crate::{
    profile::FrameKind,
    runtimes::{
        detect::{detect, perf_map_of, TargetProcess},
        perfmap::{lookup_perf_map, FileStamp, PerfMapError},
        Runtime,
    },
};

/// What naming JIT frames did in one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitCounts {
    /// Distinct frames (process, address) named from a perf map.
    pub named: u64,
    /// Processes whose perf map was read.
    pub maps_read: u64,
    /// Perf map lines skipped as malformed, over all maps read.
    pub malformed_lines: u64,
    /// Perf maps refused (symlink, wrong owner, hard link, not a regular file, last
    /// written before the process started) or unreadable.
    pub maps_refused: u64,
    /// Processes whose frames were all named from names kept since an earlier
    /// interval (their map had not changed): no read.
    pub maps_unchanged: u64,
    /// Processes forgotten to stay within `MAX_JIT_PROCESSES`, and processes whose
    /// names were dropped past `MAX_JIT_NAMES_PER_PROCESS`.
    pub forgotten: u64,
}

/// Processes whose perf-map names are kept between intervals (16); past it the one
/// used longest ago is forgotten (counted).
pub const MAX_JIT_PROCESSES: usize = 16;
/// Addresses whose names are kept per process between intervals (2 048); past it
/// that process's names are dropped after the interval and read again (counted).
/// With [`MAX_JIT_PROCESSES`]: at most 32 768 entries, ~170 bytes each with a
/// Node-sized name (~85 bytes): 5.4 MiB measured.
pub const MAX_JIT_NAMES_PER_PROCESS: usize = 2048;

/// Names kept for one process while its perf map stays the same.
struct Kept {
    stamp: FileStamp,
    target: TargetProcess,
    names: HashMap<u64, Option<Arc<str>>>,
    used: u64,
}

/// Names JIT frames from perf maps, keeping what it read while the maps do not change.
#[derive(Default)]
pub(super) struct JitNamer {
    kept: HashMap<u32, Kept>,
    interval: u64,
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

/// Slack for comparing a file's mtime with a process start time known to a clock
/// tick and a boot time known to a second.
const START_TIME_SLACK_NS: i128 = 2_000_000_000;

/// Whether the perf map was last written before its process started: a previous
/// process's with the same pid (Node never deletes its map), whose addresses mean
/// nothing in this one. Unknown times give false.
fn written_before_start(stamp: &FileStamp, target: &TargetProcess) -> bool {
    let (Ok(boot_secs), ticks) = (procfs::boot_time_secs(), procfs::ticks_per_second()) else {
        return false;
    };
    if ticks == 0 {
        return false;
    }
    let started_ns = i128::from(boot_secs) * 1_000_000_000
        + i128::from(target.start_time) * 1_000_000_000 / i128::from(ticks);
    stamp.mtime_ns < started_ns - START_TIME_SLACK_NS
}

impl JitNamer {
    /// Names the frames of `refs` (an interval's distinct frames, `pids[i]` the
    /// process of frame `i`) that are in anonymous or unmapped memory, from each
    /// process's perf map.
    pub(super) fn name_frames(&mut self, refs: &mut [FrameRef], pids: &[u32]) -> JitCounts {
        self.interval += 1;
        let mut counts = JitCounts::default();
        // Indices of the candidate frames, per process.
        let mut by_pid: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, frame) in refs.iter().enumerate() {
            if candidate(frame).is_some() && pids[i] != 0 {
                by_pid.entry(pids[i]).or_default().push(i);
            }
        }
        for (pid, frames) in by_pid {
            // A process without a perf map keeps its frames unknown. Most candidates
            // are native code whose frame-pointer walk ran into garbage: one stat
            // tells, without reading their mappings. A map refused from its name
            // (another owner, a hard link, not a regular file) is counted and costs
            // nothing more: no detection, no read.
            let stamp = match perf_map_of(pid) {
                Ok(Some(stamp)) => stamp,
                Ok(None) => {
                    self.kept.remove(&pid);
                    continue;
                }
                Err(e) => {
                    if refused(&e) {
                        counts.maps_refused += 1;
                    }
                    self.kept.remove(&pid);
                    continue;
                }
            };
            if self.kept.get(&pid).is_some_and(|k| k.stamp != stamp) {
                self.kept.remove(&pid);
            }
            let kept = match self.kept.entry(pid) {
                Entry::Occupied(kept) => kept.into_mut(),
                Entry::Vacant(slot) => {
                    let Ok(target) = detect(pid) else { continue };
                    if written_before_start(&stamp, &target) {
                        // Checked once per stamp: a rewrite makes a new one.
                        counts.maps_refused += 1;
                        continue;
                    }
                    slot.insert(Kept {
                        stamp,
                        target,
                        names: HashMap::new(),
                        used: 0,
                    })
                }
            };
            kept.used = self.interval;
            let missing: HashSet<u64> = frames
                .iter()
                .filter_map(|&i| candidate(&refs[i]))
                .filter(|ip| !kept.names.contains_key(ip))
                .collect();
            if missing.is_empty() {
                counts.maps_unchanged += 1;
            } else {
                let addrs: Vec<u64> = missing.into_iter().collect();
                let names = match lookup_perf_map(&kept.target, &addrs) {
                    Ok(names) => names,
                    Err(e) => {
                        if refused(&e) {
                            counts.maps_refused += 1;
                        }
                        self.kept.remove(&pid);
                        continue;
                    }
                };
                counts.maps_read += 1;
                counts.malformed_lines += names.stats().malformed_lines;
                for ip in addrs {
                    kept.names.insert(ip, names.get(ip).map(Arc::from));
                }
            }
            let kind = kind_of(kept.target.runtime);
            for &i in &frames {
                let frame = &mut refs[i];
                let Some(ip) = candidate(frame) else { continue };
                let Some(Some(name)) = kept.names.get(&ip) else {
                    continue;
                };
                counts.named += 1;
                *frame = FrameRef::Jit {
                    pid,
                    ip,
                    name: name.clone(),
                    kind,
                };
            }
            // This interval's addresses were all named; past the bound, the next
            // interval reads them again.
            if kept.names.len() > MAX_JIT_NAMES_PER_PROCESS {
                kept.names.clear();
                counts.forgotten += 1;
            }
        }
        while self.kept.len() > MAX_JIT_PROCESSES {
            let oldest = self
                .kept
                .iter()
                .min_by_key(|(_, k)| k.used)
                .map(|(&pid, _)| pid)
                .expect("not empty");
            self.kept.remove(&oldest);
            counts.forgotten += 1;
        }
        counts
    }
}

/// Whether `e` refused a map (or failed to read one), rather than found none.
fn refused(e: &PerfMapError) -> bool {
    !matches!(e, PerfMapError::NotFound { .. } | PerfMapError::Gone { .. })
}

/// The address of a frame that may be JIT code: unnamed, in anonymous memory or in
/// no mapping.
fn candidate(frame: &FrameRef) -> Option<u64> {
    match *frame {
        FrameRef::Unknown {
            ip,
            reason: Reason::Anonymous | Reason::Unmapped,
            ..
        } => Some(ip),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn unknown(ip: u64) -> FrameRef {
        FrameRef::Unknown {
            module: "[anon]".into(),
            offset: 0,
            ip,
            reason: Reason::Anonymous,
        }
    }

    fn names(refs: &[FrameRef]) -> Vec<Option<String>> {
        refs.iter()
            .map(|f| match f {
                FrameRef::Jit { name, .. } => Some(name.to_string()),
                _ => None,
            })
            .collect()
    }

    /// A `sleep` with a perf map; both go away on drop.
    struct WithMap {
        child: Child,
        path: String,
    }

    impl WithMap {
        fn new(text: &str) -> WithMap {
            let child = Command::new("sleep").arg("30").spawn().unwrap();
            let path = format!("/tmp/perf-{}.map", child.id());
            std::fs::write(&path, text).unwrap();
            WithMap { child, path }
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for WithMap {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    const A: u64 = 0x7f00_0000_1010;
    const NOT_IN_MAP: u64 = 0x7f00_0000_5000;

    /// Names come from the map; while it is unchanged the next interval reads
    /// nothing; a line appended over a known address is seen.
    #[test]
    fn keeps_names_while_the_map_is_unchanged() {
        let target = WithMap::new("7f0000001000 100 first\n");
        let mut namer = JitNamer::default();
        let mut interval = || {
            let mut refs = vec![unknown(A), unknown(NOT_IN_MAP)];
            let counts = namer.name_frames(&mut refs, &[target.pid(); 2]);
            (names(&refs), counts)
        };
        let (named, first) = interval();
        assert_eq!(named, [Some("first".to_string()), None]);
        assert_eq!(
            (first.maps_read, first.named, first.maps_unchanged),
            (1, 1, 0)
        );
        let (named, second) = interval();
        assert_eq!(named, [Some("first".to_string()), None]);
        assert_eq!((second.maps_read, second.maps_unchanged), (0, 1));

        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&target.path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"7f0000001000 100 second\n").unwrap();
        let (named, third) = interval();
        assert_eq!(named, [Some("second".to_string()), None]);
        assert_eq!(third.maps_read, 1);
    }

    /// A map owned by another uid than its process (planted: anyone may create
    /// `/tmp/perf-PID.map`) is refused from its stamp each interval, counted, and
    /// neither read nor kept.
    #[test]
    fn planted_map_is_refused_without_a_read() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown needs root");
            return;
        }
        let target = WithMap::new("7f0000001000 100 planted\n");
        std::os::unix::fs::chown(&target.path, Some(65534), None).unwrap();
        let mut namer = JitNamer::default();
        for _ in 0..2 {
            let mut refs = vec![unknown(A)];
            let counts = namer.name_frames(&mut refs, &[target.pid()]);
            assert_eq!(names(&refs), [None]);
            assert_eq!(
                (counts.maps_refused, counts.maps_read, counts.named),
                (1, 0, 0)
            );
            assert!(namer.kept.is_empty());
        }
    }

    /// A map with a second link (which may be another user's file, though owned by
    /// the process's uid) names nothing and is counted as refused.
    #[test]
    fn hard_linked_map_names_nothing() {
        let target = WithMap::new("7f0000001000 100 linked\n");
        let other = format!("{}.link", target.path);
        std::fs::hard_link(&target.path, &other).unwrap();
        let mut namer = JitNamer::default();
        let mut refs = vec![unknown(A)];
        let counts = namer.name_frames(&mut refs, &[target.pid()]);
        std::fs::remove_file(&other).unwrap();
        assert_eq!(names(&refs), [None]);
        assert_eq!((counts.maps_refused, counts.named), (1, 0));
    }

    /// One process past MAX_JIT_PROCESSES forgets the one used longest ago.
    #[test]
    fn keeps_at_most_max_processes() {
        let targets: Vec<WithMap> = (0..=MAX_JIT_PROCESSES)
            .map(|_| WithMap::new("7f0000001000 100 f\n"))
            .collect();
        let mut namer = JitNamer::default();
        let mut refs: Vec<FrameRef> = targets.iter().map(|_| unknown(A)).collect();
        let pids: Vec<u32> = targets.iter().map(WithMap::pid).collect();
        let counts = namer.name_frames(&mut refs, &pids);
        assert_eq!(counts.named, MAX_JIT_PROCESSES as u64 + 1);
        assert_eq!(counts.forgotten, 1);
        assert_eq!(namer.kept.len(), MAX_JIT_PROCESSES);
    }

    /// More addresses than MAX_JIT_NAMES_PER_PROCESS are all named this interval, and
    /// not kept for the next.
    #[test]
    fn keeps_at_most_max_names_per_process() {
        let target = WithMap::new("7f0000000000 100000 big\n");
        let mut namer = JitNamer::default();
        let frames: Vec<FrameRef> = (0..=MAX_JIT_NAMES_PER_PROCESS as u64)
            .map(|i| unknown(0x7f00_0000_0000 + i * 16))
            .collect();
        let pids = vec![target.pid(); frames.len()];
        let mut refs = frames;
        let counts = namer.name_frames(&mut refs, &pids);
        assert_eq!(counts.named, MAX_JIT_NAMES_PER_PROCESS as u64 + 1);
        assert_eq!(counts.forgotten, 1);
        assert!(namer.kept[&target.pid()].names.is_empty());
    }
}
