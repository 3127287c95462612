//! `balloonhostile`: a balloon that breaks every rule of `memory_op`, and checks that each
//! break gets its defined error (one `PASS`/`FAIL` line per check; exit code = failures).
//!
//! The host plays along through an event channel offered to dom0 (printed as
//! `balloonhostile: grant ref 1 frame F port P`): it maps grant 1 and signals; the guest tries
//! to give the frame back (`EBUSY`) and signals; the host unmaps and signals; the guest gives it
//! back (allowed: granted but unmapped) and signals; the host's map of the grant is refused and
//! it signals once more. Then the guest touches every page it holds, gives 16 back and writes
//! into them anyway: the host must notice, free them again, and the guest must read zeros.
//!
//! Run it with `memory < maxmem` and the host's maximum at `memory` (as after `xl mem-set` to
//! it): populating above `memory` must then be refused with `ENOMEM`.

use alloc::vec::Vec;

use pv_protocol::PAGE_SIZE;
use pv_protocol::grant::DomId;
use pv_protocol::hypercall::{Errno, Gpa};
use pv_protocol::memory::{MAX_EXTENTS, MemoryCmd, MemoryReservation};
use pv_protocol::start_info::{START_INFO_GPA, StartInfo};

use crate::balloon::{current, memory_op, reservation};
use crate::evtchn as ev;
use crate::hcall::Cpu;
use crate::kprintln;

const PAGE: u64 = PAGE_SIZE as u64;

struct Checks<'a> {
    cpu: &'a Cpu,
    failed: u32,
}

impl Checks<'_> {
    /// `got` must be `want`.
    fn expect(&mut self, name: &str, got: i64, want: i64) {
        if got == want {
            kprintln!(self.cpu, "PASS {name}");
        } else {
            self.failed += 1;
            kprintln!(self.cpu, "FAIL {name}: got {got}, want {want}");
        }
    }

    fn err(&mut self, name: &str, got: i64, want: Errno) {
        self.expect(name, got, want.as_i64());
    }
}

fn raw_op(cpu: &Cpu, decrease: bool, raw: &MemoryReservation) -> i64 {
    let arg = Gpa(raw as *const MemoryReservation as u64);
    memory_op(
        cpu,
        if decrease {
            MemoryCmd::DecreaseReservation { arg }
        } else {
            MemoryCmd::PopulatePhysmap { arg }
        },
    )
}

