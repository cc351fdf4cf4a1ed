//! Arbitrary bytes as /proc/stat: the idle-time parser of the delivery check must
//! never panic, and a result has one figure per CPU asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::delivery::parse_idle_ticks;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for cpus in [&[][..], &[0][..], &[0, 1][..], &[1, 0, 7][..]] {
        if let Some(ticks) = parse_idle_ticks(&text, cpus) {
            assert_eq!(ticks.len(), cpus.len());
        }
    }
});
