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
//!
//! **Bounded completions.** Every submitted entry owes one completion, and the completion queue
//! has [`COMPLETION_QUEUE`] entries. A front end controls how many entries its requests need (a
//! ring of indirect requests of 256 scattered segments each is 256 fixed reads apiece), so the
//! back end counts the entries it submitted and has not reaped and takes a request off the ring
//! only while the worst case still fits, in the completion queue and in the submission queue.
//! Requests beyond that wait on the ring (back-pressure) and are taken as completions free room;
//! the completion queue never overflows, so the kernel never has to buffer completions in
//! memory of its own or, when that fails, drop them.
//!
//! **Teardown.** Dropping a back end cancels its I/O (io_uring async cancel) and waits for the
//! completions a while ([`TEARDOWN_WAIT`]). What is still in flight then (I/O the kernel could not
//! cancel, on a slow or hung device) may still be written into its pages, so those pages cannot
//! be released yet; but nothing else is kept: the ring and exactly the requests in flight move to
//! a drain thread, which releases each request's pages as the kernel completes it (io_uring
//! completes every request it accepted, and with the bound above no completion is lost) and then
//! the ring. Nothing is ever leaked for good.

use std::mem::ManuallyDrop;
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
use vmm_sys_util::eventfd::EventFd;

use crate::disk::Disk;
use crate::grants::{GrantMapper, MappedPage};
use crate::notify::Notify;

/// Indirect segments per request this back-end advertises (`feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: usize = 256;
/// io_uring submission-queue depth.
const URING_DEPTH: u32 = 1024;
/// io_uring completion-queue entries. The back end never has more completions outstanding
/// (entries submitted and not yet reaped) than this, less the two it keeps for the doorbell
/// and teardown.
pub const COMPLETION_QUEUE: u32 = 2 * URING_DEPTH;
/// Completion-queue entries kept for entries that are not requests: the doorbell's poll, the
/// owner's wake-up poll and teardown's cancel.
const CQ_RESERVED: usize = 3;
/// Most entries one request can need with fixed buffers: an indirect request of
/// [`MAX_INDIRECT_SEGMENTS`] segments none of which continues the previous one (a flush carries
/// at most 11 direct segments and its fsync; a discard is one fallocate).
const MAX_SQES_FIXED: usize = MAX_INDIRECT_SEGMENTS;
// A flush: its direct segments and the fsync.
const _: () = assert!(pv_protocol::blkif::MAX_SEGMENTS_PER_REQUEST < MAX_SQES_FIXED);
/// Most entries one request can need without fixed buffers: one readv/writev and an fsync.
const MAX_SQES_VECTORED: usize = 2;
const _: () = assert!(MAX_SQES_FIXED + CQ_RESERVED <= URING_DEPTH as usize);
/// How long dropping a back end waits for its cancelled I/O to complete before it leaves what is
/// still in flight to a drain thread (see the module documentation).
pub const TEARDOWN_WAIT: Duration = Duration::from_secs(1);
/// The image, as the ring's registered file.
const DISK: types::Fixed = types::Fixed(0);
/// User data of the doorbell's poll (request slots stay far below it).
const UD_DOORBELL: u64 = u64::MAX;
/// User data of teardown's cancel.
const UD_CANCEL: u64 = u64::MAX - 1;
/// User data of the poll of the owner's wake-up eventfd (see [`BlkBack::serve`]).
const UD_WAKE: u64 = u64::MAX - 2;
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
/// How often a busy [`BlkBack::serve`] asks whether to stop (an idle one asks when woken).
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
    /// Entries submitted for it.
    entries: u16,
    /// Of which not yet completed.
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

/// The requests in flight and the completions they still owe.
#[derive(Default)]
struct InflightTable {
    /// By slot (the slot index is the io_uring user data >> [`UD_SHIFT`]).
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    /// Requests in `slots`.
    requests: usize,
    /// Entries submitted for them, reaped or not: each request's entries count until its last
    /// completion, so this bounds the completions outstanding (and, when no segment merges, the
    /// pages the requests hold).
    entries: usize,
}

