//! Rotating local files: the agent's sink when no backend is configured (and
//! optionally beside one). Each interval writes `profile-<UTC time>.pb.gz` and
//! `.folded`, atomically; then the oldest are deleted until at most `max_profiles`
//! profiles and `max_bytes` bytes remain.

use std::{
    fs,
    io::{self, BufWriter},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    export::{folded, pprof, write_synced},
    profile::Profile,
};

/// Default number of profiles kept: one hour at the default 15 s interval.
pub const DEFAULT_MAX_PROFILES: usize = 240;
/// Default bytes kept on disk.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;

const PREFIX: &str = "profile-";

/// Where and how much to keep.
#[derive(Clone, Debug)]
pub struct FilesConfig {
    pub dir: PathBuf,
    pub max_profiles: usize,
    pub max_bytes: u64,
}

/// What one write did.
#[derive(Debug, Default)]
pub struct FilesWritten {
    pub pprof: PathBuf,
    pub folded: PathBuf,
    /// Files deleted to stay within the limits.
    pub deleted: usize,
    /// Profiles deleted because the disk was full (the oldest first).
    pub profiles_deleted_for_space: usize,
}

/// `profile-20261126T041512.123Z`, sortable by time.
fn stem(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, day) = civil_from_days(days);
    format!(
        "{PREFIX}{y:04}{m:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Writes `path` through a synced temporary beside it, renamed into place.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<fs::File>) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("profile")
    ));
    let result = write_synced(&tmp, write).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes one profile and prunes old ones. When the disk is full the oldest
