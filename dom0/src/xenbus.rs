//! The toolstack's side of Xen's device handshake, shared by every device class (vbd, vif).
//!
//! Store layout (Xen's): the front-end directory `/local/domain/<dom>/device/<class>/<devid>`
//! (owned by the guest) and the back-end directory `/local/domain/0/backend/<class>/<dom>/<devid>`
//! (owned by dom0, readable by the guest). The back end publishes its features and `InitWait`;
//! the front end grants its rings, offers an event channel to dom0, writes the references and
//! `Initialised`; the back end maps the rings, binds the channel and switches to `Connected`.
//! Closing (the front end's `Closing`, a detach, or the domain's end) tears down in order: stop
//! serving, unbind, unmap, `Closed`; detaching removes the back-end directory.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::DomainShared;
use hypervisor::domain::StopWatch;
use hypervisor::grant::RingPages;
use hypervisor::store::{LocalWatch, Store};
use pv_protocol::grant::{DomId, GrantRef};
use pv_protocol::store::{Perm, PermKind, StoreErrno};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
/// XenbusState values.
pub mod state {
    /// Initialising.
    pub const INITIALISING: u32 = 1;
    /// Back end waits for the front end.
    pub const INIT_WAIT: u32 = 2;
    /// Front end published its rings.
    pub const INITIALISED: u32 = 3;
    /// Connected.
    pub const CONNECTED: u32 = 4;
    /// Closing.
    pub const CLOSING: u32 = 5;
    /// Closed.
    pub const CLOSED: u32 = 6;
}

/// Errors of the device handshake.
#[derive(Debug, thiserror::Error)]
pub enum XenbusError {
    /// A store entry could not be written.
    #[error("store: {0:?} writing {1}")]
    Store(StoreErrno, String),
    /// No eventfd for a thread to sleep on.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device thread could not start.
    #[error("cannot start the device thread")]
    Thread(#[source] std::io::Error),
}

/// How long a detach waits for the guest to release its device.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The wake-ups of one device's threads. Every thread that sleeps until something about the
/// device changes subscribes a [`Waiter`] of its own (an eventfd: one waiter never takes
/// another's wake-up) and is woken by [`raise`](Self::raise), which the device's watches call:
/// either end's `state` changed (store watches), the domain stopped, or the device is detached.
/// Nothing wakes on a timer.
#[derive(Debug, Default)]
pub struct Signal {
    waiters: Mutex<Vec<Weak<EventFd>>>,
}

impl Signal {
    /// A new waiter, woken by every later [`raise`](Self::raise).
    pub fn subscribe(&self) -> Result<Waiter, XenbusError> {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(XenbusError::EventFd)?);
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.retain(|f| f.strong_count() > 0);
        w.push(Arc::downgrade(&fd));
        Ok(Waiter { fd })
    }

    /// Wakes every waiter. Called from store watches (with the store's lock held) and from the
    /// thread that stops the domain: it only writes eventfds.
    pub fn raise(&self) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for f in w.iter().filter_map(Weak::upgrade) {
            // A failed write means the counter is saturated: the waiter is woken just as well.
            let _ = f.write(1);
        }
    }
}

/// A thread's subscription to a [`Signal`]: an eventfd it sleeps on.
#[derive(Debug)]
pub struct Waiter {
    fd: Arc<EventFd>,
}

impl Waiter {
    /// The eventfd, readable once the signal was raised since the last wait (to sleep on it
    /// with other fds, as blockback does in io_uring); [`consume`](Self::consume) resets it.
    pub fn eventfd(&self) -> &EventFd {
        &self.fd
    }

    /// Takes the wake-ups so far; whether there were any.
    pub fn consume(&self) -> bool {
        self.fd.read().is_ok()
    }

    /// Sleeps until the signal is raised (or was, since the last wait), with no timeout, or at
    /// most until `deadline`; takes the wake-up. Whether it was woken.
    pub fn wait(&self, deadline: Option<Instant>) -> bool {
        if self.consume() {
            return true;
        }
        let timeout = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Rounded up: waking before the deadline would only mean another wait.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, timeout) };
        self.consume()
    }
}

/// What a device's thread shares with its owner: whether it must stop, and its [`Signal`].
#[derive(Debug)]
pub struct DeviceCtx {
    stop: AtomicBool,
    signal: Signal,
    dom: Arc<DomainShared>,
}

impl DeviceCtx {
    /// Whether the device is detached or the domain has stopped.
    pub fn gone(&self) -> bool {
        // Acquire: pairs with the detach's Release store, made before it raised the signal.
        self.stop.load(Ordering::Acquire) || self.dom.state().is_final()
    }