/// The job; returns the failures.
pub fn balloonhostile(cpu: &Cpu, si: &StartInfo) -> u32 {
    let mut c = Checks { cpu, failed: 0 };
    let me = DomId::SELF;
    let mem_frames = si.mem_bytes / PAGE;
    let physmap = si.physmap_bytes() / PAGE;
    // Free RAM (see balloon.rs): from well above the kernel image to the end of memory.
    let top = mem_frames - 1;
    let held0 = current(cpu);
    c.expect("current-reservation", held0, mem_frames as i64);

    // Absurd arguments.
    let frames: Vec<u64> = (0..=u64::from(MAX_EXTENTS)).map(|i| top - i).collect();
    let ok = MemoryReservation {
        extent_start: frames.as_ptr() as u64,
        nr_extents: 1,
        domid: me.0,
        ..Default::default()
    };
    for (name, raw, want) in [
        (
            "too-many-frames",
            MemoryReservation {
                nr_extents: u64::from(MAX_EXTENTS) + 1,
                ..ok
            },
            Errno::E2BIG,
        ),
        (
            "absurd-count",
            MemoryReservation {
                nr_extents: u64::MAX,
                ..ok
            },
            Errno::E2BIG,
        ),
        (
            "extent-order",
            MemoryReservation {
                extent_order: 9,
                ..ok
            },
            Errno::EINVAL,
        ),
        (
            "mem-flags",
            MemoryReservation { mem_flags: 1, ..ok },
            Errno::EINVAL,
        ),
        (
            "other-domain",
            MemoryReservation { domid: 0, ..ok },
            Errno::EPERM,
        ),
        (
            "list-outside-memory",
            MemoryReservation {
                extent_start: si.physmap_bytes() + PAGE,
                ..ok
            },
            Errno::EFAULT,
        ),
        (
            "list-wraps",
            MemoryReservation {
                extent_start: u64::MAX - 3,
                ..ok
            },
            Errno::EFAULT,
        ),
    ] {
        c.err(name, raw_op(cpu, true, &raw), want);
    }
    let d = 0u16;
    c.err(
        "current-of-dom0",
        memory_op(
            cpu,
            MemoryCmd::CurrentReservation {
                arg: Gpa((&raw const d) as u64),
            },
        ),
        Errno::EPERM,
    );
    c.err(
        "argument-outside-memory",
        memory_op(
            cpu,
            MemoryCmd::DecreaseReservation {
                arg: Gpa(u64::MAX - 8),
            },
        ),
        Errno::EFAULT,
    );
    c.expect("nothing-given-back-yet", current(cpu), mem_frames as i64);

    // Frames it may not give back.
    for (name, frame, want) in [
        ("frame-outside-physmap", physmap, Errno::EINVAL),
        ("frame-absurd", u64::MAX, Errno::EINVAL),
        ("frame-start-info", START_INFO_GPA / PAGE, Errno::EPERM),
        ("frame-zero", 0, Errno::EPERM),
    ] {
        c.err(name, reservation(cpu, true, &[frame], me), want);
    }

    // Give one back, then again; the same one twice in a list.
    c.expect("give-back", reservation(cpu, true, &[top], me), 1);
    c.err(
        "give-back-twice",
        reservation(cpu, true, &[top], me),
        Errno::ENOENT,
    );
    c.expect(
        "same-frame-twice-in-a-list",
        reservation(cpu, true, &[top - 1, top - 1], me),
        1,
    );
    c.expect("held-after-give-back", current(cpu), mem_frames as i64 - 2);
    c.err(
        "populate-held",
        reservation(cpu, false, &[top - 2], me),
        Errno::EEXIST,
    );
    c.err(
        "populate-outside-physmap",
        reservation(cpu, false, &[physmap + 1], me),
        Errno::EINVAL,
    );
    // Frames above `memory` are absent but beyond the host's maximum (set to `memory`): with
    // two given back, two may come back, the third is refused.
    if physmap > mem_frames {
        c.expect(
            "populate-above-memory-up-to-max",
            reservation(cpu, false, &[mem_frames, mem_frames + 1], me),
            2,
        );
        c.err(
            "populate-beyond-max",
            reservation(cpu, false, &[mem_frames + 2], me),
            Errno::ENOMEM,
        );
        c.err(
            "populate-back-beyond-max",
            reservation(cpu, false, &[top], me),
            Errno::ENOMEM,
        );
        c.expect(
            "give-back-above-memory",
            reservation(cpu, true, &[mem_frames, mem_frames + 1], me),
            2,
        );
    } else {
        kprintln!(cpu, "FAIL populate-beyond-max: needs maxmem > memory");
        c.failed += 1;
    }
    c.expect(
        "populate-back",
        reservation(cpu, false, &[top, top - 1], me),
        2,
    );
    // SAFETY: frame `top` is free RAM this job holds again (populated just above).
    let fresh = unsafe { ((top * PAGE) as *const u64).read_volatile() };
    c.expect("populated-page-is-zero", fresh as i64, 0);

    // A frame granted to dom0 and mapped there.
    let granted = top - 8;
    crate::grant::grant(1, 0, granted * PAGE, false);
    let Ok(port) = ev::alloc_unbound(cpu, 0) else {
        kprintln!(cpu, "FAIL port");
        return c.failed + 1;
    };
    kprintln!(
        cpu,
        "balloonhostile: grant ref 1 frame {granted:#x} port {port}"
    );
    let step = |cpu: &Cpu| -> bool {
        ev::poll(cpu, &[port], 30_000_000_000);
        ev::clear_pending(port)
    };
    if !step(cpu) {
        kprintln!(cpu, "FAIL no word from the host (mapped)");
        return c.failed + 1;
    }
    c.err(
        "give-back-mapped-grant",
        reservation(cpu, true, &[granted], me),
        Errno::EBUSY,
    );
    ev::doorbell(port);
    if !step(cpu) {
        kprintln!(cpu, "FAIL no word from the host (unmapped)");
        return c.failed + 1;
    }
    c.expect(
        "give-back-unmapped-grant",
        reservation(cpu, true, &[granted], me),
        1,
    );
    ev::doorbell(port);
    if !step(cpu) {
        kprintln!(cpu, "FAIL no word from the host (map refused)");
        return c.failed + 1;
    }
    let _ = crate::grant::end_access(1);

    // Reuse without populating. First every page held is touched, so that the host's memory of
    // the domain is exactly what it holds; then 16 are given back and written anyway.
    let reused: Vec<u64> = (0..16).map(|i| top - 64 - i).collect();
    for f in 0..mem_frames {
        if f != granted {
            // SAFETY: a read of a page this domain holds (identity-mapped); reading changes
            // nothing.
            unsafe { core::hint::black_box(((f * PAGE) as *const u8).read_volatile()) };
        }
    }
    c.expect(
        "give-back-to-reuse",
        reservation(cpu, true, &reused, me),
        16,
    );
    let held = current(cpu);
    for &f in &reused {
        // SAFETY: deliberately wrong: the frame was given back. The identity map still covers
        // it; the host backs it with a fresh page (and must take it away again).
        unsafe { ((f * PAGE) as *mut u64).write_volatile(0xdead_beef) };
    }
    // Any memory_op makes the host compare; the reservation itself does not change.
    c.expect("reuse-does-not-raise-held", current(cpu), held);
    let left = reused
        .iter()
        // SAFETY: as above, a read of a given-back frame (deliberately).
        .filter(|&&f| unsafe { ((f * PAGE) as *const u64).read_volatile() } != 0)
        .count();
    c.expect("reused-pages-were-freed-again", left as i64, 0);
    kprintln!(cpu, "balloonhostile: done, {} failed", c.failed);
    c.failed
}
