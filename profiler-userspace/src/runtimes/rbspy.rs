//! rbspy: the arguments of `rbspy record` and a parser of its `--format collapsed`
//! output.
//!
//! Collapsed output (checked against rbspy 0.55.0 on Debian's Ruby 3.1, see
//! `testdata/rbspy-0.55.0-collapsed.txt`) is folded stacks, root first:
//!
//! ```text
//! <main> - /tmp/rb/busy.rb:17;run - /tmp/rb/busy.rb:13;(unknown) [c function] - (unknown);work - /tmp/rb/busy.rb:6 77
//! ```
//!
//! A frame is `NAME - PATH:LINE`, or `NAME - PATH` when the line is unknown (C
//! functions: `(unknown) [c function] - (unknown)`, whose path becomes `None`). Ruby
//! method names may end in `-` (`Integer#-`) but hold no `" - "`; paths may, so the
//! first `" - "` ends the name. There is no thread in this format.

use std::{ffi::OsString, path::Path};

use super::{
    parse_bytes, parse_file, split_folded, InterpFrame, OutputError, ParseLimits, Parsed,
    StackLine, StackLineParser,
};

/// The executable's name.
pub const PROGRAM: &str = "rbspy";
/// Highest sampling rate we ask rbspy for.
pub const MAX_RATE_HZ: u32 = 1000;
/// rbspy's name for a path it does not know.
const UNKNOWN_PATH: &str = "(unknown)";

/// Why rbspy could not be asked or its output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RbSpyError {
    /// The sampling rate is 0 or above [`MAX_RATE_HZ`].
    #[error("rbspy rate {rate_hz} Hz is outside 1..={MAX_RATE_HZ}")]
    InvalidRate { rate_hz: u32 },
    /// The duration is 0 seconds.
    #[error("rbspy duration must be at least 1 second")]
    InvalidDuration,
    /// The output file could not be read.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One `rbspy record` run.
#[derive(Clone, Debug)]
pub struct RbSpyRecord<'a> {
    /// Target process.
    pub pid: u32,
    /// Samples per second (`--rate`, rbspy's default is 99).
    pub rate_hz: u32,
    /// Seconds to sample for.
    pub duration_secs: u64,
    /// Where rbspy writes the collapsed stacks (`--file`).
    pub output: &'a Path,
    /// Where rbspy writes its gzipped raw samples (`--raw-file`). Without it rbspy
    /// 0.55 leaves one `~/.cache/rbspy/DATE-ID.raw.gz` per run, even a failed one: a
    /// supervisor running it every interval would fill the disk.
    pub raw_output: &'a Path,
}

impl RbSpyRecord<'_> {
    /// `record --pid P --duration S --rate R --format collapsed --nonblocking
    /// --file FILE --raw-file RAW --silent`.
    pub fn args(&self) -> Result<Vec<OsString>, RbSpyError> {
        if self.rate_hz == 0 || self.rate_hz > MAX_RATE_HZ {
            return Err(RbSpyError::InvalidRate {
                rate_hz: self.rate_hz,
            });
        }
        if self.duration_secs == 0 {
            return Err(RbSpyError::InvalidDuration);
        }
        let mut args: Vec<OsString> = [
            "record",
            "--pid",
            &self.pid.to_string(),
            "--duration",
            &self.duration_secs.to_string(),
            "--rate",
            &self.rate_hz.to_string(),
            "--format",
            "collapsed",
            "--nonblocking",
            "--file",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push(self.output.as_os_str().to_owned());
        args.push("--raw-file".into());
        args.push(self.raw_output.as_os_str().to_owned());
        args.push("--silent".into());
        Ok(args)
    }
}

/// Parses collapsed output held in memory; garbage lines are skipped and counted.
pub fn parse(input: &[u8], limits: &ParseLimits) -> Parsed {
    parse_bytes(
        StackLineParser::new(limits, parse_line),
        input,
        limits.max_line_bytes,
    )
}

/// Parses the collapsed file rbspy wrote, one line in memory at a time.
pub fn read_output(path: &Path, limits: &ParseLimits) -> Result<Parsed, RbSpyError> {
    Ok(parse_file(
        StackLineParser::new(limits, parse_line),
        path,
        limits.max_line_bytes,
    )?)
}

/// One collapsed line: frames root first and the count; no thread.
fn parse_line(text: &str) -> Option<StackLine> {
    let (stack, count) = split_folded(text)?;
    let frames = stack.split(';').map(frame).collect::<Option<Vec<_>>>()?;
    Some((None, frames, count))
}

