//! py-spy: the arguments of `py-spy record` and a parser of its `--format raw` output.
//!
//! Raw output (checked against py-spy 0.4.3, see `testdata/pyspy-0.4.3-*.txt`) is one
//! line per distinct stack, root first, `;`-separated, then a space and the count:
//!
//! ```text
//! <module> (busy.py:23);Worker.run (busy.py:18);outer (busy.py:13);inner (busy.py:7) 74
//! ```
//!
//! A frame is `NAME (FILE:LINE)`, `NAME (FILE)` (`--nolineno`, or line 0) or `NAME`.
//! `--threads` adds a first frame `thread (TID)` or `thread (TID): NAME` (TID decimal,
//! or `0x..` hex when py-spy has no OS thread id), which becomes [`InterpStack::thread`](super::InterpStack::thread).
//! `--subprocesses` adds `process PID:"COMMAND LINE"` frames before it, kept as frames.
//! Status lines go to stdout, never into the `-o` file.

use std::{ffi::OsString, path::Path};

use super::{
    parse_bytes, parse_file, split_folded, InterpFrame, OutputError, ParseLimits, Parsed,
    StackLine, StackLineParser,
};

/// The executable's name.
pub const PROGRAM: &str = "py-spy";
/// Highest sampling rate we ask py-spy for: it reads every thread's stack per sample,
/// so higher rates cost the target more than they tell.
pub const MAX_RATE_HZ: u32 = 1000;

/// Why py-spy could not be asked or its output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PySpyError {
    /// The sampling rate is 0 or above [`MAX_RATE_HZ`].
    #[error("py-spy rate {rate_hz} Hz is outside 1..={MAX_RATE_HZ}")]
    InvalidRate { rate_hz: u32 },
    /// The duration is 0 seconds (py-spy reads 0 as "unlimited").
    #[error("py-spy duration must be at least 1 second")]
    InvalidDuration,
    /// The output file could not be read.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One `py-spy record` run.
#[derive(Clone, Debug)]
pub struct PySpyRecord<'a> {
    /// Target process.
    pub pid: u32,
    /// Samples per second.
    pub rate_hz: u32,
    /// Seconds to sample for.
    pub duration_secs: u64,
    /// Where py-spy writes the raw stacks (`-o`).
    pub output: &'a Path,
    /// Add `--threads`, so stacks carry their thread.
    pub threads: bool,
}

impl PySpyRecord<'_> {
    /// `record --nonblocking --format raw --rate R --duration S --pid P -o FILE
    /// [--threads]`. No `--native`: native frames come from our own unwinder.
    pub fn args(&self) -> Result<Vec<OsString>, PySpyError> {
        if self.rate_hz == 0 || self.rate_hz > MAX_RATE_HZ {
            return Err(PySpyError::InvalidRate {
                rate_hz: self.rate_hz,
            });
        }
        if self.duration_secs == 0 {
            return Err(PySpyError::InvalidDuration);
        }
        let mut args: Vec<OsString> = [
            "record",
            "--nonblocking",
            "--format",
            "raw",
            "--rate",
            &self.rate_hz.to_string(),
            "--duration",
            &self.duration_secs.to_string(),
            "--pid",
            &self.pid.to_string(),
            "-o",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push(self.output.as_os_str().to_owned());
        if self.threads {
            args.push("--threads".into());
        }
        Ok(args)
    }
}

/// Parses raw output held in memory; garbage lines are skipped and counted.
pub fn parse(input: &[u8], limits: &ParseLimits) -> Parsed {
    parse_bytes(
        StackLineParser::new(limits, parse_line),
        input,
        limits.max_line_bytes,
    )
}

/// Parses the raw output file py-spy wrote, one line in memory at a time.
pub fn read_output(path: &Path, limits: &ParseLimits) -> Result<Parsed, PySpyError> {
    Ok(parse_file(
        StackLineParser::new(limits, parse_line),
        path,
        limits.max_line_bytes,
    )?)
}

fn parse_line(text: &str) -> Option<StackLine> {
    let (stack, count) = split_folded(text)?;
    let mut frames = Vec::new();
    let mut thread = None;
    // The thread frame, if any, comes right after the leading process frames.
    let mut thread_slot = true;
    for raw in stack.split(';') {
        if raw.is_empty() {
            return None;
        }
        if thread_slot && raw.starts_with("process ") && raw.ends_with('"') {
            frames.push(InterpFrame::named(raw));
            continue;
        }
        if thread_slot {
            thread_slot = false;
            if let Some(t) = thread_frame(raw) {
                thread = Some(t.to_string());
                continue;
            }
        }
        frames.push(frame(raw));
    }
    (!frames.is_empty()).then_some((thread, frames, count))
}

