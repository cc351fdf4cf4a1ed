//! Kernel type information for the eBPF loader: where a field sits in a kernel
//! struct, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The fork tracker (see [`crate::lineage`]) reads the new task's pid from its
//! `task_struct`, and the sampler reads a young process's start time and mappings
//! (`task_struct`, `vm_area_struct`, `file`, `inode`, ...), whose layouts differ
//! between kernels and builds; aya 0.14 cannot relocate field accesses in a Rust
//! eBPF program (no CO-RE), so userspace finds the offsets here, all in one go, and
//! hands them to the programs as globals at load time.
//!
//! The file (~5.5 MB) is streamed, never held: a few passes over it through one
//! [`CHUNK`]-sized buffer find the names, the struct and its members (one more
//! pass per level of anonymous struct or union the member sits in). Holding it
//! would add its size to the agent's peak RSS. Malformed input is an error, never
//! a panic, an out-of-bounds read or an endless walk (fuzzed:
//! `fuzz/fuzz_targets/btf.rs`).

use std::{fs::File, os::unix::fs::FileExt, path::Path};

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Bytes read at a time: the whole of what parsing holds, apart from the one
/// struct's member list being looked at (at most 12 x 65 535 bytes).
pub const CHUNK: usize = 64 << 10;

const MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
const TYPE_HEADER: usize = 12;
const MEMBER: usize = 12;

// BTF kinds (include/uapi/linux/btf.h).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;
const KIND_MAX: u32 = 19;

/// Levels of anonymous structs and unions followed to find a member.
const MAX_NESTING: usize = 8;
/// Anonymous members followed in all, so a crafted blob cannot make the search
/// take forever.
const MAX_ANONYMOUS: usize = 4096;
/// Offsets at which one name is looked for (a string table holds each once).
const MAX_NAME_OFFSETS: usize = 16;

/// Why a field offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read the kernel's BTF, /sys/kernel/btf/vmlinux (a kernel built without CONFIG_DEBUG_INFO_BTF has none): {0}")]
    Read(#[from] std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

/// Positioned reads: a file, or bytes in memory (tests, fuzzing).
pub trait Source {
    /// Fills `buf` from `offset` as far as the source goes; returns bytes read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl Source for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

impl Source for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

/// One type as the walk meets it: id, header fields, and for a struct or union its
/// member list.
struct TypeRef<'a> {
    id: u32,
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    members: &'a [u8],
}

/// A BTF blob's layout, from its header.
pub struct Btf<'s, S: Source + ?Sized> {
    src: &'s S,
    /// Absolute offsets and lengths of the type and string sections.
    types: (u64, u64),
    strings: (u64, u64),
}

impl<'s, S: Source + ?Sized> Btf<'s, S> {
    /// Reads and checks the header of a little-endian BTF blob (the only byte
    /// order of the hosts we run on).
    pub fn open(src: &'s S) -> Result<Btf<'s, S>, BtfError> {
        let bad = BtfError::Malformed;
        let mut header = [0u8; HEADER_MIN];
        if src.read_at(&mut header, 0)? < HEADER_MIN {
            return Err(bad("shorter than its header"));
        }
        if u16::from_le_bytes([header[0], header[1]]) != MAGIC {
            return Err(bad("bad magic (or big-endian)"));
        }
        let field = |i: usize| u64::from(u32_at(&header, 4 + 4 * i).unwrap_or(0));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(0), field(1), field(2), field(3), field(4));
        Ok(Btf {
            src,
            types: (hdr_len + type_off, type_len),
            strings: (hdr_len + str_off, str_len),
        })
    }

