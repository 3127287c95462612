//! What a back-end needs from the grant system: a granted page it can hand to the kernel for I/O.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use pv_protocol::PAGE_SIZE;
use pv_protocol::grant::GrantRef;

/// Why a grant could not be mapped (the request then fails with an error response).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grant ref {gref}: {reason}")]
pub struct GrantFailure {
    /// The reference.
    pub gref: u32,
    /// Why (from the grant system).
    pub reason: String,
}

/// A granted page held for I/O: its host address stays valid (and writable when mapped for the
/// device to write) until this value is dropped.
pub struct MappedPage {
    ptr: NonNull<u8>,
    _hold: Box<dyn Any + Send>,
}

impl std::fmt::Debug for MappedPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedPage")
            .field("ptr", &self.ptr)
            .finish()
    }
}

// SAFETY: the page is plain memory kept alive by `_hold` (which is Send); the pointer is only
// handed to the kernel for I/O by the thread owning this value.
unsafe impl Send for MappedPage {}

impl MappedPage {
    /// Wraps a page.
    ///
    /// # Safety
    /// `ptr` must be valid for reads (and, if the mapping was made for the device to write, for
    /// writes) of `PAGE_SIZE` bytes for as long as `hold` is alive, and nothing may free or remap
    /// it meanwhile.
    pub unsafe fn new(ptr: NonNull<u8>, hold: Box<dyn Any + Send>) -> Self {
        Self { ptr, _hold: hold }
    }

    /// Host address of byte `offset` of the page (`offset < PAGE_SIZE`), for an iovec.
    pub fn addr(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < PAGE_SIZE);
        // SAFETY: `offset < PAGE_SIZE`, inside the page (guaranteed by callers that validated
        // segments with pv-protocol's blkif parser).
        unsafe { self.ptr.as_ptr().add(offset.min(PAGE_SIZE - 1)) }
    }
}

/// Maps a guest's grants for I/O.
pub trait GrantMapper: Send {
    /// Maps `gref`; `device_writes` when the back-end will write into the page (a disk read).
    fn map(&self, gref: GrantRef, device_writes: bool) -> Result<MappedPage, GrantFailure>;
}

/// The real thing: grants of a live domain, through the hypervisor's checked grant table.
#[derive(Debug, Clone)]
pub struct DomainGrants {
    dom: Arc<hypervisor::DomainShared>,
}

impl DomainGrants {
    /// Grants of `dom`, mapped for dom0.
    pub fn new(dom: Arc<hypervisor::DomainShared>) -> Self {
        Self { dom }
    }
}

impl GrantMapper for DomainGrants {
    fn map(&self, gref: GrantRef, device_writes: bool) -> Result<MappedPage, GrantFailure> {
        let fail = |e: hypervisor::grant::GrantError| GrantFailure {
            gref: gref.0,
            reason: e.to_string(),
        };
        let pinned = hypervisor::grant::map(&self.dom, gref, 0, !device_writes)
            .and_then(|m| m.pin())
            .map_err(fail)?;
        let ptr = NonNull::new(pinned.host_addr()).ok_or(GrantFailure {
            gref: gref.0,
            reason: "null page".into(),
        })?;
        // SAFETY: `PinnedGrant` keeps the domain's memory alive and the grant claimed (the guest
        // cannot revoke it) for as long as it lives, and it was mapped writable when the device
        // writes.
        Ok(unsafe { MappedPage::new(ptr, Box::new(pinned)) })
    }
}
