//! The guest's jobs, picked by the first word of the command line.

use pv_protocol::hypercall::{
    ABI_VERSION_MAJOR, ABI_VERSION_MINOR, Errno, FeatureInfo, Features, MAX_CONSOLE_IO, nr,
};
use pv_protocol::start_info::StartInfo;

use crate::hcall::Cpu;
use crate::kprintln;

/// Counts and prints checks as `PASS name` / `FAIL name: detail`.
struct Checks<'a> {
    cpu: &'a Cpu,
    passed: u32,
    failed: u32,
}

impl Checks<'_> {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            kprintln!(self.cpu, "PASS {name}");
        } else {
            self.failed += 1;
            kprintln!(self.cpu, "FAIL {name}: {detail}");
        }
    }
}

/// Checks every hypervisor service this kernel uses; returns the number of failures.
pub fn selftest(cpu: &Cpu, si: &StartInfo) -> u32 {
    let mut c = Checks {
        cpu,
        passed: 0,
        failed: 0,
    };
    c.check(
        "start-info",
        si.nr_vcpus >= 1 && si.mem_bytes >= 4 << 20 && si.tsc_khz > 0,
        format_args!(
            "vcpus {} mem {} tsc {}",
            si.nr_vcpus, si.mem_bytes, si.tsc_khz
        ),
    );

    let v = cpu.raw(nr::XEN_VERSION, [0; 6]);
    let want = (i64::from(ABI_VERSION_MAJOR) << 16) | i64::from(ABI_VERSION_MINOR);
    c.check(
        "version",
        v == want,
        format_args!("got {v:#x}, want {want:#x}"),
    );

    let mut fi = FeatureInfo::default();
    let r = cpu.raw(nr::XEN_VERSION, [6, (&raw mut fi) as u64, 0, 0, 0, 0]);
    // SAFETY: `fi` is a local the hypervisor just wrote through its guest-physical address;
    // volatile so the compiler does not assume it still holds the default.
    let fi = unsafe { core::ptr::read_volatile(&raw const fi) };
    c.check(
        "features",
        r == 0 && Features::from_bits_truncate(fi.submap).contains(Features::PORT_IO_HYPERCALL),
        format_args!("result {r}, submap {:#x}", fi.submap),
    );

    let msg = b"console: hello from the guest\n";
    let r = cpu.console_write(msg);
    c.check(
        "console-write",
        r == msg.len() as i64,
        format_args!("result {r}"),
    );

    let r = cpu.raw(999, [0; 6]);
    c.check(
        "unknown-hypercall-enosys",
        r == Errno::ENOSYS.as_i64(),
        format_args!("result {r}"),
    );

    let r = cpu.raw(nr::CONSOLE_IO, [0, 16, si.mem_bytes + 4096, 0, 0, 0]);
    c.check(
        "console-outside-memory-efault",
        r == Errno::EFAULT.as_i64(),
        format_args!("result {r}"),
    );

    let r = cpu.raw(
        nr::CONSOLE_IO,
        [0, u64::from(MAX_CONSOLE_IO) + 1, 0x20_0000, 0, 0, 0],
    );
    c.check(
        "console-too-long-einval",
        r == Errno::EINVAL.as_i64(),
        format_args!("result {r}"),
    );

    let r = cpu.try_shutdown(99, 0);
    c.check(
        "bad-shutdown-reason-einval",
        r == Errno::EINVAL.as_i64(),
        format_args!("result {r}"),
    );

    let r = cpu.yield_now();
    c.check("yield", r == 0, format_args!("result {r}"));

    // Every secondary vCPU announces itself; give them a bounded number of yields to get there.
    let want = si.nr_vcpus.saturating_sub(1);
    let mut tries = 0;
    while crate::secondaries_up() < want && tries < 100_000 {
        cpu.yield_now();
        tries += 1;
    }
    let up = crate::secondaries_up();
    c.check(
        "all-vcpus-up",
        up == want,
        format_args!("{up} of {want} secondaries"),
    );

    let mut q = pv_protocol::grant::GnttabQuerySize {
        dom: pv_protocol::grant::DomId::SELF.0,
        ..Default::default()
    };
    let r = cpu.raw(nr::GRANT_TABLE_OP, [6, (&raw mut q) as u64, 1, 0, 0, 0]);
    // SAFETY: `q` is a local the hypervisor wrote during the call.
    let q = unsafe { core::ptr::read_volatile(&raw const q) };
    c.check(
        "grant-query-size",
        r == 0 && q.status == 0 && q.nr_frames == si.grant_frames,
        format_args!(
            "result {r}, status {}, frames {} of {}",
            q.status, q.nr_frames, si.grant_frames
        ),
    );

    heap_checks(&mut c);
    evtchn_checks(&mut c, si);
    store_checks(&mut c, si);

    kprintln!(cpu, "selftest: {} passed, {} failed", c.passed, c.failed);
    c.failed
}

/// Throws garbage at the hypervisor: unknown calls, wild pointers and lengths, bad sub-ops. Every
/// call must come back with an error and the domain must keep running; exits 0 if it did.
/// `hostile [secs=S]`: garbage hypercalls (2000, or as many as fit in S seconds, with garbage
/// grant entries and doorbells on random ports between them), then scribbled store and console
/// ring indices. The host must refuse or survive all of it.
pub fn hostile(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let deadline = crate::control::secs_deadline(cmdline);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(si.domid);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let wild = [
        0,
        1,
        0xfff,
        si.mem_bytes - 1,
        si.mem_bytes,
        u64::MAX,
        1 << 63,
    ];
    let mut errors = 0u64;
    let mut ok = 0u64;
    let mut round = 0u64;
    while deadline.map_or(round < 2000, |d| !crate::control::past(d)) {
        round += 1;
        let nrs = [
            nr::CONSOLE_IO,
            nr::XEN_VERSION,
            nr::SCHED_OP,
            nr::GRANT_TABLE_OP,
            nr::EVENT_CHANNEL_OP,
            next() % 64,
            next(),
        ];
        let n = nrs[(round % nrs.len() as u64) as usize];
        let mut args = [0u64; 6];
        for a in &mut args {
            *a = match next() % 3 {
                0 => wild[(next() % wild.len() as u64) as usize],
                1 => next() % 16,
                _ => next(),
            };
        }
        // Never shut down, block or poll for real: this job must outlive its garbage. Unknown
        // sub-ops (4 and up) and yield stay.
        if n == nr::SCHED_OP && (1..=3).contains(&args[0]) {
            args[0] += 6;
        }
        if cpu.raw(n, args) < 0 {
            errors += 1;
        } else {
            ok += 1;
        }
        // Garbage grant entries, and doorbells on random ports, now and then (and at the end).
        if round.is_multiple_of(500) {
            garbage_grants_and_doorbells(&mut next);
        }
    }
    garbage_grants_and_doorbells(&mut next);
    kprintln!(
        cpu,
        "hostile: {round} garbage hypercalls, {errors} refused, {ok} accepted"
    );

    // Wild ring indices: the host must mark those rings broken, not follow them.
    kprintln!(cpu, "hostile: scribbling on the store and console rings");
    crate::console::flush(cpu);
    let store = pv_protocol::start_info::STORE_GPA as usize;
    let console = pv_protocol::start_info::CONSOLE_GPA as usize;
    // SAFETY: our own identity-mapped ring pages; the host reads the indices atomically.
    unsafe {
        ((store + 2052) as *mut u32).write_volatile(0xdead_beef); // req_prod
        ((console + 3084) as *mut u32).write_volatile(0x8000_0000); // out_prod
    }
    crate::evtchn::doorbell(si.store_evtchn);
    crate::evtchn::doorbell(si.console_evtchn);
    for _ in 0..100 {
        cpu.yield_now();
    }
    // The host stopped reading the broken console ring: this line goes out by hypercall.
    cpu.console_write(b"hostile: still alive\n");
    0
}

