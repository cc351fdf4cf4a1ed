//! Which interpreted runtime a process runs, from its executable and mappings in /proc.
//!
//! [`detect`] reads `/proc/PID/{stat,status,exe,maps}` and asks [`classify`], which is
//! pure (it takes the executable path and the mapped file paths) so every rule is
//! unit-tested without real processes. It also captures what later stages need to
//! trust files the process writes: its uid, its pid inside its own pid namespace, its
//! start time (which tells a reused pid from this process) and the identity of its
//! executable (which tells an exec: `exec python3 app.py` from a shell keeps the pid
//! and the start time).
//!
//! Must never: panic on a process that vanished or an entry we may not read (both
//! are typed errors), or keep the mapping list (it is read, classified and dropped).

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use procfs::process::{MMapPath, Process};

use super::{
    perfmap::{perf_map_stamp, FileStamp, PerfMapError},
    Runtime,
};
use crate::process::exe_id;

/// A process whose runtime was looked at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetProcess {
    /// Pid in our pid namespace.
    pub pid: u32,
    /// Pid inside the process's own pid namespace (last `NSpid:` field of
    /// /proc/PID/status): the number in the name of the `/tmp/perf-PID.map` it writes.
    pub ns_pid: u32,
    /// Effective uid: the owner of files the process creates (its perf map).
    pub uid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
    /// Executable path, when readable (kernel threads have none).
    pub exe: Option<PathBuf>,
    /// Device and inode of the executable, through `/proc/PID/exe` (`None` when
    /// unreadable): an exec changes them while pid and start time stay.
    pub exe_id: Option<(u64, u64)>,
    /// The runtime, or `None` for native code.
    pub runtime: Option<Runtime>,
}

impl TargetProcess {
    /// Whether `pid` still belongs to this process running the same executable: it did
    /// not exit (or exit and have its pid reused), nor exec another program (a shell
    /// that runs `exec python3 app.py` becomes another runtime under the same pid and
    /// start time). A runtime library loaded later (a `dlopen` of libpython) is not
    /// seen: such a process stays what it was first classified as.
    pub fn is_alive(&self) -> bool {
        start_time(self.pid).is_ok_and(|t| t == self.start_time) && exe_id(self.pid) == self.exe_id
    }
}

/// Why a process could not be looked at.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The process exited (or never existed) before or while we read it.
    #[error("process {pid} is gone")]
    Gone { pid: u32 },
    /// A /proc entry of the process exists but could not be read (permission, or a
    /// kernel without the entry).
    #[error("cannot read /proc/{pid}/{entry}: {source}")]
    Unreadable {
        pid: u32,
        entry: &'static str,
        source: procfs::ProcError,
    },
}

/// Times [`detect`] reads a process again that exec'd while it was read.
const DETECT_ATTEMPTS: usize = 3;

/// Looks at process `pid`: its runtime, uid, namespace pid, start time and executable.
pub fn detect(pid: u32) -> Result<TargetProcess, DetectError> {
    // A process that execs while it is read (a shim, such as pyenv's, execs the
    // interpreter right after it starts) is read again.
    for _ in 0..DETECT_ATTEMPTS {
        if let Some(target) = detect_once(pid)? {
            return Ok(target);
        }
    }
    Err(DetectError::Gone { pid })
}