/// What one completion did to its request.
struct Completed {
    /// The request's first failure, with the result that showed it.
    failed: Option<(u64, i32)>,
    /// The request, if this was its last completion.
    done: Option<Inflight>,
}

impl InflightTable {
    /// A slot for a request about to be submitted.
    fn slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        })
    }

    /// Puts `r`, whose `r.sqes` entries were pushed with `slot`'s user data, into `slot`.
    fn insert(&mut self, slot: usize, r: Inflight) {
        self.entries += usize::from(r.entries);
        self.requests += 1;
        self.slots[slot] = Some(r);
    }

    /// Frees a slot taken by [`slot`](Self::slot) for a request that pushed no entry.
    fn unused(&mut self, slot: usize) {
        self.free.push(slot);
    }

    /// Accounts one completion (user data `ud`, result `res`) of a request.
    fn complete(&mut self, ud: u64, res: i32) -> Completed {
        let mut out = Completed {
            failed: None,
            done: None,
        };
        let slot = (ud >> UD_SHIFT) as usize;
        let k = (ud & UD_MASK) as usize;
        let Some(r) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return out;
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
        if failed_now && !r.failed {
            out.failed = Some((r.id, res));
        }
        r.failed |= failed_now;
        if r.sqes == 0 {
            self.entries = self.entries.saturating_sub(usize::from(r.entries));
            out.done = self.slots[slot].take();
            self.free.push(slot);
            self.requests -= 1;
        }
        out
    }
}

/// The back end of one block ring.
pub struct BlkBack<'a, G: GrantMapper> {
    domid: u32,
    ring: BackRing<'a, BlkRing>,
    disk: Disk,
    grants: G,
    /// Taken only by `drop` (which may hand it to a drain thread).
    uring: ManuallyDrop<IoUring>,
    stats: Arc<BlkCounters>,
    /// Requests in flight.
    table: InflightTable,
    /// Most completions that may be outstanding at once: the completion queue's size, less
    /// [`CQ_RESERVED`].
    cq_limit: usize,
    /// Requests were left on the ring for want of room in the queues (see
    /// [`room_for_request`](Self::room_for_request)).
    waiting_for_room: bool,
    /// Dropping waits this long for cancelled I/O ([`TEARDOWN_WAIT`]; tests shorten it).
    teardown_wait: Duration,
    /// Dropping cancels in-flight I/O (tests turn it off to stand for I/O that cannot be
    /// cancelled).
    teardown_cancel: bool,
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
    /// A poll of the owner's wake-up eventfd is queued.
    wake_armed: bool,
    /// That poll completed: the owner may want the back end to stop.
    woken: bool,
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
        // SAFETY: `uring` is taken once, here, and `self` is not used after `drop`.
        let uring = unsafe { ManuallyDrop::take(&mut self.uring) };
        let mut drain = Drain {
            domid: self.domid,
            uring,
            table: std::mem::take(&mut self.table),
        };
        // The kernel may still be reading into or writing from granted pages (`serve` stops, or
        // a ring breaks, with I/O in flight). Their pages stay mapped until it is done: else the
        // guest could reuse a page the disk still writes, and I/O through our address of a page
        // (readv/writev) could land in whatever is mapped there next. Cancel what can be
        // cancelled (queued or waiting work ends at once with -ECANCELED), then wait a while for
        // the rest.
        if drain.table.requests > 0 {
            if self.teardown_cancel {
                drain.cancel_all();
            }
            drain.wait(Some(self.teardown_wait));
        }
        if drain.table.requests == 0 {
            return; // `drain` lets go of the image and the ring.
        }
        // Requests the kernel has not finished (a slow or hung device): keep exactly those (their
        // pages) and the ring, never the mapper and the rest of this back end, until the kernel
        // completes them. It completes every request it accepted, and no completion is lost (the
        // completion queue cannot overflow), so this ends.
        //
        // The registered buffer is the mapper's range, which stays valid only while the mapper
        // lives (it goes when this returns). Unregistering it leaves the kernel its own
        // references to the pages: it pinned them at registration and, for requests still using
        // them, unpins them only when those complete (since Linux 6.13 unregistering does not
        // wait for that; before, it waits). After that no I/O depends on our mapping of the
        // range. If it cannot be unregistered, the mapper must outlive the I/O: wait here.
        if self.fixed && drain.uring.submitter().unregister_buffers().is_err() {
            tracing::warn!(
                domid = self.domid,
                "{} block requests still in flight at teardown; waiting for them",
                drain.table.requests
            );
            drain.wait(None);
            return;
        }
        tracing::warn!(
            domid = self.domid,
            "{} block requests still in flight at teardown; their pages are released as they \
             complete",
            drain.table.requests
        );
        // Handed over through a slot, so that if the thread cannot be started the drain comes
        // back here and is waited for in place (dropping it waits, see `Drain`'s `Drop`).
        let slot = Arc::new(std::sync::Mutex::new(Some(drain)));
        let theirs = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name(format!("dom{}-blkdrain", self.domid))
            .spawn(move || {
                let drain = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(mut d) = drain {
                    d.wait(None);
                    tracing::info!(domid = d.domid, "block requests left at teardown completed");
                }
            });
        if spawned.is_err() {
            let drain = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(drain);
        }
    }
}

