//! `profiler agent` against a real OTLP receiver we did not write: Python's
//! opentelemetry-proto (official generated classes) and grpcio, on loopback.
//!
//! Tests that need a profile every interval but no particular stack sample idle
//! CPUs too (`--include-idle`): an idle machine gives none otherwise.

use std::time::Duration;

use profiler_tests::*;
use serde_json::Value;

/// Samples of OTLP profiles holding the chain of `programs/chain.c` (OTLP stacks
/// are leaf first).
fn samples_with_chain(profiles: &[(Value, Value)]) -> i64 {
    let leaf_first: Vec<&str> = CHAIN_ROOT_FIRST.iter().rev().copied().collect();
    profiles
        .iter()
        .flat_map(|(_, p)| p["samples"].as_array().unwrap())
        .filter(|s| contains_chain(&sample_strings(s, "frames"), &leaf_first))
        .map(|s| s["values"][0].as_i64().unwrap())
        .sum()
}

/// The known chain of a test program arrives leaf first, with OTel resource
/// attributes (ours, and the user's from OTEL_RESOURCE_ATTRIBUTES and
/// --service-name), sample type and period; counts match the local files written
/// in the same run; SIGTERM exits 0.
#[test]
fn exports_known_chain_with_resource_attributes() {
    let receiver = Receiver::start(0, &[]);
    let target = start("chain", &["30"]);
    settle();
    let files = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut agent = Agent::start_with_env(
        &[
            "--endpoint",
            &endpoint,
            "--interval",
            "2",
            "--pid",
            &target.pid().to_string(),
            "--output-dir",
            files.path().to_str().unwrap(),
            "--service-name",
            "chain-service",
        ],
        &[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment.name=test%20lab,service.name=overridden",
        )],
    );
    std::thread::sleep(Duration::from_secs(5));
    let status = agent
        .terminate(Duration::from_secs(20))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "{}", agent.log());
    let requests = receiver.requests();
    assert!(
        !requests.is_empty(),
        "nothing received; log:\n{}",
        agent.log()
    );
    assert_well_formed(&requests);

    let profiles = otlp_profiles_of(&requests, target.pid());
    assert!(
        !profiles.is_empty(),
        "no profile for the target: {requests:?}"
    );
    let (attrs, profile) = &profiles[0];
    assert_eq!(attrs["process.executable.name"], "chain");
    assert_eq!(
        attrs["process.executable.path"],
        program("chain").to_str().unwrap()
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(attrs["host.name"], host.trim());
    assert_eq!(attrs["deployment.environment.name"], "test lab");
    assert_eq!(attrs["service.name"], "chain-service");
    assert_eq!(
        profile["sample_type"],
        serde_json::json!(["samples", "count"])
    );
    assert_eq!(
        profile["period_type"],
        serde_json::json!(["cpu", "nanoseconds"])
    );
    assert_eq!(profile["period"], 1_000_000_000 / 97);
    let sample = &profile["samples"][0];
    assert_eq!(sample["attributes"]["thread.name"], "chain");
    assert!(sample["frame_types"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t == "native" || t == "kernel"));

    let total: i64 = profiles
        .iter()
        .flat_map(|(_, p)| p["samples"].as_array().unwrap())
        .map(|s| s["values"][0].as_i64().unwrap())
        .sum();
    let chain = samples_with_chain(&profiles);
    assert!(chain * 2 > total, "chain in {chain} of {total} samples");

    // The same profiles were written locally: the counts agree.
    let local: u64 = std::fs::read_dir(files.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".folded"))
        .flat_map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .lines()
                .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .sum();
    assert_eq!(local as i64, total, "OTLP and local files disagree");
}

/// A cgroup named as Docker names a container's (`docker-<64 hex>.scope`) in the
/// cgroup v2 hierarchy, holding one process; moved back out and removed on drop.
struct ContainerCgroup {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
    pid: u32,
    id: String,
}

