//! phpspy: its arguments and a parser of its default output.
//!
//! phpspy cannot be installed here, so this follows its documented format, not an
//! observed run: the examples in phpspy's README (<https://github.com/adsr/phpspy>,
//! "Example (cli child)", "Example (httpd)") and its source (`event_fout.c`, which
//! ends each frame line and each sample with a newline). One sample per block,
//! innermost frame first, `DEPTH [Class::]function FILE:LINE`, the block ended by an
//! empty line:
//!
//! ```text
//! 0 inner /srv/app/chain.php:2
//! 1 outer /srv/app/chain.php:9
//! 2 Foo::bar /srv/app/chain.php:13
//! 3 <main> /srv/app/chain.php:1
//!
//! ```
//!
//! Built-ins are `0 sleep <internal>:-1`. Lines starting with `#` (the README's
//! `# - - - - -`, request info, `-d` verbose fields such as `# trace_ts = ...` and
//! `# pid = ...`, varpeeks) are ignored. With `-1` (`--single-line`) a sample is one
//! line of tab-separated frames with a trailing tab; that form is read too. Identical
//! samples are aggregated and reversed to root first. The parser is tested against
//! that format and a fake phpspy writing it (`php_frames_from_a_fake_phpspy` in the
//! integration tests), never against a real phpspy run.

use std::{ffi::OsString, path::Path};

use super::{
    parse_bytes, parse_file, InterpFrame, Line, LineParser, OutputError, ParseLimits, Parsed,
    StackTable,
};

/// The executable's name.
pub const PROGRAM: &str = "phpspy";
/// Bytes phpspy may use per sample (`-b`): its default drops stacks deeper than ~80
/// frames ("Not enough space in buffer"); 64 KiB holds ~1000 frames.
pub const BUFFER_BYTES: u32 = 65536;
/// Highest sampling rate we ask phpspy for.
pub const MAX_RATE_HZ: u32 = 1000;

/// Why phpspy could not be asked or its output could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PhpSpyError {
    /// The sampling rate is 0 or above [`MAX_RATE_HZ`].
    #[error("phpspy rate {rate_hz} Hz is outside 1..={MAX_RATE_HZ}")]
    InvalidRate { rate_hz: u32 },
    /// The time limit is 0 ms (phpspy reads 0 as "no limit", and only a deadline would
    /// stop it).
    #[error("phpspy time limit must be at least 1 ms")]
    InvalidDuration,
    /// The output file could not be read.
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// One phpspy run.
#[derive(Clone, Debug)]
pub struct PhpSpyRecord<'a> {
    /// Target process.
    pub pid: u32,
    /// Samples per second (`-H`).
    pub rate_hz: u32,
    /// Time limit in milliseconds (`-i`).
    pub duration_ms: u64,
    /// Output file (`-o`).
    pub output: &'a Path,
}

impl PhpSpyRecord<'_> {
    /// `-p PID -H HZ -i MS -b 65536 -o FILE`.
    pub fn args(&self) -> Result<Vec<OsString>, PhpSpyError> {
        if self.rate_hz == 0 || self.rate_hz > MAX_RATE_HZ {
            return Err(PhpSpyError::InvalidRate {
                rate_hz: self.rate_hz,
            });
        }
        if self.duration_ms == 0 {
            return Err(PhpSpyError::InvalidDuration);
        }
        let mut args: Vec<OsString> = [
            "-p",
            &self.pid.to_string(),
            "-H",
            &self.rate_hz.to_string(),
            "-i",
            &self.duration_ms.to_string(),
            "-b",
            &BUFFER_BYTES.to_string(),
            "-o",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push(self.output.as_os_str().to_owned());
        Ok(args)
    }
}

/// Parses output held in memory; malformed lines are skipped and counted, and a sample
/// with a malformed frame line is dropped and counted.
pub fn parse(input: &[u8], limits: &ParseLimits) -> Parsed {
    parse_bytes(SampleParser::new(limits), input, limits.max_line_bytes)
}

/// Parses the file phpspy wrote, one line in memory at a time.
pub fn read_output(path: &Path, limits: &ParseLimits) -> Result<Parsed, PhpSpyError> {
    Ok(parse_file(
        SampleParser::new(limits),
        path,
        limits.max_line_bytes,
    )?)
}

struct SampleParser {
    table: StackTable,
    /// Frames of the sample being read, innermost first (bounded: past the frame
    /// limit only the count grows).
    current: Vec<InterpFrame>,
    /// Frame lines of the current sample, stored or not.
    depth: usize,
    /// A line of the current sample was malformed.
    broken: bool,
    max_frames: usize,
    malformed_lines: u64,
    malformed_samples: u64,
}

impl SampleParser {
    fn new(limits: &ParseLimits) -> Self {
        SampleParser {
            table: StackTable::new(*limits),
            current: Vec::new(),
            depth: 0,
            broken: false,
            max_frames: limits.max_frames_per_stack.max(2),
            malformed_lines: 0,
            malformed_samples: 0,
        }
    }

