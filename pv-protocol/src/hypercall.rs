//! Hypercall transport and top-level decoding.
//!
//! # Transport (Splitvisor's own, not Xen's)
//!
//! Each vCPU owns a *hypercall page* in guest memory, whose guest-physical
//! address is fixed at vCPU setup. To make a hypercall the guest writes a
//! [`HypercallRequest`] at offset [`HYPERCALL_REQUEST_OFFSET`] of that page
//! (`nr`, `args`; `result` and `_reserved` zero), then executes one
//! `out imm8, al` to I/O port [`HYPERCALL_PORT`] (value ignored; write 0). The
//! resulting VM exit is synchronous: when the `out` retires, `result` holds
//! the return value, `>= 0` for success or a negative [`Errno`].
//!
//! A port below 0x100 lets the guest use the one-byte immediate form, which
//! needs no register for the port. (Measured on PVM hosts by the guest's
//! `bench` job: any PIO exit that reaches the VMM costs 20-30 us whatever its
//! form; only `out 0x80, al` is absorbed by the host kernel, at ~8 us.)
//! Splitvisor domains have no emulated devices, so no legacy port can collide.
//!
//! Hypercall and sub-op numbers follow Xen. The hypervisor copies the
//! request out of the page once and calls [`Hypercall::parse`]; argument
//! structs referenced by guest-physical address are copied and parsed
//! by the handler (see [`crate::evtchn::EvtchnCommand::parse`],
//! [`SchedShutdown`], [`SchedPoll`], [`crate::memory::Reservation::parse`]).

use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::evtchn::{EvtchnError, EvtchnOp};
use crate::memory::MemoryCmd;

/// I/O port whose write (`out 0xe8, al`) triggers a hypercall.
pub const HYPERCALL_PORT: u16 = 0xe8;
/// Offset of the [`HypercallRequest`] within the per-vCPU hypercall page.
pub const HYPERCALL_REQUEST_OFFSET: usize = 0;

/// Major version of this ABI; `XEN_VERSION(VERSION)` returns `major << 16 | minor`.
pub const ABI_VERSION_MAJOR: u16 = 0;
/// Minor version of this ABI (2: `memory_op` and start-info's `max_mem_bytes`).
pub const ABI_VERSION_MINOR: u16 = 2;

/// Largest `count` accepted by `CONSOLE_IO` (one page per call; a guest
/// writes longer output in several calls).
pub const MAX_CONSOLE_IO: u32 = 4096;
/// Most ports one `SCHED_POLL` may wait on (Xen's limit).
pub const MAX_POLL_PORTS: u32 = 128;
/// Longest one-shot timer `VCPU_OP(SET_SINGLESHOT_TIMER)` accepts, in ns (one day): a longer
/// one is `EINVAL`, as is anything whose deadline would not fit the host's clock.
pub const MAX_TIMER_NS: u64 = 86_400 * 1_000_000_000;

/// Hypercall numbers (Xen's `__HYPERVISOR_*`).
pub mod nr {
    /// `memory_op(cmd, arg)` ([`crate::memory`]).
    pub const MEMORY_OP: u64 = 12;
    /// `xen_version(cmd, arg)`.
    pub const XEN_VERSION: u64 = 17;
    /// `console_io(cmd, count, buffer)`.
    pub const CONSOLE_IO: u64 = 18;
    /// `grant_table_op(cmd, uop, count)`.
    pub const GRANT_TABLE_OP: u64 = 20;
    /// `vcpu_op(cmd, vcpuid, arg)`.
    pub const VCPU_OP: u64 = 24;
    /// `sched_op(cmd, arg)`.
    pub const SCHED_OP: u64 = 29;
    /// `event_channel_op(cmd, arg)`.
    pub const EVENT_CHANNEL_OP: u64 = 32;
}

/// The request block in the hypercall page.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct HypercallRequest {
    /// Hypercall number ([`nr`]).
    pub nr: u64,
    /// Arguments, as in Xen's register convention (`args[0]` is usually `cmd`).
    pub args: [u64; 6],
    /// Out: return value, `>= 0` or a negative [`Errno`].
    pub result: i64,
    /// Zero; reserved for extensions.
    pub _reserved: [u64; 8],
}

