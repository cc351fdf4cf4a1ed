//! Interpreted and JIT runtimes, end to end: real Python (py-spy from PyPI), Ruby
//! (rbspy from crates.io), Java 17 (jattach from Debian) and Node (--perf-basic-prof)
//! programs with known call chains, profiled by the `profiler` binary.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use profiler_tests::*;

/// A tool `cargo xtask test` installs, from the environment variable it sets.
fn tool(var: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with `cargo xtask test`, which installs it")
    }));
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    path
}

/// The real interpreter behind `python3` (PATH may hold a pyenv shim, a shell script
/// that costs more to start than Python itself).
fn python_executable() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is installed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn programs_dir() -> PathBuf {
    crate_dir().join("programs")
}

/// `profiler record --pid PID` for `secs` with every runtime enabled and the tools
/// the tests installed; returns the run's stderr.
fn record_cli(pid: u32, secs: u64, dir: &Path) -> String {
    let out = Command::new(profiler_bin())
        .args(["record", "--quiet", "--duration", &secs.to_string()])
        .args(["--pid", &pid.to_string()])
        .arg("--output-dir")
        .arg(dir)
        .arg("--py-spy")
        .arg(tool("PY_SPY_BIN"))
        .arg("--rbspy")
        .arg(tool("RBSPY_BIN"))
        .output()
        .expect("run profiler record");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "profiler record failed:\n{stderr}");
    stderr
}

fn spawn(cmd: &mut Command) -> KillOnDrop {
    profiler_bin();
    KillOnDrop::spawn(cmd.stdout(std::process::Stdio::null()))
}

/// py-spy's stacks of a Python program arrive root first, marked `_[py]`, under the
/// process, beside the interpreter's native frames from eBPF.
#[test]
fn python_chain_from_py_spy() {
    let _cpu = cpu_heavy_lock();
    let target = python_chain(60);
    let dir = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 4, dir.path());
    let stacks = read_folded(dir.path());
    let chain = ["py_outer_[py]", "py_middle_[py]", "py_inner_[py]"];
    let python = samples_with_chain(&stacks, "python3", &chain);
    assert!(
        python > 50,
        "{python} samples with the Python chain:\n{log}"
    );
    let native: u64 = stacks
        .iter()
        .filter(|s| s.frames[0] == "python3" && !s.frames.iter().any(|f| f.ends_with("_[py]")))
        .map(|s| s.count)
        .sum();
    assert!(native > 50, "native samples of python3: {native}");
    // pprof keeps the mark in the function name.
    let p = read_pprof(dir.path());
    assert!(p.string_table.iter().any(|s| s == "py_inner_[py]"));
}

/// rbspy's stacks of a Ruby program arrive root first, marked `_[rb]`.
#[test]
fn ruby_chain_from_rbspy() {
    let _cpu = cpu_heavy_lock();
    let target = spawn(
        Command::new("ruby")
            .arg(programs_dir().join("chain.rb"))
            .arg("60"),
    );
    settle();
    let dir = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 4, dir.path());
    let stacks = read_folded(dir.path());
    let chain = ["rb_outer_[rb]", "rb_middle_[rb]", "rb_inner_[rb]"];
    let ruby = samples_with_chain(&stacks, "ruby", &chain);
    assert!(ruby > 50, "{ruby} samples with the Ruby chain:\n{log}");
}

/// A directory holding `programs/Chain.java` compiled (`Chain.class`).
fn compile_chain_java() -> tempfile::TempDir {
    let classes = tempfile::tempdir().unwrap();
    let status = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .arg(programs_dir().join("Chain.java"))
        .status()
        .expect("javac (Java 17) is installed");
    assert!(status.success(), "javac failed");
    classes
}

