//! The eBPF object is linked by bpf-linker; only a BPF-target build needs it.

fn main() {
    println!("cargo:rerun-if-env-changed=CARGO_CFG_TARGET_ARCH");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        if let Err(err) = which::which("bpf-linker") {
            panic!(
                "bpf-linker is not on PATH ({err}); `cargo xtask setup` installs it \
                 (bpf-linker 0.13.0 built against LLVM 22)"
            );
        }
    }
}
