//! Unit tests of the supervisor against real children (sh, sleep, head, yes).

use std::{
    ffi::OsString, os::unix::process::CommandExt, path::Path, sync::atomic::Ordering,
    time::Duration,
};

use super::*;

const MIB: u64 = 1 << 20;

fn spec(key: &str, program: &str, args: &[&str], deadline: Duration) -> ChildSpec {
    ChildSpec {
        key: key.to_owned(),
        program: program.into(),
        args: args.iter().map(OsString::from).collect(),
        deadline,
        env: vec![],
    }
}

fn sh(key: &str, script: &str, deadline: Duration) -> ChildSpec {
    spec(key, "sh", &["-c", script], deadline)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Short grace and back-off so tests are quick.
fn config() -> SupervisorConfig {
    SupervisorConfig {
        kill_grace: ms(300),
        failure_backoff: Backoff {
            initial: ms(200),
            max: ms(1000),
        },
        ..SupervisorConfig::default()
    }
}

/// No process has this pid any more (not even a zombie): it was reaped.
fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The process `pid` is not running: gone, or a zombie of someone else's.
fn not_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// The process `pid` is a zombie whose parent is us: exited, and not reaped yet.
fn unreaped_zombie_of_ours(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let mut fields = rest.split(' ');
    let (state, ppid) = (fields.next(), fields.next());
    state == Some("Z") && ppid == Some(std::process::id().to_string().as_str())
}

/// Polls `cond` every 10 ms for up to 5 s.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if cond() {
            return true;
        }
        tokio::time::sleep(ms(10)).await;
    }
    cond()
}

/// A `sleep 100` is SIGTERMed at its deadline and reaped.
#[tokio::test]
async fn deadline_kills_sleep() {
    let sup = Supervisor::new(config());
    let h = sup.start(spec("k", "sleep", &["100"], ms(200))).unwrap();
    let pid = h.pid();
    let o = h.wait().await;
    assert!(o.timed_out);
    assert_eq!(o.exit, Exit::Signal(libc::SIGTERM));
    assert!(o.elapsed >= ms(200) && o.elapsed < ms(5000), "{o:?}");
    assert!(reaped(pid));
    let s = sup.stats().snapshot();
    assert_eq!((s.started, s.timed_out, s.killed, s.live), (1, 1, 0, 0));
}

/// A child that ignores SIGTERM is SIGKILLed once the grace has passed.
#[tokio::test]
async fn sigterm_ignored_gets_sigkill_after_grace() {
    let sup = Supervisor::new(config());
    let h = sup
        .start(sh("k", "trap '' TERM; sleep 100", ms(200)))
        .unwrap();
    let pid = h.pid();
    let o = h.wait().await;
    assert!(o.timed_out);
    assert_eq!(o.exit, Exit::Signal(libc::SIGKILL));
    assert!(o.elapsed >= ms(200 + 300), "{o:?}");
    assert!(reaped(pid));
    assert_eq!(sup.stats().snapshot().killed, 1);
}

/// 100 MiB on stdout is drained to the end while only the last `capture_bytes` are
/// kept: the child never blocks on a full pipe and finishes by itself.
#[tokio::test]
async fn stdout_flood_is_drained_and_bounded() {
    let sup = Supervisor::new(config());
    let h = sup
        .start(spec("k", "head", &["-c", "100M", "/dev/zero"], ms(30_000)))
        .unwrap();
    let o = h.wait().await;
    assert_eq!(o.exit, Exit::Code(0));
    assert!(!o.timed_out);
    assert_eq!(o.stdout_bytes, 100 * MIB);
    assert_eq!(o.stdout_tail, vec![0; DEFAULT_CAPTURE_BYTES]);
}

/// A stderr flood that never ends (`yes`) keeps only its tail and is stopped at the
/// deadline, not earlier and not blocked.
#[tokio::test]
async fn endless_stderr_flood_is_bounded_until_deadline() {
    let sup = Supervisor::new(config());
    let h = sup.start(sh("k", "exec yes >&2", ms(300))).unwrap();
    let o = h.wait().await;
    assert!(o.timed_out);
    assert!(
        o.stderr_bytes > MIB,
        "only {} bytes drained",
        o.stderr_bytes
    );
    assert_eq!(o.stderr_tail.len(), DEFAULT_CAPTURE_BYTES);
    assert!(o.stderr_tail.ends_with(b"y\n"));
    assert_eq!(o.stdout_bytes, 0);
}

/// A child that stops itself (SIGSTOP) is killed at the deadline and reaped.
#[tokio::test]
async fn stopped_child_is_killed_and_reaped() {
    let sup = Supervisor::new(config());
    let h = sup.start(sh("k", "kill -STOP $$", ms(200))).unwrap();
    let pid = h.pid();
    let o = h.wait().await;
    assert!(o.timed_out);
    assert!(matches!(o.exit, Exit::Signal(_)), "{o:?}");
    assert!(reaped(pid));
}

