//! Stack collection, one function per stack kind, so the user-stack walk can be
//! replaced (e.g. by an .eh_frame unwinder reading tables from maps) without touching
//! the rest of the program.
//!
//! Both write at most [`MAX_STACK_DEPTH`] instruction pointers, leaf first.

use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    cty::c_void,
    helpers::generated::{self as gen, bpf_get_stack},
    macros::map,
    maps::PerCpuArray,
    EbpfContext,
};
use profiler_common::MAX_STACK_DEPTH;

use crate::{field, set, PerfEventContext};

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

/// Bytes of user stack read at once: a frame's callers are usually a few dozen
/// bytes above it, so one read brings in many frames, and one helper call costs
/// about as much as copying a whole window (~90 ns in a VM).
const WINDOW_BYTES: u64 = 1024;
const WINDOW_WORDS: usize = (WINDOW_BYTES / 8) as usize;
/// Page size (x86-64, 4 KiB-page arm64): a window never crosses the end of the
/// page it starts in, so the walk never reads a page it would not have read a
/// frame from (the next mapping may be a device's).
const PAGE_BYTES: u64 = 4096;

/// One frame-pointer walk in progress, per CPU, read and written by the
/// `bpf_loop` body [`walk_window`]: 2 088 bytes per CPU.
#[repr(C)]
struct Walk {
    /// The frame pointer the next window is read from.
    fp: u64,
    /// Return addresses found so far, in `ips[1..frames]` (`ips[0]` is the
    /// interrupted ip, which the caller writes).
    frames: u64,
    cut: u64,
    ips: [u64; MAX_STACK_DEPTH + 1],
    /// Two words more than a window: the verifier does not know frame pointers
    /// are 8-byte aligned, and must see a pair read at any offset in the window
    /// stay in the value.
    window: [u64; WINDOW_WORDS + 2],
}

#[map]
static USER_WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// Follows the frame-pointer chain from `fp`, as the kernel's perf_callchain_user
/// does: `[fp]` is the caller's frame pointer, `[fp + 8]` the return address. Ends
/// at a null frame pointer or return address; stops, `cut`, at a misaligned or
/// non-ascending frame pointer or an unreadable frame.
///
/// The stack is read a window at a time (up to [`WINDOW_BYTES`] from the frame
/// pointer, not past its page's end), so most stacks take one or two reads, not
/// one per frame. The walk is a `bpf_loop` with one step per window (the verifier
/// checks its body once; unrolled, the refills multiplied the paths past its
/// limit), into a per-CPU buffer; then the frames are copied to `dst`.
#[cfg_attr(
    not(bpf_target_arch = "x86_64"),
    expect(dead_code, reason = "x86-64 only")
)]
#[inline(always)]
fn frame_pointer_walk(ip: u64, fp: u64, dst: *mut u64) -> Stack {
    // SAFETY (all writes to dst): index < MAX_STACK_DEPTH, and dst has that many slots.
    unsafe { *dst = ip };
    let Some(walk) = USER_WALK.get_ptr_mut(0) else {
        return Stack {
            frames: 1,
            status: 0,
            cut: true,
        };
    };
    // SAFETY: this CPU's walk (the program does not nest on one CPU).
    unsafe {
        set(&mut (*walk).fp, fp);
        set(&mut (*walk).frames, 1);
        set(&mut (*walk).cut, 0);
        gen::bpf_loop(
            (MAX_STACK_DEPTH - 1) as u32,
            walk_window as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        let frames = field(&(*walk).frames) & MAX_STACK_DEPTH as u64;
        for i in 1..MAX_STACK_DEPTH {
            if i as u64 >= frames {
                break;
            }
            *dst.add(i) = field(&(*walk).ips[i]);
        }
        Stack {
            frames,
            status: 0,
            cut: field(&(*walk).cut) != 0,
        }
    }
}

/// Frames followed inside one window before it is read again from the frame
/// pointer reached: a frame takes at least 16 bytes, so a window holds at most
/// this many (a chain of overlapping frames, 8 bytes apart, takes two reads).
const FRAMES_PER_WINDOW: usize = (WINDOW_BYTES / 16) as usize;

/// `bpf_loop` body: reads one window of stack from the frame pointer and follows
/// the chain inside it. Returns 1 when the walk is over, 0 to read the next window.
#[inline(never)]
extern "C" fn walk_window(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = USER_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's walk; indices masked to the arrays' sizes.
    unsafe {
        let base = field(&(*walk).fp);
        if base == 0 {
            return 1;
        }
        if base & 7 != 0 {
            set(&mut (*walk).cut, 1);
            return 1;
        }
        // To the end of the frame pointer's page, at most a window, and at least
        // the one frame (which may then cross into the next page).
        let to_page_end = PAGE_BYTES - (base & (PAGE_BYTES - 1));
        let len = to_page_end.clamp(16, WINDOW_BYTES);
        // User memory read through the helper, which handles faults, into this
        // CPU's window (len <= WINDOW_BYTES).
        let read = gen::bpf_probe_read_user(
            (*walk).window.as_mut_ptr().cast(),
            len as u32,
            base as *const c_void,
        );
        if read != 0 {
            set(&mut (*walk).cut, 1);
            return 1;
        }
        let mut fp = base;
        let mut done = false;
        for _ in 0..FRAMES_PER_WINDOW {
            let offset = fp - base;
            if offset + 16 > len {
                break;
            }
            let at = offset as usize & (WINDOW_BYTES as usize - 1);
            let pair = (*walk).window.as_ptr().cast::<u8>().add(at).cast::<u64>();
            let next_fp = pair.read_unaligned();
            let ret = pair.add(1).read_unaligned();
            // The count goes through the map (a load the compiler cannot see
            // through): its bound is then checked where the verifier sees it.
            let frames = field(&(*walk).frames);
            if ret == 0 || frames >= MAX_STACK_DEPTH as u64 {
                done = true;
                break;
            }
            set(&mut (*walk).ips[frames as usize & MAX_STACK_DEPTH], ret);
            set(&mut (*walk).frames, frames + 1);
            if next_fp <= fp || next_fp & 7 != 0 {
                if next_fp != 0 {
                    set(&mut (*walk).cut, 1);
                }
                done = true;
                break;
            }
            fp = next_fp;
        }
        set(&mut (*walk).fp, fp);
        if done {
            return 1;
        }
    }
    0
}
