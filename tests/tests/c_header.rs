//! The C header of the Linux front ends (`guest-drivers/linux/include/splitvisor/abi.h`) agrees
//! with pv-protocol on every size, field offset and constant.
//!
//! The test writes a C program: `_Static_assert`s on `sizeof`, `offsetof` and each constant, with
//! the expected values taken from pv-protocol (`size_of`, `offset_of!`, the Rust constants), plus a
//! `main` that prints what a static assertion cannot compare (store key strings, the error-name
//! list, ring sizes for every page count). It compiles the program with gcc against the header,
//! runs it and compares its output. A missing gcc fails the test: it is required.

use splitvisor_tests::tool;
use std::fmt::{Display, Write as _};
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use pv_protocol::blkif::{self, BlkOp, BlkStatus, DiscardFlags, IndirectOp, VdiskInfo};
use pv_protocol::evtchn::{self, EvtchnOp, EvtchnStatusKind};
use pv_protocol::grant::{self, DomId, GrantFlags, GrantStatus};
use pv_protocol::hypercall::{
    self, ConsoleIoCmd, Errno, Features, GnttabCmd, Gpa, Hypercall, SchedCmd, ShutdownReason,
    TimerFlags, VcpuOpCmd, XenVersionCmd,
};
use pv_protocol::netif::{self, NetExtraFlags, NetRxFlags, NetTxFlags, NetifStatus};
use pv_protocol::platform::{self, PlatformFeatures};
use pv_protocol::ring::{self, RingProtocol};
use pv_protocol::start_info;
use pv_protocol::store::{self, MsgType, ServerFeatures, StoreErrno};

/// The C program being built.
#[derive(Default)]
struct Gen {
    asserts: String,
    prints: String,
}

impl Gen {
    /// `c` (a C constant expression) must equal `v`.
    fn eq(&mut self, c: &str, v: impl Display) {
        writeln!(
            self.asserts,
            "_Static_assert(({c}) == ({v}), \"{} == {v}\");",
            c.replace('"', "'")
        )
        .unwrap();
    }

    /// `c` (a C string expression) is printed as `label=<value>` by the program.
    fn string(&mut self, label: &str, c: &str) {
        writeln!(self.prints, "\tprintf(\"%s=%s\\n\", \"{label}\", {c});").unwrap();
    }

    /// The first call to a hypercall sub-op: the `args[0]` pv-protocol encodes.
    fn sub_op(&mut self, c: &str, call: Hypercall) {
        self.eq(c, call.to_request().args[0]);
    }
}

/// `sizeof(struct c)` and `offsetof(struct c, f)` for each field equal the Rust type's.
macro_rules! layout {
    ($g:expr, $c:literal, $t:ty, [$($f:ident),* $(,)?]) => {{
        $g.eq(concat!("sizeof(struct ", $c, ")"), size_of::<$t>());
        $( $g.eq(concat!("offsetof(struct ", $c, ", ", stringify!($f), ")"), offset_of!($t, $f)); )*
    }};
}

fn platform(g: &mut Gen) {
    g.eq("SV_CPUID_BASE", platform::CPUID_BASE);
    g.eq("SV_CPUID_LEAF_SIGNATURE", platform::LEAF_SIGNATURE);
    g.eq("SV_CPUID_LEAF_VERSION", platform::LEAF_VERSION);
    g.eq("SV_CPUID_LEAF_START_INFO", platform::LEAF_START_INFO);
    g.eq("SV_CPUID_LEAF_VCPU", platform::LEAF_VCPU);
    g.eq("SV_CPUID_LEAF_MAX", platform::LEAF_MAX);
    g.eq("SV_CPUID_SCAN_FIRST", platform::CPUID_SCAN_FIRST);
    g.eq("SV_CPUID_SCAN_END", platform::CPUID_SCAN_END);
    g.eq("SV_CPUID_SCAN_STEP", platform::CPUID_SCAN_STEP);
    g.eq("SV_CPUID_SIGNATURE_EBX", platform::SIGNATURE_EBX);
    g.eq("SV_CPUID_SIGNATURE_ECX", platform::SIGNATURE_ECX);
    g.eq("SV_CPUID_SIGNATURE_EDX", platform::SIGNATURE_EDX);
    g.eq(
        "SV_PLATFORM_F_START_INFO",
        PlatformFeatures::START_INFO.bits(),
    );
    g.eq(
        "SV_PLATFORM_F_VCPU_INDEX",
        PlatformFeatures::VCPU_INDEX.bits(),
    );
    g.eq(
        "SV_PLATFORM_F_UPCALL_GSI",
        PlatformFeatures::UPCALL_GSI.bits(),
    );
    g.eq(
        "SV_PLATFORM_F_UPCALL_VECTOR",
        PlatformFeatures::UPCALL_VECTOR.bits(),
    );
    g.eq(
        "SV_HYPERCALL_SCRATCH_OFFSET",
        platform::HYPERCALL_SCRATCH_OFFSET,
    );
    g.eq("SV_HVM_OP", platform::HVM_OP);
    g.eq("SV_HVMOP_SET_PARAM", platform::HVMOP_SET_PARAM);
    g.eq("SV_HVMOP_GET_PARAM", platform::HVMOP_GET_PARAM);
    g.eq(
        "SV_HVM_PARAM_CALLBACK_IRQ",
        platform::HVM_PARAM_CALLBACK_IRQ,
    );
    g.eq(
        "SV_CALLBACK_VIA_TYPE_SHIFT",
        platform::callback_via::TYPE_SHIFT,
    );
    g.eq("SV_CALLBACK_VIA_TYPE_GSI", platform::callback_via::TYPE_GSI);
    g.eq(
        "SV_CALLBACK_VIA_TYPE_VECTOR",
        platform::callback_via::TYPE_VECTOR,
    );
    layout!(
        g,
        "sv_hvm_param",
        platform::HvmParam,
        [domid, _pad, index, value]
    );
}

