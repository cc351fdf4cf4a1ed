//! Stage 3: aggregate samples per (process, thread name, stack) for one interval.
//!
//! Bounded by construction: at most [`AggregateLimits::max_stacks`] distinct stacks
//! and [`AggregateLimits::max_frames`] stored instruction pointers per interval. When
//! either is reached the policy is [`WhenFull::FoldIntoProcess`]: the sample's count is
//! kept, under a single `[stack table full]` stack of its process and thread (itself
//! bounded, then folded into one host-wide bucket), and the fold is counted. Totals
//! stay exact; only stack detail is shed.
//!
//! Must never: allocate for a sample whose stack is already in the table.

use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use profiler_common::TASK_COMM_LEN;

use crate::drain::RawSample;

/// Default bound on distinct stacks per interval. Each entry costs ~64 bytes plus
/// 8 bytes per frame; with [`MAX_FRAMES_PER_INTERVAL`] the table stays under ~10 MiB.
pub const MAX_STACKS_PER_INTERVAL: usize = 32_768;
/// Default bound on instruction pointers stored per interval: 1 Mi x 8 bytes = 8 MiB.
pub const MAX_FRAMES_PER_INTERVAL: usize = 1 << 20;
/// Bound on per-(process, thread) overflow buckets: 4096 x ~40 bytes = 160 KiB.
pub const MAX_OVERFLOW_BUCKETS: usize = 4096;

/// What happens to a new stack when the table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Count the sample under its process's `[stack table full]` stack.
    FoldIntoProcess,
}

/// The bounds of one interval's aggregate.
#[derive(Clone, Copy, Debug)]
pub struct AggregateLimits {
    pub max_stacks: usize,
    pub max_frames: usize,
    pub when_full: WhenFull,
}

impl Default for AggregateLimits {
    fn default() -> Self {
        AggregateLimits {
            max_stacks: MAX_STACKS_PER_INTERVAL,
            max_frames: MAX_FRAMES_PER_INTERVAL,
            when_full: WhenFull::FoldIntoProcess,
        }
    }
}

/// One distinct (process, thread name, stack) and how often it was sampled.
#[derive(Debug)]
pub struct AggregatedStack {
    pub tgid: u32,
    /// Sampled while the process still ran the program it was forked with
    /// ([`crate::drain::RawSample::fork_image`]): apart from its other stacks, as
    /// its user frames may belong to its parent's program.
    pub fork_image: bool,
    /// Thread name, NUL padded.
    pub thread: [u8; TASK_COMM_LEN],
    /// `frames[..kernel_len]` are kernel frames, the rest user frames; leaf first.
    pub kernel_len: usize,
    pub frames: Box<[u64]>,
    pub count: u64,
}

impl AggregatedStack {
    pub fn kernel(&self) -> &[u64] {
        &self.frames[..self.kernel_len]
    }
    pub fn user(&self) -> &[u64] {
        &self.frames[self.kernel_len..]
    }
}

/// Counts of what the aggregator did in this interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateStats {
    /// Samples added.
    pub samples: u64,
    /// Samples whose stack was not kept because the table was full (their counts
    /// are kept in overflow buckets).
    pub folded_samples: u64,
    /// Of those, samples that did not even get a per-process bucket.
    pub unattributed_samples: u64,
}

/// The aggregate of one interval.
#[derive(Debug)]
pub struct Aggregator {
    limits: AggregateLimits,
    hasher: DefaultHashBuilder,
    table: HashTable<AggregatedStack>,
    frames_stored: usize,
    /// Samples per (tgid, thread) whose stacks did not fit.
    overflow: HashMap<(u32, [u8; TASK_COMM_LEN]), u64>,
    stats: AggregateStats,
}

impl Aggregator {
    pub fn new(limits: AggregateLimits) -> Self {
        Aggregator {
            limits,
            hasher: DefaultHashBuilder::default(),
            table: HashTable::new(),
            frames_stored: 0,
            overflow: HashMap::new(),
            stats: AggregateStats::default(),
        }
    }

    /// A new, empty aggregator with the same limits.
    pub fn empty_like(&self) -> Self {
        Aggregator::new(self.limits)
    }

