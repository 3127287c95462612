//! The other end of every ring, in memory, for tests (feature `test-utils`).
//!
//! Modelled on vm-virtio's `MockSplitQueue`: a test owns a [`RingMemory`], hands its region to the
//! code under test (a back end or a front end) and drives the opposite end with a
//! [`MockFrontEnd`] or [`MockBackEnd`]. Both mocks can also misbehave on purpose (scribble on
//! indices and slots) to test that the code under test survives a hostile peer.

extern crate alloc;

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use alloc::vec::Vec;
use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PAGE_SIZE;
use crate::ring::{BackRing, FrontRing, Result, RingProtocol, SringHeader, slot_size};
use crate::shared::SharedRegion;

/// The request of [`EchoRing`]: 64 bytes, a sequence number and a payload derived from it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct EchoReq {
    /// Sequence number.
    pub id: u64,
    /// Payload derived from `id` (see [`echo_request`]).
    pub data: [u64; 7],
}

/// The response of [`EchoRing`]: 16 bytes, the id answered and a checksum of its payload.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct EchoRsp {
    /// Id of the request answered.
    pub id: u64,
    /// FNV-1a-style checksum of the request's payload.
    pub sum: u64,
}

const _: () = assert!(size_of::<EchoReq>() == 64 && size_of::<EchoRsp>() == 16);

/// A test and benchmark protocol: 64-byte requests answered by checksums (32 slots a page).
#[derive(Debug)]
pub struct EchoRing;

impl RingProtocol for EchoRing {
    type Req = EchoReq;
    type Rsp = EchoRsp;
    const NAME: &'static str = "echo";
}

/// The request with sequence number `id`; every id gets a different payload (splitmix64).
pub fn echo_request(id: u64) -> EchoReq {
    let mut x = id;
    EchoReq {
        id,
        data: core::array::from_fn(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }),
    }
}

/// What an honest back end answers to `req`.
pub fn echo_answer(req: &EchoReq) -> EchoRsp {
    EchoRsp {
        id: req.id,
        sum: req.data.iter().fold(0xcbf2_9ce4_8422_2325, |a, d| {
            (a ^ d).wrapping_mul(0x100_0000_01b3)
        }),
    }
}

/// Page-aligned, zeroed memory standing in for granted pages.
#[derive(Debug)]
pub struct RingMemory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the memory is plain heap memory owned by this value; it is only reached through
// `region`, whose accesses are atomic.
unsafe impl Send for RingMemory {}

impl RingMemory {
    /// Allocates `pages` zeroed pages.
    ///
    /// # Panics
    /// If `pages` is zero or the allocation fails (test code).
    pub fn new(pages: usize) -> Self {
        assert!(pages > 0, "RingMemory needs at least one page");
        let layout = Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("ring layout");
        // SAFETY: `layout` has a non-zero size (pages > 0).
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).expect("ring allocation");
        Self { ptr, layout }
    }

    /// The shared region over this memory; copies of it may go to both ends of a ring.
    pub fn region(&mut self) -> SharedRegion<'_> {
        // SAFETY: the allocation lives as long as `self`, which the returned region borrows
        // mutably, so nothing else touches it except through (atomic) region accesses.
        unsafe { SharedRegion::from_raw(self.ptr.as_ptr(), self.layout.size()) }
            .expect("page-aligned allocation")
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.layout.size() / PAGE_SIZE
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout, and freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Writes `value` into a header index of the ring in `region`, as a hostile peer might.
fn scribble_index(region: &SharedRegion<'_>, field: usize, value: u32) {
    region
        .store_u32(field, value, Ordering::Release)
        .expect("header index in the first page");
}

/// Writes raw bytes over slot `idx` (taken modulo `slots`), as a hostile peer might.
fn scribble_slot<P: RingProtocol>(region: &SharedRegion<'_>, slots: u32, idx: u32, bytes: &[u8]) {
    let slot = slot_size::<P>();
    let off = crate::ring::RING_HEADER_SIZE + (idx & (slots - 1)) as usize * slot;
    region
        .write(off, &bytes[..bytes.len().min(slot)])
        .expect("slot inside the ring");
}

/// A front end driven by a test, to exercise a back end.
#[derive(Debug)]
pub struct MockFrontEnd<'a, P: RingProtocol> {
    ring: FrontRing<'a, P>,
    region: SharedRegion<'a>,
}

impl<'a, P: RingProtocol> MockFrontEnd<'a, P> {
    /// Initialises the ring in `region` as a front end does.
    pub fn new(region: SharedRegion<'a>, pages: usize) -> Result<Self> {
        Ok(Self {
            ring: FrontRing::new(region, pages)?,
            region,
        })
    }