fn hypercalls(g: &mut Gen) {
    use hypercall::nr;
    g.eq("SV_PAGE_SIZE", pv_protocol::PAGE_SIZE);
    g.eq("SV_SECTOR_SIZE", pv_protocol::SECTOR_SIZE);
    g.eq("1 << SV_PAGE_SHIFT", pv_protocol::PAGE_SIZE);
    g.eq("SV_HYPERCALL_PORT", hypercall::HYPERCALL_PORT);
    g.eq(
        "SV_HYPERCALL_REQUEST_OFFSET",
        hypercall::HYPERCALL_REQUEST_OFFSET,
    );
    g.eq("SV_ABI_VERSION_MAJOR", hypercall::ABI_VERSION_MAJOR);
    g.eq("SV_ABI_VERSION_MINOR", hypercall::ABI_VERSION_MINOR);
    g.eq("SV_MAX_CONSOLE_IO", hypercall::MAX_CONSOLE_IO);
    g.eq("SV_MAX_POLL_PORTS", hypercall::MAX_POLL_PORTS);
    g.eq("SV_MAX_TIMER_NS", hypercall::MAX_TIMER_NS);
    g.eq("SV_HYPERVISOR_xen_version", nr::XEN_VERSION);
    g.eq("SV_HYPERVISOR_console_io", nr::CONSOLE_IO);
    g.eq("SV_HYPERVISOR_grant_table_op", nr::GRANT_TABLE_OP);
    g.eq("SV_HYPERVISOR_vcpu_op", nr::VCPU_OP);
    g.eq("SV_HYPERVISOR_sched_op", nr::SCHED_OP);
    g.eq("SV_HYPERVISOR_event_channel_op", nr::EVENT_CHANNEL_OP);
    g.eq("SV_HYPERVISOR_memory_op", nr::MEMORY_OP);
    {
        use pv_protocol::memory::{self, MemoryCmd};
        g.eq(
            "SV_XENMEM_increase_reservation",
            memory::cmd::INCREASE_RESERVATION,
        );
        for (c, m) in [
            (
                "SV_XENMEM_decrease_reservation",
                MemoryCmd::DecreaseReservation { arg: Gpa(1) },
            ),
            (
                "SV_XENMEM_current_reservation",
                MemoryCmd::CurrentReservation { arg: Gpa(1) },
            ),
            (
                "SV_XENMEM_maximum_reservation",
                MemoryCmd::MaximumReservation { arg: Gpa(1) },
            ),
            (
                "SV_XENMEM_populate_physmap",
                MemoryCmd::PopulatePhysmap { arg: Gpa(1) },
            ),
        ] {
            g.sub_op(c, Hypercall::MemoryOp(m));
        }
        g.eq("SV_MEMORY_MAX_EXTENTS", memory::MAX_EXTENTS);
        layout!(
            g,
            "sv_memory_reservation",
            memory::MemoryReservation,
            [
                extent_start,
                nr_extents,
                extent_order,
                mem_flags,
                domid,
                _pad
            ]
        );
    }
    let a = Gpa(0x1000);
    g.sub_op(
        "SV_XENVER_version",
        Hypercall::XenVersion(XenVersionCmd::Version),
    );
    g.sub_op(
        "SV_XENVER_get_features",
        Hypercall::XenVersion(XenVersionCmd::GetFeatures { arg: a }),
    );
    g.sub_op(
        "SV_CONSOLEIO_write",
        Hypercall::ConsoleIo(ConsoleIoCmd::Write { buf: a, len: 1 }),
    );
    g.sub_op(
        "SV_CONSOLEIO_read",
        Hypercall::ConsoleIo(ConsoleIoCmd::Read { buf: a, len: 1 }),
    );
    g.sub_op(
        "SV_GNTTABOP_setup_table",
        Hypercall::GrantTableOp(GnttabCmd::SetupTable { arg: a }),
    );
    g.sub_op(
        "SV_GNTTABOP_query_size",
        Hypercall::GrantTableOp(GnttabCmd::QuerySize { arg: a }),
    );
    g.sub_op("SV_SCHEDOP_yield", Hypercall::SchedOp(SchedCmd::Yield));
    g.sub_op("SV_SCHEDOP_block", Hypercall::SchedOp(SchedCmd::Block));
    g.sub_op(
        "SV_SCHEDOP_shutdown",
        Hypercall::SchedOp(SchedCmd::Shutdown { arg: a }),
    );
    g.sub_op(
        "SV_SCHEDOP_poll",
        Hypercall::SchedOp(SchedCmd::Poll { arg: a }),
    );
    g.sub_op(
        "SV_VCPUOP_set_singleshot_timer",
        Hypercall::VcpuOp(VcpuOpCmd::SetSingleshotTimer { vcpu: 0, arg: a }),
    );
    g.sub_op(
        "SV_VCPUOP_stop_singleshot_timer",
        Hypercall::VcpuOp(VcpuOpCmd::StopSingleshotTimer { vcpu: 0 }),
    );
    g.eq("SV_VCPU_SSHOTTMR_future", TimerFlags::FUTURE.bits());
    for (c, r) in [
        ("SV_SHUTDOWN_poweroff", ShutdownReason::Poweroff),
        ("SV_SHUTDOWN_reboot", ShutdownReason::Reboot),
        ("SV_SHUTDOWN_suspend", ShutdownReason::Suspend),
        ("SV_SHUTDOWN_crash", ShutdownReason::Crash),
        ("SV_SHUTDOWN_watchdog", ShutdownReason::Watchdog),
    ] {
        g.eq(c, r as u32);
    }
    for (c, e) in [
        ("SV_EPERM", Errno::EPERM),
        ("SV_ENOENT", Errno::ENOENT),
        ("SV_E2BIG", Errno::E2BIG),
        ("SV_EAGAIN", Errno::EAGAIN),
        ("SV_ENOMEM", Errno::ENOMEM),
        ("SV_EFAULT", Errno::EFAULT),
        ("SV_EBUSY", Errno::EBUSY),
        ("SV_EEXIST", Errno::EEXIST),
        ("SV_EINVAL", Errno::EINVAL),
        ("SV_ENOSPC", Errno::ENOSPC),
        ("SV_ENOSYS", Errno::ENOSYS),
        ("SV_ETIME", Errno::ETIME),
        ("SV_ETIMEDOUT", Errno::ETIMEDOUT),
    ] {
        g.eq(&format!("-{c}"), e.as_i64());
    }
    for (c, f) in [
        ("SV_FEATURE_PORT_IO_HYPERCALL", Features::PORT_IO_HYPERCALL),
        ("SV_FEATURE_EVTCHN_2L", Features::EVTCHN_2L),
        ("SV_FEATURE_GRANT_TABLE_V1", Features::GRANT_TABLE_V1),
        ("SV_FEATURE_SCHED_POLL", Features::SCHED_POLL),
        ("SV_FEATURE_CONSOLE_IO", Features::CONSOLE_IO),
        ("SV_FEATURE_SINGLESHOT_TIMER", Features::SINGLESHOT_TIMER),
    ] {
        g.eq(c, f.bits());
    }
    layout!(
        g,
        "sv_hypercall_request",
        hypercall::HypercallRequest,
        [nr, args, result, _reserved]
    );
    layout!(
        g,
        "sv_feature_info",
        hypercall::FeatureInfo,
        [submap_idx, submap]
    );
    layout!(
        g,
        "sv_sched_shutdown",
        hypercall::SchedShutdown,
        [reason, exit_code]
    );
    layout!(
        g,
        "sv_sched_poll",
        hypercall::SchedPoll,
        [ports, nr_ports, _pad, timeout_ns]
    );
    layout!(
        g,
        "sv_vcpu_set_singleshot_timer",
        hypercall::VcpuSetSingleshotTimer,
        [timeout_ns, flags, _pad]
    );
}

