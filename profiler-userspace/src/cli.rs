//! Command line: clap parses raw arguments, [`crate::config`] validates them, and
//! [`main`] runs the command and turns errors into one message and an exit code.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{
    config::{
        agent::{
            AgentArgs, AgentConfig, DEFAULT_INTERVAL, DEFAULT_MAX_REQUEST_BYTES,
            DEFAULT_SHUTDOWN_TIMEOUT,
        },
        runtime_config, RecordConfig, RuntimeArgs,
    },
    record,
    runtime_profilers::{RuntimeConfig, ToolPaths, DEFAULT_MAX_CHILDREN},
    sink::{files, queue::DEFAULT_QUEUE_BYTES},
};

#[derive(Debug, Parser)]
#[command(
    name = "profiler",
    version,
    about = "Continuous eBPF CPU profiler for Linux"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sample every CPU (or some processes) for a while and write a symbolized profile:
    /// profile.folded, profile.pb.gz (pprof) and flamegraph.svg.
    Record(Box<RecordArgs>),
    /// Profile continuously until SIGTERM: one profile per interval, exported over
    /// OTLP/gRPC and/or written to rotating local files. Reads the standard
    /// OTEL_EXPORTER_OTLP_*, OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
    /// environment variables; flags win.
    Agent(Box<AgentCliArgs>),
}

#[derive(Debug, Args)]
pub struct AgentCliArgs {
    /// Seconds per profile.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_INTERVAL.as_secs())]
    pub interval: u64,
    /// Samples per second on each CPU.
    #[arg(long, value_name = "HZ", default_value_t = 97)]
    pub frequency: u64,
    /// Only profile this process (and its threads); repeat for more.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Also record samples of idle CPUs.
    #[arg(long)]
    pub include_idle: bool,
    /// Write rotating profiles here (default ./profiles when no endpoint is set).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Profiles kept in --output-dir (oldest deleted first).
    #[arg(long, value_name = "N", default_value_t = files::DEFAULT_MAX_PROFILES)]
    pub max_files: usize,
    /// Disk space kept in --output-dir, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = files::DEFAULT_MAX_BYTES >> 20)]
    pub max_disk_mib: u64,
    /// OTLP/gRPC endpoint, e.g. http://collector:4317 (env OTEL_EXPORTER_OTLP_PROFILES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Extra request header KEY=VALUE, e.g. authorization=Bearer%20TOKEN; repeatable (env OTEL_EXPORTER_OTLP_HEADERS).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
    /// PEM CA certificates to trust instead of the system's (env OTEL_EXPORTER_OTLP_CERTIFICATE).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (env OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE).
    #[arg(long, value_name = "PATH")]
    pub client_cert: Option<PathBuf>,
    /// PEM client key for mutual TLS (env OTEL_EXPORTER_OTLP_CLIENT_KEY).
    #[arg(long, value_name = "PATH")]
    pub client_key: Option<PathBuf>,
    /// gzip or none (env OTEL_EXPORTER_OTLP_COMPRESSION; default gzip).
    #[arg(long, value_name = "ALGO")]
    pub compression: Option<String>,
    /// Per-request deadline in seconds (env OTEL_EXPORTER_OTLP_TIMEOUT, in ms; default 10 s).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Bound of the export queue in KiB; the oldest profiles are dropped past it.
    #[arg(long, value_name = "KIB", default_value_t = DEFAULT_QUEUE_BYTES >> 10)]
    pub queue_kib: usize,
    /// Memory budget in MiB (RSS): the export queue gives up profiles when the agent's
    /// cycles need the room; 0 turns it off [default: 62 + twice the ring buffer
    /// (512 KiB per CPU, rounded up to a power of two): 64 on 2 CPUs].
    #[arg(long, value_name = "MIB")]
    pub memory_budget_mib: Option<u64>,
    /// Largest request sent, in KiB; bigger profiles are split.
    #[arg(long, value_name = "KIB", default_value_t = DEFAULT_MAX_REQUEST_BYTES >> 10)]
    pub max_request_kib: usize,
    /// Seconds SIGTERM waits for the last profile to be exported.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT.as_secs())]
    pub shutdown_timeout: u64,
    /// Log level: error, warn, info (state changes), debug (every cycle), trace. RUST_LOG wins.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub resource: ResourceCliArgs,
    #[command(flatten)]
    pub runtimes: RuntimeCliArgs,
}

