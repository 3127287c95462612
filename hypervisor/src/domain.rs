//! Domains: a KVM VM, its memory, its vCPU threads and its lifecycle.
//!
//! Each vCPU runs on its own thread ([`crate::vcpu`]). The state lives in [`DomainShared`],
//! behind one mutex and condition variable: vCPU threads park there when paused, block there in
//! `sched_op(block)`, and the owner waits there for shutdown. A vCPU thread in `KVM_RUN` is
//! pulled out with a signal (`vcpu::kick_all`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pv_protocol::hypercall::{Errno, ShutdownReason};

use crate::console::Console;
use crate::memory::GuestRam;

/// Why a domain stopped, or that it still runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked; their state is kept.
    Paused,
    /// The guest asked to shut down.
    Shutdown {
        /// Why.
        reason: ShutdownReason,
        /// The guest's exit code.
        code: u32,
    },
    /// The guest crashed (triple fault, internal KVM error, failed entry).
    Crashed {
        /// What happened, with the vCPU's registers.
        detail: String,
    },
    /// Destroyed by its owner while still running.
    Destroyed,
}

impl DomainState {
    /// Whether the vCPUs have stopped for good.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Shutdown { .. } | Self::Crashed { .. } | Self::Destroyed
        )
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) state: DomainState,
    /// Set when vCPUs must leave `KVM_RUN` and park (pause) or exit (final state).
    pub(crate) pause_requested: bool,
    pub(crate) parked: u32,
    /// Bumped whenever an event may have become pending; `sched_op(block)` waits for a change.
    pub(crate) event_seq: u64,
    /// The PV-device thread has made its last pass (console output is all in).
    pub(crate) pvdev_done: bool,
    /// One per vCPU, by index.
    pub(crate) vcpu: Vec<VcpuSlot>,
}

/// What the domain knows of one vCPU's thread.
#[derive(Debug, Default, Clone)]
pub(crate) struct VcpuSlot {
    /// The thread while it is inside the run loop (for kicks).
    pub(crate) thread: Option<libc::pthread_t>,
    /// Its kernel thread id, for CPU time, placement and pinning.
    pub(crate) tid: Option<libc::pid_t>,
    /// Asleep in `sched_op` block or poll (or a halt).
    pub(crate) blocked: bool,
    /// CPU time of the thread once it left the run loop.
    pub(crate) ns_done: u64,
    /// Host CPUs it may run on (`None`: all), applied when the thread starts and on change.
    pub(crate) affinity: Option<Vec<u32>>,
    /// Its armed one-shot timer, if any ([`crate::timer`]).
    pub(crate) timer: Option<crate::timer::TimerKey>,
}

impl Inner {
    /// Threads of the vCPUs inside the run loop.
    pub(crate) fn vcpu_threads(&self) -> Vec<libc::pthread_t> {
        self.vcpu.iter().filter_map(|v| v.thread).collect()
    }
}

/// A vCPU as `xl vcpu-list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuInfo {
    /// Index in the domain.
    pub index: u32,
    /// Host CPU it last ran on (`None` once its thread is gone).
    pub cpu: Option<u32>,
    /// Running (or runnable), blocked, paused, or gone with the domain.
    pub state: VcpuState,
    /// CPU time used.
    pub time: Duration,
    /// Host CPUs it may run on; `None`: all.
    pub affinity: Option<Vec<u32>>,
}

/// A vCPU's scheduling state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// In the guest, or ready to be.
    Running,
    /// Asleep in the hypervisor waiting for an event.
    Blocked,
    /// Parked by a pause.
    Paused,
    /// Its thread has exited (final domain state).
    Offline,
}

/// Errors from vCPU placement.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// No such vCPU.
    #[error("domain {0} has no vCPU {1}")]
    NoVcpu(u32, u32),
    /// A CPU that is not online on the host, or an empty set.
    #[error("host CPU set {0:?} is empty or names a CPU outside 0..{1}")]
    BadCpus(Vec<u32>, u32),
    /// The kernel refused the affinity.
    #[error("cannot pin vCPU {0}")]
    Pin(u32, #[source] std::io::Error),
}

