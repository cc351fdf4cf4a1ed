//! Helpers for the end-to-end tests: build the C programs in `programs/`, run them as
//! children that are killed on drop, record with the real profiler, and read its
//! output back (folded text, pprof via our decoder and via Google's pprof).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use prost::Message as _;

pub use profiler::export::pprof::proto;
use profiler::{config::RecordConfig, record::RecordSummary};

/// The call chain of `programs/chain.c`, root first.
pub const CHAIN_ROOT_FIRST: [&str; 5] = [
    "main",
    "chain_outer",
    "chain_middle",
    "chain_inner",
    "spin_leaf",
];

/// Directory of this crate.
pub fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `programs/NAME.c` with frame pointers and symbols; returns the binary.
/// Each binary is built once per test run: under a lock, since two tests building
/// the same one at once would replace the file a running program was started from
/// (its path then reads `... (deleted)` in /proc).
pub fn program(name: &str) -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"));
    let out = dir.path().join(name);
    if !out.exists() {
        let tmp = dir
            .path()
            .join(format!("{name}.building.{:?}", std::thread::current().id()));
        let status = Command::new("gcc")
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
            .arg(&tmp)
            .arg(crate_dir().join("programs").join(format!("{name}.c")))
            .status()
            .expect("gcc is installed (cargo xtask test installs it)");
        assert!(status.success(), "gcc failed for {name}.c");
        std::fs::rename(&tmp, &out).expect("rename built program");
    }
    out
}

/// A copy of `programs/NAME.c`'s binary under another file name, so its processes
/// have their own name (comm) and cannot be confused with other tests' processes.
pub fn program_named(name: &str, as_name: &str) -> PathBuf {
    static COPYING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let copy = program(name).with_file_name(as_name);
    let _copying = COPYING.lock().unwrap_or_else(|p| p.into_inner());
    if !copy.exists() {
        let tmp = copy.with_extension(format!("copy.{:?}", std::thread::current().id()));
        std::fs::copy(program(name), &tmp).expect("copy program");
        std::fs::rename(&tmp, &copy).expect("rename program copy");
    }
    copy
}

/// A child process that is killed and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        KillOnDrop(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn test program"),
        )
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the child to exit by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().expect("wait for test program")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `programs/NAME.c` with arguments.
///
/// The profiler binary is built first: on a cold 2-core CI machine that build can
/// take longer than the program runs, and a target that exits before the agent
/// starts yields an empty profile, not a failure of the code under test.
pub fn start(name: &str, args: &[&str]) -> KillOnDrop {
    profiler_bin();
    KillOnDrop::spawn(Command::new(program(name)).args(args))
}

/// Records with the real profiler (eBPF and all) through the library.
pub fn record(pids: &[u32], seconds: u64, frequency: u64, dir: &Path) -> RecordSummary {
    let config = RecordConfig::new(
        seconds,
        frequency,
        pids.to_vec(),
        dir.to_path_buf(),
        false,
        false,
    )
    .expect("valid config");
    let runtime = profiler::record::runtime().expect("runtime");
    runtime
        .block_on(profiler::record::run(&config))
        .expect("recording succeeds")
}

/// One folded line: frames root first, and its count.
#[derive(Debug, Clone)]
pub struct FoldedStack {
    pub frames: Vec<String>,
    pub count: u64,
}

/// Reads `profile.folded`, failing on any malformed line.
pub fn read_folded(dir: &Path) -> Vec<FoldedStack> {
    read_folded_file(&dir.join("profile.folded"))
}

/// Reads a folded-stacks file, failing on any malformed line.
pub fn read_folded_file(path: &Path) -> Vec<FoldedStack> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let (stack, count) = line.rsplit_once(' ').expect("`stack count` line");
            FoldedStack {
                frames: stack.split(';').map(String::from).collect(),
                count: count.parse().expect("numeric count"),
            }
        })
        .collect()
}

/// The folded files the agent wrote into `dir`, oldest first (their names start
/// with the interval's time).
pub fn folded_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".folded"))
        .collect();
    files.sort();
    files
}

