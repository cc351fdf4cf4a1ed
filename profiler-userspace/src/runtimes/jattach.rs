//! jattach: asking a JVM to write its perf map, and deciding when to ask again.
//!
//! `jattach PID jcmd Compiler.perfmap` makes HotSpot write `/tmp/perf-NSPID.map` (in
//! the JVM's own /tmp and pid namespace; jattach enters them itself, so it takes the
//! pid as we see it). The file is a one-time snapshot of the code cache: methods
//! compiled later are missing until it is written again. Each request stops the JVM at
//! a safepoint, so it is rate limited.
//!
//! [`refresh_decision`] is a pure function over two [`JitSnapshot`]s (the one taken
//! right after the last refresh, and now); [`JitSnapshot::capture`] reads one from
//! /proc. [`attach_check`] says whether jattach may touch a JVM at all: when the JVM
//! has no attach socket yet, jattach sends it SIGQUIT, which kills a JVM that does not
//! handle that signal yet (still starting up) and makes one started with
//! `-XX:+DisableAttachMechanism` print a full thread dump to its own stdout. Must
//! never: run jattach (the supervisor does).

use std::{
    ffi::OsString,
    io::Read as _,
    os::unix::fs::FileTypeExt as _,
    time::{Duration, Instant},
};

use procfs::process::{MMPermissions, MMapPath, Process};

use super::{
    detect::{DetectError, TargetProcess},
    perfmap::{perf_map_stamp, FileStamp, PerfMapError},
};

/// The executable's name.
pub const PROGRAM: &str = "jattach";
/// Least time between two refreshes of one JVM: each stops it at a safepoint and
/// rewrites the whole map.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Most time a map may go unrefreshed while the JVM runs: code compiled into already
/// committed code cache does not show as growth.
pub const MAX_MAP_AGE: Duration = Duration::from_secs(120);
/// Growth of executable anonymous memory (the code cache) that triggers a refresh.
pub const CODE_GROWTH_BYTES: u64 = 256 << 10;

/// `PID jcmd Compiler.perfmap`: the arguments of jattach that make the JVM write its
/// perf map.
pub fn perfmap_args(pid: u32) -> Vec<OsString> {
    vec![
        pid.to_string().into(),
        "jcmd".into(),
        "Compiler.perfmap".into(),
    ]
}

/// Most bytes read of a JVM's `/proc/PID/cmdline` or `/proc/PID/environ` when looking
/// for `-XX:+DisableAttachMechanism` (options past it are not seen).
pub const MAX_OPTIONS_BYTES: u64 = 256 << 10;
/// `SIGQUIT`, the signal jattach sends a JVM that has no attach socket yet.
const SIGQUIT: u32 = 3;
/// Environment variables whose JVM options HotSpot reads, in its order: the
/// command line comes between `JDK_JAVA_OPTIONS` and `_JAVA_OPTIONS`.
const OPTIONS_BEFORE_COMMAND_LINE: [&str; 2] = ["JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS"];
const OPTIONS_AFTER_COMMAND_LINE: &str = "_JAVA_OPTIONS";

/// Whether jattach may be run against a JVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachCheck {
    /// Its attach socket exists (jattach connects, no signal), or it handles
    /// SIGQUIT (which starts its attach listener).
    Safe,
    /// Started with `-XX:+DisableAttachMechanism`: SIGQUIT would only make it print
    /// a thread dump to its stdout, every time we asked. Permanent for the process.
    Disabled,
    /// No attach socket and no SIGQUIT handler yet (starting up, or signals reduced
    /// by `-Xrs` before its listener is up): SIGQUIT would kill it. Asked again
    /// later.
    NotReady,
}

/// Whether jattach may be run against `target`, decided as jattach and the JDK's
/// own attach code do (JDK-8279124): the socket
/// `/proc/PID/root/tmp/.java_pidNSPID` first, then the `SigCgt` mask of
/// /proc/PID/status; `-XX:+DisableAttachMechanism` in the command line or the option
/// variables of its environment refuses for good. Unreadable entries give
/// [`AttachCheck::NotReady`]: when in doubt, no signal.
pub fn attach_check(target: &TargetProcess) -> AttachCheck {
    let pid = target.pid;
    if attach_disabled(pid) {
        return AttachCheck::Disabled;
    }
    let socket = format!("/proc/{pid}/root/tmp/.java_pid{}", target.ns_pid);
    if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
        return AttachCheck::Safe;
    }
    let handles_sigquit = i32::try_from(pid)
        .ok()
        .and_then(|p| Process::new(p).ok()?.status().ok())
        .is_some_and(|status| handles_signal(status.sigcgt, SIGQUIT));
    if handles_sigquit {
        AttachCheck::Safe
    } else {
        AttachCheck::NotReady
    }
}

