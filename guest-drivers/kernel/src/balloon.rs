//! The balloon front end, after Linux's xen-balloon: follows the toolstack's `memory/target`
//! (KiB, in the store) by giving free pages back to the host (`memory_op`
//! decrease_reservation) or taking them back (populate_physmap, up to what the host allows),
//! and reports what the domain holds in `memory/current` (KiB), where Linux shows it in sysfs.
//!
//! The pages it manages are the kernel's free RAM: every frame from the end of the heap (the
//! image, the boot stacks and the heap, at most `heap::MAX_BYTES`, lie below it; see `main.rs`)
//! to the end of the physical map (start-info's `max_mem_bytes`). The kernel never uses them, so
//! the balloon gives them back from the top and takes them back from the bottom, 512 per
//! hypercall. Below them (the kernel, and the host's pages under 2 MiB) nothing is ever given
//! back: a target below that is met as far as it can be.
//!
//! The target is watched (a kernel store watch): [`poll`] reads it only when the watch fired,
//! so a sleeping job wakes for a new target and for nothing else. With `check` (the `balloon`
//! job), every page held is stamped and the stamps are verified after each change, and every
//! page taken back must arrive zeroed.

use alloc::vec;
use alloc::vec::Vec;

use pv_protocol::PAGE_SIZE;
use pv_protocol::grant::DomId;
use pv_protocol::hypercall::{Gpa, Hypercall};
use pv_protocol::memory::{CURRENT_KEY, MAX_EXTENTS, MemoryCmd, Reservation, TARGET_KEY};
use pv_protocol::start_info::StartInfo;
use pv_protocol::store::MsgType;

use crate::hcall::Cpu;
use crate::kprintln;
use crate::store::{W_BALLOON, request};
use crate::sync::SpinLock;

/// Most frames the balloon manages (its bitmap is one heap block of at most 1 MiB: 32 GiB).
const MAX_FRAMES: u64 = 8 << 20;
const PAGE: u64 = PAGE_SIZE as u64;

/// The first page of free RAM: the end of the heap.
fn free_ram_start() -> u64 {
    (crate::heap::end() as u64).next_multiple_of(PAGE)
}

/// `memory_op(cmd)`: the raw result.
pub fn memory_op(cpu: &Cpu, cmd: MemoryCmd) -> i64 {
    cpu.call(Hypercall::MemoryOp(cmd))
}

/// Gives `frames` back (`give_back`) or populates them: how many were done, or the errno of
/// the first refused.
pub fn reservation(cpu: &Cpu, give_back: bool, frames: &[u64], domid: DomId) -> i64 {
    let arg = Reservation {
        frames: Gpa(frames.as_ptr() as u64),
        count: frames.len() as u32,
        domid,
    }
    .to_raw();
    let arg = Gpa((&raw const arg) as u64);
    memory_op(
        cpu,
        if give_back {
            MemoryCmd::DecreaseReservation { arg }
        } else {
            MemoryCmd::PopulatePhysmap { arg }
        },
    )
}

/// Pages this domain holds (`current_reservation`), or the errno.
pub fn current(cpu: &Cpu) -> i64 {
    let d = DomId::SELF.0;
    memory_op(
        cpu,
        MemoryCmd::CurrentReservation {
            arg: Gpa((&raw const d) as u64),
        },
    )
}

/// Pages this domain may hold at most, or the errno.
pub fn maximum(cpu: &Cpu) -> i64 {
    let d = DomId::SELF.0;
    memory_op(
        cpu,
        MemoryCmd::MaximumReservation {
            arg: Gpa((&raw const d) as u64),
        },
    )
}

/// The stamp of a held page (at its first and last 8 bytes).
fn stamp(frame: u64) -> u64 {
    frame.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_5a5a
}

fn words(frame: u64) -> [*mut u64; 2] {
    let base = frame * PAGE;
    [base as *mut u64, (base + PAGE - 8) as *mut u64]
}

fn write_stamp(frame: u64) {
    for w in words(frame) {
        // SAFETY: a free-RAM frame this balloon holds: identity-mapped, used by nothing else.
        unsafe { w.write_volatile(stamp(frame)) };
    }
}

fn read_words(frame: u64) -> [u64; 2] {
    // SAFETY: as in `write_stamp`.
    words(frame).map(|w| unsafe { w.read_volatile() })
}

