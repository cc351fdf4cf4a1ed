//! Stage 3b: process metadata, captured on first sight so that a process that exits
//! before symbolization still gets names.
//!
//! When the drain sees a new tgid it asks the capture worker (one thread, fed by a
//! bounded queue) to read `/proc/PID/{comm,exe,maps}` and to open every executable
//! file the process maps, through `/proc/PID/map_files` (which works for deleted files
//! and files in other mount namespaces). The open file descriptors keep the binaries
//! readable after the process is gone.
//!
//! A process that exited before the worker got to it, but was forked without an
//! exec, is named from its parent's mappings, which it shared ([`crate::lineage`]).
//! One that exec'd is named from the mappings the eBPF program read for its samples
//! while it was young ([`YoungMapping`]): each file found among the binaries held
//! open for other processes (by device and inode), or at the path its exec event
//! gave, names its frames.
//!
//! Bounded: [`MAX_TRACKED_PROCESSES`] processes, [`MAX_OPEN_OBJECTS`] open binaries
//! (deduplicated by device and inode), [`CAPTURE_QUEUE`] pending captures,
//! [`MAX_KERNEL_MAPPED`] processes known only from the kernel's mappings. What does
//! not fit is counted and symbolized later from /proc if the process is still alive.
//! Must never: block the drain (it only does a `try_send`).

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::Write as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, Receiver, SyncSender, TrySendError},
        Arc, Mutex, Weak,
    },
    thread::JoinHandle,
};

use procfs::process::{MMapPath, Process};
use profiler_common::{KernelMapping, TASK_COMM_LEN};

use crate::lineage::{Lineage, ProcessChange, MAX_ANCESTORS};

/// Processes whose metadata is kept: each costs ~200 bytes plus ~80 bytes per
/// executable mapping, so ~8 MiB at 8 192 processes with 10 mappings each, ~20 MiB
/// with 30.
pub const MAX_TRACKED_PROCESSES: usize = 8192;
/// Gone processes named from an ancestor, kept until the end of the cycle after the
/// one that found them gone (see [`ProcessTable::take_forgettable`]): 8 192
/// x ~24 bytes (pid and a shared reference to the ancestor's metadata) is ~200 KiB.
/// When full, such a process is named again from the lineage at symbolization.
pub const MAX_ALIASES: usize = 8192;
/// Open binaries (one file descriptor each, shared by every process mapping them).
pub const MAX_OPEN_OBJECTS: usize = 1024;
/// First sights (and young processes' mappings) waiting for the capture worker:
/// 1024 x 16 bytes, plus ~100 bytes per queued [`YoungMapping`]. When full, the
/// drain tries again on the process's next sample.
pub const CAPTURE_QUEUE: usize = 1024;
/// Processes known from the mappings the kernel read for their samples (see
/// [`YoungMapping`]), kept until captured, or like [`MAX_ALIASES`] until the cycle
/// after they are found gone: 2 048 x (~300 bytes of metadata + ~80 bytes per
/// mapping, at most [`MAX_KERNEL_MAPPINGS`]) is at most ~3.1 MiB, ~1.2 MiB for the
/// usual four mappings each. A churn of 160 exec'd processes a second, ~20 % of
/// them sampled, keeps ~1 000 over two 15 s intervals. When full, new ones are
/// counted and left out.
pub const MAX_KERNEL_MAPPED: usize = 2048;
/// Mappings kept per such process: as many as the eBPF program finds for one.
pub const MAX_KERNEL_MAPPINGS: usize = profiler_common::MAX_KNOWN_MAPPINGS;
/// How long a capture waits for another capture of the same process to end (1 s)
/// before it gives up ([`CaptureError::Busy`], counted): a capture stuck reading
/// /proc (the process's memory map locked) or a binary (a hung file system) then
/// costs each later one this wait, not the rest of its life.
pub const MAX_CAPTURE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Exec'd programs' paths the drain keeps for the mappings of the process that may
/// follow (most exec'd processes live long enough to be captured, and their paths
/// are never used): 1 024 x ~100 bytes; the oldest is dropped first.
pub const MAX_EXEC_PATHS: usize = 1024;

/// An executable file mapped by one or more processes, held open.
#[derive(Debug)]
pub struct ObjectFile {
    /// Device and inode: the identity used to share one open file between processes.
    pub dev: u64,
    pub ino: u64,
    /// The path the process mapped it from (as in /proc/PID/maps).
    pub path: String,
    /// GNU build id, if the file has one.
    pub build_id: Option<Vec<u8>>,
    /// File size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    file: File,
}

impl ObjectFile {
    /// Tells this file from another that later gets the same device and inode (a
    /// deploy that deleted it, freeing the inode, and wrote a new binary): what is
    /// cached about it by inode must not name the new one.
    pub fn version(&self) -> u64 {
        self.size.rotate_left(32) ^ self.mtime_ns as u64
    }

    /// A path through which blazesym (or anyone in this process) can read the file,
    /// even after the process that mapped it exited or the file was deleted.
    pub fn readable_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Last path component, for frames like `[unknown] libc.so.6+0x1234`.
    pub fn file_name(&self) -> &str {
        file_name(&self.path)
    }
}

fn file_name(path: &str) -> &str {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path)
}

/// What backs one executable mapping.
#[derive(Clone, Debug)]
pub enum MappedObject {
    /// A file we hold open.
    File(Arc<ObjectFile>),
    /// A file we could not open (or the object table was full); `reason` says why.
    Unopened { path: String, reason: &'static str },
    /// Anonymous executable memory (JIT code, trampolines): `[anon]`, `[heap]`, ...
    Anonymous(String),
}

impl MappedObject {
    /// Name for `[unknown] NAME+0xoff` frames.
    pub fn display_name(&self) -> &str {
        match self {
            MappedObject::File(o) => o.file_name(),
            MappedObject::Unopened { path, .. } => file_name(path),
            MappedObject::Anonymous(name) => name,
        }
    }
}

/// One executable mapping of a process.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub object: MappedObject,
}

impl Mapping {
    /// File offset of an address inside this mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// What we know about one process.
#[derive(Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Process name (`/proc/PID/comm` of the main thread).
    pub name: String,
    /// Path of the executable, if readable.
    pub exe: Option<String>,
    /// Executable mappings sorted by start address.
    pub mappings: Vec<Mapping>,
    /// Start time in clock ticks since boot: tells a reused pid from this process.
    pub start_time: u64,
    /// Device and inode of the executable when captured: an exec (which keeps pid
    /// and start time) changes them. `None` when unreadable (kernel threads).
    pub exe_id: Option<(u64, u64)>,
    /// Container id from the process's cgroup, when it runs in one.
    pub container_id: Option<String>,
}

impl ProcessInfo {
    /// The mapping containing `addr`.
    pub fn mapping(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        let m = self.mappings.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }
}

/// Why a process could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The process exited (or never was) before we looked.
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    /// /proc/PID was there but unreadable.
    #[error("cannot read /proc/{pid}: {source}")]
    Unreadable { pid: u32, source: procfs::ProcError },
    /// Another capture of the process was under way and did not end within
    /// [`MAX_CAPTURE_WAIT`] (its read of /proc or of a binary is stuck).
    #[error("process {pid} is being captured already, and that capture is stuck")]
    Busy { pid: u32 },
}

/// Counters of the process stage.
#[derive(Debug, Default)]
pub struct ProcessStats {
    /// Processes captured.
    pub captured: AtomicU64,
    /// Processes that exited before the worker got to them (and could not be
    /// named from a parent either).
    pub gone_before_capture: AtomicU64,
    /// Processes that exited before the worker got to them, named from the parent
    /// they were forked from without an exec.
    pub named_from_parent: AtomicU64,
    /// First sights dropped because the queue was full (retried on the next
    /// sample), and young mappings and execs not passed on for the same reason.
    pub queue_full: AtomicU64,
    /// Times a process was not tracked because the table was full (a process
    /// sampled on is counted again when next tried: once a cycle in the agent).
    pub table_full: AtomicU64,
    /// Mappings whose file was not held open because the object table was full.
    pub objects_full: AtomicU64,
    /// Processes that exited before the worker got to them, named from the
    /// mappings the kernel read for their samples (they exec'd, so no parent's
    /// would do).
    pub named_from_kernel: AtomicU64,
    /// Mappings from the kernel whose file no process we hold maps (its frames
    /// stay `[unknown]` if the process is gone).
    pub kernel_mappings_unopened: AtomicU64,
    /// Kernel mappings not kept because [`MAX_KERNEL_MAPPED`] processes were.
    pub kernel_mapped_full: AtomicU64,
    /// Processes whose samples from before their exec (in the program they were
    /// forked with) were named from their parent's mappings; once per process and
    /// interval.
    pub named_before_exec: AtomicU64,
    /// Captures given up because another capture of the same process did not end
    /// within [`MAX_CAPTURE_WAIT`].
    pub captures_stuck: AtomicU64,
}

