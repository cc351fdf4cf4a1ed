//! Stage 2: drain the ring buffer. Each record is parsed ([`Record::parse`]) into a
//! [`RawSample`] that borrows the ring buffer's bytes, handed to the aggregator,
//! and released, or into a fork or exec ([`ProcessChange`]) for the process stage.
//!
//! Owns: the ring buffer reader and the drain task. Must never: allocate per sample,
//! block on anything slow (symbolization, /proc reads, export happen elsewhere), or
//! trust a record's lengths without checking them.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use profiler_common::{
    record_kind, MappingRecord, ProcessEvent, SampleHeader, EXEC_HEADER_LEN, MAX_CPUS,
    MAX_EXEC_PATH, MAX_STACK_DEPTH, TASK_COMM_LEN,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, oneshot},
};

use crate::{
    aggregate::Aggregator,
    lineage::ProcessChange,
    process::{FirstSight, YoungMapping},
};

/// How often the ring buffer is read without a wake-up. The eBPF program wakes us
/// only once a quarter of the ring waits to be read
/// (`profiler_common::WAKEUP_FILL_DIVISOR`), so at usual rates this timer is what
/// drains the ring. Each wake-up costs ~30 us of CPU here and the sample that asks
/// for it a good part of its BPF time, so rarely is better. In 500 ms at 97 Hz on 2
/// CPUs the samples reserve ~100 KB (1 072 bytes each for one of user code), under
/// a quarter of the 1 MiB ring, so nothing wakes the reader; at 997 Hz a wake-up
/// comes about every 120 ms.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Records handled before the drain task yields to others.
const RECORDS_PER_BATCH: usize = 4096;

/// One sample as read from the ring buffer: borrowed, checked, not yet aggregated.
#[derive(Debug)]
pub struct RawSample<'a> {
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Thread name, NUL padded; all zeros until [`ThreadNames::resolve`] fills it
    /// in a `same_thread` sample.
    pub comm: [u8; TASK_COMM_LEN],
    /// The record did not carry the thread name: it is that of the previous record
    /// from the same CPU (`record_kind::NATIVE_STACKS_SAME_THREAD`).
    pub same_thread: bool,
    /// Kernel instruction pointers then user ones, leaf first, native endian.
    frames: &'a [u8],
    kernel_frames: usize,
    /// The user walk ended at an impossible return address (not 0, which is how a
    /// frame-pointer chain ends): the frames from there on were dropped.
    pub user_walk_derailed: bool,
    /// The process still ran the program it was forked with when sampled (see
    /// [`crate::lineage::Lineage::runs_forked_program`]); set by the drain, false
    /// as parsed.
    pub fork_image: bool,
}

/// Lowest address a user instruction can have: the zero page is never code.
pub const MIN_USER_IP: u64 = 0x1000;
/// End of user space (x86-64 with 5-level paging; 4-level ends lower, at 2^47).
pub const USER_SPACE_END: u64 = 1 << 56;

/// How many of `user` (leaf first) are the stack: up to, not including, the first
/// entry that cannot be a user instruction address. The kernel's frame-pointer walk
/// stores the 0 return address that ends a chain; a walk through code without frame
/// pointers can read anything. Returns the count and whether it stopped at
/// something other than 0.
fn user_stack_len(user: &[u8]) -> (usize, bool) {
    for (i, ip) in RawSample::ips(user).enumerate() {
        if ip == 0 {
            return (i, false);
        }
        if !(MIN_USER_IP..USER_SPACE_END).contains(&ip) {
            return (i, true);
        }
    }
    (user.len() / 8, false)
}

