//! Event channels, after Xen's `public/event_channel.h` (2-level ABI).
//!
//! `EVENT_CHANNEL_OP(cmd, arg)`: the hypervisor copies [`EvtchnOp::arg_size`]
//! bytes from the guest-physical address `arg` and hands them to
//! [`EvtchnCommand::parse`]. Output fields are written back by the hypervisor
//! into the same raw struct.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::grant::DomId;

/// First I/O port of the event doorbells. Event port `p` rings with `out imm8, al` to I/O port
/// `DOORBELL_BASE + p / 256` with `al = p % 256` (see [`doorbell_of`]), so the guest needs no
/// register for the I/O port and the host a one-byte data match. For ports bound to a host
/// endpoint the host kernel catches the write (`KVM_IOEVENTFD` with a one-byte data match) and
/// signals the endpoint without a VMM exit; any other doorbell write is handled by the VMM exactly
/// like `EVTCHNOP_send` (errors are not reported back: use the hypercall to see them).
pub const DOORBELL_BASE: u16 = 0xc0;
/// Number of doorbell I/O ports (`MAX_PORTS_2L / 256`).
pub const DOORBELL_PORTS: u16 = (MAX_PORTS_2L / 256) as u16;

/// The (I/O port, data byte) that rings event port `port`.
pub const fn doorbell_of(port: u32) -> (u16, u8) {
    (DOORBELL_BASE + (port / 256) as u16, (port % 256) as u8)
}

/// The event port a doorbell write names, if `io_port` is a doorbell.
pub const fn port_of_doorbell(io_port: u16, data: u8) -> Option<u32> {
    if io_port >= DOORBELL_BASE && io_port < DOORBELL_BASE + DOORBELL_PORTS {
        Some((io_port - DOORBELL_BASE) as u32 * 256 + data as u32)
    } else {
        None
    }
}

/// An event-channel port number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(pub u32);

/// Bits in one word of a 2-level bitmap (64-bit guests).
pub const BITS_PER_WORD: u32 = 64;

/// Number of ports in the 2-level ABI with 64-bit words: 64 * 64.
pub const MAX_PORTS_2L: u32 = BITS_PER_WORD * BITS_PER_WORD;

/// Number of virtual IRQs (`NR_VIRQS`); `BIND_VIRQ` accepts `0..NR_VIRQS`.
pub const NR_VIRQS: u32 = 24;

/// `VIRQ_TIMER` (Xen's number): per vCPU, pending when the vCPU's one-shot timer
/// (`VCPU_OP(SET_SINGLESHOT_TIMER)`) expires. The only VIRQ this hypervisor raises.
pub const VIRQ_TIMER: u32 = 0;

impl Port {
    /// Checked constructor: the port must be below [`MAX_PORTS_2L`].
    pub const fn new(v: u32) -> Result<Port, EvtchnError> {
        if v < MAX_PORTS_2L {
            Ok(Port(v))
        } else {
            Err(EvtchnError::PortOutOfRange(v))
        }
    }

    /// Index of the pending/mask bitmap word holding this port; also the bit
    /// of the per-vCPU selector word that covers it.
    pub const fn word(self) -> usize {
        (self.0 / BITS_PER_WORD) as usize
    }

    /// Bit of this port within its bitmap word.
    pub const fn bit(self) -> u32 {
        self.0 % BITS_PER_WORD
    }
}

/// Reads `port`'s bit from a 2-level bitmap; false when the bitmap is too short.
pub fn test_bit(bitmap: &[u64], port: Port) -> bool {
    bitmap
        .get(port.word())
        .is_some_and(|w| w & (1u64 << port.bit()) != 0)
}

/// Sets `port`'s bit; returns the previous value, or `None` when the bitmap is too short.
pub fn set_bit(bitmap: &mut [u64], port: Port) -> Option<bool> {
    let w = bitmap.get_mut(port.word())?;
    let mask = 1u64 << port.bit();
    let old = *w & mask != 0;
    *w |= mask;
    Some(old)
}

/// Clears `port`'s bit; returns the previous value, or `None` when the bitmap is too short.
pub fn clear_bit(bitmap: &mut [u64], port: Port) -> Option<bool> {
    let w = bitmap.get_mut(port.word())?;
    let mask = 1u64 << port.bit();
    let old = *w & mask != 0;
    *w &= !mask;
    Some(old)
}