/// A second run of a key whose run is alive is refused as busy.
#[tokio::test]
async fn busy_key_is_refused() {
    let sup = Supervisor::new(config());
    let _first = sup
        .start(spec("py-spy:1", "sleep", &["100"], ms(5000)))
        .unwrap();
    let again = sup.start(spec("py-spy:1", "true", &[], ms(5000)));
    assert!(matches!(again, Err(Refused::Busy)), "{again:?}");
    assert_eq!(sup.stats().snapshot().refused_busy, 1);
    sup.shutdown(ms(5000)).await.unwrap();
}

/// Past `max_concurrent` live children, starts are refused and counted.
#[tokio::test]
async fn capacity_is_refused() {
    let sup = Supervisor::new(config());
    let _a = sup.start(spec("a", "sleep", &["100"], ms(5000))).unwrap();
    let _b = sup.start(spec("b", "sleep", &["100"], ms(5000))).unwrap();
    let c = sup.start(spec("c", "sleep", &["100"], ms(5000)));
    assert!(matches!(c, Err(Refused::AtCapacity)), "{c:?}");
    let s = sup.stats().snapshot();
    assert_eq!((s.live, s.refused_at_capacity), (2, 1));
    sup.shutdown(ms(5000)).await.unwrap();
}

/// Consecutive failures back off for the initial wait, then twice that; a success
/// lets the key run again at once.
#[tokio::test]
async fn failures_back_off_and_success_resets() {
    let sup = Supervisor::new(config());
    let backing_off = |sup: &Supervisor| match sup.start(spec("k", "true", &[], ms(5000))) {
        Err(Refused::BackingOff { until }) => until.saturating_duration_since(Instant::now()),
        other => panic!("expected a back-off, got {other:?}"),
    };
    let o = sup.start(sh("k", "exit 3", ms(5000))).unwrap().wait().await;
    assert_eq!(o.exit, Exit::Code(3));
    let wait = backing_off(&sup);
    assert!(wait > ms(100) && wait <= ms(200), "{wait:?}");
    tokio::time::sleep(wait + ms(10)).await;

    let o = sup.start(sh("k", "exit 3", ms(5000))).unwrap().wait().await;
    assert!(!o.success());
    let wait = backing_off(&sup);
    assert!(wait > ms(300) && wait <= ms(400), "{wait:?}");
    tokio::time::sleep(wait + ms(10)).await;

    let o = sup
        .start(spec("k", "true", &[], ms(5000)))
        .unwrap()
        .wait()
        .await;
    assert!(o.success());
    let o = sup
        .start(spec("k", "true", &[], ms(5000)))
        .unwrap()
        .wait()
        .await;
    assert!(o.success());
    let s = sup.stats().snapshot();
    assert_eq!((s.failed, s.succeeded, s.refused_backing_off), (2, 2, 2));
}

/// A missing tool is refused with a message naming it, and remembered: installing
/// it afterwards is not noticed until `tool_recheck` has passed.
#[tokio::test]
async fn missing_tool_is_refused_and_remembered() {
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("py-spy");
    let sup = Supervisor::new(config());
    let err = sup
        .start(spec("k", tool.to_str().unwrap(), &[], ms(5000)))
        .unwrap_err();
    assert!(matches!(err, Refused::MissingTool { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "`{0}` is not installed: `{0}` does not exist",
            tool.display()
        )
    );
    std::os::unix::fs::symlink("/bin/true", &tool).unwrap();
    let again = sup.start(spec("k", tool.to_str().unwrap(), &[], ms(5000)));
    assert!(
        matches!(again, Err(Refused::MissingTool { .. })),
        "{again:?}"
    );
    assert_eq!(sup.stats().snapshot().refused_missing_tool, 2);
}

/// A missing tool is probed again once `tool_recheck` has passed.
#[tokio::test]
async fn missing_tool_is_probed_again_after_recheck() {
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("rbspy");
    let sup = Supervisor::new(SupervisorConfig {
        tool_recheck: Duration::ZERO,
        ..config()
    });
    let tool_spec = spec("k", tool.to_str().unwrap(), &[], ms(5000));
    assert!(sup.start(tool_spec.clone()).is_err());
    std::os::unix::fs::symlink("/bin/true", &tool).unwrap();
    assert!(sup.start(tool_spec).unwrap().wait().await.success());
}

/// A bare name missing from PATH is refused with the PATH it searched.
#[tokio::test]
async fn missing_bare_name_names_path() {
    let sup = Supervisor::new(config());
    let mut s = spec("k", "phpspy", &[], ms(5000));
    s.env.push(("PATH".into(), "/nonexistent/bin".into()));
    let err = sup.start(s).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`phpspy` is not installed: no executable `phpspy` in PATH=/nonexistent/bin"
    );
}

