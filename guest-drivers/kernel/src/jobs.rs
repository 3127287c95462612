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

    kprintln!(cpu, "selftest: {} passed, {} failed", c.passed, c.failed);
    c.failed
}

/// Throws garbage at the hypervisor: unknown calls, wild pointers and lengths, bad sub-ops. Every
/// call must come back with an error and the domain must keep running; exits 0 if it did.
pub fn hostile(cpu: &Cpu, si: &StartInfo) -> u32 {
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
    let mut errors = 0u32;
    let mut ok = 0u32;
    for round in 0..2000u64 {
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
    }
    kprintln!(
        cpu,
        "hostile: 2000 garbage hypercalls, {errors} refused, {ok} accepted; still alive"
    );
    0
}

/// Prints `tick N` about every millisecond (by the TSC) forever; for pause/destroy tests.
pub fn ticker(cpu: &Cpu, si: &StartInfo) -> u32 {
    let per_ms = si.tsc_khz.max(1);
    let mut n = 0u64;
    loop {
        kprintln!(cpu, "tick {n}");
        n += 1;
        // SAFETY: rdtsc has no preconditions.
        let start = unsafe { core::arch::x86_64::_rdtsc() };
        // SAFETY: as above.
        while unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(start) < per_ms {
            core::hint::spin_loop();
        }
    }
}

/// Executes an undefined instruction with no IDT: a triple fault, which the host reports as a
/// crash with the registers.
pub fn crash(cpu: &Cpu) -> u32 {
    kprintln!(cpu, "crashing on purpose");
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
