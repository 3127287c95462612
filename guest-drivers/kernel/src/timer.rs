//! The timer event (Xen's `VIRQ_TIMER`) and sleeping until a deadline without spinning.
//!
//! At boot vCPU 0 binds `VIRQ_TIMER` to a port of its own (kept masked: nothing blocks on it, it
//! is polled). A job that must wake at a TSC deadline (ping's interval, a reply timeout, the
//! ticker, `secs=`) arms the one-shot timer (`VCPU_OP(SET_SINGLESHOT_TIMER)`) for it and sleeps
//! in `sched_op(poll)` on its ports plus the timer's: the host wakes the vCPU when one of them
//! becomes pending, and between those the vCPU costs the host nothing. Arming again replaces the
//! previous timer, so a stale one is never waited for. Deadlines are TSC values (the guest's
//! clock); the timer takes nanoseconds from now, computed from start-info's TSC frequency.
//!
//! Without the hypervisor's timer (an older host) the sleep falls back to `sched_op(poll)`'s own
//! timeout, which wakes the same way.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use pv_protocol::evtchn::VIRQ_TIMER;
use pv_protocol::hypercall::{MAX_TIMER_NS, TimerFlags};

use crate::control::{past, rdtsc, tsc_khz};
use crate::evtchn as ev;
use crate::hcall::Cpu;

/// vCPU 0's `VIRQ_TIMER` port (0: none, sleeps use poll's timeout).
static PORT: AtomicU32 = AtomicU32::new(0);
/// The deadline the timer is armed for (0: none known): sleeping again until the same deadline
/// (a job waiting for a reply, woken by other traffic) needs no new hypercall.
static ARMED: AtomicU64 = AtomicU64::new(0);

/// Binds vCPU 0's timer event (at boot; again after its port was closed).
pub fn init(cpu: &Cpu) {
    // Relaxed (both): only vCPU 0 arms and sleeps on the timer.
    ARMED.store(0, Ordering::Relaxed);
    if let Ok(p) = ev::bind_virq(cpu, VIRQ_TIMER, cpu.index) {
        PORT.store(p, Ordering::Relaxed);
    }
}

/// Forgets which deadline the timer is armed for (after arming or stopping it directly).
pub fn forget_armed() {
    // Relaxed: see `init`.
    ARMED.store(0, Ordering::Relaxed);
}

/// Stops the timer if it is armed for a deadline still to come (a wait that ended early), so
/// that it does not fire later into a domain with nothing to do.
pub fn cancel(cpu: &Cpu) {
    // Relaxed: see `init`.
    let d = ARMED.swap(0, Ordering::Relaxed);
    if d != 0 && !past(d) {
        cpu.stop_timer(cpu.index);
    }
}

/// The timer's port (0: none).
pub fn port() -> u32 {
    // Relaxed: see `init`.
    PORT.load(Ordering::Relaxed)
}

/// Nanoseconds from now until TSC value `deadline` (0 if it has passed), capped at what the
/// timer takes.
pub fn ns_until(deadline: u64) -> u64 {
    let ticks = deadline.saturating_sub(rdtsc());
    let ns = u128::from(ticks) * 1_000_000 / u128::from(tsc_khz());
    u64::try_from(ns).unwrap_or(u64::MAX).min(MAX_TIMER_NS)
}

/// Arms the timer for TSC value `deadline` after clearing its port (an earlier expiry does not
/// count), unless it is armed for that deadline already and has not fired; `false` if there is
/// no timer or the host refused.
pub fn arm(cpu: &Cpu, deadline: u64) -> bool {
    let port = port();
    if port == 0 {
        return false;
    }
    // Relaxed: see `init`.
    if ARMED.load(Ordering::Relaxed) == deadline && !ev::is_pending(port) {
        return true;
    }
    ev::clear_pending(port);
    let ok = cpu.set_timer(cpu.index, ns_until(deadline), TimerFlags::empty()) == 0;
    ARMED.store(if ok { deadline } else { 0 }, Ordering::Relaxed);
    ok
}

/// Sleeps until one of `ports` (at most 15) is pending or the TSC reaches `deadline` (`None`:
/// no deadline; then with no ports this sleeps until the domain stops). Returns at once if the
/// deadline has passed. May return early (a stale timer event): callers look again.
pub fn sleep(cpu: &Cpu, ports: &[u32], deadline: Option<u64>) {
    let mut all = [0u32; 16];
    let n = ports.len().min(all.len() - 1);
    all[..n].copy_from_slice(&ports[..n]);
    let mut timeout_ns = 0;
    let mut nports = n;
    if let Some(d) = deadline {
        if past(d) {
            return;
        }
        if arm(cpu, d) {
            all[n] = port();
            nports += 1;
        } else {
            // poll's own timeout (0 would mean forever).
            timeout_ns = ns_until(d).max(1);
        }
    }
    ev::poll(cpu, &all[..nports], timeout_ns);
}
