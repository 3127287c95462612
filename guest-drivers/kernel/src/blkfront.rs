//! Block front end: finds its disk in the store, does the XenbusState handshake with the back
//! end, and issues requests over one or more block rings (Xen's multi-queue layout) of 1-4
//! pages each, with data in granted pages.

use pv_protocol::blkif::{BlkRequest, BlkResponse, BlkRing, BlkSegment, BlkStatus, DirectSegments};
use pv_protocol::grant::GrantRef;
use pv_protocol::ring::FrontRing;
use pv_protocol::store::MsgType;
use pv_protocol::{PAGE_SIZE, SharedRegion};

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::evtchn as ev;
use crate::hcall::Cpu;
use crate::store::{StoreFail, request};
use crate::text::{fmt_u32, parse_u64};

/// Grant ref of queue 0's first ring page; queue `q`'s page `i` is `RING_GREF + 16 q + i`.
const RING_GREF: u32 = 1024;
/// Most ring pages per queue (ring-page-order 2).
pub const MAX_RING_PAGES: usize = 4;
/// Most queues (each a ring and an event channel).
pub const MAX_QUEUES: usize = 4;
/// Grant ref of the indirect-segment page.
const INDIRECT_GREF: u32 = 9;
/// First grant ref of the data pages.
pub const DATA_GREF: u32 = 16;
/// Data pages the front end owns: 1 MiB, one full indirect request.
pub const DATA_PAGES: usize = 256;

/// The ring pages of every queue (`MAX_RING_PAGES` each), the indirect-segment page and the
/// data pages: heap pages ([`crate::heap::area`]) allocated by the first connect and kept, as
/// the back end may keep them mapped (persistent grants).
static RING_AREA: AtomicUsize = AtomicUsize::new(0);
static INDIRECT_AREA: AtomicUsize = AtomicUsize::new(0);
static DATA: AtomicUsize = AtomicUsize::new(0);

/// One queue: a ring and the event channel that signals it.
#[derive(Debug)]
struct Queue {
    ring: FrontRing<'static, BlkRing>,
    port: u32,
}

/// A connected block device.
#[derive(Debug)]
pub struct BlkFront {
    queues: [Option<Queue>; MAX_QUEUES],
    nq: usize,
    /// The queue the next synchronous request goes to (they rotate over all queues).
    cur: usize,
    /// Disk size in sectors.
    pub sectors: u64,
    next_id: u64,
}

fn read(cpu: &Cpu, path: &[u8], out: &mut [u8]) -> Result<usize, StoreFail> {
    request(cpu, MsgType::Read, 0, &[path, b"\0"], out).map(|r| r.len)
}

fn write(cpu: &Cpu, path: &[u8], value: &[u8]) -> Result<(), StoreFail> {
    request(
        cpu,
        MsgType::Write,
        0,
        &[path, b"\0", value],
        &mut [0u8; 16],
    )
    .map(|_| ())
}
/// Builds `prefix/suffix` into `buf`.
fn join<'b>(buf: &'b mut [u8; 128], prefix: &[u8], suffix: &[u8]) -> &'b [u8] {
    let n = (prefix.len() + 1 + suffix.len()).min(128);
    let p = prefix.len().min(n);
    buf[..p].copy_from_slice(&prefix[..p]);
    if p < n {
        buf[p] = b'/';
        let s = (n - p - 1).min(suffix.len());
        buf[p + 1..p + 1 + s].copy_from_slice(&suffix[..s]);
    }
    &buf[..n]
}

/// The address of data page `i` (`i` clamped below [`DATA_PAGES`]); `None` before a disk
/// connected (the pages do not exist yet).
pub fn data_page(i: usize) -> Option<*mut u8> {
    // Relaxed: set once by vCPU 0, which alone reads it.
    match DATA.load(Ordering::Relaxed) {
        0 => None,
        base => Some((base + i.min(DATA_PAGES - 1) * PAGE_SIZE) as *mut u8),
    }
}