/// Called when a domain reaches a final state ([`DomainShared::watch_stop`]).
pub type OnStop = Box<dyn Fn() + Send + Sync>;

/// Whoever wants to hear of the domain's stop.
#[derive(Default)]
pub(crate) struct StopWatchers {
    next: u64,
    list: Vec<(u64, OnStop)>,
}

impl std::fmt::Debug for StopWatchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopWatchers")
            .field("watchers", &self.list.len())
            .finish()
    }
}

/// A callback registered with [`DomainShared::watch_stop`]; dropping it removes it (once the drop
/// returns, it is not running and is never called again).
#[derive(Debug)]
pub struct StopWatch {
    dom: std::sync::Weak<DomainShared>,
    id: u64,
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        if let Some(d) = self.dom.upgrade() {
            d.stop_watchers().list.retain(|(id, _)| *id != self.id);
        }
    }
}

/// What every vCPU thread of a domain shares.
#[derive(Debug)]
pub struct DomainShared {
    /// The VM; declared first so it is closed before the memory it maps is released.
    pub(crate) vm: kvm_ioctls::VmFd,
    /// Domain id: no other domain has it while this value exists (see [`crate::domid`]).
    pub id: u32,
    /// Name.
    pub name: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest memory. Shared with the grants pinned for I/O ([`crate::grant::PinnedGrant`]),
    /// which keep the memory (and of the rest of the domain only its id's lease) alive while the
    /// kernel may still read or write their pages.
    pub ram: Arc<GuestRam>,
    /// Console output.
    pub console: Console,
    pub(crate) inner: Mutex<Inner>,
    pub(crate) changed: Condvar,
    /// Told when the domain reaches a final state (never under `inner`).
    stop_watchers: Mutex<StopWatchers>,
    faults: Mutex<HashMap<&'static str, u64>>,
    /// Event-channel ports.
    pub(crate) ports: Mutex<crate::evtchn::PortTable>,
    /// Every live domain, for operations that reach another one.
    pub(crate) registry: Arc<crate::evtchn::Registry>,
    /// Grant-table frames.
    pub grant_frames: u32,
    /// Live host mappings of this domain's grants.
    pub(crate) maptrack: Mutex<crate::grant::MapTrack>,
    /// Which frames of its memory hold memory, and how many may ([`crate::reservation`]).
    pub reservation: crate::reservation::Reservation,
    /// The config store (shared by all domains).
    pub store: Arc<crate::store::Store>,
    /// Tells the PV-device thread to finish.
    pub(crate) pvdev_stop: Arc<vmm_sys_util::eventfd::EventFd>,
    /// The one-shot timer service (shared by all domains).
    pub(crate) timers: crate::timer::Timers,
    /// The hold on `id`, shared with every [`crate::grant::PinnedGrant`] of the domain's pages
    /// (which hold its memory): declared last, so the id is given back only after the VM fd,
    /// every table above and the memory are released, whoever releases them last.
    pub(crate) lease: Arc<crate::domid::DomidLease>,
}

