//! The child-process supervisor under load, measured from outside: thousands of runs
//! that finish, crash, hang, flood and exit at once leave no fd, thread, child,
//! zombie or memory behind, and a burst of targets never runs more children at once
//! than allowed.
//!
//! These tests measure the whole process (/proc/self), which the other tests of this
//! binary disturb when they run in parallel, so each runs alone in a fresh process of
//! this test binary (see [`alone`]).

use std::{
    collections::VecDeque,
    ffi::OsString,
    future::Future,
    pin::Pin,
    process::Command,
    time::{Duration, Instant},
};

use profiler::supervise::{
    Backoff, ChildOutcome, ChildSpec, Exit, Refused, Supervisor, SupervisorConfig,
    DEFAULT_CAPTURE_BYTES,
};

/// Set to a test's name in the process that runs it alone.
const ALONE_ENV: &str = "PROFILER_TESTS_ALONE";

/// True in the process where test `name` runs alone. Elsewhere it re-executes this
/// test binary filtered to exactly that test, passes its output through, asserts it
/// passed, and returns false.
fn alone(name: &str) -> bool {
    if std::env::var(ALONE_ENV).as_deref() == Ok(name) {
        return true;
    }
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    let test = format!("{module}::{name}");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([&test, "--exact", "--test-threads=1", "--nocapture"])
        .env(ALONE_ENV, name)
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} failed in its own process");
    assert!(stdout.contains("1 passed"), "{test} did not run");
    false
}

/// What the test process holds, as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    fds: usize,
    threads: u64,
    /// Processes whose parent is us, zombies included.
    children: usize,
    zombies: usize,
    rss_kib: u64,
}

fn status_kib_or_count(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// (children, zombie children) of this process, from /proc/*/stat.
fn children() -> (usize, usize) {
    let me = std::process::id().to_string();
    let (mut children, mut zombies) = (0, 0);
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue; // exited meanwhile
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let (state, ppid) = (fields.next(), fields.next());
        if ppid == Some(me.as_str()) {
            children += 1;
            zombies += usize::from(state == Some("Z"));
        }
    }
    (children, zombies)
}

fn resources() -> Resources {
    let (children, zombies) = children();
    Resources {
        fds: std::fs::read_dir("/proc/self/fd").expect("fds").count(),
        threads: status_kib_or_count("Threads:"),
        children,
        zombies,
        rss_kib: status_kib_or_count("VmRSS:"),
    }
}

/// Not running: gone, or a zombie (of init, after we killed it).
fn not_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The kinds of child the soak mixes, each with its expected outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `true`: exits at once.
    Instant,
    /// Writes a line to each stream and exits 0.
    Finish,
    /// Exits 3.
    Exit3,
    /// Kills itself with SIGSEGV.
    Segv,
    /// Stops itself (SIGSTOP): only the deadline ends it.
    Stop,
    /// Ignores SIGTERM and stops itself: only SIGKILL ends it.
    StopIgnoringTerm,
    /// 1 MiB on stdout, then exits.
    FloodStdout,
    /// 1 MiB on stderr, then exits.
    FloodStderr,
    /// `yes`: writes until the deadline.
    Endless,
    /// Leaves a `sleep 100` holding its stdout and exits.
    Orphan,
}

/// One cycle of the mix: 20 runs.
const MIX: [Kind; 20] = {
    use Kind::*;
    [
        Instant,
        Finish,
        Exit3,
        Segv,
        Instant,
        FloodStdout,
        Stop,
        Finish,
        Exit3,
        Instant,
        Endless,
        Segv,
        FloodStderr,
        Finish,
        StopIgnoringTerm,
        Instant,
        Exit3,
        Stop,
        FloodStdout,
        Orphan,
    ]
};

const FLOOD: u64 = 1 << 20;
/// Deadline of runs that only end by it.
const HANG_DEADLINE: Duration = Duration::from_millis(50);
/// Deadline of runs that end by themselves (never reached).
const DEADLINE: Duration = Duration::from_secs(20);

