//! netback: one guest network interface (vif) as a switch port, serving its TX and RX rings.
//!
//! TX (guest to switch): each frame's chain of slots is copied off the ring once and validated
//! by pv-protocol's [`TxPacket::parse`]; its data is copied out of the granted pages (grant copy)
//! into the switch's frame buffer; every slot is answered (extras with `Null`). A malformed
//! chain, a bad grant, an unsupported extra is answered with errors for all its slots and
//! counted; hostile ring indices kill the port (the switch drops it), nothing else.
//!
//! RX (switch to guest): the guest posts empty pages; a frame is copied into as many of them as
//! it needs (more than one only with `feature-sg`), with `NETRXF_csum_blank` /
//! `NETRXF_data_validated` passed on when the guest takes blank checksums. No posted buffer: the
//! frame is dropped and counted, as a NIC with an empty RX ring would.
//!
//! Written against traits only ([`GrantMapper`], [`Notify`], pv-protocol's ring endpoints), so
//! tests drive it with a mock front end.

use std::any::Any;
use std::os::fd::RawFd;
use std::sync::Arc;

use pv_protocol::PAGE_SIZE;
use pv_protocol::netif::{
    MAX_EXTRAS_PER_FRAME, MAX_SLOTS_PER_FRAME, NetRxFlags, NetRxRequest, NetRxResponse, NetRxRing,
    NetTxFlags, NetTxRing, NetifError, NetifStatus, NetifTxRequestRaw, NetifTxResponseRaw,
    RxStatus, TxPacket,
};
use pv_protocol::ring::BackRing;

use crate::grants::GrantMapper;
use crate::notify::Notify;
use crate::switch::{FrameMeta, Mac, Port, PortCounters, PortError, VIF_MAX_LEARNED};

/// What a vif negotiated with its front end.
#[derive(Debug, Clone, Copy, Default)]
pub struct VifFeatures {
    /// The front end takes frames spread over several RX buffers (`feature-sg`).
    pub sg: bool,
    /// The front end cannot take blank checksums (`feature-no-csum-offload`).
    pub no_csum_offload: bool,
}

/// Slots one frame may take: data plus extra info.
const MAX_CHAIN: usize = MAX_SLOTS_PER_FRAME + MAX_EXTRAS_PER_FRAME;

/// Warnings logged per port before they are only counted.
const WARN_LIMIT: u64 = 10;

/// A chain taken off the TX ring: how many slots it used, and what they parse to.
type Chain = (usize, Result<TxPacket, NetifError>);

/// A vif's rings as a switch port.
pub struct VifPort<G: GrantMapper, N: Notify> {
    // Field order is drop order: the rings go before `_hold`, which keeps their pages mapped.
    tx: BackRing<'static, NetTxRing>,
    rx: BackRing<'static, NetRxRing>,
    name: String,
    domid: u32,
    counters: Arc<PortCounters>,
    grants: G,
    notify: N,
    features: VifFeatures,
    /// The only source address the guest may send from (`None`: any).
    mac: Option<Mac>,
    _hold: Box<dyn Any + Send>,
}

impl<G: GrantMapper, N: Notify> std::fmt::Debug for VifPort<G, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VifPort")
            .field("name", &self.name)
            .field("domid", &self.domid)
            .finish_non_exhaustive()
    }
}

