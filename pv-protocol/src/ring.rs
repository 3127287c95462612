//! Xen-style shared request/response rings with event-index notification.
//!
//! # Layout
//! A ring occupies 1, 2, 4, 8 or 16 contiguous pages: a 64-byte header
//! `{req_prod, req_event, rsp_prod, rsp_event: u32, pad[48]}` followed by a power-of-two array of
//! slots. A slot holds either a request or, once the back end has answered it, the response (Xen's
//! union), so its size is the larger of the two. Indices are free-running `u32`s that wrap; a slot
//! is `index & (slots - 1)`.
//!
//! # Endpoints
//! The front end ([`FrontRing`]) produces requests and consumes responses; the back end
//! ([`BackRing`]) does the opposite. Each keeps its own indices privately (`req_prod_pvt` /
//! `rsp_cons`, `rsp_prod_pvt` / `req_cons`) and only *writes* its own shared indices; it never
//! reads back a value it owns from shared memory, since the peer may have scribbled on it.
//!
//! # Hostile peers
//! The peer can write any header field or slot at any time. Each slot is copied out exactly once
//! (through [`SharedRegion`]'s atomic copies) and handed to the caller as a value; the shared slot
//! is never read again. A peer's producer index is checked against what the protocol allows: a back
//! end refuses a `req_prod` that claims more requests than there are free slots, a front end
//! refuses a `rsp_prod` that answers requests it never published. Either marks the endpoint
//! broken: every later operation returns the same error, so the caller tears the ring down. No
//! operation loops more than once per slot, indexes outside the region or panics.
//!
//! # Notification (event indices)
//! A consumer going to sleep writes `*_event = cons + 1` ("wake me when the producer passes
//! this"), then re-checks for work (the final check). A producer publishing `old..new` must notify
//! iff `event` lies in `(old, new]`, computed with wrapping arithmetic as
//! `new - event < new - old`. Each side separates its store from its load of the other side's index
//! with a full fence, so at least one of them sees the other: either the producer notifies or the
//! consumer finds the work in its final check. That closes the lost-wakeup race.

use core::marker::PhantomData;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{Ordering, fence};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PAGE_SIZE;
use crate::shared::{RegionError, SharedRegion};

/// Errors from ring endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The memory handed to the ring does not fit its geometry.
    #[error("bad ring memory")]
    Region(#[from] RegionError),
    /// The page count is not 1, 2, 4, 8 or 16.
    #[error("ring of {0} pages is not supported (1, 2, 4, 8 or 16)")]
    BadPageCount(usize),
    /// The region is not exactly `pages * PAGE_SIZE` bytes.
    #[error("ring region is {len} bytes, {pages} pages need {} bytes", pages * PAGE_SIZE)]
    BadRegionSize {
        /// Bytes given.
        len: usize,
        /// Pages asked for.
        pages: usize,
    },
    /// Every slot holds a request that has not been answered yet.
    #[error("ring is full")]
    Full,
    /// The back end tried to respond with no request awaiting a response (a local bug).
    #[error("no request is awaiting a response")]
    NoOutstandingRequest,
    /// The peer published a producer index the protocol does not allow: the ring is now broken.
    #[error(
        "peer's {which} index {prod:#x} is invalid (consumer at {cons:#x}, {limit} slots allowed)"
    )]
    ProducerOverrun {
        /// Which index: `req_prod` or `rsp_prod`.
        which: &'static str,
        /// The value the peer published.
        prod: u32,
        /// Our consumer index when it was seen.
        cons: u32,
        /// How many unconsumed entries were allowed at that point.
        limit: u32,
    },
}

/// Result alias for ring operations.
pub type Result<T> = core::result::Result<T, RingError>;

/// A ring protocol: what one slot of a shared ring holds.
///
/// Implemented by zero-sized marker types (`BlkRing`, `NetTxRing`, ...). The slot size is the
/// larger of the two wire types, rounded up to their alignment; it must be a multiple of 4 bytes.
pub trait RingProtocol {
    /// Request as laid out in a slot (raw wire form: parse it after taking it off the ring).
    type Req: FromBytes + IntoBytes + Immutable + KnownLayout + Copy;
    /// Response as laid out in a slot.
    type Rsp: FromBytes + IntoBytes + Immutable + KnownLayout + Copy;
    /// Short name for logs.
    const NAME: &'static str;
}

/// Shared ring header as it lies in memory (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SringHeader {
    /// Requests produced by the front end (free-running).
    pub req_prod: u32,
    /// Back end wants a notification when `req_prod` passes this.
    pub req_event: u32,
    /// Responses produced by the back end (free-running).
    pub rsp_prod: u32,
    /// Front end wants a notification when `rsp_prod` passes this.
    pub rsp_event: u32,
    /// Pads the header to 64 bytes so slots start on a cache line.
    pub _pad: [u8; 48],
}