fn start_info(g: &mut Gen) {
    use start_info::*;
    g.eq("sizeof(SV_START_INFO_MAGIC) - 1", START_INFO_MAGIC.len());
    g.eq("SV_START_INFO_MAGIC_LEN", START_INFO_MAGIC.len());
    g.string(
        "magic",
        "(const char *)SV_START_INFO_MAGIC", // up to the first NUL
    );
    g.eq("SV_MAX_VCPUS", MAX_VCPUS);
    g.eq("SV_MAX_GRANT_FRAMES", MAX_GRANT_FRAMES);
    g.eq("SV_CMDLINE_MAX", CMDLINE_MAX);
    g.eq("SV_START_INFO_GPA", START_INFO_GPA);
    g.eq("SV_SHARED_INFO_GPA", SHARED_INFO_GPA);
    g.eq("SV_CONSOLE_GPA", CONSOLE_GPA);
    g.eq("SV_STORE_GPA", STORE_GPA);
    g.eq("SV_HYPERCALL_GPA", HYPERCALL_GPA);
    g.eq("SV_KERNEL_MIN_LOAD", KERNEL_MIN_LOAD);
    g.eq("SV_KERNEL_FREE_MIN", KERNEL_FREE_MIN);
    g.eq("SV_KERNEL_FREE_PER_VCPU", KERNEL_FREE_PER_VCPU);
    g.eq("SV_MIN_MEM_MIB", MIN_MEM_MIB);
    g.eq("SV_START_F_PVM_HOST", StartFlags::PVM_HOST.bits());
    g.eq("SV_START_F_PRIVILEGED", StartFlags::PRIVILEGED.bits());
    layout!(
        g,
        "sv_start_info",
        StartInfo,
        [
            magic,
            abi_major,
            abi_minor,
            domid,
            nr_vcpus,
            mem_bytes,
            mapped_bytes,
            tsc_khz,
            features,
            shared_info,
            hypercall_pages,
            grant_table,
            grant_frames,
            store_evtchn,
            store_ring,
            console_ring,
            console_evtchn,
            max_ports,
            flags,
            max_mem_bytes,
            _reserved,
            cmdline
        ]
    );
    layout!(
        g,
        "sv_vcpu_info",
        VcpuInfo,
        [upcall_pending, upcall_mask, _pad, pending_sel]
    );
    layout!(
        g,
        "sv_shared_info",
        SharedInfo,
        [vcpu_info, evtchn_pending, evtchn_mask]
    );
}

