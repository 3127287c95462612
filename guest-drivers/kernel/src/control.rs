//! Requests from the toolstack (Xen's `control/shutdown` protocol) and the `idle` job.
//!
//! dom0 writes `poweroff`, `reboot` or `halt` into the guest's `control/shutdown`. Long-running
//! jobs call [`poll`] often; it reads the key at most every [`POLL_MS`] ms (one store read), and
//! on a request acknowledges it by writing the key back to the empty string (as Linux does),
//! prints `guest: shutdown requested (<value>)` and shuts down with exit code 0: reason
//! `Poweroff` for `poweroff` and `halt`, `Reboot` for `reboot`. A value it does not know is not
//! acknowledged (so the toolstack can tell) and is reported once as
//! `guest: shutdown request ignored (<value>)`.

use core::sync::atomic::{AtomicU64, Ordering};

use pv_protocol::hypercall::ShutdownReason;
use pv_protocol::start_info::StartInfo;
use pv_protocol::store::MsgType;

use crate::console::LineInput;
use crate::evtchn as ev;
use crate::hcall::Cpu;
use crate::kprintln;
use crate::store::request;
use crate::sync::SpinLock;

/// How often [`poll`] reads the key.
pub const POLL_MS: u64 = 50;

/// TSC ticks per millisecond (from start-info).
static TSC_KHZ: AtomicU64 = AtomicU64::new(1_000_000);
/// TSC value before which [`poll`] does not read the store again.
static NEXT_CHECK: AtomicU64 = AtomicU64::new(0);
/// The last unknown request reported (so that it is reported once), and its length.
static IGNORED: SpinLock<([u8; 32], usize)> = SpinLock::new(([0; 32], 0));

/// Takes the time source from start-info.
pub fn init(si: &StartInfo) {
    TSC_KHZ.store(si.tsc_khz.max(1), Ordering::Relaxed);
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

/// Checks `control/shutdown` if [`POLL_MS`] passed since the last check, and acts on a request
/// (a shutdown does not return). Cheap otherwise: one TSC read.
pub fn poll(cpu: &Cpu) {
    let now = rdtsc();
    if now < NEXT_CHECK.load(Ordering::Relaxed) {
        return;
    }
    NEXT_CHECK.store(now + ticks(POLL_MS), Ordering::Relaxed);
    check(cpu);
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

/// Sleeps up to `ms` milliseconds or until one of `ports` or the console's port is signalled,
/// then handles what came in: console input (whole lines echoed by `input`) and the toolstack's
/// requests.
pub fn wait(cpu: &Cpu, ports: &[u32], ms: u64, input: &mut LineInput) {
    let mut all = [0u32; 8];
    let n = ports.len().min(all.len() - 1);
    all[..n].copy_from_slice(&ports[..n]);
    all[n] = crate::console::port();
    // The console port is cleared before sleeping: input that arrives from here on wakes us.
    ev::clear_pending(all[n]);
    input.pump(cpu);
    ev::poll(cpu, &all[..=n], ms * 1_000_000);
    ev::clear_pending(all[n]);
    input.pump(cpu);
    poll(cpu);
}

/// `idle`: prints `idle: up`, then sleeps forever, echoing console input lines and obeying the
/// toolstack's shutdown requests and memory target (when the balloon was started).
pub fn idle(cpu: &Cpu) -> u32 {
    kprintln!(cpu, "idle: up");
    let mut input = LineInput::new();
    loop {
        wait(cpu, &[], POLL_MS, &mut input);
        let _ = crate::balloon::poll(cpu);
    }
}