/// A JVM run with -XX:+PreserveFramePointer: jattach makes it write its perf map
/// (JDK 17's `0x` addresses), and the eBPF stacks through JIT code get method names,
/// the whole chain in order.
#[test]
fn java_jit_frames_named_through_jattach() {
    let _cpu = cpu_heavy_lock();
    let classes = compile_chain_java();
    let target = spawn(
        Command::new("java")
            .args([
                "-XX:+PreserveFramePointer",
                // Separate compiled methods, so each is a frame of its own.
                "-XX:CompileCommand=quiet",
                "-XX:CompileCommand=dontinline,Chain::*",
                "-cp",
            ])
            .arg(classes.path())
            .args(["Chain", "60"]),
    );
    // Time for the JIT to compile the hot methods.
    std::thread::sleep(Duration::from_secs(3));
    let dir = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 4, dir.path());
    let stacks = read_folded(dir.path());
    let chain = [
        "long Chain.javaOuter(long)_[j]",
        "long Chain.javaMiddle(long)_[j]",
        "long Chain.javaInner(long)_[j]",
    ];
    let named = samples_with_chain(&stacks, "java", &chain);
    assert!(
        named > 50,
        "{named} samples with the Java chain:\n{log}\n{:?}",
        stacks
            .iter()
            .filter(|s| s.frames[0] == "java")
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(log.contains("JVM perf maps requested"), "{log}");
}

/// A process classified as Java (its executable is named `java`) that handles no
/// SIGQUIT and has no attach socket, as a JVM still starting up: jattach would
/// signal it and SIGQUIT's default action would kill it. It is left alone, counted,
/// and lives on.
#[test]
fn jvm_without_sigquit_handler_is_not_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let java = dir.path().join("java");
    std::fs::copy(program("chain"), &java).unwrap();
    let mut target = spawn(Command::new(&java).arg("60"));
    settle();
    let out = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 3, out.path());
    assert!(
        target.0.try_wait().unwrap().is_none(),
        "the process died: {:?}\n{log}",
        target.0.try_wait()
    );
    assert!(log.contains("JVMs left alone"), "{log}");
    assert!(!log.contains("JVM perf maps requested"), "{log}");
}

/// A JVM started with -XX:+DisableAttachMechanism is not asked for its perf map: the
/// SIGQUIT jattach would send makes it print a full thread dump into the
/// application's own stdout.
#[test]
fn jvm_with_attach_disabled_prints_no_thread_dump() {
    let _cpu = cpu_heavy_lock();
    let classes = compile_chain_java();
    let stdout = classes.path().join("stdout.txt");
    let target = KillOnDrop(
        Command::new("java")
            .arg("-XX:+DisableAttachMechanism")
            .arg("-cp")
            .arg(classes.path())
            .args(["Chain", "60"])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("java (17) is installed"),
    );
    settle();
    let out = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 3, out.path());
    let printed = std::fs::read_to_string(&stdout).unwrap();
    assert!(
        !printed.contains("Full thread dump"),
        "the JVM printed a thread dump:\n{printed}"
    );
    assert!(log.contains("JVMs left alone"), "{log}");
}

/// The directory node runs in (it writes an isolate-*.log into its working
/// directory: kept out of ours) and tests/programs/chain.js under
/// `node --perf-basic-prof`, 2 s in, its perf map written. Without inlining: V8
/// may otherwise fold the whole chain into the optimized main loop (all samples
/// then in `JS:* chain.js:1:1`, none in jsInner), depending on when it tiers up.
fn node_with_perf_map() -> (tempfile::TempDir, KillOnDrop) {
    let cwd = tempfile::tempdir().unwrap();
    let target = spawn(
        Command::new("node")
            .current_dir(cwd.path())
            .arg("--perf-basic-prof")
            .arg("--no-turbo-inlining")
            .arg(programs_dir().join("chain.js"))
            .arg("60"),
    );
    std::thread::sleep(Duration::from_secs(2));
    (cwd, target)
}