fn indirect_page() -> Option<*mut [u8; PAGE_SIZE]> {
    // Relaxed: as in `data_page`.
    match INDIRECT_AREA.load(Ordering::Relaxed) {
        0 => None,
        p => Some(p as *mut [u8; PAGE_SIZE]),
    }
}

impl BlkFront {
    /// Waits (about `tries` x 10 ms) for a disk in the store, then connects to it with up to
    /// `queues` queues (as many as the back end offers), each a ring of `2^order` pages
    /// (`order` <= 2; 0 uses the single-page `ring-ref` form).
    pub fn connect(cpu: &Cpu, tries: u32, order: u32, queues: usize) -> Result<Self, &'static str> {
        let order = order.min(2);
        let pages = 1usize << order;
        let mut out = [0u8; 256];
        // The toolstack may attach the disk just after the domain started.
        let mut dev = [0u8; 32];
        let devlen = crate::store::wait_until(cpu, b"device/vbd", u64::from(tries) * 10, |cpu| {
            let first = request(cpu, MsgType::Directory, 0, &[b"device/vbd\0"], &mut out)
                .ok()
                .and_then(|r| out[..r.len].split(|&b| b == 0).next())
                .filter(|s| !s.is_empty())?;
            let n = first.len().min(32);
            dev[..n].copy_from_slice(&first[..n]);
            Some(n)
        })
        .unwrap_or(0);
        if devlen == 0 {
            return Err("no disk in device/vbd");
        }
        let mut fe = [0u8; 128];
        let fe_len = join(&mut fe, b"device/vbd", &dev[..devlen]).len();
        let fe = &fe[..fe_len];
        let mut key = [0u8; 128];
        let n =
            read(cpu, join(&mut key, fe, b"backend"), &mut out).map_err(|_| "no backend path")?;
        let mut be = [0u8; 128];
        let be_len = n.min(128);
        be[..be_len].copy_from_slice(&out[..be_len]);
        let be = &be[..be_len];
        // Wait for the back end's InitWait.
        if !crate::netfront::wait_state(cpu, be, 2) {
            return Err("back end never reached InitWait");
        }
        let n = read(cpu, join(&mut key, be, b"sectors"), &mut out).map_err(|_| "no sectors")?;
        let sectors = parse_u64(&out[..n]).ok_or("bad sectors")?;
        // A back end without the key offers one queue.
        let offered = read(cpu, join(&mut key, be, b"multi-queue-max-queues"), &mut out)
            .ok()
            .and_then(|n| parse_u64(&out[..n]))
            .unwrap_or(1);
        let nq = queues.clamp(1, MAX_QUEUES).min(offered.max(1) as usize);

        // Data pages and the indirect page, granted to dom0.
        let oom = "out of memory for the disk's pages";
        let data = crate::heap::area(&DATA, DATA_PAGES).ok_or(oom)?;
        let indirect = crate::heap::area(&INDIRECT_AREA, 1).ok_or(oom)?;
        let rings = crate::heap::area(&RING_AREA, MAX_RING_PAGES * MAX_QUEUES).ok_or(oom)?;
        for i in 0..DATA_PAGES {
            crate::grant::grant(
                DATA_GREF + i as u32,
                0,
                (data + i * PAGE_SIZE) as u64,
                false,
            );
        }
        crate::grant::grant(INDIRECT_GREF, 0, indirect as u64, true);

