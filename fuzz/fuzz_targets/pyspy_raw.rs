//! Arbitrary bytes as py-spy raw output: parsing never panics and keeps its bounds.
#![no_main]

mod parser_bounds;

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::pyspy;

fuzz_target!(|data: &[u8]| {
    parser_bounds::parse_within_bounds(data, pyspy::parse);
});
