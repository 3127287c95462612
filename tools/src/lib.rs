//! Splitvisor tools: the `ringbench` workload and what the benchmark binaries share (the `xl`
//! CLI and the benchmarks are the crate's binaries).
#![deny(missing_docs)]

pub mod client;
pub mod results;
pub mod ringbench;