        let w = |cpu: &Cpu, k: &[u8], val: &[u8]| {
            let mut kb = [0u8; 128];
            write(cpu, join(&mut kb, fe, k), val)
        };
        let mut v = [0u8; 16];
        let mut qs: [Option<Queue>; MAX_QUEUES] = [const { None }; MAX_QUEUES];
        for (q, slot) in qs.iter_mut().enumerate().take(nq) {
            let ring_addr = (rings + q * MAX_RING_PAGES * PAGE_SIZE) as u64;
            let gref0 = RING_GREF + 16 * q as u32;
            for i in 0..pages {
                crate::grant::grant(
                    gref0 + i as u32,
                    0,
                    ring_addr + (i * PAGE_SIZE) as u64,
                    false,
                );
            }
            // SAFETY: the ring pages are heap pages kept for good, identity-mapped, which this
            // kernel shares only with the back end, which (like us) accesses them only
            // atomically; each queue has its own.
            let region = unsafe { SharedRegion::from_raw(ring_addr as *mut u8, pages * PAGE_SIZE) }
                .map_err(|_| "ring page")?;
            let ring = FrontRing::new(region, pages).map_err(|_| "ring init")?;
            let port = ev::alloc_unbound(cpu, 0).map_err(|_| "no event channel")?;
            // Keys live in `queue-N/` when there are several queues (Xen's layout).
            let mut dir = [0u8; 16];
            let dir_len = if nq == 1 {
                0
            } else {
                let digits = fmt_u32(&mut v, q as u32);
                let nd = digits.len();
                dir[..6].copy_from_slice(b"queue-");
                dir[6..6 + nd].copy_from_slice(digits);
                dir[6 + nd] = b'/';
                7 + nd
            };
            let mut k = [0u8; 32];
            let key = |k: &mut [u8; 32], name: &[u8], idx: Option<u32>| -> usize {
                k[..dir_len].copy_from_slice(&dir[..dir_len]);
                k[dir_len..dir_len + name.len()].copy_from_slice(name);
                let mut n = dir_len + name.len();
                if let Some(i) = idx {
                    let mut d = [0u8; 16];
                    let digits = fmt_u32(&mut d, i);
                    k[n..n + digits.len()].copy_from_slice(digits);
                    n += digits.len();
                }
                n
            };
            if pages == 1 {
                let n = key(&mut k, b"ring-ref", None);
                w(cpu, &k[..n], fmt_u32(&mut v, gref0)).map_err(|_| "write ring-ref")?;
            } else {
                for i in 0..pages as u32 {
                    let n = key(&mut k, b"ring-ref", Some(i));
                    w(cpu, &k[..n], fmt_u32(&mut v, gref0 + i)).map_err(|_| "write ring-refN")?;
                }
            }
            let n = key(&mut k, b"event-channel", None);
            w(cpu, &k[..n], fmt_u32(&mut v, port)).map_err(|_| "write event-channel")?;
            *slot = Some(Queue { ring, port });
        }
        if pages > 1 {
            w(cpu, b"ring-page-order", fmt_u32(&mut v, order))
                .map_err(|_| "write ring-page-order")?;
        }
        if offered > 1 {
            w(cpu, b"multi-queue-num-queues", fmt_u32(&mut v, nq as u32))
                .map_err(|_| "write multi-queue-num-queues")?;
        }
        w(cpu, b"protocol", b"x86_64-abi").map_err(|_| "write protocol")?;
        // Our data pages are granted for good: let the back end keep them mapped.
        w(cpu, b"feature-persistent", b"1").map_err(|_| "write feature-persistent")?;
        w(cpu, b"state", b"3").map_err(|_| "write state")?;
        if !crate::netfront::wait_state(cpu, be, 4) {
            return Err("back end never connected");
        }
        w(cpu, b"state", b"4").map_err(|_| "write state")?;
        Ok(Self {
            queues: qs,
            nq,
            cur: 0,
            sectors,
            next_id: 1,
        })
    }

    /// Queues connected.
    pub fn queues(&self) -> usize {
        self.nq
    }

    fn queue(&mut self, q: usize) -> &mut Queue {
        // `connect` filled slots 0..nq; callers index below `queues()`.
        self.queues[q.min(self.nq - 1)]
            .as_mut()
            .expect("connected queue")
    }

    /// Issues one request and waits for its response.
    /// Successive calls rotate over the queues, so every ring carries traffic.
    pub fn submit(&mut self, cpu: &Cpu, req: BlkRequest) -> BlkStatus {
        let q = self.cur;
        self.cur = (self.cur + 1) % self.nq;
        if !self.push(q, req) {
            return BlkStatus::Error;
        }
        self.kick(q);
        self.wait_one(cpu, q).map_or(BlkStatus::Error, |(_, s)| s)
    }

    /// Queues a request on queue `q` without publishing it; `false` if the ring is full.
    pub fn push(&mut self, q: usize, req: BlkRequest) -> bool {
        self.queue(q).ring.push_request(&req.to_raw()).is_ok()
    }

    /// Queues a raw request (valid or not: the hostile job's) on queue `q` without publishing
    /// it; `false` if the ring is full.
    pub fn push_raw(&mut self, q: usize, raw: &pv_protocol::blkif::BlkifRequestRaw) -> bool {
        self.queue(q).ring.push_request(raw).is_ok()
    }

    /// Slots in queue `q`'s ring.
    pub fn ring_size(&mut self, q: usize) -> u32 {
        self.queue(q).ring.size()
    }

    /// The next response on queue `q`, waiting until the TSC reaches `deadline`: polls the ring
    /// a while, then sleeps in `sched_op(poll)` (at most 10 ms at a time) once the event index is
    /// armed. `None` on timeout or a broken ring; `Some(Err(id))` for a response that does not
    /// parse.
    pub fn wait_until(
        &mut self,
        cpu: &Cpu,
        q: usize,
        deadline: u64,
    ) -> Option<Result<(u64, BlkStatus), u64>> {
        let queue = self.queue(q);
        loop {
            for _ in 0..2_000 {
                match queue.ring.take_response() {
                    Ok(Some(r)) => {
                        return Some(
                            BlkResponse::parse(&r)
                                .map(|p| (p.id, p.status))
                                .map_err(|_| r.id),
                        );
                    }
                    Ok(None) => core::hint::spin_loop(),
                    Err(_) => return None,
                }
            }
            if crate::control::rdtsc() > deadline {
                return None;
            }
            if !queue.ring.final_check_for_responses().unwrap_or(true) {
                ev::poll(cpu, &[queue.port], 10_000_000);
                ev::clear_pending(queue.port);
            }
        }
    }

    /// Publishes queue `q`'s queued requests, ringing the doorbell only if the back end asked.
    pub fn kick(&mut self, q: usize) {
        let queue = self.queue(q);
        if queue.ring.commit_requests() {
            ev::doorbell(queue.port);
        }
    }

    /// Requests in flight on queue `q`.
    pub fn in_flight(&mut self, q: usize) -> u32 {
        self.queue(q).ring.in_flight()
    }

    /// A finished request: polls the ring for a while (no exits while the back end is busy),
    /// then sleeps in `sched_op(poll)` once the event index is armed.
    pub fn wait_one(&mut self, cpu: &Cpu, q: usize) -> Option<(u64, BlkStatus)> {
        let queue = self.queue(q);
        for _ in 0..100_000 {
            for _ in 0..2_000 {
                match queue.ring.take_response() {
                    Ok(Some(r)) => {
                        return BlkResponse::parse(&r).ok().map(|r| (r.id, r.status));
                    }
                    Ok(None) => core::hint::spin_loop(),
                    Err(_) => return None,
                }
            }
            if !queue.ring.final_check_for_responses().unwrap_or(true) {
                ev::poll(cpu, &[queue.port], 100_000_000);
                ev::clear_pending(queue.port);
            }
        }
        None
    }

    /// Sleeps until some queue has at least `batch` (clamped to its requests in flight)
    /// responses waiting, instead of polling: one wake-up per batch, and the vCPU's core is free
    /// for the back end meanwhile. Returns at once if responses are already there.
    pub fn sleep_for_batch(&mut self, cpu: &Cpu, batch: u32) {
        let mut ports = [0u32; MAX_QUEUES];
        for (q, port) in ports.iter_mut().enumerate().take(self.nq) {
            let queue = self.queue(q);
            if queue.ring.in_flight() == 0 {
                continue;
            }
            if queue
                .ring
                .final_check_for_responses_after(batch)
                .unwrap_or(true)
            {
                return;
            }
            *port = queue.port;
        }
        ev::poll(cpu, &ports[..self.nq], 100_000_000);
        for &p in &ports[..self.nq] {
            ev::clear_pending(p);
        }
    }

    /// A finished request on queue `q`, if one is there now (no waiting).
    pub fn try_one(&mut self, q: usize) -> Option<(u64, BlkStatus)> {
        let r = self.queue(q).ring.take_response().ok().flatten()?;
        BlkResponse::parse(&r).ok().map(|r| (r.id, r.status))
    }

    /// The next request id.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A read or write of data pages `first_page..first_page + pages` (whole pages) at `sector`
    /// through the indirect page (up to 256 pages, 1 MiB).
    pub fn rw_indirect(
        &mut self,
        cpu: &Cpu,
        write: bool,
        sector: u64,
        first_page: usize,
        pages: usize,
    ) -> BlkStatus {
        let pages = pages.min(DATA_PAGES - first_page.min(DATA_PAGES));
        let mut segs = [BlkSegment::default(); DATA_PAGES];
        for (i, s) in segs.iter_mut().take(pages).enumerate() {
            *s = BlkSegment {
                gref: GrantRef(DATA_GREF + (first_page + i) as u32),
                first_sect: 0,
                last_sect: 7,
            };
        }
        let Some(page) = indirect_page() else {
            return BlkStatus::Error;
        };
        // SAFETY: the indirect page (allocated by `connect`, which made this front end) is ours
        // and the back end reads it only during a request; none is in flight while it is
        // rewritten (requests through it are issued one at a time).
        let page = unsafe { &mut *page };
        if pv_protocol::blkif::write_indirect_page(&segs[..pages], page).is_err() {
            return BlkStatus::Error;
        }
        let id = self.next_id();
        let mut grefs = pv_protocol::blkif::IndirectGrefs::new();
        let _ = grefs.try_push(GrantRef(INDIRECT_GREF));
        let op = if write {
            pv_protocol::blkif::IndirectOp::Write
        } else {
            pv_protocol::blkif::IndirectOp::Read
        };
        self.submit(
            cpu,
            BlkRequest::Indirect {
                id,
                handle: 0,
                op,
                sector,
                nr_segments: pages as u16,
                pages: grefs,
            },
        )
    }

    /// A read or write of whole-or-partial data pages: `(page, first_sect, last_sect)` each.
    pub fn rw(
        &mut self,
        cpu: &Cpu,
        write: bool,
        sector: u64,
        segs: &[(usize, u8, u8)],
    ) -> BlkStatus {
        let mut segments = DirectSegments::new();
        for &(page, first, last) in segs {
            let s = BlkSegment {
                gref: GrantRef(DATA_GREF + page as u32),
                first_sect: first,
                last_sect: last,
            };
            if segments.try_push(s).is_err() {
                return BlkStatus::Error;
            }
        }
        let id = self.next_id();
        let req = BlkRequest::data(write, id, 0, sector, segments);
        self.submit(cpu, req)
    }

    /// Flushes the disk cache.
    pub fn flush(&mut self, cpu: &Cpu) -> BlkStatus {
        let id = self.next_id();
        self.submit(
            cpu,
            BlkRequest::Flush {
                id,
                handle: 0,
                sector: 0,
                segments: DirectSegments::new(),
            },
        )
    }

    /// Discards `nr_sectors` at `sector`.
    pub fn discard(&mut self, cpu: &Cpu, sector: u64, nr_sectors: u64) -> BlkStatus {
        let id = self.next_id();
        self.submit(
            cpu,
            BlkRequest::Discard {
                id,
                handle: 0,
                sector,
                nr_sectors,
                secure: false,
            },
        )
    }
}

