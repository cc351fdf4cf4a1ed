//! Types and constants shared by the eBPF program and the userspace collector.
//!
//! Everything that crosses the kernel/user boundary is defined once here: the layout
//! of a sample record in the ring buffer, the names of maps, programs and globals,
//! and every in-kernel bound with the memory it costs. `#![no_std]` so the eBPF
//! program can use it; the `user` feature adds `aya::Pod` impls for userspace.
//!
//! Must never: hold anything that is not `#[repr(C)]` plain data, or change a layout
//! without bumping [`SampleHeader::kind`] for the new shape.
#![no_std]

/// The perf_event program that samples one CPU.
pub const PROGRAM_SAMPLE: &str = "sample_cpu";
/// Ring buffer carrying one [`SampleHeader`] + frames per sample to userspace.
pub const MAP_SAMPLES: &str = "SAMPLES";
/// Per-CPU [`CpuState`] (one entry): the counters, indexed by [`Counter`], and
/// the thread of the CPU's last record. One cache line per CPU, so counting costs
/// the sample one line.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Hash set of tgids to sample when [`GLOBAL_FILTER_BY_PID`] is set.
pub const MAP_PID_FILTER: &str = "PID_FILTER";
/// Per-CPU `u64` (one entry): [`ProcessEvent`]s lost to a full ring buffer.
pub const MAP_PROCESS_EVENTS_LOST: &str = "PROCESS_EVENTS_LOST";
/// Per-CPU `[u64; MAPPINGS_COUNTER_COUNT]` (one entry), indexed by
/// [`MappingsCounter`].
pub const MAP_MAPPINGS_STATS: &str = "MAPPINGS_STATS";

/// Raw tracepoint program on `task_newtask`: a [`ProcessEvent`] for each new
/// process (not thread), naming its parent.
pub const PROGRAM_ON_FORK: &str = "on_fork";
/// Raw tracepoint program on `sched_process_exec`: an [`ExecRecord`] for each exec
/// (a [`ProcessEvent`] where the kernel's BTF does not give the path's offset).
pub const PROGRAM_ON_EXEC: &str = "on_exec";
/// The tracepoints they attach to.
pub const TRACEPOINT_FORK: &str = "task_newtask";
pub const TRACEPOINT_EXEC: &str = "sched_process_exec";

/// Global `u8`: non-zero means "sample only tgids present in [`MAP_PID_FILTER`]".
pub const GLOBAL_FILTER_BY_PID: &str = "FILTER_BY_PID";
/// Global `u8`: non-zero means "also emit samples of the idle task (pid 0)".
pub const GLOBAL_INCLUDE_IDLE: &str = "INCLUDE_IDLE";
/// Global `u32`: byte offset of `pid` in the kernel's `task_struct`, found in its
/// BTF by userspace (aya cannot relocate field accesses in a Rust program).
pub const GLOBAL_TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
/// Global [`KernelOffsets`]: field offsets for reading young processes' mappings.
pub const GLOBAL_KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";

/// Frames per stack kind, as in perf (`kernel.perf_event_max_stack` defaults to 127).
pub const MAX_STACK_DEPTH: usize = 127;
/// Frame slots in one record: kernel + user, rounded up to a power of two so the eBPF
/// program can bound the copied size with a mask the verifier understands.
pub const MAX_RECORD_FRAMES: usize = 256;
/// Kernel task name length, NUL padded.
pub const TASK_COMM_LEN: usize = 16;

/// Ring buffer size compiled into the program; userspace sizes the real one with
/// [`ring_buffer_bytes`] at load time.
pub const RING_BUFFER_BYTES: u32 = 1 << 20;
/// Ring buffer per online CPU: 512 KiB is ~250 worst-case records, a quarter of a
/// second at 997 Hz.
pub const RING_BUFFER_BYTES_PER_CPU: u32 = 512 << 10;
/// Bounds of the ring buffer: at least 1 MiB, at most 64 MiB (65+ CPUs, as the
/// size is rounded up to a power of two).
pub const RING_BUFFER_MIN_BYTES: u32 = 1 << 20;
pub const RING_BUFFER_MAX_BYTES: u32 = 64 << 20;

