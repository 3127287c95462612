//! Requests from the toolstack (Xen's `control/shutdown` protocol), sleeping until something
//! happens, and the `idle` job.
//!
//! dom0 writes `poweroff`, `reboot` or `halt` into the guest's `control/shutdown`, which the
//! kernel watches from boot (a store watch: the host sends an event when the key changes, and
//! once at registration). The key is read only when the watch fired: busy jobs call [`poll`]
//! often, which costs memory reads of the store ring and nothing else; sleeping jobs call
//! [`sleep`], which wakes for the watch as for their own ports. On a request the kernel
//! acknowledges it by writing the key back to the empty string (as Linux does), prints
//! `guest: shutdown requested (<value>)` and shuts down with exit code 0: reason `Poweroff` for
//! `poweroff` and `halt`, `Reboot` for `reboot`. A value it does not know is not acknowledged (so
//! the toolstack can tell) and is reported once as `guest: shutdown request ignored (<value>)`.
//!
//! Nothing here wakes on a timer: a job with nothing to do sleeps in `sched_op(poll)` until a
//! port it named, console input, a store watch event or (only if it gave one) its deadline.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::store::{W_BALLOON, W_SHUTDOWN};

use pv_protocol::hypercall::ShutdownReason;
use pv_protocol::start_info::StartInfo;
use pv_protocol::store::MsgType;

use crate::console::LineInput;
use crate::evtchn as ev;
use crate::hcall::Cpu;
use crate::kprintln;
use crate::store::request;
use crate::sync::SpinLock;

/// TSC ticks per millisecond (from start-info).
static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);
/// The last unknown request reported (so that it is reported once), and its length.
static IGNORED: SpinLock<([u8; 32], usize)> = SpinLock::new(([0; 32], 0));

/// Takes the time source from start-info, binds the timer event and watches
/// `control/shutdown` (the watch fires at once, so a request made before boot is seen too).
pub fn init(cpu: &Cpu, si: &StartInfo) {
    TSC_KHZ.store(si.tsc_khz.max(1), Ordering::Relaxed);
    crate::timer::init(cpu);
    if crate::store::watch(cpu, b"control/shutdown", W_SHUTDOWN).is_err() {
        kprintln!(cpu, "guest: cannot watch control/shutdown");
    }
}

/// TSC ticks per millisecond.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// The TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks in `ms` milliseconds.
pub fn ticks(ms: u64) -> u64 {
    ms * TSC_KHZ.load(Ordering::Relaxed)
}

/// Where a job given `secs=S` on its command line must end: the TSC value S seconds from now.
/// `None` without it (the job has a length of its own) or with `secs=0`.
pub fn secs_deadline(cmdline: &str) -> Option<u64> {
    let secs = crate::text::num(cmdline, "secs", 0).filter(|&s| s > 0)?;
    Some(rdtsc().saturating_add(ticks(secs.saturating_mul(1000))))
}

/// Whether the TSC has reached `deadline`.
pub fn past(deadline: u64) -> bool {
    rdtsc() >= deadline
}

/// What the toolstack asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Shutdown(ShutdownReason),
    Unknown,
}

fn parse(value: &[u8]) -> Option<Request> {
    match value {
        b"" => None,
        b"poweroff" | b"halt" => Some(Request::Shutdown(ShutdownReason::Poweroff)),
        b"reboot" => Some(Request::Shutdown(ShutdownReason::Reboot)),
        _ => Some(Request::Unknown),
    }
}

/// Acts on a shutdown request if `control/shutdown` changed (a shutdown does not return). Cheap
/// otherwise: memory reads of the store ring, no exit.
pub fn poll(cpu: &Cpu) {
    crate::store::pump_events();
    // Each event means one read; a change while we read fires the watch again.
    while crate::store::take_fired(W_SHUTDOWN) != 0 {
        check(cpu);
    }
}

fn check(cpu: &Cpu) {
    let mut out = [0u8; 64];
    // Absent (ENOENT) until the toolstack first writes it.
    let Ok(r) = request(cpu, MsgType::Read, 0, &[b"control/shutdown\0"], &mut out) else {
        return;
    };
    let value = out[..r.len].split(|&b| b == 0).next().unwrap_or(&[]);
    let value = &value[..value.len().min(32)];
    let shown = |v: &[u8]| -> ([u8; 32], usize) {
        let mut s = [0u8; 32];
        for (d, &b) in s.iter_mut().zip(v) {
            *d = if (0x20..0x7f).contains(&b) { b } else { b'?' };
        }
        (s, v.len())
    };
    let (text, n) = shown(value);
    let text = core::str::from_utf8(&text[..n]).unwrap_or("");
    match parse(value) {
        None => {}
        Some(Request::Shutdown(reason)) => {
            // Acknowledge first, as Linux does: the toolstack sees the request was taken.
            let _ = request(
                cpu,
                MsgType::Write,
                0,
                &[b"control/shutdown\0", b""],
                &mut [0u8; 16],
            );
            kprintln!(cpu, "guest: shutdown requested ({text})");
            cpu.shutdown(reason, 0);
        }
        Some(Request::Unknown) => {
            let new = IGNORED.with(|(last, len)| {
                let new = &last[..*len] != value;
                if new {
                    last[..value.len()].copy_from_slice(value);
                    *len = value.len();
                }
                new
            });
            if new {
                kprintln!(cpu, "guest: shutdown request ignored ({text})");
            }
        }
    }
}

/// Sleeps until one of `ports` (at most 12) is pending, a kernel watch among `watches` fired
/// (it is left for the caller to take), the TSC reaches `deadline` (`None`: no deadline), a
/// shutdown request came (acted on), or, with `input`, console input came (whole lines echoed).
/// Returns at once if any of these is already the case. The caller looks at what happened and
/// calls again: this may also return for nothing (a stale event).
pub fn sleep(
    cpu: &Cpu,
    ports: &[u32],
    deadline: Option<u64>,
    watches: u32,
    mut input: Option<&mut LineInput>,
) {
    let mut all = [0u32; 14];
    let n = ports.len().min(all.len() - 2);
    all[..n].copy_from_slice(&ports[..n]);
    let store = crate::store::port();
    let console = crate::console::port();
    all[n] = store;
    let mut nports = n + 1;
    if input.is_some() {
        all[nports] = console;
        nports += 1;
    }
    // Cleared before looking: what arrives from here on leaves its port pending, and the poll
    // below returns at once.
    ev::clear_pending(store);
    if input.is_some() {
        ev::clear_pending(console);
    }
    if let Some(i) = input.as_deref_mut() {
        i.pump(cpu);
    }
    poll(cpu);
    let ready = crate::store::fired(watches)
        || ports.iter().any(|&p| ev::is_pending(p))
        || deadline.is_some_and(past);
    if !ready {
        crate::timer::sleep(cpu, &all[..nports], deadline);
    }
    if let Some(i) = input {
        i.pump(cpu);
    }
    poll(cpu);
}

/// `idle`: prints `idle: up`, then sleeps forever, echoing console input lines and obeying the
/// toolstack's shutdown requests and memory target (when the balloon was started). It wakes for
/// nothing else: asleep, it costs the host nothing.
pub fn idle(cpu: &Cpu) -> u32 {
    kprintln!(cpu, "idle: up");
    let mut input = LineInput::new();
    loop {
        sleep(cpu, &[], None, W_BALLOON, Some(&mut input));
        let _ = crate::balloon::poll(cpu);
    }
}