/// True if `frames` contains `chain` as consecutive frames.
pub fn contains_chain(frames: &[String], chain: &[&str]) -> bool {
    frames
        .windows(chain.len())
        .any(|w| w.iter().zip(chain).all(|(a, b)| a == b))
}

/// Samples of folded stacks rooted at `process` that contain `chain`.
pub fn samples_with_chain(stacks: &[FoldedStack], process: &str, chain: &[&str]) -> u64 {
    stacks
        .iter()
        .filter(|s| s.frames.first().map(String::as_str) == Some(process))
        .filter(|s| contains_chain(&s.frames, chain))
        .map(|s| s.count)
        .sum()
}

/// Decodes `profile.pb.gz` with our generated types.
pub fn read_pprof(dir: &Path) -> proto::Profile {
    let gz = std::fs::read(dir.join("profile.pb.gz")).expect("profile.pb.gz");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).expect("gzip");
    proto::Profile::decode(&raw[..]).expect("valid profile.proto message")
}

/// Google's pprof, built by `cargo xtask test` (PPROF_BIN) from Debian's sources.
pub fn pprof_bin() -> PathBuf {
    let path = std::env::var_os("PPROF_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_dir().join("../target/tools/pprof"));
    assert!(
        path.exists(),
        "Google's pprof is not at {} (run the tests with `cargo xtask test`, which builds it)",
        path.display()
    );
    path
}

/// Runs Google's pprof with `args` on the profile in `dir`; returns stdout, failing
/// the test if pprof rejects the file.
pub fn run_pprof(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(pprof_bin())
        .args(args)
        .arg(dir.join("profile.pb.gz"))
        .env("PPROF_TMPDIR", dir)
        .output()
        .expect("run pprof");
    assert!(
        out.status.success(),
        "pprof {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// One pprof sample as the tests look at it.
#[derive(Debug)]
pub struct PprofSample {
    /// Function names, root first, inlined frames expanded.
    pub frames: Vec<String>,
    /// The first value (samples/count).
    pub count: i64,
    /// (key, value) of every label; numeric values as decimal text.
    pub labels: Vec<(String, String)>,
}

/// The samples of a pprof profile, via our own decoder.
pub fn pprof_stacks(p: &proto::Profile) -> Vec<PprofSample> {
    let s = |i: i64| p.string_table[i as usize].clone();
    p.sample
        .iter()
        .map(|sample| {
            let mut frames: Vec<String> = Vec::new();
            for id in sample.location_id.iter().rev() {
                let loc = &p.location[*id as usize - 1];
                for line in loc.line.iter().rev() {
                    frames.push(s(p.function[line.function_id as usize - 1].name));
                }
            }
            let labels = sample
                .label
                .iter()
                .map(|l| {
                    let v = if l.str != 0 {
                        s(l.str)
                    } else {
                        l.num.to_string()
                    };
                    (s(l.key), v)
                })
                .collect();
            PprofSample {
                frames,
                count: sample.value[0],
                labels,
            }
        })
        .collect()
}

/// Serializes the tests that load the CPU heavily (200 processes at once) with the
/// tests that need their program to get CPU time in a short window: on a 2-core
/// CI machine the first starves the second.
pub fn cpu_heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives a started program time to exec before it is profiled.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

/// The `profiler` binary, built (once per test run) with cargo so it is current.
pub fn profiler_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--package",
                "profiler-userspace",
                "--bin",
                "profiler",
            ])
            .current_dir(crate_dir())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the profiler binary failed");
        // target/<profile>/deps/integration-* -> target/<profile>/profiler
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .join("profiler")
    })
    .clone()
}

/// The Python with PyPI's opentelemetry-proto and grpcio that `cargo xtask test`
/// installs (OTLP_PYTHON, or target/tools/otlp-venv).
pub fn otlp_python() -> PathBuf {
    let path = std::env::var_os("OTLP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_dir().join("../target/tools/otlp-venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with opentelemetry-proto and grpcio at {} (run the tests with `cargo xtask test`, which installs it)",
        path.display()
    );
    path
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind loopback")
        .port()
}