impl ContainerCgroup {
    fn enter(pid: u32) -> ContainerCgroup {
        // cgroup v2 alone, or the unified hierarchy of a hybrid setup.
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists())
            .expect("a cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
        let id = format!("{:064x}", u128::from(std::process::id()) << 64 | 0xc0ffee);
        let dir = root.join(format!("docker-{id}.scope"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let cgroup = ContainerCgroup { dir, root, pid, id };
        std::fs::write(cgroup.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", cgroup.dir.display()));
        cgroup
    }
}

impl Drop for ContainerCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The GNU build id of an ELF file, as `readelf -n` prints it.
fn build_id_of(path: &std::path::Path) -> String {
    let out = std::process::Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .expect("readelf (binutils) is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .unwrap_or_else(|| panic!("no build id in {}: {text}", path.display()))
        .to_string()
}

/// A process in a container's cgroup arrives with `container.id`, and its
/// executable's mapping with the build id `readelf` finds in the file.
#[test]
fn container_id_and_build_id_reach_the_receiver() {
    let receiver = Receiver::start(0, &[]);
    let target = start("chain", &["30"]);
    let cgroup = ContainerCgroup::enter(target.pid());
    settle();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut agent = Agent::start(&[
        "--endpoint",
        &endpoint,
        "--interval",
        "1",
        "--pid",
        &target.pid().to_string(),
    ]);
    let requests = receiver.wait_for(2, Duration::from_secs(20));
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    assert_well_formed(&requests);
    let profiles = otlp_profiles_of(&requests, target.pid());
    assert!(!profiles.is_empty(), "{}", agent.log());
    for (attrs, _) in &profiles {
        assert_eq!(attrs["container.id"], cgroup.id.as_str(), "{attrs}");
    }

    let exe = program("chain");
    let want = build_id_of(&exe);
    let mappings: Vec<&Value> = requests
        .iter()
        .flat_map(|r| r["mappings"].as_array().unwrap())
        .filter(|m| m["filename"] == exe.to_str().unwrap())
        .collect();
    assert!(!mappings.is_empty(), "no mapping of {}", exe.display());
    for m in mappings {
        assert_eq!(
            m["attributes"]["process.executable.build_id.gnu"],
            want.as_str(),
            "{m}"
        );
    }
}

/// Processes that exit in the agent's open interval, before the cycle of the
/// interval before it ends (when exited processes are forgotten), are still named
/// when their interval is symbolized. Four loops of 1.5 s runs of the chain
/// program over 1 s intervals: each run is captured long before it exits, and many
/// exit while a cycle runs.
#[test]
fn processes_exiting_in_the_open_interval_are_named() {
    let _heavy = cpu_heavy_lock();
    let files = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&[
        "--interval",
        "1",
        "--output-dir",
        files.path().to_str().unwrap(),
        "--runtimes",
        "none",
    ]);
    agent.wait_for_log("profiling started", Duration::from_secs(30));
    let blink = program_named("chain", "chain_blink");
    let end = std::time::Instant::now() + Duration::from_secs(16);
    let loops: Vec<_> = (0..4)
        .map(|i| {
            let blink = blink.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(i * 400));
                let mut runs = 0;
                while std::time::Instant::now() < end {
                    let mut run = KillOnDrop::spawn(std::process::Command::new(&blink).arg("1.5"));
                    assert!(run.wait().success());
                    runs += 1;
                }
                runs
            })
        })
        .collect();
    let runs: u32 = loops.into_iter().map(|l| l.join().unwrap()).sum();
    // Two more intervals, so the last runs' interval is symbolized.
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    let stacks: Vec<FoldedStack> = folded_files(files.path())
        .iter()
        .flat_map(|p| read_folded_file(p))
        .collect();
    let ours: Vec<&FoldedStack> = stacks
        .iter()
        .filter(|s| s.frames[0] == "chain_blink")
        .collect();
    let total: u64 = ours.iter().map(|s| s.count).sum();
    assert!(total > 0, "{runs} runs, no sample");
    let unnamed: u64 = ours
        .iter()
        .filter(|s| s.frames.iter().any(|f| f.contains("[unknown process]")))
        .map(|s| s.count)
        .sum();
    assert_eq!(
        unnamed, 0,
        "{unnamed} of {total} samples unnamed over {runs} runs"
    );
    let named = profiler_tests::samples_with_chain(&stacks, "chain_blink", &CHAIN_ROOT_FIRST);
    assert!(
        named * 2 > total,
        "{named} of {total} with the chain: {ours:#?}"
    );
}