/// [`detect`] once; `None`: the process exec'd meanwhile.
fn detect_once(pid: u32) -> Result<Option<TargetProcess>, DetectError> {
    // First: everything read after it describes this executable or a later one, which
    // the check at the end tells.
    let exe_id = exe_id(pid);
    let error = |entry: &'static str| {
        move |e: procfs::ProcError| match e {
            procfs::ProcError::NotFound(_) => DetectError::Gone { pid },
            source => DetectError::Unreadable { pid, entry, source },
        }
    };
    let process =
        Process::new(pid_arg(pid).ok_or(DetectError::Gone { pid })?).map_err(error(""))?;
    let stat = process.stat().map_err(error("stat"))?;
    let status = process.status().map_err(error("status"))?;
    // exe is unreadable for kernel threads, zombies and (without ptrace rights) others:
    // the mappings still tell the runtime.
    let exe = process.exe().ok();
    let maps = process.maps().map_err(error("maps"))?;
    let ns_pid = ns_pid_of(&status, pid);
    // Through the same no-symlink path and owner check the reader uses; any refusal
    // means "none" (a map anyone could plant in /tmp must not make a process Node).
    let has_perf_map = matches!(
        perf_map_stamp(pid, ns_pid, || Some(status.euid)),
        Ok(Some(_))
    );
    let paths = maps.iter().filter_map(|m| match &m.pathname {
        MMapPath::Path(p) => Some(p.as_path()),
        _ => None,
    });
    let runtime = classify(exe.as_deref(), paths, has_perf_map);
    let target = TargetProcess {
        pid,
        ns_pid,
        uid: status.euid,
        start_time: stat.starttime,
        exe,
        exe_id,
        runtime,
    };
    // Everything above must describe one process: if the pid was reused meanwhile,
    // report the one we started with as gone; if it exec'd, read it again.
    if start_time(pid)? != target.start_time {
        return Err(DetectError::Gone { pid });
    }
    Ok(target.is_alive().then_some(target))
}

/// The stamp of process `pid`'s `/tmp/perf-PID.map` (`None`: it has none), for a
/// fraction of what [`detect`] costs: it finds the namespace pid (see `ns_pid`) and
/// looks the file up through the no-symlink path the reader uses, but reads neither
/// the mappings (thousands of lines for a JVM) nor the map. A map that is not a
/// regular file with one link owned by the process's effective uid is refused here
/// (anyone may create `/tmp/perf-PID.map` for someone else's pid). A process that is
/// gone is [`PerfMapError::Gone`].
pub fn perf_map_of(pid: u32) -> Result<Option<FileStamp>, PerfMapError> {
    let ns_pid = ns_pid(pid).ok_or(PerfMapError::Gone { pid })?;
    // Most processes have no map: the owner is looked up only when there is one.
    perf_map_stamp(pid, ns_pid, || euid(pid))
}

/// Effective uid of process `pid`. The owner of /proc/PID is that uid, except for
/// a process made non-dumpable (it is root then): that case reads
/// /proc/PID/status.
fn euid(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let owner = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
    if owner != 0 {
        return Some(owner);
    }
    Some(Process::new(pid_arg(pid)?).ok()?.status().ok()?.euid)
}

/// The pid of `pid` inside its own pid namespace. A process in our namespace (most of
/// a host) has the same number, which two readlinks tell; only one in another
/// namespace costs a read of /proc/PID/status, which the kernel builds line by line
/// (~15 us here, against ~2 us for the links).
fn ns_pid(pid: u32) -> Option<u32> {
    static OURS: OnceLock<Option<PathBuf>> = OnceLock::new();
    let ours = OURS.get_or_init(|| std::fs::read_link("/proc/self/ns/pid").ok());
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    if theirs.is_some() && theirs == *ours {
        return Some(pid);
    }
    let status = Process::new(pid_arg(pid)?).ok()?.status().ok()?;
    Some(ns_pid_of(&status, pid))
}

/// The pid inside the process's own pid namespace: the last `NSpid:` field.
fn ns_pid_of(status: &procfs::process::Status, pid: u32) -> u32 {
    status
        .nspid
        .as_ref()
        .and_then(|ids| ids.last())
        .and_then(|&id| u32::try_from(id).ok())
        .unwrap_or(pid)
}

/// Start time (clock ticks since boot) of process `pid`.
pub fn start_time(pid: u32) -> Result<u64, DetectError> {
    let gone = |_| DetectError::Gone { pid };
    let process = Process::new(pid_arg(pid).ok_or(DetectError::Gone { pid })?).map_err(gone)?;
    Ok(process.stat().map_err(gone)?.starttime)
}

fn pid_arg(pid: u32) -> Option<i32> {
    i32::try_from(pid).ok().filter(|&p| p > 0)
}