    /// For each of `names`, the offsets in the string section at which it starts
    /// (up to [`MAX_NAME_OFFSETS`] each): one pass over the section, string by
    /// string.
    fn names_offsets(&self, names: &[&str]) -> Result<Vec<Vec<u32>>, BtfError> {
        let mut found = vec![Vec::new(); names.len()];
        let (start, len) = self.strings;
        let mut buf = vec![0u8; CHUNK];
        // The string cut by the end of the last chunk, and where it starts; a
        // string longer than any name is skipped to its end.
        let mut carry: Vec<u8> = Vec::new();
        let mut carry_at = 0u64;
        let mut too_long = false;
        let longest = names.iter().map(|n| n.len()).max().unwrap_or(0);
        let mut at = 0u64;
        let mut note = |string: &[u8], offset: u64| {
            for (i, name) in names.iter().enumerate() {
                if string == name.as_bytes() && found[i].len() < MAX_NAME_OFFSETS {
                    found[i].push(offset as u32);
                }
            }
        };
        while at < len {
            let want = (len - at).min(CHUNK as u64) as usize;
            let got = self.src.read_at(&mut buf[..want], start + at)?;
            if got < want {
                return Err(BtfError::Malformed("string section past the end"));
            }
            let mut rest = &buf[..got];
            let mut rest_at = at;
            while let Some(nul) = rest.iter().position(|&b| b == 0) {
                if too_long {
                    too_long = false;
                } else if carry.is_empty() {
                    note(&rest[..nul], rest_at);
                } else {
                    carry.extend_from_slice(&rest[..nul]);
                    note(&carry, carry_at);
                    carry.clear();
                }
                rest = &rest[nul + 1..];
                rest_at += nul as u64 + 1;
            }
            if !rest.is_empty() && !too_long {
                if carry.is_empty() {
                    carry_at = rest_at;
                }
                carry.extend_from_slice(rest);
                if carry.len() > longest {
                    carry.clear();
                    too_long = true;
                }
            }
            at += got as u64;
        }
        Ok(found)
    }

