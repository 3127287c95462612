//! The shared request/response ring (`pv_protocol::ring`): a real `FrontRing` and a real
//! `BackRing` on one shared page, driven through a random interleaving of their operations while
//! a hostile party scribbles on every shared index (`req_prod`, `rsp_prod`, `req_event`,
//! `rsp_event`) and on slots, then stops.
//!
//! Invariants (ARCHITECTURE.md, "Trust boundaries"):
//! - no panic, no out-of-bounds access (ASan), no overflow (overflow checks are on);
//! - never more than `size` entries taken per valid state: the back end never holds more than
//!   `size` unanswered requests, the front end never takes more responses than it published;
//! - once broken always broken: every later call of that end returns the same error;
//! - while only event indices are scribbled on, every request is delivered exactly once and in
//!   order, answered in order, and a side that went to sleep is always notified;
//! - once the hostile writes stop (and the producer indices hold their ends' last published
//!   values again), one round of honest traffic either breaks a ring end or leaves both ends
//!   idle, after which a fresh batch of requests is delivered exactly once and in order.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pv_protocol::ring::{BackRing, FrontRing, RingError};
use pv_protocol::test_utils::{EchoReq, EchoRing, EchoRsp, RingMemory, echo_answer, echo_request};
use std::sync::atomic::Ordering;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    /// Relative to the honest value of that index.
    Near(i8),
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    FrontPush(u8),
    FrontCommit,
    FrontTake(u8),
    FrontSleep,
    FrontSleepAfter(u8),
    BackTake(u8),
    BackAnswer(u8),
    BackCommit,
    BackSleep,
    BackPeek,
    // Hostile writes.
    ReqProd(Value),
    RspProd(Value),
    ReqEvent(Value),
    RspEvent(Value),
    Slot { idx: u16, at: u8, bytes: [u8; 8] },
}

#[derive(Arbitrary, Debug)]
struct Input {
    two_pages: bool,
    ops: Vec<Op>,
    final_batch: u8,
}

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// One end's error latch: once an end has failed, every later fallible call must fail the same.
#[derive(Default)]
struct Latch(Option<RingError>);

impl Latch {
    fn check<T>(&mut self, r: Result<T, RingError>, broken_now: Option<RingError>) -> Option<T> {
        match (self.0, r) {
            (Some(e), Err(got)) => {
                assert_eq!(got, e, "a broken ring changed its error");
                None
            }
            (Some(e), Ok(_)) => panic!("a ring broken by {e:?} worked again"),
            (None, Ok(v)) => Some(v),
            (None, Err(e @ RingError::ProducerOverrun { .. })) => {
                assert_eq!(broken_now, Some(e));
                self.0 = Some(e);
                None
            }
            // Full / NoOutstandingRequest are refusals of a local mistake, not breakage.
            (None, Err(RingError::Full | RingError::NoOutstandingRequest)) => None,
            (None, Err(e)) => panic!("unexpected {e:?}"),
        }
    }
}

struct World<'a> {
    front: FrontRing<'a, EchoRing>,
    back: BackRing<'a, EchoRing>,
    region: pv_protocol::SharedRegion<'a>,
    size: u32,
    front_latch: Latch,
    back_latch: Latch,
    /// Next id the front end pushes, and how many it has published.
    next_push: u64,
    published: u64,
    /// Responses the front end took.
    taken_rsp: u64,
    /// Requests the back end took and has not answered, oldest first.
    pending: std::collections::VecDeque<EchoReq>,
    taken_req: u64,
    answered: u64,
    /// Responses the back end published.
    committed: u64,
    /// A producer index or slot was scribbled on: contents and counts may be garbage.
    tainted: bool,
    /// An event index was scribbled on: notifications may be lost.
    events_untrusted: bool,
    back_asleep: bool,
    front_asleep: bool,
}

