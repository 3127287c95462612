//! Splitvisor tools: the `ringbench` workload and what the benchmark binaries share (the
//! benchmarks and the soak test are the crate's binaries; the `xl` CLI and its control-socket
//! client are package `splitvisor-xl`).
#![deny(missing_docs)]

pub mod results;
pub mod ringbench;
