//! blockback: serves one block ring from a disk image, all I/O through io_uring.
//!
//! Each request is copied off the ring once and parsed by pv-protocol's blkif parser; anything
//! malformed or out of bounds gets an error response (and a log line with the domain id), never
//! I/O. A good request's segments are granted pages, mapped through the [`GrantMapper`] trait and
//! handed to the kernel as an iovec: the disk reads into and writes from the guest's pages with
//! no bounce copy. Flush is `fsync` (after the data, when a flush carries data), discard is a
//! punched hole. New requests are submitted as soon as they are seen while earlier ones are in
//! flight, completions are answered as they arrive, responses are published in batches, and the
//! front end is notified only when the event index asks.

use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, squeue, types};
use pv_protocol::blkif::{
    BlkOp, BlkRequest, BlkResponse, BlkRing, BlkSegment, BlkStatus, BlkifRequestRaw, IndirectOp,
    SEGMENTS_PER_INDIRECT_PAGE, indirect_page_count, parse_indirect_page,
};
use pv_protocol::grant::GrantRef;
use pv_protocol::ring::{BackRing, RingError};
use pv_protocol::{PAGE_SIZE, SECTOR_SIZE, SharedRegion};

use crate::disk::Disk;
use crate::grants::{GrantMapper, MappedPage};

/// Indirect segments per request this back-end advertises (`feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;
/// io_uring submission-queue depth: requests in flight per reap.
const URING_DEPTH: u32 = 256;

/// Errors that stop serving a ring.
#[derive(Debug, thiserror::Error)]
pub enum BlkBackError {
    /// The front end broke the ring protocol (hostile indices): the ring is dead.
    #[error("ring broken")]
    Ring(#[from] RingError),
    /// io_uring itself failed.
    #[error("io_uring")]
    Uring(#[source] std::io::Error),
}

/// Counters a toolstack can show.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests answered OK.
    pub ok: u64,
    /// Requests answered with an error (malformed, out of bounds, refused, I/O error).
    pub errors: u64,
    /// Requests answered "not supported".
    pub unsupported: u64,
    /// Bytes read from the disk into guest pages.
    pub read_bytes: u64,
    /// Bytes written from guest pages to the disk.
    pub written_bytes: u64,
}

/// A request in flight: what keeps its pages and iovecs alive until the kernel is done.
struct Inflight {
    id: u64,
    op: u8,
    sqes: u8,
    failed: bool,
    expect: i64,
    write: bool,
    _iovecs: Box<[libc::iovec]>,
    _pages: Vec<MappedPage>,
}

/// The back end of one block ring.
pub struct BlkBack<'a, G: GrantMapper> {
    domid: u32,
    ring: BackRing<'a, BlkRing>,
    disk: Disk,
    grants: G,
    uring: IoUring,
    stats: BlkStats,
    /// Requests in flight, by slot (the slot index is the io_uring user data >> 1).
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    in_flight: usize,
}

impl<G: GrantMapper> std::fmt::Debug for BlkBack<'_, G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBack")
            .field("domid", &self.domid)
            .field("disk", &self.disk)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Why a request is refused before any I/O.
struct Refused(BlkStatus, String);