/// A mapping the eBPF program found for a sample of a young process
/// (`profiler_common::MappingRecord`), on its way to the capture worker.
#[derive(Clone, Debug)]
pub struct YoungMapping {
    pub pid: u32,
    /// Name of the sampled thread, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
    pub mapping: KernelMapping,
    /// The program the process exec'd, if an exec event named it: opened to name
    /// the program's own frames when no other process maps it.
    pub exe_path: Option<String>,
}

/// What the drain hands the capture worker.
#[derive(Debug)]
pub enum CaptureRequest {
    /// A tgid seen for the first time: read its /proc entry.
    Capture(u32),
    /// What the kernel saw a young process map; boxed, so that the queue's slots
    /// stay small.
    Mapping(Box<YoungMapping>),
    /// The process exec'd: the mappings the kernel reported before were its old
    /// program's ([`ProcessTable::execed`]).
    Exec(u32),
}

/// All captured processes and the binaries they map.
pub struct ProcessTable {
    processes: HashMap<u32, Arc<ProcessInfo>>,
    /// Gone processes and the ancestor whose metadata names them (see
    /// [`crate::lineage`]); apart from `processes`, so that a storm of short-lived
    /// children cannot take the places of living processes.
    aliases: HashMap<u32, Arc<ProcessInfo>>,
    /// Processes known from the kernel's mappings (see [`YoungMapping`]), for use
    /// if they are gone before they are captured; dropped once captured.
    kernel_mapped: HashMap<u32, Arc<ProcessInfo>>,
    /// Those of them found gone (and named from them): a subset of its keys.
    kernel_named: HashSet<u32>,
    /// Weak, so a binary is closed once no process that maps it is tracked.
    objects: HashMap<(u64, u64), Weak<ObjectFile>>,
    vdso: Option<Arc<ObjectFile>>,
    stats: Arc<ProcessStats>,
    lineage: Arc<Mutex<Lineage>>,
    /// Tracked pids the last [`ProcessTable::take_forgettable`] found gone, and kept
    /// for one more cycle. A subset of `processes` and `aliases`.
    gone_at_last_check: HashSet<u32>,
    /// Pids a [`capture_unlocked`] is reading without the table (at most one per
    /// thread that captures: the capture worker and the cycle's), and the signal
    /// that one ended.
    capturing: HashSet<u32>,
    capture_ended: Arc<std::sync::Condvar>,
}

impl ProcessTable {
    pub fn new(stats: Arc<ProcessStats>) -> Self {
        ProcessTable {
            processes: HashMap::new(),
            aliases: HashMap::new(),
            kernel_mapped: HashMap::new(),
            kernel_named: HashSet::new(),
            objects: HashMap::new(),
            vdso: own_vdso().ok(),
            stats,
            lineage: Arc::default(),
            gone_at_last_check: HashSet::new(),
            capturing: HashSet::new(),
            capture_ended: Arc::default(),
        }
    }

    pub fn stats(&self) -> &Arc<ProcessStats> {
        &self.stats
    }

    /// The fork and exec history the drain fills in.
    pub fn lineage(&self) -> &Arc<Mutex<Lineage>> {
        &self.lineage
    }

    /// The process's metadata; for a gone process named from an ancestor, the
    /// ancestor's (its `pid` is then the ancestor's).
    pub fn get(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        self.processes
            .get(&pid)
            .or_else(|| self.aliases.get(&pid))
            .or_else(|| self.kernel_mapped.get(&pid))
            .cloned()
    }

    /// Whether all that is known of `pid` is what the kernel saw it map, and no
    /// capture has found it gone yet: a young process not captured yet.
    pub fn awaiting_capture(&self, pid: u32) -> bool {
        !self.processes.contains_key(&pid)
            && !self.aliases.contains_key(&pid)
            && !self.kernel_named.contains(&pid)
            && self.kernel_mapped.contains_key(&pid)
    }

    pub fn len(&self) -> usize {
        self.processes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }

    /// Reads the process from /proc and stores it (replacing what we had). A
    /// process that is gone, but was forked without an exec, gets the metadata of
    /// the ancestor it shared its mappings with (see [`crate::lineage`]): the
    /// returned `pid` then is the ancestor's. Else (one that exec'd) it gets what
    /// the kernel said it mapped, if it said ([`ProcessTable::add_young_mapping`]).
    ///
    /// Reads /proc and opens binaries with the table locked: the capture worker
    /// and symbolization use [`capture_unlocked`] instead.
    pub fn capture(&mut self, pid: u32) -> Result<Arc<ProcessInfo>, CaptureError> {
        let read = self.read_process(pid);
        self.captured(pid, read)
    }

    /// Stores what reading process `pid` gave (see [`ProcessTable::capture`]).
    fn captured(
        &mut self,
        pid: u32,
        read: Result<ProcessInfo, CaptureError>,
    ) -> Result<Arc<ProcessInfo>, CaptureError> {
        match read {
            Ok(info) => {
                self.stats.captured.fetch_add(1, Ordering::Relaxed);
                let info = Arc::new(info);
                self.aliases.remove(&pid);
                self.kernel_mapped.remove(&pid);
                self.kernel_named.remove(&pid);
                self.store(pid, info.clone());
                Ok(info)
            }
            Err(CaptureError::Gone { pid }) => {
                // Named already (its later samples ask again): counted once.
                if let Some(info) = self.named_already(pid) {
                    return Ok(info);
                }
                // The parent's metadata first: it is shared, not a copy, and has
                // every mapping, where the kernel's has those the samples ran in.
                if let Some(info) = self.named_from_ancestor(pid) {
                    self.stats.named_from_parent.fetch_add(1, Ordering::Relaxed);
                    self.kernel_mapped.remove(&pid);
                    self.kernel_named.remove(&pid);
                    if self.aliases.len() < MAX_ALIASES {
                        self.aliases.insert(pid, info.clone());
                    }
                    return Ok(info);
                }
                let info = self
                    .kernel_mapped
                    .get(&pid)
                    .cloned()
                    .ok_or(CaptureError::Gone { pid })?;
                self.stats.named_from_kernel.fetch_add(1, Ordering::Relaxed);
                self.kernel_named.insert(pid);
                Ok(info)
            }
            Err(e) => Err(e),
        }
    }

    /// What named gone process `pid` at an earlier capture: an ancestor's metadata
    /// or the kernel's mappings.
    fn named_already(&self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let from_kernel = || {
            self.kernel_named
                .contains(&pid)
                .then(|| self.kernel_mapped.get(&pid))
                .flatten()
        };
        self.aliases.get(&pid).or_else(from_kernel).cloned()
    }

