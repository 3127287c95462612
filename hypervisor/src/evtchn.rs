//! Event channels: per-domain port tables, delivery into the guest's shared-info bitmaps, and
//! host endpoints (eventfds) for dom0 back-ends.
//!
//! A port is free, unbound (offered to one remote domain), interdomain (connected to a remote
//! domain's port, possibly in the same domain), or bound to a host endpoint. Delivery follows
//! Xen's 2-level ABI: set the port's pending bit; if it was clear and the port is not masked, set
//! the selector bit and `upcall_pending` of vCPU 0 and wake blocked vCPUs.
//!
//! Guest -> host notifications on host-bound ports cost no VMM exit: the guest rings the port's
//! doorbell ([`doorbell_of`]) and `KVM_IOEVENTFD` (one-byte data match) signals the endpoint's
//! eventfd in the kernel. Writes the kernel does not match fall through to the VMM, which treats
//! them as a send.
//!
//! Locking: each domain's port table has its own mutex; an operation touching two domains takes
//! them in domain-id order.

use std::collections::HashMap;
use std::mem::offset_of;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use pv_protocol::evtchn::{MAX_PORTS_2L, PortState, VIRQ_TIMER, doorbell_of};
use pv_protocol::hypercall::Errno;
use pv_protocol::start_info::{SHARED_INFO_GPA, SharedInfo, VcpuInfo};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::domain::DomainShared;

/// Ports per domain unless configured otherwise.
pub const DEFAULT_MAX_PORTS: u32 = 1024;

/// The domain id of the host (dom0) side.
pub const DOM0: u32 = 0;

/// The remote of a port whose peer domain is gone: Xen's `DOMID_INVALID`, which no domain has,
/// so nobody can bind it.
pub const NOBODY: u32 = pv_protocol::grant::DomId::INVALID.0 as u32;

#[derive(Debug, Clone)]
pub(crate) enum Binding {
    Free,
    Unbound {
        remote: u32,
    },
    Interdomain {
        remote_dom: u32,
        remote_port: u32,
    },
    Host {
        eventfd: Arc<EventFd>,
    },
    /// A virtual IRQ of one vCPU (only `VIRQ_TIMER`).
    Virq {
        virq: u32,
        vcpu: u32,
    },
}

/// A domain's port table.
#[derive(Debug)]
pub(crate) struct PortTable {
    ports: Vec<Binding>,
    max: u32,
    /// Each vCPU's `VIRQ_TIMER` port (0: none).
    virq_timer: Vec<u32>,
}

impl PortTable {
    pub(crate) fn new(max: u32, vcpus: u32) -> Self {
        Self {
            ports: vec![Binding::Free],
            max: max.min(MAX_PORTS_2L),
            virq_timer: vec![0; vcpus as usize],
        }
    }

    fn get(&self, port: u32) -> Option<&Binding> {
        self.ports.get(port as usize)
    }

    fn set(&mut self, port: u32, b: Binding) {
        if let Some(slot) = self.ports.get_mut(port as usize) {
            *slot = b;
        }
    }

    /// A free port (never port 0, as in Xen).
    fn alloc(&mut self) -> Result<u32, Errno> {
        if let Some(i) = (1..self.ports.len()).find(|&i| matches!(self.ports[i], Binding::Free)) {
            return Ok(i as u32);
        }
        if (self.ports.len() as u32) < self.max {
            self.ports.push(Binding::Free);
            return Ok(self.ports.len() as u32 - 1);
        }
        Err(Errno::ENOSPC)
    }
}

/// Every live domain, by id, for operations that reach another domain.
#[derive(Debug, Default)]
pub struct Registry {
    domains: Mutex<HashMap<u32, Weak<DomainShared>>>,
}

impl Registry {
    pub(crate) fn insert(&self, d: &Arc<DomainShared>) {
        self.lock().insert(d.id, Arc::downgrade(d));
    }

    /// Removes `d`, unless its id already belongs to another domain.
    pub(crate) fn remove(&self, d: &DomainShared) {
        let mut g = self.lock();
        if g.get(&d.id).is_some_and(|w| std::ptr::eq(w.as_ptr(), d)) {
            g.remove(&d.id);
        }
    }

    /// Every live domain.
    fn all(&self) -> Vec<Arc<DomainShared>> {
        self.lock().values().filter_map(Weak::upgrade).collect()
    }