fn grants(g: &mut Gen) {
    g.eq("SV_GNTTAB_ENTRIES_PER_PAGE", grant::ENTRIES_PER_PAGE);
    g.eq("SV_GTF_type_mask", grant::GRANT_TYPE_MASK);
    g.eq("SV_GTF_invalid", grant::GrantType::Invalid as u8);
    for (c, f) in [
        ("SV_GTF_permit_access", GrantFlags::PERMIT_ACCESS),
        ("SV_GTF_accept_transfer", GrantFlags::ACCEPT_TRANSFER),
        ("SV_GTF_readonly", GrantFlags::READONLY),
        ("SV_GTF_reading", GrantFlags::READING),
        ("SV_GTF_writing", GrantFlags::WRITING),
        ("SV_GTF_PWT", GrantFlags::PWT),
        ("SV_GTF_PCD", GrantFlags::PCD),
        ("SV_GTF_PAT", GrantFlags::PAT),
        ("SV_GTF_sub_page", GrantFlags::SUB_PAGE),
    ] {
        g.eq(c, f.bits());
    }
    g.eq("SV_GTF_permit_access", grant::GrantType::PermitAccess as u8);
    g.eq("SV_DOMID_FIRST_RESERVED", DomId::FIRST_RESERVED.0);
    g.eq("SV_DOMID_SELF", DomId::SELF.0);
    g.eq("SV_DOMID_IO", DomId::IO.0);
    g.eq("SV_DOMID_XEN", DomId::XEN.0);
    g.eq("SV_DOMID_INVALID", DomId::INVALID.0);
    for (c, s) in [
        ("SV_GNTST_okay", GrantStatus::Okay),
        ("SV_GNTST_general_error", GrantStatus::GeneralError),
        ("SV_GNTST_bad_domain", GrantStatus::BadDomain),
        ("SV_GNTST_bad_gntref", GrantStatus::BadGntref),
        ("SV_GNTST_bad_handle", GrantStatus::BadHandle),
        ("SV_GNTST_bad_virt_addr", GrantStatus::BadVirtAddr),
        ("SV_GNTST_bad_dev_addr", GrantStatus::BadDevAddr),
        ("SV_GNTST_no_device_space", GrantStatus::NoDeviceSpace),
        ("SV_GNTST_permission_denied", GrantStatus::PermissionDenied),
        ("SV_GNTST_bad_page", GrantStatus::BadPage),
        ("SV_GNTST_bad_copy_arg", GrantStatus::BadCopyArg),
        ("SV_GNTST_address_too_big", GrantStatus::AddressTooBig),
        ("SV_GNTST_eagain", GrantStatus::Eagain),
    ] {
        g.eq(c, s.as_i16());
    }
    layout!(
        g,
        "sv_grant_entry_v1",
        grant::GrantEntryV1,
        [flags, domid, frame]
    );
    layout!(
        g,
        "sv_gnttab_query_size",
        grant::GnttabQuerySize,
        [dom, _pad0, nr_frames, max_nr_frames, status, _pad1]
    );
    layout!(
        g,
        "sv_gnttab_setup_table",
        grant::GnttabSetupTable,
        [dom, _pad0, nr_frames, status, _pad1, frame_list]
    );
}

fn event_channels(g: &mut Gen) {
    g.eq("SV_DOORBELL_BASE", evtchn::DOORBELL_BASE);
    g.eq("SV_DOORBELL_PORTS", evtchn::DOORBELL_PORTS);
    g.eq("SV_EVTCHN_BITS_PER_WORD", evtchn::BITS_PER_WORD);
    g.eq("SV_EVTCHN_MAX_PORTS_2L", evtchn::MAX_PORTS_2L);
    g.eq("SV_NR_VIRQS", evtchn::NR_VIRQS);
    g.eq("SV_VIRQ_TIMER", evtchn::VIRQ_TIMER);
    // The doorbell rule, at the edges of the port range.
    for p in [0u32, 255, 256, 4095] {
        let (io, data) = evtchn::doorbell_of(p);
        g.eq(&format!("SV_DOORBELL_BASE + {p} / 256"), io);
        g.eq(&format!("{p} % 256"), data);
    }
    for (c, op) in [
        ("SV_EVTCHNOP_bind_interdomain", EvtchnOp::BindInterdomain),
        ("SV_EVTCHNOP_bind_virq", EvtchnOp::BindVirq),
        ("SV_EVTCHNOP_close", EvtchnOp::Close),
        ("SV_EVTCHNOP_send", EvtchnOp::Send),
        ("SV_EVTCHNOP_status", EvtchnOp::Status),
        ("SV_EVTCHNOP_alloc_unbound", EvtchnOp::AllocUnbound),
        ("SV_EVTCHNOP_bind_ipi", EvtchnOp::BindIpi),
        ("SV_EVTCHNOP_bind_vcpu", EvtchnOp::BindVcpu),
        ("SV_EVTCHNOP_unmask", EvtchnOp::Unmask),
        ("SV_EVTCHNOP_reset", EvtchnOp::Reset),
    ] {
        g.eq(c, op as u32);
    }
    for (c, s) in [
        ("SV_EVTCHNSTAT_closed", EvtchnStatusKind::Closed),
        ("SV_EVTCHNSTAT_unbound", EvtchnStatusKind::Unbound),
        ("SV_EVTCHNSTAT_interdomain", EvtchnStatusKind::Interdomain),
        ("SV_EVTCHNSTAT_pirq", EvtchnStatusKind::Pirq),
        ("SV_EVTCHNSTAT_virq", EvtchnStatusKind::Virq),
        ("SV_EVTCHNSTAT_ipi", EvtchnStatusKind::Ipi),
    ] {
        g.eq(c, s as u32);
    }
    layout!(
        g,
        "sv_evtchn_alloc_unbound",
        evtchn::AllocUnboundArg,
        [dom, remote_dom, port]
    );
    layout!(
        g,
        "sv_evtchn_bind_interdomain",
        evtchn::BindInterdomainArg,
        [remote_dom, _pad, remote_port, local_port]
    );
    layout!(
        g,
        "sv_evtchn_bind_virq",
        evtchn::BindVirqArg,
        [virq, vcpu, port]
    );
    layout!(g, "sv_evtchn_bind_ipi", evtchn::BindIpiArg, [vcpu, port]);
    layout!(g, "sv_evtchn_bind_vcpu", evtchn::BindVcpuArg, [port, vcpu]);
    layout!(g, "sv_evtchn_port", evtchn::PortArg, [port]);
    layout!(g, "sv_evtchn_reset", evtchn::ResetArg, [dom, _pad]);
    layout!(
        g,
        "sv_evtchn_status",
        evtchn::StatusArg,
        [dom, _pad, port, status, vcpu, u]
    );
    for (p, op) in [
        ("sv_evtchn_alloc_unbound", EvtchnOp::AllocUnbound),
        ("sv_evtchn_bind_interdomain", EvtchnOp::BindInterdomain),
        ("sv_evtchn_port", EvtchnOp::Send),
        ("sv_evtchn_status", EvtchnOp::Status),
    ] {
        g.eq(&format!("sizeof(struct {p})"), op.arg_size());
    }
}

