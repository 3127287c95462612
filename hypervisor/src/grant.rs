//! Grant tables, host side: back-ends reach a guest's memory only through pages the guest granted.
//!
//! A guest's table is an array of Xen v1 entries (`flags, domid, frame`) in its own memory, at
//! [`GRANT_TABLE_GPA`]. Mapping a grant validates the entry and marks it `READING` (and `WRITING`
//! for a writable mapping) with a compare-exchange on the `flags|domid` word; the guest ends
//! access with its own compare-exchange that fails while either bit is set. So revocation and
//! mapping cannot race: whichever exchange comes first wins, and the loser sees a changed word.
//! The mapping hands out checked access to that one page only, and clears its bits on drop once
//! the last mapping of the entry goes away.
//!
//! Mappings are also counted per frame, so that a frame another domain has mapped is never given
//! back (freed) by its owner's balloon ([`crate::reservation`]), and a frame given back is never
//! mapped: both are decided under the map-track lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use pv_protocol::grant::{ENTRIES_PER_PAGE, GrantFlags, GrantRef};
use pv_protocol::start_info::GRANT_TABLE_GPA;
use pv_protocol::{PAGE_SIZE, SharedRegion};

use crate::domain::DomainShared;
use crate::memory::PageView;

/// Grant-table frames per domain unless configured otherwise (16384 grants).
pub const DEFAULT_GRANT_FRAMES: u32 = 32;

/// Why a grant cannot be mapped or accessed; each maps to a Xen `GNTST_*` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The granting domain does not exist (any more).
    #[error("domain {0} does not exist")]
    BadDomain(u32),
    /// The reference is beyond the domain's table.
    #[error("grant ref {0} is outside the table")]
    BadRef(u32),
    /// The entry grants nothing (revoked, never granted, or not a plain access grant).
    #[error("grant ref {0} is not granted")]
    NotGranted(u32),
    /// The entry grants access to another domain.
    #[error("grant ref {gref} is granted to domain {granted_to}, not {mapper}")]
    WrongDomain {
        /// The reference.
        gref: u32,
        /// The domain in the entry.
        granted_to: u16,
        /// The domain asking.
        mapper: u32,
    },
    /// A writable mapping of a read-only grant.
    #[error("grant ref {0} is read-only")]
    ReadOnly(u32),
    /// The granted frame is outside the granting domain's memory.
    #[error("grant ref {gref} names frame {frame:#x} outside guest memory")]
    BadFrame {
        /// The reference.
        gref: u32,
        /// The frame in the entry.
        frame: u32,
    },
    /// The granted frame is one the granting domain gave back (it holds no memory).
    #[error("grant ref {gref} names frame {frame:#x}, which its domain gave back")]
    GivenBack {
        /// The reference.
        gref: u32,
        /// The frame in the entry.
        frame: u32,
    },
    /// The guest kept changing the entry while we tried to claim it.
    #[error("grant ref {0} changed under us repeatedly")]
    Busy(u32),
    /// The pages of a ring could not be shown back to back (no pages, or mmap failed).
    #[error("cannot map a view of {0} ring page(s)")]
    View(usize),
    /// An access past the end of the granted page.
    #[error("access of {len} bytes at offset {offset} leaves the granted page")]
    OutOfPage {
        /// Offset in the page.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, GrantError>;

/// Live mappings of a domain's grants, by reference: how many and how (read, write); and by
/// frame: how many mappings (of any reference) show it.
#[derive(Debug, Default)]
pub(crate) struct MapTrack {
    maps: HashMap<u32, (u32, u32)>,
    frames: HashMap<u32, u32>,
}

impl MapTrack {
    /// Whether another domain has `frame` mapped now.
    pub(crate) fn frame_mapped(&self, frame: u64) -> bool {
        u32::try_from(frame).is_ok_and(|f| self.frames.contains_key(&f))
    }
}

pub(crate) fn track(d: &DomainShared) -> std::sync::MutexGuard<'_, MapTrack> {
    d.maptrack.lock().unwrap_or_else(|p| p.into_inner())
}

