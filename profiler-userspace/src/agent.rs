//! `profiler agent`: profile the host forever, one profile per interval, to local
//! rotating files and/or an OTLP backend.
//!
//! One cycle per interval: close the interval's aggregate (the drain goes on into a
//! new one), then on a blocking thread symbolize it, encode OTLP requests and write
//! files, then push the requests to the bounded export queue. Cycles never overlap:
//! if the previous cycle is still running when the next interval ends, that slot is
//! skipped and counted, and the samples stay in the aggregate for the next cycle.
//! Each cycle's peak RSS feeds the memory budget (crate::memory), which sets how
//! much of its bound the export queue may use.
//! On SIGTERM/SIGINT the last interval is closed and flushed within
//! `shutdown_timeout`, and the agent exits 0.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, SyncSender},
        Arc,
    },
    time::SystemTime,
};

use anyhow::Context as _;
use profiler_common::MappingsCounter;
use tokio::{sync::oneshot, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    aggregate::{
        AggregateLimits, AggregateStats, Aggregator, MAX_FRAMES_PER_INTERVAL,
        MAX_STACKS_PER_INTERVAL,
    },
    collector::Collector,
    config::agent::AgentConfig,
    delivery::Delivery,
    ebpf::SamplerConfig,
    export::otlp::{self, HostInfo},
    memory::{MemoryBudget, ProcessMemory},
    process::ProcessTable,
    runtime_profilers::{JitRefresh, Round, RuntimeProfilers, ROUND_MARGIN},
    sink::{
        files::{self, FilesWritten},
        grpc::{ExportStats, Exporter, QueuedRequest},
        queue::{ExportQueue, Pushed, QueueStats},
    },
    symbolize::{
        kallsyms::KernelCode, IntervalMeta, Symbolizer, AGENT_BLAZESYM_FILE_BUDGET,
        AGENT_MAX_DWARF_FILE_BYTES,
    },
};

/// Cycles after which blazesym's caches are dropped even within their budget, so
/// binaries of processes that exited are not held for ever, and the kernel's
/// symbols are read again (modules).
pub const SYMBOLIZER_REFRESH_CYCLES: u64 = 40;

/// Cycles between two reloads of the kernel's symbols for new kernel code (BPF
/// programs or modules loaded since the last): a reload reads kallsyms (~50 ms of
/// CPU here), so a host that loads programs all the time pays it at most once a
/// minute at the default interval; new code is named after its neighbour until then.
pub const KERNEL_RELOAD_MIN_CYCLES: u64 = 4;

/// Counters of the agent itself.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub cycles: AtomicU64,
    /// Interval ends that found the previous cycle still running.
    pub skipped_cycles: AtomicU64,
    pub samples: AtomicU64,
    /// Stacks left out of OTLP because alone they exceed the request size limit.
    pub oversized_stacks: AtomicU64,
    /// Profiles that could not be written to the local files.
    pub file_errors: AtomicU64,
    /// Old local profiles deleted early because the disk was full.
    pub profiles_deleted_for_space: AtomicU64,
    /// Samples whose stack did not fit an interval's table (counted under their
    /// process's `[stack table full]` stack instead).
    pub folded_samples: AtomicU64,
    /// Of those, samples whose process did not get a bucket either (host-wide).
    pub unattributed_samples: AtomicU64,
}

impl AgentStats {
    /// Adds an interval's aggregate counts; returns the folded total so far.
    fn add_aggregate(&self, aggregate: AggregateStats) -> u64 {
        self.unattributed_samples
            .fetch_add(aggregate.unattributed_samples, Ordering::Relaxed);
        self.folded_samples
            .fetch_add(aggregate.folded_samples, Ordering::Relaxed)
            + aggregate.folded_samples
    }
}

/// What a finished cycle hands back to the loop.
struct CycleDone {
    samples: u64,
    stacks: usize,
    jit: crate::symbolize::JitCounts,
    requests: Vec<(QueuedRequest, usize)>,
    oversized: u64,
    files: Option<std::io::Result<FilesWritten>>,
    /// The agent's peak RSS during the cycle (for the memory budget), if readable.
    peak_rss: Option<u64>,
    /// Processes the table forgot after the cycle (exited or exec'd), for first
    /// sight: forgotten on the cycle's thread, so the agent's loop never waits for
    /// the /proc reads that takes.
    exited: Vec<u32>,
}

/// Everything a cycle needs, cloned into its blocking task.
#[derive(Clone)]
struct CycleContext {
    table: Arc<std::sync::Mutex<ProcessTable>>,
    host: HostInfo,
    config: Arc<AgentConfig>,
}