/// A caller that drops its handle still gets the child killed at the deadline and
/// reaped, and the slot released.
#[tokio::test]
async fn dropped_handle_still_killed_and_reaped() {
    let sup = Supervisor::new(config());
    let h = sup.start(spec("k", "sleep", &["100"], ms(200))).unwrap();
    let pid = h.pid();
    drop(h);
    assert!(eventually(|| sup.live() == 0).await);
    assert!(reaped(pid));
    let s = sup.stats().snapshot();
    assert_eq!((s.timed_out, s.live), (1, 0));
}

/// Shutdown kills every live child, waits for the reaps, and refuses new starts.
#[tokio::test]
async fn shutdown_kills_reaps_and_refuses() {
    let sup = Supervisor::new(config());
    let a = sup.start(spec("a", "sleep", &["100"], ms(60_000))).unwrap();
    let b = sup
        .start(sh("b", "trap '' TERM; sleep 100", ms(60_000)))
        .unwrap();
    tokio::time::sleep(ms(50)).await; // let sh install its trap
    sup.shutdown(ms(5000)).await.unwrap();
    assert!(reaped(a.pid()) && reaped(b.pid()));
    assert_eq!(a.wait().await.exit, Exit::Signal(libc::SIGTERM));
    assert_eq!(b.wait().await.exit, Exit::Signal(libc::SIGKILL));
    let refused = sup.start(spec("c", "true", &[], ms(5000)));
    assert!(matches!(refused, Err(Refused::ShuttingDown)), "{refused:?}");
    let s = sup.stats().snapshot();
    assert_eq!((s.cancelled, s.killed, s.live), (2, 1, 0));
}

/// Dropping the supervisor kills its children too.
#[tokio::test]
async fn dropping_supervisor_kills_children() {
    let sup = Supervisor::new(config());
    let h = sup.start(spec("k", "sleep", &["100"], ms(60_000))).unwrap();
    let stats = Arc::clone(sup.stats());
    drop(sup);
    let pid = h.pid();
    assert_eq!(h.wait().await.exit, Exit::Signal(libc::SIGTERM));
    assert!(reaped(pid));
    assert_eq!(stats.snapshot().cancelled, 1);
}

/// A descendant left holding the child's stdout is killed with the group once the
/// child has exited and the grace has passed; the run then ends.
#[tokio::test]
async fn descendant_holding_pipe_is_killed() {
    let sup = Supervisor::new(config());
    let h = sup
        .start(sh("k", "sleep 100 & echo $!", ms(60_000)))
        .unwrap();
    let o = h.wait().await;
    assert_eq!(o.exit, Exit::Code(0));
    assert!(o.elapsed >= ms(300) && o.elapsed < ms(5000), "{o:?}");
    let grandchild: u32 = String::from_utf8(o.stdout_tail)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(eventually(|| not_running(grandchild)).await);
}

/// A child that exits while a descendant that left its group (setsid) holds its
/// pipes: the group may then be empty, and its id free for anyone once the child is
/// reaped. So the child is kept unreaped (a zombie of ours, which keeps the id ours)
/// while the run drains on; when the grace has passed the group (the zombie alone)
/// is SIGKILLed, the pipes dropped, and only then the child reaped. No group signal
/// is ever attempted after the reap. (Before, the child was reaped at once and the
/// group id SIGKILLed after the grace, when it could have been anyone's.)
#[tokio::test]
async fn lingering_run_keeps_its_child_unreaped_until_the_end() {
    let sup = Supervisor::new(config());
    let h = sup
        .start(sh("k", "setsid sleep 5 & echo $!", ms(60_000)))
        .unwrap();
    let pid = h.pid();
    assert!(
        eventually(|| unreaped_zombie_of_ours(pid)).await,
        "the exited child was not kept unreaped"
    );
    let o = h.wait().await;
    assert_eq!(o.exit, Exit::Code(0));
    assert!(!o.timed_out);
    assert!(o.elapsed >= ms(300) && o.elapsed < ms(4000), "{o:?}");
    assert!(reaped(pid));
    let escaped: i32 = String::from_utf8(o.stdout_tail)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Out of the group, so not killed with it: here (no orphans adopted) it keeps
    // running, its pipes closed; where orphans are adopted the sweep kills it (see
    // the integration tests).
    assert!(!not_running(escaped as u32));
    // SAFETY: kill has no memory-safety preconditions; `escaped` was running above.
    unsafe { libc::kill(escaped, libc::SIGKILL) };
    assert_eq!(run::GROUP_SIGNALS_REFUSED.load(Ordering::Relaxed), 0);
    let s = sup.stats().snapshot();
    assert_eq!((s.succeeded, s.killed, s.live), (1, 0, 0));
}