/// Why a record could not be parsed. Malformed records are counted, never fatal.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its header claims.
    #[error("record of {len} bytes is shorter than its header")]
    Truncated {
        /// Bytes in the record.
        len: usize,
    },
    /// A mapping record whose mapping ends before it starts.
    #[error("mapping record of an empty range {start:#x}-{end:#x}")]
    EmptyMapping {
        /// The mapping's start.
        start: u64,
        /// The mapping's end.
        end: u64,
    },
    /// A record kind this collector does not know.
    #[error("unknown record kind {kind}")]
    UnknownKind {
        /// The kind field.
        kind: u16,
    },
    /// A CPU number past [`MAX_CPUS`].
    #[error("record of CPU {cpu}, past the {MAX_CPUS} supported")]
    BadCpu {
        /// The cpu field.
        cpu: u32,
    },
    /// A record that refers to the previous record of its CPU for its thread name,
    /// when that record was of another thread (or there was none).
    #[error("record of thread {tid} on CPU {cpu} without a name to take over")]
    NoThreadName {
        /// The tid field.
        tid: u32,
        /// The cpu field.
        cpu: u32,
    },
    /// A stack longer than the program can write, or frames past the record's end.
    #[error("record claims {kernel}+{user} frames in {len} bytes")]
    BadFrameCount {
        /// Claimed kernel frames.
        kernel: usize,
        /// Claimed user frames.
        user: usize,
        /// Bytes in the record.
        len: usize,
    },
}

const HEADER_LEN: usize = std::mem::size_of::<SampleHeader>();
const PROCESS_EVENT_LEN: usize = std::mem::size_of::<ProcessEvent>();
const MAPPING_RECORD_LEN: usize = std::mem::size_of::<MappingRecord>();

/// One ring buffer record.
#[derive(Debug)]
pub enum Record<'a> {
    Sample(RawSample<'a>),
    Process(ProcessChange),
    Mapping(YoungMapping),
    /// An exec, with the program's path if the kernel could read it.
    Exec {
        pid: u32,
        path: Option<String>,
    },
}

impl<'a> Record<'a> {
    /// Parses one ring buffer record of any kind.
    pub fn parse(bytes: &'a [u8]) -> Result<Record<'a>, ParseError> {
        let kind = match bytes {
            [a, b, ..] => u16::from_ne_bytes([*a, *b]),
            _ => return Err(ParseError::Truncated { len: bytes.len() }),
        };
        if kind == record_kind::PROCESS_MAPPING {
            return parse_mapping(bytes).map(Record::Mapping);
        }
        if kind == record_kind::PROCESS_EXECED_PATH {
            return parse_exec(bytes);
        }
        if !matches!(
            kind,
            record_kind::PROCESS_FORKED | record_kind::PROCESS_EXECED
        ) {
            return RawSample::parse(bytes).map(Record::Sample);
        }
        if bytes.len() < PROCESS_EVENT_LEN {
            return Err(ParseError::Truncated { len: bytes.len() });
        }
        // SAFETY: at least PROCESS_EVENT_LEN bytes of plain old data; unaligned read.
        let event: ProcessEvent =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcessEvent>()) };
        if usize::from(event.header_len) < PROCESS_EVENT_LEN
            || usize::from(event.header_len) > bytes.len()
        {
            return Err(ParseError::Truncated { len: bytes.len() });
        }
        Ok(Record::Process(if kind == record_kind::PROCESS_FORKED {
            ProcessChange::Forked {
                pid: event.pid,
                parent: event.parent,
            }
        } else {
            ProcessChange::Execed { pid: event.pid }
        }))
    }
}

/// An [`ExecRecord`] of [`EXEC_HEADER_LEN`] bytes and its path; a path that is
/// empty or not UTF-8 is `None`.
fn parse_exec(bytes: &[u8]) -> Result<Record<'_>, ParseError> {
    let field = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let (Some(head), Some(pid), Some(path_len)) = (field(0), field(4), field(8)) else {
        return Err(ParseError::Truncated { len: bytes.len() });
    };
    let path_len = path_len as usize;
    if (head >> 16) as usize != EXEC_HEADER_LEN
        || path_len >= MAX_EXEC_PATH
        || bytes.len() < EXEC_HEADER_LEN + path_len
    {
        return Err(ParseError::Truncated { len: bytes.len() });
    }
    let path = std::str::from_utf8(&bytes[EXEC_HEADER_LEN..EXEC_HEADER_LEN + path_len])
        .ok()
        .filter(|p| !p.is_empty() && !p.contains('\0'))
        .map(String::from);
    Ok(Record::Exec { pid, path })
}

