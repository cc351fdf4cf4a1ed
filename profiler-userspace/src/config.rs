//! Validated configuration: raw CLI arguments become a [`RecordConfig`] (or an
//! [`agent::AgentConfig`]) here, before anything is loaded, so every bad flag fails
//! with one clear sentence.

pub mod agent;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use profiler_common::MAX_PID_FILTER_ENTRIES;

use crate::{
    runtime_profilers::{RuntimeConfig, ToolPaths},
    runtimes::Runtime,
};

/// Why the arguments cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Frequency out of range.
    #[error(
        "--frequency must be between 1 and {max} Hz (kernel.perf_event_max_sample_rate), got {got}"
    )]
    Frequency { got: u64, max: u64 },
    /// Zero duration.
    #[error("--duration must be at least 1 second")]
    Duration,
    /// A pid that does not exist.
    /// A thread id where a process id belongs.
    #[error("--pid {tid} is a thread of process {tgid}: give the process id (all its threads are profiled)")]
    ThreadId { tid: u32, tgid: u32 },
    #[error("--pid {pid}: no such process")]
    NoSuchPid { pid: u32 },
    /// Too many pids for the in-kernel filter.
    #[error("at most {max} --pid values are supported, got {got}")]
    TooManyPids { max: u32, got: usize },
    /// The output directory is unusable.
    #[error("--output-dir {path}: {reason}")]
    OutputDir { path: PathBuf, reason: String },
    /// An interval under a second.
    #[error("--interval must be at least 1 second")]
    Interval,
    /// A header that is not `key=value`: which one, by position and the few
    /// characters before its first separator, never its value (it may be a token).
    #[error(
        "OTLP header {position} ({start:?}...) is not key=value (rest not shown: it may hold a secret)"
    )]
    Header { position: usize, start: String },
    /// A resource attribute that is not `key=value`.
    #[error("{origin}: {pair:?} is not key=value")]
    ResourceAttribute { origin: &'static str, pair: String },
    /// A host-wide value for an attribute the agent sets per process.
    #[error(
        "{origin}: {key} describes each process, and the agent sets it for each process itself"
    )]
    PerProcessAttribute { origin: &'static str, key: String },
    /// Only one of the client certificate and key.
    #[error(
        "--client-cert and --client-key (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE/_KEY) go together"
    )]
    ClientCert,
    /// A TLS file that does not exist.
    #[error("{0}: no such file")]
    MissingFile(PathBuf),
    /// Unknown compression.
    /// OTEL_EXPORTER_OTLP_(PROFILES_)PROTOCOL names a transport other than gRPC.
    #[error(
        "{variable}={value:?}: the agent speaks OTLP over gRPC only (an http/protobuf \
         endpoint, often port 4318, would never answer it); point it at a gRPC endpoint \
         and set OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL=grpc"
    )]
    Protocol { variable: String, value: String },
    /// The endpoint is on OTLP/HTTP's port and no protocol was named.
    #[error(
        "OTLP endpoint {0:?} is on port 4318, OTLP/HTTP's; the agent speaks OTLP over \
         gRPC only (port 4317 by default): point it at a gRPC endpoint, or set \
         OTEL_EXPORTER_OTLP_PROFILES_PROTOCOL=grpc if this port does serve gRPC"
    )]
    HttpPort(String),
    /// A TLS flag with a plaintext (`http://`) endpoint: it would be ignored.
    #[error(
        "{flag} needs TLS, but the OTLP endpoint {endpoint:?} is plaintext: use https://, \
         or drop {flag}"
    )]
    TlsOnPlaintext {
        flag: &'static str,
        endpoint: String,
    },
    /// The endpoint has a path, which gRPC does not use.
    #[error(
        "OTLP endpoint {0:?} has a path, which gRPC ignores (the service path is fixed): \
         give scheme, host and port only"
    )]
    EndpointPath(String),
    #[error("compression {0:?} is not supported (use gzip or none)")]
    Compression(String),
    /// Unparsable timeout.
    #[error("OTLP timeout {0:?} is not a positive number of milliseconds")]
    Timeout(String),
    /// A zero `--timeout`.
    #[error("--timeout must be at least 1 second")]
    TimeoutSecs,
    /// An export-only flag given with no endpoint to export to.
    #[error(
        "{0} only applies to OTLP export: give --endpoint (or set OTEL_EXPORTER_OTLP_ENDPOINT) too"
    )]
    NeedsEndpoint(&'static str),
    /// A request size limit too small to be useful.
    #[error("--max-request-kib must be at least 64, got {}", .0 >> 10)]
    RequestSize(usize),
    /// No profile could be kept.
    #[error("--max-files must be at least 1")]
    MaxFiles,
    /// A runtime name we do not know.
    #[error("--runtimes: unknown runtime {0:?} (use python, ruby, php, java, node, all or none)")]
    Runtime(String),
    /// A runtime profiler rate out of range.
    #[error("--runtime-rate must be between 1 and 1000 Hz, got {0}")]
    RuntimeRate(u64),
    /// No room for any runtime profiler.
    #[error("--max-runtime-children must be at least 1")]
    RuntimeChildren,
    /// An export queue smaller than one request.
    #[error("--queue-kib ({} KiB) must hold at least one request of --max-request-kib ({} KiB)", .queue >> 10, .request >> 10)]
    QueueSize { queue: usize, request: usize },
}