impl DomainShared {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vm: kvm_ioctls::VmFd,
        registry: Arc<crate::evtchn::Registry>,
        store: Arc<crate::store::Store>,
        pvdev_stop: Arc<vmm_sys_util::eventfd::EventFd>,
        timers: crate::timer::Timers,
        lease: crate::domid::DomidLease,
        cfg: &crate::DomainConfig,
        ram: GuestRam,
        console: Console,
    ) -> Self {
        Self {
            id: lease.id(),
            lease: Arc::new(lease),
            vm,
            registry,
            ports: Mutex::new(crate::evtchn::PortTable::new(cfg.max_ports, cfg.vcpus)),
            grant_frames: cfg.grant_frames,
            maptrack: Mutex::default(),
            reservation: crate::reservation::Reservation::new(
                cfg.mem_mib << 8,
                ram.size() / pv_protocol::PAGE_SIZE as u64,
            ),
            store,
            pvdev_stop,
            timers,
            name: cfg.name.clone(),
            vcpus: cfg.vcpus,
            ram: Arc::new(ram),
            console,
            inner: Mutex::new(Inner {
                state: DomainState::Running,
                pause_requested: false,
                parked: 0,
                event_seq: 0,
                pvdev_done: false,
                vcpu: vec![
                    VcpuSlot {
                        affinity: cfg.cpus.clone(),
                        ..VcpuSlot::default()
                    };
                    cfg.vcpus as usize
                ],
            }),
            changed: Condvar::new(),
            stop_watchers: Mutex::default(),
            faults: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop_watchers(&self) -> MutexGuard<'_, StopWatchers> {
        self.stop_watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `f` once the domain reaches a final state (shut down, crashed or destroyed), or at
    /// once if it has already: a thread that must act on the domain's end sleeps on what `f`
    /// signals instead of looking at the state on a timer. `f` runs on the thread that stopped
    /// the domain (a vCPU's, or the destroyer's), with the watcher list locked and no other lock
    /// of the domain held: it must not block, nor register or drop a watch of this domain; it
    /// should only signal (write an eventfd, send on a channel). It may be called more than once.
    pub fn watch_stop(self: &Arc<Self>, f: OnStop) -> StopWatch {
        let id = {
            let mut w = self.stop_watchers();
            w.next += 1;
            let id = w.next;
            w.list.push((id, f));
            id
        };
        // After the push: a stop that this read misses comes after it (the state lock orders the
        // two), so that stop's call of the watchers finds `f` in the list.
        if self.state().is_final() {
            let w = self.stop_watchers();
            if let Some((_, f)) = w.list.iter().find(|(i, _)| *i == id) {
                f();
            }
        }
        StopWatch {
            dom: Arc::downgrade(self),
            id,
        }
    }

    /// CPU time the domain's vCPUs have used (in the guest and in exits), as `xl list` shows.
    pub fn cpu_time(&self) -> std::time::Duration {
        self.vcpus().iter().map(|v| v.time).sum()
    }

    /// Every vCPU: where it runs, its state, CPU time and affinity.
    pub fn vcpus(&self) -> Vec<VcpuInfo> {
        let (slots, paused) = {
            let i = self.lock();
            (i.vcpu.clone(), i.pause_requested && !i.state.is_final())
        };
        slots
            .into_iter()
            .enumerate()
            .map(|(index, v)| {
                let stat = v.tid.and_then(thread_stat);
                let state = match (v.tid, paused, v.blocked) {
                    (None, _, _) => VcpuState::Offline,
                    (_, true, _) => VcpuState::Paused,
                    (_, _, true) => VcpuState::Blocked,
                    _ => VcpuState::Running,
                };
                VcpuInfo {
                    index: index as u32,
                    cpu: stat.map(|s| s.1),
                    state,
                    time: Duration::from_nanos(v.ns_done + stat.map_or(0, |s| s.0)),
                    affinity: v.affinity,
                }
            })
            .collect()
    }

    /// Pins vCPU `index` to host CPUs `cpus` (`None`: all of them), now and whenever its thread
    /// (re)starts.
    pub fn pin_vcpu(&self, index: u32, cpus: Option<&[u32]>) -> Result<(), VcpuError> {
        if let Some(c) = cpus {
            check_cpus(c)?;
        }
        let mut g = self.lock();
        let slot = g
            .vcpu
            .get_mut(index as usize)
            .ok_or(VcpuError::NoVcpu(self.id, index))?;
        slot.affinity = cpus.map(<[u32]>::to_vec);
        if let Some(tid) = slot.tid {
            set_affinity(tid, cpus).map_err(|e| VcpuError::Pin(index, e))?;
        }
        drop(g);
        // Linux moves a sleeping thread only when it next wakes, so a vCPU blocked in the
        // hypervisor would keep showing (and, once woken, briefly run on) a CPU outside its new
        // set. One spurious wake-up migrates it now, as Xen's vcpu_set_affinity does; the vCPU
        // finds nothing new and sleeps again.
        self.changed.notify_all();
        Ok(())
    }

    /// Current state.
    pub fn state(&self) -> DomainState {
        self.lock().state.clone()
    }

    /// Whether the domain runs but every vCPU is asleep in the hypervisor waiting for an event
    /// (`sched_op` block or poll): xl's `b` state. A vCPU that idles by spinning or halting
    /// inside `KVM_RUN` counts as running.
    pub fn is_blocked(&self) -> bool {
        let g = self.lock();
        g.state == DomainState::Running && g.vcpu.iter().all(|v| v.blocked)
    }

    /// Records guest misbehaviour of kind `kind`: logged at warn (with the domain id) the first
    /// time, counted always. Returns the count so far.
    pub fn guest_fault(&self, kind: &'static str, detail: std::fmt::Arguments<'_>) -> u64 {
        let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(kind).or_insert(0);
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                domid = self.id,
                kind,
                "guest fault: {detail} (further ones counted)"
            );
        } else {
            tracing::debug!(domid = self.id, kind, "guest fault: {detail}");
        }
        *n
    }

    /// How many faults of `kind` the guest caused.
    pub fn fault_count(&self, kind: &str) -> u64 {
        let f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        f.get(kind).copied().unwrap_or(0)
    }

    /// Moves to a final state (the first one wins: returns whether this was it) and stops every
    /// vCPU.
    pub(crate) fn stop(&self, state: DomainState) -> bool {
        let mut g = self.lock();
        if g.state.is_final() {
            return false;
        }
        tracing::info!(domid = self.id, name = %self.name, ?state, "domain stopped");
        g.state = state;
        g.pause_requested = true;
        self.changed.notify_all();
        crate::vcpu::kick_all(&g.vcpu_threads());
        let _ = self.pvdev_stop.write(1);
        if g.pvdev_done {
            // The PV-device thread is gone already: no more output comes from the ring.
            self.console.finish();
        }
        drop(g);
        // After the state is final and without the state lock (watchers may read the state).
        for (_, f) in &self.stop_watchers().list {
            f();
        }
        true
    }

    /// Called by the PV-device thread when it exits.
    pub(crate) fn pvdev_finished(&self) {
        let mut g = self.lock();
        g.pvdev_done = true;
        if g.state.is_final() {
            // The last pass after the stop collected the output written before it.
            self.console.finish();
        }
        self.changed.notify_all();
    }

    /// Marks an event as possibly pending and wakes blocked vCPUs.
    pub fn notify_event(&self) {
        let mut g = self.lock();
        g.event_seq = g.event_seq.wrapping_add(1);
        self.changed.notify_all();
    }

    /// `sched_op(block)` by vCPU `vcpu`: sleeps until an unmasked event is pending or the vCPU
    /// must stop.
    pub(crate) fn block(&self, vcpu: u32) {
        self.wait_until(vcpu, None, || crate::evtchn::has_unmasked_pending(self));
    }

    /// Sleeps until `ready()` holds, `deadline` passes, or the vCPU must stop (pause or a final
    /// state). `ready` is re-evaluated after every event notification. Without a deadline the
    /// wait has no timeout at all: a vCPU asleep costs the host nothing until an event comes.
    pub(crate) fn wait_until(
        &self,
        vcpu: u32,
        deadline: Option<Instant>,
        ready: impl Fn() -> bool,
    ) {
        let mut g = self.lock();
        let blocked = |g: &mut Inner, b: bool| {
            if let Some(v) = g.vcpu.get_mut(vcpu as usize) {
                v.blocked = b;
            }
        };
        blocked(&mut g, true);
        loop {
            if g.pause_requested || ready() {
                break;
            }
            let seq = g.event_seq;
            let still = |i: &mut Inner| i.event_seq == seq && !i.pause_requested;
            g = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    self.changed
                        .wait_timeout_while(g, left, still)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self
                    .changed
                    .wait_while(g, still)
                    .unwrap_or_else(|p| p.into_inner()),
            };
        }
        blocked(&mut g, false);
    }

    /// `VCPU_OP(SET_SINGLESHOT_TIMER)` by vCPU `vcpu` for `ns` nanoseconds from now (0: at
    /// once): replaces its armed timer; `VIRQ_TIMER` becomes pending at the deadline. Refused
    /// (`ENOENT`) while the vCPU has no `VIRQ_TIMER` port, `EINVAL` for a deadline the clock
    /// cannot hold, `ENOMEM` if the timer thread cannot start.
    pub(crate) fn set_timer(self: &Arc<Self>, vcpu: u32, ns: u64) -> Result<(), Errno> {
        if crate::evtchn::virq_timer_port(self, vcpu).is_none() {
            return Err(Errno::ENOENT);
        }
        if ns == 0 {
            self.stop_timer(vcpu);
            crate::evtchn::raise_virq_timer(self, vcpu);
            return Ok(());
        }
        let deadline = crate::timer::deadline_in(ns).ok_or(Errno::EINVAL)?;
        let key = self.timers.key(deadline);
        let old = {
            let mut g = self.lock();
            let slot = g.vcpu.get_mut(vcpu as usize).ok_or(Errno::EINVAL)?;
            slot.timer.replace(key)
        };
        if !self.timers.arm(self, vcpu, key, old) {
            self.stop_timer(vcpu);
            return Err(Errno::ENOMEM);
        }
        Ok(())
    }

    /// `VCPU_OP(STOP_SINGLESHOT_TIMER)`: disarms vCPU `vcpu`'s timer, if armed.
    pub(crate) fn stop_timer(&self, vcpu: u32) {
        let old = self
            .lock()
            .vcpu
            .get_mut(vcpu as usize)
            .and_then(|s| s.timer.take());
        if let Some(k) = old {
            self.timers.cancel(k);
        }
    }

    /// The timer thread's call at the deadline of `key`: raises `VIRQ_TIMER` on `vcpu` if that
    /// timer is still the vCPU's (not re-armed or stopped meanwhile).
    pub(crate) fn timer_expired(&self, vcpu: u32, key: crate::timer::TimerKey) {
        let current = {
            let mut g = self.lock();
            match g.vcpu.get_mut(vcpu as usize) {
                Some(s) if s.timer == Some(key) => {
                    s.timer = None;
                    true
                }
                _ => false,
            }
        };
        if current && !self.state().is_final() {
            crate::evtchn::raise_virq_timer(self, vcpu);
        }
    }

    /// Called by a vCPU thread between runs: parks while paused. Returns `false` when the vCPU
    /// must exit (final state).
    pub(crate) fn may_run(&self) -> bool {
        let mut g = self.lock();
        loop {
            if g.state.is_final() {
                return false;
            }
            if !g.pause_requested {
                return true;
            }
            g.parked += 1;
            self.changed.notify_all();
            g = self
                .changed
                .wait_while(g, |i| i.pause_requested && !i.state.is_final())
                .unwrap_or_else(|p| p.into_inner());
            g.parked -= 1;
        }
    }
}