/// Errors from event-channel argument parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EvtchnError {
    /// Unknown `EVTCHNOP_*` number.
    #[error("unknown evtchn op {0}")]
    UnknownOp(u64),
    /// Argument buffer of the wrong size.
    #[error("evtchn arg is {got} bytes, expected {expected}")]
    BadArgSize {
        /// Bytes supplied.
        got: usize,
        /// Bytes the op needs.
        expected: usize,
    },
    /// Port number beyond the 2-level limit.
    #[error("port {0} out of range")]
    PortOutOfRange(u32),
    /// VIRQ number beyond [`NR_VIRQS`].
    #[error("virq {0} out of range")]
    VirqOutOfRange(u32),
    /// Unknown status value.
    #[error("unknown evtchn status {0}")]
    UnknownStatus(u32),
}

/// `EVTCHNOP_*` sub-operation numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum EvtchnOp {
    /// Connect to a remote domain's unbound port.
    BindInterdomain = 0,
    /// Bind a virtual IRQ.
    BindVirq = 1,
    /// Close a port.
    Close = 3,
    /// Signal a port.
    Send = 4,
    /// Query a port's state.
    Status = 5,
    /// Allocate a port for a remote domain to bind.
    AllocUnbound = 6,
    /// Bind an inter-processor interrupt.
    BindIpi = 7,
    /// Re-target a port to another vCPU.
    BindVcpu = 8,
    /// Unmask a port (and re-deliver if pending).
    Unmask = 9,
    /// Close all ports of a domain.
    Reset = 10,
}

impl EvtchnOp {
    /// Checked conversion from the hypercall's `cmd` argument.
    pub const fn from_u64(v: u64) -> Result<EvtchnOp, EvtchnError> {
        Ok(match v {
            0 => Self::BindInterdomain,
            1 => Self::BindVirq,
            3 => Self::Close,
            4 => Self::Send,
            5 => Self::Status,
            6 => Self::AllocUnbound,
            7 => Self::BindIpi,
            8 => Self::BindVcpu,
            9 => Self::Unmask,
            10 => Self::Reset,
            other => return Err(EvtchnError::UnknownOp(other)),
        })
    }

    /// Size in bytes of this op's argument struct.
    pub const fn arg_size(self) -> usize {
        match self {
            Self::BindInterdomain => size_of::<BindInterdomainArg>(),
            Self::BindVirq => size_of::<BindVirqArg>(),
            Self::Close | Self::Send | Self::Unmask => size_of::<PortArg>(),
            Self::Status => size_of::<StatusArg>(),
            Self::AllocUnbound => size_of::<AllocUnboundArg>(),
            Self::BindIpi => size_of::<BindIpiArg>(),
            Self::BindVcpu => size_of::<BindVcpuArg>(),
            Self::Reset => size_of::<ResetArg>(),
        }
    }
}

impl TryFrom<u64> for EvtchnOp {
    type Error = EvtchnError;
    fn try_from(v: u64) -> Result<Self, EvtchnError> {
        Self::from_u64(v)
    }
}

/// `EVTCHNOP_alloc_unbound`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct AllocUnboundArg {
    /// In: domain to allocate in (normally `DOMID_SELF`).
    pub dom: u16,
    /// In: domain allowed to bind the port.
    pub remote_dom: u16,
    /// Out: the allocated port.
    pub port: u32,
}
const _: () = assert!(size_of::<AllocUnboundArg>() == 8);
const _: () = assert!(offset_of!(AllocUnboundArg, dom) == 0);
const _: () = assert!(offset_of!(AllocUnboundArg, remote_dom) == 2);
const _: () = assert!(offset_of!(AllocUnboundArg, port) == 4);

/// `EVTCHNOP_bind_interdomain`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BindInterdomainArg {
    /// In: domain owning the unbound port.
    pub remote_dom: u16,
    /// Zero.
    pub _pad: u16,
    /// In: the remote unbound port.
    pub remote_port: u32,
    /// Out: the local end.
    pub local_port: u32,
}
const _: () = assert!(size_of::<BindInterdomainArg>() == 12);
const _: () = assert!(offset_of!(BindInterdomainArg, remote_dom) == 0);
const _: () = assert!(offset_of!(BindInterdomainArg, _pad) == 2);
const _: () = assert!(offset_of!(BindInterdomainArg, remote_port) == 4);
const _: () = assert!(offset_of!(BindInterdomainArg, local_port) == 8);

