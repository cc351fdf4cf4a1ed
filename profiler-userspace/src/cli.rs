//! Command line: clap parses raw arguments, [`crate::config`] validates them, and
//! [`main`] runs the command and turns errors into one message and an exit code.

use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::{config::RecordConfig, record};

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
    Record(RecordArgs),
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
            let config = RecordConfig::new(
                args.duration,
                args.frequency,
                args.pids,
                args.output_dir,
                args.include_idle,
                !args.quiet,
            )?;
            let runtime = record::runtime()?;
            let summary = runtime.block_on(record::run(&config))?;
            eprint!("{}", summary.render());
            Ok(())
        }
    }
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
        let Command::Record(a) = parse(&["record"]).unwrap().command;
        assert_eq!((a.duration, a.frequency), (10, 97));
        assert!(a.pids.is_empty());
        assert_eq!(a.output_dir, PathBuf::from("profiles"));
    }

    /// Repeated --pid values are all kept.
    #[test]
    fn record_many_pids() {
        let Command::Record(a) = parse(&["record", "--pid", "1", "--pid", "22"])
            .unwrap()
            .command;
        assert_eq!(a.pids, vec![1, 22]);
    }

    /// A non-numeric frequency is a parse error, not a panic.
    #[test]
    fn bad_flag_is_an_error() {
        assert!(parse(&["record", "--frequency", "fast"]).is_err());
        assert!(parse(&["record", "--bogus"]).is_err());
    }
}