impl Kind {
    fn spec(self, key: String) -> ChildSpec {
        let (program, args, deadline): (&str, &[&str], Duration) = match self {
            Kind::Instant => ("true", &[], DEADLINE),
            Kind::Finish => ("sh", &["-c", "echo out; echo err >&2"], DEADLINE),
            Kind::Exit3 => ("sh", &["-c", "exit 3"], DEADLINE),
            Kind::Segv => ("sh", &["-c", "kill -SEGV $$"], DEADLINE),
            Kind::Stop => ("sh", &["-c", "kill -STOP $$"], HANG_DEADLINE),
            Kind::StopIgnoringTerm => (
                "sh",
                &["-c", "trap '' TERM; kill -STOP $$; exec sleep 100"],
                HANG_DEADLINE,
            ),
            Kind::FloodStdout => ("head", &["-c", "1M", "/dev/zero"], DEADLINE),
            Kind::FloodStderr => ("sh", &["-c", "head -c 1M /dev/zero >&2"], DEADLINE),
            Kind::Endless => ("yes", &[], HANG_DEADLINE),
            Kind::Orphan => ("sh", &["-c", "sleep 100 & echo $!"], DEADLINE),
        };
        ChildSpec {
            key,
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            deadline,
            env: vec![],
        }
    }

    fn hangs(self) -> bool {
        matches!(self, Kind::Stop | Kind::StopIgnoringTerm | Kind::Endless)
    }

    /// Asserts the outcome is this kind's; returns the orphan's pid for `Orphan`.
    fn check(self, o: &ChildOutcome) -> Option<u32> {
        assert_eq!(o.timed_out, self.hangs(), "{self:?}: {o:?}");
        match self {
            Kind::Instant | Kind::Finish | Kind::FloodStdout | Kind::FloodStderr => {
                assert_eq!(o.exit, Exit::Code(0), "{self:?}: {o:?}")
            }
            Kind::Exit3 => assert_eq!(o.exit, Exit::Code(3)),
            Kind::Segv => assert_eq!(o.exit, Exit::Signal(libc::SIGSEGV)),
            Kind::Stop | Kind::Endless => assert!(matches!(o.exit, Exit::Signal(_)), "{o:?}"),
            Kind::StopIgnoringTerm => assert_eq!(o.exit, Exit::Signal(libc::SIGKILL)),
            Kind::Orphan => {}
        }
        match self {
            Kind::Finish => assert_eq!(
                (&o.stdout_tail[..], &o.stderr_tail[..]),
                (&b"out\n"[..], &b"err\n"[..])
            ),
            Kind::FloodStdout => {
                assert_eq!(o.stdout_bytes, FLOOD);
                assert_eq!(o.stdout_tail.len(), DEFAULT_CAPTURE_BYTES);
            }
            Kind::FloodStderr => {
                assert_eq!(o.stderr_bytes, FLOOD);
                assert_eq!(o.stderr_tail.len(), DEFAULT_CAPTURE_BYTES);
            }
            Kind::Endless => assert_eq!(o.stdout_tail.len(), DEFAULT_CAPTURE_BYTES),
            Kind::Orphan => {
                let pid = String::from_utf8_lossy(&o.stdout_tail).trim().parse();
                return Some(pid.expect("the orphan's pid"));
            }
            _ => {}
        }
        None
    }
}

/// A boxed outcome check, for the runtime's `spawn` (this crate does not name tokio).
type Check = Pin<Box<dyn Future<Output = Option<u32>> + Send>>;

/// Runs `runs` children of the mix (from `first`) through `sup`, at most its
/// `max_concurrent` at once; checks every outcome on its own task via `spawn`, except
/// that one run in seven drops its handle instead; returns the pids of the orphans
/// left by `Orphan` runs.
async fn run_mix<J, E>(
    sup: &Supervisor,
    spawn: &impl Fn(Check) -> J,
    first: usize,
    runs: usize,
) -> Vec<u32>
where
    J: Future<Output = Result<Option<u32>, E>> + Unpin,
    E: std::fmt::Debug,
{
    let mut waiting = VecDeque::new();
    let mut orphans = vec![];
    for i in first..first + runs {
        let kind = MIX[i % MIX.len()];
        sup.capacity_available().await;
        let handle = match sup.start(kind.spec(format!("soak:{i}"))) {
            Ok(h) => h,
            Err(e) => panic!("run {i} ({kind:?}) refused: {e}"),
        };
        if i % 7 == 0 {
            drop(handle);
            continue;
        }
        waiting.push_back(spawn(Box::pin(
            async move { kind.check(&handle.wait().await) },
        )));
        // The oldest check is almost surely done: collect it, so few are held.
        if waiting.len() > 64 {
            let oldest = waiting.pop_front().unwrap();
            orphans.extend(oldest.await.expect("outcome as expected"));
        }
    }
    for w in waiting {
        orphans.extend(w.await.expect("outcome as expected"));
    }
    sup.idle().await; // the runs whose handles were dropped
    orphans
}

