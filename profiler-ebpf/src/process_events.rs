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
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use profiler_common::{record_kind, ProcessEvent};

use crate::{global, SAMPLES};

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
    let offset = global(&TASK_PID_OFFSET);
    if clone_flags & CLONE_THREAD != 0 || offset == 0 {
        return 0;
    }
    let task: *const u8 = ctx.arg(0);
    // SAFETY: a kernel read through the helper, which handles faults.
    let Ok(pid) =
        (unsafe { bpf_probe_read_kernel(task.wrapping_add(offset as usize).cast::<u32>()) })
    else {
        return 0;
    };
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit(record_kind::PROCESS_FORKED, pid, parent);
    0
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *)`,
/// in the context of the process that exec'd.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn on_exec(_ctx: RawTracePointContext) -> i32 {
    if global(&TASK_PID_OFFSET) == 0 {
        return 0;
    }
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit(record_kind::PROCESS_EXECED, pid, 0);
    0
}

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
        None => {
            if let Some(lost) = PROCESS_EVENTS_LOST.get_ptr_mut(0) {
                // SAFETY: this CPU's entry; the program does not nest on one CPU.
                unsafe { *lost += 1 };
            }
        }
    }
}