const _: () = assert!(size_of::<HypercallRequest>() == 128);
const _: () = assert!(offset_of!(HypercallRequest, nr) == 0);
const _: () = assert!(offset_of!(HypercallRequest, args) == 8);
const _: () = assert!(offset_of!(HypercallRequest, result) == 56);
const _: () = assert!(offset_of!(HypercallRequest, _reserved) == 64);
const _: () = assert!(HYPERCALL_REQUEST_OFFSET + size_of::<HypercallRequest>() <= crate::PAGE_SIZE);

/// Error values returned to guests (negated, as Xen does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i64)]
pub enum Errno {
    /// Operation not permitted.
    EPERM = -1,
    /// No such entry.
    ENOENT = -2,
    /// Argument list too long.
    E2BIG = -7,
    /// Try again.
    EAGAIN = -11,
    /// Out of memory.
    ENOMEM = -12,
    /// Bad guest address.
    EFAULT = -14,
    /// Busy.
    EBUSY = -16,
    /// Already exists.
    EEXIST = -17,
    /// Invalid argument.
    EINVAL = -22,
    /// No space.
    ENOSPC = -28,
    /// Not implemented.
    ENOSYS = -38,
    /// Timer expired (a one-shot timer asked to be in the future is not).
    ETIME = -62,
    /// Timed out.
    ETIMEDOUT = -110,
}

impl Errno {
    /// The value stored in [`HypercallRequest::result`].
    pub const fn as_i64(self) -> i64 {
        self as i64
    }

    /// Decodes a negative result (guest side); `None` if unknown.
    pub const fn from_i64(v: i64) -> Option<Errno> {
        Some(match v {
            -1 => Self::EPERM,
            -2 => Self::ENOENT,
            -7 => Self::E2BIG,
            -11 => Self::EAGAIN,
            -12 => Self::ENOMEM,
            -14 => Self::EFAULT,
            -16 => Self::EBUSY,
            -17 => Self::EEXIST,
            -22 => Self::EINVAL,
            -28 => Self::ENOSPC,
            -38 => Self::ENOSYS,
            -62 => Self::ETIME,
            -110 => Self::ETIMEDOUT,
            _ => return None,
        })
    }
}

/// Encodes a handler outcome into a `result` value; success values above
/// `i64::MAX` are reported as `EINVAL`.
pub fn encode_result(r: Result<u64, Errno>) -> i64 {
    match r {
        Ok(v) => i64::try_from(v).unwrap_or(Errno::EINVAL.as_i64()),
        Err(e) => e.as_i64(),
    }
}

bitflags! {
    /// Splitvisor feature bits, reported by `XEN_VERSION(GET_FEATURES)` in
    /// submap 0 (other submaps are zero). Unknown bits are ignored by guests.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Features: u32 {
        /// Hypercalls through [`HYPERCALL_PORT`] (always set).
        const PORT_IO_HYPERCALL = 1 << 0;
        /// 2-level event channels.
        const EVTCHN_2L = 1 << 1;
        /// v1 grant tables.
        const GRANT_TABLE_V1 = 1 << 2;
        /// `SCHED_OP(POLL)`.
        const SCHED_POLL = 1 << 3;
        /// `CONSOLE_IO`.
        const CONSOLE_IO = 1 << 4;
        /// `VCPU_OP(SET_SINGLESHOT_TIMER)` and `VIRQ_TIMER`.
        const SINGLESHOT_TIMER = 1 << 5;
    }
}

/// Guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

/// Errors from hypercall decoding; [`HypercallError::errno`] gives the guest's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HypercallError {
    /// Unknown hypercall number.
    #[error("unknown hypercall {0}")]
    UnknownHypercall(u64),
    /// Unknown sub-operation of a known hypercall.
    #[error("unknown sub-op {cmd} of hypercall {nr}")]
    UnknownSubOp {
        /// Hypercall number.
        nr: u64,
        /// Sub-op value.
        cmd: u64,
    },
    /// A count argument out of range.
    #[error("bad count {0}")]
    BadCount(u64),
    /// Unknown shutdown reason.
    #[error("bad shutdown reason {0}")]
    BadShutdownReason(u32),
    /// A vCPU id that does not fit 32 bits.
    #[error("bad vCPU {0}")]
    BadVcpu(u64),
    /// Unknown one-shot timer flags.
    #[error("bad timer flags {0:#x}")]
    BadTimerFlags(u32),
    /// A one-shot timer longer than [`MAX_TIMER_NS`].
    #[error("timer of {0} ns is longer than allowed")]
    TimerTooLong(u64),
    /// Event-channel sub-op error.
    #[error("evtchn: {0}")]
    Evtchn(#[from] EvtchnError),
}

