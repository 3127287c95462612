//! Hypercall dispatch: read the vCPU's hypercall page once, parse it into a checked call,
//! perform it, write the result back.
//!
//! Every argument is hostile: the request is copied out of guest memory once and parsed by
//! pv-protocol; every guest address is accessed through checked copies; each failure becomes a
//! defined negative errno for the guest and a counted, once-logged fault for the host.

use std::mem::offset_of;
use std::sync::Arc;

use pv_protocol::evtchn::{
    AllocUnboundArg, BindInterdomainArg, BindVirqArg, EvtchnCommand, EvtchnOp, MAX_PORTS_2L,
    StatusArg,
};
use pv_protocol::grant::{DomId, GnttabQuerySize, GnttabSetupTable, GrantStatus};
use pv_protocol::hypercall::{
    ABI_VERSION_MAJOR, ABI_VERSION_MINOR, ConsoleIoCmd, Errno, FeatureInfo, Features, GnttabCmd,
    Hypercall, HypercallRequest, SchedCmd, SchedShutdown, Shutdown, XenVersionCmd, encode_result,
};
use pv_protocol::hypercall::{
    Poll, SchedPoll, SingleshotTimer, TimerFlags, VcpuOpCmd, VcpuSetSingleshotTimer,
};
use pv_protocol::start_info::{GRANT_TABLE_GPA, hypercall_page};
use std::time::Duration;
use zerocopy::FromBytes;

use crate::evtchn;

use crate::domain::{DomainShared, DomainState};

/// Features this hypervisor offers.
pub fn features() -> Features {
    Features::PORT_IO_HYPERCALL
        | Features::CONSOLE_IO
        | Features::EVTCHN_2L
        | Features::SCHED_POLL
        | Features::GRANT_TABLE_V1
        | Features::SINGLESHOT_TIMER
}

/// Handles the hypercall vCPU `vcpu` just made; returns a final state if the domain stops.
pub(crate) fn handle(dom: &Arc<DomainShared>, vcpu: u32) -> Option<DomainState> {
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
    dom: &Arc<DomainShared>,
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
            dom.block(vcpu);
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
        Hypercall::SchedOp(SchedCmd::Poll { arg }) => {
            let raw: SchedPoll = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| efault(dom, vcpu, "poll argument", e))?;
            let p = Poll::parse(&raw).map_err(|e| {
                dom.guest_fault("bad-hypercall", format_args!("vCPU {vcpu}: poll: {e}"));
                e.errno()
            })?;
            let mut bytes = vec![0u8; p.nr_ports as usize * 4];
            dom.ram
                .read(p.ports.0, &mut bytes)
                .map_err(|e| efault(dom, vcpu, "poll ports", e))?;
            let ports: Vec<u32> = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if ports.iter().any(|&port| port >= MAX_PORTS_2L) {
                dom.guest_fault("bad-port", format_args!("vCPU {vcpu}: poll on {ports:?}"));
                return Err(Errno::EINVAL);
            }
            evtchn::poll(dom, vcpu, &ports, p.timeout_ns.map(Duration::from_nanos));
            Ok(0)
        }
        Hypercall::VcpuOp(cmd) => vcpu_op(dom, vcpu, cmd),
        Hypercall::EventChannelOp { op, arg } => event_channel_op(dom, vcpu, op, arg.0),
        Hypercall::MemoryOp(cmd) => crate::reservation::memory_op(dom, vcpu, cmd),
        Hypercall::GrantTableOp(GnttabCmd::QuerySize { arg }) => {
            let mut q: GnttabQuerySize = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| efault(dom, vcpu, "query_size argument", e))?;
            if own_domain(dom, DomId(q.dom)).is_ok() {
                q.nr_frames = dom.grant_frames;
                q.max_nr_frames = dom.grant_frames;
                q.status = GrantStatus::Okay.as_i16();
            } else {
                q.status = GrantStatus::BadDomain.as_i16();
            }
            dom.ram
                .write_obj(arg.0, &q)
                .map_err(|e| efault(dom, vcpu, "query_size argument", e))?;
            Ok(0)
        }
        // The table sits at a fixed place (start-info says where): setup reports its frames.
        Hypercall::GrantTableOp(GnttabCmd::SetupTable { arg }) => {
            let mut t: GnttabSetupTable = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| efault(dom, vcpu, "setup_table argument", e))?;
            if own_domain(dom, DomId(t.dom)).is_err() {
                t.status = GrantStatus::BadDomain.as_i16();
            } else if t.nr_frames > dom.grant_frames {
                t.status = GrantStatus::GeneralError.as_i16();
            } else {
                let frames: Vec<u8> = (0..u64::from(t.nr_frames))
                    .flat_map(|i| ((GRANT_TABLE_GPA >> 12) + i).to_le_bytes())
                    .collect();
                dom.ram
                    .write(t.frame_list, &frames)
                    .map_err(|e| efault(dom, vcpu, "setup_table frame list", e))?;
                t.status = GrantStatus::Okay.as_i16();
            }
            dom.ram
                .write_obj(arg.0, &t)
                .map_err(|e| efault(dom, vcpu, "setup_table argument", e))?;
            Ok(0)
        }
    }
}