/// Node with --perf-basic-prof: its JIT frames are named from the perf map it writes.
#[test]
fn node_jit_frames_named_from_perf_map() {
    let _cpu = cpu_heavy_lock();
    let (_cwd, target) = node_with_perf_map();
    let dir = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 3, dir.path());
    let stacks = read_folded(dir.path());
    let named: u64 = stacks
        .iter()
        .filter(|s| s.frames[0] == "node")
        .filter(|s| {
            s.frames
                .iter()
                .any(|f| f.contains("jsInner") && f.ends_with("_[j]"))
        })
        .map(|s| s.count)
        .sum();
    assert!(named > 50, "{named} samples in jsInner:\n{log}");
}

/// A perf map owned by another uid than the process (as if planted) is refused: its
/// names are not used, the summary counts the refusal, and the profile is written.
#[test]
fn foreign_owned_perf_map_is_refused_and_counted() {
    let _cpu = cpu_heavy_lock();
    let (_cwd, target) = node_with_perf_map();
    let map = format!("/tmp/perf-{}.map", target.pid());
    std::os::unix::fs::chown(&map, Some(65534), None).expect("node wrote its perf map");
    let dir = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 3, dir.path());
    let stacks = read_folded(dir.path());
    assert!(stacks.iter().any(|s| s.frames[0] == "node"), "{log}");
    assert!(
        !stacks
            .iter()
            .flat_map(|s| &s.frames)
            .any(|f| f.ends_with("_[j]")),
        "names from a refused map:\n{log}"
    );
    assert!(log.contains("perf maps: 1 refused"), "{log}");
}

/// A perf map last written before its process started (a previous process's with
/// the same pid: Node never deletes its map) is not used; the same map written after
/// the start names the code.
#[test]
fn perf_map_older_than_its_process_is_refused() {
    use std::io::BufRead as _;
    let _cpu = cpu_heavy_lock();
    let mut child = Command::new(program("anon_code"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start anon_code");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let target = KillOnDrop(child);
    let addr = u64::from_str_radix(line.trim(), 16).expect("hex address");
    let map = PathBuf::from(format!("/tmp/perf-{}.map", target.pid()));
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _map = RemoveOnDrop(map.clone());
    std::fs::write(&map, format!("{addr:x} 100 planted_fn\n")).unwrap();
    let named = |dir: &Path| {
        read_folded(dir)
            .iter()
            .filter(|s| s.frames.iter().any(|f| f == "planted_fn_[j]"))
            .map(|s| s.count)
            .sum::<u64>()
    };

    let fresh = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 2, fresh.path());
    assert!(
        named(fresh.path()) > 20,
        "the fresh map named nothing:\n{log}"
    );

    let status = Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&map)
        .status()
        .unwrap();
    assert!(status.success());
    let stale = tempfile::tempdir().unwrap();
    let log = record_cli(target.pid(), 2, stale.path());
    assert_eq!(named(stale.path()), 0, "names from a stale map:\n{log}");
    assert!(log.contains("perf maps: 1 refused"), "{log}");
}

/// `programs/chain.py` running for `secs`, settled.
fn python_chain(secs: u64) -> KillOnDrop {
    let target = spawn(
        Command::new("python3")
            .arg(programs_dir().join("chain.py"))
            .arg(secs.to_string()),
    );
    settle();
    target
}