// ---- Disks connected by device id, which may come and go (the hotplug job) ----

/// Disks [`BlkFront::connect_devid`] can hold at once.
pub const DEV_SLOTS: usize = 4;
/// Grant references of the device slots: slot `k` grants its ring page as `DEV_GREF + 2k` and
/// its data page as `DEV_GREF + 2k + 1` (clear of the boot-time disk's and the vifs' ranges).
const DEV_GREF: u32 = 8192;

/// Each slot's ring page and data page (two heap pages, allocated at the slot's first use and
/// kept with it).
static DEV_PAGES: [AtomicUsize; DEV_SLOTS] = [const { AtomicUsize::new(0) }; DEV_SLOTS];
/// Which slots are taken (a slot whose pages dom0 kept mapped stays taken for good).
static DEV_CLAIMED: [core::sync::atomic::AtomicBool; DEV_SLOTS] =
    [const { core::sync::atomic::AtomicBool::new(false) }; DEV_SLOTS];

/// A disk connected by device id into a slot of its own: one queue with a one-page ring, and one
/// data page (8 sectors) for I/O. [`release`](Self::release) gives everything back, so the same
/// device can be connected again later.
#[derive(Debug)]
pub struct DevDisk {
    /// The connected device.
    pub disk: BlkFront,
    /// The back end's `info` says read-only (`VDISK_READONLY`).
    pub readonly: bool,
    /// The data page, reached only atomically (dom0 may map it at any time).
    pub data: SharedRegion<'static>,
    slot: usize,
    port: u32,
}