    /// Ends the current sample.
    fn end_sample(&mut self) {
        let frames = std::mem::take(&mut self.current);
        let (depth, broken) = (self.depth, self.broken);
        self.depth = 0;
        self.broken = false;
        if broken {
            self.malformed_samples += 1;
        } else if depth > 0 {
            self.add(frames, depth);
        }
    }

    /// Stores a sample given innermost first; `depth` frames were read, of which the
    /// innermost `frames.len()` were kept.
    fn add(&mut self, mut frames: Vec<InterpFrame>, depth: usize) {
        if depth > frames.len() {
            // Keep the table's truncation rule (innermost frames under a marker root):
            // one more frame than the limit makes it truncate and count.
            frames.push(InterpFrame::named(super::TRUNCATED_FRAME));
        }
        frames.reverse();
        self.table.add(None, frames, 1);
    }

    fn frame_line(&mut self, text: &str) {
        if self.broken {
            return;
        }
        match frame_line(text) {
            Some((depth, frame)) if depth == self.depth => {
                self.depth += 1;
                if self.current.len() < self.max_frames {
                    self.current.push(frame);
                }
            }
            _ => {
                self.malformed_lines += 1;
                self.broken = true;
                self.current.clear();
            }
        }
    }

    fn single_line(&mut self, text: &str) {
        if self.depth > 0 || self.broken {
            // A single-line sample in the middle of a block: the block never ended.
            self.end_sample();
        }
        let mut frames = Vec::new();
        let mut depth = 0;
        for part in text.split('\t').filter(|p| !p.is_empty()) {
            match frame_line(part) {
                Some((d, frame)) if d == depth => {
                    depth += 1;
                    if frames.len() < self.max_frames {
                        frames.push(frame);
                    }
                }
                _ => {
                    self.malformed_lines += 1;
                    self.malformed_samples += 1;
                    return;
                }
            }
        }
        if depth == 0 {
            self.malformed_lines += 1;
            return;
        }
        self.add(frames, depth);
    }
}

impl LineParser for SampleParser {
    fn line(&mut self, line: Line<'_>) {
        match line {
            Line::TooLong => {
                self.malformed_lines += 1;
                self.broken = true;
                self.current.clear();
            }
            Line::Text(text) if text.trim().is_empty() => self.end_sample(),
            Line::Text(text) if text.starts_with('#') => {}
            Line::Text(text) if text.contains('\t') => self.single_line(text),
            Line::Text(text) => self.frame_line(text),
        }
    }

    fn finish(mut self) -> Parsed {
        if self.depth > 0 || self.broken {
            // The last sample was never ended by its empty line: its root frames may be
            // missing, so it is not trusted.
            self.malformed_samples += 1;
        }
        self.table
            .finish(self.malformed_lines, self.malformed_samples)
    }
}