    /// Adds a mapping the kernel saw process `pid` run in to what we keep for it in
    /// case it is gone before it is captured. Ignored for a process captured (or
    /// named from its parent) already: /proc said more.
    pub fn add_young_mapping(&mut self, seen: &YoungMapping) {
        let pid = seen.pid;
        if self.processes.contains_key(&pid) || self.aliases.contains_key(&pid) {
            return;
        }
        let known = self.kernel_mapped.get(&pid).cloned();
        if known.is_none() && self.kernel_mapped.len() >= MAX_KERNEL_MAPPED {
            self.stats
                .kernel_mapped_full
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut mappings = known
            .as_ref()
            .map(|k| k.mappings.clone())
            .unwrap_or_default();
        let m = &seen.mapping;
        if m.start >= m.end
            || mappings.len() >= MAX_KERNEL_MAPPINGS
            || mappings.iter().any(|have| have.start == m.start)
        {
            return;
        }
        let exe = seen
            .exe_path
            .clone()
            .or_else(|| known.as_ref().and_then(|k| k.exe.clone()));
        let object = self.kernel_object(m, exe.as_deref());
        mappings.push(Mapping {
            start: m.start,
            end: m.end,
            offset: m.offset,
            object,
        });
        mappings.sort_by_key(|m| m.start);
        let name = match known {
            Some(k) => k.name.clone(),
            None => comm_text(&seen.comm).into_owned(),
        };
        let info = Arc::new(ProcessInfo {
            pid,
            name,
            exe,
            mappings,
            start_time: 0,
            exe_id: None,
            container_id: None,
        });
        self.kernel_mapped.insert(pid, info);
    }

    /// Process `pid` exec'd: forgets the mappings the kernel reported for it
    /// before, which were its old program's (its parent's, for a fork that exec'd:
    /// the samples from then are named from the parent, see
    /// [`ProcessTable::named_before_exec`]). Kept, they could name the new
    /// program's frames after the old one, where both map at the same addresses
    /// (non-PIE executables, address randomization off), or take its slots.
    pub fn execed(&mut self, pid: u32) {
        if self.kernel_mapped.remove(&pid).is_some() {
            self.kernel_named.remove(&pid);
        }
    }

    /// The object behind a mapping the kernel reported: a binary we hold open for
    /// another process, found by device and inode, or else the program the
    /// process exec'd (`exe`) if it is that file.
    fn kernel_object(&mut self, m: &KernelMapping, exe: Option<&str>) -> MappedObject {
        if m.ino == 0 {
            return MappedObject::Anonymous("[anon]".into());
        }
        let key = (user_dev(m.dev), m.ino);
        if let Some(object) = self.held(key) {
            return MappedObject::File(object);
        }
        match exe.and_then(|path| self.open_exe(path, key)) {
            Some(object) => MappedObject::File(object),
            None => {
                self.stats
                    .kernel_mappings_unopened
                    .fetch_add(1, Ordering::Relaxed);
                MappedObject::Unopened {
                    path: format!(
                        "inode {}:{}:{}",
                        libc::major(key.0),
                        libc::minor(key.0),
                        m.ino
                    ),
                    reason: "gone before capture",
                }
            }
        }
    }

    fn store(&mut self, pid: u32, info: Arc<ProcessInfo>) {
        if self.processes.contains_key(&pid) || self.processes.len() < MAX_TRACKED_PROCESSES {
            self.processes.insert(pid, info);
        } else {
            self.stats.table_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The metadata of the nearest ancestor gone process `pid` shared its mappings
    /// with.
    fn named_from_ancestor(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let parent = self
            .lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .parent_of(pid)?;
        self.metadata_of_ancestor(parent)
    }

    /// The metadata that names the samples process `pid` took before its exec, in
    /// the program it was forked with (see [`Lineage::runs_forked_program`]): its
    /// parent's, found as for a gone process. `None` if `pid` has not exec'd since
    /// that fork, or its parent is not known: its own metadata names them then.
    pub fn named_before_exec(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let parent = self
            .lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .parent_before_exec(pid)?;
        let info = self.metadata_of_ancestor(parent)?;
        self.stats.named_before_exec.fetch_add(1, Ordering::Relaxed);
        Some(info)
    }

    /// The metadata of `first`, or of the nearest of its ancestors it shares its
    /// mappings with: the table's entry if it still describes that process, else
    /// read from /proc now.
    fn metadata_of_ancestor(&mut self, first: u32) -> Option<Arc<ProcessInfo>> {
        let mut ancestor = first;
        for _ in 0..MAX_ANCESTORS {
            let known = self
                .get(ancestor)
                // Still the program we captured (an exec changes the executable);
                // gone or unreadable: what we captured is the best there is.
                .filter(|p| exe_id(ancestor).is_none_or(|id| Some(id) == p.exe_id));
            if known.is_some() {
                return known;
            }
            if let Ok(info) = self.read_process(ancestor) {
                let info = Arc::new(info);
                self.store(ancestor, info.clone());
                return Some(info);
            }
            ancestor = self
                .lineage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .parent_of(ancestor)?;
        }
        None
    }

    /// Tracked processes to forget at the end of a cycle: what we hold of them no
    /// longer describes what runs under their pid, and no sample still waiting to
    /// be symbolized needs it.
    ///
    /// - Replaced now (a new process under the pid, or an exec of another
    ///   executable): forgotten at once, so that the new program is captured when
    ///   next sampled.
    /// - Gone (no /proc entry; gone processes named from an ancestor too): kept
    ///   until the check after the one that first found them gone. The interval
    ///   that was open at that first check may hold their last samples; it is
    ///   symbolized before the next check (cycles never overlap).
    pub fn take_forgettable(&mut self) -> Vec<u32> {
        let mut forget = Vec::new();
        let mut gone = HashSet::new();
        for p in self.processes.values() {
            match Process::new(p.pid as i32).and_then(|proc| proc.stat()) {
                Err(_) => {
                    gone.insert(p.pid);
                }
                Ok(stat) if stat.starttime != p.start_time => forget.push(p.pid),
                Ok(_) if exe_id(p.pid) != p.exe_id => forget.push(p.pid),
                Ok(_) => {}
            }
        }
        gone.extend(self.aliases.keys().copied());
        gone.extend(self.kernel_mapped.keys().copied());
        let found_gone_before = std::mem::take(&mut self.gone_at_last_check);
        for pid in gone {
            if found_gone_before.contains(&pid) {
                forget.push(pid);
            } else {
                self.gone_at_last_check.insert(pid);
            }
        }
        forget
    }

    /// Forgets the processes [`ProcessTable::take_forgettable`] names: their
    /// metadata and open binaries are released. Call it once a cycle, after the
    /// profile of the interval before the open one is symbolized, and hand what it
    /// returns to first sight (`Collector::forget`) so they are captured again
    /// when next sampled.
    pub fn forget_exited(&mut self) -> Vec<u32> {
        let exited = self.take_forgettable();
        for &pid in &exited {
            self.remove(pid);
        }
        exited
    }

    /// Forgets processes (e.g. exited ones at the end of an interval) and closes the
    /// binaries only they mapped.
    pub fn remove(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.aliases.remove(&pid);
        self.kernel_mapped.remove(&pid);
        self.kernel_named.remove(&pid);
        self.gone_at_last_check.remove(&pid);
        self.objects.retain(|_, o| o.strong_count() > 0);
    }

    /// Reads process `pid` from /proc and opens the binaries it maps that the
    /// table does not hold yet, all with the table locked.
    fn read_process(&mut self, pid: u32) -> Result<ProcessInfo, CaptureError> {
        let read = read_proc(pid)?;
        let opened = open_binaries(self.unheld(&read));
        Ok(self.assemble(read, opened))
    }

    /// The binaries `read` maps that the table does not hold, at most as many as
    /// it has room for (the rest are counted when assembled).
    fn unheld(&mut self, read: &ProcRead) -> Vec<Unheld> {
        let room = self.free_object_slots();
        let mut unheld: Vec<Unheld> = Vec::new();
        for m in &read.mappings {
            let ProcMapped::File {
                path,
                key: Some(key),
            } = &m.mapped
            else {
                continue;
            };
            if unheld.len() < room
                && self.held(*key).is_none()
                && !unheld.iter().any(|u| u.key == *key)
            {
                unheld.push(Unheld {
                    key: *key,
                    link: format!("/proc/{}/map_files/{:x}-{:x}", read.pid, m.start, m.end),
                    path: path.clone(),
                });
            }
        }
        unheld
    }

    /// The process's metadata from what /proc said and the binaries opened for it
    /// (held from now on if the table has room).
    fn assemble(
        &mut self,
        read: ProcRead,
        opened: Vec<(Unheld, Option<Arc<ObjectFile>>)>,
    ) -> ProcessInfo {
        let mut mappings = Vec::with_capacity(read.mappings.len());
        for m in read.mappings {
            let object = match m.mapped {
                ProcMapped::File { path, key: None } => MappedObject::Unopened {
                    path,
                    reason: "unreadable",
                },
                ProcMapped::File {
                    path,
                    key: Some(key),
                } => self.object_for(key, path, &opened),
                ProcMapped::Vdso => match &self.vdso {
                    Some(vdso) => MappedObject::File(vdso.clone()),
                    None => MappedObject::Anonymous("[vdso]".into()),
                },
                ProcMapped::Anonymous(name) => MappedObject::Anonymous(name),
            };
            mappings.push(Mapping {
                start: m.start,
                end: m.end,
                offset: m.offset,
                object,
            });
        }
        ProcessInfo {
            pid: read.pid,
            name: read.name,
            exe: read.exe,
            mappings,
            start_time: read.start_time,
            exe_id: read.exe_id,
            container_id: read.container_id,
        }
    }

    /// The object for binary `key` mapped from `path`: the one the table holds
    /// (another capture may have opened it meanwhile), else the one opened for
    /// this capture, held if there is room.
    fn object_for(
        &mut self,
        key: (u64, u64),
        path: String,
        opened: &[(Unheld, Option<Arc<ObjectFile>>)],
    ) -> MappedObject {
        if let Some(object) = self.held(key) {
            return MappedObject::File(object);
        }
        let full = |path| MappedObject::Unopened {
            path,
            reason: "object table full",
        };
        match opened.iter().find(|(u, _)| u.key == key) {
            Some((_, Some(object))) if self.has_room_for_object() => {
                self.objects.insert(key, Arc::downgrade(object));
                MappedObject::File(object.clone())
            }
            Some((_, None)) => MappedObject::Unopened {
                path,
                reason: "unreadable",
            },
            // Opened, but no room now (counted by `has_room_for_object`).
            Some(_) => full(path),
            // Not opened for want of room. (Or held when this capture began and
            // let go since: rare, and counted as full too.)
            None => {
                self.stats.objects_full.fetch_add(1, Ordering::Relaxed);
                full(path)
            }
        }
    }

    /// Opens the program at `path` if it is the file `key` (device, inode), and
    /// holds it like a captured process's binary. `None` if it is not (another
    /// file at that path since, or a path in another mount namespace), or if it
    /// cannot be opened or the object table is full.
    ///
    /// The path is whatever the process exec'd, and anyone who can write where it
    /// lies may have put another file there since: it is opened non-blocking (a
    /// FIFO put there would otherwise block the open, and the capture worker with
    /// the process table, until a writer came) and read only if it is a regular
    /// file.
    fn open_exe(&mut self, path: &str, key: (u64, u64)) -> Option<Arc<ObjectFile>> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || (meta.dev(), meta.ino()) != key || !self.has_room_for_object() {
            return None;
        }
        let object = object_file(key, path, file, &meta);
        self.objects.insert(key, Arc::downgrade(&object));
        Some(object)
    }

    /// The binary `key` (device, inode), if a tracked process holds it open.
    fn held(&self, key: (u64, u64)) -> Option<Arc<ObjectFile>> {
        self.objects.get(&key).and_then(Weak::upgrade)
    }

    /// How many more binaries may be held open, once closed ones are forgotten.
    fn free_object_slots(&mut self) -> usize {
        self.objects.retain(|_, o| o.strong_count() > 0);
        MAX_OPEN_OBJECTS.saturating_sub(self.objects.len())
    }

    /// Whether another binary may be held open: closed ones are forgotten first;
    /// a full table is counted.
    fn has_room_for_object(&mut self) -> bool {
        let room = self.free_object_slots() > 0;
        if !room {
            self.stats.objects_full.fetch_add(1, Ordering::Relaxed);
        }
        room
    }
}

/// Process `pid` as /proc describes it, before its binaries are opened.
struct ProcRead {
    pid: u32,
    name: String,
    exe: Option<String>,
    start_time: u64,
    exe_id: Option<(u64, u64)>,
    container_id: Option<String>,
    /// Executable mappings, sorted by start address.
    mappings: Vec<ProcMapping>,
}

struct ProcMapping {
    start: u64,
    end: u64,
    offset: u64,
    mapped: ProcMapped,
}

enum ProcMapped {
    /// A file, with its device and inode (`None`: its map_files entry was
    /// unreadable).
    File {
        path: String,
        key: Option<(u64, u64)>,
    },
    Vdso,
    Anonymous(String),
}

/// A binary to open for a capture: the table does not hold it.
struct Unheld {
    key: (u64, u64),
    /// `/proc/PID/map_files/START-END`: the mapped file itself, whatever its path
    /// names now.
    link: String,
    path: String,
}

/// Reads process `pid` from /proc: no table needed, so none is locked while a
/// slow /proc (a process whose memory map is locked) answers.
fn read_proc(pid: u32) -> Result<ProcRead, CaptureError> {
    let gone = |e: procfs::ProcError| match e {
        procfs::ProcError::NotFound(_) => CaptureError::Gone { pid },
        other => CaptureError::Unreadable { pid, source: other },
    };
    let process = Process::new(pid as i32).map_err(gone)?;
    // Before the mappings: an exec between the two leaves an old id beside the
    // new mappings, which the next check of `exited` notices (the other order
    // would hide it for good).
    let exe_id = exe_id(pid);
    let maps = process.maps().map_err(gone)?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default();
    let exe = process.exe().ok().map(|p| p.to_string_lossy().into_owned());
    let start_time = process.stat().map(|s| s.starttime).unwrap_or(0);
    let container_id = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|c| container_id(&c));
    let mut mappings = Vec::new();
    for map in maps {
        if !map.perms.contains(procfs::process::MMPermissions::EXECUTE) {
            continue;
        }
        let (start, end) = map.address;
        let mapped = match &map.pathname {
            MMapPath::Path(path) => {
                let link = format!("/proc/{pid}/map_files/{start:x}-{end:x}");
                ProcMapped::File {
                    path: path.to_string_lossy().into_owned(),
                    key: std::fs::metadata(&link).ok().map(|m| (m.dev(), m.ino())),
                }
            }
            MMapPath::Vdso => ProcMapped::Vdso,
            MMapPath::Anonymous => ProcMapped::Anonymous("[anon]".into()),
            MMapPath::Heap => ProcMapped::Anonymous("[heap]".into()),
            MMapPath::Stack | MMapPath::TStack(_) => ProcMapped::Anonymous("[stack]".into()),
            MMapPath::Vsyscall => ProcMapped::Anonymous("[vsyscall]".into()),
            other => ProcMapped::Anonymous(format!("{other:?}")),
        };
        let offset = if matches!(map.pathname, MMapPath::Vdso) {
            0
        } else {
            map.offset
        };
        mappings.push(ProcMapping {
            start,
            end,
            offset,
            mapped,
        });
    }
    mappings.sort_by_key(|m| m.start);
    Ok(ProcRead {
        pid,
        name,
        exe,
        start_time,
        exe_id,
        container_id,
        mappings,
    })
}

/// Opens each binary through its map_files entry and reads its build id: no
/// table needed, so none is locked while a slow file system answers. `None` for
/// one that could not be opened, or is no longer the file the key names.
fn open_binaries(unheld: Vec<Unheld>) -> Vec<(Unheld, Option<Arc<ObjectFile>>)> {
    unheld
        .into_iter()
        .map(|u| {
            let object = File::open(&u.link).ok().and_then(|file| {
                let meta = file.metadata().ok()?;
                ((meta.dev(), meta.ino()) == u.key)
                    .then(|| object_file(u.key, &u.path, file, &meta))
            });
            (u, object)
        })
        .collect()
}

/// Reads process `pid` as [`ProcessTable::capture`] does, with `table` locked only
/// to look up and store: /proc is read and new binaries are opened without it, so
/// a slow /proc or file system holds up this capture alone, not every user of the
/// table.
///
/// One capture of a pid at a time: a second waits for the first (at most
/// [`MAX_CAPTURE_WAIT`]) and answers with what it stored, so that a process whose
/// /proc read is stuck holds up the capture worker, and each cycle that needs it
/// for a second, not for good.
pub fn capture_unlocked(
    table: &Mutex<ProcessTable>,
    pid: u32,
) -> Result<Arc<ProcessInfo>, CaptureError> {
    let lock = || table.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut guard = lock();
        if guard.capturing.contains(&pid) {
            let ended = guard.capture_ended.clone();
            let deadline = std::time::Instant::now() + MAX_CAPTURE_WAIT;
            while guard.capturing.contains(&pid) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    guard.stats.captures_stuck.fetch_add(1, Ordering::Relaxed);
                    return Err(CaptureError::Busy { pid });
                }
                guard = ended
                    .wait_timeout(guard, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            // What that capture stored (nothing if the process was gone).
            return guard.get(pid).ok_or(CaptureError::Gone { pid });
        }
        guard.capturing.insert(pid);
    }
    // Ends this capture however it ends, and wakes those waiting for it.
    struct Capturing<'a>(&'a Mutex<ProcessTable>, u32);
    impl Drop for Capturing<'_> {
        fn drop(&mut self) {
            let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
            table.capturing.remove(&self.1);
            table.capture_ended.notify_all();
        }
    }
    let capturing = Capturing(table, pid);
    let read = read_proc(pid);
    let opened = match &read {
        Ok(read) => {
            let unheld = lock().unheld(read);
            open_binaries(unheld)
        }
        Err(_) => Vec::new(),
    };
    let result = {
        let mut table = lock();
        let read = read.map(|read| table.assemble(read, opened));
        table.captured(pid, read)
    };
    drop(capturing);
    result
}