/// The balloon's view of free RAM.
#[derive(Debug)]
struct Balloon {
    /// Frames managed: `first..end`.
    first: u64,
    end: u64,
    /// Bit `i` set: frame `first + i` is given back (absent).
    absent: Vec<u64>,
    /// Pages the domain holds (all of them, not only free RAM).
    held: u64,
    /// The target last acted on (KiB): acted on once per new value, as far as the host allows.
    target_kib: Option<u64>,
    /// Stamp and verify pages.
    check: bool,
    /// Stamps found wrong, pages that came back not zeroed.
    bad: u64,
}

static BALLOON: SpinLock<Option<Balloon>> = SpinLock::new(None);

impl Balloon {
    fn is_absent(&self, f: u64) -> bool {
        let i = f - self.first;
        self.absent[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn mark(&mut self, f: u64, absent: bool) {
        let i = f - self.first;
        let (w, b) = (&mut self.absent[(i / 64) as usize], 1u64 << (i % 64));
        if absent { *w |= b } else { *w &= !b }
    }

    /// Up to `n` held frames, highest first.
    fn held_frames(&self, n: usize, out: &mut Vec<u64>) {
        out.clear();
        let mut f = self.end;
        while f > self.first && out.len() < n {
            f -= 1;
            if !self.is_absent(f) {
                out.push(f);
            }
        }
    }

    /// Up to `n` absent frames, lowest first.
    fn absent_frames(&self, n: usize, out: &mut Vec<u64>) {
        out.clear();
        let mut f = self.first;
        while f < self.end && out.len() < n {
            if self.is_absent(f) {
                out.push(f);
            }
            f += 1;
        }
    }

    /// Gives back or takes back pages until the domain holds `target` pages, the free RAM runs
    /// out, or the host refuses; returns the errno that stopped it, if any.
    fn adjust(&mut self, cpu: &Cpu, target: u64) -> Option<i64> {
        let mut frames = Vec::with_capacity(MAX_EXTENTS as usize);
        while self.held != target {
            let give_back = self.held > target;
            let want = self.held.abs_diff(target).min(u64::from(MAX_EXTENTS)) as usize;
            if give_back {
                self.held_frames(want, &mut frames);
            } else {
                self.absent_frames(want, &mut frames);
            }
            if frames.is_empty() {
                return None;
            }
            let r = reservation(cpu, give_back, &frames, DomId::SELF);
            if r < 0 {
                return Some(r);
            }
            let done = (r as usize).min(frames.len());
            for &f in &frames[..done] {
                self.mark(f, give_back);
                if !give_back && self.check {
                    if read_words(f) != [0, 0] {
                        self.bad += 1;
                    }
                    write_stamp(f);
                }
            }
            if give_back {
                self.held -= done as u64;
            } else {
                self.held += done as u64;
            }
            if done < frames.len() {
                return None;
            }
        }
        None
    }

    /// Stamps found wrong among the pages held.
    fn verify(&self) -> u64 {
        (self.first..self.end)
            .filter(|&f| !self.is_absent(f))
            .filter(|&f| read_words(f) != [stamp(f); 2])
            .count() as u64
    }
}

fn write_current(cpu: &Cpu, held: u64) {
    let kib = u32::try_from(held * (PAGE / 1024)).unwrap_or(u32::MAX);
    let mut digits = [0u8; 16];
    let v = crate::text::fmt_u32(&mut digits, kib);
    let mut path = [0u8; 32];
    path[..CURRENT_KEY.len()].copy_from_slice(CURRENT_KEY.as_bytes());
    let _ = request(
        cpu,
        MsgType::Write,
        0,
        &[&path[..=CURRENT_KEY.len()], v],
        &mut [0u8; 16],
    );
}

fn read_target(cpu: &Cpu) -> Option<u64> {
    let mut path = [0u8; 32];
    path[..TARGET_KEY.len()].copy_from_slice(TARGET_KEY.as_bytes());
    let mut out = [0u8; 32];
    let r = request(
        cpu,
        MsgType::Read,
        0,
        &[&path[..=TARGET_KEY.len()]],
        &mut out,
    )
    .ok()?;
    crate::text::parse_u64(&out[..r.len.min(out.len())])
}

/// Starts the balloon: `check` stamps every free page (so the host really backs them) and
/// verifies the stamps after every change; the target is watched. Returns the pages held, or
/// `None` when the hypervisor offers no `memory_op`.
pub fn init(cpu: &Cpu, si: &StartInfo, check: bool) -> Option<u64> {
    let held = u64::try_from(current(cpu)).ok()?;
    let first = free_ram_start() / PAGE;
    let end = (si.physmap_bytes() / PAGE).min(first + MAX_FRAMES);
    if end <= first {
        return None;
    }
    let mut b = Balloon {
        first,
        end,
        absent: vec![0; (end - first).div_ceil(64) as usize],
        held,
        target_kib: None,
        check,
        bad: 0,
    };
    for f in (si.mem_bytes / PAGE).max(first)..end {
        b.mark(f, true);
    }
    if check {
        for f in first..end {
            if !b.is_absent(f) {
                write_stamp(f);
            }
        }
    }
    write_current(cpu, held);
    BALLOON.with(|s| *s = Some(b));
    // Fires at once: a target set before we got here is acted on at the first `poll`.
    if crate::store::watch(cpu, TARGET_KEY.as_bytes(), W_BALLOON).is_err() {
        kprintln!(cpu, "balloon: cannot watch {TARGET_KEY}");
    }
    Some(held)
}

/// [`init`] from the start-info page (for jobs that are not given it).
pub fn start(cpu: &Cpu, check: bool) -> Option<u64> {
    // SAFETY: the hypervisor maps the start-info page at this address before entering the
    // kernel and never changes it afterwards (as `kmain` relies on too).
    let si = unsafe { &*(pv_protocol::start_info::START_INFO_GPA as *const StartInfo) };
    init(cpu, si, check)
}

/// Bad pages found so far (with `check`).
pub fn bad_pages() -> u64 {
    BALLOON.with(|s| s.as_ref().map_or(0, |b| b.bad))
}

/// Prints `balloon: target T KiB, holding H KiB, N given back, check ok` (or `check FAILED`).
pub fn report(cpu: &Cpu, s: &Status) {
    kprintln!(
        cpu,
        "balloon: target {} KiB, holding {} KiB, {} given back, check {}",
        s.target_kib.unwrap_or(0),
        s.held * 4,
        s.given_back,
        if s.bad == 0 { "ok" } else { "FAILED" }
    );
}

/// What the balloon holds, for a job's report.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    /// Pages the domain holds.
    pub held: u64,
    /// The target (KiB) last acted on.
    pub target_kib: Option<u64>,
    /// Free pages given back now.
    pub given_back: u64,
    /// Stamps wrong and pages not zeroed, so far (with `check`).
    pub bad: u64,
}

/// Reads `memory/target` if its watch fired, and follows it; returns the new status when it
/// acted. Cheap otherwise (memory reads of the store ring).
pub fn poll(cpu: &Cpu) -> Option<Status> {
    BALLOON.with(|s| s.as_ref().map(|_| ()))?;
    crate::store::pump_events();
    if crate::store::take_fired(W_BALLOON) == 0 {
        return None;
    }
    let target = read_target(cpu)?;
    BALLOON.with(|s| {
        let b = s.as_mut()?;
        if b.target_kib == Some(target) {
            return None;
        }
        // Stopped short (the host's maximum, the end of free RAM): tried again for a new target.
        let stopped = b.adjust(cpu, target / (PAGE / 1024));
        b.target_kib = Some(target);
        if let Some(e) = stopped {
            kprintln!(cpu, "balloon: host refused at {} pages: {e}", b.held);
        }
        if b.check {
            b.bad += b.verify();
        }
        write_current(cpu, b.held);
        let given_back = (b.first..b.end).filter(|&f| b.is_absent(f)).count() as u64;
        Some(Status {
            held: b.held,
            target_kib: b.target_kib,
            given_back,
            bad: b.bad,
        })
    })
}

/// `balloon [secs=S]`: the `idle` job with a checking balloon that follows its target and prints `balloon: target T KiB, holding H KiB, N given back, check ok` (or
/// `check FAILED (n)`) after every change. Without `secs`, runs until shut down; with it,
/// exits with the number of bad pages.
pub fn job(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let Some(held) = init(cpu, si, true) else {
        kprintln!(cpu, "balloon: no memory_op");
        return 1;
    };
    let max = maximum(cpu);
    kprintln!(
        cpu,
        "balloon: up, holding {} KiB, at most {max} pages, free RAM from {:#x}",
        held * 4,
        free_ram_start()
    );
    let deadline = crate::control::secs_deadline(cmdline);
    let mut input = crate::console::LineInput::new();
    let mut bad = 0;
    loop {
        crate::control::sleep(cpu, &[], deadline, W_BALLOON, Some(&mut input));
        if let Some(s) = poll(cpu) {
            bad = s.bad;
            report(cpu, &s);
        }
        if deadline.is_some_and(crate::control::past) {
            return bad as u32;
        }
    }
}
