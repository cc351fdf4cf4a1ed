//! Arbitrary bytes as rbspy collapsed output: parsing never panics and keeps its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::{rbspy, ParseLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits, so the bounds are reached by small inputs.
    let limits = ParseLimits {
        max_stacks: 8,
        max_frames_per_stack: 4,
        max_stored_bytes: 4096,
        max_line_bytes: 256,
    };
    let parsed = rbspy::parse(data, &limits);
    assert!(parsed.respects(&limits), "{parsed:?}");
    assert!(rbspy::parse(data, &ParseLimits::default()).respects(&ParseLimits::default()));
});
