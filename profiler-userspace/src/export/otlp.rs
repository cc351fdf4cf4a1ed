//! OpenTelemetry profiles (OTLP, `v1development`): a [`Profile`] becomes one or more
//! `ExportProfilesServiceRequest`s, each at most a size limit when encoded.
//!
//! Layout: one `ResourceProfiles` per process, whose resource carries `host.name`
//! and the user's host-wide attributes ([`HostInfo`]), then `process.pid`,
//! `process.executable.name`, `process.executable.path` and `container.id` (when
//! known); one `Profile` in it with sample type `samples/count`
//! and period `cpu/nanoseconds`. Samples carry `thread.name`; locations carry
//! `profile.frame.type` (`kernel`, `native`, `jvm`, `v8js`, `cpython`, `ruby`,
//! `php`); mappings carry
//! `process.executable.build_id.gnu`. Each request has its own dictionary, and every
//! dictionary table starts with its zero value, as the format requires.

use std::{collections::HashMap, hash::BuildHasher};

use hashbrown::{DefaultHashBuilder, HashTable};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    profiles::v1development as otlp,
    resource::v1::Resource,
};
use prost::Message as _;

use crate::profile::{Profile, Stack};

/// The instrumentation scope our profiles are reported under.
pub const SCOPE_NAME: &str = "profiler";

/// What is the same for every profile of this host.
#[derive(Clone, Debug)]
pub struct HostInfo {
    /// Resource attributes of every process: `host.name` and the user's
    /// (config::agent::resource_attributes), none of them per-process keys.
    pub attributes: Vec<(String, String)>,
}

/// Builds requests of at most `max_bytes` each (encoded) from `profile`, handing
/// each to `each` (with its encoded size) as soon as it is measured, so a caller
/// that keeps only the bytes never holds more than one request as a message.
/// Returns the stacks left out because even alone they exceed the size limit.
pub fn encode(
    profile: &Profile,
    host: &HostInfo,
    max_bytes: usize,
    mut each: impl FnMut(ExportProfilesServiceRequest, usize),
) -> u64 {
    // Stacks grouped by process, in pid order.
    let mut by_pid: Vec<(u32, Vec<&Stack>)> = Vec::new();
    {
        let mut index: HashMap<u32, usize> = HashMap::new();
        for stack in &profile.stacks {
            let i = *index.entry(stack.pid).or_insert_with(|| {
                by_pid.push((stack.pid, Vec::new()));
                by_pid.len() - 1
            });
            by_pid[i].1.push(stack);
        }
        by_pid.sort_by_key(|(pid, _)| *pid);
    }
    let mut oversized_stacks = 0;
    // Every part, and its size when encoded alone (at most `max_bytes`).
    let mut parts: Vec<(u32, Vec<&Stack>)> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    for (pid, stacks) in by_pid {
        for (part, size) in fit(
            profile,
            host,
            (pid, stacks),
            max_bytes,
            &mut oversized_stacks,
        ) {
            parts.push(part);
            sizes.push(size);
        }
    }
    // In one request parts share a dictionary, so a request is not the sum of its
    // parts: smaller when they share code, larger when they do not, as indices into a
    // bigger dictionary take longer varints. A request is filled on an estimate (the
    // sizes of its parts scaled by the last measured ratio of request to parts), then
    // measured; one over the limit keeps the parts the measured ratio says fit and
    // leaves the rest to the next request. Only measured requests are sent.
    let mut ratio = 1.0;
    let mut start = 0;
    while start < parts.len() {
        let mut end = start + prefix(&sizes[start..], ratio, max_bytes);
        let mut retries = 0;
        loop {
            let request = build(profile, host, &parts[start..end]);
            let len = request.encoded_len();
            ratio = len as f64 / sizes[start..end].iter().sum::<usize>() as f64;
            if len <= max_bytes {
                each(request, len);
                break;
            }
            if end - start == 1 {
                // Not reached: fit measured this part alone within the limit. Were it
                // over, it would be counted, never sent oversized.
                oversized_stacks += parts[start].1.len() as u64;
                break;
            }
            // At least one part fewer, and half as many from the second retry on, so
            // a batch is built at most a logarithmic number of times.
            retries += 1;
            let most = if retries == 1 {
                end - start - 1
            } else {
                (end - start) / 2
            };
            end = start + prefix(&sizes[start..start + most], ratio, max_bytes);
        }
        start = end;
    }
    oversized_stacks
}