/// Size of the shared header that precedes the slots.
pub const RING_HEADER_SIZE: usize = 64;
const REQ_PROD: usize = offset_of!(SringHeader, req_prod);
const REQ_EVENT: usize = offset_of!(SringHeader, req_event);
const RSP_PROD: usize = offset_of!(SringHeader, rsp_prod);
const RSP_EVENT: usize = offset_of!(SringHeader, rsp_event);
const _: () = assert!(size_of::<SringHeader>() == RING_HEADER_SIZE);
const _: () = assert!(REQ_PROD == 0 && REQ_EVENT == 4 && RSP_PROD == 8 && RSP_EVENT == 12);

/// Largest supported ring, in pages (Xen's `max-ring-page-order` of 4).
pub const MAX_RING_PAGES: usize = 16;

/// Size in bytes of one slot of protocol `P`: the larger wire type, rounded up to the alignment.
pub const fn slot_size<P: RingProtocol>() -> usize {
    let req = size_of::<P::Req>();
    let rsp = size_of::<P::Rsp>();
    let size = if req > rsp { req } else { rsp };
    let a_req = core::mem::align_of::<P::Req>();
    let a_rsp = core::mem::align_of::<P::Rsp>();
    let align = if a_req > a_rsp { a_req } else { a_rsp };
    size.div_ceil(align) * align
}

/// Number of slots of protocol `P` in a ring of `pages` pages (rounded down to a power of two,
/// as Xen's `__RING_SIZE`), or an error for an unsupported page count.
pub fn ring_slots<P: RingProtocol>(pages: usize) -> Result<u32> {
    if !pages.is_power_of_two() || pages > MAX_RING_PAGES {
        return Err(RingError::BadPageCount(pages));
    }
    let fit = (pages * PAGE_SIZE - RING_HEADER_SIZE) / slot_size::<P>();
    // `fit >= 1` for every protocol whose slot fits in a page, enforced in `Geometry::new`.
    Ok(1u32 << (usize::BITS - 1 - fit.leading_zeros()))
}

/// `true` iff a producer that moved its index from `old` to `new` must notify a consumer that
/// asked to be woken when the index passes `event` (Xen's `RING_PUSH_*_AND_CHECK_NOTIFY` rule:
/// `event` lies in `(old, new]`, in wrapping arithmetic).
pub fn need_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The part common to both endpoints: the memory and its validated geometry.
#[derive(Debug)]
struct Geometry<'a, P> {
    region: SharedRegion<'a>,
    /// Number of slots, a power of two.
    size: u32,
    slot: usize,
    _p: PhantomData<fn() -> P>,
}

impl<'a, P: RingProtocol> Geometry<'a, P> {
    const SLOT_OK: () = assert!(
        slot_size::<P>().is_multiple_of(4) && slot_size::<P>() <= PAGE_SIZE - RING_HEADER_SIZE,
        "ring slots must be a multiple of 4 bytes and fit in one page"
    );

    fn new(region: SharedRegion<'a>, pages: usize) -> Result<Self> {
        #[allow(clippy::let_unit_value)]
        let () = Self::SLOT_OK;
        let size = ring_slots::<P>(pages)?;
        if region.len() != pages * PAGE_SIZE {
            return Err(RingError::BadRegionSize {
                len: region.len(),
                pages,
            });
        }
        Ok(Self {
            region,
            size,
            slot: slot_size::<P>(),
            _p: PhantomData,
        })
    }

    fn index(&self, field: usize) -> &core::sync::atomic::AtomicU32 {
        // SAFETY: `field` is one of the four header offsets, all 4-aligned and < 16, and the
        // region is at least one page (checked in `new`).
        unsafe { self.region.atomic_u32(field) }
    }

    fn slot_offset(&self, idx: u32) -> usize {
        RING_HEADER_SIZE + (idx & (self.size - 1)) as usize * self.slot
    }

    /// Copies the value of type `T` out of slot `idx` (once; the slot is not read again).
    fn read_slot<T: FromBytes + IntoBytes>(&self, idx: u32) -> T {
        let mut out = T::new_zeroed();
        // SAFETY: the slot lies within the region: `size * slot + header <= pages * PAGE_SIZE` by
        // construction of `size`, and `size_of::<T>() <= slot`.
        unsafe {
            self.region
                .read_unchecked(self.slot_offset(idx), out.as_mut_bytes())
        };
        out
    }