/// Writes garbage into 64 of our own grant entries and rings 200 random doorbells.
fn garbage_grants_and_doorbells(next: &mut impl FnMut() -> u64) {
    for gref in 0..64u32 {
        let addr = pv_protocol::start_info::GRANT_TABLE_GPA as usize + gref as usize * 8;
        // SAFETY: our own identity-mapped grant table; the host reads it only atomically.
        unsafe { (addr as *mut u64).write_volatile(next()) };
    }
    for _ in 0..200 {
        crate::evtchn::doorbell((next() % 4096) as u32);
    }
}

/// Prints `tick N` about every millisecond until the toolstack asks for a shutdown; for
/// pause/destroy tests. Between ticks it sleeps on the timer event (no spinning on the TSC).
pub fn ticker(cpu: &Cpu, si: &StartInfo) -> u32 {
    let per_ms = si.tsc_khz.max(1);
    let mut n = 0u64;
    loop {
        kprintln!(cpu, "tick {n}");
        n += 1;
        let next = crate::control::rdtsc() + per_ms;
        while !crate::control::past(next) {
            crate::control::sleep(cpu, &[], Some(next), 0, None);
        }
    }
}

/// `touch-beyond`: writes one byte just past the memory start-info gives (a gpa the domain
/// does not have). The host must crash the domain, naming the address; if the write returns,
/// the job says `touch-beyond: still running` and exits 1.
pub fn touch_beyond(cpu: &Cpu, si: &StartInfo) -> u32 {
    let gpa = si.mem_bytes + 0x1000;
    kprintln!(cpu, "touch-beyond: writing at {gpa:#x}");
    crate::console::flush(cpu);
    // SAFETY: deliberately outside the domain's memory (identity-mapped by the boot page
    // tables, backed by nothing): the host stops the domain at this access.
    unsafe { (gpa as *mut u8).write_volatile(0x5a) };
    kprintln!(cpu, "touch-beyond: still running");
    1
}

/// `timer [ms=N]` (default 200): checks the timer event. Bad requests get their defined errors;
/// a one-shot timer of N ms wakes a vCPU asleep in `sched_op(poll)` and one in `sched_op(block)`
/// no sooner than N ms later (by the TSC), is not pending halfway, and a stopped one never
/// fires. Prints `timer: poll woke after U us (asked N ms)` and the same for `block`, then
/// `timer: P passed, F failed`; exit code = failures.
pub fn timer(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    use crate::control::{past, rdtsc, ticks};
    use crate::evtchn as ev;
    use pv_protocol::evtchn::VIRQ_TIMER;
    use pv_protocol::hypercall::{MAX_TIMER_NS, TimerFlags};
    let mut c = Checks {
        cpu,
        passed: 0,
        failed: 0,
    };
    let ms = crate::text::num(cmdline, "ms", 200)
        .unwrap_or(200)
        .clamp(2, 10_000);
    let port = crate::timer::port();
    c.check("timer-bound", port != 0, format_args!("no VIRQ_TIMER port"));
    let none = TimerFlags::empty();
    let einval = Errno::EINVAL.as_i64();
    let r = ev::bind_virq(cpu, VIRQ_TIMER, 0);
    c.check(
        "timer-bind-twice-eexist",
        r == Err(Errno::EEXIST.as_i64()),
        format_args!("{r:?}"),
    );
    let r = ev::bind_virq(cpu, VIRQ_TIMER, 99);
    c.check(
        "timer-bind-no-vcpu-enoent",
        r == Err(Errno::ENOENT.as_i64()),
        format_args!("{r:?}"),
    );
    let r = ev::bind_virq(cpu, 5, 0);
    c.check(
        "timer-bind-other-virq-einval",
        r == Err(einval),
        format_args!("{r:?}"),
    );
    let r = cpu.set_timer(cpu.index + 1, 1_000_000, none);
    c.check("timer-other-vcpu-einval", r == einval, format_args!("{r}"));
    let r = cpu.set_timer(cpu.index, MAX_TIMER_NS + 1, none);
    c.check("timer-too-long-einval", r == einval, format_args!("{r}"));
    let r = cpu.set_timer(cpu.index, u64::MAX, none);
    c.check("timer-absurd-einval", r == einval, format_args!("{r}"));
    let r = cpu.raw(
        pv_protocol::hypercall::nr::VCPU_OP,
        [8, u64::from(cpu.index), si.mem_bytes, 0, 0, 0],
    );
    c.check(
        "timer-arg-outside-memory-efault",
        r == Errno::EFAULT.as_i64(),
        format_args!("{r}"),
    );
    let r = cpu.set_timer(cpu.index, 0, TimerFlags::FUTURE);
    c.check(
        "timer-past-etime",
        r == Errno::ETIME.as_i64(),
        format_args!("{r}"),
    );
    let r = cpu.stop_timer(cpu.index + 1);
    c.check("timer-stop-other-einval", r == einval, format_args!("{r}"));
    let r = ev::send(cpu, port);
    c.check("timer-send-einval", r == einval, format_args!("{r}"));
    // Without its port the timer has nowhere to fire: refused. Bound again afterwards.
    ev::close(cpu, port);
    let r = cpu.set_timer(cpu.index, 1_000_000, none);
    c.check(
        "timer-unbound-enoent",
        r == Errno::ENOENT.as_i64(),
        format_args!("{r}"),
    );
    crate::timer::init(cpu);
    let port = crate::timer::port();

    // Asleep in poll: not pending halfway, woken after the whole delay.
    let t0 = rdtsc();
    ev::clear_pending(port);
    let r = cpu.set_timer(cpu.index, ms * 1_000_000, none);
    ev::poll(cpu, &[], ms * 500_000);
    let early = ev::is_pending(port);
    ev::poll(cpu, &[port], 0);
    let us = (rdtsc() - t0) * 1000 / ticks(1).max(1);
    kprintln!(cpu, "timer: poll woke after {us} us (asked {ms} ms)");
    c.check(
        "timer-wakes-poll",
        r == 0 && !early && ev::clear_pending(port) && us >= ms * 1000,
        format_args!("result {r}, pending halfway {early}, {us} us"),
    );

    // Asleep in block, the port unmasked: woken after the whole delay.
    let t0 = rdtsc();
    ev::clear_pending(port);
    ev::take_upcall();
    let r = cpu.set_timer(cpu.index, ms * 1_000_000, none);
    ev::unmask(cpu, port);
    while !ev::is_pending(port) && !past(t0 + ticks(ms * 10)) {
        cpu.block();
    }
    ev::mask(port);
    let us = (rdtsc() - t0) * 1000 / ticks(1).max(1);
    kprintln!(cpu, "timer: block woke after {us} us (asked {ms} ms)");
    c.check(
        "timer-wakes-block",
        r == 0 && ev::clear_pending(port) && us >= ms * 1000,
        format_args!("result {r}, {us} us"),
    );

    // Stopped, or replaced by a later one: the first deadline passes without an event.
    let r1 = cpu.set_timer(cpu.index, 20_000_000, none);
    let r2 = cpu.stop_timer(cpu.index);
    ev::poll(cpu, &[port], 60_000_000);
    let fired_stopped = ev::clear_pending(port);
    let r3 = cpu.set_timer(cpu.index, 20_000_000, none);
    let r4 = cpu.set_timer(cpu.index, 200_000_000, none);
    ev::poll(cpu, &[port], 60_000_000);
    let fired_replaced = ev::clear_pending(port);
    cpu.stop_timer(cpu.index);
    crate::timer::forget_armed();
    c.check(
        "timer-stop-and-replace",
        [r1, r2, r3, r4] == [0; 4] && !fired_stopped && !fired_replaced,
        format_args!(
            "{r1} {r2} {r3} {r4}, stopped fired {fired_stopped}, replaced fired {fired_replaced}"
        ),
    );
    kprintln!(cpu, "timer: {} passed, {} failed", c.passed, c.failed);
    c.failed
}