fn run_cycle(ctx: &CycleContext, symbolizer: &mut Symbolizer, job: Job) -> CycleDone {
    // JVMs first write their perf maps, and the interval's runtime profiler runs end
    // (both bounded by their supervisor deadlines).
    if let Some(jit) = job.jit {
        jit.wait_blocking();
    }
    let interpreted = job.round.map(Round::wait_blocking).unwrap_or_default();
    let profile = symbolizer.symbolize(&job.aggregate, &ctx.table, job.meta, &interpreted);
    // At its bound the aggregate holds 8 MiB of addresses: gone before the writers
    // run, and out of the process too. Its stacks are small blocks in the drain
    // thread's heap, which this thread's allocations do not reuse: without the trim
    // the writers' memory came on top of those ~9 MiB (bench/stack_bound.py).
    drop(job.aggregate);
    drop(interpreted);
    crate::memory::release_free_memory();
    let samples = profile.samples();
    let mut requests = Vec::new();
    let oversized = match &ctx.config.grpc {
        // Each request kept as bytes only, as soon as it is built.
        Some(_) => otlp::encode(&profile, &ctx.host, ctx.config.max_request_bytes, |r, _| {
            let bytes = bytes::Bytes::from(prost::Message::encode_to_vec(&r));
            let len = bytes.len();
            requests.push((bytes, len));
        }),
        None => 0,
    };
    let files = ctx
        .config
        .files
        .as_ref()
        .map(|files_config| files::write(&profile, files_config));
    CycleDone {
        samples,
        stacks: profile.stacks.len(),
        jit: profile.jit,
        requests,
        oversized,
        files,
        peak_rss: None,
        exited: Vec::new(),
    }
}

/// One interval to symbolize, encode and write.
struct Job {
    aggregate: Aggregator,
    meta: IntervalMeta,
    /// The runtime profilers' round of this interval.
    round: Option<Round>,
    /// JVM perf map refreshes to wait for before symbolizing.
    jit: Option<JitRefresh>,
}

/// The thread that runs cycles, one at a time. It owns the symbolizer (blazesym's is
/// not `Send`), so its caches live across cycles. Dropping the sender ends it.
struct CycleWorker {
    jobs: SyncSender<(Job, oneshot::Sender<CycleDone>)>,
    thread: std::thread::JoinHandle<()>,
}

impl CycleWorker {
    fn start(ctx: CycleContext) -> anyhow::Result<CycleWorker> {
        // Capacity 1 and at most one job in flight: cycles never overlap.
        let (jobs, queue) = sync_channel::<(Job, oneshot::Sender<CycleDone>)>(1);
        let thread = std::thread::Builder::new()
            .name("cycle".into())
            .spawn(move || {
                let mut symbolizer = Symbolizer::default()
                    .with_max_dwarf_file_bytes(AGENT_MAX_DWARF_FILE_BYTES)
                    .with_kernel_table();
                let mut cycles: u64 = 0;
                let mut kernel_code = KernelCode::now();
                let mut kernel_loaded_at: u64 = 0;
                let mut peak_unresettable = false;
                while let Ok((job, reply)) = queue.recv() {
                    // The kernel's symbols are read again before this cycle names
                    // its kernel frames: every SYMBOLIZER_REFRESH_CYCLES (modules),
                    // and soon after new kernel code.
                    let code = KernelCode::now();
                    let periodic =
                        cycles > 0 && cycles.is_multiple_of(SYMBOLIZER_REFRESH_CYCLES);
                    let changed = code != kernel_code
                        && cycles - kernel_loaded_at >= KERNEL_RELOAD_MIN_CYCLES;
                    if periodic || changed {
                        if changed {
                            debug!("kernel code changed (BPF programs or modules): reloading kernel symbols");
                        }
                        symbolizer.refresh_kernel_table();
                        kernel_code = code;
                        kernel_loaded_at = cycles;
                    }
                    // A cycle is when the agent's memory peaks: the budget wants
                    // that peak. Unresettable, the peak since start is used.
                    if let Err(err) = crate::memory::reset_peak() {
                        if !peak_unresettable {
                            peak_unresettable = true;
                            info!(%err, "cannot reset the peak RSS (/proc/self/clear_refs): the memory budget uses the peak since start, so the export queue may get less room than it could");
                        }
                    }
                    let mut done = run_cycle(&ctx, &mut symbolizer, job);
                    // The interval before the open one is symbolized: what it
                    // needed of exited processes can go.
                    done.exited = ctx
                        .table
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget_exited();
                    // blazesym keeps every binary it opened mapped, open and parsed
                    // (a host running rustc or a JVM: >100 MiB of RSS and an fd per
                    // file). Those caches are dropped after a cycle that took them
                    // past the budget, and every SYMBOLIZER_REFRESH_CYCLES anyway
                    // (binaries of exited processes); our bounded (binary, address)
                    // cache carries names across, so only new addresses pay for
                    // re-reading a file.
                    cycles += 1;
                    if !symbolizer.release_file_caches_over(AGENT_BLAZESYM_FILE_BUDGET)
                        && cycles.is_multiple_of(SYMBOLIZER_REFRESH_CYCLES)
                    {
                        symbolizer.refresh_file_caches();
                    }
                    // What the cycle freed leaves the process (see crate::memory).
                    crate::memory::release_free_memory();
                    done.peak_rss = ProcessMemory::read().ok().map(|m| m.peak);
                    let _ = reply.send(done);
                }
            })
            .context("cannot start the cycle thread")?;
        Ok(CycleWorker { jobs, thread })
    }

    /// Hands over an interval; the result arrives on the returned receiver.
    fn submit(&self, job: Job) -> anyhow::Result<oneshot::Receiver<CycleDone>> {
        let (reply, done) = oneshot::channel();
        self.jobs
            .try_send((job, reply))
            .map_err(|_| anyhow::anyhow!("the cycle thread is busy or gone"))?;
        Ok(done)
    }