/// With the backend down, the agent keeps its memory bounded, drops the oldest
/// profiles (and says so), and resumes exporting when the backend comes back,
/// without a restart.
#[test]
fn backend_outage_is_bounded_and_recovers() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start(&[
        "--endpoint",
        &endpoint,
        "--interval",
        "1",
        "--queue-kib",
        "64",
        "--max-request-kib",
        "64",
        "--timeout",
        "1",
    ]);
    let busy = start("chain", &["90"]);
    // Until the 64 KiB queue fills: profiles are ~3 KiB a second on an otherwise
    // idle host (the whole host is profiled; a busy one fills it sooner).
    agent.wait_for_log("export queue full", Duration::from_secs(90));
    let rss_down = agent.rss_kib();
    let log = agent.log();
    assert_eq!(log.matches("OTLP backend unavailable").count(), 1, "{log}");

    let receiver = Receiver::start(port, &[]);
    let requests = receiver.wait_for(2, Duration::from_secs(45));
    assert!(
        requests.len() >= 2,
        "export did not resume; log:\n{}",
        agent.log()
    );
    assert_well_formed(&requests);
    std::thread::sleep(Duration::from_secs(1));
    let log = agent.log();
    assert!(log.contains("OTLP backend is reachable again"), "{log}");
    assert_eq!(log.matches("export queue full").count(), 1, "{log}");
    assert!(rss_down < 64 * 1024, "RSS {rss_down} KiB during the outage");
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    drop(busy);
    // The queue filled, dropped the oldest, and never held more than its bound.
    let log = agent.log();
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap();
    assert!(
        log_field(stopped, "queue_dropped_requests") > 0,
        "{stopped}"
    );
    let peak = log_field(stopped, "queue_peak_bytes");
    assert!(peak > 32 * 1024 && peak <= 64 * 1024, "{stopped}");
}

/// Shutdown does not wait out the exporter's backoff: with the backend down long
/// enough that the exporter sleeps longer than the shutdown deadline, a backend back
/// just as SIGTERM arrives still gets the queued profiles before the agent exits.
#[test]
fn shutdown_cuts_the_export_backoff_short() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start_with_env(
        &[
            "--endpoint",
            &endpoint,
            "--interval",
            "1",
            "--timeout",
            "1",
            "--shutdown-timeout",
            "5",
            "--include-idle",
        ],
        &[("RUST_LOG", "profiler=info,profiler::sink::grpc=debug")],
    );
    // The exporter's latest sleep, from its debug line `... delay=12.3s ...`.
    let last_delay = |log: &str| -> Option<f64> {
        let line = log
            .lines()
            .rfind(|l| l.contains("export failed, will retry"))?;
        let value = line.split("delay=").nth(1)?.split_whitespace().next()?;
        let secs = if let Some(ms) = value.strip_suffix("ms") {
            ms.parse::<f64>().ok()? / 1000.0
        } else {
            value.strip_suffix('s')?.parse::<f64>().ok()?
        };
        Some(secs)
    };
    // Backoff doubles from 0.5 s: within a minute a sleep exceeds the 5 s deadline.
    let end = std::time::Instant::now() + Duration::from_secs(90);
    while last_delay(&agent.log()).is_none_or(|d| d < 7.0) {
        assert!(
            std::time::Instant::now() < end,
            "no long backoff: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let receiver = Receiver::start(port, &[]);
    let started = std::time::Instant::now();
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    let waited = started.elapsed();
    let log = agent.log();
    let requests = receiver.requests();
    assert!(
        !requests.is_empty(),
        "nothing exported at shutdown; log:\n{log}"
    );
    assert_well_formed(&requests);
    assert!(waited < Duration::from_secs(15), "shutdown took {waited:?}");
}

/// A memory budget the agent's own cycles already exceed sheds the export queue down
/// to the newest profile during an outage (a queue bound it would otherwise never
/// reach), says so once, and export still resumes when the backend comes back.
#[test]
fn memory_budget_sheds_the_export_queue() {
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start(&[
        "--endpoint",
        &endpoint,
        "--interval",
        "1",
        "--queue-kib",
        "16384",
        "--memory-budget-mib",
        "1",
        "--timeout",
        "1",
    ]);
    let busy = start("chain", &["40"]);
    // Without the budget, ~10 profiles of a few KiB would all wait in the 16 MiB queue.
    let log = agent.wait_for_log("export queue full", Duration::from_secs(60));
    assert_eq!(
        log.matches("cycles alone need more memory than its budget")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("the export queue gives up room"), "{log}");

    let receiver = Receiver::start(port, &[]);
    let requests = receiver.wait_for(2, Duration::from_secs(45));
    assert!(
        requests.len() >= 2,
        "export did not resume:\n{}",
        agent.log()
    );
    assert_well_formed(&requests);
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    drop(busy);
    let log = agent.log();
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap();
    let dropped = log_field(stopped, "queue_dropped_requests");
    assert!(dropped > 0, "{stopped}");
    assert_eq!(
        log_field(stopped, "queue_dropped_for_budget"),
        dropped,
        "{stopped}"
    );
    assert!(
        log_field(stopped, "largest_cycle_peak_kib") > 1024,
        "{stopped}"
    );
    assert!(
        log_field(stopped, "queue_peak_bytes") < 1 << 20,
        "{stopped}"
    );
}

/// New kernel code (a BPF program loaded after the agent started) makes the agent
/// read the kernel's symbols again within a few cycles, not at its 40-cycle reload,
/// so the new code's frames are not named after whatever symbol precedes them.
#[test]
fn new_kernel_code_reloads_kernel_symbols() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let mut agent = Agent::start(&[
        "--output-dir",
        out,
        "--interval",
        "1",
        "--log-level",
        "debug",
    ]);
    agent.wait_for_log("cycle done", Duration::from_secs(30));
    let _loader = start("bpf_loader", &["60"]);
    // At most KERNEL_RELOAD_MIN_CYCLES (4) cycles of 1 s after the last load.
    let log = agent.wait_for_log("kernel code changed", Duration::from_secs(30));
    assert!(log.contains("reloading kernel symbols"), "{log}");
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
}

