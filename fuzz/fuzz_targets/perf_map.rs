//! Arbitrary bytes as a perf map: parsing never panics; the result is sorted, without
//! overlaps, within its entry limit, finds every symbol at its own start, and its
//! normalized text parses back to the same symbols. Scanning the same bytes for the
//! symbols' addresses names them as the parsed map does whenever the parse kept every
//! line (no overlaps, none over the limit, no line past the scan's line limit); one
//! starting mid-line names what one of the bytes after the first newline does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use profiler::runtimes::perfmap::{scan_perf_map, PerfMap, Start, MAX_LINE_BYTES};

fuzz_target!(|data: &[u8]| {
    let map = PerfMap::parse_with_limit(data, 16);
    assert!(map.len() <= 16);
    let symbols: Vec<_> = map.symbols().collect();
    for pair in symbols.windows(2) {
        assert!(pair[0].start + pair[0].size <= pair[1].start, "{pair:?}");
    }
    for s in &symbols {
        assert_eq!(map.lookup(s.start), Some(s.name));
        assert_eq!(map.lookup(s.start + (s.size - 1)), Some(s.name));
    }
    let addrs: Vec<u64> = symbols.iter().map(|s| s.start).collect();
    let names = scan_perf_map(data, &addrs, Start::LineStart).expect("reading a slice");
    let kept_all = map.stats().overlapped == 0
        && map.stats().over_limit == 0
        && data.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE_BYTES);
    if kept_all {
        for s in &symbols {
            assert_eq!(names.get(s.start), Some(s.name), "{s:?}");
        }
    }
    let text = map.normalized_text();
    // Bare hex, as blazesym requires.
    for line in text.lines() {
        let mut fields = line.splitn(3, ' ');
        for _ in 0..2 {
            let field = fields.next().unwrap_or_default();
            assert!(
                !field.is_empty() && field.bytes().all(|b| b.is_ascii_hexdigit()),
                "{line}"
            );
        }
    }
    let again = PerfMap::parse_with_limit(text.as_bytes(), 16);
    assert_eq!(again.symbols().collect::<Vec<_>>(), symbols);
    assert_eq!(again.stats().malformed_lines, 0);
    // A scan that starts mid-line (a map read from an offset) names what a scan of
    // the bytes after the first newline names.
    let rest = match data.iter().position(|&b| b == b'\n') {
        Some(i) => &data[i + 1..],
        None => &[][..],
    };
    let mid = scan_perf_map(data, &addrs, Start::MidLine).expect("reading a slice");
    let after = scan_perf_map(rest, &addrs, Start::LineStart).expect("reading a slice");
    for a in &addrs {
        assert_eq!(mid.get(*a), after.get(*a), "{a:#x}");
    }
});