/// `NAME - PATH:LINE` or `NAME - PATH`.
fn frame(raw: &str) -> Option<InterpFrame> {
    let (name, location) = raw.split_once(" - ")?;
    if name.is_empty() || location.is_empty() {
        return None;
    }
    let (path, line) = match location.rsplit_once(':') {
        Some((path, line))
            if !path.is_empty() && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (path, line.parse::<u32>().ok().filter(|&l| l > 0))
        }
        _ => (location, None),
    };
    Some(InterpFrame {
        function: name.to_string(),
        file: (path != UNKNOWN_PATH).then(|| path.to_string()),
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded with rbspy 0.55.0 (crates.io) on Debian's ruby 3.1.2 running
    // testdata/rbspy-busy.rb: `rbspy record --pid P --duration 3 --format collapsed
    // --nonblocking --file FILE --silent`.
    const COLLAPSED: &[u8] = include_bytes!("testdata/rbspy-0.55.0-collapsed.txt");

    fn f(function: &str, file: &str, line: u32) -> InterpFrame {
        InterpFrame {
            function: function.into(),
            file: Some(file.into()),
            line: Some(line),
        }
    }

    /// Real rbspy 0.55 output parses completely, root first, with C frames kept unnamed-path.
    #[test]
    fn real_collapsed_output() {
        let p = parse(COLLAPSED, &ParseLimits::default());
        assert_eq!(p.malformed_lines, 0);
        assert_eq!(p.stacks.len(), 7);
        assert_eq!(p.total_samples(), 77 + 76 + 59 + 7 + 63 + 14 + 1);
        let s = p.stacks.iter().find(|s| s.count == 76).unwrap();
        assert_eq!(s.frames.len(), 7);
        assert_eq!(s.frames[0], f("block in <main>", "/tmp/rb/busy.rb", 16));
        assert_eq!(s.frames[2], InterpFrame::named("(unknown) [c function]"));
        assert_eq!(s.frames[6], f("block in work", "/tmp/rb/busy.rb", 4));
        assert!(p.stacks.iter().all(|s| s.thread.is_none()));
    }

    /// Operator methods, paths with `" - "` and colons, and line 0 are split right.
    #[test]
    fn frame_forms() {
        assert_eq!(
            frame("Integer#- - /a.rb:3"),
            Some(f("Integer#-", "/a.rb", 3))
        );
        assert_eq!(
            frame("work - /my - app/x.rb:2"),
            Some(f("work", "/my - app/x.rb", 2))
        );
        assert_eq!(frame("work - /a:b/x.rb:2"), Some(f("work", "/a:b/x.rb", 2)));
        assert_eq!(frame("work - /x.rb:0").unwrap().line, None);
        assert_eq!(
            frame("work - /x.rb").unwrap().file.as_deref(),
            Some("/x.rb")
        );
        assert_eq!(frame("work"), None);
        assert_eq!(frame(" - /x.rb:1"), None);
    }

    /// Garbage lines are skipped and counted; the rest still parse.
    #[test]
    fn garbage_lines_counted() {
        let p = parse(
            b"a - /x.rb:1 2\njunk 3\na - /x.rb:1;;b - /y.rb:2 1\n\na - /x.rb:1 two\n",
            &ParseLimits::default(),
        );
        assert_eq!(p.stacks.len(), 1);
        assert_eq!(p.malformed_lines, 3);
    }

    /// The argument list is what rbspy 0.55 accepts, and bad inputs are refused.
    #[test]
    fn record_args() {
        let mut rec = RbSpyRecord {
            pid: 9,
            rate_hz: 99,
            duration_secs: 5,
            output: Path::new("/tmp/rb.txt"),
            raw_output: Path::new("/tmp/rb.raw.gz"),
        };
        assert_eq!(
            rec.args().unwrap(),
            [
                "record",
                "--pid",
                "9",
                "--duration",
                "5",
                "--rate",
                "99",
                "--format",
                "collapsed",
                "--nonblocking",
                "--file",
                "/tmp/rb.txt",
                "--raw-file",
                "/tmp/rb.raw.gz",
                "--silent"
            ]
            .map(OsString::from)
        );
        rec.duration_secs = 0;
        assert!(matches!(rec.args(), Err(RbSpyError::InvalidDuration)));
        rec.duration_secs = 1;
        rec.rate_hz = 0;
        assert!(matches!(
            rec.args(),
            Err(RbSpyError::InvalidRate { rate_hz: 0 })
        ));
    }
}
