//! Splitvisor's `xl` CLI package: the binary, and the control-socket client it uses ([`client`]),
//! which the benchmarks and the soak test (package `splitvisor-tools`) share. It depends on the
//! light API crate alone: no KVM, io_uring or guest memory in its dependency tree.
#![deny(missing_docs)]

pub mod client;