/// The binary `key` (device, inode) mapped from `path`, as an object to hold.
fn object_file(
    key: (u64, u64),
    path: &str,
    file: File,
    meta: &std::fs::Metadata,
) -> Arc<ObjectFile> {
    Arc::new(ObjectFile {
        dev: key.0,
        ino: key.1,
        path: path.to_string(),
        build_id: read_build_id(&file),
        size: meta.len(),
        mtime_ns: mtime_ns(meta),
        file,
    })
}

/// A device number as the kernel keeps it (`MKDEV`: major << 20 | minor) in the
/// encoding `stat` reports it in.
pub fn user_dev(kernel_dev: u32) -> u64 {
    libc::makedev(kernel_dev >> 20, kernel_dev & 0xf_ffff)
}

/// A NUL-padded task name as text (invalid UTF-8 replaced).
pub fn comm_text(comm: &[u8; TASK_COMM_LEN]) -> std::borrow::Cow<'_, str> {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len])
}

/// Lines of /proc/PID/maps [`exe_id`] looks through for the executable's (64: it
/// is the first line of nearly every process).
pub const EXE_ID_MAX_LINES: usize = 64;

/// Device and inode of process `pid`'s executable, as the kernel's first mapping of
/// it in /proc/PID/maps gives them (`None`: gone, a kernel thread, unreadable, or no
/// such mapping in the first [`EXE_ID_MAX_LINES`]). Not a stat through
/// `/proc/PID/exe`: that asks the executable's file system, and one that hangs (a
/// network file system gone away) would stall whoever asks, every cycle; the
/// link's target is read as a path and the maps are the kernel's own. The device
/// is the file system's, which can differ from what a stat says (btrfs
/// subvolumes): compare these ids only with each other.
pub fn exe_id(pid: u32) -> Option<(u64, u64)> {
    use std::io::BufRead as _;
    use std::os::unix::ffi::OsStrExt as _;
    fn deleted(path: &[u8]) -> &[u8] {
        path.strip_suffix(b" (deleted)").unwrap_or(path)
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = deleted(exe.as_os_str().as_bytes());
    let maps = File::open(format!("/proc/{pid}/maps")).ok()?;
    std::io::BufReader::new(maps)
        .split(b'\n')
        .take(EXE_ID_MAX_LINES)
        .map_while(Result::ok)
        .find_map(|line| {
            let (dev, ino, path) = maps_line_file(&line)?;
            (deleted(path) == exe).then_some((dev, ino))
        })
}

/// The device (as `stat` encodes it), inode and path of a /proc/PID/maps line that
/// maps a file: `start-end perms offset major:minor inode   path`.
fn maps_line_file(line: &[u8]) -> Option<(u64, u64, &[u8])> {
    let mut rest = line;
    let mut field = || -> Option<&[u8]> {
        let start = rest.iter().position(|&b| b != b' ')?;
        let tail = &rest[start..];
        let end = tail.iter().position(|&b| b == b' ').unwrap_or(tail.len());
        rest = &tail[end..];
        Some(&tail[..end])
    };
    let (_range, _perms, _offset) = (field()?, field()?, field()?);
    let dev = std::str::from_utf8(field()?).ok()?;
    let ino: u64 = std::str::from_utf8(field()?).ok()?.parse().ok()?;
    let (major, minor) = dev.split_once(':')?;
    let major = u32::from_str_radix(major, 16).ok()?;
    let minor = u32::from_str_radix(minor, 16).ok()?;
    let start = rest.iter().position(|&b| b != b' ')?;
    let path = &rest[start..];
    (ino != 0).then_some((libc::makedev(major, minor), ino, path))
}

/// Whether `pid` is a process that still runs (not gone, not a zombie waiting for
/// its parent).
pub fn is_running(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
}

/// The container id in a /proc/PID/cgroup file: the 64-hex-digit id that Docker,
/// containerd, CRI-O and podman put in the cgroup path (e.g.
/// `0::/system.slice/docker-<id>.scope`, `.../kubepods/.../cri-containerd-<id>.scope`,
/// `.../<id>`).
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        let path = line.rsplit(':').next()?;
        path.split('/').rev().find_map(|component| {
            let component = component.strip_suffix(".scope").unwrap_or(component);
            let id = component.rsplit(['-', ':']).next()?;
            (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
        })
    })
}