fn rings(g: &mut Gen) {
    layout!(
        g,
        "sv_sring_header",
        ring::SringHeader,
        [req_prod, req_event, rsp_prod, rsp_event, _pad]
    );
    g.eq("SV_RING_HEADER_SIZE", ring::RING_HEADER_SIZE);
    g.eq("SV_MAX_RING_PAGES", ring::MAX_RING_PAGES);
    fn proto<P: RingProtocol>(g: &mut Gen, slot: &str, slots_1: &str) {
        g.eq(slot, ring::slot_size::<P>());
        g.eq(slots_1, ring::ring_slots::<P>(1).unwrap());
        let mut pages = 1;
        while pages <= ring::MAX_RING_PAGES {
            writeln!(
                g.prints,
                "\tprintf(\"%s=%lu\\n\", \"{}/{pages}\", pow2_floor(SV_RING_FIT({pages}, {slot})));",
                P::NAME
            )
            .unwrap();
            pages *= 2;
        }
    }
    proto::<blkif::BlkRing>(g, "SV_BLKIF_SLOT_SIZE", "SV_BLKIF_RING_SLOTS_1");
    proto::<netif::NetTxRing>(g, "SV_NETIF_TX_SLOT_SIZE", "SV_NETIF_TX_RING_SLOTS_1");
    proto::<netif::NetRxRing>(g, "SV_NETIF_RX_SLOT_SIZE", "SV_NETIF_RX_RING_SLOTS_1");
}

fn block(g: &mut Gen) {
    use blkif::keys;
    g.eq(
        "SV_BLKIF_MAX_SEGMENTS_PER_REQUEST",
        blkif::MAX_SEGMENTS_PER_REQUEST,
    );
    g.eq(
        "SV_BLKIF_SEGMENTS_PER_INDIRECT_PAGE",
        blkif::SEGMENTS_PER_INDIRECT_PAGE,
    );
    g.eq(
        "SV_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
        blkif::MAX_INDIRECT_PAGES_PER_REQUEST,
    );
    g.eq(
        "SV_BLKIF_MAX_INDIRECT_SEGMENTS",
        blkif::MAX_INDIRECT_SEGMENTS,
    );
    g.eq("SV_BLKIF_SECTORS_PER_PAGE", blkif::SECTORS_PER_PAGE);
    for (c, op) in [
        ("SV_BLKIF_OP_READ", BlkOp::Read),
        ("SV_BLKIF_OP_WRITE", BlkOp::Write),
        ("SV_BLKIF_OP_WRITE_BARRIER", BlkOp::WriteBarrier),
        ("SV_BLKIF_OP_FLUSH_DISKCACHE", BlkOp::FlushDiskcache),
        ("SV_BLKIF_OP_RESERVED_1", BlkOp::Reserved),
        ("SV_BLKIF_OP_DISCARD", BlkOp::Discard),
        ("SV_BLKIF_OP_INDIRECT", BlkOp::Indirect),
    ] {
        g.eq(c, op as u8);
    }
    g.eq("SV_BLKIF_OP_READ", IndirectOp::Read as u8);
    g.eq("SV_BLKIF_OP_WRITE", IndirectOp::Write as u8);
    g.eq("SV_BLKIF_RSP_OKAY", BlkStatus::Okay as i16);
    g.eq("SV_BLKIF_RSP_ERROR", BlkStatus::Error as i16);
    g.eq("SV_BLKIF_RSP_EOPNOTSUPP", BlkStatus::NotSupported as i16);
    g.eq("SV_VDISK_CDROM", VdiskInfo::CDROM.bits());
    g.eq("SV_VDISK_REMOVABLE", VdiskInfo::REMOVABLE.bits());
    g.eq("SV_VDISK_READONLY", VdiskInfo::READONLY.bits());
    g.eq("SV_BLKIF_DISCARD_SECURE", DiscardFlags::SECURE.bits());
    for (c, k) in [
        (
            "SV_BLKIF_KEY_FEATURE_FLUSH_CACHE",
            keys::FEATURE_FLUSH_CACHE,
        ),
        ("SV_BLKIF_KEY_FEATURE_DISCARD", keys::FEATURE_DISCARD),
        (
            "SV_BLKIF_KEY_FEATURE_MAX_INDIRECT_SEGMENTS",
            keys::FEATURE_MAX_INDIRECT_SEGMENTS,
        ),
        ("SV_BLKIF_KEY_FEATURE_PERSISTENT", keys::FEATURE_PERSISTENT),
        (
            "SV_BLKIF_KEY_MULTI_QUEUE_MAX_QUEUES",
            keys::MULTI_QUEUE_MAX_QUEUES,
        ),
        (
            "SV_BLKIF_KEY_MULTI_QUEUE_NUM_QUEUES",
            keys::MULTI_QUEUE_NUM_QUEUES,
        ),
        ("SV_BLKIF_KEY_RING_PAGE_ORDER", keys::RING_PAGE_ORDER),
        (
            "SV_BLKIF_KEY_MAX_RING_PAGE_ORDER",
            keys::MAX_RING_PAGE_ORDER,
        ),
        ("SV_BLKIF_KEY_SECTORS", keys::SECTORS),
        ("SV_BLKIF_KEY_SECTOR_SIZE", keys::SECTOR_SIZE),
        ("SV_BLKIF_KEY_INFO", keys::INFO),
        ("SV_BLKIF_KEY_RING_REF", keys::RING_REF),
        ("SV_BLKIF_KEY_EVENT_CHANNEL", keys::EVENT_CHANNEL),
    ] {
        g.string(k, c);
    }
    layout!(
        g,
        "sv_blkif_segment",
        blkif::BlkifSegmentRaw,
        [gref, first_sect, last_sect, _pad]
    );
    layout!(
        g,
        "sv_blkif_request",
        blkif::BlkifRequestRaw,
        [
            operation,
            nr_segments,
            handle,
            _pad0,
            id,
            sector_number,
            seg
        ]
    );
    layout!(
        g,
        "sv_blkif_request_discard",
        blkif::BlkifDiscardRaw,
        [
            operation,
            flag,
            handle,
            _pad0,
            id,
            sector_number,
            nr_sectors,
            _pad1
        ]
    );
    layout!(
        g,
        "sv_blkif_request_indirect",
        blkif::BlkifIndirectRaw,
        [
            operation,
            indirect_op,
            nr_segments,
            _pad0,
            id,
            sector_number,
            handle,
            _pad1,
            indirect_grefs,
            _pad2
        ]
    );
    layout!(
        g,
        "sv_blkif_response",
        blkif::BlkifResponseRaw,
        [id, operation, _pad0, status, _pad1]
    );
}

