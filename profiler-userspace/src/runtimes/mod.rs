//! Interpreted runtimes: which runtime a process runs ([`detect`]), the arguments of
//! the external profilers that see inside it ([`pyspy`], [`rbspy`], [`phpspy`],
//! [`jattach`]), parsers of what those profilers write, and a safe reader of the
//! `/tmp/perf-PID.map` files that JIT runtimes (Java through jattach, Node) write
//! ([`perfmap`]).
//!
//! Stacks from these tools enter the pipeline at the aggregate stage as
//! [`InterpStack`]s: frames root first, a sample count and an optional thread.
//!
//! Owns: parsing and detection only. Must never: spawn or signal a process (the
//! supervisor does), fail on a garbage line (it is skipped and counted), or grow past
//! the bounds below (what does not fit is counted, never silently dropped).

pub mod detect;
pub mod jattach;
pub mod perfmap;
pub mod phpspy;
pub mod pyspy;
pub mod rbspy;

use std::{
    fmt,
    fs::File,
    hash::{BuildHasher as _, Hash as _, Hasher as _},
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
};

use hashbrown::{DefaultHashBuilder, HashTable};

/// Distinct stacks one parse keeps: each costs [`InterpStack`]'s 56 bytes, an 8-byte
/// index slot and its frames, ~0.5 MiB without frames at the limit. More stacks go to
/// the [`OVERFLOW_FRAME`] stack.
pub const MAX_STACKS_PER_PARSE: usize = 8192;
/// Frames kept per stack: each costs [`InterpFrame`]'s 56 bytes plus its strings, so a
/// full-depth stack costs ~14 KiB plus strings. Deeper stacks keep their innermost
/// frames under one [`TRUNCATED_FRAME`] root.
pub const MAX_FRAMES_PER_STACK: usize = 256;
/// Memory the stored stacks of one parse may use, structs and strings counted: the
/// real cap (16 MiB); a stack that would pass it goes to the [`OVERFLOW_FRAME`] stack.
pub const MAX_STORED_BYTES_PER_PARSE: usize = 16 << 20;
/// Longest line read: the one line buffer a parse holds (256 KiB). A longer line is
/// skipped without being buffered and counted as malformed.
pub const MAX_LINE_BYTES: usize = 256 << 10;

/// The single frame of the stack that counts the samples of stacks that did not fit
/// (the same name the eBPF side's aggregator uses).
pub const OVERFLOW_FRAME: &str = "[stack table full]";
/// The root frame that replaces the root-most frames of a stack deeper than the limit.
pub const TRUNCATED_FRAME: &str = "[truncated]";

/// An interpreted or JIT-compiled runtime whose frames the native unwinder cannot name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    /// CPython: profiled with py-spy.
    Python,
    /// A JVM (HotSpot): JIT frames named from the perf map jattach makes it write.
    Java,
    /// PHP (CLI, FPM, CGI, or an embedding libphp): profiled with phpspy.
    Php,
    /// CRuby: profiled with rbspy.
    Ruby,
    /// Node.js: JIT frames named from the perf map `--perf-basic-prof` writes.
    Node,
}

impl Runtime {
    /// Every runtime, in the order they are listed to users.
    pub const ALL: [Runtime; 5] = [
        Runtime::Python,
        Runtime::Ruby,
        Runtime::Php,
        Runtime::Java,
        Runtime::Node,
    ];

    /// Lower-case name, for labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Java => "java",
            Runtime::Php => "php",
            Runtime::Ruby => "ruby",
            Runtime::Node => "node",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of an interpreted stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InterpFrame {
    /// Function as the tool names it (`Worker.run`, `Foo::bar`, `block in work`).
    pub function: String,
    /// Source file, when the tool gives one.
    pub file: Option<String>,
    /// Line in `file`, when known (tools that write 0 or -1 for "unknown" give `None`).
    pub line: Option<u32>,
}

impl InterpFrame {
    /// A frame with a function name only.
    pub fn named(function: impl Into<String>) -> Self {
        InterpFrame {
            function: function.into(),
            file: None,
            line: None,
        }
    }

