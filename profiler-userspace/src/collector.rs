//! The sampling pipeline that `record` and `agent` share: the eBPF sampler, the
//! process capture worker and the drain task, started and stopped together.
//!
//! Owns all three: [`Collector::stop`] detaches the program, drains what is left,
//! joins the worker and hands back the last aggregate. Dropping a `Collector`
//! without stopping it still detaches the program (the `Sampler` is dropped) and ends
//! the drain task (its command channel closes).

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::{
    aggregate::{AggregateLimits, Aggregator},
    delivery::Delivery,
    drain::{DrainCommand, DrainLoop, DrainStats},
    ebpf::{KernelCounters, ProgramStats, Sampler, SamplerConfig},
    process::{CaptureWorker, ProcessStats, ProcessTable},
};

/// A running sampling pipeline.
pub struct Collector {
    sampler: Sampler,
    table: Arc<Mutex<ProcessTable>>,
    process_stats: Arc<ProcessStats>,
    worker: CaptureWorker,
    drain_stats: Arc<DrainStats>,
    commands: mpsc::Sender<DrainCommand>,
    drain_task: JoinHandle<()>,
}

/// How long `record` waits, when it stops, for the capture worker to finish its
/// queue (10 s: a full queue of 1 024 captures takes a few seconds). The agent
/// gives it a third of its shutdown deadline, which must leave time for the last
/// cycle and its export.
pub const CAPTURE_WORKER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What is left when the pipeline stops.
pub struct Stopped {
    /// The last interval's aggregate.
    pub aggregate: Aggregator,
    /// Final in-kernel counters.
    pub kernel: KernelCounters,
    /// Timer events delivered to the program against those expected, from attach
    /// to detach.
    pub delivery: Delivery,
    /// Run time of the eBPF program.
    pub bpf: ProgramStats,
    /// Fork and exec events the kernel could not write (ring buffer full).
    pub process_events_lost: u64,
    /// Processes the fork lineage forgot to stay within its bound.
    pub lineage_forgotten: u64,
    /// The kernel's counters of young processes' mappings, indexed by
    /// `profiler_common::MappingsCounter`.
    pub mappings: [u64; profiler_common::MAPPINGS_COUNTER_COUNT],
    pub table: Arc<Mutex<ProcessTable>>,
    pub process_stats: Arc<ProcessStats>,
    pub drain_stats: Arc<DrainStats>,
    /// The capture worker had not finished its queue within the wait
    /// [`Collector::stop`] was given (a capture stuck reading /proc or a binary):
    /// it was left to finish alone.
    pub capture_worker_stuck: bool,
    pub cpus: usize,
}

impl Collector {
    /// Loads and attaches the sampler and starts the worker and the drain task. Must
    /// run inside the tokio runtime. Processes named in `config.pids` are captured
    /// right away, before they can exit.
    pub fn start(config: &SamplerConfig, limits: AggregateLimits) -> anyhow::Result<Collector> {
        let (sampler, ring) = Sampler::start(config)?;
        let process_stats = Arc::new(ProcessStats::default());
        let table = Arc::new(Mutex::new(ProcessTable::new(process_stats.clone())));
        {
            let mut t = table.lock().expect("process table lock");
            for &pid in &config.pids {
                let _ = t.capture(pid);
            }
        }
        let (worker, first_sight) =
            CaptureWorker::start(table.clone()).context("cannot start the capture thread")?;
        let drain_stats = Arc::new(DrainStats::default());
        let drain = DrainLoop::new(
            ring,
            Aggregator::new(limits),
            first_sight,
            drain_stats.clone(),
        )
        .context("cannot poll the ring buffer")?;
        let (commands, command_rx) = mpsc::channel(1);
        let drain_task = tokio::spawn(drain.run(command_rx));
        Ok(Collector {
            sampler,
            table,
            process_stats,
            worker,
            drain_stats,
            commands,
            drain_task,
        })
    }

    pub fn table(&self) -> &Arc<Mutex<ProcessTable>> {
        &self.table
    }

    pub fn drain_stats(&self) -> &Arc<DrainStats> {
        &self.drain_stats
    }

    pub fn process_stats(&self) -> &Arc<ProcessStats> {
        &self.process_stats
    }

    pub fn cpus(&self) -> usize {
        self.sampler.cpus()
    }

    pub fn ring_buffer_bytes(&self) -> u32 {
        self.sampler.ring_buffer_bytes()
    }

    /// Current in-kernel counters (zero if they cannot be read).
    pub fn kernel_counters(&self) -> KernelCounters {
        self.sampler.counters().unwrap_or_default()
    }

