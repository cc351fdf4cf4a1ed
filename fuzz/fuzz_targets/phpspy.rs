//! Arbitrary bytes as phpspy output: parsing never panics, keeps its bounds, and no
//! sample is both stored and counted as malformed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::{phpspy, ParseLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits, so the bounds are reached by small inputs.
    let limits = ParseLimits {
        max_stacks: 8,
        max_frames_per_stack: 4,
        max_stored_bytes: 4096,
        max_line_bytes: 256,
    };
    let parsed = phpspy::parse(data, &limits);
    assert!(parsed.respects(&limits), "{parsed:?}");
    // Every stored sample and every dropped one came from at least one input line.
    let lines = data.split(|&b| b == b'\n').count() as u64;
    assert!(parsed.total_samples() + parsed.malformed_samples <= lines);
    assert!(phpspy::parse(data, &ParseLimits::default()).respects(&ParseLimits::default()));
});