fn read_build_id(file: &File) -> Option<Vec<u8>> {
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    blazesym::helper::read_elf_build_id(&path)
        .ok()
        .flatten()
        .map(|id| id.to_vec())
}

/// A copy of our own vDSO in a memfd. Every 64-bit process on this kernel maps the
/// same vDSO image, so this one file symbolizes all of them.
fn own_vdso() -> std::io::Result<Arc<ObjectFile>> {
    let maps = Process::myself()
        .and_then(|p| p.maps())
        .map_err(std::io::Error::other)?;
    let vdso = maps
        .into_iter()
        .find(|m| matches!(m.pathname, MMapPath::Vdso))
        .ok_or_else(|| std::io::Error::other("no [vdso] mapping"))?;
    let (start, end) = vdso.address;
    // SAFETY: the vDSO is mapped readable in our own address space for our lifetime.
    let image = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    // SAFETY: plain syscall with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vdso".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(image)?;
    let meta = file.metadata()?;
    let build_id = read_build_id(&file);
    Ok(Arc::new(ObjectFile {
        dev: meta.dev(),
        ino: meta.ino(),
        path: "[vdso]".into(),
        build_id,
        size: meta.len(),
        mtime_ns: mtime_ns(&meta),
        file,
    }))
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// The drain's side of first sight: remembers which tgids it has passed on and hands
/// new ones to the capture worker without ever blocking.
pub struct FirstSight {
    seen: HashSet<u32>,
    /// Tgids seen since the last [`FirstSight::flush`], in `seen` already; at most
    /// a batch of records' worth.
    first_seen: Vec<u32>,
    queue: SyncSender<CaptureRequest>,
    exec_paths: ExecPaths,
    stats: Arc<ProcessStats>,
    /// Tgids the worker found gone: they leave `seen`, so that the set holds only
    /// processes that may still be captured, and a reused pid is captured again.
    /// Bounded by `seen`: each tgid in it is queued at most once.
    gone: Arc<Mutex<Vec<u32>>>,
    /// Tgids the worker could not capture although they run (/proc unreadable, or
    /// the table full): they leave `seen` at the next [`FirstSight::forget`], once
    /// a cycle, to be tried again then rather than on every sample. Bounded as
    /// `gone`.
    uncaptured: Arc<Mutex<Vec<u32>>>,
    lineage: Arc<Mutex<Lineage>>,
}

impl FirstSight {
    /// Called for every sample; cheap when the tgid is known. A new tgid is
    /// handed to the worker at the next [`FirstSight::flush`].
    pub fn observe(&mut self, tgid: u32, _thread: &[u8; TASK_COMM_LEN]) {
        if tgid == 0 || self.seen.contains(&tgid) {
            return;
        }
        self.release_gone();
        if self.seen.len() >= MAX_TRACKED_PROCESSES {
            self.stats.table_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.seen.insert(tgid);
        self.first_seen.push(tgid);
    }

    /// Hands the tgids first seen since the last call to the worker. The drain
    /// calls it at the end of each batch of records: a young process's mapping
    /// record comes after its sample's (see `profiler-ebpf/src/mappings.rs`), and
    /// must reach the worker before the capture that may find the process gone.
    pub fn flush(&mut self) {
        for tgid in std::mem::take(&mut self.first_seen) {
            match self.queue.try_send(CaptureRequest::Capture(tgid)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    self.seen.remove(&tgid);
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.seen.remove(&tgid);
                }
            }
        }
    }

    /// A mapping the eBPF program found for a sample of a young process (the
    /// sample comes right before it): passed to the worker at once, ahead of the
    /// sample's first sight (see [`FirstSight::flush`]), with the path the process
    /// exec'd if its exec event gave one.
    pub fn young_mapping(&mut self, mut seen: YoungMapping) {
        seen.exe_path = self.exec_paths.get(seen.pid).map(str::to_owned);
        match self.queue.try_send(CaptureRequest::Mapping(Box::new(seen))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// The path of the program process `pid` exec'd (its exec event comes before
    /// its samples), for [`FirstSight::young_mapping`].
    pub fn exec_path(&mut self, pid: u32, path: String) {
        self.exec_paths.insert(pid, path);
    }

    /// A fork or exec the eBPF program reported. Arrives before any sample of the
    /// new process, so the capture worker can use it if the process is gone.
    pub fn process_changed(&mut self, change: ProcessChange) {
        self.lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .apply(change);
        if let ProcessChange::Execed { pid } = change {
            // In the queue's order: after the old program's mappings, before the
            // new one's.
            if let Err(TrySendError::Full(_)) = self.queue.try_send(CaptureRequest::Exec(pid)) {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// True if the lineage says `tgid` still runs the program it was forked with:
    /// read for every sample, in the ring's order with the fork and exec events.
    pub fn runs_forked_program(&self, tgid: u32) -> bool {
        self.lineage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .runs_forked_program(tgid)
    }

    /// Drops from `seen` the tgids whose capture found them gone.
    fn release_gone(&mut self) {
        let gone = std::mem::take(&mut *self.gone.lock().unwrap_or_else(|p| p.into_inner()));
        for tgid in gone {
            self.seen.remove(&tgid);
        }
    }

    /// Lets these tgids be captured again when next seen (after they were removed
    /// from the table), and those the worker could not capture be tried again.
    pub fn forget(&mut self, tgids: impl IntoIterator<Item = u32>) {
        let uncaptured =
            std::mem::take(&mut *self.uncaptured.lock().unwrap_or_else(|p| p.into_inner()));
        for tgid in tgids.into_iter().chain(uncaptured) {
            self.seen.remove(&tgid);
        }
    }
}

/// The capture worker thread. Dropping the [`FirstSight`] ends it; [`CaptureWorker::join`]
/// waits for it.
pub struct CaptureWorker {
    handle: Option<JoinHandle<()>>,
}

impl CaptureWorker {
    /// Starts the worker; returns it and the drain's [`FirstSight`] handle.
    pub fn start(table: Arc<Mutex<ProcessTable>>) -> std::io::Result<(CaptureWorker, FirstSight)> {
        let (tx, rx) = sync_channel(CAPTURE_QUEUE);
        let (stats, lineage) = {
            let table = table.lock().expect("process table lock");
            (table.stats().clone(), table.lineage().clone())
        };
        let gone = Arc::new(Mutex::new(Vec::new()));
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let released = Released {
            gone: gone.clone(),
            uncaptured: uncaptured.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || capture_loop(rx, table, released))?;
        Ok((
            CaptureWorker {
                handle: Some(handle),
            },
            FirstSight {
                seen: HashSet::new(),
                first_seen: Vec::new(),
                queue: tx,
                exec_paths: ExecPaths::default(),
                stats,
                gone,
                uncaptured,
                lineage,
            },
        ))
    }

    /// Waits for the worker to finish the queue (after the `FirstSight` was dropped).
    pub fn join(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Paths of exec'd programs by pid, at most [`MAX_EXEC_PATHS`]; the one exec'd
/// longest ago is dropped first (a pid that execs again counts from its new exec).
#[derive(Default)]
struct ExecPaths {
    paths: HashMap<u32, String>,
    /// The pids in `paths`, oldest exec first.
    order: std::collections::VecDeque<u32>,
}

impl ExecPaths {
    fn insert(&mut self, pid: u32, path: String) {
        if self.paths.insert(pid, path).is_some() {
            // At most MAX_EXEC_PATHS to look through, once per exec.
            self.order.retain(|&p| p != pid);
        }
        self.order.push_back(pid);
        while self.order.len() > MAX_EXEC_PATHS {
            if let Some(old) = self.order.pop_front() {
                self.paths.remove(&old);
            }
        }
    }

    fn get(&self, pid: u32) -> Option<&str> {
        self.paths.get(&pid).map(String::as_str)
    }
}

/// The worker's way to hand tgids back to first sight (see [`FirstSight`]).
struct Released {
    gone: Arc<Mutex<Vec<u32>>>,
    uncaptured: Arc<Mutex<Vec<u32>>>,
}

fn capture_loop(
    queue: Receiver<CaptureRequest>,
    table: Arc<Mutex<ProcessTable>>,
    released: Released,
) {
    let push =
        |list: &Mutex<Vec<u32>>, pid| list.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
    let lock = || table.lock().unwrap_or_else(|p| p.into_inner());
    while let Ok(request) = queue.recv() {
        let pid = match request {
            CaptureRequest::Capture(pid) => pid,
            CaptureRequest::Mapping(seen) => {
                lock().add_young_mapping(&seen);
                continue;
            }
            CaptureRequest::Exec(pid) => {
                lock().execed(pid);
                continue;
            }
        };
        // /proc read and binaries opened without the table: a process whose /proc
        // is slow holds up its own capture, not the cycle's symbolization.
        let captured = capture_unlocked(&table, pid);
        let table = lock();
        match captured {
            Err(CaptureError::Gone { .. }) => {
                table
                    .stats
                    .gone_before_capture
                    .fetch_add(1, Ordering::Relaxed);
                push(&released.gone, pid);
            }
            // Gone too, named from an ancestor or the kernel's mappings: it leaves
            // first sight all the same.
            // (A capture that read /proc drops the kernel's mappings.)
            Ok(info) if info.pid != pid || table.kernel_mapped.contains_key(&pid) => {
                push(&released.gone, pid)
            }
            // Stored under its pid: it stays in first sight until forgotten.
            Ok(_) if table.processes.contains_key(&pid) => {}
            // Not stored (the table is full), unreadable, or stuck in another
            // capture: tried again next cycle.
            Ok(_) | Err(CaptureError::Unreadable { .. } | CaptureError::Busy { .. }) => {
                push(&released.uncaptured, pid)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own process is captured with its executable mapped and opened.
    #[test]
    fn captures_own_process() {
        let mut table = ProcessTable::new(Arc::default());
        let pid = std::process::id();
        let info = table.capture(pid).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(info.mappings.iter().any(|m| matches!(&m.object,
            MappedObject::File(o) if o.path == exe.to_string_lossy())));
        let here = captures_own_process as *const () as u64;
        let m = info.mapping(here).expect("our code is mapped");
        assert!(matches!(m.object, MappedObject::File(_)));
    }

    /// Processes that exit before they are captured do not use up first sight:
    /// after more of them than the table holds, a new process is still captured.
    #[test]
    fn processes_gone_before_capture_do_not_fill_first_sight() {
        let table = Arc::new(Mutex::new(ProcessTable::new(Arc::default())));
        let (worker, mut sight) = CaptureWorker::start(table.clone()).unwrap();
        let comm = [0u8; TASK_COMM_LEN];
        // Above pid_max (at most 2^22): these never exist.
        for tgid in (1u32 << 23)..(1 << 23) + MAX_TRACKED_PROCESSES as u32 + 10 {
            // Retried while the capture queue is full (the worker catches up).
            for _ in 0..1000 {
                sight.observe(tgid, &comm);
                sight.flush();
                if sight.seen.contains(&tgid) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let me = std::process::id();
        for _ in 0..5000 {
            sight.observe(me, &comm);
            sight.flush();
            if table.lock().unwrap().get(me).is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(table.lock().unwrap().get(me).is_some(), "not captured");
        let stats = table.lock().unwrap().stats().clone();
        assert!(stats.gone_before_capture.load(Ordering::Relaxed) > MAX_TRACKED_PROCESSES as u64);
        assert_eq!(stats.table_full.load(Ordering::Relaxed), 0);
        drop(sight);
        worker.join();
    }

    /// A child that exec'd after its fork has its samples from before the exec
    /// named from its parent's mappings, alive or gone; one that has not exec'd,
    /// or whose parent exec'd since the fork, has none.
    #[test]
    fn exec_after_fork_names_the_time_before_from_the_parent() {
        let mut table = ProcessTable::new(Arc::default());
        let me = std::process::id();
        let child = NO_SUCH_PID;
        let lineage = table.lineage().clone();
        lineage.lock().unwrap().apply(ProcessChange::Forked {
            pid: child,
            parent: me,
        });
        assert!(table.named_before_exec(child).is_none(), "not exec'd yet");
        lineage
            .lock()
            .unwrap()
            .apply(ProcessChange::Execed { pid: child });
        let info = table.named_before_exec(child).expect("the parent's");
        assert_eq!(info.pid, me);
        let here = exec_after_fork_names_the_time_before_from_the_parent as *const () as u64;
        assert!(matches!(
            info.mapping(here).map(|m| &m.object),
            Some(MappedObject::File(_))
        ));
        assert_eq!(table.stats().named_before_exec.load(Ordering::Relaxed), 1);

        lineage
            .lock()
            .unwrap()
            .apply(ProcessChange::Execed { pid: me });
        assert!(
            table.named_before_exec(child).is_none(),
            "the parent changed"
        );
    }

    /// A gone process that the lineage says was forked (without an exec) by a
    /// living one is named from that one's mappings, under its own pid; once the
    /// parent has exec'd since, it is gone as any other.
    #[test]
    fn gone_forked_child_takes_its_parents_mappings() {
        let mut table = ProcessTable::new(Arc::default());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let lineage = table.lineage().clone();
        lineage.lock().unwrap().apply(ProcessChange::Forked {
            pid: gone,
            parent: me,
        });
        let info = table.capture(gone).expect("named from the parent");
        assert_eq!(info.pid, me, "the parent's metadata");
        assert_eq!(table.get(gone).map(|i| i.pid), Some(me));
        assert_eq!(table.len(), 1, "the alias takes no process's place");
        let here = gone_forked_child_takes_its_parents_mappings as *const () as u64;
        assert!(matches!(
            info.mapping(here).map(|m| &m.object),
            Some(MappedObject::File(_))
        ));
        assert_eq!(table.stats().named_from_parent.load(Ordering::Relaxed), 1);
        assert!(
            !table.take_forgettable().contains(&gone),
            "kept while the open interval may still name it"
        );
        assert!(
            table.take_forgettable().contains(&gone),
            "let go at the check after"
        );
        table.remove(gone);

        lineage
            .lock()
            .unwrap()
            .apply(ProcessChange::Execed { pid: me });
        assert!(matches!(
            table.capture(gone),
            Err(CaptureError::Gone { .. })
        ));
    }

    /// An exited process stays named for one more cycle (the open interval may
    /// hold its last samples), then is let go.
    /// What the kernel reports for this test binary's code mapping in process
    /// `pid`: the mapping as /proc/self/maps has it, the device as the kernel
    /// encodes it.
    fn own_code_as_the_kernel_sees_it(pid: u32, exe_path: Option<String>) -> (YoungMapping, u64) {
        let here = own_code_as_the_kernel_sees_it as *const () as u64;
        let info = ProcessTable::new(Arc::default())
            .read_process(std::process::id())
            .unwrap();
        let m = info.mapping(here).expect("our code is mapped").clone();
        let MappedObject::File(object) = &m.object else {
            panic!("our binary is held: {m:?}");
        };
        let dev = object.dev;
        let kernel_dev = (libc::major(dev) << 20) | libc::minor(dev);
        let mapping = KernelMapping {
            start: m.start,
            end: m.end,
            offset: m.offset,
            ino: object.ino,
            dev: kernel_dev,
            reserved: 0,
        };
        let seen = YoungMapping {
            pid,
            comm: *b"gone_exec\0\0\0\0\0\0\0",
            mapping,
            exe_path,
        };
        (seen, here)
    }

    /// A pid no process has (above any pid_max).
    const NO_SUCH_PID: u32 = u32::MAX - 1;

    /// An exec'd process gone before its capture is named from the mapping the
    /// kernel reported, whose file a captured process holds: counted once however
    /// often its samples ask, and let go like other gone processes.
    #[test]
    fn gone_exec_is_named_from_the_kernels_mapping() {
        let mut table = ProcessTable::new(Arc::default());
        table.capture(std::process::id()).unwrap();
        let (seen, here) = own_code_as_the_kernel_sees_it(NO_SUCH_PID, None);
        table.add_young_mapping(&seen);
        table.add_young_mapping(&seen);
        for _ in 0..2 {
            let info = table
                .capture(NO_SUCH_PID)
                .expect("named from the kernel's view");
            assert_eq!((info.pid, info.name.as_str()), (NO_SUCH_PID, "gone_exec"));
            assert_eq!(info.mappings.len(), 1, "{:?}", info.mappings);
            assert!(matches!(
                info.mapping(here).map(|m| &m.object),
                Some(MappedObject::File(o)) if o.path == std::env::current_exe().unwrap().to_string_lossy()
            ));
        }
        assert_eq!(table.stats().named_from_kernel.load(Ordering::Relaxed), 1);
        assert_eq!(table.len(), 1, "no process's place taken");
        assert!(!table.take_forgettable().contains(&NO_SUCH_PID));
        assert!(table.take_forgettable().contains(&NO_SUCH_PID));
    }

    /// An exec forgets the mappings the kernel reported before it: the new
    /// program's, even at the same address, are the ones that name the process.
    #[test]
    fn exec_forgets_the_old_programs_kernel_mappings() {
        let mut table = ProcessTable::new(Arc::default());
        table.capture(std::process::id()).unwrap();
        let (old, here) = own_code_as_the_kernel_sees_it(NO_SUCH_PID, None);
        table.add_young_mapping(&old);
        let mut new = old.clone();
        new.mapping.ino += 1; // another file at the same address
        table.add_young_mapping(&new);
        let named = |t: &ProcessTable| match t.get(NO_SUCH_PID).unwrap().mapping(here) {
            Some(Mapping {
                object: MappedObject::File(_),
                ..
            }) => "old",
            Some(Mapping {
                object: MappedObject::Unopened { .. },
                ..
            }) => "new",
            other => panic!("{other:?}"),
        };
        assert_eq!(named(&table), "old", "the same start is kept once");
        table.execed(NO_SUCH_PID);
        assert!(table.get(NO_SUCH_PID).is_none());
        table.add_young_mapping(&new);
        assert_eq!(named(&table), "new");
        table.execed(std::process::id()); // a captured process: nothing to forget
        assert!(table.get(std::process::id()).is_some());
    }

    /// With no process holding the file, the exec event's path names it if it is
    /// that file (device and inode), and nothing does if it is another.
    #[test]
    fn gone_exec_is_named_from_its_exec_path() {
        let exe = std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut table = ProcessTable::new(Arc::default());
        let (seen, here) = own_code_as_the_kernel_sees_it(NO_SUCH_PID, Some(exe.clone()));
        table.add_young_mapping(&seen);
        let info = table.capture(NO_SUCH_PID).unwrap();
        assert!(matches!(
            info.mapping(here).map(|m| &m.object),
            Some(MappedObject::File(o)) if o.path == exe
        ));

        let mut table = ProcessTable::new(Arc::default());
        let (seen, _) = own_code_as_the_kernel_sees_it(NO_SUCH_PID, Some("/bin/sh".into()));
        table.add_young_mapping(&seen);
        let info = table.capture(NO_SUCH_PID).unwrap();
        assert!(matches!(
            info.mapping(here).map(|m| &m.object),
            Some(MappedObject::Unopened {
                reason: "gone before capture",
                ..
            })
        ));
        assert_eq!(
            table
                .stats()
                .kernel_mappings_unopened
                .load(Ordering::Relaxed),
            1
        );
    }

    /// The executable's id comes from the kernel's maps, and on this machine's file
    /// systems agrees with a stat of the file; a kernel thread has none; a maps
    /// line is read field by field, a path with spaces whole.
    #[test]
    fn exe_id_from_the_maps() {
        let me = std::process::id();
        let meta = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(exe_id(me), Some((meta.dev(), meta.ino())));
        assert_eq!(exe_id(2), None, "kthreadd maps nothing");
        assert_eq!(exe_id(NO_SUCH_PID), None);
        assert_eq!(
            maps_line_file(
                b"55d0c0a00000-55d0c0a2e000 r--p 00000000 fd:01 1312  /usr/bin/my prog (deleted)"
            ),
            Some((
                libc::makedev(0xfd, 1),
                1312,
                &b"/usr/bin/my prog (deleted)"[..]
            ))
        );
        assert_eq!(
            maps_line_file(
                b"7ffd5e1c1000-7ffd5e1e2000 rw-p 00000000 00:00 0                          [stack]"
            ),
            None
        );
        assert_eq!(maps_line_file(b"garbage"), None);
        assert_eq!(maps_line_file(b""), None);
    }

    /// A capture of a pid another capture is reading waits for it and answers
    /// with what it stored; a capture leaves nothing marked under way.
    #[test]
    fn capture_waits_for_the_one_under_way() {
        let me = std::process::id();
        let table = Arc::new(Mutex::new(ProcessTable::new(Arc::default())));
        table.lock().unwrap().capturing.insert(me);
        let waiting = {
            let table = table.clone();
            std::thread::spawn(move || capture_unlocked(&table, me))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        {
            // The capture under way ends: it stored the process.
            let mut t = table.lock().unwrap();
            t.capture(me).unwrap();
            t.capturing.remove(&me);
            t.capture_ended.notify_all();
        }
        let info = waiting.join().unwrap().expect("the stored process");
        assert_eq!(info.pid, me);
        let t = table.lock().unwrap();
        // It did not read /proc itself: one capture in all.
        assert_eq!(t.stats.captured.load(Ordering::Relaxed), 1);
        assert_eq!(t.stats.captures_stuck.load(Ordering::Relaxed), 0);
        drop(t);
        capture_unlocked(&table, me).unwrap();
        assert!(table.lock().unwrap().capturing.is_empty());
    }

    /// A capture stuck for good (its pid stays under way) costs a later one
    /// [`MAX_CAPTURE_WAIT`], then an error, counted; not a wait for good.
    #[test]
    fn stuck_capture_is_given_up_after_the_wait() {
        let me = std::process::id();
        let table = Mutex::new(ProcessTable::new(Arc::default()));
        table.lock().unwrap().capturing.insert(me);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _ = tx.send(capture_unlocked(&table, me));
            });
            let answer = rx
                .recv_timeout(MAX_CAPTURE_WAIT * 30)
                .expect("the capture waited for good");
            assert!(matches!(answer, Err(CaptureError::Busy { pid }) if pid == me));
        });
        let t = table.lock().unwrap();
        assert_eq!(t.stats.captures_stuck.load(Ordering::Relaxed), 1);
        assert!(t.capturing.contains(&me), "the stuck one's mark is its own");
    }

    /// A FIFO put where a gone process's program was is neither opened for good
    /// (an open for reading would wait for a writer, with the process table
    /// locked) nor taken for the program: the mapping stays unopened.
    #[test]
    fn fifo_at_the_exec_path_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("program");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let (seen, here) =
            own_code_as_the_kernel_sees_it(NO_SUCH_PID, Some(fifo.to_string_lossy().into_owned()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut table = ProcessTable::new(Arc::default());
            table.add_young_mapping(&seen);
            let _ = tx.send(
                table
                    .capture(NO_SUCH_PID)
                    .map(|info| info.mapping(here).cloned()),
            );
        });
        let captured = rx.recv_timeout(std::time::Duration::from_secs(30));
        if captured.is_err() {
            // Let the blocked open go (a writer appears), so the test ends.
            let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            panic!("the capture blocked opening a FIFO");
        }
        let mapping = captured.unwrap().unwrap();
        assert!(
            matches!(
                mapping.as_ref().map(|m| &m.object),
                Some(MappedObject::Unopened {
                    reason: "gone before capture",
                    ..
                })
            ),
            "{mapping:?}"
        );
    }

    /// Exec paths are dropped oldest exec first, and a pid that execs again
    /// counts from its latest exec: it outlives pids that exec'd before that.
    #[test]
    fn exec_paths_drop_the_oldest_exec_first() {
        let mut paths = ExecPaths::default();
        for pid in 1..=MAX_EXEC_PATHS as u32 {
            paths.insert(pid, format!("/bin/p{pid}"));
        }
        paths.insert(1, "/bin/again".into());
        paths.insert(5000, "/bin/new".into());
        assert_eq!(paths.get(1), Some("/bin/again"));
        assert_eq!(paths.get(2), None);
        assert_eq!(paths.get(3), Some("/bin/p3"));
        assert_eq!(paths.get(5000), Some("/bin/new"));
        assert_eq!(paths.order.len(), MAX_EXEC_PATHS);
        assert_eq!(paths.paths.len(), MAX_EXEC_PATHS);
    }

    /// A live process's capture replaces what the kernel reported, and later
    /// reports of it are ignored: /proc says more.
    #[test]
    fn capture_supersedes_the_kernels_mappings() {
        let me = std::process::id();
        let mut table = ProcessTable::new(Arc::default());
        let (seen, _) = own_code_as_the_kernel_sees_it(me, None);
        table.add_young_mapping(&seen);
        assert_eq!(table.get(me).unwrap().mappings.len(), 1);
        table.capture(me).unwrap();
        table.add_young_mapping(&seen);
        let info = table.get(me).unwrap();
        assert!(info.mappings.len() > 1, "{:?}", info.mappings);
        assert_eq!(table.stats().named_from_kernel.load(Ordering::Relaxed), 0);
    }

    /// Kernel device numbers (MKDEV: 12 bits of major, 20 of minor) become the
    /// `stat` encoding, large minors included.
    #[test]
    fn kernel_device_numbers_convert() {
        assert_eq!(user_dev((8 << 20) | 1), libc::makedev(8, 1));
        assert_eq!(user_dev((259 << 20) | 70_000), libc::makedev(259, 70_000));
        assert_eq!(user_dev(0x1c), libc::makedev(0, 0x1c));
    }

    #[test]
    fn exited_process_is_forgotten_one_cycle_late() {
        let mut table = ProcessTable::new(Arc::default());
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(std::time::Duration::from_millis(200));
        table.capture(pid).unwrap();
        assert!(table.take_forgettable().is_empty(), "running: kept");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            !table.take_forgettable().contains(&pid),
            "first found gone: kept"
        );
        assert!(table.get(pid).is_some());
        assert_eq!(
            table.take_forgettable(),
            vec![pid],
            "gone at the check after"
        );
    }

    /// A process that exec'd another executable is let go at the first check: the
    /// new program is captured when next sampled.
    #[test]
    fn execd_process_is_forgotten_at_once() {
        let mut table = ProcessTable::new(Arc::default());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line; exec sleep 5"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        std::thread::sleep(std::time::Duration::from_millis(200));
        table.capture(pid).unwrap();
        assert!(table.take_forgettable().is_empty());
        drop(child.stdin.take());
        std::thread::sleep(std::time::Duration::from_millis(300));
        let forgotten = table.take_forgettable();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(forgotten, vec![pid]);
    }

    /// A pid that does not exist is reported as gone, not as an error to surface.
    #[test]
    fn missing_process_is_gone() {
        let mut table = ProcessTable::new(Arc::default());
        assert!(matches!(
            table.capture(u32::MAX - 1),
            Err(CaptureError::Gone { .. })
        ));
    }

    /// Two processes mapping the same binary share one open file.
    #[test]
    fn objects_are_shared_by_inode() {
        let mut table = ProcessTable::new(Arc::default());
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let mut child2 = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // Wait until both have exec'd.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let a = table.capture(child.id()).unwrap();
        let b = table.capture(child2.id()).unwrap();
        let _ = child.kill();
        let _ = child2.kill();
        let _ = child.wait();
        let _ = child2.wait();
        let libc_of = |p: &ProcessInfo| {
            p.mappings.iter().find_map(|m| match &m.object {
                MappedObject::File(o) if o.path.contains("libc") => Some(o.clone()),
                _ => None,
            })
        };
        assert!(Arc::ptr_eq(&libc_of(&a).unwrap(), &libc_of(&b).unwrap()));
    }

    /// Container ids are found in the cgroup paths of the common runtimes, and a
    /// host process has none.
    /// A live process runs; a zombie and a pid that does not exist do not.
    #[test]
    fn running_is_alive_and_not_a_zombie() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Unreaped, it stays a zombie until wait().
        while is_running(pid) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
        assert!(!is_running(pid));
    }

    #[test]
    fn container_ids_from_cgroup_paths() {
        let id = "3f1c0a2b4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
        for cgroup in [
            format!("0::/system.slice/docker-{id}.scope\n"),
            format!("0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{id}.scope\n"),
            format!("12:pids:/docker/{id}\n"),
            format!("0::/machine.slice/libpod-{id}.scope/container\n"),
        ] {
            assert_eq!(container_id(&cgroup).as_deref(), Some(id), "{cgroup}");
        }
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
        assert_eq!(container_id("garbage"), None);
    }

    /// The vDSO copy is a readable ELF image.
    #[test]
    fn vdso_copy_is_elf() {
        let vdso = own_vdso().unwrap();
        let bytes = std::fs::read(vdso.readable_path()).unwrap();
        assert_eq!(&bytes[..4], b"\x7fELF");
    }
}
