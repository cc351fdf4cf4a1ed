//! Safe reading of the `/tmp/perf-PID.map` files JIT runtimes write (Node with
//! `--perf-basic-prof`, a JVM asked through jattach): [`lookup_perf_map`] scans one for
//! the addresses it is asked about (what naming JIT frames uses), and [`PerfMap`]
//! parses a whole map into a lookup structure (the reference the scan is tested and
//! fuzzed against).
//!
//! The file belongs to the target, and we read it as root: so it is opened through
//! `/proc/PID/root/tmp/perf-NSPID.map` (the process's own /tmp and its own pid number,
//! so containers work) one component at a time with `O_NOFOLLOW` (an absolute symlink
//! planted in a container would otherwise resolve against *our* root), must be a
//! regular file with a single link (a hard link could name another user's file)
//! owned by the target's effective uid, and at most [`MAX_PERF_MAP_BYTES`] are read.
//! Type, links and owner are checked on the name (`lstat`) before it is opened, so a
//! FIFO or device node is never opened, and again with fstat on the opened file
//! (opened `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, and required to be the
//! inode the name showed), so nothing can be swapped in between. [`perf_map_stamp`],
//! which detection and every interval's naming look at first, applies the same checks
//! to the name: a map planted for someone else's pid neither makes a process Node nor
//! costs a read each interval.
//!
//! Lines are `START SIZE NAME`, START and SIZE hex with or without `0x`:
//!
//! ```text
//! 0x00007f6e50ec7600 0x00000000000000b8 long Busy.work(long)    (jcmd Compiler.perfmap)
//! 3d5c1a2b 1c JS:*work /path/busy.js:1:14                        (node --perf-basic-prof)
//! ```
//!
//! Malformed lines are skipped and counted. Where entries overlap, the later line wins
//! (JIT code space is reused, and these files are appended to); [`PerfMap`] drops the
//! earlier one and counts it. [`PerfMap::normalized_text`] renders bare hex, which blazesym
//! 0.2.7's perf map parser requires (it rejects `0x`).

use std::{
    collections::{BTreeMap, VecDeque},
    ffi::{CStr, CString},
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom},
    mem::MaybeUninit,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::OpenOptionsExt as _,
    },
    path::{Path, PathBuf},
};

use super::detect::TargetProcess;

/// Bytes of a perf map read (64 MiB, scanned in [`SCAN_CHUNK_BYTES`] pieces). From a
/// larger file only the last 64 MiB are read: the file is appended to, so the end is
/// the newest code.
pub const MAX_PERF_MAP_BYTES: u64 = 64 << 20;
/// Entries a [`PerfMap`] keeps (512 Ki): 24 bytes each, 12 MiB, plus their names. Past it the oldest entries are dropped and counted. Building the map peaks
/// at ~2.5x that (a queue of candidates and an interval tree).
pub const MAX_PERF_MAP_ENTRIES: usize = 512 << 10;

/// Why a perf map could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PerfMapError {
    /// The process exited, or its pid now belongs to another process.
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    /// There is no perf map file (the runtime was not asked to write one).
    #[error("no perf map at {}", path.display())]
    NotFound { path: PathBuf },
    /// The file, or the directory holding it, is a symbolic link: refused, since
    /// following it as root could read any file.
    #[error("refusing {}: it is a symbolic link", path.display())]
    Symlink { path: PathBuf },
    /// The path is not a regular file (a FIFO, device, socket or directory).
    #[error("refusing {}: not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    /// The file has more than one link: a hard link in /tmp may name a file of another
    /// user (the target's own map is created with one).
    #[error("refusing {}: it has {links} hard links", path.display())]
    HardLinked { path: PathBuf, links: libc::nlink_t },
    /// The file is owned by another uid than the process: someone else planted it.
    #[error("refusing {}: owned by uid {owner}, the process runs as uid {expected}", path.display())]
    WrongOwner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    /// Opening failed for another reason (permission, a name with a NUL byte).
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// Reading the opened file failed.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// What the parse skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerfMapStats {
    /// Lines that are not `START SIZE NAME` (including a last line without newline,
    /// which may be half-written, and names that are not UTF-8).
    pub malformed_lines: u64,
    /// Entries dropped because a later line overlaps them.
    pub overlapped: u64,
    /// Oldest entries dropped past [`MAX_PERF_MAP_ENTRIES`].
    pub over_limit: u64,
    /// Bytes at the start of the file not read because it is larger than
    /// [`MAX_PERF_MAP_BYTES`].
    pub skipped_bytes: u64,
}

/// One symbol of a perf map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerfMapSymbol<'a> {
    pub start: u64,
    pub size: u64,
    pub name: &'a str,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    start: u64,
    size: u64,
    name_start: u32,
    name_len: u32,
}

/// Non-overlapping symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct PerfMap {
    entries: Vec<Entry>,
    names: String,
    stats: PerfMapStats,
}

impl PerfMap {
    /// Parses perf map text, keeping at most [`MAX_PERF_MAP_ENTRIES`].
    pub fn parse(input: &[u8]) -> PerfMap {
        Self::parse_with_limit(input, MAX_PERF_MAP_ENTRIES)
    }