/// `EVTCHNOP_bind_virq`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BindVirqArg {
    /// In: virtual IRQ number.
    pub virq: u32,
    /// In: vCPU to deliver on.
    pub vcpu: u32,
    /// Out: the bound port.
    pub port: u32,
}
const _: () = assert!(size_of::<BindVirqArg>() == 12);
const _: () = assert!(offset_of!(BindVirqArg, virq) == 0);
const _: () = assert!(offset_of!(BindVirqArg, vcpu) == 4);
const _: () = assert!(offset_of!(BindVirqArg, port) == 8);

/// `EVTCHNOP_bind_ipi`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BindIpiArg {
    /// In: vCPU to deliver on.
    pub vcpu: u32,
    /// Out: the bound port.
    pub port: u32,
}
const _: () = assert!(size_of::<BindIpiArg>() == 8);
const _: () = assert!(offset_of!(BindIpiArg, vcpu) == 0);
const _: () = assert!(offset_of!(BindIpiArg, port) == 4);

/// `EVTCHNOP_bind_vcpu`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BindVcpuArg {
    /// In: port to re-target.
    pub port: u32,
    /// In: new vCPU.
    pub vcpu: u32,
}
const _: () = assert!(size_of::<BindVcpuArg>() == 8);
const _: () = assert!(offset_of!(BindVcpuArg, port) == 0);
const _: () = assert!(offset_of!(BindVcpuArg, vcpu) == 4);

/// Argument of `EVTCHNOP_send`, `EVTCHNOP_close` and `EVTCHNOP_unmask`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct PortArg {
    /// In: the port.
    pub port: u32,
}
const _: () = assert!(size_of::<PortArg>() == 4);
const _: () = assert!(offset_of!(PortArg, port) == 0);

/// `EVTCHNOP_reset`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct ResetArg {
    /// In: domain whose ports to close (normally `DOMID_SELF`).
    pub dom: u16,
    /// Zero.
    pub _pad: u16,
}
const _: () = assert!(size_of::<ResetArg>() == 4);
const _: () = assert!(offset_of!(ResetArg, dom) == 0);
const _: () = assert!(offset_of!(ResetArg, _pad) == 2);

/// `EVTCHNOP_status`. `u` is Xen's union: for `Unbound` bytes 0..2 are the
/// remote domain; for `Interdomain` bytes 0..2 the domain and 4..8 the port;
/// for `Pirq`/`Virq` bytes 0..4 the number. Use [`StatusArg::result`] /
/// [`StatusArg::set_result`] rather than poking it.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct StatusArg {
    /// In: domain to query (normally `DOMID_SELF`).
    pub dom: u16,
    /// Zero.
    pub _pad: u16,
    /// In: port to query.
    pub port: u32,
    /// Out: an [`EvtchnStatusKind`].
    pub status: u32,
    /// Out: vCPU the port is bound to.
    pub vcpu: u32,
    /// Out: status-specific data.
    pub u: [u8; 8],
}
const _: () = assert!(size_of::<StatusArg>() == 24);
const _: () = assert!(offset_of!(StatusArg, dom) == 0);
const _: () = assert!(offset_of!(StatusArg, _pad) == 2);
const _: () = assert!(offset_of!(StatusArg, port) == 4);
const _: () = assert!(offset_of!(StatusArg, status) == 8);
const _: () = assert!(offset_of!(StatusArg, vcpu) == 12);
const _: () = assert!(offset_of!(StatusArg, u) == 16);

/// The `status` field of [`StatusArg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum EvtchnStatusKind {
    /// Port is free.
    Closed = 0,
    /// Allocated, waiting for a remote domain to bind.
    Unbound = 1,
    /// Connected to another domain.
    Interdomain = 2,
    /// Bound to a physical IRQ.
    Pirq = 3,
    /// Bound to a virtual IRQ.
    Virq = 4,
    /// Bound to an IPI.
    Ipi = 5,
}

/// A decoded port state, as reported by `EVTCHNOP_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    /// Port is free.
    Closed,
    /// Waiting for `dom` to bind.
    Unbound {
        /// Remote domain allowed to bind.
        dom: DomId,
    },
    /// Connected to `port` in `dom`.
    Interdomain {
        /// Remote domain.
        dom: DomId,
        /// Remote port.
        port: Port,
    },
    /// Bound to a physical IRQ.
    Pirq(u32),
    /// Bound to a virtual IRQ.
    Virq(u32),
    /// Bound to an IPI.
    Ipi,
}