/// The ring buffer size for `cpus` CPUs: [`RING_BUFFER_BYTES_PER_CPU`] each, rounded
/// up to a power of two (the kernel requires one) within the bounds. 1 MiB for 2 CPUs,
/// 2 MiB for 3, 32 MiB for 64, 64 MiB from 65. The ring is mapped into the reader, so it counts in its RSS.
pub const fn ring_buffer_bytes(cpus: u32) -> u32 {
    let want = (cpus as u64) * RING_BUFFER_BYTES_PER_CPU as u64;
    if want <= RING_BUFFER_MIN_BYTES as u64 {
        RING_BUFFER_MIN_BYTES
    } else if want >= RING_BUFFER_MAX_BYTES as u64 {
        RING_BUFFER_MAX_BYTES
    } else {
        (want as u32).next_power_of_two()
    }
}

/// The program wakes the reader once 1/this of the ring buffer waits to be read;
/// below that the reader's timer drains it. The rest of the ring is headroom for
/// the reader's latency after a wake-up.
pub const WAKEUP_FILL_DIVISOR: u64 = 4;

/// Entries in the pid filter: 1024 x (4-byte key + 1-byte value + ~50 bytes of kernel
/// hash overhead) is about 55 KiB.
pub const MAX_PID_FILTER_ENTRIES: u32 = 1024;

/// The kind of record in the ring buffer, so the record can grow new shapes (e.g. a
/// stack unwound from .eh_frame, or one that carries a stack id) without ambiguity.
pub mod record_kind {
    /// [`SampleHeader`](super::SampleHeader) followed by `kernel_frames` then
    /// `user_frames` instruction pointers (`u64`, leaf first).
    pub const NATIVE_STACKS: u16 = 1;
    /// A [`NATIVE_STACKS`] record whose `comm` was not read and holds nothing: its
    /// thread (same tid) is that of the previous record from the same CPU, and has
    /// that record's name. Reading `comm` costs a sample a cold cache line (~370 ns
    /// of ~3 us on this project's VM), and a busy CPU runs one thread for many
    /// samples in a row. See [`COMM_READ_EVERY`](super::COMM_READ_EVERY).
    pub const NATIVE_STACKS_SAME_THREAD: u16 = 2;
    /// A [`ProcessEvent`](super::ProcessEvent): process `pid` was forked by `parent`.
    pub const PROCESS_FORKED: u16 = 3;
    /// A [`ProcessEvent`](super::ProcessEvent): process `pid` exec'd a new program
    /// (`parent` is 0).
    pub const PROCESS_EXECED: u16 = 4;
    /// A [`MappingRecord`](super::MappingRecord): a mapping that the user frames
    /// of a sample before it (of the same process) run in, read by the kernel for
    /// a young process (see [`KernelOffsets::young_process_ns`](super::KernelOffsets)).
    pub const PROCESS_MAPPING: u16 = 5;
    /// An [`ExecRecord`](super::ExecRecord): process `pid` exec'd the program at
    /// `path`. Sent instead of [`PROCESS_EXECED`] when the kernel's layout of
    /// `linux_binprm` is known.
    pub const PROCESS_EXECED_PATH: u16 = 6;
}

/// Bytes of an exec'd program's path an [`ExecRecord`] has room for, NUL included;
/// a longer path is cut (and then names nothing).
pub const MAX_EXEC_PATH: usize = 256;
/// The fixed part of an [`ExecRecord`], before the path.
pub const EXEC_HEADER_LEN: usize = 16;

/// An exec and the path of the program, as given to `execve` (absolute when the
/// caller searched `PATH`). Names the program's own frames if it exits before
/// userspace reads its `/proc` entry: no other process need map it. Written with
/// only as much of `path` as it uses: [`EXEC_HEADER_LEN`] + `path_len` + its NUL,
/// rounded up to 8 bytes (~48 for a usual path, at most 272), so that an exec storm
/// takes little of the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecRecord {
    /// [`record_kind::PROCESS_EXECED_PATH`].
    pub kind: u16,
    /// [`EXEC_HEADER_LEN`] when written.
    pub header_len: u16,
    /// The process that exec'd: a tgid.
    pub pid: u32,
    /// Bytes of `path` before its NUL; 0 if it could not be read.
    pub path_len: u32,
    pub reserved: u32,
    /// The path, NUL terminated.
    pub path: [u8; MAX_EXEC_PATH],
}

