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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
use crate::netback::Notify;

/// Indirect segments per request this back-end advertises (`feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;
/// io_uring submission-queue depth.
const URING_DEPTH: u32 = 1024;
/// The image, as the ring's registered file.
const DISK: types::Fixed = types::Fixed(0);
/// User data of the doorbell's poll (request slots stay far below it).
const UD_DOORBELL: u64 = u64::MAX;
/// How long [`BlkBack::serve`] keeps polling the ring after it woke the front end: about the time
/// a woken guest takes to run and answer its responses with new requests (tens of microseconds
/// here), so those are taken at once instead of after a doorbell and a wake-up of this thread.
pub const SPIN: Duration = Duration::from_micros(200);
/// How long it polls after publishing responses the front end did not ask to be woken for: a
/// front end that polls answers them within microseconds. The disk answers a burst of requests
/// together and then idles until the next request reaches it, so this turnaround is time the
/// disk stands still.
pub const SPIN_ANSWERED: Duration = Duration::from_micros(50);
/// A polling round that took longer than this means another thread had the core meanwhile.
const PREEMPTED: Duration = Duration::from_micros(50);
/// How long [`BlkBack::serve`] does not poll after it saw that.
const NO_SPIN_AFTER_PREEMPTION: Duration = Duration::from_millis(50);
/// Longest sleep before [`BlkBack::serve`] asks again whether to stop.
const SLEEP_MAX: Duration = Duration::from_millis(100);
/// How often a busy [`BlkBack::serve`] asks whether to stop.
const STOP_CHECK: Duration = Duration::from_millis(10);

/// Refused requests and failed I/O logged at warn per ring; later ones are counted (the
/// `errors` counter) and logged at debug, so a hostile front end cannot flood the log.
const WARN_LIMIT: u32 = 10;

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

/// Counters a toolstack can show, shared by the queues of one device and readable from any
/// thread while they serve.
#[derive(Debug, Default)]
pub struct BlkCounters {
    /// Requests answered OK.
    pub ok: AtomicU64,
    /// Requests answered with an error (malformed, out of bounds, refused, I/O error).
    pub errors: AtomicU64,
    /// Requests answered "not supported".
    pub unsupported: AtomicU64,
    /// Reads completed (xentop's `VBD_RD`).
    pub reads: AtomicU64,
    /// Writes completed (xentop's `VBD_WR`).
    pub writes: AtomicU64,
    /// Bytes read from the disk into guest pages.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest pages to the disk.
    pub written_bytes: AtomicU64,
}

