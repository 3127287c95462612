//! The Splitvisor wire ABI.
//!
//! Everything two trust domains exchange is defined here: the Xen-style shared request/response
//! ring ([`ring`]) and byte rings ([`byte_ring`]), and the messages that travel over them. The
//! hypervisor, the dom0 back-ends, the Rust guest kernel and (through a generated C header) the
//! Linux front-end modules all build on this crate, so it is `no_std` and knows nothing of KVM.
//!
//! Everything read from shared memory is hostile: rings copy each entry out once and validate the
//! peer's indices; message types come as raw `#[repr(C)]` wire structs plus checked parsers.
#![no_std]
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

#[cfg(feature = "std")]
extern crate std;

pub mod blkif;
pub mod byte_ring;
pub mod console;
pub mod evtchn;
pub mod fixed;
pub mod grant;
pub mod hypercall;
pub mod inet;
pub mod memory;
pub mod netif;
pub mod platform;
pub mod ring;
pub mod shared;
pub mod start_info;
pub mod store;
#[cfg(feature = "test-utils")]
pub mod test_utils;

pub use ring::{BackRing, FrontRing, RingError, RingProtocol};
pub use shared::{RegionError, SharedRegion};

/// Size of a guest page and of a grant, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Size of a disk sector as the block protocol counts them, in bytes.
pub const SECTOR_SIZE: u64 = 512;
