//! Arbitrary bytes as a ring buffer record: parsing must never panic or read out of
//! bounds, whatever parses as a sample must aggregate without panicking, a fork or
//! exec must go into a lineage without panicking, and a young process's mapping
//! into a process table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::{
    aggregate::{AggregateLimits, Aggregator},
    drain::Record,
    lineage::{Lineage, ProcessChange},
    process::ProcessTable,
};

fuzz_target!(|data: &[u8]| match Record::parse(data) {
    Ok(Record::Process(change)) => Lineage::default().apply(change),
    Ok(Record::Exec { pid, .. }) => Lineage::default().apply(ProcessChange::Execed { pid }),
    Ok(Record::Mapping(seen)) => {
        let mut table = ProcessTable::new(Default::default());
        table.add_young_mapping(&seen);
        table.add_young_mapping(&seen);
        let info = table.get(seen.pid).expect("a mapping is kept");
        assert_eq!(info.mappings.len(), 1);
    }
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
