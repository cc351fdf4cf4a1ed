//! `profiler`: see `profiler --help`. All logic lives in the library.

fn main() {
    profiler::memory::tune_allocator();
    std::process::exit(profiler::cli::main(std::env::args_os()));
}
