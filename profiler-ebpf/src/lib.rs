//! Library target only so profiler-userspace can depend on this crate at build time;
//! the program itself is the `profiler-ebpf` binary (src/main.rs).
#![no_std]
