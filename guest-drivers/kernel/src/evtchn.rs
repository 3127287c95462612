//! Event-channel client: hypercall wrappers, the doorbell, and the shared-info bitmaps.

use core::mem::offset_of;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use pv_protocol::evtchn::{
    AllocUnboundArg, BindInterdomainArg, BindVirqArg, DOORBELL_BASE, EvtchnOp, MAX_PORTS_2L,
    PortArg, PortState, StatusArg, doorbell_of,
};
use pv_protocol::grant::DomId;
use pv_protocol::hypercall::{SchedPoll, nr};
use pv_protocol::start_info::{SHARED_INFO_GPA, SharedInfo, VcpuInfo};

use crate::hcall::Cpu;

fn word(offset: usize, port: u32) -> &'static AtomicU64 {
    // A port beyond the bitmaps (none is ever handed out) names the last word rather than memory
    // past the shared-info page.
    let port = port.min(MAX_PORTS_2L - 1);
    let addr = SHARED_INFO_GPA as usize + offset + (port as usize / 64) * 8;
    // SAFETY: the shared-info page is identity-mapped at a fixed address for the kernel's
    // lifetime; the words are 8-aligned; the host updates them only with atomic operations.
    unsafe { AtomicU64::from_ptr(addr as *mut u64) }
}

fn bit(port: u32) -> u64 {
    1 << (port % 64)
}

/// Masks every port (done once at boot; ports are unmasked as they are put to use).
pub fn mask_all() {
    for w in 0..64u32 {
        word(offset_of!(SharedInfo, evtchn_mask), w * 64).store(!0, Ordering::SeqCst);
    }
}

/// Sets `port`'s mask bit.
pub fn mask(port: u32) {
    word(offset_of!(SharedInfo, evtchn_mask), port).fetch_or(bit(port), Ordering::SeqCst);
}

/// Whether `port` is pending.
pub fn is_pending(port: u32) -> bool {
    word(offset_of!(SharedInfo, evtchn_pending), port).load(Ordering::SeqCst) & bit(port) != 0
}

/// Clears `port`'s pending bit; returns whether it was set.
pub fn clear_pending(port: u32) -> bool {
    word(offset_of!(SharedInfo, evtchn_pending), port).fetch_and(!bit(port), Ordering::SeqCst)
        & bit(port)
        != 0
}

fn upcall_flag() -> &'static AtomicU8 {
    let addr = SHARED_INFO_GPA as usize
        + offset_of!(SharedInfo, vcpu_info)
        + offset_of!(VcpuInfo, upcall_pending);
    // SAFETY: as in `word`; a byte is always aligned.
    unsafe { AtomicU8::from_ptr(addr as *mut u8) }
}

/// Takes vCPU 0's upcall-pending flag (returns it and clears it).
pub fn take_upcall() -> bool {
    upcall_flag().swap(0, Ordering::SeqCst) != 0
}

fn op<T>(cpu: &Cpu, op: EvtchnOp, arg: &mut T) -> i64 {
    cpu.raw(
        nr::EVENT_CHANNEL_OP,
        [op as u64, (arg as *mut T) as u64, 0, 0, 0, 0],
    )
}

fn read<T: Copy>(v: &T) -> T {
    // SAFETY: `v` is a valid reference; volatile because the host wrote it behind the compiler's
    // back during the hypercall.
    unsafe { core::ptr::read_volatile(v) }
}

/// `alloc_unbound`: a port `remote` may bind.
pub fn alloc_unbound(cpu: &Cpu, remote: u16) -> Result<u32, i64> {
    let mut a = AllocUnboundArg {
        dom: DomId::SELF.0,
        remote_dom: remote,
        port: 0,
    };
    match op(cpu, EvtchnOp::AllocUnbound, &mut a) {
        0 => Ok(read(&a).port),
        e => Err(e),
    }
}

/// `bind_interdomain` to `remote_port` of `remote_dom`.
pub fn bind_interdomain(cpu: &Cpu, remote_dom: u16, remote_port: u32) -> Result<u32, i64> {
    let mut a = BindInterdomainArg {
        remote_dom,
        _pad: 0,
        remote_port,
        local_port: 0,
    };
    match op(cpu, EvtchnOp::BindInterdomain, &mut a) {
        0 => Ok(read(&a).local_port),
        e => Err(e),
    }
}

/// `bind_virq`: a port for virtual IRQ `virq` of vCPU `vcpu`.
pub fn bind_virq(cpu: &Cpu, virq: u32, vcpu: u32) -> Result<u32, i64> {
    let mut a = BindVirqArg {
        virq,
        vcpu,
        port: 0,
    };
    match op(cpu, EvtchnOp::BindVirq, &mut a) {
        0 => Ok(read(&a).port),
        e => Err(e),
    }
}

fn port_op(cpu: &Cpu, o: EvtchnOp, port: u32) -> i64 {
    let mut a = PortArg { port };
    op(cpu, o, &mut a)
}

/// `send` through the hypercall (reports errors).
pub fn send(cpu: &Cpu, port: u32) -> i64 {
    port_op(cpu, EvtchnOp::Send, port)
}

/// Send through the doorbell: no VMM exit for ports bound to host endpoints.
pub fn doorbell(port: u32) {
    let (io, data) = doorbell_of(port);
    macro_rules! ring {
        ($($n:literal)*) => {
            // One `out imm8, al` per doorbell I/O port (the port is an immediate).
            match io - DOORBELL_BASE {
                $($n => {
                    // SAFETY: a port write the hypervisor (or the host kernel's ioeventfd)
                    // handles; no memory is touched.
                    unsafe {
                        core::arch::asm!("out {p}, al", p = const DOORBELL_BASE + $n,
                            in("al") data, options(nomem, nostack, preserves_flags))
                    }
                })*
                _ => {}
            }
        };
    }
    ring!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
}

/// `close`.
pub fn close(cpu: &Cpu, port: u32) -> i64 {
    port_op(cpu, EvtchnOp::Close, port)
}

/// `unmask` (re-raises the upcall if the port is pending).
pub fn unmask(cpu: &Cpu, port: u32) -> i64 {
    port_op(cpu, EvtchnOp::Unmask, port)
}

/// `status` of one of our ports.
pub fn status(cpu: &Cpu, port: u32) -> Result<PortState, i64> {
    let mut a = StatusArg {
        dom: DomId::SELF.0,
        _pad: 0,
        port,
        status: 0,
        vcpu: 0,
        u: [0; 8],
    };
    match op(cpu, EvtchnOp::Status, &mut a) {
        0 => read(&a).result().map(|(_, s)| s).map_err(|_| -22),
        e => Err(e),
    }
}

/// `sched_op(poll)` on `ports`, waiting at most `timeout_ns` (0: forever).
pub fn poll(cpu: &Cpu, ports: &[u32], timeout_ns: u64) -> i64 {
    let a = SchedPoll {
        ports: ports.as_ptr() as u64,
        nr_ports: ports.len() as u32,
        _pad: 0,
        timeout_ns,
    };
    cpu.raw(nr::SCHED_OP, [3, (&raw const a) as u64, 0, 0, 0, 0])
}