/// The agent's own OTLP resource attributes.
#[derive(Debug, Args)]
#[command(next_help_heading = "OTLP resource attributes")]
pub struct ResourceCliArgs {
    /// KEY=VALUE on every exported process, e.g. deployment.environment.name=prod;
    /// repeatable (env OTEL_RESOURCE_ATTRIBUTES).
    #[arg(long = "resource-attribute", value_name = "KEY=VALUE")]
    pub resource_attributes: Vec<String>,
    /// service.name of every exported process (env OTEL_SERVICE_NAME).
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// How long to record, in seconds (Ctrl-C ends early and still writes everything).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub duration: u64,
    /// Samples per second on each CPU.
    #[arg(long, value_name = "HZ", default_value_t = 97)]
    pub frequency: u64,
    /// Only profile this process (and its threads); repeat for more.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Directory for profile.folded, profile.pb.gz and flamegraph.svg (created if needed).
    #[arg(long, value_name = "DIR", default_value = "profiles")]
    pub output_dir: PathBuf,
    /// Also record samples of idle CPUs (the kernel's idle task).
    #[arg(long)]
    pub include_idle: bool,
    /// Do not print progress while recording.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub runtimes: RuntimeCliArgs,
}

/// Runtime profilers: what the native unwinder cannot name.
#[derive(Debug, Args)]
#[command(next_help_heading = "Interpreted and JIT runtimes")]
pub struct RuntimeCliArgs {
    /// Runtimes to look inside, comma-separated: python (py-spy), ruby (rbspy), php
    /// (phpspy), java (JIT names through jattach), node (JIT names from the perf map
    /// --perf-basic-prof writes); all or none.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "all",
        value_delimiter = ','
    )]
    pub runtimes: Vec<String>,
    /// Samples per second asked of py-spy, rbspy and phpspy [default: --frequency]
    #[arg(long, value_name = "HZ")]
    pub runtime_rate: Option<u64>,
    /// Most py-spy, rbspy and phpspy processes running at once (they are niced,
    /// killed at their deadline and reaped); one jattach may run beside them.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_CHILDREN)]
    pub max_runtime_children: usize,
    /// py-spy program (path, or name in PATH).
    #[arg(long, value_name = "PATH", default_value = "py-spy")]
    pub py_spy: PathBuf,
    /// rbspy program.
    #[arg(long, value_name = "PATH", default_value = "rbspy")]
    pub rbspy: PathBuf,
    /// phpspy program.
    #[arg(long, value_name = "PATH", default_value = "phpspy")]
    pub phpspy: PathBuf,
    /// jattach program.
    #[arg(long, value_name = "PATH", default_value = "jattach")]
    pub jattach: PathBuf,
}

impl RuntimeCliArgs {
    fn config(self, frequency_hz: u64) -> Result<RuntimeConfig, crate::config::ConfigError> {
        runtime_config(
            RuntimeArgs {
                runtimes: self.runtimes,
                rate_hz: self.runtime_rate,
                max_children: self.max_runtime_children,
                tools: ToolPaths {
                    py_spy: self.py_spy,
                    rbspy: self.rbspy,
                    phpspy: self.phpspy,
                    jattach: self.jattach,
                },
            },
            frequency_hz,
        )
    }
}

