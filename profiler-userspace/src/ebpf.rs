//! Stage 1: load the eBPF sampler, attach it to cpu-clock on every online CPU, and
//! read its counters. Also attaches the fork and exec tracker (best effort: without
//! it, only forked processes that exit very quickly lose their names).
//!
//! Owns the loaded object (programs, maps, perf links): dropping [`Sampler`] detaches
//! everything. Must never: leave a perf event attached after an error (aya's links
//! are owned by the `Ebpf` value, so an early return drops them).

use std::{io, time::Instant};

use crate::delivery::{self, attached_time, Delivery, IdleClock};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        PerfEvent, ProgramError, RawTracePoint,
    },
    util::online_cpus,
    Ebpf, EbpfError, EbpfLoader,
};
use profiler_common::{
    Counter, Counters, CpuState, KernelOffsets, COUNTER_COUNT, GLOBAL_FILTER_BY_PID,
    GLOBAL_INCLUDE_IDLE, GLOBAL_KERNEL_OFFSETS, GLOBAL_TASK_PID_OFFSET, MAPPINGS_COUNTER_COUNT,
    MAP_COUNTERS, MAP_MAPPINGS_STATS, MAP_PID_FILTER, MAP_PROCESS_EVENTS_LOST, MAP_SAMPLES,
    MAX_PID_FILTER_ENTRIES, PROGRAM_ON_EXEC, PROGRAM_ON_FORK, PROGRAM_SAMPLE, TRACEPOINT_EXEC,
    TRACEPOINT_FORK,
};

/// How long after it starts a process's samples carry their mappings
/// (`profiler_common::MappingRecord`): long enough for the capture worker to read
/// its `/proc` entry under load, short enough that a busy host's long-running
/// processes never pay for it (a sample of a young process costs a search of its
/// frames, and for a frame in a mapping not reported yet a lookup and a 64-byte
/// record).
pub const YOUNG_PROCESS_NS: u64 = 2_000_000_000;

/// The compiled eBPF program, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler-ebpf"));

/// What to sample, decided before anything is loaded.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// Samples per second per CPU.
    pub frequency_hz: u64,
    /// Only these processes (and their threads); empty means every process.
    pub pids: Vec<u32>,
    /// Also emit samples of the idle task.
    pub include_idle: bool,
    /// Ring buffer size in bytes (a power of two, at least one page); `None` sizes
    /// it by the number of CPUs (`profiler_common::ring_buffer_bytes`).
    pub ring_buffer_bytes: Option<u32>,
    /// Turn on the kernel's BPF run-time statistics while the sampler runs, for
    /// [`Sampler::program_stats`]. They time every run of every BPF program on the
    /// host (two clock reads each), so `record` asks for them and the agent, which
    /// runs for good and never reports them, does not.
    pub bpf_stats: bool,
}

