//! The eBPF sampler: one perf_event program, attached to the software cpu-clock event
//! on every online CPU. Each time it fires it writes one record to the ring buffer:
//! [`SampleHeader`] (tgid, tid, cpu, comm) followed by the kernel and user
//! instruction pointers, leaf first. Userspace does everything else. `comm` is
//! read only when the CPU's thread changed (and now and then anyway): see
//! `record_kind::NATIVE_STACKS_SAME_THREAD`. A sample of a process started in the
//! last 2 s may be followed by a record of a mapping its frames run in
//! (`mappings.rs`), which names them if the process exits before userspace reads
//! its `/proc` entry.
//!
//! The record is reserved in the ring buffer and the kernel stack is walked straight
//! into it; the user stack is walked from a per-CPU window of stack memory and then
//! copied in (`stacks.rs`). At 97 Hz every sample finds the caches cold, and cold
//! lines and helper calls are most of its cost.
//! A sample of user code has no kernel stack, so it reserves the smaller
//! [`UserRecord`]; a sample in the kernel reserves the full [`SampleRecord`].
//!
//! Owns: the maps below and the per-sample path. Must never: lose a sample without
//! counting it in [`COUNTERS`], or aggregate in the kernel (no stack map, so no hash
//! collision can drop or merge stacks).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod mappings;
mod process_events;
mod stacks;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id},
    macros::{map, perf_event},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use profiler_common::{
    record_kind, Counter, Counters, CpuState, SampleHeader, SampleRecord, UserRecord,
    COMM_READ_EVERY, MAX_PID_FILTER_ENTRIES, MAX_STACK_DEPTH, RING_BUFFER_BYTES,
    WAKEUP_FILL_DIVISOR,
};

/// Samples to userspace, one [`SampleRecord`]-sized slot each, or a
/// [`UserRecord`] (half the size) for a sample of user code (only the frames in use
/// are written or read); the mapping records of `mappings.rs`; and the fork and exec
/// events of `process_events.rs`.
/// Size: set by userspace at load time, 512 KiB per CPU
/// (profiler_common::ring_buffer_bytes), 1 MiB on 2 CPUs.
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// Per-CPU counters (see [`Counter`]) and the threads the CPU last named and
/// settled (see [`CpuState`]): one entry, 64 bytes per CPU.
#[map]
pub static COUNTERS: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// tgids to sample when `FILTER_BY_PID` is set. Size: ~55 KiB
/// ([`MAX_PID_FILTER_ENTRIES`] entries).
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PID_FILTER_ENTRIES, 0);

/// Set by userspace at load time (see profiler_common::GLOBAL_*).
#[no_mangle]
static FILTER_BY_PID: u8 = 0;
#[no_mangle]
static INCLUDE_IDLE: u8 = 0;

/// Bytes of header before the frames.
const HEADER_LEN: u16 = core::mem::size_of::<SampleHeader>() as u16;

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    let Some(state) = COUNTERS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's entry; the program does not nest on one CPU.
    let state = unsafe { &mut *state };
    if let Err(outcome) = try_sample_cpu(&ctx, state) {
        bump(&mut state.counters, outcome);
    }
    0
}

#[inline(always)]
fn bump(counters: &mut Counters, counter: Counter) {
    // `get_mut`, not indexing: no panic path for the verifier to reject.
    if let Some(slot) = counters.get_mut(counter as usize) {
        *slot += 1;
    }
}

/// A store kept as one store (not merged, split or dropped by the compiler).
#[inline(always)]
fn set<T>(dst: &mut T, value: T) {
    // SAFETY: a plain store to a valid place, kept as one store.
    unsafe { core::ptr::write_volatile(dst, value) }
}

/// A load kept as one load: of a global set at load time, so the compiler does not
/// fold in the compile-time default; of a map value's field, so the verifier checks
/// the value from what it knows of the loaded width, not from what the compiler
/// inferred.
#[inline(always)]
fn field<T: Copy>(src: &T) -> T {
    // SAFETY: a plain load of a valid, initialized place.
    unsafe { core::ptr::read_volatile(src) }
}

/// Reads a `T` at `base + offset` in kernel memory (a field whose offset userspace
/// found in the kernel's BTF); `None` if it faults.
#[inline(always)]
fn read_kernel<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: a kernel read through the helper, which handles faults.
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}

/// Builds and emits one record. `Err` names the counter that explains why not.
#[inline(always)]
fn try_sample_cpu(ctx: &PerfEventContext, state: &mut CpuState) -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;

    if tgid == 0 && field(&INCLUDE_IDLE) == 0 {
        return Err(Counter::IdleSkipped);
    }
    // SAFETY: lookup in our own hash map; the value is not used.
    if field(&FILTER_BY_PID) != 0 && unsafe { PID_FILTER.get(tgid) }.is_none() {
        return Err(Counter::FilteredOut);
    }

    let young = mappings::is_young(state, pid_tgid as u32);
    if stacks::interrupted_user_mode(ctx) {
        emit::<UserRecord>(ctx, state, pid_tgid, false, young)
    } else {
        emit::<SampleRecord>(ctx, state, pid_tgid, true, young)
    }
}

