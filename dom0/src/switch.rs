//! A virtual Ethernet switch: ports (guests' vifs, a TAP uplink) joined by a MAC-learning
//! forwarding table, served by one thread per switch.
//!
//! The switch thread owns every port. It takes frames from each port in turn (a budget per port
//! per pass, so one busy guest cannot starve the others), learns the source MAC, and forwards
//! to the learned port, or floods to all others when the destination is unknown, broadcast or
//! multicast. A vif's own address is fixed to its port for as long as it is plugged in; other
//! addresses are learned per port, each port within its own bound ([`Port::max_learned`]), so a
//! flood of invented addresses from one port (a TAP uplink facing the outside) only recycles
//! that port's entries and never evicts or moves a guest's. A frame whose sender left its checksum blank is finished by the switch before it
//! reaches a port that cannot take blank checksums. When every port is idle the thread spins
//! briefly, then re-arms every port and sleeps in `poll(2)` on their file descriptors (a vif's
//! doorbell eventfd, a TAP's io_uring eventfd) and its control eventfd.
//!
//! Separate switches are separate threads with separate tables: isolated networks.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub use splitvisor_api::mac::{BadMac, Mac};

/// Per-port counters, readable from any thread while the switch runs. "rx" is what the port
/// received from its owner (a guest's transmissions), "tx" what the switch delivered to it.
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames taken from the port.
    pub rx_packets: AtomicU64,
    /// Bytes taken from the port.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the port.
    pub tx_packets: AtomicU64,
    /// Bytes delivered to the port.
    pub tx_bytes: AtomicU64,
    /// Frames for the port dropped (no buffer posted, queue full).
    pub tx_dropped: AtomicU64,
    /// Malformed or refused requests from the port's owner (bad grants, bad chains, too long).
    pub errors: AtomicU64,
}

