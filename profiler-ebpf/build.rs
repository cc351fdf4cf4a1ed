//! The eBPF object is linked by bpf-linker; only a BPF-target build needs it.
//! Also declares the `bpf_target_arch` cfg (the architecture whose registers the
//! program reads) for host builds, where aya-build does not pass it.

fn main() {
    aya_build::emit_bpf_target_arch_cfg().expect("bpf_target_arch cfg");
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
