//! Kernel type information for the eBPF loader: where a field sits in a kernel
//! struct, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The fork tracker (see [`crate::lineage`]) reads the new task's pid from its
//! `task_struct`, whose layout differs between kernels and builds; aya 0.14 cannot
//! relocate field accesses in a Rust eBPF program (no CO-RE), so userspace finds
//! the offset here and hands it to the program as a global at load time.
//!
//! Only what that needs is parsed: the header, the type section (walked to index
//! types by id), member lists and names. Malformed input is an error, never a
//! panic or an out-of-bounds read (fuzzed: `fuzz/fuzz_targets/btf.rs`).

use std::path::Path;

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Largest BTF file read: vmlinux BTF is ~5-6 MiB; read once at start and dropped.
pub const MAX_BTF_BYTES: u64 = 64 << 20;

const MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
const TYPE_HEADER: usize = 12;

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

/// Anonymous structs and unions followed to find a member.
const MAX_NESTING: usize = 8;
/// Members looked at in one lookup, so a crafted blob (anonymous members that
/// point back at their own struct) cannot make it take forever.
const MAX_MEMBERS_VISITED: u32 = 1 << 20;

/// Why a field offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_BTF_BYTES} bytes")]
    TooLarge { path: String },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{strukt}.{member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

/// Parsed BTF: the raw type and string sections and where each type starts.
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// Byte offset in `types` of type id `i + 1` (id 0 is void).
    starts: Vec<usize>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob (the only byte order of the hosts we run on).
    pub fn parse(data: &'a [u8]) -> Result<Btf<'a>, BtfError> {
        let bad = BtfError::Malformed;
        if data.len() < HEADER_MIN {
            return Err(bad("shorter than its header"));
        }
        if u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(bad("bad magic (or big-endian)"));
        }
        let field = |i: usize| u32_at(data, 4 + 4 * i).map(|v| v as usize);
        let (hdr_len, type_off, type_len, str_off, str_len) =
            match (field(0), field(1), field(2), field(3), field(4)) {
                (Some(a), Some(b), Some(c), Some(d), Some(e)) => (a, b, c, d, e),
                _ => return Err(bad("truncated header")),
            };
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            data.get(start..start.checked_add(len)?)
        };
        let types = section(type_off, type_len).ok_or(bad("type section out of bounds"))?;
        let strings = section(str_off, str_len).ok_or(bad("string section out of bounds"))?;
        let mut starts = Vec::new();
        let mut at = 0;
        while at < types.len() {
            let info = u32_at(types, at + 4).ok_or(bad("truncated type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                1..=KIND_MAX => 0,
                _ => return Err(bad("unknown type kind")),
            };
            starts.push(at);
            at = at
                .checked_add(TYPE_HEADER + extra)
                .ok_or(bad("type past the section"))?;
        }
        if at != types.len() {
            return Err(bad("type past the section"));
        }
        Ok(Btf {
            types,
            strings,
            starts,
        })
    }

    fn name(&self, offset: u32) -> Option<&'a [u8]> {
        let rest = self.strings.get(offset as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(&rest[..end])
    }

    /// (name offset, kind, vlen, kind_flag, start) of type `id`.
    fn header(&self, id: u32) -> Option<(u32, u32, usize, bool, usize)> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)?;
        let name = u32_at(self.types, at)?;
        let info = u32_at(self.types, at + 4)?;
        Some((
            name,
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
            at,
        ))
    }

    /// Byte offset of `member` in struct `strukt`, looking inside anonymous
    /// structs and unions (where kernels keep many fields).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = (1..=self.starts.len() as u32)
            .find(|&id| {
                self.header(id).is_some_and(|(name, kind, vlen, _, _)| {
                    kind == KIND_STRUCT && vlen > 0 && self.name(name) == Some(strukt.as_bytes())
                })
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut budget = MAX_MEMBERS_VISITED;
        match self.find_member(id, member.as_bytes(), 0, &mut budget) {
            Some(Ok(bits)) if bits % 8 == 0 => Ok(bits / 8),
            Some(_) => Err(BtfError::Bitfield {
                strukt: strukt.into(),
                member: member.into(),
            }),
            None => Err(BtfError::NoMember {
                strukt: strukt.into(),
                member: member.into(),
            }),
        }
    }

    /// Bit offset of `member` in struct/union `id`: `Some(Err)` for a bitfield.
    fn find_member(
        &self,
        id: u32,
        member: &[u8],
        depth: usize,
        budget: &mut u32,
    ) -> Option<Result<u32, ()>> {
        let (_, kind, vlen, kind_flag, at) = self.header(id)?;
        if !matches!(kind, KIND_STRUCT | KIND_UNION) || depth > MAX_NESTING {
            return None;
        }
        for i in 0..vlen {
            *budget = budget.checked_sub(1)?;
            let m = at + TYPE_HEADER + 12 * i;
            let (name, ty, offset) = (
                u32_at(self.types, m)?,
                u32_at(self.types, m + 4)?,
                u32_at(self.types, m + 8)?,
            );
            let (bits, bitfield) = if kind_flag {
                (offset & 0xff_ffff, offset >> 24 != 0)
            } else {
                (offset, false)
            };
            let name = self.name(name)?;
            if name == member {
                return Some(if bitfield { Err(()) } else { Ok(bits) });
            }
            if name.is_empty() {
                if let Some(found) = self.find_member(ty, member, depth + 1, budget) {
                    return Some(found.map(|inner| bits.saturating_add(inner)));
                }
            }
        }
        None
    }
}

/// Byte offset of `member` in kernel struct `strukt`, from the BTF at `path`.
pub fn kernel_member_offset(path: &Path, strukt: &str, member: &str) -> Result<u32, BtfError> {
    let read = |source| BtfError::Read {
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > MAX_BTF_BYTES {
        return Err(BtfError::TooLarge {
            path: path.display().to_string(),
        });
    }
    let data = std::fs::read(path).map_err(read)?;
    Btf::parse(&data)?.member_offset(strukt, member)
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
        let data = blob(
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
        );
        let btf = Btf::parse(&data).unwrap();
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

    /// Truncations and bad headers of a valid blob are errors, never panics.
    #[test]
    fn malformed_blobs_are_errors() {
        let data = blob(&[(KIND_INT, 0, 0, false, vec![32])], STRINGS);
        for len in 0..data.len() {
            let _ = Btf::parse(&data[..len]);
        }
        let mut bad_magic = data.clone();
        bad_magic[0] ^= 0xff;
        assert!(Btf::parse(&bad_magic).is_err());
        let mut bad_kind = data.clone();
        bad_kind[24 + 7] = 0x1f; // kind 31 in the first type's info
        assert!(Btf::parse(&bad_kind).is_err());
    }

    /// On this kernel, task_struct's pid and tgid are found, tgid right after pid
    /// (two pid_t, as every kernel has declared them).
    #[test]
    fn task_struct_pid_on_this_kernel() {
        let path = Path::new(VMLINUX_BTF);
        let pid = kernel_member_offset(path, "task_struct", "pid").unwrap();
        let tgid = kernel_member_offset(path, "task_struct", "tgid").unwrap();
        assert!(pid > 0 && pid < 16 << 10, "{pid}");
        assert_eq!(tgid, pid + 4);
    }
}
