//! Network front end (Xen's netfront): finds a vif in the store, does the XenbusState handshake
//! with netback, and moves Ethernet frames over a TX and an RX ring (one page each, one event
//! channel for both) with data in granted buffer pages.
//!
//! Each connected vif takes one of [`MAX_VIFS`] slots, whose pages come from the heap at the
//! slot's first use and stay with it: a TX and an RX ring page,
//! [`TX_PAGES`] TX pages (granted read-only) and [`RX_PAGES`] RX pages (granted writable), all
//! granted once at connect and never revoked while connected (`feature-persistent`). Slot `k` uses
//! grant references `2048 + 1024 k ..`: TX ring, RX ring, TX pages, RX pages.
//!
//! Every RX page is posted at connect (request id = page index) and reposted as soon as its data
//! is copied out. A frame is sent from one or more TX pages, one slot each (request id = page
//! index); a page comes back when its TX response arrives. Buffer pages are reached only through
//! a [`SharedRegion`] (atomic accesses: dom0 may map them at any time), and everything dom0
//! writes in a response is validated by pv-protocol's parsers; a response naming a page we did
//! not hand out is counted and ignored.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use pv_protocol::grant::GrantRef;
use pv_protocol::netif::{
    MAX_SLOTS_PER_FRAME, NetRxFlags, NetRxRequest, NetRxResponse, NetRxRing, NetTxFlags,
    NetTxResponse, NetTxRing, NetTxSlot, NetifRxRequestRaw, NetifStatus, NetifTxRequestRaw,
    RxStatus, TxPacket,
};
use pv_protocol::ring::{FrontRing, RingError};
use pv_protocol::store::MsgType;
use pv_protocol::{PAGE_SIZE, SharedRegion};

use crate::evtchn as ev;
use crate::hcall::Cpu;
use crate::net::{Link, Mac, parse_mac};
use crate::store::Path;
use crate::store::request;
use crate::text::{fmt_u32, parse_u32, parse_u64};

/// Vifs that can be connected at once.
pub const MAX_VIFS: usize = 2;
/// TX buffer pages per vif.
pub const TX_PAGES: usize = 128;
/// RX buffer pages per vif: enough to fill the RX ring (256 slots), so a guest that was slow to
/// wake still finds buffers posted for a burst.
pub const RX_PAGES: usize = 256;
/// First grant reference used for networking.
const NET_GREF: u32 = 2048;
/// Grant references per vif slot.
const VIF_GREFS: u32 = 1024;
/// Offsets inside a slot's grant range.
const TX_RING_GREF: u32 = 0;
const RX_RING_GREF: u32 = 1;
const TX_BUF_GREF: u32 = 2;
const RX_BUF_GREF: u32 = TX_BUF_GREF + TX_PAGES as u32;
/// The last reference of a slot's range, left free for a page granted to someone else.
const SPARE_GREF: u32 = VIF_GREFS - 1;
const _: () = assert!(RX_BUF_GREF + (RX_PAGES as u32) <= SPARE_GREF);
const _: () = assert!(NET_GREF + MAX_VIFS as u32 * VIF_GREFS <= 16384);
/// Reposted RX requests are published once this many are waiting.
const RX_PUBLISH_BATCH: u32 = 32;

/// Each slot's pages: its two ring pages, its TX pages and its RX pages, heap pages
/// ([`crate::heap::area`]) allocated at the slot's first use and kept with it.
static RINGS: [AtomicUsize; MAX_VIFS] = [const { AtomicUsize::new(0) }; MAX_VIFS];
static TX_BUFS: [AtomicUsize; MAX_VIFS] = [const { AtomicUsize::new(0) }; MAX_VIFS];
static RX_BUFS: [AtomicUsize; MAX_VIFS] = [const { AtomicUsize::new(0) }; MAX_VIFS];

/// Slot `slot`'s (ring pages, TX pages, RX pages), allocated at its first use.
fn slot_pages(slot: usize) -> Option<(u64, u64, u64)> {
    let rings = crate::heap::area(RINGS.get(slot)?, 2)?;
    let tx = crate::heap::area(TX_BUFS.get(slot)?, TX_PAGES)?;
    let rx = crate::heap::area(RX_BUFS.get(slot)?, RX_PAGES)?;
    Some((rings as u64, tx as u64, rx as u64))
}
/// Which slots are taken (until [`NetFront::release`] gives one back).
static CLAIMED: [AtomicBool; MAX_VIFS] = [const { AtomicBool::new(false) }; MAX_VIFS];