impl World<'_> {
    fn sizes_hold(&self) {
        assert!(self.back.outstanding() <= self.size);
        assert!(self.front.in_flight() <= self.size);
        assert_eq!(
            self.front.free_requests() + self.front.in_flight(),
            self.size
        );
        assert!(self.pending.len() as u32 <= self.size);
        assert_eq!(self.pending.len() as u32, self.back.outstanding());
        assert!(
            self.taken_rsp <= self.published,
            "more responses than published requests"
        );
        assert!(self.taken_req - self.answered <= u64::from(self.size));
    }

    fn scribble(&mut self, field: usize, v: Value, honest: u32) {
        let value = match v {
            Value::Near(d) => honest.wrapping_add(d as i32 as u32),
            Value::Any(x) => x,
        };
        self.region
            .store_u32(field, value, Ordering::Release)
            .unwrap();
    }

    fn front_push(&mut self, n: u8) {
        for _ in 0..n % 8 + 1 {
            let r = self.front.push_request(&echo_request(self.next_push));
            let b = self.front.broken();
            if self.front_latch.check(r, b).is_some() {
                self.next_push += 1;
            }
        }
    }

    fn front_commit(&mut self) -> bool {
        let before = self.front.in_flight();
        let new = self.next_push - self.published;
        let notify = self.front.commit_requests();
        self.published = self.next_push;
        assert_eq!(self.front.in_flight(), before);
        if new > 0 && self.back_asleep && !self.events_untrusted {
            assert!(notify, "the back end slept through {new} new requests");
        }
        if notify {
            self.back_asleep = false;
        }
        notify
    }

    fn front_take(&mut self, n: u8) -> u64 {
        let mut got = 0;
        for _ in 0..u32::from(n) % (2 * self.size) + 1 {
            let r = self.front.take_response();
            let b = self.front.broken();
            match self.front_latch.check(r, b) {
                Some(Some(rsp)) => {
                    if !self.tainted {
                        let want: EchoRsp = echo_answer(&echo_request(self.taken_rsp));
                        assert_eq!(rsp, want, "response out of order");
                    }
                    self.taken_rsp += 1;
                    got += 1;
                    self.front_asleep = false;
                }
                _ => break,
            }
        }
        got
    }

    fn back_take(&mut self, n: u32) -> u64 {
        let mut got = 0;
        for _ in 0..n {
            let r = self.back.take_request();
            let b = self.back.broken();
            match self.back_latch.check(r, b) {
                Some(Some(req)) => {
                    if !self.tainted {
                        assert_eq!(req, echo_request(self.taken_req), "request out of order");
                    }
                    self.taken_req += 1;
                    self.pending.push_back(req);
                    got += 1;
                    self.back_asleep = false;
                }
                _ => break,
            }
        }
        got
    }

    fn back_answer(&mut self, n: u32) {
        for _ in 0..n {
            let Some(req) = self.pending.front().copied() else {
                assert!(matches!(
                    self.back.push_response(&echo_answer(&echo_request(0))),
                    Err(RingError::NoOutstandingRequest) | Err(RingError::ProducerOverrun { .. })
                ));
                return;
            };
            let r = self.back.push_response(&echo_answer(&req));
            let b = self.back.broken();
            if self.back_latch.check(r, b).is_none() {
                return;
            }
            self.pending.pop_front();
            self.answered += 1;
        }
    }

    fn back_commit(&mut self) {
        let notify = self.back.commit_responses();
        self.committed = self.answered;
        if self.front_asleep && !self.events_untrusted && self.answered > self.taken_rsp {
            assert!(notify, "the front end slept through its responses");
        }
        if notify {
            self.front_asleep = false;
        }
    }

    fn broken(&self) -> bool {
        self.front_latch.0.is_some() || self.back_latch.0.is_some()
    }

    /// Answers everything, both ways, once.
    fn round(&mut self) {
        self.back_take(2 * self.size);
        self.back_answer(self.size);
        self.back_commit();
        self.front_take(255);
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::FrontPush(n) => self.front_push(n),
            Op::FrontCommit => {
                self.front_commit();
            }
            Op::FrontTake(n) => {
                self.front_take(n);
            }
            Op::FrontSleep | Op::FrontSleepAfter(_) => {
                let k = if let Op::FrontSleepAfter(k) = op {
                    u32::from(k)
                } else {
                    1
                };
                // The batch it asks for: at most what is in flight. Only a front end waiting
                // for the very next response is promised a wake-up by the next publication; a
                // later, larger batch replaces an earlier request.
                let n = k.clamp(1, self.front.in_flight().max(1));
                let r = self.front.final_check_for_responses_after(k);
                let b = self.front.broken();
                self.front_asleep = self.front_latch.check(r, b) == Some(false) && n == 1;
            }
            Op::BackTake(n) => {
                self.back_take(u32::from(n) % (2 * self.size) + 1);
            }
            Op::BackAnswer(n) => self.back_answer(u32::from(n) % self.size + 1),
            Op::BackCommit => self.back_commit(),
            Op::BackSleep => {
                let r = self.back.final_check_for_requests();
                let b = self.back.broken();
                if self.back_latch.check(r, b) == Some(false) {
                    self.back_asleep = true;
                }
            }
            Op::BackPeek => {
                let r = self.back.unconsumed_requests();
                let b = self.back.broken();
                if let Some(n) = self.back_latch.check(r, b) {
                    assert!(n + self.back.outstanding() <= self.size);
                }
            }
            Op::ReqProd(v) => {
                self.tainted = true;
                self.events_untrusted = true;
                self.scribble(REQ_PROD, v, self.published as u32);
            }
            Op::RspProd(v) => {
                self.tainted = true;
                self.events_untrusted = true;
                self.scribble(RSP_PROD, v, self.answered as u32);
            }
            Op::ReqEvent(v) => {
                self.events_untrusted = true;
                self.scribble(REQ_EVENT, v, self.taken_req as u32);
            }
            Op::RspEvent(v) => {
                self.events_untrusted = true;
                self.scribble(RSP_EVENT, v, self.taken_rsp as u32);
            }
            Op::Slot { idx, at, bytes } => {
                self.tainted = true;
                let slot = 64usize; // EchoRing: 64-byte slots
                let off = 64
                    + (u32::from(idx) % self.size) as usize * slot
                    + usize::from(at) % (slot - 7);
                self.region.write(off, &bytes).unwrap();
            }
        }
        self.sizes_hold();
    }
}