/// What `signal_group` checks before it signals: a child of ours is unreaped while it
/// runs and once it has exited (a zombie), and not after the reap, when its pid and
/// group id may be anyone's.
#[test]
fn exit_state_tells_unreaped_from_reaped() {
    let mut child = std::process::Command::new("sleep")
        .arg("100")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    assert_eq!(run::exit_state(pid), Some(false));
    child.kill().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while run::exit_state(pid) == Some(false) && Instant::now() < deadline {
        std::thread::sleep(ms(5));
    }
    assert_eq!(run::exit_state(pid), Some(true), "exited, still unreaped");
    assert!(unreaped_zombie_of_ours(pid as u32));
    child.wait().unwrap();
    assert_eq!(run::exit_state(pid), None);
    // Not our child at all.
    assert_eq!(run::exit_state(1), None);
}

/// Children run in their own process group at lower priority than the agent.
#[tokio::test]
async fn children_are_niced_in_their_own_group() {
    let sup = Supervisor::new(config());
    // SAFETY: getpriority has no memory-safety preconditions.
    let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS as _, 0) };
    let o = sup
        .start(spec("nice", "nice", &[], ms(5000)))
        .unwrap()
        .wait()
        .await;
    let nice: i32 = String::from_utf8(o.stdout_tail)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(nice, DEFAULT_NICE.max(ours));

    let h = sup
        .start(spec("group", "sleep", &["100"], ms(5000)))
        .unwrap();
    // SAFETY: getpgid has no memory-safety preconditions.
    let pgid = unsafe { libc::getpgid(h.pid() as libc::pid_t) };
    assert_eq!(pgid, h.pid() as libc::pid_t);
    sup.shutdown(ms(5000)).await.unwrap();
}

/// A crash is reported as the signal that killed the child and counted as a failure,
/// with what the child wrote to stderr before it.
#[tokio::test]
async fn crash_is_reported_with_signal_and_stderr() {
    let sup = Supervisor::new(config());
    let h = sup
        .start(sh("k", "echo 'cannot attach' >&2; kill -SEGV $$", ms(5000)))
        .unwrap();
    let o = h.wait().await;
    assert_eq!(o.exit, Exit::Signal(libc::SIGSEGV));
    assert!(!o.timed_out);
    assert_eq!(o.stderr_tail, b"cannot attach\n");
    assert_eq!(
        o.failure().as_deref(),
        Some("was killed by SIGSEGV: cannot attach")
    );
    assert_eq!(sup.stats().snapshot().failed, 1);
}

/// A failure names how the child ended and its last non-blank line, stderr before
/// stdout, control characters removed and the line capped.
#[test]
fn failure_quotes_the_last_line() {
    let outcome = |exit, timed_out, stdout: &[u8], stderr: &[u8]| ChildOutcome {
        exit,
        timed_out,
        elapsed: Duration::ZERO,
        stdout_tail: stdout.to_vec(),
        stderr_tail: stderr.to_vec(),
        stdout_bytes: stdout.len() as u64,
        stderr_bytes: stderr.len() as u64,
    };
    assert_eq!(outcome(Exit::Code(0), false, b"", b"noise").failure(), None);
    assert_eq!(
        outcome(
            Exit::Code(1),
            false,
            b"out\n",
            b"first\nError: \x1b[31mgone\n\n"
        )
        .failure()
        .as_deref(),
        Some("exited with status 1: Error: [31mgone")
    );
    assert_eq!(
        outcome(Exit::Code(2), false, b"only stdout\n", b" \n")
            .failure()
            .as_deref(),
        Some("exited with status 2: only stdout")
    );
    assert_eq!(
        outcome(Exit::Signal(libc::SIGTERM), true, b"", b"")
            .failure()
            .as_deref(),
        Some("ran past its deadline and was killed by SIGTERM")
    );
    let long = outcome(Exit::Signal(63), false, b"", &[b'x'; 4096])
        .failure()
        .unwrap();
    assert_eq!(
        long.len(),
        "was killed by signal 63: ".len() + MAX_FAILURE_LINE
    );
}

/// The supervisor can be shared across threads (a multi-thread runtime, or an `Arc`).
#[test]
fn supervisor_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Supervisor>();
    send_sync::<ChildHandle>();
}

/// A `Duration::MAX` deadline means "no deadline", not an overflow panic.
#[tokio::test]
async fn unbounded_deadline_does_not_overflow() {
    let sup = Supervisor::new(config());
    let o = sup
        .start(spec("k", "true", &[], Duration::MAX))
        .unwrap()
        .wait()
        .await;
    assert!(o.success());
}
