//! Stage 4: symbolize an interval's aggregate into a [`Profile`].
//!
//! Kernel addresses are named from /proc/kallsyms ([`kallsyms`]), user addresses from the binaries
//! each process mapped (captured on first sight, see [`crate::process`]): ELF symbols,
//! DWARF when present (file, line, inlined functions), through blazesym. Every
//! (binary, offset) and kernel address is looked up once per batch and remembered in
//! a bounded LRU cache across intervals.
//!
//! Misses are data: an address that cannot be named becomes `[unknown] module+0xoff`
//! and is counted by reason in [`UnknownCounts`]; no sample is dropped.

mod cache;
mod jit;
pub mod kallsyms;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use blazesym::symbolize::{
    source::{Elf, Source},
    Input, Sym, Symbolized,
};
use profiler_common::{MAX_STACK_DEPTH, TASK_COMM_LEN};

pub use cache::{SymbolCache, MAX_SYMBOL_CACHE_ENTRIES};
pub use jit::JitCounts;

use crate::{
    aggregate::{AggregatedStack, Aggregator},
    process::{capture_unlocked, comm_text, MappedObject, ObjectFile, ProcessInfo, ProcessTable},
    profile::{FrameKind, Line, Location, Object, ProcessMeta, Profile, Stack, UnknownCounts},
    runtimes::{InterpretedSamples, Runtime},
};

/// Name of the pseudo-object kernel locations belong to (as perf calls it).
pub const KERNEL_OBJECT: &str = "[kernel.kallsyms]";
/// The frame that stands for stacks the aggregator had no room for.
pub const TABLE_FULL_FRAME: &str = "[stack table full]";
/// The frame that stands for the outer frames of a stack deeper than
/// [`MAX_STACK_DEPTH`], which the walk did not reach: placed where they would be,
/// so cut stacks gather under it rather than pose as roots of their own.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// Key of one symbol lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SymKey {
    /// An offset in a binary identified by device, inode and
    /// [`version`](crate::process::ObjectFile::version).
    File {
        dev: u64,
        ino: u64,
        version: u64,
        offset: u64,
    },
    /// A kernel address.
    Kernel(u64),
}

/// Names found for one key: the inlined chain innermost first, or `None` when the
/// source had no symbol for it.
pub type Resolved = Option<Arc<[Line]>>;

/// What [`Symbolizer::resolve`] found: names by key (`None`: no symbol), and the
/// keys whose whole lookup failed (their binary, or kallsyms, unreadable this time).
struct Resolution {
    names: HashMap<SymKey, Resolved>,
    failed: std::collections::HashSet<SymKey>,
}

/// Time and rate of the interval being symbolized.
#[derive(Clone, Copy, Debug)]
pub struct IntervalMeta {
    pub start: SystemTime,
    pub duration: Duration,
    pub frequency_hz: u64,
}

/// A frame after address-to-object resolution, before naming.
enum FrameRef {
    Kernel(u64),
    File {
        object: Arc<ObjectFile>,
        offset: u64,
    },
    Unknown {
        module: Arc<str>,
        offset: u64,
        /// The address in the process, for the perf map lookup of JIT code.
        ip: u64,
        reason: Reason,
    },
    /// JIT code named from the process's perf map.
    Jit {
        pid: u32,
        ip: u64,
        name: Arc<str>,
        kind: FrameKind,
    },
}

/// One frame of an interval as stored, after [`caller_adjusted`]: kernel addresses
/// are the same in every process, user addresses only within theirs: the tgid, or
/// with [`BEFORE_EXEC`] for the stacks a process took before its exec, in the
/// address space it was forked with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum FrameKey {
    Kernel(u64),
    User(u32, u64),
}

/// Marks a [`FrameKey::User`] address space as a process's before its exec. Pids
/// are below 2^22 (`PID_MAX_LIMIT`), so the bit is free.
const BEFORE_EXEC: u32 = 1 << 31;

/// The processes whose stacks from before their exec are named from their parent
/// (`ProcessTable::named_before_exec`), with the parent's metadata.
type BeforeExec = HashMap<u32, Arc<ProcessInfo>>;

/// The address space a stack's user frames belong to (see [`FrameKey::User`]).
fn address_space(stack: &AggregatedStack, before_exec: &BeforeExec) -> u32 {
    if stack.fork_image && before_exec.contains_key(&stack.tgid) {
        stack.tgid | BEFORE_EXEC
    } else {
        stack.tgid
    }
}

