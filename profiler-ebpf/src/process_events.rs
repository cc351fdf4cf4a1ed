//! Process tree events: a [`ProcessEvent`] for each new process (not thread) and
//! each exec, into the samples' ring buffer, so the reader learns that a process was
//! forked before it sees any sample of it. A process forked without an exec shares
//! its parent's mappings; if it exits before the reader can read its own, it is
//! named from its parent's.
//!
//! These programs run once per fork and per exec, never per sample. Must never:
//! cost the sampling path anything, or lose an event without counting it in
//! [`PROCESS_EVENTS_LOST`].

use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use profiler_common::{exec_record_len, record_kind, ExecRecord, ProcessEvent, EXEC_HEADER_LEN};

use crate::{
    field,
    mappings::{KERNEL_OFFSETS, YOUNG_MAPPINGS},
    read_kernel, COUNTERS, SAMPLES,
};

/// Events lost to a full ring buffer: one `u64` per CPU.
#[map]
static PROCESS_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Byte offset of `pid` in `task_struct`, set by userspace from the kernel's BTF;
/// 0 (unknown) turns fork events off. Userspace attaches these programs only
/// without a pid filter (children of the chosen processes are not sampled).
#[no_mangle]
static TASK_PID_OFFSET: u32 = 0;

/// `clone` flag of a new thread in the caller's process (include/uapi/linux/sched.h).
const CLONE_THREAD: u64 = 0x0001_0000;

/// `task_newtask(struct task_struct *task, unsigned long clone_flags)`, in the
/// parent's context once the child has its pid.
#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn on_fork(ctx: RawTracePointContext) -> i32 {
    let clone_flags: u64 = ctx.arg(1);
    let offset = field(&TASK_PID_OFFSET);
    if clone_flags & CLONE_THREAD != 0 || offset == 0 {
        return 0;
    }
    let task: u64 = ctx.arg(0);
    let Some(pid) = read_kernel::<u32>(task, offset) else {
        return 0;
    };
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A new process under the pid: what a process before it had mapped is not its.
    let _ = YOUNG_MAPPINGS.remove(pid);
    emit(record_kind::PROCESS_FORKED, pid, parent);
    0
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *)`,
/// in the context of the process that exec'd. With the offset of the program's
/// path in `linux_binprm`, the event carries the path ([`ExecRecord`]).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(ctx: RawTracePointContext) -> i32 {
    if field(&TASK_PID_OFFSET) == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    // A new address space: the mappings found before the exec are gone, and the
    // thread, if this CPU had settled it, must be looked at again.
    let _ = YOUNG_MAPPINGS.remove(pid);
    if let Some(state) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: this CPU's entry, one field of it. A sample that interrupts
        // this program on this CPU may settle the thread again in between: that
        // costs its mappings a look, never a name's correctness.
        unsafe {
            if (*state).settled_tid == (pid_tgid as u32).wrapping_add(1) {
                (*state).settled_tid = 0;
            }
        }
    }
    let filename_offset = field(&KERNEL_OFFSETS.binprm_filename);
    if filename_offset == 0 {
        emit(record_kind::PROCESS_EXECED, pid, 0);
        return 0;
    }
    let bprm: u64 = ctx.arg(2);
    let Some(record) = EXEC_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch (the program does not nest on one CPU); kernel
    // reads go through the helpers, which handle faults. A path that cannot be read
    // is left empty.
    let path_len = unsafe {
        (*record).kind = record_kind::PROCESS_EXECED_PATH;
        (*record).header_len = EXEC_HEADER_LEN as u16;
        (*record).pid = pid;
        (*record).reserved = 0;
        let read = read_kernel::<*const u8>(bprm, filename_offset).and_then(|filename| {
            bpf_probe_read_kernel_str_bytes(filename, &mut (*record).path).ok()
        });
        let len = read.map_or(0, |path| path.len());
        if len == 0 {
            (*record).path[0] = 0;
        }
        (*record).path_len = len as u32;
        len
    };
    // Only the path's bytes go into the ring (at most the whole record).
    let size = exec_record_len(path_len).min(core::mem::size_of::<ExecRecord>());
    // SAFETY: `size` bytes of this CPU's scratch record, which has that many.
    let bytes = unsafe { core::slice::from_raw_parts(record.cast::<u8>(), size) };
    if SAMPLES
        .output::<[u8]>(bytes, BPF_RB_NO_WAKEUP as u64)
        .is_err()
    {
        count_lost();
    }
    0
}

/// The exec record being written: 272 bytes per CPU.
#[map]
static EXEC_SCRATCH: PerCpuArray<ExecRecord> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn emit(kind: u16, pid: u32, parent: u32) {
    match SAMPLES.reserve::<ProcessEvent>(0) {
        Some(mut entry) => {
            entry.write(ProcessEvent {
                kind,
                header_len: core::mem::size_of::<ProcessEvent>() as u16,
                pid,
                parent,
                reserved: 0,
            });
            // The reader's timer finds it, before the child's first samples.
            entry.submit(BPF_RB_NO_WAKEUP as u64);
        }
        None => count_lost(),
    }
}

#[inline(always)]
fn count_lost() {
    if let Some(lost) = PROCESS_EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's entry; the program does not nest on one CPU.
        unsafe { *lost += 1 };
    }
}