/// Page `i` (0: ring, 1: data) of device slot `slot`, allocated at the slot's first use.
fn dev_slot_page(slot: usize, i: usize) -> Option<u64> {
    let base = crate::heap::area(DEV_PAGES.get(slot)?, 2)?;
    Some((base + i * PAGE_SIZE) as u64)
}

impl BlkFront {
    /// Connects to disk `devid` (`device/vbd/<devid>`) through the XenbusState handshake, with
    /// one queue and a one-page ring, in a free device slot. The back end should already be in
    /// InitWait (this waits up to about 5 s for it, and as long for Connected). On failure
    /// everything granted is taken back (a page dom0 still maps leaks with its slot).
    pub fn connect_devid(cpu: &Cpu, devid: u32) -> Result<DevDisk, &'static str> {
        let slot = DEV_CLAIMED
            .iter()
            .position(|c| {
                c.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            })
            .ok_or("every device slot is taken")?;
        let mut port = None;
        let r = Self::handshake_devid(cpu, devid, slot, &mut port);
        if r.is_err() {
            if let Some(p) = port {
                ev::close(cpu, p);
            }
            release_dev_slot(cpu, slot, 100);
        }
        r
    }

    fn handshake_devid(
        cpu: &Cpu,
        devid: u32,
        slot: usize,
        port_out: &mut Option<u32>,
    ) -> Result<DevDisk, &'static str> {
        let mut digits = [0u8; 16];
        let mut fe = [0u8; 128];
        let fe_len = join(&mut fe, b"device/vbd", fmt_u32(&mut digits, devid)).len();
        let fe = &fe[..fe_len];
        let mut out = [0u8; 256];
        let mut key = [0u8; 128];
        let n =
            read(cpu, join(&mut key, fe, b"backend"), &mut out).map_err(|_| "no backend path")?;
        let be_len = out[..n].iter().position(|&b| b == 0).unwrap_or(n).min(128);
        let mut be = [0u8; 128];
        be[..be_len].copy_from_slice(&out[..be_len]);
        let be = &be[..be_len];
        let num = |cpu: &Cpu, dir: &[u8], k: &[u8]| -> Option<u64> {
            let mut kb = [0u8; 128];
            let mut o = [0u8; 24];
            let n = read(cpu, join(&mut kb, dir, k), &mut o).ok()?;
            parse_u64(&o[..n])
        };
        if !crate::netfront::wait_state(cpu, be, 2) {
            return Err("back end never reached InitWait");
        }
        let sectors = num(cpu, be, b"sectors").ok_or("no sectors")?;
        let info = num(cpu, be, b"info").unwrap_or(0);
        let readonly = pv_protocol::blkif::VdiskInfo::from_bits_truncate(info as u32)
            .contains(pv_protocol::blkif::VdiskInfo::READONLY);

        let (ring_gref, data_gref) = (DEV_GREF + 2 * slot as u32, DEV_GREF + 2 * slot as u32 + 1);
        let oom = "out of memory for the disk's pages";
        let ring_page = dev_slot_page(slot, 0).ok_or(oom)?;
        let data_page = dev_slot_page(slot, 1).ok_or(oom)?;
        crate::grant::grant(ring_gref, 0, ring_page, false);
        // Writable even on a read-only disk: reads land in it.
        crate::grant::grant(data_gref, 0, data_page, false);
        // SAFETY: the slot's two pages are heap pages kept with the slot, identity-mapped, that
        // only this device (its slot claimed above) and dom0 use; this kernel reaches them only
        // through these regions, whose every access is atomic.
        let (ring_region, data) = unsafe {
            (
                SharedRegion::from_raw(ring_page as *mut u8, PAGE_SIZE),
                SharedRegion::from_raw(data_page as *mut u8, PAGE_SIZE),
            )
        };
        let ring =
            FrontRing::new(ring_region.map_err(|_| "ring page")?, 1).map_err(|_| "ring init")?;
        let data = data.map_err(|_| "data page")?;
        let port = ev::alloc_unbound(cpu, 0).map_err(|_| "no event channel")?;
        *port_out = Some(port);
        let mut v = [0u8; 16];
        let w = |cpu: &Cpu, k: &[u8], val: &[u8]| {
            let mut kb = [0u8; 128];
            write(cpu, join(&mut kb, fe, k), val).map_err(|_| "store write failed")
        };
        w(cpu, b"ring-ref", fmt_u32(&mut v, ring_gref))?;
        w(cpu, b"event-channel", fmt_u32(&mut v, port))?;
        w(cpu, b"protocol", b"x86_64-abi")?;
        // The data page stays granted while connected: the back end may keep it mapped.
        w(cpu, b"feature-persistent", b"1")?;
        w(cpu, b"state", b"3")?;
        if !crate::netfront::wait_state(cpu, be, 4) {
            return Err("back end never connected");
        }
        w(cpu, b"state", b"4")?;
        let mut queues: [Option<Queue>; MAX_QUEUES] = [const { None }; MAX_QUEUES];
        queues[0] = Some(Queue { ring, port });
        Ok(DevDisk {
            disk: BlkFront {
                queues,
                nq: 1,
                cur: 0,
                sectors,
                next_id: 1,
            },
            readonly,
            data,
            slot,
            port,
        })
    }
}

