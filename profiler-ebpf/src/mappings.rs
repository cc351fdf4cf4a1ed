//! The mappings of young processes: for a sample of a process started less than
//! `KERNEL_OFFSETS.young_process_ns` ago, a [`MappingRecord`] of one mapping its
//! user frames run in that the program has not reported for the process yet,
//! emitted right after the sample's record.
//!
//! Userspace names user frames from `/proc/PID/maps`, read on a process's first
//! sample. A process that exec'd and exited within a millisecond or two (a shell a
//! script runs, a compiler driver) is gone before that; its samples would stay
//! unnamed. The kernel still has its memory map when the sample is taken, so the
//! program looks the mapping up there (`bpf_find_vma`) and sends what
//! `/proc/PID/maps` would have said, with the file's device and inode in place of
//! its path: userspace names the file from the binaries it holds open for other
//! processes (libc, ld.so), or from the path the exec event carried.
//!
//! One lookup per sample: with interrupts off (a perf event's handler), the kernel
//! defers the unlock of the memory map to an irq_work that only runs after the
//! program returns, and refuses a second lookup until then. So each sample looks up
//! the first of its frames outside the mappings found for the process so far
//! ([`YOUNG_MAPPINGS`]), and a process's few mappings are found over its first
//! few samples; a sample whose frames are all known costs the search alone.
//!
//! Costs a process older than the window one look at its start time (two reads)
//! each time a CPU switches to one of its threads, and nothing while the CPU stays
//! on that thread.
//! Must never: lose the sample because of its mappings (a full ring buffer or a
//! failed lookup only costs names, and is counted in [`MAPPINGS_STATS`]).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    cty::c_void,
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            self as gen, bpf_find_vma, bpf_get_current_task, bpf_get_current_task_btf, bpf_loop,
        },
    },
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use profiler_common::{
    record_kind, CpuState, KernelMapping, KernelOffsets, MappingRecord, MappingsCounter,
    MAPPINGS_COUNTER_COUNT, MAX_KNOWN_MAPPINGS, MAX_MAPPED_FRAMES, MAX_YOUNG_PROCESSES,
    TASK_COMM_LEN,
};

use crate::{field, read_kernel, set, SAMPLES};

/// Per-CPU [`MappingsCounter`]s: 32 bytes per CPU, touched only by samples of
/// young processes.
#[map]
static MAPPINGS_STATS: PerCpuArray<[u64; MAPPINGS_COUNTER_COUNT]> =
    PerCpuArray::with_max_entries(1, 0);

/// Set by userspace at load time from the kernel's BTF; all zero (off) otherwise.
#[no_mangle]
pub static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    young_process_ns: 0,
    task_group_leader: 0,
    task_start_time: 0,
    vma_start: 0,
    vma_end: 0,
    vma_pgoff: 0,
    vma_file: 0,
    file_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    binprm_filename: 0,
    reserved: 0,
};

/// `PAGE_SHIFT` of x86-64 and of 4 KiB-page arm64: `vm_pgoff` counts pages.
const PAGE_SHIFT: u32 = 12;

#[inline(always)]
fn count(counter: MappingsCounter) {
    if let Some(stats) = MAPPINGS_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's entry; the program does not nest on one CPU.
        if let Some(slot) = unsafe { (*stats).get_mut(counter as usize) } {
            *slot += 1;
        }
    }
}

/// True if the current process is young: started less than the window ago.
/// Thread `tid`, if this CPU's last look found it old (or found nothing new in its
/// frames), is not looked at again (`CpuState::settled_tid`).
#[inline(always)]
pub fn is_young(state: &mut CpuState, tid: u32) -> bool {
    let window = field(&KERNEL_OFFSETS.young_process_ns);
    let settled = tid.wrapping_add(1);
    if window == 0 || state.settled_tid == settled {
        return false;
    }
    // SAFETY: a helper call without arguments.
    let task = unsafe { bpf_get_current_task() };
    let Some(leader) = read_kernel::<u64>(task, field(&KERNEL_OFFSETS.task_group_leader)) else {
        return false;
    };
    let Some(started) = read_kernel::<u64>(leader, field(&KERNEL_OFFSETS.task_start_time)) else {
        return false;
    };
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(started) >= window {
        state.settled_tid = settled;
        return false;
    }
    true
}

/// The address ranges found for each young process (and single addresses no
/// mapping holds, so that a bad frame is not looked up again and again): 1 024
/// processes x (4-byte key + 264-byte value + ~100 bytes of LRU hash overhead),
/// ~370 KiB. The least recently used process is forgotten first (its mappings are
/// then found, and sent, again). Cleared for a pid at its fork and exec.
#[map]
pub static YOUNG_MAPPINGS: LruHashMap<u32, Known> =
    LruHashMap::with_max_entries(MAX_YOUNG_PROCESSES, 0);