impl HypercallError {
    /// The errno a guest gets for this error.
    pub const fn errno(&self) -> Errno {
        match self {
            Self::UnknownHypercall(_)
            | Self::UnknownSubOp { .. }
            | Self::Evtchn(EvtchnError::UnknownOp(_)) => Errno::ENOSYS,
            Self::BadCount(_)
            | Self::BadShutdownReason(_)
            | Self::BadVcpu(_)
            | Self::BadTimerFlags(_)
            | Self::TimerTooLong(_)
            | Self::Evtchn(_) => Errno::EINVAL,
        }
    }
}

/// `CONSOLE_IO` sub-operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsoleIoCmd {
    /// Write `len` bytes from `buf` (cmd 0).
    Write {
        /// Source buffer.
        buf: Gpa,
        /// Bytes, `<= MAX_CONSOLE_IO`.
        len: u32,
    },
    /// Read up to `len` bytes into `buf` (cmd 1).
    Read {
        /// Destination buffer.
        buf: Gpa,
        /// Bytes, `<= MAX_CONSOLE_IO`.
        len: u32,
    },
}

/// `XEN_VERSION` sub-operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenVersionCmd {
    /// Returns `ABI_VERSION_MAJOR << 16 | ABI_VERSION_MINOR` (cmd 0).
    Version,
    /// Fills a [`FeatureInfo`] at `arg` (cmd 6).
    GetFeatures {
        /// Address of the [`FeatureInfo`].
        arg: Gpa,
    },
}

/// `GRANT_TABLE_OP` sub-operations (count must be 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GnttabCmd {
    /// [`crate::grant::GnttabSetupTable`] at `arg` (cmd 2).
    SetupTable {
        /// Argument address.
        arg: Gpa,
    },
    /// [`crate::grant::GnttabQuerySize`] at `arg` (cmd 6).
    QuerySize {
        /// Argument address.
        arg: Gpa,
    },
}

/// `SCHED_OP` sub-operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedCmd {
    /// Yield the vCPU (cmd 0).
    Yield,
    /// Block until an event is pending (cmd 1).
    Block,
    /// Shut the domain down; [`SchedShutdown`] at `arg` (cmd 2).
    Shutdown {
        /// Argument address.
        arg: Gpa,
    },
    /// Wait on ports; [`SchedPoll`] at `arg` (cmd 3).
    Poll {
        /// Argument address.
        arg: Gpa,
    },
}

/// `VCPU_OP` sub-operations (Xen's `VCPUOP_*` numbers; only the timer is offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuOpCmd {
    /// Arms vCPU `vcpu`'s one-shot timer; [`VcpuSetSingleshotTimer`] at `arg` (cmd 8). When it
    /// expires the vCPU's `VIRQ_TIMER` port becomes pending. Arming again replaces the timer.
    SetSingleshotTimer {
        /// The vCPU (must be the caller).
        vcpu: u32,
        /// Argument address.
        arg: Gpa,
    },
    /// Disarms vCPU `vcpu`'s one-shot timer (cmd 9).
    StopSingleshotTimer {
        /// The vCPU (must be the caller).
        vcpu: u32,
    },
}

/// A decoded hypercall. Arguments behind addresses are not yet read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// Console I/O.
    ConsoleIo(ConsoleIoCmd),
    /// Version and features.
    XenVersion(XenVersionCmd),
    /// Grant-table operation.
    GrantTableOp(GnttabCmd),
    /// Scheduler operation.
    SchedOp(SchedCmd),
    /// vCPU operation.
    VcpuOp(VcpuOpCmd),
    /// Event-channel operation; copy `op.arg_size()` bytes from `arg`.
    EventChannelOp {
        /// Sub-operation.
        op: EvtchnOp,
        /// Argument address.
        arg: Gpa,
    },
    /// Memory reservation (balloon) operation.
    MemoryOp(MemoryCmd),
}