/// A receiver that never answers: requests time out and are retried, nothing piles
/// up beyond the bound, and SIGTERM still ends the agent within its deadline.
#[test]
fn stalled_backend_times_out() {
    let receiver = Receiver::start(0, &["--mode", "stall", "--stall", "60"]);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut agent = Agent::start(&[
        "--endpoint",
        &endpoint,
        "--interval",
        "1",
        "--timeout",
        "1",
        "--shutdown-timeout",
        "2",
        "--include-idle",
        "--queue-kib",
        "64",
        "--max-request-kib",
        "64",
    ]);
    // The first request goes out after the first interval and times out 1 s later;
    // a loaded machine (the suite runs tests in parallel) may start the agent late.
    let log = agent.wait_for_log("OTLP backend unavailable", Duration::from_secs(30));
    assert!(
        log.contains("DeadlineExceeded") || log.contains("Cancelled"),
        "{log}"
    );
    // Profiles pile up behind the stalled request until the queue's bound drops
    // the oldest.
    agent.wait_for_log("export queue full", Duration::from_secs(60));
    let started = std::time::Instant::now();
    let status = agent.terminate(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{}", agent.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    let log = agent.log();
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap();
    assert!(
        log_field(stopped, "queue_dropped_requests") > 0,
        "{stopped}"
    );
    assert!(
        log_field(stopped, "queue_peak_bytes") <= 64 * 1024,
        "{stopped}"
    );
    // Each attempt timed out and was retried; none was given up or dropped.
    assert!(log_field(stopped, "export_retries") > 0, "{stopped}");
    assert_eq!(log_field(stopped, "given_up_requests"), 0, "{stopped}");
}

/// Permanent rejections are logged once per cause and the agent carries on;
/// RESOURCE_EXHAUSTED is retried (the receiver sees the same data again).
#[test]
fn rejections_by_status_class() {
    for (code, permanent) in [
        ("INVALID_ARGUMENT", true),
        ("UNAUTHENTICATED", true),
        ("RESOURCE_EXHAUSTED", false),
    ] {
        let receiver = Receiver::start(0, &["--mode", "reject", "--code", code]);
        let endpoint = format!("http://127.0.0.1:{}", receiver.port);
        let mut agent =
            Agent::start(&["--endpoint", &endpoint, "--interval", "1", "--include-idle"]);
        let requests = receiver.wait_for(3, Duration::from_secs(20));
        assert!(requests.len() >= 3, "{code}: {} requests", requests.len());
        assert!(
            agent.terminate(Duration::from_secs(20)).unwrap().success(),
            "{code}"
        );
        let log = agent.log();
        // What the receiver saw: a permanent rejection is never sent again, a
        // refusal is (the same bytes, tried again).
        let requests = receiver.requests();
        let hashes: Vec<&str> = requests
            .iter()
            .map(|r| r["sha256"].as_str().unwrap())
            .collect();
        let distinct: std::collections::HashSet<&str> = hashes.iter().copied().collect();
        if permanent {
            assert_eq!(distinct.len(), hashes.len(), "{code}: sent again");
            assert_eq!(
                log.matches("rejected profiles permanently").count(),
                1,
                "{code}: {log}"
            );
            assert!(!log.contains("OTLP backend refuses"), "{code}: {log}");
            assert!(!log.contains("OTLP backend unavailable"), "{code}: {log}");
        } else {
            assert!(distinct.len() < hashes.len(), "{code}: never retried");
            assert_eq!(
                log.matches("OTLP backend refuses a request").count(),
                1,
                "{code}: {log}"
            );
            assert!(!log.contains("OTLP backend unavailable"), "{code}: {log}");
            assert!(
                !log.contains("rejected profiles permanently"),
                "{code}: {log}"
            );
        }
    }
}

/// A wrong token: UNAUTHENTICATED appears once in the log, no crash; the right
/// token (from OTEL_EXPORTER_OTLP_HEADERS) is accepted.
#[test]
fn token_from_otel_headers() {
    let receiver = Receiver::start(0, &["--token", "s3cret"]);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut wrong = Agent::start_with_env(
        &["--interval", "1", "--include-idle"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20wrong"),
        ],
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(wrong.terminate(Duration::from_secs(20)).unwrap().success());
    let log = wrong.log();
    assert_eq!(log.matches("Unauthenticated").count(), 1, "{log}");

    let mut right = Agent::start_with_env(
        &["--interval", "1", "--include-idle"],
        &[
            ("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", &endpoint),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20s3cret",
            ),
        ],
    );
    let ok = || {
        receiver
            .requests()
            .iter()
            .filter(|r| r["status"] == "OK")
            .count()
    };
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while ok() == 0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ok() > 0, "{}", right.log());
    assert!(right.terminate(Duration::from_secs(20)).unwrap().success());
}