    fn write_slot<T: IntoBytes + Immutable>(&self, idx: u32, value: &T) {
        // SAFETY: as in `read_slot`.
        unsafe {
            self.region
                .write_unchecked(self.slot_offset(idx), value.as_bytes())
        };
    }

    /// Publishes our producer index at `prod` (moving it from `old` to `new`) and applies the
    /// event-index rule to the consumer's index at `event`: `true` means notify the consumer.
    fn publish(&self, prod: usize, event: usize, old: u32, new: u32) -> bool {
        // Release: the consumer, after its acquire load of this index, must see the slots we
        // wrote before it.
        self.index(prod).store(new, Ordering::Release);
        // Full fence: the new producer index must be visible to the consumer before we read its
        // event index, pairing with the fence in `arm_event` on the other side; otherwise both
        // could miss each other and the consumer would sleep on published work.
        fence(Ordering::SeqCst);
        need_notify(old, new, self.index(event).load(Ordering::Relaxed))
    }

    /// Asks the producer to notify once its index passes `value`; called before a final check.
    fn arm_event(&self, event: usize, value: u32) {
        // Relaxed store, then a full fence: the producer must see the new event index before we
        // re-read its producer index, pairing with the fence in `publish`.
        self.index(event).store(value, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Loads the peer's producer index at `prod` and checks that it puts at most `limit` entries
    /// past our consumer index `cons`.
    fn peer_prod(&self, prod: usize, which: &'static str, cons: u32, limit: u32) -> Result<u32> {
        // Acquire: slots the peer wrote before its release store of this index must be visible
        // before we copy them out.
        let value = self.index(prod).load(Ordering::Acquire);
        if value.wrapping_sub(cons) > limit {
            return Err(RingError::ProducerOverrun {
                which,
                prod: value,
                cons,
                limit,
            });
        }
        Ok(value)
    }
}

/// The front end of a ring: produces requests, consumes responses.
#[derive(Debug)]
pub struct FrontRing<'a, P: RingProtocol> {
    geo: Geometry<'a, P>,
    req_prod_pvt: u32,
    /// The last `req_prod` we published (kept privately: the shared copy may be scribbled on).
    req_prod: u32,
    rsp_cons: u32,
    /// Last validated `rsp_prod` seen; responses up to it can be taken without re-reading it.
    rsp_prod_seen: u32,
    broken: Option<RingError>,
}

impl<'a, P: RingProtocol> FrontRing<'a, P> {
    /// Initialises the shared ring in `region` (`pages` pages) and returns its front end
    /// (Xen's `SHARED_RING_INIT` + `FRONT_RING_INIT`).
    pub fn new(region: SharedRegion<'a>, pages: usize) -> Result<Self> {
        let geo = Geometry::new(region, pages)?;
        // Relaxed: the back end attaches only after learning of the ring through the store, which
        // orders these stores before its first access.
        geo.index(REQ_PROD).store(0, Ordering::Relaxed);
        geo.index(RSP_PROD).store(0, Ordering::Relaxed);
        geo.index(REQ_EVENT).store(1, Ordering::Relaxed);
        geo.index(RSP_EVENT).store(1, Ordering::Relaxed);
        Ok(Self {
            geo,
            req_prod_pvt: 0,
            req_prod: 0,
            rsp_cons: 0,
            rsp_prod_seen: 0,
            broken: None,
        })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.geo.size
    }