/// Runs of the soak (after a warm-up of one mix cycle).
const SOAK_RUNS: usize = 2000;
/// RSS the soak may add: allocator slack, the failing keys' history (~1 300 keys).
const RSS_GROWTH_KIB: u64 = 20 * 1024;

/// 2000 runs mixing children that exit at once, finish, exit 3, crash (SIGSEGV),
/// stop themselves (with and without ignoring SIGTERM), flood stdout or stderr, write
/// forever, or leave an orphan holding their pipe, 4 at a time: every outcome is as
/// expected, and afterwards fds, threads, children are back to their baseline, no
/// zombie and no orphan is left, and RSS grew by less than 20 MiB.
#[test]
fn soak_leaves_nothing_behind() {
    if !alone("soak_leaves_nothing_behind") {
        return;
    }
    // As the agent runs: every run's start and end sweep for orphans too.
    profiler::supervise::orphans::adopt_orphans().expect("PR_SET_CHILD_SUBREAPER");
    let rt = profiler::record::runtime().expect("runtime");
    let rt_handle = rt.handle().clone();
    let spawn = move |check: Check| rt_handle.spawn(check);
    rt.block_on(async {
        let sup = Supervisor::new(SupervisorConfig {
            max_concurrent: 4,
            kill_grace: ms(50),
            failure_backoff: Backoff {
                initial: ms(1000),
                max: ms(1000),
            },
            ..SupervisorConfig::default()
        });
        // One cycle first, so what tokio and the allocator keep for good (signal
        // pipe, pidfd support, arenas) is in the baseline.
        let mut orphans = run_mix(&sup, &spawn, 0, MIX.len()).await;
        // An orphan of the warm-up's last runs can be reparented to us after their
        // end sweep (seen once in CI-like runs: 1 child in the baseline); the next
        // run's sweep would take it. Sweep until none is left, so the baseline
        // holds no child; the check after the soak sweeps only at shutdown.
        let deadline = Instant::now() + Duration::from_secs(5);
        while resources().children > 0 && Instant::now() < deadline {
            profiler::supervise::orphans::sweep();
            std::thread::sleep(ms(10));
        }
        let before = resources();
        let t0 = Instant::now();
        orphans.extend(run_mix(&sup, &spawn, MIX.len(), SOAK_RUNS).await);
        let elapsed = t0.elapsed();
        sup.shutdown(Duration::from_secs(5))
            .await
            .expect("all reaped");
        let after = resources();
        let stats = sup.stats().snapshot();
        println!(
            "soak: {SOAK_RUNS} runs in {elapsed:.2?}; before {before:?}; after {after:?}; \
             RSS +{} KiB (peak {} KiB); {stats:?}",
            after.rss_kib as i64 - before.rss_kib as i64,
            status_kib_or_count("VmHWM:")
        );

        assert_eq!(before.children, 0);
        assert_eq!(before.zombies, 0);
        assert_eq!((after.fds, after.threads), (before.fds, before.threads));
        assert_eq!((after.children, after.zombies), (0, 0));
        assert!(
            after.rss_kib < before.rss_kib + RSS_GROWTH_KIB,
            "RSS grew from {} to {} KiB",
            before.rss_kib,
            after.rss_kib
        );
        let leftover: Vec<u32> = orphans.into_iter().filter(|&p| !not_running(p)).collect();
        assert!(leftover.is_empty(), "orphans still running: {leftover:?}");

        let total = (MIX.len() + SOAK_RUNS) as u64;
        let hangs = (0..MIX.len() + SOAK_RUNS)
            .filter(|i| MIX[i % MIX.len()].hangs())
            .count() as u64;
        assert_eq!(stats.started, total);
        assert_eq!(stats.live, 0);
        assert_eq!(stats.cancelled, 0);
        assert_eq!(stats.timed_out, hangs);
        assert_eq!(
            stats.succeeded + stats.failed + stats.timed_out,
            total,
            "{stats:?}"
        );
    });
}

