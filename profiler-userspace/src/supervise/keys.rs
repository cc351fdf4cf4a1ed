//! What the supervisor remembers between runs: failures per key (for back-off) and
//! which tools exist. Both are bounded; forgetting costs at most a retry.

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lru::LruCache;

use super::Backoff;

/// Most keys whose failures are remembered. Only failing keys are stored (a success
/// forgets its key), so this bounds the failing targets tracked at once: ~100 B plus
/// the key's length each, ~0.5 MiB when full. When full the least recently seen key
/// is forgotten (counted): it may then run once before backing off again.
pub const MAX_KEY_HISTORY: usize = 4096;

/// Most programs whose presence is remembered. The agent runs a handful of tools; past
/// this the cache is cleared and tools are probed again (one `stat` each).
pub const MAX_TOOLS: usize = 64;

/// Consecutive failures of one key and when it may run again.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    until: Instant,
}

/// Failure history per key, least recently seen forgotten first.
pub(super) struct KeyHistory {
    keys: LruCache<String, Failures>,
    cap: usize,
    backoff: Backoff,
}

impl KeyHistory {
    pub(super) fn new(cap: usize, backoff: Backoff) -> KeyHistory {
        KeyHistory {
            // Grown on use, not preallocated: a healthy agent stores nothing here.
            keys: LruCache::unbounded(),
            cap: cap.max(1),
            backoff,
        }
    }

    /// `Some(until)` while `key` must not run. A key whose back-off ended more than
    /// `backoff.max` ago is forgotten: its target failed long ago, not repeatedly.
    pub(super) fn backing_off(&mut self, key: &str, now: Instant) -> Option<Instant> {
        let f = *self.keys.get(key)?;
        if now < f.until {
            return Some(f.until);
        }
        if now.duration_since(f.until) > self.backoff.max {
            self.keys.pop(key);
        }
        None
    }

    /// Records a failed run of `key` that ended at `now`; returns true if another
    /// key had to be forgotten to make room.
    pub(super) fn failure(&mut self, key: &str, now: Instant) -> bool {
        let count = self.keys.get(key).map_or(0, |f| f.count).saturating_add(1);
        let until = super::after(now, self.backoff.delay(count));
        if let Some(f) = self.keys.get_mut(key) {
            *f = Failures { count, until };
            return false;
        }
        let evicted = self.keys.len() >= self.cap && self.keys.pop_lru().is_some();
        self.keys.put(key.to_owned(), Failures { count, until });
        evicted
    }

    /// A success: `key` starts afresh.
    pub(super) fn success(&mut self, key: &str) {
        self.keys.pop(key);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Whether a program can be run, as first probed (or as its spawn revealed).
#[derive(Debug, Clone)]
enum Tool {
    Present,
    Missing { reason: String, since: Instant },
}

/// Remembers which programs exist, so a missing tool is probed once per `recheck`
/// and reported once in the log, not every cycle.
pub(super) struct ToolCache {
    tools: HashMap<PathBuf, Tool>,
    recheck: Duration,
}

/// A program that cannot be run, and why (one clause, for an error message).
#[derive(Debug, Clone)]
pub(super) struct Missing {
    pub reason: String,
    /// True the first time it is found missing (the caller logs it then).
    pub new: bool,
}

impl ToolCache {
    pub(super) fn new(recheck: Duration) -> ToolCache {
        ToolCache {
            tools: HashMap::new(),
            recheck,
        }
    }

    /// Checks that `program` can be run; probes the file system only the first time
    /// (and again `recheck` after it was found missing). `path` is the PATH the child
    /// will be started with.
    pub(super) fn check(
        &mut self,
        program: &Path,
        path: Option<&OsStr>,
        now: Instant,
    ) -> Result<(), Missing> {
        match self.tools.get(program) {
            Some(Tool::Present) => return Ok(()),
            Some(Tool::Missing { reason, since }) if now.duration_since(*since) < self.recheck => {
                return Err(Missing {
                    reason: reason.clone(),
                    new: false,
                });
            }
            _ => {}
        }
        match probe(program, path) {
            Ok(()) => {
                self.insert(program, Tool::Present);
                Ok(())
            }
            Err(reason) => {
                self.mark_missing(program, reason.clone(), now);
                Err(Missing { reason, new: true })
            }
        }
    }

    /// Remembers that `program` could not be run (its spawn said so).
    pub(super) fn mark_missing(&mut self, program: &Path, reason: String, now: Instant) {
        self.insert(program, Tool::Missing { reason, since: now });
    }

    fn insert(&mut self, program: &Path, tool: Tool) {
        if self.tools.len() >= MAX_TOOLS && !self.tools.contains_key(program) {
            self.tools.clear();
        }
        self.tools.insert(program.to_path_buf(), tool);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tools.len()
    }
}

/// The PATH searched when the child's environment does not set one (execvp's).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Finds `program` the way exec will: a name with a `/` is used as is, a bare name
/// is searched in `path`. Returns why it cannot be run.
pub(super) fn probe(program: &Path, path: Option<&OsStr>) -> Result<(), String> {
    if program.as_os_str().is_empty() {
        return Err("the program name is empty".to_owned());
    }
    if program.as_os_str().as_bytes().contains(&b'/') {
        return executable(program).map_err(|why| format!("`{}` {why}", program.display()));
    }
    let path: OsString = path.map_or_else(|| OsString::from(DEFAULT_PATH), OsStr::to_owned);
    let found = std::env::split_paths(&path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .any(|dir| executable(&dir.join(program)).is_ok());
    if found {
        Ok(())
    } else {
        Err(format!(
            "no executable `{}` in PATH={}",
            program.display(),
            path.to_string_lossy()
        ))
    }
}

/// Ok if `file` is a regular file we may execute.
fn executable(file: &Path) -> Result<(), &'static str> {
    let meta = std::fs::metadata(file).map_err(|_| "does not exist")?;
    if !meta.is_file() {
        return Err("is not a file");
    }
    let c = std::ffi::CString::new(file.as_os_str().as_bytes()).map_err(|_| "has a NUL byte")?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err("is not executable");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(30 * 60),
        }
    }

