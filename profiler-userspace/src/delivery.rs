//! Timer events the kernel handed the sampling program, against those expected.
//!
//! The program counts every event it runs for, each in exactly one outcome
//! ([`KernelCounters::events`]). The kernel does not always run it, and then nothing
//! counts the sample: it skips the program while another BPF program runs on that
//! CPU (`bpf_prog_active`), stops an event while perf throttles it ("perf:
//! interrupt took too long"), and a timer that fires late (a vCPU descheduled for
//! longer than a period) skips the periods it missed. Those show only against the
//! expected count: each CPU's attached time divided by the timer's period.
//!
//! Idle time is reckoned apart. Some kernels and virtual machines do not fire the
//! cpu-clock timer on an idle CPU (seen here: a 6.18 guest on 2 vCPUs, where perf
//! and bpftrace miss the same events); an event there would only have sampled the
//! idle task, which is not kept unless `--include-idle`. So, without it, the
//! shortfall is reckoned on busy time: the events expected in each CPU's idle time
//! (its `idle` and `iowait` in /proc/stat) are set against the idle task's events
//! delivered, and what is missing of them is reported as missed while idle, not as
//! a loss. With `--include-idle` idle samples are wanted, and every missing event
//! is a shortfall.

use std::{
    io,
    time::{Duration, Instant},
};

use profiler_common::Counter;

use crate::ebpf::KernelCounters;

/// The kernel's cpu-clock event in frequency mode is an hrtimer with a fixed period
/// of `NSEC_PER_SEC / frequency` ns (`perf_swevent_init_hrtimer`), never shorter
/// than 10 us (`perf_swevent_hrtimer`).
const MIN_TIMER_PERIOD_NS: u64 = 10_000;

/// The cpu-clock timer events a CPU's event fires at `frequency_hz` in `attached`
/// time (summed over CPUs, the whole sampler's): whole periods only.
pub fn expected_events(frequency_hz: u64, attached: Duration) -> u64 {
    if frequency_hz == 0 {
        return 0;
    }
    let period_ns = (1_000_000_000 / frequency_hz).max(MIN_TIMER_PERIOD_NS);
    u64::try_from(attached.as_nanos() / u128::from(period_ns)).unwrap_or(u64::MAX)
}

/// The time every CPU's event has been attached at `at`, summed over CPUs: each
/// from its own instant in `attached`.
pub fn attached_time(attached: &[Instant], at: Instant) -> Duration {
    attached
        .iter()
        .map(|&a| at.saturating_duration_since(a))
        .sum()
}

/// The timer events the kernel was expected to hand the sampling program, against
/// those it did (see the module's documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The frequency times each CPU's attached time, summed over CPUs (from just
    /// before its event was opened until just after the program was detached or
    /// its counters read).
    pub expected: u64,
    /// Events the program ran for ([`KernelCounters::events`]).
    pub delivered: u64,
    /// Of `expected`, those in the CPUs' idle time; 0 when idle time is not
    /// reckoned apart (`--include-idle`, or /proc/stat unreadable).
    pub expected_idle: u64,
    /// Of `delivered`, those of the idle task ([`Counter::IdleSkipped`]); 0 when
    /// idle time is not reckoned apart.
    pub delivered_idle: u64,
    /// What reckoning idle time apart may be off by for the ticks /proc/stat counts
    /// it in (10 ms): each CPU's idle time between two readings is known to 2
    /// ticks. 0 when idle time is not reckoned apart. (The other part of its slack
    /// depends on the events: see [`Delivery::tolerance`].)
    pub tick_slack: u64,
    /// Whether idle time is reckoned apart (not with `--include-idle`, nor when
    /// /proc/stat is unreadable).
    pub idle_apart: bool,
    /// CPUs the program is attached to.
    pub cpus: usize,
    /// Runs of the program the kernel's BPF statistics counted, when the sampler
    /// turned them on (`SamplerConfig::bpf_stats`): should equal `delivered`.
    pub runs: Option<u64>,
}