fuzz_target!(|input: Input| {
    let pages = if input.two_pages { 2 } else { 1 };
    let mut mem = RingMemory::new(pages);
    let region = mem.region();
    let front = FrontRing::<EchoRing>::new(region, pages).unwrap();
    let back = BackRing::<EchoRing>::attach(region, pages).unwrap();
    let size = back.size();
    assert_eq!(size, front.size());
    let mut w = World {
        front,
        back,
        region,
        size,
        front_latch: Latch::default(),
        back_latch: Latch::default(),
        next_push: 0,
        published: 0,
        taken_rsp: 0,
        pending: Default::default(),
        taken_req: 0,
        answered: 0,
        committed: 0,
        tainted: false,
        events_untrusted: false,
        back_asleep: false,
        front_asleep: false,
    };
    for op in input.ops.iter().take(512) {
        w.step(*op);
    }
    // The hostile writes stop. Each producer index again holds what its end last published (the
    // end's next publication would write it anyway; an honest end never republishes an unchanged
    // index, so without this a scribbled one could stall the ring for good without breaking it).
    // Event indices keep whatever was scribbled. Publish what was pushed, answer everything.
    region
        .store_u32(REQ_PROD, w.published as u32, Ordering::Release)
        .unwrap();
    region
        .store_u32(RSP_PROD, w.committed as u32, Ordering::Release)
        .unwrap();
    w.front_commit();
    w.round();
    if !w.tainted && !w.broken() {
        // Nothing but event indices was touched: everything was delivered exactly once.
        assert_eq!(w.taken_req, w.published);
        assert_eq!(w.taken_rsp, w.published);
        assert_eq!(w.front.in_flight(), (w.next_push - w.published) as u32);
    }
    // One honest round: push one, publish, serve, take.
    w.front_push(0);
    w.front_commit();
    w.round();
    if w.broken() {
        return;
    }
    assert_eq!(
        w.front.in_flight(),
        0,
        "requests stuck after the hostile writes stopped"
    );
    assert_eq!(w.back.outstanding(), 0);
    // Resynchronised: a fresh batch goes through exactly once, in order, with its contents.
    let n = u64::from(input.final_batch) % u64::from(size) + 1;
    let first = w.next_push;
    for i in 0..n {
        w.front.push_request(&echo_request(first + i)).unwrap();
    }
    w.next_push += n;
    w.front_commit();
    for i in 0..n {
        let req = w.back.take_request().unwrap().expect("request delivered");
        assert_eq!(req, echo_request(first + i));
        w.back.push_response(&echo_answer(&req)).unwrap();
    }
    assert_eq!(w.back.take_request(), Ok(None));
    w.back.commit_responses();
    for i in 0..n {
        let rsp = w
            .front
            .take_response()
            .unwrap()
            .expect("response delivered");
        assert_eq!(rsp, echo_answer(&echo_request(first + i)));
    }
    assert_eq!(w.front.take_response(), Ok(None));
});