fn network(g: &mut Gen) {
    use netif::{extra_type, keys};
    g.eq("SV_NETIF_MAX_FRAME_SIZE", netif::MAX_FRAME_SIZE);
    g.eq("SV_NETIF_ETH_HLEN", netif::ETH_HLEN);
    g.eq("SV_NETIF_ETH_MTU", netif::ETH_MTU);
    g.eq("SV_NETIF_MAX_SLOTS_PER_FRAME", netif::MAX_SLOTS_PER_FRAME);
    for (c, f) in [
        ("SV_NETTXF_csum_blank", NetTxFlags::CSUM_BLANK),
        ("SV_NETTXF_data_validated", NetTxFlags::DATA_VALIDATED),
        ("SV_NETTXF_more_data", NetTxFlags::MORE_DATA),
        ("SV_NETTXF_extra_info", NetTxFlags::EXTRA_INFO),
    ] {
        g.eq(c, f.bits());
    }
    for (c, f) in [
        ("SV_NETRXF_data_validated", NetRxFlags::DATA_VALIDATED),
        ("SV_NETRXF_csum_blank", NetRxFlags::CSUM_BLANK),
        ("SV_NETRXF_more_data", NetRxFlags::MORE_DATA),
        ("SV_NETRXF_extra_info", NetRxFlags::EXTRA_INFO),
        ("SV_NETRXF_gso_prefix", NetRxFlags::GSO_PREFIX),
    ] {
        g.eq(c, f.bits());
    }
    g.eq("SV_NETIF_EXTRA_FLAG_MORE", NetExtraFlags::MORE.bits());
    g.eq("SV_NETIF_EXTRA_TYPE_NONE", extra_type::NONE);
    g.eq("SV_NETIF_EXTRA_TYPE_GSO", extra_type::GSO);
    g.eq("SV_NETIF_EXTRA_TYPE_MCAST_ADD", extra_type::MCAST_ADD);
    g.eq("SV_NETIF_EXTRA_TYPE_MCAST_DEL", extra_type::MCAST_DEL);
    g.eq("SV_NETIF_EXTRA_TYPE_HASH", extra_type::HASH);
    g.eq("SV_NETIF_GSO_TYPE_TCPV4", netif::GsoType::TcpV4 as u8);
    g.eq("SV_NETIF_GSO_TYPE_TCPV6", netif::GsoType::TcpV6 as u8);
    g.eq("SV_NETIF_RSP_DROPPED", NetifStatus::Dropped as i16);
    g.eq("SV_NETIF_RSP_ERROR", NetifStatus::Error as i16);
    g.eq("SV_NETIF_RSP_OKAY", NetifStatus::Okay as i16);
    g.eq("SV_NETIF_RSP_NULL", NetifStatus::Null as i16);
    for (c, k) in [
        ("SV_NETIF_KEY_TX_RING_REF", keys::TX_RING_REF),
        ("SV_NETIF_KEY_RX_RING_REF", keys::RX_RING_REF),
        ("SV_NETIF_KEY_EVENT_CHANNEL", keys::EVENT_CHANNEL),
        ("SV_NETIF_KEY_MAC", keys::MAC),
        ("SV_NETIF_KEY_FEATURE_RX_COPY", keys::FEATURE_RX_COPY),
        ("SV_NETIF_KEY_FEATURE_SG", keys::FEATURE_SG),
        ("SV_NETIF_KEY_FEATURE_GSO_TCPV4", keys::FEATURE_GSO_TCPV4),
        (
            "SV_NETIF_KEY_FEATURE_NO_CSUM_OFFLOAD",
            keys::FEATURE_NO_CSUM_OFFLOAD,
        ),
        ("SV_NETIF_KEY_REQUEST_RX_COPY", keys::REQUEST_RX_COPY),
        (
            "SV_NETIF_KEY_MULTI_QUEUE_MAX_QUEUES",
            keys::MULTI_QUEUE_MAX_QUEUES,
        ),
    ] {
        g.string(k, c);
    }
    layout!(
        g,
        "sv_netif_tx_request",
        netif::NetifTxRequestRaw,
        [gref, offset, flags, id, size]
    );
    layout!(
        g,
        "sv_netif_tx_response",
        netif::NetifTxResponseRaw,
        [id, status]
    );
    layout!(
        g,
        "sv_netif_extra_info",
        netif::NetifExtraInfoRaw,
        [extra_type, flags, u]
    );
    layout!(
        g,
        "sv_netif_rx_request",
        netif::NetifRxRequestRaw,
        [id, _pad, gref]
    );
    layout!(
        g,
        "sv_netif_rx_response",
        netif::NetifRxResponseRaw,
        [id, offset, flags, status]
    );
}