/// Ends access to slot `slot`'s pages (waiting up to `timeout_ms` for dom0 to unmap them) and
/// frees the slot, unless a page stayed mapped; returns how many did.
fn release_dev_slot(cpu: &Cpu, slot: usize, timeout_ms: u64) -> u32 {
    let leaked = crate::grant::end_access_range(cpu, DEV_GREF + 2 * slot as u32, 2, timeout_ms);
    if leaked == 0 {
        DEV_CLAIMED[slot].store(false, core::sync::atomic::Ordering::Release);
    }
    leaked
}

impl DevDisk {
    /// Reads (or writes) the whole data page from (to) sectors `sector..sector + 8`.
    pub fn rw_page(&mut self, cpu: &Cpu, write: bool, sector: u64) -> BlkStatus {
        let mut segments = DirectSegments::new();
        let seg = BlkSegment {
            gref: GrantRef(DEV_GREF + 2 * self.slot as u32 + 1),
            first_sect: 0,
            last_sect: 7,
        };
        if segments.try_push(seg).is_err() {
            return BlkStatus::Error;
        }
        let id = self.disk.next_id();
        self.disk
            .submit(cpu, BlkRequest::data(write, id, 0, sector, segments))
    }

    /// Stops using the device: ends access to its pages (waiting up to `timeout_ms` while dom0
    /// still maps one) and closes its event channel. Returns how many pages stayed mapped: they
    /// are leaked with the slot, never reused. The store's XenbusState is the caller's.
    pub fn release(self, cpu: &Cpu, timeout_ms: u64) -> u32 {
        let DevDisk { slot, port, .. } = self;
        let leaked = release_dev_slot(cpu, slot, timeout_ms);
        ev::close(cpu, port);
        ev::clear_pending(port);
        leaked
    }
}