/// TLS with a self-signed CA: trusted with --ca-file, refused without it.
#[test]
fn tls_with_self_signed_ca() {
    let pki = Pki::new();
    let (ca_pem, cert_pem, key_pem) = (&pki.ca_pem, &pki.cert_pem, &pki.key_pem);

    let receiver = Receiver::start(
        0,
        &[
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
        ],
    );
    let endpoint = format!("https://localhost:{}", receiver.port);
    // Idle samples: there is always a profile to send, even on an idle machine.
    let mut untrusted =
        Agent::start(&["--endpoint", &endpoint, "--interval", "1", "--include-idle"]);
    untrusted.wait_for_log("OTLP backend unavailable", Duration::from_secs(15));
    assert!(untrusted
        .terminate(Duration::from_secs(20))
        .unwrap()
        .success());
    assert!(
        receiver.requests().is_empty(),
        "an untrusted server got data"
    );
    assert!(
        untrusted.log().contains("OTLP backend unavailable"),
        "{}",
        untrusted.log()
    );
    assert!(
        untrusted
            .log()
            .contains("not signed by a CA this agent trusts"),
        "no hint: {}",
        untrusted.log()
    );

    let mut trusted = Agent::start(&[
        "--endpoint",
        &endpoint,
        "--interval",
        "1",
        "--ca-file",
        ca_pem.to_str().unwrap(),
    ]);
    let requests = receiver.wait_for(1, Duration::from_secs(20));
    assert!(!requests.is_empty(), "{}", trusted.log());
    assert_well_formed(&requests);
    assert!(trusted
        .terminate(Duration::from_secs(20))
        .unwrap()
        .success());
}

/// A self-signed CA in a temporary directory, a server certificate for
/// `localhost` it signed, and client certificates on demand; all PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    ca_pem: std::path::PathBuf,
    cert_pem: std::path::PathBuf,
    key_pem: std::path::PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name = named("profiler test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let mut pki = Pki {
            ca_pem: dir.path().join("ca.pem"),
            cert_pem: dir.path().join("cert.pem"),
            key_pem: dir.path().join("key.pem"),
            dir,
            ca_params,
            ca_key,
        };
        std::fs::write(&pki.ca_pem, ca.pem()).unwrap();
        let (cert, key) = pki.signed("localhost");
        (pki.cert_pem, pki.key_pem) = (cert, key);
        pki
    }

    /// A certificate for `name` signed by the CA: (certificate, key) files.
    fn signed(&self, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        // Not rcgen's default name, which is the CA's too: OpenSSL and BoringSSL
        // take a certificate whose subject is its issuer for self-signed.
        params.distinguished_name = named(name);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let paths = (
            self.dir.path().join(format!("{name}.cert.pem")),
            self.dir.path().join(format!("{name}.key.pem")),
        );
        std::fs::write(&paths.0, cert.pem()).unwrap();
        std::fs::write(&paths.1, key.serialize_pem()).unwrap();
        paths
    }
}

/// A distinguished name of just `CN=common_name`.
fn named(common_name: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, common_name);
    dn
}

