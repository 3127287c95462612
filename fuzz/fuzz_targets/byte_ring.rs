//! The console and store byte rings (`pv_protocol::byte_ring`): a real producer and a real
//! consumer on one shared page, driven through a random interleaving while a hostile party
//! scribbles on both indices and on the data array, then stops.
//!
//! Invariants: no panic or out-of-bounds access; no call moves more than the ring's size; once
//! broken always broken (the same error every call); while nothing is scribbled on, every byte is
//! read exactly once and in order; once the hostile writes stop, one honest write and read either
//! break an end or resynchronise both, after which a fresh byte stream arrives exactly once and
//! in order.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pv_protocol::byte_ring::{ByteRingConsumer, ByteRingError, ByteRingLayout, ByteRingProducer};
use pv_protocol::test_utils::RingMemory;
use std::sync::atomic::Ordering;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Value {
    Near(i8),
    Any(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Write(u16),
    Read(u16),
    Free,
    Available,
    Prod(Value),
    Cons(Value),
    Data { at: u16, bytes: [u8; 4] },
}

#[derive(Arbitrary, Debug)]
enum Which {
    Tiny,
    StoreRequests,
    StoreResponses,
    ConsoleOut,
    ConsoleIn,
}

#[derive(Arbitrary, Debug)]
struct Input {
    which: Which,
    ops: Vec<Op>,
    tail: u16,
}

/// Byte `i` of the producer's stream (period far beyond any ring size).
fn stream(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

#[derive(Default)]
struct Latch(Option<ByteRingError>);

impl Latch {
    fn check<T>(&mut self, r: Result<T, ByteRingError>) -> Option<T> {
        match (self.0, r) {
            (Some(e), Err(got)) => {
                assert_eq!(got, e, "a broken ring changed its error");
                None
            }
            (Some(e), Ok(_)) => panic!("a ring broken by {e:?} worked again"),
            (None, Ok(v)) => Some(v),
            (None, Err(e @ ByteRingError::IndexOverrun { .. })) => {
                self.0 = Some(e);
                None
            }
            (None, Err(e)) => panic!("unexpected {e:?}"),
        }
    }
}

struct World<'a> {
    tx: ByteRingProducer<'a>,
    rx: ByteRingConsumer<'a>,
    region: pv_protocol::SharedRegion<'a>,
    layout: ByteRingLayout,
    size: usize,
    txl: Latch,
    rxl: Latch,
    written: u64,
    read: u64,
    tainted: bool,
}

impl World<'_> {
    fn write(&mut self, n: usize) -> Option<usize> {
        let buf: Vec<u8> = (0..n as u64).map(|i| stream(self.written + i)).collect();
        let k = self.txl.check(self.tx.write(&buf))?;
        assert!(k <= n && k <= self.size);
        if !self.tainted {
            assert_eq!(k, n.min(self.size - (self.written - self.read) as usize));
        }
        self.written += k as u64;
        Some(k)
    }

    fn read(&mut self, n: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; n];
        let k = self.rxl.check(self.rx.read(&mut buf))?;
        assert!(k <= n && k <= self.size);
        buf.truncate(k);
        if !self.tainted {
            assert_eq!(k as u64, (n as u64).min(self.written - self.read));
            for (i, b) in buf.iter().enumerate() {
                assert_eq!(*b, stream(self.read + i as u64), "byte out of order");
            }
        }
        self.read += k as u64;
        Some(buf)
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Write(n) => {
                self.write(usize::from(n) % (2 * self.size + 1));
            }
            Op::Read(n) => {
                self.read(usize::from(n) % (2 * self.size + 1));
            }
            Op::Free => {
                if let Some(f) = self.txl.check(self.tx.free()) {
                    assert!(f <= self.size);
                    if !self.tainted {
                        assert_eq!(f as u64, self.size as u64 - (self.written - self.read));
                    }
                }
            }
            Op::Available => {
                if let Some(a) = self.rxl.check(self.rx.available()) {
                    assert!(a <= self.size);
                    if !self.tainted {
                        assert_eq!(a as u64, self.written - self.read);
                    }
                }
            }
            Op::Prod(v) | Op::Cons(v) => {
                self.tainted = true;
                let (at, honest) = match op {
                    Op::Prod(_) => (self.layout.prod, self.written),
                    _ => (self.layout.cons, self.read),
                };
                let value = match v {
                    Value::Near(d) => (honest as u32).wrapping_add(d as i32 as u32),
                    Value::Any(x) => x,
                };
                self.region.store_u32(at, value, Ordering::Release).unwrap();
            }
            Op::Data { at, bytes } => {
                self.tainted = true;
                let off = self.layout.data + usize::from(at) % (self.size - 3);
                self.region.write(off, &bytes).unwrap();
            }
        }
    }

    fn broken(&self) -> bool {
        self.txl.0.is_some() || self.rxl.0.is_some()
    }
}

fuzz_target!(|input: Input| {
    let layout = match input.which {
        Which::Tiny => ByteRingLayout {
            data: 0,
            size: 16,
            cons: 16,
            prod: 20,
        },
        Which::StoreRequests => pv_protocol::store::REQ_RING,
        Which::StoreResponses => pv_protocol::store::RSP_RING,
        Which::ConsoleOut => pv_protocol::console::OUT_RING,
        Which::ConsoleIn => pv_protocol::console::IN_RING,
    };
    let mut mem = RingMemory::new(1);
    let region = mem.region();
    let tx = ByteRingProducer::new(region, layout).unwrap();
    let rx = ByteRingConsumer::new(region, layout).unwrap();
    let size = layout.size as usize;
    let mut w = World {
        tx,
        rx,
        region,
        layout,
        size,
        txl: Latch::default(),
        rxl: Latch::default(),
        written: 0,
        read: 0,
        tainted: false,
    };
    for op in input.ops.iter().take(512) {
        w.step(*op);
    }
    // The hostile writes stop: one honest write (it republishes the producer's index) and a
    // read of everything (it republishes the consumer's).
    w.write(1);
    w.read(size);
    if w.broken() {
        return;
    }
    assert_eq!(
        w.rx.available(),
        Ok(0),
        "bytes stuck after the hostile writes stopped"
    );
    assert_eq!(w.tx.free(), Ok(size));
    // Resynchronised: a fresh stream arrives exactly once and in order.
    w.tainted = false;
    w.read = w.written;
    let total = usize::from(input.tail) % (3 * size) + 1;
    let mut sent = 0;
    let mut got = Vec::new();
    while got.len() < total {
        let n = (total - sent).min(size / 2 + 1);
        sent += w.write(n).expect("an honest ring does not break");
        got.extend(w.read(size / 3 + 1).expect("an honest ring does not break"));
    }
    assert_eq!(sent, total);
    assert_eq!(got.len(), total);
});
