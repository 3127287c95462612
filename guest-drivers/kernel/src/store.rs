//! Config-store client: requests over the store ring, replies and watch events back.

use pv_protocol::SharedRegion;
use pv_protocol::byte_ring::{ByteRingConsumer, ByteRingProducer};
use pv_protocol::start_info::{STORE_GPA, StartInfo};
use pv_protocol::store::{
    MsgType, PAYLOAD_MAX, REQ_RING, RSP_RING, StoreErrno, StoreMsgHeader, encode_message,
};
use zerocopy::FromBytes;

use crate::evtchn;
use crate::hcall::Cpu;
use crate::sync::SpinLock;

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
            if h.msg_type == MsgType::WatchEvent as u32 {
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
