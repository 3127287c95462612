//! A virtual block device attached to a running domain: the toolstack's store entries, the
//! XenbusState handshake, and the back-end thread that serves the ring.
//!
//! Store layout (Xen's): the front-end directory `/local/domain/<dom>/device/vbd/<devid>` (owned
//! by the guest) and the back-end directory `/local/domain/0/backend/vbd/<dom>/<devid>` (owned by
//! dom0, readable by the guest). The back end publishes its features and `InitWait`; the front end
//! grants a ring page, offers an event channel to dom0, writes `ring-ref`, `event-channel` and
//! `Initialised`; the back end maps the ring, binds the channel and switches to `Connected`.
//! Closing (the front end's `Closing`, a detach, or the domain's end) tears down in order: stop
//! serving, unbind, unmap, `Closed`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::DomainShared;
use hypervisor::evtchn::HostPort;
use hypervisor::store::Store;
use pv_protocol::blkif::{BlkRing, keys};
use pv_protocol::grant::{DomId, GrantRef};
use pv_protocol::ring::BackRing;
use pv_protocol::store::{Perm, PermKind};
use pv_protocol::{PAGE_SIZE, SharedRegion};

use crate::blkback::{BlkBack, MAX_INDIRECT_SEGMENTS};
use crate::disk::{Disk, DiskError};
use crate::grants::DomainGrants;

/// XenbusState values.
pub mod state {
    /// Initialising.
    pub const INITIALISING: u32 = 1;
    /// Back end waits for the front end.
    pub const INIT_WAIT: u32 = 2;
    /// Front end published its ring.
    pub const INITIALISED: u32 = 3;
    /// Connected.
    pub const CONNECTED: u32 = 4;
    /// Closing.
    pub const CLOSING: u32 = 5;
    /// Closed.
    pub const CLOSED: u32 = 6;
}

