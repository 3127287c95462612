//! Memory shared with another domain: the one place in this crate that touches raw pointers.
//!
//! A [`SharedRegion`] names a span of memory that the other side of a ring may write at any moment,
//! including while we read it. Every access therefore goes through an atomic load or store (relaxed
//! for payload bytes, with the ordering supplied by the ring's producer/consumer indices), which is
//! well defined under Rust's memory model even when a hostile peer races with us, and compiles to
//! plain moves on x86-64. Plain references (`&[u8]`) into the region are never created.
//!
//! Bounds are checked by the public accessors. The ring code validates its geometry once, when an
//! endpoint is created, and then uses the crate-private unchecked accessors on offsets it derives
//! from that geometry.

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Errors from building or accessing a [`SharedRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// The base pointer is null or not 8-byte aligned.
    #[error("shared region base {0:#x} is null or not 8-byte aligned")]
    Misaligned(usize),
    /// An access falls (partly) outside the region.
    #[error("access of {len} bytes at offset {offset:#x} is outside a region of {size} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A 32-bit index access at an offset that is not 4-byte aligned.
    #[error("32-bit access at unaligned offset {0:#x}")]
    UnalignedIndex(usize),
}

/// A span of memory shared with a peer that may modify it concurrently.
///
/// `Copy`: both endpoints of a ring in one process (tests, the benchmark) hold a copy of the same
/// region. The lifetime `'a` ties the region to whatever keeps the memory mapped.
#[derive(Clone, Copy)]
pub struct SharedRegion<'a> {
    base: NonNull<u8>,
    len: usize,
    _mem: PhantomData<&'a UnsafeCell<[u8]>>,
}

impl core::fmt::Debug for SharedRegion<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedRegion")
            .field("base", &self.base)
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: the region is only ever accessed through atomic operations, which are sound to perform
// from any thread concurrently; it carries no thread-affine state.
unsafe impl Send for SharedRegion<'_> {}
// SAFETY: as for `Send`: `&SharedRegion` only allows atomic accesses to the memory.
unsafe impl Sync for SharedRegion<'_> {}

impl<'a> SharedRegion<'a> {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Safety
    /// For the whole lifetime `'a`, `base..base + len` must stay mapped, readable and writable, and
    /// must not be accessed by this process except through atomic operations (every `SharedRegion`
    /// access is one). Concurrent writes by another process or domain are expected and fine.
    pub unsafe fn from_raw(base: *mut u8, len: usize) -> Result<Self, RegionError> {
        let base = NonNull::new(base).ok_or(RegionError::Misaligned(0))?;
        if !(base.as_ptr() as usize).is_multiple_of(8) {
            return Err(RegionError::Misaligned(base.as_ptr() as usize));
        }
        Ok(Self {
            base,
            len,
            _mem: PhantomData,
        })
    }

    /// Wraps memory this process owns exclusively for `'a` (tests, benchmarks, local peers).
    pub fn from_mut_slice(mem: &'a mut [u8]) -> Result<Self, RegionError> {
        // SAFETY: the exclusive borrow keeps the memory alive and unaliased for `'a`; every access
        // made through the region is atomic.
        unsafe { Self::from_raw(mem.as_mut_ptr(), mem.len()) }
    }