/// Bytes an [`ExecRecord`] with a path of `path_len` bytes takes in the ring.
pub const fn exec_record_len(path_len: usize) -> usize {
    (EXEC_HEADER_LEN + path_len + 1 + 7) & !7
}

/// A record of the process tree changing, in the same ring buffer as samples, so
/// the reader sees a fork before any sample of the child. Lets a process that was
/// forked without an exec, and exited before the reader could read its mappings,
/// be named from its parent's, which it shares. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcessEvent {
    /// [`record_kind::PROCESS_FORKED`] or [`record_kind::PROCESS_EXECED`].
    pub kind: u16,
    /// `size_of::<ProcessEvent>()` when written.
    pub header_len: u16,
    /// The new (or exec'ing) process: a tgid.
    pub pid: u32,
    /// The tgid that forked it; 0 for an exec.
    pub parent: u32,
    pub reserved: u32,
}

/// User frames, from the leaf, that a young process's sample searches for one
/// outside the mappings found for it so far: bounds the program's work. The deeper
/// frames of a young process usually are in the same few binaries. A power of two.
pub const MAX_MAPPED_FRAMES: usize = 32;
/// Address ranges the program remembers per young process (mappings found, and
/// addresses no mapping holds); past them, the process's other mappings are not
/// looked up (counted in [`MappingsCounter::Truncated`]). A power of two.
pub const MAX_KNOWN_MAPPINGS: usize = 16;
/// Young processes whose known ranges the program keeps at once (an LRU map: the
/// least recently sampled is forgotten first).
pub const MAX_YOUNG_PROCESSES: u32 = 1024;

/// One memory mapping of a process, as the kernel's `vm_area_struct` says: what a
/// line of `/proc/PID/maps` would, without the path, read at sample time for a
/// process that may be gone before userspace can read its `/proc` entry. 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelMapping {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`, in bytes.
    pub offset: u64,
    /// Inode of the mapped file; 0 for anonymous memory.
    pub ino: u64,
    /// Device of the file's filesystem, as the kernel encodes it (`MKDEV`: major
    /// << 20 | minor), not as `stat` does.
    pub dev: u32,
    pub reserved: u32,
}

/// A mapping a young process's sample ran in, not reported for the process
/// before, emitted right after that sample's record (reserved after it). The process may exit before
/// userspace reads its `/proc` entry (a shell a script runs lives a millisecond or
/// two); these are what name its frames then. 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MappingRecord {
    /// [`record_kind::PROCESS_MAPPING`].
    pub kind: u16,
    /// `size_of::<MappingRecord>()` when written.
    pub header_len: u16,
    /// The process: a tgid.
    pub pid: u32,
    /// Name of the sampled thread, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
    pub mapping: KernelMapping,
}

/// Where the fields the program reads sit in the running kernel's structs, found by
/// userspace in the kernel's BTF and set at load time (aya cannot relocate field
/// accesses in a Rust program). A zero `young_process_ns` turns the mappings of
/// young processes off (the offsets are then not needed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Processes started less than this long ago (monotonic ns) have their
    /// samples' mappings read by the kernel; 0: never.
    pub young_process_ns: u64,
    pub task_group_leader: u32,
    pub task_start_time: u32,
    pub vma_start: u32,
    pub vma_end: u32,
    pub vma_pgoff: u32,
    pub vma_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    /// `linux_binprm.filename`, for [`ExecRecord`]s; 0: plain exec events.
    pub binprm_filename: u32,
    pub reserved: u32,
}

