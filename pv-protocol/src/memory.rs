//! Memory reservation, after Xen's `public/memory.h`: a domain gives pages of its memory back to
//! the host (a balloon going down) and takes pages back (a balloon going up).
//!
//! `memory_op(cmd, arg)` ([`crate::hypercall::nr::MEMORY_OP`]):
//!
//! | cmd | `arg` | result |
//! |---|---|---|
//! | [`cmd::DECREASE_RESERVATION`] | a [`MemoryReservation`] | frames given back |
//! | [`cmd::POPULATE_PHYSMAP`] | a [`MemoryReservation`] | frames populated |
//! | [`cmd::CURRENT_RESERVATION`] | a `u16` domain id ([`crate::grant::DomId::SELF`]) | pages the domain holds |
//! | [`cmd::MAXIMUM_RESERVATION`] | a `u16` domain id | pages it may hold at most |
//!
//! A [`MemoryReservation`] names a guest buffer of `nr_extents` little-endian `u64` guest frame
//! numbers (Xen's `xen_pfn_t`; frame = guest-physical address / 4096). The hypervisor copies the
//! argument and the whole list out once, handles the frames in order and stops at the first it
//! refuses: the result is how many were done (Xen's rule), and when the very first one is refused,
//! the negative errno saying why. So a guest that gets fewer than it asked for asks again for the
//! rest and learns the reason.
//!
//! Only single pages (`extent_order == 0`) and no `mem_flags` are accepted, and at most
//! [`MAX_EXTENTS`] frames per call (one page of frame numbers, as Linux's balloon sends).
//!
//! Which frames a guest may give back: its ordinary RAM, at or above
//! [`crate::start_info::KERNEL_MIN_LOAD`] (below lie start-info, shared-info, the rings, the
//! hypercall and VIF pages and the grant table), that it holds now, and that no other domain has
//! mapped through a grant. Which it may populate: frames of its physical map
//! ([`crate::start_info::StartInfo::max_mem_bytes`]) that it does not hold, while it holds fewer
//! pages than its maximum reservation. Errors (each refusal is counted by the host):
//!
//! | errno | why |
//! |---|---|
//! | `E2BIG` | more than [`MAX_EXTENTS`] frames |
//! | `EINVAL` | an order or flags other than 0; a frame outside the physical map |
//! | `EPERM` | another domain named; a frame below the kernel's load address |
//! | `EFAULT` | the argument or the list is not in guest memory |
//! | `ENOENT` | decrease: a frame the domain does not hold (given back already, twice in a list) |
//! | `EBUSY` | decrease: a frame another domain has mapped through a grant |
//! | `EEXIST` | populate: a frame the domain holds already |
//! | `ENOMEM` | populate: the domain holds its maximum reservation |
//!
//! A frame given back is unbacked: the host frees its memory (a hole in the domain's memfd). A
//! guest that touches it again before populating it gets a zero page for a while, but the host
//! notices (the domain's memory then exceeds what it holds), counts it and frees the page again,
//! discarding what the guest wrote: see `hypervisor::reservation`.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::grant::DomId;
use crate::hypercall::{Errno, Gpa};

/// Most frames one call may name.
pub const MAX_EXTENTS: u32 = 512;

/// `memory_op` sub-operations (Xen's `XENMEM_*`).
pub mod cmd {
    /// Xen's `XENMEM_increase_reservation` (not offered: use [`POPULATE_PHYSMAP`]).
    pub const INCREASE_RESERVATION: u64 = 0;
    /// Gives the listed frames back.
    pub const DECREASE_RESERVATION: u64 = 1;
    /// Pages the domain holds.
    pub const CURRENT_RESERVATION: u64 = 3;
    /// Pages the domain may hold at most.
    pub const MAXIMUM_RESERVATION: u64 = 4;
    /// Backs the listed frames with memory again.
    pub const POPULATE_PHYSMAP: u64 = 6;
}