/// A [`MappingRecord`], whose mapping is not empty.
fn parse_mapping(bytes: &[u8]) -> Result<YoungMapping, ParseError> {
    if bytes.len() < MAPPING_RECORD_LEN {
        return Err(ParseError::Truncated { len: bytes.len() });
    }
    // SAFETY: at least MAPPING_RECORD_LEN bytes of plain old data; unaligned read.
    let record: MappingRecord =
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MappingRecord>()) };
    if usize::from(record.header_len) != MAPPING_RECORD_LEN {
        return Err(ParseError::Truncated { len: bytes.len() });
    }
    let m = record.mapping;
    if m.start >= m.end {
        return Err(ParseError::EmptyMapping {
            start: m.start,
            end: m.end,
        });
    }
    Ok(YoungMapping {
        pid: record.pid,
        comm: record.comm,
        mapping: m,
        exe_path: None,
    })
}

impl<'a> RawSample<'a> {
    /// Parses one ring buffer record.
    pub fn parse(bytes: &'a [u8]) -> Result<RawSample<'a>, ParseError> {
        if bytes.len() < HEADER_LEN {
            return Err(ParseError::Truncated { len: bytes.len() });
        }
        // SAFETY: at least HEADER_LEN bytes; SampleHeader is plain old data, and
        // read_unaligned does not care about alignment.
        let header: SampleHeader =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<SampleHeader>()) };
        let same_thread = match header.kind {
            record_kind::NATIVE_STACKS => false,
            record_kind::NATIVE_STACKS_SAME_THREAD => true,
            kind => return Err(ParseError::UnknownKind { kind }),
        };
        if header.cpu >= MAX_CPUS {
            return Err(ParseError::BadCpu { cpu: header.cpu });
        }
        let header_len = usize::from(header.header_len);
        let kernel = usize::from(header.kernel_frames);
        let user = usize::from(header.user_frames);
        if header_len < HEADER_LEN || header_len > bytes.len() {
            return Err(ParseError::Truncated { len: bytes.len() });
        }
        let frames = &bytes[header_len..];
        if kernel > MAX_STACK_DEPTH || user > MAX_STACK_DEPTH || (kernel + user) * 8 > frames.len()
        {
            return Err(ParseError::BadFrameCount {
                kernel,
                user,
                len: bytes.len(),
            });
        }
        let (user, user_walk_derailed) = user_stack_len(&frames[kernel * 8..(kernel + user) * 8]);
        Ok(RawSample {
            tgid: header.tgid,
            tid: header.tid,
            cpu: header.cpu,
            comm: if same_thread {
                [0; TASK_COMM_LEN]
            } else {
                header.comm
            },
            same_thread,
            frames: &frames[..(kernel + user) * 8],
            kernel_frames: kernel,
            user_walk_derailed,
            fork_image: false,
        })
    }

    fn ips(bytes: &[u8]) -> impl ExactSizeIterator<Item = u64> + '_ {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("chunk of 8")))
    }

    /// Kernel instruction pointers, leaf first.
    pub fn kernel_ips(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        Self::ips(&self.frames[..self.kernel_frames * 8])
    }

    /// User instruction pointers, leaf first.
    pub fn user_ips(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        Self::ips(&self.frames[self.kernel_frames * 8..])
    }

    /// Number of kernel frames.
    pub fn kernel_len(&self) -> usize {
        self.kernel_frames
    }

    /// Number of user frames.
    pub fn user_len(&self) -> usize {
        self.frames.len() / 8 - self.kernel_frames
    }

    /// True when a stack filled all [`MAX_STACK_DEPTH`] slots, so its outermost
    /// frames were probably cut (the walk cannot tell a stack of exactly that depth
    /// from a deeper one).
    pub fn at_depth_limit(&self) -> bool {
        self.kernel_len() == MAX_STACK_DEPTH || self.user_len() == MAX_STACK_DEPTH
    }
}

