//! The toolstack's side of Xen's device handshake, shared by every device class (vbd, vif).
//!
//! Store layout (Xen's): the front-end directory `/local/domain/<dom>/device/<class>/<devid>`
//! (owned by the guest) and the back-end directory `/local/domain/0/backend/<class>/<dom>/<devid>`
//! (owned by dom0, readable by the guest). The back end publishes its features and `InitWait`;
//! the front end grants its rings, offers an event channel to dom0, writes the references and
//! `Initialised`; the back end maps the rings, binds the channel and switches to `Connected`.
//! Closing (the front end's `Closing`, a detach, or the domain's end) tears down in order: stop
//! serving, unbind, unmap, `Closed`; detaching removes the back-end directory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::DomainShared;
use hypervisor::grant::RingPages;
use hypervisor::store::Store;
use pv_protocol::grant::{DomId, GrantRef};
use pv_protocol::store::{Perm, PermKind, StoreErrno};

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

/// A store entry could not be written.
#[derive(Debug, thiserror::Error)]
#[error("store: {0:?} writing {1}")]
pub struct XenbusError(pub StoreErrno, pub String);

/// How long a detach waits for the guest to release its device.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A device's back-end thread and store directories; dropping it detaches the device the polite
/// way: the back end says `Closing` and waits up to [`CLOSE_TIMEOUT`] for the front end to
/// release it, then the thread is told to stop and joined, and the back-end directory removed.
#[derive(Debug)]
pub struct DeviceThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dirs: DeviceDirs,
}

impl DeviceThread {
    /// Runs `body(dirs, stop)` on a thread named `name`; `stop` turns true on detach.
    pub fn spawn(
        dirs: DeviceDirs,
        name: String,
        body: impl FnOnce(&DeviceDirs, &AtomicBool) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, dirs) = (Arc::clone(&stop), dirs.clone());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || body(&dirs, &stop))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            dirs,
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
        self.dirs.request_close(CLOSE_TIMEOUT);
        // Relaxed: the join below orders everything the thread did before the caller goes on.
        self.stop.store(true, Ordering::Relaxed);
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
            .map_err(|e| XenbusError(e, path))
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
                .map_err(|e| XenbusError(e, p.clone()))?;
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

    /// Waits (polling the store, fine for a handshake) until the front end says `Initialised`;
    /// `false` if `gone` first.
    pub fn wait_initialised(&self, gone: &dyn Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            if gone() || Instant::now() > deadline {
                return false;
            }
            if self.frontend_state() == Some(state::INITIALISED) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the front end is closing (or gone).
    pub fn front_closing(&self) -> bool {
        self.frontend_state().is_some_and(|s| s >= state::CLOSING)
    }

    /// Detaching a connected device, the polite way (Xen's): the back end says `Closing` while
    /// still serving, and waits up to `timeout` for the front end to finish its requests, release
    /// its grants and say `Closed`. Returns whether it did; a front end that does not answer
    /// (dead, hostile, or with no hotplug support) is closed on regardless by the caller.
    pub fn request_close(&self, timeout: Duration) -> bool {
        if self.backend_state() != Some(state::CONNECTED) {
            return false;
        }
        self.set_state(state::CLOSING);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // The back end closed on its own meanwhile (the domain ended).
            if self.backend_state() == Some(state::CLOSED) {
                return false;
            }
            match self.frontend_state() {
                Some(s) if s < state::CLOSED => std::thread::sleep(Duration::from_millis(5)),
                _ => return true,
            }
        }
        false
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
