//! What every runtime output parser's fuzz target checks (included with `mod`).

use profiler::runtimes::{ParseLimits, Parsed};

/// Parses `data` with small limits, so the bounds are reached by small inputs, and
/// with the defaults; both results keep their bounds. Returns the small-limit one.
pub fn parse_within_bounds(data: &[u8], parse: fn(&[u8], &ParseLimits) -> Parsed) -> Parsed {
    let limits = ParseLimits {
        max_stacks: 8,
        max_frames_per_stack: 4,
        max_stored_bytes: 4096,
        max_line_bytes: 256,
    };
    let parsed = parse(data, &limits);
    assert!(parsed.respects(&limits), "{parsed:?}");
    assert!(parse(data, &ParseLimits::default()).respects(&ParseLimits::default()));
    parsed
}
