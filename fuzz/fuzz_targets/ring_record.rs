//! Arbitrary bytes as a ring buffer record: parsing must never panic or read out of
//! bounds, whatever parses as a sample must aggregate without panicking, and a fork
//! or exec must go into a lineage without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::{
    aggregate::{AggregateLimits, Aggregator},
    drain::Record,
    lineage::Lineage,
};

fuzz_target!(|data: &[u8]| match Record::parse(data) {
    Ok(Record::Process(change)) => Lineage::default().apply(change),
    Ok(Record::Sample(sample)) => {
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
    Err(_) => {}
});
