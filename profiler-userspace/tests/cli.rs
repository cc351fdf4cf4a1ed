//! The `profiler` binary as a user runs it: help text, bad flags, missing
//! privileges, and Ctrl-C. Needs root for the recording tests.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

const PROFILER: &str = env!("CARGO_BIN_EXE_profiler");

fn profiler(args: &[&str]) -> Output {
    Command::new(PROFILER)
        .args(args)
        .env("COLUMNS", "100")
        .output()
        .expect("run profiler")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `profiler COMMAND --help` matches tests/snapshots/COMMAND-help.txt (regenerate
/// with UPDATE_SNAPSHOTS=1 after an intended change).
fn help_snapshot(command: &str) {
    let out = profiler(&[command, "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{command}-help.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path).expect("snapshot exists");
    assert_eq!(
        text, expected,
        "help changed; rerun with UPDATE_SNAPSHOTS=1 if intended"
    );
}

/// The record command's help is as documented.
#[test]
fn record_help_snapshot() {
    help_snapshot("record");
}

/// The agent command's help is as documented.
#[test]
fn agent_help_snapshot() {
    help_snapshot("agent");
}

/// An unknown flag is a usage error (exit 2) that names the flag.
#[test]
fn unknown_flag_is_usage_error() {
    let out = profiler(&["record", "--frequncy", "99"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--frequncy"), "{}", stderr(&out));
}

/// A pid that does not exist: one sentence, exit 1, nothing written.
#[test]
fn missing_pid_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = profiler(&[
        "record",
        "--pid",
        "4000000",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim(), "error: --pid 4000000: no such process");
    assert!(!out_dir.exists());
}

/// Each bad value is refused in one sentence that names the flag the user gave,
/// and no directory is created.
#[test]
fn bad_values_name_their_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out_dir = out_dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["record", "--frequency", "0"],
            "error: --frequency must be between 1 and",
        ),
        (
            &["agent", "--frequency", "0"],
            "error: --frequency must be between 1 and",
        ),
        (
            &["agent", "--header", "a=b"],
            "error: --header only applies to OTLP export",
        ),
        (
            &["agent", "--compression", "none"],
            "error: --compression only applies",
        ),
        (
            &["agent", "--max-files", "0"],
            "error: --max-files must be at least 1",
        ),
        (
            &[
                "agent",
                "--endpoint",
                "http://127.0.0.1:1",
                "--timeout",
                "0",
            ],
            "error: --timeout must be at least 1 second",
        ),
        (
            &["agent", "--max-request-kib", "1"],
            "error: --max-request-kib must be at least 64, got 1",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args.to_vec();
        args.extend(["--output-dir", out_dir]);
        let out = profiler(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(
            stderr(&out).lines().count(),
            1,
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!Path::new(out_dir).exists(), "{args:?} created {out_dir}");
    }
}

/// A 1 s recording into `out_dir` as user nobody with only the capabilities `caps`
/// (setpriv's syntax, e.g. `-all,+bpf`), in its inheritable, ambient and bounding
/// sets.
fn record_as_nobody(caps: &str, out_dir: &Path) -> Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(format!("--bounding-set={caps}"))
        .arg(PROFILER)
        .args(["record", "--quiet", "--duration", "1", "--output-dir"])
        .arg(out_dir)
        .output()
        .expect("setpriv (util-linux) runs")
}

/// Without privileges the user is told what is missing, and nothing is created.
#[test]
fn unprivileged_user_is_told_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = record_as_nobody("-all", &out_dir);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs root, or the CAP_BPF and CAP_PERFMON capabilities"),
        "{}",
        stderr(&out)
    );
    assert!(!out_dir.exists());
}

/// With only the capabilities that load the sampler, a recording runs but says up
/// front that kernel frames and other users' processes will be unnamed, and what
/// would name them.
#[test]
fn sampler_only_capabilities_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    // Writable by the unprivileged user the recording runs as.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = record_as_nobody("-all,+bpf,+perfmon", &dir.path().join("out"));
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: kernel frames will be unnamed"),
        "{err}"
    );
    assert!(
        err.contains("other users' processes will be unnamed: reading their mappings and binaries needs CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_CHECKPOINT_RESTORE"),
        "{err}"
    );
}

/// In a pid namespace of its own (a container without the host's pids) the profiler
/// refuses in one sentence, before creating anything: the kernel's pids would name
/// other processes there.
#[test]
fn foreign_pid_namespace_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(PROFILER)
        .args(["record", "--duration", "1", "--output-dir"])
        .arg(&out_dir)
        .output()
        .expect("unshare (util-linux) runs");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("must run in the host's PID namespace"),
        "{}",
        stderr(&out)
    );
    assert!(!out_dir.exists());
}