fn entry_word(d: &DomainShared, gref: u32) -> Result<(SharedRegion<'_>, usize)> {
    if gref >= d.grant_frames * ENTRIES_PER_PAGE as u32 {
        return Err(GrantError::BadRef(gref));
    }
    let table = d
        .ram
        .region(GRANT_TABLE_GPA, d.grant_frames as usize * PAGE_SIZE)
        .map_err(|_| GrantError::BadRef(gref))?;
    Ok((table, gref as usize * 8))
}

/// Maps grant `gref` of `granter` for `mapper` (0 = dom0), writable unless `readonly`.
pub fn map(
    granter: &Arc<DomainShared>,
    gref: GrantRef,
    mapper: u32,
    readonly: bool,
) -> Result<GrantMapping> {
    let d = granter;
    let gref = gref.0;
    if d.state().is_final() {
        return Err(GrantError::BadDomain(d.id));
    }
    let (table, off) = entry_word(d, gref)?;
    let mut track = track(d);
    for _ in 0..16 {
        // One u32 holds flags (low half) and domid (high half); read it once.
        let word = table
            .load_u32(off, std::sync::atomic::Ordering::SeqCst)
            .map_err(|_| GrantError::BadRef(gref))?;
        let flags = GrantFlags::from_bits_retain(word as u16);
        let domid = (word >> 16) as u16;
        if (flags.bits() & pv_protocol::grant::GRANT_TYPE_MASK) != GrantFlags::PERMIT_ACCESS.bits()
            || flags.contains(GrantFlags::SUB_PAGE)
        {
            return Err(GrantError::NotGranted(gref));
        }
        if u32::from(domid) != mapper {
            return Err(GrantError::WrongDomain {
                gref,
                granted_to: domid,
                mapper,
            });
        }
        if !readonly && flags.contains(GrantFlags::READONLY) {
            return Err(GrantError::ReadOnly(gref));
        }
        let mut want = flags | GrantFlags::READING;
        if !readonly {
            want |= GrantFlags::WRITING;
        }
        let new = (word & 0xffff_0000) | u32::from(want.bits());
        match table.compare_exchange_u32(off, word, new) {
            Ok(Ok(_)) => {
                let e = track.maps.entry(gref).or_insert((0, 0));
                e.0 += 1;
                if !readonly {
                    e.1 += 1;
                }
                // The frame is read once the entry is claimed (as Xen does): from here on the
                // guest may not change the entry, so the frame checked is the frame mapped.
                // SeqCst: after the claim's exchange, like every access to the entry.
                let frame = table
                    .load_u32(off + 4, std::sync::atomic::Ordering::SeqCst)
                    .unwrap_or(u32::MAX);
                let gpa = u64::from(frame) * PAGE_SIZE as u64;
                if gpa
                    .checked_add(PAGE_SIZE as u64)
                    .is_none_or(|end| end > d.ram.size())
                {
                    drop(track);
                    release(d, gref, !readonly, None);
                    return Err(GrantError::BadFrame { gref, frame });
                }
                // Under the map-track lock, as the balloon's give-back: a frame is either absent
                // and not mapped, or mapped (counted here) and then not given back.
                if d.reservation.is_absent(u64::from(frame)) {
                    drop(track);
                    release(d, gref, !readonly, None);
                    return Err(GrantError::GivenBack { gref, frame });
                }
                *track.frames.entry(frame).or_insert(0) += 1;
                return Ok(GrantMapping {
                    dom: Arc::downgrade(d),
                    domid: d.id,
                    gref,
                    gpa,
                    writable: !readonly,
                });
            }
            // The guest changed the entry between our read and our exchange: look again.
            Ok(Err(_)) => continue,
            Err(_) => return Err(GrantError::BadRef(gref)),
        }
    }
    Err(GrantError::Busy(gref))
}