impl StatusArg {
    /// Fills the output fields (hypervisor side).
    pub fn set_result(&mut self, vcpu: u32, state: PortState) {
        let mut u = [0u8; 8];
        let kind = match state {
            PortState::Closed => EvtchnStatusKind::Closed,
            PortState::Unbound { dom } => {
                u[0..2].copy_from_slice(&dom.0.to_le_bytes());
                EvtchnStatusKind::Unbound
            }
            PortState::Interdomain { dom, port } => {
                u[0..2].copy_from_slice(&dom.0.to_le_bytes());
                u[4..8].copy_from_slice(&port.0.to_le_bytes());
                EvtchnStatusKind::Interdomain
            }
            PortState::Pirq(n) => {
                u[0..4].copy_from_slice(&n.to_le_bytes());
                EvtchnStatusKind::Pirq
            }
            PortState::Virq(n) => {
                u[0..4].copy_from_slice(&n.to_le_bytes());
                EvtchnStatusKind::Virq
            }
            PortState::Ipi => EvtchnStatusKind::Ipi,
        };
        self.status = kind as u32;
        self.vcpu = vcpu;
        self.u = u;
    }

    /// Decodes the output fields (guest side): `(vcpu, state)`.
    pub fn result(&self) -> Result<(u32, PortState), EvtchnError> {
        let u = self.u;
        let dom = DomId(u16::from_le_bytes([u[0], u[1]]));
        let word0 = u32::from_le_bytes([u[0], u[1], u[2], u[3]]);
        let word1 = u32::from_le_bytes([u[4], u[5], u[6], u[7]]);
        let state = match self.status {
            0 => PortState::Closed,
            1 => PortState::Unbound { dom },
            2 => PortState::Interdomain {
                dom,
                port: Port::new(word1)?,
            },
            3 => PortState::Pirq(word0),
            4 => PortState::Virq(word0),
            5 => PortState::Ipi,
            other => return Err(EvtchnError::UnknownStatus(other)),
        };
        Ok((self.vcpu, state))
    }
}

/// A checked event-channel request (input fields only).
///
/// Ports are checked against [`MAX_PORTS_2L`] and VIRQs against [`NR_VIRQS`];
/// whether a port is allocated, a domain exists or a vCPU is online is for
/// the caller, which knows the domain's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvtchnCommand {
    /// Allocate a port in `dom` that `remote_dom` may bind.
    AllocUnbound {
        /// Domain to allocate in.
        dom: DomId,
        /// Domain allowed to bind.
        remote_dom: DomId,
    },
    /// Bind to `remote_port` of `remote_dom`.
    BindInterdomain {
        /// Remote domain.
        remote_dom: DomId,
        /// Remote port.
        remote_port: Port,
    },
    /// Bind VIRQ `virq` on `vcpu`.
    BindVirq {
        /// Virtual IRQ.
        virq: u32,
        /// Target vCPU.
        vcpu: u32,
    },
    /// Bind an IPI on `vcpu`.
    BindIpi {
        /// Target vCPU.
        vcpu: u32,
    },
    /// Re-target `port` to `vcpu`.
    BindVcpu {
        /// Port.
        port: Port,
        /// New vCPU.
        vcpu: u32,
    },
    /// Close a port.
    Close(Port),
    /// Signal a port.
    Send(Port),
    /// Unmask a port.
    Unmask(Port),
    /// Query a port.
    Status {
        /// Domain to query.
        dom: DomId,
        /// Port to query.
        port: Port,
    },
    /// Close all ports of `dom`.
    Reset(DomId),
}

fn read<T: FromBytes + KnownLayout + Immutable>(
    op: EvtchnOp,
    bytes: &[u8],
) -> Result<T, EvtchnError> {
    T::read_from_bytes(bytes).map_err(|_| EvtchnError::BadArgSize {
        got: bytes.len(),
        expected: op.arg_size(),
    })
}