    /// Calls `f` for every type in id order until it returns true.
    fn walk(&self, mut f: impl FnMut(TypeRef<'_>) -> bool) -> Result<(), BtfError> {
        let bad = BtfError::Malformed;
        let mut window = Window {
            src: self.src,
            section: self.types,
            buf: Vec::with_capacity(CHUNK),
            pos: 0,
            base: 0,
            read: 0,
        };
        let mut id = 0u32;
        while window.base + window.pos as u64 != self.types.1 {
            let header = window.take(TYPE_HEADER)?;
            let name = u32_at(header, 0).ok_or(bad("truncated type"))?;
            let info = u32_at(header, 4).ok_or(bad("truncated type"))?;
            let extra = trailing_bytes(info).ok_or(bad("unknown type kind"))?;
            let kind = (info >> 24) & 0x1f;
            let trailing = window.take(extra)?;
            id = id.checked_add(1).ok_or(bad("too many types"))?;
            let members = if matches!(kind, KIND_STRUCT | KIND_UNION) {
                trailing
            } else {
                &[]
            };
            if f(TypeRef {
                id,
                name,
                kind,
                vlen: (info & 0xffff) as usize,
                kind_flag: info >> 31 == 1,
                members,
            }) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Byte offset of `member` in struct `strukt`, looking inside anonymous
    /// structs and unions (where kernels keep many fields).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        self.member_offsets(&[(strukt, member)])?
            .pop()
            .expect("one result per request")
    }

    /// [`Btf::member_offset`] of each `(struct, member)` in `wanted`, in order, in
    /// one pass over the strings and one over the types per level of anonymous
    /// nesting, for all of them at once. The outer error is the blob's; each inner
    /// one is its field's.
    pub fn member_offsets(
        &self,
        wanted: &[(&str, &str)],
    ) -> Result<Vec<Result<u32, BtfError>>, BtfError> {
        let names: Vec<&str> = wanted.iter().flat_map(|&(s, m)| [s, m]).collect();
        let offsets = self.names_offsets(&names)?;
        let mut fields: Vec<Field> = offsets
            .chunks_exact(2)
            .map(|pair| Field {
                struct_names: pair[0].clone(),
                member_names: pair[1].clone(),
                seen_struct: false,
                found: None,
                level: Vec::new(),
                anonymous: 0,
            })
            .collect();
        // The first struct of each name (with members) is looked in.
        let mut structs_left = fields.len();
        self.walk(|t| {
            if t.kind != KIND_STRUCT || t.vlen == 0 {
                return false;
            }
            for f in fields.iter_mut() {
                if !f.seen_struct && f.struct_names.contains(&t.name) {
                    f.seen_struct = true;
                    structs_left -= 1;
                    let mut next = Vec::new();
                    f.found = f.look_in(&t, 0, &mut next);
                    f.level = next;
                }
            }
            structs_left == 0
        })?;
        // Then the anonymous structs and unions they hold, a level per pass.
        for _ in 0..MAX_NESTING {
            // (type id, field, bit offset of its start), sorted by id.
            let mut level: Vec<(u32, usize, u32)> = Vec::new();
            for (i, f) in fields.iter_mut().enumerate() {
                let pending = std::mem::take(&mut f.level);
                if f.found.is_none() {
                    level.extend(pending.into_iter().map(|(id, base)| (id, i, base)));
                }
            }
            if level.is_empty() {
                break;
            }
            level.sort_unstable();
            let mut next: Vec<Vec<(u32, u32)>> = vec![Vec::new(); fields.len()];
            self.walk(|t| {
                if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
                    return false;
                }
                // Every entry for this id (a union may be met at several offsets).
                let first = level.partition_point(|&(id, _, _)| id < t.id);
                for &(_, i, base) in level[first..].iter().take_while(|&&(id, _, _)| id == t.id) {
                    let f = &mut fields[i];
                    if f.found.is_none() {
                        f.found = f.look_in(&t, base, &mut next[i]);
                    }
                }
                false
            })?;
            for (f, next) in fields.iter_mut().zip(next) {
                f.level = next;
            }
        }
        Ok(fields
            .iter()
            .zip(wanted)
            .map(|(f, &(strukt, member))| match f.found {
                _ if !f.seen_struct => Err(BtfError::NoStruct(strukt.into())),
                Some(Ok(bits)) if bits % 8 == 0 => Ok(bits / 8),
                Some(_) => Err(BtfError::Bitfield {
                    strukt: strukt.into(),
                    member: member.into(),
                }),
                None => Err(BtfError::NoMember {
                    strukt: strukt.into(),
                    member: member.into(),
                }),
            })
            .collect())
    }
}

/// The search for one (struct, member) pair.
struct Field {
    /// Offsets of the struct's and the member's names in the string section.
    struct_names: Vec<u32>,
    member_names: Vec<u32>,
    seen_struct: bool,
    /// The member's bit offset, or `Err` for a bitfield.
    found: Option<Result<u32, ()>>,
    /// Anonymous structs and unions to look in next: (type id, bit offset).
    level: Vec<(u32, u32)>,
    /// Anonymous members followed so far (at most [`MAX_ANONYMOUS`]).
    anonymous: usize,
}

impl Field {
    /// Looks for the member among `t`'s members (`t` starting `base` bits into
    /// the struct); queues its anonymous members in `next`.
    fn look_in(
        &mut self,
        t: &TypeRef<'_>,
        base: u32,
        next: &mut Vec<(u32, u32)>,
    ) -> Option<Result<u32, ()>> {
        for m in t.members.chunks_exact(MEMBER).take(t.vlen) {
            let (name, ty, offset) = (
                u32_at(m, 0).unwrap_or(0),
                u32_at(m, 4).unwrap_or(0),
                u32_at(m, 8).unwrap_or(0),
            );
            let (bits, bitfield) = if t.kind_flag {
                (offset & 0xff_ffff, offset >> 24 != 0)
            } else {
                (offset, false)
            };
            let bits = base.saturating_add(bits);
            if self.member_names.contains(&name) {
                return Some(if bitfield { Err(()) } else { Ok(bits) });
            }
            if name == 0 && self.anonymous < MAX_ANONYMOUS {
                self.anonymous += 1;
                next.push((ty, bits));
            }
        }
        None
    }
}

/// A section read front to back through one buffer that holds at least the bytes
/// asked for next.
struct Window<'s, S: Source + ?Sized> {
    src: &'s S,
    /// Absolute offset and length of the section.
    section: (u64, u64),
    buf: Vec<u8>,
    /// Next unread byte in `buf`.
    pos: usize,
    /// Bytes of the section before `buf[0]`, and read from it so far.
    base: u64,
    read: u64,
}