/// An executable shell script `dir/name` with `body`, standing in for a tool.
fn script_tool(dir: &Path, name: &str, body: &str) -> PathBuf {
    let tool = dir.join(name);
    std::fs::write(&tool, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    tool
}

/// `profiler record` of `pid` for `secs`, Python only, with `py_spy` as py-spy.
fn record_python_with(pid: u32, secs: u64, out_dir: &Path, py_spy: &Path) -> Command {
    let mut cmd = Command::new(profiler_bin());
    cmd.args([
        "record",
        "--duration",
        &secs.to_string(),
        "--runtimes",
        "python",
    ])
    .args(["--pid", &pid.to_string()])
    .arg("--output-dir")
    .arg(out_dir)
    .arg("--py-spy")
    .arg(py_spy);
    cmd
}

/// A missing tool is said once, and the native profile is still written.
#[test]
fn missing_tool_is_one_note_and_native_still_works() {
    let target = python_chain(30);
    let dir = tempfile::tempdir().unwrap();
    let out = record_python_with(
        target.pid(),
        2,
        dir.path(),
        Path::new("/nonexistent/py-spy"),
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .matches("not found: `/nonexistent/py-spy` does not exist (for python)")
            .count(),
        1,
        "{stderr}"
    );
    let stacks = read_folded(dir.path());
    assert!(stacks.iter().any(|s| s.frames[0] == "python3"));
    assert!(!stacks
        .iter()
        .flat_map(|s| &s.frames)
        .any(|f| f.ends_with("_[py]")));
}

/// A 2 s Python-only `record` of `pid` with the shell script `body` standing in for
/// py-spy, which must succeed: its directory (the script `name` and the output
/// directory `out`) and its stderr.
fn record_with_script_py_spy(pid: u32, name: &str, body: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let tool = script_tool(dir.path(), name, body);
    let out = record_python_with(pid, 2, &dir.path().join("out"), &tool)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (dir, stderr)
}

/// A tool that fails says why in the summary, in its own words, with the pid it was
/// pointed at; the native profile is still written.
#[test]
fn failing_tool_is_reported_with_its_last_line() {
    let target = python_chain(30);
    let (dir, stderr) = record_with_script_py_spy(
        target.pid(),
        "failing-py-spy",
        "echo 'Error: Permission denied (os error 13)' >&2\nexit 3",
    );
    let expected = format!(
        "last runtime profiler failure: {} for pid {} (python) exited with status 3: Error: Permission denied (os error 13)",
        dir.path().join("failing-py-spy").display(),
        target.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    let stacks = read_folded(&dir.path().join("out"));
    assert!(stacks.iter().any(|s| s.frames[0] == "python3"));
}

/// Garbage in a tool's output is skipped and counted in the summary, and the good
/// lines around it still arrive.
#[test]
fn garbage_tool_output_is_counted_and_skipped() {
    let target = python_chain(30);
    let (dir, stderr) = record_with_script_py_spy(
        target.pid(),
        "garbage-py-spy",
        r#"while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out=$2; shift; done
printf 'not a stack at all\n\001\002 x\nmain (chain.py:3);garbage_leaf (chain.py:9) 4\n' > "$out""#,
    );
    assert!(
        stderr.contains("runtime profiler output: 2 malformed lines skipped"),
        "{stderr}"
    );
    let stacks = read_folded(&dir.path().join("out"));
    assert!(
        stacks.iter().any(|s| s
            .frames
            .last()
            .is_some_and(|f| f.starts_with("garbage_leaf"))),
        "{stacks:#?}"
    );
}

/// Ctrl-C while `record` waits for a runtime profiler that will not finish stops
/// it and writes what was recorded, instead of waiting for the tool's deadline.
#[test]
fn ctrl_c_stops_the_wait_for_runtime_profilers() {
    let target = python_chain(60);
    let dir = tempfile::tempdir().unwrap();
    let tool = script_tool(dir.path(), "hanging-py-spy", "exec sleep 600");
    let out_dir = dir.path().join("out");
    let log = dir.path().join("stderr");
    let mut record = KillOnDrop(
        record_python_with(target.pid(), 1, &out_dir, &tool)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    for _ in 0..300 {
        if read_log().contains("waiting for 1 runtime profiler(s)") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        read_log().contains("waiting for 1 runtime profiler(s)"),
        "{}",
        read_log()
    );
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(record.pid() as i32, libc::SIGINT) }, 0);
    let status = record.wait();
    let text = read_log();
    assert!(status.success(), "{text}");
    assert!(
        text.contains("stopping the runtime profilers: writing what was recorded"),
        "{text}"
    );
    // A run we stopped did not fail: it is counted apart.
    assert!(!text.contains("last runtime profiler failure"), "{text}");
    assert!(text.contains("(0 failed, 1 stopped early)"), "{text}");
    let stacks = read_folded(&out_dir);
    assert!(stacks.iter().any(|s| s.frames[0] == "python3"), "{text}");
}

/// The agent merges py-spy's stacks into its OTLP profiles: frames typed `cpython`
/// with the chain in order, in the Python process's resource.
#[test]
fn agent_exports_python_frames_over_otlp() {
    let _cpu = cpu_heavy_lock();
    let receiver = Receiver::start(0, &[]);
    let target = python_chain(60);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let py_spy = tool("PY_SPY_BIN");
    let mut agent = Agent::start(&[
        "--endpoint",
        &endpoint,
        "--interval",
        "3",
        "--pid",
        &target.pid().to_string(),
        "--runtimes",
        "python",
        "--py-spy",
        py_spy.to_str().unwrap(),
    ]);
    let requests = receiver.wait_for(2, Duration::from_secs(30));
    let status = agent
        .terminate(Duration::from_secs(20))
        .expect("agent exits");
    assert!(status.success(), "{}", agent.log());
    assert_well_formed(&requests);
    let mut python_samples = 0;
    for (_, p) in otlp_profiles_of(&requests, target.pid()) {
        for s in p["samples"].as_array().unwrap() {
            let frames = sample_strings(s, "frames");
            let types = sample_strings(s, "frame_types");
            if contains_chain(&frames, &["py_inner", "py_middle", "py_outer"]) {
                assert!(types.iter().all(|t| t == "cpython"), "{types:?}");
                python_samples += s["values"][0].as_i64().unwrap();
            }
        }
    }
    assert!(
        python_samples > 50,
        "{python_samples} Python samples; log:\n{}",
        agent.log()
    );
}

/// A shell the agent already classified as native that then runs
/// `exec python3 chain.py` keeps its pid and start time: the agent sees the exec,
/// classifies it again, and its Python frames come from py-spy in later intervals.
#[test]
fn shell_that_execs_python_gets_python_frames() {
    let _cpu = cpu_heavy_lock();
    let script = format!(
        "sleep 4; exec '{}' '{}' 60",
        python_executable().display(),
        programs_dir().join("chain.py").display()
    );
    let target = spawn(Command::new("sh").args(["-c", &script]));
    let dir = tempfile::tempdir().unwrap();
    let py_spy = tool("PY_SPY_BIN");
    let mut agent = Agent::start(&[
        "--interval",
        "2",
        "--pid",
        &target.pid().to_string(),
        "--runtimes",
        "python",
        "--py-spy",
        py_spy.to_str().unwrap(),
        "--output-dir",
        dir.path().to_str().unwrap(),
    ]);
    // The first rounds see `sh`; the exec comes 4 s in; then a few intervals of Python.
    std::thread::sleep(Duration::from_secs(13));
    let status = agent
        .terminate(Duration::from_secs(20))
        .expect("agent exits");
    assert!(status.success(), "{}", agent.log());
    let stacks: Vec<FoldedStack> = folded_files(dir.path())
        .iter()
        .flat_map(|p| read_folded_file(p))
        .collect();
    let chain = ["py_outer_[py]", "py_middle_[py]", "py_inner_[py]"];
    let python: u64 = stacks
        .iter()
        .filter(|s| contains_chain(&s.frames, &chain))
        .map(|s| s.count)
        .sum();
    assert!(
        python > 50,
        "{python} samples with the Python chain after the exec:\n{}",
        agent.log()
    );
}

/// PHP end to end, with a stand-in for phpspy: phpspy cannot be installed on this
/// machine, so a shell script given as `--phpspy` writes phpspy's documented output
/// format (its README's examples: `DEPTH FUNCTION FILE:LINE` frame lines, innermost
/// first, a blank line after each sample, `#` comment lines) to its `-o` file for the
/// `-p` process it was given, after checking that process runs `php`. The target is
/// the native `chain` program copied under the name `php`, which detection takes for
/// PHP. Its PHP frames arrive root first, marked `_[php]`, under that process, beside
/// its native frames. This checks our side (arguments, detection, run, parse,
/// merge), not phpspy itself.
#[test]
fn php_frames_from_a_fake_phpspy() {
    let dir = tempfile::tempdir().unwrap();
    let php_dir = dir.path().join("bin");
    std::fs::create_dir(&php_dir).unwrap();
    let php = php_dir.join("php");
    std::fs::copy(program("chain"), &php).unwrap();
    let target = spawn(Command::new(&php).arg("60"));
    settle();
    let phpspy = script_tool(
        dir.path(),
        "fake-phpspy",
        r#"pid= out=
while [ $# -gt 0 ]; do
  case "$1" in
    -p) pid=$2; shift 2 ;;
    -o) out=$2; shift 2 ;;
    *) shift ;;
  esac
done
case "$(readlink "/proc/$pid/exe")" in
  */php) ;;
  *) echo "fake phpspy: pid $pid does not run php" >&2; exit 2 ;;