/// Ranges `[start, end)` found for one process, the first `count` in use.
#[repr(C)]
pub struct Known {
    ranges: [[u64; 2]; MAX_KNOWN_MAPPINGS],
    count: u64,
}

/// Per-CPU scratch of one sample's search: its frames, its process and what the
/// search picked, in a map (the program's 512-byte stack is mostly taken) and read
/// by a `bpf_loop` body, which the verifier checks once for any number of frames
/// (a plain loop over frames and ranges made it explore too many states to load).
/// `empty` stays zero: the value a new process's entry starts from.
#[repr(C)]
struct Scratch {
    ips: [u64; MAX_MAPPED_FRAMES],
    tgid: u64,
    /// The first frame outside every known range; 0: none.
    pick: u64,
    empty: Known,
}

/// 32 x 8 + 16 + 264 = 536 bytes per CPU.
#[map]
static MAPPINGS_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Looks up the mapping of the first of the process's first [`MAX_MAPPED_FRAMES`]
/// user frames (at `ips`, `frames` of them) that is outside the ranges known for
/// it, and writes it to the ring buffer, after the sample's record (reserved
/// before it: the reader holds back first sights to the end of each batch of
/// records, so it sees the mapping first all the same). A sample whose frames are
/// all known reserves nothing.
///
/// A sample that finds nothing new settles its thread on this CPU (`settled`, as
/// for an old process): its next samples there skip the search until the CPU runs
/// another thread. A busy young process so costs the search only on its first
/// samples on each CPU, not for its whole first 2 s.
#[inline(always)]
pub fn report(settled: &mut u32, tgid: u32, tid: u32, ips: *const u64, frames: u64) {
    match pick_frame(tgid, ips, frames) {
        Some(ip) => look_up_and_submit(tgid, ip),
        None => *settled = tid.wrapping_add(1),
    }
}

/// The first frame outside the known ranges, if any.
#[inline(always)]
fn pick_frame(tgid: u32, ips: *const u64, frames: u64) -> Option<u64> {
    let scratch = MAPPINGS_SCRATCH.get_ptr_mut(0)?;
    let n = if frames < MAX_MAPPED_FRAMES as u64 {
        frames
    } else {
        MAX_MAPPED_FRAMES as u64
    };
    // SAFETY: this CPU's scratch (the program does not nest on one CPU); `ips` has
    // `frames` slots written by the walk, of which the first `n` are copied.
    unsafe {
        for i in 0..MAX_MAPPED_FRAMES {
            if i as u64 >= n {
                break;
            }
            set(&mut (*scratch).ips[i], *ips.add(i));
        }
        set(&mut (*scratch).tgid, tgid as u64);
        set(&mut (*scratch).pick, 0);
        if YOUNG_MAPPINGS.get_ptr_mut(tgid).is_none() {
            // A first sample: an empty entry (BPF_NOEXIST: another CPU's may have
            // come first, and stays).
            let _ = YOUNG_MAPPINGS.insert(tgid, &(*scratch).empty, BPF_NOEXIST as u64);
        }
        bpf_loop(
            n as u32,
            check_frame as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        let pick = field(&(*scratch).pick);
        (pick != 0).then_some(pick)
    }
}

/// `bpf_loop` body, once per frame: stops at the first frame no known range holds,
/// leaving it in the scratch's `pick`. Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn check_frame(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = MAPPINGS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch and the process's entry; indices masked to the
    // arrays' sizes.
    unsafe {
        let tgid = field(&(*scratch).tgid) as u32;
        let Some(known) = YOUNG_MAPPINGS.get_ptr_mut(tgid) else {
            return 1;
        };
        let ip = field(&(*scratch).ips[index as usize & (MAX_MAPPED_FRAMES - 1)]);
        let count = field(&(*known).count);
        for j in 0..MAX_KNOWN_MAPPINGS {
            if j as u64 >= count {
                break;
            }
            let range = &(*known).ranges[j];
            if ip >= field(&range[0]) && ip < field(&range[1]) {
                return 0;
            }
        }
        set(&mut (*scratch).pick, ip);
    }
    1
}

