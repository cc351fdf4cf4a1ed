//! Stack collection, one function per stack kind, so the user-stack walk can be
//! replaced (e.g. by an .eh_frame unwinder reading tables from maps) without touching
//! the rest of the program.
//!
//! Both write at most [`MAX_STACK_DEPTH`] instruction pointers, leaf first.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_probe_read_user, generated::bpf_get_stack},
    EbpfContext,
};
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
    /// The frame-pointer walk stopped at a frame pointer it could not follow
    /// (misaligned, unreadable, or not above the last one) rather than at the
    /// chain's end or the depth limit: what code built without frame pointers does.
    pub cut: bool,
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
            cut: false,
        }
    } else {
        Stack {
            // The mask keeps the bound visible to the verifier.
            frames: ((ret as u64) / 8) & (MAX_STACK_DEPTH as u64),
            status: 0,
            cut: false,
        }
    }
}

/// True when the sample interrupted user code, which has no kernel stack to walk.
#[inline(always)]
pub fn interrupted_user_mode(ctx: &PerfEventContext) -> bool {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        // SAFETY: reading the saved registers of a perf_event context is allowed;
        // the low two bits of CS are the privilege level (3 = user).
        unsafe { (*ctx.ctx).regs.cs & 3 == 3 }
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        let _ = ctx;
        false
    }
}

/// Kernel stack of the interrupted context, via the kernel's own unwinder. A sample
/// of user code skips the helper call: it would only find no kernel stack.
#[inline(always)]
pub fn kernel_stack(ctx: &PerfEventContext, dst: *mut u64) -> Stack {
    if interrupted_user_mode(ctx) {
        return Stack {
            frames: 0,
            status: NO_STACK,
            cut: false,
        };
    }
    walk(ctx, dst, 0)
}

/// User stack by frame-pointer walk. A sample of 64-bit user code is walked here,
/// from the interrupted registers; otherwise (the sample is in the kernel, whose
/// saved user registers only the kernel can reach) by the kernel's perf callchain
/// code.
#[inline(always)]
pub fn user_stack(ctx: &PerfEventContext, dst: *mut u64) -> Stack {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        /// The code segment selector of 64-bit user mode (__USER_CS).
        const USER_CS_64: u64 = 0x33;
        // SAFETY: reading the saved registers of a perf_event context is allowed.
        let regs = unsafe { &(*ctx.ctx).regs };
        if regs.cs == USER_CS_64 {
            return frame_pointer_walk(regs.rip, regs.rbp, dst);
        }
    }
    walk(ctx, dst, BPF_F_USER_STACK as u64)
}

/// Follows the frame-pointer chain from `fp`, as the kernel's perf_callchain_user
/// does: `[fp]` is the caller's frame pointer, `[fp + 8]` the return address. Ends
/// at a null frame pointer or return address; stops, `cut`, at a misaligned or
/// non-ascending frame pointer or an unreadable frame.
/// Each frame is read onto the program's stack (16 bytes), which stays in cache.
#[cfg_attr(
    not(bpf_target_arch = "x86_64"),
    expect(dead_code, reason = "x86-64 only")
)]
#[inline(always)]
fn frame_pointer_walk(ip: u64, mut fp: u64, dst: *mut u64) -> Stack {
    // SAFETY (all writes to dst): index < MAX_STACK_DEPTH, and dst has that many slots.
    unsafe { *dst = ip };
    let mut frames: u64 = 1;
    let mut cut = false;
    for i in 1..MAX_STACK_DEPTH {
        if fp == 0 {
            break;
        }
        if fp & 7 != 0 {
            cut = true;
            break;
        }
        // SAFETY: user memory read through the helper, which handles faults.
        let Ok([next_fp, ret]) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
            cut = true;
            break;
        };
        if ret == 0 {
            break;
        }
        unsafe { *dst.add(i & MAX_STACK_DEPTH) = ret };
        frames = i as u64 + 1;
        if next_fp <= fp {
            cut = next_fp != 0;
            break;
        }
        fp = next_fp;
    }
    Stack {
        frames,
        status: 0,
        cut,
    }
}
