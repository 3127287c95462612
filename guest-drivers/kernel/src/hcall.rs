//! Hypercalls: fill this vCPU's hypercall page, then one `out` to the hypercall port.

use core::arch::asm;
use core::ptr::{self, NonNull};

use pv_protocol::hypercall::{
    ConsoleIoCmd, Gpa, HYPERCALL_PORT, Hypercall, HypercallRequest, SchedCmd, SchedShutdown,
    ShutdownReason, TimerFlags, VcpuSetSingleshotTimer, nr,
};
use pv_protocol::start_info::hypercall_page;

/// The calling vCPU: its index and its hypercall page.
#[derive(Debug)]
pub struct Cpu {
    /// vCPU index.
    pub index: u32,
    page: NonNull<HypercallRequest>,
}

impl Cpu {
    /// The vCPU with index `index` (its hypercall page is identity-mapped at a fixed address).
    pub fn new(index: u32) -> Self {
        let page = hypercall_page(index) as *mut HypercallRequest;
        Self {
            index,
            page: NonNull::new(page).unwrap_or(NonNull::dangling()),
        }
    }

    /// The vCPU running this code, found from the boot stack it runs on.
    pub fn current() -> Self {
        let sp: usize;
        // SAFETY: reads the stack pointer; no memory access.
        unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
        Self::new(crate::cpu_of_stack(sp))
    }

    /// Raw hypercall `nr` with up to six arguments; returns the result (`< 0`: an errno).
    pub fn raw(&self, nr: u64, args: [u64; 6]) -> i64 {
        let req = HypercallRequest {
            nr,
            args,
            result: 0,
            _reserved: [0; 8],
        };
        // SAFETY: the page is this vCPU's own hypercall page, identity-mapped by the hypervisor
        // and used by no other vCPU; volatile because the host reads it during the `out`.
        unsafe { ptr::write_volatile(self.page.as_ptr(), req) };
        // SAFETY: a write to the hypercall port traps to the hypervisor, which reads the page,
        // performs the call and stores the result before the instruction retires. The asm has no
        // `nomem`, so the compiler orders the page accesses around it.
        unsafe {
            asm!("out {port}, al", port = const HYPERCALL_PORT, in("al") 0u8,
                options(nostack, preserves_flags))
        };
        // SAFETY: as for the write above.
        unsafe { ptr::read_volatile(&raw const (*self.page.as_ptr()).result) }
    }

    /// Issues a decoded hypercall.
    pub fn call(&self, h: Hypercall) -> i64 {
        let r = h.to_request();
        self.raw(r.nr, r.args)
    }

    /// Writes `bytes` to the hypervisor's console log.
    pub fn console_write(&self, bytes: &[u8]) -> i64 {
        self.call(Hypercall::ConsoleIo(ConsoleIoCmd::Write {
            buf: Gpa(bytes.as_ptr() as u64),
            len: bytes.len() as u32,
        }))
    }

    /// Gives up the vCPU for a moment.
    pub fn yield_now(&self) -> i64 {
        self.call(Hypercall::SchedOp(SchedCmd::Yield))
    }

    /// Sleeps until an unmasked event is pending.
    pub fn block(&self) -> i64 {
        self.call(Hypercall::SchedOp(SchedCmd::Block))
    }

    /// Arms vCPU `vcpu`'s one-shot timer `timeout_ns` from now (`VCPU_OP(SET_SINGLESHOT_TIMER)`):
    /// its `VIRQ_TIMER` port becomes pending then. Returns 0 or an errno.
    pub fn set_timer(&self, vcpu: u32, timeout_ns: u64, flags: TimerFlags) -> i64 {
        let arg = VcpuSetSingleshotTimer {
            timeout_ns,
            flags: flags.bits(),
            _pad: 0,
        };
        self.raw(
            nr::VCPU_OP,
            [8, u64::from(vcpu), (&raw const arg) as u64, 0, 0, 0],
        )
    }

    /// Disarms vCPU `vcpu`'s one-shot timer.
    pub fn stop_timer(&self, vcpu: u32) -> i64 {
        self.raw(nr::VCPU_OP, [9, u64::from(vcpu), 0, 0, 0, 0])
    }

    /// Asks for a shutdown with `reason` and `exit_code`; returns the error if refused.
    pub fn try_shutdown(&self, reason: u32, exit_code: u32) -> i64 {
        let arg = SchedShutdown { reason, exit_code };
        self.raw(nr::SCHED_OP, [2, (&raw const arg) as u64, 0, 0, 0, 0])
    }

    /// Shuts the domain down (after the console ring drained); never returns.
    pub fn shutdown(&self, reason: ShutdownReason, exit_code: u32) -> ! {
        crate::console::flush(self);
        loop {
            self.try_shutdown(reason as u32, exit_code);
        }
    }
}