/// Errors from lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The domain has already stopped.
    #[error("domain {0} is not running")]
    NotRunning(u32),
    /// vCPUs did not park in time.
    #[error("domain {0}: vCPUs did not stop within {1:?}")]
    Timeout(u32, Duration),
}

/// A running (or stopped) domain, owned by whoever created it. Dropping it destroys it.
#[derive(Debug)]
pub struct Domain {
    pub(crate) shared: Arc<DomainShared>,
    pub(crate) threads: Vec<JoinHandle<()>>,
    /// The store/console service thread.
    pub(crate) pvdev: Option<JoinHandle<()>>,
    /// `teardown` has run (by `destroy`, or for a domain whose creation failed half-way).
    pub(crate) torn_down: bool,
}

impl Domain {
    /// Domain id.
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Current state.
    pub fn state(&self) -> DomainState {
        self.shared.state()
    }

    /// Console output so far.
    pub fn console(&self) -> &Console {
        &self.shared.console
    }

    /// The shared part (for back-ends and tests).
    pub fn shared(&self) -> &Arc<DomainShared> {
        &self.shared
    }

    /// Stops every vCPU (keeping its state) and waits until all are parked.
    pub fn pause(&self) -> Result<(), LifecycleError> {
        let timeout = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.lock();
        if g.state != DomainState::Running {
            return Err(LifecycleError::NotRunning(self.id()));
        }
        g.pause_requested = true;
        self.shared.changed.notify_all();
        // Kicks can race with a vCPU just entering KVM_RUN; repeat them until all have parked.
        while g.parked < self.shared.vcpus && !g.state.is_final() {
            crate::vcpu::kick_all(&g.vcpu_threads());
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                g.pause_requested = false;
                self.shared.changed.notify_all();
                return Err(LifecycleError::Timeout(self.id(), timeout));
            }
            g = self
                .shared
                .changed
                .wait_timeout(g, left.min(Duration::from_millis(10)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if g.state.is_final() {
            return Err(LifecycleError::NotRunning(self.id()));
        }
        g.state = DomainState::Paused;
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn unpause(&self) -> Result<(), LifecycleError> {
        let mut g = self.shared.lock();
        if g.state != DomainState::Paused {
            return Err(LifecycleError::NotRunning(self.id()));
        }
        g.state = DomainState::Running;
        g.pause_requested = false;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits up to `timeout` for a final state (and for the console output written before it
    /// to be collected); returns the state either way.
    pub fn wait(&self, timeout: Duration) -> DomainState {
        let g = self.shared.lock();
        let (g, _) = self
            .shared
            .changed
            .wait_timeout_while(g, timeout, |i| !(i.state.is_final() && i.pvdev_done))
            .unwrap_or_else(|p| p.into_inner());
        g.state.clone()
    }

    /// Stops the domain if it still runs, joins its vCPU threads and releases its memory; returns
    /// the final state.
    pub fn destroy(mut self) -> DomainState {
        self.teardown()
    }

    fn teardown(&mut self) -> DomainState {
        self.torn_down = true;
        self.shared.stop(DomainState::Destroyed);
        // A kick can land just before a vCPU enters KVM_RUN; keep kicking until every thread is
        // gone.
        while self.threads.iter().any(|t| !t.is_finished()) {
            crate::vcpu::kick_all(&self.shared.lock().vcpu_threads());
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!(domid = self.shared.id, "a vCPU thread panicked");
            }
        }
        let _ = self.shared.pvdev_stop.write(1);
        if self.pvdev.take().is_some_and(|t| t.join().is_err()) {
            tracing::error!(domid = self.shared.id, "the PV-device thread panicked");
        }
        self.shared.store.release(self.shared.id);
        for v in 0..self.shared.vcpus {
            self.shared.stop_timer(v);
        }
        crate::evtchn::close_all(&self.shared);
        self.shared.registry.remove(&self.shared);
        // After the removal: from here no port can be bound to this domain, so none is left
        // offered or connected to an id a later domain may get.
        crate::evtchn::forget_domain(&self.shared.registry, self.shared.id);
        self.shared.state()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if !self.torn_down {
            self.teardown();
        }
    }
}

/// Refuses an empty CPU set or one naming a CPU that is not online.
pub(crate) fn check_cpus(cpus: &[u32]) -> Result<(), VcpuError> {
    let online = online_cpus();
    if cpus.is_empty() || cpus.iter().any(|&n| n >= online) {
        return Err(VcpuError::BadCpus(cpus.to_vec(), online));
    }
    Ok(())
}

/// Online host CPUs.
pub(crate) fn online_cpus() -> u32 {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// A thread's CPU time (ns) and the CPU it last ran on, from `/proc/self/task/<tid>/stat`.
fn thread_stat(tid: libc::pid_t) -> Option<(u64, u32)> {
    let ns = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3; "processor" is
    // field 39.
    let after = stat.rsplit_once(')')?.1;
    let cpu = after.split_whitespace().nth(39 - 3)?.parse().ok()?;
    Some((ns, cpu))
}

/// Restricts thread `tid` to `cpus` (`None`: every online CPU).
pub(crate) fn set_affinity(tid: libc::pid_t, cpus: Option<&[u32]>) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let all: Vec<u32> = (0..online_cpus()).collect();
    let capacity = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &c in cpus
        .unwrap_or(&all)
        .iter()
        .filter(|&&c| (c as usize) < capacity)
    {
        // SAFETY: `c` is below the set's capacity (checked by the filter).
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; `tid` is a thread of this process.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
