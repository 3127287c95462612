//! A virtual block device attached to a running domain: its store entries and handshake (through
//! [`crate::xenbus`]), and the back-end threads, one per queue, that serve the rings.

use std::path::Path;
use std::sync::Arc;

use hypervisor::DomainShared;
use hypervisor::evtchn::HostPort;
use hypervisor::grant::RingPages;
use hypervisor::store::Store;
use pv_protocol::blkif::{BlkRing, keys};
use pv_protocol::ring::BackRing;
use pv_protocol::{PAGE_SIZE, SharedRegion};

use crate::blkback::{BlkBack, BlkCounters, BlkStats, MAX_INDIRECT_SEGMENTS};
use crate::disk::{Disk, DiskError};
use crate::grants::DomainGrants;
use crate::xenbus::{DeviceCtx, DeviceDirs, DeviceThread, Waiter, XenbusError, map_ring};

pub use crate::xenbus::state;

/// Errors attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum VbdError {
    /// The image.
    #[error("disk image")]
    Disk(#[from] DiskError),
    /// The store refused an entry, or the back-end thread could not start.
    #[error("device handshake")]
    Xenbus(#[from] XenbusError),
}

/// An attached disk; dropping it detaches it (the back end closes and releases everything).
#[derive(Debug)]
pub struct Vbd {
    dev: DeviceThread,
    counters: Arc<BlkCounters>,
}

impl Vbd {
    /// Attaches `image` to `dom` as virtual block device `devid` (Xen numbering: 51712 = xvda).
    pub fn attach(
        store: &Arc<Store>,
        dom: &Arc<DomainShared>,
        devid: u32,
        image: &Path,
        readonly: bool,
    ) -> Result<Self, VbdError> {
        Self::attach_disk(store, dom, devid, Disk::open(image, readonly)?)
    }

    /// As [`attach`](Self::attach), with a disk the caller opened (for example with `O_DIRECT`).
    pub fn attach_disk(
        store: &Arc<Store>,
        dom: &Arc<DomainShared>,
        devid: u32,
        disk: Disk,
    ) -> Result<Self, VbdError> {
        let readonly = disk.readonly();
        let dirs = DeviceDirs::new(store, "vbd", dom.id, devid);
        let max_queues = max_queues();
        dirs.publish(
            &[
                (keys::SECTORS, disk.sectors().to_string()),
                (keys::SECTOR_SIZE, "512".into()),
                (keys::INFO, if readonly { "4" } else { "0" }.into()),
                ("mode", if readonly { "r" } else { "w" }.into()),
                (keys::FEATURE_FLUSH_CACHE, "1".into()),
                (keys::FEATURE_DISCARD, "1".into()),
                (keys::FEATURE_PERSISTENT, "1".into()),
                (
                    keys::FEATURE_MAX_INDIRECT_SEGMENTS,
                    MAX_INDIRECT_SEGMENTS.to_string(),
                ),
                (keys::MULTI_QUEUE_MAX_QUEUES, max_queues.to_string()),
                (keys::MAX_RING_PAGE_ORDER, MAX_RING_PAGE_ORDER.to_string()),
            ],
            &[],
        )?;
        let counters = Arc::new(BlkCounters::default());
        let dev = {
            let (dom, counters) = (Arc::clone(dom), Arc::clone(&counters));
            let name = format!("dom{}-vbd{devid}", dom.id);
            DeviceThread::spawn(dirs, &Arc::clone(&dom), name, move |dirs, ctx| {
                serve(dirs, ctx, disk, max_queues, &counters);
            })?
        };
        Ok(Self { dev, counters })
    }

    /// I/O counters over all queues, since the device was attached.
    pub fn stats(&self) -> BlkStats {
        self.counters.snapshot()
    }

    /// The back end's current XenbusState.
    pub fn backend_state(&self) -> Option<u32> {
        self.dev.dirs().backend_state()
    }

    /// The front end's current XenbusState.
    pub fn frontend_state(&self) -> Option<u32> {
        self.dev.dirs().frontend_state()
    }
}

/// Maps one queue's ring: `ring-ref` (one page) or, with `ring-page-order` = k,
/// `ring-ref0` .. `ring-ref{2^k - 1}`, under `dir` (empty: the front-end directory itself, or its
/// `queue-N/` subdirectory).
fn map_queue_ring(
    dirs: &DeviceDirs,
    dom: &Arc<DomainShared>,
    dir: &str,
    order: u32,
) -> Result<RingPages, String> {
    let key = |k: String| dirs.front_u32(&format!("{dir}{k}"));
    let refs: Vec<u32> = if order == 0 {
        vec![key(keys::RING_REF.into()).ok_or("no ring-ref")?]
    } else {
        (0..1u32 << order)
            .map(|i| key(format!("{}{i}", keys::RING_REF)))
            .collect::<Option<_>>()
            .ok_or("missing ring-refN")?
    };
    map_ring(dom, &refs)
}

/// Largest `ring-page-order` accepted (16 pages).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// Most queues a device offers (`multi-queue-max-queues`), whatever the host's core count.
pub const MAX_QUEUES: u32 = 8;

/// Queues offered: one per online host core (Xen blkback's default), at most [`MAX_QUEUES`].
pub fn max_queues() -> u32 {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(cores).unwrap_or(1).clamp(1, MAX_QUEUES)
}

/// One queue's ring as the front end published it: the pinned pages and the channel.
struct QueueRing {
    pages: RingPages,
    port: u32,
}

/// Reads the front end's queue count, ring order, and every queue's ring and channel (Xen's
/// layout: top-level keys for one queue, `queue-N/` subdirectories for several).
fn read_queues(
    dirs: &DeviceDirs,
    dom: &Arc<DomainShared>,
    max_queues: u32,
) -> Result<Vec<QueueRing>, String> {
    let nq = match dirs.front(keys::MULTI_QUEUE_NUM_QUEUES) {
        None => 1,
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=max_queues).contains(n))
            .ok_or_else(|| format!("multi-queue-num-queues {v:?} outside 1..={max_queues}"))?,
    };
    let order = dirs.front_u32(keys::RING_PAGE_ORDER).unwrap_or(0);
    if order > MAX_RING_PAGE_ORDER {
        return Err(format!("ring-page-order {order} > {MAX_RING_PAGE_ORDER}"));
    }
    (0..nq)
        .map(|q| {
            let dir = if nq == 1 {
                String::new()
            } else {
                format!("queue-{q}/")
            };
            let port = dirs
                .front_u32(&format!("{dir}{}", keys::EVENT_CHANNEL))
                .ok_or_else(|| format!("queue {q}: no event-channel"))?;
            let pages = map_queue_ring(dirs, dom, &dir, order)
                .map_err(|why| format!("queue {q}: {why}"))?;
            Ok(QueueRing { pages, port })
        })
        .collect()
}

