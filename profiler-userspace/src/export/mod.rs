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
/// complete, and the temporaries are removed on failure.
pub fn write_all(profile: &Profile, dir: &Path, title: &str) -> Result<Written, ExportError> {
    let targets = FILES.map(|name| dir.join(name));
    let temps = FILES.map(|name| temporary(dir, name));
    let result = (|| {
        write_file(&temps[0], &targets[0], |w| folded::write(profile, w))?;
        write_file(&temps[1], &targets[1], |w| pprof::write_gzipped(profile, w))?;
        write_file(&temps[2], &targets[2], |w| {
            flamegraph::write(profile, title, w)
        })?;
        for (tmp, target) in temps.iter().zip(&targets) {
            fs::rename(tmp, target).map_err(|source| ExportError::Io {
                path: target.clone(),
                source,
            })?;
        }
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

/// Writes `path`, the temporary file of `target` (the name errors give).
fn write_file(
    path: &Path,
    target: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<(), ExportError> {
    write_synced(path, write).map_err(|source| ExportError::Io {
        path: target.to_path_buf(),
        source,
    })
}

/// Creates `path`, writes it through a buffer and syncs it to disk, so that a
/// rename that follows never publishes an empty or partial file after a crash.
pub(crate) fn write_synced(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    write(&mut w)?;
    w.flush()?;
    w.get_ref().sync_all()
}