    /// Parses perf map text, keeping at most `max_entries` (the newest).
    pub fn parse_with_limit(input: &[u8], max_entries: usize) -> PerfMap {
        let mut stats = PerfMapStats::default();
        // (start, end, name) in file order, newest last.
        let mut parsed: VecDeque<(u64, u64, &str)> = VecDeque::new();
        let mut rest = input;
        while !rest.is_empty() {
            let Some(newline) = rest.iter().position(|&b| b == b'\n') else {
                stats.malformed_lines += 1;
                break;
            };
            let line = &rest[..newline];
            rest = &rest[newline + 1..];
            match parse_line(line) {
                Some(entry) => {
                    if parsed.len() >= max_entries {
                        parsed.pop_front();
                        stats.over_limit += 1;
                    }
                    if max_entries > 0 {
                        parsed.push_back(entry);
                    }
                }
                None if line.iter().all(u8::is_ascii_whitespace) => {}
                None => stats.malformed_lines += 1,
            }
        }
        // Newest first: an entry is kept only if no newer kept entry overlaps it.
        let mut kept: BTreeMap<u64, (u64, usize)> = BTreeMap::new();
        for (i, &(start, end, _)) in parsed.iter().enumerate().rev() {
            let before = kept
                .range(..=start)
                .next_back()
                .is_some_and(|(_, &(e, _))| e > start);
            let after = kept
                .range(start + 1..)
                .next()
                .is_some_and(|(&s, _)| s < end);
            if before || after {
                stats.overlapped += 1;
            } else {
                kept.insert(start, (end, i));
            }
        }
        let mut map = PerfMap {
            entries: Vec::with_capacity(kept.len()),
            names: String::new(),
            stats,
        };
        for (start, (end, i)) in kept {
            let name = parsed[i].2;
            // Names come from at most MAX_PERF_MAP_BYTES of input when read from a file;
            // an in-memory input past 4 GiB of names stops here rather than wrap.
            let (Ok(name_start), Ok(name_len)) =
                (u32::try_from(map.names.len()), u32::try_from(name.len()))
            else {
                map.stats.over_limit += 1;
                continue;
            };
            map.names.push_str(name);
            map.entries.push(Entry {
                start,
                size: end - start,
                name_start,
                name_len,
            });
        }
        map
    }

    /// The name of the symbol containing `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let i = self.entries.partition_point(|e| e.start <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr - e.start < e.size).then(|| self.name(e))
    }

    /// Symbols in address order.
    pub fn symbols(&self) -> impl Iterator<Item = PerfMapSymbol<'_>> + '_ {
        self.entries.iter().map(|e| PerfMapSymbol {
            start: e.start,
            size: e.size,
            name: self.name(e),
        })
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No symbols at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the parse (and the read) skipped.
    pub fn stats(&self) -> &PerfMapStats {
        &self.stats
    }

    /// The map as `START SIZE NAME` lines in bare lower-case hex, sorted and without
    /// overlaps: a file blazesym's perf map parser reads.
    pub fn normalized_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(self.names.len() + self.entries.len() * 20);
        for s in self.symbols() {
            let _ = writeln!(out, "{:x} {:x} {}", s.start, s.size, s.name);
        }
        out
    }

    fn name(&self, e: &Entry) -> &str {
        let start = e.name_start as usize;
        &self.names[start..start + e.name_len as usize]
    }
}

/// `START SIZE NAME` -> (start, end, name). Fields are separated by spaces or tabs
/// (as perf and blazesym accept). A name holding a carriage return is refused:
/// blazesym splits lines at `\r` too, and one bad line makes it reject the whole file.
fn parse_line(line: &[u8]) -> Option<(u64, u64, &str)> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let blank = |c: char| c == ' ' || c == '\t';
    let (start, rest) = line.split_once(blank)?;
    let (size, name) = rest.trim_start_matches(blank).split_once(blank)?;
    let name = name.trim_start_matches(blank);
    let (start, size) = (hex(start)?, hex(size)?);
    if size == 0 || name.trim().is_empty() || name.contains('\r') {
        return None;
    }
    Some((start, start.checked_add(size)?, name))
}

/// The `[start, end)` of a line, from its first two fields only.
fn range_of(line: &[u8]) -> Option<(u64, u64)> {
    let mut fields = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|f| !f.is_empty());
    let mut field = || hex(std::str::from_utf8(fields.next()?).ok()?);
    let (start, size) = (field()?, field()?);
    Some((start, start.checked_add(size)?))
}

/// Hex with or without `0x`: at most 16 digits, no sign.
fn hex(s: &str) -> Option<u64> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Bytes read at a time by [`scan_perf_map`] (64 KiB, the scan's whole buffer).
pub const SCAN_CHUNK_BYTES: usize = 64 << 10;
/// Longest line [`scan_perf_map`] looks at (4 KiB); a longer one is skipped as
/// malformed, so one endless line cannot grow the scan's memory.
pub const MAX_LINE_BYTES: usize = 4 << 10;

/// Where a scan's input starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// At the start of a line (the start of the file).
    LineStart,
    /// Somewhere in a line: everything up to the first newline is skipped.
    MidLine,
}

/// Names found by [`scan_perf_map`] for the addresses asked for.
#[derive(Clone, Debug, Default)]
pub struct PerfMapNames {
    /// The addresses asked for, sorted, without duplicates.
    addrs: Vec<u64>,
    /// `names[i]` names `addrs[i]`.
    names: Vec<Option<Box<str>>>,
    stats: PerfMapStats,
}