/// Everything `profiler record` needs, checked.
#[derive(Clone, Debug)]
pub struct RecordConfig {
    pub duration: Duration,
    pub frequency_hz: u64,
    /// Empty: the whole host.
    pub pids: Vec<u32>,
    pub output_dir: PathBuf,
    pub include_idle: bool,
    /// Print progress lines while recording.
    pub progress: bool,
    /// `None`: sized by CPU count.
    pub ring_buffer_bytes: Option<u32>,
    /// Runtime profilers (py-spy, rbspy, phpspy, jattach); all by default
    /// (`--runtimes`).
    pub runtimes: RuntimeConfig,
    /// The outermost directory [`RecordConfig::new`] created for `output_dir`
    /// (`None`: it existed), so that a run that fails before writing leaves none.
    pub created_dir: Option<PathBuf>,
}

impl RecordConfig {
    /// Removes the directories [`RecordConfig::new`] created, if they are still
    /// empty: after a failure, nothing is left behind.
    pub fn remove_created_dirs(&self) {
        let Some(top) = &self.created_dir else { return };
        let mut dir = self.output_dir.as_path();
        loop {
            if std::fs::remove_dir(dir).is_err() || dir == top.as_path() {
                return;
            }
            match dir.parent() {
                Some(parent) => dir = parent,
                None => return,
            }
        }
    }
}

/// Raw runtime profiler flags, shared by `record` and `agent`.
#[derive(Clone, Debug)]
pub struct RuntimeArgs {
    /// Names, `all` or `none`.
    pub runtimes: Vec<String>,
    /// `None`: the sampling frequency.
    pub rate_hz: Option<u64>,
    pub max_children: usize,
    pub tools: ToolPaths,
}

/// Checks the runtime profiler flags; `frequency_hz` is the default rate.
pub fn runtime_config(args: RuntimeArgs, frequency_hz: u64) -> Result<RuntimeConfig, ConfigError> {
    let mut runtimes = Vec::new();
    for name in &args.runtimes {
        let name = name.trim();
        let add: &[Runtime] = match name {
            "python" => &[Runtime::Python],
            "ruby" => &[Runtime::Ruby],
            "php" => &[Runtime::Php],
            "java" => &[Runtime::Java],
            "node" => &[Runtime::Node],
            "all" => &Runtime::ALL,
            "none" | "" => &[],
            other => return Err(ConfigError::Runtime(other.to_string())),
        };
        for r in add {
            if !runtimes.contains(r) {
                runtimes.push(*r);
            }
        }
    }
    // The default follows the frequency into the range: an out-of-range frequency
    // is the frequency's error, reported by the caller's check, not the rate's.
    let rate = args.rate_hz.unwrap_or(frequency_hz.clamp(1, 1000));
    if rate == 0 || rate > 1000 {
        return Err(ConfigError::RuntimeRate(rate));
    }
    if args.max_children == 0 {
        return Err(ConfigError::RuntimeChildren);
    }
    Ok(RuntimeConfig {
        runtimes,
        rate_hz: rate as u32,
        max_children: args.max_children,
        tools: args.tools,
    })
}

