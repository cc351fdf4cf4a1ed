//! Stage 5: the symbolized profile of one interval, the input of every exporter.
//!
//! Tables are deduplicated: a location (one code address in one binary, or one
//! kernel address) appears once however many stacks and processes share it. Stacks
//! list location ids leaf first, as pprof does.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

/// What kind of code a frame is, so users (and exporters) can tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Kernel code.
    Kernel,
    /// Native user code (ELF).
    Native,
    /// JIT-compiled Java, named from the JVM's perf map.
    Java,
    /// JIT-compiled JavaScript, named from node's perf map.
    JavaScript,
    /// A Python function, from py-spy.
    Python,
    /// A Ruby method, from rbspy.
    Ruby,
    /// A PHP function, from phpspy.
    Php,
}

impl FrameKind {
    /// Suffix on frame names in folded stacks, flamegraphs and pprof function names
    /// (the flamegraph convention: `_[k]` kernel, `_[j]` JIT).
    pub const fn suffix(self) -> &'static str {
        match self {
            FrameKind::Kernel => "_[k]",
            FrameKind::Native => "",
            FrameKind::Java | FrameKind::JavaScript => "_[j]",
            FrameKind::Python => "_[py]",
            FrameKind::Ruby => "_[rb]",
            FrameKind::Php => "_[php]",
        }
    }

    /// OpenTelemetry `profile.frame.type`.
    pub const fn otel_type(self) -> &'static str {
        match self {
            FrameKind::Kernel => "kernel",
            FrameKind::Native => "native",
            FrameKind::Java => "jvm",
            FrameKind::JavaScript => "v8js",
            FrameKind::Python => "cpython",
            FrameKind::Ruby => "ruby",
            FrameKind::Php => "php",
        }
    }
}

/// One function at one source position; several make an inlined chain.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Line {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    /// 0 when unknown.
    pub line: u32,
}

/// A binary (or the kernel) that locations belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// Path as the process mapped it, or `[kernel.kallsyms]`, `[anon]`, ...
    pub path: Arc<str>,
    /// GNU build id (raw bytes).
    pub build_id: Option<Arc<[u8]>>,
}

/// One code address.
#[derive(Clone, Debug)]
pub struct Location {
    /// File offset inside [`Location::object`] for user code, the kernel address for
    /// kernel code, the absolute address when nothing maps it.
    pub address: u64,
    /// Index into [`Profile::objects`].
    pub object: Option<usize>,
    pub kind: FrameKind,
    /// Innermost function first (inlined callees before their callers); never empty.
    pub lines: Arc<[Line]>,
}

/// One (process, thread, stack) and its sample count.
#[derive(Clone, Debug)]
pub struct Stack {
    pub pid: u32,
    /// Process name.
    pub process: Arc<str>,
    /// Thread name.
    pub thread: Arc<str>,
    /// Indices into [`Profile::locations`], leaf first (4 bytes a frame: an
    /// interval at its bound holds 1 Mi of them).
    pub locations: Vec<u32>,
    pub count: u64,
}

/// What is known about a process whose stacks are in the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessMeta {
    pub name: Arc<str>,
    /// Path of the executable.
    pub exe: Option<Arc<str>>,
    pub container_id: Option<Arc<str>>,
}

/// Why frames could not be named; counts are of distinct addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnknownCounts {
    /// The binary has no symbol covering the address.
    pub no_symbol: u64,
    /// The binary could not be opened (or the object table was full).
    pub object_unavailable: u64,
    /// Anonymous executable memory (JIT code without a perf map, trampolines).
    pub anonymous: u64,
    /// The address is in no mapping of the process.
    pub unmapped: u64,
    /// The process exited before its mappings were read.
    pub process_gone: u64,
    /// A kernel address that kallsyms does not cover.
    pub kernel: u64,
}

impl UnknownCounts {
    pub fn total(&self) -> u64 {
        self.no_symbol
            + self.object_unavailable
            + self.anonymous
            + self.unmapped
            + self.process_gone
            + self.kernel
    }

    /// (reason, count) pairs with non-zero counts, for summaries.
    pub fn reasons(&self) -> Vec<(&'static str, u64)> {
        [
            ("no symbol", self.no_symbol),
            ("binary unavailable", self.object_unavailable),
            ("anonymous/JIT memory", self.anonymous),
            ("unmapped", self.unmapped),
            ("process gone before capture", self.process_gone),
            ("kernel", self.kernel),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
    }
}

/// A symbolized profile.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Wall-clock start of the interval.
    pub start: SystemTime,
    pub duration: Duration,
    /// Sampling frequency per CPU.
    pub frequency_hz: u64,
    pub objects: Vec<Object>,
    pub locations: Vec<Location>,
    pub stacks: Vec<Stack>,
    /// Metadata of the processes in `stacks`, when they were captured.
    pub processes: BTreeMap<u32, ProcessMeta>,
    pub unknown: UnknownCounts,
    /// JIT frames named from perf maps.
    pub jit: crate::symbolize::JitCounts,
}

impl Profile {
    /// CPU time one sample stands for.
    pub fn period_ns(&self) -> u64 {
        1_000_000_000 / self.frequency_hz.max(1)
    }

    /// Total samples.
    pub fn samples(&self) -> u64 {
        self.stacks.iter().map(|s| s.count).sum()
    }
}

/// A small hand-built profile for exporter tests: process `app` with
/// `main -> work -> do_syscall_64 [k]` (3 samples) and `main -> work_[a;b]` (2 samples,
/// a name with a separator in it).
#[cfg(test)]
pub fn test_profile() -> Profile {
    let line = |f: &str| Line {
        function: f.into(),
        file: Some("app.c".into()),
        line: 7,
    };
    let loc = |f: &str, kind, object| Location {
        address: 0x1000,
        object: Some(object),
        kind,
        lines: Arc::new([line(f)]),
    };
    Profile {
        start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        duration: Duration::from_secs(10),
        frequency_hz: 100,
        objects: vec![
            Object {
                path: "/usr/bin/app".into(),
                build_id: Some(Arc::from(&[0xab, 0xcd][..])),
            },
            Object {
                path: "[kernel.kallsyms]".into(),
                build_id: None,
            },
        ],
        locations: vec![
            loc("main", FrameKind::Native, 0),
            loc("work", FrameKind::Native, 0),
            loc("do_syscall_64", FrameKind::Kernel, 1),
            loc("work_[a;b]", FrameKind::Native, 0),
        ],
        stacks: vec![
            Stack {
                pid: 42,
                process: "app".into(),
                thread: "app".into(),
                locations: vec![2, 1, 0],
                count: 3,
            },
            Stack {
                pid: 42,
                process: "app".into(),
                thread: "worker".into(),
                locations: vec![3, 0],
                count: 2,
            },
        ],
        processes: BTreeMap::from([(
            42,
            ProcessMeta {
                name: "app".into(),
                exe: Some("/usr/bin/app".into()),
                container_id: None,
            },
        )]),
        unknown: UnknownCounts::default(),
        jit: Default::default(),
    }
}
