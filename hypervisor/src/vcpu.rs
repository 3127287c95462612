//! vCPU threads: the `KVM_RUN` loop, exit handling, and kicks.
//!
//! A kick is a real-time signal with a handler that sets `immediate_exit` in the thread's own
//! `kvm_run` page, so a kick that lands between the loop's state check and `KVM_RUN` is not lost:
//! the next `KVM_RUN` returns `EINTR` at once (Firecracker's scheme).

use std::cell::Cell;
use std::sync::{Arc, Once};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use pv_protocol::evtchn::port_of_doorbell;
use pv_protocol::hypercall::HYPERCALL_PORT;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::domain::{DomainShared, DomainState};

/// A port the VMM ignores silently: the exit benchmark's round trip to user space.
pub const BENCH_NULL_PORT: u16 = 0xe9;

thread_local! {
    /// This thread's `kvm_run` page, for the kick handler; null outside vCPU threads.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local read and one byte store.
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run page, set by `run_loop` for as
        // long as the VcpuFd (and so the mapping) lives, and cleared before it is dropped.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler (once per process).
pub(crate) fn init_kick() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            tracing::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Signals every thread in `threads` to leave `KVM_RUN`.
pub(crate) fn kick_all(threads: &[libc::pthread_t]) {
    for &t in threads {
        // SAFETY: every id in the list belongs to a live vCPU thread: each removes itself (under
        // the same lock the caller holds) before it exits.
        unsafe { libc::pthread_kill(t, kick_signal()) };
    }
}

/// Runs vCPU `index` of `dom` until the domain reaches a final state.
pub(crate) fn run_loop(dom: Arc<DomainShared>, mut vcpu: VcpuFd, index: u32) {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    {
        let mut i = dom.lock();
        if let Some(slot) = i.vcpu.get_mut(index as usize) {
            slot.thread = Some(me);
            slot.tid = Some(tid);
            if let Some(cpus) = &slot.affinity
                && let Err(e) = crate::domain::set_affinity(tid, Some(cpus))
            {
                tracing::warn!(domid = dom.id, "vCPU {index}: cannot pin to {cpus:?}: {e}");
            }
        }
    }
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    while dom.may_run() {
        match vcpu.run() {
            Ok(exit) => {
                if let Some(stop) = handle_exit(&dom, index, exit) {
                    dom.stop(stop);
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the flag, then look at the domain state again.
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                let detail = format!("vCPU {index}: KVM_RUN failed: {e}; {}", registers(&vcpu));
                tracing::error!(domid = dom.id, "{detail}");
                dom.stop(DomainState::Crashed { detail });
            }
        }
        crash(&dom, &vcpu, index);
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    let mut i = dom.lock();
    if let Some(slot) = i.vcpu.get_mut(index as usize) {
        slot.thread = None;
        slot.tid = None;
        slot.ns_done += ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    }
}

thread_local! {
    /// What crashed the domain in the exit just handled, until [`crash_state`] adds the registers.
    static PENDING_CRASH: Cell<Option<String>> = const { Cell::new(None) };
}

/// The crash detail of an access of `len` bytes at `gpa`, which is not in `dom`'s memory.
fn outside_memory(dom: &DomainShared, what: &str, len: usize, gpa: u64) -> String {
    format!(
        "{what} of {len} byte(s) at gpa {gpa:#x}, outside the domain's memory (0..{:#x})",
        dom.ram.size()
    )
}

/// Handles one exit; returns a final state to move to, if any. Exits that need the vCPU's
/// registers (crashes) are recorded and turned into a state by [`crash`].
fn handle_exit(dom: &Arc<DomainShared>, index: u32, exit: VcpuExit<'_>) -> Option<DomainState> {
    match exit {
        VcpuExit::IoOut(port, _) if port == HYPERCALL_PORT => crate::hypercall::handle(dom, index),
        // A doorbell write the kernel did not match to a host endpoint: a plain send.
        VcpuExit::IoOut(io, &[data]) if port_of_doorbell(io, data).is_some() => {
            let p = port_of_doorbell(io, data).unwrap_or(0);
            if let Err(e) = crate::evtchn::send(dom, p) {
                dom.guest_fault(
                    "bad-port",
                    format_args!("vCPU {index}: doorbell {p}: {e:?}"),
                );
            }
            None
        }
        // The POST-code port (PVM hosts absorb `out 0x80, al` in the kernel; other forms come
        // here) and the benchmark's null port: ignored.
        VcpuExit::IoOut(0x80, _) => None,
        VcpuExit::IoOut(BENCH_NULL_PORT, _) => None,
        VcpuExit::IoOut(port, _) => {
            dom.guest_fault(
                "stray-pio",
                format_args!("vCPU {index}: out to port {port:#x}"),
            );
            None
        }
        VcpuExit::IoIn(port, data) => {
            dom.guest_fault(
                "stray-pio",
                format_args!("vCPU {index}: in from port {port:#x}"),
            );
            data.fill(0xff);
            None
        }
        // Nothing is mapped outside the domain's memory (no emulated devices): a guest access
        // there is a fault of the guest, which crashes it. Answering it (with 0xff, say) would
        // let a guest that runs outside its memory go on forever, one exit per access.
        VcpuExit::MmioRead(addr, data) => {
            let n = data.len();
            data.fill(0xff);
            PENDING_CRASH.with(|c| {
                c.replace(Some(outside_memory(dom, "read", n, addr)));
            });
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            let detail = outside_memory(dom, "write", data.len(), addr);
            PENDING_CRASH.with(|c| c.replace(Some(detail)));
            None
        }
        // No interrupt controller: a halted vCPU waits for an event, like sched_op(block). On
        // PVM the first hlt after an I/O exit may return at once; the guest halts in a loop.
        VcpuExit::Hlt => {
            dom.block(index);
            None
        }
        VcpuExit::Shutdown => {
            PENDING_CRASH.with(|c| c.set(Some("triple fault".into())));
            None
        }
        VcpuExit::InternalError => {
            PENDING_CRASH.with(|c| c.set(Some("KVM internal error".into())));
            None
        }
        VcpuExit::FailEntry(reason, _) => {
            tracing::error!(
                domid = dom.id,
                "vCPU {index}: entry failed, reason {reason:#x}"
            );
            PENDING_CRASH.with(|c| c.set(Some("VM entry failed".into())));
            None
        }
        other => {
            tracing::error!(domid = dom.id, "vCPU {index}: unexpected exit {other:?}");
            PENDING_CRASH.with(|c| c.set(Some("unexpected exit".into())));
            None
        }
    }
}

/// The crash the last exit recorded, with the registers; logged (once per domain: only by the
/// vCPU whose crash stops it).
fn crash(dom: &DomainShared, vcpu: &VcpuFd, index: u32) {
    let Some(what) = PENDING_CRASH.with(|c| c.take()) else {
        return;
    };
    let detail = format!("vCPU {index}: {what}; {}", registers(vcpu));
    if dom.stop(DomainState::Crashed {
        detail: detail.clone(),
    }) {
        tracing::error!(domid = dom.id, name = %dom.name, "domain crashed: {detail}");
    }
}

fn registers(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} \
             rdi={:#x} rbp={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    }
}