impl<S: Source + ?Sized> Window<'_, S> {
    /// The next `n` bytes of the section; reads on (in [`CHUNK`]s, or `n` if larger)
    /// when `buf` holds fewer.
    fn take(&mut self, n: usize) -> Result<&[u8], BtfError> {
        let (start, len) = self.section;
        if self.buf.len() - self.pos < n {
            if self.read == len {
                return Err(BtfError::Malformed("type past the section"));
            }
            // Keep what is left unread, read the next chunk after it.
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
            let want = (len - self.read).min(CHUNK.max(n) as u64) as usize;
            let old = self.buf.len();
            self.buf.resize(old + want, 0);
            let got = self.src.read_at(&mut self.buf[old..], start + self.read)?;
            if got < want {
                return Err(BtfError::Malformed("type section past the end"));
            }
            self.read += got as u64;
            if self.buf.len() < n {
                return Err(BtfError::Malformed("type past the section"));
            }
        }
        let taken = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(taken)
    }
}

/// Bytes that follow a type's 12-byte header, by kind; `None` for an unknown kind.
fn trailing_bytes(info: u32) -> Option<usize> {
    let kind = (info >> 24) & 0x1f;
    let vlen = (info & 0xffff) as usize;
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        1..=KIND_MAX => 0,
        _ => return None,
    })
}