/// Why the sampler could not start. Each message is one sentence a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// The process lacks CAP_BPF/CAP_PERFMON (or CAP_SYS_ADMIN).
    #[error(
        "loading the eBPF sampler needs root, or the CAP_BPF and CAP_PERFMON capabilities \
         and, to name what it samples, CAP_SYSLOG, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH \
         and CAP_CHECKPOINT_RESTORE (`sudo setcap {SETCAP_CAPABILITIES}+ep profiler`)"
    )]
    NotPermitted,
    /// We run in a pid namespace other than the host's: the kernel reports host pids,
    /// which our /proc would read as other processes.
    #[error(
        "the profiler must run in the host's PID namespace (in a container: `--pid=host`, \
         or `hostPID: true` in Kubernetes): the kernel reports host pids, which this /proc \
         would name as other processes"
    )]
    ForeignPidNamespace,
    /// The kernel refused a feature we need (BPF ring buffer: Linux 5.8; the
    /// `bpf_loop` helper of the stack walk: Linux 5.17).
    #[error("this kernel lacks a BPF feature the sampler needs ({what}); Linux 5.17 or newer with CONFIG_BPF_SYSCALL is required")]
    KernelFeature {
        /// The feature, as the kernel reported it.
        what: String,
    },
    /// The cpu-clock software event could not be opened (no perf events in the
    /// kernel, a security policy, no file descriptors left, ...).
    #[error("cannot open the cpu-clock perf event on CPU {cpu} ({source}); {hint}")]
    PerfEvent {
        /// The CPU we tried.
        cpu: u32,
        /// The system error.
        source: io::Error,
        /// What to do about it, from the errno.
        hint: &'static str,
    },
    /// The kernel would not give the maps the memory they need.
    #[error("the kernel refused memory for eBPF map {name} ({source}); it is charged to the locked-memory limit (`ulimit -l`) on kernels before 5.11, and to the memory cgroup after: raise that limit")]
    MapMemory {
        /// The map.
        name: String,
        /// The system error.
        source: io::Error,
    },
    /// The verifier or loader rejected the program; the verifier log says why.
    #[error("the kernel rejected the eBPF program: {0}")]
    Load(String),
    /// Too many pids for the in-kernel filter.
    #[error("at most {max} pids can be filtered, got {got}")]
    TooManyPids {
        /// [`MAX_PID_FILTER_ENTRIES`].
        max: u32,
        /// How many were asked for.
        got: usize,
    },
    /// Reading the list of online CPUs failed.
    #[error("cannot read the online CPUs: {0}")]
    OnlineCpus(io::Error),
    /// A map operation failed.
    #[error("eBPF map {map}: {source}")]
    Map {
        /// The map name.
        map: &'static str,
        /// The error from aya.
        source: aya::maps::MapError,
    },
}

/// Totals of the in-kernel counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Indexed by `Counter as usize`.
    pub values: Counters,
}

impl KernelCounters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Samples lost in the kernel (ring buffer full and every other loss).
    pub fn lost(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_loss())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Perf events the program handled (each ends in exactly one outcome).
    pub fn events(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_outcome())
            .map(|c| self.get(*c))
            .sum()
    }

    /// Counts accumulated since `earlier`.
    pub fn since(&self, earlier: &KernelCounters) -> KernelCounters {
        let mut values = [0; COUNTER_COUNT];
        for (i, v) in values.iter_mut().enumerate() {
            *v = self.values[i].saturating_sub(earlier.values[i]);
        }
        KernelCounters { values }
    }
}

/// Run time of the sampling program, from the kernel's BPF statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgramStats {
    /// Total nanoseconds spent in the program.
    pub run_time_ns: u64,
    /// Number of runs.
    pub run_count: u64,
    /// Instructions the kernel's verifier processed to load the program (its
    /// limit is 1 000 000); 0 if the kernel does not say.
    pub verified_instructions: u32,
}

/// The loaded and attached sampler.
pub struct Sampler {
    ebpf: Ebpf,
    counters: PerCpuArray<MapData, CpuState>,
    /// Why the fork and exec tracker is off, if it is.
    process_events: Result<(), String>,
    process_events_lost: Option<PerCpuArray<MapData, u64>>,
    /// Why young processes' mappings are not read, if the kernel's BTF lacks a field.
    mappings_problem: Option<String>,
    mappings_stats: Option<PerCpuArray<MapData, [u64; MAPPINGS_COUNTER_COUNT]>>,
    /// Keeps kernel BPF run-time statistics enabled while we run.
    stats: Option<std::os::fd::OwnedFd>,
    cpus: usize,
    ring_bytes: u32,
    frequency_hz: u64,
    /// The sampling program's perf links, one per CPU, until [`Sampler::stop`].
    links: Vec<PerfEventLinkId>,
    /// Per CPU, the instant just before its perf event was opened.
    attached: Vec<Instant>,
    /// Just after the program was detached from every CPU.
    detached: Option<Instant>,
    /// The CPUs' idle time since just before the first event was opened; `None`
    /// with `--include-idle` (idle samples are wanted: see [`crate::delivery`]).
    idle: Option<IdleClock>,
    /// The idle clock's reading when the program was detached.
    idle_at_detach: Option<Vec<u64>>,
    /// The program's statistics when it was detached (still loaded).
    final_stats: Option<ProgramStats>,
}