    /// The live domain `id`.
    pub fn get(&self, id: u32) -> Option<Arc<DomainShared>> {
        self.lock().get(&id).and_then(Weak::upgrade)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Weak<DomainShared>>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn table(d: &DomainShared) -> MutexGuard<'_, PortTable> {
    d.ports.lock().unwrap_or_else(|p| p.into_inner())
}

const PENDING: usize = offset_of!(SharedInfo, evtchn_pending);
const MASK: usize = offset_of!(SharedInfo, evtchn_mask);
const SEL: usize = offset_of!(SharedInfo, vcpu_info) + offset_of!(VcpuInfo, pending_sel);
const UPCALL: usize = offset_of!(SharedInfo, vcpu_info) + offset_of!(VcpuInfo, upcall_pending);

fn word_bit(port: u32) -> (usize, u64) {
    ((port / 64) as usize * 8, 1u64 << (port % 64))
}

/// Marks `port` pending in `d` and, if it is unmasked and was not pending, raises vCPU 0's
/// upcall flag and wakes blocked vCPUs.
pub fn deliver(d: &DomainShared, port: u32) {
    let Ok(si) = d.ram.region(SHARED_INFO_GPA, size_of::<SharedInfo>()) else {
        return;
    };
    let (w, bit) = word_bit(port);
    // SeqCst: the guest clears pending bits and sets mask bits with its own atomic operations;
    // our pending store must be ordered before the mask check below (Xen's test_and_set).
    let was = si
        .fetch_or_u64(PENDING + w, bit, Ordering::SeqCst)
        .unwrap_or(bit);
    if was & bit != 0 {
        return;
    }
    let masked = si.load_u64(MASK + w, Ordering::SeqCst).unwrap_or(bit) & bit != 0;
    if !masked {
        raise_upcall(d, &si, w);
    } else {
        // A vCPU polling this port waits for it even while it is masked (as in Xen).
        d.notify_event();
    }
}

fn raise_upcall(d: &DomainShared, si: &pv_protocol::SharedRegion<'_>, word_offset: usize) {
    let _ = si.fetch_or_u64(SEL, 1 << (word_offset / 8), Ordering::SeqCst);
    let _ = si.store_u8(UPCALL, 1, Ordering::SeqCst);
    d.notify_event();
}

/// Whether any unmasked port of `d` is pending.
pub fn has_unmasked_pending(d: &DomainShared) -> bool {
    let Ok(si) = d.ram.region(SHARED_INFO_GPA, size_of::<SharedInfo>()) else {
        return false;
    };
    (0..64).any(|w| {
        let p = si.load_u64(PENDING + w * 8, Ordering::SeqCst).unwrap_or(0);
        let m = si.load_u64(MASK + w * 8, Ordering::SeqCst).unwrap_or(!0);
        p & !m != 0
    })
}

/// Whether `port` of `d` is pending (masked or not).
pub fn is_pending(d: &DomainShared, port: u32) -> bool {
    let Ok(si) = d.ram.region(SHARED_INFO_GPA, size_of::<SharedInfo>()) else {
        return false;
    };
    let (w, bit) = word_bit(port);
    si.load_u64(PENDING + w, Ordering::SeqCst).unwrap_or(0) & bit != 0
}

fn check_port(t: &PortTable, port: u32) -> Result<&Binding, Errno> {
    match t.get(port) {
        None | Some(Binding::Free) => Err(Errno::EINVAL),
        Some(b) => Ok(b),
    }
}

/// `EVTCHNOP_alloc_unbound`: a port in `d` that `remote` may bind.
pub fn alloc_unbound(d: &DomainShared, remote: u32) -> Result<u32, Errno> {
    let mut t = table(d);
    let port = t.alloc()?;
    t.set(port, Binding::Unbound { remote });
    Ok(port)
}

/// Locks the tables of `a` and `b` (the same domain or two) in id order.
fn lock_pair<'a>(
    a: &'a DomainShared,
    b: &'a DomainShared,
) -> (MutexGuard<'a, PortTable>, Option<MutexGuard<'a, PortTable>>) {
    if a.id == b.id {
        (table(a), None)
    } else if a.id < b.id {
        let ga = table(a);
        (ga, Some(table(b)))
    } else {
        let gb = table(b);
        (table(a), Some(gb))
    }
}