    /// A waiter woken whenever either end's state changes, the domain stops or the device is
    /// detached. Subscribe before looking at what to wait for, so no change is missed.
    pub fn waiter(&self) -> Result<Waiter, XenbusError> {
        self.signal.subscribe()
    }

    /// The domain.
    pub fn dom(&self) -> &Arc<DomainShared> {
        &self.dom
    }

    /// Sleeps on `w` until `ready()` holds (`true`) or the device is gone (`false`). `w` must
    /// have been subscribed before the call.
    pub fn wait_until(&self, w: &Waiter, ready: impl Fn() -> bool) -> bool {
        loop {
            if self.gone() {
                return false;
            }
            if ready() {
                return true;
            }
            w.wait(None);
        }
    }
}

/// A device's back-end thread and store directories; dropping it detaches the device the polite
/// way: the back end says `Closing` and waits up to [`CLOSE_TIMEOUT`] for the front end to
/// release it, then the thread is told to stop and joined, and the back-end directory removed.
///
/// The thread sleeps until something it waits for changes: store watches on both ends' `state`
/// and a watch of the domain's stop raise the device's [`Signal`].
#[derive(Debug)]
pub struct DeviceThread {
    ctx: Arc<DeviceCtx>,
    thread: Option<JoinHandle<()>>,
    dirs: DeviceDirs,
    /// Raise the signal; they go after the thread is joined (field order does not matter: the
    /// drop joins first).
    _watches: (LocalWatch, LocalWatch, StopWatch),
}

impl DeviceThread {
    /// Runs `body(dirs, ctx)` on a thread named `name`, for a device of `dom`.
    pub fn spawn(
        dirs: DeviceDirs,
        dom: &Arc<DomainShared>,
        name: String,
        body: impl FnOnce(&DeviceDirs, &DeviceCtx) + Send + 'static,
    ) -> Result<Self, XenbusError> {
        let ctx = Arc::new(DeviceCtx {
            stop: AtomicBool::new(false),
            signal: Signal::default(),
            dom: Arc::clone(dom),
        });
        let raiser = || {
            let ctx = Arc::downgrade(&ctx);
            Box::new(move || {
                if let Some(c) = ctx.upgrade() {
                    c.signal.raise();
                }
            })
        };
        let store = dirs.store();
        let watches = (
            store.watch_local(&format!("{}/state", dirs.frontend), raiser()),
            store.watch_local(&format!("{}/state", dirs.backend), raiser()),
            dom.watch_stop(raiser()),
        );
        let thread = {
            let (ctx, dirs) = (Arc::clone(&ctx), dirs.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || body(&dirs, &ctx))
                .map_err(XenbusError::Thread)?
        };
        Ok(Self {
            ctx,
            thread: Some(thread),
            dirs,
            _watches: watches,
        })
    }

    /// The device's store directories.
    pub fn dirs(&self) -> &DeviceDirs {
        &self.dirs
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        // Let a live guest finish and release the device first; then stop regardless.
        self.dirs.request_close(&self.ctx, CLOSE_TIMEOUT);
        // Release: pairs with the Acquire in `gone`; the thread reads it after the wake-up below.
        self.ctx.stop.store(true, Ordering::Release);
        self.ctx.signal.raise();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.dirs.remove_backend();
    }
}

/// One device's pair of store directories.
#[derive(Debug, Clone)]
pub struct DeviceDirs {
    store: Arc<Store>,
    /// The guest's domain id.
    pub domid: u32,
    /// `/local/domain/0/backend/<class>/<dom>/<devid>`.
    pub backend: String,
    /// `/local/domain/<dom>/device/<class>/<devid>`.
    pub frontend: String,
}