/// Attempts of the shared-keys soak, over [`SHARED_KEYS`] keys.
const SHARED_KEY_ATTEMPTS: usize = 600;
const SHARED_KEYS: usize = 8;

/// Many attempts on a few keys, as rounds retrying the same targets do: half the
/// keys' runs succeed, half fail. A key whose run is alive is refused as busy, a
/// failing key backs off (it starts no more often than its back-off allows), every
/// started run is reaped, and fds, threads and children return to their baseline.
#[test]
fn shared_keys_are_refused_while_busy_or_backing_off() {
    if !alone("shared_keys_are_refused_while_busy_or_backing_off") {
        return;
    }
    let backoff = ms(200);
    let rt = profiler::record::runtime().expect("runtime");
    let rt_handle = rt.handle().clone();
    rt.block_on(async {
        let sup = Supervisor::new(SupervisorConfig {
            max_concurrent: 4,
            kill_grace: ms(50),
            failure_backoff: Backoff {
                initial: backoff,
                max: backoff,
            },
            ..SupervisorConfig::default()
        });
        let spec = |key: usize| ChildSpec {
            key: format!("shared:{key}"),
            program: "sh".into(),
            // Even keys succeed, odd keys fail; each run lasts ~20 ms.
            args: vec!["-c".into(), format!("sleep 0.02; exit {}", key % 2).into()],
            deadline: Duration::from_secs(10),
            env: vec![],
        };
        let before = resources();
        let t0 = Instant::now();
        let (mut busy, mut backing_off) = (0u64, 0u64);
        let mut started = [0u64; SHARED_KEYS];
        let mut waiting = vec![];
        for i in 0..SHARED_KEY_ATTEMPTS {
            let key = i % SHARED_KEYS;
            match sup.start(spec(key)) {
                Ok(h) => {
                    started[key] += 1;
                    waiting.push(rt_handle.spawn(h.wait()));
                }
                Err(Refused::Busy) => busy += 1,
                Err(Refused::BackingOff { .. }) => backing_off += 1,
                Err(Refused::AtCapacity) => sup.capacity_available().await,
                Err(e) => panic!("attempt {i}: {e}"),
            }
            // After each pass over the keys, let the oldest run end: time passes,
            // some keys are still busy and some back-offs expire.
            if i % SHARED_KEYS == SHARED_KEYS - 1 && !waiting.is_empty() {
                waiting.remove(0).await.expect("run task");
            }
        }
        for w in waiting {
            w.await.expect("run task");
        }
        sup.idle().await;
        let elapsed = t0.elapsed();
        sup.shutdown(Duration::from_secs(5))
            .await
            .expect("all reaped");
        let after = resources();
        println!(
            "shared keys: {SHARED_KEY_ATTEMPTS} attempts in {elapsed:.2?}: started {started:?}, \
             busy {busy}, backing off {backing_off}; before {before:?}; after {after:?}"
        );
        assert!(busy > 0, "no attempt found its key busy");
        assert!(backing_off > 0, "no failing key backed off");
        // A failing key starts at most once per back-off period (plus the first).
        let most = elapsed.as_millis() as u64 / backoff.as_millis() as u64 + 1;
        for key in (1..SHARED_KEYS).step_by(2) {
            assert!(
                started[key] <= most,
                "failing key {key} started {} times in {elapsed:?}",
                started[key]
            );
        }
        // Succeeding keys are not held back beyond being busy.
        for key in (0..SHARED_KEYS).step_by(2) {
            assert!(started[key] > started[key + 1], "{started:?}");
        }
        assert_eq!(sup.stats().snapshot().live, 0);
        assert_eq!((after.fds, after.threads), (before.fds, before.threads));
        assert_eq!((after.children, after.zombies), (0, 0));
    });
}