impl<G: GrantMapper, N: Notify> VifPort<G, N> {
    /// A port serving `tx` and `rx` for domain `domid`. `hold` keeps the rings' memory valid and
    /// is dropped after them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        domid: u32,
        tx: BackRing<'static, NetTxRing>,
        rx: BackRing<'static, NetRxRing>,
        grants: G,
        notify: N,
        features: VifFeatures,
        hold: Box<dyn Any + Send>,
    ) -> Self {
        Self {
            tx,
            rx,
            name,
            domid,
            counters: Arc::default(),
            grants,
            notify,
            features,
            mac: None,
            _hold: hold,
        }
    }

    /// Frames from the guest must carry `mac` as their source; others are dropped and counted
    /// as errors by the switch (the anti-spoofing Xen's vif scripts set up with ebtables).
    #[must_use]
    pub fn with_source_mac(mut self, mac: Mac) -> Self {
        self.mac = Some(mac);
        self
    }

    fn refuse(&mut self, slots: &[NetifTxRequestRaw], why: &dyn std::fmt::Display) {
        let n = self
            .counters
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < WARN_LIMIT {
            tracing::warn!(domid = self.domid, vif = %self.name, "tx frame refused: {why}");
        }
        for s in slots {
            let _ = self.tx.push_response(&NetifTxResponseRaw {
                id: s.id,
                status: NetifStatus::Error as i16,
            });
        }
    }

    /// Takes one TX chain off the ring: `Ok(None)` when the ring is empty.
    fn take_chain(
        &mut self,
        slots: &mut [NetifTxRequestRaw; MAX_CHAIN],
    ) -> Result<Option<Chain>, PortError> {
        let dead = |e| PortError(format!("dom{}: tx ring: {e}", self.domid));
        let Some(first) = self.tx.take_request().map_err(dead)? else {
            return Ok(None);
        };
        slots[0] = first;
        let mut n = 1;
        // A front end publishes whole chains; one that ends past the published requests (or
        // runs beyond the longest legal chain) is malformed.
        loop {
            match TxPacket::parse(&slots[..n]) {
                Err(NetifError::Truncated) if n < MAX_CHAIN => {
                    match self.tx.take_request().map_err(dead)? {
                        Some(s) => {
                            slots[n] = s;
                            n += 1;
                        }
                        None => return Ok(Some((n, Err(NetifError::Truncated)))),
                    }
                }
                Err(NetifError::Truncated) => return Ok(Some((n, Err(NetifError::BadSlotCount)))),
                r => return Ok(Some((n, r))),
            }
        }
    }

    /// Takes one TX chain: copies a good frame into `buf` and answers its slots, or refuses it.
    fn take_frame(
        &mut self,
        slots: &mut [NetifTxRequestRaw; MAX_CHAIN],
        buf: &mut [u8],
    ) -> Result<Taken, PortError> {
        let Some((n, parsed)) = self.take_chain(slots)? else {
            return Ok(Taken::Empty);
        };
        let pkt = match parsed {
            Ok(p) => p,
            Err(e) => {
                self.refuse(&slots[..n], &e);
                return Ok(Taken::Refused);
            }
        };
        if pkt.extras.gso.is_some() {
            self.refuse(&slots[..n], &"GSO was not negotiated");
            return Ok(Taken::Refused);
        }
        let len = pkt.total_len();
        if len > buf.len() {
            self.refuse(&slots[..n], &format_args!("frame of {len} bytes"));
            return Ok(Taken::Refused);
        }
        let mut pos = 0;
        let mut failed = None;
        for s in pkt.slots.iter() {
            let l = usize::from(s.len);
            if let Err(e) =
                self.grants
                    .copy_from(s.gref, usize::from(s.offset), &mut buf[pos..pos + l])
            {
                failed = Some(e);
                break;
            }
            pos += l;
        }
        if let Some(e) = failed {
            self.refuse(&slots[..n], &e);
            return Ok(Taken::Refused);
        }
        // One response per slot, in ring order; extra-info slots (right after the first)
        // get `Null`.
        let extras = pkt.extras.count();
        for (i, s) in slots[..n].iter().enumerate() {
            let (id, status) = if (1..=extras).contains(&i) {
                (0, NetifStatus::Null)
            } else {
                (s.id, NetifStatus::Okay)
            };
            let _ = self.tx.push_response(&NetifTxResponseRaw {
                id,
                status: status as i16,
            });
        }
        Ok(Taken::Frame(FrameMeta {
            len,
            csum_blank: pkt.flags.contains(NetTxFlags::CSUM_BLANK),
            data_validated: pkt.flags.contains(NetTxFlags::DATA_VALIDATED),
        }))
    }
}