impl Delivery {
    /// The shortfall the edges explain: attach and detach are not instant, and a
    /// timer's first period begins when its event is opened. At least 2 events per
    /// CPU, at least 1 % of the expected. Plus, when idle time is reckoned apart,
    /// its ticks ([`Delivery::tick_slack`]) and [`IDLE_SLACK_DIVISOR`] of the lesser
    /// of the events expected in idle and in busy time: a CPU that idles and wakes
    /// often gets a few percent fewer events in its busy time than that time
    /// predicts (measured here with 1 ms bursts of work and 1 ms sleeps: up to 22
    /// fewer of ~240), which takes both; the lesser, so that a mostly idle host
    /// does not hide the loss of most of its few busy events.
    pub fn tolerance(&self) -> u64 {
        let busy = self.expected.saturating_sub(self.expected_idle);
        (self.expected / 100).max(2 * self.cpus as u64)
            + self.tick_slack
            + self.expected_idle.min(busy) / IDLE_SLACK_DIVISOR
    }

    /// Events expected while the CPUs were busy (all of them when idle time is not
    /// reckoned apart) that the program did not run for: samples lost.
    pub fn missing(&self) -> u64 {
        let expected_busy = self.expected.saturating_sub(self.expected_idle);
        let delivered_busy = self.delivered.saturating_sub(self.delivered_idle);
        expected_busy.saturating_sub(delivered_busy)
    }

    /// Expected events that did not come while the CPUs were idle: they would have
    /// sampled the idle task, which is not kept, so nothing is lost.
    pub fn missed_while_idle(&self) -> u64 {
        self.expected
            .saturating_sub(self.delivered)
            .saturating_sub(self.missing())
    }

    /// The shortfall is more than the edges explain: the kernel skipped the program.
    pub fn short(&self) -> bool {
        self.missing() > self.tolerance()
    }

    /// Delivered as a percentage of expected (100 when nothing was expected).
    pub fn percent(&self) -> f64 {
        if self.expected == 0 {
            100.0
        } else {
            self.delivered as f64 * 100.0 / self.expected as f64
        }
    }

    /// What happened since `earlier` (an earlier reading of the same sampler).
    pub fn since(&self, earlier: &Delivery) -> Delivery {
        Delivery {
            expected: self.expected.saturating_sub(earlier.expected),
            delivered: self.delivered.saturating_sub(earlier.delivered),
            expected_idle: self.expected_idle.saturating_sub(earlier.expected_idle),
            delivered_idle: self.delivered_idle.saturating_sub(earlier.delivered_idle),
            tick_slack: self.tick_slack,
            idle_apart: self.idle_apart,
            cpus: self.cpus,
            runs: self
                .runs
                .zip(earlier.runs)
                .map(|(now, then)| now.saturating_sub(then)),
        }
    }
}

/// The part of the events expected in idle or busy time (the lesser) that reckoning
/// idle time apart may be off by (1/10: 10 %, about twice the most measured; see
/// [`Delivery::tolerance`]).
pub const IDLE_SLACK_DIVISOR: u64 = 10;

/// The expected events and what the program counted, as a [`Delivery`]: `attached`
/// is the CPUs' attached time summed, `idle` their idle time in it (`None`: not
/// reckoned apart).
pub fn reckon(
    frequency_hz: u64,
    attached: Duration,
    idle: Option<IdleTime>,
    counters: &KernelCounters,
    cpus: usize,
    runs: Option<u64>,
) -> Delivery {
    let (expected_idle, delivered_idle, tick_slack) = match idle {
        Some(idle) => (
            expected_events(frequency_hz, idle.time),
            counters.get(Counter::IdleSkipped),
            cpus as u64 * (2 * frequency_hz).div_ceil(idle.ticks_per_second.max(1)),
        ),
        None => (0, 0, 0),
    };
    Delivery {
        expected: expected_events(frequency_hz, attached),
        delivered: counters.events(),
        expected_idle,
        delivered_idle,
        tick_slack,
        idle_apart: idle.is_some(),
        cpus,
        runs,
    }
}

