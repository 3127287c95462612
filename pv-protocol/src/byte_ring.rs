//! Byte rings: the stream rings of the PV console and the config store (Xen's `xencons_interface`
//! and `xenstore_domain_interface`).
//!
//! A byte ring is a power-of-two data array plus a consumer and a producer index (free-running
//! `u32`s) in the same shared page. Each endpoint keeps its own index privately and only writes it
//! to shared memory; the peer's index is read, validated (`prod - cons <= size`, else the ring is
//! broken) and never trusted further.

use core::sync::atomic::Ordering;

use crate::shared::{RegionError, SharedRegion};

/// Errors from byte-ring endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ByteRingError {
    /// The layout does not fit the region, or its size is not a power of two.
    #[error("bad byte-ring layout")]
    Layout(#[from] RegionError),
    /// The data size is zero or not a power of two.
    #[error("byte-ring size {0} is not a power of two")]
    BadSize(u32),
    /// The peer published an index that puts more than `size` bytes in the ring: broken.
    #[error("peer's index {peer:#x} is invalid against ours {ours:#x} (ring of {size} bytes)")]
    IndexOverrun {
        /// The peer's published index.
        peer: u32,
        /// Our own index.
        ours: u32,
        /// Ring size.
        size: u32,
    },
}

/// Where one byte ring lives inside its interface page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRingLayout {
    /// Offset of the data array.
    pub data: usize,
    /// Size of the data array (a power of two).
    pub size: u32,
    /// Offset of the consumer index.
    pub cons: usize,
    /// Offset of the producer index.
    pub prod: usize,
}

#[derive(Debug)]
struct Ring<'a> {
    region: SharedRegion<'a>,
    layout: ByteRingLayout,
    /// Our own index (producer's `prod` or consumer's `cons`).
    ours: u32,
    broken: Option<ByteRingError>,
}

impl<'a> Ring<'a> {
    fn new(region: SharedRegion<'a>, layout: ByteRingLayout, own_index: usize) -> Result<Self> {
        if !layout.size.is_power_of_two() {
            return Err(ByteRingError::BadSize(layout.size));
        }
        // Validates both index offsets (bounds and alignment) and the data array once; the
        // accessors below re-check, but these make a bad layout fail at attach time.
        region.load_u32(layout.cons, Ordering::Relaxed)?;
        let mut probe = [0u8; 1];
        region.read(layout.data + layout.size as usize - 1, &mut probe)?;
        // Relaxed: our own index, read once at attach to resume where the ring stands.
        let ours = region.load_u32(own_index, Ordering::Relaxed)?;
        Ok(Self {
            region,
            layout,
            ours,
            broken: None,
        })
    }

    /// Loads and validates the peer's index; `used` is how many bytes are in the ring.
    fn peer(&mut self, at: usize, used: fn(ours: u32, peer: u32) -> u32) -> Result<u32> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        // Acquire: for a consumer, data bytes written before the producer's release of `prod`;
        // for a producer, the consumer's reads completed before its release of `cons`.
        let peer = self.region.load_u32(at, Ordering::Acquire)?;
        let used = used(self.ours, peer);
        if used > self.layout.size {
            let e = ByteRingError::IndexOverrun {
                peer,
                ours: self.ours,
                size: self.layout.size,
            };
            self.broken = Some(e);
            return Err(e);
        }
        Ok(used)
    }

    /// The (up to two) contiguous data spans starting at ring index `at`, `len` bytes in all.
    fn spans(&self, at: u32, len: usize) -> [(usize, usize); 2] {
        let start = (at & (self.layout.size - 1)) as usize;
        let first = len.min(self.layout.size as usize - start);
        [
            (self.layout.data + start, first),
            (self.layout.data, len - first),
        ]
    }
}

/// Result alias for byte-ring operations.
pub type Result<T> = core::result::Result<T, ByteRingError>;

/// The writing end of a byte ring.
#[derive(Debug)]
pub struct ByteRingProducer<'a> {
    ring: Ring<'a>,
}

impl<'a> ByteRingProducer<'a> {
    /// Attaches as the producer; resumes at the producer index currently in shared memory.
    pub fn new(region: SharedRegion<'a>, layout: ByteRingLayout) -> Result<Self> {
        Ok(Self {
            ring: Ring::new(region, layout, layout.prod)?,
        })
    }

    /// Bytes that can be written now.
    pub fn free(&mut self) -> Result<usize> {
        let cons = self.ring.layout.cons;
        let used = self.ring.peer(cons, |prod, cons| prod.wrapping_sub(cons))?;
        Ok((self.ring.layout.size - used) as usize)
    }

    /// Writes as much of `data` as fits and publishes it; returns the number of bytes written.
    /// The caller notifies the peer when this returns more than zero.
    pub fn write(&mut self, data: &[u8]) -> Result<usize> {
        let n = self.free()?.min(data.len());
        let mut done = 0;
        for (off, len) in self.ring.spans(self.ring.ours, n) {
            self.ring.region.write(off, &data[done..done + len])?;
            done += len;
        }
        self.ring.ours = self.ring.ours.wrapping_add(n as u32);
        // Release: the consumer must see the data bytes before the new producer index.
        self.ring
            .region
            .store_u32(self.ring.layout.prod, self.ring.ours, Ordering::Release)?;
        Ok(n)
    }
}