/// Whether signal `signal` (1-based) is set in a /proc `SigCgt`-style mask.
fn handles_signal(mask: u64, signal: u32) -> bool {
    (1..=64).contains(&signal) && mask & (1 << (signal - 1)) != 0
}

/// Whether process `pid`'s JVM options disable the attach mechanism.
fn attach_disabled(pid: u32) -> bool {
    let read = |entry: &str| -> Vec<u8> {
        let mut bytes = Vec::new();
        if let Ok(file) = std::fs::File::open(format!("/proc/{pid}/{entry}")) {
            let _ = file.take(MAX_OPTIONS_BYTES).read_to_end(&mut bytes);
        }
        bytes
    };
    let environ = read("environ");
    let cmdline = read("cmdline");
    attach_disabled_by(&environ, &cmdline)
}

/// Whether the options in a NUL-separated `environ` and `cmdline` leave
/// `-XX:+DisableAttachMechanism` on: HotSpot reads `JAVA_TOOL_OPTIONS`,
/// `JDK_JAVA_OPTIONS`, the command line, then `_JAVA_OPTIONS`, the last setting
/// winning. Options after the main class are the program's, but a program argument
/// spelled like this flag is rare enough to read as one (we then leave the JVM
/// alone, which is the safe side).
fn attach_disabled_by(environ: &[u8], cmdline: &[u8]) -> bool {
    let variable = |name: &str| -> Vec<&[u8]> {
        environ
            .split(|&b| b == 0)
            .find_map(|entry| entry.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
            .map(|value| value.split(u8::is_ascii_whitespace).collect())
            .unwrap_or_default()
    };
    let mut options: Vec<&[u8]> = Vec::new();
    for name in OPTIONS_BEFORE_COMMAND_LINE {
        options.extend(variable(name));
    }
    options.extend(cmdline.split(|&b| b == 0));
    options.extend(variable(OPTIONS_AFTER_COMMAND_LINE));
    options
        .iter()
        .fold(false, |disabled, option| match *option {
            b"-XX:+DisableAttachMechanism" => true,
            b"-XX:-DisableAttachMechanism" => false,
            _ => disabled,
        })
}

/// What a JVM's JIT state looked like at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JitSnapshot {
    /// When it was taken.
    pub at: Instant,
    /// The perf map file, if there is one.
    pub perf_map: Option<FileStamp>,
    /// Anonymous executable mappings (the JIT code cache and stubs).
    pub code_mappings: u64,
    /// Their total size in bytes.
    pub code_bytes: u64,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The process's mappings could not be read.
    #[error(transparent)]
    Process(#[from] DetectError),
    /// The perf map could not be looked at safely.
    #[error(transparent)]
    PerfMap(#[from] PerfMapError),
}

impl JitSnapshot {
    /// Reads the code cache's mappings and the perf map's stamp of `target`.
    pub fn capture(target: &TargetProcess, at: Instant) -> Result<Self, SnapshotError> {
        let pid = target.pid;
        let error = |e: procfs::ProcError| match e {
            procfs::ProcError::NotFound(_) => DetectError::Gone { pid },
            source => DetectError::Unreadable {
                pid,
                entry: "maps",
                source,
            },
        };
        let process = Process::new(i32::try_from(pid).map_err(|_| DetectError::Gone { pid })?)
            .map_err(error)?;
        let maps = process.maps().map_err(error)?;
        let (mut code_mappings, mut code_bytes) = (0u64, 0u64);
        for map in maps.iter() {
            if matches!(map.pathname, MMapPath::Anonymous)
                && map.perms.contains(MMPermissions::EXECUTE)
            {
                code_mappings += 1;
                code_bytes = code_bytes.saturating_add(map.address.1.saturating_sub(map.address.0));
            }
        }
        let perf_map = perf_map_stamp(pid, target.ns_pid, || Some(target.uid))?;
        if !target.is_alive() {
            return Err(DetectError::Gone { pid }.into());
        }
        Ok(JitSnapshot {
            at,
            perf_map,
            code_mappings,
            code_bytes,
        })
    }
}

/// When to refresh; [`Default`] gives the named constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// See [`MIN_REFRESH_INTERVAL`].
    pub min_interval: Duration,
    /// See [`MAX_MAP_AGE`].
    pub max_age: Duration,
    /// See [`CODE_GROWTH_BYTES`].
    pub growth_bytes: u64,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            min_interval: MIN_REFRESH_INTERVAL,
            max_age: MAX_MAP_AGE,
            growth_bytes: CODE_GROWTH_BYTES,
        }
    }
}

