//! Splitvisor tools: the `ringbench` workload (and, in a later issue, the `xl` CLI).
#![deny(missing_docs)]

pub mod ringbench;