/// The thread of each CPU's last record that carried a name, to name the records
/// that refer to it (`record_kind::NATIVE_STACKS_SAME_THREAD`). The eBPF program
/// sets them per CPU and the ring buffer keeps each CPU's records in order, so the
/// reader sees the same sequence. Bounded: one entry per CPU number below
/// [`MAX_CPUS`] seen, 24 bytes each (at most 192 KiB; 48 bytes on 2 CPUs).
#[derive(Debug, Default)]
pub struct ThreadNames {
    by_cpu: Vec<Option<(u32, [u8; TASK_COMM_LEN])>>,
}

impl ThreadNames {
    /// Remembers the name a record carries, or fills in the one it refers to.
    pub fn resolve(&mut self, sample: &mut RawSample<'_>) -> Result<(), ParseError> {
        let cpu = sample.cpu as usize; // < MAX_CPUS, checked by parse
        if self.by_cpu.len() <= cpu {
            self.by_cpu.resize(cpu + 1, None);
        }
        let slot = &mut self.by_cpu[cpu];
        if !sample.same_thread {
            *slot = Some((sample.tid, sample.comm));
            return Ok(());
        }
        match slot {
            Some((tid, comm)) if *tid == sample.tid => {
                sample.comm = *comm;
                Ok(())
            }
            _ => Err(ParseError::NoThreadName {
                tid: sample.tid,
                cpu: sample.cpu,
            }),
        }
    }
}

/// Counters of the drain stage, readable while it runs (for progress lines).
#[derive(Debug, Default)]
pub struct DrainStats {
    /// Sample records read from the ring buffer (fork and exec records not counted).
    pub records: AtomicU64,
    /// Records that failed to parse (counted, skipped).
    pub malformed: AtomicU64,
    /// Samples whose user stack was cut at an impossible return address.
    pub user_walks_derailed: AtomicU64,
    /// Samples with a stack at the [`MAX_STACK_DEPTH`] limit, its root cut.
    pub stacks_at_depth_limit: AtomicU64,
}

impl DrainStats {
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }
    pub fn user_walks_derailed(&self) -> u64 {
        self.user_walks_derailed.load(Ordering::Relaxed)
    }
    pub fn stacks_at_depth_limit(&self) -> u64 {
        self.stacks_at_depth_limit.load(Ordering::Relaxed)
    }
}

/// Requests to the drain task.
pub enum DrainCommand {
    /// Close the current interval: reply with its aggregate and start a new one.
    TakeInterval(oneshot::Sender<Aggregator>),
    /// Drain what is left, reply with the last aggregate, and end the task.
    Stop(oneshot::Sender<Aggregator>),
    /// These processes were removed from the process table: capture them again if
    /// their pid shows up again.
    Forget(Vec<u32>),
}

/// The drain task: the only reader of the ring buffer and the only writer of the
/// current interval's aggregate.
pub struct DrainLoop {
    ring: AsyncFd<RingBuf<MapData>>,
    aggregator: Aggregator,
    first_sight: FirstSight,
    thread_names: ThreadNames,
    stats: Arc<DrainStats>,
}