/// A ring being torn down and the requests still in flight on it.
struct Drain {
    domid: u32,
    uring: IoUring,
    table: InflightTable,
}

/// After an error of [`Drain::wait`]'s wait itself, how long it pauses before it tries again.
const DRAIN_RETRY: Duration = Duration::from_millis(100);

impl Drain {
    /// Asks the kernel to cancel every request in flight on the ring (Linux 5.19; before, the
    /// cancel fails and the requests are waited for).
    fn cancel_all(&mut self) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(UD_CANCEL);
        // SAFETY: a cancel entry points at no memory of ours.
        if unsafe { self.uring.submission().push(&e) }.is_ok() {
            let _ = self.uring.submit();
        }
    }

    /// Reaps completions until no request is in flight, or `bound` has passed. Each request's
    /// pages are released as soon as its last completion is seen. Sleeps until a completion
    /// arrives (with no timeout but the bound).
    fn wait(&mut self, bound: Option<Duration>) {
        let deadline = bound.map(|b| Instant::now() + b);
        let mut logged = false;
        loop {
            self.reap();
            if self.table.requests == 0 {
                return;
            }
            let waited = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return;
                    }
                    let ts = types::Timespec::from(left);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.uring.submitter().submit_with_args(1, &args)
                }
                None => self.uring.submit_and_wait(1),
            };
            match waited {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
                Err(e) => {
                    // The wait itself failed: keep the pages (the kernel may still use them) and
                    // try again later, rather than give up on them.
                    if !logged {
                        logged = true;
                        tracing::error!(domid = self.domid, "waiting for in-flight I/O: {e}");
                    }
                    std::thread::sleep(DRAIN_RETRY);
                }
            }
        }
    }

    /// Takes every completion ready; finished requests release their pages.
    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .uring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            if ud == UD_DOORBELL || ud == UD_CANCEL || ud == UD_WAKE {
                continue;
            }
            drop(self.table.complete(ud, res).done);
        }
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        // Never release pages the kernel may still use: whoever drops a drain waits for it.
        if self.table.requests > 0 {
            self.wait(None);
        }
        // The ring is torn down asynchronously after it is closed, and with it goes its
        // reference to the registered image: give that back now, or the image (and its lock)
        // would stay open a while after the device is gone, and attaching it again could fail.
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
            .setup_cqsize(COMPLETION_QUEUE)
            .build(URING_DEPTH)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(COMPLETION_QUEUE)
                    .build(URING_DEPTH)
            })
            .map_err(BlkBackError::Uring)?;
        let cq_limit = (uring.params().cq_entries() as usize).saturating_sub(CQ_RESERVED);
        // The image is registered file 0: the kernel does not look the descriptor up and take a
        // reference on it for every request.
        uring
            .submitter()
            .register_files(&[disk.file().as_raw_fd()])
            .map_err(BlkBackError::Uring)?;
        // Register the guest's memory once, so the kernel does not pin pages per I/O.
        let fixed = grants.with_io_region(&mut |base, len| {
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
            uring: ManuallyDrop::new(uring),
            stats: Arc::default(),
            table: InflightTable::default(),
            cq_limit,
            waiting_for_room: false,
            teardown_wait: TEARDOWN_WAIT,
            teardown_cancel: true,
            fixed,
            answers: Vec::new(),
            done: Vec::new(),
            spare: Vec::new(),
            doorbell_armed: false,
            doorbell_rang: false,
            wake_armed: false,
            woken: false,
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
            if self.table.requests == 0 && !self.ring.has_unconsumed_requests()? {
                return Ok(notify);
            }
            if !busy {
                self.uring.submit_and_wait(1).map_err(BlkBackError::Uring)?;
            }
        }
    }

    /// Serves the ring until `stop` says so, the way [`process`](Self::process) does, and when
    /// there is nothing to do sleeps, with no timeout, in one wait for a disk completion, the
    /// front end's doorbell (`chan`, armed through the event index) or the owner's `wake`
    /// eventfd, which the owner signals whenever `stop` may have turned true (this reads it
    /// back to zero). `stop` is asked when `wake` fired, and every few milliseconds while the
    /// ring is busy; an idle ring costs no wake-up at all. Responses are signalled through
    /// `chan` when the front end's event index asks, and for [`SPIN`] after that this thread
    /// polls the ring instead of sleeping, for the woken front end's next requests
    /// ([`SPIN_ANSWERED`] after responses published without a signal, for a front end that
    /// polls); not while it has to share its core (then polling would take the time of the
    /// threads that make its work: the guest's vCPU, the kernel's completions). It never yields
    /// the core in a loop: the scheduler (EEVDF) pushes a yielding thread's deadline back a
    /// slice per yield, and a thread that yielded a few thousand times is then starved by any
    /// other runnable thread.
    pub fn serve(
        &mut self,
        chan: &impl Notify,
        wake: &EventFd,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<(), BlkBackError> {
        let start = Instant::now();
        if stop() {
            return Ok(());
        }
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
            // Woken by the owner, or busy for a while: the stop condition may read the store,
            // so not on every pass.
            if std::mem::take(&mut self.woken) || now.duration_since(last_stop_check) >= STOP_CHECK
            {
                // Reset before asking: a signal after the question wakes the next sleep.
                let _ = wake.read();
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
            self.arm_poll(wake.as_raw_fd(), UD_WAKE)?;
            if !self.waiting_for_room {
                // Sleep: ask for the doorbell, then look once more (the front end may have
                // published just before it saw the event index).
                if self.final_check()? {
                    continue;
                }
                self.arm_poll(chan.wait_fd(), UD_DOORBELL)?;
            }
            // Else requests wait on the ring for room in the queues, which only a completion
            // frees: sleep until one arrives (the doorbell would only say what we know).
            match self.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(BlkBackError::Uring(e)),
            }
        }
    }

    /// Queues a poll of `fd` with user data `ud` (the doorbell's or the wake-up's; once: it
    /// stays queued until it fires).
    fn arm_poll(&mut self, fd: std::os::fd::RawFd, ud: u64) -> Result<(), BlkBackError> {
        let armed = if ud == UD_DOORBELL {
            &mut self.doorbell_armed
        } else {
            &mut self.wake_armed
        };
        if *armed {
            return Ok(());
        }
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(ud);
        // SAFETY: a poll entry points at no memory of ours.
        if unsafe { self.uring.submission().push(&e) }.is_err() {
            return Err(BlkBackError::Uring(std::io::Error::other(
                "submission queue full",
            )));
        }
        *armed = true;
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

    /// Drops the registration of the guest's memory once the guest gave some of it back (see
    /// [`GrantMapper::io_region_valid`]): before any further I/O is submitted, so none goes to a
    /// page the guest no longer sees. Requests in flight keep their own references to it.
    fn check_fixed(&mut self) {
        if !self.fixed || self.grants.io_region_valid() {
            return;
        }
        self.fixed = false;
        if let Err(e) = self.uring.submitter().unregister_buffers() {
            tracing::warn!(
                domid = self.domid,
                "cannot unregister the guest's memory: {e}"
            );
        }
        tracing::info!(
            domid = self.domid,
            "guest gave memory back: I/O pins pages per request from now on"
        );
    }

    fn pass_into(&mut self, answers: &mut Vec<BlkResponse>) -> Result<(bool, bool), BlkBackError> {
        self.check_fixed();
        let mut busy = false;
        let mut notify = false;
        let mut taken = 0;
        self.waiting_for_room = false;
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
            // Take a request only while both queues have room for the largest one's entries:
            // the rest wait on the ring until completions free some.
            if !self.room_for_request() {
                self.waiting_for_room = self.ring.has_unconsumed_requests()?;
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
            // After the request is taken: a give-back the guest made before it is seen.
            self.check_fixed();
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

    /// Whether the largest request's entries fit both in the submission queue and, with the
    /// completions already outstanding, in the completion queue: only then may a request be taken
    /// off the ring, so the completion queue cannot overflow however the front end shapes its
    /// requests.
    fn room_for_request(&mut self) -> bool {
        let worst = if self.fixed {
            MAX_SQES_FIXED
        } else {
            MAX_SQES_VECTORED
        };
        let sq = self.uring.submission();
        let sq_room = sq.capacity() - sq.len();
        drop(sq);
        sq_room >= worst && self.table.entries + worst <= self.cq_limit
    }

    /// Most completions this back end lets be outstanding at once: its completion queue's size
    /// less the entries it keeps for the doorbell and teardown. Requests are taken off the ring
    /// only while their worst case fits under it.
    pub fn completion_limit(&self) -> usize {
        self.cq_limit
    }

    /// Queues the entries of one request (the caller then submits them).
    fn submit(&mut self, mut r: Inflight) -> Result<(), BlkBackError> {
        let slot = self.table.slot();
        let mut sq = self.uring.submission();
        let (mut pushed, mut full) = (0u16, false);
        sqes_for(&r, DISK, slot as u64, &mut |e| {
            // SAFETY: the iovecs and pages the entry points to move into the table's slot below
            // (Vecs: their heap memory does not move, and nothing grows them until the slot is
            // freed) and live there until the last completion has been reaped (`complete` frees
            // the slot only then; a back end dropped earlier keeps them until then, see `Drain`).
            match unsafe { sq.push(&e) } {
                Ok(()) => pushed += 1,
                Err(_) => full = true,
            }
        });
        drop(sq);
        // Only the entries pushed owe completions (room was checked: all of them, always).
        if pushed == 0 {
            self.table.unused(slot);
            self.recycle(r.bufs);
        } else {
            r.failed |= pushed < r.sqes;
            r.sqes = pushed;
            r.entries = pushed;
            self.table.insert(slot, r);
        }
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
            if ud == UD_WAKE {
                self.wake_armed = false;
                self.woken = true;
                continue;
            }
            let Completed { failed, done } = self.table.complete(ud, res);
            if let Some((id, res)) = failed {
                self.warn(format_args!(
                    "disk I/O for request {id} failed: result {res}"
                ));
            }
            let Some(r) = done else {
                continue;
            };
            self.recycle(r.bufs);
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
                    entries: 1,
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
            entries: data_sqes + u16::from(flush),
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
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let tid = std::sync::atomic::AtomicI32::new(0);

        std::thread::scope(|s| {
            let server = s.spawn(|| {
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                back.serve(&chan, &wake, &mut || stop.load(Ordering::Relaxed))
            });
            // Published while the back end polls: answered, doorbell or not.
            if front.submit(&[request(true, 1, 16, 0)]).unwrap() {
                chan.doorbell.write(1).unwrap();
            }
            assert_eq!(wait_for(&mut front), [(1, BlkStatus::Okay)]);
            // Long past its spin time the back end sleeps, having asked for the doorbell, and
            // nothing wakes it while the ring is idle: no timer.
            std::thread::sleep(SPIN * 20);
            let switches = || crate::test_util::context_switches(tid.load(Ordering::Relaxed));
            let before = switches();
            std::thread::sleep(Duration::from_millis(500));
            let woke = switches() - before;
            assert!(
                woke <= 1,
                "an idle ring woke its thread {woke} times in 500 ms"
            );
            assert!(front.submit(&[request(false, 2, 16, 1)]).unwrap());
            chan.doorbell.write(1).unwrap();
            assert_eq!(wait_for(&mut front), [(2, BlkStatus::Okay)]);
            // A wake-up that does not mean stop is slept through.
            wake.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            assert!(!server.is_finished());
            let asked = Instant::now();
            stop.store(true, Ordering::Relaxed);
            wake.write(1).unwrap();
            server.join().unwrap().unwrap();
            assert!(asked.elapsed() < Duration::from_secs(1));
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

    /// Pages the test owns for good (leaked), granted as refs `0..n`; counts the pages mapped
    /// now, and holds a token (`alive`) that lives exactly as long as the mapper. With `fixed`
    /// it offers the pages as its `io_region` (registered with io_uring, as a domain's memory).
    struct CountingPages {
        base: NonNull<Page>,
        n: u32,
        fixed: bool,
        live: Arc<std::sync::atomic::AtomicUsize>,
        _alive: Arc<()>,
    }

    // SAFETY: leaked plain memory; see `TwoPages`.
    unsafe impl Send for CountingPages {}

    struct Live(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Live {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl CountingPages {
        fn new(n: u32, fixed: bool) -> (Self, std::sync::Weak<()>) {
            let pages: Vec<Page> = (0..n).map(|_| Page([0; PAGE_SIZE])).collect();
            let base = NonNull::from(Box::leak(pages.into_boxed_slice())).cast::<Page>();
            let alive = Arc::new(());
            let weak = Arc::downgrade(&alive);
            let me = Self {
                base,
                n,
                fixed,
                live: Arc::default(),
                _alive: alive,
            };
            (me, weak)
        }

        /// A view of page `i` that outlives the mapper (the pages are leaked).
        fn page_ptr(&self, i: u32) -> usize {
            assert!(i < self.n);
            // SAFETY: `i < n`, inside the leaked array.
            unsafe { self.base.add(i as usize) }.as_ptr() as usize
        }
    }

    impl GrantMapper for CountingPages {
        fn map(&self, gref: GrantRef, _device_writes: bool) -> Result<MappedPage, GrantFailure> {
            if gref.0 >= self.n {
                return Err(GrantFailure {
                    gref: gref.0,
                    reason: "not granted".into(),
                });
            }
            self.live.fetch_add(1, Ordering::SeqCst);
            let ptr = NonNull::new(self.page_ptr(gref.0) as *mut u8).unwrap();
            // SAFETY: the pages are leaked, valid for reads and writes for good.
            Ok(unsafe { MappedPage::new(ptr, Box::new(Live(Arc::clone(&self.live)))) })
        }

        fn io_region(&self) -> Option<(NonNull<u8>, usize)> {
            // Leaked: valid for good.
            self.fixed
                .then(|| (self.base.cast(), self.n as usize * PAGE_SIZE))
        }
    }

    /// A FIFO as the disk: reads from it complete only when the test writes into it, as I/O on a
    /// slow device would; the writer end is returned.
    fn fifo_disk(dir: &std::path::Path) -> (Disk, std::fs::File) {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("fifo");
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; the result is checked.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Read-write: opening does not wait for a writer, and reads wait for data.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        (Disk::from_file_for_tests(file, &path, 2048), writer)
    }

    /// Drops `back` on another thread and says whether that finished within `limit` (on failure
    /// the thread is left blocked).
    fn drop_returns<T: Send + 'static>(back: T, limit: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(back);
            let _ = tx.send(());
        });
        rx.recv_timeout(limit).is_ok()
    }

    /// Polls `f` until it is true or `limit` passes.
    fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !f() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    #[test]
    fn dropping_a_back_end_cancels_its_io_in_flight_and_releases_every_page() {
        cancelled_at_teardown(false);
        cancelled_at_teardown(true);
    }

    fn cancelled_at_teardown(fixed: bool) {
        let dir =
            std::env::temp_dir().join(format!("sv-blkback-cancel-{fixed}-{}", std::process::id()));
        let (disk, _writer) = fifo_disk(&dir);
        let (pages, alive) = CountingPages::new(4, fixed);
        let live = Arc::clone(&pages.live);
        // The ring memory must outlive the back end (which the other thread drops): leak it.
        let mem = Box::leak(Box::new(RingMemory::new(1)));
        let region = mem.region();
        let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
        let ring = BackRing::attach(region, 1).unwrap();
        let mut back = BlkBack::new(6, ring, disk, pages).unwrap();
        assert_eq!(back.fixed, fixed);
        let reqs: Vec<_> = (0..4).map(|i| request(false, i, 8 * i, i as u32)).collect();
        front.submit(&reqs).unwrap();
        // Taken and submitted: four reads waiting on a device that never answers.
        back.pass().unwrap();
        assert_eq!(back.table.requests, 4);
        assert_eq!(live.load(Ordering::SeqCst), 4);

        // Dropping cancels them, waits for the cancellations, and lets go of everything.
        assert!(
            drop_returns(back, Duration::from_secs(30)),
            "dropping the back end waited for I/O that never completes"
        );
        assert_eq!(live.load(Ordering::SeqCst), 0, "pages still mapped");
        assert!(alive.upgrade().is_none(), "the mapper is still alive");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn io_outliving_teardown_keeps_only_its_own_pages_until_the_kernel_completes_it() {
        drained_after_teardown(false);
        drained_after_teardown(true);
    }

    fn drained_after_teardown(fixed: bool) {
        use std::io::Write;
        let dir =
            std::env::temp_dir().join(format!("sv-blkback-drain-{fixed}-{}", std::process::id()));
        let (disk, mut writer) = fifo_disk(&dir);
        let (pages, alive) = CountingPages::new(4, fixed);
        let live = Arc::clone(&pages.live);
        let page0 = pages.page_ptr(0);
        let mem = Box::leak(Box::new(RingMemory::new(1)));
        let region = mem.region();
        let mut front = MockFrontEnd::<BlkRing>::new(region, 1).unwrap();
        let ring = BackRing::attach(region, 1).unwrap();
        let mut back = BlkBack::new(6, ring, disk, pages).unwrap();
        // Stand for I/O the kernel cannot cancel (on a hung device), and do not wait for it.
        back.teardown_cancel = false;
        back.teardown_wait = Duration::ZERO;
        assert_eq!(back.fixed, fixed);
        front.submit(&[request(false, 1, 0, 0)]).unwrap();
        back.pass().unwrap();
        assert_eq!(back.table.requests, 1);

        assert!(
            drop_returns(back, Duration::from_secs(30)),
            "dropping the back end waited for I/O that outlives it"
        );
        // The kernel may still write into the page of the read in flight: that one page stays
        // mapped; the mapper and everything else of the back end are gone.
        assert!(alive.upgrade().is_none(), "the mapper is still alive");
        assert_eq!(live.load(Ordering::SeqCst), 1);

        // The device answers: the data lands in the page that was kept, which is then released.
        writer.write_all(&[0xa5; PAGE_SIZE]).unwrap();
        assert!(
            eventually(Duration::from_secs(30), || live.load(Ordering::SeqCst) == 0),
            "the page of the completed read is still mapped"
        );
        let mut got = [0u8; PAGE_SIZE];
        // SAFETY: the leaked page; no I/O is in flight any more (its mapping is gone).
        unsafe { std::ptr::copy_nonoverlapping(page0 as *const u8, got.as_mut_ptr(), PAGE_SIZE) };
        assert_eq!(got, [0xa5; PAGE_SIZE]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