/// `EVTCHNOP_bind_interdomain`: connects a new port of `d` to `remote_port` of `remote_dom`, which
/// must be unbound and offered to `d`.
pub fn bind_interdomain(d: &DomainShared, remote_dom: u32, remote_port: u32) -> Result<u32, Errno> {
    let remote = if remote_dom == d.id {
        None
    } else {
        Some(d.registry.get(remote_dom).ok_or(Errno::EINVAL)?)
    };
    let r: &DomainShared = remote.as_deref().unwrap_or(d);
    let (mut mine, mut theirs) = lock_pair(d, r);
    let offered = {
        let rt = theirs.as_deref().unwrap_or(&mine);
        matches!(rt.get(remote_port), Some(Binding::Unbound { remote }) if *remote == d.id)
    };
    if !offered {
        return Err(Errno::EINVAL);
    }
    let local = mine.alloc()?;
    mine.set(
        local,
        Binding::Interdomain {
            remote_dom,
            remote_port,
        },
    );
    let rt = theirs.as_deref_mut().unwrap_or(&mut mine);
    rt.set(
        remote_port,
        Binding::Interdomain {
            remote_dom: d.id,
            remote_port: local,
        },
    );
    Ok(local)
}

/// `EVTCHNOP_send`.
pub fn send(d: &DomainShared, port: u32) -> Result<(), Errno> {
    let binding = check_port(&table(d), port)?.clone();
    match binding {
        Binding::Free => Err(Errno::EINVAL),
        // Xen: sending on an unbound port is allowed and does nothing.
        Binding::Unbound { .. } => Ok(()),
        // Only the hypervisor raises a VIRQ (Xen refuses such a send too).
        Binding::Virq { .. } => Err(Errno::EINVAL),
        Binding::Host { eventfd } => {
            let _ = eventfd.write(1);
            Ok(())
        }
        Binding::Interdomain {
            remote_dom,
            remote_port,
        } => {
            if remote_dom == d.id {
                deliver(d, remote_port);
            } else if let Some(r) = d.registry.get(remote_dom) {
                // Deliver only if the far end still points back at us (it may have closed).
                let still = matches!(table(&r).get(remote_port),
                    Some(Binding::Interdomain { remote_dom, remote_port: p })
                        if *remote_dom == d.id && *p == port);
                if still {
                    deliver(&r, remote_port);
                }
            }
            Ok(())
        }
    }
}

/// `EVTCHNOP_close`: frees `port`; an interdomain peer's port goes back to unbound (offered to
/// us again), as in Xen.
pub fn close(d: &DomainShared, port: u32) -> Result<(), Errno> {
    // The binding is read, then acted on under the lock(s) it needs; if it changed in between
    // (two vCPUs closing and rebinding at once), look again.
    for _ in 0..16 {
        let binding = check_port(&table(d), port)?.clone();
        if close_binding(d, port, &binding) {
            return Ok(());
        }
    }
    Err(Errno::EAGAIN)
}

/// Whether two bindings are the same one (the same host doorbell, not just an equal shape).
fn same(a: &Binding, b: &Binding) -> bool {
    match (a, b) {
        (Binding::Free, Binding::Free) => true,
        (Binding::Unbound { remote: x }, Binding::Unbound { remote: y }) => x == y,
        (
            Binding::Interdomain {
                remote_dom: a,
                remote_port: b,
            },
            Binding::Interdomain {
                remote_dom: c,
                remote_port: e,
            },
        ) => a == c && b == e,
        (Binding::Host { eventfd: x }, Binding::Host { eventfd: y }) => Arc::ptr_eq(x, y),
        (Binding::Virq { virq: a, vcpu: b }, Binding::Virq { virq: c, vcpu: e }) => {
            a == c && b == e
        }
        _ => false,
    }
}

/// Frees `port` if it is still bound as `binding`; `false` if it changed meanwhile.
fn close_binding(d: &DomainShared, port: u32, binding: &Binding) -> bool {
    match binding.clone() {
        Binding::Interdomain {
            remote_dom,
            remote_port,
        } => {
            let remote = if remote_dom == d.id {
                None
            } else {
                d.registry.get(remote_dom)
            };
            let r: &DomainShared = remote.as_deref().unwrap_or(d);
            let (mut mine, mut theirs) = lock_pair(d, r);
            if !mine.get(port).is_some_and(|b| same(b, binding)) {
                return false;
            }
            mine.set(port, Binding::Free);
            if remote_dom == d.id || remote.is_some() {
                let rt = theirs.as_deref_mut().unwrap_or(&mut mine);
                if matches!(rt.get(remote_port), Some(Binding::Interdomain { remote_dom: rd, remote_port: rp }) if *rd == d.id && *rp == port)
                {
                    rt.set(remote_port, Binding::Unbound { remote: d.id });
                }
            }
        }
        Binding::Host { eventfd } => {
            // The doorbell goes before the port is free (so a new binding of the port can
            // register its own); KVM matches the eventfd, so this never removes another's.
            unregister_doorbell(d, &eventfd, port);
            let mut t = table(d);
            if t.get(port).is_some_and(|b| same(b, binding)) {
                t.set(port, Binding::Free);
            }
        }
        Binding::Virq { vcpu, .. } => {
            let mut t = table(d);
            if !t.get(port).is_some_and(|b| same(b, binding)) {
                return false;
            }
            t.set(port, Binding::Free);
            if let Some(p) = t.virq_timer.get_mut(vcpu as usize) {
                *p = 0;
            }
        }
        _ => {
            let mut t = table(d);
            if !t.get(port).is_some_and(|b| same(b, binding)) {
                return false;
            }
            t.set(port, Binding::Free);
        }
    }
    true
}