    /// Ends the thread once its current job is done.
    async fn join(self) {
        drop(self.jobs);
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

/// Turns a growing counter of bad events (samples lost, slots skipped) into
/// episodes: it began (the first interval that counted any) and it ended (the first
/// interval after that counted none), so the log says each once rather than every
/// interval.
#[derive(Debug, Default)]
struct Episodes {
    seen: u64,
    /// The total when the current episode began, while one is going on.
    began_at: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
enum Episode {
    /// This many in the interval that began it.
    Began(u64),
    /// This many in the whole episode.
    Ended(u64),
}

impl Episodes {
    /// Called once per interval with the counter's total so far.
    fn update(&mut self, total: u64) -> Option<Episode> {
        let before = std::mem::replace(&mut self.seen, total);
        match (total > before, self.began_at) {
            (true, None) => {
                self.began_at = Some(before);
                Some(Episode::Began(total - before))
            }
            (false, Some(start)) => {
                self.began_at = None;
                Some(Episode::Ended(before - start))
            }
            _ => None,
        }
    }
}

/// Timer events the kernel did not hand the program, interval by interval: an
/// interval whose shortfall is past the tolerance (attach and detach, rounding)
/// adds it to a total whose growth makes the episodes.
#[derive(Debug)]
struct Undelivered {
    last: Delivery,
    /// Events missing in the intervals that were short.
    missing: u64,
    episodes: Episodes,
}

impl Undelivered {
    /// Counting from `start`, a reading of the sampler.
    fn new(start: Delivery) -> Undelivered {
        Undelivered {
            last: start,
            missing: 0,
            episodes: Episodes::default(),
        }
    }

    /// Called with a new reading once per interval; returns the episode's change
    /// and the interval's figures.
    fn update(&mut self, now: Delivery) -> Option<(Episode, Delivery)> {
        let interval = now.since(&self.last);
        self.last = now;
        if interval.short() {
            self.missing += interval.missing();
        }
        self.episodes
            .update(self.missing)
            .map(|episode| (episode, interval))
    }
}

/// The exporter, on a thread and runtime of its own: tonic gzips and TLS encrypts a
/// request (up to `--max-request-kib`, tens of ms) inline on the thread that polls
/// it, and the agent's runtime thread is the one the ring buffer drain runs on.
struct ExporterThread {
    /// Fires when the exporter has ended (queue closed and empty, or aborted).
    done: oneshot::Receiver<()>,
    abort: tokio::task::AbortHandle,
}

impl ExporterThread {
    fn start(
        grpc: &crate::sink::grpc::GrpcConfig,
        queue: Arc<ExportQueue<QueuedRequest>>,
        stats: Arc<ExportStats>,
    ) -> anyhow::Result<ExporterThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the exporter's runtime")?;
        // The channel spawns its connection tasks on the runtime it is made in.
        let exporter = {
            let _inside = runtime.enter();
            Exporter::new(grpc).context("cannot set up OTLP export")?
        };
        let task = runtime.spawn(exporter.run(queue, stats));
        let abort = task.abort_handle();
        let (done_tx, done) = oneshot::channel();
        std::thread::Builder::new()
            .name("exporter".into())
            .spawn(move || {
                let _ = runtime.block_on(task);
                let _ = done_tx.send(());
            })
            .context("cannot start the exporter's thread")?;
        Ok(ExporterThread { done, abort })
    }
}

/// The running agent's sinks.
struct Sinks {
    queue: Option<Arc<ExportQueue<QueuedRequest>>>,
    exporter: Option<ExporterThread>,
    export_stats: Arc<ExportStats>,
    /// Local files failing, and deleting old profiles for space: each logged when
    /// it begins and when it ends.
    files_failing: Episodes,
    disk_full: Episodes,
    budget: MemoryBudget,
    /// The budget holds the queue below its configured bound.
    queue_squeezed: bool,
    /// The cycles alone need more than the budget.
    over_budget: bool,
}

impl Sinks {
    fn start(config: &AgentConfig, memory_budget: u64) -> anyhow::Result<Sinks> {
        let export_stats = Arc::new(ExportStats::default());
        let (queue, exporter) = match &config.grpc {
            Some(grpc) => {
                let queue = Arc::new(ExportQueue::new(config.queue_bytes));
                let thread = ExporterThread::start(grpc, queue.clone(), export_stats.clone())?;
                (Some(queue), Some(thread))
            }
            None => (None, None),
        };
        Ok(Sinks {
            queue,
            exporter,
            export_stats,
            files_failing: Episodes::default(),
            disk_full: Episodes::default(),
            budget: MemoryBudget::new(memory_budget),
            queue_squeezed: false,
            over_budget: false,
        })
    }

    /// Feeds the cycle's peak to the memory budget and gives the export queue the
    /// room that leaves (never less than this cycle's requests).
    fn apply_budget(&mut self, done: &CycleDone) {
        let Some(peak) = done.peak_rss else { return };
        let queued = self.queue.as_ref().map_or(0, |q| q.bytes() as u64);
        // The queue only shrinks during a cycle (it is pushed to after), so this
        // is at most what it held at the peak: the cycle's share errs larger.
        self.budget.observe(peak.saturating_sub(queued));
        if self.budget.limit() == 0 {
            return;
        }
        let over = self.budget.exceeded();
        if over != std::mem::replace(&mut self.over_budget, over) {
            let cycle_peak_mib = self.budget.working_set() >> 20;
            let budget_mib = self.budget.limit() >> 20;
            if over {
                let shed = if self.queue.is_some() {
                    "the export queue keeps only the newest profile"
                } else {
                    "without an export queue there is nothing to shed"
                };
                warn!(
                    cycle_peak_mib,
                    budget_mib,
                    "the agent's cycles alone need more memory than its budget (--memory-budget-mib): {shed}; a lower --frequency or a larger budget helps"
                );
            } else {
                info!(
                    cycle_peak_mib,
                    budget_mib, "the agent's cycles fit its memory budget again"
                );
            }
        }
        let Some(queue) = &self.queue else { return };
        let cycle_bytes: u64 = done.requests.iter().map(|(_, b)| *b as u64).sum();
        let room = self
            .budget
            .queue_room(queue.capacity() as u64)
            .max(cycle_bytes);
        let shed = queue.set_limit(usize::try_from(room).unwrap_or(usize::MAX));
        log_queue_drops(queue, &shed);
        let squeezed = queue.limit() < queue.capacity();
        if squeezed != std::mem::replace(&mut self.queue_squeezed, squeezed) {
            let queue_limit_kib = queue.limit() >> 10;
            let cycle_peak_mib = self.budget.working_set() >> 20;
            if squeezed {
                info!(
                    queue_limit_kib,
                    cycle_peak_mib,
                    budget_mib = self.budget.limit() >> 20,
                    "memory budget: the export queue gives up room to the agent's cycles (during an outage it keeps fewer profiles)"
                );
            } else {
                info!(
                    queue_limit_kib,
                    cycle_peak_mib, "memory budget: the export queue has its whole bound again"
                );
            }
        }
    }

    fn deliver(&mut self, done: &mut CycleDone, stats: &AgentStats) {
        self.apply_budget(done);
        if let Some(queue) = &self.queue {
            for (request, bytes) in done.requests.drain(..) {
                log_queue_drops(queue, &queue.push(request, bytes));
            }
        }
        let oversized_before = stats
            .oversized_stacks
            .fetch_add(done.oversized, Ordering::Relaxed);
        if oversized_before == 0 && done.oversized > 0 {
            warn!(
                oversized_stacks = done.oversized,
                "stacks left out of OTLP export: each alone exceeds the request size limit (--max-request-kib); they are in the local files if those are on; later ones are counted in the stopped line"
            );
        }
        match done.files.take() {
            Some(Err(e)) => {
                stats.file_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(Episode::Began(_)) = self
                    .files_failing
                    .update(stats.file_errors.load(Ordering::Relaxed))
                {
                    warn!(error = %e, "cannot write the local profile files; profiles are lost until they can be");
                }
            }
            Some(Ok(written)) => {
                if let Some(Episode::Ended(lost)) = self
                    .files_failing
                    .update(stats.file_errors.load(Ordering::Relaxed))
                {
                    info!(
                        lost_profiles = lost,
                        "local profile files are written again"
                    );
                }
                let deleted = stats
                    .profiles_deleted_for_space
                    .fetch_add(written.profiles_deleted_for_space as u64, Ordering::Relaxed)
                    + written.profiles_deleted_for_space as u64;
                match self.disk_full.update(deleted) {
                    Some(Episode::Began(n)) => warn!(
                        deleted_profiles = n,
                        "disk full: the oldest local profiles are deleted to make room for new ones"
                    ),
                    Some(Episode::Ended(n)) => info!(
                        deleted_profiles = n,
                        "disk has room again for the local profiles"
                    ),
                    None => {}
                }
                debug!(
                    path = %written.pprof.display(),
                    deleted = written.deleted,
                    deleted_for_space = written.profiles_deleted_for_space,
                    "wrote profile"
                )
            }
            None => {}
        }
    }

    /// Closes the queue and waits for the exporter until `deadline`.
    async fn flush(self, deadline: Instant) {
        let Some(queue) = self.queue else { return };
        queue.close();
        if let Some(exporter) = self.exporter {
            if tokio::time::timeout_at(deadline, exporter.done)
                .await
                .is_err()
            {
                exporter.abort.abort();
                warn!(
                    unsent_requests = queue.len(),
                    "shutdown deadline reached before every profile was exported"
                );
            }
        }
    }
}

/// Logs the start and end of an episode of export queue drops.
fn log_queue_drops(queue: &ExportQueue<QueuedRequest>, pushed: &Pushed) {
    if pushed.drops_began {
        warn!(
            queue_bytes = queue.bytes(),
            queue_limit_bytes = queue.limit(),
            "export queue full: dropping the oldest profiles until the backend catches up"
        );
    }
    if let Some(dropped) = pushed.drops_ended {
        info!(
            dropped,
            "export queue has room again; profiles dropped meanwhile"
        );
    }
}

/// Runs until SIGTERM or SIGINT; returns the agent's counters.
pub async fn run(config: AgentConfig) -> anyhow::Result<Arc<AgentStats>> {
    let config = Arc::new(config);
    let collector = Collector::start(
        &SamplerConfig {
            frequency_hz: config.frequency_hz,
            pids: config.pids.clone(),
            include_idle: config.include_idle,
            ring_buffer_bytes: None,
            bpf_stats: false,
        },
        AggregateLimits::default(),
    )?;
    let memory_budget = config
        .memory_budget_bytes
        .unwrap_or_else(|| crate::memory::default_budget(u64::from(collector.ring_buffer_bytes())));
    let mut sinks = Sinks::start(&config, memory_budget)?;
    let stats = Arc::new(AgentStats::default());
    info!(
        cpus = collector.cpus(),
        frequency_hz = config.frequency_hz,
        interval_s = config.interval.as_secs(),
        memory_budget_mib = memory_budget >> 20,
        endpoint = config.grpc.as_ref().map(|g| g.endpoint.as_str()).unwrap_or("-"),
        output_dir = %config.files.as_ref().map(|f| f.dir.display().to_string()).unwrap_or_else(|| "-".into()),
        resource = %config
            .resource_attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        "profiling started"
    );
    for limit in crate::ebpf::naming_limits()
        .into_iter()
        .chain(collector.process_events_warning())
        .chain(collector.mappings_warning())
    {
        warn!("{limit}");
    }
    let ctx = CycleContext {
        table: collector.table().clone(),
        host: HostInfo {
            attributes: config.resource_attributes.clone(),
        },
        config: config.clone(),
    };

    let profilers = RuntimeProfilers::new(config.runtimes.clone())
        .context("cannot create the runtime profilers' directory")?;
    if let Some(missing) = config.runtimes.missing_tools() {
        warn!("runtime profilers {missing}");
    }
    // Rounds sample the processes that were on CPU in the last interval (or the
    // --pid targets), inside the next one.
    let round_window = config
        .interval
        .saturating_sub(ROUND_MARGIN)
        .max(std::time::Duration::from_secs(1));
    let mut round = (!config.pids.is_empty())
        .then(|| profilers.start_round(config.pids.clone(), round_window))
        .flatten();

    let mut kernel_losses = Episodes::default();
    let mut undelivered = Undelivered::new(
        collector
            .kernel_reading()
            .map(|(_, delivery)| delivery)
            .unwrap_or_default(),
    );
    let mut skipped_slots = Episodes::default();
    let mut folding = Episodes::default();
    let mut targets_gone = false;
    let worker = CycleWorker::start(ctx)?;
    let mut in_flight: Option<oneshot::Receiver<CycleDone>> = None;
    let mut interval_start = SystemTime::now();
    let mut ticker = tokio::time::interval_at(Instant::now() + config.interval, config.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Listeners made once, before the loop: one made per pass (`ctrl_c()`) would miss
    // a signal that arrived while the loop body awaited, and the handler installed
    // then would keep the signal from killing us either.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot handle SIGINT")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    // A closed terminal (SIGHUP) stops the agent as SIGTERM does, flushing first,
    // instead of killing it with the last interval unsent.
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    let meta_until_now = |start: SystemTime| {
        let now = SystemTime::now();
        (
            IntervalMeta {
                start,
                duration: now.duration_since(start).unwrap_or_default(),
                frequency_hz: config.frequency_hz,
            },
            now,
        )
    };

    let mut failure: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if in_flight.is_some() {
                    let skipped = stats.skipped_cycles.fetch_add(1, Ordering::Relaxed) + 1;
                    debug!(skipped, "previous cycle still running: skipping this slot");
                    continue;
                }
                let aggregate = collector.take_interval().await?;
                match folding.update(stats.add_aggregate(aggregate.stats())) {
                    Some(Episode::Began(folded)) => warn!(
                        folded,
                        max_stacks = MAX_STACKS_PER_INTERVAL,
                        max_frames = MAX_FRAMES_PER_INTERVAL,
                        "an interval held more distinct stacks than its bounds: the rest are counted under their process's [stack table full] stack"
                    ),
                    Some(Episode::Ended(folded)) => info!(folded, "intervals fit their stack bounds again"),
                    None => {}
                }
                let (meta, now) = meta_until_now(interval_start);
                interval_start = now;
                stats.cycles.fetch_add(1, Ordering::Relaxed);
                let pids = if config.pids.is_empty() {
                    aggregate.distinct_tgids()
                } else {
                    config.pids.clone()
                };
                let jit = profilers.refresh_jit(pids.clone());
                in_flight = Some(worker.submit(Job { aggregate, meta, round: round.take(), jit })?);
                round = profilers.start_round(pids, round_window);
            }
            done = async { in_flight.as_mut().expect("guarded by the if").await }, if in_flight.is_some() => {
                in_flight = None;
                let Ok(mut done) = done else {
                    // The cycle thread is gone (a panic): stop, but through the
                    // shutdown path, so what is queued is still exported.
                    failure = Some(anyhow::anyhow!(
                        "a profiling cycle failed (its thread ended unexpectedly)"
                    ));
                    break;
                };
                stats.samples.fetch_add(done.samples, Ordering::Relaxed);
                // One read of the in-kernel counters for the cycle's log and episodes.
                let kernel = collector.kernel_reading();
                let lost_total = kernel.as_ref().map_or(0, |(counters, _)| counters.lost());
                debug!(
                    samples = done.samples,
                    stacks = done.stacks,
                    requests = done.requests.len(),
                    lost_total,
                    queued = sinks.queue.as_ref().map_or(0, |q| q.len()),
                    queue_limit_kib = sinks.queue.as_ref().map_or(0, |q| q.limit() >> 10),
                    peak_rss_kib = done.peak_rss.map_or(0, |bytes| bytes >> 10),
                    runtime_runs = profilers.stats().runs.load(Ordering::Relaxed),
                    runtime_children = profilers.live_children(),
                    jit_named = done.jit.named,
                    perf_maps_read = done.jit.maps_read,
                    perf_maps_unchanged = done.jit.maps_unchanged,
                    perf_maps_refused = done.jit.maps_refused,
                    perf_map_malformed_lines = done.jit.malformed_lines,
                    "cycle done"
                );
                match kernel_losses.update(lost_total) {
                    Some(Episode::Began(lost)) => warn!(
                        lost,
                        frequency_hz = config.frequency_hz,
                        "samples are being lost in the kernel: the ring buffer was full (the reader is not keeping up; a lower --frequency helps)"
                    ),
                    Some(Episode::Ended(lost)) => info!(lost, "samples are no longer lost in the kernel"),
                    None => {}
                }
                if let Some((_, delivery)) = kernel {
                    match undelivered.update(delivery) {
                        Some((Episode::Began(missing), interval)) => warn!(
                            missing,
                            expected = interval.expected,
                            delivered = interval.delivered,
                            missed_while_idle = interval.missed_while_idle(),
                            tolerance = interval.tolerance(),
                            cpus = interval.cpus,
                            frequency_hz = config.frequency_hz,
                            "the kernel did not run the eBPF program for every expected timer event (uncounted by it; without --include-idle only those expected while CPUs were busy count): perf throttling (see dmesg for \"perf: interrupt took too long\"; kernel.perf_cpu_time_max_percent), another BPF program running on that CPU, a CPU taken offline, a descheduled vCPU, or with --include-idle an idle CPU whose timer this kernel does not fire"
                        ),
                        Some((Episode::Ended(missing), _)) => info!(missing, "the kernel runs the eBPF program for every expected timer event again"),
                        None => {}
                    }
                }
                match skipped_slots.update(stats.skipped_cycles.load(Ordering::Relaxed)) {
                    Some(Episode::Began(skipped)) => warn!(
                        skipped,
                        "cycles overrun the interval: slots are skipped (their samples go into the next profile)"
                    ),
                    Some(Episode::Ended(skipped)) => info!(skipped, "cycles fit the interval again"),
                    None => {}
                }
                if !config.pids.is_empty()
                    && !targets_gone
                    && !config.pids.iter().any(|&pid| crate::process::is_running(pid))
                {
                    targets_gone = true;
                    warn!(
                        pids = ?config.pids,
                        "every --pid target has exited: profiles stay empty until the agent is restarted with live targets"
                    );
                }
                sinks.deliver(&mut done, &stats);
                collector.forget(std::mem::take(&mut done.exited)).await;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
        }
    }

    // Shutdown: finish the cycle in flight, then the last interval, within the deadline.
    let deadline = Instant::now() + config.shutdown_timeout;
    info!("stopping: flushing the last profile");
    // Whatever hangs below that has no deadline of its own, the agent exits soon
    // after the deadline.
    let _watchdog =
        arm_shutdown_watchdog(config.shutdown_timeout + SHUTDOWN_WATCHDOG_GRACE, || {
            std::process::exit(0)
        });
    // Runtime profiler runs end now (a cycle in flight may be waiting for them);
    // what they had not written yet is lost.
    profilers
        .shutdown(
            config
                .shutdown_timeout
                .min(std::time::Duration::from_secs(3)),
        )
        .await;
    let mut worker_free = failure.is_none();
    if let Some(done) = in_flight.take() {
        worker_free &= deliver_by(done, deadline, &mut sinks, &stats, "the cycle in flight").await;
    }
    // A third of what is left of the deadline: the last cycle and its export
    // need the rest.
    let worker_wait = deadline.saturating_duration_since(Instant::now()) / 3;
    let stopped = collector.stop(worker_wait).await?;
    if stopped.capture_worker_stuck {
        warn!("reading a process's /proc entry or binaries is stuck (a locked memory map or a hung file system): the last profile is symbolized without waiting for it");
    }
    stats.add_aggregate(stopped.aggregate.stats());
    if worker_free {
        let (meta, _) = meta_until_now(interval_start);
        let done = worker.submit(Job {
            aggregate: stopped.aggregate,
            meta,
            round: round.take(),
            jit: None,
        })?;
        worker_free = deliver_by(done, deadline, &mut sinks, &stats, "the last cycle").await;
    }
    let export_stats = sinks.export_stats.clone();
    let largest_cycle_peak_kib = sinks.budget.largest() >> 10;
    let queue = sinks.queue.clone();
    let queue_stat = |stat: fn(&QueueStats) -> &AtomicU64| {
        queue
            .as_ref()
            .map_or(0, |q| stat(&q.stats).load(Ordering::Relaxed))
    };
    sinks.flush(deadline).await;
    if worker_free {
        worker.join().await;
    }
    info!(
        cycles = stats.cycles.load(Ordering::Relaxed),
        skipped_cycles = stats.skipped_cycles.load(Ordering::Relaxed),
        samples = stats.samples.load(Ordering::Relaxed),
        lost = stopped.kernel.lost(),
        events_expected = stopped.delivery.expected,
        events_delivered = stopped.delivery.delivered,
        events_missed_while_idle = stopped.delivery.missed_while_idle(),
        unreadable_records = stopped.drain_stats.malformed(),
        kernel_stack_walk_errors = stopped
            .kernel
            .get(profiler_common::Counter::KernelStackError),
        user_stack_walk_errors = stopped.kernel.get(profiler_common::Counter::UserStackError),
        user_stacks_cut = stopped.drain_stats.user_walks_derailed(),
        user_walks_cut_in_kernel = stopped.kernel.get(profiler_common::Counter::UserWalkCut),
        stacks_at_depth_limit = stopped.drain_stats.stacks_at_depth_limit(),
        exported_requests = export_stats.sent_requests.load(Ordering::Relaxed),
        exported_bytes = export_stats.sent_bytes.load(Ordering::Relaxed),
        export_retries = export_stats.retries.load(Ordering::Relaxed),
        rejected_requests = export_stats.rejected_requests.load(Ordering::Relaxed),
        given_up_requests = export_stats.given_up_requests.load(Ordering::Relaxed),
        queue_dropped_requests = queue_stat(|q| &q.dropped),
        queue_dropped_bytes = queue_stat(|q| &q.dropped_bytes),
        queue_peak_bytes = queue_stat(|q| &q.peak_bytes),
        queue_dropped_for_budget = queue_stat(|q| &q.dropped_for_budget),
        largest_cycle_peak_kib,
        oversized_stacks = stats.oversized_stacks.load(Ordering::Relaxed),
        folded_samples = stats.folded_samples.load(Ordering::Relaxed),
        unattributed_samples = stats.unattributed_samples.load(Ordering::Relaxed),
        partially_rejected_profiles = export_stats
            .partially_rejected_profiles
            .load(Ordering::Relaxed),
        processes_exited_before_capture = stopped
            .process_stats
            .gone_before_capture
            .load(Ordering::Relaxed),
        processes_named_from_parent = stopped
            .process_stats
            .named_from_parent
            .load(Ordering::Relaxed),
        processes_named_from_kernel = stopped
            .process_stats
            .named_from_kernel
            .load(Ordering::Relaxed),
        processes_named_before_exec = stopped
            .process_stats
            .named_before_exec
            .load(Ordering::Relaxed),
        captures_stuck = stopped.process_stats.captures_stuck.load(Ordering::Relaxed),
        young_mappings_lost = stopped.mappings[MappingsCounter::RingBufferFull as usize],
        process_events_lost = stopped.process_events_lost,
        lineage_forgotten = stopped.lineage_forgotten,
        processes_untracked_table_full = stopped.process_stats.table_full.load(Ordering::Relaxed),
        first_sights_deferred_queue_full = stopped.process_stats.queue_full.load(Ordering::Relaxed),
        binaries_unopened_table_full = stopped.process_stats.objects_full.load(Ordering::Relaxed),
        runtime_runs = profilers.stats().runs.load(Ordering::Relaxed),
        runtime_runs_failed = profilers.stats().runs_failed.load(Ordering::Relaxed),
        runtime_runs_stopped = profilers.stats().runs_stopped.load(Ordering::Relaxed),
        runtime_runs_abandoned = profilers.stats().runs_abandoned.load(Ordering::Relaxed),
        runtime_runs_refused = profilers.stats().runs_refused.load(Ordering::Relaxed),
        runtime_output_malformed_lines = profilers.stats().malformed_lines.load(Ordering::Relaxed),
        runtime_samples_dropped = profilers.stats().samples_dropped.load(Ordering::Relaxed),
        runtime_orphans_killed = profilers.orphans_killed(),
        runtime_rounds_missed = profilers.stats().rounds_missed.load(Ordering::Relaxed),
        runtime_targets_deferred = profilers.stats().targets_deferred.load(Ordering::Relaxed),
        runtime_candidates_skipped = profilers.stats().candidates_skipped.load(Ordering::Relaxed),
        jvm_perf_map_requests = profilers.stats().jit_refreshes.load(Ordering::Relaxed),
        jvm_attach_skipped = profilers.stats().jit_attach_skipped.load(Ordering::Relaxed),
        profiles_not_written = stats.file_errors.load(Ordering::Relaxed),
        profiles_deleted_for_space = stats.profiles_deleted_for_space.load(Ordering::Relaxed),
        "stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(stats),
    }
}

/// How long past `--shutdown-timeout` the shutdown watchdog waits before it ends the
/// process: the steps that have a deadline of their own get theirs first.
pub const SHUTDOWN_WATCHDOG_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Disarms the shutdown watchdog when dropped (the shutdown finished).
struct ShutdownWatchdog(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

/// Starts a thread that calls `exit` after `after` unless the returned guard is
/// dropped first (logging why): a step of the shutdown without a deadline of its
/// own (a read from a hung filesystem somewhere not bounded) cannot keep the agent
/// from exiting. Perf events and
/// BPF programs go with the process's fds; runtime profilers' children get SIGKILL
/// from their parent-death signal.
fn arm_shutdown_watchdog(
    after: std::time::Duration,
    exit: impl FnOnce() + Send + 'static,
) -> Option<ShutdownWatchdog> {
    let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = disarmed.recv_timeout(after) {
                warn!(
                    waited_s = after.as_secs(),
                    "shutdown did not finish in time (a thread is stuck, e.g. reading from a hung filesystem): exiting without the last profile"
                );
                exit();
            }
        });
    match spawned {
        Ok(_) => Some(ShutdownWatchdog(disarm)),
        Err(e) => {
            warn!(error = %e, "cannot start the shutdown watchdog: a stuck shutdown would not be cut short");
            None
        }
    }
}

