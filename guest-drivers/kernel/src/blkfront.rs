//! Block front end: finds its disk in the store, does the XenbusState handshake with the back
//! end, and issues requests over a one-page block ring with data in granted pages.

use pv_protocol::blkif::{BlkRequest, BlkResponse, BlkRing, BlkSegment, BlkStatus, DirectSegments};
use pv_protocol::grant::GrantRef;
use pv_protocol::ring::FrontRing;
use pv_protocol::store::MsgType;
use pv_protocol::{PAGE_SIZE, SharedRegion};

use crate::evtchn as ev;
use crate::hcall::Cpu;
use crate::store::{StoreFail, request};
use crate::text::{fmt_u32, parse_u64};

/// Grant ref of the first ring page (a multi-page ring uses the following refs too).
const RING_GREF: u32 = 10;
/// Most ring pages (ring-page-order 2).
pub const MAX_RING_PAGES: usize = 4;
/// Grant ref of the indirect-segment page.
const INDIRECT_GREF: u32 = 9;
/// First grant ref of the data pages.
pub const DATA_GREF: u32 = 16;
/// Data pages the front end owns: 1 MiB, one full indirect request.
pub const DATA_PAGES: usize = 256;

#[repr(C, align(4096))]
struct Pages<const N: usize>([[u8; PAGE_SIZE]; N]);

static mut RING_PAGE: Pages<MAX_RING_PAGES> = Pages([[0; PAGE_SIZE]; MAX_RING_PAGES]);
static mut INDIRECT_PAGE: Pages<1> = Pages([[0; PAGE_SIZE]; 1]);
static mut DATA: Pages<DATA_PAGES> = Pages([[0; PAGE_SIZE]; DATA_PAGES]);

/// A connected block device.
#[derive(Debug)]
pub struct BlkFront {
    ring: FrontRing<'static, BlkRing>,
    port: u32,
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

/// Host address (= guest address) of data page `i`.
pub fn data_page(i: usize) -> *mut u8 {
    // SAFETY: only the address is computed; `i` is kept below DATA_PAGES by callers.
    unsafe {
        (&raw mut DATA)
            .cast::<u8>()
            .add(i.min(DATA_PAGES - 1) * PAGE_SIZE)
    }
}

impl BlkFront {
    /// Waits (about `tries` x 10 ms) for a disk in the store, then connects to it with a ring of
    /// `2^order` pages (`order` <= 2; 0 uses the single-page `ring-ref` form).
    pub fn connect(cpu: &Cpu, tries: u32, order: u32) -> Result<Self, &'static str> {
        let pages = 1usize << order.min(2);
        let mut out = [0u8; 256];
        // The toolstack may attach the disk just after the domain started.
        let mut dev = [0u8; 32];
        let mut devlen = 0;
        for _ in 0..tries {
            let first = request(cpu, MsgType::Directory, 0, &[b"device/vbd\0"], &mut out)
                .ok()
                .and_then(|r| out[..r.len].split(|&b| b == 0).next())
                .filter(|s| !s.is_empty());
            if let Some(first) = first {
                devlen = first.len().min(32);
                dev[..devlen].copy_from_slice(&first[..devlen]);
                break;
            }
            ev::poll(cpu, &[], 10_000_000);
        }
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
        let state_of = |cpu: &Cpu, dir: &[u8]| -> Option<u64> {
            let mut k = [0u8; 128];
            let mut o = [0u8; 16];
            let n = read(cpu, join(&mut k, dir, b"state"), &mut o).ok()?;
            parse_u64(&o[..n])
        };
        let mut waited = 0;
        while state_of(cpu, be) != Some(2) {
            waited += 1;
            if waited > 1000 {
                return Err("back end never reached InitWait");
            }
            ev::poll(cpu, &[], 5_000_000);
        }
        let n = read(cpu, join(&mut key, be, b"sectors"), &mut out).map_err(|_| "no sectors")?;
        let sectors = parse_u64(&out[..n]).ok_or("bad sectors")?;