/// Counters of one vif.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames received whole.
    pub rx_frames: u64,
    /// Bytes in them.
    pub rx_bytes: u64,
    /// RX responses with an error status (dom0 dropped the frame).
    pub rx_errors: u64,
    /// RX responses that failed validation or named a page we did not post.
    pub rx_bad: u64,
    /// Frames dropped here: larger than the caller's buffer, or with a failed slot.
    pub rx_dropped: u64,
    /// Frames queued for transmission.
    pub tx_frames: u64,
    /// TX responses with status error or dropped.
    pub tx_errors: u64,
    /// TX responses that failed validation or named a page not in flight.
    pub tx_bad: u64,
    /// Frames not sent for lack of TX pages or ring slots.
    pub tx_full: u64,
}

/// A received frame, copied into the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxFrame {
    /// Its length.
    pub len: usize,
    /// The back end validated its L4 checksum, or left it blank (it never left this host).
    pub l4_checked: bool,
}

/// The frame being reassembled from RX responses.
#[derive(Debug, Default, Clone, Copy)]
struct Assembly {
    /// Inside a frame (the last response had `MORE_DATA`).
    active: bool,
    /// Bytes copied so far.
    len: usize,
    /// The first response's flags.
    flags: NetRxFlags,
    /// Some slot failed or did not fit: drop the frame at its end.
    bad: bool,
}

/// A connected vif.
#[derive(Debug)]
pub struct NetFront {
    /// Device id (`device/vif/<devid>`).
    pub devid: u32,
    /// Our MAC address.
    pub mac: Mac,
    slot: usize,
    gref_base: u32,
    port: u32,
    tx: FrontRing<'static, NetTxRing>,
    rx: FrontRing<'static, NetRxRing>,
    tx_pool: SharedRegion<'static>,
    rx_pool: SharedRegion<'static>,
    /// Stack of free TX pages.
    tx_free: [u16; TX_PAGES],
    tx_nfree: usize,
    /// TX pages on the ring (a response for them is due).
    tx_busy: [bool; TX_PAGES],
    /// RX pages on the ring.
    rx_posted: [bool; RX_PAGES],
    /// Reposted RX requests not yet published.
    rx_unpublished: u32,
    /// The next RX response is an extra-info slot to skip.
    rx_skip_extra: bool,
    asm: Assembly,
    /// Counters.
    pub stats: NetStats,
}

fn store_read(cpu: &Cpu, path: &Path, out: &mut [u8]) -> Option<usize> {
    request(cpu, MsgType::Read, 0, &[path.as_bytes(), b"\0"], out)
        .ok()
        .map(|r| r.len)
}

fn store_read_u64(cpu: &Cpu, path: &Path) -> Option<u64> {
    let mut out = [0u8; 24];
    let n = store_read(cpu, path, &mut out)?;
    parse_u64(&out[..n])
}

fn store_write(cpu: &Cpu, dir: &[u8], key: &[u8], value: &[u8]) -> Result<(), &'static str> {
    let path = Path::new(&[dir, key]);
    request(
        cpu,
        MsgType::Write,
        0,
        &[path.as_bytes(), b"\0", value],
        &mut [0u8; 16],
    )
    .map(|_| ())
    .map_err(|_| "store write failed")
}

/// The vif device ids under `device/vif`, sorted; returns how many (at most `ids.len()`).
fn list_vifs(cpu: &Cpu, ids: &mut [u32; 16]) -> usize {
    let mut out = [0u8; 512];
    let Ok(r) = request(cpu, MsgType::Directory, 0, &[b"device/vif\0"], &mut out) else {
        return 0;
    };
    let mut n = 0;
    for name in out[..r.len].split(|&b| b == 0) {
        if let Some(id) = parse_u32(name).filter(|_| !name.is_empty())
            && n < ids.len()
        {
            ids[n] = id;
            n += 1;
        }
    }
    ids[..n].sort_unstable();
    n
}