impl Sampler {
    /// Loads the program, fills the pid filter, attaches to every online CPU and
    /// returns the sampler and the ring buffer to drain.
    pub fn start(config: &SamplerConfig) -> Result<(Sampler, RingBuf<MapData>), SamplerError> {
        check_privileges()?;
        if config.pids.len() > MAX_PID_FILTER_ENTRIES as usize {
            return Err(SamplerError::TooManyPids {
                max: MAX_PID_FILTER_ENTRIES,
                got: config.pids.len(),
            });
        }
        let filter_by_pid = u8::from(!config.pids.is_empty());
        let include_idle = u8::from(config.include_idle);
        let cpus = online_cpus().map_err(|(_, e)| SamplerError::OnlineCpus(e))?;
        let ring_bytes = config
            .ring_buffer_bytes
            .unwrap_or_else(|| profiler_common::ring_buffer_bytes(cpus.len() as u32));
        // The fork tracker reads the new task's pid at this offset (0 turns it
        // off), and the sampler the fields of young processes' mappings at these
        // (all zero: off). With a pid filter neither is used (children of the
        // chosen processes are not sampled), so the kernel's BTF is not read.
        let layout = config
            .pids
            .is_empty()
            .then(|| kernel_layout(std::path::Path::new(crate::btf::VMLINUX_BTF)));
        let (task_pid_offset, kernel_offsets) = match layout {
            None => (None, Ok(KernelOffsets::default())),
            Some(Ok(layout)) => (Some(layout.task_pid), layout.offsets),
            Some(Err(e)) => (Some(Err(e.to_string())), Err(e.to_string())),
        };
        let pid_offset = match &task_pid_offset {
            Some(Ok(offset)) => *offset,
            _ => 0,
        };
        let load = |offsets: &KernelOffsets| -> Result<Ebpf, SamplerError> {
            let mut ebpf = EbpfLoader::new()
                .override_global(GLOBAL_TASK_PID_OFFSET, &pid_offset, true)
                .override_global(GLOBAL_KERNEL_OFFSETS, offsets, true)
                .override_global(GLOBAL_FILTER_BY_PID, &filter_by_pid, true)
                .override_global(GLOBAL_INCLUDE_IDLE, &include_idle, true)
                .map_max_entries(MAP_SAMPLES, ring_bytes)
                .load(EBPF_OBJECT)
                .map_err(ebpf_error)?;
            sample_program(&mut ebpf).load().map_err(program_error)?;
            Ok(ebpf)
        };
        // Young processes' mappings need bpf_find_vma (Linux 5.17) and the kernel
        // struct layout from BTF: a kernel that rejects the program with them (a
        // layout it does not accept, a security policy on bpf_find_vma) gets it
        // without them (the verifier skips the code a zero window turns off), and a
        // warning. A kernel without bpf_loop (before 5.17) refuses both: the stack
        // walk needs it.
        let (mut ebpf, mappings_problem) = match kernel_offsets {
            Ok(offsets) if offsets.young_process_ns != 0 => match load(&offsets) {
                Ok(ebpf) => (ebpf, None),
                Err(e) => (
                    load(&KernelOffsets::default())?,
                    Some(format!(
                        "the kernel rejected the program that reads them: {e}"
                    )),
                ),
            },
            Ok(_) => (load(&KernelOffsets::default())?, None),
            Err(e) => (
                load(&KernelOffsets::default())?,
                Some(format!("kernel struct layout unknown: {e}")),
            ),
        };

        if !config.pids.is_empty() {
            let mut filter: HashMap<_, u32, u8> =
                HashMap::try_from(ebpf.map_mut(MAP_PID_FILTER).expect("map is in the object"))
                    .map_err(|source| SamplerError::Map {
                        map: MAP_PID_FILTER,
                        source,
                    })?;
            for pid in &config.pids {
                filter
                    .insert(pid, 1, 0)
                    .map_err(|source| SamplerError::Map {
                        map: MAP_PID_FILTER,
                        source,
                    })?;
            }
        }

        // Statistics for our own summary (BPF time per sample). Best effort: a kernel
        // without BPF_ENABLE_STATS still samples.
        let stats = config
            .bpf_stats
            .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).ok())
            .flatten();

        let idle = (!config.include_idle).then(|| IdleClock::start(&cpus));
        let program = sample_program(&mut ebpf);
        let mut links = Vec::with_capacity(cpus.len());
        let mut attached = Vec::with_capacity(cpus.len());
        for &cpu in &cpus {
            // The timer starts when the event is opened (its first tick one period
            // later): expected events count from here.
            attached.push(Instant::now());
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(config.frequency_hz),
                    false,
                )
                .map_err(|e| match e {
                    ProgramError::SyscallError(e) if e.call == "perf_event_open" => {
                        SamplerError::PerfEvent {
                            cpu,
                            hint: perf_event_hint(&e.io_error),
                            source: e.io_error,
                        }
                    }
                    other => program_error(other),
                })?;
            links.push(link);
        }

        let process_events = match task_pid_offset {
            None => Ok(()),
            Some(Ok(_)) => attach_process_events(&mut ebpf),
            Some(Err(e)) => Err(format!("task_struct layout unknown: {e}")),
        };
        let process_events_lost = ebpf
            .take_map(MAP_PROCESS_EVENTS_LOST)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        let mappings_stats = ebpf
            .take_map(MAP_MAPPINGS_STATS)
            .and_then(|m| PerCpuArray::try_from(m).ok());

        let ring = RingBuf::try_from(ebpf.take_map(MAP_SAMPLES).expect("map is in the object"))
            .map_err(|source| SamplerError::Map {
                map: MAP_SAMPLES,
                source,
            })?;
        let counters =
            PerCpuArray::try_from(ebpf.take_map(MAP_COUNTERS).expect("map is in the object"))
                .map_err(|source| SamplerError::Map {
                    map: MAP_COUNTERS,
                    source,
                })?;
        Ok((
            Sampler {
                ebpf,
                counters,
                process_events,
                process_events_lost,
                mappings_problem,
                mappings_stats,
                stats,
                cpus: cpus.len(),
                ring_bytes,
                frequency_hz: config.frequency_hz,
                links,
                attached,
                detached: None,
                idle,
                idle_at_detach: None,
                final_stats: None,
            },
            ring,
        ))
    }

    /// Detaches from every CPU and unloads the programs; counters, and the
    /// sampling program's statistics as they were when it was detached, stay
    /// readable.
    pub fn stop(&mut self) {
        let program = sample_program(&mut self.ebpf);
        for link in self.links.drain(..) {
            // Closes the link, and with it the CPU's perf event.
            let _ = program.detach(link);
        }
        if self.detached.is_none() {
            self.detached = Some(Instant::now());
            self.idle_at_detach = self.idle.as_ref().and_then(IdleClock::read);
            self.final_stats = Some(self.program_stats());
        }
        let _ = sample_program(&mut self.ebpf).unload();
        for name in [PROGRAM_ON_FORK, PROGRAM_ON_EXEC] {
            if let Some(program) = self.ebpf.program_mut(name) {
                if let Ok(program) = <&mut RawTracePoint>::try_from(program) {
                    let _ = program.unload();
                }
            }
        }
    }

    /// Why forks and execs are not tracked, if they are not: one sentence for a
    /// warning at start.
    pub fn process_events_problem(&self) -> Option<&str> {
        self.process_events.as_ref().err().map(String::as_str)
    }

    /// Fork and exec events lost to a full ring buffer.
    pub fn process_events_lost(&self) -> u64 {
        self.process_events_lost
            .as_ref()
            .and_then(|m| m.get(&0, 0).ok())
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Why young processes' mappings are not read in the kernel, if they are not
    /// (with a pid filter they are off by choice, not a problem).
    pub fn mappings_problem(&self) -> Option<&str> {
        self.mappings_problem.as_deref()
    }

    /// Totals of the [`profiler_common::MappingsCounter`]s, indexed by them.
    pub fn mappings_stats(&self) -> [u64; MAPPINGS_COUNTER_COUNT] {
        let mut totals = [0; MAPPINGS_COUNTER_COUNT];
        if let Some(per_cpu) = self.mappings_stats.as_ref().and_then(|m| m.get(&0, 0).ok()) {
            for cpu in per_cpu.iter() {
                for (total, value) in totals.iter_mut().zip(cpu) {
                    *total += value;
                }
            }
        }
        totals
    }

    /// Number of CPUs the program is attached to.
    pub fn cpus(&self) -> usize {
        self.cpus
    }

    /// Size of the `SAMPLES` ring buffer's data area. The reader maps it twice
    /// (consecutive, so a record that wraps reads as one), so the process's RSS
    /// shows twice this once the ring has been written round.
    pub fn ring_buffer_bytes(&self) -> u32 {
        self.ring_bytes
    }

    /// Current totals of the in-kernel counters.
    pub fn counters(&self) -> Result<KernelCounters, SamplerError> {
        let per_cpu = self
            .counters
            .get(&0, 0)
            .map_err(|source| SamplerError::Map {
                map: MAP_COUNTERS,
                source,
            })?;
        let mut totals = KernelCounters::default();
        for cpu in per_cpu.iter() {
            for (total, value) in totals.values.iter_mut().zip(&cpu.counters) {
                *total += value;
            }
        }
        Ok(totals)
    }

    /// The in-kernel counters and, from them, the events delivered against those
    /// expected so far (until [`Sampler::stop`], then in all).
    pub fn delivery(&self) -> Result<(KernelCounters, Delivery), SamplerError> {
        let counters = self.counters()?;
        let at = self.detached.unwrap_or_else(Instant::now);
        let idle = self.idle.as_ref().and_then(|clock| {
            let now = match self.detached {
                Some(_) => self.idle_at_detach.clone(),
                None => clock.read(),
            }?;
            clock.since_start(&now)
        });
        let delivery = delivery::reckon(
            self.frequency_hz,
            attached_time(&self.attached, at),
            idle,
            &counters,
            self.cpus,
            self.stats.is_some().then(|| self.program_stats().run_count),
        );
        Ok((counters, delivery))
    }

    /// Kernel statistics of the sampling program (zero if statistics are off);
    /// after [`Sampler::stop`], as they were when it was detached.
    pub fn program_stats(&self) -> ProgramStats {
        if let Some(stats) = self.final_stats {
            return stats;
        }
        let info = self
            .ebpf
            .program(PROGRAM_SAMPLE)
            .and_then(|p| <&PerfEvent>::try_from(p).ok())
            .and_then(|p| p.info().ok());
        match info {
            Some(info) => ProgramStats {
                run_time_ns: info.run_time().as_nanos() as u64,
                run_count: info.run_count(),
                verified_instructions: info.verified_instruction_count().unwrap_or(0),
            },
            None => ProgramStats::default(),
        }
    }
}