/// The keys of a stack's frames, leaf first: its kernel frames, then its user ones.
fn frame_keys<'a>(
    stack: &'a AggregatedStack,
    before_exec: &BeforeExec,
) -> impl Iterator<Item = FrameKey> + 'a {
    let space = address_space(stack, before_exec);
    let kernel = stack.kernel().iter().enumerate();
    let user = stack.user().iter().enumerate();
    kernel
        .map(|(i, &ip)| FrameKey::Kernel(caller_adjusted(ip, i)))
        .chain(user.map(move |(i, &ip)| FrameKey::User(space, caller_adjusted(ip, i))))
}

/// The distinct frames of an interval, each with its [`FrameRef`] and the process
/// it belongs to (0 for kernel frames).
#[derive(Default)]
struct DistinctFrames {
    index: HashMap<FrameKey, usize>,
    refs: Vec<FrameRef>,
    pids: Vec<u32>,
}

impl DistinctFrames {
    /// Adds `key` if new, with the frame `make` returns for it.
    fn intern(&mut self, key: FrameKey, make: impl FnOnce() -> FrameRef) {
        if self.index.contains_key(&key) {
            return;
        }
        self.index.insert(key, self.refs.len());
        self.refs.push(make());
        self.pids.push(match key {
            FrameKey::Kernel(_) => 0,
            FrameKey::User(space, _) => space & !BEFORE_EXEC,
        });
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reason {
    ObjectUnavailable,
    Anonymous,
    Unmapped,
    ProcessGone,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum LocKey {
    Sym(SymKey),
    Unknown(Arc<str>, u64),
    Jit(u32, u64),
    Interpreted(FrameKind, Arc<str>, Option<Arc<str>>, u32),
    /// A synthetic frame with this name.
    Marker(&'static str),
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum ObjKey {
    File(u64, u64),
    Named(Arc<str>),
}

/// Turns aggregates into profiles; keeps the caches between intervals.
pub struct Symbolizer {
    blaze: blazesym::symbolize::Symbolizer,
    cache: SymbolCache,
    /// Normally /proc/kallsyms.
    kallsyms: std::path::PathBuf,
    /// Binaries blazesym has opened since its caches were last dropped, and their
    /// total size: what it holds mapped and parsed.
    held: std::collections::HashSet<(u64, u64)>,
    held_bytes: u64,
    /// Kernel symbols held in memory (agent); `None`: two streaming passes over
    /// kallsyms per batch (record), or not loaded yet.
    kernel_table: Option<kallsyms::KernelTable>,
    hold_kernel_table: bool,
    /// Binaries larger than this are named from ELF symbols only: parsing DWARF
    /// takes memory in proportion to the binary's debug info (~100 MB for a 70 MB
    /// debug build). `None`: always use DWARF when present.
    max_dwarf_file_bytes: Option<u64>,
    /// Perf-map names of JIT code, kept while the maps do not change.
    jit: jit::JitNamer,
}

/// Total size of the binaries the agent lets blazesym keep mapped and parsed from one
/// cycle to the next (48 MiB of files: their symbol tables and the pages touched
/// stay resident). Past it, the caches are dropped after the cycle: a host running
/// huge binaries (librustc_driver, libLLVM: >100 MiB each) pays CPU to re-read them,
/// not memory; a host of ordinary binaries keeps them parsed.
pub const AGENT_BLAZESYM_FILE_BUDGET: u64 = 48 << 20;

/// The agent's DWARF limit: binaries up to 16 MiB (most distribution binaries have
/// no DWARF at all; this bounds what a large unstripped one can cost).
pub const AGENT_MAX_DWARF_FILE_BYTES: u64 = 16 << 20;

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new(MAX_SYMBOL_CACHE_ENTRIES)
    }
}

/// Per-interval state of one `symbolize` call.
#[derive(Default)]
struct Builder {
    objects: Vec<Object>,
    object_ids: HashMap<ObjKey, usize>,
    locations: Vec<Location>,
    location_ids: HashMap<LocKey, u32>,
    unknown: UnknownCounts,
}

impl Symbolizer {
    /// A symbolizer whose cache holds at most `cache_entries` lookups.
    pub fn new(cache_entries: usize) -> Self {
        Symbolizer {
            blaze: new_blazesym(),
            cache: SymbolCache::new(cache_entries),
            kallsyms: kallsyms::KALLSYMS.into(),
            held: Default::default(),
            held_bytes: 0,
            kernel_table: None,
            hold_kernel_table: false,
            max_dwarf_file_bytes: None,
            jit: jit::JitNamer::default(),
        }
    }

    /// Uses DWARF only for binaries up to `bytes` (see [`AGENT_MAX_DWARF_FILE_BYTES`]).
    pub fn with_max_dwarf_file_bytes(mut self, bytes: u64) -> Self {
        self.max_dwarf_file_bytes = Some(bytes);
        self
    }

    /// Keeps the kernel's text symbols in memory (~4.5 MB) instead of reading
    /// kallsyms for every batch: for the agent, which symbolizes every interval.
    pub fn with_kernel_table(mut self) -> Self {
        self.hold_kernel_table = true;
        self
    }

    /// Reads the kernel symbols again at the next batch (modules load and unload,
    /// BPF programs come and go), and forgets the kernel names cached from the old
    /// table: an address whose code was replaced would otherwise keep its old name
    /// for as long as it stays in use.
    pub fn refresh_kernel_table(&mut self) {
        self.kernel_table = None;
        self.cache.forget(|key| matches!(key, SymKey::Kernel(_)));
    }

    /// Drops blazesym's parsed files (symbol tables, DWARF) so they cannot grow with
    /// every binary ever seen; our bounded lookup cache is kept.
    pub fn refresh_file_caches(&mut self) {
        self.blaze = new_blazesym();
        self.held.clear();
        self.held_bytes = 0;
    }

    /// Drops blazesym's caches if the binaries it holds exceed `budget` bytes;
    /// returns whether it did.
    pub fn release_file_caches_over(&mut self, budget: u64) -> bool {
        let over = self.held_bytes > budget;
        if over {
            self.refresh_file_caches();
        }
        over
    }

    /// Total size of the binaries blazesym holds now.
    pub fn held_file_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Lookups held in the cache.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Symbolizes every stack of `aggregate`, and adds the stacks runtime profilers
    /// (py-spy, rbspy, phpspy) saw in the same interval. Processes not captured yet
    /// are read from /proc now if they are still alive; JIT frames are named from
    /// their process's perf map.
    pub fn symbolize(
        &mut self,
        aggregate: &Aggregator,
        processes: &Mutex<ProcessTable>,
        meta: IntervalMeta,
        interpreted: &[InterpretedSamples],
    ) -> Profile {
        let (procs, before_exec) = resolve_processes(aggregate, interpreted, processes);

        // 1. Each distinct frame of the interval to an object and offset, once. An
        //    interval holds up to 1 Mi stored frames but typically a few thousand
        //    distinct ones: nothing is kept per stored frame here.
        let mut distinct = DistinctFrames::default();
        let mut refreshed: HashMap<u32, Option<Arc<ProcessInfo>>> = HashMap::new();
        for stack in aggregate.stacks() {
            for key in frame_keys(stack, &before_exec) {
                distinct.intern(key, || match key {
                    FrameKey::Kernel(ip) => FrameRef::Kernel(ip),
                    FrameKey::User(space, ip) => {
                        user_frame(space, ip, &procs, &before_exec, &mut refreshed, processes)
                    }
                });
            }
        }
        let jit = self.jit.name_frames(&mut distinct.refs, &distinct.pids);

        // 2. Look up what the cache does not know, one batch per binary.
        let resolved = self.resolve(&distinct.refs);

        // 3. Tables and stacks.
        let mut b = Builder::default();
        let location_of: Vec<u32> = distinct
            .refs
            .iter()
            .map(|f| b.location(f, &resolved))
            .collect();
        drop(resolved);
        let mut stacks = Vec::with_capacity(aggregate.len() + 1);
        for stack in aggregate.stacks() {
            let mut locations = Vec::with_capacity(stack.frames.len() + 2);
            locations.extend(
                frame_keys(stack, &before_exec).map(|key| location_of[distinct.index[&key]]),
            );
            // Leaf first: a cut user stack ends at the marker; a cut kernel stack
            // has it between its kernel and user frames.
            if stack.user().len() == MAX_STACK_DEPTH {
                locations.push(b.marker(TRUNCATED_FRAME));
            }
            if stack.kernel_len == MAX_STACK_DEPTH {
                locations.insert(MAX_STACK_DEPTH, b.marker(TRUNCATED_FRAME));
            }
            stacks.push(Stack {
                pid: stack.tgid,
                process: process_name(stack.tgid, &stack.thread, &procs),
                thread: comm_str(&stack.thread),
                locations,
                count: stack.count,
            });
        }
        drop(distinct);
        for (tgid, thread, count) in aggregate.overflow() {
            let loc = b.marker(TABLE_FULL_FRAME);
            stacks.push(Stack {
                pid: tgid,
                process: process_name(tgid, thread, &procs),
                thread: comm_str(thread),
                locations: vec![loc],
                count,
            });
        }
        for samples in interpreted {
            let kind = interpreted_kind(samples.runtime);
            let process: Arc<str> = match procs.get(&samples.pid) {
                Some(Some(info)) if !info.name.is_empty() => info.name.as_str().into(),
                _ => samples.runtime.as_str().into(),
            };
            for stack in &samples.stacks {
                // Root first from the tools; locations are leaf first.
                let locations = stack
                    .frames
                    .iter()
                    .rev()
                    .map(|f| b.interpreted(kind, f))
                    .collect();
                stacks.push(Stack {
                    pid: samples.pid,
                    process: process.clone(),
                    thread: stack
                        .thread
                        .as_deref()
                        .map_or_else(|| process.clone(), Arc::from),
                    locations,
                    count: native_equivalent(stack.count, samples.rate_hz, meta.frequency_hz),
                });
            }
        }
        let unattributed = aggregate.stats().unattributed_samples;
        if unattributed > 0 {
            let loc = b.marker(TABLE_FULL_FRAME);
            stacks.push(Stack {
                pid: 0,
                process: "[unattributed]".into(),
                thread: "".into(),
                locations: vec![loc],
                count: unattributed,
            });
        }
        let processes = procs
            .iter()
            .filter_map(|(&pid, info)| {
                let info = info.as_ref()?;
                Some((
                    pid,
                    ProcessMeta {
                        name: info.name.as_str().into(),
                        exe: info.exe.as_deref().map(Into::into),
                        container_id: info.container_id.as_deref().map(Into::into),
                    },
                ))
            })
            .collect();
        Profile {
            start: meta.start,
            duration: meta.duration,
            frequency_hz: meta.frequency_hz,
            objects: b.objects,
            locations: b.locations,
            stacks,
            processes,
            unknown: b.unknown,
            jit,
        }
    }

    /// Resolves every key the frames need, from the cache or in batches.
    fn resolve(&mut self, refs: &[FrameRef]) -> Resolution {
        let mut resolved: HashMap<SymKey, Resolved> = HashMap::new();
        let mut kernel_pending: Vec<u64> = Vec::new();
        let mut file_pending: HashMap<(u64, u64), (Arc<ObjectFile>, Vec<u64>)> = HashMap::new();
        // Keys whose lookup failed as a whole (a binary or kallsyms unreadable this
        // time): unnamed now, looked up again next time rather than cached.
        let mut failed: std::collections::HashSet<SymKey> = Default::default();
        for frame in refs {
            let key = match frame {
                FrameRef::Kernel(addr) => SymKey::Kernel(*addr),
                FrameRef::File { object, offset } => SymKey::File {
                    dev: object.dev,
                    ino: object.ino,
                    version: object.version(),
                    offset: *offset,
                },
                FrameRef::Unknown { .. } | FrameRef::Jit { .. } => continue,
            };
            if resolved.contains_key(&key) {
                continue;
            }
            if let Some(hit) = self.cache.get(&key) {
                resolved.insert(key, hit);
                continue;
            }
            resolved.insert(key, None); // placeholder until the batch runs
            match frame {
                FrameRef::Kernel(addr) => kernel_pending.push(*addr),
                FrameRef::File { object, offset } => file_pending
                    .entry((object.dev, object.ino))
                    .or_insert_with(|| (object.clone(), Vec::new()))
                    .1
                    .push(*offset),
                FrameRef::Unknown { .. } | FrameRef::Jit { .. } => unreachable!(),
            }
        }

        if !kernel_pending.is_empty() {
            // A failure (kallsyms unreadable or hidden) leaves the addresses unnamed;
            // they are counted as unknown kernel frames.
            let names = if self.hold_kernel_table {
                if self.kernel_table.is_none() {
                    self.kernel_table = kallsyms::KernelTable::load(&self.kallsyms).ok();
                }
                self.kernel_table
                    .as_ref()
                    .map(|table| table.resolve(&kernel_pending))
            } else {
                kallsyms::resolve(&self.kallsyms, &kernel_pending).ok()
            };
            let names = names.unwrap_or_else(|| {
                failed.extend(kernel_pending.iter().map(|&a| SymKey::Kernel(a)));
                vec![None; kernel_pending.len()]
            });
            for (addr, name) in kernel_pending.iter().zip(names) {
                let lines: Option<Arc<[Line]>> = name.map(|function| {
                    Arc::from([Line {
                        function,
                        file: None,
                        line: 0,
                    }])
                });
                resolved.insert(SymKey::Kernel(*addr), lines);
            }
        }
        for ((dev, ino), (object, offsets)) in file_pending {
            if self.held.insert((dev, ino)) {
                self.held_bytes = self.held_bytes.saturating_add(object.size);
            }
            let mut elf = Elf::new(object.readable_path());
            elf.debug_syms = self
                .max_dwarf_file_bytes
                .is_none_or(|max| object.size <= max);
            let version = object.version();
            let key = |offset: u64| SymKey::File {
                dev,
                ino,
                version,
                offset,
            };
            let names = self
                .lookup(&Source::Elf(elf), Input::FileOffset(&offsets))
                .unwrap_or_else(|| {
                    failed.extend(offsets.iter().map(|&o| key(o)));
                    vec![None; offsets.len()]
                });
            for (offset, name) in offsets.iter().zip(names) {
                resolved.insert(key(*offset), name);
            }
        }
        for (key, value) in &resolved {
            if !failed.contains(key) {
                self.cache.insert(*key, value.clone());
            }
        }
        Resolution {
            names: resolved,
            failed,
        }
    }

    /// One blazesym batch; `None` when the whole batch failed.
    fn lookup(&self, source: &Source<'_>, input: Input<&[u64]>) -> Option<Vec<Resolved>> {
        let results = self.blaze.symbolize(source, input).ok()?;
        Some(
            results
                .iter()
                .map(|r| match r {
                    Symbolized::Sym(sym) => Some(lines_of(sym)),
                    Symbolized::Unknown(_) => None,
                })
                .collect(),
        )
    }
}

fn new_blazesym() -> blazesym::symbolize::Symbolizer {
    blazesym::symbolize::Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        .build()
}

/// Return addresses point after the call; look up the call itself. The leaf frame is
/// the interrupted instruction and is used as is.
fn caller_adjusted(ip: u64, index: usize) -> u64 {
    if index == 0 {
        ip
    } else {
        ip.saturating_sub(1)
    }
}

/// The frame kind of a runtime profiler's frames.
fn interpreted_kind(runtime: Runtime) -> FrameKind {
    match runtime {
        Runtime::Python => FrameKind::Python,
        Runtime::Ruby => FrameKind::Ruby,
        Runtime::Php => FrameKind::Php,
        Runtime::Java => FrameKind::Java,
        Runtime::Node => FrameKind::JavaScript,
    }
}

/// `count` samples taken at `rate_hz`, as a count of samples at the native
/// `frequency_hz`: the same CPU time, so that interpreted and native stacks weigh
/// alike (a stack seen at all counts at least 1).
fn native_equivalent(count: u64, rate_hz: u32, frequency_hz: u64) -> u64 {
    let rate = u64::from(rate_hz.max(1));
    if rate == frequency_hz || count == 0 {
        return count;
    }
    (count.saturating_mul(frequency_hz).saturating_add(rate / 2) / rate).max(1)
}

/// The metadata of every process of the interval, and of those whose stacks from
/// before their exec are named from their parent, that parent's.
fn resolve_processes(
    aggregate: &Aggregator,
    interpreted: &[InterpretedSamples],
    processes: &Mutex<ProcessTable>,
) -> (HashMap<u32, Option<Arc<ProcessInfo>>>, BeforeExec) {
    let lock = || processes.lock().unwrap_or_else(|p| p.into_inner());
    let mut procs = HashMap::new();
    let mut uncaptured = Vec::new();
    {
        let table = lock();
        for tgid in aggregate.tgids().chain(interpreted.iter().map(|s| s.pid)) {
            procs.entry(tgid).or_insert_with(|| {
                let known = table.get(tgid);
                if tgid != 0 && (known.is_none() || table.awaiting_capture(tgid)) {
                    uncaptured.push(tgid);
                }
                known
            });
        }
    }
    // Not captured yet (first sight's queue was full, or the capture is under way
    // or stuck), or known only from the kernel's mappings of a young process not
    // yet found gone: read now, without holding the table while /proc answers. If
    // that fails, what was known stays.
    for tgid in uncaptured {
        if let Ok(info) = capture_unlocked(processes, tgid) {
            procs.insert(tgid, Some(info));
        }
    }
    let mut table = lock();
    let mut before_exec = BeforeExec::new();
    let mut asked = std::collections::HashSet::new();
    for stack in aggregate.stacks().filter(|s| s.fork_image) {
        if asked.insert(stack.tgid) {
            if let Some(parent) = table.named_before_exec(stack.tgid) {
                before_exec.insert(stack.tgid, parent);
            }
        }
    }
    (procs, before_exec)
}

fn user_frame(
    space: u32,
    ip: u64,
    procs: &HashMap<u32, Option<Arc<ProcessInfo>>>,
    before_exec: &BeforeExec,
    refreshed: &mut HashMap<u32, Option<Arc<ProcessInfo>>>,
    table: &Mutex<ProcessTable>,
) -> FrameRef {
    let tgid = space & !BEFORE_EXEC;
    let info = if space & BEFORE_EXEC != 0 {
        before_exec.get(&tgid)
    } else {
        procs.get(&tgid).and_then(Option::as_ref)
    };
    let Some(info) = info else {
        return FrameRef::Unknown {
            module: "[unknown process]".into(),
            offset: ip,
            ip,
            reason: Reason::ProcessGone,
        };
    };
    let mut mapping = info.mapping(ip).cloned();
    // (Not for the parent's program: re-reading the process gives its own.)
    if mapping.is_none() && space & BEFORE_EXEC == 0 {
        // Mapped after first sight (dlopen)? Re-read the process once per interval.
        let fresh = refreshed
            .entry(tgid)
            .or_insert_with(|| capture_unlocked(table, tgid).ok());
        mapping = fresh.as_ref().and_then(|p| p.mapping(ip).cloned());
    }
    let Some(mapping) = mapping else {
        return FrameRef::Unknown {
            module: "[unmapped]".into(),
            offset: ip,
            ip,
            reason: Reason::Unmapped,
        };
    };
    let offset = mapping.file_offset(ip);
    match mapping.object {
        MappedObject::File(object) => FrameRef::File { object, offset },
        MappedObject::Unopened { ref path, .. } => FrameRef::Unknown {
            module: path.as_str().into(),
            offset,
            ip,
            reason: Reason::ObjectUnavailable,
        },
        MappedObject::Anonymous(ref name) => FrameRef::Unknown {
            module: name.as_str().into(),
            offset: ip - mapping.start,
            ip,
            reason: Reason::Anonymous,
        },
    }
}

fn comm_str(comm: &[u8; TASK_COMM_LEN]) -> Arc<str> {
    Arc::from(&*comm_text(comm))
}

fn process_name(
    tgid: u32,
    thread: &[u8; TASK_COMM_LEN],
    procs: &HashMap<u32, Option<Arc<ProcessInfo>>>,
) -> Arc<str> {
    match procs.get(&tgid) {
        Some(Some(info)) if !info.name.is_empty() => info.name.as_str().into(),
        // Gone before capture: the thread's name is the best we have.
        _ if tgid == 0 => "[idle]".into(),
        _ => comm_str(thread),
    }
}

/// The inlined chain of a symbol, innermost function first, each with its position.
fn lines_of(sym: &Sym<'_>) -> Arc<[Line]> {
    let code = |ci: Option<&blazesym::symbolize::CodeInfo<'_>>| match ci {
        Some(ci) => (
            Some(Arc::<str>::from(ci.to_path().to_string_lossy().as_ref())),
            ci.line.unwrap_or(0),
        ),
        None => (None, 0),
    };
    let mut lines = Vec::with_capacity(sym.inlined.len() + 1);
    // blazesym gives each function its own position (its resolver moves the call
    // sites DWARF records up one level): the innermost inlined function's is the
    // sampled instruction's line, each caller's that of its call to the next.
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = code(inlined.code_info.as_ref());
        lines.push(Line {
            function: inlined.name.as_ref().into(),
            file,
            line,
        });
    }
    let (file, line) = code(sym.code_info.as_deref());
    lines.push(Line {
        function: sym.name.as_ref().into(),
        file,
        line,
    });
    lines.into()
}

impl Builder {
    fn object(&mut self, key: ObjKey, make: impl FnOnce() -> Object) -> usize {
        *self.object_ids.entry(key).or_insert_with(|| {
            self.objects.push(make());
            self.objects.len() - 1
        })
    }

