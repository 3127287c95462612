//! Hypercall dispatch: read the vCPU's hypercall page once, parse it into a checked call,
//! perform it, write the result back.
//!
//! Every argument is hostile: the request is copied out of guest memory once and parsed by
//! pv-protocol; every guest address is accessed through checked copies; each failure becomes a
//! defined negative errno for the guest and a counted, once-logged fault for the host.

use std::mem::offset_of;

use pv_protocol::hypercall::{
    ABI_VERSION_MAJOR, ABI_VERSION_MINOR, ConsoleIoCmd, Errno, FeatureInfo, Features, Hypercall,
    HypercallRequest, SchedCmd, SchedShutdown, Shutdown, XenVersionCmd, encode_result,
};
use pv_protocol::start_info::hypercall_page;

use crate::domain::{DomainShared, DomainState};

/// Features this hypervisor offers.
pub fn features() -> Features {
    Features::PORT_IO_HYPERCALL | Features::CONSOLE_IO
}

/// Handles the hypercall vCPU `vcpu` just made; returns a final state if the domain stops.
pub(crate) fn handle(dom: &DomainShared, vcpu: u32) -> Option<DomainState> {
    let page = hypercall_page(vcpu);
    let req: HypercallRequest = match dom.ram.read_obj(page) {
        Ok(r) => r,
        Err(e) => {
            // The page is inside every valid domain's memory; this means a bug, not a guest fault.
            tracing::error!(
                domid = dom.id,
                "vCPU {vcpu}: hypercall page unreadable: {e}"
            );
            return None;
        }
    };
    let mut stop = None;
    let result = match Hypercall::parse(&req) {
        Ok(call) => dispatch(dom, vcpu, call, &mut stop),
        Err(e) => {
            dom.guest_fault(
                "bad-hypercall",
                format_args!("vCPU {vcpu}: hypercall {} rejected: {e}", req.nr),
            );
            Err(e.errno())
        }
    };
    let at = page + offset_of!(HypercallRequest, result) as u64;
    if let Err(e) = dom.ram.write_obj(at, &encode_result(result)) {
        tracing::error!(
            domid = dom.id,
            "vCPU {vcpu}: cannot write hypercall result: {e}"
        );
    }
    stop
}

fn efault(dom: &DomainShared, vcpu: u32, what: &str, e: crate::memory::MemoryError) -> Errno {
    dom.guest_fault("bad-address", format_args!("vCPU {vcpu}: {what}: {e}"));
    Errno::EFAULT
}

fn dispatch(
    dom: &DomainShared,
    vcpu: u32,
    call: Hypercall,
    stop: &mut Option<DomainState>,
) -> Result<u64, Errno> {
    match call {
        Hypercall::XenVersion(XenVersionCmd::Version) => {
            Ok((u64::from(ABI_VERSION_MAJOR) << 16) | u64::from(ABI_VERSION_MINOR))
        }
        Hypercall::XenVersion(XenVersionCmd::GetFeatures { arg }) => {
            let mut fi: FeatureInfo = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| efault(dom, vcpu, "feature info", e))?;
            fi.submap = if fi.submap_idx == 0 {
                features().bits()
            } else {
                0
            };
            dom.ram
                .write_obj(arg.0, &fi)
                .map_err(|e| efault(dom, vcpu, "feature info", e))?;
            Ok(0)
        }
        Hypercall::ConsoleIo(ConsoleIoCmd::Write { buf, len }) => {
            let mut bytes = vec![0u8; len as usize];
            dom.ram
                .read(buf.0, &mut bytes)
                .map_err(|e| efault(dom, vcpu, "console buffer", e))?;
            dom.console.write(&bytes);
            Ok(u64::from(len))
        }
        // No console input source yet: nothing to read.
        Hypercall::ConsoleIo(ConsoleIoCmd::Read { .. }) => Ok(0),
        Hypercall::SchedOp(SchedCmd::Yield) => {
            std::thread::yield_now();
            Ok(0)
        }
        Hypercall::SchedOp(SchedCmd::Block) => {
            dom.block();
            Ok(0)
        }
        Hypercall::SchedOp(SchedCmd::Shutdown { arg }) => {
            let raw: SchedShutdown = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| efault(dom, vcpu, "shutdown argument", e))?;
            let s = Shutdown::parse(&raw).map_err(|e| {
                dom.guest_fault("bad-hypercall", format_args!("vCPU {vcpu}: shutdown: {e}"));
                e.errno()
            })?;
            *stop = Some(DomainState::Shutdown {
                reason: s.reason,
                code: s.exit_code,
            });
            Ok(0)
        }
        // Event channels and grant tables land in the next steps of the hypervisor issue.
        Hypercall::SchedOp(SchedCmd::Poll { .. })
        | Hypercall::GrantTableOp(_)
        | Hypercall::EventChannelOp { .. } => {
            dom.guest_fault("unimplemented", format_args!("vCPU {vcpu}: {call:?}"));
            Err(Errno::ENOSYS)
        }
    }
}
