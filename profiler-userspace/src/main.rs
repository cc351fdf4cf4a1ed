//! `profiler`: see `profiler --help`. All logic lives in the library.

/// glibc malloc arenas the process may use. By default every thread that allocates
/// may get one of its own (up to 8 per CPU), and memory freed in one arena is not
/// reused by the others: the agent's handful of threads (drain, capture, cycle,
/// exporter, blocking pool) each kept their own high-water mark. Two arenas cost
/// nothing measurable in contention at our allocation rate. Measured (README): the
/// agent's peak RSS through bench/agent_outage.py went from 44.2 to 39.6 MiB, and
/// through bench/churn.py from 43.8 to 39.6 MiB. An explicit MALLOC_ARENA_MAX in the
/// environment wins.
const MALLOC_ARENAS: libc::c_int = 2;

fn main() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before any other thread exists; mallopt only tunes malloc.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
    }
    std::process::exit(profiler::cli::main(std::env::args_os()));
}
