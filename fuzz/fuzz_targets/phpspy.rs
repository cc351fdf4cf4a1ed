//! Arbitrary bytes as phpspy output: parsing never panics, keeps its bounds, and no
//! sample is both stored and counted as malformed.
#![no_main]

mod parser_bounds;

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::phpspy;

fuzz_target!(|data: &[u8]| {
    let parsed = parser_bounds::parse_within_bounds(data, phpspy::parse);
    // Every stored sample and every dropped one came from at least one input line.
    let lines = data.split(|&b| b == b'\n').count() as u64;
    assert!(parsed.total_samples() + parsed.malformed_samples <= lines);
});
