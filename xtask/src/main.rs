//! Project tasks: `cargo xtask run` profiles this host, `cargo xtask test` runs every
//! check CI runs. Both install what they need first (see `setup`) and say so.

mod setup;

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark the profiler")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (Debian packages, bpf-linker) and nothing else.
    Setup {
        /// Also install what the tests and the benchmark need.
        #[arg(long)]
        all: bool,
    },
    /// Build the eBPF program and the profiler (release).
    Build,
    /// Profile this host and write a flamegraph. Arguments after `--` go to
    /// `profiler record` (default: whole host, 10 s, ./profiles).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run formatting and lint checks and every test (needs root for the eBPF tests).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the overhead benchmark beside perf and bpftrace and print figures.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    if let Err(err) = try_main() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn try_main() -> Result<()> {
    let cli = Cli::parse();
    env::set_current_dir(workspace_root()).context("cannot enter the workspace root")?;
    match cli.command {
        Task::Setup { all } => {
            setup::ensure_build_prerequisites()?;
            if all {
                setup::ensure_packages(&[setup::TEST, setup::BENCH])?;
                build_pprof()?;
                ensure_otlp_venv()?;
            }
            eprintln!("xtask: prerequisites are installed");
            Ok(())
        }
        Task::Build => {
            setup::ensure_build_prerequisites()?;
            build_release()?;
            Ok(())
        }
        Task::Run { args } => run_profiler(args),
        Task::Test { args } => test(args),
        Task::Bench { args } => bench(args),
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

pub fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"))
}

/// A `cargo` command without the variables `cargo run` set for xtask itself
/// (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...). Some build scripts watch them
/// (ring's does, with `rerun-if-env-changed`), so a nested build that inherited
/// xtask's values looked changed to the plain `cargo build` or `cargo test` run
/// after it, and each rebuilt ring, rustls, tonic and the profiler (~5 minutes
/// here) whenever a developer alternated between the two.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if is_set_by_cargo_run(name) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Whether `cargo run` sets `name` for the program it runs (the Cargo book's
/// "Environment variables Cargo sets for crates"), apart from `CARGO` and the
/// library path, which a nested cargo sets again anyway.
fn is_set_by_cargo_run(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE" | "OUT_DIR"
        )
}

/// Runs a command with inherited output; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn build_release() -> Result<PathBuf> {
    eprintln!("xtask: building the eBPF program and the profiler (release)");
    run(cargo().args(["build", "--release", "--package", "profiler-userspace"]))?;
    Ok(workspace_root().join("target/release/profiler"))
}

fn run_profiler(args: Vec<String>) -> Result<()> {
    setup::ensure_build_prerequisites()?;
    let profiler = build_release()?;
    let mut argv = vec!["record".to_string()];
    if args.is_empty() {
        argv.extend(["--duration", "10", "--output-dir", "profiles"].map(String::from));
    }
    // The runtime profilers `cargo xtask test` installed, so Python and Ruby
    // processes show their own functions (installing them is not part of `run`:
    // rbspy takes minutes to build). A flag the user gave wins.
    let tools = workspace_root().join("target/tools");
    for (flag, path) in [
        ("--py-spy", tools.join("pyspy-venv/bin/py-spy")),
        ("--rbspy", tools.join("rbspy/bin/rbspy")),
    ] {
        let given = args
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if path.is_file() && !given {
            eprintln!(
                "xtask: using {} (installed by `cargo xtask test`)",
                path.display()
            );
            argv.extend([flag.to_string(), path.display().to_string()]);
        }
    }
    argv.extend(args);
    let mut cmd = if setup::is_root() {
        Command::new(&profiler)
    } else {
        eprintln!(
            "xtask: the profiler loads eBPF programs, which needs root: running it with sudo"
        );
        let mut c = Command::new("sudo");
        c.arg(&profiler);
        c
    };
    eprintln!("xtask: running {} {}", profiler.display(), argv.join(" "));
    run(cmd.args(&argv))
}