/// profiles make room for the newest, one at a time, as the limits would have; a
/// profile that still cannot be written leaves neither of its files behind.
pub fn write(profile: &Profile, config: &FilesConfig) -> io::Result<FilesWritten> {
    fs::create_dir_all(&config.dir)?;
    let stem = unused_stem(&config.dir, stem(profile.start));
    let mut profiles_deleted_for_space = 0;
    loop {
        match write_pair(profile, &config.dir, &stem) {
            Ok((pprof, folded)) => {
                return Ok(FilesWritten {
                    pprof,
                    folded,
                    deleted: prune(config, &stem)?,
                    profiles_deleted_for_space,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                match delete_oldest(&config.dir, &stem)? {
                    0 => return Err(e),
                    _ => profiles_deleted_for_space += 1,
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Both files of one profile, or neither.
fn write_pair(profile: &Profile, dir: &Path, stem: &str) -> io::Result<(PathBuf, PathBuf)> {
    let pprof_path = dir.join(format!("{stem}.pb.gz"));
    let folded_path = dir.join(format!("{stem}.folded"));
    write_atomic(&pprof_path, |w| pprof::write_gzipped(profile, w))?;
    if let Err(e) = write_atomic(&folded_path, |w| folded::write(profile, w)) {
        let _ = fs::remove_file(&pprof_path);
        return Err(e);
    }
    Ok((pprof_path, folded_path))
}

/// Our profiles in `dir`, oldest first: stem -> its files with their sizes.
fn list(dir: &Path) -> io::Result<std::collections::BTreeMap<String, Vec<(PathBuf, u64)>>> {
    let mut stems: std::collections::BTreeMap<String, Vec<(PathBuf, u64)>> = Default::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_suffix(".pb.gz")
            .or_else(|| name.strip_suffix(".folded"))
        else {
            continue;
        };
        if !stem.starts_with(PREFIX) {
            continue;
        }
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        stems
            .entry(stem.to_string())
            .or_default()
            .push((entry.path(), len));
    }
    Ok(stems)
}

/// Deletes the files of the oldest profile other than `keep`; returns how many.
fn delete_oldest(dir: &Path, keep: &str) -> io::Result<usize> {
    let stems = list(dir)?;
    let Some((_, files)) = stems.iter().find(|(stem, _)| stem.as_str() != keep) else {
        return Ok(0);
    };
    Ok(files
        .iter()
        .filter(|(path, _)| fs::remove_file(path).is_ok())
        .count())
}

/// `stem`, or `stem-1`, `stem-2`, ... when a profile of that name exists (the clock
/// stepped back): a profile never replaces another.
fn unused_stem(dir: &Path, stem: String) -> String {
    let taken = |s: &str| {
        dir.join(format!("{s}.pb.gz")).exists() || dir.join(format!("{s}.folded")).exists()
    };
    if !taken(&stem) {
        return stem;
    }
    (1..)
        .map(|n| format!("{stem}-{n}"))
        .find(|s| !taken(s))
        .expect("some suffix is free")
}

/// Deletes the oldest profiles (both files of each) beyond the limits, never
/// `keep` (the one just written: after the clock stepped back it sorts first).
fn prune(config: &FilesConfig, keep: &str) -> io::Result<usize> {
    let stems = list(&config.dir)?;
    let mut total: u64 = stems.values().flatten().map(|(_, len)| len).sum();
    let mut count = stems.len();
    let mut deleted = 0;
    // Oldest first.
    for (stem, files) in &stems {
        if count <= 1 || (count <= config.max_profiles && total <= config.max_bytes) {
            break;
        }
        if stem == keep {
            continue;
        }
        for (path, len) in files {
            if fs::remove_file(path).is_ok() {
                deleted += 1;
                total = total.saturating_sub(*len);
            }
        }
        count -= 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;
    use std::time::Duration;

    /// After the clock steps back, the profile just written is kept (others go, by
    /// name), and one with the same time as an earlier one does not replace it.
    #[test]
    fn clock_stepping_back_keeps_the_new_profile() {
        let dir = tempfile::tempdir().unwrap();
        let config = FilesConfig {
            dir: dir.path().to_path_buf(),
            max_profiles: 2,
            max_bytes: u64::MAX,
        };
        let at = |ms: u64| {
            let mut p = test_profile();
            p.start = UNIX_EPOCH + Duration::from_millis(ms);
            p
        };
        write(&at(2_000_000_000_000), &config).unwrap();
        write(&at(2_000_000_015_000), &config).unwrap();
        // The clock went back a day.
        let back = write(&at(1_999_913_600_000), &config).unwrap();
        assert!(back.pprof.exists(), "the newest profile was deleted");
        let same = write(&at(1_999_913_600_000), &config).unwrap();
        assert!(same.pprof.exists());
        assert_ne!(same.pprof, back.pprof, "written over the earlier profile");
        assert_eq!(list(dir.path()).unwrap().len(), 2);
    }

    /// File names sort by time and show it in UTC.
    #[test]
    fn names_are_utc_timestamps() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_655_941_693);
        assert_eq!(stem(t), "profile-20261126T011901.693Z");
        assert_eq!(stem(UNIX_EPOCH), "profile-19700101T000000.000Z");
    }

    /// At most max_profiles profiles are kept, the newest ones, both files each.
    #[test]
    fn keeps_the_newest_within_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let config = FilesConfig {
            dir: dir.path().to_path_buf(),
            max_profiles: 3,
            max_bytes: u64::MAX,
        };
        let mut profile = test_profile();
        for i in 0..10u64 {
            profile.start = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i * 15);
            write(&profile, &config).unwrap();
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 6, "{names:?}");
        let newest = stem(UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 9 * 15));
        assert!(names.iter().any(|n| n.starts_with(&newest)));
        let oldest = stem(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        assert!(!names.iter().any(|n| n.starts_with(&oldest)));
    }

    /// The byte limit holds too (the newest profile is always kept).
    #[test]
    fn keeps_within_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = FilesConfig {
            dir: dir.path().to_path_buf(),
            max_profiles: 100,
            max_bytes: 1,
        };
        let mut profile = test_profile();
        for i in 0..5u64 {
            profile.start = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i);
            write(&profile, &config).unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        config.max_bytes = u64::MAX;
        write(&profile, &config).unwrap();
    }
}