    /// Size of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte (for logs and for mapping bookkeeping).
    pub fn base_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), RegionError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RegionError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    fn check_u32(&self, offset: usize) -> Result<(), RegionError> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(RegionError::UnalignedIndex(offset));
        }
        Ok(())
    }

    /// The sub-region `offset..offset + len`, which must be 8-byte aligned.
    pub fn sub_region(&self, offset: usize, len: usize) -> Result<SharedRegion<'a>, RegionError> {
        self.check(offset, len)?;
        if !offset.is_multiple_of(8) {
            return Err(RegionError::Misaligned(self.base_addr() + offset));
        }
        Ok(Self {
            // SAFETY: `offset <= self.len` was checked, so the pointer stays within (or one past)
            // the region and cannot wrap or become null.
            base: unsafe { self.base.add(offset) },
            len,
            _mem: PhantomData,
        })
    }

    /// Atomically loads the `u32` at `offset` (4-byte aligned).
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, RegionError> {
        self.check_u32(offset)?;
        // SAFETY: bounds and alignment checked just above.
        Ok(unsafe { self.atomic_u32(offset) }.load(order))
    }

    /// Atomically stores `value` at `offset` (4-byte aligned).
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<(), RegionError> {
        self.check_u32(offset)?;
        // SAFETY: bounds and alignment checked just above.
        unsafe { self.atomic_u32(offset) }.store(value, order);
        Ok(())
    }

    fn check_u64(&self, offset: usize) -> Result<(), RegionError> {
        self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(RegionError::UnalignedIndex(offset));
        }
        Ok(())
    }

    fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, RegionError> {
        self.check_u64(offset)?;
        // SAFETY: bounds and 8-byte alignment checked just above; `from_raw`'s contract keeps the
        // memory valid and atomic-only for `'a`.
        Ok(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) })
    }

    /// Atomically loads the `u64` at `offset` (8-byte aligned).
    pub fn load_u64(&self, offset: usize, order: Ordering) -> Result<u64, RegionError> {
        Ok(self.atomic_u64(offset)?.load(order))
    }

    /// Atomically ORs `bits` into the `u64` at `offset`; returns the previous value.
    pub fn fetch_or_u64(
        &self,
        offset: usize,
        bits: u64,
        order: Ordering,
    ) -> Result<u64, RegionError> {
        Ok(self.atomic_u64(offset)?.fetch_or(bits, order))
    }

    /// Atomically ANDs `bits` into the `u64` at `offset`; returns the previous value.
    pub fn fetch_and_u64(
        &self,
        offset: usize,
        bits: u64,
        order: Ordering,
    ) -> Result<u64, RegionError> {
        Ok(self.atomic_u64(offset)?.fetch_and(bits, order))
    }

    /// Atomic compare-and-exchange of the `u32` at `offset`: `Ok(previous)` if it held `current`
    /// and now holds `new`, `Err(actual)` otherwise.
    pub fn compare_exchange_u32(
        &self,
        offset: usize,
        current: u32,
        new: u32,
    ) -> Result<Result<u32, u32>, RegionError> {
        self.check_u32(offset)?;
        // SAFETY: bounds and alignment checked just above.
        let a = unsafe { self.atomic_u32(offset) };
        // SeqCst: grant-table flag protocols pair this with the peer's own compare-exchange.
        Ok(a.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst))
    }

    /// Atomically stores one byte at `offset`.
    pub fn store_u8(&self, offset: usize, value: u8, order: Ordering) -> Result<(), RegionError> {
        self.check(offset, 1)?;
        // SAFETY: bounds checked just above; any address is aligned for a byte.
        unsafe { AtomicU8::from_ptr(self.base.as_ptr().add(offset)) }.store(value, order);
        Ok(())
    }

    /// Copies `dst.len()` bytes out of the region, starting at `offset`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), RegionError> {
        self.check(offset, dst.len())?;
        // SAFETY: bounds checked just above.
        unsafe { self.read_unchecked(offset, dst) };
        Ok(())
    }

    /// Copies `src` into the region, starting at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), RegionError> {
        self.check(offset, src.len())?;
        // SAFETY: bounds checked just above.
        unsafe { self.write_unchecked(offset, src) };
        Ok(())
    }

    /// The atomic `u32` at `offset`.
    ///
    /// # Safety
    /// `offset + 4 <= len` and `offset % 4 == 0`.
    pub(crate) unsafe fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: the caller guarantees the 4 bytes are inside the region and aligned (the base is
        // 8-aligned); `from_raw`'s contract keeps them valid for `'a` and atomic-only.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
    }

    /// Copies bytes out using the widest atomic loads the offset's alignment allows.
    ///
    /// # Safety
    /// `offset + dst.len() <= len`.
    pub(crate) unsafe fn read_unchecked(&self, offset: usize, dst: &mut [u8]) {
        if offset.is_multiple_of(8) && dst.len().is_multiple_of(8) {
            // Fast path for the common case (ring slots of 8-byte multiples).
            for (i, chunk) in dst.chunks_exact_mut(8).enumerate() {
                // SAFETY: `offset + 8 * i + 8 <= offset + dst.len() <= len` (caller), 8-aligned
                // since the base and `offset` are; `from_raw` keeps the memory valid and
                // atomic-only. Relaxed: ordered by the index load (acquire) that published it.
                let v =
                    unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset + 8 * i).cast()) }
                        .load(Ordering::Relaxed);
                chunk.copy_from_slice(&v.to_ne_bytes());
            }
            return;
        }
        let mut i = 0;
        while i < dst.len() {
            let at = offset + i;
            let left = dst.len() - i;
            // SAFETY: `at < offset + dst.len() <= len` (caller), so the pointer is in the region.
            let p = unsafe { self.base.as_ptr().add(at) };
            // Relaxed loads: payload bytes are ordered by the index load (acquire) that made them
            // visible; each width is used only where it fits and `at` is aligned to it.
            if left >= 8 && at.is_multiple_of(8) {
                // SAFETY: 8 bytes at an 8-aligned address inside the region (`from_raw` contract).
                let v = unsafe { AtomicU64::from_ptr(p.cast()) }.load(Ordering::Relaxed);
                dst[i..i + 8].copy_from_slice(&v.to_ne_bytes());
                i += 8;
            } else if left >= 4 && at.is_multiple_of(4) {
                // SAFETY: 4 bytes at a 4-aligned address inside the region.
                let v = unsafe { AtomicU32::from_ptr(p.cast()) }.load(Ordering::Relaxed);
                dst[i..i + 4].copy_from_slice(&v.to_ne_bytes());
                i += 4;
            } else {
                // SAFETY: one byte inside the region.
                dst[i] = unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Relaxed);
                i += 1;
            }
        }
    }

    /// Copies bytes in using the widest atomic stores the offset's alignment allows.
    ///
    /// # Safety
    /// `offset + src.len() <= len`.
    pub(crate) unsafe fn write_unchecked(&self, offset: usize, src: &[u8]) {
        if offset.is_multiple_of(8) && src.len().is_multiple_of(8) {
            for (i, chunk) in src.chunks_exact(8).enumerate() {
                let v = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8]));
                // SAFETY: as in the fast path of `read_unchecked`. Relaxed: published by the
                // producer index store (release) that follows.
                unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset + 8 * i).cast()) }
                    .store(v, Ordering::Relaxed);
            }
            return;
        }
        let mut i = 0;
        while i < src.len() {
            let at = offset + i;
            let left = src.len() - i;
            // SAFETY: `at < offset + src.len() <= len` (caller), so the pointer is in the region.
            let p = unsafe { self.base.as_ptr().add(at) };
            // Relaxed stores: the producer index store (release) that follows publishes them.
            if left >= 8 && at.is_multiple_of(8) {
                let v = u64::from_ne_bytes(src[i..i + 8].try_into().unwrap_or([0; 8]));
                // SAFETY: 8 bytes at an 8-aligned address inside the region (`from_raw` contract).
                unsafe { AtomicU64::from_ptr(p.cast()) }.store(v, Ordering::Relaxed);
                i += 8;
            } else if left >= 4 && at.is_multiple_of(4) {
                let v = u32::from_ne_bytes(src[i..i + 4].try_into().unwrap_or([0; 4]));
                // SAFETY: 4 bytes at a 4-aligned address inside the region.
                unsafe { AtomicU32::from_ptr(p.cast()) }.store(v, Ordering::Relaxed);
                i += 4;
            } else {
                // SAFETY: one byte inside the region.
                unsafe { AtomicU8::from_ptr(p) }.store(src[i], Ordering::Relaxed);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(align(8))]
    struct Aligned([u8; 64]);

    #[test]
    fn accesses_past_the_end_are_refused() {
        let mut mem = Aligned([0; 64]);
        let r = SharedRegion::from_mut_slice(&mut mem.0).unwrap();
        assert!(matches!(
            r.load_u32(64, Ordering::Relaxed),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.write(60, &[0; 8]),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.read(usize::MAX, &mut [0; 2]),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.sub_region(8, 57),
            Err(RegionError::OutOfBounds { .. })
        ));
        assert_eq!(
            r.load_u32(2, Ordering::Relaxed),
            Err(RegionError::UnalignedIndex(2))
        );
    }

    #[test]
    fn bytes_round_trip_at_every_alignment() {
        let mut mem = Aligned([0; 64]);
        let r = SharedRegion::from_mut_slice(&mut mem.0).unwrap();
        for off in 0..8 {
            for len in 0..=40 {
                let src: [u8; 40] = core::array::from_fn(|i| (i * 7 + off + len) as u8);
                r.write(off, &src[..len]).unwrap();
                let mut dst = [0u8; 40];
                r.read(off, &mut dst[..len]).unwrap();
                assert_eq!(dst[..len], src[..len]);
            }
        }
        r.store_u32(12, 0xdead_beef, Ordering::Relaxed).unwrap();
        assert_eq!(r.load_u32(12, Ordering::Relaxed).unwrap(), 0xdead_beef);
        let sub = r.sub_region(8, 16).unwrap();
        assert_eq!(sub.load_u32(4, Ordering::Relaxed).unwrap(), 0xdead_beef);
    }

    #[test]
    fn misaligned_base_is_refused() {
        let mut mem = Aligned([0; 64]);
        assert!(matches!(
            SharedRegion::from_mut_slice(&mut mem.0[1..]),
            Err(RegionError::Misaligned(_))
        ));
    }
}