/// The sampling program of the embedded object.
fn sample_program(ebpf: &mut Ebpf) -> &mut PerfEvent {
    ebpf.program_mut(PROGRAM_SAMPLE)
        .expect("program is in the object")
        .try_into()
        .expect("program is a perf_event program")
}

/// Where the fields the eBPF programs read sit in this kernel's structs, from its
/// BTF, all found in one go (one pass over the strings, a few over the types): the
/// offset of `task_struct.pid` for the fork tracker, and [`KernelOffsets`] for
/// young processes' mappings. The outer error is the BTF's; each inner one names
/// the field it lacks.
fn kernel_layout(btf: &std::path::Path) -> Result<KernelLayout, crate::btf::BtfError> {
    const FIELDS: [(&str, &str); 12] = [
        ("task_struct", "pid"),
        ("task_struct", "group_leader"),
        ("task_struct", "start_time"),
        ("vm_area_struct", "vm_start"),
        ("vm_area_struct", "vm_end"),
        ("vm_area_struct", "vm_pgoff"),
        ("vm_area_struct", "vm_file"),
        ("file", "f_inode"),
        ("inode", "i_ino"),
        ("inode", "i_sb"),
        ("super_block", "s_dev"),
        ("linux_binprm", "filename"),
    ];
    let found = crate::btf::kernel_member_offsets(btf, &FIELDS)?;
    let mut at = found.into_iter().map(|r| r.map_err(|e| e.to_string()));
    let mut next = || at.next().expect("one result per field");
    let pid = next();
    let mut offsets = || -> Result<KernelOffsets, String> {
        Ok(KernelOffsets {
            young_process_ns: YOUNG_PROCESS_NS,
            task_group_leader: next()?,
            task_start_time: next()?,
            vma_start: next()?,
            vma_end: next()?,
            vma_pgoff: next()?,
            vma_file: next()?,
            file_inode: next()?,
            inode_ino: next()?,
            inode_sb: next()?,
            sb_dev: next()?,
            binprm_filename: next()?,
            reserved: 0,
        })
    };
    let offsets = offsets();
    Ok(KernelLayout {
        task_pid: pid,
        offsets,
    })
}

