//! Folded stacks (Brendan Gregg's format, read by flamegraph.pl, inferno, speedscope):
//! one `root;...;leaf count` line per distinct stack, the process name as root frame,
//! kernel frames suffixed `_[k]`.
//!
//! Lines are merged and sorted as sequences of interned names, read from the
//! profile's stacks as needed: an interval at its bound holds 1 Mi frames, whose
//! folded text is ~20 MB, and the agent writes it every interval. Only the line
//! being written exists as text; per distinct line 16 bytes are kept.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher},
    io,
};

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::profile::Profile;

/// A profile's folded lines, each a stack that has it and the summed count:
/// identical lines (e.g. the same stack in two threads of one process) merged,
/// sorted by name, frame by frame.
struct Folded<'a> {
    profile: &'a Profile,
    /// Distinct names (sanitized; kernel frames with their suffix).
    names: Vec<String>,
    /// Each location's names: its inlined chain, outermost first.
    location_names: Vec<Vec<u32>>,
    /// Each stack's process name.
    process_names: Vec<u32>,
    lines: Vec<(usize, u64)>,
}

impl<'a> Folded<'a> {
    fn new(profile: &'a Profile) -> Self {
        let mut names: Vec<String> = Vec::new();
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut intern = |name: &str| -> u32 {
            let name = sanitize(name);
            *ids.entry(name).or_insert_with_key(|name| {
                names.push(name.clone());
                (names.len() - 1) as u32
            })
        };
        let location_names = profile
            .locations
            .iter()
            .map(|loc| {
                let suffix = loc.kind.suffix();
                loc.lines
                    .iter()
                    .rev()
                    .map(|line| intern(&format!("{}{suffix}", line.function)))
                    .collect()
            })
            .collect();
        let process_names = profile.stacks.iter().map(|s| intern(&s.process)).collect();
        let mut folded = Folded {
            profile,
            names,
            location_names,
            process_names,
            lines: Vec::new(),
        };
        let hasher = DefaultHashBuilder::default();
        let hash = |ids: &mut dyn Iterator<Item = u32>| {
            let mut h = hasher.build_hasher();
            ids.for_each(|id| id.hash(&mut h));
            h.finish()
        };
        let mut table: HashTable<(usize, u64)> = HashTable::new();
        for (i, stack) in profile.stacks.iter().enumerate() {
            let key = hash(&mut folded.ids(i));
            match table.find_mut(key, |&(j, _)| folded.ids(j).eq(folded.ids(i))) {
                Some(line) => line.1 += stack.count,
                None => {
                    table.insert_unique(key, (i, stack.count), |&(j, _)| hash(&mut folded.ids(j)));
                }
            }
        }
        let mut lines: Vec<(usize, u64)> = table.into_iter().collect();
        let name = |id: u32| folded.names[id as usize].as_str();
        lines.sort_unstable_by(|&(a, _), &(b, _)| {
            folded.ids(a).map(name).cmp(folded.ids(b).map(name))
        });
        folded.lines = lines;
        folded
    }

    /// The line of stack `i` as name ids: its process, then its frames root first.
    fn ids(&self, i: usize) -> impl Iterator<Item = u32> + '_ {
        let frames = self.profile.stacks[i].locations.iter().rev();
        std::iter::once(self.process_names[i])
            .chain(frames.flat_map(|&l| self.location_names[l as usize].iter().copied()))
    }

    fn text(&self, i: usize) -> String {
        let mut text = String::new();
        for (n, id) in self.ids(i).enumerate() {
            if n > 0 {
                text.push(';');
            }
            text.push_str(&self.names[id as usize]);
        }
        text
    }
}

/// Folded lines with their counts, identical stacks merged, in the order
/// [`write()`] writes them.
pub fn lines(profile: &Profile) -> Vec<(String, u64)> {
    let folded = Folded::new(profile);
    folded
        .lines
        .iter()
        .map(|&(i, count)| (folded.text(i), count))
        .collect()
}

/// `;` separates frames and a newline ends a record: neither may appear in a name.
fn sanitize(name: &str) -> String {
    name.replace([';', '\n', '\r'], "_")
}

pub fn write(profile: &Profile, w: &mut impl io::Write) -> io::Result<()> {
    let folded = Folded::new(profile);
    for &(i, count) in &folded.lines {
        writeln!(w, "{} {count}", folded.text(i))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{test_profile, Line, Stack};
    use std::sync::Arc;

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

    /// Stacks that fold to the same names merge into one line: another thread, and
    /// another address in the same function; inlined chains expand outermost first.
    #[test]
    fn same_names_merge_into_one_line() {
        let mut profile = test_profile();
        let mut other_address = profile.locations[1].clone();
        other_address.address += 0x40;
        profile.locations.push(other_address);
        let mut inlined = profile.locations[1].clone();
        inlined.lines = Arc::new([
            Line {
                function: "helper".into(),
                file: None,
                line: 0,
            },
            Line {
                function: "work".into(),
                file: None,
                line: 0,
            },
        ]);
        profile.locations.push(inlined);
        let stack = |thread: &str, locations: Vec<u32>, count| Stack {
            pid: 42,
            process: "app".into(),
            thread: thread.into(),
            locations,
            count,
        };
        profile.stacks.push(stack("other", vec![2, 4, 0], 5));
        profile.stacks.push(stack("app", vec![5, 0], 7));
        assert_eq!(
            lines(&profile),
            [
                ("app;main;work;do_syscall_64_[k]".to_string(), 8),
                ("app;main;work;helper".to_string(), 7),
                ("app;main;work_[a_b]".to_string(), 2),
            ]
        );
    }
}