/// The runtime of a process from its executable path, the paths of the files it maps
/// and whether it has a `/tmp/perf-PID.map`. `None` means native code.
///
/// The executable's name decides first (`python3.11`, `java`, `php-fpm8.2`, `ruby`,
/// `node`); then a mapped runtime library (`libjvm.so`, `libpython*.so*`,
/// `libphp*.so`, `libruby*.so*`), which catches embedders such as uwsgi or mod_php;
/// last, a perf map names the process Node (whose `--perf-basic-prof` writes one; a
/// JVM's comes through jattach and is found by `libjvm.so` first).
pub fn classify<I, P>(exe: Option<&Path>, mappings: I, has_perf_map: bool) -> Option<Runtime>
where
    I: IntoIterator<Item = P>,
    P: AsRef<Path>,
{
    if let Some(runtime) = exe.and_then(file_name).and_then(runtime_of_executable) {
        return Some(runtime);
    }
    // Strongest library evidence wins whatever the mapping order.
    let mut found: Option<Runtime> = None;
    for path in mappings {
        let Some(runtime) = file_name(path.as_ref()).and_then(runtime_of_library) else {
            continue;
        };
        if runtime == Runtime::Java {
            return Some(runtime);
        }
        found.get_or_insert(runtime);
    }
    found.or(has_perf_map.then_some(Runtime::Node))
}

/// Last path component, without the ` (deleted)` the kernel appends to removed files.
fn file_name(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    Some(name.strip_suffix(" (deleted)").unwrap_or(name))
}

/// `prefix` alone or followed by a version: `python3`, `python3.11`, `php8.2`.
fn is_versioned(name: &str, prefix: &str) -> bool {
    match name.strip_prefix(prefix) {
        Some("") => true,
        Some(v) => {
            v.starts_with(|c: char| c.is_ascii_digit())
                && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && !v.ends_with('.')
        }
        None => false,
    }
}

fn runtime_of_executable(name: &str) -> Option<Runtime> {
    if is_versioned(name, "python") {
        Some(Runtime::Python)
    } else if name == "java" {
        Some(Runtime::Java)
    } else if ["php", "php-fpm", "php-cgi"]
        .iter()
        .any(|p| is_versioned(name, p))
    {
        Some(Runtime::Php)
    } else if is_versioned(name, "ruby") {
        Some(Runtime::Ruby)
    } else if name == "node" || name == "nodejs" {
        Some(Runtime::Node)
    } else {
        None
    }
}