esac
i=0
while [ $i -lt 120 ]; do
  printf '0 php_inner /srv/app/chain.php:3\n1 php_middle /srv/app/chain.php:8\n2 Chain::php_outer /srv/app/chain.php:13\n3 <main> /srv/app/chain.php:1\n# trace_ts = 1700000000.%06d\n# pid = %s\n\n' $i "$pid"
  i=$((i + 1))
done > "$out"
printf '0 usleep <internal>:-1\n1 <main> /srv/app/chain.php:1\n\n' >> "$out""#,
    );
    let out_dir = dir.path().join("out");
    let out = Command::new(profiler_bin())
        .args(["record", "--quiet", "--duration", "3"])
        .args(["--pid", &target.pid().to_string()])
        .args(["--runtimes", "php"])
        .arg("--phpspy")
        .arg(&phpspy)
        .arg("--output-dir")
        .arg(&out_dir)
        .output()
        .expect("run profiler record");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "profiler record failed:\n{log}");
    assert!(!log.contains("last runtime profiler failure"), "{log}");
    let stacks = read_folded(&out_dir);
    let chain = [
        "<main>_[php]",
        "Chain::php_outer_[php]",
        "php_middle_[php]",
        "php_inner_[php]",
    ];
    let php_samples = samples_with_chain(&stacks, "php", &chain);
    assert!(
        php_samples >= 100,
        "{php_samples} samples with the PHP chain:\n{log}\n{stacks:?}"
    );
    let builtin = samples_with_chain(&stacks, "php", &["<main>_[php]", "usleep_[php]"]);
    assert!(builtin > 0, "the built-in's sample is missing: {stacks:?}");
    // The same process's native stacks are there too, unmarked.
    let native = samples_with_chain(&stacks, "php", &["chain_outer", "chain_middle"]);
    assert!(native > 50, "{native} native samples of php:\n{log}");
}

