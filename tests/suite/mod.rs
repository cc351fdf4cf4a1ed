mod agent;
mod native;
mod pprof;
mod supervise;
