//! Console shared page layout, after Xen's `public/io/console.h`.
//!
//! Two byte rings in one page: `out` carries the guest's output to the back end, `in_` carries
//! input to the guest. Drive them with [`crate::byte_ring`] endpoints over [`OUT_RING`] and
//! [`IN_RING`], which validate the peer's free-running indices.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::byte_ring::ByteRingLayout;

/// Bytes in the back-end-to-guest input ring (`in`).
pub const IN_RING_SIZE: usize = 1024;
/// Bytes in the guest-to-back-end output ring (`out`).
pub const OUT_RING_SIZE: usize = 2048;

/// The console interface page (first 3088 bytes of the shared page).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ConsoleInterface {
    /// Input ring: back end produces, guest consumes.
    pub in_: [u8; IN_RING_SIZE],
    /// Output ring: guest produces, back end consumes.
    pub out: [u8; OUT_RING_SIZE],
    /// Guest's consumer index into `in_`.
    pub in_cons: u32,
    /// Back end's producer index into `in_`.
    pub in_prod: u32,
    /// Back end's consumer index into `out`.
    pub out_cons: u32,
    /// Guest's producer index into `out`.
    pub out_prod: u32,
}

const _: () = assert!(size_of::<ConsoleInterface>() == 3088);
const _: () = assert!(offset_of!(ConsoleInterface, in_) == 0);
const _: () = assert!(offset_of!(ConsoleInterface, out) == 1024);
const _: () = assert!(offset_of!(ConsoleInterface, in_cons) == 3072);
const _: () = assert!(offset_of!(ConsoleInterface, in_prod) == 3076);
const _: () = assert!(offset_of!(ConsoleInterface, out_cons) == 3080);
const _: () = assert!(offset_of!(ConsoleInterface, out_prod) == 3084);
const _: () = assert!(size_of::<ConsoleInterface>() <= crate::PAGE_SIZE);
const _: () = assert!(IN_RING_SIZE.is_power_of_two() && OUT_RING_SIZE.is_power_of_two());

/// The guest-to-back-end output ring (guest produces).
pub const OUT_RING: ByteRingLayout = ByteRingLayout {
    data: offset_of!(ConsoleInterface, out),
    size: OUT_RING_SIZE as u32,
    cons: offset_of!(ConsoleInterface, out_cons),
    prod: offset_of!(ConsoleInterface, out_prod),
};

/// The back-end-to-guest input ring (back end produces).
pub const IN_RING: ByteRingLayout = ByteRingLayout {
    data: offset_of!(ConsoleInterface, in_),
    size: IN_RING_SIZE as u32,
    cons: offset_of!(ConsoleInterface, in_cons),
    prod: offset_of!(ConsoleInterface, in_prod),
};

impl Default for ConsoleInterface {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_interface_reads_from_a_zeroed_page() {
        let page = [0u8; crate::PAGE_SIZE];
        let (ci, _) = ConsoleInterface::read_from_prefix(&page[..]).unwrap();
        assert_eq!(ci, ConsoleInterface::default());
    }

    #[test]
    fn guest_output_reaches_the_back_end_through_the_out_ring() {
        use crate::byte_ring::{ByteRingConsumer, ByteRingProducer};
        let mut mem = crate::test_utils::RingMemory::new(1);
        let page = mem.region();
        let mut guest = ByteRingProducer::new(page, OUT_RING).unwrap();
        let mut back = ByteRingConsumer::new(page, OUT_RING).unwrap();
        assert_eq!(guest.write(b"hello, dom0\n").unwrap(), 12);
        let mut buf = [0u8; 64];
        let n = back.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello, dom0\n");
        assert_eq!(
            page.load_u32(3084, core::sync::atomic::Ordering::Relaxed)
                .unwrap(),
            12
        );
        assert_eq!(
            page.load_u32(3080, core::sync::atomic::Ordering::Relaxed)
                .unwrap(),
            12
        );
    }
}