    fn push_location(&mut self, key: LocKey, make: impl FnOnce(&mut Self) -> Location) -> u32 {
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let loc = make(self);
        self.locations.push(loc);
        let id = (self.locations.len() - 1) as u32;
        self.location_ids.insert(key, id);
        id
    }

    fn interpreted(&mut self, kind: FrameKind, frame: &crate::runtimes::InterpFrame) -> u32 {
        let function: Arc<str> = frame.function.as_str().into();
        let file: Option<Arc<str>> = frame.file.as_deref().map(Into::into);
        let line = frame.line.unwrap_or(0);
        let key = LocKey::Interpreted(kind, function.clone(), file.clone(), line);
        self.push_location(key, |_| Location {
            address: 0,
            object: None,
            kind,
            lines: Arc::new([Line {
                function,
                file,
                line,
            }]),
        })
    }

    /// The location of a synthetic frame (see [`TABLE_FULL_FRAME`], [`TRUNCATED_FRAME`]).
    fn marker(&mut self, name: &'static str) -> u32 {
        self.push_location(LocKey::Marker(name), |_| Location {
            address: 0,
            object: None,
            kind: FrameKind::Native,
            lines: Arc::new([Line {
                function: name.into(),
                file: None,
                line: 0,
            }]),
        })
    }