/// Looks up the mapping of `ip`, remembers its range for the process and writes
/// it to the ring buffer (or, if the lookup fails, remembers `ip` alone, so that
/// the next samples look further). With the ring buffer full nothing is
/// remembered: a later sample tries again.
#[inline(always)]
fn look_up_and_submit(tgid: u32, ip: u64) {
    let Some(mut entry) = SAMPLES.reserve::<MappingRecord>(0) else {
        count(MappingsCounter::RingBufferFull);
        return;
    };
    // The callback's context must be on the stack; cleared and copied field by
    // field (a KernelMapping value would be zeroed and copied by byte-by-byte
    // loops in BPF, which the verifier walks byte by byte).
    let mut lookup = core::mem::MaybeUninit::<KernelMapping>::uninit();
    let l = lookup.as_mut_ptr();
    // SAFETY: `l` is on this program's stack; the callback writes only it.
    let ret = unsafe {
        clear(l);
        bpf_find_vma(
            bpf_get_current_task_btf(),
            ip,
            read_vma as *mut c_void,
            l.cast(),
            0,
        )
    };
    // SAFETY: cleared above, maybe written by the callback.
    let (start, end) = unsafe { (field(&(*l).start), field(&(*l).end)) };
    let found = ret == 0 && end > start;
    let (start, end) = if found { (start, end) } else { (ip, ip + 1) };
    remember(tgid, start, end);
    if !found {
        count(MappingsCounter::LookupFailed);
        entry.discard(0);
        return;
    }
    let record = entry.as_mut_ptr();
    // SAFETY: plain stores into the reserved slot, field by field; the helper
    // writes the thread's name (16 bytes) straight into it.
    unsafe {
        let m = core::ptr::addr_of_mut!((*record).mapping);
        set(&mut (*m).start, start);
        set(&mut (*m).end, end);
        set(&mut (*m).offset, field(&(*l).offset));
        set(&mut (*m).ino, field(&(*l).ino));
        set(&mut (*m).dev, field(&(*l).dev));
        set(&mut (*m).reserved, 0);
        (*record).kind = record_kind::PROCESS_MAPPING;
        (*record).header_len = core::mem::size_of::<MappingRecord>() as u16;
        (*record).pid = tgid;
        gen::bpf_get_current_comm(
            core::ptr::addr_of_mut!((*record).comm).cast(),
            TASK_COMM_LEN as u32,
        );
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    count(MappingsCounter::Emitted);
}

/// Adds `[start, end)` to the ranges known for `tgid`, if there is room.
#[inline(always)]
fn remember(tgid: u32, start: u64, end: u64) {
    let Some(known) = YOUNG_MAPPINGS.get_ptr_mut(tgid) else {
        return;
    };
    // SAFETY: the process's entry in a map value; the index is masked to the array.
    unsafe {
        let used = field(&(*known).count);
        if used >= MAX_KNOWN_MAPPINGS as u64 {
            count(MappingsCounter::Truncated);
            return;
        }
        let range = &mut (*known).ranges[used as usize & (MAX_KNOWN_MAPPINGS - 1)];
        set(&mut range[0], start);
        set(&mut range[1], end);
        set(&mut (*known).count, used + 1);
    }
}

/// Zeroes the mapping at `m`, field by field.
///
/// # Safety
/// `m` points at a writable KernelMapping.
#[inline(always)]
unsafe fn clear(m: *mut KernelMapping) {
    unsafe {
        set(&mut (*m).start, 0);
        set(&mut (*m).end, 0);
        set(&mut (*m).offset, 0);
        set(&mut (*m).ino, 0);
        set(&mut (*m).dev, 0);
        set(&mut (*m).reserved, 0);
    }
}

/// `bpf_find_vma` callback: copies what userspace needs of the `vm_area_struct`
/// into the [`KernelMapping`] at `ctx`. A separate (static) BPF function, as the
/// kernel requires of callbacks.
#[inline(never)]
extern "C" fn read_vma(_task: *mut c_void, vma: *mut c_void, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `lookup`, cleared.
    let out = unsafe { &mut *ctx.cast::<KernelMapping>() };
    let vma = vma as u64;
    let (Some(start), Some(end), Some(pgoff), Some(file)) = (
        read_kernel::<u64>(vma, field(&KERNEL_OFFSETS.vma_start)),
        read_kernel::<u64>(vma, field(&KERNEL_OFFSETS.vma_end)),
        read_kernel::<u64>(vma, field(&KERNEL_OFFSETS.vma_pgoff)),
        read_kernel::<u64>(vma, field(&KERNEL_OFFSETS.vma_file)),
    ) else {
        return 0;
    };
    set(&mut out.start, start);
    set(&mut out.end, end);
    if file == 0 {
        return 0;
    }
    set(&mut out.offset, pgoff << PAGE_SHIFT);
    let Some(inode) = read_kernel::<u64>(file, field(&KERNEL_OFFSETS.file_inode)) else {
        return 0;
    };
    set(
        &mut out.ino,
        read_kernel::<u64>(inode, field(&KERNEL_OFFSETS.inode_ino)).unwrap_or(0),
    );
    if let Some(sb) = read_kernel::<u64>(inode, field(&KERNEL_OFFSETS.inode_sb)) {
        set(
            &mut out.dev,
            read_kernel::<u32>(sb, field(&KERNEL_OFFSETS.sb_dev)).unwrap_or(0),
        );
    }
    0
}