/// The back-end thread: handshake, then serve every queue (one thread each) until stopped or
/// closed. It sleeps until the front end's state changes, the domain stops or the device is
/// detached (see [`DeviceCtx`]); a serving queue also wakes for its doorbell and its disk.
fn serve(
    dirs: &DeviceDirs,
    ctx: &DeviceCtx,
    disk: Disk,
    max_queues: u32,
    counters: &Arc<BlkCounters>,
) {
    let dom = ctx.dom();
    let frontend = dirs.frontend.as_str();
    let waiter = match ctx.waiter() {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(domid = dom.id, "{frontend}: {e}");
            dirs.set_state(state::CLOSED);
            return;
        }
    };
    if !ctx.wait_until(&waiter, || {
        dirs.frontend_state() == Some(state::INITIALISED)
    }) {
        dirs.set_state(state::CLOSED);
        return;
    }
    let queues = match read_queues(dirs, dom, max_queues) {
        Ok(q) => q,
        Err(why) => {
            dom.guest_fault("vbd-handshake", format_args!("{frontend}: {why}"));
            dirs.set_state(state::CLOSED);
            return;
        }
    };
    // Persistent grants when the front end offers them too (we always do).
    let persistent = dirs.front_u32(keys::FEATURE_PERSISTENT) == Some(1);
    // Every queue gets its own handle on the image, ring, channel, io_uring and grant cache,
    // and its own waiter; queues share nothing but the file.
    let mut backs = Vec::with_capacity(queues.len());
    let mut waiters = vec![waiter];
    for (q, qr) in queues.iter().enumerate() {
        if q > 0 {
            match ctx.waiter() {
                Ok(w) => waiters.push(w),
                Err(e) => {
                    tracing::error!(domid = dom.id, "{frontend} queue {q}: {e}");
                    dirs.set_state(state::CLOSED);
                    return;
                }
            }
        }
        match connect_queue(dom, qr, &disk, persistent, counters) {
            Ok(b) => backs.push(b),
            Err(why) => {
                dom.guest_fault("vbd-handshake", format_args!("{frontend} queue {q}: {why}"));
                dirs.set_state(state::CLOSED);
                return;
            }
        }
    }
    drop(disk);
    dirs.set_state(state::CONNECTED);
    tracing::info!(
        domid = dom.id,
        "{frontend} connected ({} queue(s))",
        backs.len()
    );
    let closing = || ctx.gone() || dirs.front_closing();
    std::thread::scope(|s| {
        let mut queues = backs.into_iter().zip(&waiters);
        let first = queues.next();
        for (q, (b, w)) in queues.enumerate() {
            let closing = &closing;
            let spawned = std::thread::Builder::new()
                .name(format!("dom{}-vbd-q{}", dom.id, q + 1))
                .spawn_scoped(s, move || serve_queue(dom, frontend, b, w, closing));
            if let Err(e) = spawned {
                tracing::error!(domid = dom.id, "{frontend}: no thread for a queue: {e}");
            }
        }
        if let Some((b, w)) = first {
            serve_queue(dom, frontend, b, w, &closing);
        }
    });
    // Tear down in order: stop serving (done: every queue's back end and channel are dropped by
    // its thread), unmap, Closed.
    drop(queues);
    dirs.set_state(state::CLOSED);
}