    fn stored_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.function.len()
            + self.file.as_ref().map_or(0, String::len)
    }
}

/// One distinct interpreted stack and how many samples saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpStack {
    /// Frames, root first.
    pub frames: Vec<InterpFrame>,
    /// Samples.
    pub count: u64,
    /// Thread (name, or id when unnamed), when the tool reports one.
    pub thread: Option<String>,
}

/// The stacks a runtime profiler saw in one process during one interval: what the
/// symbolizer merges into that interval's profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpretedSamples {
    pub pid: u32,
    pub runtime: Runtime,
    /// The rate the tool sampled at (`--runtime-rate`, capped by the tool's
    /// maximum): the symbolizer scales the counts to the native frequency.
    pub rate_hz: u32,
    /// Root first, as parsed.
    pub stacks: Vec<InterpStack>,
}

/// What one parse produced, and what it skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Distinct stacks in first-seen order; the [`OVERFLOW_FRAME`] stack, if any, last.
    pub stacks: Vec<InterpStack>,
    /// Lines that could not be parsed or were longer than [`ParseLimits::max_line_bytes`].
    pub malformed_lines: u64,
    /// Samples thrown away because one of their lines was malformed (phpspy, whose
    /// samples span several lines) or their last line was never written.
    pub malformed_samples: u64,
    /// Stacks deeper than [`ParseLimits::max_frames_per_stack`], kept truncated.
    pub truncated_stacks: u64,
    /// Samples of stacks that did not fit the table; they are the count of the
    /// [`OVERFLOW_FRAME`] stack, so totals stay exact.
    pub overflow_samples: u64,
    /// Memory the stored stacks take, as [`ParseLimits::max_stored_bytes`] counts it.
    pub stored_bytes: usize,
}

impl Parsed {
    /// Samples in all stacks (the overflow stack included).
    pub fn total_samples(&self) -> u64 {
        self.stacks
            .iter()
            .fold(0u64, |sum, s| sum.saturating_add(s.count))
    }

    /// Whether this parse kept its bounds: at most `max_stacks` stacks plus the overflow
    /// stack, each with 1..=`max_frames_per_stack` frames and a positive count, and
    /// the overflow stack's count equal to `overflow_samples`. Every parser upholds it;
    /// the tests and fuzz targets check it.
    pub fn respects(&self, limits: &ParseLimits) -> bool {
        let max_frames = limits.max_frames_per_stack.max(2);
        let has_overflow = self.overflow_samples > 0;
        let overflow_ok = !has_overflow
            || self.stacks.last().is_some_and(|s| {
                s.frames == [InterpFrame::named(OVERFLOW_FRAME)]
                    && s.thread.is_none()
                    && s.count == self.overflow_samples
            });
        let stored = self.stacks.len().saturating_sub(usize::from(has_overflow));
        overflow_ok
            && stored <= limits.max_stacks
            && self.stored_bytes <= limits.max_stored_bytes
            && self
                .stacks
                .iter()
                .all(|s| s.count > 0 && !s.frames.is_empty() && s.frames.len() <= max_frames)
    }
}

/// Bounds of one parse; [`Default`] gives the named constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseLimits {
    /// See [`MAX_STACKS_PER_PARSE`].
    pub max_stacks: usize,
    /// See [`MAX_FRAMES_PER_STACK`]; at least 2 is used (a truncated stack keeps its
    /// [`TRUNCATED_FRAME`] root and one frame).
    pub max_frames_per_stack: usize,
    /// See [`MAX_STORED_BYTES_PER_PARSE`].
    pub max_stored_bytes: usize,
    /// See [`MAX_LINE_BYTES`].
    pub max_line_bytes: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_stacks: MAX_STACKS_PER_PARSE,
            max_frames_per_stack: MAX_FRAMES_PER_STACK,
            max_stored_bytes: MAX_STORED_BYTES_PER_PARSE,
            max_line_bytes: MAX_LINE_BYTES,
        }
    }
}