impl PerfMapNames {
    /// The name of the symbol containing `addr`, if `addr` was asked for and the map
    /// has one.
    pub fn get(&self, addr: u64) -> Option<&str> {
        let i = self.addrs.binary_search(&addr).ok()?;
        self.names[i].as_deref()
    }

    /// How many of the addresses asked for were named.
    pub fn named(&self) -> usize {
        self.names.iter().filter(|n| n.is_some()).count()
    }

    /// What the scan skipped (`overlapped` and `over_limit` stay 0: nothing is held).
    pub fn stats(&self) -> &PerfMapStats {
        &self.stats
    }
}

/// Reads perf map text from `input` and names each of `addrs` by the last line
/// whose range contains it (the file is appended to: the later line is the newer
/// code). Memory is one [`SCAN_CHUNK_BYTES`] buffer, one line of at most
/// [`MAX_LINE_BYTES`], and the names found. A line that names an address asked for
/// is checked as [`PerfMap::parse`] checks it; others only for their two hex fields
/// (a bad name on a line nobody needs is not counted as malformed).
pub fn scan_perf_map(
    mut input: impl io::Read,
    addrs: &[u64],
    start: Start,
) -> io::Result<PerfMapNames> {
    let mut wanted = addrs.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    let mut out = PerfMapNames {
        names: vec![None; wanted.len()],
        addrs: wanted,
        stats: PerfMapStats::default(),
    };
    let mut buf = vec![0u8; SCAN_CHUNK_BYTES];
    // The start of a line that continues into the next chunk.
    let mut carry: Vec<u8> = Vec::new();
    // Inside a line that is not looked at: a first partial line, or one too long.
    let mut skipping = start == Start::MidLine;
    let mut skipped_first = 0u64;
    let mut first = true;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut chunk = &buf[..n];
        while let Some(newline) = chunk.iter().position(|&b| b == b'\n') {
            let piece = &chunk[..newline];
            chunk = &chunk[newline + 1..];
            if skipping {
                if first {
                    skipped_first += piece.len() as u64 + 1;
                }
                skipping = false;
                first = false;
                carry.clear();
                continue;
            }
            first = false;
            if carry.len() + piece.len() > MAX_LINE_BYTES {
                out.stats.malformed_lines += 1;
                carry.clear();
            } else if carry.is_empty() {
                out.scan_line(piece);
            } else {
                carry.extend_from_slice(piece);
                out.scan_line(&carry);
                carry.clear();
            }
        }
        if skipping {
            if first {
                skipped_first += chunk.len() as u64;
            }
        } else if carry.len() + chunk.len() > MAX_LINE_BYTES {
            out.stats.malformed_lines += 1;
            carry.clear();
            skipping = true;
        } else {
            carry.extend_from_slice(chunk);
        }
    }
    // A last line without a newline may be half-written.
    if !carry.is_empty() {
        out.stats.malformed_lines += 1;
    }
    out.stats.skipped_bytes = skipped_first;
    Ok(out)
}

impl PerfMapNames {
    fn scan_line(&mut self, line: &[u8]) {
        // Most lines name code nobody asked about: read their range and move on,
        // without checking the name (so a bad name is counted only where it matters).
        if let Some((start, end)) = range_of(line) {
            let i = self.addrs.partition_point(|&a| a < start);
            if self.addrs.get(i).is_none_or(|&a| a >= end) {
                return;
            }
        }
        match parse_line(line) {
            Some((start, end, name)) => {
                let mut i = self.addrs.partition_point(|&a| a < start);
                while i < self.addrs.len() && self.addrs[i] < end {
                    self.names[i] = Some(name.into());
                    i += 1;
                }
            }
            None if line.iter().all(u8::is_ascii_whitespace) => {}
            None => self.stats.malformed_lines += 1,
        }
    }
}

/// Size, modification time and identity of a perf map, to tell whether it changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    pub ino: u64,
    pub uid: u32,
}

/// The perf map's stamp without reading it (`None`: there is none), through the same
/// no-symlink path and with the same checks on the name as [`lookup_perf_map`]: a
/// regular file with one link, owned by `owner_uid()` (the process's effective uid,
/// asked only when there is a file; `None`: the process is gone).
pub fn perf_map_stamp(
    pid: u32,
    ns_pid: u32,
    owner_uid: impl FnOnce() -> Option<u32>,
) -> Result<Option<FileStamp>, PerfMapError> {
    let root = open_root(pid)?;
    let name = perf_map_name(ns_pid);
    let path = PathBuf::from(format!("/proc/{pid}/root/tmp/{name}"));
    let tmp = open_tmp(root.as_fd(), &path)?;
    let st = match lstat_at(tmp.as_fd(), &c_name(&name, &path)?) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PerfMapError::Open { path, source }),
    };
    let owner = owner_uid().ok_or(PerfMapError::Gone { pid })?;
    check_stat(&st, path, owner)?;
    Ok(Some(FileStamp {
        size: u64::try_from(st.st_size).unwrap_or(0),
        mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
        ino: st.st_ino,
        uid: st.st_uid,
    }))
}

/// What a perf map must be: a regular file (not a symlink, FIFO, device, socket or
/// directory) with a single link, owned by `owner_uid`.
fn check_stat(st: &libc::stat, path: PathBuf, owner_uid: u32) -> Result<(), PerfMapError> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFLNK => return Err(PerfMapError::Symlink { path }),
        _ => return Err(PerfMapError::NotRegularFile { path }),
    }
    if st.st_nlink != 1 {
        return Err(PerfMapError::HardLinked {
            path,
            links: st.st_nlink,
        });
    }
    if st.st_uid != owner_uid {
        return Err(PerfMapError::WrongOwner {
            path,
            owner: st.st_uid,
            expected: owner_uid,
        });
    }
    Ok(())
}

