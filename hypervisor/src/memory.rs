//! Guest memory: one memfd-backed region from guest address 0, accessed only through checked,
//! bounds-validated copies (vm-memory's `Bytes`).
//!
//! memfd so that later work can hand the same memory to an out-of-process back end or save it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Errors from guest-memory access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Creating or sizing the memfd failed.
    #[error("cannot create guest memory of {0} bytes")]
    Create(u64, #[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// A second host view of guest pages could not be mapped.
    #[error("cannot map a view of {0} guest page(s)")]
    View(usize, #[source] std::io::Error),
    /// Freeing guest pages (a hole in the memfd) failed.
    #[error("cannot free guest range {gpa:#x}+{len:#x}")]
    Punch {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memfd's size could not be read.
    #[error("cannot read the size of guest memory")]
    Stat(#[source] std::io::Error),
    /// An access (partly) outside guest memory.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Start of the access.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, MemoryError>;

/// A domain's RAM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    _memfd: File,
    size: u64,
}

impl GuestRam {
    /// Allocates `size` bytes (a multiple of the page size) of zeroed, memfd-backed memory.
    pub fn new(size: u64) -> Result<Self> {
        // SAFETY: the name is a NUL-terminated literal; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"splitvisor-domain".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Create(size, std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|e| MemoryError::Create(size, e))?;
        let file = memfd
            .try_clone()
            .map_err(|e| MemoryError::Create(size, e))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(vm_memory::FileOffset::new(file, 0)),
        )])
        .map_err(MemoryError::Map)?;
        Ok(Self {
            mem,
            _memfd: memfd,
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view (for loaders).
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of guest address 0 (for `KVM_SET_USER_MEMORY_REGION`).
    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .map(|p| p as u64)
            .unwrap_or(0)
    }

    /// Maps the guest pages at `gpas` (page-aligned guest addresses, each inside guest memory)
    /// back to back at a fresh host address, as Xen maps a multi-page ring whose frames are
    /// scattered. The view shares the pages with the guest (the memfd's pages, mapped a second
    /// time) and stays valid until dropped, even if the domain is gone meanwhile.
    pub fn map_view(&self, gpas: &[u64]) -> Result<PageView> {
        const PAGE: usize = pv_protocol::PAGE_SIZE;
        let len = gpas.len() * PAGE;
        for &gpa in gpas {
            if gpa % PAGE as u64 != 0 {
                return Err(MemoryError::OutOfRange { gpa, len: PAGE });
            }
            self.check(gpa, PAGE)?;
        }
        if gpas.is_empty() {
            return Err(MemoryError::View(
                0,
                std::io::ErrorKind::InvalidInput.into(),
            ));
        }
        // SAFETY: reserves fresh address space (no fixed address, no file); the result is
        // checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MemoryError::View(
                gpas.len(),
                std::io::Error::last_os_error(),
            ));
        }
        // From here the reservation is the view's: dropping it unmaps everything mapped below.
        let view = PageView {
            base: base as usize,
            len,
        };
        for (i, &gpa) in gpas.iter().enumerate() {
            // SAFETY: MAP_FIXED replaces only page `i` of the reservation made above, which no
            // one else uses; the memfd is ours and `gpa` was checked to lie inside it.
            let p = unsafe {
                libc::mmap(
                    (view.base + i * PAGE) as *mut libc::c_void,
                    PAGE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self._memfd.as_raw_fd(),
                    gpa as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(MemoryError::View(
                    gpas.len(),
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(view)
    }

    /// Frees the host memory behind `gpa..gpa + len` (page-aligned): the range becomes a hole of
    /// the memfd, and reads as zeros (a fresh page at the next access, by anyone).
    pub fn punch(&self, gpa: u64, len: u64) -> Result<()> {
        let page = pv_protocol::PAGE_SIZE as u64;
        let bad = || MemoryError::OutOfRange {
            gpa,
            len: len as usize,
        };
        if !gpa.is_multiple_of(page)
            || !len.is_multiple_of(page)
            || gpa.checked_add(len).is_none_or(|e| e > self.size)
        {
            return Err(bad());
        }
        let (off, n) = (
            libc::off_t::try_from(gpa).map_err(|_| bad())?,
            libc::off_t::try_from(len).map_err(|_| bad())?,
        );
        // SAFETY: fallocate on our own memfd with a range checked to lie inside it; no memory of
        // ours is passed. Mappings of the range (ours, KVM's through the MMU notifier) are zapped
        // by the kernel and fault in fresh zero pages afterwards.
        let r = unsafe {
            libc::fallocate(
                self._memfd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if r != 0 {
            return Err(MemoryError::Punch {
                gpa,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Host memory the memfd has allocated now (`st_blocks`): the pages anyone has touched and
    /// nobody has freed since.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let m = self._memfd.metadata().map_err(MemoryError::Stat)?;
        Ok(std::os::unix::fs::MetadataExt::blocks(&m) * 512)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<()> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange { gpa, len }),
        }
    }

    /// The guest range `gpa..gpa + len` as a region for atomic access (shared-info bitmaps, grant
    /// entries): the guest may write it concurrently.
    pub fn region(&self, gpa: u64, len: usize) -> Result<pv_protocol::SharedRegion<'_>> {
        self.check(gpa, len)?;
        let base = self.host_base();
        // SAFETY: `gpa..gpa + len` lies inside the mapping (checked above), which lives as long as
        // `self`, and the returned region borrows `self`; the hypervisor touches guest memory
        // concurrently with the guest only through this region's atomic accesses (and through
        // vm-memory's volatile copies elsewhere).
        unsafe { pv_protocol::SharedRegion::from_raw((base + gpa) as *mut u8, len) }
            .map_err(|_| MemoryError::OutOfRange { gpa, len })
    }

    /// Copies `buf.len()` bytes out of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Copies a wire struct out of guest memory (once; the caller validates it).
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T> {
        let mut v = T::new_zeroed();
        self.read(gpa, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Writes a wire struct into guest memory.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, v: &T) -> Result<()> {
        self.write(gpa, v.as_bytes())
    }
}

/// Guest pages mapped back to back at their own host address ([`GuestRam::map_view`]); unmapped
/// on drop.
#[derive(Debug)]
pub struct PageView {
    base: usize,
    len: usize,
}

impl PageView {
    /// Host address of the first page.
    pub fn host_addr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a view has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PageView {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is the reservation `map_view` made and owns; nothing else
        // maps into it.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_past_the_end_or_wrapping_are_refused() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut b = [0u8; 8];
        assert!(ram.read((1 << 20) - 8, &mut b).is_ok());
        assert!(matches!(
            ram.read((1 << 20) - 7, &mut b),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            ram.write(u64::MAX - 3, &b),
            Err(MemoryError::OutOfRange { .. })
        ));
        ram.write_obj(0x100, &0xdead_beef_u32).unwrap();
        assert_eq!(ram.read_obj::<u32>(0x100).unwrap(), 0xdead_beef);
    }

    #[test]
    fn a_punched_range_frees_its_memory_and_reads_as_zeros() {
        let ram = GuestRam::new(1 << 20).unwrap();
        assert_eq!(ram.allocated_bytes().unwrap(), 0);
        ram.write(0x3000, &[0xa5; 8192]).unwrap();
        assert_eq!(ram.allocated_bytes().unwrap(), 8192);
        ram.punch(0x3000, 4096).unwrap();
        assert_eq!(ram.allocated_bytes().unwrap(), 4096);
        let mut b = [0xffu8; 8];
        ram.read(0x3000, &mut b).unwrap();
        assert_eq!(b, [0; 8]);
        ram.read(0x4000, &mut b).unwrap();
        assert_eq!(b, [0xa5; 8], "the neighbour keeps its data");
        for (gpa, len) in [
            (0x3001, 4096),
            (0x3000, 100),
            ((1 << 20) - 4096, 8192),
            (u64::MAX - 4095, 4096),
        ] {
            assert!(
                matches!(ram.punch(gpa, len), Err(MemoryError::OutOfRange { .. })),
                "{gpa:#x}+{len}"
            );
        }
    }

    #[test]
    fn a_view_shows_scattered_pages_back_to_back_and_shares_them() {
        let ram = GuestRam::new(1 << 20).unwrap();
        ram.write(0x5000, b"page five").unwrap();
        ram.write(0x2000, b"page two").unwrap();
        let view = ram.map_view(&[0x5000, 0x2000]).unwrap();
        assert_eq!(view.len(), 8192);
        // SAFETY: the view maps two readable, writable pages at `host_addr` until dropped; no
        // other thread touches this memory in the test.
        let bytes = unsafe { std::slice::from_raw_parts_mut(view.host_addr(), view.len()) };
        assert_eq!(&bytes[..9], b"page five");
        assert_eq!(&bytes[4096..4104], b"page two");
        bytes[4096 + 100] = 0xa5;
        let mut b = [0u8; 1];
        ram.read(0x2000 + 100, &mut b).unwrap();
        assert_eq!(b[0], 0xa5, "a write through the view reaches guest memory");
        // Unaligned or outside guest memory: refused.
        assert!(matches!(
            ram.map_view(&[0x5001]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            ram.map_view(&[0x2000, 1 << 20]),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(ram.map_view(&[]).is_err());
    }
}
