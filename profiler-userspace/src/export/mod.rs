//! Stage 6: turn a [`Profile`] into files: folded stacks,
//! gzipped pprof and a flamegraph SVG. Writers take any `io::Write`; [`write_all`]
//! writes the set into a directory atomically (temporary files, then renames), so a
//! failure never leaves a half-written profile behind.

pub mod flamegraph;
pub mod folded;
pub mod otlp;
pub mod pprof;

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::profile::Profile;

/// File names inside the output directory.
pub const FOLDED_FILE: &str = "profile.folded";
pub const PPROF_FILE: &str = "profile.pb.gz";
pub const FLAMEGRAPH_FILE: &str = "flamegraph.svg";

/// Paths of a written profile.
#[derive(Clone, Debug)]
pub struct Written {
    pub folded: PathBuf,
    pub pprof: PathBuf,
    pub flamegraph: PathBuf,
}

/// Why the profile could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Creating, writing or renaming a file failed.
    #[error("cannot write {path}")]
    Io { path: PathBuf, source: io::Error },
    /// [`Publish::abandon`] was called before the files were renamed into place.
    #[error("abandoned before the files were put in place")]
    Abandoned,
}

/// Whether a [`write_all`] may still put its files in place: another thread can
/// abandon the write, and learns whether it was in time. The renames happen under
/// the same lock, so once `abandon` returns true no file of this write appears.
#[derive(Debug, Default)]
pub struct Publish(Mutex<PublishState>);

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum PublishState {
    #[default]
    Pending,
    Published,
    Abandoned,
}

impl Publish {
    /// Abandons the write unless its files are in place already: true if abandoned
    /// (no file of it will appear; its temporaries are removed by the writer),
    /// false if it had already published them.
    pub fn abandon(&self) -> bool {
        let mut state = self.0.lock().expect("publish lock");
        if *state == PublishState::Published {
            return false;
        }
        *state = PublishState::Abandoned;
        true
    }
}

/// The files [`write_all`] writes, in the order of [`Written`]'s fields.
const FILES: [&str; 3] = [FOLDED_FILE, PPROF_FILE, FLAMEGRAPH_FILE];

/// The temporary name [`write_all`] writes `name` under, in this process.
fn temporary(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp.{}", std::process::id()))
}

/// Removes this process's temporary files in `dir` (when a write is abandoned).
pub fn remove_temporaries(dir: &Path) {
    for name in FILES {
        let _ = fs::remove_file(temporary(dir, name));
    }
}

/// Writes `profile.folded`, `profile.pb.gz` and `flamegraph.svg` into `dir`. Each is
/// written to a temporary file first; the renames happen only once all three are
/// complete, and unless `publish` was abandoned; the temporaries are removed on
/// failure or abandon.
pub fn write_all(
    profile: &Profile,
    dir: &Path,
    title: &str,
    publish: &Publish,
) -> Result<Written, ExportError> {
    let targets = FILES.map(|name| dir.join(name));
    let temps = FILES.map(|name| temporary(dir, name));
    let result = (|| {
        write_file(publish, &temps[0], &targets[0], |w| {
            folded::write(profile, w)
        })?;
        write_file(publish, &temps[1], &targets[1], |w| {
            pprof::write_gzipped(profile, w)
        })?;
        write_file(publish, &temps[2], &targets[2], |w| {
            flamegraph::write(profile, title, w)
        })?;
        let mut state = publish.0.lock().expect("publish lock");
        if *state == PublishState::Abandoned {
            return Err(ExportError::Abandoned);
        }
        for (tmp, target) in temps.iter().zip(&targets) {
            fs::rename(tmp, target).map_err(|source| ExportError::Io {
                path: target.clone(),
                source,
            })?;
        }
        *state = PublishState::Published;
        Ok(())
    })();
    if result.is_err() {
        for tmp in &temps {
            let _ = fs::remove_file(tmp);
        }
    }
    result.map(|()| {
        let [folded, pprof, flamegraph] = targets;
        Written {
            folded,
            pprof,
            flamegraph,
        }
    })
}

/// Writes `path`, the temporary file of `target` (the name errors give), unless
/// `publish` was abandoned before it is created (checked under its lock, so no
/// temporary appears after an abandon: the one being written is removed by whoever
/// abandoned, and the writer stops at the next).
fn write_file(
    publish: &Publish,
    path: &Path,
    target: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<(), ExportError> {
    let io_error = |source| ExportError::Io {
        path: target.to_path_buf(),
        source,
    };
    let file = {
        let state = publish.0.lock().expect("publish lock");
        if *state == PublishState::Abandoned {
            return Err(ExportError::Abandoned);
        }
        File::create(path).map_err(io_error)?
    };
    write_synced_to(file, write).map_err(io_error)
}

/// Creates `path`, writes it through a buffer and syncs it to disk, so that a
/// rename that follows never publishes an empty or partial file after a crash.
pub(crate) fn write_synced(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    write_synced_to(File::create(path)?, write)
}

/// Writes `file` through a buffer and syncs it to disk.
fn write_synced_to(
    file: File,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut w = BufWriter::new(file);
    write(&mut w)?;
    w.flush()?;
    w.get_ref().sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An abandoned write leaves no file and no temporary; one abandoned too late
    /// says so and its files are complete.
    #[test]
    fn abandon_before_publish_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let profile = crate::profile::test_profile();
        let publish = Publish::default();
        assert!(publish.abandon());
        assert!(matches!(
            write_all(&profile, dir.path(), "t", &publish),
            Err(ExportError::Abandoned)
        ));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

        let publish = Publish::default();
        let written = write_all(&profile, dir.path(), "t", &publish).unwrap();
        assert!(!publish.abandon(), "published already");
        assert!(written.flamegraph.is_file() && written.pprof.is_file());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
    }
}