impl Hypercall {
    /// Decodes a request block. Unused argument registers are ignored, as in Xen.
    pub fn parse(req: &HypercallRequest) -> Result<Hypercall, HypercallError> {
        let [a0, a1, a2, ..] = req.args;
        let unknown = |cmd| HypercallError::UnknownSubOp { nr: req.nr, cmd };
        Ok(match req.nr {
            nr::CONSOLE_IO => {
                let len = u32::try_from(a1)
                    .ok()
                    .filter(|l| *l <= MAX_CONSOLE_IO)
                    .ok_or(HypercallError::BadCount(a1))?;
                let buf = Gpa(a2);
                Self::ConsoleIo(match a0 {
                    0 => ConsoleIoCmd::Write { buf, len },
                    1 => ConsoleIoCmd::Read { buf, len },
                    c => return Err(unknown(c)),
                })
            }
            nr::XEN_VERSION => Self::XenVersion(match a0 {
                0 => XenVersionCmd::Version,
                6 => XenVersionCmd::GetFeatures { arg: Gpa(a1) },
                c => return Err(unknown(c)),
            }),
            nr::GRANT_TABLE_OP => {
                let cmd = match a0 {
                    2 => GnttabCmd::SetupTable { arg: Gpa(a1) },
                    6 => GnttabCmd::QuerySize { arg: Gpa(a1) },
                    c => return Err(unknown(c)),
                };
                if a2 != 1 {
                    return Err(HypercallError::BadCount(a2));
                }
                Self::GrantTableOp(cmd)
            }
            nr::SCHED_OP => Self::SchedOp(match a0 {
                0 => SchedCmd::Yield,
                1 => SchedCmd::Block,
                2 => SchedCmd::Shutdown { arg: Gpa(a1) },
                3 => SchedCmd::Poll { arg: Gpa(a1) },
                c => return Err(unknown(c)),
            }),
            nr::VCPU_OP => {
                let vcpu = u32::try_from(a1).map_err(|_| HypercallError::BadVcpu(a1))?;
                Self::VcpuOp(match a0 {
                    8 => VcpuOpCmd::SetSingleshotTimer { vcpu, arg: Gpa(a2) },
                    9 => VcpuOpCmd::StopSingleshotTimer { vcpu },
                    c => return Err(unknown(c)),
                })
            }
            nr::EVENT_CHANNEL_OP => Self::EventChannelOp {
                op: EvtchnOp::from_u64(a0)?,
                arg: Gpa(a1),
            },
            nr::MEMORY_OP => Self::MemoryOp(MemoryCmd::from_args(a0, a1).ok_or(unknown(a0))?),
            n => return Err(HypercallError::UnknownHypercall(n)),
        })
    }

    /// Builds the request block (guest side); unused arguments are zero.
    pub fn to_request(&self) -> HypercallRequest {
        let (nr, args): (u64, [u64; 3]) = match *self {
            Self::ConsoleIo(ConsoleIoCmd::Write { buf, len }) => {
                (nr::CONSOLE_IO, [0, u64::from(len), buf.0])
            }
            Self::ConsoleIo(ConsoleIoCmd::Read { buf, len }) => {
                (nr::CONSOLE_IO, [1, u64::from(len), buf.0])
            }
            Self::XenVersion(XenVersionCmd::Version) => (nr::XEN_VERSION, [0, 0, 0]),
            Self::XenVersion(XenVersionCmd::GetFeatures { arg }) => {
                (nr::XEN_VERSION, [6, arg.0, 0])
            }
            Self::GrantTableOp(GnttabCmd::SetupTable { arg }) => {
                (nr::GRANT_TABLE_OP, [2, arg.0, 1])
            }
            Self::GrantTableOp(GnttabCmd::QuerySize { arg }) => (nr::GRANT_TABLE_OP, [6, arg.0, 1]),
            Self::SchedOp(SchedCmd::Yield) => (nr::SCHED_OP, [0, 0, 0]),
            Self::SchedOp(SchedCmd::Block) => (nr::SCHED_OP, [1, 0, 0]),
            Self::SchedOp(SchedCmd::Shutdown { arg }) => (nr::SCHED_OP, [2, arg.0, 0]),
            Self::SchedOp(SchedCmd::Poll { arg }) => (nr::SCHED_OP, [3, arg.0, 0]),
            Self::VcpuOp(VcpuOpCmd::SetSingleshotTimer { vcpu, arg }) => {
                (nr::VCPU_OP, [8, u64::from(vcpu), arg.0])
            }
            Self::VcpuOp(VcpuOpCmd::StopSingleshotTimer { vcpu }) => {
                (nr::VCPU_OP, [9, u64::from(vcpu), 0])
            }
            Self::EventChannelOp { op, arg } => (nr::EVENT_CHANNEL_OP, [op as u64, arg.0, 0]),
            Self::MemoryOp(m) => {
                let (cmd, arg) = m.to_args();
                (nr::MEMORY_OP, [cmd, arg, 0])
            }
        };
        HypercallRequest {
            nr,
            args: [args[0], args[1], args[2], 0, 0, 0],
            ..Default::default()
        }
    }
}