    pub fn program_stats(&self) -> ProgramStats {
        self.sampler.program_stats()
    }

    /// The in-kernel counters and the timer events delivered to the program against
    /// those expected since attach, from one read of the counters (`None` if they
    /// cannot be read).
    pub fn kernel_reading(&self) -> Option<(KernelCounters, Delivery)> {
        self.sampler.delivery().ok()
    }

    /// The warning to give at start when forks and execs are not tracked: a
    /// process forked without an exec that exits before it is captured then goes
    /// unnamed.
    pub fn process_events_warning(&self) -> Option<String> {
        self.sampler.process_events_problem().map(|why| {
            format!(
                "forks are not tracked ({why}): a process forked without an exec that exits within ~0.5 s will be unnamed"
            )
        })
    }

    /// One sentence if the kernel does not read young processes' mappings (and
    /// was meant to): a process that exec'd and exits within ~0.5 s is then
    /// unnamed.
    pub fn mappings_warning(&self) -> Option<String> {
        self.sampler.mappings_problem().map(|why| {
            format!(
                "young processes' mappings are not read ({why}): a process that exec'd and exits within ~0.5 s will be unnamed"
            )
        })
    }

    /// Closes the current interval and returns its aggregate; sampling goes on into a
    /// fresh one.
    pub async fn take_interval(&self) -> anyhow::Result<Aggregator> {
        let (reply, aggregate) = oneshot::channel();
        self.commands
            .send(DrainCommand::TakeInterval(reply))
            .await
            .context("the drain task ended unexpectedly")?;
        aggregate.await.context("the drain task ended unexpectedly")
    }

    /// Lets first sight capture again, when next sampled, the processes the
    /// table forgot at the end of a cycle ([`ProcessTable::forget_exited`], on the
    /// cycle's thread: it reads /proc for every tracked process, which the drain's
    /// runtime thread must not wait for). Call it once a cycle, even with none
    /// forgotten: first sight then retries those it could not capture.
    pub async fn forget(&self, exited: Vec<u32>) {
        let _ = self.commands.send(DrainCommand::Forget(exited)).await;
    }

    /// Detaches the program, drains what is left and stops everything.
    /// The capture worker gets at most `worker_wait` to finish its queue (see
    /// [`CAPTURE_WORKER_STOP_WAIT`]).
    pub async fn stop(mut self, worker_wait: std::time::Duration) -> anyhow::Result<Stopped> {
        self.sampler.stop();
        // Both as they were when the program was detached.
        let bpf = self.sampler.program_stats();
        let (kernel, delivery) = self
            .sampler
            .delivery()
            .context("cannot read the eBPF counters")?;
        let process_events_lost = self.sampler.process_events_lost();
        let mappings = self.sampler.mappings_stats();
        let (reply, aggregate) = oneshot::channel();
        self.commands
            .send(DrainCommand::Stop(reply))
            .await
            .context("the drain task ended unexpectedly")?;
        let aggregate = aggregate
            .await
            .context("the drain task ended unexpectedly")?;
        (&mut self.drain_task)
            .await
            .context("the drain task failed")?;
        let cpus = self.sampler.cpus();
        let Collector {
            table,
            process_stats,
            worker,
            drain_stats,
            ..
        } = self;
        // The drain task dropped its FirstSight, which ends the worker's queue: it
        // finishes what is queued (processes seen last, captured before they can
        // exit). A capture stuck for good must not hold the profile back: past the
        // wait it is left to finish alone (the table needs no worker, and its lock
        // is never held across a read: see `capture_unlocked`).
        // Joined on a plain thread, not the runtime's blocking pool: the runtime
        // waits for its blocking tasks when it shuts down, and this one may never
        // end.
        let (joined, join) = oneshot::channel();
        std::thread::Builder::new()
            .name("capture-join".into())
            .spawn(move || {
                worker.join();
                let _ = joined.send(());
            })
            .context("cannot start a thread")?;
        let capture_worker_stuck = tokio::time::timeout(worker_wait, join).await.is_err();
        let lineage_forgotten = {
            let table = table.lock().unwrap_or_else(|p| p.into_inner());
            let lineage = table.lineage().lock().unwrap_or_else(|p| p.into_inner());
            lineage.forgotten
        };
        Ok(Stopped {
            aggregate,
            kernel,
            delivery,
            bpf,
            process_events_lost,
            lineage_forgotten,
            mappings,
            table,
            process_stats,
            drain_stats,
            capture_worker_stuck,
            cpus,
        })
    }
}