/// What one TX chain came to.
enum Taken {
    /// A good frame, copied into the buffer.
    Frame(FrameMeta),
    /// A malformed chain, answered with errors.
    Refused,
    /// The ring had no request.
    Empty,
}

/// Refused chains one [`Port::receive`] call answers before it lets the switch go on.
const REFUSED_PER_CALL: usize = 64;

impl<G: GrantMapper, N: Notify> Port for VifPort<G, N> {
    fn name(&self) -> &str {
        &self.name
    }

    fn counters(&self) -> &Arc<PortCounters> {
        &self.counters
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<FrameMeta>, PortError> {
        let mut slots = [NetifTxRequestRaw::default(); MAX_CHAIN];
        // A refused chain is answered at once, which frees its slots for the front end to fill
        // again: the bound keeps a hostile front end from holding the switch thread here (the
        // switch comes back for the rest on its next pass).
        for _ in 0..REFUSED_PER_CALL {
            match self.take_frame(&mut slots, buf)? {
                Taken::Frame(m) => return Ok(Some(m)),
                Taken::Empty => return Ok(None),
                Taken::Refused => {}
            }
        }
        Ok(None)
    }

    fn needs_checksum(&self) -> bool {
        self.features.no_csum_offload
    }

    fn source_mac(&self) -> Option<Mac> {
        self.mac
    }

    fn max_learned(&self) -> usize {
        VIF_MAX_LEARNED
    }

    fn transmit(&mut self, frame: &[u8], meta: FrameMeta) -> bool {
        let pages = frame.len().div_ceil(PAGE_SIZE).max(1);
        if pages > 1 && !self.features.sg {
            return false;
        }
        // All buffers the frame needs must be posted before any is taken.
        match self.rx.unconsumed_requests() {
            Ok(n) if n as usize >= pages => {}
            _ => return false,
        }
        let mut flags = NetRxFlags::empty();
        if meta.csum_blank {
            flags |= NetRxFlags::CSUM_BLANK | NetRxFlags::DATA_VALIDATED;
        } else if meta.data_validated {
            flags |= NetRxFlags::DATA_VALIDATED;
        }
        let mut ok = true;
        for (i, chunk) in frame.chunks(PAGE_SIZE).enumerate() {
            let Ok(Some(raw)) = self.rx.take_request() else {
                return false;
            };
            let req = NetRxRequest::from(&raw);
            let mut f = if i == 0 { flags } else { NetRxFlags::empty() };
            f.set(NetRxFlags::MORE_DATA, i + 1 < pages);
            let status = if !ok {
                RxStatus::Failed(NetifStatus::Error)
            } else if let Err(e) = self.grants.copy_to(req.gref, 0, chunk) {
                ok = false;
                let n = self
                    .counters
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n < WARN_LIMIT {
                    tracing::warn!(domid = self.domid, vif = %self.name, "rx buffer refused: {e}");
                }
                RxStatus::Failed(NetifStatus::Error)
            } else {
                RxStatus::Data(chunk.len() as u16)
            };
            let rsp = NetRxResponse {
                id: req.id,
                offset: 0,
                flags: f,
                status,
            };
            let _ = self.rx.push_response(&rsp.to_raw());
        }
        ok
    }

    fn flush(&mut self) {
        let tx = self.tx.commit_responses();
        let rx = self.rx.commit_responses();
        if tx || rx {
            self.notify.notify();
        }
    }

    fn arm(&mut self) -> Result<bool, PortError> {
        self.tx
            .final_check_for_requests()
            .map_err(|e| PortError(format!("dom{}: tx ring: {e}", self.domid)))
    }

    fn wait_fd(&self) -> RawFd {
        self.notify.wait_fd()
    }

    fn clear_wakeup(&mut self) {
        self.notify.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::{GrantFailure, MappedPage};
    use pv_protocol::grant::GrantRef;
    use pv_protocol::netif::{NetTxSlot, NetifRxRequestRaw};
    use pv_protocol::test_utils::{MockFrontEnd, RingMemory};
    use std::cell::Cell;
    use std::os::fd::AsRawFd;
    use std::ptr::NonNull;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    /// Pages 0..16 granted (16.. are not); page 3 is read-only.
    struct FakeGrants(Box<[[u8; PAGE_SIZE]; 16]>);

    impl GrantMapper for std::sync::Mutex<FakeGrants> {
        fn map(&self, gref: GrantRef, device_writes: bool) -> Result<MappedPage, GrantFailure> {
            let fail = |reason: &str| GrantFailure {
                gref: gref.0,
                reason: reason.into(),
            };
            if gref.0 >= 16 {
                return Err(fail("not granted"));
            }
            if gref.0 == 3 && device_writes {
                return Err(fail("read-only"));
            }
            let mut g = self.lock().unwrap();
            let ptr = NonNull::new(g.0[gref.0 as usize].as_mut_ptr()).unwrap();
            // SAFETY: the page lives in the boxed array, which outlives every MappedPage of
            // these tests (the mapper lives in the port, dropped after the test's last use).
            Ok(unsafe { MappedPage::new(ptr, Box::new(())) })
        }
    }

    struct Bell(EventFd, Cell<u32>);
    // SAFETY: the Cell is only touched by the thread that owns the port in these tests.
    unsafe impl Send for Bell {}
    impl Notify for Bell {
        fn notify(&self) {
            self.1.set(self.1.get() + 1);
        }
        fn wait_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
        fn clear(&self) {}
    }

    type TestPort = VifPort<std::sync::Mutex<FakeGrants>, Bell>;

    fn port(
        features: VifFeatures,
    ) -> (
        TestPort,
        MockFrontEnd<'static, NetTxRing>,
        MockFrontEnd<'static, NetRxRing>,
    ) {
        // Leaked: the rings live for the rest of the test process ('static, as the switch needs).
        let txm = Box::leak(Box::new(RingMemory::new(1))).region();
        let rxm = Box::leak(Box::new(RingMemory::new(1))).region();
        let txf = MockFrontEnd::<NetTxRing>::new(txm, 1).unwrap();
        let rxf = MockFrontEnd::<NetRxRing>::new(rxm, 1).unwrap();
        let tx = BackRing::attach(txm, 1).unwrap();
        let rx = BackRing::attach(rxm, 1).unwrap();
        let grants = std::sync::Mutex::new(FakeGrants(Box::new([[0u8; PAGE_SIZE]; 16])));
        let p = VifPort::new(
            "vif1.0".into(),
            1,
            tx,
            rx,
            grants,
            Bell(EventFd::new(EFD_NONBLOCK).unwrap(), Cell::new(0)),
            features,
            Box::new(()),
        );
        (p, txf, rxf)
    }

    fn page(p: &TestPort, gref: u32) -> [u8; PAGE_SIZE] {
        p.grants.lock().unwrap().0[gref as usize]
    }

    fn fill(p: &TestPort, gref: u32, off: usize, data: &[u8]) {
        p.grants.lock().unwrap().0[gref as usize][off..off + data.len()].copy_from_slice(data);
    }

    fn send(txf: &mut MockFrontEnd<'static, NetTxRing>, pkt: &TxPacket) {
        let mut raw = [NetifTxRequestRaw::default(); MAX_CHAIN];
        let n = pkt.write_slots(&mut raw).unwrap();
        txf.submit(&raw[..n]).unwrap();
    }

    fn slot(gref: u32, offset: u16, len: u16, id: u16) -> NetTxSlot {
        NetTxSlot {
            gref: GrantRef(gref),
            offset,
            len,
            id,
        }
    }

    fn packet(slots: &[NetTxSlot], flags: NetTxFlags) -> TxPacket {
        let mut p = TxPacket {
            flags,
            ..Default::default()
        };
        for s in slots {
            p.slots.try_push(*s).unwrap();
        }
        p
    }

    fn tx_statuses(txf: &mut MockFrontEnd<'static, NetTxRing>) -> Vec<(u16, i16)> {
        txf.responses()
            .unwrap()
            .into_iter()
            .map(|r| (r.id, r.status))
            .collect()
    }

    #[test]
    fn a_two_slot_frame_is_copied_out_and_every_slot_answered() {
        let (mut p, mut txf, _rxf) = port(VifFeatures::default());
        let a: Vec<u8> = (0..100u8).collect();
        let b: Vec<u8> = (100..=255u8).collect();
        fill(&p, 1, 200, &a);
        fill(&p, 2, 0, &b);
        send(
            &mut txf,
            &packet(
                &[slot(1, 200, 100, 7), slot(2, 0, b.len() as u16, 8)],
                NetTxFlags::CSUM_BLANK,
            ),
        );
        let mut buf = vec![0u8; crate::switch::MAX_FRAME];
        let meta = p.receive(&mut buf).unwrap().unwrap();
        assert_eq!(meta.len, 256);
        assert!(meta.csum_blank);
        assert_eq!(&buf[..100], &a[..]);
        assert_eq!(&buf[100..256], &b[..]);
        assert!(p.receive(&mut buf).unwrap().is_none());
        p.flush();
        assert_eq!(tx_statuses(&mut txf), [(7, 0), (8, 0)]);
        assert_eq!(p.notify.1.get(), 1);
    }

    #[test]
    fn malformed_chains_and_bad_grants_get_errors_and_the_next_frame_still_flows() {
        let (mut p, mut txf, _rxf) = port(VifFeatures::default());
        let mut buf = vec![0u8; crate::switch::MAX_FRAME];
        // Not granted.
        send(
            &mut txf,
            &packet(&[slot(99, 0, 60, 1)], NetTxFlags::empty()),
        );
        let raw = |id, offset, size, flags: NetTxFlags| NetifTxRequestRaw {
            gref: 1,
            offset,
            flags: flags.bits(),
            id,
            size,
        };
        txf.submit(&[
            // Too short (raw: the builder refuses it).
            raw(2, 0, 10, NetTxFlags::empty()),
            // Crosses the page.
            raw(3, 4000, 200, NetTxFlags::empty()),
            // A chain that says more data follows, then ends at the published index.
            raw(4, 0, 100, NetTxFlags::MORE_DATA),
        ])
        .unwrap();
        assert!(p.receive(&mut buf).unwrap().is_none());
        // A good one after all that.
        fill(&p, 5, 0, &[0xab; 60]);
        send(&mut txf, &packet(&[slot(5, 0, 60, 9)], NetTxFlags::empty()));
        let meta = p.receive(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..meta.len], &[0xab; 60]);
        p.flush();
        assert_eq!(
            tx_statuses(&mut txf),
            [(1, -1), (2, -1), (3, -1), (4, -1), (9, 0)]
        );
        assert_eq!(p.counters.snapshot().errors, 4);
    }

    #[test]
    fn a_flood_of_bad_chains_is_answered_in_bounded_batches() {
        let (mut p, mut txf, _rxf) = port(VifFeatures::default());
        let mut buf = vec![0u8; crate::switch::MAX_FRAME];
        let bad: Vec<NetifTxRequestRaw> = (0..200)
            .map(|id| NetifTxRequestRaw {
                gref: 1,
                size: 10,
                id,
                ..Default::default()
            })
            .collect();
        txf.submit(&bad).unwrap();
        // Each call answers at most REFUSED_PER_CALL of them and returns, so the switch thread
        // gets back to its other ports; the rest wait for the next call, and `arm` says so.
        for done in [64, 128, 192] {
            assert!(p.receive(&mut buf).unwrap().is_none());
            assert_eq!(p.counters.snapshot().errors, done);
            assert!(p.arm().unwrap(), "work is left after {done}");
        }
        assert!(p.receive(&mut buf).unwrap().is_none());
        assert_eq!(p.counters.snapshot().errors, 200);
        p.flush();
        assert_eq!(tx_statuses(&mut txf).len(), 200);
        assert!(!p.arm().unwrap());
    }

    #[test]
    fn hostile_indices_kill_the_port() {
        let (mut p, txf, _rxf) = port(VifFeatures::default());
        txf.scribble_req_prod(1_000_000);
        let mut buf = vec![0u8; crate::switch::MAX_FRAME];
        assert!(p.receive(&mut buf).is_err());
    }

    fn post(rxf: &mut MockFrontEnd<'static, NetRxRing>, ids: &[(u16, u32)]) {
        let reqs: Vec<NetifRxRequestRaw> = ids
            .iter()
            .map(|&(id, gref)| NetifRxRequestRaw { id, _pad: 0, gref })
            .collect();
        rxf.submit(&reqs).unwrap();
    }

    fn rx_responses(rxf: &mut MockFrontEnd<'static, NetRxRing>) -> Vec<NetRxResponse> {
        rxf.responses()
            .unwrap()
            .iter()
            .map(|r| NetRxResponse::parse(r).unwrap())
            .collect()
    }

    #[test]
    fn frames_land_in_posted_buffers_with_flags_or_are_dropped() {
        let (mut p, _txf, mut rxf) = port(VifFeatures {
            sg: true,
            no_csum_offload: false,
        });
        let frame: Vec<u8> = (0..6000u32).map(|i| (i % 251) as u8).collect();
        let blank = FrameMeta {
            len: frame.len(),
            csum_blank: true,
            data_validated: false,
        };
        // Nothing posted: dropped.
        assert!(!p.transmit(&frame, blank));
        // One page posted, two needed: dropped, and the page is not consumed.
        post(&mut rxf, &[(1, 4)]);
        assert!(!p.transmit(&frame, blank));
        post(&mut rxf, &[(2, 5)]);
        assert!(p.transmit(&frame, blank));
        p.flush();
        let r = rx_responses(&mut rxf);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].id, r[0].status), (1, RxStatus::Data(4096)));
        assert!(
            r[0].flags
                .contains(NetRxFlags::MORE_DATA | NetRxFlags::CSUM_BLANK)
        );
        assert_eq!((r[1].id, r[1].status), (2, RxStatus::Data(6000 - 4096)));
        assert!(!r[1].flags.contains(NetRxFlags::MORE_DATA));
        assert_eq!(&page(&p, 4)[..], &frame[..4096]);
        assert_eq!(&page(&p, 5)[..6000 - 4096], &frame[4096..]);
        // A read-only buffer: an error response, the frame counts as dropped.
        post(&mut rxf, &[(3, 3)]);
        assert!(!p.transmit(&frame[..60], FrameMeta { len: 60, ..blank }));
        p.flush();
        let r = rx_responses(&mut rxf);
        assert_eq!(
            (r[0].id, r[0].status),
            (3, RxStatus::Failed(NetifStatus::Error))
        );
    }

    #[test]
    fn without_sg_a_big_frame_is_dropped() {
        let (mut p, _txf, mut rxf) = port(VifFeatures::default());
        post(&mut rxf, &[(1, 4), (2, 5)]);
        let meta = FrameMeta {
            len: 5000,
            ..Default::default()
        };
        assert!(!p.transmit(&[0u8; 5000], meta));
        assert!(p.transmit(&[1u8; 1500], FrameMeta { len: 1500, ..meta }));
    }
}