/// Children and threads of process `pid`, read from /proc.
fn children_and_threads(pid: u32) -> (usize, usize) {
    let mut children = 0;
    let mut threads = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            threads += 1;
            children += std::fs::read_to_string(task.path().join("children"))
                .map(|s| s.split_whitespace().count())
                .unwrap_or(0);
        }
    }
    (children, threads)
}

/// The children of process `pid` (listed by each of its threads) with their start
/// times, so a child can be told from a later process given its pid.
fn children_of(pid: u32) -> Vec<(u32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .filter_map(|child| Some((child, state_and_start(child)?.1)))
        .collect()
}

/// State letter and start time (field 22) of process `pid`, from /proc/PID/stat.
fn state_and_start(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command, which may hold spaces and parentheses: state is
    // field 3, the start time field 22.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(19)?.parse().ok()?,
    ))
}

/// Of `children` (pid, start time), those still running, after waiting up to 3 s for
/// their end to be seen (a zombie waiting for its reaper counts as ended).
fn still_running(children: &std::collections::HashMap<u32, u64>) -> Vec<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let running: Vec<u32> = children
            .iter()
            .filter(|&(&pid, &start)| {
                state_and_start(pid).is_some_and(|(state, s)| s == start && !"ZX".contains(state))
            })
            .map(|(&pid, _)| pid)
            .collect();
        if running.is_empty() || std::time::Instant::now() > deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 200 Python processes at once: the agent never runs more py-spy children than