impl DrainLoop {
    pub fn new(
        ring: RingBuf<MapData>,
        aggregator: Aggregator,
        first_sight: FirstSight,
        stats: Arc<DrainStats>,
    ) -> std::io::Result<Self> {
        Ok(DrainLoop {
            // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
            // for as long as the AsyncFd holds it.
            ring: unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)?,
            aggregator,
            first_sight,
            thread_names: ThreadNames::default(),
            stats,
        })
    }

    /// Runs until a [`DrainCommand::Stop`] arrives or the command channel closes.
    pub async fn run(mut self, mut commands: mpsc::Receiver<DrainCommand>) {
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    match guard {
                        Ok(mut guard) => {
                            guard.clear_ready();
                        }
                        Err(_) => {
                            // Polling failed; fall back to the timer alone.
                            tokio::time::sleep(POLL_INTERVAL).await;
                        }
                    }
                    self.drain_available().await;
                }
                _ = ticker.tick() => self.drain_available().await,
                command = commands.recv() => match command {
                    Some(DrainCommand::TakeInterval(reply)) => {
                        self.drain_available().await;
                        let next = self.aggregator.empty_like();
                        let _ = reply.send(std::mem::replace(&mut self.aggregator, next));
                    }
                    Some(DrainCommand::Forget(tgids)) => self.first_sight.forget(tgids),
                    Some(DrainCommand::Stop(reply)) => {
                        self.drain_available().await;
                        let _ = reply.send(self.aggregator);
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    /// Reads every record available now, yielding between batches.
    async fn drain_available(&mut self) {
        loop {
            let mut handled = 0;
            let mut process_events = 0;
            {
                let ring = self.ring.get_mut();
                while handled < RECORDS_PER_BATCH {
                    let Some(item) = ring.next() else { break };
                    handled += 1;
                    let parsed = match Record::parse(&item) {
                        Ok(Record::Process(change)) => {
                            process_events += 1;
                            self.first_sight.process_changed(change);
                            continue;
                        }
                        Ok(Record::Mapping(seen)) => {
                            process_events += 1;
                            self.first_sight.young_mapping(seen);
                            continue;
                        }
                        Ok(Record::Exec { pid, path }) => {
                            process_events += 1;
                            self.first_sight
                                .process_changed(ProcessChange::Execed { pid });
                            if let Some(path) = path {
                                self.first_sight.exec_path(pid, path);
                            }
                            continue;
                        }
                        Ok(Record::Sample(mut sample)) => {
                            self.thread_names.resolve(&mut sample).map(|()| sample)
                        }
                        Err(e) => Err(e),
                    };
                    match parsed {
                        Ok(mut sample) => {
                            // Its exec event, if it comes, follows the samples
                            // taken before it in the ring.
                            sample.fork_image = self.first_sight.runs_forked_program(sample.tgid);
                            if sample.user_walk_derailed {
                                self.stats
                                    .user_walks_derailed
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            if sample.at_depth_limit() {
                                self.stats
                                    .stacks_at_depth_limit
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            self.first_sight.observe(sample.tgid, &sample.comm);
                            self.aggregator.add(&sample);
                        }
                        Err(_) => {
                            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            // First sights after the batch's mapping records (see FirstSight::flush).
            self.first_sight.flush();
            self.stats
                .records
                .fetch_add((handled - process_events) as u64, Ordering::Relaxed);
            if handled < RECORDS_PER_BATCH {
                return;
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Encodes a record as the eBPF program writes it (for tests of later stages).
#[cfg(test)]
pub(crate) fn encode_record(
    tgid: u32,
    tid: u32,
    comm: &[u8],
    kernel: &[u64],
    user: &[u64],
) -> Vec<u8> {
    let mut name = [0u8; TASK_COMM_LEN];
    name[..comm.len()].copy_from_slice(comm);
    let header = SampleHeader {
        kind: record_kind::NATIVE_STACKS,
        header_len: HEADER_LEN as u16,
        tgid,
        tid,
        cpu: 1,
        kernel_frames: kernel.len() as u16,
        user_frames: user.len() as u16,
        kernel_status: 0,
        user_status: 0,
        comm: name,
    };
    // SAFETY: SampleHeader is plain old data without padding.
    let mut bytes = unsafe {
        std::slice::from_raw_parts((&header as *const SampleHeader).cast::<u8>(), HEADER_LEN)
    }
    .to_vec();
    for ip in kernel.iter().chain(user) {
        bytes.extend_from_slice(&ip.to_ne_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::SampleRecord;

    fn record(kernel: &[u64], user: &[u64]) -> Vec<u8> {
        encode_record(42, 43, b"worker", kernel, user)
    }

    /// A well-formed record yields its ids and both stacks in order.
    #[test]
    fn parses_a_record() {
        let bytes = record(&[1, 2], &[0x1010, 0x1011, 0x1012]);
        let s = RawSample::parse(&bytes).unwrap();
        assert_eq!((s.tgid, s.tid, s.cpu), (42, 43, 1));
        assert_eq!(s.kernel_ips().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            s.user_ips().collect::<Vec<_>>(),
            vec![0x1010, 0x1011, 0x1012]
        );
        assert_eq!(&s.comm[..6], b"worker");
    }

    /// A user stack ends at the 0 that ends a frame-pointer chain (not counted) or
    /// at an address no user code can have (counted as derailed); the kernel stack
    /// is kept whole.
    #[test]
    fn user_stack_ends_at_an_impossible_address() {
        let bytes = record(
            &[0xffff_ffff_8100_0000],
            &[0x40_1000, 0x40_2000, 0, 0x40_3000],
        );
        let s = RawSample::parse(&bytes).unwrap();
        assert_eq!(s.user_ips().collect::<Vec<_>>(), vec![0x40_1000, 0x40_2000]);
        assert_eq!(s.kernel_len(), 1);
        assert!(!s.user_walk_derailed);
        for bad in [0x3ff, USER_SPACE_END, u64::MAX] {
            let bytes = record(&[], &[0x40_1000, bad, 0x40_3000]);
            let s = RawSample::parse(&bytes).unwrap();
            assert_eq!(
                s.user_ips().collect::<Vec<_>>(),
                vec![0x40_1000],
                "{bad:#x}"
            );
            assert!(s.user_walk_derailed, "{bad:#x}");
        }
        let bytes = record(&[], &[0x40_1000, 0x7f00_0000_0000]);
        assert_eq!(RawSample::parse(&bytes).unwrap().user_len(), 2);
    }

    fn process_event(kind: u16, pid: u32, parent: u32) -> Vec<u8> {
        let event = ProcessEvent {
            kind,
            header_len: PROCESS_EVENT_LEN as u16,
            pid,
            parent,
            reserved: 0,
        };
        // SAFETY: ProcessEvent is plain old data without padding.
        unsafe {
            std::slice::from_raw_parts(
                (&event as *const ProcessEvent).cast::<u8>(),
                PROCESS_EVENT_LEN,
            )
        }
        .to_vec()
    }

    /// Fork and exec records become process changes; a short one is malformed;
    /// a sample still parses as a sample.
    #[test]
    fn parses_process_events() {
        let fork = process_event(record_kind::PROCESS_FORKED, 20, 10);
        assert!(matches!(
            Record::parse(&fork),
            Ok(Record::Process(ProcessChange::Forked {
                pid: 20,
                parent: 10
            }))
        ));
        let exec = process_event(record_kind::PROCESS_EXECED, 20, 0);
        assert!(matches!(
            Record::parse(&exec),
            Ok(Record::Process(ProcessChange::Execed { pid: 20 }))
        ));
        assert!(Record::parse(&fork[..PROCESS_EVENT_LEN - 1]).is_err());
        assert!(Record::parse(&fork[..1]).is_err());
        assert!(matches!(
            Record::parse(&record(&[], &[0x40_1000])),
            Ok(Record::Sample(_))
        ));
    }

    /// The bytes of a plain-old-data record.
    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: only used on the #[repr(C)] records, read as bytes.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    /// A young process's mapping parses with its range, file and name; a short
    /// record, a wrong length or an empty range is malformed.
    #[test]
    fn parses_mapping_records() {
        let mut record = MappingRecord {
            kind: record_kind::PROCESS_MAPPING,
            header_len: MAPPING_RECORD_LEN as u16,
            pid: 31,
            comm: *b"sh\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            mapping: profiler_common::KernelMapping {
                start: 0x5555_0000,
                end: 0x5556_0000,
                offset: 0x2000,
                ino: 77,
                dev: (8 << 20) | 1,
                reserved: 0,
            },
        };
        let bytes = bytes_of(&record);
        match Record::parse(&bytes) {
            Ok(Record::Mapping(m)) => {
                assert_eq!((m.pid, m.mapping), (31, record.mapping));
                assert_eq!(&m.comm[..3], b"sh\0");
                assert_eq!(m.exe_path, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(Record::parse(&bytes[..MAPPING_RECORD_LEN - 1]).is_err());
        record.header_len -= 8;
        assert!(Record::parse(&bytes_of(&record)).is_err());
        record.header_len += 8;
        record.mapping.end = record.mapping.start;
        assert!(matches!(
            Record::parse(&bytes_of(&record)),
            Err(ParseError::EmptyMapping { .. })
        ));
    }

    /// An exec record carries its path, written as long as it is; an empty or
    /// non-UTF-8 path is none (and an exec all the same); a record shorter than
    /// its path, or with a path as long as the room for it, is malformed.
    #[test]
    fn parses_exec_records() {
        let exec = |path: &[u8]| {
            let mut record = profiler_common::ExecRecord {
                kind: record_kind::PROCESS_EXECED_PATH,
                header_len: EXEC_HEADER_LEN as u16,
                pid: 9,
                path_len: path.len() as u32,
                reserved: 0,
                path: [0; MAX_EXEC_PATH],
            };
            let n = path.len().min(MAX_EXEC_PATH);
            record.path[..n].copy_from_slice(&path[..n]);
            let mut bytes = bytes_of(&record);
            bytes.truncate(profiler_common::exec_record_len(path.len()).min(bytes.len()));
            bytes
        };
        let path_of = |bytes: &[u8]| match Record::parse(bytes) {
            Ok(Record::Exec { pid: 9, path }) => path,
            other => panic!("{other:?}"),
        };
        let sh = exec(b"/bin/sh");
        assert_eq!(sh.len(), 24);
        assert_eq!(path_of(&sh).as_deref(), Some("/bin/sh"));
        assert_eq!(path_of(&exec(b"")), None);
        assert_eq!(path_of(&exec(b"/bin/\xff")), None);
        assert!(Record::parse(&sh[..EXEC_HEADER_LEN + 6]).is_err());
        assert!(Record::parse(&sh[..3]).is_err());
        assert!(Record::parse(&exec(&[b'a'; MAX_EXEC_PATH])).is_err());
    }

    /// A stack that fills all MAX_STACK_DEPTH slots is at the limit (its root
    /// probably cut); one frame fewer, or one cut short by a derailed walk, is not.
    #[test]
    fn full_stacks_are_at_the_depth_limit() {
        let full: Vec<u64> = (0..MAX_STACK_DEPTH as u64).map(|i| 0x40_1000 + i).collect();
        let at_limit = |kernel: &[u64], user: &[u64]| {
            RawSample::parse(&record(kernel, user))
                .unwrap()
                .at_depth_limit()
        };
        let kernel_full: Vec<u64> = full.iter().map(|ip| ip | (0xffff << 48)).collect();
        assert!(at_limit(&[], &full));
        assert!(at_limit(&kernel_full, &[0x40_1000]));
        assert!(!at_limit(&kernel_full[1..], &full[1..]));
        let mut derailed = full.clone();
        derailed[100] = u64::MAX;
        assert!(!at_limit(&[], &derailed));
    }

    /// `record` of `tid` on `cpu`; `same_thread` makes it refer to the previous
    /// record of its CPU for the name (and leaves garbage where the name was).
    fn on_cpu(cpu: u32, tid: u32, comm: &[u8], same_thread: bool) -> Vec<u8> {
        let mut bytes = encode_record(42, tid, comm, &[], &[0x40_1000]);
        let header = bytes.as_mut_ptr().cast::<SampleHeader>();
        // SAFETY: encode_record starts with a whole SampleHeader; unaligned writes.
        unsafe {
            std::ptr::addr_of_mut!((*header).cpu).write_unaligned(cpu);
            if same_thread {
                std::ptr::addr_of_mut!((*header).kind)
                    .write_unaligned(record_kind::NATIVE_STACKS_SAME_THREAD);
                std::ptr::addr_of_mut!((*header).comm).write_unaligned([0xAA; TASK_COMM_LEN]);
            }
        }
        bytes
    }

    fn resolved(names: &mut ThreadNames, bytes: &[u8]) -> Result<[u8; TASK_COMM_LEN], ParseError> {
        let mut s = RawSample::parse(bytes)?;
        names.resolve(&mut s)?;
        Ok(s.comm)
    }

    /// A record without a name takes the name of its CPU's previous record; each
    /// CPU keeps its own, and a later name replaces an earlier one.
    #[test]
    fn same_thread_records_take_their_cpus_last_name() {
        let mut names = ThreadNames::default();
        let name = |s: &[u8]| {
            let mut n = [0; TASK_COMM_LEN];
            n[..s.len()].copy_from_slice(s);
            n
        };
        assert_eq!(
            resolved(&mut names, &on_cpu(0, 7, b"alpha", false)),
            Ok(name(b"alpha"))
        );
        assert_eq!(
            resolved(&mut names, &on_cpu(3, 9, b"beta", false)),
            Ok(name(b"beta"))
        );
        assert_eq!(
            resolved(&mut names, &on_cpu(0, 7, b"", true)),
            Ok(name(b"alpha"))
        );
        assert_eq!(
            resolved(&mut names, &on_cpu(3, 9, b"", true)),
            Ok(name(b"beta"))
        );
        assert_eq!(
            resolved(&mut names, &on_cpu(0, 7, b"renamed", false)),
            Ok(name(b"renamed"))
        );
        assert_eq!(
            resolved(&mut names, &on_cpu(0, 7, b"", true)),
            Ok(name(b"renamed"))
        );
    }

    /// A record that refers to a name its CPU never carried for that thread (a
    /// record went missing) is an error, not another thread's name.
    #[test]
    fn same_thread_record_without_a_name_is_refused() {
        let mut names = ThreadNames::default();
        assert_eq!(
            resolved(&mut names, &on_cpu(1, 7, b"", true)),
            Err(ParseError::NoThreadName { tid: 7, cpu: 1 })
        );
        resolved(&mut names, &on_cpu(1, 8, b"other", false)).unwrap();
        assert_eq!(
            resolved(&mut names, &on_cpu(1, 7, b"", true)),
            Err(ParseError::NoThreadName { tid: 7, cpu: 1 })
        );
        assert_eq!(
            RawSample::parse(&on_cpu(MAX_CPUS, 7, b"x", false)).unwrap_err(),
            ParseError::BadCpu { cpu: MAX_CPUS }
        );
    }

    /// Frame counts beyond the record's bytes are rejected, not read out of bounds.
    #[test]
    fn rejects_frames_past_the_end() {
        let mut bytes = record(&[1], &[2]);
        bytes.truncate(bytes.len() - 4);
        assert!(matches!(
            RawSample::parse(&bytes),
            Err(ParseError::BadFrameCount { .. })
        ));
    }

    /// Short, unknown-kind and garbage records are errors, never panics.
    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            RawSample::parse(&[0; 5]),
            Err(ParseError::Truncated { len: 5 })
        ));
        let mut bytes = record(&[], &[]);
        bytes[0] = 99;
        assert!(matches!(
            RawSample::parse(&bytes),
            Err(ParseError::UnknownKind { kind: 99 })
        ));
        // Pseudo-random bytes of every length up to a full record.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..std::mem::size_of::<SampleRecord>() {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Ok(s) = RawSample::parse(&buf) {
                assert!(s.kernel_len() <= MAX_STACK_DEPTH && s.user_len() <= MAX_STACK_DEPTH);
            }
        }
    }
}
