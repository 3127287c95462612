//! The host ends of a domain's two built-in PV devices: the config-store ring and the console
//! ring, served by one thread per domain.
//!
//! Both rings live in pages of the guest's memory (start-info says where) and each has an event
//! channel bound to a host endpoint, so the guest's kicks arrive through the ioeventfd doorbell
//! without a VMM exit. The thread sleeps in `poll`, with no timeout, on those eventfds, a wake-up
//! eventfd (store watch events, console input) and a stop eventfd: an idle domain's thread never
//! wakes.
//!
//! Store messages are copied out of the ring, reassembled, bounded (`PAYLOAD_MAX`), parsed by
//! pv-protocol and answered; a malformed one gets an error reply. A guest that stops reading its
//! replies stops being served (its requests stay in its ring) rather than growing host memory.
//!
//! The framing of the request stream ([`next_message`]) and the answer to one message
//! ([`answer`]) need no domain, so they are public: the fuzz targets drive them directly.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use pv_protocol::byte_ring::{ByteRingConsumer, ByteRingProducer};
use pv_protocol::console::{IN_RING, OUT_RING};
use pv_protocol::start_info::{CONSOLE_GPA, STORE_GPA};
use pv_protocol::store::{
    MsgType, PAYLOAD_MAX, PermList, REQ_RING, RSP_RING, StoreErrno, StoreError, StoreMsgHeader,
    StoreRequest, encode_error, encode_message, encode_watch_event,
};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::FromBytes;

use crate::domain::DomainShared;
use crate::evtchn::HostPort;
use crate::store::Store;

/// Console output reads (of up to 2 KiB) per pass of the PV-device thread.
const CONSOLE_READS_PER_PASS: usize = 8;

/// Replies queued for a guest beyond which it is no longer served until it reads them.
const MAX_QUEUED_REPLY_BYTES: usize = 64 * 1024;

/// The endpoints the service thread needs.
#[derive(Debug)]
pub(crate) struct PvDevs {
    pub(crate) store_port: HostPort,
    pub(crate) console_port: HostPort,
    pub(crate) wake: Arc<EventFd>,
    pub(crate) stop: Arc<EventFd>,
}

fn wait(fds: &[&EventFd]) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
    for f in fds {
        // Non-blocking eventfds: a failed read only means nothing was signalled.
        let _ = f.read();
    }
}

/// Serves the store and console rings of `dom` until it stops.
pub(crate) fn run(dom: Arc<DomainShared>, store: Arc<Store>, devs: PvDevs) {
    serve(&dom, &store, &devs);
    dom.pvdev_finished();
}

fn serve(dom: &Arc<DomainShared>, store: &Store, devs: &PvDevs) {
    let (Ok(store_page), Ok(console_page)) = (
        dom.ram.region(STORE_GPA, 4096),
        dom.ram.region(CONSOLE_GPA, 4096),
    ) else {
        tracing::error!(domid = dom.id, "store or console page outside guest memory");
        return;
    };
    let (Ok(mut req), Ok(mut rsp), Ok(mut out), Ok(mut input)) = (
        ByteRingConsumer::new(store_page, REQ_RING),
        ByteRingProducer::new(store_page, RSP_RING),
        ByteRingConsumer::new(console_page, OUT_RING),
        ByteRingProducer::new(console_page, IN_RING),
    ) else {
        tracing::error!(domid = dom.id, "bad ring layout");
        return;
    };
    let mut conn = StoreConn {
        dom,
        store,
        inbuf: Vec::new(),
        outbuf: VecDeque::new(),
        broken: false,
    };
    let mut stopping = false;
    let mut console_broken = false;
    loop {
        // Console first: output written just before a request stays in order.
        let mut buf = [0u8; 2048];
        let mut drained = false;
        // Bounded: a guest writing from several vCPUs could otherwise keep this thread here
        // and starve its store; what is left is read on the next pass, at once.
        let mut more = false;
        for i in 0..CONSOLE_READS_PER_PASS {
            if console_broken {
                break;
            }
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    dom.console.write(&buf[..n]);
                    drained = true;
                    more = i + 1 == CONSOLE_READS_PER_PASS;
                }
                Err(e) => {
                    // The ring stays broken; the guest still has the console hypercall.
                    dom.guest_fault("console-ring", format_args!("{e}"));
                    console_broken = true;
                }
            }
        }
        // Keystrokes for the guest, as many as its input ring has room for.
        if !console_broken {
            match input.free() {
                Ok(0) => {}
                Ok(room) => {
                    let keys = dom.console.take_input(room);
                    if !keys.is_empty() {
                        // `free` said they fit; a short write would only mean a racing peer.
                        let _ = input.write(&keys);
                        drained = true;
                    }
                }
                Err(e) => {
                    dom.guest_fault("console-ring", format_args!("{e}"));
                    console_broken = true;
                }
            }
        }
        if drained {
            devs.console_port.notify();
        }
        if conn.service(&mut req, &mut rsp) {
            devs.store_port.notify();
        }
        if stopping {
            break;
        }
        if more {
            continue;
        }
        wait(&[
            devs.store_port.eventfd(),
            devs.console_port.eventfd(),
            &devs.wake,
            &devs.stop,
        ]);
        // One more pass after the stop signal, so output written just before it is kept.
        stopping = dom.state().is_final();
    }
}

