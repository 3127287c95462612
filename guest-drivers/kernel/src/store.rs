//! Config-store client: requests over the store ring, replies and watch events back.
//!
//! Watches the kernel holds for itself ([`watch`]) have tokens `k<bit>`: an event for one sets
//! that bit in a word of fired watches ([`take_fired`]) instead of joining the event queue, so
//! however many events arrive, and whenever (during any request's wait for its reply too), none
//! is lost and nothing waits on them. Other watches' events are queued for [`next_event`].

use pv_protocol::SharedRegion;
use pv_protocol::byte_ring::{ByteRingConsumer, ByteRingProducer};
use pv_protocol::start_info::{STORE_GPA, StartInfo};
use pv_protocol::store::{
    MsgType, PAYLOAD_MAX, REQ_RING, RSP_RING, StoreErrno, StoreMsgHeader, encode_message,
};
use zerocopy::FromBytes;

use core::sync::atomic::{AtomicU32, Ordering};

use crate::evtchn;
use crate::hcall::Cpu;
use crate::sync::SpinLock;

/// The kernel's watch on `control/shutdown` ([`crate::control`]).
pub const W_SHUTDOWN: u32 = 1 << 0;
/// The hotplug job's watch on `device` (devices coming and going).
pub const W_DEVICE: u32 = 1 << 1;
/// The hotplug job's watches on its devices' back-end `state`s.
pub const W_BACKEND: u32 = 1 << 2;
/// The watch of [`wait_for`] (one at a time).
pub const W_WAIT: u32 = 1 << 3;
/// The balloon's watch on `memory/target`.
pub const W_BALLOON: u32 = 1 << 4;
/// Kernel watches: `k0` .. `k7`.
const KERNEL_WATCHES: u32 = 8;

/// Kernel watches that fired and were not yet taken.
static FIRED: AtomicU32 = AtomicU32::new(0);

/// The kernel-watch bit a token names (`k<digit>`), if it is one.
fn kernel_token(token: &[u8]) -> Option<u32> {
    match token {
        [b'k', d] if (b'0'..b'0' + KERNEL_WATCHES as u8).contains(d) => Some(1 << (d - b'0')),
        _ => None,
    }
}

/// A reply: its type and payload length in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Message type (the request's, or `Error`).
    pub ty: u32,
    /// Payload bytes.
    pub len: usize,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFail {
    /// The store answered with this error.
    Errno(StoreErrno),
    /// No answer in time, or the ring broke.
    Transport,
}

const EVENTS: usize = 8;

struct Client {
    port: u32,
    req: ByteRingProducer<'static>,
    rsp: ByteRingConsumer<'static>,
    inbuf: [u8; 16 + PAYLOAD_MAX],
    have: usize,
    events: [([u8; 256], usize); EVENTS],
    nevents: usize,
    reply: Option<Reply>,
    reply_buf: [u8; PAYLOAD_MAX],
}

static CLIENT: SpinLock<Option<Client>> = SpinLock::new(None);

/// Connects to the store ring named in start-info.
pub fn init(si: &StartInfo) {
    // SAFETY: the store page is identity-mapped at a fixed address for the kernel's lifetime and
    // accessed (by us and the host) only atomically.
    let Ok(page) = (unsafe { SharedRegion::from_raw(STORE_GPA as *mut u8, 4096) }) else {
        return;
    };
    let (Ok(req), Ok(rsp)) = (
        ByteRingProducer::new(page, REQ_RING),
        ByteRingConsumer::new(page, RSP_RING),
    ) else {
        return;
    };
    // The port stays masked: the client polls it, and blocked vCPUs need not wake for it.
    CLIENT.with(|c| {
        *c = Some(Client {
            port: si.store_evtchn,
            req,
            rsp,
            inbuf: [0; 16 + PAYLOAD_MAX],
            have: 0,
            events: [([0; 256], 0); EVENTS],
            nevents: 0,
            reply: None,
            reply_buf: [0; PAYLOAD_MAX],
        })
    });
}

impl Client {
    fn send(&mut self, cpu: &Cpu, mut msg: &[u8]) -> Result<(), StoreFail> {
        for _ in 0..10_000 {
            let n = self.req.write(msg).map_err(|_| StoreFail::Transport)?;
            if n > 0 {
                evtchn::doorbell(self.port);
            }
            msg = &msg[n..];
            if msg.is_empty() {
                return Ok(());
            }
            evtchn::poll(cpu, &[self.port], 1_000_000);
            evtchn::clear_pending(self.port);
        }
        Err(StoreFail::Transport)
    }