/// Google's pprof, built from Debian's Go sources, checks our pprof output in tests.
fn build_pprof() -> Result<PathBuf> {
    let out = workspace_root().join("target/tools/pprof");
    if out.exists() {
        return Ok(out);
    }
    eprintln!(
        "xtask: building Google's pprof from Debian's Go sources into {}",
        out.display()
    );
    std::fs::create_dir_all(out.parent().expect("has a parent"))?;
    run(Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg("github.com/google/pprof")
        .env("GOPATH", "/usr/share/gocode")
        .env("GO111MODULE", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOCACHE", workspace_root().join("target/tools/go-cache")))
    .context("building pprof failed")?;
    Ok(out)
}

/// PyPI versions of the OTLP receiver the tests run (a peer we did not write).
const OTLP_PIP_PACKAGES: &[&str] = &["opentelemetry-proto==1.45.2", "grpcio==1.85.3"];
/// py-spy from PyPI: the Python profiler the agent supervises.
const PY_SPY_PIP_PACKAGES: &[&str] = &["py-spy==0.4.3"];
/// rbspy from crates.io: the Ruby profiler the agent supervises.
const RBSPY_VERSION: &str = "0.55.0";

/// A Python virtualenv under target/tools/NAME with `packages` from PyPI; returns
/// its bin directory.
fn ensure_venv(name: &str, packages: &[&str], purpose: &str) -> Result<PathBuf> {
    let venv = workspace_root().join("target/tools").join(name);
    let bin = venv.join("bin");
    let ready = venv.join(".installed");
    let want = packages.join(" ");
    if std::fs::read_to_string(&ready).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: installing {purpose} into {} (PyPI: {want})",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("python3 -m venv failed (on Debian: apt-get install python3-venv)")?;
    run(Command::new(bin.join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))
    .with_context(|| format!("pip install of {want} failed"))?;
    std::fs::write(&ready, &want)?;
    Ok(bin)
}

/// A Python virtualenv with PyPI's opentelemetry-proto and grpcio, for the tests'
/// OTLP receiver.
fn ensure_otlp_venv() -> Result<PathBuf> {
    Ok(ensure_venv("otlp-venv", OTLP_PIP_PACKAGES, "the tests' OTLP receiver")?.join("python"))
}

/// py-spy, for the Python runtime tests.
fn ensure_py_spy() -> Result<PathBuf> {
    Ok(ensure_venv(
        "pyspy-venv",
        PY_SPY_PIP_PACKAGES,
        "py-spy for the Python tests",
    )?
    .join("py-spy"))
}

/// rbspy, built from crates.io into target/tools/rbspy (a few minutes, once).
fn ensure_rbspy() -> Result<PathBuf> {
    let root = workspace_root().join("target/tools/rbspy");
    let bin = root.join("bin/rbspy");
    let ready = root.join(".installed");
    if bin.exists() && std::fs::read_to_string(&ready).ok().as_deref() == Some(RBSPY_VERSION) {
        return Ok(bin);
    }
    eprintln!(
        "xtask: building rbspy {RBSPY_VERSION} from crates.io into {} for the Ruby tests (a few minutes, once)",
        root.display()
    );
    run(cargo()
        .args(["install", "--locked", "--quiet"])
        .arg(format!("rbspy@{RBSPY_VERSION}"))
        .arg("--root")
        .arg(&root))
    .context("cargo install rbspy failed")?;
    std::fs::write(&ready, RBSPY_VERSION)?;
    Ok(bin)
}

fn test(args: Vec<String>) -> Result<()> {
    // Before minutes of installs that would be for nothing.
    if !setup::is_root() {
        bail!("the tests load eBPF programs and need root: run `sudo -E cargo xtask test`");
    }
    setup::ensure_build_prerequisites()?;
    setup::ensure_packages(&[setup::TEST])?;
    let pprof = build_pprof()?;
    let otlp_python = ensure_otlp_venv()?;
    let py_spy = ensure_py_spy()?;
    let rbspy = ensure_rbspy()?;
    eprintln!("xtask: checking formatting");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    eprintln!("xtask: linting");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    eprintln!("xtask: checking the API docs build without warnings");
    run(cargo()
        .args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    // The integration tests run the `profiler` binary; building it here, before
    // the test binaries start, keeps their own build step a no-op and their
    // timing independent of how long a cold build takes.
    eprintln!("xtask: building the profiler binary the integration tests run");
    run(cargo().args([
        "build",
        "--package",
        "profiler-userspace",
        "--bin",
        "profiler",
    ]))?;
    eprintln!("xtask: running the tests");
    run(cargo()
        .args(["test", "--workspace"])
        .args(&args)
        .env("PPROF_BIN", &pprof)
        .env("OTLP_PYTHON", &otlp_python)
        .env("PY_SPY_BIN", &py_spy)
        .env("RBSPY_BIN", &rbspy))?;
    // A filter means "just these tests"; the full run also checks the README's
    // first command.
    if args.is_empty() {
        check_run()?;
    }
    eprintln!("xtask: all checks passed");
    Ok(())
}

/// The README's first command, as a new user runs it but shorter: the release
/// build and a whole-host recording through [`run_profiler`], which must write all
/// three outputs, with this process's own busy thread in the profile (so an idle
/// host cannot make an empty profile pass or fail the check).
fn check_run() -> Result<()> {
    const SECS: u64 = 2;
    eprintln!("xtask: checking `cargo xtask run` (a {SECS} s recording of this host)");
    let dir = workspace_root().join("target/xtask-run-check");
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => {}
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut x = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        });
        let result = run_profiler(vec![
            "--duration".into(),
            SECS.to_string(),
            "--output-dir".into(),
            dir.display().to_string(),
        ]);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    });
    result.context("`cargo xtask run` failed")?;
    for name in ["profile.folded", "profile.pb.gz", "flamegraph.svg"] {
        let path = dir.join(name);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("`cargo xtask run` wrote no {}", path.display()))?
            .len();
        if len == 0 {
            bail!("`cargo xtask run` wrote an empty {}", path.display());
        }
    }
    let folded = std::fs::read_to_string(dir.join("profile.folded"))?;
    if !folded
        .lines()
        .any(|l| l.split([';', ' ']).next() == Some("xtask"))
    {
        bail!(
            "`cargo xtask run` recorded no sample of xtask's busy thread in {}",
            dir.display()
        );
    }
    Ok(())
}

fn bench(args: Vec<String>) -> Result<()> {
    setup::ensure_build_prerequisites()?;
    setup::ensure_packages(&[setup::BENCH])?;
    let profiler = build_release()?;
    run(Command::new("python3")
        .arg("bench/overhead.py")
        .arg("--profiler")
        .arg(&profiler)
        .args(&args))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test` sets `CARGO_PKG_NAME` for this test as `cargo run` does for
    /// xtask: the nested cargo must not inherit it (nor the other package
    /// variables), or ring's build script reruns on the next plain build.
    #[test]
    fn nested_cargo_drops_the_package_variables_cargo_run_set() {
        assert!(
            env::var_os("CARGO_PKG_NAME").is_some(),
            "cargo sets it for tests"
        );
        let cmd = cargo();
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_string_lossy().into_owned())
            .collect();
        for name in ["CARGO_PKG_NAME", "CARGO_PKG_VERSION", "CARGO_MANIFEST_DIR"] {
            assert!(
                removed.iter().any(|r| r == name),
                "{name} not removed: {removed:?}"
            );
        }
        assert!(!removed.iter().any(|r| r == "PATH" || r == "CARGO_HOME"));
    }
}