    /// Slots free for new requests.
    pub fn free_requests(&self) -> u32 {
        self.geo.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Requests pushed (published or not) that have no response taken yet.
    pub fn in_flight(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// The error that broke this ring, if any.
    pub fn broken(&self) -> Option<RingError> {
        self.broken
    }

    /// Writes `req` into the next free slot without publishing it (Xen's `req_prod_pvt++`).
    /// Publish a batch with [`commit_requests`](Self::commit_requests).
    pub fn push_request(&mut self, req: &P::Req) -> Result<()> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.free_requests() == 0 {
            return Err(RingError::Full);
        }
        self.geo.write_slot(self.req_prod_pvt, req);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed request and returns whether the back end must be notified.
    pub fn commit_requests(&mut self) -> bool {
        let (old, new) = (self.req_prod, self.req_prod_pvt);
        if old == new {
            return false;
        }
        self.req_prod = new;
        self.geo.publish(REQ_PROD, REQ_EVENT, old, new)
    }

    /// Validates the back end's `rsp_prod` and returns how many responses may be taken.
    fn unconsumed_responses(&mut self) -> Result<u32> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.rsp_cons != self.rsp_prod_seen {
            return Ok(self.rsp_prod_seen.wrapping_sub(self.rsp_cons));
        }
        // The back end can only answer requests we have published.
        let limit = self.req_prod.wrapping_sub(self.rsp_cons);
        let prod = self
            .geo
            .peer_prod(RSP_PROD, "rsp_prod", self.rsp_cons, limit)
            .inspect_err(|e| self.broken = Some(*e))?;
        self.rsp_prod_seen = prod;
        Ok(prod.wrapping_sub(self.rsp_cons))
    }

    /// Whether responses are waiting (validating the back end's index).
    pub fn has_unconsumed_responses(&mut self) -> Result<bool> {
        Ok(self.unconsumed_responses()? > 0)
    }

    /// Takes the next response, copied out of its slot, or `None` if there is none.
    pub fn take_response(&mut self) -> Result<Option<P::Rsp>> {
        if self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let rsp = self.geo.read_slot(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Before sleeping: asks to be notified of the next response, then checks once more
    /// (Xen's `RING_FINAL_CHECK_FOR_RESPONSES`). `true` means responses arrived: do not sleep.
    pub fn final_check_for_responses(&mut self) -> Result<bool> {
        self.final_check_for_responses_after(1)
    }

    /// As [`final_check_for_responses`](Self::final_check_for_responses), but asks to be woken
    /// only once `n` (at least 1) more responses have been published: a front end that waits for
    /// a batch saves notifications. `n` is clamped to the requests in flight.
    pub fn final_check_for_responses_after(&mut self, n: u32) -> Result<bool> {
        if self.has_unconsumed_responses()? {
            return Ok(true);
        }
        let n = n.clamp(1, self.in_flight().max(1));
        self.geo.arm_event(RSP_EVENT, self.rsp_cons.wrapping_add(n));
        self.has_unconsumed_responses()
    }
}

/// The back end of a ring: consumes requests, produces responses.
#[derive(Debug)]
pub struct BackRing<'a, P: RingProtocol> {
    geo: Geometry<'a, P>,
    rsp_prod_pvt: u32,
    /// The last `rsp_prod` we published (kept privately: the shared copy may be scribbled on).
    rsp_prod: u32,
    req_cons: u32,
    /// Last validated `req_prod` seen; requests up to it can be taken without re-reading it.
    req_prod_seen: u32,
    broken: Option<RingError>,
}

impl<'a, P: RingProtocol> BackRing<'a, P> {
    /// Attaches to a ring the front end initialised (Xen's `BACK_RING_ATTACH`): consumption starts
    /// at the shared `rsp_prod`, whatever value the front end left there.
    pub fn attach(region: SharedRegion<'a>, pages: usize) -> Result<Self> {
        let geo = Geometry::new(region, pages)?;
        // Relaxed: the store handshake (front end writes ring-ref, then we read it) orders the
        // front end's initialisation before this load; any value is safe to start from.
        let start = geo.index(RSP_PROD).load(Ordering::Relaxed);
        Ok(Self {
            geo,
            rsp_prod_pvt: start,
            rsp_prod: start,
            req_cons: start,
            req_prod_seen: start,
            broken: None,
        })
    }

    /// Number of slots.
    pub fn size(&self) -> u32 {
        self.geo.size
    }

    /// The error that broke this ring, if any.
    pub fn broken(&self) -> Option<RingError> {
        self.broken
    }

    /// Requests taken that have no response pushed yet.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// How many requests may be taken, re-reading (and validating) the front end's `req_prod`
    /// now. A back end that needs several at once, like netback placing one frame in several
    /// buffers, checks this before it takes any.
    pub fn unconsumed_requests(&mut self) -> Result<u32> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        // At most `size` requests can be unanswered (Xen's RING_REQUEST_CONS_OVERFLOW): the slots
        // of requests we took but have not answered are not free for new requests.
        let limit = self.geo.size - self.outstanding();
        let prod = self
            .geo
            .peer_prod(REQ_PROD, "req_prod", self.req_cons, limit)
            .inspect_err(|e| self.broken = Some(*e))?;
        self.req_prod_seen = prod;
        Ok(prod.wrapping_sub(self.req_cons))
    }

    /// As [`unconsumed_requests`](Self::unconsumed_requests), but without touching the shared
    /// index while requests seen earlier remain.
    fn cached_unconsumed_requests(&mut self) -> Result<u32> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.req_cons != self.req_prod_seen {
            return Ok(self.req_prod_seen.wrapping_sub(self.req_cons));
        }
        self.unconsumed_requests()
    }

    /// Whether requests are waiting (validating the front end's index).
    pub fn has_unconsumed_requests(&mut self) -> Result<bool> {
        Ok(self.cached_unconsumed_requests()? > 0)
    }