/// Why a profiler's output file could not be read (shared by every parser's error).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The file could not be opened: the tool never created it, or it was removed.
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// Reading failed partway through the file.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// One input line, or the fact that it was too long to look at.
pub(crate) enum Line<'a> {
    Text(&'a str),
    TooLong,
}

/// A line-at-a-time parser: the same state machine reads a file or a byte slice.
pub(crate) trait LineParser {
    fn line(&mut self, line: Line<'_>);
    fn finish(self) -> Parsed;
}

/// One line of a one-sample-per-line format, parsed: thread, frames root first, count.
pub(crate) type StackLine = (Option<String>, Vec<InterpFrame>, u64);

/// The [`LineParser`] of formats with one stack per line (py-spy raw, rbspy
/// collapsed): blank lines are skipped, a line `parse_line` rejects (or one too long
/// to read) is counted as malformed, the rest go to a bounded [`StackTable`].
pub(crate) struct StackLineParser<F> {
    table: StackTable,
    malformed: u64,
    parse_line: F,
}

impl<F: FnMut(&str) -> Option<StackLine>> StackLineParser<F> {
    pub(crate) fn new(limits: &ParseLimits, parse_line: F) -> Self {
        StackLineParser {
            table: StackTable::new(*limits),
            malformed: 0,
            parse_line,
        }
    }
}

impl<F: FnMut(&str) -> Option<StackLine>> LineParser for StackLineParser<F> {
    fn line(&mut self, line: Line<'_>) {
        let Line::Text(text) = line else {
            self.malformed += 1;
            return;
        };
        if text.trim().is_empty() {
            return;
        }
        match (self.parse_line)(text) {
            Some((thread, frames, count)) => self.table.add(thread, frames, count),
            None => self.malformed += 1,
        }
    }

    fn finish(self) -> Parsed {
        self.table.finish(self.malformed, 0)
    }
}

/// Feeds every line of `input` to `parser` (a final empty segment after the last
/// newline is not a line).
pub(crate) fn parse_bytes<P: LineParser>(mut parser: P, input: &[u8], max_line: usize) -> Parsed {
    let mut rest = input;
    while !rest.is_empty() {
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        feed(&mut parser, line, max_line);
        rest = next;
    }
    parser.finish()
}

/// Feeds every line of the file at `path` to `parser`, holding at most one line.
pub(crate) fn parse_file<P: LineParser>(
    mut parser: P,
    path: &Path,
    max_line: usize,
) -> Result<Parsed, OutputError> {
    let file = File::open(path).map_err(|source| OutputError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let read_error = |source| OutputError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let available = match reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            if available.is_empty() {
                break;
            }
            any = true;
            let (chunk, newline) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            let used = chunk.len() + usize::from(newline);
            if !too_long {
                if buf.len() + chunk.len() > max_line {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(chunk);
                }
            }
            reader.consume(used);
            if newline {
                break;
            }
        }
        if !any {
            return Ok(parser.finish());
        }
        if too_long {
            parser.line(Line::TooLong);
        } else {
            feed(&mut parser, &buf, max_line);
        }
    }
}

fn feed<P: LineParser>(parser: &mut P, line: &[u8], max_line: usize) {
    if line.len() > max_line {
        parser.line(Line::TooLong);
        return;
    }
    let text = String::from_utf8_lossy(line);
    parser.line(Line::Text(text.strip_suffix('\r').unwrap_or(&text)));
}

/// Distinct stacks of one parse, bounded by [`ParseLimits`].
pub(crate) struct StackTable {
    limits: ParseLimits,
    hasher: DefaultHashBuilder,
    index: HashTable<usize>,
    stacks: Vec<InterpStack>,
    stored_bytes: usize,
    truncated_stacks: u64,
    overflow_samples: u64,
}

impl StackTable {
    pub(crate) fn new(limits: ParseLimits) -> Self {
        StackTable {
            limits,
            hasher: DefaultHashBuilder::default(),
            index: HashTable::new(),
            stacks: Vec::new(),
            stored_bytes: 0,
            truncated_stacks: 0,
            overflow_samples: 0,
        }
    }