/// --max-runtime-children, nor grows threads with them; the targets that do not fit
/// a round are counted and wait their turn; after SIGTERM no child it started is
/// left running, nor after SIGKILL (their PDEATHSIG takes them).
#[test]
fn many_python_processes_stay_within_the_child_cap() {
    let _cpu = cpu_heavy_lock();
    // Mostly asleep, so 200 of them do not starve the other tests of CPU.
    let python = python_executable();
    let targets: Vec<KillOnDrop> = (0..200)
        .map(|_| {
            // -S: no site import, half the start-up CPU.
            spawn(Command::new(&python).args([
                "-S",
                "-c",
                "import time\nwhile True: sum(range(20000)); time.sleep(0.5)",
            ]))
        })
        .collect();
    // Until every interpreter is up (its mappings show libpython or python3).
    std::thread::sleep(Duration::from_secs(2));
    let py_spy = tool("PY_SPY_BIN");
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = vec![
        "--interval".into(),
        "3".into(),
        "--runtimes".into(),
        "python".into(),
        "--max-runtime-children".into(),
        "2".into(),
        "--py-spy".into(),
        py_spy.to_str().unwrap().into(),
        "--output-dir".into(),
        dir.path().to_str().unwrap().into(),
    ];
    for t in &targets {
        args.push("--pid".into());
        args.push(t.pid().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&args);
    let agent_pid = agent.child.pid();
    let (mut max_children, mut max_threads) = (0, 0);
    // Every child seen (pid and start time): checked after the agent is gone, when
    // its /proc entry no longer lists them.
    let mut seen = std::collections::HashMap::new();
    let end = std::time::Instant::now() + Duration::from_secs(14);
    while std::time::Instant::now() < end {
        let (c, t) = children_and_threads(agent_pid);
        max_children = max_children.max(c);
        max_threads = max_threads.max(t);
        seen.extend(children_of(agent_pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    let at_the_end = children_of(agent_pid).len();
    let status = agent
        .terminate(Duration::from_secs(20))
        .expect("agent exits");
    assert!(status.success(), "{}", agent.log());
    assert!(max_children <= 2, "{max_children} children at once");
    assert!(max_children >= 1, "py-spy never ran:\n{}", agent.log());
    // The runtime, the blocking pool (2), the cycle thread, the drain: not 24.
    assert!(max_threads <= 8, "{max_threads} threads");
    let log = agent.log();
    let deferred: u64 = log
        .split("runtime_targets_deferred=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no deferred count in the log:\n{log}"));
    assert!(
        deferred > 0,
        "200 targets in 2 slots must wait for turns:\n{log}"
    );
    let runs: u64 = log
        .split("runtime_runs=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(runs >= 4, "{runs} py-spy runs:\n{log}");
    assert!(!seen.is_empty(), "no child seen:\n{log}");
    let left = still_running(&seen);
    assert!(
        left.is_empty(),
        "py-spy children {left:?} outlived the agent's SIGTERM ({} seen, {at_the_end} running at the end)",
        seen.len()
    );

    // Again, ended by SIGKILL: no shutdown code runs, the kernel's PDEATHSIG does.
    let mut agent = Agent::start(&args);
    let agent_pid = agent.child.pid();
    let mut seen = std::collections::HashMap::new();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < end {
        let now = children_of(agent_pid);
        let running = !now.is_empty();
        seen.extend(now);
        if running && seen.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!seen.is_empty(), "py-spy never ran:\n{}", agent.log());
    agent
        .stop_with(libc::SIGKILL, Duration::from_secs(10))
        .expect("SIGKILL ends the agent");
    let left = still_running(&seen);
    assert!(
        left.is_empty(),
        "py-spy children {left:?} outlived the agent's SIGKILL ({} seen)",
        seen.len()
    );
}