    /// Takes the next request, copied out of its slot, or `None` if there is none.
    pub fn take_request(&mut self) -> Result<Option<P::Req>> {
        if self.cached_unconsumed_requests()? == 0 {
            return Ok(None);
        }
        let req = self.geo.read_slot(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Writes a response into the slot of the oldest unanswered request, without publishing it.
    /// Publish a batch with [`commit_responses`](Self::commit_responses).
    pub fn push_response(&mut self, rsp: &P::Rsp) -> Result<()> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.outstanding() == 0 {
            return Err(RingError::NoOutstandingRequest);
        }
        self.geo.write_slot(self.rsp_prod_pvt, rsp);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed response and returns whether the front end must be notified.
    pub fn commit_responses(&mut self) -> bool {
        let (old, new) = (self.rsp_prod, self.rsp_prod_pvt);
        if old == new {
            return false;
        }
        self.rsp_prod = new;
        self.geo.publish(RSP_PROD, RSP_EVENT, old, new)
    }

    /// Before sleeping: asks to be notified of the next request, then checks once more
    /// (Xen's `RING_FINAL_CHECK_FOR_REQUESTS`). `true` means requests arrived: do not sleep.
    pub fn final_check_for_requests(&mut self) -> Result<bool> {
        if self.has_unconsumed_requests()? {
            return Ok(true);
        }
        self.geo.arm_event(REQ_EVENT, self.req_cons.wrapping_add(1));
        self.has_unconsumed_requests()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::collections::VecDeque;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;
    use crate::test_utils::{MockBackEnd, MockFrontEnd, RingMemory};

    type TestRing = crate::test_utils::EchoRing;
    type Req = crate::test_utils::EchoReq;
    type Rsp = crate::test_utils::EchoRsp;
    use crate::test_utils::{echo_answer as answer, echo_request as req};

    /// A 12-byte slot, as the net tx ring has: exercises 4-byte copies.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
    struct Small {
        a: u32,
        b: u16,
        c: u16,
        d: u32,
    }
    #[derive(Debug)]
    struct SmallRing;
    impl RingProtocol for SmallRing {
        type Req = Small;
        type Rsp = u32;
        const NAME: &'static str = "small";
    }

    #[test]
    fn slot_counts_match_xen_ring_size() {
        // 4032 / 64 = 63 -> 32; 16 pages: 65472 / 64 = 1023 -> 512.
        assert_eq!(ring_slots::<TestRing>(1).unwrap(), 32);
        assert_eq!(ring_slots::<TestRing>(16).unwrap(), 512);
        // 4032 / 12 = 336 -> 256, like Xen's netif tx ring.
        assert_eq!(ring_slots::<SmallRing>(1).unwrap(), 256);
        assert_eq!(slot_size::<SmallRing>(), 12);
        for bad in [0, 3, 5, 32] {
            assert_eq!(
                ring_slots::<TestRing>(bad),
                Err(RingError::BadPageCount(bad))
            );
        }
    }

    #[test]
    fn region_of_wrong_size_is_refused() {
        let mut mem = RingMemory::new(2);
        let region = mem.region();
        assert_eq!(
            FrontRing::<TestRing>::new(region, 1).unwrap_err(),
            RingError::BadRegionSize {
                len: 2 * PAGE_SIZE,
                pages: 1
            }
        );
    }

    #[test]
    fn requests_and_responses_cross_in_order() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = FrontRing::<TestRing>::new(region, 1).unwrap();
        let mut back = MockBackEnd::<TestRing>::attach(region, 1).unwrap();
        for id in 0..32 {
            front.push_request(&req(id)).unwrap();
        }
        assert_eq!(front.push_request(&req(99)), Err(RingError::Full));
        // The back end has not asked to be woken past req_event = 1, which 0..32 crosses.
        assert!(front.commit_requests());
        let (n, _) = back.serve(answer).unwrap();
        assert_eq!(n, 32);
        for id in 0..32 {
            assert_eq!(front.take_response().unwrap(), Some(answer(&req(id))));
        }
        assert_eq!(front.take_response().unwrap(), None);
        assert_eq!(front.free_requests(), 32);
    }

    #[test]
    fn twelve_byte_slots_round_trip() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = FrontRing::<SmallRing>::new(region, 1).unwrap();
        let mut back = BackRing::<SmallRing>::attach(region, 1).unwrap();
        for round in 0..3u32 {
            for i in 0..256u32 {
                let s = Small {
                    a: i,
                    b: round as u16,
                    c: 7,
                    d: !i,
                };
                front.push_request(&s).unwrap();
            }
            front.commit_requests();
            for i in 0..256u32 {
                let s = back.take_request().unwrap().unwrap();
                assert_eq!((s.a, s.b, s.c, s.d), (i, round as u16, 7, !i));
                back.push_response(&(s.a ^ s.d)).unwrap();
            }
            back.commit_responses();
            for _ in 0..256 {
                assert_eq!(front.take_response().unwrap(), Some(u32::MAX));
            }
        }
    }

    #[test]
    fn response_without_request_is_a_local_error() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let _front = FrontRing::<TestRing>::new(region, 1).unwrap();
        let mut back = BackRing::<TestRing>::attach(region, 1).unwrap();
        assert_eq!(
            back.push_response(&Rsp { id: 0, sum: 0 }),
            Err(RingError::NoOutstandingRequest)
        );
    }

