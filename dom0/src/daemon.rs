//! The dom0 daemon: owns the hypervisor, every domain and every back end, and serves the
//! control protocol ([`crate::control`]) to `xl`.
//!
//! One thread accepts connections, one per connection serves requests, and a lifecycle thread
//! applies a stopped domain's `on_poweroff` / `on_reboot` / `on_crash` action. It sleeps until a
//! domain stops (each domain's stop watch sends its id on a channel) or a put-off restart is due,
//! and then handles that domain alone: nothing looks at every domain on a timer. All state sits
//! behind one mutex; nothing slow (a guest's shutdown or its release of a device, a console
//! stream) is waited for while holding it. Requests find a domain by id or by name in O(log n)
//! (a map each); only `list`, `top`, `vcpu-list` and `info` go over every domain, as their
//! answers do.
//!
//! Everything on the socket is outside input: the peer's credentials are checked when it
//! connects ([`Access`]), at most [`MAX_CLIENTS`] connections are served at once, a request line
//! is bounded ([`control::MAX_REQUEST`]) and every request is checked as it is parsed
//! ([`control::parse_request`]); a bad one gets `{"error":...}` and nothing else happens.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hypervisor::domain::StopWatch;
use hypervisor::{
    Domain, DomainConfig, DomainShared, DomainState, Hypervisor, VcpuError, VcpuState,
};
use pv_protocol::hypercall::ShutdownReason;

use crate::blkback::BlkStats;
use crate::control::{
    self, Answer, BlockAttachReply, BlockDetachReply, CreateReply, DomRef, DomainInfo, Done,
    Envelope, HelloReply, HostInfo, InfoReply, MAX_REQUEST, MemSetReply, NetworkAttachReply,
    NetworkDetachReply, PROTOCOL_VERSION, Reply, Request, StatusReply, TopRow, VbdRow, VcpuRow,
    VifRow,
};
use crate::disk::Disk;
use crate::peer::{self, Access, Role};
use crate::switch::Switch;
use crate::tap::{Tap, TapPort};
use crate::vbd::Vbd;
use crate::vif::Vif;
use crate::xlcfg::{
    Action, DiskSpec, DomainName, DomainSpec, IfName, MAX_VIFS, Shown, SwitchName, Vdev, VifSpec,
};