/// How many of the leading parts of `sizes` (at least one) fit in `max_bytes`, their
/// sum scaled by `ratio`.
fn prefix(sizes: &[usize], ratio: f64, max_bytes: usize) -> usize {
    let mut sum = 0;
    let mut n = 0;
    for &size in sizes {
        sum += size;
        if n > 0 && sum as f64 * ratio > max_bytes as f64 {
            break;
        }
        n += 1;
    }
    n
}

/// Splits one process's stacks into parts that each encode within `max_bytes`, each
/// with its encoded size.
fn fit<'a>(
    profile: &Profile,
    host: &HostInfo,
    part: (u32, Vec<&'a Stack>),
    max_bytes: usize,
    oversized: &mut u64,
) -> Vec<((u32, Vec<&'a Stack>), usize)> {
    let size = build(profile, host, std::slice::from_ref(&part)).encoded_len();
    if size <= max_bytes {
        return vec![(part, size)];
    }
    let (pid, mut stacks) = part;
    if stacks.len() == 1 {
        *oversized += 1;
        return vec![];
    }
    let second = stacks.split_off(stacks.len() / 2);
    let mut parts = fit(profile, host, (pid, stacks), max_bytes, oversized);
    parts.extend(fit(profile, host, (pid, second), max_bytes, oversized));
    parts
}

/// Interning tables of one request's dictionary.
struct Dictionary {
    dict: otlp::ProfilesDictionary,
    strings: HashMap<String, i32>,
    attributes: HashMap<(i32, String), i32>,
    mappings: HashMap<usize, i32>,
    functions: HashMap<(i32, i32), i32>,
    locations: HashMap<usize, i32>,
    /// Indices into `dict.stack_table`, found by its content: a stack's location
    /// indices are stored once, in the table (4 bytes a frame; a map keyed by a
    /// copy of them doubled a request's largest table).
    stacks: HashTable<i32>,
    hasher: DefaultHashBuilder,
}

impl Dictionary {
    fn new() -> Self {
        let mut d = Dictionary {
            dict: otlp::ProfilesDictionary::default(),
            strings: HashMap::new(),
            attributes: HashMap::new(),
            mappings: HashMap::new(),
            functions: HashMap::new(),
            locations: HashMap::new(),
            stacks: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
        };
        // Index 0 of every table is the zero value.
        d.string("");
        d.dict.mapping_table.push(Default::default());
        d.dict.location_table.push(Default::default());
        d.dict.function_table.push(Default::default());
        d.dict.link_table.push(Default::default());
        d.dict.attribute_table.push(Default::default());
        d.dict.stack_table.push(Default::default());
        d
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.dict.string_table.len() as i32;
        self.dict.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn attribute(&mut self, key: &str, value: &str) -> i32 {
        let key_strindex = self.string(key);
        if let Some(&i) = self.attributes.get(&(key_strindex, value.to_string())) {
            return i;
        }
        let i = self.dict.attribute_table.len() as i32;
        self.dict.attribute_table.push(otlp::KeyValueAndUnit {
            key_strindex,
            value: Some(string_value(value)),
            unit_strindex: 0,
        });
        self.attributes.insert((key_strindex, value.to_string()), i);
        i
    }

    fn mapping(&mut self, profile: &Profile, object: usize) -> i32 {
        if let Some(&i) = self.mappings.get(&object) {
            return i;
        }
        let o = &profile.objects[object];
        let filename_strindex = self.string(&o.path);
        let attribute_indices = match &o.build_id {
            Some(id) => vec![self.attribute("process.executable.build_id.gnu", &hex(id))],
            None => vec![],
        };
        let i = self.dict.mapping_table.len() as i32;
        // Locations carry file offsets (as in pprof.rs): the mapping spans every
        // address, from file offset 0, so that each location's address is within it.
        self.dict.mapping_table.push(otlp::Mapping {
            memory_start: 0,
            memory_limit: u64::MAX,
            file_offset: 0,
            filename_strindex,
            attribute_indices,
        });
        self.mappings.insert(object, i);
        i
    }

    fn location(&mut self, profile: &Profile, location: usize) -> i32 {
        if let Some(&i) = self.locations.get(&location) {
            return i;
        }
        let loc = &profile.locations[location];
        let mapping_index = loc.object.map_or(0, |o| self.mapping(profile, o));
        let lines = loc
            .lines
            .iter()
            .map(|line| {
                let name = self.string(&line.function);
                let file = self.string(line.file.as_deref().unwrap_or(""));
                let function_index = match self.functions.get(&(name, file)) {
                    Some(&i) => i,
                    None => {
                        let i = self.dict.function_table.len() as i32;
                        self.dict.function_table.push(otlp::Function {
                            name_strindex: name,
                            system_name_strindex: name,
                            filename_strindex: file,
                            start_line: 0,
                        });
                        self.functions.insert((name, file), i);
                        i
                    }
                };
                otlp::Line {
                    function_index,
                    line: i64::from(line.line),
                    column: 0,
                }
            })
            .collect();
        let attribute_indices = vec![self.attribute("profile.frame.type", loc.kind.otel_type())];
        let i = self.dict.location_table.len() as i32;
        self.dict.location_table.push(otlp::Location {
            mapping_index,
            address: loc.address,
            lines,
            attribute_indices,
        });
        self.locations.insert(location, i);
        i
    }

    fn stack(&mut self, profile: &Profile, stack: &Stack) -> i32 {
        let location_indices: Vec<i32> = stack
            .locations
            .iter()
            .map(|&l| self.location(profile, l as usize))
            .collect();
        let hash = |indices: &[i32]| self.hasher.hash_one(indices);
        let table = &self.dict.stack_table;
        let key = hash(&location_indices);
        if let Some(&i) = self.stacks.find(key, |&i| {
            table[i as usize].location_indices == location_indices
        }) {
            return i;
        }
        let i = table.len() as i32;
        self.stacks
            .insert_unique(key, i, |&j| hash(&table[j as usize].location_indices));
        self.dict.stack_table.push(otlp::Stack { location_indices });
        i
    }
}

fn string_value(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

fn key_value(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        key_strindex: 0,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One request with its own dictionary for the given (process, stacks) parts.
fn build(
    profile: &Profile,
    host: &HostInfo,
    parts: &[(u32, Vec<&Stack>)],
) -> ExportProfilesServiceRequest {
    use any_value::Value;
    let mut d = Dictionary::new();
    let time_unix_nano = profile
        .start
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64);
    let mut resource_profiles = Vec::with_capacity(parts.len());
    for (pid, stacks) in parts {
        let meta = profile.processes.get(pid);
        let mut attributes: Vec<KeyValue> = host
            .attributes
            .iter()
            .map(|(k, v)| key_value(k, Value::StringValue(v.clone())))
            .collect();
        attributes.push(key_value("process.pid", Value::IntValue(i64::from(*pid))));
        // The executable's base name, as the semantic conventions say; the process
        // name (comm) when the executable is unknown (kernel threads, processes
        // gone before capture).
        let exe = meta.and_then(|m| m.exe.as_deref());
        let name = exe
            .and_then(|path| {
                path.strip_suffix(" (deleted)")
                    .unwrap_or(path)
                    .rsplit('/')
                    .next()
            })
            .filter(|base| !base.is_empty())
            .map(str::to_string)
            .or_else(|| meta.map(|m| m.name.to_string()))
            .or_else(|| stacks.first().map(|s| s.process.to_string()));
        if let Some(name) = name {
            attributes.push(key_value(
                "process.executable.name",
                Value::StringValue(name),
            ));
        }
        if let Some(exe) = exe {
            attributes.push(key_value(
                "process.executable.path",
                Value::StringValue(exe.to_string()),
            ));
        }
        if let Some(id) = meta.and_then(|m| m.container_id.as_deref()) {
            attributes.push(key_value(
                "container.id",
                Value::StringValue(id.to_string()),
            ));
        }
        let samples = stacks
            .iter()
            .map(|s| otlp::Sample {
                stack_index: d.stack(profile, s),
                attribute_indices: vec![d.attribute("thread.name", &s.thread)],
                link_index: 0,
                values: vec![s.count as i64],
                timestamps_unix_nano: vec![],
            })
            .collect();
        let samples_strindex = d.string("samples");
        let count_strindex = d.string("count");
        let cpu_strindex = d.string("cpu");
        let ns_strindex = d.string("nanoseconds");
        resource_profiles.push(otlp::ResourceProfiles {
            resource: Some(Resource {
                attributes,
                dropped_attributes_count: 0,
                entity_refs: vec![],
            }),
            scope_profiles: vec![otlp::ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: SCOPE_NAME.to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    attributes: vec![],
                    dropped_attributes_count: 0,
                }),
                profiles: vec![otlp::Profile {
                    sample_type: Some(otlp::ValueType {
                        type_strindex: samples_strindex,
                        unit_strindex: count_strindex,
                    }),
                    samples,
                    time_unix_nano,
                    duration_nano: profile.duration.as_nanos() as u64,
                    period_type: Some(otlp::ValueType {
                        type_strindex: cpu_strindex,
                        unit_strindex: ns_strindex,
                    }),
                    period: profile.period_ns() as i64,
                    profile_id: vec![],
                    dropped_attributes_count: 0,
                    original_payload_format: String::new(),
                    original_payload: vec![],
                    attribute_indices: vec![],
                }],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        });
    }
    ExportProfilesServiceRequest {
        resource_profiles,
        dictionary: Some(d.dict),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    /// Requests for one profile, and what did not fit.
    #[derive(Debug, Default)]
    struct Encoded {
        requests: Vec<ExportProfilesServiceRequest>,
        /// Encoded size of each request.
        sizes: Vec<usize>,
        oversized_stacks: u64,
    }

    /// Every request [`encode`] builds, kept.
    fn encode_all(profile: &Profile, host: &HostInfo, max_bytes: usize) -> Encoded {
        let mut out = Encoded::default();
        out.oversized_stacks = encode(profile, host, max_bytes, |request, size| {
            out.requests.push(request);
            out.sizes.push(size);
        });
        out
    }

    fn host() -> HostInfo {
        HostInfo {
            attributes: vec![("host.name".into(), "test-host".into())],
        }
    }

    /// Every table starts with its zero value and every index used resolves.
    #[test]
    fn dictionary_is_consistent() {
        let profile = test_profile();
        let enc = encode_all(&profile, &host(), 4 << 20);
        assert_eq!(enc.requests.len(), 1);
        let req = &enc.requests[0];
        let d = req.dictionary.as_ref().unwrap();
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], Default::default());
        assert_eq!(d.location_table[0], Default::default());
        assert_eq!(d.function_table[0], Default::default());
        assert_eq!(d.stack_table[0], Default::default());
        assert_eq!(d.attribute_table[0], Default::default());
        let mut total = 0;
        for rp in &req.resource_profiles {
            for p in &rp.scope_profiles[0].profiles {
                for s in &p.samples {
                    total += s.values[0];
                    let stack = &d.stack_table[s.stack_index as usize];
                    assert!(!stack.location_indices.is_empty());
                    for &l in &stack.location_indices {
                        let loc = &d.location_table[l as usize];
                        assert!((loc.mapping_index as usize) < d.mapping_table.len());
                        for line in &loc.lines {
                            let f = &d.function_table[line.function_index as usize];
                            assert!((f.name_strindex as usize) < d.string_table.len());
                        }
                    }
                    for &a in &s.attribute_indices {
                        let kv = &d.attribute_table[a as usize];
                        assert_eq!(d.string_table[kv.key_strindex as usize], "thread.name");
                    }
                }
            }
        }
        assert_eq!(total as u64, profile.samples());
    }

    /// A small size limit splits the profile into several requests, each within the
    /// limit, without losing a sample.
    #[test]
    fn splits_to_size() {
        let mut profile = test_profile();
        // Many processes, each with the two stacks.
        let stacks = profile.stacks.clone();
        for pid in 0..50 {
            for s in &stacks {
                let mut s = s.clone();
                s.pid = 1000 + pid;
                profile.stacks.push(s);
            }
        }
        let whole = encode_all(&profile, &host(), usize::MAX);
        assert_eq!(whole.requests.len(), 1);
        let limit = whole.sizes[0] / 5;
        let split = encode_all(&profile, &host(), limit);
        assert!(
            split.requests.len() >= 5,
            "{} requests",
            split.requests.len()
        );
        assert!(
            split.sizes.iter().all(|&s| s <= limit),
            "{:?} > {limit}",
            split.sizes
        );
        let count = |e: &Encoded| -> i64 {
            e.requests
                .iter()
                .flat_map(|r| &r.resource_profiles)
                .flat_map(|rp| &rp.scope_profiles[0].profiles[0].samples)
                .map(|s| s.values[0])
                .sum()
        };
        assert_eq!(count(&split), count(&whole));
        assert_eq!(split.oversized_stacks, 0);
    }

    /// `processes` processes sharing no code: each has its own binary and
    /// `locations` locations, each in a function of its own, in stacks of five.
    fn unshared_profile(processes: u32, locations: usize) -> Profile {
        use crate::profile::{FrameKind, Line, Location, Object};
        let mut profile = test_profile();
        profile.stacks.clear();
        profile.processes.clear();
        for pid in 1..=processes {
            let object = profile.objects.len();
            profile.objects.push(Object {
                path: format!("/opt/app{pid}/bin/app{pid}").into(),
                build_id: Some(pid.to_be_bytes().into()),
            });
            let first = profile.locations.len();
            for l in 0..locations {
                profile.locations.push(Location {
                    address: 0x1000 + 16 * l as u64,
                    object: Some(object),
                    kind: FrameKind::Native,
                    lines: std::sync::Arc::new([Line {
                        function: format!("app{pid}::module::function_{l}").into(),
                        file: Some(format!("src/app{pid}.rs").into()),
                        line: l as u32,
                    }]),
                });
            }
            for (i, chunk) in (first..first + locations)
                .collect::<Vec<_>>()
                .chunks(5)
                .enumerate()
            {
                profile.stacks.push(Stack {
                    pid,
                    process: format!("app{pid}").into(),
                    thread: format!("worker-{}", i % 4).into(),
                    locations: chunk.iter().map(|&l| l as u32).collect(),
                    count: 1 + (pid as u64 + i as u64) % 7,
                });
            }
        }
        profile
    }

    /// Processes that share no code make a request bigger than the sum of its
    /// processes encoded alone (indices into the shared dictionary cross varint
    /// sizes); every request is still within the limit, and every sample is sent once.
    #[test]
    fn unshared_code_stays_within_limit() {
        // 60,000 locations, functions and strings in all, some 20,000 a request.
        let profile = unshared_profile(600, 100);
        let whole = encode_all(&profile, &host(), usize::MAX);
        let limit = whole.sizes[0] / 3;
        let split = encode_all(&profile, &host(), limit);
        assert!(split.requests.len() >= 3, "{:?}", split.sizes);
        for (request, &size) in split.requests.iter().zip(&split.sizes) {
            assert_eq!(request.encoded_len(), size);
        }
        assert!(
            split.sizes.iter().all(|&s| s <= limit),
            "{:?} > {limit}",
            split.sizes
        );
        assert_eq!(split.oversized_stacks, 0);
        let mut sent: HashMap<i64, i64> = HashMap::new();
        for rp in split.requests.iter().flat_map(|r| &r.resource_profiles) {
            let pid = rp
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .find_map(|kv| match (kv.key.as_str(), &kv.value.as_ref()?.value) {
                    ("process.pid", Some(any_value::Value::IntValue(pid))) => Some(*pid),
                    _ => None,
                })
                .unwrap();
            let samples = &rp.scope_profiles[0].profiles[0].samples;
            *sent.entry(pid).or_default() += samples.iter().map(|s| s.values[0]).sum::<i64>();
        }
        let mut expected: HashMap<i64, i64> = HashMap::new();
        for s in &profile.stacks {
            *expected.entry(i64::from(s.pid)).or_default() += s.count as i64;
        }
        assert_eq!(sent, expected);
    }

    /// A stack that cannot fit even alone is counted, not sent oversized.
    #[test]
    fn oversized_stack_is_counted() {
        let profile = test_profile();
        let enc = encode_all(&profile, &host(), 10);
        assert!(enc.requests.is_empty());
        assert_eq!(enc.oversized_stacks, profile.stacks.len() as u64);
    }

    /// The host's attributes, user-given ones included, are on every process's
    /// resource, before its own, and no key appears twice.
    #[test]
    fn host_attributes_on_every_resource() {
        let mut profile = test_profile();
        let mut other = profile.stacks[0].clone();
        other.pid += 1;
        profile.stacks.push(other);
        let host = HostInfo {
            attributes: vec![
                ("host.name".into(), "node-7".into()),
                ("service.name".into(), "checkout".into()),
            ],
        };
        let req = &encode_all(&profile, &host, 4 << 20).requests[0];
        assert!(req.resource_profiles.len() >= 2);
        for rp in &req.resource_profiles {
            let keys: Vec<&str> = rp
                .resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .map(|kv| kv.key.as_str())
                .collect();
            assert_eq!(keys[..3], ["host.name", "service.name", "process.pid"]);
            let unique: std::collections::HashSet<_> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "{keys:?}");
            let service = &rp.resource.as_ref().unwrap().attributes[1];
            assert_eq!(
                service.value.as_ref().unwrap().value,
                Some(any_value::Value::StringValue("checkout".into()))
            );
        }
    }

    /// process.executable.name is the executable's base name (not the thread-set
    /// comm), and the process name when the executable is unknown.
    #[test]
    fn executable_name_is_the_exe_base_name() {
        let mut profile = test_profile();
        let meta = profile.processes.get_mut(&42).unwrap();
        meta.name = "renamed-by-prctl".into();
        meta.exe = Some("/usr/bin/python3.11 (deleted)".into());
        let mut gone = profile.stacks[0].clone();
        gone.pid = 7;
        gone.process = "short-lived".into();
        profile.stacks.push(gone);
        let req = &encode_all(&profile, &host(), 4 << 20).requests[0];
        let attr = |pid: i64, key: &str| -> Option<String> {
            let rp = req.resource_profiles.iter().find(|rp| {
                rp.resource.as_ref().unwrap().attributes.iter().any(|kv| {
                    kv.key == "process.pid"
                        && kv.value.as_ref().unwrap().value == Some(any_value::Value::IntValue(pid))
                })
            })?;
            rp.resource
                .as_ref()
                .unwrap()
                .attributes
                .iter()
                .find(|kv| kv.key == key)
                .map(|kv| match &kv.value.as_ref().unwrap().value {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("{other:?}"),
                })
        };
        assert_eq!(
            attr(42, "process.executable.name").as_deref(),
            Some("python3.11")
        );
        assert_eq!(
            attr(42, "process.executable.path").as_deref(),
            Some("/usr/bin/python3.11 (deleted)")
        );
        assert_eq!(
            attr(7, "process.executable.name").as_deref(),
            Some("short-lived")
        );
        assert_eq!(attr(7, "process.executable.path"), None);
    }
}