impl BlkCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> BlkStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlkStats {
            ok: l(&self.ok),
            errors: l(&self.errors),
            unsupported: l(&self.unsupported),
            reads: l(&self.reads),
            writes: l(&self.writes),
            read_bytes: l(&self.read_bytes),
            written_bytes: l(&self.written_bytes),
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        // Relaxed: statistics, read only for display; nothing is ordered by them.
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of [`BlkCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlkStats {
    /// See [`BlkCounters::ok`].
    pub ok: u64,
    /// See [`BlkCounters::errors`].
    pub errors: u64,
    /// See [`BlkCounters::unsupported`].
    pub unsupported: u64,
    /// See [`BlkCounters::reads`].
    pub reads: u64,
    /// See [`BlkCounters::writes`].
    pub writes: u64,
    /// See [`BlkCounters::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlkCounters::written_bytes`].
    pub written_bytes: u64,
}

/// A request in flight: what keeps its pages and iovecs alive until the kernel is done.
struct Inflight {
    id: u64,
    op: u8,
    sqes: u16,
    failed: bool,
    /// Data goes through the registered buffer, one fixed read/write per contiguous run.
    fixed: bool,
    /// Bytes the whole request moves (0 for a flush or discard).
    expect: i64,
    write: bool,
    bufs: Buffers,
}

/// The iovecs and pages of one request. Reused from request to request (cleared, their memory
/// kept), so a request costs no allocation.
#[derive(Default)]
struct Buffers {
    /// `iovecs[0].iov_len` is the file offset (a discard: offset and length in 0 and 1); the
    /// rest are the data runs in the guest's pages.
    iovecs: Vec<libc::iovec>,
    /// Keeps the granted pages mapped until the kernel is done with them.
    pages: Vec<MappedPage>,
}

// SAFETY: the raw pointers in `iovecs` point into the pages that `pages` (which is Send) keeps
// mapped; they are plain addresses handed to the kernel, dereferenced by no thread of ours, and
// travel together with the pages that keep them valid.
unsafe impl Send for Buffers {}

/// The back end of one block ring.
pub struct BlkBack<'a, G: GrantMapper> {
    domid: u32,
    ring: BackRing<'a, BlkRing>,
    disk: Disk,
    grants: G,
    uring: IoUring,
    stats: Arc<BlkCounters>,
    /// Requests in flight, by slot (the slot index is the io_uring user data >> 1).
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    in_flight: usize,
    /// The guest's memory is registered with io_uring as fixed buffer 0.
    fixed: bool,
    /// Responses of one pass, and completions of one reap (kept to reuse their memory).
    answers: Vec<BlkResponse>,
    done: Vec<(u64, i32)>,
    /// Buffers of finished requests, for the next ones.
    spare: Vec<Buffers>,
    /// A poll of the guest's doorbell is queued (see [`serve`](Self::serve)).
    doorbell_armed: bool,
    /// That poll completed: the doorbell must be cleared before it is polled again.
    doorbell_rang: bool,
    /// Responses were published since [`serve`](Self::serve) last looked.
    answered: bool,
    /// Guest-caused warnings logged so far (the first [`WARN_LIMIT`] at warn, then debug).
    warned: u32,
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

impl<G: GrantMapper> Drop for BlkBack<'_, G> {
    fn drop(&mut self) {
        // The kernel may still be reading into or writing from granted pages (`serve` stops, or
        // a ring breaks, with I/O in flight): wait for it before the pages and their grants are
        // released, or the guest could reuse a page the disk still writes.
        let mut answers = Vec::new();
        while self.in_flight > 0 {
            match self.uring.submit_and_wait(1) {
                Ok(_) => self.reap(&mut answers),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(
                        domid = self.domid,
                        "cannot wait for in-flight I/O, its pages stay mapped: {e}"
                    );
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
            }
        }
        // The ring is torn down asynchronously after it is closed, and with it goes its reference
        // to the registered image: give that back now, or the image (and its lock) would stay
        // open a while after the device is gone, and attaching it again could fail.
        if let Err(e) = self.uring.submitter().unregister_files() {
            tracing::warn!(domid = self.domid, "cannot unregister the image: {e}");
        }
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
        // Completion work runs when this thread next enters the kernel instead of interrupting it
        // (it enters often: to submit, or to wait).
        let uring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(URING_DEPTH)
            .or_else(|_| IoUring::new(URING_DEPTH))
            .map_err(BlkBackError::Uring)?;
        // The image is registered file 0: the kernel does not look the descriptor up and take a
        // reference on it for every request.
        uring
            .submitter()
            .register_files(&[disk.file().as_raw_fd()])
            .map_err(BlkBackError::Uring)?;
        // Register the guest's memory once, so the kernel does not pin pages per I/O.
        let fixed = grants.io_region().is_some_and(|(base, len)| {
            let iov = libc::iovec {
                iov_base: base.as_ptr().cast(),
                iov_len: len,
            };
            // SAFETY: `io_region`'s contract: the range stays mapped as long as `grants` lives,
            // and `grants` lives inside this back end, which owns (and so outlives) the ring.
            let r = unsafe { uring.submitter().register_buffers(&[iov]) };
            if let Err(e) = &r {
                tracing::warn!(domid, "no io_uring fixed buffer, per-I/O pinning: {e}");
            }
            r.is_ok()
        });
        Ok(Self {
            domid,
            ring,
            disk,
            grants,
            uring,
            stats: Arc::default(),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            fixed,
            answers: Vec::new(),
            done: Vec::new(),
            spare: Vec::new(),
            doorbell_armed: false,
            doorbell_rang: false,
            answered: false,
            warned: 0,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> BlkStats {
        self.stats.snapshot()
    }

    /// Counts into `counters` (shared with the device's other queues) from now on.
    #[must_use]
    pub fn with_counters(mut self, counters: Arc<BlkCounters>) -> Self {
        self.stats = counters;
        self
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
            let (busy, n) = self.pass()?;
            notify |= n;
            if self.in_flight == 0 && !self.ring.has_unconsumed_requests()? {
                return Ok(notify);
            }
            if !busy {
                self.uring.submit_and_wait(1).map_err(BlkBackError::Uring)?;
            }
        }
    }

    /// Serves the ring until `stop` says so (asked every few milliseconds), the way
    /// [`process`](Self::process) does, and sleeps in one wait for either a disk completion or
    /// the front end's doorbell (`chan`, armed through the event index; at most `SLEEP_MAX`,
    /// 100 ms) when there is nothing to do. Responses are signalled through `chan` when the front
    /// end's event index asks, and for [`SPIN`] after that this thread polls the ring instead
    /// of sleeping, for the woken front end's next requests ([`SPIN_ANSWERED`] after responses
    /// published without a signal, for a front end that polls); not while it has to share its core
    /// (then polling would take the time of the threads that make its work: the guest's vCPU,
    /// the kernel's completions). It never yields the core in a loop: the scheduler (EEVDF)
    /// pushes a yielding thread's deadline back a slice per yield, and a thread that yielded a
    /// few thousand times is then starved by any other runnable thread.
    pub fn serve(
        &mut self,
        chan: &impl Notify,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<(), BlkBackError> {
        let start = Instant::now();
        let mut last_stop_check = start;
        // Poll until then (after a notification), not before that (after a preemption).
        let mut spin_until = start;
        let mut no_spin_until = start;
        // When the previous polling round ended.
        let mut last_round: Option<Instant> = None;
        loop {
            let (busy, notify) = self.pass()?;
            let now = Instant::now();
            if notify {
                chan.notify();
                spin_until = now + SPIN;
            }
            if std::mem::take(&mut self.answered) {
                spin_until = spin_until.max(now + SPIN_ANSWERED);
            }
            if self.doorbell_rang {
                chan.clear();
                self.doorbell_rang = false;
            }
            // The stop condition may read the store: not on every pass.
            if now.duration_since(last_stop_check) >= STOP_CHECK {
                if stop() {
                    return Ok(());
                }
                last_stop_check = now;
            }
            if busy {
                last_round = None;
                continue;
            }
            if last_round.is_some_and(|t| now.duration_since(t) > PREEMPTED) {
                no_spin_until = now + NO_SPIN_AFTER_PREEMPTION;
            }
            if now < spin_until && now >= no_spin_until {
                std::hint::spin_loop();
                last_round = Some(now);
                continue;
            }
            last_round = None;
            // Sleep: ask for the doorbell, then look once more (the front end may have
            // published just before it saw the event index).
            if self.final_check()? {
                continue;
            }
            self.arm_doorbell(chan.wait_fd())?;
            let ts = types::Timespec::from(SLEEP_MAX);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.uring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => return Err(BlkBackError::Uring(e)),
            }
            if stop() {
                return Ok(());
            }
            last_stop_check = Instant::now();
        }
    }

    /// Queues a poll of the doorbell (once: it stays queued until it fires).
    fn arm_doorbell(&mut self, fd: std::os::fd::RawFd) -> Result<(), BlkBackError> {
        if self.doorbell_armed {
            return Ok(());
        }
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(UD_DOORBELL);
        // SAFETY: a poll entry points at no memory of ours.
        if unsafe { self.uring.submission().push(&e) }.is_err() {
            return Err(BlkBackError::Uring(std::io::Error::other(
                "submission queue full",
            )));
        }
        self.doorbell_armed = true;
        Ok(())
    }

    /// One round without waiting: takes and submits every request the submission queue has
    /// room for, then answers every finished request and publishes the responses. Returns
    /// whether anything moved and whether the front end must be notified.
    fn pass(&mut self) -> Result<(bool, bool), BlkBackError> {
        let mut answers = std::mem::take(&mut self.answers);
        answers.clear();
        let r = self.pass_into(&mut answers);
        self.answers = answers;
        r
    }

    fn pass_into(&mut self, answers: &mut Vec<BlkResponse>) -> Result<(bool, bool), BlkBackError> {
        let mut busy = false;
        let mut notify = false;
        let mut taken = 0;
        // Completions are queued as work for this thread, run when it enters the kernel: enter
        // when the kernel flags some.
        if self.uring.submission().taskrun() {
            self.uring.submit().map_err(BlkBackError::Uring)?;
        }
        loop {
            // Answer what finished before taking more: the front end can re-issue while this
            // thread submits (and every submission below also ran the completion work).
            answers.clear();
            self.reap(answers);
            busy |= !answers.is_empty();
            notify |= self.answer(answers)?;
            // Take a request while the submission queue has room for the largest one's entries
            // (one per segment with fixed buffers, plus an fsync).
            if self.sq_room() <= MAX_INDIRECT_SEGMENTS {
                break;
            }
            // At most a ring's worth per pass: the caller's stop check and sleep decisions
            // come round even when a front end refills the ring as fast as it is answered.
            if taken == self.ring.size() {
                break;
            }
            let Some(raw) = self.ring.take_request()? else {
                break;
            };
            taken += 1;
            busy = true;
            match self.prepare(&raw) {
                Ok(inflight) => {
                    self.submit(inflight)?;
                    // Each request goes to the disk at once, as fio's default does: a batch
                    // submitted together is plugged and reaches the disk together, which then
                    // answers it together, and the ring drains and refills in lockstep (a
                    // third fewer IOPS at depth 32, measured).
                    self.uring.submit().map_err(BlkBackError::Uring)?;
                }
                Err(Refused(status, why)) => {
                    self.warn(format_args!(
                        "block request {} (op {}) refused: {why}",
                        raw.id(),
                        raw.operation
                    ));
                    let refused = BlkResponse {
                        id: raw.id(),
                        operation: raw.operation,
                        status,
                    };
                    notify |= self.answer(std::slice::from_ref(&refused))?;
                }
            }
        }
        Ok((busy, notify))
    }

    /// Publishes `answers`; `true` if the front end asked to be notified.
    fn answer(&mut self, answers: &[BlkResponse]) -> Result<bool, BlkBackError> {
        self.answered |= !answers.is_empty();
        for a in answers {
            let c = &self.stats;
            BlkCounters::add(
                match a.status {
                    BlkStatus::Okay => &c.ok,
                    BlkStatus::Error => &c.errors,
                    BlkStatus::NotSupported => &c.unsupported,
                },
                1,
            );
            self.ring.push_response(&a.to_raw())?;
        }
        Ok(self.ring.commit_responses())
    }

    /// Before sleeping: re-arms the request event; `true` means more requests arrived.
    pub fn final_check(&mut self) -> Result<bool, BlkBackError> {
        Ok(self.ring.final_check_for_requests()?)
    }

    fn sq_room(&mut self) -> usize {
        let sq = self.uring.submission();
        sq.capacity() - sq.len()
    }

    /// Queues the entries of one request (the caller then submits them).
    fn submit(&mut self, r: Inflight) -> Result<(), BlkBackError> {
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let mut sq = self.uring.submission();
        let mut full = false;
        sqes_for(&r, DISK, slot as u64, &mut |e| {
            // SAFETY: the iovecs and pages the entry points to move into `self.slots[slot]`
            // below (Vecs: their heap memory does not move, and nothing grows them until the
            // slot is freed) and live there until the last completion has been reaped (`reap`
            // frees the slot only then).
            full |= unsafe { sq.push(&e) }.is_err();
        });
        drop(sq);
        self.slots[slot] = Some(r);
        self.in_flight += 1;
        if full {
            return Err(BlkBackError::Uring(std::io::Error::other(
                "submission queue full",
            )));
        }
        Ok(())
    }

    /// Turns every completion that is ready into a response for finished requests.
    fn reap(&mut self, answers: &mut Vec<BlkResponse>) {
        let mut done = std::mem::take(&mut self.done);
        done.clear();
        done.extend(self.uring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &done {
            if ud == UD_DOORBELL {
                self.doorbell_armed = false;
                self.doorbell_rang = true;
                continue;
            }
            let slot = (ud >> UD_SHIFT) as usize;
            let k = (ud & UD_MASK) as usize;
            let Some(r) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            r.sqes = r.sqes.saturating_sub(1);
            // k = 0: the fsync; k >= 1: data (one entry, or with fixed buffers entry k covers
            // segment k, whose length is iovec k).
            let expected = match (k, r.fixed) {
                (0, _) => None,
                (k, true) => r.bufs.iovecs.get(k).map(|v| v.iov_len as i64),
                (_, false) => Some(r.expect).filter(|&e| e > 0),
            };
            let failed_now = res < 0 || expected.is_some_and(|e| i64::from(res) != e);
            let first_failure = failed_now && !r.failed;
            r.failed |= failed_now;
            let (id, sqes_left) = (r.id, r.sqes);
            if first_failure {
                self.warn(format_args!(
                    "disk I/O for request {id} failed: result {res}"
                ));
            }
            if sqes_left > 0 {
                continue;
            }
            let Some(r) = self.slots[slot].take() else {
                continue;
            };
            self.recycle(r.bufs);
            self.free.push(slot);
            self.in_flight -= 1;
            if !r.failed {
                let c = &self.stats;
                let (n, bytes) = if r.write {
                    (&c.writes, &c.written_bytes)
                } else {
                    (&c.reads, &c.read_bytes)
                };
                if r.expect > 0 {
                    BlkCounters::add(n, 1);
                    BlkCounters::add(bytes, r.expect as u64);
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
        self.done = done;
    }

    /// Logs a guest-caused problem: at warn for the first [`WARN_LIMIT`], then at debug.
    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        if self.warned < WARN_LIMIT {
            self.warned += 1;
            let more = if self.warned == WARN_LIMIT {
                " (further ones at debug level, counted as errors)"
            } else {
                ""
            };
            tracing::warn!(domid = self.domid, "{what}{more}");
        } else {
            tracing::debug!(domid = self.domid, "{what}");
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
                if nr_sectors == 0 {
                    return Err(Refused(BlkStatus::Error, "discard of 0 sectors".into()));
                }
                self.check_range(sector, nr_sectors)?;
                let mut bufs = self.spare.pop().unwrap_or_default();
                for bytes in [sector * SECTOR_SIZE, nr_sectors * SECTOR_SIZE] {
                    bufs.iovecs.push(libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: bytes as usize,
                    });
                }
                Ok(Inflight {
                    id,
                    op,
                    sqes: 1,
                    failed: false,
                    fixed: false,
                    expect: 0,
                    write: true,
                    bufs,
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
        let mut bufs = self.spare.pop().unwrap_or_default();
        if let Err(e) = self.map_segments(&mut bufs, sector, segments, write) {
            self.recycle(bufs);
            return Err(e);
        }
        let expect = (sectors * SECTOR_SIZE) as i64;
        let data_sqes = if self.fixed {
            (bufs.iovecs.len() - 1) as u16
        } else {
            u16::from(!segments.is_empty())
        };
        Ok(Inflight {
            id,
            op,
            sqes: data_sqes + u16::from(flush),
            failed: false,
            fixed: self.fixed,
            expect,
            write,
            bufs,
        })
    }

    /// Maps `segments` into `bufs` (empty): the file offset of `sector`, then one iovec per run
    /// of the guest's pages.
    fn map_segments(
        &self,
        bufs: &mut Buffers,
        sector: u64,
        segments: &[BlkSegment],
        write: bool,
    ) -> Result<(), Refused> {
        let Buffers { iovecs, pages } = bufs;
        // The first iovec slot carries the file offset (see `sqes_for`).
        iovecs.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: (sector * SECTOR_SIZE) as usize,
        });
        for s in segments {
            let page = self.map(s.gref, !write)?;
            let base = page.addr(usize::from(s.first_sect) * SECTOR_SIZE as usize);
            let len = (u64::from(s.last_sect - s.first_sect) + 1) as usize * SECTOR_SIZE as usize;
            pages.push(page);
            // With fixed buffers every entry is one contiguous host range: merge a segment
            // that continues the previous one (a guest's adjacent pages) into it.
            if let Some(prev) = iovecs.last_mut().filter(|p| {
                self.fixed
                    && p.iov_base as usize + p.iov_len == base as usize
                    && !p.iov_base.is_null()
            }) {
                prev.iov_len += len;
                continue;
            }
            iovecs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            });
        }
        Ok(())
    }

    /// Releases a request's pages and keeps its buffers for the next request.
    fn recycle(&mut self, mut bufs: Buffers) {
        bufs.pages.clear();
        bufs.iovecs.clear();
        self.spare.push(bufs);
    }
}

/// User data of a completion: the request's slot above these bits, the entry within it below
/// (0: the fsync; 1 + n: data entry n).
const UD_SHIFT: u32 = 13;
const UD_MASK: u64 = (1 << UD_SHIFT) - 1;

/// Emits the submission entries for one request into `push`.
fn sqes_for(r: &Inflight, fd: types::Fixed, index: u64, push: &mut impl FnMut(squeue::Entry)) {
    let ud = index << UD_SHIFT;
    let iov = &r.bufs.iovecs;
    if r.op == BlkOp::Discard as u8 {
        let (offset, len) = (iov[0].iov_len as u64, iov[1].iov_len as u64);
        push(
            opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build()
                .user_data(ud | 1),
        );
        return;
    }
    let offset = iov[0].iov_len as u64;
    let data = &iov[1..];
    let data_sqes = if r.fixed {
        data.len()
    } else {
        usize::from(!data.is_empty())
    };
    let fsync = usize::from(r.sqes) > data_sqes;
    // A flush with data: the fsync runs only after the data (linked entries run in order).
    let link = |e: squeue::Entry| {
        if fsync {
            e.flags(squeue::Flags::IO_LINK)
        } else {
            e
        }
    };
    if r.fixed {
        let mut off = offset;
        for (n, v) in data.iter().enumerate() {
            let (buf, len) = (v.iov_base.cast::<u8>(), v.iov_len as u32);
            let e = if r.write {
                opcode::WriteFixed::new(fd, buf, len, 0).offset(off).build()
            } else {
                opcode::ReadFixed::new(fd, buf, len, 0).offset(off).build()
            };
            push(link(e).user_data(ud | (n as u64 + 1)));
            off += u64::from(len);
        }
    } else if !data.is_empty() {
        let e = if r.write {
            opcode::Writev::new(fd, data.as_ptr(), data.len() as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, data.as_ptr(), data.len() as u32)
                .offset(offset)
                .build()
        };
        push(link(e).user_data(ud | 1));
    }
    if fsync {
        push(opcode::Fsync::new(fd).build().user_data(ud));
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, RawFd};
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use pv_protocol::blkif::{BlkRequest, BlkRing, BlkSegment, BlkStatus, DirectSegments};
    use pv_protocol::grant::GrantRef;
    use pv_protocol::ring::BackRing;
    use pv_protocol::test_utils::{MockFrontEnd, RingMemory};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::grants::GrantFailure;

    #[repr(C, align(4096))]
    struct Page([u8; PAGE_SIZE]);

    /// Two pages (leaked: they outlive every mapping), granted as refs 0 and 1; the test looks
    /// at them only while no I/O is in flight.
    struct TwoPages(NonNull<[Page; 2]>);

    // SAFETY: the pages are plain leaked memory; the kernel writes them only during I/O the
    // test waits for before it reads them.
    unsafe impl Send for TwoPages {}

    impl TwoPages {
        fn new() -> Self {
            let pages = Box::leak(Box::new([Page([0; PAGE_SIZE]), Page([0; PAGE_SIZE])]));
            Self(NonNull::from(pages))
        }

        fn page(&self, i: usize) -> NonNull<u8> {
            // SAFETY: `i < 2` (callers), inside the leaked array.
            unsafe { self.0.cast::<Page>().add(i).cast() }
        }

        fn copy(&self, i: usize) -> [u8; PAGE_SIZE] {
            let mut out = [0; PAGE_SIZE];
            // SAFETY: a live page of PAGE_SIZE bytes; no I/O in flight (see the type).
            unsafe {
                std::ptr::copy_nonoverlapping(self.page(i).as_ptr(), out.as_mut_ptr(), PAGE_SIZE)
            };
            out
        }
    }

    impl GrantMapper for TwoPages {
        fn map(&self, gref: GrantRef, _device_writes: bool) -> Result<MappedPage, GrantFailure> {
            if gref.0 >= 2 {
                return Err(GrantFailure {
                    gref: gref.0,
                    reason: "not granted".into(),
                });
            }
            // SAFETY: the pages are leaked, valid for reads and writes for good.
            Ok(unsafe { MappedPage::new(self.page(gref.0 as usize), Box::new(())) })
        }
    }

    /// The event channel: an eventfd the test writes as the guest's doorbell.
    struct Chan {
        doorbell: EventFd,
        notified: AtomicU32,
    }

    impl Notify for Chan {
        fn notify(&self) {
            self.notified.fetch_add(1, Ordering::Relaxed);
        }
        fn wait_fd(&self) -> RawFd {
            self.doorbell.as_raw_fd()
        }
        fn clear(&self) {
            let _ = self.doorbell.read();
        }
    }

    fn request(
        write: bool,
        id: u64,
        sector: u64,
        gref: u32,
    ) -> pv_protocol::blkif::BlkifRequestRaw {
        let seg = BlkSegment {
            gref: GrantRef(gref),
            first_sect: 0,
            last_sect: 7,
        };
        BlkRequest::data(
            write,
            id,
            0,
            sector,
            DirectSegments::from_slice(&[seg]).unwrap(),
        )
        .to_raw()
    }

    fn wait_for(front: &mut MockFrontEnd<'_, BlkRing>) -> Vec<(u64, BlkStatus)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = front.blk_statuses();
            if !got.is_empty() || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    #[test]
    fn serve_answers_while_it_polls_and_after_a_doorbell_and_stops_when_told() {
        let dir = std::env::temp_dir().join(format!("sv-blkback-serve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        Disk::create_sparse(&img, 1 << 20).unwrap();
        let pages = TwoPages::new();
        let view = TwoPages(pages.0);
        // SAFETY: page 0 is live and no I/O is in flight yet.
        unsafe { std::ptr::write_bytes(pages.page(0).as_ptr(), 0x5a, PAGE_SIZE) };

        let mut mem = RingMemory::new(1);
        let region = mem.region();
        let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
        let ring = BackRing::attach(region, 1).unwrap();
        let mut back = BlkBack::new(3, ring, Disk::open(&img, false).unwrap(), pages).unwrap();
        let chan = Chan {
            doorbell: EventFd::new(EFD_NONBLOCK).unwrap(),
            notified: AtomicU32::new(0),
        };
        let stop = AtomicBool::new(false);

        std::thread::scope(|s| {
            let server = s.spawn(|| back.serve(&chan, &mut || stop.load(Ordering::Relaxed)));
            // Published while the back end polls: answered, doorbell or not.
            if front.submit(&[request(true, 1, 16, 0)]).unwrap() {
                chan.doorbell.write(1).unwrap();
            }
            assert_eq!(wait_for(&mut front), [(1, BlkStatus::Okay)]);
            // Long past its spin time the back end sleeps, having asked for the doorbell.
            std::thread::sleep(SPIN * 20);
            assert!(front.submit(&[request(false, 2, 16, 1)]).unwrap());
            chan.doorbell.write(1).unwrap();
            assert_eq!(wait_for(&mut front), [(2, BlkStatus::Okay)]);
            let asked = Instant::now();
            stop.store(true, Ordering::Relaxed);
            server.join().unwrap().unwrap();
            assert!(asked.elapsed() < SLEEP_MAX + Duration::from_secs(1));
        });
        // The front end asked to hear of its first response (rsp_event starts at 1).
        assert!(chan.notified.load(Ordering::Relaxed) >= 1);
        drop(back);
        assert_eq!(view.copy(1), [0x5a; PAGE_SIZE]);
        let file = std::fs::read(&img).unwrap();
        assert!(file[16 * 512..24 * 512].iter().all(|&b| b == 0x5a));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dropped_back_end_lets_go_of_its_image_at_once() {
        let dir = std::env::temp_dir().join(format!("sv-blkback-reopen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        Disk::create_sparse(&img, 1 << 20).unwrap();
        for _ in 0..5 {
            let mut mem = RingMemory::new(1);
            let ring = BackRing::attach(mem.region(), 1).unwrap();
            // A writable open takes the image's exclusive lock: it fails while any earlier
            // back end's ring still holds the file.
            let disk = Disk::open(&img, false).unwrap();
            drop(BlkBack::new(4, ring, disk, TwoPages::new()).unwrap());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