/// Counters of the mappings of young processes, per CPU (see [`MAP_MAPPINGS_STATS`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappingsCounter {
    /// [`MappingRecord`]s written.
    Emitted = 0,
    /// LOSS of names, not of samples: no room in the ring buffer for the record.
    RingBufferFull = 1,
    /// A frame's mapping could not be read: no mapping holds the address (a
    /// frame-pointer walk's bad last frame), or the process held its memory map's
    /// lock (in `mmap`, say). A later sample looks at its other frames.
    LookupFailed = 2,
    /// A process's frames ran in more than [`MAX_KNOWN_MAPPINGS`] ranges.
    Truncated = 3,
}

/// Number of [`MappingsCounter`] slots.
pub const MAPPINGS_COUNTER_COUNT: usize = 4;

/// Each CPU reads `comm` at least on every this-many-th record it emits, even for
/// the same thread, so a thread that renames itself (or a process that execs) is
/// named anew within that many of its samples. A power of two.
pub const COMM_READ_EVERY: u64 = 16;

/// Most CPUs a record may name; larger CPU numbers are malformed records. Bounds
/// the reader's per-CPU state.
pub const MAX_CPUS: u32 = 8192;

/// Fixed part of one sample record; frames follow it in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SampleHeader {
    /// One of [`record_kind`].
    pub kind: u16,
    /// `size_of::<SampleHeader>()` when written, so a reader can skip fields it does
    /// not know about.
    pub header_len: u16,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU the sample was taken on.
    pub cpu: u32,
    /// Number of kernel frames that follow the header.
    pub kernel_frames: u16,
    /// Number of user frames that follow the kernel frames.
    pub user_frames: u16,
    /// 0, or the negative errno `bpf_get_stack` returned for the kernel stack
    /// (-14 EFAULT: the sample has no kernel stack, i.e. it was in user mode).
    pub kernel_status: i16,
    /// 0, or the negative errno for the user stack (-14 EFAULT: a kernel thread).
    pub user_status: i16,
    /// Name of the sampled thread, NUL padded; not written in a
    /// [`record_kind::NATIVE_STACKS_SAME_THREAD`] record.
    pub comm: [u8; TASK_COMM_LEN],
}

/// One ring buffer slot: header and room for every frame (only the frames in use
/// are written and read). Size: 40 + 256 x 8 = 2088 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleRecord {
    pub header: SampleHeader,
    pub frames: [u64; MAX_RECORD_FRAMES],
}

/// Frame slots in a [`UserRecord`]: the user stack alone, rounded up to a power of
/// two for the verifier's mask.
pub const MAX_USER_RECORD_FRAMES: usize = 128;

/// The slot of a sample that interrupted user code, which has no kernel stack: the
/// header and room for the user stack only. Size: 40 + 128 x 8 = 1 064 bytes, half a
/// [`SampleRecord`]. Measured on this project's VM, reserving it instead of the full
/// slot cut the BPF time of such a sample by ~15 % (fewer ring buffer pages and
/// lines touched). Same header and kind: a reader cannot tell them apart, nor needs to.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserRecord {
    pub header: SampleHeader,
    pub frames: [u64; MAX_USER_RECORD_FRAMES],
}

/// Counters kept by the eBPF program per CPU; userspace sums them. Every perf event
/// ends in exactly one of the first four, so their sum is the number of events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Records written to the ring buffer.
    Emitted = 0,
    /// Samples of the idle task that were not emitted (by choice, not a loss).
    IdleSkipped = 1,
    /// Samples of processes outside the pid filter (by choice, not a loss).
    FilteredOut = 2,
    /// LOSS: the ring buffer was full.
    RingBufferFull = 3,
    /// The kernel stack walk of a sample of kernel code failed, "no kernel stack"
    /// included (-EFAULT: the kernel's callchain buffers were in use); the sample
    /// is still emitted, without kernel frames.
    KernelStackError = 4,
    /// User stack walk failed with an error other than "no user stack"
    /// (the sample is still emitted, without user frames).
    UserStackError = 5,
    /// The frame-pointer walk of user code stopped at a frame pointer it could not
    /// follow (misaligned, unreadable, not above the last): code built without
    /// frame pointers. The frames found before it are emitted.
    UserWalkCut = 6,
}

/// Number of [`Counter`] slots.
pub const COUNTER_COUNT: usize = 7;

/// The counters of one CPU, indexed by [`Counter`].
pub type Counters = [u64; COUNTER_COUNT];

