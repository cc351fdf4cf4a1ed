//! End-to-end tests: the real eBPF program on the real kernel profiling real
//! programs. They need root (CI and `cargo xtask test` run as root).

mod suite;