/// The attached CPUs' idle time since a reading, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTime {
    pub time: Duration,
    /// The unit /proc/stat counts in (`USER_HZ`), for the reckoning's slack.
    pub ticks_per_second: u64,
}

/// Idle ticks (`idle` + `iowait` in /proc/stat) of a set of CPUs, read now and
/// then to tell their idle time in between.
#[derive(Clone, Debug)]
pub struct IdleClock {
    cpus: Vec<u32>,
    /// At the first reading, per CPU of `cpus`; `None` if /proc/stat was unreadable.
    start: Option<Vec<u64>>,
    ticks_per_second: u64,
}

impl IdleClock {
    /// Starts counting the idle time of `cpus` from now.
    pub fn start(cpus: &[u32]) -> IdleClock {
        // SAFETY: a plain libc call.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let cpus = cpus.to_vec();
        IdleClock {
            start: read_idle_ticks(&cpus).ok(),
            cpus,
            ticks_per_second: u64::try_from(ticks).unwrap_or(100).max(1),
        }
    }

    /// The idle ticks of the CPUs now, for [`IdleClock::since_start`]; `None` if
    /// /proc/stat is unreadable or lacks one of them (offline).
    pub fn read(&self) -> Option<Vec<u64>> {
        read_idle_ticks(&self.cpus).ok()
    }

    /// The CPUs' idle time from the start to the reading `now`.
    pub fn since_start(&self, now: &[u64]) -> Option<IdleTime> {
        let start = self.start.as_ref()?;
        if start.len() != now.len() {
            return None;
        }
        let ticks: u64 = now
            .iter()
            .zip(start)
            .map(|(now, then)| now.saturating_sub(*then))
            .sum();
        let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(self.ticks_per_second);
        Some(IdleTime {
            time: Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)),
            ticks_per_second: self.ticks_per_second,
        })
    }
}

/// Idle ticks of `cpus` (in their order) from /proc/stat.
fn read_idle_ticks(cpus: &[u32]) -> io::Result<Vec<u64>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    parse_idle_ticks(&stat, cpus).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/stat lacks a CPU's idle time",
        )
    })
}