    /// Reads what the host wrote and sorts complete messages: watch events to the event queue,
    /// a reply to `reply`.
    fn pump(&mut self) -> Result<(), StoreFail> {
        let n = self
            .rsp
            .read(&mut self.inbuf[self.have..])
            .map_err(|_| StoreFail::Transport)?;
        if n > 0 {
            self.have += n;
            evtchn::doorbell(self.port);
        }
        while self.have >= 16 && self.reply.is_none() {
            let Ok((h, _)) = StoreMsgHeader::read_from_prefix(&self.inbuf[..self.have]) else {
                return Err(StoreFail::Transport);
            };
            let len = h.len as usize;
            if len > PAYLOAD_MAX {
                return Err(StoreFail::Transport);
            }
            if self.have < 16 + len {
                break;
            }
            let body = &self.inbuf[16..16 + len];
            let token = body.split(|&b| b == 0).nth(1).unwrap_or(&[]);
            if h.msg_type == MsgType::WatchEvent as u32
                && let Some(bit) = kernel_token(token)
            {
                // SeqCst: a plain flag word, set here and taken by the waiting job (vCPU 0).
                FIRED.fetch_or(bit, Ordering::SeqCst);
            } else if h.msg_type == MsgType::WatchEvent as u32 {
                if self.nevents < EVENTS {
                    let n = len.min(256);
                    self.events[self.nevents].0[..n].copy_from_slice(&body[..n]);
                    self.events[self.nevents].1 = n;
                    self.nevents += 1;
                }
            } else {
                self.reply_buf[..len].copy_from_slice(body);
                self.reply = Some(Reply {
                    ty: h.msg_type,
                    len,
                });
            }
            self.inbuf.copy_within(16 + len..self.have, 0);
            self.have -= 16 + len;
        }
        Ok(())
    }

    /// Waits for the reply to the request just sent; copies its payload into `out`.
    fn receive(&mut self, cpu: &Cpu, out: &mut [u8]) -> Result<Reply, StoreFail> {
        for _ in 0..10_000 {
            self.pump()?;
            if let Some(r) = self.reply.take() {
                let n = r.len.min(out.len());
                out[..n].copy_from_slice(&self.reply_buf[..n]);
                return Ok(Reply { ty: r.ty, len: n });
            }
            evtchn::poll(cpu, &[self.port], 1_000_000);
            evtchn::clear_pending(self.port);
        }
        Err(StoreFail::Transport)
    }
}

/// Sends a request of type `ty` in transaction `tx` with `parts` as payload, and waits for the
/// reply, copying its payload into `out`.
pub fn request(
    cpu: &Cpu,
    ty: MsgType,
    tx: u32,
    parts: &[&[u8]],
    out: &mut [u8],
) -> Result<Reply, StoreFail> {
    let mut msg = [0u8; 16 + PAYLOAD_MAX];
    let n = encode_message(&mut msg, ty, 1, tx, parts).map_err(|_| StoreFail::Transport)?;
    raw(cpu, &msg[..n], out)
}

/// Sends pre-encoded bytes (possibly malformed, for tests) and waits for a reply.
pub fn raw(cpu: &Cpu, msg: &[u8], out: &mut [u8]) -> Result<Reply, StoreFail> {
    CLIENT.with(|c| {
        let c = c.as_mut().ok_or(StoreFail::Transport)?;
        c.send(cpu, msg)?;
        let r = c.receive(cpu, out)?;
        if r.ty == MsgType::Error as u32 {
            let name = out[..r.len].split(|&b| b == 0).next().unwrap_or(&[]);
            return Err(StoreFail::Errno(
                StoreErrno::from_name(name).unwrap_or(StoreErrno::EINVAL),
            ));
        }
        Ok(r)
    })
}

/// Takes a queued watch event's payload (`path\0token\0`) into `out`; waits up to about a
/// second for one to arrive.
pub fn next_event(cpu: &Cpu, out: &mut [u8]) -> Option<usize> {
    for _ in 0..1000 {
        let (got, port) = CLIENT.with(|c| {
            let c = c.as_mut()?;
            let _ = c.pump();
            if c.nevents == 0 {
                return Some((None, c.port));
            }
            let (ev, n) = c.events[0];
            c.events.copy_within(1..c.nevents, 0);
            c.nevents -= 1;
            let n = n.min(out.len());
            out[..n].copy_from_slice(&ev[..n]);
            Some((Some(n), c.port))
        })?;
        if got.is_some() {
            return got;
        }
        evtchn::poll(cpu, &[port], 1_000_000);
        evtchn::clear_pending(port);
    }
    None
}

/// The store's event port (dom0 signals it with replies and watch events).
pub fn port() -> u32 {
    CLIENT.with(|c| c.as_ref().map_or(0, |c| c.port))
}

/// Takes what the host wrote on the response ring (watch events fire their bits) without
/// waiting: memory reads, and a doorbell only if something came.
pub fn pump_events() {
    CLIENT.with(|c| {
        if let Some(c) = c.as_mut() {
            let _ = c.pump();
        }
    });
}