        // Ring pages and data pages, granted to dom0.
        let ring_addr = (&raw mut RING_PAGE) as u64;
        for i in 0..pages {
            crate::grant::grant(
                RING_GREF + i as u32,
                0,
                ring_addr + (i * PAGE_SIZE) as u64,
                false,
            );
        }
        for i in 0..DATA_PAGES {
            crate::grant::grant(DATA_GREF + i as u32, 0, data_page(i) as u64, false);
        }
        crate::grant::grant(INDIRECT_GREF, 0, (&raw mut INDIRECT_PAGE) as u64, true);
        // SAFETY: the ring page is a static, identity-mapped page this kernel shares only with
        // the back end, which (like us) accesses it only atomically.
        let region = unsafe { SharedRegion::from_raw(ring_addr as *mut u8, pages * PAGE_SIZE) }
            .map_err(|_| "ring page")?;
        let ring = FrontRing::new(region, pages).map_err(|_| "ring init")?;
        let port = ev::alloc_unbound(cpu, 0).map_err(|_| "no event channel")?;

        let mut v = [0u8; 16];
        let w = |cpu: &Cpu, k: &[u8], val: &[u8]| {
            let mut kb = [0u8; 128];
            write(cpu, join(&mut kb, fe, k), val)
        };
        if pages == 1 {
            w(cpu, b"ring-ref", fmt_u32(&mut v, RING_GREF)).map_err(|_| "write ring-ref")?;
        } else {
            for i in 0..pages as u32 {
                let mut k = [0u8; 16];
                k[..8].copy_from_slice(b"ring-ref");
                let digits = fmt_u32(&mut v, i).len();
                k[8..8 + digits].copy_from_slice(fmt_u32(&mut v, i));
                let key = &k[..8 + digits];
                let mut v2 = [0u8; 16];
                w(cpu, key, fmt_u32(&mut v2, RING_GREF + i)).map_err(|_| "write ring-refN")?;
            }
            let mut v2 = [0u8; 16];
            w(cpu, b"ring-page-order", fmt_u32(&mut v2, order.min(2)))
                .map_err(|_| "write ring-page-order")?;
        }
        w(cpu, b"event-channel", fmt_u32(&mut v, port)).map_err(|_| "write event-channel")?;
        w(cpu, b"protocol", b"x86_64-abi").map_err(|_| "write protocol")?;
        // Our data pages are granted for good: let the back end keep them mapped.
        w(cpu, b"feature-persistent", b"1").map_err(|_| "write feature-persistent")?;
        w(cpu, b"state", b"3").map_err(|_| "write state")?;
        let mut waited = 0;
        while state_of(cpu, be) != Some(4) {
            waited += 1;
            if waited > 1000 {
                return Err("back end never connected");
            }
            ev::poll(cpu, &[], 5_000_000);
        }
        w(cpu, b"state", b"4").map_err(|_| "write state")?;
        Ok(Self {
            ring,
            port,
            sectors,
            next_id: 1,
        })
    }

    /// Issues one request and waits for its response.
    pub fn submit(&mut self, cpu: &Cpu, req: BlkRequest) -> BlkStatus {
        if !self.push(req) {
            return BlkStatus::Error;
        }
        self.kick();
        self.wait_one(cpu).map_or(BlkStatus::Error, |(_, s)| s)
    }

    /// Queues a request without publishing it; `false` if the ring is full.
    pub fn push(&mut self, req: BlkRequest) -> bool {
        self.ring.push_request(&req.to_raw()).is_ok()
    }

    /// Publishes queued requests, ringing the doorbell only if the back end asked.
    pub fn kick(&mut self) {
        if self.ring.commit_requests() {
            ev::doorbell(self.port);
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.ring.in_flight()
    }

    /// A finished request: polls the ring for a while (no exits while the back end is busy),
    /// then sleeps in `sched_op(poll)` once the event index is armed.
    pub fn wait_one(&mut self, cpu: &Cpu) -> Option<(u64, BlkStatus)> {
        for _ in 0..100_000 {
            for _ in 0..2_000 {
                match self.ring.take_response() {
                    Ok(Some(r)) => {
                        return BlkResponse::parse(&r).ok().map(|r| (r.id, r.status));
                    }
                    Ok(None) => core::hint::spin_loop(),
                    Err(_) => return None,
                }
            }
            if !self.ring.final_check_for_responses().unwrap_or(true) {
                ev::poll(cpu, &[self.port], 100_000_000);
                ev::clear_pending(self.port);
            }
        }
        None
    }

    /// A finished request, if one is there now (no waiting).
    pub fn try_one(&mut self) -> Option<(u64, BlkStatus)> {
        let r = self.ring.take_response().ok().flatten()?;
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
        // SAFETY: the indirect page is ours and the back end reads it only during a request;
        // none is in flight while it is rewritten (requests through it are issued one at a time).
        let page = unsafe { &mut *(&raw mut INDIRECT_PAGE).cast::<[u8; PAGE_SIZE]>() };
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