/// Parses `args`, runs the command, prints any error with its causes; returns the
/// process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            1
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Record(args) => {
            // Before the output directory is created: a user without privileges
            // should not be left with an empty directory.
            crate::ebpf::check_privileges()?;
            let runtimes = args.runtimes.config(args.frequency)?;
            let mut config = RecordConfig::new(
                args.duration,
                args.frequency,
                args.pids,
                args.output_dir,
                args.include_idle,
                !args.quiet,
            )?;
            config.runtimes = runtimes;
            // Our only children are the runtime profilers: what they leave behind
            // outside their process groups is ours to kill and reap. Without it
            // (prctl refused), such leftovers go to init as before.
            let _ = crate::supervise::orphans::adopt_orphans();
            let runtime = record::runtime()?;
            let result = runtime.block_on(record::run(&config));
            // Do not wait for a symbolization abandoned at Ctrl-C.
            runtime.shutdown_background();
            if result.is_err() {
                // A failure before anything was written (the eBPF program did not
                // load, say) leaves no empty directory of ours behind.
                config.remove_created_dirs();
            }
            let summary = result?;
            eprint!("{}", summary.render());
            Ok(())
        }
        Command::Agent(args) => {
            init_logging(&args.log_level)?;
            crate::ebpf::check_privileges()?;
            let runtimes = args.runtimes.config(args.frequency)?;
            let mut config = AgentConfig::new(
                AgentArgs {
                    interval_secs: Some(args.interval),
                    frequency_hz: args.frequency,
                    pids: args.pids,
                    include_idle: args.include_idle,
                    output_dir: args.output_dir,
                    max_files: args.max_files,
                    max_disk_bytes: args.max_disk_mib.saturating_mul(1 << 20),
                    endpoint: args.endpoint,
                    headers: args.headers,
                    ca_file: args.ca_file,
                    client_cert: args.client_cert,
                    client_key: args.client_key,
                    compression: args.compression,
                    timeout_secs: args.timeout,
                    queue_bytes: args.queue_kib.saturating_mul(1 << 10),
                    max_request_bytes: args.max_request_kib.saturating_mul(1 << 10),
                    memory_budget_bytes: args
                        .memory_budget_mib
                        .map(|mib| mib.saturating_mul(1 << 20)),
                    shutdown_timeout_secs: Some(args.shutdown_timeout),
                    resource_attributes: args.resource.resource_attributes,
                    service_name: args.resource.service_name,
                },
                &|name| std::env::var(name).ok(),
            )?;
            config.runtimes = runtimes;
            if let Err(err) = crate::supervise::orphans::adopt_orphans() {
                tracing::warn!(%err, "cannot adopt the runtime profilers' orphaned descendants (PR_SET_CHILD_SUBREAPER): one that leaves its process group outlives its run");
            }
            let runtime = record::runtime()?;
            runtime.block_on(crate::agent::run(config))?;
            Ok(())
        }
    }
}

/// Logs to stderr; RUST_LOG overrides `level`.
fn init_logging(level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec)?,
        _ => EnvFilter::try_new(format!("profiler={level}"))
            .map_err(|_| anyhow::anyhow!("--log-level {level:?} is not a log level"))?,
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("profiler").chain(args.iter().copied()))
    }

    /// Defaults: 10 s at 97 Hz, whole host, ./profiles.
    #[test]
    fn record_defaults() {
        let Command::Record(a) = parse(&["record"]).unwrap().command else {
            panic!("not record")
        };
        assert_eq!((a.duration, a.frequency), (10, 97));
        assert!(a.pids.is_empty());
        assert_eq!(a.output_dir, PathBuf::from("profiles"));
    }

    /// Repeated --pid values are all kept.
    #[test]
    fn record_many_pids() {
        let Command::Record(a) = parse(&["record", "--pid", "1", "--pid", "22"])
            .unwrap()
            .command
        else {
            panic!("not record")
        };
        assert_eq!(a.pids, vec![1, 22]);
    }

    /// Agent flags parse, repeated headers are kept, and the bounds have defaults.
    #[test]
    fn agent_flags() {
        let Command::Agent(a) = parse(&[
            "agent",
            "--endpoint",
            "http://c:4317",
            "--header",
            "a=b",
            "--header",
            "c=d",
            "--interval",
            "5",
        ])
        .unwrap()
        .command
        else {
            panic!("not agent")
        };
        assert_eq!(a.headers, vec!["a=b", "c=d"]);
        assert_eq!(
            (
                a.interval,
                a.queue_kib,
                a.max_request_kib,
                a.memory_budget_mib
            ),
            (5, 20480, 4096, None)
        );
    }

    /// A non-numeric frequency is a parse error, not a panic.
    #[test]
    fn bad_flag_is_an_error() {
        assert!(parse(&["record", "--frequency", "fast"]).is_err());
        assert!(parse(&["record", "--bogus"]).is_err());
    }
}