/// `libjvm.so`, `libpython3.11.so.1.0`, `libphp8.2.so`, `libruby-3.1.so.3.1`.
fn runtime_of_library(name: &str) -> Option<Runtime> {
    let shared = |lib: &str| {
        name.strip_prefix(lib)
            .and_then(|rest| rest.find(".so").map(|i| (&rest[..i], &rest[i + 3..])))
            .filter(|(_, after)| after.is_empty() || after.starts_with('.'))
            .map(|(version, _)| version)
    };
    if name == "libjvm.so" {
        Some(Runtime::Java)
    } else if shared("libpython").is_some() {
        Some(Runtime::Python)
    } else if shared("libphp").is_some() {
        Some(Runtime::Php)
    } else if shared("libruby").is_some() {
        Some(Runtime::Ruby)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        process::{Child, Command},
        time::{Duration, Instant},
    };

    fn classify_paths(exe: &str, maps: &[&str], perf_map: bool) -> Option<Runtime> {
        classify(Some(Path::new(exe)), maps.iter().map(Path::new), perf_map)
    }

    /// Executable names decide: versioned interpreters count, look-alikes do not.
    #[test]
    fn executables() {
        for (exe, want) in [
            ("/usr/bin/python3", Some(Runtime::Python)),
            ("/usr/bin/python", Some(Runtime::Python)),
            (
                "/root/.pyenv/versions/3.11.7/bin/python3.11",
                Some(Runtime::Python),
            ),
            ("/usr/bin/python2.7 (deleted)", Some(Runtime::Python)),
            (
                "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                Some(Runtime::Java),
            ),
            ("/usr/bin/php8.2", Some(Runtime::Php)),
            ("/usr/sbin/php-fpm8.2", Some(Runtime::Php)),
            ("/usr/bin/php-cgi", Some(Runtime::Php)),
            ("/usr/bin/ruby3.1", Some(Runtime::Ruby)),
            ("/usr/bin/node", Some(Runtime::Node)),
            ("/usr/bin/nodejs", Some(Runtime::Node)),
            ("/usr/bin/python3-config", None),
            ("/usr/bin/python3.", None),
            ("/usr/bin/pythonista", None),
            ("/usr/bin/phpstorm", None),
            ("/usr/bin/rubyfmt", None),
            ("/usr/bin/sleep", None),
            ("/usr/bin/javac", None),
        ] {
            assert_eq!(classify_paths(exe, &[], false), want, "{exe}");
        }
    }

    /// Runtime libraries mapped by another executable name the runtime; libjvm wins.
    #[test]
    fn libraries() {
        let uwsgi = "/usr/bin/uwsgi";
        let py = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0";
        let jvm = "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so";
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        assert_eq!(
            classify_paths(uwsgi, &[libc, py], false),
            Some(Runtime::Python)
        );
        assert_eq!(
            classify_paths(uwsgi, &[py, jvm], false),
            Some(Runtime::Java)
        );
        assert_eq!(
            classify_paths(
                "/usr/sbin/apache2",
                &["/usr/lib/apache2/modules/libphp8.2.so"],
                false
            ),
            Some(Runtime::Php)
        );
        assert_eq!(
            classify_paths("/usr/bin/app", &["/usr/lib/libruby-3.1.so.3.1"], false),
            Some(Runtime::Ruby)
        );
        assert_eq!(
            classify_paths("/usr/bin/app", &["/usr/lib/libruby.so.3.1"], false),
            Some(Runtime::Ruby)
        );
        assert_eq!(
            classify_paths("/usr/bin/app", &["/usr/lib/libpythonista.sox"], false),
            None
        );
        assert_eq!(
            classify_paths("/usr/bin/app", &["/usr/lib/libjvm.so.bak"], false),
            None
        );
        assert_eq!(classify_paths("/usr/bin/app", &[libc], false), None);
    }

    /// A perf map names a process Node only when nothing stronger does.
    #[test]
    fn perf_map_means_node_last() {
        assert_eq!(
            classify_paths("/opt/app/server", &[], true),
            Some(Runtime::Node)
        );
        let jvm = "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so";
        assert_eq!(
            classify_paths("/opt/app/launcher", &[jvm], true),
            Some(Runtime::Java)
        );
        assert_eq!(classify(None, Vec::<&Path>::new(), false), None);
    }

    /// Kills and reaps its child on drop, whatever the test did.
    struct Spawned(Child);

    impl Drop for Spawned {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Detects until the answer is stable: `python3` may be a shim (pyenv) that execs
    /// the interpreter a moment after it starts.
    fn detect_eventually(pid: u32, want: Option<Runtime>) -> TargetProcess {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let target = detect(pid).unwrap();
            if target.runtime == want || Instant::now() > deadline {
                return target;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A real python3 child is Python and a real `sleep` child is native; both carry our
    /// uid, their namespace pid and a start time that tells them alive.
    #[test]
    fn real_children() {
        let python = Spawned(
            Command::new("python3")
                .args(["-c", "import time; time.sleep(5)"])
                .spawn()
                .expect("python3 is needed for this test"),
        );
        let sleep = Spawned(Command::new("sleep").arg("5").spawn().unwrap());
        let py = detect_eventually(python.0.id(), Some(Runtime::Python));
        assert_eq!(py.runtime, Some(Runtime::Python), "{py:?}");
        let native = detect(sleep.0.id()).unwrap();
        assert_eq!(native.runtime, None, "{native:?}");
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        for t in [&py, &native] {
            assert_eq!(t.uid, uid);
            assert_eq!(t.ns_pid, t.pid, "same pid namespace as the test");
            assert!(t.start_time > 0);
            assert!(t.is_alive());
        }
    }

    /// `perf_map_of` sees a map the process's namespace pid names, and nothing for a
    /// process without one or a pid that cannot exist.
    #[test]
    fn perf_map_of_looks_up_the_file() {
        let sleep = Spawned(Command::new("sleep").arg("5").spawn().unwrap());
        let pid = sleep.0.id();
        assert!(matches!(perf_map_of(pid), Ok(None)));
        let path = format!("/tmp/perf-{pid}.map");
        std::fs::write(&path, "7f0000001000 10 jitted\n").unwrap();
        let found = perf_map_of(pid);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(found.unwrap().map(|stamp| stamp.size), Some(23));
        assert!(matches!(
            perf_map_of(0x3fff_fff0),
            Err(PerfMapError::Gone { .. })
        ));
        assert!(matches!(perf_map_of(0), Err(PerfMapError::Gone { .. })));
    }

    /// A map planted for someone else's pid (owned by another uid, as any user can
    /// create `/tmp/perf-PID.map`) neither makes the process Node nor gives a stamp
    /// (which would have its map looked at every interval); its own map does.
    #[test]
    fn planted_perf_map_is_ignored() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: chown needs root");
            return;
        }
        let sleep = Spawned(Command::new("sleep").arg("5").spawn().unwrap());
        let pid = sleep.0.id();
        let path = format!("/tmp/perf-{pid}.map");
        std::fs::write(&path, "7f0000001000 10 jitted\n").unwrap();
        let own = (detect(pid).unwrap().runtime, perf_map_of(pid));
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let planted = (detect(pid).unwrap().runtime, perf_map_of(pid));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(own.0, Some(Runtime::Node));
        assert!(matches!(own.1, Ok(Some(_))), "{:?}", own.1);
        assert_eq!(planted.0, None, "a planted map made it Node");
        assert!(
            matches!(
                planted.1,
                Err(PerfMapError::WrongOwner { owner: 65534, .. })
            ),
            "{:?}",
            planted.1
        );
    }

    /// A process that execs another program is no longer the one detected, although
    /// its pid and start time stay; detecting it again sees the new executable.
    #[test]
    fn exec_is_noticed() {
        use std::io::Write as _;
        let mut sh = Spawned(
            Command::new("sh")
                .args(["-c", "read go; exec sleep 5"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let pid = sh.0.id();
        let before = detect(pid).unwrap();
        assert!(before.is_alive());
        assert!(before.exe_id.is_some(), "{before:?}");
        writeln!(sh.0.stdin.as_mut().unwrap(), "go").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while before.is_alive() {
            assert!(Instant::now() < deadline, "the exec was never noticed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let after = detect(pid).unwrap();
        assert_eq!(after.start_time, before.start_time);
        assert_ne!(after.exe_id, before.exe_id);
        assert!(after.exe.unwrap().ends_with("sleep"));
    }

    /// A process in another pid namespace is looked up by the pid it has there: a
    /// `sleep` that is pid 1 of its own namespace finds `/tmp/perf-1.map`, not the map
    /// named by its pid here.
    #[test]
    fn perf_map_of_uses_the_namespace_pid() {
        let unshare = Spawned(
            Command::new("unshare")
                .args(["--pid", "--fork", "--kill-child", "sleep", "10"])
                .spawn()
                .expect("unshare (util-linux) is needed for this test"),
        );
        let parent = unshare.0.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let child = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                    .unwrap_or_default();
            let child = children
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok());
            if let Some(pid) = child {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "sleep" {
                    break pid;
                }
            }
            assert!(Instant::now() < deadline, "unshare started no sleep");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(detect(child).unwrap().ns_pid, 1);
        let host_named = format!("/tmp/perf-{child}.map");
        std::fs::write(&host_named, "7f0000001000 10 jitted\n").unwrap();
        let by_host_pid = matches!(perf_map_of(child), Ok(Some(_)));
        std::fs::remove_file(&host_named).unwrap();
        assert!(
            !by_host_pid,
            "the map named by the host pid is not the process's"
        );
        std::fs::write("/tmp/perf-1.map", "7f0000001000 10 jitted\n").unwrap();
        let by_ns_pid = matches!(perf_map_of(child), Ok(Some(_)));
        std::fs::remove_file("/tmp/perf-1.map").unwrap();
        assert!(by_ns_pid);
    }

    /// A reaped child, and a pid that cannot exist, are `Gone`, not a panic.
    #[test]
    fn vanished_process_is_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // The pid could be reused in between; then it is simply another process.
        if let Err(e) = detect(pid) {
            assert!(matches!(e, DetectError::Gone { pid: p } if p == pid), "{e}");
        }
        assert!(matches!(detect(0), Err(DetectError::Gone { pid: 0 })));
        assert!(matches!(detect(u32::MAX), Err(DetectError::Gone { .. })));
        assert!(matches!(detect(0x3fff_fff0), Err(DetectError::Gone { .. })));
    }
}