/// Ends one mapping of `gref` (of `frame`, if it was counted).
fn release(d: &DomainShared, gref: u32, writable: bool, frame: Option<u32>) {
    let Ok((table, off)) = entry_word(d, gref) else {
        return;
    };
    let mut track = track(d);
    if let Some(f) = frame
        && let Some(n) = track.frames.get_mut(&f)
    {
        *n -= 1;
        if *n == 0 {
            track.frames.remove(&f);
        }
    }
    let Some(e) = track.maps.get_mut(&gref) else {
        return;
    };
    e.0 -= 1;
    if writable {
        e.1 -= 1;
    }
    let mut clear = GrantFlags::empty();
    if e.0 == 0 {
        clear |= GrantFlags::READING;
        track.maps.remove(&gref);
    }
    if writable && track.maps.get(&gref).is_none_or(|e| e.1 == 0) {
        clear |= GrantFlags::WRITING;
    }
    if clear.is_empty() {
        return;
    }
    // The guest cannot clear these bits itself (its end-access exchange fails while they are
    // set), so a bounded retry only races with changes to other bits.
    for _ in 0..64 {
        let Ok(word) = table.load_u32(off, std::sync::atomic::Ordering::SeqCst) else {
            return;
        };
        let new = word & !u32::from(clear.bits());
        if table
            .compare_exchange_u32(off, word, new)
            .is_ok_and(|r| r.is_ok())
        {
            return;
        }
    }
    d.guest_fault(
        "grant-churn",
        format_args!("grant ref {gref}: could not clear mapping bits"),
    );
}

/// A live mapping of one granted page. Access is bounded to the page; dropping it ends the
/// mapping.
#[derive(Debug)]
pub struct GrantMapping {
    dom: Weak<DomainShared>,
    domid: u32,
    gref: u32,
    gpa: u64,
    writable: bool,
}

impl GrantMapping {
    /// The reference mapped.
    pub fn gref(&self) -> GrantRef {
        GrantRef(self.gref)
    }

    /// Whether the mapping is writable.
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check(&self, offset: usize, len: usize) -> Result<Arc<DomainShared>> {
        if offset.checked_add(len).is_none_or(|end| end > PAGE_SIZE) {
            return Err(GrantError::OutOfPage { offset, len });
        }
        self.dom.upgrade().ok_or(GrantError::BadDomain(self.domid))
    }

    /// Copies bytes out of the granted page.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        let d = self.check(offset, buf.len())?;
        d.ram
            .read(self.gpa + offset as u64, buf)
            .map_err(|_| GrantError::BadFrame {
                gref: self.gref,
                frame: (self.gpa / 4096) as u32,
            })
    }

    /// Copies bytes into the granted page (writable mappings only).
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(GrantError::ReadOnly(self.gref));
        }
        let d = self.check(offset, buf.len())?;
        d.ram
            .write(self.gpa + offset as u64, buf)
            .map_err(|_| GrantError::BadFrame {
                gref: self.gref,
                frame: (self.gpa / 4096) as u32,
            })
    }
}

impl GrantMapping {
    /// Keeps the granting domain's memory alive for as long as the result lives, so the page can
    /// be handed to the kernel for I/O (io_uring) by address. Only the memory, and the domain's
    /// hold on its id (no later domain gets the id while its predecessor's memory may still be
    /// written): the domain itself (its VM, vCPUs, ports) may end meanwhile, and the grant is
    /// then released with it.
    pub fn pin(self) -> Result<PinnedGrant> {
        let dom = self
            .dom
            .upgrade()
            .ok_or(GrantError::BadDomain(self.domid))?;
        let addr = dom
            .ram
            .region(self.gpa, PAGE_SIZE)
            .map_err(|_| GrantError::BadFrame {
                gref: self.gref,
                frame: (self.gpa / 4096) as u32,
            })?
            .base_addr();
        Ok(PinnedGrant {
            _ram: Arc::clone(&dom.ram),
            _lease: Arc::clone(&dom.lease),
            addr,
            mapping: self,
        })
    }
}

/// A grant mapping that also keeps its domain's memory (and its hold on its id) alive: the page's
/// host address is valid for `PAGE_SIZE` bytes (writable if the mapping is) until this is
/// dropped.
#[derive(Debug)]
pub struct PinnedGrant {
    mapping: GrantMapping,
    addr: usize,
    _ram: Arc<crate::memory::GuestRam>,
    /// After the memory: the id is given back once the memory is.
    _lease: Arc<crate::domid::DomidLease>,
}

impl PinnedGrant {
    /// Host address of the granted page.
    pub fn host_addr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The mapping underneath.
    pub fn mapping(&self) -> &GrantMapping {
        &self.mapping
    }
}

/// The granted pages of one shared ring, mapped writable and pinned, and one host range that
/// shows them in order: the pages themselves where the guest's frames follow each other, else a
/// second mapping of them ([`PageView`]), as Xen maps a multi-page ring from scattered frames.
#[derive(Debug)]
pub struct RingPages {
    /// Declared first: unmapped before the grants are released.
    view: Option<PageView>,
    pages: Vec<PinnedGrant>,
}