    /// Counts `count` samples of `frames` (root first) on `thread`.
    pub(crate) fn add(&mut self, thread: Option<String>, mut frames: Vec<InterpFrame>, count: u64) {
        let max_frames = self.limits.max_frames_per_stack.max(2);
        if frames.len() > max_frames {
            self.truncated_stacks += 1;
            frames.drain(..frames.len() - (max_frames - 1));
            frames.insert(0, InterpFrame::named(TRUNCATED_FRAME));
        }
        let hash = {
            let mut h = self.hasher.build_hasher();
            thread.hash(&mut h);
            frames.hash(&mut h);
            h.finish()
        };
        let stacks = &self.stacks;
        if let Some(&i) = self.index.find(hash, |&i| {
            stacks[i].thread == thread && stacks[i].frames == frames
        }) {
            let stack = &mut self.stacks[i];
            stack.count = stack.count.saturating_add(count);
            return;
        }
        let cost = std::mem::size_of::<InterpStack>()
            + std::mem::size_of::<usize>()
            + thread.as_ref().map_or(0, String::len)
            + frames.iter().map(InterpFrame::stored_bytes).sum::<usize>();
        if self.stacks.len() >= self.limits.max_stacks
            || self.stored_bytes.saturating_add(cost) > self.limits.max_stored_bytes
        {
            self.overflow_samples = self.overflow_samples.saturating_add(count);
            return;
        }
        self.stored_bytes += cost;
        let i = self.stacks.len();
        self.stacks.push(InterpStack {
            frames,
            count,
            thread,
        });
        let (stacks, hasher) = (&self.stacks, &self.hasher);
        self.index.insert_unique(hash, i, |&j| {
            let mut h = hasher.build_hasher();
            stacks[j].thread.hash(&mut h);
            stacks[j].frames.hash(&mut h);
            h.finish()
        });
    }

    /// The stacks, with the overflow stack last, and the counters.
    pub(crate) fn finish(mut self, malformed_lines: u64, malformed_samples: u64) -> Parsed {
        if self.overflow_samples > 0 {
            self.stacks.push(InterpStack {
                frames: vec![InterpFrame::named(OVERFLOW_FRAME)],
                count: self.overflow_samples,
                thread: None,
            });
        }
        Parsed {
            stacks: self.stacks,
            malformed_lines,
            malformed_samples,
            truncated_stacks: self.truncated_stacks,
            overflow_samples: self.overflow_samples,
            stored_bytes: self.stored_bytes,
        }
    }
}

/// A positive sample count (`COUNT` at the end of folded lines).
pub(crate) fn parse_count(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&n| n > 0)
}