/// `XEN_VERSION(GET_FEATURES)` argument.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct FeatureInfo {
    /// In: which 32-bit submap.
    pub submap_idx: u32,
    /// Out: its bits ([`Features`] for submap 0).
    pub submap: u32,
}

const _: () = assert!(size_of::<FeatureInfo>() == 8);
const _: () = assert!(offset_of!(FeatureInfo, submap_idx) == 0);
const _: () = assert!(offset_of!(FeatureInfo, submap) == 4);

/// Why a domain shuts down (`SHUTDOWN_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ShutdownReason {
    /// Power off.
    Poweroff = 0,
    /// Reboot.
    Reboot = 1,
    /// Suspend.
    Suspend = 2,
    /// Crash.
    Crash = 3,
    /// Watchdog fired.
    Watchdog = 4,
}

impl TryFrom<u32> for ShutdownReason {
    type Error = HypercallError;
    fn try_from(v: u32) -> Result<Self, HypercallError> {
        Ok(match v {
            0 => Self::Poweroff,
            1 => Self::Reboot,
            2 => Self::Suspend,
            3 => Self::Crash,
            4 => Self::Watchdog,
            v => return Err(HypercallError::BadShutdownReason(v)),
        })
    }
}

/// `SCHED_OP(SHUTDOWN)` argument.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct SchedShutdown {
    /// A [`ShutdownReason`].
    pub reason: u32,
    /// Splitvisor extension: exit code reported to the toolstack.
    pub exit_code: u32,
}

const _: () = assert!(size_of::<SchedShutdown>() == 8);
const _: () = assert!(offset_of!(SchedShutdown, reason) == 0);
const _: () = assert!(offset_of!(SchedShutdown, exit_code) == 4);

/// A checked shutdown request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shutdown {
    /// Why.
    pub reason: ShutdownReason,
    /// Exit code.
    pub exit_code: u32,
}

impl Shutdown {
    /// Validates the argument struct.
    pub fn parse(raw: &SchedShutdown) -> Result<Shutdown, HypercallError> {
        Ok(Shutdown {
            reason: ShutdownReason::try_from(raw.reason)?,
            exit_code: raw.exit_code,
        })
    }

    /// Serialises the argument struct.
    pub fn to_raw(&self) -> SchedShutdown {
        SchedShutdown {
            reason: self.reason as u32,
            exit_code: self.exit_code,
        }
    }
}

/// `SCHED_OP(POLL)` argument.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct SchedPoll {
    /// Address of an array of `nr_ports` `u32` ports.
    pub ports: u64,
    /// Number of ports.
    pub nr_ports: u32,
    /// Zero.
    pub _pad: u32,
    /// Relative timeout in nanoseconds; 0 waits indefinitely.
    pub timeout_ns: u64,
}

const _: () = assert!(size_of::<SchedPoll>() == 24);
const _: () = assert!(offset_of!(SchedPoll, ports) == 0);
const _: () = assert!(offset_of!(SchedPoll, nr_ports) == 8);
const _: () = assert!(offset_of!(SchedPoll, _pad) == 12);
const _: () = assert!(offset_of!(SchedPoll, timeout_ns) == 16);