/// The per-CPU value of [`MAP_COUNTERS`]: 64 bytes, one cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    pub counters: Counters,
    /// 1 + the tid of this CPU's last record that carries `comm`, 0 before the
    /// first: the thread a [`record_kind::NATIVE_STACKS_SAME_THREAD`] record may
    /// refer to. Not a counter.
    pub comm_tid: u32,
    /// 1 + the tid of this CPU's last sample whose process was found past the
    /// young window ([`KernelOffsets::young_process_ns`]), or young but with no
    /// frame in a mapping not yet reported; 0 if none: its next samples skip the
    /// check (a process never gets younger; an exec keeps its start time). The
    /// check reads two cold lines of a `task_struct`, and a young one's search
    /// costs more; a busy CPU runs one thread for many samples in a row. Not a
    /// counter.
    pub settled_tid: u32,
}

impl Counter {
    /// All counters, in index order.
    pub const ALL: [Counter; COUNTER_COUNT] = [
        Counter::Emitted,
        Counter::IdleSkipped,
        Counter::FilteredOut,
        Counter::RingBufferFull,
        Counter::KernelStackError,
        Counter::UserStackError,
        Counter::UserWalkCut,
    ];

    /// True for counters that mean a sample was lost.
    pub const fn is_loss(self) -> bool {
        matches!(self, Counter::RingBufferFull)
    }

    /// True for the counters every perf event ends in exactly one of.
    pub const fn is_outcome(self) -> bool {
        (self as u32) <= Counter::RingBufferFull as u32
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)] plain data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::SampleHeader {}
    unsafe impl aya::Pod for super::SampleRecord {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::MappingRecord {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ExecRecord {}
}

const _: () = assert!(core::mem::size_of::<SampleHeader>() == 40);
const _: () = assert!(core::mem::size_of::<CpuState>() == 64);
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 16);
const _: () = assert!(core::mem::size_of::<KernelMapping>() == 40);
const _: () = assert!(core::mem::size_of::<MappingRecord>() == 64);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 56);
const _: () = assert!(core::mem::size_of::<ExecRecord>() == 272);
const _: () = assert!(core::mem::offset_of!(ExecRecord, path) == EXEC_HEADER_LEN);
const _: () = assert!(exec_record_len(MAX_EXEC_PATH - 1) == 272);
const _: () = assert!(exec_record_len(0) == 24);
const _: () = assert!(MAX_KNOWN_MAPPINGS.is_power_of_two());
const _: () = assert!(MAX_MAPPED_FRAMES.is_power_of_two());
const _: () = assert!(MAX_MAPPED_FRAMES <= MAX_STACK_DEPTH);
const _: () = assert!(COMM_READ_EVERY.is_power_of_two());
const _: () = assert!(2 * MAX_STACK_DEPTH <= MAX_RECORD_FRAMES);
const _: () = assert!(MAX_RECORD_FRAMES.is_power_of_two());
const _: () = assert!(MAX_STACK_DEPTH < MAX_USER_RECORD_FRAMES);
const _: () = assert!(MAX_USER_RECORD_FRAMES.is_power_of_two());
const _: () = assert!(core::mem::size_of::<UserRecord>() == 1064);
// The eBPF program writes both slots as "header, then frames".
const _: () = assert!(core::mem::offset_of!(SampleRecord, header) == 0);
const _: () = assert!(core::mem::offset_of!(UserRecord, header) == 0);
const _: () =
    assert!(core::mem::offset_of!(SampleRecord, frames) == core::mem::size_of::<SampleHeader>());
const _: () =
    assert!(core::mem::offset_of!(UserRecord, frames) == core::mem::size_of::<SampleHeader>());
const _: () = assert!(core::mem::size_of::<UserRecord>() < core::mem::size_of::<SampleRecord>());
const _: () = assert!(ring_buffer_bytes(2) == 1 << 20);
const _: () = assert!(ring_buffer_bytes(3) == 2 << 20);
const _: () = assert!(ring_buffer_bytes(64) == 32 << 20);
const _: () = assert!(ring_buffer_bytes(4096) == 64 << 20);