/// [`Btf::member_offsets`] of each `(struct, member)` in `wanted`, from the BTF at
/// `path` (the kernel's: [`VMLINUX_BTF`]).
pub fn kernel_member_offsets(
    path: &Path,
    wanted: &[(&str, &str)],
) -> Result<Vec<Result<u32, BtfError>>, BtfError> {
    let file = File::open(path)?;
    Btf::open(&file)?.member_offsets(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with the given types (each: kind, name, vlen, kind_flag, extra
    /// words) and strings.
    fn blob(types: &[(u32, u32, u32, bool, Vec<u32>)], strings: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        for (kind, name, vlen, flag, extra) in types {
            let info = (u32::from(*flag) << 31) | (kind << 24) | vlen;
            for w in [*name, info, 0].iter().chain(extra) {
                t.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&t);
        out.extend_from_slice(strings);
        out
    }

    // Strings: 0 "", 1 "task", 6 "pid", 10 "flags", 16 "tgid".
    const STRINGS: &[u8] = b"\0task\0pid\0flags\0tgid\0";

    /// A member is found directly, and inside an anonymous union (its offset added
    /// to the union's); a bitfield or a missing member is an error, not a guess.
    #[test]
    fn finds_members_directly_and_in_anonymous_unions() {
        let data = task_blob();
        let btf = Btf::open(data.as_slice()).unwrap();
        assert_eq!(btf.member_offset("task", "pid").unwrap(), 8);
        assert_eq!(btf.member_offset("task", "tgid").unwrap(), 16);
        assert!(matches!(
            btf.member_offset("task", "flags"),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            btf.member_offset("task", "comm"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("mm", "pid"),
            Err(BtfError::NoStruct(_))
        ));
    }

    /// `struct task { int pid @ 64 bits; union { int tgid } @ 128; flags: a
    /// bitfield }`.
    fn task_blob() -> Vec<u8> {
        blob(
            &[
                // 1: int
                (KIND_INT, 0, 0, false, vec![32]),
                // 2: union { int tgid @ 0 } (anonymous)
                (KIND_UNION, 0, 1, false, vec![16, 1, 0]),
                // 3: struct task { int pid @ 64 bits; <anon union> @ 128; flags: bitfield }
                (
                    KIND_STRUCT,
                    1,
                    3,
                    true,
                    vec![6, 1, 64, 0, 2, 128, 10, 1, (3 << 24) | 192],
                ),
            ],
            STRINGS,
        )
    }

    /// Many fields at once give what each alone gives, in the order asked, one
    /// field's error leaving the others found.
    #[test]
    fn finds_many_members_at_once() {
        let data = task_blob();
        let btf = Btf::open(data.as_slice()).unwrap();
        let wanted = [
            ("task", "tgid"),
            ("mm", "pid"),
            ("task", "pid"),
            ("task", "comm"),
        ];
        let found = btf.member_offsets(&wanted).unwrap();
        assert_eq!(found.len(), 4);
        assert_eq!(found[0].as_ref().ok(), Some(&16));
        assert!(matches!(found[1], Err(BtfError::NoStruct(_))));
        assert_eq!(found[2].as_ref().ok(), Some(&8));
        assert!(matches!(found[3], Err(BtfError::NoMember { .. })));
    }

    /// A string longer than every name looked for, cut by a chunk's end, is
    /// skipped whole: its tail is not taken for a name.
    #[test]
    fn long_strings_across_chunks_are_not_names() {
        // "x...xpid" is cut right before its "pid" by the first chunk's end; "pid"
        // alone comes after it.
        let mut strings = vec![0u8];
        strings.extend(std::iter::repeat_n(b'x', CHUNK - 1));
        strings.extend_from_slice(b"pid\0task\0pid\0");
        let task = (strings.len() - 9) as u32;
        let pid = task + 5;
        let data = blob(
            &[
                (KIND_INT, 0, 0, false, vec![32]),
                (KIND_STRUCT, task, 1, false, vec![pid, 1, 32]),
            ],
            &strings,
        );
        let btf = Btf::open(data.as_slice()).unwrap();
        let names = btf.names_offsets(&["pid"]).unwrap();
        assert_eq!(names, vec![vec![pid]]);
        assert_eq!(btf.member_offset("task", "pid").unwrap(), 4);
    }

    fn lookup(data: &[u8]) -> Result<u32, BtfError> {
        Btf::open(data)?.member_offset("task", "pid")
    }

    /// Truncations and bad headers of a valid blob are errors, never panics.
    #[test]
    fn malformed_blobs_are_errors() {
        let data = blob(
            &[
                (KIND_INT, 0, 0, false, vec![32]),
                (KIND_STRUCT, 1, 1, false, vec![6, 1, 64]),
            ],
            STRINGS,
        );
        assert_eq!(lookup(&data).unwrap(), 8);
        for len in 0..data.len() {
            assert!(lookup(&data[..len]).is_err(), "{len}");
        }
        let mut bad_magic = data.clone();
        bad_magic[0] ^= 0xff;
        assert!(lookup(&bad_magic).is_err());
        let mut bad_kind = data.clone();
        bad_kind[24 + 7] = 0x1f; // kind 31 in the first type's info
        assert!(matches!(lookup(&bad_kind), Err(BtfError::Malformed(_))));
    }

    /// A struct's members split across reads, and a name split across reads of
    /// the string section, are found all the same.
    #[test]
    fn finds_across_chunk_boundaries() {
        // Enough ints before the struct that it starts near the end of a chunk.
        let filler = (CHUNK - 20) / 16;
        let mut types: Vec<(u32, u32, u32, bool, Vec<u32>)> =
            vec![(KIND_INT, 0, 0, false, vec![32]); filler];
        types.push((KIND_STRUCT, 0, 0, false, vec![])); // placeholder, named below
        let mut strings = vec![0u8; CHUNK - 3];
        let task = strings.len() as u32;
        strings.extend_from_slice(b"task\0pid\0");
        let pid = task + 5;
        *types.last_mut().unwrap() = (KIND_STRUCT, task, 2, false, vec![0, 1, 0, pid, 1, 96]);
        let data = blob(&types, &strings);
        assert_eq!(lookup(&data).unwrap(), 12);
    }

    /// On this kernel, task_struct's pid and tgid are found, tgid right after pid
    /// (two pid_t, as every kernel has declared them).
    #[test]
    fn task_struct_pid_on_this_kernel() {
        let path = Path::new(VMLINUX_BTF);
        let found = kernel_member_offsets(path, &[("task_struct", "pid"), ("task_struct", "tgid")])
            .unwrap();
        let (pid, tgid) = (*found[0].as_ref().unwrap(), *found[1].as_ref().unwrap());
        assert!(pid > 0 && pid < 16 << 10, "{pid}");
        assert_eq!(tgid, pid + 4);
    }
}