/// Names `addrs` from `dir/file_name` (following `dir`, which the caller trusts, but
/// not `file_name`) with the same checks as [`lookup_perf_map`]: for tests and for
/// files that are not in a process's /tmp.
pub fn lookup_perf_map_in(
    dir: &Path,
    file_name: &str,
    owner_uid: u32,
    addrs: &[u64],
) -> Result<PerfMapNames, PerfMapError> {
    let path = dir.join(file_name);
    let dir = open_dir(dir).map_err(|source| PerfMapError::Open {
        path: path.clone(),
        source,
    })?;
    scan_file_at(dir.as_fd(), file_name, path, owner_uid, addrs)
}

fn perf_map_name(ns_pid: u32) -> String {
    format!("perf-{ns_pid}.map")
}

fn open_root(pid: u32) -> Result<OwnedFd, PerfMapError> {
    let path = PathBuf::from(format!("/proc/{pid}/root"));
    open_dir(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => PerfMapError::Gone { pid },
        _ => PerfMapError::Open { path, source },
    })
}

/// `tmp/NAME` under a root directory descriptor, neither component followed.
fn scan_under_root(
    root: BorrowedFd<'_>,
    name: &str,
    owner_uid: u32,
    display: impl Fn(&str) -> PathBuf,
    addrs: &[u64],
) -> Result<PerfMapNames, PerfMapError> {
    let path = display(name);
    let tmp = open_tmp(root, &path)?;
    scan_file_at(tmp.as_fd(), name, path, owner_uid, addrs)
}

/// Names `addrs` from the perf map of `target`, with every check in the module
/// overview, without holding the map: the file (its last [`MAX_PERF_MAP_BYTES`]) is
/// read in [`SCAN_CHUNK_BYTES`] pieces and only the names of the addresses asked for
/// are kept. A long-running `node --perf-basic-prof` writes a map of tens of MiB;
/// parsing it whole into a [`PerfMap`] would hold ~1.5x its size at peak.
pub fn lookup_perf_map(
    target: &TargetProcess,
    addrs: &[u64],
) -> Result<PerfMapNames, PerfMapError> {
    let root = open_root(target.pid)?;
    // The root was opened by pid: make sure the pid still named our process then.
    if !target.is_alive() {
        return Err(PerfMapError::Gone { pid: target.pid });
    }
    let display = |name: &str| PathBuf::from(format!("/proc/{}/root/tmp/{name}", target.pid));
    scan_under_root(
        root.as_fd(),
        &perf_map_name(target.ns_pid),
        target.uid,
        display,
        addrs,
    )
}

/// The `tmp` directory under `root`, refusing a symlink (checked, and enforced by
/// `O_NOFOLLOW` should it be swapped in after the check).
fn open_tmp(root: BorrowedFd<'_>, path: &Path) -> Result<OwnedFd, PerfMapError> {
    let tmp_path = path.parent().unwrap_or(path).to_path_buf();
    let open_error = |source: io::Error| match source.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) => PerfMapError::Symlink {
            path: tmp_path.clone(),
        },
        _ if source.kind() == io::ErrorKind::NotFound => PerfMapError::NotFound {
            path: path.to_path_buf(),
        },
        _ => PerfMapError::Open {
            path: tmp_path.clone(),
            source,
        },
    };
    let st = lstat_at(root, c"tmp").map_err(open_error)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => {}
        libc::S_IFLNK => return Err(PerfMapError::Symlink { path: tmp_path }),
        // A /tmp that is not a directory holds no perf map.
        _ => {
            return Err(PerfMapError::NotFound {
                path: path.to_path_buf(),
            })
        }
    }
    open_at(
        root,
        c"tmp",
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )
    .map_err(open_error)
}

/// Opens `name` in `dir` without following it, and checks type and owner on the
/// opened file before scanning at most [`MAX_PERF_MAP_BYTES`] of it.
fn scan_file_at(
    dir: BorrowedFd<'_>,
    name: &str,
    path: PathBuf,
    owner_uid: u32,
    addrs: &[u64],
) -> Result<PerfMapNames, PerfMapError> {
    let (mut file, size) = open_file_at(dir, name, path.clone(), owner_uid)?;
    scan_tail(&mut file, size, MAX_PERF_MAP_BYTES, addrs)
        .map_err(|source| PerfMapError::Read { path, source })
}

/// Opens `name` in `dir` without following it, once its name passed [`check_stat`]
/// (nothing but a regular file is ever opened: opening a FIFO or a device can block
/// or act on it), and checks the opened file again (the same inode, still passing);
/// returns it with its size.
fn open_file_at(
    dir: BorrowedFd<'_>,
    name: &str,
    path: PathBuf,
    owner_uid: u32,
) -> Result<(File, u64), PerfMapError> {
    let c = c_name(name, &path)?;
    let named = match lstat_at(dir, &c) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PerfMapError::NotFound { path })
        }
        Err(source) => return Err(PerfMapError::Open { path, source }),
    };
    check_stat(&named, path.clone(), owner_uid)?;
    let fd = open_at(
        dir,
        &c,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
    )
    .map_err(|source| match source.raw_os_error() {
        Some(libc::ELOOP) => PerfMapError::Symlink { path: path.clone() },
        Some(libc::ENOENT) => PerfMapError::NotFound { path: path.clone() },
        _ => PerfMapError::Open {
            path: path.clone(),
            source,
        },
    })?;
    let opened = fstat(fd.as_fd()).map_err(|source| PerfMapError::Read {
        path: path.clone(),
        source,
    })?;
    // Replaced between the lstat and the open: whatever it is now, it is not what
    // was checked.
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino) {
        return Err(PerfMapError::Open {
            path,
            source: io::Error::other("replaced while it was opened"),
        });
    }
    check_stat(&opened, path, owner_uid)?;
    let size = u64::try_from(opened.st_size).unwrap_or(0);
    Ok((File::from(fd), size))
}