/// A checked poll request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Poll {
    /// Port array address.
    pub ports: Gpa,
    /// Ports in the array, `<= MAX_POLL_PORTS` (0 is a plain timed block).
    pub nr_ports: u32,
    /// Relative timeout in ns; `None` waits indefinitely.
    pub timeout_ns: Option<u64>,
}

impl Poll {
    /// Validates the argument struct.
    pub fn parse(raw: &SchedPoll) -> Result<Poll, HypercallError> {
        if raw.nr_ports > MAX_POLL_PORTS {
            return Err(HypercallError::BadCount(u64::from(raw.nr_ports)));
        }
        Ok(Poll {
            ports: Gpa(raw.ports),
            nr_ports: raw.nr_ports,
            timeout_ns: (raw.timeout_ns != 0).then_some(raw.timeout_ns),
        })
    }

    /// Serialises the argument struct.
    pub fn to_raw(&self) -> SchedPoll {
        SchedPoll {
            ports: self.ports.0,
            nr_ports: self.nr_ports,
            _pad: 0,
            timeout_ns: self.timeout_ns.unwrap_or(0),
        }
    }
}

/// `VCPU_OP(SET_SINGLESHOT_TIMER)` argument (Xen's `vcpu_set_singleshot_timer`, except that the
/// time is relative, as [`SchedPoll::timeout_ns`] is: the guest's clock is its TSC, which the
/// host does not share on every kind of KVM).
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct VcpuSetSingleshotTimer {
    /// Nanoseconds from now, at most [`MAX_TIMER_NS`]; 0 fires at once.
    pub timeout_ns: u64,
    /// [`TimerFlags`] bits.
    pub flags: u32,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(size_of::<VcpuSetSingleshotTimer>() == 16);
const _: () = assert!(offset_of!(VcpuSetSingleshotTimer, timeout_ns) == 0);
const _: () = assert!(offset_of!(VcpuSetSingleshotTimer, flags) == 8);
const _: () = assert!(offset_of!(VcpuSetSingleshotTimer, _pad) == 12);

bitflags! {
    /// [`VcpuSetSingleshotTimer::flags`] (Xen's `VCPU_SSHOTTMR_*`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct TimerFlags: u32 {
        /// Refuse (`ETIME`) a timer that would expire at once (`timeout_ns` 0).
        const FUTURE = 1 << 0;
    }
}

/// A checked one-shot timer request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SingleshotTimer {
    /// Nanoseconds from now (`<= MAX_TIMER_NS`).
    pub timeout_ns: u64,
    /// Flags.
    pub flags: TimerFlags,
}

impl SingleshotTimer {
    /// Validates the argument struct: known flags, at most [`MAX_TIMER_NS`].
    pub fn parse(raw: &VcpuSetSingleshotTimer) -> Result<SingleshotTimer, HypercallError> {
        let flags =
            TimerFlags::from_bits(raw.flags).ok_or(HypercallError::BadTimerFlags(raw.flags))?;
        if raw.timeout_ns > MAX_TIMER_NS {
            return Err(HypercallError::TimerTooLong(raw.timeout_ns));
        }
        Ok(SingleshotTimer {
            timeout_ns: raw.timeout_ns,
            flags,
        })
    }