impl EvtchnCommand {
    /// Validates `op`'s argument bytes, which must be exactly `op.arg_size()` long.
    pub fn parse(op: EvtchnOp, bytes: &[u8]) -> Result<EvtchnCommand, EvtchnError> {
        Ok(match op {
            EvtchnOp::AllocUnbound => {
                let a: AllocUnboundArg = read(op, bytes)?;
                Self::AllocUnbound {
                    dom: DomId(a.dom),
                    remote_dom: DomId(a.remote_dom),
                }
            }
            EvtchnOp::BindInterdomain => {
                let a: BindInterdomainArg = read(op, bytes)?;
                Self::BindInterdomain {
                    remote_dom: DomId(a.remote_dom),
                    remote_port: Port::new(a.remote_port)?,
                }
            }
            EvtchnOp::BindVirq => {
                let a: BindVirqArg = read(op, bytes)?;
                if a.virq >= NR_VIRQS {
                    return Err(EvtchnError::VirqOutOfRange(a.virq));
                }
                Self::BindVirq {
                    virq: a.virq,
                    vcpu: a.vcpu,
                }
            }
            EvtchnOp::BindIpi => {
                let a: BindIpiArg = read(op, bytes)?;
                Self::BindIpi { vcpu: a.vcpu }
            }
            EvtchnOp::BindVcpu => {
                let a: BindVcpuArg = read(op, bytes)?;
                Self::BindVcpu {
                    port: Port::new(a.port)?,
                    vcpu: a.vcpu,
                }
            }
            EvtchnOp::Close => Self::Close(Port::new(read::<PortArg>(op, bytes)?.port)?),
            EvtchnOp::Send => Self::Send(Port::new(read::<PortArg>(op, bytes)?.port)?),
            EvtchnOp::Unmask => Self::Unmask(Port::new(read::<PortArg>(op, bytes)?.port)?),
            EvtchnOp::Status => {
                let a: StatusArg = read(op, bytes)?;
                Self::Status {
                    dom: DomId(a.dom),
                    port: Port::new(a.port)?,
                }
            }
            EvtchnOp::Reset => Self::Reset(DomId(read::<ResetArg>(op, bytes)?.dom)),
        })
    }

    /// The op number this command travels under.
    pub const fn op(&self) -> EvtchnOp {
        match self {
            Self::AllocUnbound { .. } => EvtchnOp::AllocUnbound,
            Self::BindInterdomain { .. } => EvtchnOp::BindInterdomain,
            Self::BindVirq { .. } => EvtchnOp::BindVirq,
            Self::BindIpi { .. } => EvtchnOp::BindIpi,
            Self::BindVcpu { .. } => EvtchnOp::BindVcpu,
            Self::Close(_) => EvtchnOp::Close,
            Self::Send(_) => EvtchnOp::Send,
            Self::Unmask(_) => EvtchnOp::Unmask,
            Self::Status { .. } => EvtchnOp::Status,
            Self::Reset(_) => EvtchnOp::Reset,
        }
    }