/// The `idle` + `iowait` columns of the `cpuN` lines of a /proc/stat text, for
/// `cpus` in their order; `None` if a CPU has no line or a malformed one.
pub fn parse_idle_ticks(stat: &str, cpus: &[u32]) -> Option<Vec<u64>> {
    let mut found: Vec<Option<u64>> = vec![None; cpus.len()];
    for line in stat.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(id) = fields
            .next()
            .and_then(|name| name.strip_prefix("cpu"))
            .filter(|id| !id.is_empty())
            .and_then(|id| id.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(slot) = cpus.iter().position(|&cpu| cpu == id) else {
            continue;
        };
        // user nice system idle iowait ...; iowait is absent on very old kernels.
        let mut columns = fields.skip(3).map(str::parse::<u64>);
        let idle = columns.next()?.ok()?;
        let iowait = match columns.next() {
            Some(value) => value.ok()?,
            None => 0,
        };
        found[slot] = Some(idle.saturating_add(iowait));
    }
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected events are the frequency times the attached time summed over CPUs,
    /// in whole periods of the kernel's `NSEC_PER_SEC / frequency` ns (at least
    /// 10 us); the tolerance is 1 % of them, at least 2 per CPU.
    #[test]
    fn expected_events_and_their_tolerance() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        // Two CPUs attached one second apart, read 10 s after the first: 19 s.
        let two_cpus = attached_time(&[t0, t0 + secs(1)], t0 + secs(10));
        assert_eq!(two_cpus, secs(19));
        // 97 Hz is a period of 10 309 278 ns: 19 s hold 1 843 whole periods.
        assert_eq!(expected_events(97, two_cpus), 1_843);
        assert_eq!(expected_events(97, secs(20)), 1_940);
        assert_eq!(expected_events(997, secs(1)), 997);
        assert_eq!(expected_events(97, Duration::from_millis(10)), 0);
        // Past 100 kHz the kernel's timer still ticks every 10 us.
        assert_eq!(expected_events(1_000_000, secs(1)), 100_000);
        assert_eq!(expected_events(0, secs(1)), 0);
        // An instant before a CPU's attach counts nothing for it.
        assert_eq!(attached_time(&[t0 + secs(5)], t0), Duration::ZERO);

        let delivery = |expected, delivered, cpus| Delivery {
            expected,
            delivered,
            cpus,
            ..Delivery::default()
        };
        // 1 %: 19 of 1 940 are the edges; 20 missing is a shortfall.
        assert_eq!(delivery(1_940, 1_921, 2).tolerance(), 19);
        assert!(!delivery(1_940, 1_921, 2).short());
        assert!(delivery(1_940, 1_920, 2).short());
        assert_eq!(delivery(1_940, 1_920, 2).missing(), 20);
        // At least 2 per CPU: short recordings on many CPUs.
        assert_eq!(delivery(190, 62, 64).tolerance(), 128);
        assert!(!delivery(190, 62, 64).short());
        assert!(delivery(190, 61, 64).short());
        // More than expected is not a shortfall.
        assert!(!delivery(100, 104, 2).short());
        assert_eq!(delivery(0, 0, 2).percent(), 100.0);
        assert!((delivery(1_940, 1_921, 2).percent() - 99.02).abs() < 0.01);

        // An interval's figures are the differences of two readings.
        let earlier = Delivery {
            runs: Some(900),
            expected_idle: 300,
            delivered_idle: 10,
            tick_slack: 4,
            ..delivery(1_000, 990, 2)
        };
        let later = Delivery {
            runs: Some(2_900),
            expected_idle: 700,
            delivered_idle: 30,
            tick_slack: 4,
            ..delivery(3_000, 2_950, 2)
        };
        assert_eq!(
            later.since(&earlier),
            Delivery {
                runs: Some(2_000),
                expected_idle: 400,
                delivered_idle: 20,
                tick_slack: 4,
                ..delivery(2_000, 1_960, 2)
            }
        );
    }

    /// A 97 Hz reckoning on 2 CPUs attached `attached` seconds in all, `idle` of
    /// them idle (on a 100 Hz clock; `None`: not reckoned apart), of `emitted`
    /// samples and `idle_task` events of the idle task.
    fn reckon_97hz(attached: u64, idle: Option<u64>, emitted: u64, idle_task: u64) -> Delivery {
        let mut counters = KernelCounters::default();
        counters.values[Counter::Emitted as usize] = emitted;
        counters.values[Counter::IdleSkipped as usize] = idle_task;
        let idle = idle.map(|secs| IdleTime {
            time: Duration::from_secs(secs),
            ticks_per_second: 100,
        });
        reckon(97, Duration::from_secs(attached), idle, &counters, 2, None)
    }

    /// Reckoned on busy time, events that did not come while a CPU was idle are
    /// missed while idle, not missing; those that did not come while busy still
    /// are, and only they make a shortfall.
    #[test]
    fn idle_time_is_reckoned_apart() {
        // 2 CPUs for 5 s at 97 Hz (970 expected); CPU 1 idle throughout, its timer
        // never fired; CPU 0 idle too but delivering (486 idle-task events).
        let d = reckon_97hz(10, Some(10), 0, 486);
        assert_eq!((d.expected, d.delivered, d.expected_idle), (970, 486, 970));
        assert_eq!(d.missing(), 0);
        assert_eq!(d.missed_while_idle(), 484);
        assert!(!d.short());
        // 2 ticks per CPU at 97 Hz on a 100 Hz clock (2 events each); no busy
        // time, so nothing for its 10 %.
        assert_eq!(d.tick_slack, 4);
        assert_eq!(d.tolerance(), 9 + 4);

        // Not reckoned apart (--include-idle): the same events are a shortfall.
        let whole = reckon_97hz(10, None, 0, 486);
        assert_eq!((whole.missing(), whole.missed_while_idle()), (484, 0));
        assert!(whole.short());

        // Both CPUs busy 5 s, and half the events never came (perf throttling):
        // idle time explains none of them.
        let d = reckon_97hz(10, Some(0), 485, 0);
        assert_eq!((d.missing(), d.missed_while_idle()), (485, 0));
        assert!(d.short());

        // One CPU busy and losing half its events, the other idle and delivering
        // them: the idle CPU's events do not hide the busy one's loss.
        let d = reckon_97hz(10, Some(5), 242, 485);
        assert_eq!(d.missing(), 243);
        assert!(d.short());

        // A mostly idle host (90 % of 20 s of CPU time idle) whose busy CPUs lost
        // 80 of their 194 events: the slack is 10 % of the busy events, not of the
        // idle ones (174, which would hide the loss).
        let d = reckon_97hz(20, Some(18), 114, 1_746);
        assert_eq!((d.expected, d.expected_idle), (1_940, 1_746));
        assert_eq!(d.missing(), 80);
        assert_eq!(d.tolerance(), 19 + 4 + 194 / 10);
        assert!(d.short());

        // An interval's tolerance is the interval's: the 10 % part follows the
        // events of the interval, not those since attach.
        let later = Delivery {
            expected: 1_940 + 1_940,
            delivered: 1_860 + 1_940,
            expected_idle: 1_746 + 970,
            delivered_idle: 1_746 + 970,
            ..d
        };
        let interval = later.since(&d);
        assert_eq!(interval.tolerance(), 19 + 4 + 970 / 10);
        assert!(!interval.short());
    }

    /// /proc/stat's per-CPU lines give idle + iowait, in the order asked; the
    /// summary line and other lines are not CPUs; a missing or malformed CPU is
    /// `None`.
    #[test]
    fn idle_ticks_from_proc_stat() {
        let stat = "\
cpu  100 0 50 9000 30 0 5 0 0 0
cpu0 60 0 30 4000 10 0 3 0 0 0
cpu1 40 0 20 5000 20 0 2 0 0 0
intr 123 0 0
ctxt 456
cpuidle 7
";
        assert_eq!(parse_idle_ticks(stat, &[0, 1]), Some(vec![4010, 5020]));
        assert_eq!(parse_idle_ticks(stat, &[1, 0]), Some(vec![5020, 4010]));
        assert_eq!(parse_idle_ticks(stat, &[]), Some(vec![]));
        assert_eq!(parse_idle_ticks(stat, &[2]), None);
        assert_eq!(parse_idle_ticks("cpu0 1 2 3 x 5\n", &[0]), None);
        assert_eq!(parse_idle_ticks("cpu0 1 2 3\n", &[0]), None);
        // Before iowait existed.
        assert_eq!(parse_idle_ticks("cpu0 1 2 3 4\n", &[0]), Some(vec![4]));
    }

    /// The clock reads this machine's CPUs, and an idle second shows as idle time
    /// of at most a second per CPU.
    #[test]
    fn idle_clock_reads_this_machine() {
        let cpus: Vec<u32> = aya::util::online_cpus().expect("online CPUs");
        let clock = IdleClock::start(&cpus);
        std::thread::sleep(Duration::from_millis(300));
        let now = clock.read().expect("/proc/stat has every online CPU");
        let idle = clock.since_start(&now).expect("started");
        assert!(
            idle.time <= Duration::from_millis(400) * cpus.len() as u32,
            "{idle:?} on {} CPUs",
            cpus.len()
        );
    }
}
