//! Arbitrary bytes as a sequence of ring buffer records (each a little-endian u16
//! length, then that many bytes): parsing, naming threads and aggregating must never
//! panic, and a record without its thread name gets exactly the name of the last
//! named record of its CPU for the same thread, or is refused.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use profiler::{
    aggregate::{AggregateLimits, Aggregator},
    drain::{RawSample, ThreadNames},
};

fuzz_target!(|data: &[u8]| {
    let mut names = ThreadNames::default();
    let mut named: HashMap<u32, (u32, [u8; 16])> = HashMap::new();
    let mut agg = Aggregator::new(AggregateLimits {
        max_stacks: 4,
        max_frames: 64,
        ..AggregateLimits::default()
    });
    let mut added = 0;
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let (record, tail) = rest[2..].split_at(len.min(rest.len() - 2));
        rest = tail;
        let Ok(mut sample) = RawSample::parse(record) else {
            continue;
        };
        let expected = named.get(&sample.cpu).filter(|(tid, _)| *tid == sample.tid).copied();
        match names.resolve(&mut sample) {
            Ok(()) if sample.same_thread => {
                assert_eq!(expected, Some((sample.tid, sample.comm)));
            }
            Ok(()) => {
                named.insert(sample.cpu, (sample.tid, sample.comm));
            }
            Err(_) => assert!(sample.same_thread && expected.is_none()),
        }
        if !sample.same_thread || expected.is_some() {
            agg.add(&sample);
            added += 1;
        }
    }
    assert_eq!(agg.stats().samples, added);
});