/// A queue ready to serve: its back end and the bound channel.
type QueueBack<'a> = (BlkBack<'a, DomainGrants>, HostPort);

fn connect_queue<'a>(
    dom: &Arc<DomainShared>,
    qr: &'a QueueRing,
    disk: &Disk,
    persistent: bool,
    counters: &Arc<BlkCounters>,
) -> Result<QueueBack<'a>, String> {
    let pages = qr.pages.page_count();
    // SAFETY: `RingPages` keeps the ring's pages mapped (back to back) and claimed for as long
    // as `qr` lives, which outlives the ring endpoint and the back end built on it (the `'a`
    // borrow).
    let region = unsafe { SharedRegion::from_raw(qr.pages.host_addr(), pages * PAGE_SIZE) }
        .map_err(|_| "ring region".to_string())?;
    let ring = BackRing::<BlkRing>::attach(region, pages).map_err(|e| format!("ring: {e}"))?;
    let hp = HostPort::bind(dom, qr.port).map_err(|e| format!("port {}: {e:?}", qr.port))?;
    let grants = if persistent {
        DomainGrants::persistent(Arc::clone(dom))
    } else {
        DomainGrants::new(Arc::clone(dom))
    };
    let disk = disk.try_clone().map_err(|e| e.to_string())?;
    let back = BlkBack::new(dom.id, ring, disk, grants)
        .map_err(|e| e.to_string())?
        .with_counters(Arc::clone(counters));
    Ok((back, hp))
}

/// Serves one queue until the device closes or the ring breaks; `waiter` wakes it for that.
fn serve_queue(
    dom: &Arc<DomainShared>,
    frontend: &str,
    (mut back, hp): QueueBack<'_>,
    waiter: &Waiter,
    closing: &(dyn Fn() -> bool + Sync),
) {
    if let Err(e) = back.serve(&hp, waiter.eventfd(), &mut || closing()) {
        dom.guest_fault("vbd-ring", format_args!("{frontend}: {e}"));
    }
    // The back end (its in-flight I/O cancelled and drained, or what the kernel has not
    // finished left to a drain thread holding only those requests' pages; its other grant
    // mappings released) goes before the channel is unbound.
    drop(back);
    drop(hp);
}