fn config_store(g: &mut Gen) {
    g.eq("SV_XS_PAYLOAD_MAX", store::PAYLOAD_MAX);
    g.eq("SV_XS_ABS_PATH_MAX", store::ABS_PATH_MAX);
    g.eq("SV_XS_REL_PATH_MAX", store::REL_PATH_MAX);
    g.eq("SV_XS_RING_SIZE", store::RING_SIZE);
    use MsgType::*;
    for (c, t) in [
        ("SV_XS_CONTROL", Control),
        ("SV_XS_DIRECTORY", Directory),
        ("SV_XS_READ", Read),
        ("SV_XS_GET_PERMS", GetPerms),
        ("SV_XS_WATCH", Watch),
        ("SV_XS_UNWATCH", Unwatch),
        ("SV_XS_TRANSACTION_START", TransactionStart),
        ("SV_XS_TRANSACTION_END", TransactionEnd),
        ("SV_XS_INTRODUCE", Introduce),
        ("SV_XS_RELEASE", Release),
        ("SV_XS_GET_DOMAIN_PATH", GetDomainPath),
        ("SV_XS_WRITE", Write),
        ("SV_XS_MKDIR", Mkdir),
        ("SV_XS_RM", Rm),
        ("SV_XS_SET_PERMS", SetPerms),
        ("SV_XS_WATCH_EVENT", WatchEvent),
        ("SV_XS_ERROR", Error),
        ("SV_XS_IS_DOMAIN_INTRODUCED", IsDomainIntroduced),
        ("SV_XS_RESUME", Resume),
        ("SV_XS_SET_TARGET", SetTarget),
        ("SV_XS_RESET_WATCHES", ResetWatches),
        ("SV_XS_DIRECTORY_PART", DirectoryPart),
    ] {
        g.eq(c, t as u32);
    }
    g.eq(
        "SV_XS_SERVER_F_RECONNECTION",
        ServerFeatures::RECONNECTION.bits(),
    );
    g.eq("SV_XS_SERVER_F_ERROR", ServerFeatures::ERROR.bits());
    g.eq("SV_XS_CONNECTED", store::CONNECTION_CONNECTED);
    g.eq("SV_XS_RECONNECT", store::CONNECTION_RECONNECT);
    g.eq("SV_XS_ERROR_NONE", store::ERROR_NONE);
    g.eq("SV_XS_ERROR_COMM", store::ERROR_COMM);
    g.eq("SV_XS_ERROR_RINGIDX", store::ERROR_RINGIDX);
    g.eq("SV_XS_ERROR_PROTO", store::ERROR_PROTO);
    layout!(
        g,
        "sv_xs_msg_header",
        store::StoreMsgHeader,
        [msg_type, req_id, tx_id, len]
    );
    layout!(
        g,
        "sv_xs_interface",
        store::StoreInterface,
        [
            req,
            rsp,
            req_cons,
            req_prod,
            rsp_cons,
            rsp_prod,
            server_features,
            connection,
            error
        ]
    );
    g.prints
        .push_str("#define PRINT_XS_ERROR(e) printf(\"xs-error=%s\\n\", #e);\n");
    g.prints.push_str("\tSV_XS_ERRORS(PRINT_XS_ERROR)\n");
}

fn memory_keys(g: &mut Gen) {
    use pv_protocol::memory::{CURRENT_KEY, STATIC_MAX_KEY, TARGET_KEY};
    g.string(TARGET_KEY, "SV_MEMORY_TARGET_KEY");
    g.string(STATIC_MAX_KEY, "SV_MEMORY_STATIC_MAX_KEY");
    g.string(CURRENT_KEY, "SV_MEMORY_CURRENT_KEY");
}

fn xenbus_states(g: &mut Gen) {
    use dom0::vbd::state;
    g.eq("SV_XENBUS_STATE_INITIALISING", state::INITIALISING);
    g.eq("SV_XENBUS_STATE_INIT_WAIT", state::INIT_WAIT);
    g.eq("SV_XENBUS_STATE_INITIALISED", state::INITIALISED);
    g.eq("SV_XENBUS_STATE_CONNECTED", state::CONNECTED);
    g.eq("SV_XENBUS_STATE_CLOSING", state::CLOSING);
    g.eq("SV_XENBUS_STATE_CLOSED", state::CLOSED);
}