/// Waits (5 s at most, on a store watch) for the back end's `state` to read `want`.
pub(crate) fn wait_state(cpu: &Cpu, be: &[u8], want: u64) -> bool {
    let path = Path::new(&[be, b"state"]);
    crate::store::wait_for(cpu, path.as_bytes(), 5000, |v| {
        v.and_then(parse_u64) == Some(want)
    })
}

/// Ends access to every grant reference of vif slot `slot` (waiting up to `timeout_ms` while
/// dom0 still maps a page) and frees the slot unless some page stayed mapped; returns how many.
fn release_slot(cpu: &Cpu, slot: usize, timeout_ms: u64) -> u32 {
    let leaked = crate::grant::end_access_range(
        cpu,
        NET_GREF + slot as u32 * VIF_GREFS,
        VIF_GREFS,
        timeout_ms,
    );
    if leaked == 0 {
        CLAIMED[slot].store(false, Ordering::Release);
    }
    leaked
}

fn claim_slot() -> Option<usize> {
    CLAIMED.iter().position(|c| {
        c.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

impl NetFront {
    /// Waits (about `tries` x 10 ms) for at least `index + 1` vifs in the store, then connects
    /// to the `index`-th in numeric order of device id.
    pub fn connect(cpu: &Cpu, index: usize, tries: u32) -> Result<Self, &'static str> {
        let mut ids = [0u32; 16];
        let mut n = 0;
        crate::store::wait_until(cpu, b"device/vif", u64::from(tries.max(1)) * 10, |cpu| {
            n = list_vifs(cpu, &mut ids);
            (n > index).then_some(())
        });
        if n == 0 {
            return Err("no vif in device/vif");
        }
        if n <= index {
            return Err("no vif with that index in device/vif");
        }
        Self::connect_devid(cpu, ids[index])
    }

    /// Connects to vif `devid` (`device/vif/<devid>`): the XenbusState handshake, waiting up to
    /// about 5 s for the back end's InitWait and as long for Connected. On failure everything
    /// granted is taken back (pages dom0 still maps leak with the slot).
    pub fn connect_devid(cpu: &Cpu, devid: u32) -> Result<Self, &'static str> {
        let mut digits = [0u8; 16];
        let fe = Path::new(&[b"device/vif", fmt_u32(&mut digits, devid)]);
        let fe = fe.as_bytes();

        let mut out = [0u8; 128];
        let len =
            store_read(cpu, &Path::new(&[fe, b"backend"]), &mut out).ok_or("no backend path")?;
        let be_path = Path::new(&[out[..len].split(|&b| b == 0).next().unwrap_or(&[])]);
        let be = be_path.as_bytes();
        let len = store_read(cpu, &Path::new(&[fe, b"mac"]), &mut out).ok_or("no mac")?;
        let mac = parse_mac(&out[..len]).ok_or("bad mac")?;

        if !wait_state(cpu, be, 2) {
            return Err("back end never reached InitWait");
        }
        if store_read_u64(cpu, &Path::new(&[be, b"feature-rx-copy"])) != Some(1) {
            return Err("back end cannot copy RX (no feature-rx-copy)");
        }

        let slot = claim_slot().ok_or("every vif slot is taken")?;
        let mut port = None;
        let r = Self::connect_slot(cpu, devid, mac, fe, be, slot, &mut port);
        if r.is_err() {
            if let Some(p) = port {
                ev::close(cpu, p);
            }
            release_slot(cpu, slot, 100);
        }
        r
    }

    /// The handshake of [`connect_devid`](Self::connect_devid) once `slot` is claimed; `port_out`
    /// gets the event channel as soon as it is allocated.
    fn connect_slot(
        cpu: &Cpu,
        devid: u32,
        mac: Mac,
        fe: &[u8],
        be: &[u8],
        slot: usize,
        port_out: &mut Option<u32>,
    ) -> Result<Self, &'static str> {
        let gref_base = NET_GREF + slot as u32 * VIF_GREFS;
        let (rings, tx_bufs, rx_bufs) =
            slot_pages(slot).ok_or("out of memory for the vif's pages")?;
        crate::grant::grant(gref_base + TX_RING_GREF, 0, rings, false);
        crate::grant::grant(gref_base + RX_RING_GREF, 0, rings + PAGE_SIZE as u64, false);
        for i in 0..TX_PAGES {
            let gpa = tx_bufs + (i * PAGE_SIZE) as u64;
            crate::grant::grant(gref_base + TX_BUF_GREF + i as u32, 0, gpa, true);
        }
        for i in 0..RX_PAGES {
            let gpa = rx_bufs + (i * PAGE_SIZE) as u64;
            crate::grant::grant(gref_base + RX_BUF_GREF + i as u32, 0, gpa, false);
        }
        // SAFETY: the slot's ring and buffer pages are heap pages kept with the slot,
        // identity-mapped, that only this vif (its slot claimed until released) and dom0 use;
        // this kernel reaches them only through these regions, whose every access is atomic.
        let (tx_region, rx_region, tx_pool, rx_pool) = unsafe {
            (
                SharedRegion::from_raw(rings as *mut u8, PAGE_SIZE),
                SharedRegion::from_raw((rings + PAGE_SIZE as u64) as *mut u8, PAGE_SIZE),
                SharedRegion::from_raw(tx_bufs as *mut u8, TX_PAGES * PAGE_SIZE),
                SharedRegion::from_raw(rx_bufs as *mut u8, RX_PAGES * PAGE_SIZE),
            )
        };
        let map = |_| "ring memory";
        let tx = FrontRing::new(tx_region.map_err(map)?, 1).map_err(|_| "tx ring init")?;
        let rx: FrontRing<'static, NetRxRing> =
            FrontRing::new(rx_region.map_err(map)?, 1).map_err(|_| "rx ring init")?;
        if (rx.size() as usize) < RX_PAGES {
            return Err("rx ring smaller than the RX buffer pool");
        }
        let port = ev::alloc_unbound(cpu, 0).map_err(|_| "no event channel")?;
        *port_out = Some(port);
        let mut nf = NetFront {
            devid,
            mac,
            slot,
            gref_base,
            port,
            tx,
            rx,
            tx_pool: tx_pool.map_err(map)?,
            rx_pool: rx_pool.map_err(map)?,
            tx_free: core::array::from_fn(|i| (TX_PAGES - 1 - i) as u16),
            tx_nfree: TX_PAGES,
            tx_busy: [false; TX_PAGES],
            rx_posted: [false; RX_PAGES],
            rx_unpublished: 0,
            rx_skip_extra: false,
            asm: Assembly::default(),
            stats: NetStats::default(),
        };
        // Every RX page goes on the ring before the back end learns of it.
        for i in 0..RX_PAGES {
            nf.post_rx(i);
        }
        nf.rx.commit_requests();
        nf.rx_unpublished = 0;

        let mut v = [0u8; 16];
        let w = |k: &[u8], val: &[u8]| store_write(cpu, fe, k, val);
        w(b"tx-ring-ref", fmt_u32(&mut v, gref_base + TX_RING_GREF))?;
        w(b"rx-ring-ref", fmt_u32(&mut v, gref_base + RX_RING_GREF))?;
        w(b"event-channel", fmt_u32(&mut v, port))?;
        w(b"request-rx-copy", b"1")?;
        w(b"feature-sg", b"1")?;
        w(b"feature-rx-notify", b"1")?;
        // Our buffer pages stay granted, unchanged, while connected: dom0 may keep them mapped.
        w(b"feature-persistent", b"1")?;
        w(b"state", b"3")?;
        if !wait_state(cpu, be, 4) {
            return Err("back end never connected");
        }
        w(b"state", b"4")?;
        Ok(nf)
    }

    /// Stops using the vif: ends access to every page it granted (waiting up to `timeout_ms`
    /// while dom0 still maps one) and closes its event channel. Returns how many pages stayed
    /// mapped: they are leaked with the slot, never reused. The store's XenbusState is the
    /// caller's.
    pub fn release(self, cpu: &Cpu, timeout_ms: u64) -> u32 {
        let leaked = release_slot(cpu, self.slot, timeout_ms);
        ev::close(cpu, self.port);
        ev::clear_pending(self.port);
        leaked
    }

    /// The event channel port (for sleeping on several vifs at once).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Gets ready to sleep on [`port`](Self::port) together with other ports: publishes pending
    /// requests, clears the port and asks to be woken by the next received frame. Returns
    /// `false` if frames are already waiting (do not sleep). A broken ring may be slept on (it
    /// has nothing more to give; no busy loop).
    pub fn prepare_sleep(&mut self) -> bool {
        self.publish_rx();
        self.flush();
        // Cleared before arming: an event that arrives from here on leaves the port pending.
        ev::clear_pending(self.port);
        self.rx.final_check_for_responses() != Ok(true)
    }

    /// The error that broke a ring, if one did.
    pub fn broken(&self) -> Option<RingError> {
        self.tx.broken().or(self.rx.broken())
    }

    // ---- RX ----

    fn post_rx(&mut self, page: usize) {
        let req = NetRxRequest {
            id: page as u16,
            gref: GrantRef(self.gref_base + RX_BUF_GREF + page as u32),
        };
        // Never full: a page is posted once at a time and the ring has a slot for each (asserted
        // at connect). A broken ring refuses; the page then stays off the ring.
        if self.rx.push_request(&NetifRxRequestRaw::from(req)).is_ok() {
            self.rx_posted[page] = true;
            self.rx_unpublished += 1;
        }
    }

    /// Publishes reposted RX buffers, notifying the back end if it waits for them.
    fn publish_rx(&mut self) {
        if self.rx_unpublished > 0 {
            self.rx_unpublished = 0;
            if self.rx.commit_requests() {
                ev::doorbell(self.port);
            }
        }
    }

    /// Ends the frame being assembled; returns it if it is whole and good.
    fn end_frame(&mut self) -> Option<RxFrame> {
        let a = core::mem::take(&mut self.asm);
        if a.bad {
            self.stats.rx_dropped += 1;
            return None;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += a.len as u64;
        let checked = NetRxFlags::DATA_VALIDATED | NetRxFlags::CSUM_BLANK;
        Some(RxFrame {
            len: a.len,
            l4_checked: a.flags.intersects(checked),
        })
    }

    /// The next received frame, copied into `buf` (its slots reassembled), or `None` when no
    /// whole frame is waiting. Every consumed page is reposted at once.
    pub fn recv(&mut self, buf: &mut [u8]) -> Option<RxFrame> {
        loop {
            let Ok(Some(raw)) = self.rx.take_response() else {
                self.publish_rx();
                return None;
            };
            if self.rx_skip_extra {
                // An extra-info slot we never asked for: it carries no page of ours to repost.
                self.rx_skip_extra = false;
                self.stats.rx_bad += 1;
                continue;
            }
            let page = usize::from(raw.id);
            if page >= RX_PAGES || !self.rx_posted[page] {
                self.stats.rx_bad += 1;
                continue;
            }
            self.rx_posted[page] = false;
            if !self.asm.active {
                self.asm = Assembly {
                    active: true,
                    flags: NetRxFlags::from_bits_truncate(raw.flags),
                    ..Assembly::default()
                };
            }
            let more = raw.flags & NetRxFlags::MORE_DATA.bits() != 0;
            match NetRxResponse::parse(&raw) {
                Ok(r) => {
                    if r.flags.contains(NetRxFlags::EXTRA_INFO) {
                        self.rx_skip_extra = true;
                        self.stats.rx_bad += 1;
                        self.asm.bad = true;
                    }
                    match r.status {
                        RxStatus::Failed(_) => {
                            self.stats.rx_errors += 1;
                            self.asm.bad = true;
                        }
                        RxStatus::Data(len) => {
                            let len = usize::from(len);
                            let at = self.asm.len;
                            // `parse` checked offset + len <= PAGE_SIZE.
                            let src = page * PAGE_SIZE + usize::from(r.offset);
                            match buf.get_mut(at..at + len) {
                                Some(dst) if !self.asm.bad => {
                                    if self.rx_pool.read(src, dst).is_err() {
                                        self.asm.bad = true;
                                    }
                                    self.asm.len += len;
                                }
                                _ => self.asm.bad = true,
                            }
                        }
                    }
                }
                Err(_) => {
                    self.stats.rx_bad += 1;
                    self.asm.bad = true;
                }
            }
            self.post_rx(page);
            if self.rx_unpublished >= RX_PUBLISH_BATCH {
                self.publish_rx();
            }
            if !more && let Some(f) = self.end_frame() {
                return Some(f);
            }
        }
    }

    /// Whether RX responses are waiting.
    pub fn rx_pending(&mut self) -> bool {
        self.rx.has_unconsumed_responses().unwrap_or(false)
    }

    // ---- TX ----

    /// TX pages on the ring.
    pub fn tx_in_flight(&self) -> u32 {
        (TX_PAGES - self.tx_nfree) as u32
    }

    /// Whether TX responses are waiting.
    pub fn tx_pending(&mut self) -> bool {
        self.tx.has_unconsumed_responses().unwrap_or(false)
    }

    /// Takes a free TX page.
    pub fn tx_alloc(&mut self) -> Option<u16> {
        if self.tx_nfree == 0 {
            return None;
        }
        self.tx_nfree -= 1;
        Some(self.tx_free[self.tx_nfree])
    }

    /// Gives back a TX page that was not put on the ring.
    fn tx_release(&mut self, page: u16) {
        if self.tx_nfree < TX_PAGES {
            self.tx_free[self.tx_nfree] = page;
            self.tx_nfree += 1;
        }
    }

    /// Copies `data` into TX page `page` at `offset`; `false` if it would not fit the page.
    /// The page must not be on the ring (only pages from [`tx_alloc`](Self::tx_alloc) or, before
    /// any sending, every page).
    pub fn tx_write(&self, page: u16, offset: usize, data: &[u8]) -> bool {
        let page = usize::from(page);
        page < TX_PAGES
            && offset + data.len() <= PAGE_SIZE
            && self.tx_pool.write(page * PAGE_SIZE + offset, data).is_ok()
    }

    /// Grant reference of TX page `page`.
    pub fn tx_gref(&self, page: u16) -> u32 {
        self.gref_base + TX_BUF_GREF + u32::from(page)
    }

    /// Queues (without publishing) a frame of `len` bytes at offset 0 of each of `pages` in
    /// turn: every page but the last holds a full page of it. The pages must come from
    /// [`tx_alloc`](Self::tx_alloc) and hold the frame; on failure they are given back.
    fn tx_queue(&mut self, pages: &[u16], len: usize, flags: NetTxFlags) -> bool {
        let mut pkt = TxPacket {
            flags,
            ..TxPacket::default()
        };
        let mut left = len;
        for &p in pages {
            let n = left.min(PAGE_SIZE);
            left -= n;
            let slot = NetTxSlot {
                gref: GrantRef(self.tx_gref(p)),
                offset: 0,
                len: n as u16,
                id: p,
            };
            if pkt.slots.try_push(slot).is_err() {
                break;
            }
        }
        let mut raw = [NetifTxRequestRaw::default(); MAX_SLOTS_PER_FRAME];
        let ok = left == 0
            && (self.tx.free_requests() as usize) >= pages.len()
            && match pkt.write_slots(&mut raw) {
                Ok(n) => raw[..n].iter().all(|r| self.tx.push_request(r).is_ok()),
                Err(_) => false,
            };
        for &p in pages {
            if ok {
                self.tx_busy[usize::from(p)] = true;
            } else {
                self.tx_release(p);
            }
        }
        if ok {
            self.stats.tx_frames += 1;
        } else {
            self.stats.tx_full += 1;
        }
        ok
    }

    /// Queues (without publishing) the frame of `len` bytes already written at offset 0 of TX
    /// page `page` (from [`tx_alloc`](Self::tx_alloc)). On failure the page is given back.
    pub fn tx_push(&mut self, page: u16, len: usize, flags: NetTxFlags) -> bool {
        len <= PAGE_SIZE && self.tx_queue(&[page], len, flags)
    }

    /// Copies `frame` into as many TX pages as it needs and queues it (without publishing).
    /// `false` if it is too long, or no pages or ring slots are free even after reclaiming.
    pub fn send(&mut self, frame: &[u8], flags: NetTxFlags) -> bool {
        let need = frame.len().div_ceil(PAGE_SIZE);
        if need == 0 || need > MAX_SLOTS_PER_FRAME {
            self.stats.tx_full += 1;
            return false;
        }
        if self.tx_nfree < need || (self.tx.free_requests() as usize) < need {
            self.reclaim();
        }
        if self.tx_nfree < need || (self.tx.free_requests() as usize) < need {
            self.stats.tx_full += 1;
            return false;
        }
        let mut pages = [0u16; MAX_SLOTS_PER_FRAME];
        for (chunk, p) in frame.chunks(PAGE_SIZE).zip(pages.iter_mut()) {
            // `tx_nfree >= need` was checked just above.
            *p = self.tx_alloc().unwrap_or(0);
            self.tx_write(*p, 0, chunk);
        }
        self.tx_queue(&pages[..need], frame.len(), flags)
    }

    /// Publishes queued TX requests, ringing the doorbell if the back end asked.
    pub fn flush(&mut self) {
        if self.tx.commit_requests() {
            ev::doorbell(self.port);
        }
    }

    /// Takes every TX response: their pages become free. Returns how many.
    pub fn reclaim(&mut self) -> u32 {
        let mut n = 0;
        while let Ok(Some(raw)) = self.tx.take_response() {
            n += 1;
            let page = usize::from(raw.id);
            let ours = page < TX_PAGES && self.tx_busy[page];
            match NetTxResponse::parse(&raw) {
                Ok(r) if ours => match r.status {
                    NetifStatus::Okay => {}
                    NetifStatus::Error | NetifStatus::Dropped => self.stats.tx_errors += 1,
                    // A filler for an extra-info slot: we never send one.
                    NetifStatus::Null => self.stats.tx_bad += 1,
                },
                _ => self.stats.tx_bad += 1,
            }
            // The slot is answered either way: a page of ours comes back.
            if ours {
                self.tx_busy[page] = false;
                self.tx_release(page as u16);
            }
        }
        n
    }

    // ---- Waiting ----

    /// Sleeps until the back end signals or `timeout_ns` passes: a received frame always wakes
    /// us; with `tx_batch > 0`, so do `tx_batch` more TX responses. Publishes pending requests
    /// first, and returns at once if responses are already waiting. A broken ring sleeps the
    /// whole timeout (no busy loop).
    pub fn sleep(&mut self, cpu: &Cpu, timeout_ns: u64, tx_batch: u32) {
        if !self.prepare_sleep() {
            return;
        }
        let tx = if tx_batch > 0 && self.tx.in_flight() > 0 {
            self.tx.final_check_for_responses_after(tx_batch)
        } else {
            Ok(false)
        };
        if tx == Ok(true) {
            return;
        }
        // 0 would mean "forever".
        ev::poll(cpu, &[self.port], timeout_ns.max(1_000));
        ev::clear_pending(self.port);
    }

    // ---- For the hostile job ----

    /// Queues a raw TX request exactly as given (nethostile's garbage). `page`, if any, is the
    /// TX page its id names, on the ring from now on.
    pub fn push_raw(&mut self, req: &NetifTxRequestRaw, page: Option<u16>) -> bool {
        let ok = self.tx.push_request(req).is_ok();
        if let Some(p) = page {
            if ok {
                self.tx_busy[usize::from(p)] = true;
            } else {
                self.tx_release(p);
            }
        }
        ok
    }

    /// Grants TX page `page` to domain `domid` under this vif's spare grant reference; returns
    /// the reference.
    pub fn grant_spare(&self, page: u16, domid: u16) -> u32 {
        let gpa = self.tx_pool.base_addr() as u64 + u64::from(page) * PAGE_SIZE as u64;
        let gref = self.gref_base + SPARE_GREF;
        crate::grant::grant(gref, domid, gpa, true);
        gref
    }

    /// Overwrites the TX ring's shared `req_prod` with the published value plus `delta` and rings
    /// the doorbell: a producer index no honest front end writes. Our ring endpoint keeps its
    /// own copy, so only the back end sees it.
    pub fn scribble_tx_req_prod(&self, delta: u32) {
        let Some((addr, _, _)) = slot_pages(self.slot) else {
            return;
        };
        // SAFETY: `req_prod` is the first u32 of this vif's TX ring page (its slot's, allocated
        // at connect and kept), 4-aligned and accessed (by us and dom0) only atomically.
        let req_prod = unsafe { AtomicU32::from_ptr(addr as usize as *mut u32) };
        let now = req_prod.load(Ordering::Relaxed);
        // Release, as a real publication would be.
        req_prod.store(now.wrapping_add(delta), Ordering::Release);
        ev::doorbell(self.port);
    }
}

impl Link for NetFront {
    fn send(&mut self, frame: &[u8], csum_blank: bool) -> bool {
        let mut flags = NetTxFlags::empty();
        flags.set(NetTxFlags::CSUM_BLANK, csum_blank);
        NetFront::send(self, frame, flags)
    }
}
