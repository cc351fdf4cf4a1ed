//! The eBPF sampler: one perf_event program, attached to the software cpu-clock event
//! on every online CPU. Each time it fires it writes one record to the ring buffer:
//! [`SampleHeader`] (tgid, tid, cpu, comm, time) followed by the kernel and user
//! instruction pointers, leaf first. Userspace does everything else.
//!
//! Owns: the maps below and the per-sample path. Must never: lose a sample without
//! counting it in [`COUNTERS`], or aggregate in the kernel (no stack map, so no hash
//! collision can drop or merge stacks).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod stacks;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::{map, perf_event},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::PerfEventContext,
};
use profiler_common::{
    record_kind, Counter, SampleHeader, SampleRecord, COUNTER_COUNT, MAX_PID_FILTER_ENTRIES,
    MAX_RECORD_FRAMES, MAX_STACK_DEPTH, RING_BUFFER_BYTES, WAKEUP_BYTES as DEFAULT_WAKEUP_BYTES,
};

/// Samples to userspace. Size: [`RING_BUFFER_BYTES`] (8 MiB by default; userspace may
/// resize it at load time).
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// Per-CPU counters, see [`Counter`]. Size: 8 x 8 bytes per CPU.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// tgids to sample when `FILTER_BY_PID` is set. Size: ~55 KiB
/// ([`MAX_PID_FILTER_ENTRIES`] entries).
#[map]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PID_FILTER_ENTRIES, 0);

/// Where a record is assembled before it is copied out with its real length.
/// Size: 2096 bytes per CPU.
#[map]
static SCRATCH: PerCpuArray<SampleRecord> = PerCpuArray::with_max_entries(1, 0);

/// Set by userspace at load time (see profiler_common::GLOBAL_*).
#[no_mangle]
static FILTER_BY_PID: u8 = 0;
#[no_mangle]
static INCLUDE_IDLE: u8 = 0;
#[no_mangle]
static WAKEUP_BYTES: u64 = DEFAULT_WAKEUP_BYTES;

/// Bytes of header before the frames.
const HEADER_LEN: u64 = core::mem::size_of::<SampleHeader>() as u64;

#[perf_event]
pub fn sample_cpu(ctx: PerfEventContext) -> u32 {
    bump(Counter::Events);
    if let Err(counter) = try_sample_cpu(&ctx) {
        bump(counter);
    }
    0
}

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot; the program does not nest on one CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn global_u8(value: &u8) -> u8 {
    // SAFETY: a global set at load time; read_volatile keeps the compiler from
    // folding in the compile-time default.
    unsafe { core::ptr::read_volatile(value) }
}

/// Builds and emits one record. `Err` names the counter that explains why not.
#[inline(always)]
fn try_sample_cpu(ctx: &PerfEventContext) -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;

    if tgid == 0 && global_u8(&INCLUDE_IDLE) == 0 {
        return Err(Counter::IdleSkipped);
    }
    // SAFETY: lookup in our own hash map; the value is not used.
    if global_u8(&FILTER_BY_PID) != 0 && unsafe { PID_FILTER.get(tgid) }.is_none() {
        return Err(Counter::FilteredOut);
    }

    let record = SCRATCH.get_ptr_mut(0).ok_or(Counter::NoScratch)?;
    // SAFETY: the per-CPU scratch entry exists for the life of the map and only this
    // program, which cannot nest on one CPU, touches it.
    let record = unsafe { &mut *record };

    let kernel = stacks::kernel_stack(ctx, record.frames.as_mut_ptr());
    if kernel.status != 0 && kernel.status != stacks::NO_STACK {
        bump(Counter::KernelStackError);
    }
    // User frames go right after the kernel frames. `kernel.frames` is at most
    // MAX_STACK_DEPTH, so this stays inside `frames` (the verifier checks it too).
    // SAFETY: offset <= MAX_STACK_DEPTH and MAX_STACK_DEPTH * 2 <= MAX_RECORD_FRAMES.
    let user_dst = unsafe {
        record
            .frames
            .as_mut_ptr()
            .add((kernel.frames as usize) & MAX_STACK_DEPTH)
    };
    let user = stacks::user_stack(ctx, user_dst);
    if user.status != 0 && user.status != stacks::NO_STACK {
        bump(Counter::UserStackError);
    }

    let header = &mut record.header;
    header.kind = record_kind::NATIVE_STACKS;
    header.header_len = HEADER_LEN as u16;
    header.tgid = tgid;
    header.tid = tid;
    // SAFETY: plain helper calls without pointer arguments.
    header.cpu = unsafe { bpf_get_smp_processor_id() };
    header.time_ns = unsafe { bpf_ktime_get_ns() };
    header.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    header.kernel_frames = kernel.frames as u16;
    header.user_frames = user.frames as u16;
    header.kernel_status = kernel.status as i16;
    header.user_status = user.status as i16;

    // Copy out only the frames in use; the mask proves the bound to the verifier.
    let frames = (kernel.frames + user.frames) & (MAX_RECORD_FRAMES as u64 - 1);
    let len = HEADER_LEN + frames * 8;
    let flags = if SAMPLES.query(BPF_RB_AVAIL_DATA as u64) + len >= wakeup_bytes() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    // SAFETY: `record` is `len <= size_of::<SampleRecord>()` readable bytes.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_ringbuf_output(
            core::ptr::from_ref(&SAMPLES).cast_mut().cast(),
            core::ptr::from_mut(record).cast(),
            len,
            flags as u64,
        )
    };
    if ret < 0 {
        return Err(Counter::RingBufferFull);
    }
    bump(Counter::Emitted);
    Ok(())
}

#[inline(always)]
fn wakeup_bytes() -> u64 {
    // SAFETY: as in `global_u8`.
    unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) }
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
