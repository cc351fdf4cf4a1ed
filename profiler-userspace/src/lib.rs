//! The userspace collector of the profiler. Modules follow the path of a sample:
//!
//! perf event -> eBPF program ([`ebpf`]) -> ring buffer -> [`drain`] -> [`aggregate`]
//! (with [`process`] metadata captured on first sight) -> [`symbolize`] -> [`profile`]
//! -> [`export`] (folded, pprof, flamegraph, OTLP) -> [`sink`] (files, gRPC).
//!
//! [`cli`] and [`config`] turn arguments into a checked configuration; [`record`]
//! runs the `record` command and [`agent`] the `agent` command, both on the
//! [`collector`] pipeline; [`delivery`] sets the timer events the kernel delivered
//! against those expected; [`memory`] makes the allocator give freed memory back.
//! See ARCHITECTURE.md for one sample's journey.

pub mod agent;
pub mod aggregate;
pub mod btf;
pub mod cli;
pub mod collector;
pub mod config;
pub mod delivery;
pub mod drain;
pub mod ebpf;
pub mod export;
pub mod lineage;
pub mod memory;
pub mod process;
pub mod profile;
pub mod record;
pub mod runtime_profilers;
pub mod runtimes;
pub mod sink;
pub mod supervise;
pub mod symbolize;