/// `VCPU_OP`: the one-shot timer of the calling vCPU (naming another is `EINVAL`, as in Xen).
fn vcpu_op(dom: &Arc<DomainShared>, vcpu: u32, cmd: VcpuOpCmd) -> Result<u64, Errno> {
    let fault = |e: Errno, what: std::fmt::Arguments<'_>| {
        dom.guest_fault("bad-timer", format_args!("vCPU {vcpu}: {what}: {e:?}"));
        e
    };
    match cmd {
        VcpuOpCmd::SetSingleshotTimer { vcpu: v, arg } => {
            if v != vcpu {
                return Err(fault(Errno::EINVAL, format_args!("timer of vCPU {v}")));
            }
            let raw: VcpuSetSingleshotTimer = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| efault(dom, vcpu, "timer argument", e))?;
            let t = SingleshotTimer::parse(&raw)
                .map_err(|e| fault(e.errno(), format_args!("timer: {e}")))?;
            if t.timeout_ns == 0 && t.flags.contains(TimerFlags::FUTURE) {
                return Err(Errno::ETIME);
            }
            dom.set_timer(vcpu, t.timeout_ns)
                .map_err(|e| fault(e, format_args!("timer of {} ns", t.timeout_ns)))?;
        }
        VcpuOpCmd::StopSingleshotTimer { vcpu: v } => {
            if v != vcpu {
                return Err(fault(Errno::EINVAL, format_args!("stop timer of vCPU {v}")));
            }
            dom.stop_timer(vcpu);
        }
    }
    Ok(0)
}

/// Resolves `DOMID_SELF`; an unprivileged domain may name only itself.
fn own_domain(dom: &DomainShared, named: DomId) -> Result<u32, Errno> {
    if named == DomId::SELF || u32::from(named.0) == dom.id {
        Ok(dom.id)
    } else {
        Err(Errno::EPERM)
    }
}

fn remote_domain(dom: &DomainShared, named: DomId) -> u32 {
    if named == DomId::SELF {
        dom.id
    } else {
        u32::from(named.0)
    }
}

fn event_channel_op(dom: &DomainShared, vcpu: u32, op: EvtchnOp, arg: u64) -> Result<u64, Errno> {
    let mut bytes = vec![0u8; op.arg_size()];
    dom.ram
        .read(arg, &mut bytes)
        .map_err(|e| efault(dom, vcpu, "event-channel argument", e))?;
    let cmd = EvtchnCommand::parse(op, &bytes).map_err(|e| {
        dom.guest_fault(
            "bad-hypercall",
            format_args!("vCPU {vcpu}: event channel: {e}"),
        );
        Errno::EINVAL
    })?;
    let fault = |e: Errno| {
        dom.guest_fault("bad-port", format_args!("vCPU {vcpu}: {cmd:?}: {e:?}"));
        e
    };
    // Output fields are written back into the guest's argument struct.
    let write_u32 = |offset: usize, v: u32| {
        dom.ram
            .write_obj(arg + offset as u64, &v)
            .map_err(|e| efault(dom, vcpu, "event-channel result", e))
    };
    match cmd {
        EvtchnCommand::AllocUnbound { dom: d, remote_dom } => {
            own_domain(dom, d).map_err(fault)?;
            let port = evtchn::alloc_unbound(dom, remote_domain(dom, remote_dom)).map_err(fault)?;
            write_u32(offset_of!(AllocUnboundArg, port), port)?;
        }
        EvtchnCommand::BindInterdomain {
            remote_dom,
            remote_port,
        } => {
            let rd = remote_domain(dom, remote_dom);
            let port = evtchn::bind_interdomain(dom, rd, remote_port.0).map_err(fault)?;
            write_u32(offset_of!(BindInterdomainArg, local_port), port)?;
        }
        EvtchnCommand::Send(p) => evtchn::send(dom, p.0).map_err(fault)?,
        EvtchnCommand::Close(p) => evtchn::close(dom, p.0).map_err(fault)?,
        EvtchnCommand::Unmask(p) => evtchn::unmask(dom, p.0).map_err(fault)?,
        EvtchnCommand::Status { dom: d, port } => {
            own_domain(dom, d).map_err(fault)?;
            let state = evtchn::status(dom, port.0).map_err(fault)?;
            let mut st = StatusArg::read_from_bytes(&bytes).map_err(|_| Errno::EINVAL)?;
            st.set_result(0, state);
            dom.ram
                .write_obj(arg, &st)
                .map_err(|e| efault(dom, vcpu, "event-channel result", e))?;
        }
        EvtchnCommand::BindVirq { virq, vcpu: v } => {
            let port = evtchn::bind_virq(dom, virq, v).map_err(fault)?;
            write_u32(offset_of!(BindVirqArg, port), port)?;
        }
        EvtchnCommand::BindIpi { .. }
        | EvtchnCommand::BindVcpu { .. }
        | EvtchnCommand::Reset(_) => {
            dom.guest_fault("unimplemented", format_args!("vCPU {vcpu}: {cmd:?}"));
            return Err(Errno::ENOSYS);
        }
    }
    Ok(0)
}