    /// The real front-end endpoint underneath.
    pub fn ring(&mut self) -> &mut FrontRing<'a, P> {
        &mut self.ring
    }

    /// Pushes all `reqs` and publishes them; returns whether the back end asked to be notified.
    pub fn submit(&mut self, reqs: &[P::Req]) -> Result<bool> {
        for r in reqs {
            self.ring.push_request(r)?;
        }
        Ok(self.ring.commit_requests())
    }

    /// Takes every published response.
    pub fn responses(&mut self) -> Result<Vec<P::Rsp>> {
        let mut out = Vec::new();
        while let Some(r) = self.ring.take_response()? {
            out.push(r);
        }
        Ok(out)
    }

    /// Hostile: overwrites the shared `req_prod` with any value.
    pub fn scribble_req_prod(&self, value: u32) {
        scribble_index(&self.region, offset_of!(SringHeader, req_prod), value);
    }

    /// Hostile: overwrites the shared `rsp_event` with any value.
    pub fn scribble_rsp_event(&self, value: u32) {
        scribble_index(&self.region, offset_of!(SringHeader, rsp_event), value);
    }

    /// Hostile: writes raw bytes (for example an invalid request) into slot `idx`.
    pub fn scribble_slot(&self, idx: u32, bytes: &[u8]) {
        scribble_slot::<P>(&self.region, self.ring.size(), idx, bytes);
    }

    /// Hostile: writes a raw request into the next slot and publishes it, bypassing all checks of
    /// the front-end endpoint (which then no longer matches the shared ring: use it only to
    /// deliver garbage).
    pub fn inject_raw(&mut self, idx: u32, req: &P::Req) {
        self.scribble_slot(idx, req.as_bytes());
        self.scribble_req_prod(idx.wrapping_add(1));
    }
}

impl MockFrontEnd<'_, crate::blkif::BlkRing> {
    /// Takes every published block response as `(id, status)`, sorted by id (a back end may
    /// answer in any order).
    ///
    /// # Panics
    /// If the ring is broken or a response does not parse (test code).
    pub fn blk_statuses(&mut self) -> Vec<(u64, crate::blkif::BlkStatus)> {
        let mut v: Vec<_> = self
            .responses()
            .expect("ring intact")
            .iter()
            .map(|r| {
                let r = crate::blkif::BlkResponse::parse(r).expect("valid response");
                (r.id, r.status)
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }
}

/// A back end driven by a test, to exercise a front end.
#[derive(Debug)]
pub struct MockBackEnd<'a, P: RingProtocol> {
    ring: BackRing<'a, P>,
    region: SharedRegion<'a>,
}

impl<'a, P: RingProtocol> MockBackEnd<'a, P> {
    /// Attaches to a ring a front end initialised in `region`.
    pub fn attach(region: SharedRegion<'a>, pages: usize) -> Result<Self> {
        Ok(Self {
            ring: BackRing::attach(region, pages)?,
            region,
        })
    }

    /// The real back-end endpoint underneath.
    pub fn ring(&mut self) -> &mut BackRing<'a, P> {
        &mut self.ring
    }

    /// Takes every published request.
    pub fn requests(&mut self) -> Result<Vec<P::Req>> {
        let mut out = Vec::new();
        while let Some(r) = self.ring.take_request()? {
            out.push(r);
        }
        Ok(out)
    }

    /// Answers every published request with `answer` and publishes the responses; returns how many
    /// were answered and whether the front end asked to be notified.
    pub fn serve(&mut self, mut answer: impl FnMut(&P::Req) -> P::Rsp) -> Result<(usize, bool)> {
        let reqs = self.requests()?;
        for r in &reqs {
            self.ring.push_response(&answer(r))?;
        }
        Ok((reqs.len(), self.ring.commit_responses()))
    }

    /// Hostile: overwrites the shared `rsp_prod` with any value.
    pub fn scribble_rsp_prod(&self, value: u32) {
        scribble_index(&self.region, offset_of!(SringHeader, rsp_prod), value);
    }

    /// Hostile: overwrites the shared `req_event` with any value.
    pub fn scribble_req_event(&self, value: u32) {
        scribble_index(&self.region, offset_of!(SringHeader, req_event), value);
    }

    /// Hostile: writes raw bytes (for example an invalid response) into slot `idx`.
    pub fn scribble_slot(&self, idx: u32, bytes: &[u8]) {
        scribble_slot::<P>(&self.region, self.ring.size(), idx, bytes);
    }
}