/// Executes an undefined instruction with no IDT: a triple fault, which the host reports as a
/// crash with the registers.
pub fn crash(cpu: &Cpu) -> u32 {
    kprintln!(cpu, "crashing on purpose");
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

fn evtchn_checks(c: &mut Checks<'_>, si: &StartInfo) {
    use crate::evtchn as ev;
    use pv_protocol::evtchn::PortState;
    let cpu = c.cpu;
    let me = si.domid as u16;

    let a = ev::alloc_unbound(cpu, me);
    c.check(
        "evtchn-alloc-unbound",
        matches!(a, Ok(p) if p > 0),
        format_args!("{a:?}"),
    );
    let a = a.unwrap_or(0);
    let b = ev::bind_interdomain(cpu, me, a);
    c.check(
        "evtchn-bind-loopback",
        matches!(b, Ok(p) if p > 0 && p != a),
        format_args!("{b:?}"),
    );
    let b = b.unwrap_or(0);

    let st = ev::status(cpu, a);
    c.check(
        "evtchn-status",
        matches!(st, Ok(PortState::Interdomain { dom, port }) if dom.0 == me && port.0 == b),
        format_args!("{st:?}"),
    );

    // a and b are masked (everything is masked at boot): sends mark them pending, nothing more.
    ev::clear_pending(a);
    ev::take_upcall();
    let r = ev::send(cpu, b);
    c.check(
        "evtchn-send-marks-pending",
        r == 0 && ev::is_pending(a) && !ev::take_upcall(),
        format_args!("result {r}, pending {}", ev::is_pending(a)),
    );
    let r = ev::unmask(cpu, a);
    c.check(
        "evtchn-unmask-redelivers",
        r == 0 && ev::take_upcall(),
        format_args!("result {r}"),
    );
    ev::clear_pending(a);
    ev::doorbell(b);
    c.check(
        "evtchn-doorbell-send",
        ev::clear_pending(a),
        format_args!("no pending bit"),
    );
    ev::send(cpu, a);
    c.check(
        "evtchn-send-both-ways",
        ev::clear_pending(b),
        format_args!("no pending bit"),
    );

    let r = ev::poll(cpu, &[b], 1_000_000);
    c.check(
        "evtchn-poll-times-out",
        r == 0 && !ev::is_pending(b),
        format_args!("result {r}"),
    );
    ev::send(cpu, a);
    let r = ev::poll(cpu, &[b], 0);
    c.check(
        "evtchn-poll-returns-on-pending",
        r == 0 && ev::clear_pending(b),
        format_args!("result {r}"),
    );

    let r = ev::send(cpu, 4000);
    c.check(
        "evtchn-send-unallocated-einval",
        r == Errno::EINVAL.as_i64(),
        format_args!("result {r}"),
    );
    let r = ev::send(cpu, 5000);
    c.check(
        "evtchn-send-out-of-range-einval",
        r == Errno::EINVAL.as_i64(),
        format_args!("result {r}"),
    );
    let r = ev::bind_interdomain(cpu, 0x7fef, 1);
    c.check(
        "evtchn-bind-unknown-domain-einval",
        r == Err(Errno::EINVAL.as_i64()),
        format_args!("{r:?}"),
    );
    // A port offered to dom0 is not ours to bind.
    let offered = ev::alloc_unbound(cpu, 0).unwrap_or(0);
    let r = ev::bind_interdomain(cpu, me, offered);
    c.check(
        "evtchn-bind-not-offered-einval",
        r == Err(Errno::EINVAL.as_i64()),
        format_args!("{r:?}"),
    );
    ev::close(cpu, offered);

    let r = ev::close(cpu, b);
    let st = ev::status(cpu, a);
    c.check(
        "evtchn-close-unbinds-peer",
        r == 0 && matches!(st, Ok(PortState::Unbound { dom }) if dom.0 == me),
        format_args!("result {r}, peer {st:?}"),
    );
    let r = ev::send(cpu, b);
    c.check(
        "evtchn-send-closed-einval",
        r == Errno::EINVAL.as_i64(),
        format_args!("result {r}"),
    );
    ev::close(cpu, a);

    if si.nr_vcpus < 2 {
        kprintln!(cpu, "SKIP evtchn-wakes-blocked-vcpu: needs 2 vCPUs");
        return;
    }
    let Ok(w1) = ev::alloc_unbound(cpu, me) else {
        c.check("evtchn-wakes-blocked-vcpu", false, format_args!("no port"));
        return;
    };
    let w2 = ev::bind_interdomain(cpu, me, w1).unwrap_or(0);
    crate::WAKE_PORT.store(w1, core::sync::atomic::Ordering::Release);
    ev::unmask(cpu, w1);
    let before = crate::WOKEN.load(core::sync::atomic::Ordering::Acquire);
    ev::send(cpu, w2);
    let mut tries = 0;
    while crate::WOKEN.load(core::sync::atomic::Ordering::Acquire) == before && tries < 100_000 {
        cpu.yield_now();
        tries += 1;
    }
    let woken = crate::WOKEN.load(core::sync::atomic::Ordering::Acquire) - before;
    c.check(
        "evtchn-wakes-blocked-vcpu",
        woken == 1,
        format_args!("{woken} wake-ups"),
    );
    ev::mask(w1);
}

/// Offers a port to dom0, prints it, then answers 100 notifications from the host through the
/// doorbell; exits 0 when all arrived.
pub fn evtchn_host(cpu: &Cpu) -> u32 {
    use crate::evtchn as ev;
    let Ok(port) = ev::alloc_unbound(cpu, 0) else {
        kprintln!(cpu, "evtchn-host: alloc_unbound failed");
        return 1;
    };
    kprintln!(cpu, "evtchn-host port {port}");
    let mut n = 0;
    while n < 100 {
        ev::poll(cpu, &[port], 10_000_000_000);
        if !ev::clear_pending(port) {
            kprintln!(cpu, "evtchn-host: timed out after {n} round trips");
            return 1;
        }
        n += 1;
        ev::doorbell(port);
    }
    kprintln!(cpu, "evtchn-host: {n} round trips");
    0
}

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static mut OFFERED_RO: Page = Page([0; 4096]);
static mut OFFERED_RW: Page = Page([0; 4096]);
/// Pages 0 and 2 are granted as refs 6 and 7: a two-page ring whose frames are not neighbours.
static mut OFFERED_SCATTERED: [Page; 3] = [const { Page([0; 4096]) }; 3];

/// Grants pages to dom0 (and one to a stranger), then follows the host's lead over an event
/// channel: tries to revoke while mapped (must be refused), revokes after unmap, checks what the
/// host wrote. Grant refs: 1 read-only page, 2 writable page, 3 granted to domain 7, 4 a frame
/// outside memory, 5 never granted, 6 and 7 writable pages one page apart.
pub fn grant_offer(cpu: &Cpu, si: &StartInfo) -> u32 {
    use crate::evtchn as ev;
    use crate::grant::{EndError, end_access, grant};
    let ro = (&raw mut OFFERED_RO) as u64;
    let rw = (&raw mut OFFERED_RW) as u64;
    // SAFETY: this job is the only user of the two pages (vCPU 0 only); the host reads or writes
    // them only through grants, with its own synchronisation over the event channel.
    unsafe {
        let p = (&raw mut OFFERED_RO).cast::<u8>();
        for i in 0..4096 {
            p.add(i).write_volatile((i * 7) as u8);
        }
    }
    grant(1, 0, ro, true);
    grant(2, 0, rw, false);
    grant(3, 7, ro, false);
    grant(4, 0, si.mem_bytes + (16 << 12), false);
    let scattered = (&raw mut OFFERED_SCATTERED) as u64;
    grant(6, 0, scattered, false);
    grant(7, 0, scattered + 2 * 4096, false);
    let Ok(port) = ev::alloc_unbound(cpu, 0) else {
        return 1;
    };
    kprintln!(cpu, "grant-offer port {port} ro {ro:#x} rw {rw:#x}");
    let step = |n: u32| -> bool {
        ev::poll(cpu, &[port], 30_000_000_000);
        let ok = ev::clear_pending(port);
        if !ok {
            kprintln!(cpu, "grant-offer: no signal for step {n}");
        }
        ok
    };
    if !step(1) {
        return 1;
    }
    match end_access(2) {
        Err(EndError::InUse) => kprintln!(cpu, "revoke-while-mapped refused"),
        Ok(()) => kprintln!(cpu, "revoke-while-mapped ALLOWED"),
    }
    ev::doorbell(port);
    if !step(2) {
        return 1;
    }
    let r = end_access(2);
    kprintln!(
        cpu,
        "revoke-after-unmap {}",
        if r.is_ok() { "ok" } else { "refused" }
    );
    // SAFETY: the host unmapped the page (step 2) and we revoked the grant: ours again.
    let wrote: [u8; 16] = core::array::from_fn(|i| unsafe {
        // SAFETY: as above; `i < 16` stays inside the page.
        (&raw const OFFERED_RW).cast::<u8>().add(i).read_volatile()
    });
    kprintln!(
        cpu,
        "host-data {}",
        if &wrote == b"written by dom0!" {
            "ok"
        } else {
            "bad"
        }
    );
    let r = end_access(1);
    kprintln!(
        cpu,
        "revoke-ro {}",
        if r.is_ok() { "ok" } else { "refused" }
    );
    ev::doorbell(port);
    // Stay up until the host has checked the revoked entries.
    if !step(3) {
        return 1;
    }
    0
}

fn store_checks(c: &mut Checks<'_>, si: &StartInfo) {
    use crate::store::{StoreFail, request};
    use pv_protocol::store::{MsgType, StoreErrno};
    let cpu = c.cpu;
    let mut out = [0u8; 4096];
    let rd = |path: &str, out: &mut [u8]| {
        request(cpu, MsgType::Read, 0, &[path.as_bytes(), b"\0"], out).map(|r| r.len)
    };

    let r = rd("domid", &mut out);
    let mut num = [0u8; 16];
    let home = crate::text::fmt_u32(&mut num, si.domid);
    c.check(
        "store-read-home",
        matches!(r, Ok(n) if out[..n] == *home),
        format_args!("{r:?}"),
    );
    let r = rd("name", &mut out);
    c.check(
        "store-read-name",
        matches!(r, Ok(n) if n > 0),
        format_args!("{r:?}"),
    );

    let w = request(cpu, MsgType::Write, 0, &[b"data/x\0", b"hello"], &mut out);
    let r = rd("data/x", &mut out);
    c.check(
        "store-write-read",
        w.is_ok() && matches!(r, Ok(5)) && &out[..5] == b"hello",
        format_args!("write {w:?}, read {r:?}"),
    );
    let r = request(cpu, MsgType::Directory, 0, &[b"data\0"], &mut out);
    c.check(
        "store-directory",
        matches!(r, Ok(rep) if &out[..rep.len] == b"x\0"),
        format_args!("{r:?}"),
    );
    let r = rd("/local/domain", &mut out);
    c.check(
        "store-foreign-read-eacces",
        r == Err(StoreFail::Errno(StoreErrno::EACCES)),
        format_args!("{r:?}"),
    );
    let r = request(
        cpu,
        MsgType::Write,
        0,
        &[b"/local/domain/0/x\0", b"1"],
        &mut out,
    );
    c.check(
        "store-foreign-write-eacces",
        r == Err(StoreFail::Errno(StoreErrno::EACCES)),
        format_args!("{r:?}"),
    );

    // Watches: one event at registration, one for a change below the path.
    let r = request(cpu, MsgType::Watch, 0, &[b"data\0", b"tok\0"], &mut out);
    let first = crate::store::next_event(cpu, &mut out);
    let w = request(cpu, MsgType::Write, 0, &[b"data/y\0", b"2"], &mut [0u8; 16]);
    let second = crate::store::next_event(cpu, &mut out);
    let ends_with = |n: usize, suffix: &[u8]| out[..n].ends_with(suffix);
    c.check(
        "store-watch-fires",
        r.is_ok()
            && first.is_some()
            && w.is_ok()
            && second.is_some_and(|n| ends_with(n, b"/data/y\0tok\0")),
        format_args!("watch {r:?}, first {first:?}, second {second:?}"),
    );
    let _ = request(cpu, MsgType::Unwatch, 0, &[b"data\0", b"tok\0"], &mut out);

    // Transactions: commit applies; a conflicting change makes the commit fail with EAGAIN.
    let tx = request(cpu, MsgType::TransactionStart, 0, &[b"\0"], &mut out)
        .map(|r| parse_u32(&out[..r.len]));
    let tx = tx.ok().flatten().unwrap_or(0);
    let w = request(
        cpu,
        MsgType::Write,
        tx,
        &[b"data/t\0", b"tx"],
        &mut [0u8; 16],
    );
    let e = request(cpu, MsgType::TransactionEnd, tx, &[b"T\0"], &mut [0u8; 16]);
    let r = rd("data/t", &mut out);
    c.check(
        "store-transaction-commits",
        tx != 0 && w.is_ok() && e.is_ok() && matches!(r, Ok(2)),
        format_args!("tx {tx}, write {w:?}, end {e:?}, read {r:?}"),
    );
    let tx = request(cpu, MsgType::TransactionStart, 0, &[b"\0"], &mut out)
        .ok()
        .and_then(|r| parse_u32(&out[..r.len]))
        .unwrap_or(0);
    let _ = request(
        cpu,
        MsgType::Write,
        tx,
        &[b"data/t\0", b"inside"],
        &mut [0u8; 16],
    );
    let _ = request(
        cpu,
        MsgType::Write,
        0,
        &[b"data/t\0", b"outside"],
        &mut [0u8; 16],
    );
    let e = request(cpu, MsgType::TransactionEnd, tx, &[b"T\0"], &mut [0u8; 16]);
    c.check(
        "store-transaction-conflict-eagain",
        e == Err(StoreFail::Errno(StoreErrno::EAGAIN)),
        format_args!("{e:?}"),
    );

    // Malformed messages get error replies; the connection keeps working.
    let mut bad = [0u8; 16];
    bad[0..4].copy_from_slice(&999u32.to_le_bytes());
    let r = crate::store::raw(cpu, &bad, &mut out);
    let p = request(cpu, MsgType::Read, 0, &[b"data/a b\0"], &mut out);
    let still = rd("data/x", &mut out);
    c.check(
        "store-malformed-answered",
        matches!(r, Err(StoreFail::Errno(_)))
            && matches!(p, Err(StoreFail::Errno(StoreErrno::EINVAL)))
            && still.is_ok(),
        format_args!("unknown type {r:?}, bad path {p:?}, after {still:?}"),
    );

    // Quota: a guest cannot grow the store without bound.
    let mut made = 0u32;
    let quota_hit = loop {
        let mut path = [0u8; 32];
        let n = fmt_path(&mut path, made);
        match request(cpu, MsgType::Write, 0, &[&path[..n], b"v"], &mut [0u8; 16]) {
            Ok(_) => made += 1,
            Err(e) => break Some(e),
        }
        if made > 5000 {
            break None;
        }
    };
    c.check(
        "store-quota-enospc",
        quota_hit == Some(StoreFail::Errno(StoreErrno::ENOSPC)),
        format_args!("{quota_hit:?} after {made} nodes"),
    );
    let r = request(cpu, MsgType::Rm, 0, &[b"q\0"], &mut out);
    let gone = rd("q/n0", &mut out);
    c.check(
        "store-rm-subtree",
        r.is_ok() && gone == Err(StoreFail::Errno(StoreErrno::ENOENT)),
        format_args!("rm {r:?}, then {gone:?}"),
    );
}

/// Writes `q/n<i>\0` into `buf`; returns its length.
fn fmt_path(buf: &mut [u8; 32], i: u32) -> usize {
    let mut d = [0u8; 16];
    let digits = crate::text::fmt_u32(&mut d, i);
    buf[..3].copy_from_slice(b"q/n");
    buf[3..3 + digits.len()].copy_from_slice(digits);
    buf[3 + digits.len()] = 0;
    4 + digits.len()
}

/// Tries to read and write another domain's store subtree (`store-peek <domid>`); exits 0 when
/// both are refused.
pub fn store_peek(cpu: &Cpu, cmdline: &str) -> u32 {
    use crate::store::{StoreFail, request};
    use pv_protocol::store::{MsgType, StoreErrno};
    let Some(victim) = cmdline.split_whitespace().nth(1) else {
        kprintln!(cpu, "usage: store-peek DOMID");
        return 2;
    };
    let mut path = [0u8; 64];
    let mut len = 0;
    for part in [b"/local/domain/".as_slice(), victim.as_bytes(), b"/name\0"] {
        let n = part.len().min(64 - len);
        path[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    let mut out = [0u8; 256];
    let r = request(cpu, MsgType::Read, 0, &[&path[..len]], &mut out);
    let w = request(cpu, MsgType::Write, 0, &[&path[..len], b"pwned"], &mut out);
    let denied = Err(StoreFail::Errno(StoreErrno::EACCES));
    kprintln!(cpu, "store-peek read {r:?} write {w:?}");
    if r == denied && w == denied { 0 } else { 1 }
}

/// Tries to remove its own home and to take it over with `set_perms` (`store-home`); exits 0
/// when both are refused and the home still works (a node written in it reads back).
pub fn store_home(cpu: &Cpu, si: &StartInfo) -> u32 {
    use crate::store::{Path, StoreFail, request};
    use pv_protocol::store::{MsgType, StoreErrno};
    let mut num = [0u8; 16];
    let id = crate::text::fmt_u32(&mut num, si.domid);
    let home = Path::new(&[b"/local/domain", id]);
    let mut out = [0u8; 256];
    let rm = request(cpu, MsgType::Rm, 0, &[home.as_bytes(), b"\0"], &mut out);
    let mut owner = [0u8; 17];
    owner[0] = b'b';
    owner[1..1 + id.len()].copy_from_slice(id);
    let perms = [home.as_bytes(), b"\0", &owner[..1 + id.len()], b"\0"];
    let sp = request(cpu, MsgType::SetPerms, 0, &perms, &mut out);
    let w = request(cpu, MsgType::Write, 0, &[b"data/kept\0", b"yes"], &mut out);
    let r = request(cpu, MsgType::Read, 0, &[b"data/kept\0"], &mut out).map(|r| r.len);
    kprintln!(
        cpu,
        "store-home rm {rm:?} set-perms {sp:?} write {w:?} read {r:?}"
    );
    let denied = Err(StoreFail::Errno(StoreErrno::EACCES));
    let kept = w.is_ok() && matches!(r, Ok(3)) && &out[..3] == b"yes";
    if rm == denied && sp == denied && kept {
        0
    } else {
        1
    }
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Measures exit and event costs (`bench [N]`): prints `bench <name> <ns per operation>` lines,
/// five rounds of each so the host can take medians. The event-channel round trips need a host
/// responder bound to the port it prints.
pub fn bench(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    use crate::evtchn as ev;
    const ROUNDS: u64 = 5;
    let n: u64 = cmdline
        .split_whitespace()
        .nth(1)
        .and_then(|s| parse_u32(s.as_bytes()))
        .map_or(20_000, u64::from)
        .max(ROUNDS)
        / ROUNDS;
    let ns = |cycles: u64| cycles * 1_000_000 / si.tsc_khz.max(1) / n;
    let timed = |name: &str, op: &dyn Fn()| {
        for _ in 0..ROUNDS {
            let t = rdtsc();
            for _ in 0..n {
                op();
            }
            kprintln!(cpu, "bench {name} {}", ns(rdtsc() - t));
        }
    };
    timed("hypercall_ns", &|| {
        cpu.raw(nr::XEN_VERSION, [0; 6]);
    });
    timed("pio_exit_vmm_ns", &|| {
        // SAFETY: a write to a port the hypervisor ignores; no memory is touched.
        unsafe { core::arch::asm!("out 0xe9, al", in("al") 0u8, options(nomem, nostack)) }
    });
    timed("pio_exit_kernel_ns", &|| {
        // SAFETY: as above (the POST-code port).
        unsafe { core::arch::asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack)) }
    });

    let Ok(port) = ev::alloc_unbound(cpu, 0) else {
        return 1;
    };
    kprintln!(cpu, "bench port {port}");
    // Wait for the host responder: ping until it answers (pings sent before it bound are lost),
    // then let stray answers to extra pings arrive and drop them.
    let mut answered = false;
    for _ in 0..300 {
        ev::doorbell(port);
        ev::poll(cpu, &[port], 100_000_000);
        if ev::clear_pending(port) {
            answered = true;
            break;
        }
    }
    if !answered {
        kprintln!(cpu, "bench: no responder");
        return 1;
    }
    ev::poll(cpu, &[port], 20_000_000);
    ev::clear_pending(port);
    let round_trip = |kick: &dyn Fn()| {
        kick();
        while !ev::clear_pending(port) {
            ev::poll(cpu, &[port], 1_000_000_000);
        }
    };
    timed("evtchn_rtt_doorbell_ns", &|| {
        round_trip(&|| ev::doorbell(port))
    });
    timed("evtchn_rtt_hypercall_ns", &|| {
        round_trip(&|| {
            ev::send(cpu, port);
        })
    });
    0
}

/// Talks to another guest over an event channel that dom0 set up, learning its part from the
/// store as a Xen front end does: the host writes `peer` = `serve <port>` (our port, offered to
/// the peer) or `bind <domid> <port>`; then 100 pings go one way and 100 answers the other.
pub fn evtchn_peer(cpu: &Cpu) -> u32 {
    use crate::evtchn as ev;
    use crate::store::request;
    use pv_protocol::store::MsgType;
    let mut out = [0u8; 128];
    let _ = request(cpu, MsgType::Watch, 0, &[b"peer\0", b"p\0"], &mut out);
    let mut plan = None;
    for _ in 0..30 {
        if let Ok(r) = request(cpu, MsgType::Read, 0, &[b"peer\0"], &mut out) {
            plan = Some(r.len);
            break;
        }
        crate::store::next_event(cpu, &mut [0u8; 256]);
    }
    let Some(len) = plan else {
        kprintln!(cpu, "evtchn-peer: no plan in the store");
        return 1;
    };
    let text = core::str::from_utf8(&out[..len]).unwrap_or("");
    let mut words = text.split_whitespace();
    let num = |w: Option<&str>| w.and_then(|w| parse_u32(w.as_bytes()));
    let (port, serving) = match words.next() {
        Some("serve") => (num(words.next()), true),
        Some("bind") => {
            let (d, p) = (num(words.next()), num(words.next()));
            match (d, p) {
                (Some(d), Some(p)) => (ev::bind_interdomain(cpu, d as u16, p).ok(), false),
                _ => (None, false),
            }
        }
        _ => (None, false),
    };
    let Some(port) = port else {
        kprintln!(cpu, "evtchn-peer: bad plan {text:?}");
        return 1;
    };
    let wait = |n: u32| -> bool {
        for _ in 0..100 {
            if ev::clear_pending(port) {
                return true;
            }
            ev::poll(cpu, &[port], 100_000_000);
        }
        kprintln!(cpu, "evtchn-peer: nothing after {n} exchanges");
        false
    };
    for i in 0..100 {
        if serving {
            if !wait(i) {
                return 1;
            }
            ev::send(cpu, port);
        } else {
            ev::send(cpu, port);
            if !wait(i) {
                return 1;
            }
        }
    }
    // Exactly once: nothing extra arrives.
    ev::poll(cpu, &[port], 50_000_000);
    let extra = ev::clear_pending(port);
    kprintln!(
        cpu,
        "evtchn-peer: 100 exchanges as {}, extra {extra}",
        if serving { "server" } else { "client" }
    );
    u32::from(extra)
}

fn heap_checks(c: &mut Checks<'_>) {
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    let v: Vec<u64> = (0..10_000).collect();
    let sum: u64 = v.iter().sum();
    // black_box keeps the compiler from eliding the allocations.
    let first = core::hint::black_box(Box::new([7u8; 100]));
    let addr = (&raw const *first) as usize;
    drop(first);
    // A freed block of the same size class is reused.
    let again = core::hint::black_box(Box::new([9u8; 100]));
    let reused = (&raw const *again) as usize == addr;
    c.check(
        "allocator",
        sum == 49_995_000 && reused && again[99] == 9,
        format_args!("sum {sum}, reused {reused}"),
    );
}

use pv_protocol::blkif::{VERIFY_REGIONS as BLKVERIFY_REGIONS, VerifySeg as Seg};

use crate::text::parse_u32;

/// Connects to the first disk (waiting up to about 5 s for the toolstack to attach it) with up
/// to `queues` rings of `2^order` pages, or prints why not.
fn connect_disk(cpu: &Cpu, order: u32, queues: usize) -> Option<crate::blkfront::BlkFront> {
    crate::blkfront::BlkFront::connect(cpu, 500, order, queues)
        .map_err(|e| kprintln!(cpu, "FAIL blk-connect: {e}"))
        .ok()
}

fn fill_region(sector: u64, segs: &[Seg], pattern: bool) {
    fill_salted(sector, segs, pattern, 0);
}

/// As [`fill_region`], the pattern XORed with `salt` (a pass number: stale data shows).
fn fill_salted(sector: u64, segs: &[Seg], pattern: bool, salt: u8) {
    let mut off = sector * 512;
    for &(page, first, last) in segs {
        let Some(base) = crate::blkfront::data_page(page) else {
            return;
        };
        for b in usize::from(first) * 512..(usize::from(last) + 1) * 512 {
            let v = if pattern {
                pv_protocol::blkif::verify_pattern(off) ^ salt
            } else {
                0xee
            };
            // SAFETY: `b < PAGE_SIZE` inside a data page this kernel owns; no request is in
            // flight while it is filled.
            unsafe { base.add(b).write_volatile(v) };
            off += 1;
        }
    }
}

fn check_region(sector: u64, segs: &[Seg], zeros: bool) -> bool {
    check_salted(sector, segs, zeros, 0)
}

/// As [`check_region`], for a pattern written by [`fill_salted`] with `salt`.
fn check_salted(sector: u64, segs: &[Seg], zeros: bool, salt: u8) -> bool {
    let mut off = sector * 512;
    let mut ok = true;
    for &(page, first, last) in segs {
        let Some(base) = crate::blkfront::data_page(page) else {
            return false;
        };
        for b in usize::from(first) * 512..(usize::from(last) + 1) * 512 {
            let want = if zeros {
                0
            } else {
                pv_protocol::blkif::verify_pattern(off) ^ salt
            };
            // SAFETY: as in `fill_region`; the read request completed.
            ok &= unsafe { base.add(b).read_volatile() } == want;
            off += 1;
        }
    }
    ok
}

/// Writes known patterns across the disk (several sizes and alignments, up to the largest
/// direct request), flushes, reads everything back and checks it, discards a region and checks
/// it reads as zeros, and checks that a request past the end fails. Exit code = failures.
pub fn blkverify(cpu: &Cpu) -> u32 {
    use pv_protocol::blkif::BlkStatus;
    let mut c = Checks {
        cpu,
        passed: 0,
        failed: 0,
    };
    // As many queues as the back end offers: requests rotate over them, so every ring is used.
    let Some(mut disk) = connect_disk(cpu, 2, crate::blkfront::MAX_QUEUES) else {
        return 1;
    };
    c.check("blk-connect", true, format_args!(""));
    kprintln!(
        cpu,
        "blkverify: disk of {} sectors, {} queue(s)",
        disk.sectors,
        disk.queues()
    );
    for (i, &(sector, segs)) in BLKVERIFY_REGIONS.iter().enumerate() {
        fill_region(sector, segs, true);
        let s = disk.rw(cpu, true, sector, segs);
        c.check(
            "blk-write",
            s == BlkStatus::Okay,
            format_args!("region {i}: {s:?}"),
        );
    }
    let s = disk.flush(cpu);
    c.check("blk-flush", s == BlkStatus::Okay, format_args!("{s:?}"));
    for (i, &(sector, segs)) in BLKVERIFY_REGIONS.iter().enumerate() {
        fill_region(sector, segs, false);
        let s = disk.rw(cpu, false, sector, segs);
        let ok = s == BlkStatus::Okay && check_region(sector, segs, false);
        c.check("blk-read-back", ok, format_args!("region {i}: {s:?}"));
    }
    let (sector, segs) = BLKVERIFY_REGIONS[2];
    let s = disk.discard(cpu, sector, 88);
    fill_region(sector, segs, false);
    let r = disk.rw(cpu, false, sector, segs);
    c.check(
        "blk-discard-reads-zero",
        s == BlkStatus::Okay && r == BlkStatus::Okay && check_region(sector, segs, true),
        format_args!("discard {s:?}, read {r:?}"),
    );
    let s = disk.rw(cpu, false, disk.sectors - 4, &[(0, 0, 7)]);
    c.check(
        "blk-past-end-error",
        s == BlkStatus::Error,
        format_args!("{s:?}"),
    );
    kprintln!(cpu, "blkverify: {} passed, {} failed", c.passed, c.failed);
    c.failed
}

/// `blksoak [secs=S] [balloon=1]` (default 10 s): a bystander for soak tests. Until S seconds
/// have passed, it writes the `blkverify` regions with a pattern that changes every pass,
/// flushes, reads them back and checks every byte; it reports its progress every 10 s and ends
/// with `blksoak: done, P passes, E errors`. Exit code = errors (a failed request or a wrong
/// byte, or with `balloon=1` a checking balloon's bad page, which follows its target meanwhile).
pub fn blksoak(cpu: &Cpu, cmdline: &str) -> u32 {
    let ballooning = crate::text::num(cmdline, "balloon", 0) == Some(1)
        && crate::balloon::start(cpu, true).is_some();
    use pv_protocol::blkif::BlkStatus;
    let deadline = crate::control::secs_deadline(cmdline)
        .unwrap_or_else(|| crate::control::rdtsc() + crate::control::ticks(10_000));
    let Some(mut disk) = connect_disk(cpu, 2, crate::blkfront::MAX_QUEUES) else {
        return 1;
    };
    kprintln!(
        cpu,
        "blksoak: disk of {} sectors, {} queue(s)",
        disk.sectors,
        disk.queues()
    );
    let (mut pass, mut errors) = (0u64, 0u32);
    let mut report = crate::control::rdtsc() + crate::control::ticks(10_000);
    while !crate::control::past(deadline) {
        pass += 1;
        let salt = (pass as u8).wrapping_mul(37) | 1;
        for (i, &(sector, segs)) in BLKVERIFY_REGIONS.iter().enumerate() {
            fill_salted(sector, segs, true, salt);
            let s = disk.rw(cpu, true, sector, segs);
            if s != BlkStatus::Okay {
                errors += 1;
                kprintln!(cpu, "blksoak: pass {pass}: write of region {i}: {s:?}");
            }
        }
        let s = disk.flush(cpu);
        if s != BlkStatus::Okay {
            errors += 1;
            kprintln!(cpu, "blksoak: pass {pass}: flush: {s:?}");
        }
        for (i, &(sector, segs)) in BLKVERIFY_REGIONS.iter().enumerate() {
            fill_region(sector, segs, false);
            let s = disk.rw(cpu, false, sector, segs);
            if s != BlkStatus::Okay || !check_salted(sector, segs, false, salt) {
                errors += 1;
                kprintln!(cpu, "blksoak: pass {pass}: read-back of region {i}: {s:?}");
            }
        }
        if crate::control::past(report) {
            kprintln!(cpu, "blksoak: pass {pass}, {errors} errors");
            report = crate::control::rdtsc() + crate::control::ticks(10_000);
        }
        crate::control::poll(cpu);
        if ballooning && let Some(b) = crate::balloon::poll(cpu) {
            crate::balloon::report(cpu, &b);
        }
    }
    let bad = if ballooning {
        crate::balloon::bad_pages()
    } else {
        0
    };
    kprintln!(cpu, "blksoak: done, {pass} passes, {errors} errors");
    errors + bad as u32
}

/// Writes the `blkverify` patterns (all regions but the discarded one), flushes, says so, then
/// sleeps forever: the durability test kills the whole VMM process at that point.
pub fn blkwrite(cpu: &Cpu) -> u32 {
    use pv_protocol::blkif::BlkStatus;
    let Some(mut disk) = connect_disk(cpu, 0, 1) else {
        return 1;
    };
    for (i, &(sector, segs)) in BLKVERIFY_REGIONS.iter().enumerate() {
        if i == 2 {
            continue;
        }
        fill_region(sector, segs, true);
        if disk.rw(cpu, true, sector, segs) != BlkStatus::Okay {
            kprintln!(cpu, "blkwrite: write {i} failed");
            return 1;
        }
    }
    if disk.flush(cpu) != BlkStatus::Okay {
        kprintln!(cpu, "blkwrite: flush failed");
        return 1;
    }
    kprintln!(cpu, "blkwrite: flushed");
    loop {
        cpu.block();
    }
}

/// On a read-only disk: a write must fail, a read must succeed (and see the host's pattern in
/// region 1). Exit code = failures.
pub fn blkro(cpu: &Cpu) -> u32 {
    use pv_protocol::blkif::BlkStatus;
    let mut c = Checks {
        cpu,
        passed: 0,
        failed: 0,
    };
    let Some(mut disk) = connect_disk(cpu, 0, 1) else {
        return 1;
    };
    let (sector, segs) = BLKVERIFY_REGIONS[1];
    fill_region(sector, segs, false);
    let w = disk.rw(cpu, true, sector, segs);
    c.check(
        "blk-ro-write-refused",
        w == BlkStatus::Error,
        format_args!("{w:?}"),
    );
    let r = disk.rw(cpu, false, sector, segs);
    c.check(
        "blk-ro-read",
        r == BlkStatus::Okay && check_region(sector, segs, false),
        format_args!("{r:?}"),
    );
    let f = disk.flush(cpu);
    c.check(
        "blk-ro-flush-refused",
        f == BlkStatus::Error,
        format_args!("{f:?}"),
    );
    kprintln!(cpu, "blkro: {} passed, {} failed", c.passed, c.failed);
    c.failed
}

/// `blkbench [SECONDS [QUEUES [BATCH [CASES]]]]`: 4 KiB random reads at queue depth 32 (spread
/// over QUEUES rings, default 1; polling for responses, or with BATCH > 0 sleeping until BATCH
/// are ready), then 1 MiB sequential reads and writes (one indirect request at a time),
/// each for SECONDS; prints IOPS and MB/s. CASES picks them: 1 the random reads, 2 the
/// sequential ones, 3 (the default) both.
pub fn blkbench(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    use crate::blkfront::{BlkFront, DATA_GREF};
    use pv_protocol::blkif::{BlkRequest, BlkSegment, BlkStatus, DirectSegments};
    use pv_protocol::grant::GrantRef;
    let mut args = cmdline.split_whitespace().skip(1);
    let mut arg = |default| {
        args.next()
            .and_then(|s| parse_u32(s.as_bytes()))
            .unwrap_or(default)
    };
    let secs = arg(5);
    let queues = arg(1) as usize;
    // 0: poll while requests are in flight; n: sleep until n responses are ready.
    let batch = arg(0);
    // Which cases (bits): 1 the random reads at depth 32, 2 the sequential ones (default both),
    // 4 the latency of random reads at depth 1.
    let cases = arg(3);
    let Some(mut disk) = connect_disk(cpu, 2, queues) else {
        return 1;
    };
    let nq = disk.queues();
    let tsc_per_s = si.tsc_khz * 1000;
    let budget = u64::from(secs) * tsc_per_s;
    let pages_4k = disk.sectors / 8;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };

    // 4 KiB random reads, 32 in flight; slot i uses data page i, on queue i % nq.
    const QD: usize = 32;
    let read4k = |disk: &mut BlkFront, page: usize, sector: u64| {
        let id = disk.next_id() << 8 | page as u64;
        let seg = BlkSegment {
            gref: GrantRef(DATA_GREF + page as u32),
            first_sect: 0,
            last_sect: 7,
        };
        let segments = DirectSegments::from_slice(&[seg]).unwrap_or_default();
        disk.push(
            page % nq,
            BlkRequest::Read {
                id,
                handle: 0,
                sector,
                segments,
            },
        )
    };
    let mut errors = 0u64;
    if cases & 1 != 0 {
        for page in 0..QD {
            read4k(&mut disk, page, (rand() % pages_4k) * 8);
        }
        for q in 0..nq {
            disk.kick(q);
        }
        let start = rdtsc();
        let mut done = 0u64;
        let (mut round, mut idle_since) = (0usize, rdtsc());
        while rdtsc() - start < budget {
            let q = round % nq;
            round += 1;
            // Re-issue every request that finished on this queue, each published at once (as
            // fio does with its default batch of one): holding them back until the responses
            // stop coming would leave the disk idle while they trickle in. Publishing is a
            // store and a fence; the doorbell only rings when the back end sleeps.
            let mut any = false;
            while let Some((id, status)) = disk.try_one(q) {
                any = true;
                done += 1;
                errors += u64::from(status != BlkStatus::Okay);
                read4k(&mut disk, (id & 0xff) as usize, (rand() % pages_4k) * 8);
                disk.kick(q);
            }
            if any {
                idle_since = rdtsc();
            } else if rdtsc() - idle_since > tsc_per_s {
                // Nothing for a second: a broken ring, not a slow disk.
                errors += 1;
                break;
            } else if batch > 0 && q == nq - 1 {
                disk.sleep_for_batch(cpu, batch);
            } else {
                core::hint::spin_loop();
            }
        }
        let elapsed = rdtsc() - start;
        for q in 0..nq {
            while disk.in_flight(q) > 0 {
                if disk.wait_one(cpu, q).is_none() {
                    break;
                }
            }
        }
        let iops = done * tsc_per_s / elapsed.max(1);
        kprintln!(
            cpu,
            "blkbench randread_4k_qd32_iops {iops} errors {errors} queues {nq}"
        );
    }

    // 4 KiB random reads one at a time, each timed from push to response, the vCPU asleep on
    // the event channel meanwhile (as an interrupt-driven kernel waits): a busy domain's latency.
    if cases & 4 != 0 {
        const SAMPLES: usize = 2000;
        let mut lat_us = [0u32; SAMPLES];
        let mut n = 0;
        let start = rdtsc();
        while n < SAMPLES && rdtsc() - start < budget {
            let t0 = rdtsc();
            read4k(&mut disk, 0, (rand() % pages_4k) * 8);
            disk.kick(0);
            let got = loop {
                if let Some(r) = disk.try_one(0) {
                    break Some(r);
                }
                if rdtsc() - t0 > tsc_per_s {
                    break None;
                }
                disk.sleep_for_batch(cpu, 1);
            };
            match got {
                Some((_, BlkStatus::Okay)) => {}
                Some(_) => errors += 1,
                None => {
                    // Unanswered for a second: a broken ring, not a slow disk.
                    errors += 1;
                    break;
                }
            }
            let us = (rdtsc() - t0) * 1000 / si.tsc_khz.max(1);
            lat_us[n] = u32::try_from(us).unwrap_or(u32::MAX);
            n += 1;
        }
        let lat = &mut lat_us[..n];
        lat.sort_unstable();
        let pick = |q: usize| lat.get((n * q / 100).min(n.saturating_sub(1))).copied();
        kprintln!(
            cpu,
            "blkbench randread_4k_qd1_us p50 {} p99 {} reads {n} errors {errors}",
            pick(50).unwrap_or(0),
            pick(99).unwrap_or(0)
        );
    }

    // 1 MiB sequential, one request at a time.
    let seq = if cases & 2 != 0 {
        &[("seqread_1m_mbps", false), ("seqwrite_1m_mbps", true)][..]
    } else {
        &[]
    };
    for &(name, write) in seq {
        let span = disk.sectors / 2048;
        let start = rdtsc();
        let mut n = 0u64;
        while rdtsc() - start < budget {
            let sector = (n % span) * 2048;
            if disk.rw_indirect(cpu, write, sector, 0, 256) != BlkStatus::Okay {
                errors += 1;
            }
            n += 1;
        }
        let mbps = n * tsc_per_s / (rdtsc() - start).max(1);
        kprintln!(cpu, "blkbench {name} {mbps} errors {errors}");
    }
    u32::from(errors > 0)
}