/// Offers to, and connections with, domain `id` (gone, or about to be created afresh) in every
/// live domain become ports offered to [`NOBODY`]: the guest keeps its port number, which
/// reports unbound, and a later domain given the same id cannot bind it. Each table is locked on
/// its own (never the registry with a table).
pub(crate) fn forget_domain(registry: &Registry, id: u32) {
    for d in registry.all().iter().filter(|d| d.id != id) {
        let mut t = table(d);
        for b in &mut t.ports {
            let names_it = match b {
                Binding::Unbound { remote } => *remote == id,
                Binding::Interdomain { remote_dom, .. } => *remote_dom == id,
                Binding::Free | Binding::Host { .. } | Binding::Virq { .. } => false,
            };
            if names_it {
                *b = Binding::Unbound { remote: NOBODY };
            }
        }
    }
}

/// Closes every port of `d` (domain destroy): interdomain peers go back to unbound, host
/// doorbells are unregistered.
pub fn close_all(d: &DomainShared) {
    let n = table(d).ports.len() as u32;
    for port in 1..n {
        let _ = close(d, port);
    }
}

/// `EVTCHNOP_status` of a port of `d`.
pub fn status(d: &DomainShared, port: u32) -> Result<PortState, Errno> {
    let t = table(d);
    Ok(match t.get(port).ok_or(Errno::EINVAL)? {
        Binding::Free => PortState::Closed,
        Binding::Unbound { remote } => PortState::Unbound {
            dom: pv_protocol::grant::DomId(*remote as u16),
        },
        Binding::Interdomain {
            remote_dom,
            remote_port,
        } => PortState::Interdomain {
            dom: pv_protocol::grant::DomId(*remote_dom as u16),
            port: pv_protocol::evtchn::Port(*remote_port),
        },
        // The host end has no port number of its own; report the guest's.
        Binding::Host { .. } => PortState::Interdomain {
            dom: pv_protocol::grant::DomId(DOM0 as u16),
            port: pv_protocol::evtchn::Port(port),
        },
        Binding::Virq { virq, .. } => PortState::Virq(*virq),
    })
}

/// `EVTCHNOP_bind_virq`: a new port of `d` for virtual IRQ `virq` of `vcpu`. Only `VIRQ_TIMER`
/// is raised here (another is `EINVAL`); a vCPU that does not exist is `ENOENT` and a second
/// binding of the same VIRQ on a vCPU `EEXIST`, as in Xen.
pub fn bind_virq(d: &DomainShared, virq: u32, vcpu: u32) -> Result<u32, Errno> {
    if virq != VIRQ_TIMER {
        return Err(Errno::EINVAL);
    }
    let mut t = table(d);
    match t.virq_timer.get(vcpu as usize) {
        None => return Err(Errno::ENOENT),
        Some(0) => {}
        Some(_) => return Err(Errno::EEXIST),
    }
    let port = t.alloc()?;
    t.set(port, Binding::Virq { virq, vcpu });
    if let Some(p) = t.virq_timer.get_mut(vcpu as usize) {
        *p = port;
    }
    Ok(port)
}

/// `vcpu`'s `VIRQ_TIMER` port in `d`, if bound.
pub fn virq_timer_port(d: &DomainShared, vcpu: u32) -> Option<u32> {
    table(d)
        .virq_timer
        .get(vcpu as usize)
        .copied()
        .filter(|&p| p != 0)
}

/// Makes `vcpu`'s `VIRQ_TIMER` port pending (its timer expired), if it is still bound.
pub(crate) fn raise_virq_timer(d: &DomainShared, vcpu: u32) {
    if let Some(port) = virq_timer_port(d, vcpu) {
        deliver(d, port);
    }
}