/// The expected output of the program's `main`, in order.
fn expected_output() -> Vec<String> {
    let mut out = vec![format!(
        "magic={}",
        std::str::from_utf8(&start_info::START_INFO_MAGIC)
            .unwrap()
            .trim_end_matches('\0')
    )];
    for k in [
        blkif::keys::FEATURE_FLUSH_CACHE,
        blkif::keys::FEATURE_DISCARD,
        blkif::keys::FEATURE_MAX_INDIRECT_SEGMENTS,
        blkif::keys::FEATURE_PERSISTENT,
        blkif::keys::MULTI_QUEUE_MAX_QUEUES,
        blkif::keys::MULTI_QUEUE_NUM_QUEUES,
        blkif::keys::RING_PAGE_ORDER,
        blkif::keys::MAX_RING_PAGE_ORDER,
        blkif::keys::SECTORS,
        blkif::keys::SECTOR_SIZE,
        blkif::keys::INFO,
        blkif::keys::RING_REF,
        blkif::keys::EVENT_CHANNEL,
    ] {
        out.push(format!("{k}={k}"));
    }
    fn slots<P: RingProtocol>(out: &mut Vec<String>) {
        let mut pages = 1;
        while pages <= ring::MAX_RING_PAGES {
            out.push(format!(
                "{}/{pages}={}",
                P::NAME,
                ring::ring_slots::<P>(pages).unwrap()
            ));
            pages *= 2;
        }
    }
    slots::<blkif::BlkRing>(&mut out);
    slots::<netif::NetTxRing>(&mut out);
    slots::<netif::NetRxRing>(&mut out);
    for k in [
        netif::keys::TX_RING_REF,
        netif::keys::RX_RING_REF,
        netif::keys::EVENT_CHANNEL,
        netif::keys::MAC,
        netif::keys::FEATURE_RX_COPY,
        netif::keys::FEATURE_SG,
        netif::keys::FEATURE_GSO_TCPV4,
        netif::keys::FEATURE_NO_CSUM_OFFLOAD,
        netif::keys::REQUEST_RX_COPY,
        netif::keys::MULTI_QUEUE_MAX_QUEUES,
    ] {
        out.push(format!("{k}={k}"));
    }
    use StoreErrno::*;
    for e in [
        EINVAL, EACCES, EEXIST, EISDIR, ENOENT, ENOMEM, ENOSPC, EIO, ENOTEMPTY, ENOSYS, EROFS,
        EBUSY, EAGAIN, EISCONN, E2BIG, EPERM,
    ] {
        out.push(format!("xs-error={}", e.as_str()));
    }
    use pv_protocol::memory::{CURRENT_KEY, STATIC_MAX_KEY, TARGET_KEY};
    for k in [TARGET_KEY, STATIC_MAX_KEY, CURRENT_KEY] {
        out.push(format!("{k}={k}"));
    }
    out
}

fn program() -> String {
    let mut g = Gen::default();
    platform(&mut g);
    hypercalls(&mut g);
    start_info(&mut g);
    grants(&mut g);
    event_channels(&mut g);
    // Same order as expected_output(): magic (start_info), block keys, ring sizes, net keys,
    // store error names.
    block(&mut g);
    rings(&mut g);
    network(&mut g);
    config_store(&mut g);
    xenbus_states(&mut g);
    memory_keys(&mut g);
    format!(
        "/* Generated by tests/tests/c_header.rs from pv-protocol; do not edit. */\n\
         #include <errno.h>\n#include <stddef.h>\n#include <stdio.h>\n\
         #include <splitvisor/abi.h>\n\n{}\n\
         static unsigned long pow2_floor(unsigned long x)\n{{\n\
         \tunsigned long p = 1;\n\n\twhile (p * 2 <= x)\n\t\tp *= 2;\n\treturn p;\n}}\n\n\
         int main(void)\n{{\n{}\treturn 0;\n}}\n",
        g.asserts, g.prints
    )
}

#[test]
fn c_header_agrees_with_pv_protocol() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let include = root.join("guest-drivers/linux/include");
    assert!(
        include.join("splitvisor/abi.h").is_file(),
        "missing {}",
        include.display()
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c_header");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("abi_check.c");
    let exe = dir.join("abi_check");
    std::fs::write(&src, program()).unwrap();

    let gcc = tool("gcc", "gcc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        gcc.status.success(),
        "the header disagrees with pv-protocol (generated check: {}):\n{}",
        src.display(),
        String::from_utf8_lossy(&gcc.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    let got: Vec<String> = String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(got, expected_output());
}

#[test]
fn the_check_catches_a_wrong_offset() {
    // The generated asserts must be able to fail: a deliberately wrong expectation does not
    // compile.
    let mut g = Gen::default();
    g.eq("offsetof(struct sv_blkif_request, id)", 9);
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-drivers/linux/include");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c_header");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("wrong.c");
    std::fs::write(
        &src,
        format!(
            "#include <stddef.h>\n#include <splitvisor/abi.h>\n{}",
            g.asserts
        ),
    )
    .unwrap();
    let gcc = tool("gcc", "gcc")
        .args(["-std=c11", "-fsyntax-only", "-I"])
        .arg(&include)
        .arg(&src)
        .output()
        .unwrap();
    assert!(!gcc.status.success());
    assert!(String::from_utf8_lossy(&gcc.stderr).contains("sv_blkif_request, id"));
}