/// Reserves a `T`, walks the stacks into it (the kernel stack only when `in_kernel`;
/// a `UserRecord` has room for the user stack alone) and submits it. `T` is a
/// [`SampleRecord`] or a [`UserRecord`]: both have the header at offset 0 and the
/// frames right after it (asserted in profiler_common).
#[inline(always)]
fn emit<T: 'static>(
    ctx: &PerfEventContext,
    state: &mut CpuState,
    pid_tgid: u64,
    in_kernel: bool,
    young: bool,
) -> Result<(), Counter> {
    let counters = &mut state.counters;
    let mut entry = SAMPLES.reserve::<T>(0).ok_or(Counter::RingBufferFull)?;
    let slot = entry.as_mut_ptr().cast::<u8>();
    // SAFETY: the reserved slot is ours until submit, laid out as said above; only
    // the fields below are written (and only they are read by userspace).
    let (header, frames) = unsafe {
        (
            &mut *slot.cast::<SampleHeader>(),
            slot.add(HEADER_LEN as usize).cast::<u64>(),
        )
    };

    let kernel = if in_kernel {
        stacks::kernel_stack(ctx, frames)
    } else {
        stacks::Stack {
            frames: 0,
            status: stacks::NO_STACK,
            cut: false,
        }
    };
    // A sample of kernel code always has a kernel stack: any error, "no stack"
    // (-EFAULT: the perf callchain buffers were busy) included, lost its frames.
    if in_kernel && kernel.status != 0 {
        bump(counters, Counter::KernelStackError);
    }
    // User frames go right after the kernel frames: at most 2 x MAX_STACK_DEPTH in
    // all, inside MAX_RECORD_FRAMES (the mask makes the bound visible to the verifier;
    // in a UserRecord the offset is 0).
    // SAFETY: offset <= MAX_STACK_DEPTH.
    let user_dst = unsafe { frames.add((kernel.frames as usize) & MAX_STACK_DEPTH) };
    let user = stacks::user_stack(ctx, user_dst);
    if user.status != 0 && user.status != stacks::NO_STACK {
        bump(counters, Counter::UserStackError);
    }
    if user.cut {
        bump(counters, Counter::UserWalkCut);
    }

    // The thread name is read only when this CPU's last record was of another
    // thread, and on every COMM_READ_EVERY-th record; otherwise the reader takes
    // it from that record.
    let emitted = counters.first().copied().unwrap_or(0); // Counter::Emitted
    let comm_tid = (pid_tgid as u32).wrapping_add(1);
    if state.comm_tid == comm_tid && emitted & (COMM_READ_EVERY - 1) != 0 {
        header.kind = record_kind::NATIVE_STACKS_SAME_THREAD;
    } else {
        header.kind = record_kind::NATIVE_STACKS;
        header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        state.comm_tid = comm_tid;
    }
    header.header_len = HEADER_LEN;
    header.tgid = (pid_tgid >> 32) as u32;
    header.tid = pid_tgid as u32;
    // SAFETY: a plain helper call without pointer arguments.
    header.cpu = unsafe { bpf_get_smp_processor_id() };
    header.kernel_frames = kernel.frames as u16;
    header.user_frames = user.frames as u16;
    header.kernel_status = kernel.status as i16;
    header.user_status = user.status as i16;

    if young {
        // A young process's new mapping goes in a record of its own (see
        // mappings.rs). The frame count is read back from the record: a load from
        // ring buffer memory is a number the verifier knows nothing of, so it
        // checks the mappings code once, not once for each of the walk's ~127
        // ways to end.
        // SAFETY: the field written just above, in our reserved slot.
        let frames = unsafe { core::ptr::read_volatile(&header.user_frames) };
        mappings::report(
            &mut state.settled_tid,
            (pid_tgid >> 32) as u32,
            pid_tgid as u32,
            user_dst,
            frames as u64,
        );
    }

    // Wake the reader only once 1/WAKEUP_FILL_DIVISOR of the ring waits to be read;
    // otherwise its timer finds the record. A wake-up queues an irq_work (on this
    // VM a self-IPI), and waking on every 32nd record of a CPU made a sample cost
    // ~1.3 times as much as waking on every 1024th. Both figures the helper reads
    // (the positions and the ring's size) sit on pages the reservation touched.
    let unread = SAMPLES.query(BPF_RB_AVAIL_DATA as u64);
    let flags = if unread >= SAMPLES.query(BPF_RB_RING_SIZE as u64) / WAKEUP_FILL_DIVISOR {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
    bump(counters, Counter::Emitted);
    Ok(())
}

/// The host build exists only so that clippy can lint this program on the host.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel only runs GPL-compatible programs that call bpf_get_stack.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