/// `EVTCHNOP_unmask`: clears the mask bit and re-raises the upcall if the port is pending.
pub fn unmask(d: &DomainShared, port: u32) -> Result<(), Errno> {
    check_port(&table(d), port)?;
    let si = d
        .ram
        .region(SHARED_INFO_GPA, size_of::<SharedInfo>())
        .map_err(|_| Errno::EFAULT)?;
    let (w, bit) = word_bit(port);
    // SeqCst: as in `deliver`: unmask then check pending, so a concurrent delivery that saw the
    // mask set is re-raised here.
    let _ = si.fetch_and_u64(MASK + w, !bit, Ordering::SeqCst);
    if si.load_u64(PENDING + w, Ordering::SeqCst).unwrap_or(0) & bit != 0 {
        raise_upcall(d, &si, w);
    }
    Ok(())
}

/// `SCHEDOP_poll` by vCPU `vcpu`: waits until one of `ports` is pending or `timeout` passes
/// (`None`: forever), or the vCPU must stop.
pub fn poll(d: &DomainShared, vcpu: u32, ports: &[u32], timeout: Option<Duration>) {
    let deadline = timeout.map(|t| Instant::now() + t);
    d.wait_until(vcpu, deadline, || ports.iter().any(|&p| is_pending(d, p)));
}

fn unregister_doorbell(d: &DomainShared, evt: &EventFd, port: u32) {
    let (io, data) = doorbell_of(port);
    if let Err(e) =
        d.vm.unregister_ioevent(evt, &IoEventAddress::Pio(u64::from(io)), data)
    {
        tracing::warn!(domid = d.id, port, "cannot unregister doorbell: {e}");
    }
}

/// A host (dom0) endpoint of an event channel: the guest's sends arrive on `eventfd`, and
/// [`HostPort::notify`] sends to the guest. Dropping it closes the host side; the guest's port
/// goes back to unbound (offered to dom0 again).
#[derive(Debug)]
pub struct HostPort {
    dom: Weak<DomainShared>,
    domid: u32,
    port: u32,
    eventfd: Arc<EventFd>,
}

impl HostPort {
    /// Binds the host to `port` of `d`, which the guest must have offered to dom0
    /// (`alloc_unbound(remote = 0)`).
    pub fn bind(d: &Arc<DomainShared>, port: u32) -> Result<Self, Errno> {
        let mut t = table(d);
        if !matches!(t.get(port), Some(Binding::Unbound { remote: DOM0 })) {
            return Err(Errno::EINVAL);
        }
        let eventfd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|_| Errno::ENOMEM)?);
        let (io, data) = doorbell_of(port);
        if let Err(e) =
            d.vm.register_ioevent(&eventfd, &IoEventAddress::Pio(u64::from(io)), data)
        {
            // Without the in-kernel doorbell the VMM path still delivers: slower, not wrong.
            tracing::warn!(
                domid = d.id,
                port,
                "no ioeventfd doorbell, VMM path only: {e}"
            );
        }
        t.set(
            port,
            Binding::Host {
                eventfd: Arc::clone(&eventfd),
            },
        );
        Ok(Self {
            dom: Arc::downgrade(d),
            domid: d.id,
            port,
            eventfd,
        })
    }

    /// The guest's port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The guest's domain id.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// Signalled (counted) on every guest send; non-blocking.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Waits up to `timeout` for guest sends; returns how many arrived (0 on timeout).
    pub fn wait(&self, timeout: Duration) -> u64 {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&*self.eventfd),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return 0;
        }
        self.eventfd.read().unwrap_or(0)
    }

    /// Sends to the guest's port (if the domain and the binding still exist).
    pub fn notify(&self) {
        if let Some(d) = self.dom.upgrade() {
            let bound = matches!(table(&d).get(self.port), Some(Binding::Host { eventfd }) if Arc::ptr_eq(eventfd, &self.eventfd));
            if bound {
                deliver(&d, self.port);
            }
        }
    }
}

impl Drop for HostPort {
    fn drop(&mut self) {
        if let Some(d) = self.dom.upgrade() {
            let mut t = table(&d);
            if matches!(t.get(self.port), Some(Binding::Host { eventfd }) if Arc::ptr_eq(eventfd, &self.eventfd))
            {
                unregister_doorbell(&d, &self.eventfd, self.port);
                t.set(self.port, Binding::Unbound { remote: DOM0 });
            }
        }
    }
}
