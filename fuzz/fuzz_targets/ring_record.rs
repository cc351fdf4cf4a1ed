//! Arbitrary bytes as a ring buffer record: parsing must never panic or read out of
//! bounds, and whatever parses must aggregate without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::{
    aggregate::{AggregateLimits, Aggregator},
    drain::RawSample,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(sample) = RawSample::parse(data) {
        let frames = sample.kernel_ips().count() + sample.user_ips().count();
        assert_eq!(frames, sample.kernel_len() + sample.user_len());
        let mut agg = Aggregator::new(AggregateLimits {
            max_stacks: 4,
            max_frames: 64,
            ..AggregateLimits::default()
        });
        agg.add(&sample);
        agg.add(&sample);
        assert_eq!(agg.stats().samples, 2);
    }
});