/// Waits until `deadline` for the profile of a cycle (`which`, for the log) and
/// delivers it. False when the cycle failed or is late: the cycle thread may still
/// be busy, and is then not joined, so the exit stays within the deadline.
async fn deliver_by(
    done: oneshot::Receiver<CycleDone>,
    deadline: Instant,
    sinks: &mut Sinks,
    stats: &AgentStats,
    which: &str,
) -> bool {
    match tokio::time::timeout_at(deadline, done).await {
        Ok(Ok(mut done)) => {
            stats.samples.fetch_add(done.samples, Ordering::Relaxed);
            sinks.deliver(&mut done, stats);
            true
        }
        Ok(Err(_)) => {
            warn!("{which} failed: its profile is lost");
            false
        }
        Err(_) => {
            warn!("{which} did not finish before the shutdown deadline: its profile is lost");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watchdog calls its exit once its time has passed, not before, and never
    /// once disarmed (a shutdown that finished, or a library caller's `run` that
    /// returned, must not end the process later).
    #[test]
    fn shutdown_watchdog_fires_after_its_time_unless_disarmed() {
        let ms = std::time::Duration::from_millis;
        let (tx, rx) = std::sync::mpsc::channel();
        let armed = std::time::Instant::now();
        let _guard = arm_shutdown_watchdog(ms(200), {
            let tx = tx.clone();
            move || tx.send(("fired", armed.elapsed())).unwrap()
        });
        let (what, after) = rx.recv_timeout(ms(10_000)).expect("the watchdog fired");
        assert_eq!(what, "fired");
        assert!(after >= ms(200), "{after:?}");

        let guard = arm_shutdown_watchdog(ms(200), move || tx.send(("late", ms(0))).unwrap());
        drop(guard);
        assert!(
            rx.recv_timeout(ms(600)).is_err(),
            "fired after it was disarmed"
        );
    }

    /// A loss counter is one "began" when it first grows and one "ended" at the
    /// first interval without growth, with the counts of each.
    #[test]
    fn losses_are_logged_as_episodes() {
        let mut e = Episodes::default();
        let seen: Vec<_> = [0, 0, 5, 9, 20, 20, 20, 21, 21]
            .into_iter()
            .map(|total| e.update(total))
            .collect();
        assert_eq!(
            seen,
            vec![
                None,
                None,
                Some(Episode::Began(5)),
                None,
                None,
                Some(Episode::Ended(20)),
                None,
                Some(Episode::Began(1)),
                Some(Episode::Ended(1)),
            ]
        );
    }

    /// An interval short of expected events past the tolerance begins an episode
    /// (logged once); the first interval within it again ends it. Events that did
    /// not come in idle time are no shortfall.
    #[test]
    fn undelivered_events_are_logged_as_episodes() {
        let reading = |expected, delivered| Delivery {
            expected,
            delivered,
            cpus: 2,
            ..Delivery::default()
        };
        let mut u = Undelivered::new(reading(0, 0));
        // 1 940 expected per interval (10 s at 97 Hz on 2 CPUs); tolerance 19.
        assert_eq!(u.update(reading(1_940, 1_925)), None);
        let (began, interval) = u.update(reading(3_880, 3_765)).unwrap();
        assert_eq!(began, Episode::Began(100));
        assert_eq!((interval.expected, interval.delivered), (1_940, 1_840));
        assert_eq!(u.update(reading(5_820, 5_605)).map(|e| e.0), None);
        assert_eq!(
            u.update(reading(7_760, 7_545)).map(|e| e.0),
            Some(Episode::Ended(200))
        );
        assert_eq!(u.update(reading(9_700, 9_480)), None);

        // Half the events missing, all of them in idle time: no episode.
        let idle = |expected, delivered, expected_idle| Delivery {
            expected_idle,
            ..reading(expected, delivered)
        };
        let mut u = Undelivered::new(reading(0, 0));
        assert_eq!(u.update(idle(1_940, 970, 970)), None);
        assert_eq!(u.update(idle(3_880, 1_940, 1_940)), None);
    }

    /// Each interval's folded samples add up, and the running total is what the
    /// folding episodes are told (so a second full interval is not a new episode).
    #[test]
    fn folded_samples_add_up_across_intervals() {
        let stats = AgentStats::default();
        let interval = |folded, unattributed| AggregateStats {
            samples: 100,
            folded_samples: folded,
            unattributed_samples: unattributed,
        };
        assert_eq!(stats.add_aggregate(interval(0, 0)), 0);
        assert_eq!(stats.add_aggregate(interval(30, 2)), 30);
        assert_eq!(stats.add_aggregate(interval(12, 0)), 42);
        assert_eq!(stats.folded_samples.load(Ordering::Relaxed), 42);
        assert_eq!(stats.unattributed_samples.load(Ordering::Relaxed), 2);
    }
}