/// What [`kernel_layout`] found; each error names the field the kernel lacks.
struct KernelLayout {
    task_pid: Result<u32, String>,
    offsets: Result<KernelOffsets, String>,
}

/// Loads and attaches the fork and exec tracker; the error says what failed.
fn attach_process_events(ebpf: &mut Ebpf) -> Result<(), String> {
    for (name, tracepoint) in [
        (PROGRAM_ON_FORK, TRACEPOINT_FORK),
        (PROGRAM_ON_EXEC, TRACEPOINT_EXEC),
    ] {
        let program: &mut RawTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("no program {name}"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        program.load().map_err(|e| format!("loading {name}: {e}"))?;
        program
            .attach(tracepoint)
            .map_err(|e| format!("attaching to the {tracepoint} tracepoint: {e}"))?;
    }
    Ok(())
}

/// Every capability the profiler needs without root: loading BPF and perf events,
/// then naming frames (kernel symbols, other users' maps and binaries).
pub const SETCAP_CAPABILITIES: &str =
    "cap_bpf,cap_perfmon,cap_syslog,cap_sys_ptrace,cap_dac_read_search,cap_checkpoint_restore";

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// This process's effective capabilities (`CapEff`).
#[derive(Clone, Copy)]
struct Capabilities(u64);

impl Capabilities {
    /// `None` when /proc/self/status is unreadable.
    fn effective() -> Option<Capabilities> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .map(Capabilities)
    }

    fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }
}

