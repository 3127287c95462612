//! The Splitvisor guest kernel.
//!
//! A freestanding 64-bit kernel that the hypervisor enters directly in long mode on every vCPU
//! (`rdi` = start-info page, `rsi` = vCPU index; memory identity-mapped). It talks to the
//! hypervisor only through hypercalls (one `out` to the hypercall port after filling the vCPU's
//! hypercall page) and shared pages described by pv-protocol. The job comes from the command
//! line: `selftest` checks the hypervisor's services and shuts down with the number of failures
//! as its exit code; `hostile` throws garbage at the hypervisor to prove it survives; `idle` and
//! `hotplug` wait for the toolstack (shutdown requests, console input, devices coming and going);
//! `idle` and `balloon` follow the toolstack's memory target (`balloon`).
//!
//! Memory: the image is small; the boot stacks and then the heap (which holds every page a
//! device grants) lie above it, inside the memory start-info gives; the balloon manages the free
//! RAM above the heap. Sleeping: every job that waits sleeps in `sched_op(poll)` on exactly what
//! can wake it (its ports, the store's watch events, console input, and the timer event only
//! where it has a deadline): an idle guest costs the host nothing.
// `cargo clippy --all-targets` checks this binary in test mode too (with std and its panic
// handler); the freestanding attributes apply to the real build only.
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![deny(missing_docs)]

extern crate alloc;

mod balloon;
mod balloonhostile;
mod blkfront;
mod blkhostile;
mod blockforever;
mod console;
mod control;
mod demo;
mod evtchn;
mod grant;
mod hcall;
mod heap;
mod hotplug;
mod jobs;
#[cfg(not(test))]
mod mem;
mod net;
mod netfront;
mod netjobs;
mod store;
mod sync;
mod text;
mod timer;

use core::sync::atomic::{AtomicU32, Ordering};

use pv_protocol::hypercall::ShutdownReason;
use pv_protocol::start_info::{KERNEL_FREE_PER_VCPU, MAX_VCPUS, START_INFO_GPA, StartInfo};

use crate::hcall::Cpu;

/// Bytes of boot stack per vCPU: what the hypervisor leaves free per vCPU above the image.
const STACK_SIZE: usize = KERNEL_FREE_PER_VCPU as usize;

unsafe extern "C" {
    /// The end of the loaded image (page-aligned; link.ld). The boot stacks follow it, one per
    /// vCPU, then the heap, up to the end of the memory start-info gives: nothing the kernel
    /// uses lies outside the domain's memory, however small (the hypervisor refuses a domain
    /// without room for the image, the stacks and `KERNEL_FREE_MIN`).
    static __kernel_end: u8;
}

/// Where the boot stacks start: vCPU `i`'s is `[i * STACK_SIZE, (i + 1) * STACK_SIZE)` above.
fn stacks_base() -> usize {
    (&raw const __kernel_end) as usize
}

// Entry: rdi = start-info, rsi = vCPU index. Each vCPU below start-info's vCPU count (and
// MAX_VCPUS) takes its own stack above the image, clears the frame pointer and calls `kmain`,
// which never returns; any other halts.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".globl _start",
    "_start:",
    "    cmp rsi, {max}",
    "    jae 2f",
    "    mov eax, dword ptr [{si} + {nr_vcpus}]",
    "    cmp rsi, rax",
    "    jae 2f",
    "    lea rax, [rsi + 1]",
    "    imul rax, rax, {stack}",
    "    lea rsp, [rip + {end}]",
    "    add rsp, rax",
    "    xor ebp, ebp",
    "    call {kmain}",
    "2:  hlt",
    "    jmp 2b",
    max = const MAX_VCPUS,
    si = const START_INFO_GPA,
    nr_vcpus = const core::mem::offset_of!(StartInfo, nr_vcpus),
    stack = const STACK_SIZE,
    end = sym __kernel_end,
    kmain = sym kmain,
);

/// Secondary vCPUs that reached `kmain`.
static SECONDARIES_UP: AtomicU32 = AtomicU32::new(0);
/// Port whose events secondary vCPUs consume (0: none yet).
pub static WAKE_PORT: AtomicU32 = AtomicU32::new(0);
/// Wake-ups secondary vCPUs saw on [`WAKE_PORT`].
pub static WOKEN: AtomicU32 = AtomicU32::new(0);