/// Errors attaching a disk.
#[derive(Debug, thiserror::Error)]
pub enum VbdError {
    /// The image.
    #[error("disk image")]
    Disk(#[from] DiskError),
    /// The store refused an entry.
    #[error("store: {0:?} writing {1}")]
    Store(pv_protocol::store::StoreErrno, String),
    /// The back-end thread could not start.
    #[error("cannot start the back-end thread")]
    Thread(#[source] std::io::Error),
}

/// An attached disk; dropping it detaches it (the back end closes and releases everything).
#[derive(Debug)]
pub struct Vbd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    backend: String,
    frontend: String,
    store: Arc<Store>,
}

fn w(store: &Store, path: &str, value: &str) -> Result<(), VbdError> {
    store
        .write(0, 0, path, value.as_bytes())
        .map_err(|e| VbdError::Store(e, path.into()))
}

fn read_u32(store: &Store, path: &str) -> Option<u32> {
    let v = store.read(0, 0, path).ok()?;
    std::str::from_utf8(&v).ok()?.trim().parse().ok()
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
        let id = dom.id;
        let backend = format!("/local/domain/0/backend/vbd/{id}/{devid}");
        let frontend = format!("/local/domain/{id}/device/vbd/{devid}");
        // Back end first: features, then InitWait; the guest may read it.
        w(store, &format!("{backend}/frontend"), &frontend)?;
        w(store, &format!("{backend}/frontend-id"), &id.to_string())?;
        w(
            store,
            &format!("{backend}/{}", keys::SECTORS),
            &disk.sectors().to_string(),
        )?;
        w(store, &format!("{backend}/{}", keys::SECTOR_SIZE), "512")?;
        w(
            store,
            &format!("{backend}/{}", keys::INFO),
            if readonly { "4" } else { "0" },
        )?;
        w(
            store,
            &format!("{backend}/mode"),
            if readonly { "r" } else { "w" },
        )?;
        w(
            store,
            &format!("{backend}/{}", keys::FEATURE_FLUSH_CACHE),
            "1",
        )?;
        w(store, &format!("{backend}/{}", keys::FEATURE_DISCARD), "1")?;
        w(
            store,
            &format!("{backend}/{}", keys::FEATURE_PERSISTENT),
            "1",
        )?;
        w(
            store,
            &format!("{backend}/{}", keys::FEATURE_MAX_INDIRECT_SEGMENTS),
            &MAX_INDIRECT_SEGMENTS.to_string(),
        )?;
        let max_queues = max_queues();
        w(
            store,
            &format!("{backend}/{}", keys::MULTI_QUEUE_MAX_QUEUES),
            &max_queues.to_string(),
        )?;
        w(
            store,
            &format!("{backend}/{}", keys::MAX_RING_PAGE_ORDER),
            &MAX_RING_PAGE_ORDER.to_string(),
        )?;
        w(
            store,
            &format!("{backend}/state"),
            &state::INIT_WAIT.to_string(),
        )?;
        let readable = [
            Perm {
                kind: PermKind::None,
                domid: DomId(0),
            },
            Perm {
                kind: PermKind::Read,
                domid: DomId(id as u16),
            },
        ];
        let parent = format!("/local/domain/0/backend/vbd/{id}");
        for p in [parent.clone(), backend.clone()] {
            store
                .set_perms(0, 0, &p, &readable)
                .map_err(|e| VbdError::Store(e, p.clone()))?;
        }
        for k in store.directory(0, 0, &backend).unwrap_or_default() {
            let p = format!("{backend}/{k}");
            store
                .set_perms(0, 0, &p, &readable)
                .map_err(|e| VbdError::Store(e, p.clone()))?;
        }
        // Front end directory, in the guest's home (so owned by the guest).
        w(store, &format!("{frontend}/backend"), &backend)?;
        w(store, &format!("{frontend}/backend-id"), "0")?;
        w(
            store,
            &format!("{frontend}/state"),
            &state::INITIALISING.to_string(),
        )?;

        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (store, dom, stop) = (Arc::clone(store), Arc::clone(dom), Arc::clone(&stop));
            let (backend, frontend) = (backend.clone(), frontend.clone());
            std::thread::Builder::new()
                .name(format!("dom{id}-vbd{devid}"))
                .spawn(move || serve(&store, &dom, disk, &backend, &frontend, &stop, max_queues))
                .map_err(VbdError::Thread)?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            backend,
            frontend,
            store: Arc::clone(store),
        })
    }

    /// The back end's current XenbusState.
    pub fn backend_state(&self) -> Option<u32> {
        read_u32(&self.store, &format!("{}/state", self.backend))
    }

    /// The front end's current XenbusState.
    pub fn frontend_state(&self) -> Option<u32> {
        read_u32(&self.store, &format!("{}/state", self.frontend))
    }
}

impl Drop for Vbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The toolstack's part of detaching: the back-end directory goes (the guest's own goes
        // with the domain).
        let _ = self.store.rm(0, 0, &self.backend);
        let parent = self.backend.rsplit_once('/').map(|(p, _)| p);
        if let Some(parent) =
            parent.filter(|p| self.store.directory(0, 0, p).is_ok_and(|d| d.is_empty()))
        {
            let _ = self.store.rm(0, 0, parent);
        }
    }
}