    #[test]
    fn runaway_req_prod_breaks_the_ring_for_good() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let front = MockFrontEnd::<TestRing>::new(region, 1).unwrap();
        let mut back = BackRing::<TestRing>::attach(region, 1).unwrap();
        front.scribble_req_prod(33);
        let err = back.take_request().unwrap_err();
        assert_eq!(
            err,
            RingError::ProducerOverrun {
                which: "req_prod",
                prod: 33,
                cons: 0,
                limit: 32
            }
        );
        // Even once the index looks sane again, the endpoint stays broken.
        front.scribble_req_prod(1);
        assert_eq!(back.take_request(), Err(err));
        assert_eq!(back.final_check_for_requests(), Err(err));
        assert_eq!(back.broken(), Some(err));
    }

    #[test]
    fn req_prod_moving_backwards_breaks_the_ring() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = MockFrontEnd::<TestRing>::new(region, 1).unwrap();
        let mut back = BackRing::<TestRing>::attach(region, 1).unwrap();
        front.submit(&[req(1), req(2)]).unwrap();
        assert!(back.take_request().unwrap().is_some());
        assert!(back.take_request().unwrap().is_some());
        front.scribble_req_prod(1);
        assert!(matches!(
            back.take_request(),
            Err(RingError::ProducerOverrun {
                prod: 1,
                cons: 2,
                ..
            })
        ));
    }

    #[test]
    fn unanswered_requests_shrink_what_the_front_may_publish() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = MockFrontEnd::<TestRing>::new(region, 1).unwrap();
        let mut back = BackRing::<TestRing>::attach(region, 1).unwrap();
        let reqs: Vec<Req> = (0..20).map(req).collect();
        front.submit(&reqs).unwrap();
        for _ in 0..20 {
            back.take_request().unwrap().unwrap();
        }
        // 20 taken, none answered: only 12 slots are free, so 20 + 13 overflows.
        front.scribble_req_prod(33);
        assert!(matches!(
            back.take_request(),
            Err(RingError::ProducerOverrun { limit: 12, .. })
        ));
    }

    #[test]
    fn rsp_prod_beyond_published_requests_breaks_the_front() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = FrontRing::<TestRing>::new(region, 1).unwrap();
        let back = MockBackEnd::<TestRing>::attach(region, 1).unwrap();
        front.push_request(&req(1)).unwrap();
        front.push_request(&req(2)).unwrap();
        front.commit_requests();
        front.push_request(&req(3)).unwrap(); // pushed, not published
        back.scribble_rsp_prod(3);
        assert_eq!(
            front.take_response(),
            Err(RingError::ProducerOverrun {
                which: "rsp_prod",
                prod: 3,
                cons: 0,
                limit: 2
            })
        );
        assert!(front.push_request(&req(4)).is_err());
    }

    #[test]
    fn sleeping_back_end_is_woken_exactly_once_per_batch() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = FrontRing::<TestRing>::new(region, 1).unwrap();
        let mut back = BackRing::<TestRing>::attach(region, 1).unwrap();
        assert!(!back.final_check_for_requests().unwrap()); // back end sleeps, req_event = 1
        front.push_request(&req(0)).unwrap();
        front.push_request(&req(1)).unwrap();
        assert!(front.commit_requests()); // crosses req_event: wake it
        front.push_request(&req(2)).unwrap();
        assert!(!front.commit_requests()); // back end is awake (has not re-armed): no notify
        for _ in 0..3 {
            back.take_request().unwrap().unwrap();
        }
        assert!(!back.final_check_for_requests().unwrap());
        front.push_request(&req(3)).unwrap();
        assert!(front.commit_requests());
    }

    #[test]
    fn front_end_waiting_for_a_batch_is_woken_when_the_batch_is_complete() {
        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = FrontRing::<TestRing>::new(region, 1).unwrap();
        let mut back = BackRing::<TestRing>::attach(region, 1).unwrap();
        for id in 0..8 {
            front.push_request(&req(id)).unwrap();
        }
        front.commit_requests();
        assert!(!front.final_check_for_responses_after(4).unwrap());
        for i in 0..8 {
            let r = back.take_request().unwrap().unwrap();
            back.push_response(&answer(&r)).unwrap();
            // Responses 1..3 do not reach rsp_event = 4; the 4th does.
            let notify = back.commit_responses();
            assert_eq!(notify, i == 3, "response {i}");
        }
    }

    #[test]
    fn notify_rule_examples() {
        assert!(need_notify(0, 1, 1));
        assert!(!need_notify(1, 2, 1));
        assert!(need_notify(u32::MAX, 1, 0)); // wraps
        assert!(!need_notify(5, 5, 5)); // nothing published
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        Commit,
        BackTake(u8),
        BackAnswer(u8),
        BackCommit,
        FrontTake(u8),
        BackSleep,
        FrontSleep(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..40).prop_map(Op::Push),
            Just(Op::Commit),
            (1u8..40).prop_map(Op::BackTake),
            (1u8..40).prop_map(Op::BackAnswer),
            Just(Op::BackCommit),
            (1u8..40).prop_map(Op::FrontTake),
            Just(Op::BackSleep),
            (1u8..8).prop_map(Op::FrontSleep),
        ]
    }

    proptest! {
        /// Any interleaving of both ends' operations delivers every request and response exactly
        /// once, in order, with its content; a side that went to sleep after its final check is
        /// always notified when the work it asked for is published (no lost wake-up); a side that
        /// is awake is never notified.
        #[test]
        fn any_interleaving_preserves_order_content_and_wakeups(
            pages in prop::sample::select(&[1usize, 2, 4, 8, 16][..]),
            start in any::<u32>(),
            ops in prop::collection::vec(op(), 1..300),
        ) {
            let mut mem = RingMemory::new(pages);
            let region = mem.region();
            let mut front = FrontRing::<TestRing>::new(region, pages).unwrap();
            // Start the indices anywhere, so runs cross the u32 wrap.
            front.req_prod_pvt = start;
            front.req_prod = start;
            front.rsp_cons = start;
            front.rsp_prod_seen = start;
            region.store_u32(REQ_PROD, start, Ordering::Relaxed).unwrap();
            region.store_u32(RSP_PROD, start, Ordering::Relaxed).unwrap();
            region.store_u32(REQ_EVENT, start.wrapping_add(1), Ordering::Relaxed).unwrap();
            region.store_u32(RSP_EVENT, start.wrapping_add(1), Ordering::Relaxed).unwrap();
            let mut back = BackRing::<TestRing>::attach(region, pages).unwrap();
            let size = front.size();

            let mut next_id = 0u64;
            let mut published = 0u32; // pushed and committed, not yet taken by the back end
            let mut pushed = 0u32; // pushed, not committed
            let mut taken: VecDeque<Req> = VecDeque::new(); // taken by back end, unanswered
            let mut answered: VecDeque<Rsp> = VecDeque::new(); // pushed responses, uncommitted
            let mut delivered: VecDeque<Rsp> = VecDeque::new(); // committed responses
            let mut next_rsp = 0u64;
            let mut next_req = 0u64;
            // A freshly initialised ring has both events at 1: each side wants the first entry.
            let mut back_asleep = true;
            let mut delivered_total = 0u64;
            let mut front_target: Option<u64> = Some(1);

            for op in ops {
                match op {
                    Op::Push(n) => for _ in 0..n {
                        let r = front.push_request(&req(next_id));
                        if front.in_flight() == size && r.is_err() {
                            prop_assert_eq!(r, Err(RingError::Full));
                            break;
                        }
                        prop_assert!(r.is_ok());
                        next_id += 1;
                        pushed += 1;
                    },
                    Op::Commit => {
                        let notify = front.commit_requests();
                        let had = pushed;
                        published += pushed;
                        pushed = 0;
                        // A sleeping back end must be woken by the first commit of new work.
                        prop_assert_eq!(notify, back_asleep && had > 0);
                        if notify { back_asleep = false; }
                    }
                    Op::BackTake(n) => for _ in 0..n {
                        match back.take_request().unwrap() {
                            Some(r) => {
                                prop_assert_eq!(r, req(next_req));
                                next_req += 1;
                                published -= 1;
                                taken.push_back(r);
                            }
                            None => { prop_assert_eq!(published, 0); break; }
                        }
                    },
                    Op::BackAnswer(n) => for _ in 0..n {
                        let Some(r) = taken.pop_front() else {
                            prop_assert_eq!(back.push_response(&answer(&req(0))),
                                Err(RingError::NoOutstandingRequest));
                            break;
                        };
                        back.push_response(&answer(&r)).unwrap();
                        answered.push_back(answer(&r));
                    },
                    Op::BackCommit => {
                        let before = delivered_total;
                        delivered_total += answered.len() as u64;
                        let notify = back.commit_responses();
                        delivered.extend(answered.drain(..));
                        let expect = matches!(front_target,
                            Some(t) if before < t && t <= delivered_total);
                        // Notified exactly when the batch the front end waits for completes.
                        prop_assert_eq!(notify, expect);
                        if notify { front_target = None; }
                    }
                    Op::FrontTake(n) => for _ in 0..n {
                        match front.take_response().unwrap() {
                            Some(r) => {
                                prop_assert_eq!(Some(r), delivered.pop_front());
                                prop_assert_eq!(r, answer(&req(next_rsp)));
                                next_rsp += 1;
                            }
                            None => { prop_assert!(delivered.is_empty()); break; }
                        }
                    },
                    Op::BackSleep => {
                        if !back.final_check_for_requests().unwrap() {
                            prop_assert_eq!(published, 0);
                            back_asleep = true;
                        } else {
                            prop_assert!(published > 0);
                        }
                    }
                    Op::FrontSleep(k) => {
                        let in_flight = front.in_flight();
                        if !front.final_check_for_responses_after(u32::from(k)).unwrap() {
                            prop_assert!(delivered.is_empty());
                            let k = u32::from(k).clamp(1, in_flight.max(1));
                            front_target = Some(delivered_total + u64::from(k));
                        } else {
                            prop_assert!(!delivered.is_empty());
                        }
                    }
                }
            }
        }

        /// However the front end sets req_prod, the back end hands out at most what the ring can
        /// hold, in bounds, and otherwise reports an overrun naming the bad value.
        #[test]
        fn hostile_req_prod_never_yields_more_than_the_ring_holds(
            pages in prop::sample::select(&[1usize, 2, 4, 8, 16][..]),
            honest in 0u32..40,
            bogus in any::<u32>(),
        ) {
            let mut mem = RingMemory::new(pages);
            let region = mem.region();
            let mut front = MockFrontEnd::<TestRing>::new(region, pages).unwrap();
            let mut back = BackRing::<TestRing>::attach(region, pages).unwrap();
            let size = back.size();
            let honest = honest.min(size);
            let reqs: Vec<Req> = (0..u64::from(honest)).map(req).collect();
            front.submit(&reqs).unwrap();
            front.scribble_req_prod(bogus);
            let mut got = 0u32;
            loop {
                match back.take_request() {
                    Ok(Some(r)) => {
                        if got < honest { prop_assert_eq!(r, req(u64::from(got))); }
                        got += 1;
                        prop_assert!(got <= size);
                    }
                    Ok(None) => { prop_assert!(bogus <= size); prop_assert_eq!(got, bogus); break; }
                    Err(e) => {
                        prop_assert!(bogus > size);
                        prop_assert_eq!(got, 0);
                        let named = matches!(e, RingError::ProducerOverrun { prod, .. } if prod == bogus);
                        prop_assert!(named, "{e:?}");
                        break;
                    }
                }
            }
        }

        /// However the back end sets rsp_prod, the front end takes at most the responses to
        /// requests it published, and otherwise reports an overrun.
        #[test]
        fn hostile_rsp_prod_never_yields_unrequested_responses(
            published in 0u32..32,
            bogus in any::<u32>(),
        ) {
            let mut mem = RingMemory::new(1);
            let region = mem.region();
            let mut front = FrontRing::<TestRing>::new(region, 1).unwrap();
            let back = MockBackEnd::<TestRing>::attach(region, 1).unwrap();
            for id in 0..u64::from(published) { front.push_request(&req(id)).unwrap(); }
            front.commit_requests();
            back.scribble_rsp_prod(bogus);
            let mut got = 0u32;
            loop {
                match front.take_response() {
                    Ok(Some(_)) => { got += 1; prop_assert!(got <= published); }
                    Ok(None) => { prop_assert_eq!(got, bogus); break; }
                    Err(_) => { prop_assert!(bogus > published); prop_assert_eq!(got, 0); break; }
                }
            }
            prop_assert_eq!(front.free_requests(), 32 - published + got);
        }

        /// The notify decision is exactly "event lies in (old, new]" in wrapping arithmetic.
        #[test]
        fn notify_iff_event_in_published_range(old in any::<u32>(), n in 0u32..2000, off in 0u32..4000) {
            let new = old.wrapping_add(n);
            let event = old.wrapping_add(off);
            prop_assert_eq!(need_notify(old, new, event), off >= 1 && off <= n);
        }
    }
}
