//! Installs what building and testing need, and says what it installs.
//!
//! On Debian 12 (the machine kind this project targets) missing Debian packages are
//! installed with apt-get and bpf-linker with `cargo install`. On any other system
//! nothing is installed: where dpkg exists, the missing Debian packages are named
//! and setup fails; elsewhere the prerequisites are printed in plain terms (commands
//! and paths) and the build goes on, failing where one is really missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, cargo_home, run};

/// The bpf-linker release that builds against LLVM 22 (`llvm-22` feature) with the
/// Rust this machine kind has; pinned, so a new release cannot break a fresh setup.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo install` flags of bpf-linker beside its name: built against LLVM 22.
const BPF_LINKER_INSTALL_FLAGS: [&str; 4] =
    ["--locked", "--no-default-features", "--features", "llvm-22"];
/// Where Debian's llvm-22-dev puts llvm-config; bpf-linker's build script needs it.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Rust standard library sources that match Debian's rustc-web 1.96 (for -Z build-std).
const RUST_WEB_SRC: &str = "/usr/lib/rustlib/src/rust/library/core";

/// Why a group of Debian packages is needed; printed before installing it.
pub struct PackageGroup {
    pub purpose: &'static str,
    pub packages: &'static [&'static str],
    /// The same needs in words any distribution can act on (commands and paths the
    /// build and tests look for), printed where the Debian names do not apply.
    pub requires: &'static str,
}

/// Compiling the eBPF program: a Rust 1.96 with its std sources (LLVM 22), and
/// LLVM 22 headers/libraries that bpf-linker is built against.
pub const BUILD: PackageGroup = PackageGroup {
    purpose: "to compile the eBPF program (Rust 1.96 with std sources, LLVM 22 for bpf-linker)",
    packages: &[
        "rustc-web",
        "cargo-web",
        "rust-web-src",
        "llvm-22-dev",
        "libpolly-22-dev",
        "zlib1g-dev",
        "libzstd-dev",
        "gcc",
    ],
    requires: "a Rust 1.96 toolchain installed as /usr/bin/cargo and /usr/bin/rustc with \
               its standard library sources under /usr/lib/rustlib/src/rust/library (the \
               eBPF crate builds its own core with -Z build-std), LLVM 22 development \
               files with llvm-config (for bpf-linker), zlib and zstd headers, gcc",
};

/// Peers the tests check our output against: Google's pprof is built from
/// Debian's Go sources; test programs are built with gcc.
pub const TEST: PackageGroup = PackageGroup {
    purpose: "for the tests (gcc for test programs, Go + Google's pprof sources to check our pprof output, util-linux's setpriv to run as an unprivileged user, Ruby, Java 17, Node and jattach for the runtime tests, python3-venv for py-spy and the OTLP receiver)",
    packages: &[
        "gcc",
        "golang-go",
        "golang-github-google-pprof-dev",
        "util-linux",
        "ruby",
        "openjdk-17-jdk-headless",
        "nodejs",
        "jattach",
        "python3-venv",
    ],
    requires: "gcc, Go (to build Google's pprof with `go build \
               github.com/google/pprof`), setpriv and unshare (util-linux), ruby, java and \
               javac 17, node, jattach on PATH, python3 with its venv module",
};

/// The reference profilers the overhead benchmark runs beside ours.
pub const BENCH: PackageGroup = PackageGroup {
    purpose: "for the benchmark (perf and bpftrace are the reference profilers)",
    packages: &["linux-perf", "bpftrace", "gcc"],
    requires: "perf and bpftrace on PATH, gcc",
};

fn is_debian_bookworm() -> bool {
    std::fs::read_to_string("/etc/os-release")
        .map(|s| s.lines().any(|l| l == "VERSION_CODENAME=bookworm"))
        .unwrap_or(false)
}