/// The reading end of a byte ring.
#[derive(Debug)]
pub struct ByteRingConsumer<'a> {
    ring: Ring<'a>,
}

impl<'a> ByteRingConsumer<'a> {
    /// Attaches as the consumer; resumes at the consumer index currently in shared memory.
    pub fn new(region: SharedRegion<'a>, layout: ByteRingLayout) -> Result<Self> {
        Ok(Self {
            ring: Ring::new(region, layout, layout.cons)?,
        })
    }

    /// Bytes waiting to be read.
    pub fn available(&mut self) -> Result<usize> {
        let prod = self.ring.layout.prod;
        let used = self.ring.peer(prod, |cons, prod| prod.wrapping_sub(cons))?;
        Ok(used as usize)
    }

    /// Reads up to `buf.len()` bytes (each copied out once) and frees their space; returns the
    /// number of bytes read. The caller notifies the peer when this returns more than zero.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = self.available()?.min(buf.len());
        let mut done = 0;
        for (off, len) in self.ring.spans(self.ring.ours, n) {
            self.ring.region.read(off, &mut buf[done..done + len])?;
            done += len;
        }
        self.ring.ours = self.ring.ours.wrapping_add(n as u32);
        // Release: our reads of the data must complete before the producer sees the space free.
        self.ring
            .region
            .store_u32(self.ring.layout.cons, self.ring.ours, Ordering::Release)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LAYOUT: ByteRingLayout = ByteRingLayout {
        data: 0,
        size: 16,
        cons: 16,
        prod: 20,
    };

    #[repr(align(8))]
    struct Page([u8; 24]);

    #[test]
    fn bytes_wrap_around_in_order() {
        let mut page = Page([0; 24]);
        let region = SharedRegion::from_mut_slice(&mut page.0).unwrap();
        let mut tx = ByteRingProducer::new(region, LAYOUT).unwrap();
        let mut rx = ByteRingConsumer::new(region, LAYOUT).unwrap();
        let mut next = 0u8;
        let mut expect = 0u8;
        for round in 0..50 {
            let chunk: [u8; 11] = core::array::from_fn(|_| {
                next = next.wrapping_add(1);
                next
            });
            let n = tx.write(&chunk).unwrap();
            next = next.wrapping_sub((11 - n) as u8);
            let mut buf = [0u8; 16];
            let got = rx.read(&mut buf[..(round % 16) + 1]).unwrap();
            for b in &buf[..got] {
                expect = expect.wrapping_add(1);
                assert_eq!(*b, expect);
            }
        }
    }

    #[test]
    fn full_ring_accepts_nothing_more() {
        let mut page = Page([0; 24]);
        let region = SharedRegion::from_mut_slice(&mut page.0).unwrap();
        let mut tx = ByteRingProducer::new(region, LAYOUT).unwrap();
        assert_eq!(tx.write(&[7; 40]).unwrap(), 16);
        assert_eq!(tx.write(&[7; 40]).unwrap(), 0);
    }

    #[test]
    fn non_power_of_two_size_is_refused() {
        let mut page = Page([0; 24]);
        let region = SharedRegion::from_mut_slice(&mut page.0).unwrap();
        let layout = ByteRingLayout { size: 12, ..LAYOUT };
        assert_eq!(
            ByteRingConsumer::new(region, layout).unwrap_err(),
            ByteRingError::BadSize(12)
        );
        let layout = ByteRingLayout { data: 16, ..LAYOUT };
        assert!(matches!(
            ByteRingConsumer::new(region, layout),
            Err(ByteRingError::Layout(_))
        ));
    }

    proptest! {
        /// Whatever the peer writes into the indices, the endpoints never panic, never read or
        /// write more than the ring holds, and report an overrun once a bound is broken.
        #[test]
        fn hostile_indices_are_reported_not_obeyed(prod in any::<u32>(), cons in any::<u32>()) {
            let mut page = Page([0; 24]);
            let region = SharedRegion::from_mut_slice(&mut page.0).unwrap();
            let mut rx = ByteRingConsumer::new(region, LAYOUT).unwrap();
            let mut tx = ByteRingProducer::new(region, LAYOUT).unwrap();
            region.store_u32(LAYOUT.prod, prod, Ordering::Relaxed).unwrap();
            let mut buf = [0u8; 64];
            match rx.read(&mut buf) {
                Ok(n) => prop_assert!(n <= 16 && prod <= 16 && n == prod as usize),
                Err(ByteRingError::IndexOverrun { peer, .. }) => {
                    prop_assert_eq!(peer, prod);
                    prop_assert!(prod > 16);
                    prop_assert!(rx.read(&mut buf).is_err(), "a broken ring stays broken");
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
            region.store_u32(LAYOUT.cons, cons, Ordering::Relaxed).unwrap();
            // The producer's own index is 0: it may write `16 - (0 - cons)` bytes when that is
            // within bounds, i.e. the consumer claims to be 0..=16 behind.
            match tx.write(&buf) {
                Ok(n) => prop_assert!(cons.wrapping_neg() <= 16 && n == 16 - cons.wrapping_neg() as usize),
                Err(ByteRingError::IndexOverrun { .. }) => prop_assert!(cons.wrapping_neg() > 16),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