/// What will stay unnamed for lack of privileges, one sentence each (empty as
/// root). The sampler itself may run without them (CAP_BPF and CAP_PERFMON), but
/// every frame of another user's process, and every kernel frame, would be
/// `[unknown]`.
pub fn naming_limits() -> Vec<String> {
    let mut limits = Vec::new();
    if let Err(e) = crate::symbolize::kallsyms::check_visible(std::path::Path::new(
        crate::symbolize::kallsyms::KALLSYMS,
    )) {
        limits.push(format!("kernel frames will be unnamed: {e}"));
    }
    if let Some(caps) = Capabilities::effective() {
        let missing: Vec<&str> = [
            (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
            (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
            (CAP_CHECKPOINT_RESTORE, "CAP_CHECKPOINT_RESTORE"),
        ]
        .into_iter()
        // CAP_SYS_ADMIN still grants what CAP_CHECKPOINT_RESTORE was split from.
        .filter(|&(cap, _)| {
            !(caps.has(cap) || cap == CAP_CHECKPOINT_RESTORE && caps.has(CAP_SYS_ADMIN))
        })
        .map(|(_, name)| name)
        .collect();
        if !missing.is_empty() {
            limits.push(format!(
                "other users' processes will be unnamed: reading their mappings and binaries needs {} (or root)",
                missing.join(", ")
            ));
        }
    }
    limits
}

/// The inode of the initial (host) pid namespace, fixed in the kernel
/// (`PROC_PID_INIT_INO`).
const HOST_PID_NAMESPACE_INO: u64 = 0xEFFF_FFFC;

/// Fails early, with one sentence, when we run in a pid namespace other than the
/// host's (samples carry host pids). Unreadable: let the run go on.
pub fn check_pid_namespace() -> Result<(), SamplerError> {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(ns) if ns.ino() != HOST_PID_NAMESPACE_INO => Err(SamplerError::ForeignPidNamespace),
        _ => Ok(()),
    }
}

/// Fails early, with one sentence, when we clearly lack the capabilities to load BPF,
/// or run where the pids the kernel reports mean other processes.
pub fn check_privileges() -> Result<(), SamplerError> {
    check_pid_namespace()?;
    let Some(caps) = Capabilities::effective() else {
        return Ok(()); // let the kernel decide
    };
    if caps.has(CAP_SYS_ADMIN) || (caps.has(CAP_BPF) && caps.has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(SamplerError::NotPermitted)
    }
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// What to do when perf_event_open fails with `e`.
fn perf_event_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP) => {
            "the kernel needs CONFIG_PERF_EVENTS"
        }
        Some(libc::EPERM | libc::EACCES) => {
            "refused: without root this needs CAP_PERFMON; as root, a security policy (an LSM, seccomp, or kernel.perf_event_paranoid with a lockdown) forbids it"
        }
        Some(libc::EMFILE | libc::ENFILE) => {
            "no file descriptor left: raise the open files limit (`ulimit -n`)"
        }
        Some(libc::EINVAL) => "the kernel does not accept this event (a frequency above kernel.perf_event_max_sample_rate?)",
        _ => "see the system error",
    }
}

