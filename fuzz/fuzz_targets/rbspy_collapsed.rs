//! Arbitrary bytes as rbspy collapsed output: parsing never panics and keeps its bounds.
#![no_main]

mod parser_bounds;

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::rbspy;

fuzz_target!(|data: &[u8]| {
    parser_bounds::parse_within_bounds(data, rbspy::parse);
});
