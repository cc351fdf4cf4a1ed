//! Kernel symbols from /proc/kallsyms, read in two streaming passes so that only
//! what a batch needs is kept in memory.
//!
//! Pass 1 keeps just the addresses of text symbols (~1 MB for 120k symbols), finds
//! the symbol covering each address asked for; pass 2 keeps the names of those
//! symbols only. Loading the whole table with names (as blazesym's kernel source
//! does) costs ~20 MB of RSS on a 6.18 kernel, half the agent's budget.
//!
//! The kernel formats the whole file at every read (~50 ms per pass here), which a
//! recording pays once but an agent would pay every interval with a new kernel
//! address. The agent holds a [`KernelTable`] instead: text symbols only, packed
//! (~4.5 MB for 122k symbols), reloaded now and then for modules.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufRead, BufReader},
    path::{Path, PathBuf},
    sync::Arc,
};

/// Where the kernel lists its symbols.
pub const KALLSYMS: &str = "/proc/kallsyms";

/// Why kernel addresses could not be named at all.
#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Every address is zero: kptr_restrict hides them from this process.
    #[error(
        "{path} shows no addresses to this process (kernel.kptr_restrict and \
         perf_event_paranoid hide them without CAP_SYSLOG; run as root)"
    )]
    Hidden { path: PathBuf },
}

/// One line of kallsyms: address, type letter, name.
fn parse_line(line: &str) -> Option<(u64, char, &str)> {
    let mut parts = line.split_ascii_whitespace();
    let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
    let kind = parts.next()?.chars().next()?;
    let name = parts.next()?;
    Some((addr, kind, name))
}

/// Text (code) symbols: `t`, `T`, and weak `w`, `W`.
fn is_text(kind: char) -> bool {
    matches!(kind, 't' | 'T' | 'w' | 'W')
}