/// Splits a folded line `frame;frame;... COUNT` into its frames part and count.
pub(crate) fn split_folded(line: &str) -> Option<(&str, u64)> {
    let (stack, count) = line.trim_end().rsplit_once(' ')?;
    let count = parse_count(count)?;
    (!stack.is_empty()).then_some((stack, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(names: &[&str]) -> Vec<InterpFrame> {
        names.iter().map(|n| InterpFrame::named(*n)).collect()
    }

    /// Identical stacks on the same thread merge their counts; other threads stay apart.
    #[test]
    fn table_merges_identical_stacks() {
        let mut t = StackTable::new(ParseLimits::default());
        t.add(None, frames(&["a", "b"]), 2);
        t.add(None, frames(&["a", "b"]), 3);
        t.add(Some("t1".into()), frames(&["a", "b"]), 1);
        let p = t.finish(0, 0);
        assert_eq!(p.stacks.len(), 2);
        assert_eq!(p.stacks[0].count, 5);
        assert_eq!(p.stacks[1].thread.as_deref(), Some("t1"));
        assert_eq!(p.total_samples(), 6);
    }

    /// Past the stack limit samples are counted under the overflow stack, so totals stay exact.
    #[test]
    fn table_overflow_keeps_totals() {
        let limits = ParseLimits {
            max_stacks: 2,
            ..ParseLimits::default()
        };
        let mut t = StackTable::new(limits);
        for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
            t.add(None, frames(&[n]), i as u64 + 1);
        }
        t.add(None, frames(&["a"]), 10);
        let p = t.finish(0, 0);
        assert_eq!(p.stacks.len(), 3);
        assert_eq!(p.overflow_samples, 3 + 4);
        assert_eq!(p.stacks[2].frames, frames(&[OVERFLOW_FRAME]));
        assert_eq!(p.stacks[0].count, 11);
        assert_eq!(p.total_samples(), 1 + 2 + 3 + 4 + 10);
        assert!(p.respects(&limits));
    }

    /// The byte budget also sends stacks to the overflow stack.
    #[test]
    fn table_byte_budget() {
        let limits = ParseLimits {
            max_stored_bytes: 400,
            ..ParseLimits::default()
        };
        let mut t = StackTable::new(limits);
        t.add(None, frames(&["a"]), 1);
        t.add(None, frames(&[&"x".repeat(500)]), 7);
        let p = t.finish(0, 0);
        assert_eq!(p.stacks.len(), 2);
        assert_eq!(p.overflow_samples, 7);
    }

    /// A too-deep stack keeps its innermost frames under a `[truncated]` root, and is counted.
    #[test]
    fn table_truncates_deep_stacks() {
        let limits = ParseLimits {
            max_frames_per_stack: 3,
            ..ParseLimits::default()
        };
        let mut t = StackTable::new(limits);
        t.add(None, frames(&["root", "a", "b", "leaf"]), 1);
        let p = t.finish(0, 0);
        assert_eq!(p.truncated_stacks, 1);
        assert_eq!(p.stacks[0].frames, frames(&[TRUNCATED_FRAME, "b", "leaf"]));
        assert!(p.respects(&limits));
    }

    struct Collect(Vec<Option<String>>);
    impl LineParser for Collect {
        fn line(&mut self, line: Line<'_>) {
            self.0.push(match line {
                Line::Text(t) => Some(t.to_string()),
                Line::TooLong => None,
            });
        }
        fn finish(self) -> Parsed {
            Parsed {
                stacks: self
                    .0
                    .into_iter()
                    .map(|l| InterpStack {
                        frames: vec![InterpFrame::named(l.unwrap_or_else(|| "<long>".into()))],
                        count: 1,
                        thread: None,
                    })
                    .collect(),
                ..Parsed::default()
            }
        }
    }

    fn names(p: &Parsed) -> Vec<String> {
        p.stacks
            .iter()
            .map(|s| s.frames[0].function.clone())
            .collect()
    }

    /// Reading a file and a slice split the same lines: CRLF trimmed, long lines flagged
    /// without being buffered, a last line without newline kept.
    #[test]
    fn file_and_slice_lines_agree() {
        let input = b"one\r\n\nthree-is-long\nfour";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, input).unwrap();
        let from_file = parse_file(Collect(Vec::new()), &path, 8).unwrap();
        let from_slice = parse_bytes(Collect(Vec::new()), input, 8);
        assert_eq!(names(&from_file), ["one", "", "<long>", "four"]);
        assert_eq!(names(&from_file), names(&from_slice));
    }

    /// A missing output file is a typed `Open` error naming the path.
    #[test]
    fn missing_file_is_open_error() {
        let err = parse_file(Collect(Vec::new()), Path::new("/nonexistent/x"), 8).unwrap_err();
        assert!(matches!(err, OutputError::Open { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/x"));
    }

    /// The struct sizes the bound constants' memory costs are computed from.
    #[test]
    fn documented_sizes() {
        assert_eq!(std::mem::size_of::<InterpStack>(), 56);
        assert_eq!(std::mem::size_of::<InterpFrame>(), 56);
    }

    /// Counts must be plain positive decimal numbers.
    #[test]
    fn counts() {
        assert_eq!(split_folded("a;b 12"), Some(("a;b", 12)));
        assert_eq!(split_folded("a;b 0"), None);
        assert_eq!(split_folded("a;b +1"), None);
        assert_eq!(split_folded(" 3"), None);
        assert_eq!(split_folded("a;b"), None);
        assert_eq!(split_folded("a b 99999999999999999999999"), None);
    }
}
