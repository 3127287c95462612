//! What a back-end needs from the grant system: a granted page it can hand to the kernel for I/O.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::Arc;

use pv_protocol::grant::GrantRef;
use pv_protocol::{PAGE_SIZE, SharedRegion};

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
    _hold: Hold,
}

/// What keeps a [`MappedPage`] mapped.
enum Hold {
    /// A grant of a live domain, pinned (shared with the persistent cache: no allocation per
    /// page, one reference count).
    Pinned {
        _grant: Arc<hypervisor::grant::PinnedGrant>,
    },
    /// Anything else a mapper needs to keep alive.
    Other { _hold: Box<dyn Any + Send> },
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
        Self {
            ptr,
            _hold: Hold::Other { _hold: hold },
        }
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

    /// Copies `dst.len()` bytes out of granted page `gref` at `offset` (Xen's grant copy, from
    /// the guest). The range must lie inside the page.
    fn copy_from(&self, gref: GrantRef, offset: usize, dst: &mut [u8]) -> Result<(), GrantFailure> {
        let page = self.map(gref, false)?;
        page_region(&page, gref)?
            .read(offset, dst)
            .map_err(|e| out_of_page(gref, e))
    }

    /// Copies `src` into granted page `gref` at `offset` (grant copy, to the guest; the grant
    /// must be writable). The range must lie inside the page.
    fn copy_to(&self, gref: GrantRef, offset: usize, src: &[u8]) -> Result<(), GrantFailure> {
        let page = self.map(gref, true)?;
        page_region(&page, gref)?
            .write(offset, src)
            .map_err(|e| out_of_page(gref, e))
    }

    /// The host range every mapped page lies in, when it is one fixed range that stays valid as
    /// long as this mapper lives: the back end may then register it with the kernel once
    /// (io_uring fixed buffers) instead of having the kernel pin pages on every I/O.
    fn io_region(&self) -> Option<(NonNull<u8>, usize)> {
        None
    }

    /// Runs `register` with the [`io_region`](Self::io_region) when there is one that may be
    /// registered now; whether it did and `register` succeeded. A mapper whose range can change
    /// (a domain that gives memory back) decides under its own lock.
    fn with_io_region(&self, register: &mut dyn FnMut(NonNull<u8>, usize) -> bool) -> bool {
        self.io_region()
            .is_some_and(|(base, len)| register(base, len))
    }

    /// Whether a range registered through [`with_io_region`](Self::with_io_region) still shows
    /// the pages I/O must reach. Once false, the back end must unregister it (and use per-I/O
    /// pinning) before it submits I/O again: the guest gave pages of it back, so the kernel's
    /// pins hold freed pages that a repopulated frame no longer shows.
    fn io_region_valid(&self) -> bool {
        true
    }
}

fn out_of_page(gref: GrantRef, e: pv_protocol::RegionError) -> GrantFailure {
    GrantFailure {
        gref: gref.0,
        reason: e.to_string(),
    }
}

/// The mapped page as shared memory: the guest may write it while we copy, so every access is
/// atomic (pv-protocol's region), never a plain read of racing memory.
fn page_region(page: &MappedPage, gref: GrantRef) -> Result<SharedRegion<'_>, GrantFailure> {
    // SAFETY: a MappedPage's address is valid for PAGE_SIZE bytes while it lives (its contract),
    // and the region borrows it, so it cannot outlive the mapping.
    unsafe { SharedRegion::from_raw(page.addr(0), PAGE_SIZE) }.map_err(|e| out_of_page(gref, e))
}

/// Persistent grants one ring keeps mapped at most: Linux blkback's default
/// `max_persistent_grants`.
pub const MAX_PERSISTENT_GRANTS: usize = 1056;
/// How many of the least recently used persistent grants a miss looks at for one to evict: a
/// bound on the work a guest can cause per segment when it keeps its oldest grants in use.
const EVICT_SCAN: usize = 64;

/// The persistent mappings of one ring: at most `capacity`, the least recently used one that no
/// request holds evicted to make room (as Linux blkback purges its persistent grants). So dom0
/// keeps a bounded number of a guest's pages claimed, and a grant the guest stopped using is
/// released in time and can be revoked.
#[derive(Debug)]
struct PersistentCache {
    capacity: usize,
    /// By ref: the pinned grant and its last use.
    maps: HashMap<u32, (Arc<hypervisor::grant::PinnedGrant>, u64)>,
    /// Refs by last use, oldest first.
    by_use: BTreeMap<u64, u32>,
    /// Counts uses (never wraps: 2^64 lookups).
    clock: u64,
}