/// Highest sampling rate the kernel allows (it lowers this itself when sampling
/// takes too long).
pub fn max_sample_rate() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100_000)
}

impl RecordConfig {
    /// Checks raw values; creates the output directory.
    pub fn new(
        duration_secs: u64,
        frequency_hz: u64,
        pids: Vec<u32>,
        output_dir: PathBuf,
        include_idle: bool,
        progress: bool,
    ) -> Result<RecordConfig, ConfigError> {
        check_frequency(frequency_hz)?;
        if duration_secs == 0 {
            return Err(ConfigError::Duration);
        }
        check_pids(&pids)?;
        let created_dir = check_output_dir(&output_dir)?;
        // Absolute, so the summary says exactly where the files are.
        let output_dir = output_dir.canonicalize().unwrap_or(output_dir);
        let created_dir = created_dir.map(|d| d.canonicalize().unwrap_or(d));
        Ok(RecordConfig {
            duration: Duration::from_secs(duration_secs),
            frequency_hz,
            pids,
            output_dir,
            include_idle,
            progress,
            ring_buffer_bytes: None,
            runtimes: RuntimeConfig::none(),
            created_dir,
        })
    }
}

/// A sampling frequency the kernel accepts.
pub(crate) fn check_frequency(frequency_hz: u64) -> Result<(), ConfigError> {
    let max = max_sample_rate();
    if frequency_hz == 0 || frequency_hz > max {
        return Err(ConfigError::Frequency {
            got: frequency_hz,
            max,
        });
    }
    Ok(())
}

/// Pids that exist, no more than the kernel filter holds.
pub(crate) fn check_pids(pids: &[u32]) -> Result<(), ConfigError> {
    if pids.len() > MAX_PID_FILTER_ENTRIES as usize {
        return Err(ConfigError::TooManyPids {
            max: MAX_PID_FILTER_ENTRIES,
            got: pids.len(),
        });
    }
    for &pid in pids {
        if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(ConfigError::NoSuchPid { pid });
        }
        // /proc/TID exists for a thread too, but the kernel filters on the process.
        if let Some(tgid) = thread_group_of(pid).filter(|&tgid| tgid != pid) {
            return Err(ConfigError::ThreadId { tid: pid, tgid });
        }
    }
    Ok(())
}