/// A backend that requires a client certificate (mutual TLS) refuses an agent
/// without one, with a hint in the log, and receives from one configured by the
/// standard variables alone (OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT, _CERTIFICATE,
/// _CLIENT_CERTIFICATE, _CLIENT_KEY), as a deployment that sets no flags is.
#[test]
fn mutual_tls_with_client_certificate() {
    let pki = Pki::new();
    let (client_cert, client_key) = pki.signed("agent");
    let receiver = Receiver::start(
        0,
        &[
            "--tls-cert",
            pki.cert_pem.to_str().unwrap(),
            "--tls-key",
            pki.key_pem.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca_pem.to_str().unwrap(),
        ],
    );
    let endpoint = format!("https://localhost:{}", receiver.port);
    let ca = pki.ca_pem.to_str().unwrap();
    // Idle samples: there is always a profile to send, even on an idle machine.
    let base = [
        "--endpoint",
        &endpoint,
        "--interval",
        "1",
        "--ca-file",
        ca,
        "--include-idle",
    ];

    let mut anonymous = Agent::start(&base);
    anonymous.wait_for_log("OTLP backend unavailable", Duration::from_secs(15));
    assert!(anonymous
        .terminate(Duration::from_secs(20))
        .unwrap()
        .success());
    let log = anonymous.log();
    assert!(
        receiver.requests().is_empty(),
        "no client certificate, yet: {log}"
    );
    assert!(log.contains("OTLP backend unavailable"), "{log}");
    assert!(
        log.contains("give one with --client-cert"),
        "no hint: {log}"
    );

    let known_env = [
        ("OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            client_cert.to_str().unwrap(),
        ),
        (
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            client_key.to_str().unwrap(),
        ),
    ];
    let mut known = Agent::start_with_env(&["--interval", "1", "--include-idle"], &known_env);
    let requests = receiver.wait_for(1, Duration::from_secs(20));
    assert!(!requests.is_empty(), "{}", known.log());
    assert_well_formed(&requests);
    assert!(known.terminate(Duration::from_secs(20)).unwrap().success());
}

/// Bytes on the wire from an agent that exports `seconds` of whole-host samples
/// (the chain program keeps one CPU busy) with `env`, and the uncompressed size of
/// the requests the receiver decoded.
fn wire_and_request_bytes(env: &[(&str, &str)], seconds: u64) -> (u64, u64) {
    let receiver = Receiver::start(0, &[]);
    let proxy = CountingProxy::start(receiver.port);
    let _busy = start("chain", &["30"]);
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let mut agent = Agent::start_with_env(
        &["--endpoint", &endpoint, "--interval", "1", "--include-idle"],
        env,
    );
    std::thread::sleep(Duration::from_secs(seconds));
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    let requests = receiver.requests();
    assert!(requests.len() >= 2, "{}", agent.log());
    assert_well_formed(&requests);
    let decoded: u64 = requests.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    eprintln!(
        "{env:?}: {} requests, {decoded} bytes decoded, {} bytes on the wire",
        requests.len(),
        proxy.sent()
    );
    (proxy.sent(), decoded)
}

/// Requests go gzipped on the wire by default (the receiver, grpcio, inflates and
/// decodes them), and uncompressed with OTEL_EXPORTER_OTLP_COMPRESSION=none: the
/// bytes a proxy between the two counts are under 3/4 of the decoded size in the
/// first case (~1/2 measured here, small requests included) and above it in the
/// second.
#[test]
fn requests_are_gzipped_on_the_wire() {
    let (wire, decoded) = wire_and_request_bytes(&[], 5);
    assert!(
        wire * 4 < decoded * 3,
        "gzip: {wire} bytes on the wire for {decoded} bytes of requests"
    );
    let (wire, decoded) = wire_and_request_bytes(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "none")], 5);
    assert!(
        wire > decoded,
        "none: {wire} bytes on the wire for {decoded} bytes of requests"
    );
}

/// Without an endpoint the agent writes rotating local files (pprof that Google's
/// pprof reads), keeping at most --max-files.
#[test]
fn local_files_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&[
        "--interval",
        "1",
        "--max-files",
        "2",
        "--output-dir",
        dir.path().to_str().unwrap(),
        "--include-idle",
    ]);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        agent.terminate(Duration::from_secs(20)).unwrap().success(),
        "{}",
        agent.log()
    );
    let mut pprofs: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".pb.gz"))
        .collect();
    pprofs.sort();
    assert_eq!(pprofs.len(), 2, "{pprofs:?}");
    assert_pprof_reads(&pprofs[1]);
}

/// SIGINT (Ctrl-C) and SIGHUP (a closed terminal) stop the agent as SIGTERM does:
/// exit 0, the interval in progress written.
#[test]
fn sigint_and_sighup_flush_the_last_profile() {
    for signal in [libc::SIGINT, libc::SIGHUP] {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::start(&[
            "--interval",
            "60",
            "--output-dir",
            dir.path().to_str().unwrap(),
            "--include-idle",
        ]);
        agent.wait_for_log("profiling started", Duration::from_secs(30));
        std::thread::sleep(Duration::from_secs(2));
        let status = agent.stop_with(signal, Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "signal {signal}: {status:?}\n{}",
            agent.log()
        );
        let profiles = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pb.gz"))
            .count();
        assert_eq!(profiles, 1, "signal {signal}:\n{}", agent.log());
    }
}