    /// Serialises the argument struct (output fields zero) into `buf`;
    /// returns the bytes written (`self.op().arg_size()`).
    pub fn write_to(&self, buf: &mut [u8]) -> Result<usize, EvtchnError> {
        let n = self.op().arg_size();
        let got = buf.len();
        let out = buf
            .get_mut(..n)
            .ok_or(EvtchnError::BadArgSize { got, expected: n })?;
        match *self {
            Self::AllocUnbound { dom, remote_dom } => out.copy_from_slice(
                AllocUnboundArg {
                    dom: dom.0,
                    remote_dom: remote_dom.0,
                    port: 0,
                }
                .as_bytes(),
            ),
            Self::BindInterdomain {
                remote_dom,
                remote_port,
            } => out.copy_from_slice(
                BindInterdomainArg {
                    remote_dom: remote_dom.0,
                    remote_port: remote_port.0,
                    ..Default::default()
                }
                .as_bytes(),
            ),
            Self::BindVirq { virq, vcpu } => out.copy_from_slice(
                BindVirqArg {
                    virq,
                    vcpu,
                    port: 0,
                }
                .as_bytes(),
            ),
            Self::BindIpi { vcpu } => out.copy_from_slice(BindIpiArg { vcpu, port: 0 }.as_bytes()),
            Self::BindVcpu { port, vcpu } => {
                out.copy_from_slice(BindVcpuArg { port: port.0, vcpu }.as_bytes())
            }
            Self::Close(p) | Self::Send(p) | Self::Unmask(p) => {
                out.copy_from_slice(PortArg { port: p.0 }.as_bytes())
            }
            Self::Status { dom, port } => out.copy_from_slice(
                StatusArg {
                    dom: dom.0,
                    port: port.0,
                    ..Default::default()
                }
                .as_bytes(),
            ),
            Self::Reset(dom) => out.copy_from_slice(
                ResetArg {
                    dom: dom.0,
                    _pad: 0,
                }
                .as_bytes(),
            ),
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unknown_op_numbers_are_rejected() {
        assert_eq!(EvtchnOp::from_u64(2), Err(EvtchnError::UnknownOp(2)));
        assert_eq!(EvtchnOp::from_u64(11), Err(EvtchnError::UnknownOp(11)));
        assert_eq!(EvtchnOp::try_from(4), Ok(EvtchnOp::Send));
    }

    #[test]
    fn send_to_port_beyond_2l_limit_is_rejected() {
        let bytes = 4096u32.to_le_bytes();
        assert_eq!(
            EvtchnCommand::parse(EvtchnOp::Send, &bytes),
            Err(EvtchnError::PortOutOfRange(4096))
        );
        let bytes = 4095u32.to_le_bytes();
        assert_eq!(
            EvtchnCommand::parse(EvtchnOp::Send, &bytes),
            Ok(EvtchnCommand::Send(Port(4095)))
        );
    }

    #[test]
    fn short_argument_is_rejected() {
        assert_eq!(
            EvtchnCommand::parse(EvtchnOp::Status, &[0; 8]),
            Err(EvtchnError::BadArgSize {
                got: 8,
                expected: 24
            })
        );
    }

    #[test]
    fn bind_virq_beyond_nr_virqs_is_rejected() {
        let a = BindVirqArg {
            virq: NR_VIRQS,
            vcpu: 0,
            port: 0,
        };
        assert_eq!(
            EvtchnCommand::parse(EvtchnOp::BindVirq, a.as_bytes()),
            Err(EvtchnError::VirqOutOfRange(NR_VIRQS))
        );
    }

    #[test]
    fn status_result_round_trips() {
        let mut s = StatusArg::default();
        let st = PortState::Interdomain {
            dom: DomId(7),
            port: Port(33),
        };
        s.set_result(2, st);
        assert_eq!(s.result(), Ok((2, st)));
        s.status = 6;
        assert_eq!(s.result(), Err(EvtchnError::UnknownStatus(6)));
    }

    #[test]
    fn bitmap_helpers_address_word_and_bit() {
        let mut map = [0u64; 64];
        let p = Port(130);
        assert_eq!((p.word(), p.bit()), (2, 2));
        assert_eq!(set_bit(&mut map, p), Some(false));
        assert!(test_bit(&map, p));
        assert_eq!(map[2], 4);
        assert_eq!(clear_bit(&mut map, p), Some(true));
        assert!(!test_bit(&map, p));
        assert_eq!(set_bit(&mut map[..1], p), None);
        assert!(!test_bit(&map[..1], p));
    }

    fn port() -> impl Strategy<Value = Port> {
        (0..MAX_PORTS_2L).prop_map(Port)
    }

    fn command() -> impl Strategy<Value = EvtchnCommand> {
        let dom = any::<u16>().prop_map(DomId);
        prop_oneof![
            (dom.clone(), dom.clone())
                .prop_map(|(dom, remote_dom)| { EvtchnCommand::AllocUnbound { dom, remote_dom } }),
            (dom.clone(), port()).prop_map(|(remote_dom, remote_port)| {
                EvtchnCommand::BindInterdomain {
                    remote_dom,
                    remote_port,
                }
            }),
            (0..NR_VIRQS, any::<u32>())
                .prop_map(|(virq, vcpu)| EvtchnCommand::BindVirq { virq, vcpu }),
            any::<u32>().prop_map(|vcpu| EvtchnCommand::BindIpi { vcpu }),
            (port(), any::<u32>()).prop_map(|(port, vcpu)| EvtchnCommand::BindVcpu { port, vcpu }),
            port().prop_map(EvtchnCommand::Close),
            port().prop_map(EvtchnCommand::Send),
            port().prop_map(EvtchnCommand::Unmask),
            (dom.clone(), port()).prop_map(|(dom, port)| EvtchnCommand::Status { dom, port }),
            dom.prop_map(EvtchnCommand::Reset),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(op in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(op) = EvtchnOp::from_u64(op % 16) {
                let _ = EvtchnCommand::parse(op, &bytes);
                let n = op.arg_size().min(bytes.len());
                let _ = EvtchnCommand::parse(op, &bytes[..n]);
            }
        }

        #[test]
        fn valid_command_round_trips(cmd in command()) {
            let mut buf = [0u8; 32];
            let n = cmd.write_to(&mut buf).unwrap();
            prop_assert_eq!(n, cmd.op().arg_size());
            prop_assert_eq!(EvtchnCommand::parse(cmd.op(), &buf[..n]), Ok(cmd));
        }
    }
}