impl PortCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> PortStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PortStats {
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            errors: l(&self.errors),
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        // Relaxed: statistics, read only for display; nothing is ordered by them.
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of [`PortCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortStats {
    /// See [`PortCounters::rx_packets`].
    pub rx_packets: u64,
    /// See [`PortCounters::rx_bytes`].
    pub rx_bytes: u64,
    /// See [`PortCounters::tx_packets`].
    pub tx_packets: u64,
    /// See [`PortCounters::tx_bytes`].
    pub tx_bytes: u64,
    /// See [`PortCounters::tx_dropped`].
    pub tx_dropped: u64,
    /// See [`PortCounters::errors`].
    pub errors: u64,
}

/// Offload state of a frame in the switch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameMeta {
    /// Length in the switch's frame buffer.
    pub len: usize,
    /// The L4 checksum is blank (its sender relied on offload).
    pub csum_blank: bool,
    /// The sender vouches for the checksum (or it was just computed).
    pub data_validated: bool,
}

/// A port is dead (its ring broke, its device went away): the switch drops it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PortError(pub String);

/// Largest frame the switch carries (a TX chain's `size` is 16 bits).
pub const MAX_FRAME: usize = 65535;

/// What the switch needs from a port.
pub trait Port: Send {
    /// Name for logs and listings (`vif<dom>.<dev>`, a TAP's interface name).
    fn name(&self) -> &str;
    /// The port's counters.
    fn counters(&self) -> &Arc<PortCounters>;
    /// The next frame from the port's owner, copied into `buf` (of [`MAX_FRAME`] bytes), or
    /// `None` when there is none now. Malformed input is answered and counted by the port and
    /// skipped; `Err` only when the port is dead.
    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<FrameMeta>, PortError>;
    /// Whether frames must reach this port with complete checksums.
    fn needs_checksum(&self) -> bool;
    /// The one source address frames from this port may carry (a guest's configured MAC); the
    /// switch drops the others, and knows this one to be on this port while it is plugged in.
    /// `None`: any (an uplink).
    fn source_mac(&self) -> Option<Mac> {
        None
    }
    /// How many addresses the switch may learn on this port (besides its
    /// [`source_mac`](Self::source_mac)); once full, a new one replaces the one this port sent
    /// from least recently. [`VIF_MAX_LEARNED`] for a guest, [`UPLINK_MAX_LEARNED`] for an
    /// uplink.
    fn max_learned(&self) -> usize;
    /// Delivers a frame to the port's owner; `false` when it was dropped (the switch counts
    /// deliveries and drops; the port counts only its owner's errors).
    fn transmit(&mut self, frame: &[u8], meta: FrameMeta) -> bool;
    /// Publishes what the last pass did (responses, notifications).
    fn flush(&mut self);
    /// Before the switch sleeps: asks to be woken by new work; `true` when there is work now.
    fn arm(&mut self) -> Result<bool, PortError>;
    /// Readable when the port has work (after [`arm`](Self::arm)).
    fn wait_fd(&self) -> RawFd;
    /// Drains the wake-up source after a sleep.
    fn clear_wakeup(&mut self) {}
    /// Whether the port's owner is gone for good (checked now and then).
    fn gone(&self) -> bool {
        false
    }
}

/// Forwarding decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To one port.
    Unicast(u64),
    /// To every port but the source.
    Flood,
    /// Nowhere (the destination is on the source port).
    Drop,
}

/// Spoofed frames logged at warn per port (all are counted as the port's errors).
const SPOOF_WARN_LIMIT: u64 = 10;

/// How long a learned address stays without being seen again.
const MAC_AGE: Duration = Duration::from_secs(300);

/// Addresses a vif may have learned. Its own address, the only one anti-spoofing lets it send
/// from, is fixed to its port and not counted; so this matters only for a vif built without one
/// (tests, benchmarks), which then learns one address at a time, as a host with one NIC has.
pub const VIF_MAX_LEARNED: usize = 1;

/// Addresses an uplink (TAP) may have learned: the hosts behind it. As many as the whole switch
/// held before it had per-port bounds (4096, about 200 KiB), far above a host network segment's
/// size; a Linux bridge bounds the whole bridge if asked (`fdb_max_learned`, default none),
/// Junos bounds each interface (`interface-mac-limit`, default 1024).
pub const UPLINK_MAX_LEARNED: usize = 4096;

#[derive(Debug, Clone, Copy)]
enum Entry {
    /// A port's own address: never aged, moved or evicted while the port is plugged in.
    Fixed(u64),
    /// Seen as a source on `port`, last at `seen`; `tick` is its place in the port's age order.
    Learned { port: u64, seen: Instant, tick: u64 },
}

/// What the table keeps for one port.
#[derive(Debug)]
struct Learning {
    max: usize,
    /// Its fixed address, if it has one (and no port had it fixed first).
    own: Option<Mac>,
    /// Its learned addresses by tick: the least recently seen first.
    by_age: BTreeMap<u64, Mac>,
}

/// The learning table: each port's own address, and which port each other source address was
/// last seen on, within each port's bound.
#[derive(Debug, Default)]
pub struct Fabric {
    table: HashMap<Mac, Entry>,
    ports: HashMap<u64, Learning>,
    /// Counts sightings, to order each port's entries.
    tick: u64,
}

impl Fabric {
    /// Serves port `id`: up to `max_learned` addresses may be learned on it, and `own` (a vif's
    /// address) is on it from now until it leaves, whatever other ports send. `false` if `own`
    /// is already another port's (the first keeps it).
    pub fn add_port(&mut self, id: u64, max_learned: usize, own: Option<Mac>) -> bool {
        // Port ids are not reused; should one come again, it starts afresh.
        self.forget_port(id);
        let mut fixed = None;
        let mut free = true;
        if let Some(mac) = own.filter(|m| !m.is_multicast()) {
            match self.table.get(&mac).copied() {
                Some(Entry::Fixed(_)) => free = false,
                Some(Entry::Learned { port, tick, .. }) => {
                    // Learned elsewhere first (an outside host claiming it, say): the port's own
                    // address wins.
                    if let Some(l) = self.ports.get_mut(&port) {
                        l.by_age.remove(&tick);
                    }
                    fixed = Some(mac);
                }
                None => fixed = Some(mac),
            }
        }
        if let Some(mac) = fixed {
            self.table.insert(mac, Entry::Fixed(id));
        }
        self.ports.insert(
            id,
            Learning {
                max: max_learned,
                own: fixed,
                by_age: BTreeMap::new(),
            },
        );
        free
    }

    /// Learns `frame`'s source on `src` and routes it by its destination.
    pub fn route(&mut self, src: u64, frame: &[u8], now: Instant) -> Route {
        let Some(hdr) = frame.get(..12) else {
            return Route::Drop;
        };
        let dst = Mac(hdr[..6].try_into().unwrap_or_default());
        let from = Mac(hdr[6..12].try_into().unwrap_or_default());
        if !from.is_multicast() {
            self.learn(src, from, now);
        }
        if dst.is_multicast() {
            return Route::Flood;
        }
        let port = match self.table.get(&dst) {
            Some(Entry::Fixed(port)) => *port,
            Some(Entry::Learned { port, seen, .. }) if now.duration_since(*seen) < MAC_AGE => *port,
            _ => return Route::Flood,
        };
        if port == src {
            Route::Drop
        } else {
            Route::Unicast(port)
        }
    }

    /// Records that `from` was seen on `src`, within `src`'s bound.
    fn learn(&mut self, src: u64, from: Mac, now: Instant) {
        match self.table.get(&from) {
            // A port's own address: no other port's frames move it.
            Some(Entry::Fixed(_)) => return,
            Some(&Entry::Learned { port, tick, .. }) => {
                // Seen again (here or on another port): it leaves its old place in the age order.
                if let Some(l) = self.ports.get_mut(&port) {
                    l.by_age.remove(&tick);
                }
                self.table.remove(&from);
            }
            None => {}
        }
        let Some(l) = self.ports.get_mut(&src) else {
            return;
        };
        if l.max == 0 {
            return;
        }
        // Full: this port's least recently seen addresses make room, never another port's.
        while l.by_age.len() >= l.max {
            let Some((_, old)) = l.by_age.pop_first() else {
                break;
            };
            self.table.remove(&old);
        }
        self.tick += 1;
        l.by_age.insert(self.tick, from);
        self.table.insert(
            from,
            Entry::Learned {
                port: src,
                seen: now,
                tick: self.tick,
            },
        );
    }

    /// Forgets port `port` and every address on it (it left the switch).
    pub fn forget_port(&mut self, port: u64) {
        let Some(l) = self.ports.remove(&port) else {
            return;
        };
        for mac in l.by_age.values() {
            self.table.remove(mac);
        }
        if let Some(own) = l.own
            && matches!(self.table.get(&own), Some(Entry::Fixed(p)) if *p == port)
        {
            self.table.remove(&own);
        }
    }

    /// Addresses learned on `port` (its own not counted).
    pub fn learned_on(&self, port: u64) -> usize {
        self.ports.get(&port).map_or(0, |l| l.by_age.len())
    }

    /// Known addresses: ports' own and learned ones.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether nothing is learned.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

enum Command {
    Add(u64, Box<dyn Port>, Sender<()>),
    Remove(u64, Sender<()>),
    List(Sender<Vec<(u64, String, PortStats)>>),
    Learned(Sender<Vec<(u64, usize)>>),
}

/// Errors from the switch handle.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The switch thread could not start.
    #[error("cannot start the switch thread")]
    Thread(#[source] std::io::Error),
    /// The control eventfd could not be made.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// The switch thread is gone.
    #[error("switch {0} stopped")]
    Stopped(String),
}

/// A running switch. Dropping it stops the thread and drops every port still attached.
#[derive(Debug)]
pub struct Switch {
    name: String,
    tx: Option<Sender<Command>>,
    wake: Arc<EventFd>,
    next_id: AtomicU64,
    thread: Option<JoinHandle<()>>,
}

/// Frames taken from one port per pass before moving to the next.
const BUDGET: usize = 64;
/// How long an idle switch keeps polling before it sleeps.
const SPIN: Duration = Duration::from_micros(30);

impl Switch {
    /// Starts an empty switch called `name`.
    pub fn new(name: &str) -> Result<Self, SwitchError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(SwitchError::EventFd)?);
        let thread = {
            let (name, wake) = (name.to_owned(), Arc::clone(&wake));
            std::thread::Builder::new()
                .name(format!("switch-{name}"))
                .spawn(move || run(&name, &rx, &wake))
                .map_err(SwitchError::Thread)?
        };
        Ok(Self {
            name: name.to_owned(),
            tx: Some(tx),
            wake,
            next_id: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    /// The switch's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn send(&self, c: Command) -> Result<(), SwitchError> {
        let stopped = || SwitchError::Stopped(self.name.clone());
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(c)
            .map_err(|_| stopped())?;
        // Wake the thread if it sleeps; a failed write means the counter is saturated, which
        // wakes it just as well.
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Plugs `port` in; returns its id once the switch serves it.
    pub fn add_port(&self, port: Box<dyn Port>) -> Result<u64, SwitchError> {
        // Relaxed: a unique number is all that is needed.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, wait) = crossbeam_channel::bounded(1);
        self.send(Command::Add(id, port, done))?;
        wait.recv()
            .map_err(|_| SwitchError::Stopped(self.name.clone()))?;
        Ok(id)
    }

    /// Unplugs port `id` and waits until it is dropped (its rings and grants released). A port
    /// the switch already dropped (dead ring) is fine.
    pub fn remove_port(&self, id: u64) -> Result<(), SwitchError> {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.send(Command::Remove(id, done))?;
        wait.recv()
            .map_err(|_| SwitchError::Stopped(self.name.clone()))
    }

    /// Every port: id, name and counters.
    pub fn ports(&self) -> Result<Vec<(u64, String, PortStats)>, SwitchError> {
        let (reply, wait) = crossbeam_channel::bounded(1);
        self.send(Command::List(reply))?;
        wait.recv()
            .map_err(|_| SwitchError::Stopped(self.name.clone()))
    }

    /// Every port's id and how many addresses the table has learned on it (its own not
    /// counted), in the order of [`ports`](Self::ports).
    pub fn learned(&self) -> Result<Vec<(u64, usize)>, SwitchError> {
        let (reply, wait) = crossbeam_channel::bounded(1);
        self.send(Command::Learned(reply))?;
        wait.recv()
            .map_err(|_| SwitchError::Stopped(self.name.clone()))
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        drop(self.tx.take());
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Slot {
    id: u64,
    port: Box<dyn Port>,
}

/// The switch thread.
fn run(name: &str, rx: &Receiver<Command>, wake: &EventFd) {
    let mut ports: Vec<Slot> = Vec::new();
    let mut fabric = Fabric::default();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut idle_since = Instant::now();
    let mut last_reap = Instant::now();
    loop {
        // Control first: it is rare and cheap to check.
        loop {
            match rx.try_recv() {
                Ok(Command::Add(id, port, done)) => {
                    tracing::info!(switch = name, port = port.name(), "port added");
                    if !fabric.add_port(id, port.max_learned(), port.source_mac()) {
                        tracing::warn!(
                            switch = name,
                            port = port.name(),
                            mac = ?port.source_mac(),
                            "another port has this address: frames to it go there"
                        );
                    }
                    ports.push(Slot { id, port });
                    let _ = done.send(());
                }
                Ok(Command::Remove(id, done)) => {
                    if let Some(i) = ports.iter().position(|s| s.id == id) {
                        let s = ports.swap_remove(i);
                        tracing::info!(switch = name, port = s.port.name(), "port removed");
                        drop(s);
                    }
                    fabric.forget_port(id);
                    let _ = done.send(());
                }
                Ok(Command::List(reply)) => {
                    let list = ports
                        .iter()
                        .map(|s| (s.id, s.port.name().to_owned(), s.port.counters().snapshot()))
                        .collect();
                    let _ = reply.send(list);
                }
                Ok(Command::Learned(reply)) => {
                    let list = ports
                        .iter()
                        .map(|s| (s.id, fabric.learned_on(s.id)))
                        .collect();
                    let _ = reply.send(list);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return,
            }
        }

        let now = Instant::now();
        let mut work = 0usize;
        let mut dead = Vec::new();
        for i in 0..ports.len() {
            for _ in 0..BUDGET {
                let meta = match ports[i].port.receive(&mut buf) {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(
                            switch = name,
                            port = ports[i].port.name(),
                            "port dropped: {e}"
                        );
                        dead.push(ports[i].id);
                        break;
                    }
                };
                work += 1;
                let c = ports[i].port.counters();
                if let Some(mac) = ports[i].port.source_mac()
                    && buf.get(6..12) != Some(&mac.0[..])
                {
                    // Spoofed: it would teach the table another port's address.
                    let n = c.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n < SPOOF_WARN_LIMIT {
                        tracing::warn!(
                            switch = name,
                            port = ports[i].port.name(),
                            "frame dropped: source address is not the port's {mac}"
                        );
                    }
                    continue;
                }
                PortCounters::add(&c.rx_packets, 1);
                PortCounters::add(&c.rx_bytes, meta.len as u64);
                let src = ports[i].id;
                forward(&mut ports, &mut fabric, src, &mut buf, meta, now);
            }
        }
        for s in &mut ports {
            s.port.flush();
        }
        if now.duration_since(last_reap) > Duration::from_millis(100) {
            last_reap = now;
            dead.extend(ports.iter().filter(|s| s.port.gone()).map(|s| s.id));
        }
        for id in dead {
            ports.retain(|s| s.id != id);
            fabric.forget_port(id);
        }
        if work > 0 {
            idle_since = now;
            continue;
        }
        if now.duration_since(idle_since) < SPIN {
            std::hint::spin_loop();
            continue;
        }
        // Idle: arm every port, and sleep unless one had work meanwhile.
        let mut more = false;
        let mut dead = Vec::new();
        for s in &mut ports {
            match s.port.arm() {
                Ok(m) => more |= m,
                Err(e) => {
                    tracing::warn!(switch = name, port = s.port.name(), "port dropped: {e}");
                    dead.push(s.id);
                }
            }
        }
        ports.retain(|s| !dead.contains(&s.id));
        for id in dead {
            fabric.forget_port(id);
        }
        if more {
            idle_since = Instant::now();
            continue;
        }
        let mut fds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd())
            .chain(ports.iter().map(|s| s.port.wait_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // No timeout: a port's eventfd (a guest's doorbell, a TAP's completions) or the control
        // eventfd wakes it; an idle switch never wakes.
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        let _ = wake.read();
        for s in &mut ports {
            s.port.clear_wakeup();
        }
        idle_since = Instant::now();
    }
}

/// Sends one frame from port `src` where the table says.
fn forward(
    ports: &mut [Slot],
    fabric: &mut Fabric,
    src: u64,
    buf: &mut [u8],
    mut meta: FrameMeta,
    now: Instant,
) {
    let route = fabric.route(src, &buf[..meta.len], now);
    let mut targets = ports.iter_mut().filter(|s| match route {
        Route::Unicast(id) => s.id == id,
        Route::Flood => s.id != src,
        Route::Drop => false,
    });
    for s in &mut targets {
        if meta.csum_blank && s.port.needs_checksum() {
            // Finish the checksum once; every later port gets the complete frame.
            if pv_protocol::inet::fill_l4_checksum(&mut buf[..meta.len]).is_ok() {
                meta.csum_blank = false;
                meta.data_validated = true;
            }
        }
        let sent = s.port.transmit(&buf[..meta.len], meta);
        let c = s.port.counters();
        if sent {
            PortCounters::add(&c.tx_packets, 1);
            PortCounters::add(&c.tx_bytes, meta.len as u64);
        } else {
            PortCounters::add(&c.tx_dropped, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    /// Ports 1 and 2 without addresses of their own, learning as uplinks do.
    fn two_uplinks() -> Fabric {
        let mut f = Fabric::default();
        f.add_port(1, UPLINK_MAX_LEARNED, None);
        f.add_port(2, UPLINK_MAX_LEARNED, None);
        f
    }

    #[test]
    fn learns_floods_unknown_and_broadcast_and_forgets_ports() {
        let mut f = two_uplinks();
        let t = Instant::now();
        assert_eq!(f.route(1, &frame(B, A), t), Route::Flood, "B unknown");
        assert_eq!(
            f.route(2, &frame(A, B), t),
            Route::Unicast(1),
            "A learned on 1"
        );
        assert_eq!(f.route(1, &frame(B, A), t), Route::Unicast(2));
        assert_eq!(f.route(1, &frame([0xff; 6], A), t), Route::Flood);
        assert_eq!(
            f.route(1, &frame(A, B), t),
            Route::Drop,
            "B moved to 1, A is on 1"
        );
        f.forget_port(1);
        assert!(f.is_empty());
        assert_eq!(f.route(1, &frame(A, B), t), Route::Flood);
        // Entries age out.
        assert_eq!(f.route(2, &frame(B, A), t + MAC_AGE * 2), Route::Flood);
        // A runt is dropped; a multicast source is not learned; a port the table does not serve
        // learns nothing.
        assert_eq!(f.route(1, &[0u8; 5], t), Route::Drop);
        let mut g = two_uplinks();
        g.route(1, &frame(B, [1, 0, 0, 0, 0, 9]), t);
        g.route(7, &frame(B, A), t);
        assert!(g.is_empty());
    }

    #[test]
    fn each_port_learns_within_its_own_bound_recycling_its_oldest() {
        let mut f = Fabric::default();
        f.add_port(1, UPLINK_MAX_LEARNED, None);
        f.add_port(2, VIF_MAX_LEARNED, None);
        let t = Instant::now();
        f.route(2, &frame(BCAST, B), t);
        let mac = |i: u32| {
            let b = i.to_be_bytes();
            [2, 0x11, b[0], b[1], b[2], b[3]]
        };
        for i in 0..(UPLINK_MAX_LEARNED + 100) as u32 {
            f.route(1, &frame(BCAST, mac(i)), t);
        }
        assert_eq!(f.learned_on(1), UPLINK_MAX_LEARNED);
        assert_eq!(f.len(), UPLINK_MAX_LEARNED + 1);
        // The first 100 made room for the last 100; port 2's address stayed.
        assert_eq!(f.route(2, &frame(mac(99), B), t), Route::Flood);
        assert_eq!(f.route(2, &frame(mac(100), B), t), Route::Unicast(1));
        let newest = mac(UPLINK_MAX_LEARNED as u32 + 99);
        assert_eq!(f.route(1, &frame(B, newest), t), Route::Unicast(2));
        // Seen again, an address is the newest: the next to go is mac(101), not mac(100).
        f.route(1, &frame(BCAST, mac(100)), t);
        f.route(1, &frame(BCAST, A), t);
        assert_eq!(f.route(2, &frame(mac(100), B), t), Route::Unicast(1));
        assert_eq!(f.route(2, &frame(mac(101), B), t), Route::Flood);
        // A port bound to one address recycles that one.
        f.route(2, &frame(BCAST, C), t);
        assert_eq!(f.learned_on(2), 1);
        assert_eq!(f.route(1, &frame(B, A), t), Route::Flood);
        assert_eq!(f.route(1, &frame(C, A), t), Route::Unicast(2));
        // Leaving, a port takes its entries along.
        f.forget_port(1);
        assert_eq!((f.learned_on(1), f.len()), (0, 1));
    }

    #[test]
    fn a_ports_own_address_is_known_at_once_and_never_moves_ages_or_goes_to_another() {
        let mut f = Fabric::default();
        let t = Instant::now();
        f.add_port(9, UPLINK_MAX_LEARNED, None);
        // Claimed from outside before the guest is plugged in: the guest's port wins.
        f.route(9, &frame(BCAST, A), t);
        assert!(f.add_port(1, VIF_MAX_LEARNED, Some(Mac(A))));
        assert_eq!(f.learned_on(9), 0);
        assert_eq!(f.route(9, &frame(A, B), t), Route::Unicast(1));
        f.route(9, &frame(BCAST, A), t);
        let much_later = t + MAC_AGE * 10;
        assert_eq!(f.route(9, &frame(A, B), much_later), Route::Unicast(1));
        // A second port with the same address does not take it.
        assert!(!f.add_port(2, VIF_MAX_LEARNED, Some(Mac(A))));
        assert_eq!(f.route(9, &frame(A, B), t), Route::Unicast(1));
        f.forget_port(2);
        assert_eq!(f.route(9, &frame(A, B), t), Route::Unicast(1));
        f.forget_port(1);
        assert_eq!(f.route(9, &frame(A, B), t), Route::Flood);
    }

    const C: [u8; 6] = [2, 0, 0, 0, 0, 3];
    const BCAST: [u8; 6] = [0xff; 6];
    /// Frames from outside in these tests are sent to this address, which nobody has.
    const NOWHERE: [u8; 6] = [2, 0xee, 0, 0, 0, 1];
    const FLOOD: usize = 100_000;

    /// Random unicast source addresses, as a flood from outside would bring.
    fn random_macs(n: usize) -> impl Iterator<Item = [u8; 6]> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n).map(move |_| {
            // xorshift64: the same addresses every run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            [b[0] & !1, b[1], b[2], b[3], b[4], b[5]]
        })
    }

    #[test]
    fn a_flood_of_sources_from_the_uplink_never_evicts_a_guests_entry() {
        let mut f = Fabric::default();
        f.add_port(1, VIF_MAX_LEARNED, Some(Mac(A)));
        f.add_port(2, VIF_MAX_LEARNED, Some(Mac(B)));
        f.add_port(3, UPLINK_MAX_LEARNED, None);
        let t = Instant::now();
        // The guests speak once, then keep quiet for longer than an entry lives.
        f.route(1, &frame(BCAST, A), t);
        f.route(2, &frame(BCAST, B), t);
        let span = MAC_AGE * 3;
        let mut last = [0u8; 6];
        for (i, mac) in random_macs(FLOOD).enumerate() {
            let now = t + span.mul_f64(i as f64 / FLOOD as f64);
            f.route(3, &frame(NOWHERE, mac), now);
            last = mac;
        }
        let end = t + span;
        assert_eq!(f.learned_on(3), UPLINK_MAX_LEARNED);
        assert_eq!(f.len(), UPLINK_MAX_LEARNED + 2);
        // Unicast to each guest still goes to its port alone.
        assert_eq!(f.route(3, &frame(A, last), end), Route::Unicast(1));
        assert_eq!(f.route(3, &frame(B, last), end), Route::Unicast(2));
        // The uplink keeps learning (its own oldest entries make room).
        assert_eq!(f.route(1, &frame(last, A), end), Route::Unicast(3));
        // A guest's address claimed from outside stays the guest's.
        f.route(3, &frame(BCAST, A), end);
        assert_eq!(f.route(2, &frame(A, B), end), Route::Unicast(1));
    }

    /// Frames for a [`TestPort`] to receive; adding some signals the port's eventfd, as a
    /// guest's doorbell would.
    struct Inbox {
        frames: Mutex<VecDeque<Vec<u8>>>,
        wake: EventFd,
    }

    impl Inbox {
        fn extend(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
            self.frames.lock().unwrap().extend(frames);
            self.wake.write(1).unwrap();
        }

        fn push(&self, frame: Vec<u8>) {
            self.extend([frame]);
        }
    }

    /// A port fed and drained by the test.
    struct TestPort {
        name: String,
        counters: Arc<PortCounters>,
        inbox: Arc<Inbox>,
        outbox: Arc<Mutex<Vec<Vec<u8>>>>,
        mac: Option<Mac>,
    }

    impl Port for TestPort {
        fn name(&self) -> &str {
            &self.name
        }
        fn counters(&self) -> &Arc<PortCounters> {
            &self.counters
        }
        fn receive(&mut self, buf: &mut [u8]) -> Result<Option<FrameMeta>, PortError> {
            Ok(self.inbox.frames.lock().unwrap().pop_front().map(|f| {
                buf[..f.len()].copy_from_slice(&f);
                FrameMeta {
                    len: f.len(),
                    ..Default::default()
                }
            }))
        }
        fn needs_checksum(&self) -> bool {
            false
        }
        fn source_mac(&self) -> Option<Mac> {
            self.mac
        }
        fn max_learned(&self) -> usize {
            if self.mac.is_some() {
                VIF_MAX_LEARNED
            } else {
                UPLINK_MAX_LEARNED
            }
        }
        fn transmit(&mut self, frame: &[u8], _: FrameMeta) -> bool {
            self.outbox.lock().unwrap().push(frame.to_vec());
            true
        }
        fn flush(&mut self) {}
        fn arm(&mut self) -> Result<bool, PortError> {
            Ok(!self.inbox.frames.lock().unwrap().is_empty())
        }
        fn wait_fd(&self) -> RawFd {
            self.inbox.wake.as_raw_fd()
        }
        fn clear_wakeup(&mut self) {
            let _ = self.inbox.wake.read();
        }
    }

    type Boxes = (Arc<Inbox>, Arc<Mutex<Vec<Vec<u8>>>>);

    fn test_port(name: &str) -> (Box<dyn Port>, Boxes) {
        test_port_with(name, None)
    }

    fn test_port_with(name: &str, mac: Option<Mac>) -> (Box<dyn Port>, Boxes) {
        let inbox = Arc::new(Inbox {
            frames: Mutex::default(),
            wake: EventFd::new(EFD_NONBLOCK).unwrap(),
        });
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let p = TestPort {
            name: name.into(),
            counters: Arc::default(),
            inbox: Arc::clone(&inbox),
            outbox: Arc::clone(&outbox),
            mac,
        };
        (Box::new(p), (inbox, outbox))
    }

    fn wait_for(what: impl Fn() -> bool) {
        let t = Instant::now();
        while !what() {
            assert!(t.elapsed() < Duration::from_secs(5), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_thread_floods_then_forwards_and_unplugs() {
        let sw = Switch::new("t").unwrap();
        let (pa, (a_in, a_out)) = test_port("a");
        let (pb, (_b_in, b_out)) = test_port("b");
        let (pc, (_c_in, c_out)) = test_port("c");
        let ida = sw.add_port(pa).unwrap();
        let _idb = sw.add_port(pb).unwrap();
        let idc = sw.add_port(pc).unwrap();
        // A speaks to unknown B: flooded to b and c (the thread sleeps until a's eventfd says
        // there is a frame).
        a_in.push(frame(B, A));
        wait_for(|| b_out.lock().unwrap().len() == 1 && c_out.lock().unwrap().len() == 1);
        assert!(a_out.lock().unwrap().is_empty());
        sw.remove_port(idc).unwrap();
        let names: Vec<String> = sw.ports().unwrap().into_iter().map(|p| p.1).collect();
        assert_eq!(names, ["a", "b"]);
        let stats: Vec<PortStats> = sw.ports().unwrap().into_iter().map(|p| p.2).collect();
        assert_eq!((stats[0].rx_packets, stats[0].rx_bytes), (1, 60));
        assert_eq!((stats[1].tx_packets, stats[1].tx_bytes), (1, 60));
        sw.remove_port(ida).unwrap();
        sw.remove_port(ida).unwrap(); // already gone: fine
    }

    /// An idle switch sleeps until a port's eventfd or a command wakes it: no timer.
    #[test]
    fn an_idle_switch_thread_never_wakes_until_a_port_has_work() {
        let sw = Switch::new("quiet").unwrap();
        let (pa, (a_in, _a_out)) = test_port("a");
        let (pb, (_b_in, b_out)) = test_port("b");
        sw.add_port(pa).unwrap();
        sw.add_port(pb).unwrap();
        let tid = crate::test_util::thread_named("switch-quiet").unwrap();
        // Past its spin after the last command.
        std::thread::sleep(Duration::from_millis(20));
        let before = crate::test_util::context_switches(tid);
        std::thread::sleep(Duration::from_millis(500));
        let woke = crate::test_util::context_switches(tid) - before;
        assert!(woke <= 1, "an idle switch woke {woke} times in 500 ms");
        a_in.push(frame(B, A));
        wait_for(|| b_out.lock().unwrap().len() == 1);
    }

    fn wait_long_for(what: impl Fn() -> bool) {
        // The flood below is 100k frames through a debug build on a shared machine.
        let t = Instant::now();
        while !what() {
            assert!(t.elapsed() < Duration::from_secs(300), "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_uplink_flooding_random_sources_leaves_every_guests_entry_in_place() {
        let sw = Switch::new("flood").unwrap();
        let (pa, (a_in, a_out)) = test_port_with("vif1.0", Some(Mac(A)));
        let (pb, (b_in, b_out)) = test_port_with("vif2.0", Some(Mac(B)));
        let (pt, (t_in, t_out)) = test_port_with("tap0", None);
        sw.add_port(pa).unwrap();
        sw.add_port(pb).unwrap();
        sw.add_port(pt).unwrap();
        a_in.push(frame(BCAST, A));
        b_in.push(frame(BCAST, B));
        wait_for(|| t_out.lock().unwrap().len() == 2);
        t_in.extend(random_macs(FLOOD).map(|m| frame(NOWHERE, m)));
        // Unknown destination: flooded to both guests.
        wait_long_for(|| {
            a_out.lock().unwrap().len() == FLOOD + 1 && b_out.lock().unwrap().len() == FLOOD + 1
        });
        // A guest plugged in after the flood, and an outside host claiming a's address.
        let (pc, (c_in, c_out)) = test_port_with("vif3.0", Some(Mac(C)));
        sw.add_port(pc).unwrap();
        c_in.push(frame(BCAST, C));
        wait_for(|| t_out.lock().unwrap().len() == 3);
        t_in.push(frame(BCAST, A));
        wait_for(|| c_out.lock().unwrap().len() == 1);
        for o in [&a_out, &b_out, &c_out, &t_out] {
            o.lock().unwrap().clear();
        }
        // From outside to each guest, then to everyone (so all before it has been switched).
        let x = [2, 0xee, 0, 0, 0, 2];
        t_in.extend([frame(A, x), frame(B, x), frame(C, x), frame(BCAST, x)]);
        wait_for(|| c_out.lock().unwrap().len() >= 2);
        assert_eq!(*a_out.lock().unwrap(), [frame(A, x), frame(BCAST, x)]);
        assert_eq!(*b_out.lock().unwrap(), [frame(B, x), frame(BCAST, x)]);
        assert_eq!(*c_out.lock().unwrap(), [frame(C, x), frame(BCAST, x)]);
        // Guest to guest stays inside, whatever the outside claimed.
        b_in.extend([frame(A, B), frame(BCAST, B)]);
        wait_for(|| t_out.lock().unwrap().len() == 1);
        assert_eq!(*t_out.lock().unwrap(), [frame(BCAST, B)]);
        assert_eq!(a_out.lock().unwrap()[2..], [frame(A, B), frame(BCAST, B)]);
        // The uplink's entries stayed within its bound; the guests learned nothing but their
        // own (fixed) addresses.
        let learned: Vec<usize> = sw.learned().unwrap().into_iter().map(|l| l.1).collect();
        assert_eq!(learned, [0, 0, UPLINK_MAX_LEARNED, 0]);
    }

    #[test]
    fn a_port_cannot_send_from_another_ports_address() {
        let sw = Switch::new("spoof").unwrap();
        let (pa, (a_in, a_out)) = test_port_with("a", Some(Mac(A)));
        let (pm, (m_in, m_out)) = test_port_with("m", Some(Mac([2, 0, 0, 0, 0, 0x66])));
        sw.add_port(pa).unwrap();
        sw.add_port(pm).unwrap();
        // a announces itself; m then claims a's address: dropped, counted, nothing learned.
        a_in.push(frame([0xff; 6], A));
        wait_for(|| m_out.lock().unwrap().len() == 1);
        m_in.push(frame([0xff; 6], A));
        wait_for(|| sw.ports().unwrap()[1].2.errors == 1);
        assert!(
            a_out.lock().unwrap().is_empty(),
            "the spoofed frame went nowhere"
        );
        // Traffic for a still reaches a.
        m_in.push(frame(A, [2, 0, 0, 0, 0, 0x66]));
        wait_for(|| a_out.lock().unwrap().len() == 1);
        let stats = sw.ports().unwrap();
        assert_eq!((stats[1].2.rx_packets, stats[1].2.errors), (1, 1));
    }
}