    /// Adds one sample.
    pub fn add(&mut self, sample: &RawSample<'_>) {
        self.stats.samples += 1;
        let kernel_len = sample.kernel_len();
        let frames_len = kernel_len + sample.user_len();
        let hash = hash_stack(
            &self.hasher,
            (sample.tgid, sample.fork_image),
            &sample.comm,
            kernel_len,
            sample.kernel_ips().chain(sample.user_ips()),
        );
        let eq = |e: &AggregatedStack| {
            e.tgid == sample.tgid
                && e.fork_image == sample.fork_image
                && e.thread == sample.comm
                && e.kernel_len == kernel_len
                && e.frames.len() == frames_len
                && e.frames
                    .iter()
                    .copied()
                    .eq(sample.kernel_ips().chain(sample.user_ips()))
        };
        if let Some(entry) = self.table.find_mut(hash, eq) {
            entry.count += 1;
            return;
        }
        if self.table.len() >= self.limits.max_stacks
            || self.frames_stored + frames_len > self.limits.max_frames
        {
            self.fold(sample.tgid, sample.comm);
            return;
        }
        self.frames_stored += frames_len;
        let entry = AggregatedStack {
            tgid: sample.tgid,
            fork_image: sample.fork_image,
            thread: sample.comm,
            kernel_len,
            frames: sample.kernel_ips().chain(sample.user_ips()).collect(),
            count: 1,
        };
        let hasher = &self.hasher;
        self.table.insert_unique(hash, entry, |e| {
            hash_stack(
                hasher,
                (e.tgid, e.fork_image),
                &e.thread,
                e.kernel_len,
                e.frames.iter().copied(),
            )
        });
    }

    fn fold(&mut self, tgid: u32, thread: [u8; TASK_COMM_LEN]) {
        match self.limits.when_full {
            WhenFull::FoldIntoProcess => {
                self.stats.folded_samples += 1;
                let key = (tgid, thread);
                if let Some(count) = self.overflow.get_mut(&key) {
                    *count += 1;
                } else if self.overflow.len() < MAX_OVERFLOW_BUCKETS {
                    self.overflow.insert(key, 1);
                } else {
                    self.stats.unattributed_samples += 1;
                }
            }
        }
    }

    /// Distinct stacks held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty() && self.overflow.is_empty() && self.stats.unattributed_samples == 0
    }

    pub fn stats(&self) -> AggregateStats {
        self.stats
    }

    /// The stacks held, in no particular order.
    pub fn stacks(&self) -> impl Iterator<Item = &AggregatedStack> {
        self.table.iter()
    }

    /// Per-(process, thread) counts of samples whose stacks did not fit.
    pub fn overflow(&self) -> impl Iterator<Item = (u32, &[u8; TASK_COMM_LEN], u64)> {
        self.overflow
            .iter()
            .map(|((tgid, thread), n)| (*tgid, thread, *n))
    }

    /// The processes with samples in this interval, each once, in ascending order.
    pub fn distinct_tgids(&self) -> Vec<u32> {
        let mut tgids: Vec<u32> = self.tgids().collect();
        tgids.sort_unstable();
        tgids.dedup();
        tgids
    }

    /// Processes that have at least one sample in this interval.
    pub fn tgids(&self) -> impl Iterator<Item = u32> + '_ {
        self.table
            .iter()
            .map(|s| s.tgid)
            .chain(self.overflow.keys().map(|(tgid, _)| *tgid))
    }
}

