//! `profiler`: see `profiler --help`. All logic lives in the library.

fn main() {
    std::process::exit(profiler::cli::main(std::env::args_os()));
}
