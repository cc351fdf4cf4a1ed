mod agent;
mod native;
mod pprof;
mod runtimes;
mod supervise;