impl PersistentCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            maps: HashMap::new(),
            by_use: BTreeMap::new(),
            clock: 0,
        }
    }

    /// The cached mapping of `gref`, now its most recent use.
    fn get(&mut self, gref: u32) -> Option<Arc<hypervisor::grant::PinnedGrant>> {
        let (grant, used) = self.maps.get_mut(&gref)?;
        self.by_use.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.by_use.insert(self.clock, gref);
        Some(Arc::clone(grant))
    }

    /// Whether a new mapping can be kept: there is room, or the least recently used mapping
    /// that nothing but the cache holds (no request in flight uses it), among the
    /// [`EVICT_SCAN`] least recently used, was evicted (its grant released) to make some.
    fn make_room(&mut self) -> bool {
        if self.maps.len() < self.capacity {
            return true;
        }
        // Held only here: no request holds a clone. Clones are made only under the cache's lock
        // (which the caller holds), so a count of 1 cannot grow meanwhile.
        let victim = self
            .by_use
            .iter()
            .take(EVICT_SCAN)
            .find(|(_, gref)| {
                self.maps
                    .get(gref)
                    .is_some_and(|(g, _)| Arc::strong_count(g) == 1)
            })
            .map(|(&used, &gref)| (used, gref));
        let Some((used, gref)) = victim else {
            return false;
        };
        self.by_use.remove(&used);
        // Dropping the last reference unpins the page and ends the mapping: the guest may revoke
        // the grant from now on.
        self.maps.remove(&gref);
        true
    }

    fn insert(&mut self, gref: u32, grant: Arc<hypervisor::grant::PinnedGrant>) {
        self.clock += 1;
        self.by_use.insert(self.clock, gref);
        if let Some((_, old)) = self.maps.insert(gref, (grant, self.clock)) {
            self.by_use.remove(&old);
        }
    }
}

/// The real thing: grants of a live domain, through the hypervisor's checked grant table.
///
/// With `persistent` (Xen's `feature-persistent`, when both ends offer it) a grant stays mapped
/// after its first use and is reused by later requests, saving a map and an unmap per segment;
/// the front end agrees not to revoke such grants while they are mapped (and cannot: they stay
/// claimed). At most [`MAX_PERSISTENT_GRANTS`] stay mapped: beyond that the least recently used
/// one not in use is released, and when every one is in use a new grant is mapped for that use
/// only. Mappings are released when this value is dropped, at disconnect.
#[derive(Debug)]
pub struct DomainGrants {
    dom: Arc<hypervisor::DomainShared>,
    persistent: Option<std::sync::Mutex<PersistentCache>>,
    /// The reservation generation the registered memory is valid for ([`NOT_REGISTERED`]: none).
    registered: std::sync::atomic::AtomicU64,
}

const NOT_REGISTERED: u64 = u64::MAX;

impl DomainGrants {
    /// Grants of `dom`, mapped for dom0 per request.
    pub fn new(dom: Arc<hypervisor::DomainShared>) -> Self {
        Self {
            dom,
            persistent: None,
            registered: NOT_REGISTERED.into(),
        }
    }

    /// Grants of `dom`, kept mapped after first use (writable unless the grant is read-only), at
    /// most [`MAX_PERSISTENT_GRANTS`] of them.
    pub fn persistent(dom: Arc<hypervisor::DomainShared>) -> Self {
        Self::persistent_with_capacity(dom, MAX_PERSISTENT_GRANTS)
    }

    /// As [`persistent`](Self::persistent), keeping at most `capacity` grants mapped.
    pub fn persistent_with_capacity(dom: Arc<hypervisor::DomainShared>, capacity: usize) -> Self {
        Self {
            dom,
            persistent: Some(std::sync::Mutex::new(PersistentCache::new(capacity))),
            registered: NOT_REGISTERED.into(),
        }
    }

    /// Grants kept mapped persistently now (0 without persistent grants).
    pub fn persistent_len(&self) -> usize {
        self.persistent.as_ref().map_or(0, |c| {
            c.lock().unwrap_or_else(|p| p.into_inner()).maps.len()
        })
    }