/// Maps one queue's ring: `ring-ref` (one page) or, with `ring-page-order` = k,
/// `ring-ref0` .. `ring-ref{2^k - 1}`, under `dir` (the front-end directory, or its `queue-N`
/// subdirectory). The pages must be contiguous in guest memory (so they are in the host mapping
/// too); a front end that grants scattered pages is refused.
fn map_ring(
    store: &Store,
    dom: &Arc<DomainShared>,
    dir: &str,
    order: u32,
) -> Result<Vec<hypervisor::grant::PinnedGrant>, String> {
    let refs: Vec<u32> = if order == 0 {
        vec![read_u32(store, &format!("{dir}/{}", keys::RING_REF)).ok_or("no ring-ref")?]
    } else {
        (0..1u32 << order)
            .map(|i| read_u32(store, &format!("{dir}/{}{i}", keys::RING_REF)))
            .collect::<Option<_>>()
            .ok_or("missing ring-refN")?
    };
    let mut pages = Vec::with_capacity(refs.len());
    for (i, r) in refs.iter().enumerate() {
        let p = hypervisor::grant::map(dom, GrantRef(*r), 0, false)
            .and_then(|m| m.pin())
            .map_err(|e| format!("ring grant {r}: {e}"))?;
        let base = pages.first().map_or(
            p.host_addr() as usize,
            |f: &hypervisor::grant::PinnedGrant| f.host_addr() as usize,
        );
        if p.host_addr() as usize != base + i * PAGE_SIZE {
            return Err(format!(
                "ring page {i} (ref {r}) is not contiguous with the first"
            ));
        }
        pages.push(p);
    }
    Ok(pages)
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
    pages: Vec<hypervisor::grant::PinnedGrant>,
    port: u32,
}

/// Reads the front end's queue count, ring order, and every queue's ring and channel (Xen's
/// layout: top-level keys for one queue, `queue-N/` subdirectories for several).
fn read_queues(
    store: &Store,
    dom: &Arc<DomainShared>,
    frontend: &str,
    max_queues: u32,
) -> Result<Vec<QueueRing>, String> {
    let nq = match store.read(
        0,
        0,
        &format!("{frontend}/{}", keys::MULTI_QUEUE_NUM_QUEUES),
    ) {
        Err(_) => 1,
        Ok(v) => std::str::from_utf8(&v)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|n| (1..=max_queues).contains(n))
            .ok_or_else(|| {
                format!(
                    "multi-queue-num-queues {:?} outside 1..={max_queues}",
                    String::from_utf8_lossy(&v)
                )
            })?,
    };
    let order = read_u32(store, &format!("{frontend}/{}", keys::RING_PAGE_ORDER)).unwrap_or(0);
    if order > MAX_RING_PAGE_ORDER {
        return Err(format!("ring-page-order {order} > {MAX_RING_PAGE_ORDER}"));
    }
    (0..nq)
        .map(|q| {
            let dir = if nq == 1 {
                frontend.to_owned()
            } else {
                format!("{frontend}/queue-{q}")
            };
            let port = read_u32(store, &format!("{dir}/{}", keys::EVENT_CHANNEL))
                .ok_or_else(|| format!("queue {q}: no event-channel"))?;
            let pages =
                map_ring(store, dom, &dir, order).map_err(|why| format!("queue {q}: {why}"))?;
            Ok(QueueRing { pages, port })
        })
        .collect()
}

