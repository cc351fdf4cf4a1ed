//! Folded stacks (Brendan Gregg's format, read by flamegraph.pl, inferno, speedscope):
//! one `root;...;leaf count` line per distinct stack, the process name as root frame,
//! kernel frames suffixed `_[k]`.

use std::{collections::BTreeMap, io};

use crate::profile::Profile;

/// Folded lines with their counts, identical stacks merged (e.g. the same stack in
/// two threads of one process), sorted.
pub fn lines(profile: &Profile) -> BTreeMap<String, u64> {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for stack in &profile.stacks {
        let mut line = sanitize(&stack.process);
        for frame in profile.folded_frames(stack) {
            line.push(';');
            line.push_str(&sanitize(&frame));
        }
        *lines.entry(line).or_default() += stack.count;
    }
    lines
}

/// `;` separates frames and a newline ends a record: neither may appear in a name.
fn sanitize(name: &str) -> String {
    name.replace([';', '\n', '\r'], "_")
}

pub fn write(profile: &Profile, w: &mut impl io::Write) -> io::Result<()> {
    for (stack, count) in lines(profile) {
        writeln!(w, "{stack} {count}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    /// Root is the process name, frames run root to leaf, kernel frames end in _[k].
    #[test]
    fn folds_root_first_with_kernel_suffix() {
        let profile = test_profile();
        let text = {
            let mut out = Vec::new();
            write(&profile, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            text,
            "app;main;work;do_syscall_64_[k] 3\napp;main;work_[a_b] 2\n"
        );
    }
}