/// The process (thread group) `pid` belongs to, from /proc/PID/status.
fn thread_group_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Creates the directory and proves we can write into it. Returns the outermost
/// directory it created (`None`: `dir` existed).
pub(crate) fn check_output_dir(dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
    let err = |reason: String| ConfigError::OutputDir {
        path: dir.to_path_buf(),
        reason,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(err("exists and is not a directory".into()));
    }
    let created = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .last()
        .map(Path::to_path_buf);
    std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create it: {e}")))?;
    let probe = dir.join(format!(".write-test.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| err(format!("cannot write into it: {e}")))?;
    let _ = std::fs::remove_file(probe);
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directories a record created are removed after a failure if empty; one
    /// that existed, or holds files, stays.
    #[test]
    fn created_output_dirs_are_removed_when_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("a/b");
        let config = RecordConfig::new(1, 97, vec![], out.clone(), false, false).unwrap();
        assert!(out.is_dir());
        assert_eq!(
            config.created_dir.as_deref(),
            Some(tmp.path().join("a").canonicalize().unwrap().as_path())
        );
        config.remove_created_dirs();
        assert!(!tmp.path().join("a").exists());
        assert!(tmp.path().exists());

        let config = RecordConfig::new(1, 97, vec![], out.clone(), false, false).unwrap();
        std::fs::write(out.join("keep"), b"x").unwrap();
        config.remove_created_dirs();
        assert!(out.join("keep").is_file());

        let existing = RecordConfig::new(1, 97, vec![], out.clone(), false, false).unwrap();
        assert_eq!(existing.created_dir, None);
    }

    /// A thread id is refused, naming its process; the process id itself passes.
    #[test]
    fn thread_id_names_its_process() {
        // A thread that stays alive while we check.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let waiting = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() as u32 }).unwrap();
            let _ = rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let pid = std::process::id();
        assert_eq!(
            check_pids(&[tid]),
            Err(ConfigError::ThreadId { tid, tgid: pid })
        );
        assert_eq!(check_pids(&[pid]), Ok(()));
        drop(tx);
        waiting.join().unwrap();
    }

    fn config(
        duration: u64,
        hz: u64,
        pids: Vec<u32>,
        dir: &Path,
    ) -> Result<RecordConfig, ConfigError> {
        RecordConfig::new(duration, hz, pids, dir.to_path_buf(), false, false)
    }

    /// Sensible values pass and the directory is created.
    #[test]
    fn accepts_valid_values() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let c = config(5, 97, vec![std::process::id()], &dir).unwrap();
        assert_eq!(c.duration, Duration::from_secs(5));
        assert!(dir.is_dir());
    }

    /// Zero or absurd frequencies are refused with the kernel's limit in the message.
    #[test]
    fn rejects_bad_frequency() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            config(5, 0, vec![], tmp.path()),
            Err(ConfigError::Frequency { got: 0, .. })
        ));
        assert!(matches!(
            config(5, u64::MAX, vec![], tmp.path()),
            Err(ConfigError::Frequency { .. })
        ));
    }

    fn runtime_args(names: &[&str]) -> RuntimeArgs {
        RuntimeArgs {
            runtimes: names.iter().map(|s| s.to_string()).collect(),
            rate_hz: None,
            max_children: 2,
            tools: ToolPaths::default(),
        }
    }

    /// Runtime lists: names, all, none; the rate defaults to the frequency.
    #[test]
    fn runtime_lists() {
        let c = runtime_config(runtime_args(&["python", "java", "python"]), 97).unwrap();
        assert_eq!(c.runtimes, vec![Runtime::Python, Runtime::Java]);
        assert_eq!(c.rate_hz, 97);
        assert_eq!(
            runtime_config(runtime_args(&["all"]), 99)
                .unwrap()
                .runtimes
                .len(),
            5
        );
        assert!(runtime_config(runtime_args(&["none"]), 99)
            .unwrap()
            .runtimes
            .is_empty());
        assert_eq!(
            runtime_config(runtime_args(&["perl"]), 99),
            Err(ConfigError::Runtime("perl".into()))
        );
        let mut a = runtime_args(&["all"]);
        a.rate_hz = Some(5000);
        assert_eq!(runtime_config(a, 99), Err(ConfigError::RuntimeRate(5000)));
        let mut a = runtime_args(&["all"]);
        a.max_children = 0;
        assert_eq!(runtime_config(a, 99), Err(ConfigError::RuntimeChildren));
        // The default rate stays in range whatever the frequency (the frequency's
        // own check reports a bad one).
        assert_eq!(
            runtime_config(runtime_args(&["all"]), 0).unwrap().rate_hz,
            1
        );
        assert_eq!(
            runtime_config(runtime_args(&["all"]), 4999)
                .unwrap()
                .rate_hz,
            1000
        );
    }

    /// A zero duration is refused.
    #[test]
    fn rejects_zero_duration() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            config(0, 97, vec![], tmp.path()).unwrap_err(),
            ConfigError::Duration
        );
    }

    /// A pid that does not exist is named in the error.
    #[test]
    fn rejects_missing_pid() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            config(5, 97, vec![u32::MAX - 1], tmp.path()).unwrap_err(),
            ConfigError::NoSuchPid { pid: u32::MAX - 1 }
        );
    }

    /// An output path that is a file is refused before anything runs.
    #[test]
    fn rejects_file_as_output_dir() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            config(5, 97, vec![], tmp.path()),
            Err(ConfigError::OutputDir { .. })
        ));
    }
}
