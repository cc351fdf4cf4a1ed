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
/// Per-CPU array of `u64` counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Hash set of tgids to sample when [`GLOBAL_FILTER_BY_PID`] is set.
pub const MAP_PID_FILTER: &str = "PID_FILTER";
/// Per-CPU scratch space where a record is assembled before it is copied out.
pub const MAP_SCRATCH: &str = "SCRATCH";

/// Global `u8`: non-zero means "sample only tgids present in [`MAP_PID_FILTER`]".
pub const GLOBAL_FILTER_BY_PID: &str = "FILTER_BY_PID";
/// Global `u8`: non-zero means "also emit samples of the idle task (pid 0)".
pub const GLOBAL_INCLUDE_IDLE: &str = "INCLUDE_IDLE";
/// Global `u64`: wake the reader once this many bytes are waiting (otherwise the
/// reader polls on a timer, which keeps wakeups off the per-sample path).
pub const GLOBAL_WAKEUP_BYTES: &str = "WAKEUP_BYTES";

/// Frames per stack kind, as in perf (`kernel.perf_event_max_stack` defaults to 127).
pub const MAX_STACK_DEPTH: usize = 127;
/// Frame slots in one record: kernel + user, rounded up to a power of two so the eBPF
/// program can bound the copied size with a mask the verifier understands.
pub const MAX_RECORD_FRAMES: usize = 256;
/// Kernel task name length, NUL padded.
pub const TASK_COMM_LEN: usize = 16;

/// Default ring buffer size: 8 MiB of kernel memory (one allocation, shared by all
/// CPUs). At 997 Hz on 64 busy CPUs with ~600-byte records that is ~130 ms of samples
/// at the reader's slowest poll.
pub const RING_BUFFER_BYTES: u32 = 8 << 20;
/// Default wake-up threshold: a quarter of the ring.
pub const WAKEUP_BYTES: u64 = (RING_BUFFER_BYTES / 4) as u64;
/// Entries in the pid filter: 1024 x (4-byte key + 1-byte value + ~50 bytes of kernel
/// hash overhead) is about 55 KiB.
pub const MAX_PID_FILTER_ENTRIES: u32 = 1024;

/// The kind of record in the ring buffer, so the record can grow new shapes (e.g. a
/// stack unwound from .eh_frame, or one that carries a stack id) without ambiguity.
pub mod record_kind {
    /// [`SampleHeader`](super::SampleHeader) followed by `kernel_frames` then
    /// `user_frames` instruction pointers (`u64`, leaf first).
    pub const NATIVE_STACKS: u16 = 1;
}

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
    /// `bpf_ktime_get_ns()` at the sample.
    pub time_ns: u64,
    /// Name of the sampled thread, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
}

/// The per-CPU scratch record: header and room for every frame.
/// Size: 48 + 256 x 8 = 2096 bytes per CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SampleRecord {
    pub header: SampleHeader,
    pub frames: [u64; MAX_RECORD_FRAMES],
}

/// Size in bytes of a record carrying `frames` instruction pointers.
pub const fn record_len(frames: usize) -> usize {
    core::mem::size_of::<SampleHeader>() + frames * 8
}

/// Counters kept by the eBPF program, one slot per CPU each; userspace sums them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Times the program ran (perf events delivered to it).
    Events = 0,
    /// Records written to the ring buffer.
    Emitted = 1,
    /// Samples of the idle task that were not emitted (by choice, not a loss).
    IdleSkipped = 2,
    /// Samples of processes outside the pid filter (by choice, not a loss).
    FilteredOut = 3,
    /// LOSS: the ring buffer was full.
    RingBufferFull = 4,
    /// LOSS: the per-CPU scratch record could not be looked up.
    NoScratch = 5,
    /// Kernel stack walk failed with an error other than "no kernel stack"
    /// (the sample is still emitted, without kernel frames).
    KernelStackError = 6,
    /// User stack walk failed with an error other than "no user stack"
    /// (the sample is still emitted, without user frames).
    UserStackError = 7,
}

/// Number of [`Counter`] slots.
pub const COUNTER_COUNT: u32 = 8;

impl Counter {
    /// All counters, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Events,
        Counter::Emitted,
        Counter::IdleSkipped,
        Counter::FilteredOut,
        Counter::RingBufferFull,
        Counter::NoScratch,
        Counter::KernelStackError,
        Counter::UserStackError,
    ];

    /// True for counters that mean a sample was lost.
    pub const fn is_loss(self) -> bool {
        matches!(self, Counter::RingBufferFull | Counter::NoScratch)
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)] plain data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::SampleHeader {}
    unsafe impl aya::Pod for super::SampleRecord {}
}

const _: () = assert!(core::mem::size_of::<SampleHeader>() == 48);
const _: () = assert!(2 * MAX_STACK_DEPTH <= MAX_RECORD_FRAMES);
const _: () = assert!(MAX_RECORD_FRAMES.is_power_of_two());