impl DeviceDirs {
    /// The directories of device `devid` of class `class` ("vbd", "vif") of domain `domid`.
    pub fn new(store: &Arc<Store>, class: &str, domid: u32, devid: u32) -> Self {
        Self {
            store: Arc::clone(store),
            domid,
            backend: format!("/local/domain/0/backend/{class}/{domid}/{devid}"),
            frontend: format!("/local/domain/{domid}/device/{class}/{devid}"),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn write(&self, path: String, value: &str) -> Result<(), XenbusError> {
        self.store
            .write(0, 0, &path, value.as_bytes())
            .map_err(|e| XenbusError::Store(e, path))
    }

    /// Publishes a new device: the back end's `keys`, then `InitWait`, readable by the guest;
    /// then the front-end directory with `front_keys` and `Initialising`.
    pub fn publish(
        &self,
        keys: &[(&str, String)],
        front_keys: &[(&str, String)],
    ) -> Result<(), XenbusError> {
        let (be, fe) = (&self.backend, &self.frontend);
        self.write(format!("{be}/frontend"), fe)?;
        self.write(format!("{be}/frontend-id"), &self.domid.to_string())?;
        for (k, v) in keys {
            self.write(format!("{be}/{k}"), v)?;
        }
        self.write(format!("{be}/state"), &state::INIT_WAIT.to_string())?;
        let readable = [
            Perm {
                kind: PermKind::None,
                domid: DomId(0),
            },
            Perm {
                kind: PermKind::Read,
                domid: DomId(self.domid as u16),
            },
        ];
        let parent = be.rsplit_once('/').map_or(be.as_str(), |(p, _)| p);
        let children = self.store.directory(0, 0, be).unwrap_or_default();
        let paths = [parent.to_owned(), be.clone()]
            .into_iter()
            .chain(children.iter().map(|k| format!("{be}/{k}")));
        for p in paths {
            self.store
                .set_perms(0, 0, &p, &readable)
                .map_err(|e| XenbusError::Store(e, p.clone()))?;
        }
        // Front end directory, in the guest's home (so owned by the guest).
        self.write(format!("{fe}/backend"), be)?;
        self.write(format!("{fe}/backend-id"), "0")?;
        for (k, v) in front_keys {
            self.write(format!("{fe}/{k}"), v)?;
        }
        self.write(format!("{fe}/state"), &state::INITIALISING.to_string())
    }

    /// A front-end key, as text.
    pub fn front(&self, key: &str) -> Option<String> {
        let v = self
            .store
            .read(0, 0, &format!("{}/{key}", self.frontend))
            .ok()?;
        String::from_utf8(v).ok()
    }

    /// A front-end key, as a number.
    pub fn front_u32(&self, key: &str) -> Option<u32> {
        self.front(key)?.trim().parse().ok()
    }

    /// The back end's current XenbusState.
    pub fn backend_state(&self) -> Option<u32> {
        let v = self
            .store
            .read(0, 0, &format!("{}/state", self.backend))
            .ok()?;
        std::str::from_utf8(&v).ok()?.trim().parse().ok()
    }

    /// The front end's current XenbusState.
    pub fn frontend_state(&self) -> Option<u32> {
        self.front_u32("state")
    }

    /// Sets the back end's XenbusState.
    pub fn set_state(&self, s: u32) {
        let _ = self.write(format!("{}/state", self.backend), &s.to_string());
    }

    /// Whether the front end is closing (or gone).
    pub fn front_closing(&self) -> bool {
        self.frontend_state().is_some_and(|s| s >= state::CLOSING)
    }

    /// Detaching a connected device, the polite way (Xen's): the back end says `Closing` while
    /// still serving, and waits up to `timeout` for the front end to finish its requests, release
    /// its grants and say `Closed`. Returns whether it did; a front end that does not answer
    /// (dead, hostile, or with no hotplug support) is closed on regardless by the caller. A
    /// stopped domain answers nothing, so it is not waited for. The wait sleeps until either
    /// end's state changes or the domain stops, and is timed only by the deadline.
    pub fn request_close(&self, ctx: &DeviceCtx, timeout: Duration) -> bool {
        if ctx.gone() || self.backend_state() != Some(state::CONNECTED) {
            return false;
        }
        // Subscribed before the state is written, so no answer is missed.
        let Ok(w) = ctx.waiter() else {
            return false;
        };
        self.set_state(state::CLOSING);
        let deadline = Instant::now() + timeout;
        loop {
            // The back end closed on its own meanwhile (the domain ended), or the domain is gone.
            if ctx.gone() || self.backend_state() == Some(state::CLOSED) {
                return false;
            }
            if !matches!(self.frontend_state(), Some(s) if s < state::CLOSED) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            w.wait(Some(deadline));
        }
    }

    /// The toolstack's part of detaching: the back-end directory goes (and its parent when it
    /// was the last device of the domain); the guest's own directory goes with the domain.
    pub fn remove_backend(&self) {
        let _ = self.store.rm(0, 0, &self.backend);
        let parent = self.backend.rsplit_once('/').map(|(p, _)| p);
        if let Some(parent) =
            parent.filter(|p| self.store.directory(0, 0, p).is_ok_and(|d| d.is_empty()))
        {
            let _ = self.store.rm(0, 0, parent);
        }
    }
}

/// Maps and pins the pages of one ring, granted by `dom` as `refs` (in ring order, scattered or
/// not), for dom0.
pub fn map_ring(dom: &Arc<DomainShared>, refs: &[u32]) -> Result<RingPages, String> {
    let refs: Vec<GrantRef> = refs.iter().map(|&r| GrantRef(r)).collect();
    hypervisor::grant::map_ring(dom, &refs, 0).map_err(|e| format!("ring grants {refs:?}: {e}"))
}