    fn location(&mut self, frame: &FrameRef, resolved: &Resolution) -> u32 {
        match frame {
            FrameRef::Kernel(addr) => {
                let key = SymKey::Kernel(*addr);
                self.push_location(LocKey::Sym(key), |b| {
                    let object = b.object(ObjKey::Named(KERNEL_OBJECT.into()), || Object {
                        path: KERNEL_OBJECT.into(),
                        build_id: None,
                    });
                    let lines = match resolved.names.get(&key).cloned().flatten() {
                        Some(lines) => lines,
                        None => {
                            b.unknown.kernel += 1;
                            unknown_lines("[kernel]", *addr)
                        }
                    };
                    Location {
                        address: *addr,
                        object: Some(object),
                        kind: FrameKind::Kernel,
                        lines,
                    }
                })
            }
            FrameRef::File { object, offset } => {
                let key = SymKey::File {
                    dev: object.dev,
                    ino: object.ino,
                    version: object.version(),
                    offset: *offset,
                };
                self.push_location(LocKey::Sym(key), |b| {
                    let id = b.object(ObjKey::File(object.dev, object.ino), || Object {
                        path: object.path.as_str().into(),
                        build_id: object.build_id.as_deref().map(Into::into),
                    });
                    let lines = match resolved.names.get(&key).cloned().flatten() {
                        Some(lines) => lines,
                        // The binary could not be read this time.
                        None if resolved.failed.contains(&key) => {
                            b.unknown.object_unavailable += 1;
                            unknown_lines(object.file_name(), *offset)
                        }
                        None => {
                            b.unknown.no_symbol += 1;
                            unknown_lines(object.file_name(), *offset)
                        }
                    };
                    Location {
                        address: *offset,
                        object: Some(id),
                        kind: FrameKind::Native,
                        lines,
                    }
                })
            }
            FrameRef::Jit {
                pid,
                ip,
                name,
                kind,
            } => self.push_location(LocKey::Jit(*pid, *ip), |b| {
                let path: Arc<str> = format!("/tmp/perf-{pid}.map").into();
                let id = b.object(ObjKey::Named(path.clone()), || Object {
                    path,
                    build_id: None,
                });
                Location {
                    address: *ip,
                    object: Some(id),
                    kind: *kind,
                    lines: Arc::new([Line {
                        function: name.clone(),
                        file: None,
                        line: 0,
                    }]),
                }
            }),
            FrameRef::Unknown {
                module,
                offset,
                reason,
                ..
            } => self.push_location(LocKey::Unknown(module.clone(), *offset), |b| {
                match reason {
                    Reason::ObjectUnavailable => b.unknown.object_unavailable += 1,
                    Reason::Anonymous => b.unknown.anonymous += 1,
                    Reason::Unmapped => b.unknown.unmapped += 1,
                    Reason::ProcessGone => b.unknown.process_gone += 1,
                }
                let id = b.object(ObjKey::Named(module.clone()), || Object {
                    path: module.clone(),
                    build_id: None,
                });
                let name = module.rsplit('/').next().unwrap_or(module);
                Location {
                    address: *offset,
                    object: Some(id),
                    kind: FrameKind::Native,
                    lines: unknown_lines(name, *offset),
                }
            }),
        }
    }
}

/// `[unknown] module+0xoff`.
fn unknown_lines(module: &str, offset: u64) -> Arc<[Line]> {
    Arc::new([Line {
        function: format!("[unknown] {module}+{offset:#x}").into(),
        file: None,
        line: 0,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup that failed as a whole (kallsyms unreadable) leaves its frames
    /// unnamed but is not cached: once the source is readable, they are named.
    #[test]
    fn failed_lookups_are_not_cached() {
        let mut symbolizer = Symbolizer::new(64);
        let dir = tempfile::tempdir().unwrap();
        symbolizer.kallsyms = dir.path().join("kallsyms");
        let frames = vec![FrameRef::Kernel(0xffff_ffff_8100_0010)];
        let key = SymKey::Kernel(0xffff_ffff_8100_0010);

        let first = symbolizer.resolve(&frames);
        assert_eq!(first.names.get(&key), Some(&None));
        assert!(first.failed.contains(&key));

        std::fs::write(
            &symbolizer.kallsyms,
            "ffffffff81000000 T do_work\nffffffff81001000 T other\n",
        )
        .unwrap();
        let second = symbolizer.resolve(&frames);
        assert!(second.failed.is_empty());
        let named = second
            .names
            .get(&key)
            .cloned()
            .flatten()
            .expect("named now");
        assert_eq!(&*named[0].function, "do_work");
    }

    /// After a reload of the kernel's symbols, an address is named from the new
    /// table, not from the cache of the old one; user names stay cached.
    #[test]
    fn kernel_reload_forgets_cached_kernel_names() {
        let mut symbolizer = Symbolizer::new(64).with_kernel_table();
        let dir = tempfile::tempdir().unwrap();
        symbolizer.kallsyms = dir.path().join("kallsyms");
        let addr = 0xffff_ffff_c000_0010;
        let name = |symbolizer: &mut Symbolizer| {
            let names = symbolizer.resolve(&[FrameRef::Kernel(addr)]).names;
            names[&SymKey::Kernel(addr)]
                .as_ref()
                .map(|l| l[0].function.to_string())
        };
        std::fs::write(
            &symbolizer.kallsyms,
            "ffffffffc0000000 t bpf_prog_old [bpf]
",
        )
        .unwrap();
        assert_eq!(name(&mut symbolizer).as_deref(), Some("bpf_prog_old"));
        let user = SymKey::File {
            dev: 1,
            ino: 2,
            version: 3,
            offset: 4,
        };
        symbolizer.cache.insert(user, None);

        std::fs::write(
            &symbolizer.kallsyms,
            "ffffffffc0000000 t bpf_prog_new [bpf]
",
        )
        .unwrap();
        assert_eq!(
            name(&mut symbolizer).as_deref(),
            Some("bpf_prog_old"),
            "cached"
        );
        symbolizer.refresh_kernel_table();
        assert_eq!(name(&mut symbolizer).as_deref(), Some("bpf_prog_new"));
        assert!(
            symbolizer.cache.get(&user).is_some(),
            "user names stay cached"
        );
    }

    /// Interpreted counts weigh as native samples of the same CPU time.
    #[test]
    fn interpreted_counts_scale_to_the_native_frequency() {
        assert_eq!(native_equivalent(50, 97, 97), 50);
        // --runtime-rate 10 with --frequency 100: each sample is 10 native ones.
        assert_eq!(native_equivalent(5, 10, 100), 50);
        // --frequency 2000, tools capped at 1000 Hz.
        assert_eq!(native_equivalent(7, 1000, 2000), 14);
        // Faster tools weigh less; a stack seen still counts.
        assert_eq!(native_equivalent(3, 1000, 97), 1);
        assert_eq!(native_equivalent(0, 1000, 97), 0);
        assert_eq!(native_equivalent(u64::MAX, 1, 1000), u64::MAX);
        assert_eq!(native_equivalent(u64::MAX, 1000, 2000), u64::MAX / 1000);
    }
}