/// The table's hash of one (process, thread, stack); the same for a sample and for
/// the entry made from it.
fn hash_stack(
    hasher: &DefaultHashBuilder,
    process: (u32, bool),
    thread: &[u8; TASK_COMM_LEN],
    kernel_len: usize,
    frames: impl Iterator<Item = u64>,
) -> u64 {
    let mut h = hasher.build_hasher();
    process.hash(&mut h);
    thread.hash(&mut h);
    kernel_len.hash(&mut h);
    for f in frames {
        f.hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::encode_record;

    /// Where the tests' user addresses start: small numbers are not user code (the
    /// parser ends a user stack at one).
    const USER: u64 = 0x40_0000;

    /// Adds a sample; `user` frames are offsets from [`USER`].
    fn add(agg: &mut Aggregator, tgid: u32, comm: &[u8], kernel: &[u64], user: &[u64]) {
        let user: Vec<u64> = user.iter().map(|ip| USER + ip).collect();
        let bytes = encode_record(tgid, tgid, comm, kernel, &user);
        agg.add(&RawSample::parse(&bytes).unwrap());
    }

    /// Identical (process, thread, stack) samples share one entry; any difference
    /// (thread name, or a frame moving from kernel to user) makes a new one.
    #[test]
    fn merges_identical_stacks_only() {
        let mut agg = Aggregator::new(AggregateLimits::default());
        add(&mut agg, 1, b"a", &[9], &[1, 2]);
        add(&mut agg, 1, b"a", &[9], &[1, 2]);
        add(&mut agg, 1, b"b", &[9], &[1, 2]);
        add(&mut agg, 1, b"a", &[], &[9, 1, 2]);
        add(&mut agg, 2, b"a", &[9], &[1, 2]);
        assert_eq!(agg.len(), 4);
        let counts: u64 = agg.stacks().map(|s| s.count).sum();
        assert_eq!(counts, 5);
        let merged = agg
            .stacks()
            .find(|s| s.tgid == 1 && &s.thread[..2] == b"a\0" && s.kernel_len == 1)
            .unwrap();
        assert_eq!(
            (merged.kernel(), merged.user(), merged.count),
            (&[9][..], &[USER + 1, USER + 2][..], 2)
        );
    }

    /// A sample taken before the process exec'd is kept apart from the same stack
    /// after: its user frames may be its parent's program's.
    #[test]
    fn fork_image_samples_are_kept_apart() {
        let mut agg = Aggregator::new(AggregateLimits::default());
        let user = [USER + 1, USER + 2];
        let bytes = encode_record(5, 5, b"sh", &[9], &user);
        let mut sample = RawSample::parse(&bytes).unwrap();
        agg.add(&sample);
        sample.fork_image = true;
        agg.add(&sample);
        agg.add(&sample);
        assert_eq!(agg.len(), 2);
        let counts: Vec<(bool, u64)> = {
            let mut c: Vec<_> = agg.stacks().map(|s| (s.fork_image, s.count)).collect();
            c.sort();
            c
        };
        assert_eq!(counts, [(false, 1), (true, 2)]);
    }

    /// Past the stack bound, new stacks are folded into their process's bucket:
    /// the table does not grow, and no sample is lost from the totals.
    #[test]
    fn bounded_by_stack_count() {
        let limits = AggregateLimits {
            max_stacks: 10,
            ..AggregateLimits::default()
        };
        let mut agg = Aggregator::new(limits);
        for i in 0..1000u64 {
            add(&mut agg, 7, b"t", &[], &[i, 1]);
        }
        assert_eq!(agg.len(), 10);
        assert_eq!(agg.stats().folded_samples, 990);
        let overflow: Vec<_> = agg.overflow().collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!((overflow[0].0, overflow[0].2), (7, 990));
        // Known stacks still count after the table is full.
        add(&mut agg, 7, b"t", &[], &[0, 1]);
        assert_eq!(agg.stacks().map(|s| s.count).sum::<u64>(), 11);
    }

    /// The frame bound holds too: long stacks stop being stored once it is reached.
    #[test]
    fn bounded_by_frames() {
        let limits = AggregateLimits {
            max_frames: 300,
            ..AggregateLimits::default()
        };
        let mut agg = Aggregator::new(limits);
        for i in 0..10u64 {
            let user: Vec<u64> = (0..100).map(|f| f + i * 1000).collect();
            add(&mut agg, 7, b"t", &[], &user);
        }
        assert_eq!(agg.len(), 3);
        assert_eq!(agg.stats().folded_samples, 7);
    }

    /// When even the overflow buckets are full, samples are still counted, host-wide.
    #[test]
    fn overflow_buckets_are_bounded() {
        let limits = AggregateLimits {
            max_stacks: 0,
            ..AggregateLimits::default()
        };
        let mut agg = Aggregator::new(limits);
        for tgid in 0..(MAX_OVERFLOW_BUCKETS as u32 + 5) {
            add(&mut agg, tgid, b"t", &[], &[1]);
        }
        assert_eq!(agg.overflow().count(), MAX_OVERFLOW_BUCKETS);
        assert_eq!(agg.stats().unattributed_samples, 5);
        assert_eq!(agg.stats().samples, MAX_OVERFLOW_BUCKETS as u64 + 5);
    }
}