/// 200 targets started at once: only `max_concurrent` start, the rest are refused
/// as at capacity; run through as slots free up, no more than `max_concurrent`
/// children are ever alive and no thread is created.
#[test]
fn burst_never_exceeds_max_concurrent() {
    if !alone("burst_never_exceeds_max_concurrent") {
        return;
    }
    const TARGETS: usize = 200;
    const MAX: usize = 3;
    let rt = profiler::record::runtime().expect("runtime");
    let rt_handle = rt.handle().clone();
    rt.block_on(async {
        let sup = Supervisor::new(SupervisorConfig {
            max_concurrent: MAX,
            ..SupervisorConfig::default()
        });
        let spec = |i: usize| ChildSpec {
            key: format!("py-spy:{i}"),
            program: "sleep".into(),
            args: vec!["0.02".into()],
            deadline: Duration::from_secs(20),
            env: vec![],
        };
        let threads = resources().threads;
        let mut most_children = 0;
        let mut check = |sup: &Supervisor| {
            let (children, _) = children();
            assert!(children <= MAX, "{children} children alive");
            assert!(sup.live() <= MAX);
            assert_eq!(resources().threads, threads, "a thread was created");
            most_children = most_children.max(children);
        };

        let mut waiting = vec![];
        let mut refused = vec![];
        for i in 0..TARGETS {
            match sup.start(spec(i)) {
                Ok(h) => waiting.push(rt_handle.spawn(h.wait())),
                Err(Refused::AtCapacity) => refused.push(i),
                Err(e) => panic!("target {i}: {e}"),
            }
            check(&sup);
        }
        assert_eq!((waiting.len(), refused.len()), (MAX, TARGETS - MAX));
        for i in refused {
            sup.capacity_available().await;
            waiting.push(rt_handle.spawn(sup.start(spec(i)).expect("a slot is free").wait()));
            check(&sup);
        }
        for w in waiting {
            assert!(w.await.expect("outcome").success());
            check(&sup);
        }
        let stats = sup.stats().snapshot();
        println!("burst: {TARGETS} targets, at most {most_children} children alive at once (max {MAX}), threads {threads}; {stats:?}");
        assert_eq!(stats.started, TARGETS as u64);
        assert_eq!(stats.succeeded, TARGETS as u64);
        assert_eq!(stats.refused_at_capacity, (TARGETS - MAX) as u64);
    });
}

/// A child whose descendant leaves its process group (setsid) and closes its pipes
/// leaves nothing behind: the descendant, reparented to us once the child exits, is
/// killed when the run ends and reaped, so the run's group kill is not the only
/// net. (Before adoption, such a descendant ran on under init.)
#[test]
fn descendants_that_leave_the_group_are_killed_and_reaped() {
    if !alone("descendants_that_leave_the_group_are_killed_and_reaped") {
        return;
    }
    profiler::supervise::orphans::adopt_orphans().expect("PR_SET_CHILD_SUBREAPER");
    let rt = profiler::record::runtime().expect("runtime");
    rt.block_on(async {
        let sup = Supervisor::new(SupervisorConfig::default());
        let before = resources();
        let spec = ChildSpec {
            key: "escaper".into(),
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!".into(),
            ],
            deadline: Duration::from_secs(20),
            env: vec![],
        };
        let outcome = sup.start(spec).expect("starts").wait().await;
        assert!(outcome.success(), "{outcome:?}");
        let escaped: u32 = String::from_utf8_lossy(&outcome.stdout_tail)
            .trim()
            .parse()
            .expect("the escaped sleep's pid");
        // Killed when the run ended; reaped by a later sweep (shutdown sweeps until
        // nothing is left).
        sup.shutdown(Duration::from_secs(5))
            .await
            .expect("clean shutdown");
        let stats = sup.stats().snapshot();
        println!("escaped sleep {escaped}; {stats:?}");
        assert!(
            std::fs::metadata(format!("/proc/{escaped}")).is_err(),
            "the escaped sleep {escaped} is still there"
        );
        assert_eq!((stats.orphans_killed, stats.orphans_reaped), (1, 1));
        let after = resources();
        assert_eq!(
            (after.children, after.zombies),
            (before.children, before.zombies),
            "{before:?} -> {after:?}"
        );
    });
}