fn ebpf_error(e: EbpfError) -> SamplerError {
    match e {
        EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error, .. }) => {
            match io_error.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => SamplerError::NotPermitted,
                Some(libc::ENOMEM) => SamplerError::MapMemory {
                    name,
                    source: io_error,
                },
                Some(libc::EINVAL | libc::E2BIG | libc::EOPNOTSUPP) => {
                    SamplerError::KernelFeature {
                        what: format!("creating map {name}: {io_error}"),
                    }
                }
                _ => SamplerError::Load(format!("creating map {name}: {io_error}")),
            }
        }
        EbpfError::ProgramError(e) => program_error(e),
        other => SamplerError::Load(other.to_string()),
    }
}

fn program_error(e: ProgramError) -> SamplerError {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if is_permission(&io_error) && log.trim().is_empty() {
                SamplerError::NotPermitted
            } else if let Some(helper) = missing_helper(&log) {
                SamplerError::KernelFeature {
                    what: format!("the verifier does not know the helper {helper}"),
                }
            } else {
                SamplerError::Load(format!("{io_error}\nverifier log:\n{verifier_log}"))
            }
        }
        ProgramError::SyscallError(e) if is_permission(&e.io_error) => SamplerError::NotPermitted,
        other => SamplerError::Load(other.to_string()),
    }
}