/// One message framed from the request stream.
#[derive(Debug)]
pub enum Framed {
    /// A whole message: header and payload (at most `PAYLOAD_MAX` bytes).
    Message(StoreMsgHeader, Vec<u8>),
    /// A header claiming more than `PAYLOAD_MAX` bytes: the stream cannot be resynchronised, so
    /// everything buffered was dropped.
    Oversize(StoreMsgHeader),
}

/// Takes the next complete message off the front of `inbuf`, if there is one.
pub fn next_message(inbuf: &mut Vec<u8>) -> Option<Framed> {
    let (hdr, _) = StoreMsgHeader::read_from_prefix(inbuf).ok()?;
    let len = hdr.len as usize;
    if len > PAYLOAD_MAX {
        inbuf.clear();
        return Some(Framed::Oversize(hdr));
    }
    if inbuf.len() < 16 + len {
        return None;
    }
    let payload = inbuf[16..16 + len].to_vec();
    inbuf.drain(..16 + len);
    Some(Framed::Message(hdr, payload))
}

struct StoreConn<'a> {
    dom: &'a DomainShared,
    store: &'a Store,
    inbuf: Vec<u8>,
    outbuf: VecDeque<u8>,
    broken: bool,
}

impl StoreConn<'_> {
    /// Reads requests, answers them, flushes replies and watch events; returns whether the guest
    /// should be notified.
    fn service(&mut self, req: &mut ByteRingConsumer<'_>, rsp: &mut ByteRingProducer<'_>) -> bool {
        if self.broken {
            return false;
        }
        let mut progressed = false;
        while self.outbuf.len() < MAX_QUEUED_REPLY_BYTES {
            let mut chunk = [0u8; 1024];
            match req.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    progressed = true;
                    self.handle_messages();
                }
                Err(e) => {
                    self.dom
                        .guest_fault("store-ring", format_args!("request ring: {e}"));
                    self.broken = true;
                    return progressed;
                }
            }
        }
        // Watch events go out only while replies are not piling up.
        while self.outbuf.len() < MAX_QUEUED_REPLY_BYTES / 2 {
            let Some((path, token)) = self.store.next_event(self.dom.id) else {
                break;
            };
            let mut m = vec![0u8; 16 + path.len() + token.len() + 2];
            if let Ok(n) = encode_watch_event(&mut m, &path, &token) {
                self.outbuf.extend(&m[..n]);
            }
        }
        while !self.outbuf.is_empty() {
            let (a, _) = self.outbuf.as_slices();
            match rsp.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.outbuf.drain(..n);
                    progressed = true;
                }
                Err(e) => {
                    self.dom
                        .guest_fault("store-ring", format_args!("response ring: {e}"));
                    self.broken = true;
                    break;
                }
            }
        }
        progressed
    }

    fn handle_messages(&mut self) {
        while let Some(f) = next_message(&mut self.inbuf) {
            match f {
                Framed::Message(hdr, payload) => {
                    if let Err(e) =
                        answer(self.store, self.dom.id, &hdr, &payload, &mut self.outbuf)
                    {
                        self.dom.guest_fault("store-msg", format_args!("{e}"));
                    }
                }
                Framed::Oversize(hdr) => {
                    self.dom.guest_fault(
                        "store-msg",
                        format_args!("payload length {} too large", hdr.len),
                    );
                    reply_error(&mut self.outbuf, &hdr, StoreErrno::E2BIG);
                }
            }
        }
    }
}

fn reply_error(out: &mut VecDeque<u8>, hdr: &StoreMsgHeader, e: StoreErrno) {
    let mut m = [0u8; 32];
    if let Ok(n) = encode_error(&mut m, hdr.req_id, hdr.tx_id, e) {
        out.extend(&m[..n]);
    }
}

fn reply(out: &mut VecDeque<u8>, hdr: &StoreMsgHeader, ty: MsgType, parts: &[&[u8]]) {
    let size = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut m = vec![0u8; size];
    match encode_message(&mut m, ty, hdr.req_id, hdr.tx_id, parts) {
        Ok(n) => out.extend(&m[..n]),
        Err(_) => reply_error(out, hdr, StoreErrno::E2BIG),
    }
}

