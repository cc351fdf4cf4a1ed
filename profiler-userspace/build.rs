//! Builds the eBPF program (embedded in the profiler binary) and the pprof protobuf
//! types.
//!
//! The eBPF crate is compiled by Debian's Rust 1.96 (`/usr/bin/cargo`, selected with
//! `rustup run /usr`) with `-Z build-std=core` and linked by bpf-linker (README.md,
//! "Two commands", says why these and what is installed). `cargo xtask setup`
//! installs both.

use std::{env, path::Path};

use anyhow::{bail, Context as _, Result};

/// The toolchain that can build `core` for bpfel-unknown-none on this machine kind.
const EBPF_TOOLCHAIN: &str = "/usr";

fn main() -> Result<()> {
    build_protos()?;
    build_ebpf()
}

fn build_protos() -> Result<()> {
    println!("cargo:rerun-if-changed=proto/profile.proto");
    let fds = protox::compile(["proto/profile.proto"], ["proto"])
        .context("cannot compile proto/profile.proto")?;
    prost_build::Config::new()
        .compile_fds(fds)
        .context("cannot generate pprof types")?;
    Ok(())
}

fn build_ebpf() -> Result<()> {
    if !Path::new("/usr/bin/cargo").exists()
        || !Path::new("/usr/lib/rustlib/src/rust/library/core").exists()
    {
        bail!(
            "the eBPF program needs Debian's rustc-web, cargo-web and rust-web-src (Rust 1.96) \
             and bpf-linker 0.13.0; run `cargo xtask setup` to install them"
        );
    }
    // -Z build-std needs unstable features from Debian's stable rustc; this only
    // reaches the eBPF sub-build, which this process spawns.
    env::set_var("RUSTC_BOOTSTRAP", "1");
    // aya-build turns every line the sub-build prints into a cargo warning; keep it
    // to real diagnostics.
    env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "profiler-ebpf",
            root_dir: "../profiler-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF program failed (`cargo xtask setup` installs what it needs)")
}