    /// Each consecutive failure doubles the wait, up to the maximum.
    #[test]
    fn failures_double_the_wait_up_to_max() {
        let mut h = KeyHistory::new(8, backoff());
        let t0 = Instant::now();
        let mut waits = vec![];
        for _ in 0..8 {
            h.failure("k", t0);
            waits.push(h.backing_off("k", t0).unwrap() - t0);
        }
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1800, 1800]);
    }

    /// A success forgets the key's failures.
    #[test]
    fn success_resets() {
        let mut h = KeyHistory::new(8, backoff());
        let t0 = Instant::now();
        h.failure("k", t0);
        h.success("k");
        assert!(h.backing_off("k", t0).is_none());
        assert_eq!(h.len(), 0);
    }

    /// The history never holds more than its bound; the least recently seen key goes.
    #[test]
    fn history_is_bounded_lru() {
        let mut h = KeyHistory::new(3, backoff());
        let t0 = Instant::now();
        assert!(!h.failure("a", t0));
        assert!(!h.failure("b", t0));
        assert!(!h.failure("c", t0));
        h.backing_off("a", t0); // "a" seen again: "b" is now the oldest
        assert!(h.failure("d", t0));
        assert_eq!(h.len(), 3);
        assert!(h.backing_off("b", t0).is_none());
        assert!(h.backing_off("a", t0).is_some());
    }

    /// A key whose back-off ended long ago starts afresh rather than doubling.
    #[test]
    fn stale_history_is_forgotten() {
        let mut h = KeyHistory::new(8, backoff());
        let t0 = Instant::now();
        h.failure("k", t0);
        h.failure("k", t0);
        let later = t0 + Duration::from_secs(60 + 30 * 60 + 1);
        assert!(h.backing_off("k", later).is_none());
        h.failure("k", later);
        assert_eq!(
            h.backing_off("k", later),
            Some(later + Duration::from_secs(30))
        );
    }

    /// The tool cache never holds more than MAX_TOOLS programs.
    #[test]
    fn tool_cache_is_bounded() {
        let mut c = ToolCache::new(Duration::from_secs(600));
        let now = Instant::now();
        for i in 0..MAX_TOOLS * 3 {
            let _ = c.check(Path::new(&format!("/nonexistent/tool-{i}")), None, now);
            assert!(c.len() <= MAX_TOOLS);
        }
    }

    /// A bare name is looked up in the given PATH, as exec would.
    #[test]
    fn bare_names_search_path() {
        assert!(probe(Path::new("sh"), Some(OsStr::new("/nonexistent:/bin"))).is_ok());
        let err = probe(Path::new("sh"), Some(OsStr::new("/nonexistent"))).unwrap_err();
        assert_eq!(err, "no executable `sh` in PATH=/nonexistent");
    }
}