/// A 120 s recording into `dir`, sent `signal` after `after`; its output, and how
/// long it took to exit after the signal.
fn record_until_signal(dir: &Path, signal: i32, after: Duration) -> (Output, Duration) {
    let child = Command::new(PROFILER)
        .args(["record", "--duration", "120", "--output-dir"])
        .arg(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    (out, started.elapsed())
}

/// SIGINT ends a long recording early, and every file is still written.
#[test]
fn sigint_stops_early_and_writes_everything() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for one non-terminal progress line (every 5 s).
    let (out, took) = record_until_signal(dir.path(), libc::SIGINT, Duration::from_millis(5500));
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(text.contains("recording: "), "no progress line: {text}");
    assert!(text.contains("stopped early"), "{text}");
    for file in ["profile.folded", "profile.pb.gz", "flamegraph.svg"] {
        let len = std::fs::metadata(dir.path().join(file))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{file} missing or empty");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

/// A recording that ran its whole duration, sent SIGINT `signals` times (50 ms
/// apart) as soon as it says it is symbolizing: its exit status, stderr, and the
/// names in `dir` afterwards.
fn interrupt_while_symbolizing(dir: &Path, signals: usize) -> (bool, String, Vec<String>) {
    use std::io::{BufRead as _, BufReader, Read as _};
    let mut child = Command::new(PROFILER)
        .args([
            "record",
            "--duration",
            "2",
            "--include-idle",
            "--output-dir",
        ])
        .arg(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        text.push_str(&line);
        if line.starts_with("symbolizing") {
            for i in 0..signals {
                if i > 0 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // SAFETY: plain kill(2) on our own child, not yet reaped.
                assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
            }
            break;
        }
    }
    err.read_to_string(&mut text).unwrap();
    let ok = child.wait().unwrap().success();
    let names = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    (ok, text, names)
}

/// Ctrl-C while a full-length recording is symbolized finishes the files (the user
/// asked to stop, and the recording is over), saying how to abandon them.
#[test]
fn first_interrupt_while_symbolizing_still_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text, mut names) = interrupt_while_symbolizing(dir.path(), 1);
    assert!(ok, "{text}");
    assert!(
        text.contains("finishing the profile"),
        "signal missed: {text}"
    );
    names.sort();
    assert_eq!(
        names,
        ["flamegraph.svg", "profile.folded", "profile.pb.gz"],
        "{text}"
    );
}

/// A second Ctrl-C abandons: an error, and no file nor temporary is left.
#[test]
fn second_interrupt_while_symbolizing_abandons() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text, names) = interrupt_while_symbolizing(dir.path(), 2);
    assert!(!ok, "{text}");
    assert!(
        text.contains("finishing the profile"),
        "signal missed: {text}"
    );
    assert!(text.contains("the profile was not written"), "{text}");
    assert!(names.is_empty(), "left behind: {names:?}");
}

/// SIGHUP (a closed terminal) ends a recording early and it is still written.
#[test]
fn sighup_ends_a_recording_that_is_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = record_until_signal(dir.path(), libc::SIGHUP, Duration::from_secs(2));
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("stopped early"), "{text}");
    assert!(dir.path().join("profile.pb.gz").is_file(), "{text}");
}

/// When every --pid target has exited, a recording ends early, like `perf record
/// -p`, and the samples of the targets are still written.
#[test]
fn record_stops_when_every_target_has_exited() {
    let dir = tempfile::tempdir().unwrap();
    // A shell that keeps a CPU busy for a second, then exits (reaped by us below).
    let mut target = Command::new("sh")
        .args([
            "-c",
            "end=$(($(date +%s) + 2)); while [ $(date +%s) -lt $end ]; do :; done",
        ])
        .spawn()
        .unwrap();
    let pid = target.id().to_string();
    let reaper = std::thread::spawn(move || target.wait());
    let out = profiler(&[
        "record",
        "--duration",
        "120",
        "--pid",
        &pid,
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(reaper.join().unwrap().unwrap().success());
    assert!(
        text.contains("every --pid target has exited: stopping early"),
        "{text}"
    );
    assert!(text.contains("stopped early"), "{text}");
    let folded = std::fs::read_to_string(dir.path().join("profile.folded")).unwrap();
    assert!(folded.lines().any(|l| l.starts_with("sh;")), "{folded}");
}