/// Answers one framed message from guest `domid` against `store`: appends exactly one reply (the
/// request's type with its result, or `ERROR`) to `out`. A message that does not parse is
/// answered with its error and the error is returned, for the caller to count as a guest fault.
pub fn answer(
    store: &Store,
    domid: u32,
    hdr: &StoreMsgHeader,
    payload: &[u8],
    out: &mut VecDeque<u8>,
) -> Result<(), StoreError> {
    let request = match StoreRequest::parse(hdr, payload) {
        Ok(r) => r,
        Err(e) => {
            reply_error(out, hdr, e.errno());
            return Err(e);
        }
    };
    let ty = request.msg_type();
    let (d, tx, s) = (domid, hdr.tx_id, store);
    let ok: &[&[u8]] = &[b"OK\0"];
    let result: Result<Vec<u8>, StoreErrno> = match request {
        StoreRequest::Read(p) => s.read(d, tx, p.as_str()),
        StoreRequest::Write { path, value } => s
            .write(d, tx, path.as_str(), value)
            .map(|()| ok[0].to_vec()),
        StoreRequest::Mkdir(p) => s.mkdir(d, tx, p.as_str()).map(|()| ok[0].to_vec()),
        StoreRequest::Rm(p) => s.rm(d, tx, p.as_str()).map(|()| ok[0].to_vec()),
        StoreRequest::Directory(p) => s.directory(d, tx, p.as_str()).map(|names| {
            names
                .iter()
                .flat_map(|n| n.bytes().chain(std::iter::once(0)))
                .collect()
        }),
        StoreRequest::GetPerms(p) => s.get_perms(d, tx, p.as_str()).and_then(|perms| {
            let mut b = vec![0u8; perms.len() * 8 + 8];
            PermList::write(&perms, &mut b)
                .map(|l| l.as_bytes().to_vec())
                .map_err(|e| e.errno())
        }),
        StoreRequest::SetPerms { path, perms } => {
            let list: Vec<_> = perms.iter().collect();
            s.set_perms(d, tx, path.as_str(), &list)
                .map(|()| ok[0].to_vec())
        }
        StoreRequest::Watch { path, token } => {
            s.watch(d, path.as_str(), token).map(|()| ok[0].to_vec())
        }
        StoreRequest::Unwatch { path, token } => {
            s.unwatch(d, path.as_str(), token).map(|()| ok[0].to_vec())
        }
        StoreRequest::TransactionStart => s
            .transaction_start(d)
            .map(|id| format!("{id}\0").into_bytes()),
        StoreRequest::TransactionEnd { commit } => {
            s.transaction_end(d, tx, commit).map(|()| ok[0].to_vec())
        }
        StoreRequest::GetDomainPath(id) => {
            Ok(format!("{}\0", crate::store::home(u32::from(id.0))).into_bytes())
        }
        // Toolstack operations are dom0's; a guest may not use them.
        StoreRequest::Introduce { .. }
        | StoreRequest::Release(_)
        | StoreRequest::Resume(_)
        | StoreRequest::SetTarget { .. }
        | StoreRequest::IsDomainIntroduced(_)
        | StoreRequest::Control(_) => Err(StoreErrno::EACCES),
        StoreRequest::DirectoryPart { .. } | StoreRequest::ResetWatches => Err(StoreErrno::ENOSYS),
    };
    match result {
        Ok(body) => reply(out, hdr, ty, &[&body]),
        Err(e) => reply_error(out, hdr, e),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever bytes a guest streams, in whatever chunks, framing never panics, never yields
        /// an oversized payload, and accounts for every byte.
        #[test]
        fn framing_arbitrary_bytes_is_total(chunks in prop::collection::vec(
            prop::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let mut inbuf = Vec::new();
            for c in chunks {
                inbuf.extend_from_slice(&c);
                let before = inbuf.len();
                let mut used = 0;
                let mut cleared = false;
                while let Some(f) = next_message(&mut inbuf) {
                    match f {
                        Framed::Message(h, p) => {
                            prop_assert_eq!(p.len(), h.len as usize);
                            prop_assert!(p.len() <= PAYLOAD_MAX);
                            used += 16 + p.len();
                        }
                        Framed::Oversize(h) => {
                            prop_assert!(h.len as usize > PAYLOAD_MAX);
                            prop_assert!(inbuf.is_empty());
                            cleared = true;
                        }
                    }
                }
                if !cleared {
                    prop_assert_eq!(used + inbuf.len(), before);
                }
            }
        }

        /// Well-formed messages split at arbitrary points come out whole and in order.
        #[test]
        fn valid_messages_survive_any_chunking(
            values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..10),
            cut in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for (i, v) in values.iter().enumerate() {
                let mut m = vec![0u8; 16 + 8 + v.len()];
                let n = encode_message(&mut m, MsgType::Write, i as u32, 0, &[b"a/b\0", v]).unwrap();
                stream.extend_from_slice(&m[..n]);
            }
            let mut inbuf = Vec::new();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                inbuf.extend_from_slice(piece);
                while let Some(f) = next_message(&mut inbuf) {
                    match f {
                        Framed::Message(h, p) => got.push((h.req_id, p)),
                        Framed::Oversize(_) => prop_assert!(false, "valid stream misframed"),
                    }
                }
            }
            prop_assert_eq!(got.len(), values.len());
            for (i, (id, p)) in got.iter().enumerate() {
                prop_assert_eq!(*id, i as u32);
                prop_assert_eq!(&p[4..], values[i].as_slice());
            }
        }
    }
}