/// Google's pprof reads the profile at `path`.
fn assert_pprof_reads(path: &std::path::Path) {
    let out = std::process::Command::new(pprof_bin())
        .arg("-raw")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tmpfs of `kib` mounted on a fresh directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(kib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs (needs root)");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A full disk: the oldest local profiles make room for the newest, one warning
/// says so, and no profile is left with one file of its pair.
#[test]
fn full_disk_deletes_the_oldest_profiles() {
    // 8 pages: room for four small profiles (each file takes at least a page).
    let disk = SmallDisk::mount(32);
    let target = start("chain", &["30"]);
    settle();
    let mut agent = Agent::start(&[
        "--interval",
        "1",
        "--pid",
        &target.pid().to_string(),
        "--output-dir",
        disk.dir.path().to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        agent.terminate(Duration::from_secs(20)).unwrap().success(),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(
        log.matches("disk full: the oldest local profiles are deleted")
            .count(),
        1,
        "{log}"
    );
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap();
    let field = |name: &str| -> u64 {
        let at = stopped.find(&format!(" {name}=")).expect(name) + name.len() + 2;
        stopped[at..].split(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(field("profiles_not_written"), 0, "{stopped}");
    let mut names: Vec<String> = std::fs::read_dir(disk.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let pprofs: Vec<&String> = names.iter().filter(|n| n.ends_with(".pb.gz")).collect();
    let folded = names.iter().filter(|n| n.ends_with(".folded")).count();
    assert_eq!(pprofs.len() + folded, names.len(), "stray files: {names:?}");
    assert_eq!(pprofs.len(), folded, "half-written profiles: {names:?}");
    // Every profile written is either on disk or counted as deleted for space.
    let written = field("cycles") + 1;
    assert_eq!(
        pprofs.len() as u64 + field("profiles_deleted_for_space"),
        written,
        "{names:?}\n{stopped}"
    );
    assert_pprof_reads(&disk.dir.path().join(pprofs.last().unwrap()));
}

/// A field `name=value` of the agent's log line `line`, as a number.
fn log_field(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + name.len()
        + 2;
    line[at..].split(' ').next().unwrap().parse().unwrap()
}

/// A receiver that refuses its first `refusals` calls with `code`, then takes them.
fn refusing_receiver(code: &str, refusals: usize, extra: &[&str]) -> Receiver {
    let refusals = refusals.to_string();
    let mut args = vec![
        "--mode",
        "reject",
        "--code",
        code,
        "--refuse-first",
        &refusals,
    ];
    args.extend_from_slice(extra);
    Receiver::start(0, &args)
}

/// A backend that is up but refuses requests with RESOURCE_EXHAUSTED (what grpc-go
/// answers a message over its size limit) does not hold export up: each request gets
/// MAX_REFUSED_ATTEMPTS attempts, is given up and counted, the cause is warned about
/// once (though every refusal's message differs in its numbers), and the requests
/// behind it go through once the backend accepts them.
#[test]
fn refused_requests_are_given_up_and_export_goes_on() {
    use profiler::sink::grpc::MAX_REFUSED_ATTEMPTS;
    let attempts = MAX_REFUSED_ATTEMPTS as usize;
    // Exactly two requests' worth of refusals: the exporter sends one at a time.
    let refusals = 2 * attempts;
    let receiver = refusing_receiver("RESOURCE_EXHAUSTED", refusals, &[]);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    // No memory budget: on a host busy with other tests a debug build's RSS may
    // pass the default budget, which would shed queued requests mid-retry.
    let mut agent = Agent::start_with_env(
        &[
            "--endpoint",
            &endpoint,
            "--interval",
            "1",
            "--include-idle",
            "--memory-budget-mib",
            "0",
        ],
        &[("RUST_LOG", "profiler=info,profiler::sink::grpc=debug")],
    );
    let accepted = |requests: &[Value]| requests.iter().filter(|r| r["status"] == "OK").count();
    // Each refused request takes ~3.5 s (at most ~5.3 s) of retries; a request
    // retried without bound would take over a minute to reach the 9th call.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while accepted(&receiver.requests()) < 2 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    let log = agent.log();
    let requests = receiver.requests();
    assert!(
        accepted(&requests) >= 2,
        "export did not go on: {} calls; log:\n{log}",
        requests.len()
    );
    assert_well_formed(&requests);

    // The refused calls: two requests, each tried exactly MAX_REFUSED_ATTEMPTS times
    // in a row, and neither sent again.
    let mut by_call: Vec<&Value> = requests.iter().collect();
    by_call.sort_by_key(|r| r["call"].as_u64().unwrap());
    let refused: Vec<&str> = by_call
        .iter()
        .filter(|r| r["status"] == "RESOURCE_EXHAUSTED")
        .map(|r| r["sha256"].as_str().unwrap())
        .collect();
    assert_eq!(refused.len(), refusals, "{log}");
    let (first, second) = refused.split_at(attempts);
    assert!(first.iter().all(|h| *h == first[0]), "{refused:?}\n{log}");
    assert!(second.iter().all(|h| *h == second[0]), "{refused:?}");
    assert_ne!(first[0], second[0], "the same request was tried again");
    assert!(
        by_call
            .iter()
            .filter(|r| r["status"] == "OK")
            .all(|r| r["sha256"] != first[0] && r["sha256"] != second[0]),
        "a given-up request was sent again"
    );

    assert_eq!(
        log.matches("OTLP backend kept refusing a request; gave it up")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("OTLP backend refuses a request").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("OTLP backend unavailable"), "{log}");
    assert!(log.contains("OTLP backend accepts requests again"), "{log}");
    assert!(!log.contains("rejected profiles permanently"), "{log}");
    // Counted: the second give-up, logged at debug, carries the count.
    let last = log
        .lines()
        .rfind(|l| l.contains("given_up_requests="))
        .unwrap_or_else(|| panic!("no count: {log}"));
    assert_eq!(log_field(last, "given_up_requests"), 2, "{log}");
}

/// A backend that throttles (RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, as
/// the OTLP specification asks of a server that wants the client to slow down)
/// gets the wait it asked for before each retry, and the request is not given up
/// after MAX_REFUSED_ATTEMPTS: it is retried until the backend takes it.
#[test]
fn throttled_request_waits_as_asked_and_is_not_given_up() {
    use profiler::sink::grpc::MAX_REFUSED_ATTEMPTS;
    let refusals = 2 * MAX_REFUSED_ATTEMPTS as usize;
    let delay = 1.0;
    let receiver = refusing_receiver(
        "RESOURCE_EXHAUSTED",
        refusals,
        &["--retry-delay", &delay.to_string()],
    );
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut agent = Agent::start(&["--endpoint", &endpoint, "--interval", "1", "--include-idle"]);
    let requests = receiver.wait_for(refusals + 1, Duration::from_secs(40));
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    let log = agent.log();
    assert!(
        requests.len() > refusals,
        "{} calls; log:\n{log}",
        requests.len()
    );
    let mut by_call: Vec<&Value> = requests.iter().collect();
    by_call.sort_by_key(|r| r["call"].as_u64().unwrap());
    let first = &by_call[..=refusals];
    // The same request every time, refused `refusals` times, then taken.
    assert!(
        first.iter().all(|r| r["sha256"] == first[0]["sha256"]),
        "another request was sent before the throttled one went through; log:\n{log}"
    );
    assert!(first[..refusals]
        .iter()
        .all(|r| r["status"] == "RESOURCE_EXHAUSTED"));
    assert_eq!(first[refusals]["status"], "OK");
    // Each retry came no sooner than the backend asked.
    for pair in first.windows(2) {
        let gap = pair[1]["t"].as_f64().unwrap() - pair[0]["t"].as_f64().unwrap();
        assert!(gap >= delay, "retried after {gap:.3} s, asked {delay} s");
    }
    assert_eq!(
        log.matches("OTLP backend throttles exports").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("gave it up"), "{log}");
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap();
    assert_eq!(log_field(stopped, "given_up_requests"), 0, "{stopped}");
}

/// A backend that takes requests but reports some profiles rejected
/// (partial_success): the rejected profiles are counted, and its message (which
/// differs in its numbers from one answer to the next) is warned about once.
#[test]
fn partial_success_is_counted_and_its_message_logged_once() {
    let receiver = Receiver::start(0, &["--partial-reject", "2"]);
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut agent = Agent::start(&["--endpoint", &endpoint, "--interval", "1", "--include-idle"]);
    let requests = receiver.wait_for(3, Duration::from_secs(20));
    assert!(requests.len() >= 3, "{} requests", requests.len());
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());
    let log = agent.log();
    // Every request the receiver took was answered before the agent exited.
    let accepted = receiver
        .requests()
        .iter()
        .filter(|r| r["status"] == "OK")
        .count() as u64;
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("partial_success"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("WARN"), "{log}");
    assert!(
        warnings[0].contains("profiles rejected by test (call 1)"),
        "{log}"
    );
    assert_eq!(log_field(warnings[0], "rejected_profiles"), 2, "{log}");
    let stopped = log.lines().find(|l| l.contains("stopped")).unwrap();
    assert_eq!(
        log_field(stopped, "partially_rejected_profiles"),
        2 * accepted,
        "{stopped}"
    );
}