    fn pin(
        &self,
        gref: GrantRef,
        writable: bool,
    ) -> Result<Arc<hypervisor::grant::PinnedGrant>, GrantFailure> {
        let fail = |e: hypervisor::grant::GrantError| GrantFailure {
            gref: gref.0,
            reason: e.to_string(),
        };
        let Some(cache) = &self.persistent else {
            return hypervisor::grant::map(&self.dom, gref, 0, !writable)
                .and_then(|m| m.pin())
                .map(Arc::new)
                .map_err(fail);
        };
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cache.get(gref.0) {
            if writable && !hit.mapping().writable() {
                return Err(fail(hypervisor::grant::GrantError::ReadOnly(gref.0)));
            }
            return Ok(hit);
        }
        // Map writable when the grant allows it (so later writes reuse it too), else read-only.
        let mapped = match hypervisor::grant::map(&self.dom, gref, 0, false) {
            Err(hypervisor::grant::GrantError::ReadOnly(_)) if !writable => {
                hypervisor::grant::map(&self.dom, gref, 0, true)
            }
            other => other,
        };
        let pinned = Arc::new(mapped.and_then(|m| m.pin()).map_err(fail)?);
        // Full of grants in use: this one serves this use only (released when it ends).
        if cache.make_room() {
            cache.insert(gref.0, Arc::clone(&pinned));
        }
        Ok(pinned)
    }
}

impl GrantMapper for DomainGrants {
    fn with_io_region(&self, register: &mut dyn FnMut(NonNull<u8>, usize) -> bool) -> bool {
        // The domain's whole memory (one mapping, kept alive by the Arc this value holds), but
        // only while it holds every frame of it: registering pins every page, which would back
        // the frames it gave back again.
        let Some(g) = hypervisor::reservation::with_whole_memory(&self.dom, register) else {
            return false;
        };
        // Relaxed: read only by the thread that registered.
        self.registered
            .store(g, std::sync::atomic::Ordering::Relaxed);
        true
    }

    fn io_region_valid(&self) -> bool {
        let g = self.registered.load(std::sync::atomic::Ordering::Relaxed);
        g != NOT_REGISTERED && g == self.dom.reservation.generation()
    }

    fn copy_from(&self, gref: GrantRef, offset: usize, dst: &mut [u8]) -> Result<(), GrantFailure> {
        if self.persistent.is_none() {
            // Map, copy, unmap: the hypervisor's grant copy.
            return hypervisor::grant::copy_from(&self.dom, gref, 0, offset, dst).map_err(|e| {
                GrantFailure {
                    gref: gref.0,
                    reason: e.to_string(),
                }
            });
        }
        let pinned = self.pin(gref, false)?;
        // SAFETY: the pinned grant keeps the page mapped and claimed for PAGE_SIZE bytes while
        // `pinned` lives, which outlives the region used on the next line.
        unsafe { SharedRegion::from_raw(pinned.host_addr(), PAGE_SIZE) }
            .and_then(|r| r.read(offset, dst))
            .map_err(|e| out_of_page(gref, e))
    }

    fn copy_to(&self, gref: GrantRef, offset: usize, src: &[u8]) -> Result<(), GrantFailure> {
        if self.persistent.is_none() {
            return hypervisor::grant::copy_to(&self.dom, gref, 0, offset, src).map_err(|e| {
                GrantFailure {
                    gref: gref.0,
                    reason: e.to_string(),
                }
            });
        }
        let pinned = self.pin(gref, true)?;
        // SAFETY: as in `copy_from`; `pin(.., true)` checked the mapping is writable.
        unsafe { SharedRegion::from_raw(pinned.host_addr(), PAGE_SIZE) }
            .and_then(|r| r.write(offset, src))
            .map_err(|e| out_of_page(gref, e))
    }

    fn map(&self, gref: GrantRef, device_writes: bool) -> Result<MappedPage, GrantFailure> {
        let pinned = self.pin(gref, device_writes)?;
        let ptr = NonNull::new(pinned.host_addr()).ok_or(GrantFailure {
            gref: gref.0,
            reason: "null page".into(),
        })?;
        // `PinnedGrant` keeps the domain's memory alive and the grant claimed (the guest cannot
        // revoke it) for as long as it lives (the Arc held by the page), and it was mapped
        // writable when the device writes (checked against the cached mapping above).
        Ok(MappedPage {
            ptr,
            _hold: Hold::Pinned { _grant: pinned },
        })
    }
}
