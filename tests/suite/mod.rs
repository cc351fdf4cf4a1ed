mod agent;
mod native;
mod pprof;
