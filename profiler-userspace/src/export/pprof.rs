//! pprof (profile.proto, gzipped), the format Google's pprof and most profiling
//! backends read.
//!
//! Sample types: `samples/count` and `cpu/nanoseconds`. Every sample carries labels
//! `pid` (numeric), `thread` (thread name) and `comm` (process name). Mappings are
//! one per binary with its build id; a location's address is its offset in that
//! binary (the kernel's: the kernel address). Functions and lines are filled in, so
//! pprof never needs to re-symbolize.

use std::{
    collections::HashMap,
    io::{self, Write as _},
    time::UNIX_EPOCH,
};

use flate2::{write::GzEncoder, Compression};
use prost::Message as _;

use crate::profile::Profile;

/// Types generated from profile.proto.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}

/// String table with index 0 = "" as the format requires.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Self {
        let mut s = Strings::default();
        s.get("");
        s
    }

    fn get(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// Builds the protobuf message.
pub fn build(profile: &Profile) -> proto::Profile {
    let (mut header, samples) = build_parts(profile);
    header.sample = samples.collect();
    header
}

/// Field number of `Profile.sample` in profile.proto.
const SAMPLE_FIELD: u32 = 2;

/// The message without its samples (the string table already holds every string
/// they use), and the samples one by one: written one after the other they are the
/// whole message (a repeated field may come in any number of pieces), so a profile
/// at its bound (1 Mi frames) is never held as a message or as bytes.
fn build_parts(profile: &Profile) -> (proto::Profile, impl Iterator<Item = proto::Sample> + '_) {
    let mut strings = Strings::new();
    let value_type = |strings: &mut Strings, t: &str, u: &str| proto::ValueType {
        r#type: strings.get(t),
        unit: strings.get(u),
    };
    let sample_type = vec![
        value_type(&mut strings, "samples", "count"),
        value_type(&mut strings, "cpu", "nanoseconds"),
    ];
    let period_type = Some(value_type(&mut strings, "cpu", "nanoseconds"));
    let period = profile.period_ns() as i64;

    let mapping = profile
        .objects
        .iter()
        .enumerate()
        .map(|(i, o)| proto::Mapping {
            id: i as u64 + 1,
            memory_start: 0,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename: strings.get(&o.path),
            build_id: strings.get(&o.build_id.as_deref().map(hex).unwrap_or_default()),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        })
        .collect();

    let mut functions: Vec<proto::Function> = Vec::new();
    let mut function_ids: HashMap<(i64, i64), u64> = HashMap::new();
    let mut location = Vec::with_capacity(profile.locations.len());
    for (i, loc) in profile.locations.iter().enumerate() {
        let line = loc
            .lines
            .iter()
            .map(|l| {
                let name = match loc.kind.suffix() {
                    "" => strings.get(&l.function),
                    suffix => strings.get(&format!("{}{suffix}", l.function)),
                };
                let file = strings.get(l.file.as_deref().unwrap_or(""));
                let id = *function_ids.entry((name, file)).or_insert_with(|| {
                    functions.push(proto::Function {
                        id: functions.len() as u64 + 1,
                        name,
                        system_name: name,
                        filename: file,
                        start_line: 0,
                    });
                    functions.len() as u64
                });
                proto::Line {
                    function_id: id,
                    line: i64::from(l.line),
                }
            })
            .collect();
        location.push(proto::Location {
            id: i as u64 + 1,
            mapping_id: loc.object.map_or(0, |o| o as u64 + 1),
            address: loc.address,
            line,
            is_folded: false,
        });
    }

    let (pid_key, thread_key, comm_key) = (
        strings.get("pid"),
        strings.get("thread"),
        strings.get("comm"),
    );
    for stack in &profile.stacks {
        strings.get(&stack.thread);
        strings.get(&stack.process);
    }
    let Strings {
        table: string_table,
        index: strings,
    } = strings;
    let sample = profile.stacks.iter().map(move |s| proto::Sample {
        location_id: s.locations.iter().map(|&l| l as u64 + 1).collect(),
        value: vec![s.count as i64, s.count as i64 * period],
        label: vec![
            proto::Label {
                key: pid_key,
                num: i64::from(s.pid),
                ..Default::default()
            },
            proto::Label {
                key: thread_key,
                str: strings[&*s.thread],
                ..Default::default()
            },
            proto::Label {
                key: comm_key,
                str: strings[&*s.process],
                ..Default::default()
            },
        ],
    });

    let time_nanos = profile
        .start
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    let header = proto::Profile {
        sample_type,
        sample: vec![],
        mapping,
        location,
        function: functions,
        string_table,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos,
        duration_nanos: profile.duration.as_nanos() as i64,
        period_type,
        period,
        comment: vec![],
        default_sample_type: 0,
    };
    (header, sample)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the gzipped protobuf.
pub fn write_gzipped(profile: &Profile, w: &mut impl io::Write) -> io::Result<()> {
    let mut gz = GzEncoder::new(w, Compression::default());
    let (header, samples) = build_parts(profile);
    gz.write_all(&header.encode_to_vec())?;
    drop(header);
    let mut buf = Vec::new();
    for sample in samples {
        buf.clear();
        prost::encoding::message::encode(SAMPLE_FIELD, &sample, &mut buf);
        gz.write_all(&buf)?;
    }
    gz.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    /// Every id a sample, location or function refers to exists, string 0 is "",
    /// and sample values are count and count x period.
    #[test]
    fn references_resolve() {
        let profile = test_profile();
        let p = build(&profile);
        assert_eq!(p.string_table[0], "");
        for s in &p.sample {
            assert_eq!(s.value[1], s.value[0] * p.period);
            for id in &s.location_id {
                let loc = &p.location[*id as usize - 1];
                assert_eq!(loc.id, *id);
                assert!(loc.mapping_id == 0 || (loc.mapping_id as usize) <= p.mapping.len());
                for line in &loc.line {
                    assert_eq!(
                        p.function[line.function_id as usize - 1].id,
                        line.function_id
                    );
                }
            }
        }
        let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total as u64, profile.samples());
    }

    /// The gzipped bytes decode back to the same message.
    #[test]
    fn gzip_round_trip() {
        let profile = test_profile();
        let mut out = Vec::new();
        write_gzipped(&profile, &mut out).unwrap();
        let mut raw = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&out[..]), &mut raw).unwrap();
        assert_eq!(proto::Profile::decode(&raw[..]).unwrap(), build(&profile));
    }
}