/// A TCP proxy on loopback that forwards to `127.0.0.1:upstream` and counts the
/// bytes clients send: what goes on the wire, whatever the protocol above does.
/// Stops accepting on drop; open connections end when either side closes.
pub struct CountingProxy {
    pub port: u16,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CountingProxy {
    pub fn start(upstream: u16) -> CountingProxy {
        use std::sync::{
            atomic::{AtomicBool, AtomicU64, Ordering},
            Arc,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let port = listener.local_addr().expect("local addr").port();
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopping) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let pipe = |mut from: std::net::TcpStream,
                            mut to: std::net::TcpStream,
                            count: Option<Arc<AtomicU64>>| {
                    std::thread::spawn(move || {
                        use std::io::{Read as _, Write as _};
                        let mut buf = [0u8; 16 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            if let Some(count) = &count {
                                count.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(client, server, Some(counter.clone()));
                pipe(s2, c2, None);
            }
        });
        CountingProxy { port, sent, stop }
    }

    /// Bytes clients have sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The Python OTLP receiver (tests/otlp/receiver.py), killed on drop.
pub struct Receiver {
    child: KillOnDrop,
    pub port: u16,
    pub out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    /// Starts it with extra `args` on `port` (0: any free port).
    pub fn start(port: u16, args: &[&str]) -> Receiver {
        use std::io::BufRead as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let out = dir.path().join("requests.jsonl");
        let mut child = Command::new(otlp_python())
            .env("GRPC_VERBOSITY", "NONE")
            .arg(crate_dir().join("otlp/receiver.py"))
            .args(["--port", &port.to_string(), "--out"])
            .arg(&out)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OTLP receiver");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("receiver output");
        let port = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"));
        Receiver {
            child: KillOnDrop(child),
            port,
            out,
            _dir: dir,
        }
    }

    /// Every request received so far, decoded by the official classes.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver writes JSON lines"))
            .collect()
    }

    /// Waits up to `timeout` for at least `n` requests.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let end = std::time::Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n || std::time::Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops it (like a backend going down).
    pub fn stop(self) {
        drop(self.child);
    }
}

/// A `profiler agent` child with its stderr (the log) captured to a file.
/// Every request the OTLP receiver decoded had all dictionary indices resolving.
pub fn assert_well_formed(requests: &[serde_json::Value]) {
    for r in requests {
        assert_eq!(
            r["errors"],
            serde_json::Value::Array(vec![]),
            "dictionary problems: {r}"
        );
    }
}

/// (resource attributes, profile) of every profile the receiver accepted, for one pid.
pub fn otlp_profiles_of(
    requests: &[serde_json::Value],
    pid: u32,
) -> Vec<(serde_json::Value, serde_json::Value)> {
    let mut out = vec![];
    for r in requests.iter().filter(|r| r["status"] == "OK") {
        for res in r["resources"].as_array().unwrap() {
            if res["attributes"]["process.pid"] == pid {
                for p in res["profiles"].as_array().unwrap() {
                    out.push((res["attributes"].clone(), p.clone()));
                }
            }
        }
    }
    out
}

/// A list of strings of a received sample: `frames` (leaf first) or `frame_types`.
pub fn sample_strings(sample: &serde_json::Value, key: &str) -> Vec<String> {
    sample[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

pub struct Agent {
    pub child: KillOnDrop,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Agent::start_with_env(args, &[])
    }

    /// Starts it with `env` on top of ours, minus any OTEL_* or RUST_LOG we have.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("agent.log");
        let inherited: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| !k.starts_with("OTEL_") && k != "RUST_LOG")
            .collect();
        let child = Command::new(profiler_bin())
            .arg("agent")
            .args(args)
            .env_clear()
            .envs(inherited)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start the agent");
        Agent {
            child: KillOnDrop(child),
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for `text` to appear in the log; returns the log.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(text) || std::time::Instant::now() >= deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.stop_with(libc::SIGTERM, timeout)
    }

    /// Sends `signal` and waits up to `timeout` for the agent to exit.
    pub fn stop_with(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.pid() as i32, signal) };
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