fn lines(path: &Path) -> Result<impl Iterator<Item = String>, KallsymsError> {
    let file = File::open(path).map_err(|source| KallsymsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(BufReader::with_capacity(64 * 1024, file)
        .lines()
        .map_while(Result::ok))
}

/// Whether `path` shows addresses to this process: its first lines are enough (a
/// hidden table is all zeros). `Err` says why not, in one sentence.
pub fn check_visible(path: &Path) -> Result<(), KallsymsError> {
    const LINES_LOOKED_AT: usize = 64;
    let visible = lines(path)?
        .take(LINES_LOOKED_AT)
        .filter_map(|line| parse_line(&line).map(|(addr, _, _)| addr))
        .any(|addr| addr != 0);
    if visible {
        Ok(())
    } else {
        Err(KallsymsError::Hidden {
            path: path.to_path_buf(),
        })
    }
}

/// Names the function containing each address of `addrs` (None when no text symbol
/// is at or below it), reading `path` (normally [`KALLSYMS`]).
pub fn resolve(path: &Path, addrs: &[u64]) -> Result<Vec<Option<Arc<str>>>, KallsymsError> {
    // Pass 1: addresses of text symbols.
    let mut starts: Vec<u64> = Vec::new();
    let mut any_nonzero = false;
    for line in lines(path)? {
        if let Some((addr, kind, _)) = parse_line(&line) {
            any_nonzero |= addr != 0;
            if is_text(kind) {
                starts.push(addr);
            }
        }
    }
    if !any_nonzero {
        return Err(KallsymsError::Hidden {
            path: path.to_path_buf(),
        });
    }
    starts.sort_unstable();
    starts.dedup();
    let covering: Vec<Option<u64>> = addrs
        .iter()
        .map(|&a| match starts.partition_point(|&s| s <= a) {
            0 => None,
            i => Some(starts[i - 1]),
        })
        .collect();
    drop(starts);

    // Pass 2: names of just the symbols found (the first name listed at an address).
    let mut names: HashMap<u64, Option<Arc<str>>> =
        covering.iter().flatten().map(|&s| (s, None)).collect();
    for line in lines(path)? {
        if let Some((addr, kind, name)) = parse_line(&line) {
            if is_text(kind) {
                if let Some(slot @ None) = names.get_mut(&addr) {
                    *slot = Some(name.into());
                }
            }
        }
    }
    Ok(covering
        .iter()
        .map(|c| c.and_then(|s| names.get(&s).cloned().flatten()))
        .collect())
}

/// The kernel's text symbols, packed: sorted start addresses and, for each, the end
/// of its name in one string (12 bytes per symbol plus its name).
#[derive(Debug, Default)]
pub struct KernelTable {
    starts: Vec<u64>,
    name_ends: Vec<u32>,
    names: String,
}

impl KernelTable {
    /// Reads every text symbol of `path` (normally [`KALLSYMS`]) in one pass.
    pub fn load(path: &Path) -> Result<KernelTable, KallsymsError> {
        let mut entries: Vec<(u64, u32, u32)> = Vec::new();
        let mut names = String::new();
        let mut any_nonzero = false;
        for line in lines(path)? {
            let Some((addr, kind, name)) = parse_line(&line) else {
                continue;
            };
            any_nonzero |= addr != 0;
            if !is_text(kind) || names.len() + name.len() > u32::MAX as usize {
                continue;
            }
            let start = names.len() as u32;
            names.push_str(name);
            entries.push((addr, start, names.len() as u32));
        }
        if !any_nonzero {
            return Err(KallsymsError::Hidden {
                path: path.to_path_buf(),
            });
        }
        // Stable: the first name listed at an address wins, as in `resolve`.
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        // Names in address order, so each needs only its end.
        let mut packed = String::with_capacity(names.len());
        let mut starts = Vec::with_capacity(entries.len());
        let mut name_ends = Vec::with_capacity(entries.len());
        for (addr, from, to) in entries {
            packed.push_str(&names[from as usize..to as usize]);
            starts.push(addr);
            name_ends.push(packed.len() as u32);
        }
        Ok(KernelTable {
            starts,
            name_ends,
            names: packed,
        })
    }

    /// Names the function containing each address (None below every text symbol).
    pub fn resolve(&self, addrs: &[u64]) -> Vec<Option<Arc<str>>> {
        addrs
            .iter()
            .map(|&a| match self.starts.partition_point(|&s| s <= a) {
                0 => None,
                i => {
                    let from = if i >= 2 { self.name_ends[i - 2] } else { 0 } as usize;
                    Some(self.names[from..self.name_ends[i - 1] as usize].into())
                }
            })
            .collect()
    }

    /// Symbols held.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Bytes it holds.
    pub fn heap_bytes(&self) -> usize {
        self.starts.capacity() * 8 + self.name_ends.capacity() * 4 + self.names.capacity()
    }
}

/// Where the kernel lists its loaded modules (absent on a kernel without them).
pub const MODULES: &str = "/proc/modules";

/// Programs [`KernelCode::now`] looks at, at most: far more than a host runs, and a
/// bound on the scan if ids kept coming.
const MAX_PROGRAMS_SCANNED: u32 = 1 << 16;

/// The kernel code that comes and goes after boot, as kallsyms lists it: BPF
/// programs (by id; the kernel never reuses one) and modules (by name and load
/// address). When it changes, a [`KernelTable`] loaded before is stale: new code is
/// named after whatever symbol precedes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCode {
    programs: u32,
    program_ids: u64,
    modules: u64,
}