/// The `memory_op` sub-operations offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryCmd {
    /// Give frames back; a [`MemoryReservation`] at `arg`.
    DecreaseReservation {
        /// Argument address.
        arg: Gpa,
    },
    /// Take frames back; a [`MemoryReservation`] at `arg`.
    PopulatePhysmap {
        /// Argument address.
        arg: Gpa,
    },
    /// Pages held; a `u16` domain id at `arg`.
    CurrentReservation {
        /// Argument address.
        arg: Gpa,
    },
    /// Most pages the domain may hold; a `u16` domain id at `arg`.
    MaximumReservation {
        /// Argument address.
        arg: Gpa,
    },
}

impl MemoryCmd {
    /// Decodes `cmd` and `arg`; `None` for a sub-op not offered.
    pub const fn from_args(cmd: u64, arg: u64) -> Option<Self> {
        let arg = Gpa(arg);
        Some(match cmd {
            cmd::DECREASE_RESERVATION => Self::DecreaseReservation { arg },
            cmd::POPULATE_PHYSMAP => Self::PopulatePhysmap { arg },
            cmd::CURRENT_RESERVATION => Self::CurrentReservation { arg },
            cmd::MAXIMUM_RESERVATION => Self::MaximumReservation { arg },
            _ => return None,
        })
    }

    /// `(cmd, arg)` for the request block.
    pub const fn to_args(self) -> (u64, u64) {
        match self {
            Self::DecreaseReservation { arg } => (cmd::DECREASE_RESERVATION, arg.0),
            Self::PopulatePhysmap { arg } => (cmd::POPULATE_PHYSMAP, arg.0),
            Self::CurrentReservation { arg } => (cmd::CURRENT_RESERVATION, arg.0),
            Self::MaximumReservation { arg } => (cmd::MAXIMUM_RESERVATION, arg.0),
        }
    }
}

/// Xen's `struct xen_memory_reservation` (64-bit layout).
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct MemoryReservation {
    /// Guest address of `nr_extents` `u64` frame numbers.
    pub extent_start: u64,
    /// How many.
    pub nr_extents: u64,
    /// Pages per extent, as a power of two: must be 0.
    pub extent_order: u32,
    /// Must be 0.
    pub mem_flags: u32,
    /// [`DomId::SELF`] or the domain's own id.
    pub domid: u16,
    /// Zero.
    pub _pad: [u16; 3],
}

const _: () = assert!(size_of::<MemoryReservation>() == 32);
const _: () = assert!(offset_of!(MemoryReservation, extent_start) == 0);
const _: () = assert!(offset_of!(MemoryReservation, nr_extents) == 8);
const _: () = assert!(offset_of!(MemoryReservation, extent_order) == 16);
const _: () = assert!(offset_of!(MemoryReservation, mem_flags) == 20);
const _: () = assert!(offset_of!(MemoryReservation, domid) == 24);
const _: () = assert!(offset_of!(MemoryReservation, _pad) == 26);

/// Why a [`MemoryReservation`] is refused before any frame is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryOpError {
    /// More than [`MAX_EXTENTS`] frames.
    #[error("{0} frames in one call (at most {MAX_EXTENTS})")]
    TooMany(u64),
    /// An extent order other than 0.
    #[error("extent order {0} (only single pages)")]
    BadOrder(u32),
    /// Flags other than 0.
    #[error("memory flags {0:#x}")]
    BadFlags(u32),
}

impl MemoryOpError {
    /// The errno a guest gets for this error.
    pub const fn errno(&self) -> Errno {
        match self {
            Self::TooMany(_) => Errno::E2BIG,
            Self::BadOrder(_) | Self::BadFlags(_) => Errno::EINVAL,
        }
    }
}

/// A checked [`MemoryReservation`]: the frame list is still to be copied (`count * 8` bytes at
/// `frames`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Address of the frame list.
    pub frames: Gpa,
    /// Frames in it, at most [`MAX_EXTENTS`].
    pub count: u32,
    /// The domain named (the handler checks it is the caller).
    pub domid: DomId,
}