/// `thread (TID)` -> TID, `thread (TID): NAME` -> NAME.
fn thread_frame(raw: &str) -> Option<&str> {
    let rest = raw.strip_prefix("thread (")?;
    let (id, after) = rest.split_once(')')?;
    let is_id = match id.strip_prefix("0x").or_else(|| id.strip_prefix("0X")) {
        Some(hex) => !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
    };
    if !is_id {
        return None;
    }
    if after.is_empty() {
        return Some(id);
    }
    let name = after.strip_prefix(": ")?;
    Some(if name.is_empty() { id } else { name })
}

/// `NAME (FILE:LINE)`, `NAME (FILE)` or `NAME`. Python names hold no `" ("`; file names
/// may, so the first `" ("` ends the name and the last `:` starts the line.
fn frame(raw: &str) -> InterpFrame {
    let Some((name, inner)) = raw
        .strip_suffix(')')
        .and_then(|r| r.split_once(" ("))
        .filter(|(name, inner)| !name.is_empty() && !inner.is_empty())
    else {
        return InterpFrame::named(raw);
    };
    let (file, line) = match inner.rsplit_once(':') {
        Some((file, line))
            if !file.is_empty() && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (file, line.parse::<u32>().ok().filter(|&l| l > 0))
        }
        _ => (inner, None),
    };
    InterpFrame {
        function: name.to_string(),
        file: Some(file.to_string()),
        line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fixtures recorded with py-spy 0.4.3 (PyPI) on CPython 3.11.7 running
    // testdata/pyspy-busy.py: `py-spy record --nonblocking --format raw --rate 50
    // --duration 3 --pid P -o FILE`, then the same with `--threads`, and with
    // `--subprocesses --threads` on a parent that starts busy.py.
    const RAW: &[u8] = include_bytes!("testdata/pyspy-0.4.3-raw.txt");
    const RAW_THREADS: &[u8] = include_bytes!("testdata/pyspy-0.4.3-raw-threads.txt");
    const RAW_SUBPROCESSES: &[u8] =
        include_bytes!("testdata/pyspy-0.4.3-raw-subprocesses-threads.txt");

    fn f(function: &str, file: &str, line: u32) -> InterpFrame {
        InterpFrame {
            function: function.into(),
            file: Some(file.into()),
            line: Some(line),
        }
    }

    fn parse_default(input: &[u8]) -> Parsed {
        parse(input, &ParseLimits::default())
    }

    /// Real py-spy 0.4.3 raw output parses completely, root first, with files and lines.
    #[test]
    fn real_raw_output() {
        let p = parse_default(RAW);
        assert_eq!(p.malformed_lines, 0);
        assert_eq!(p.stacks.len(), 4);
        assert_eq!(p.total_samples(), 15 + 74 + 22 + 62);
        let main = p.stacks.iter().find(|s| s.count == 74).unwrap();
        assert_eq!(
            main.frames,
            [
                f("<module>", "busy.py", 23),
                f("Worker.run", "busy.py", 18),
                f("outer", "busy.py", 13),
                f("inner", "busy.py", 7),
            ]
        );
        assert_eq!(main.thread, None);
        let worker = &p.stacks[0];
        assert_eq!(
            worker.frames[0],
            f("Thread._bootstrap", "threading.py", 1002)
        );
        assert_eq!(worker.frames.len(), 6);
    }

    /// With `--threads` the leading `thread (TID): NAME` frame becomes the thread name.
    #[test]
    fn real_threads_output() {
        let p = parse_default(RAW_THREADS);
        assert_eq!(p.malformed_lines, 0);
        let mut threads: Vec<_> = p.stacks.iter().map(|s| s.thread.clone().unwrap()).collect();
        threads.sort();
        threads.dedup();
        assert_eq!(threads, ["MainThread", "worker"]);
        for s in &p.stacks {
            assert!(!s.frames[0].function.starts_with("thread"), "{s:?}");
            assert_eq!(s.frames.last().unwrap().function, "inner");
        }
    }

    /// With `--subprocesses` the process frames stay frames and the thread is still found.
    #[test]
    fn real_subprocess_output() {
        let p = parse_default(RAW_SUBPROCESSES);
        assert_eq!(p.malformed_lines, 0);
        assert_eq!(p.stacks.len(), 6);
        let child = p
            .stacks
            .iter()
            .find(|s| s.thread.as_deref() == Some("worker"))
            .unwrap();
        assert!(child.frames[0].function.starts_with("process "));
        assert!(child.frames[1].function.ends_with("busy.py\""));
        assert_eq!(child.frames[1].file, None);
        assert_eq!(child.frames[2].function, "Thread._bootstrap");
    }

    /// Frames without line (`--nolineno`), without file, and file names with spaces,
    /// parentheses or colons are split at the right places.
    #[test]
    fn frame_forms() {
        assert_eq!(
            frame("inner (busy.py)"),
            InterpFrame {
                function: "inner".into(),
                file: Some("busy.py".into()),
                line: None
            }
        );
        assert_eq!(
            frame("spin.<locals>.<genexpr> (p.py:5)"),
            f("spin.<locals>.<genexpr>", "p.py", 5)
        );
        assert_eq!(frame("f (my (1).py:3)"), f("f", "my (1).py", 3));
        assert_eq!(frame("f (c:/x.py:3)"), f("f", "c:/x.py", 3));
        assert_eq!(frame("f (x.py:abc)").file.as_deref(), Some("x.py:abc"));
        assert_eq!(frame("f (x.py:0)").line, None);
        assert_eq!(frame("native_thing"), InterpFrame::named("native_thing"));
        assert_eq!(frame("f ()"), InterpFrame::named("f ()"));
    }

    /// `thread (0x7F..)` without a name gives the id; a function named `thread` is not a thread.
    #[test]
    fn thread_frames() {
        let p = parse_default(b"thread (0x7F3A2B);f (a.py:1) 2\nthread (a.py:3);g (a.py:1) 1\n");
        assert_eq!(p.stacks[0].thread.as_deref(), Some("0x7F3A2B"));
        assert_eq!(p.stacks[0].frames, [f("f", "a.py", 1)]);
        assert_eq!(p.stacks[1].thread, None);
        assert_eq!(p.stacks[1].frames[0], f("thread", "a.py", 3));
    }

    /// Garbage lines are skipped and counted; good lines around them still count.
    #[test]
    fn garbage_lines_counted() {
        let input = b"f (a.py:1) 3\nno count here\n;; 4\nf (a.py:1) x\n\xff\xfe 1\n\nthread (1) 5\ng (a.py:2) 0\n";
        let p = parse_default(input);
        assert_eq!(p.stacks.len(), 2, "{p:?}");
        assert_eq!(p.stacks[0].count, 3);
        assert_eq!(p.stacks[1].frames[0].function, "\u{fffd}\u{fffd}");
        assert_eq!(p.malformed_lines, 5);
    }

    /// The argument list is exactly what py-spy 0.4.3 accepts, and bad inputs are refused.
    #[test]
    fn record_args() {
        let out = Path::new("/tmp/x/py.raw");
        let mut rec = PySpyRecord {
            pid: 42,
            rate_hz: 97,
            duration_secs: 10,
            output: out,
            threads: false,
        };
        let args = rec.args().unwrap();
        assert_eq!(
            args,
            [
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "97",
                "--duration",
                "10",
                "--pid",
                "42",
                "-o",
                "/tmp/x/py.raw"
            ]
            .map(OsString::from)
        );
        rec.threads = true;
        assert_eq!(rec.args().unwrap().last().unwrap(), "--threads");
        rec.rate_hz = 0;
        assert!(matches!(
            rec.args(),
            Err(PySpyError::InvalidRate { rate_hz: 0 })
        ));
        rec.rate_hz = 97;
        rec.duration_secs = 0;
        assert!(matches!(rec.args(), Err(PySpyError::InvalidDuration)));
    }

    /// Reading the fixture from a file gives the same result as parsing it in memory.
    #[test]
    fn read_output_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.txt");
        std::fs::write(&path, RAW_THREADS).unwrap();
        let from_file = read_output(&path, &ParseLimits::default()).unwrap();
        assert_eq!(from_file, parse_default(RAW_THREADS));
    }
}