/// The back-end thread: handshake, then serve every queue (one thread each) until stopped or
/// closed.
fn serve(
    store: &Store,
    dom: &Arc<DomainShared>,
    disk: Disk,
    backend: &str,
    frontend: &str,
    stop: &AtomicBool,
    max_queues: u32,
) {
    let set_state = |s: u32| {
        let _ = store.write(0, 0, &format!("{backend}/state"), s.to_string().as_bytes());
    };
    let gone = || stop.load(Ordering::Relaxed) || dom.state().is_final();
    // Wait for the front end's rings (polling the store is fine for a handshake).
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if gone() || Instant::now() > deadline {
            set_state(state::CLOSED);
            return;
        }
        if read_u32(store, &format!("{frontend}/state")) == Some(state::INITIALISED) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let queues = match read_queues(store, dom, frontend, max_queues) {
        Ok(q) => q,
        Err(why) => {
            dom.guest_fault("vbd-handshake", format_args!("{frontend}: {why}"));
            set_state(state::CLOSED);
            return;
        }
    };
    // Persistent grants when the front end offers them too (we always do).
    let persistent =
        read_u32(store, &format!("{frontend}/{}", keys::FEATURE_PERSISTENT)) == Some(1);
    // Every queue gets its own handle on the image, ring, channel, io_uring and grant cache;
    // queues share nothing but the file.
    let mut backs = Vec::with_capacity(queues.len());
    for (q, qr) in queues.iter().enumerate() {
        match connect_queue(dom, qr, &disk, persistent) {
            Ok(b) => backs.push(b),
            Err(why) => {
                dom.guest_fault("vbd-handshake", format_args!("{frontend} queue {q}: {why}"));
                set_state(state::CLOSED);
                return;
            }
        }
    }
    drop(disk);
    set_state(state::CONNECTED);
    tracing::info!(
        domid = dom.id,
        "{frontend} connected ({} queue(s))",
        backs.len()
    );
    let closing = || {
        gone() || read_u32(store, &format!("{frontend}/state")).is_some_and(|s| s >= state::CLOSING)
    };
    std::thread::scope(|s| {
        let mut backs = backs.into_iter();
        let first = backs.next();
        for (q, b) in backs.enumerate() {
            let closing = &closing;
            let spawned = std::thread::Builder::new()
                .name(format!("dom{}-vbd-q{}", dom.id, q + 1))
                .spawn_scoped(s, move || serve_queue(dom, frontend, b, closing));
            if let Err(e) = spawned {
                tracing::error!(domid = dom.id, "{frontend}: no thread for a queue: {e}");
            }
        }
        if let Some(b) = first {
            serve_queue(dom, frontend, b, &closing);
        }
    });
    // Tear down in order: stop serving (done: every queue's back end and channel are dropped by
    // its thread), unmap, Closed.
    drop(queues);
    set_state(state::CLOSED);
}

/// A queue ready to serve: its back end and the bound channel.
type QueueBack<'a> = (BlkBack<'a, DomainGrants>, HostPort);

fn connect_queue<'a>(
    dom: &Arc<DomainShared>,
    qr: &'a QueueRing,
    disk: &Disk,
    persistent: bool,
) -> Result<QueueBack<'a>, String> {
    let pages = qr.pages.len();
    // SAFETY: the pinned grants keep the ring pages mapped and claimed for as long as `qr`
    // lives, which outlives the ring endpoint and the back end built on it (the `'a` borrow);
    // `map_ring` checked that they are contiguous in host memory.
    let region = unsafe { SharedRegion::from_raw(qr.pages[0].host_addr(), pages * PAGE_SIZE) }
        .map_err(|_| "ring region".to_string())?;
    let ring = BackRing::<BlkRing>::attach(region, pages).map_err(|e| format!("ring: {e}"))?;
    let hp = HostPort::bind(dom, qr.port).map_err(|e| format!("port {}: {e:?}", qr.port))?;
    let grants = if persistent {
        DomainGrants::persistent(Arc::clone(dom))
    } else {
        DomainGrants::new(Arc::clone(dom))
    };
    let disk = disk.try_clone().map_err(|e| e.to_string())?;
    let back = BlkBack::new(dom.id, ring, disk, grants).map_err(|e| e.to_string())?;
    Ok((back, hp))
}

/// Serves one queue until the device closes or the ring breaks.
fn serve_queue(
    dom: &Arc<DomainShared>,
    frontend: &str,
    (mut back, hp): QueueBack<'_>,
    closing: &(dyn Fn() -> bool + Sync),
) {
    loop {
        match back.process() {
            Ok(true) => hp.notify(),
            Ok(false) => {}
            Err(e) => {
                dom.guest_fault("vbd-ring", format_args!("{frontend}: {e}"));
                break;
            }
        }
        if closing() {
            break;
        }
        match back.final_check() {
            Ok(true) => continue,
            Ok(false) => {
                hp.wait(Duration::from_millis(100));
            }
            Err(e) => {
                dom.guest_fault("vbd-ring", format_args!("{frontend}: {e}"));
                break;
            }
        }
    }
    // The back end (its in-flight I/O drained, its grant mappings released) goes before the
    // channel is unbound.
    drop(back);
    drop(hp);
}
