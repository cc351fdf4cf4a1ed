//! Interactive flamegraph SVG, drawn by inferno from the folded lines.

use std::io;

use inferno::flamegraph::{self, color::MultiPalette, Options, Palette};

use crate::{export::folded, profile::Profile};

/// Writes the SVG. An empty profile still gives a valid SVG that says so.
pub fn write(profile: &Profile, title: &str, w: &mut impl io::Write) -> io::Result<()> {
    let mut options = Options::default();
    options.title = title.to_string();
    options.count_name = "samples".to_string();
    // Java palette: kernel frames (`_[k]`) orange, user frames by kind.
    options.colors = Palette::Multi(MultiPalette::Java);
    options.deterministic = true;
    let lines: Vec<String> = folded::lines(profile)
        .into_iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect();
    if lines.is_empty() {
        options.subtitle = Some("no samples were recorded".to_string());
        return flamegraph::from_lines(&mut options, ["[no samples] 1"], w);
    }
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    /// The SVG names the frames of the profile; inferno shows kernel frames without
    /// their `_[k]` marker (it colors them instead).
    #[test]
    fn svg_contains_frames() {
        let mut out = Vec::new();
        write(&test_profile(), "test", &mut out).unwrap();
        let svg = String::from_utf8(out).unwrap();
        assert!(svg.starts_with("<?xml"));
        assert!(svg.contains("work"));
        assert!(svg.contains("do_syscall_64 (3 samples"));
    }
}