/// `DEPTH FUNCTION FILE:LINE`. Function names hold no spaces; file names may, and
/// `Command line code` does.
fn frame_line(text: &str) -> Option<(usize, InterpFrame)> {
    let (depth, rest) = text.split_once(' ')?;
    if depth.is_empty() || !depth.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let depth: usize = depth.parse().ok()?;
    let (function, location) = rest.split_once(' ')?;
    if function.is_empty() || location.is_empty() {
        return None;
    }
    let (file, line) = location.rsplit_once(':')?;
    let line: i64 = line.parse().ok()?;
    let frame = InterpFrame {
        function: function.to_string(),
        file: (!file.is_empty() && file != "<internal>").then(|| file.to_string()),
        line: u32::try_from(line).ok().filter(|&l| l > 0),
    };
    Some((depth, frame))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output in phpspy's documented format (its README's examples, its source's
    /// comment lines), not captured from a run: three identical samples of the chain,
    /// one in a built-in with `-d pt` comment lines, one from `php -r`.
    const OUTPUT: &str = "\
0 inner /srv/app/chain.php:2
1 outer /srv/app/chain.php:9
2 Foo::bar /srv/app/chain.php:13
3 <main> /srv/app/chain.php:1

0 inner /srv/app/chain.php:2
1 outer /srv/app/chain.php:9
2 Foo::bar /srv/app/chain.php:13
3 <main> /srv/app/chain.php:1

0 sleep <internal>:-1
1 Foo::bar /srv/app/chain.php:13
2 <main> /srv/app/chain.php:1
# trace_ts = 1795655941.693065
# pid = 13549

0 inner /srv/app/chain.php:2
1 outer /srv/app/chain.php:9
2 Foo::bar /srv/app/chain.php:13
3 <main> /srv/app/chain.php:1

0 work Command line code:1
1 <main> Command line code:1

";

    fn f(function: &str, file: &str, line: u32) -> InterpFrame {
        InterpFrame {
            function: function.into(),
            file: Some(file.into()),
            line: Some(line),
        }
    }

    fn parse_default(input: &str) -> Parsed {
        parse(input.as_bytes(), &ParseLimits::default())
    }

    /// The documented output aggregates into counted stacks, reversed to root first.
    #[test]
    fn documented_output() {
        let p = parse_default(OUTPUT);
        assert_eq!((p.malformed_lines, p.malformed_samples), (0, 0));
        assert_eq!(p.stacks.len(), 3);
        assert_eq!(p.stacks[0].count, 3);
        assert_eq!(
            p.stacks[0].frames,
            [
                f("<main>", "/srv/app/chain.php", 1),
                f("Foo::bar", "/srv/app/chain.php", 13),
                f("outer", "/srv/app/chain.php", 9),
                f("inner", "/srv/app/chain.php", 2),
            ]
        );
        assert_eq!(
            p.stacks[1].frames.last(),
            Some(&InterpFrame::named("sleep"))
        );
        assert_eq!(p.stacks[2].frames[1], f("work", "Command line code", 1));
        assert_eq!(p.total_samples(), 5);
    }

    /// `-1` single-line samples (tab-separated, trailing tab) give the same stacks.
    #[test]
    fn single_line_output() {
        let block = parse_default(OUTPUT);
        let single: String = OUTPUT
            .split("\n\n")
            .filter(|b| !b.trim().is_empty())
            .map(|b| {
                let frames: String = b
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\t"))
                    .collect();
                format!("{frames}\n")
            })
            .collect();
        assert_eq!(parse_default(&single), block);
    }

    /// A sample with a bad or out-of-order frame line is dropped and counted; the next
    /// sample is read normally.
    #[test]
    fn malformed_sample_dropped() {
        let input = "0 a /x.php:1\n2 b /x.php:2\n3 c /x.php:3\n\nnonsense\n\n0 a /x.php:1\n1 <main> /x.php:1\n\n";
        let p = parse_default(input);
        assert_eq!(p.malformed_lines, 2);
        assert_eq!(p.malformed_samples, 2);
        assert_eq!(p.stacks.len(), 1);
        assert_eq!(p.stacks[0].frames[0].function, "<main>");
    }

    /// A last sample without its closing empty line is not trusted, and is counted.
    #[test]
    fn unterminated_last_sample() {
        let p = parse_default("0 a /x.php:1\n\n0 a /x.php:1\n1 b /x.php:2\n");
        assert_eq!(p.stacks.len(), 1);
        assert_eq!(p.malformed_samples, 1);
    }

    /// A sample deeper than the frame limit keeps its innermost frames and is counted.
    #[test]
    fn deep_sample_truncated() {
        let limits = ParseLimits {
            max_frames_per_stack: 3,
            ..ParseLimits::default()
        };
        let input: String = (0..10)
            .map(|d| format!("{d} f{d} /x.php:{d}\n"))
            .collect::<String>()
            + "\n";
        let p = parse(input.as_bytes(), &limits);
        assert_eq!(p.truncated_stacks, 1);
        let names: Vec<_> = p.stacks[0]
            .frames
            .iter()
            .map(|f| f.function.as_str())
            .collect();
        assert_eq!(names, [crate::runtimes::TRUNCATED_FRAME, "f1", "f0"]);
    }

    /// File names with spaces and colons, and negative or zero lines.
    #[test]
    fn frame_lines() {
        assert_eq!(
            frame_line("0 f /a b/c:d.php:7"),
            Some((0, f("f", "/a b/c:d.php", 7)))
        );
        assert_eq!(
            frame_line("12 f <internal>:-1"),
            Some((12, InterpFrame::named("f")))
        );
        assert_eq!(frame_line("0 f x.php:0").unwrap().1.line, None);
        assert_eq!(frame_line("x f x.php:1"), None);
        assert_eq!(frame_line("0 f"), None);
        assert_eq!(frame_line("0 f x.php"), None);
        assert_eq!(frame_line("-1 f x.php:1"), None);
        assert_eq!(frame_line("99999999999999999999999 f x.php:1"), None);
    }

    /// The argument list is the documented one, and bad inputs are refused.
    #[test]
    fn record_args() {
        let mut rec = PhpSpyRecord {
            pid: 7,
            rate_hz: 99,
            duration_ms: 10_000,
            output: Path::new("/tmp/php.out"),
        };
        assert_eq!(
            rec.args().unwrap(),
            [
                "-p",
                "7",
                "-H",
                "99",
                "-i",
                "10000",
                "-b",
                "65536",
                "-o",
                "/tmp/php.out"
            ]
            .map(OsString::from)
        );
        rec.duration_ms = 0;
        assert!(matches!(rec.args(), Err(PhpSpyError::InvalidDuration)));
        rec.duration_ms = 1;
        rec.rate_hz = 1001;
        assert!(matches!(
            rec.args(),
            Err(PhpSpyError::InvalidRate { rate_hz: 1001 })
        ));
    }
}