/// Takes the fired kernel watches among `mask` (their bits clear).
pub fn take_fired(mask: u32) -> u32 {
    // SeqCst: see `Client::pump`.
    FIRED.fetch_and(!mask, Ordering::SeqCst) & mask
}

/// Whether a kernel watch among `mask` fired (without taking it).
pub fn fired(mask: u32) -> bool {
    // SeqCst: see `Client::pump`.
    FIRED.load(Ordering::SeqCst) & mask != 0
}

fn token_of(bit: u32) -> [u8; 3] {
    [
        b'k',
        b'0' + bit.trailing_zeros().min(KERNEL_WATCHES - 1) as u8,
        0,
    ]
}

/// Watches `path` as kernel watch `bit` (one of the `W_*` bits). Like Xen's, the watch fires
/// once at once.
pub fn watch(cpu: &Cpu, path: &[u8], bit: u32) -> Result<(), StoreFail> {
    let token = token_of(bit);
    request(
        cpu,
        MsgType::Watch,
        0,
        &[path, b"\0", &token],
        &mut [0u8; 16],
    )
    .map(|_| ())
}

/// Removes kernel watch `bit` from `path`.
pub fn unwatch(cpu: &Cpu, path: &[u8], bit: u32) -> Result<(), StoreFail> {
    let token = token_of(bit);
    request(
        cpu,
        MsgType::Unwatch,
        0,
        &[path, b"\0", &token],
        &mut [0u8; 16],
    )
    .map(|_| ())
}

/// Reads `path` into `out`: its length up to a NUL, `Ok(None)` if it does not exist.
fn read_value(cpu: &Cpu, path: &[u8], out: &mut [u8]) -> Result<Option<usize>, StoreFail> {
    match request(cpu, MsgType::Read, 0, &[path, b"\0"], out) {
        Ok(r) => Ok(Some(
            out[..r.len].iter().position(|&b| b == 0).unwrap_or(r.len),
        )),
        Err(StoreFail::Errno(StoreErrno::ENOENT)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits up to `timeout_ms` for the value at `path` (`None`: absent) to satisfy `ok`; reads it
/// at once and again after every change, sleeping on a watch of `path` in between (no polling).
/// Returns whether it did. A store that does not answer counts as not yet.
pub fn wait_for(
    cpu: &Cpu,
    path: &[u8],
    timeout_ms: u64,
    ok: impl Fn(Option<&[u8]>) -> bool,
) -> bool {
    let mut out = [0u8; 256];
    wait_until(cpu, path, timeout_ms, |cpu| {
        match read_value(cpu, path, &mut out) {
            Ok(v) if ok(v.map(|n| &out[..n])) => Some(()),
            _ => None,
        }
    })
    .is_some()
}

/// Waits up to `timeout_ms` for `look` to find what it looks for: calls it at once and again
/// whenever something at or below `path` changes (a watch), sleeping in between; the timer wakes
/// it at the deadline. Without the watch (the store refused it) it looks every 5 ms.
pub fn wait_until<T>(
    cpu: &Cpu,
    path: &[u8],
    timeout_ms: u64,
    mut look: impl FnMut(&Cpu) -> Option<T>,
) -> Option<T> {
    let deadline = crate::control::rdtsc() + crate::control::ticks(timeout_ms);
    let watched = watch(cpu, path, W_WAIT).is_ok();
    let found = loop {
        take_fired(W_WAIT);
        if let Some(v) = look(cpu) {
            break Some(v);
        }
        if crate::control::past(deadline) {
            break None;
        }
        let until = if watched {
            deadline
        } else {
            deadline.min(crate::control::rdtsc() + crate::control::ticks(5))
        };
        while !crate::control::past(until) {
            // Cleared before looking: an event from here on leaves the port pending.
            evtchn::clear_pending(port());
            pump_events();
            if fired(W_WAIT) {
                break;
            }
            crate::timer::sleep(cpu, &[port()], Some(until));
        }
    };
    if watched {
        let _ = unwatch(cpu, path, W_WAIT);
    }
    take_fired(W_WAIT);
    // A handshake may leave its domain idle: no timer may fire into it later.
    crate::timer::cancel(cpu);
    found
}

/// A store path built from parts joined with `/` (at most 128 bytes; longer input is cut, and
/// the store then refuses or misses the path).
#[derive(Debug, Clone, Copy)]
pub struct Path {
    buf: [u8; 128],
    len: usize,
}

impl Path {
    /// `parts` joined with `/`.
    pub fn new(parts: &[&[u8]]) -> Self {
        let mut p = Path {
            buf: [0; 128],
            len: 0,
        };
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                p.push(b"/");
            }
            p.push(part);
        }
        p
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    /// The path's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}