extern "C" fn kmain(start_info: u64, index: u64) -> ! {
    let cpu = Cpu::new(index as u32);
    // SAFETY: the hypervisor maps the start-info page at this address before entering us and
    // never changes it afterwards; the reference lives as long as the kernel.
    let si: &'static StartInfo = unsafe { &*(start_info as *const StartInfo) };
    if start_info != START_INFO_GPA || !si.is_compatible() {
        console::print(&cpu, format_args!("guest: incompatible start-info\n"));
        cpu.shutdown(ShutdownReason::Crash, 255);
    }
    if cpu.index != 0 {
        SECONDARIES_UP.fetch_add(1, Ordering::AcqRel);
        // Secondary vCPUs sleep in sched_op(block) and count wake-ups on the wake port (the
        // selftest's proof that an event wakes a blocked vCPU).
        loop {
            cpu.block();
            let port = WAKE_PORT.load(Ordering::Acquire);
            if port != 0 && evtchn::clear_pending(port) {
                WOKEN.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
    // The heap: what the stacks leave of the memory start-info gives.
    let heap_base = stacks_base() + si.nr_vcpus as usize * STACK_SIZE;
    let heap_end = si.mem_bytes.min(si.mapped_bytes) as usize;
    heap::init(heap_base, heap_end);
    evtchn::mask_all();
    console::init(si);
    store::init(si);
    control::init(&cpu, si);
    let cmdline = si.cmdline();
    let job = cmdline.split_whitespace().next().unwrap_or("selftest");
    kprintln!(
        &cpu,
        "splitvisor guest: domain {} with {} vCPU(s), {} MiB ({} KiB heap), cmdline {:?}",
        si.domid,
        si.nr_vcpus,
        si.mem_bytes >> 20,
        heap::untouched() >> 10,
        cmdline
    );
    let code = match job {
        "selftest" => jobs::selftest(&cpu, si),
        "demo" => demo::demo(&cpu, si, cmdline),
        "hostile" => jobs::hostile(&cpu, si, cmdline),
        "ticker" => jobs::ticker(&cpu, si),
        "evtchn-host" => jobs::evtchn_host(&cpu),
        "grant-offer" => jobs::grant_offer(&cpu, si),
        "store-peek" => jobs::store_peek(&cpu, cmdline),
        "store-home" => jobs::store_home(&cpu, si),
        "bench" => jobs::bench(&cpu, si, cmdline),
        "evtchn-peer" => jobs::evtchn_peer(&cpu),
        "blkverify" => jobs::blkverify(&cpu),
        "blksoak" => jobs::blksoak(&cpu, cmdline),
        "blkwrite" => jobs::blkwrite(&cpu),
        "blkro" => jobs::blkro(&cpu),
        "blkbench" => jobs::blkbench(&cpu, si, cmdline),
        "blkhostile" => blkhostile::blkhostile(&cpu, cmdline),
        "crash" => jobs::crash(&cpu),
        "netecho" => netjobs::netecho(&cpu, si, cmdline),
        "ping" => netjobs::ping(&cpu, si, cmdline),
        "udpcheck" => netjobs::udpcheck(&cpu, si, cmdline),
        "udpsink" => netjobs::udpsink(&cpu, si, cmdline),
        "udpbench" => netjobs::udpbench(&cpu, si, cmdline),
        "nethostile" => netjobs::nethostile(&cpu, si, cmdline),
        "idle" => {
            // An idle domain follows `xl mem-set` (a watch on its memory target).
            let _ = balloon::init(&cpu, si, false);
            control::idle(&cpu)
        }
        "balloon" => balloon::job(&cpu, si, cmdline),
        "balloonhostile" => balloonhostile::balloonhostile(&cpu, si),
        "timer" => jobs::timer(&cpu, si, cmdline),
        "touch-beyond" => jobs::touch_beyond(&cpu, si),
        "hotplug" => hotplug::hotplug(&cpu, cmdline),
        "block-forever" => blockforever::block_forever(&cpu),
        other => {
            kprintln!(&cpu, "unknown job {other:?}");
            2
        }
    };
    cpu.shutdown(ShutdownReason::Poweroff, code)
}

/// The vCPU whose boot stack holds `sp`.
pub fn cpu_of_stack(sp: usize) -> u32 {
    (sp.wrapping_sub(stacks_base()) / STACK_SIZE).min(MAX_VCPUS - 1) as u32
}

/// How many secondary vCPUs have started.
pub fn secondaries_up() -> u32 {
    SECONDARIES_UP.load(Ordering::Acquire)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let cpu = Cpu::current();
    kprintln!(&cpu, "guest panic: {info}");
    cpu.shutdown(ShutdownReason::Crash, 254)
}