impl RingPages {
    /// Host address of the ring's first byte; `page_count() * PAGE_SIZE` bytes are valid (and
    /// writable) until this is dropped.
    pub fn host_addr(&self) -> *mut u8 {
        self.view
            .as_ref()
            .map_or_else(|| self.pages[0].host_addr(), PageView::host_addr)
    }

    /// Pages in the ring.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Whether the pages needed a view of their own (scattered frames).
    pub fn is_view(&self) -> bool {
        self.view.is_some()
    }
}

/// Maps the ring `granter` shared as `refs` (in ring order) writable for `mapper`.
pub fn map_ring(granter: &Arc<DomainShared>, refs: &[GrantRef], mapper: u32) -> Result<RingPages> {
    if refs.is_empty() {
        return Err(GrantError::View(0));
    }
    let pages = refs
        .iter()
        .map(|&r| map(granter, r, mapper, false).and_then(GrantMapping::pin))
        .collect::<Result<Vec<_>>>()?;
    let first = pages[0].host_addr() as usize;
    let contiguous = pages
        .iter()
        .enumerate()
        .all(|(i, p)| p.host_addr() as usize == first + i * PAGE_SIZE);
    let view = if contiguous {
        None
    } else {
        let gpas: Vec<u64> = pages.iter().map(|p| p.mapping.gpa).collect();
        let v = granter.ram.map_view(&gpas).map_err(|e| {
            tracing::warn!(domid = granter.id, "ring of {} pages: {e}", refs.len());
            GrantError::View(refs.len())
        })?;
        Some(v)
    };
    Ok(RingPages { view, pages })
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        if let Some(d) = self.dom.upgrade() {
            release(&d, self.gref, self.writable, Some((self.gpa / 4096) as u32));
        }
    }
}

/// Copies `buf.len()` bytes out of grant `gref` of `granter` at `offset` without keeping a
/// mapping (Xen's grant copy).
pub fn copy_from(
    granter: &Arc<DomainShared>,
    gref: GrantRef,
    mapper: u32,
    offset: usize,
    buf: &mut [u8],
) -> Result<()> {
    map(granter, gref, mapper, true)?.read(offset, buf)
}

/// Copies `buf` into grant `gref` of `granter` at `offset` without keeping a mapping.
pub fn copy_to(
    granter: &Arc<DomainShared>,
    gref: GrantRef,
    mapper: u32,
    offset: usize,
    buf: &[u8],
) -> Result<()> {
    map(granter, gref, mapper, false)?.write(offset, buf)
}

/// A persistent-mapping cache keyed by (domain, ref), for back-ends that keep grants mapped
/// (`feature-persistent`). Mappings end when evicted or when the cache is dropped.
#[derive(Debug, Default)]
pub struct GrantCache {
    maps: Mutex<HashMap<(u32, u32), Arc<GrantMapping>>>,
}

impl GrantCache {
    /// The cached mapping of (`granter`, `gref`), mapping it (writable unless `readonly`) on a
    /// miss. A cached read-only mapping does not satisfy a writable request.
    pub fn get(
        &self,
        granter: &Arc<DomainShared>,
        gref: GrantRef,
        mapper: u32,
        readonly: bool,
    ) -> Result<Arc<GrantMapping>> {
        let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let key = (granter.id, gref.0);
        // A hit must be of this very domain, not of an earlier one that had its id (the cached
        // Weak keeps that one's allocation, so the address cannot have been reused).
        if let Some(hit) = m
            .get(&key)
            .filter(|hit| std::ptr::eq(hit.dom.as_ptr(), Arc::as_ptr(granter)))
            .filter(|hit| readonly || hit.writable)
        {
            return Ok(Arc::clone(hit));
        }
        let fresh = Arc::new(map(granter, gref, mapper, readonly)?);
        m.insert(key, Arc::clone(&fresh));
        Ok(fresh)
    }

    /// Ends the cached mapping of (`domid`, `gref`), if any.
    pub fn evict(&self, domid: u32, gref: GrantRef) {
        let mut m = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(domid, gref.0));
    }

    /// Number of cached mappings.
    pub fn len(&self) -> usize {
        self.maps.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
