//! Stack collection, one function per stack kind, so the user-stack walk can be
//! replaced (e.g. by an .eh_frame unwinder reading tables from maps) without touching
//! the rest of the program.
//!
//! Both write at most [`MAX_STACK_DEPTH`] instruction pointers, leaf first.

use aya_ebpf::{bindings::BPF_F_USER_STACK, helpers::generated::bpf_get_stack, EbpfContext};
use profiler_common::MAX_STACK_DEPTH;

use crate::PerfEventContext;

/// `bpf_get_stack` returns -EFAULT when the sample has no stack of that kind
/// (a user-mode sample has no kernel stack; a kernel thread has no user stack).
pub const NO_STACK: i64 = -14;

/// The outcome of one walk.
pub struct Stack {
    /// Frames written, `0..=MAX_STACK_DEPTH`.
    pub frames: u64,
    /// 0, or the negative errno of the walk.
    pub status: i64,
}

const STACK_BYTES: u32 = (MAX_STACK_DEPTH * 8) as u32;

#[inline(always)]
fn walk(ctx: &PerfEventContext, dst: *mut u64, flags: u64) -> Stack {
    // SAFETY: `dst` points at MAX_STACK_DEPTH writable u64 slots of the scratch record.
    let ret = unsafe { bpf_get_stack(ctx.as_ptr(), dst.cast(), STACK_BYTES, flags) };
    if ret < 0 {
        Stack {
            frames: 0,
            status: ret,
        }
    } else {
        Stack {
            // The mask keeps the bound visible to the verifier.
            frames: ((ret as u64) / 8) & (MAX_STACK_DEPTH as u64),
            status: 0,
        }
    }
}

/// Kernel stack of the interrupted context, via the kernel's own unwinder.
#[inline(always)]
pub fn kernel_stack(ctx: &PerfEventContext, dst: *mut u64) -> Stack {
    walk(ctx, dst, 0)
}

/// User stack by frame-pointer walk (the kernel's perf callchain code).
#[inline(always)]
pub fn user_stack(ctx: &PerfEventContext, dst: *mut u64) -> Stack {
    walk(ctx, dst, BPF_F_USER_STACK as u64)
}