    /// Serialises the argument struct.
    pub fn to_raw(&self) -> VcpuSetSingleshotTimer {
        VcpuSetSingleshotTimer {
            timeout_ns: self.timeout_ns,
            flags: self.flags.bits(),
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    extern crate std;
    use std::vec; // prop_oneof! with many arms expands to vec!

    fn req(nr: u64, a: [u64; 3]) -> HypercallRequest {
        HypercallRequest {
            nr,
            args: [a[0], a[1], a[2], 0, 0, 0],
            ..Default::default()
        }
    }

    #[test]
    fn unknown_hypercall_is_enosys() {
        let e = Hypercall::parse(&req(1, [0; 3])).unwrap_err();
        assert_eq!(e, HypercallError::UnknownHypercall(1));
        assert_eq!(e.errno(), Errno::ENOSYS);
    }

    #[test]
    fn unknown_sub_ops_are_enosys() {
        for (n, cmd) in [
            (nr::SCHED_OP, 4),
            (nr::CONSOLE_IO, 2),
            (nr::XEN_VERSION, 1),
            (nr::GRANT_TABLE_OP, 0),
            (nr::EVENT_CHANNEL_OP, 2),
            (nr::VCPU_OP, 0),
            (nr::MEMORY_OP, 0),
            (nr::MEMORY_OP, 2),
        ] {
            let e = Hypercall::parse(&req(n, [cmd, 0, 1])).unwrap_err();
            assert_eq!(e.errno(), Errno::ENOSYS, "{e:?}");
        }
    }

    #[test]
    fn grant_table_op_with_count_other_than_one_is_einval() {
        let e = Hypercall::parse(&req(nr::GRANT_TABLE_OP, [6, 0x1000, 2])).unwrap_err();
        assert_eq!(e, HypercallError::BadCount(2));
        assert_eq!(e.errno(), Errno::EINVAL);
    }

    #[test]
    fn console_write_longer_than_limit_is_einval() {
        let e = Hypercall::parse(&req(nr::CONSOLE_IO, [0, 4097, 0x2000])).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert_eq!(
            Hypercall::parse(&req(nr::CONSOLE_IO, [0, 4096, 0x2000])),
            Ok(Hypercall::ConsoleIo(ConsoleIoCmd::Write {
                buf: Gpa(0x2000),
                len: 4096
            }))
        );
    }

    #[test]
    fn shutdown_reason_and_poll_limits_are_checked() {
        let s = SchedShutdown {
            reason: 5,
            exit_code: 0,
        };
        assert_eq!(
            Shutdown::parse(&s),
            Err(HypercallError::BadShutdownReason(5))
        );
        let s = SchedShutdown {
            reason: 3,
            exit_code: 7,
        };
        assert_eq!(
            Shutdown::parse(&s),
            Ok(Shutdown {
                reason: ShutdownReason::Crash,
                exit_code: 7
            })
        );
        let p = SchedPoll {
            nr_ports: 129,
            ..Default::default()
        };
        assert_eq!(Poll::parse(&p), Err(HypercallError::BadCount(129)));
    }

    #[test]
    fn singleshot_timer_flags_length_and_vcpu_are_checked() {
        let t = |timeout_ns, flags| {
            SingleshotTimer::parse(&VcpuSetSingleshotTimer {
                timeout_ns,
                flags,
                _pad: 0,
            })
        };
        assert_eq!(
            t(MAX_TIMER_NS + 1, 0),
            Err(HypercallError::TimerTooLong(MAX_TIMER_NS + 1))
        );
        assert_eq!(t(u64::MAX, 1).unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(t(5, 2), Err(HypercallError::BadTimerFlags(2)));
        assert_eq!(
            t(MAX_TIMER_NS, 1),
            Ok(SingleshotTimer {
                timeout_ns: MAX_TIMER_NS,
                flags: TimerFlags::FUTURE
            })
        );
        let e = Hypercall::parse(&req(nr::VCPU_OP, [8, 1 << 32, 0x1000])).unwrap_err();
        assert_eq!(e, HypercallError::BadVcpu(1 << 32));
        assert_eq!(e.errno(), Errno::EINVAL);
        assert_eq!(
            Hypercall::parse(&req(nr::VCPU_OP, [9, 3, 0])),
            Ok(Hypercall::VcpuOp(VcpuOpCmd::StopSingleshotTimer {
                vcpu: 3
            }))
        );
    }

    #[test]
    fn errno_values_match_xen_and_round_trip() {
        assert_eq!(Errno::ENOSYS.as_i64(), -38);
        assert_eq!(Errno::ETIMEDOUT.as_i64(), -110);
        assert_eq!(Errno::ETIME.as_i64(), -62);
        assert_eq!(Errno::from_i64(-62), Some(Errno::ETIME));
        for e in [Errno::EPERM, Errno::E2BIG, Errno::EFAULT, Errno::ENOSPC] {
            assert_eq!(Errno::from_i64(e.as_i64()), Some(e));
        }
        assert_eq!(Errno::from_i64(-3), None);
        assert_eq!(encode_result(Ok(5)), 5);
        assert_eq!(encode_result(Ok(u64::MAX)), -22);
        assert_eq!(encode_result(Err(Errno::EAGAIN)), -11);
    }

    fn hypercall() -> impl Strategy<Value = Hypercall> {
        let gpa = any::<u64>().prop_map(Gpa);
        let len = 0..=MAX_CONSOLE_IO;
        prop_oneof![
            (gpa.clone(), len.clone())
                .prop_map(|(buf, len)| Hypercall::ConsoleIo(ConsoleIoCmd::Write { buf, len })),
            (gpa.clone(), len)
                .prop_map(|(buf, len)| Hypercall::ConsoleIo(ConsoleIoCmd::Read { buf, len })),
            Just(Hypercall::XenVersion(XenVersionCmd::Version)),
            gpa.clone()
                .prop_map(|arg| Hypercall::XenVersion(XenVersionCmd::GetFeatures { arg })),
            gpa.clone()
                .prop_map(|arg| Hypercall::GrantTableOp(GnttabCmd::SetupTable { arg })),
            gpa.clone()
                .prop_map(|arg| Hypercall::GrantTableOp(GnttabCmd::QuerySize { arg })),
            Just(Hypercall::SchedOp(SchedCmd::Yield)),
            Just(Hypercall::SchedOp(SchedCmd::Block)),
            gpa.clone()
                .prop_map(|arg| Hypercall::SchedOp(SchedCmd::Shutdown { arg })),
            gpa.clone()
                .prop_map(|arg| Hypercall::SchedOp(SchedCmd::Poll { arg })),
            (any::<u32>(), gpa.clone()).prop_map(|(vcpu, arg)| Hypercall::VcpuOp(
                VcpuOpCmd::SetSingleshotTimer { vcpu, arg }
            )),
            any::<u32>()
                .prop_map(|vcpu| Hypercall::VcpuOp(VcpuOpCmd::StopSingleshotTimer { vcpu })),
            (0u64..8, gpa.clone()).prop_filter_map("known memory op", |(c, arg)| {
                MemoryCmd::from_args(c, arg.0).map(Hypercall::MemoryOp)
            }),
            (0u64..11, gpa).prop_filter_map("known evtchn op", |(op, arg)| {
                EvtchnOp::from_u64(op)
                    .ok()
                    .map(|op| Hypercall::EventChannelOp { op, arg })
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 128), nr in 0u64..40) {
            let mut r = HypercallRequest::read_from_bytes(&bytes[..]).unwrap();
            let _ = Hypercall::parse(&r);
            r.nr = nr;
            if let Err(e) = Hypercall::parse(&r) {
                let _ = e.errno();
            }
        }

        #[test]
        fn arbitrary_sched_args_never_panic(a in any::<[u8; 8]>(), b in any::<[u8; 24]>(), c in any::<[u8; 16]>()) {
            let _ = Shutdown::parse(&SchedShutdown::read_from_bytes(&a[..]).unwrap());
            let _ = Poll::parse(&SchedPoll::read_from_bytes(&b[..]).unwrap());
            if let Err(e) = SingleshotTimer::parse(&VcpuSetSingleshotTimer::read_from_bytes(&c[..]).unwrap()) {
                let _ = e.errno();
            }
        }

        #[test]
        fn valid_hypercall_round_trips(h in hypercall()) {
            prop_assert_eq!(Hypercall::parse(&h.to_request()), Ok(h));
        }

        #[test]
        fn valid_sched_args_round_trip(reason in 0u32..5, code in any::<u32>(), n in 0..=MAX_POLL_PORTS, t in any::<u64>(), p in any::<u64>()) {
            let s = Shutdown::parse(&SchedShutdown { reason, exit_code: code }).unwrap();
            prop_assert_eq!(Shutdown::parse(&s.to_raw()), Ok(s));
            let poll = Poll { ports: Gpa(p), nr_ports: n, timeout_ns: (t != 0).then_some(t) };
            prop_assert_eq!(Poll::parse(&poll.to_raw()), Ok(poll));
        }
    }
}