/// Why the map should be written again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshReason {
    /// It was never written by us (a file already there may be a previous JVM's that
    /// had the same namespace pid).
    NeverRefreshed,
    /// The file is gone (a /tmp cleaner, or the JVM's own cleanup).
    Missing,
    /// The file is not the one we had written: replaced, or truncated.
    Replaced,
    /// The code cache gained mappings or grew by the policy's threshold.
    CodeGrew { from_bytes: u64, to_bytes: u64 },
    /// It is older than the policy's maximum age.
    Stale,
}

/// Whether to run jattach again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshDecision {
    /// The map is as good as a new one would be, or it is too soon to ask.
    Keep,
    /// Ask the JVM to write its map again.
    Refresh(RefreshReason),
}

/// Compares `now` with `last_refresh` (the snapshot taken right after the last
/// refresh, `None` if there was none).
pub fn refresh_decision(
    last_refresh: Option<&JitSnapshot>,
    now: &JitSnapshot,
    policy: &RefreshPolicy,
) -> RefreshDecision {
    let Some(last) = last_refresh else {
        return RefreshDecision::Refresh(RefreshReason::NeverRefreshed);
    };
    let age = now.at.saturating_duration_since(last.at);
    if age < policy.min_interval {
        return RefreshDecision::Keep;
    }
    let Some(map) = now.perf_map else {
        return RefreshDecision::Refresh(RefreshReason::Missing);
    };
    if last
        .perf_map
        .is_some_and(|was| was.ino != map.ino || map.size < was.size)
    {
        return RefreshDecision::Refresh(RefreshReason::Replaced);
    }
    if now.code_mappings > last.code_mappings
        || now.code_bytes >= last.code_bytes.saturating_add(policy.growth_bytes)
    {
        return RefreshDecision::Refresh(RefreshReason::CodeGrew {
            from_bytes: last.code_bytes,
            to_bytes: now.code_bytes,
        });
    }
    if age >= policy.max_age {
        return RefreshDecision::Refresh(RefreshReason::Stale);
    }
    RefreshDecision::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last setting wins, in HotSpot's order of sources.
    #[test]
    fn disable_attach_mechanism_last_setting_wins() {
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        let plain = cmd(&["java", "-cp", ".", "Main"]);
        let disabled = cmd(&["java", "-XX:+DisableAttachMechanism", "Main"]);
        assert!(!attach_disabled_by(b"", &plain));
        assert!(attach_disabled_by(b"", &disabled));
        assert!(attach_disabled_by(
            b"HOME=/\0JAVA_TOOL_OPTIONS=-Xmx1g -XX:+DisableAttachMechanism\0",
            &plain
        ));
        assert!(!attach_disabled_by(
            b"JAVA_TOOL_OPTIONS=-XX:+DisableAttachMechanism\0",
            &cmd(&["java", "-XX:-DisableAttachMechanism", "Main"])
        ));
        assert!(!attach_disabled_by(
            b"_JAVA_OPTIONS=-XX:-DisableAttachMechanism\0",
            &disabled
        ));
        // A variable whose name merely ends like one of them is not read.
        assert!(!attach_disabled_by(
            b"MY_JAVA_TOOL_OPTIONS=-XX:+DisableAttachMechanism\0",
            &plain
        ));
    }

    /// SIGQUIT is bit 2 of SigCgt (signals are 1-based); out-of-range signals are
    /// never handled.
    #[test]
    fn sigquit_bit_of_sigcgt() {
        // A JVM with -Xrs before its listener is up (read on JDK 17 here).
        assert!(!handles_signal(0x0000_0001_0100_1cc8, SIGQUIT));
        assert!(handles_signal(0x0000_0001_0100_1ccc, SIGQUIT));
        assert!(!handles_signal(u64::MAX, 0));
        assert!(!handles_signal(u64::MAX, 65));
    }

    /// Our own test process handles no SIGQUIT and has no attach socket: jattach
    /// would kill it.
    #[test]
    fn process_without_sigquit_handler_is_not_ready() {
        let target = super::super::detect::detect(std::process::id()).unwrap();
        assert_eq!(attach_check(&target), AttachCheck::NotReady);
    }

    fn stamp(size: u64, ino: u64) -> FileStamp {
        FileStamp {
            size,
            mtime_ns: 1,
            ino,
            uid: 0,
        }
    }

    fn snap(
        at: Instant,
        perf_map: Option<FileStamp>,
        code_mappings: u64,
        code_bytes: u64,
    ) -> JitSnapshot {
        JitSnapshot {
            at,
            perf_map,
            code_mappings,
            code_bytes,
        }
    }

    /// The argument list is exactly `PID jcmd Compiler.perfmap`.
    #[test]
    fn args() {
        assert_eq!(
            perfmap_args(1234),
            ["1234", "jcmd", "Compiler.perfmap"].map(OsString::from)
        );
    }

    /// Each rule of the decision, in order: first time, rate limit, missing, replaced,
    /// growth, age, otherwise keep.
    #[test]
    fn decisions() {
        let p = RefreshPolicy::default();
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(30);
        let base = snap(t0, Some(stamp(1000, 7)), 3, 1 << 20);
        use RefreshDecision::*;
        assert_eq!(
            refresh_decision(None, &base, &p),
            Refresh(RefreshReason::NeverRefreshed)
        );
        // Too soon: even a missing file waits.
        let soon = snap(t0 + Duration::from_secs(1), None, 9, 9 << 20);
        assert_eq!(refresh_decision(Some(&base), &soon, &p), Keep);
        assert_eq!(
            refresh_decision(Some(&base), &snap(later, None, 3, 1 << 20), &p),
            Refresh(RefreshReason::Missing)
        );
        assert_eq!(
            refresh_decision(
                Some(&base),
                &snap(later, Some(stamp(1000, 8)), 3, 1 << 20),
                &p
            ),
            Refresh(RefreshReason::Replaced)
        );
        assert_eq!(
            refresh_decision(
                Some(&base),
                &snap(later, Some(stamp(10, 7)), 3, 1 << 20),
                &p
            ),
            Refresh(RefreshReason::Replaced)
        );
        let grew = snap(
            later,
            Some(stamp(1000, 7)),
            3,
            (1 << 20) + CODE_GROWTH_BYTES,
        );
        assert_eq!(
            refresh_decision(Some(&base), &grew, &p),
            Refresh(RefreshReason::CodeGrew {
                from_bytes: 1 << 20,
                to_bytes: (1 << 20) + CODE_GROWTH_BYTES
            })
        );
        assert!(matches!(
            refresh_decision(
                Some(&base),
                &snap(later, Some(stamp(1000, 7)), 4, 1 << 20),
                &p
            ),
            Refresh(RefreshReason::CodeGrew { .. })
        ));
        let small_growth = snap(later, Some(stamp(1000, 7)), 3, (1 << 20) + 4096);
        assert_eq!(refresh_decision(Some(&base), &small_growth, &p), Keep);
        let old = snap(t0 + MAX_MAP_AGE, Some(stamp(1000, 7)), 3, 1 << 20);
        assert_eq!(
            refresh_decision(Some(&base), &old, &p),
            Refresh(RefreshReason::Stale)
        );
        // The code cache shrinking (methods flushed) is no reason by itself.
        assert_eq!(
            refresh_decision(
                Some(&base),
                &snap(later, Some(stamp(1000, 7)), 2, 1 << 19),
                &p
            ),
            Keep
        );
    }

    /// A snapshot of a real (native) process reads, without a perf map; a reaped child
    /// is gone.
    #[test]
    fn capture_real_process() {
        let me = super::super::detect::detect(std::process::id()).unwrap();
        let s = JitSnapshot::capture(&me, Instant::now()).unwrap();
        assert_eq!(s.perf_map, None);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let mut gone = me.clone();
        gone.pid = child.id();
        child.wait().unwrap();
        assert!(JitSnapshot::capture(&gone, Instant::now()).is_err());
    }
}