/// Scans at most `cap` bytes of `file` (`size` bytes long) for `addrs`: the whole
/// file, or its last `cap` bytes from the first line that starts in them (the file is
/// appended to, so the end is the newest code). `skipped_bytes` counts what came
/// before.
fn scan_tail(file: &mut File, size: u64, cap: u64, addrs: &[u64]) -> io::Result<PerfMapNames> {
    if size <= cap {
        // The file may grow while we read (node appends): read no more than the cap.
        return scan_perf_map(file.take(cap), addrs, Start::LineStart);
    }
    // Start one byte early: if that byte is a newline, the first line is whole.
    let from = size - cap - 1;
    file.seek(SeekFrom::Start(from))?;
    let mut names = scan_perf_map(file.take(cap + 1), addrs, Start::MidLine)?;
    names.stats.skipped_bytes += from;
    Ok(names)
}

fn c_name(name: &str, path: &Path) -> Result<CString, PerfMapError> {
    CString::new(name).map_err(|e| PerfMapError::Open {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })
}

/// A directory, following symlinks (for paths we trust, like /proc/PID/root).
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is an open descriptor borrowed for the call and `name` is a
    // NUL-terminated string that outlives it.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat, is valid and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat(fd)`: what an opened file is.
fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `fd` is open for the call and `st` points to writable memory the size
    // of a `stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat returned 0, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`: what `name` is, without following it.
fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `dir` is open for the call, `name` is NUL-terminated, and `st` points to
    // writable memory the size of a `stat`.
    let rc = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat returned 0, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Lines as jcmd Compiler.perfmap (JDK 17) writes them.
    const JVM: &str = "\
0x00007f6e50ec7600 0x00000000000000b8 long Busy.work(long)
0x00007f6e50ec7800 0x0000000000000120 void Busy.main(java.lang.String[])
";
    /// Lines as node --perf-basic-prof writes them.
    const NODE: &str = "\
3d5c1a2b 1c JS:*work /path/busy.js:1:14
3d5c1b00 40 JS:~main /path/busy.js:5:1
";

    /// The start addresses of the symbols in [`JVM`] and [`NODE`].
    const JVM_STARTS: [u64; 2] = [0x7f6e_50ec_7600, 0x7f6e_50ec_7800];
    const NODE_STARTS: [u64; 2] = [0x3d5c_1a2b, 0x3d5c_1b00];

    fn root_uid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    /// An entry costs the 24 bytes [`MAX_PERF_MAP_ENTRIES`] is costed with.
    #[test]
    fn documented_entry_size() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    /// JDK 17's 0x-prefixed lines parse and look up, names with spaces intact.
    #[test]
    fn jvm_format() {
        let map = PerfMap::parse(JVM.as_bytes());
        assert_eq!(map.len(), 2);
        assert_eq!(map.stats(), &PerfMapStats::default());
        assert_eq!(map.lookup(0x7f6e50ec7600), Some("long Busy.work(long)"));
        assert_eq!(map.lookup(0x7f6e50ec76b7), Some("long Busy.work(long)"));
        assert_eq!(map.lookup(0x7f6e50ec76b8), None);
        assert_eq!(
            map.lookup(0x7f6e50ec7900),
            Some("void Busy.main(java.lang.String[])")
        );
        assert_eq!(map.lookup(0x7f6e50ec75ff), None);
        assert_eq!(map.lookup(0), None);
    }

    /// Node's bare-hex lines parse and look up.
    #[test]
    fn node_format() {
        let map = PerfMap::parse(NODE.as_bytes());
        assert_eq!(map.len(), 2);
        assert_eq!(
            map.lookup(0x3d5c1a2b + 0x1b),
            Some("JS:*work /path/busy.js:1:14")
        );
        assert_eq!(map.lookup(0x3d5c1a2b + 0x1c), None);
        assert_eq!(map.lookup(0x3d5c1b3f), Some("JS:~main /path/busy.js:5:1"));
    }

    /// The normalized text is bare hex, sorted, and parses back to the same map.
    #[test]
    fn normalized_text_is_bare_hex() {
        let map = PerfMap::parse(format!("{NODE}{JVM}").as_bytes());
        let text = map.normalized_text();
        assert_eq!(
            text,
            "3d5c1a2b 1c JS:*work /path/busy.js:1:14\n\
             3d5c1b00 40 JS:~main /path/busy.js:5:1\n\
             7f6e50ec7600 b8 long Busy.work(long)\n\
             7f6e50ec7800 120 void Busy.main(java.lang.String[])\n"
        );
        assert!(!text.contains("0x"));
        let again = PerfMap::parse(text.as_bytes());
        assert_eq!(
            again.symbols().collect::<Vec<_>>(),
            map.symbols().collect::<Vec<_>>()
        );
    }

    /// Garbage lines are skipped and counted; so is an unterminated last line.
    #[test]
    fn garbage_lines() {
        let input = b"10 10 good\nnot a line\n+10 10 signed\n10 0 zero\nzz 10 nothex\n10 10\n10 10  \n\
                      ffffffffffffffff 10 wraps\n0x 10 empty\n11111111111111111 1 long\n\xff 1 x\n\n30 10 \xff\xfe\n50 10 half";
        let map = PerfMap::parse(input);
        assert_eq!(map.len(), 1);
        assert_eq!(map.lookup(0x15), Some("good"));
        assert_eq!(map.stats().malformed_lines, 12);
        // Tabs and runs of spaces separate fields; a carriage return inside a name does not
        // belong in a perf map.
        let map = PerfMap::parse(b"10\t10\tA\n100  10   B c\r\n200 10 x\ry\n");
        assert_eq!(map.lookup(0x10), Some("A"));
        assert_eq!(map.lookup(0x100), Some("B c"));
        assert_eq!(map.stats().malformed_lines, 1);
    }

    /// Where entries overlap the later line wins and the earlier is counted.
    #[test]
    fn later_entries_win() {
        let map = PerfMap::parse(b"100 100 old_big\n150 10 new_inside\n300 10 a\n305 10 b\n");
        assert_eq!(map.lookup(0x150), Some("new_inside"));
        assert_eq!(map.lookup(0x120), None, "old_big was replaced");
        assert_eq!(map.lookup(0x309), Some("b"));
        assert_eq!(map.lookup(0x302), None);
        assert_eq!(map.stats().overlapped, 2);
    }

    /// Past the entry limit the oldest entries go, counted.
    #[test]
    fn entry_limit_keeps_newest() {
        let input: String = (0..10)
            .map(|i| format!("{:x} 10 f{i}\n", i * 0x100))
            .collect();
        let map = PerfMap::parse_with_limit(input.as_bytes(), 3);
        assert_eq!(map.len(), 3);
        assert_eq!(map.stats().over_limit, 7);
        assert_eq!(map.lookup(0x905), Some("f9"));
        assert_eq!(map.lookup(0x005), None);
    }

    /// A file over the size cap is read from its tail, starting at a whole line, and the
    /// skipped bytes are counted.
    #[test]
    fn size_cap_reads_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.map");
        // 18 bytes per line.
        let lines: String = (0..1000)
            .map(|i| format!("{:08x} 10 f{i:04}\n", i * 0x100))
            .collect();
        let len = lines.len() as u64;
        std::fs::write(&path, &lines).unwrap();
        let mut file = File::open(&path).unwrap();
        let starts: Vec<u64> = (0..1000).map(|i| i * 0x100).collect();
        // A cap of 100 bytes ends inside a line: that partial line is dropped.
        let names = scan_tail(&mut file, len, 100, &starts).unwrap();
        assert_eq!(names.stats().skipped_bytes, len - 90);
        assert_eq!(names.named(), 5);
        assert_eq!(names.stats().malformed_lines, 0);
        assert_eq!(names.get(995 * 0x100), Some("f0995"));
        assert_eq!(names.get(994 * 0x100), None);
        // A cap landing right after a newline keeps the first line whole.
        let names = scan_tail(&mut file, len, 90, &starts).unwrap();
        assert_eq!((names.named(), names.stats().skipped_bytes), (5, len - 90));
        // Under the cap, everything.
        file.seek(SeekFrom::Start(0)).unwrap();
        let names = scan_tail(&mut file, len, len, &starts).unwrap();
        assert_eq!((names.named(), names.stats().skipped_bytes), (1000, 0));
    }

    /// A real file owned by us reads through the checked path.
    #[test]
    fn reads_owned_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("perf-1.map"), JVM).unwrap();
        let names = lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap();
        assert_eq!(names.named(), 2);
        assert!(matches!(
            lookup_perf_map_in(dir.path(), "perf-2.map", root_uid(), &JVM_STARTS),
            Err(PerfMapError::NotFound { .. })
        ));
    }

    /// A symlink to a perfectly good map is refused.
    #[test]
    fn symlink_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real.map"), JVM).unwrap();
        symlink(dir.path().join("real.map"), dir.path().join("perf-1.map")).unwrap();
        let err =
            lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap_err();
        assert!(matches!(err, PerfMapError::Symlink { .. }), "{err}");
    }

    /// A `tmp` that is a symlink (pointing out of the root) is refused too.
    #[test]
    fn symlinked_tmp_refused() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("perf-1.map"), JVM).unwrap();
        symlink(elsewhere.path(), root.path().join("tmp")).unwrap();
        let root_fd = open_dir(root.path()).unwrap();
        let display = |n: &str| root.path().join("tmp").join(n);
        let err = scan_under_root(
            root_fd.as_fd(),
            "perf-1.map",
            root_uid(),
            display,
            &JVM_STARTS,
        )
        .unwrap_err();
        assert!(matches!(err, PerfMapError::Symlink { .. }), "{err}");
        // The same layout with a real tmp directory reads.
        std::fs::remove_file(root.path().join("tmp")).unwrap();
        std::fs::create_dir(root.path().join("tmp")).unwrap();
        std::fs::write(root.path().join("tmp/perf-1.map"), NODE).unwrap();
        let names = scan_under_root(
            root_fd.as_fd(),
            "perf-1.map",
            root_uid(),
            display,
            &NODE_STARTS,
        )
        .unwrap();
        assert_eq!(names.named(), 2);
    }

    /// A file owned by another uid (nobody) is refused.
    #[test]
    fn wrong_owner_refused() {
        if root_uid() != 0 {
            eprintln!("skipped: chown needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        std::fs::write(&path, JVM).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let err = lookup_perf_map_in(dir.path(), "perf-1.map", 0, &JVM_STARTS).unwrap_err();
        assert!(
            matches!(
                err,
                PerfMapError::WrongOwner {
                    owner: 65534,
                    expected: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            lookup_perf_map_in(dir.path(), "perf-1.map", 65534, &JVM_STARTS)
                .unwrap()
                .named(),
            2
        );
    }

    /// A FIFO is refused without blocking on it.
    #[test]
    fn fifo_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = CString::new(
            dir.path()
                .join("perf-1.map")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: `path` is NUL-terminated and outlives the call.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let err =
            lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap_err();
        assert!(matches!(err, PerfMapError::NotRegularFile { .. }), "{err}");
    }

    /// A FIFO is refused from its name, never opened: a writer blocked until a
    /// reader opens it stays blocked (it would be let through by even a non-blocking
    /// open, which a FIFO planted in a container's /tmp must not get from root).
    #[test]
    fn fifo_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        let c_path = CString::new(path.clone().into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: `c_path` is NUL-terminated and outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                // Blocks until someone opens the FIFO for reading.
                let opened = OpenOptions::new().write(true).open(&path).is_ok();
                let _ = tx.send(opened);
            })
        };
        // Let the writer reach its open.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let err =
            lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap_err();
        let reached = rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_ok();
        // Release the writer whatever happened.
        let _release = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        writer.join().unwrap();
        assert!(matches!(err, PerfMapError::NotRegularFile { .. }), "{err}");
        assert!(!reached, "the FIFO was opened");
    }

    /// A device node (a copy of /dev/null's numbers) is refused before any open.
    #[test]
    fn device_node_refused() {
        if root_uid() != 0 {
            eprintln!("skipped: mknod needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let c_path = CString::new(
            dir.path()
                .join("perf-1.map")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: `c_path` is NUL-terminated and outlives the call.
        let rc =
            unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let err =
            lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap_err();
        assert!(matches!(err, PerfMapError::NotRegularFile { .. }), "{err}");
    }

    /// A hard link to a good map is refused: in a shared /tmp it may name another
    /// user's file (same owner or not); the file itself, with one link, reads.
    #[test]
    fn hard_link_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("real.map"), JVM).unwrap();
        std::fs::hard_link(dir.path().join("real.map"), dir.path().join("perf-1.map")).unwrap();
        let err =
            lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap_err();
        assert!(
            matches!(err, PerfMapError::HardLinked { links: 2, .. }),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("real.map")).unwrap();
        let names = lookup_perf_map_in(dir.path(), "perf-1.map", root_uid(), &JVM_STARTS).unwrap();
        assert_eq!(names.named(), 2);
    }

    /// Our own process has no perf map: not found, and no stamp; a pid that cannot
    /// exist is gone.
    #[test]
    fn own_process_has_no_map() {
        let pid = std::process::id();
        assert!(matches!(
            perf_map_stamp(pid, pid, || Some(root_uid())),
            Ok(None)
        ));
        assert!(matches!(
            perf_map_stamp(0x3fff_fff0, 1, || Some(root_uid())),
            Err(PerfMapError::Gone { .. })
        ));
    }

    /// The stamp checks the name as the reader does: a map owned by another uid than
    /// the process, hard-linked or not a regular file gives no stamp but a refusal.
    #[test]
    fn stamp_checks_owner_links_and_type() {
        if root_uid() != 0 {
            eprintln!("skipped: chown needs root");
            return;
        }
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id();
        let path = format!("/tmp/perf-{pid}.map");
        let stamp = |path: &str, setup: &dyn Fn(&str)| {
            std::fs::write(path, "7f0000001000 100 JS:*work /srv/app.js:1:1\n").unwrap();
            setup(path);
            let stamp = perf_map_stamp(pid, pid, || Some(0));
            let _ = std::fs::remove_file(path);
            stamp
        };
        let own = stamp(&path, &|_| {});
        let foreign = stamp(&path, &|p| {
            std::os::unix::fs::chown(p, Some(65534), None).unwrap()
        });
        let linked_to = format!("/tmp/perf-{pid}.other");
        let linked = stamp(&path, &|p| std::fs::hard_link(p, &linked_to).unwrap());
        let _ = std::fs::remove_file(&linked_to);
        std::fs::create_dir(&path).unwrap();
        let directory = perf_map_stamp(pid, pid, || Some(0));
        std::fs::remove_dir(&path).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(own.unwrap().map(|s| s.uid), Some(0));
        assert!(
            matches!(
                foreign,
                Err(PerfMapError::WrongOwner {
                    owner: 65534,
                    expected: 0,
                    ..
                })
            ),
            "{foreign:?}"
        );
        assert!(
            matches!(linked, Err(PerfMapError::HardLinked { links: 2, .. })),
            "{linked:?}"
        );
        assert!(
            matches!(directory, Err(PerfMapError::NotRegularFile { .. })),
            "{directory:?}"
        );
    }

    /// Hands out at most `step` bytes per read, so lines cross every boundary.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl io::Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// Perf map text of `lines` adjacent symbols, with some malformed lines between.
    fn generated_map(lines: u64) -> String {
        use std::fmt::Write as _;
        let mut text = String::new();
        for i in 0..lines {
            let _ = writeln!(
                text,
                "{:x} 40 LazyCompile:*fn{i} /srv/app/f{}.js:{i}:1",
                0x1000 + i * 0x80,
                i % 7
            );
            if i % 500 == 0 {
                text.push_str("not a perf map line\n");
            }
        }
        text
    }

    /// Scanning names every address as the parsed map does, with the file read whole,
    /// in 64 KiB chunks or a few bytes at a time (lines split across reads).
    #[test]
    fn scan_agrees_with_the_parsed_map() {
        let text = generated_map(3000);
        assert!(text.len() > 2 * SCAN_CHUNK_BYTES);
        let map = PerfMap::parse(text.as_bytes());
        let addrs: Vec<u64> = (0..3000u64)
            .flat_map(|i| {
                let start = 0x1000 + i * 0x80;
                [start, start + 0x3f, start + 0x40, start + 0x7f]
            })
            .chain([0, 0xfff, u64::MAX])
            .collect();
        for step in [usize::MAX, 4093, 7] {
            let names = scan_perf_map(
                Trickle {
                    data: text.as_bytes(),
                    step,
                },
                &addrs,
                Start::LineStart,
            )
            .unwrap();
            for &a in &addrs {
                assert_eq!(names.get(a), map.lookup(a), "address {a:#x}, step {step}");
            }
            assert_eq!(names.named(), 2 * 3000);
            assert_eq!(names.stats().malformed_lines, map.stats().malformed_lines);
            assert_eq!(names.stats().malformed_lines, 6);
        }
    }

    /// The last line that covers an address names it: the file is appended to.
    #[test]
    fn scan_takes_the_last_line() {
        let text = "1000 100 old\n2000 10 other\n1080 100 new\n";
        let names =
            scan_perf_map(text.as_bytes(), &[0x1010, 0x1090, 0x2000], Start::LineStart).unwrap();
        assert_eq!(names.get(0x1010), Some("old"));
        assert_eq!(names.get(0x1090), Some("new"));
        assert_eq!(names.get(0x2000), Some("other"));
        assert_eq!(names.get(0x3000), None, "not asked for");
    }

    /// A line longer than MAX_LINE_BYTES is skipped and counted whether it sits in one
    /// read or spans several, and the lines after it still count; a last line without
    /// newline is counted as malformed.
    #[test]
    fn scan_skips_endless_lines() {
        let long = format!("1000 10 {}\n", "x".repeat(3 * SCAN_CHUNK_BYTES));
        let text = format!("2000 10 before\n{long}3000 10 after\n4000 10 half");
        for step in [usize::MAX, 1000] {
            let names = scan_perf_map(
                Trickle {
                    data: text.as_bytes(),
                    step,
                },
                &[0x1000, 0x2000, 0x3000, 0x4000],
                Start::LineStart,
            )
            .unwrap();
            assert_eq!(names.get(0x1000), None, "step {step}");
            assert_eq!(names.get(0x2000), Some("before"));
            assert_eq!(names.get(0x3000), Some("after"));
            assert_eq!(names.get(0x4000), None);
            assert_eq!(names.stats().malformed_lines, 2, "step {step}");
        }
    }

    /// Input that starts mid-line (the tail of a large file) drops the partial line
    /// and says how many bytes it skipped.
    #[test]
    fn scan_from_mid_line_skips_the_partial_line() {
        let text = "0 10 cut\n2000 10 whole\n";
        let names = scan_perf_map(text.as_bytes(), &[0x0, 0x2000], Start::MidLine).unwrap();
        assert_eq!(names.get(0x0), None);
        assert_eq!(names.get(0x2000), Some("whole"));
        assert_eq!(names.stats().skipped_bytes, 9);
        assert_eq!(names.stats().malformed_lines, 0);
    }

    /// lookup_perf_map reads a real process's map through /proc/PID/root and refuses
    /// one owned by another uid.
    #[test]
    fn lookup_reads_a_process_map() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = child.id();
        let target = crate::runtimes::detect::detect(pid).unwrap();
        let path = format!("/tmp/perf-{pid}.map");
        std::fs::write(&path, "7f0000001000 100 JS:*work /srv/app.js:1:1\n").unwrap();
        let found = lookup_perf_map(&target, &[0x7f00_0000_1010, 0x7f00_0000_2000]);
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let refused = lookup_perf_map(&target, &[0x7f00_0000_1010]);
        std::fs::remove_file(&path).unwrap();
        let gone = {
            child.kill().unwrap();
            child.wait().unwrap();
            lookup_perf_map(&target, &[0x7f00_0000_1010])
        };
        let found = found.unwrap();
        assert_eq!(
            found.get(0x7f00_0000_1010),
            Some("JS:*work /srv/app.js:1:1")
        );
        assert_eq!(found.get(0x7f00_0000_2000), None);
        assert!(
            matches!(refused, Err(PerfMapError::WrongOwner { owner: 65534, .. })),
            "{refused:?}"
        );
        assert!(matches!(gone, Err(PerfMapError::Gone { .. })), "{gone:?}");
    }
}