impl KernelCode {
    /// The code loaded now. What cannot be read (no permission for the `bpf`
    /// syscall, no /proc/modules) counts as nothing, so it never looks changed.
    pub fn now() -> KernelCode {
        let mut code = KernelCode::default();
        // aya walks the ids (BPF_PROG_GET_NEXT_ID); a program unloaded meanwhile,
        // or a refusal, is an error item, skipped.
        for program in aya::programs::loaded_programs()
            .take(MAX_PROGRAMS_SCANNED as usize)
            .flatten()
        {
            code.programs += 1;
            code.program_ids = code
                .program_ids
                .wrapping_mul(31)
                .wrapping_add(program.id().into());
        }
        if let Ok(text) = std::fs::read_to_string(MODULES) {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for line in text.lines() {
                // Name and address: the use counts and state change without new code.
                let fields: Vec<&str> = line.split_ascii_whitespace().collect();
                (fields.first(), fields.get(5)).hash(&mut h);
            }
            code.modules = h.finish();
        }
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Loads a two-instruction socket filter (`r0 = 0; exit`) with the raw `bpf`
    /// syscall; the program lives until the returned fd is closed.
    fn load_tiny_program() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd as _;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
        // struct bpf_insn: code, dst/src registers, offset, immediate.
        let insns: [[u8; 8]; 2] = [[0xb7, 0, 0, 0, 0, 0, 0, 0], [0x95, 0, 0, 0, 0, 0, 0, 0]];
        let license = c"GPL";
        // The first fields of `union bpf_attr` for BPF_PROG_LOAD; the rest zero.
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: the kernel reads `attr` and the instructions and license it
        // points to, all alive for the call.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_ptr(), attr.len()) };
        assert!(fd >= 0, "BPF_PROG_LOAD: {}", io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
    }

    /// A BPF program loaded (as the agent's tests run: as root) changes what
    /// [`KernelCode::now`] sees; nothing loaded, it stays the same.
    #[test]
    fn loading_a_bpf_program_changes_kernel_code() {
        let before = KernelCode::now();
        let program = load_tiny_program();
        let loaded = KernelCode::now();
        assert_ne!(before, loaded);
        assert!(loaded.programs > before.programs || loaded.program_ids != before.program_ids);
        assert_eq!(KernelCode::now(), loaded, "same code, same value");
        drop(program);
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    /// Each address gets the nearest text symbol at or below it; data symbols and
    /// addresses below every symbol are not named.
    #[test]
    fn nearest_text_symbol_below() {
        let f = file(
            "ffffffff81000000 T _stext\n\
             ffffffff81000100 t helper\n\
             ffffffff81000180 D some_data\n\
             ffffffff81000200 T do_syscall_64\n\
             ffffffff81000200 T do_syscall_64_alias\n\
             garbage line\n",
        );
        let got = resolve(
            f.path(),
            &[
                0xffffffff81000150,
                0xffffffff81000190,
                0xffffffff81000250,
                0x1000,
            ],
        )
        .unwrap();
        let names: Vec<Option<&str>> = got.iter().map(|n| n.as_deref()).collect();
        assert_eq!(
            names,
            vec![Some("helper"), Some("helper"), Some("do_syscall_64"), None]
        );
    }

    /// The packed table names every address exactly as the two-pass reader does.
    #[test]
    fn table_agrees_with_two_passes() {
        let f = file(
            "ffffffff81000200 T do_syscall_64\n\
             ffffffff81000000 T _stext\n\
             ffffffff81000100 t helper\n\
             ffffffff81000180 D some_data\n\
             ffffffff81000200 T do_syscall_64_alias\n\
             garbage line\n",
        );
        let addrs = [
            0xffffffff81000150,
            0xffffffff81000000,
            0xffffffff81000190,
            0xffffffff81000250,
            0x1000,
        ];
        let table = KernelTable::load(f.path()).unwrap();
        assert_eq!(table.len(), 3);
        assert_eq!(table.resolve(&addrs), resolve(f.path(), &addrs).unwrap());
        let real = KernelTable::load(Path::new(KALLSYMS)).unwrap();
        let probe: Vec<u64> = real.starts.iter().step_by(997).map(|s| s + 1).collect();
        assert_eq!(
            real.resolve(&probe),
            resolve(Path::new(KALLSYMS), &probe).unwrap()
        );
    }

    /// All-zero addresses (kptr_restrict) are an error that says why.
    #[test]
    fn hidden_addresses_are_reported() {
        let f = file("0000000000000000 T _stext\n0000000000000000 t helper\n");
        assert!(matches!(
            resolve(f.path(), &[1]),
            Err(KallsymsError::Hidden { .. })
        ));
    }

    /// The real /proc/kallsyms names the address of a function we know is there.
    #[test]
    fn reads_proc_kallsyms() {
        let text = std::fs::read_to_string(KALLSYMS).unwrap();
        let (addr, _, name) = text
            .lines()
            .filter_map(parse_line)
            .find(|(a, k, n)| *a != 0 && is_text(*k) && *n == "do_syscall_64")
            .expect("do_syscall_64 in kallsyms (run as root)");
        let got = resolve(Path::new(KALLSYMS), &[addr + 1]).unwrap();
        assert_eq!(got[0].as_deref(), Some(name));
    }
}