impl<'a, G: GrantMapper> BlkBack<'a, G> {
    /// Serves `ring` (already attached) for domain `domid` from `disk`.
    pub fn new(
        domid: u32,
        ring: BackRing<'a, BlkRing>,
        disk: Disk,
        grants: G,
    ) -> Result<Self, BlkBackError> {
        let uring = IoUring::new(URING_DEPTH).map_err(BlkBackError::Uring)?;
        Ok(Self {
            domid,
            ring,
            disk,
            grants,
            uring,
            stats: BlkStats::default(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Serves the ring until it is idle: new requests are submitted as soon as they are seen,
    /// completions are answered as they arrive (so the disk queue stays full), and responses
    /// are published in batches. Returns with nothing in flight; the caller then re-arms the
    /// event index ([`final_check`](Self::final_check)) and sleeps.
    pub fn process(&mut self) -> Result<bool, BlkBackError> {
        let mut notify = false;
        loop {
            let mut answers: Vec<BlkResponse> = Vec::new();
            let mut submitted = 0;
            // Take requests while the submission queue has room for their entries (<= 2 each).
            while self.sq_room() >= 2 {
                let Some(raw) = self.ring.take_request()? else {
                    break;
                };
                match self.prepare(&raw) {
                    Ok(inflight) => {
                        self.submit(inflight)?;
                        submitted += 1;
                    }
                    Err(Refused(status, why)) => {
                        tracing::warn!(
                            domid = self.domid,
                            id = raw.id(),
                            op = raw.operation,
                            "block request refused: {why}"
                        );
                        answers.push(BlkResponse {
                            id: raw.id(),
                            operation: raw.operation,
                            status,
                        });
                    }
                }
            }
            if submitted > 0 {
                self.uring.submit().map_err(BlkBackError::Uring)?;
            }
            // Wait for a completion only when there is nothing else to do.
            if answers.is_empty() && submitted == 0 && self.in_flight > 0 {
                self.uring.submit_and_wait(1).map_err(BlkBackError::Uring)?;
            }
            self.reap(&mut answers);
            for a in &answers {
                match a.status {
                    BlkStatus::Okay => self.stats.ok += 1,
                    BlkStatus::Error => self.stats.errors += 1,
                    BlkStatus::NotSupported => self.stats.unsupported += 1,
                }
                self.ring.push_response(&a.to_raw())?;
            }
            notify |= self.ring.commit_responses();
            if self.in_flight == 0 && !self.ring.has_unconsumed_requests()? {
                return Ok(notify);
            }
        }
    }

    /// Before sleeping: re-arms the request event; `true` means more requests arrived.
    pub fn final_check(&mut self) -> Result<bool, BlkBackError> {
        Ok(self.ring.final_check_for_requests()?)
    }

    fn sq_room(&mut self) -> usize {
        let sq = self.uring.submission();
        sq.capacity() - sq.len()
    }

    /// Queues the entries of one request (submitted by the caller's next `submit`).
    fn submit(&mut self, r: Inflight) -> Result<(), BlkBackError> {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let fd = types::Fd(self.disk.file().as_raw_fd());
        let entries = sqes_for(&r, fd, slot as u64);
        self.slots[slot] = Some(r);
        self.in_flight += 1;
        let mut sq = self.uring.submission();
        for e in entries {
            // SAFETY: the iovecs and pages the entry points to live in `self.slots[slot]` until
            // its last completion has been reaped (`reap` frees the slot only then).
            unsafe { sq.push(&e) }
                .map_err(|_| BlkBackError::Uring(std::io::Error::other("submission queue full")))?;
        }
        Ok(())
    }

    /// Turns every completion that is ready into a response for finished requests.
    fn reap(&mut self, answers: &mut Vec<BlkResponse>) {
        let done: Vec<(u64, i32)> = self
            .uring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            let slot = (ud >> 1) as usize;
            let Some(r) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            r.sqes -= 1;
            let is_data = ud & 1 == 0;
            if res < 0 || (is_data && r.expect > 0 && i64::from(res) != r.expect) {
                if !r.failed {
                    tracing::warn!(
                        domid = self.domid,
                        id = r.id,
                        "disk I/O failed: result {res}"
                    );
                }
                r.failed = true;
            }
            if r.sqes > 0 {
                continue;
            }
            let Some(r) = self.slots[slot].take() else {
                continue;
            };
            self.free.push(slot);
            self.in_flight -= 1;
            if !r.failed {
                if r.write {
                    self.stats.written_bytes += r.expect.max(0) as u64;
                } else {
                    self.stats.read_bytes += r.expect.max(0) as u64;
                }
            }
            answers.push(BlkResponse {
                id: r.id,
                operation: r.op,
                status: if r.failed {
                    BlkStatus::Error
                } else {
                    BlkStatus::Okay
                },
            });
        }
    }

    fn prepare(&mut self, raw: &BlkifRequestRaw) -> Result<Inflight, Refused> {
        let req =
            BlkRequest::parse(raw).map_err(|e| Refused(e.response_status(), e.to_string()))?;
        let id = req.id();
        let op = req.op() as u8;
        match req {
            BlkRequest::Read {
                sector, segments, ..
            } => self.data(id, op, sector, &segments, false, false),
            BlkRequest::Write {
                sector, segments, ..
            } => self.data(id, op, sector, &segments, true, false),
            BlkRequest::Flush {
                sector, segments, ..
            } => {
                if self.disk.readonly() {
                    return Err(Refused(
                        BlkStatus::Error,
                        "flush of a read-only disk".into(),
                    ));
                }
                self.data(id, op, sector, &segments, true, true)
            }
            BlkRequest::Discard {
                sector, nr_sectors, ..
            } => {
                if self.disk.readonly() {
                    return Err(Refused(
                        BlkStatus::Error,
                        "discard on a read-only disk".into(),
                    ));
                }
                self.check_range(sector, nr_sectors)?;
                Ok(Inflight {
                    id,
                    op,
                    sqes: 1,
                    failed: false,
                    expect: 0,
                    write: true,
                    _iovecs: Box::new([
                        libc::iovec {
                            iov_base: std::ptr::null_mut(),
                            iov_len: (sector * SECTOR_SIZE) as usize,
                        },
                        libc::iovec {
                            iov_base: std::ptr::null_mut(),
                            iov_len: (nr_sectors * SECTOR_SIZE) as usize,
                        },
                    ]),
                    _pages: Vec::new(),
                })
            }
            BlkRequest::Indirect {
                op: iop,
                sector,
                nr_segments,
                pages,
                ..
            } => {
                let n = usize::from(nr_segments);
                if n > MAX_INDIRECT_SEGMENTS {
                    return Err(Refused(BlkStatus::Error, format!("{n} indirect segments")));
                }
                let mut segs: Vec<BlkSegment> = Vec::with_capacity(n);
                for (i, gref) in pages.iter().enumerate() {
                    let page = self.map(*gref, false)?;
                    // Copy the indirect page out once, atomically (the guest may scribble on it).
                    // SAFETY: the mapping keeps the page valid for PAGE_SIZE bytes while `page`
                    // lives, and every access through the region is atomic.
                    let region = unsafe { SharedRegion::from_raw(page.addr(0), PAGE_SIZE) }
                        .map_err(|e| Refused(BlkStatus::Error, e.to_string()))?;
                    let mut copy = [0u8; PAGE_SIZE];
                    region
                        .read(0, &mut copy)
                        .map_err(|e| Refused(BlkStatus::Error, e.to_string()))?;
                    let count = indirect_page_count(nr_segments, i);
                    let parsed = parse_indirect_page(&copy, count)
                        .map_err(|e| Refused(e.response_status(), e.to_string()))?;
                    segs.extend_from_slice(&parsed);
                }
                debug_assert!(segs.len() <= pages.len() * SEGMENTS_PER_INDIRECT_PAGE);
                let write = iop == IndirectOp::Write;
                self.data(id, BlkOp::Indirect as u8, sector, &segs, write, false)
            }
        }
    }

    fn check_range(&self, sector: u64, sectors: u64) -> Result<(), Refused> {
        match sector.checked_add(sectors) {
            Some(end) if end <= self.disk.sectors() => Ok(()),
            _ => Err(Refused(
                BlkStatus::Error,
                format!(
                    "sectors {sector}+{sectors} past the end ({})",
                    self.disk.sectors()
                ),
            )),
        }
    }

    fn map(&self, gref: GrantRef, device_writes: bool) -> Result<MappedPage, Refused> {
        self.grants
            .map(gref, device_writes)
            .map_err(|e| Refused(BlkStatus::Error, e.to_string()))
    }

    /// A read or write of `segments` at `sector` (then an fsync if `flush`).
    fn data(
        &mut self,
        id: u64,
        op: u8,
        sector: u64,
        segments: &[BlkSegment],
        write: bool,
        flush: bool,
    ) -> Result<Inflight, Refused> {
        if write && self.disk.readonly() {
            return Err(Refused(
                BlkStatus::Error,
                "write to a read-only disk".into(),
            ));
        }
        let sectors: u64 = segments
            .iter()
            .map(|s| u64::from(s.last_sect - s.first_sect) + 1)
            .sum();
        self.check_range(sector, sectors)?;
        let mut pages = Vec::with_capacity(segments.len());
        let mut iovecs = Vec::with_capacity(segments.len() + 1);
        // The first iovec slot carries the file offset (see `sqes_for`).
        iovecs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: (sector * SECTOR_SIZE) as usize,
        });
        for s in segments {
            let page = self.map(s.gref, !write)?;
            iovecs.push(libc::iovec {
                iov_base: page
                    .addr(usize::from(s.first_sect) * SECTOR_SIZE as usize)
                    .cast(),
                iov_len: (u64::from(s.last_sect - s.first_sect) + 1) as usize
                    * SECTOR_SIZE as usize,
            });
            pages.push(page);
        }
        let expect = (sectors * SECTOR_SIZE) as i64;
        let data_sqes = u8::from(!segments.is_empty());
        Ok(Inflight {
            id,
            op,
            sqes: data_sqes + u8::from(flush),
            failed: false,
            expect,
            write,
            _iovecs: iovecs.into_boxed_slice(),
            _pages: pages,
        })
    }
}

/// The submission entries for one request; user data is `index << 1 | (1 for the fsync)`.
fn sqes_for(r: &Inflight, fd: types::Fd, index: u64) -> Vec<squeue::Entry> {
    let ud = index << 1;
    let iov = &r._iovecs;
    let mut out = Vec::new();
    if r.op == BlkOp::Discard as u8 {
        let (offset, len) = (iov[0].iov_len as u64, iov[1].iov_len as u64);
        out.push(
            opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build()
                .user_data(ud),
        );
        return out;
    }
    let offset = iov[0].iov_len as u64;
    let data = &iov[1..];
    let has_data = !data.is_empty();
    let fsync = r.sqes > u8::from(has_data);
    if has_data {
        let e = if r.write {
            opcode::Writev::new(fd, data.as_ptr(), data.len() as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, data.as_ptr(), data.len() as u32)
                .offset(offset)
                .build()
        };
        // A flush with data: the fsync runs only after the write completed.
        let e = if fsync {
            e.flags(squeue::Flags::IO_LINK)
        } else {
            e
        };
        out.push(e.user_data(ud));
    }
    if fsync {
        out.push(opcode::Fsync::new(fd).build().user_data(ud | 1));
    }
    out
}
