mod native;
mod pprof;