/// The helper a verifier log says the kernel lacks (`unknown func bpf_loop#181`),
/// as `bpf_loop`.
fn missing_helper(verifier_log: &str) -> Option<&str> {
    let rest = verifier_log.split("unknown func ").nth(1)?;
    let name = rest.split(['#', ' ', '\n']).next()?;
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel without a helper the program calls gets the helper's name and the
    /// kernel version needed, not the verifier's whole log.
    #[test]
    fn a_missing_helper_is_a_kernel_feature() {
        let log = "0: R1=ctx() R10=fp0\n; 12: (85) call bpf_loop#181\nunknown func bpf_loop#181\nprocessed 12 insns";
        assert_eq!(missing_helper(log), Some("bpf_loop"));
        assert_eq!(missing_helper("invalid mem access 'scalar'"), None);
        let e = SamplerError::KernelFeature {
            what: format!(
                "the verifier does not know the helper {}",
                missing_helper(log).unwrap()
            ),
        };
        assert!(e.to_string().contains("bpf_loop") && e.to_string().contains("5.17"));
    }

    /// A failed perf_event_open names its likely cause by errno, not always a
    /// missing kernel option.
    #[test]
    fn perf_event_errors_name_their_cause() {
        let hint = |errno| perf_event_hint(&io::Error::from_raw_os_error(errno));
        assert!(hint(libc::ENOENT).contains("CONFIG_PERF_EVENTS"));
        assert!(hint(libc::EACCES).contains("security policy"));
        assert!(hint(libc::EMFILE).contains("ulimit -n"));
        assert!(!hint(libc::EBUSY).contains("CONFIG_PERF_EVENTS"));
    }

    /// The embedded eBPF object has no panic functions (the verifier rejects a
    /// reachable one as "last insn is not an exit or jmp", at load time, on the
    /// user's machine), and it has the sampling and fork/exec programs.
    #[test]
    fn ebpf_object_has_no_panics() {
        use object::{Object as _, ObjectSymbol as _};
        let elf = object::File::parse(EBPF_OBJECT).expect("an ELF object");
        let functions: Vec<String> = elf
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text)
            .filter_map(|s| s.name().ok().map(String::from))
            .collect();
        for program in [PROGRAM_SAMPLE, PROGRAM_ON_FORK, PROGRAM_ON_EXEC] {
            assert!(functions.iter().any(|f| f == program), "{functions:?}");
        }
        let panics: Vec<&String> = functions.iter().filter(|f| f.contains("panic")).collect();
        assert!(
            panics.is_empty(),
            "panic paths in the eBPF program: {panics:?}"
        );
    }

    /// The kernel accepts the sampler with the mappings of young processes on, and
    /// its verifier needs at most half of its 1 000 000-instruction budget for it:
    /// another kernel (or compiler) may explore more states, and the program must
    /// still load there. Loads the real program into this kernel (needs root).
    #[test]
    fn sampler_loads_with_verifier_headroom() {
        let config = SamplerConfig {
            frequency_hz: 1,
            pids: Vec::new(),
            include_idle: false,
            ring_buffer_bytes: None,
            bpf_stats: false,
        };
        let (sampler, _ring) = Sampler::start(&config).expect("the sampler loads");
        assert_eq!(sampler.mappings_problem(), None);
        let verified = sampler.program_stats().verified_instructions;
        eprintln!("verifier processed {verified} instructions");
        assert!(verified < 500_000, "{verified}");
    }

    /// The program wakes a reader blocked on the ring only once a quarter of the
    /// ring waits: not on every record (a wake-up costs a sample more than the rest
    /// of its program), and not never (then nothing wakes it and the ring fills
    /// between timer polls). A busy process, stopped until the sampler is attached
    /// with a pid filter on it, fills a 256 KiB ring at 997 Hz while this thread
    /// sleeps in poll(2), which returns only on a wake-up. Needs root.
    #[test]
    fn reader_is_woken_once_a_quarter_of_the_ring_is_unread() {
        use std::os::fd::AsRawFd as _;
        let mut busy = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = busy.id();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        const RING: u32 = 256 << 10;
        let config = SamplerConfig {
            frequency_hz: 997,
            pids: vec![pid],
            include_idle: false,
            ring_buffer_bytes: Some(RING),
            bpf_stats: false,
        };
        let (_sampler, mut ring) = Sampler::start(&config).expect("the sampler loads");
        assert!(
            ring.next().is_none(),
            "nothing sampled while the process is stopped"
        );
        // The process goes on only once this thread sleeps in poll(2): were records
        // there before the call, it would return at once, woken by nothing.
        // SAFETY: a plain syscall.
        let tid = unsafe { libc::gettid() };
        let resume = std::thread::spawn(move || {
            let syscall = format!("/proc/self/task/{tid}/syscall");
            let polling = || {
                std::fs::read_to_string(&syscall).is_ok_and(|s| {
                    let nr = s.split(' ').next().unwrap_or("");
                    nr == libc::SYS_poll.to_string() || nr == libc::SYS_ppoll.to_string()
                })
            };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !polling() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        });
        let mut fd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut fd, 1, 20_000) };
        resume.join().unwrap();
        // Ring space the records take: each with the ring's 8-byte header, 8-aligned.
        let mut unread = 0;
        while let Some(record) = ring.next() {
            unread += (record.len() + 8).next_multiple_of(8);
        }
        busy.kill().unwrap();
        busy.wait().unwrap();
        assert_eq!(ready, 1, "no wake-up in 20 s ({unread} bytes were waiting)");
        let quarter = (RING as u64 / profiler_common::WAKEUP_FILL_DIVISOR) as usize;
        assert!(
            unread >= quarter,
            "woken with {unread} bytes waiting, before a quarter of the ring ({quarter})"
        );
    }

    /// Events are the sum of the outcome counters; losses are only the loss ones.
    #[test]
    fn counter_totals() {
        let mut c = KernelCounters::default();
        c.values[Counter::Emitted as usize] = 10;
        c.values[Counter::IdleSkipped as usize] = 3;
        c.values[Counter::RingBufferFull as usize] = 2;
        c.values[Counter::UserStackError as usize] = 5;
        assert_eq!((c.events(), c.lost()), (15, 2));
    }
}
