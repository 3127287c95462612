//! The guest kernel's network stack (`kernel/src/net.rs`), tested on the host: the kernel binary
//! cannot run a test harness (its link script places it at 2 MiB), and the stack is pure (only
//! `core` and pv-protocol), so its own unit tests run here, in `cargo test --workspace`.
#![allow(dead_code, missing_docs, clippy::undocumented_unsafe_blocks)]

#[path = "../kernel/src/net.rs"]
mod net;