/// Whether packages can be looked up by their Debian names here.
fn has_dpkg() -> bool {
    Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

/// Installs the Debian packages of `groups` that are missing.
pub fn ensure_packages(groups: &[PackageGroup]) -> Result<()> {
    if !is_debian_bookworm() && !has_dpkg() {
        // Package names mean nothing here and nothing can be checked by them: say
        // what is needed in plain terms.
        let needs: Vec<String> = groups
            .iter()
            .map(|g| format!("  {} ({})", g.requires, g.purpose))
            .collect();
        eprintln!(
            "xtask: not Debian 12: nothing is installed for you; the build and tests need:\n{}\n  \
             and bpf-linker {BPF_LINKER_VERSION}: {}",
            needs.join("\n"),
            bpf_linker_install_line()
        );
        return Ok(());
    }
    let mut missing: Vec<&str> = Vec::new();
    let mut purposes = Vec::new();
    for group in groups {
        let group_missing: Vec<&str> = group
            .packages
            .iter()
            .copied()
            .filter(|p| !missing.contains(p) && !package_installed(p))
            .collect();
        if !group_missing.is_empty() {
            purposes.push(format!("  {} {}", group_missing.join(" "), group.purpose));
            missing.extend(group_missing);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_debian_bookworm() {
        // Some of these names are Debian 12's own (rustc-web): say what they
        // provide too, in plain terms, for a release that names them otherwise.
        let needs: Vec<String> = groups
            .iter()
            .filter(|g| g.packages.iter().any(|p| missing.contains(p)))
            .map(|g| format!("  {} ({})", g.requires, g.purpose))
            .collect();
        bail!(
            "missing Debian packages; this is not Debian 12, so install them (or their equivalents) yourself:\n{}\n\
             that is:\n{}\n\
             and bpf-linker {BPF_LINKER_VERSION}: {}",
            purposes.join("\n"),
            needs.join("\n"),
            bpf_linker_install_line()
        );
    }
    eprintln!(
        "xtask: installing Debian packages:\n{}",
        purposes.join("\n")
    );
    let sudo = if is_root() { vec![] } else { vec!["sudo"] };
    let apt = |args: &[&str]| -> Result<()> {
        let mut argv: Vec<&str> = sudo.clone();
        argv.push("apt-get");
        argv.extend_from_slice(args);
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)
    };
    // Package lists on a fresh machine are stale: rustc-web 1.96 only exists in
    // the current bookworm-security lists.
    apt(&["update", "-q"]).context("apt-get update failed")?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args).context("apt-get install failed")?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

/// The command that installs bpf-linker by hand, quoted for a message.
fn bpf_linker_install_line() -> String {
    format!(
        "`LLVM_PREFIX=<llvm 22 prefix> cargo install bpf-linker@{BPF_LINKER_VERSION} {}`",
        BPF_LINKER_INSTALL_FLAGS.join(" ")
    )
}

fn bpf_linker_path() -> PathBuf {
    cargo_home().join("bin").join("bpf-linker")
}

fn bpf_linker_ok(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

/// Installs bpf-linker built against Debian's LLVM 22 if it is not there yet.
pub fn ensure_bpf_linker() -> Result<()> {
    let path = bpf_linker_path();
    if bpf_linker_ok(&path) {
        return Ok(());
    }
    // Debian's llvm-22-dev path, or the user's LLVM 22 elsewhere.
    let llvm_prefix = std::env::var("LLVM_PREFIX").unwrap_or_else(|_| LLVM_PREFIX.to_string());
    if !Path::new(&llvm_prefix).join("bin/llvm-config").exists() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} is missing, and building it needs LLVM 22, which is not at {llvm_prefix}: \
             install LLVM 22 with its development files, then {} (or set LLVM_PREFIX and run this again)",
            bpf_linker_install_line()
        );
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF program; built against LLVM 22 at {llvm_prefix}, about a minute)"
    );
    let mut cmd = cargo();
    cmd.arg("install")
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(BPF_LINKER_INSTALL_FLAGS)
        .env("LLVM_PREFIX", &llvm_prefix);
    run(&mut cmd).context("cargo install bpf-linker failed")?;
    if !bpf_linker_ok(&path) {
        bail!(
            "bpf-linker was installed but `{} --version` does not report {BPF_LINKER_VERSION}",
            path.display()
        );
    }
    Ok(())
}

/// Everything `cargo build` of the workspace needs (the eBPF sub-build included).
pub fn ensure_build_prerequisites() -> Result<()> {
    ensure_packages(&[BUILD])?;
    if !Path::new(RUST_WEB_SRC).exists() {
        if is_debian_bookworm() {
            bail!("{RUST_WEB_SRC} is missing although rust-web-src is installed; reinstall it");
        }
        bail!(
            "{RUST_WEB_SRC} is missing: the eBPF crate builds its own core from the library \
             sources of the Rust 1.96 at /usr/bin/cargo (see the prerequisites above)"
        );
    }
    ensure_bpf_linker()
}
