//! Arbitrary bytes as kernel BTF: opening and member lookups must never panic, loop
//! forever or read out of bounds; an offset found is a whole byte inside the blob's
//! own claims (a u32 divided by 8).
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::btf::Btf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::open(data) {
        for (strukt, member) in [("task_struct", "pid"), ("", ""), ("a", "b")] {
            if let Ok(offset) = btf.member_offset(strukt, member) {
                assert!(offset <= u32::MAX / 8);
            }
        }
    }
});