/// Errors a request can end in (sent to the client as one line).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No domain by that name or id.
    #[error("no domain {:?}", .0.to_string())]
    NoDomain(DomRef),
    /// The name is taken.
    #[error("a domain named {0} already exists")]
    NameTaken(DomainName),
    /// Building the domain failed.
    #[error("cannot create domain {0}")]
    Create(DomainName, #[source] hypervisor::Error),
    /// The kernel image cannot be read.
    #[error("kernel {0}")]
    Kernel(PathBuf, #[source] std::io::Error),
    /// A disk could not be attached.
    #[error("disk {0}")]
    Disk(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// A network interface could not be attached.
    #[error("vif {0}")]
    Vif(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// A device spec did not parse (the spec, cut short for the message).
    #[error("bad spec {0:?}: {1}")]
    Spec(String, String),
    /// No such device.
    #[error("domain {0} has no device {1}")]
    NoDevice(u32, String),
    /// A lifecycle operation failed.
    #[error("domain {0}")]
    Lifecycle(u32, #[source] hypervisor::LifecycleError),
    /// The store refused the shutdown request.
    #[error("cannot ask domain {0} to shut down: store {1:?}")]
    Store(u32, pv_protocol::store::StoreErrno),
    /// The domain did not stop in time.
    #[error("domain {0} did not shut down within {1:?}")]
    Timeout(u32, Duration),
    /// The log cannot be read.
    #[error("daemon log")]
    Log(#[source] std::io::Error),
    /// The request did not parse.
    #[error(transparent)]
    Request(#[from] control::RequestError),
    /// The request line is too long.
    #[error("request longer than {MAX_REQUEST} bytes; closing the connection")]
    TooLong,
    /// The peer may not use the daemon.
    #[error("permission denied: {0}")]
    Denied(String),
    /// Too many connections are open.
    #[error("too many connections ({MAX_CLIENTS}); try again later")]
    Busy,
    /// The op is not served on this path.
    #[error("{0} is not a request/reply op")]
    NotHere(&'static str),
    /// Acting for the client failed.
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    /// vCPU placement failed.
    #[error("vCPU placement")]
    Vcpu(#[from] VcpuError),
    /// A memory target could not be set.
    #[error("memory target")]
    Balloon(#[from] crate::balloon::BalloonError),
}

/// Largest kernel image the daemon reads.
const MAX_KERNEL_BYTES: u64 = 64 << 20;

/// Reads a kernel image: a regular file (not a FIFO, nor `/dev/zero`) of at most
/// [`MAX_KERNEL_BYTES`].
fn read_kernel(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = crate::disk::open_regular(path, false, 0)
        .map_err(|e| e.unwrap_or_else(|| std::io::Error::other("not a regular file")))?;
    let mut bytes = Vec::new();
    f.take(MAX_KERNEL_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KERNEL_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_KERNEL_BYTES >> 20
        )));
    }
    Ok(bytes)
}

/// A refused device spec, cut short for the message (a client may send 8 KiB of it).
fn spec_error(spec: &str, why: String) -> DaemonError {
    DaemonError::Spec(Shown(spec).to_string(), why)
}

/// A domain the daemon manages, with its devices.
struct Managed {
    spec: DomainSpec,
    /// Who asked for it: a group member's files are opened as that member, also on restarts.
    owner: Role,
    domain: Domain,
    disks: Vec<(DiskSpec, Vbd)>,
    vifs: Vec<(u32, VifSpec, Vif)>,
    restarts: Restarts,
    /// Stopped and kept for inspection (`on_*=preserve`).
    preserved: bool,
    /// Its balloon's target, MiB (`memory` until `mem-set`; a restart starts from `memory`).
    target_mib: u64,
    /// Sends the domain's id to the lifecycle thread when it stops (`None` until it is listed).
    stop_watch: Option<StopWatch>,
}

impl Managed {
    /// Takes every device out, to be dropped (each a polite close that may wait for the guest)
    /// after the state lock is released.
    fn unplug_all(&mut self) -> Devices {
        (
            std::mem::take(&mut self.disks),
            std::mem::take(&mut self.vifs),
        )
    }
}

/// A domain's devices, taken out to be dropped outside the state lock.
type Devices = (Vec<(DiskSpec, Vbd)>, Vec<(u32, VifSpec, Vif)>);

/// How a domain's restarts went, over its successive ids: for `xl list`, the give-up rule and
/// the back-off.
#[derive(Debug, Clone)]
struct Restarts {
    /// Restarts so far.
    total: u32,
    /// When the recent ones happened (a domain that crashes on boot is not restarted forever).
    recent: Vec<Instant>,
    /// Restarts in a row after runs shorter than [`STABLE_RUN`]: the back-off grows with it.
    streak: u32,
    /// When this incarnation was built.
    started: Instant,
    /// A restart that is put off: when it is due, and the streak it continues.
    due: Option<(Instant, u32)>,
}

impl Restarts {
    fn new() -> Self {
        Self {
            total: 0,
            recent: Vec::new(),
            streak: 0,
            started: Instant::now(),
            due: None,
        }
    }
}

/// A run at least this long starts the back-off again from nothing.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// The back-off's first step and its ceiling.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long to wait before restarting a domain that has been restarted `streak` times in a row
/// after short runs: at once the first time, then 0.25 s, doubling up to 5 minutes. A guest
/// that reboots every 2 s thus settles at one boot per 5 minutes instead of using up the host.
fn backoff(streak: u32) -> Duration {
    match streak {
        0 => Duration::ZERO,
        n => BACKOFF_FIRST
            .saturating_mul(1 << (n - 1).min(20))
            .min(BACKOFF_MAX),
    }
}

#[derive(Default)]
struct State {
    domains: BTreeMap<u32, Managed>,
    /// Each listed name's domain (during a restart, the new one).
    names: HashMap<DomainName, u32>,
    switches: HashMap<SwitchName, Arc<Switch>>,
    /// Switches with a TAP uplink, by switch name: the TAP's interface name.
    uplinks: HashMap<SwitchName, IfName>,
    /// How the last domains to go ended (id, name, final state), newest last.
    ended: std::collections::VecDeque<(u32, DomainName, DomainState)>,
}

impl State {
    /// Lists domain `id`.
    fn insert(&mut self, id: u32, m: Managed) {
        self.names.insert(m.spec.name.clone(), id);
        self.domains.insert(id, m);
    }

    /// Takes domain `id` off the list.
    fn remove(&mut self, id: u32) -> Option<Managed> {
        let m = self.domains.remove(&id)?;
        if self.names.get(&m.spec.name) == Some(&id) {
            self.names.remove(&m.spec.name);
        }
        Some(m)
    }

    /// The id of the listed domain `dom` names.
    fn find(&self, dom: &DomRef) -> Option<u32> {
        match dom {
            DomRef::Id(id) => self.domains.contains_key(id).then_some(*id),
            DomRef::Name(n) => self.names.get(n).copied(),
        }
    }
}

/// Ended domains remembered for `status`.
const ENDED_KEPT: usize = 64;

/// Most of the log `dmesg` reads (its end): the log grows for the daemon's life.
const DMESG_BYTES: u64 = 1 << 20;

/// The last `max` bytes of the file at `path`, from the first whole line in them.
fn log_tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(std::io::SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    Ok(match text.find('\n') {
        Some(i) if start > 0 => text[i + 1..].to_string(),
        _ => text.into_owned(),
    })
}

/// xl's state letter (r b p s c d) and the detail of a final state (shutdown reason and code,
/// crash registers).
fn state_letter(dom: &DomainShared) -> (&'static str, String) {
    match dom.state() {
        DomainState::Running if dom.is_blocked() => ("b", String::new()),
        DomainState::Running => ("r", String::new()),
        DomainState::Paused => ("p", String::new()),
        DomainState::Shutdown { reason, code } => {
            let letter = if reason == ShutdownReason::Crash {
                "c"
            } else {
                "s"
            };
            (letter, format!("{reason:?}, exit code {code}"))
        }
        DomainState::Crashed { detail } => ("c", detail),
        DomainState::Destroyed => ("d", String::new()),
    }
}

fn status(id: u32, name: &DomainName, live: bool, s: &DomainState) -> Answer {
    let (shutdown_code, crashed) = match s {
        DomainState::Shutdown { reason, code } => (Some(*code), *reason == ShutdownReason::Crash),
        DomainState::Crashed { .. } => (None, true),
        _ => (None, false),
    };
    Answer::Status(StatusReply {
        id,
        name: name.clone(),
        live,
        state: format!("{s:?}"),
        shutdown_code,
        crashed,
    })
}

/// The daemon.
pub struct Daemon {
    hv: Hypervisor,
    runtime: PathBuf,
    access: Access,
    state: Mutex<State>,
    changed: Condvar,
    /// Ids of domains that stopped, for the lifecycle thread (sent by their stop watches).
    stopped: (Sender<u32>, Receiver<u32>),
    started: Instant,
    clients: AtomicUsize,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

/// Restarts allowed within [`RESTART_WINDOW`] before a domain is given up on.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// Longest a console stream of a stopped domain waits for the daemon to act on the stop.
const STOP_HANDLED_WAIT: Duration = Duration::from_secs(5);

/// Connections served at once; more are told to try later and closed.
pub const MAX_CLIENTS: usize = 128;

/// Counts a connection for as long as it lives.
struct ClientSlot<'a>(&'a AtomicUsize);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        // Relaxed: a counter only; nothing else is published through it.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends `reply` as one line.
fn send(out: &mut impl Write, reply: &Reply<Answer>) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).unwrap_or_default();
    text.push('\n');
    out.write_all(text.as_bytes())
}

/// One request line of at most `max` bytes: `Ok(None)` at the end of the stream, `Err(true)`
/// when the line is longer (the rest is not read), `Err(false)` when reading failed.
fn read_request(r: &mut impl BufRead, max: usize, buf: &mut Vec<u8>) -> Result<Option<()>, bool> {
    buf.clear();
    let n = r
        .take(max as u64)
        .read_until(b'\n', buf)
        .map_err(|_| false)?;
    match n {
        0 => Ok(None),
        _ if buf.last() == Some(&b'\n') => Ok(Some(())),
        // No newline: the limit was hit, or the client's last line ended with the stream.
        _ if n == max => Err(true),
        _ => Ok(Some(())),
    }
}

impl Daemon {
    /// A daemon over `hv`, with its files in `runtime`, serving the peers `access` admits.
    pub fn new(hv: Hypervisor, runtime: &Path, access: Access) -> Arc<Self> {
        Arc::new(Self {
            hv,
            runtime: runtime.to_owned(),
            access,
            state: Mutex::default(),
            changed: Condvar::new(),
            stopped: crossbeam_channel::unbounded(),
            started: Instant::now(),
            clients: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `listener` forever (one thread per connection), with the lifecycle thread.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        let me = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name("lifecycle".into())
            .spawn(move || me.lifecycle());
        for conn in listener.incoming() {
            match conn {
                Ok(c) => self.admit(c),
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    // Out of descriptors, say: do not spin on the error.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Checks who connected and hands the connection to a thread of its own, or refuses it.
    fn admit(self: &Arc<Self>, mut c: UnixStream) {
        let refuse = |c: &mut UnixStream, e: DaemonError| {
            let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = send(c, &Reply::Error(control::chain(&e)));
        };
        let cred = match peer::peer_cred(&c) {
            Ok(cred) => cred,
            Err(e) => {
                tracing::warn!("connection refused: {}", control::chain(&e));
                return;
            }
        };
        let role = match self.access.check(&cred) {
            Ok(role) => role,
            Err(why) => {
                tracing::warn!(uid = cred.uid, pid = cred.pid, "connection refused: {why}");
                return refuse(&mut c, DaemonError::Denied(why));
            }
        };
        // Relaxed: a counter only; the slot is given back by the connection's thread.
        if self.clients.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                uid = cred.uid,
                pid = cred.pid,
                "connection refused: {MAX_CLIENTS} open"
            );
            return refuse(&mut c, DaemonError::Busy);
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                let _slot = ClientSlot(&me.clients);
                me.client(c, role);
            });
        if spawned.is_err() {
            // The closure (and its slot) went with the failed spawn.
            tracing::warn!("connection dropped: cannot start a thread for it");
        }
    }

    fn client(&self, stream: UnixStream, role: Role) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            match read_request(&mut reader, MAX_REQUEST, &mut line) {
                Ok(Some(())) => {}
                Ok(None) | Err(false) => return,
                Err(true) => {
                    tracing::warn!("request longer than {MAX_REQUEST} bytes; connection closed");
                    let _ = send(
                        &mut out,
                        &Reply::Error(control::chain(&DaemonError::TooLong)),
                    );
                    return;
                }
            }
            let (reply, console) = match control::parse_request(&line) {
                Err(e) => {
                    tracing::debug!("refused request: {}", control::chain(&e));
                    (Reply::Error(control::chain(&e)), None)
                }
                Ok(Envelope {
                    req: Request::Console { dom },
                    ..
                }) => match self.find(&dom) {
                    Ok(id) => (Reply::Ok(Answer::Done(Done { id })), Some(id)),
                    Err(e) => (Reply::Error(control::chain(&e)), None),
                },
                Ok(env) => {
                    tracing::debug!(?env.req, "request");
                    match self.handle(env.req, role) {
                        Ok(v) => (Reply::Ok(v), None),
                        Err(e) => (Reply::Error(control::chain(&e)), None),
                    }
                }
            };
            if send(&mut out, &reply).is_err() {
                return;
            }
            if let Some(id) = console {
                self.console(id, reader, out);
                return;
            }
        }
    }

    /// Streams domain `id`'s console to the client and the client's bytes to the guest.
    fn console(&self, id: u32, mut input: BufReader<UnixStream>, mut out: UnixStream) {
        let Some(shared) = self
            .lock()
            .domains
            .get(&id)
            .map(|m| Arc::clone(m.domain.shared()))
        else {
            return;
        };
        let keys = Arc::clone(&shared);
        let hung_up = Arc::new(AtomicBool::new(false));
        let hang_up = Arc::clone(&hung_up);
        let _ = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            keys.console.send_input(&buf[..n]);
                        }
                    }
                }
                // The client went away: end the output stream too, however quiet the guest.
                // Release: pairs with the Acquire in `stream_from`, which this wakes.
                hang_up.store(true, Ordering::Release);
                keys.console.wake_readers();
            });
        let mut pos = 0;
        let ended = loop {
            // Sleeps until there is output, the client hung up, or there will be no output: the
            // domain stopped and its output is all in.
            let (bytes, next) = shared.console.stream_from(pos, &hung_up);
            pos = next;
            if bytes.is_empty() {
                break !hung_up.load(Ordering::Acquire);
            }
            if out.write_all(&bytes).is_err() {
                break false;
            }
        };
        if ended {
            // The stream ends once the daemon has acted on the stop (destroyed, restarted,
            // preserved, or a restart put off), so a client that looks next sees the outcome.
            // Bounded in case the action itself stalls; it wakes with the action.
            let st = self.lock();
            let _ = self
                .changed
                .wait_timeout_while(st, STOP_HANDLED_WAIT, |st| {
                    st.domains
                        .get(&id)
                        .is_some_and(|m| !m.preserved && m.restarts.due.is_none())
                });
        }
        // Ends the connection for both threads: the client sees the end of the stream even
        // though the input thread still holds a handle on the socket.
        let _ = out.shutdown(std::net::Shutdown::Both);
    }

    /// A live domain's id from its name or id.
    fn find(&self, dom: &DomRef) -> Result<u32, DaemonError> {
        self.lock()
            .find(dom)
            .ok_or_else(|| DaemonError::NoDomain(dom.clone()))
    }

    fn handle(&self, req: Request, role: Role) -> Result<Answer, DaemonError> {
        match req {
            Request::Hello => Ok(Answer::Hello(HelloReply {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL_VERSION,
                pid: std::process::id(),
                runtime_dir: self.runtime.clone(),
            })),
            Request::Info => Ok(Answer::Info(self.info())),
            Request::List => Ok(Answer::List(self.list())),
            Request::Create { spec, paused } => {
                let id = self.create(&spec, role, paused, Restarts::new(), None)?;
                Ok(Answer::Create(CreateReply {
                    id,
                    name: spec.name.clone(),
                }))
            }
            Request::Destroy { dom } => {
                let id = self.find(&dom)?;
                self.destroy(id);
                Ok(Answer::Done(Done { id }))
            }
            Request::Shutdown { dom, reboot, wait } => {
                let id = self.find(&dom)?;
                self.shutdown(id, reboot, wait)?;
                Ok(Answer::Done(Done { id }))
            }
            Request::Pause { dom } => {
                let id = self.find(&dom)?;
                self.with(id, |m| m.domain.pause())?
                    .map_err(|e| DaemonError::Lifecycle(id, e))?;
                Ok(Answer::Done(Done { id }))
            }
            Request::Unpause { dom } => {
                let id = self.find(&dom)?;
                self.with(id, |m| m.domain.unpause())?
                    .map_err(|e| DaemonError::Lifecycle(id, e))?;
                Ok(Answer::Done(Done { id }))
            }
            // Turns the connection into a stream: served by `client`, never here.
            Request::Console { .. } => Err(DaemonError::NotHere("console")),
            Request::Dmesg { lines } => {
                let text = log_tail(&self.runtime.join(control::LOG), DMESG_BYTES)
                    .map_err(DaemonError::Log)?;
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                Ok(Answer::Dmesg(tail))
            }
            Request::BlockAttach { dom, spec, base } => {
                let id = self.find(&dom)?;
                self.block_attach(id, &spec, base.as_deref(), role)
            }
            Request::BlockDetach { dom, vdev } => {
                let id = self.find(&dom)?;
                let vbd = self.with(id, |m| {
                    let i = m.disks.iter().position(|(d, _)| d.vdev == vdev)?;
                    m.spec.disks.retain(|d| d.vdev != vdev);
                    Some(m.disks.remove(i))
                })?;
                // Dropped outside the lock: the guest gets time to release it.
                drop(vbd.ok_or_else(|| DaemonError::NoDevice(id, vdev.to_string()))?);
                Ok(Answer::BlockDetach(BlockDetachReply { id, vdev }))
            }
            Request::BlockList { dom } => {
                let id = self.find(&dom)?;
                self.with(id, |m| {
                    Answer::BlockList(
                        m.disks
                            .iter()
                            .map(|(d, v)| {
                                let c = v.stats();
                                VbdRow {
                                    vdev: d.vdev,
                                    devid: d.devid(),
                                    target: d.target.clone(),
                                    readonly: d.readonly,
                                    backend_state: v.backend_state(),
                                    frontend_state: v.frontend_state(),
                                    reads: c.reads,
                                    writes: c.writes,
                                    read_bytes: c.read_bytes,
                                    written_bytes: c.written_bytes,
                                    errors: c.errors + c.unsupported,
                                }
                            })
                            .collect(),
                    )
                })
            }
            Request::NetworkAttach { dom, spec } => {
                let id = self.find(&dom)?;
                self.network_attach(id, &spec)
            }
            Request::NetworkDetach { dom, devid } => {
                let id = self.find(&dom)?;
                let vif = self.with(id, |m| {
                    let i = m.vifs.iter().position(|(d, _, _)| *d == devid)?;
                    let (_, spec, _) = &m.vifs[i];
                    if let Some(j) = m.spec.vifs.iter().position(|v| v == spec) {
                        m.spec.vifs.remove(j);
                    }
                    Some(m.vifs.remove(i))
                })?;
                drop(vif.ok_or_else(|| DaemonError::NoDevice(id, format!("vif {devid}")))?);
                Ok(Answer::NetworkDetach(NetworkDetachReply { id, devid }))
            }
            Request::NetworkList { dom } => {
                let id = self.find(&dom)?;
                self.with(id, |m| {
                    Answer::NetworkList(
                        m.vifs
                            .iter()
                            .map(|(devid, s, v)| {
                                let c = v.counters().map(|c| c.snapshot()).unwrap_or_default();
                                VifRow {
                                    devid: *devid,
                                    mac: v.mac(),
                                    bridge: s.bridge.clone(),
                                    backend_state: v.backend_state(),
                                    frontend_state: v.frontend_state(),
                                    rx_packets: c.rx_packets,
                                    tx_packets: c.tx_packets,
                                    tx_dropped: c.tx_dropped,
                                    errors: c.errors,
                                }
                            })
                            .collect(),
                    )
                })
            }
            Request::Top => Ok(Answer::Top(self.top())),
            Request::MemSet { dom, mib } => {
                let id = self.find(&dom)?;
                let (shared, max) =
                    self.with(id, |m| (Arc::clone(m.domain.shared()), m.spec.max_memory()))?;
                if mib > max {
                    return Err(crate::balloon::BalloonError::AboveMax {
                        domid: id,
                        target: mib,
                        max,
                    }
                    .into());
                }
                crate::balloon::set_target(self.hv.store(), &shared, mib)?;
                self.with(id, |m| m.target_mib = mib)?;
                Ok(Answer::MemSet(MemSetReply { id, target: mib }))
            }
            Request::VcpuList { dom } => {
                let only = dom.map(|d| self.find(&d)).transpose()?;
                let st = self.lock();
                let rows = match only {
                    Some(o) => st.domains.range(o..=o),
                    None => st.domains.range(..),
                }
                .flat_map(|(id, m)| {
                    m.domain.shared().vcpus().into_iter().map(move |v| VcpuRow {
                        name: m.spec.name.clone(),
                        id: *id,
                        vcpu: v.index,
                        cpu: v.cpu,
                        state: match v.state {
                            VcpuState::Running => "r--",
                            VcpuState::Blocked => "-b-",
                            VcpuState::Paused => "--p",
                            VcpuState::Offline => "---",
                        }
                        .into(),
                        time_s: v.time.as_secs_f64(),
                        affinity: v.affinity,
                    })
                })
                .collect();
                Ok(Answer::VcpuList(rows))
            }
            Request::VcpuPin { dom, vcpu, cpus } => {
                let id = self.find(&dom)?;
                let shared = self.with(id, |m| Arc::clone(m.domain.shared()))?;
                let all: Vec<u32> = (0..shared.vcpus).collect();
                for v in vcpu.map_or(all, |v| vec![v]) {
                    shared.pin_vcpu(v, cpus.as_deref())?;
                }
                Ok(Answer::Done(Done { id }))
            }
            Request::Status { dom } => {
                let st = self.lock();
                if let Some((id, m)) = st.find(&dom).and_then(|id| st.domains.get_key_value(&id)) {
                    return Ok(status(*id, &m.spec.name, true, &m.domain.state()));
                }
                st.ended
                    .iter()
                    .rev()
                    .find(|(id, name, _)| dom.matches(*id, name))
                    .map(|(id, name, s)| status(*id, name, false, s))
                    .ok_or(DaemonError::NoDomain(dom))
            }
        }
    }

    /// Runs `f` on domain `id` under the lock.
    fn with<R>(&self, id: u32, f: impl FnOnce(&mut Managed) -> R) -> Result<R, DaemonError> {
        let mut st = self.lock();
        let m = st
            .domains
            .get_mut(&id)
            .ok_or(DaemonError::NoDomain(DomRef::Id(id)))?;
        Ok(f(m))
    }

    fn info(&self) -> InfoReply {
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        // SAFETY: sysconf reads a system constant.
        let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let st = self.lock();
        InfoReply {
            host: HostInfo {
                kvm: format!("{:?}", self.hv.flavour()),
                cores,
                memory_mib: mem_kib / 1024,
                kernel: kernel.trim().into(),
            },
            domains: st.domains.len(),
            switches: st.switches.keys().cloned().collect(),
            splitvisor: env!("CARGO_PKG_VERSION").into(),
            protocol: PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
        }
    }

    fn list(&self) -> Vec<DomainInfo> {
        let st = self.lock();
        st.domains
            .iter()
            .map(|(id, m)| {
                let (letter, detail) = state_letter(m.domain.shared());
                let held = hypervisor::reservation::stats(m.domain.shared()).held_pages;
                DomainInfo {
                    name: m.spec.name.clone(),
                    id: *id,
                    mem: (held * pv_protocol::PAGE_SIZE as u64) >> 20,
                    target: m.target_mib,
                    maxmem: m.spec.max_memory(),
                    vcpus: m.spec.vcpus,
                    state: letter.into(),
                    time: m.domain.shared().cpu_time().as_secs_f64(),
                    detail: match m.restarts.due {
                        Some((at, _)) => format!(
                            "{detail}; restart in {:.1} s",
                            at.saturating_duration_since(Instant::now()).as_secs_f64()
                        ),
                        None => detail,
                    },
                    restarts: m.restarts.total,
                    spec: m.spec.clone(),
                }
            })
            .collect()
    }

    fn top(&self) -> Vec<TopRow> {
        let st = self.lock();
        st.domains
            .iter()
            .map(|(id, m)| {
                let (mut rx, mut tx, mut rxb, mut txb) = (0, 0, 0, 0);
                for (_, _, v) in &m.vifs {
                    if let Some(c) = v.counters() {
                        let s = c.snapshot();
                        // The port's rx is what the guest sent.
                        tx += s.rx_packets;
                        txb += s.rx_bytes;
                        rx += s.tx_packets;
                        rxb += s.tx_bytes;
                    }
                }
                let mut blk = BlkStats::default();
                for (_, v) in &m.disks {
                    let s = v.stats();
                    blk.reads += s.reads;
                    blk.writes += s.writes;
                    blk.read_bytes += s.read_bytes;
                    blk.written_bytes += s.written_bytes;
                    blk.errors += s.errors + s.unsupported;
                }
                let mem = hypervisor::reservation::stats(m.domain.shared());
                let kib = |pages: u64| pages * (pv_protocol::PAGE_SIZE as u64 / 1024);
                TopRow {
                    name: m.spec.name.clone(),
                    id: *id,
                    vcpus: m.spec.vcpus,
                    mem_kib: kib(mem.held_pages),
                    maxmem_kib: kib(mem.max_pages),
                    target_kib: m.target_mib * 1024,
                    host_kib: mem.host_bytes / 1024,
                    state: state_letter(m.domain.shared()).0.into(),
                    cpu_s: m.domain.shared().cpu_time().as_secs_f64(),
                    net_rx_packets: rx,
                    net_tx_packets: tx,
                    net_rx_bytes: rxb,
                    net_tx_bytes: txb,
                    disks: m.disks.len(),
                    vbd_rd: blk.reads,
                    vbd_wr: blk.writes,
                    vbd_rsect: blk.read_bytes / 512,
                    vbd_wsect: blk.written_bytes / 512,
                    vbd_err: blk.errors,
                }
            })
            .collect()
    }

    /// Builds a domain from `spec` with its devices. With `replaces`, the new domain takes the
    /// place of that (stopped) one, which may hold the same name and is destroyed once the new
    /// one is listed: `xl list` never sees the name missing during a restart.
    fn create(
        &self,
        spec: &DomainSpec,
        owner: Role,
        paused: bool,
        restarts: Restarts,
        replaces: Option<u32>,
    ) -> Result<u32, DaemonError> {
        let kernel = match &spec.kernel {
            Some(p) => Some(
                owner
                    .open_files(|| read_kernel(p))?
                    .map_err(|e| DaemonError::Kernel(p.to_path_buf(), e))?,
            ),
            None => None,
        };
        let mut cmdline = spec.cmdline.as_str().to_owned();
        // The guest kernel's network stack takes its address from the command line.
        if let Some(ip) = spec.vifs.iter().find_map(|v| v.ip)
            && !cmdline.split_whitespace().any(|w| w.starts_with("ip="))
        {
            cmdline = format!("{cmdline} ip={ip}").trim().to_owned();
        }
        let mut st = self.lock();
        if st
            .names
            .get(&spec.name)
            .is_some_and(|id| Some(*id) != replaces)
        {
            return Err(DaemonError::NameTaken(spec.name.clone()));
        }
        let domain = self
            .hv
            .create_domain(DomainConfig {
                name: spec.name.to_string(),
                mem_mib: spec.memory,
                max_mem_mib: spec.maxmem,
                vcpus: spec.vcpus,
                kernel,
                cmdline,
                start_paused: paused,
                cpus: spec.cpus.clone(),
                ..Default::default()
            })
            .map_err(|e| DaemonError::Create(spec.name.clone(), e))?;
        let id = domain.id();
        let mut m = Managed {
            spec: spec.clone(),
            owner,
            domain,
            disks: Vec::new(),
            vifs: Vec::new(),
            restarts,
            preserved: false,
            target_mib: spec.memory,
            stop_watch: None,
        };
        // The balloon's keys, before the guest can look for them (it boots meanwhile, but reads
        // its target only once started; a missing one it takes as no request).
        if let Err(e) = crate::balloon::publish(
            self.hv.store(),
            m.domain.shared(),
            spec.memory,
            spec.max_memory(),
        ) {
            m.domain.destroy();
            return Err(e.into());
        }
        let devices = (|| {
            for d in &spec.disks {
                m.disks
                    .push((d.clone(), self.plug_disk(&m.domain, d, owner)?));
            }
            for (i, v) in spec.vifs.iter().enumerate() {
                let vif = self.plug_vif(&mut st, &m.domain, i as u32, v)?;
                m.vifs.push((i as u32, v.clone(), vif));
            }
            Ok(())
        })();
        if let Err(e) = devices {
            // Nothing was connected yet, so dropping the devices waits for no guest.
            drop(m.unplug_all());
            m.domain.destroy();
            return Err(e);
        }
        tracing::info!(domid = id, name = %spec.name, "domain created");
        // Watched once listed, with the lock held: the lifecycle thread, which takes the lock
        // to look the id up, finds it however soon the domain stops.
        let tx = self.stopped.0.clone();
        m.stop_watch = Some(m.domain.shared().watch_stop(Box::new(move || {
            // Unbounded: never blocks the stopping thread; the receiver lives with the daemon.
            let _ = tx.send(id);
        })));
        st.insert(id, m);
        if let Some(r) = replaces {
            // Before anyone can see the successor in the list (the old one's teardown may take a
            // while on a busy host).
            tracing::info!(old = r, domid = id, name = %spec.name, "domain restarted");
        }
        let old = replaces.and_then(|r| st.remove(r).map(|m| (r, m)));
        if let Some((r, m)) = &old {
            Self::remember(&mut st, *r, &m.spec.name, m.domain.state());
        }
        drop(st);
        if let Some((_, m)) = old {
            m.domain.destroy();
        }
        Ok(id)
    }

    /// Attaches disk `d` to `dom`, creating its image first if it has a size; the image is
    /// created and opened with `owner`'s identity (and nothing else is done with it).
    fn plug_disk(&self, dom: &Domain, d: &DiskSpec, owner: Role) -> Result<Vbd, DaemonError> {
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| {
            DaemonError::Disk(format!("{} ({})", d.vdev, d.target.display()), e)
        };
        let disk = owner
            .open_files(|| {
                if let Some(size) = d.size {
                    Disk::create_sparse(&d.target, size)?;
                }
                Disk::open(&d.target, d.readonly)
            })?
            .map_err(|e| fail(Box::new(e)))?;
        Vbd::attach_disk(self.hv.store(), dom.shared(), d.devid(), disk)
            .map_err(|e| fail(Box::new(e)))
    }

    fn plug_vif(
        &self,
        st: &mut State,
        dom: &Domain,
        devid: u32,
        v: &VifSpec,
    ) -> Result<Vif, DaemonError> {
        let fail = |e: Box<dyn std::error::Error + Send + Sync>| {
            DaemonError::Vif(format!("{devid} on {}", v.bridge), e)
        };
        let sw = match st.switches.get(&v.bridge) {
            Some(s) => Arc::clone(s),
            None => {
                let s = Arc::new(Switch::new(v.bridge.as_str()).map_err(|e| fail(Box::new(e)))?);
                st.switches.insert(v.bridge.clone(), Arc::clone(&s));
                s
            }
        };
        if let Some(tap) = &v.uplink_tap
            && !st.uplinks.contains_key(&v.bridge)
        {
            let t = Tap::create(tap.as_str()).map_err(|e| fail(Box::new(e)))?;
            let p = TapPort::new(t).map_err(|e| fail(Box::new(e)))?;
            sw.add_port(Box::new(p)).map_err(|e| fail(Box::new(e)))?;
            st.uplinks.insert(v.bridge.clone(), tap.clone());
            tracing::info!(switch = %v.bridge, %tap, "TAP uplink attached");
        }
        Vif::attach(self.hv.store(), dom.shared(), devid, v.mac, &sw).map_err(|e| fail(Box::new(e)))
    }

    fn block_attach(
        &self,
        id: u32,
        spec: &str,
        base: Option<&Path>,
        role: Role,
    ) -> Result<Answer, DaemonError> {
        let mut st = self.lock();
        let m = st
            .domains
            .get_mut(&id)
            .ok_or(DaemonError::NoDomain(DomRef::Id(id)))?;
        // The default vdev is the first free one. A relative path is relative to the client's
        // `base`, never to the daemon's working directory.
        let free = (0..Vdev::COUNT)
            .find(|&i| {
                !m.disks
                    .iter()
                    .any(|(o, _)| Some(o.vdev) == Vdev::from_index(i))
            })
            .unwrap_or(Vdev::COUNT);
        let d = DiskSpec::parse(spec, free, base).map_err(|e| spec_error(spec, e))?;
        if m.disks.iter().any(|(o, _)| o.vdev == d.vdev) {
            return Err(DaemonError::Spec(
                spec.into(),
                format!("{} is in use", d.vdev),
            ));
        }
        let vbd = self.plug_disk(&m.domain, &d, role)?;
        let out = Answer::BlockAttach(BlockAttachReply {
            id,
            vdev: d.vdev,
            devid: d.devid(),
        });
        m.spec.disks.push(d.clone());
        m.disks.push((d, vbd));
        Ok(out)
    }

    fn network_attach(&self, id: u32, spec: &str) -> Result<Answer, DaemonError> {
        let v = VifSpec::parse(spec).map_err(|e| spec_error(spec, e))?;
        let mut st = self.lock();
        let (devid, domain_shared) = {
            let m = st
                .domains
                .get(&id)
                .ok_or(DaemonError::NoDomain(DomRef::Id(id)))?;
            let devid = (0..MAX_VIFS as u32)
                .find(|d| !m.vifs.iter().any(|(o, _, _)| o == d))
                .ok_or_else(|| spec_error(spec, format!("{MAX_VIFS} vifs already")))?;
            (devid, m.domain.id())
        };
        // Borrow dance: plugging needs the switch table and the domain at once.
        let mut m = st
            .remove(domain_shared)
            .ok_or(DaemonError::NoDomain(DomRef::Id(id)))?;
        let plugged = self.plug_vif(&mut st, &m.domain, devid, &v);
        let out = plugged.map(|vif| {
            let mac = vif.mac();
            m.spec.vifs.push(v.clone());
            m.vifs.push((devid, v, vif));
            Answer::NetworkAttach(NetworkAttachReply { id, devid, mac })
        });
        st.insert(id, m);
        out
    }

    fn shutdown(&self, id: u32, reboot: bool, wait: bool) -> Result<(), DaemonError> {
        let what = if reboot { "reboot" } else { "poweroff" };
        self.hv
            .store()
            .write(
                0,
                0,
                &format!("/local/domain/{id}/control/shutdown"),
                what.as_bytes(),
            )
            .map_err(|e| DaemonError::Store(id, e))?;
        tracing::info!(domid = id, "asked to {what}");
        if !wait {
            return Ok(());
        }
        let limit = Duration::from_secs(60);
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        loop {
            // Gone (destroyed, or rebuilt under a new id) or stopped and preserved.
            match st.domains.get(&id) {
                None => return Ok(()),
                Some(m) if m.preserved => return Ok(()),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DaemonError::Timeout(id, limit));
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Remembers how domain `id` ended, for `status`.
    fn remember(st: &mut State, id: u32, name: &DomainName, state: DomainState) {
        if st.ended.len() == ENDED_KEPT {
            st.ended.pop_front();
        }
        st.ended.push_back((id, name.clone(), state));
    }

    fn destroy(&self, id: u32) {
        let m = {
            let mut st = self.lock();
            let m = st.remove(id);
            if let Some(m) = &m {
                let state = m.domain.state();
                Self::remember(&mut st, id, &m.spec.name, state);
            }
            m
        };
        if let Some(m) = m {
            let state = m.domain.state();
            // Stop the vCPUs first: a destroyed guest does not get to release its devices.
            let Managed {
                domain,
                disks,
                vifs,
                ..
            } = m;
            domain.destroy();
            drop((disks, vifs));
            tracing::info!(domid = id, ?state, "domain destroyed");
        }
        self.changed.notify_all();
    }

    /// Applies `on_*` actions to domains that stopped: sleeps until one stops (its id arrives
    /// from its stop watch) or a restart put off by its back-off is due, and handles that
    /// domain alone.
    fn lifecycle(self: Arc<Self>) {
        let stopped = self.stopped.1.clone();
        // Restarts put off: when each is due (an id may be in it more than once; harmless).
        let mut due: BTreeSet<(Instant, u32)> = BTreeSet::new();
        loop {
            let id = match due.first() {
                None => match stopped.recv() {
                    Ok(id) => id,
                    Err(_) => return,
                },
                Some(&(at, id)) => match stopped.recv_deadline(at) {
                    Ok(id) => id,
                    Err(RecvTimeoutError::Timeout) => {
                        due.remove(&(at, id));
                        id
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            if let Some(at) = self.on_stopped(id) {
                due.insert((at, id));
            }
        }
    }

    /// Applies domain `id`'s `on_*` action if it has stopped (and is still listed, and not
    /// preserved). Returns when to look again: a restart put off by its back-off.
    fn on_stopped(&self, id: u32) -> Option<Instant> {
        // (final state, action, seen for the first time)
        let (state, action, first) = {
            let st = self.lock();
            let m = st.domains.get(&id).filter(|m| !m.preserved)?;
            let s = m.domain.state();
            let action = match &s {
                DomainState::Shutdown { reason, .. } => match reason {
                    ShutdownReason::Reboot => m.spec.on_reboot,
                    ShutdownReason::Crash | ShutdownReason::Watchdog => m.spec.on_crash,
                    _ => m.spec.on_poweroff,
                },
                DomainState::Crashed { .. } => m.spec.on_crash,
                DomainState::Destroyed => Action::Destroy,
                _ => return None,
            };
            (s, action, m.restarts.due.is_none())
        };
        if first {
            match &state {
                DomainState::Crashed { detail } => {
                    tracing::error!(domid = id, "domain crashed: {detail}; on_crash={action:?}")
                }
                s => tracing::info!(domid = id, state = ?s, "domain stopped; {action:?}"),
            }
        }
        match action {
            Action::Destroy => self.destroy(id),
            Action::Preserve => {
                let devices = self
                    .with(id, |m| {
                        m.preserved = true;
                        m.unplug_all()
                    })
                    .ok();
                // Outside the lock: each device waits a while for the (stopped) guest.
                drop(devices);
                self.changed.notify_all();
            }
            Action::Restart => match self.restart_due(id) {
                Some(at) => {
                    // Put off: console streams waiting for the outcome may end.
                    self.changed.notify_all();
                    return Some(at);
                }
                None => self.restart(id),
            },
        }
        None
    }

    /// Puts domain `id`'s restart off by its back-off the first time it is seen stopped; when
    /// the restart is due, or `None` if it is due now (or the domain is gone).
    fn restart_due(&self, id: u32) -> Option<Instant> {
        let now = Instant::now();
        self.with(id, |m| {
            let r = &mut m.restarts;
            let (at, _) = *r.due.get_or_insert_with(|| {
                let streak = if now.duration_since(r.started) >= STABLE_RUN {
                    0
                } else {
                    r.streak
                };
                let wait = backoff(streak);
                if !wait.is_zero() {
                    tracing::warn!(
                        domid = id,
                        "restart {} in a row after a short run: put off by {wait:?}",
                        streak + 1
                    );
                }
                (now + wait, streak)
            });
            (at > now).then_some(at)
        })
        .ok()
        .flatten()
    }

    fn restart(&self, id: u32) {
        // The stopped domain stays listed (in its final state) until its successor is; its
        // devices go first, so the new one can open the same images and switch ports.
        let now = Instant::now();
        let Some((devices, spec, owner, mut restarts)) = ({
            let mut st = self.lock();
            st.domains.get_mut(&id).map(|m| {
                m.restarts
                    .recent
                    .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
                (m.unplug_all(), m.spec.clone(), m.owner, m.restarts.clone())
            })
        }) else {
            return;
        };
        drop(devices);
        if restarts.recent.len() >= MAX_RESTARTS {
            tracing::error!(
                domid = id,
                name = %spec.name,
                "restarted {MAX_RESTARTS} times within {RESTART_WINDOW:?}; giving up (destroyed)"
            );
            self.destroy(id);
            return;
        }
        let streak = restarts.due.map_or(0, |(_, s)| s);
        restarts = Restarts {
            total: restarts.total + 1,
            streak: streak + 1,
            started: now,
            due: None,
            recent: restarts.recent,
        };
        restarts.recent.push(now);
        match self.create(&spec, owner, false, restarts, Some(id)) {
            // Logged by `create` as the successor is listed.
            Ok(_) => {}
            Err(e) => {
                tracing::error!(domid = id, "restart failed: {}", control::chain(&e));
                self.destroy(id);
            }
        }
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_exponentially_up_to_a_ceiling() {
        let steps: Vec<u64> = (0..6).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(steps, [0, 250, 500, 1000, 2000, 4000]);
        assert_eq!(backoff(12), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn dmesg_reads_only_the_end_of_the_log_from_a_whole_line() {
        let p = std::env::temp_dir().join(format!("sv-logtail-{}", std::process::id()));
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        let t = log_tail(&p, 100).unwrap();
        assert!(t.len() <= 100);
        assert!(t.starts_with("line "), "{t:?}");
        assert!(t.ends_with("line 999\n"));
        assert_eq!(log_tail(&p, 1 << 20).unwrap(), text);
        std::fs::remove_file(&p).unwrap();
    }
}