impl Reservation {
    /// Validates the argument struct.
    pub fn parse(raw: &MemoryReservation) -> Result<Self, MemoryOpError> {
        let count = u32::try_from(raw.nr_extents)
            .ok()
            .filter(|&n| n <= MAX_EXTENTS)
            .ok_or(MemoryOpError::TooMany(raw.nr_extents))?;
        if raw.extent_order != 0 {
            return Err(MemoryOpError::BadOrder(raw.extent_order));
        }
        if raw.mem_flags != 0 {
            return Err(MemoryOpError::BadFlags(raw.mem_flags));
        }
        Ok(Self {
            frames: Gpa(raw.extent_start),
            count,
            domid: DomId(raw.domid),
        })
    }

    /// Serialises the argument struct.
    pub fn to_raw(&self) -> MemoryReservation {
        MemoryReservation {
            extent_start: self.frames.0,
            nr_extents: u64::from(self.count),
            extent_order: 0,
            mem_flags: 0,
            domid: self.domid.0,
            _pad: [0; 3],
        }
    }
}

/// The store key (under the domain's home) where the toolstack puts the balloon's target, in
/// KiB, as Xen's toolstack does.
pub const TARGET_KEY: &str = "memory/target";
/// The store key (under the domain's home) with the most the target may be, in KiB (xl.cfg's
/// `maxmem`; libxl's `memory/static-max`).
pub const STATIC_MAX_KEY: &str = "memory/static-max";
/// The store key (under the domain's home) where a balloon reports what it holds, in KiB.
pub const CURRENT_KEY: &str = "memory/current";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits_are_checked_with_their_errno() {
        let ok = MemoryReservation {
            extent_start: 0x5000,
            nr_extents: 512,
            domid: DomId::SELF.0,
            ..Default::default()
        };
        assert_eq!(
            Reservation::parse(&ok),
            Ok(Reservation {
                frames: Gpa(0x5000),
                count: 512,
                domid: DomId::SELF
            })
        );
        let e = Reservation::parse(&MemoryReservation {
            nr_extents: 513,
            ..ok
        })
        .unwrap_err();
        assert_eq!((e, e.errno()), (MemoryOpError::TooMany(513), Errno::E2BIG));
        let e = Reservation::parse(&MemoryReservation {
            nr_extents: u64::MAX,
            ..ok
        })
        .unwrap_err();
        assert_eq!(e.errno(), Errno::E2BIG);
        let e = Reservation::parse(&MemoryReservation {
            extent_order: 9,
            ..ok
        })
        .unwrap_err();
        assert_eq!((e, e.errno()), (MemoryOpError::BadOrder(9), Errno::EINVAL));
        let e = Reservation::parse(&MemoryReservation { mem_flags: 1, ..ok }).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert_eq!(MemoryCmd::from_args(cmd::INCREASE_RESERVATION, 0), None);
    }

    proptest! {
        #[test]
        fn arbitrary_arguments_never_panic(b in any::<[u8; 32]>()) {
            let raw = MemoryReservation::read_from_bytes(&b[..]).unwrap();
            if let Err(e) = Reservation::parse(&raw) {
                let _ = e.errno();
            }
        }

        #[test]
        fn valid_arguments_round_trip(at in any::<u64>(), n in 0..=MAX_EXTENTS, d in any::<u16>()) {
            let r = Reservation { frames: Gpa(at), count: n, domid: DomId(d) };
            prop_assert_eq!(Reservation::parse(&r.to_raw()), Ok(r));
        }

        #[test]
        fn commands_round_trip(c in 0u64..8, a in any::<u64>()) {
            if let Some(m) = MemoryCmd::from_args(c, a) {
                prop_assert_eq!(m.to_args(), (c, a));
            }
        }
    }
}
