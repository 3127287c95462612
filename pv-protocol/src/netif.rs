//! Network-device ring protocol, after Xen's `public/io/netif.h`.
//!
//! Two rings: TX (guest to back end: [`NetifTxRequestRaw`] /
//! [`NetifTxResponseRaw`]) and RX (guest posts empty buffers as
//! [`NetifRxRequestRaw`], back end answers with [`NetifRxResponseRaw`]).
//!
//! A transmitted frame spans several TX slots: the first carries the whole
//! frame's `size`, optional extra-info slots follow it (when it has
//! `EXTRA_INFO`), then further data slots while `MORE_DATA` is set. The back
//! end copies the pending slots out and calls [`TxPacket::parse`], which
//! validates the whole chain and computes each slot's own data length.

use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PAGE_SIZE;
use crate::fixed::FixedVec;
use crate::grant::GrantRef;
use crate::ring::RingProtocol;

/// Largest frame a TX chain may describe (its first slot's `size` is a `u16`).
pub const MAX_FRAME_SIZE: usize = 65535;
/// Smallest first-slot `size`: an Ethernet header.
pub const ETH_HLEN: usize = 14;
/// Standard Ethernet MTU.
pub const ETH_MTU: usize = 1500;
/// Most data slots one frame may use (`XEN_NETBK_LEGACY_SLOTS_MAX`).
pub const MAX_SLOTS_PER_FRAME: usize = 18;

/// Store keys of the network protocol.
pub mod keys {
    /// Front end: grant of the TX ring.
    pub const TX_RING_REF: &str = "tx-ring-ref";
    /// Front end: grant of the RX ring.
    pub const RX_RING_REF: &str = "rx-ring-ref";
    /// Front end: event channel port.
    pub const EVENT_CHANNEL: &str = "event-channel";
    /// Back end: MAC address, `xx:xx:xx:xx:xx:xx`.
    pub const MAC: &str = "mac";
    /// Back end: supports copying RX.
    pub const FEATURE_RX_COPY: &str = "feature-rx-copy";
    /// Either end: scatter-gather (multi-slot frames).
    pub const FEATURE_SG: &str = "feature-sg";
    /// Either end: TCPv4 segmentation offload.
    pub const FEATURE_GSO_TCPV4: &str = "feature-gso-tcpv4";
    /// Front end: will not leave checksums blank.
    pub const FEATURE_NO_CSUM_OFFLOAD: &str = "feature-no-csum-offload";
    /// Front end: asks for copying RX.
    pub const REQUEST_RX_COPY: &str = "request-rx-copy";
    /// Back end: most queue pairs it supports.
    pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";
}

bitflags! {
    /// Flags of a TX request.
    ///
    /// Parsed with `from_bits_truncate`: Linux netback ignores undefined bits,
    /// and rejecting them would break nothing but gains nothing either.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct NetTxFlags: u16 {
        /// Protocol checksum field is blank.
        const CSUM_BLANK = 1 << 0;
        /// Protocol checksum already validated.
        const DATA_VALIDATED = 1 << 1;
        /// More data slots follow this one.
        const MORE_DATA = 1 << 2;
        /// Extra-info slots follow this (first) slot.
        const EXTRA_INFO = 1 << 3;
    }
}

bitflags! {
    /// Flags of an RX response.
    ///
    /// Parsed strictly with `from_bits`: responses come from our own back
    /// end, so an undefined bit means a protocol mismatch.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct NetRxFlags: u16 {
        /// Checksum validated.
        const DATA_VALIDATED = 1 << 0;
        /// Checksum blank.
        const CSUM_BLANK = 1 << 1;
        /// More data follows in the next response.
        const MORE_DATA = 1 << 2;
        /// An extra-info response follows.
        const EXTRA_INFO = 1 << 3;
        /// GSO prefix (legacy).
        const GSO_PREFIX = 1 << 4;
    }
}

bitflags! {
    /// Flags of an extra-info slot (unknown bits ignored, as netback does).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct NetExtraFlags: u8 {
        /// Another extra-info slot follows.
        const MORE = 1 << 0;
    }
}

/// Extra-info type numbers (`XEN_NETIF_EXTRA_TYPE_*`).
pub mod extra_type {
    /// Never valid in a slot.
    pub const NONE: u8 = 0;
    /// Segmentation offload.
    pub const GSO: u8 = 1;
    /// Add a multicast address.
    pub const MCAST_ADD: u8 = 2;
    /// Remove a multicast address.
    pub const MCAST_DEL: u8 = 3;
    /// Hash value (not supported here).
    pub const HASH: u8 = 4;
}

/// Segmentation-offload type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GsoType {
    /// TCP over IPv4.
    TcpV4 = 1,
    /// TCP over IPv6.
    TcpV6 = 2,
}

/// Response status (`XEN_NETIF_RSP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum NetifStatus {
    /// Success.
    Okay = 0,
    /// Error.
    Error = -1,
    /// Dropped.
    Dropped = -2,
    /// Filler response for an extra-info slot.
    Null = 1,
}

impl TryFrom<i16> for NetifStatus {
    type Error = NetifError;
    fn try_from(v: i16) -> Result<Self, NetifError> {
        Ok(match v {
            0 => Self::Okay,
            -1 => Self::Error,
            -2 => Self::Dropped,
            1 => Self::Null,
            v => return Err(NetifError::UnknownStatus(v)),
        })
    }
}

/// Errors from network-protocol parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetifError {
    /// The chain continues past the slots supplied.
    #[error("slot chain truncated")]
    Truncated,
    /// First-slot size below an Ethernet header.
    #[error("frame of {0} bytes too short")]
    FrameTooShort(u16),
    /// A slot's data would cross its page.
    #[error("slot {slot} crosses page: offset {offset} len {len}")]
    CrossesPage {
        /// Data-slot index.
        slot: usize,
        /// Its offset.
        offset: u16,
        /// Its data length.
        len: u16,
    },
    /// Following slots hold more data than the first slot's frame size.
    #[error("slot {0} exceeds remaining frame size")]
    SlotExceedsFrame(usize),
    /// More than [`MAX_SLOTS_PER_FRAME`] data slots, or an empty frame.
    #[error("bad slot count")]
    BadSlotCount,
    /// Extra-info type none, hash or unknown.
    #[error("bad extra type {0}")]
    BadExtraType(u8),
    /// The same extra-info type twice in one frame.
    #[error("duplicate extra type {0}")]
    DuplicateExtra(u8),
    /// GSO extra with zero size or unknown type.
    #[error("bad gso: size {size} type {kind}")]
    BadGso {
        /// Segment size.
        size: u16,
        /// GSO type byte.
        kind: u8,
    },
    /// Frame total above [`MAX_FRAME_SIZE`].
    #[error("frame too long")]
    FrameTooLong,
    /// Unknown response status.
    #[error("unknown status {0}")]
    UnknownStatus(i16),
    /// Undefined RX flag bits.
    #[error("bad rx flags {0:#x}")]
    BadRxFlags(u16),
}

/// A TX ring request slot.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NetifTxRequestRaw {
    /// Grant of the data page.
    pub gref: u32,
    /// Data offset within the page.
    pub offset: u16,
    /// [`NetTxFlags`].
    pub flags: u16,
    /// Echoed in the response.
    pub id: u16,
    /// First slot: whole frame size; others: this slot's size.
    pub size: u16,
}

const _: () = assert!(size_of::<NetifTxRequestRaw>() == 12);
const _: () = assert!(offset_of!(NetifTxRequestRaw, gref) == 0);
const _: () = assert!(offset_of!(NetifTxRequestRaw, offset) == 4);
const _: () = assert!(offset_of!(NetifTxRequestRaw, flags) == 6);
const _: () = assert!(offset_of!(NetifTxRequestRaw, id) == 8);
const _: () = assert!(offset_of!(NetifTxRequestRaw, size) == 10);

/// A TX ring response slot.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NetifTxResponseRaw {
    /// The request's id.
    pub id: u16,
    /// A [`NetifStatus`].
    pub status: i16,
}

const _: () = assert!(size_of::<NetifTxResponseRaw>() == 4);
const _: () = assert!(offset_of!(NetifTxResponseRaw, id) == 0);
const _: () = assert!(offset_of!(NetifTxResponseRaw, status) == 2);

/// An extra-info slot (8 bytes, as in Xen; it occupies a TX request or RX
/// response slot). `u` is Xen's union: GSO is `size: u16` at 0, `type: u8`
/// at 2, pad at 3, `features: u16` at 4; multicast is the address in 0..6.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NetifExtraInfoRaw {
    /// An [`extra_type`] value.
    pub extra_type: u8,
    /// [`NetExtraFlags`].
    pub flags: u8,
    /// Type-specific data.
    pub u: [u8; 6],
}

const _: () = assert!(size_of::<NetifExtraInfoRaw>() == 8);
const _: () = assert!(offset_of!(NetifExtraInfoRaw, extra_type) == 0);
const _: () = assert!(offset_of!(NetifExtraInfoRaw, flags) == 1);
const _: () = assert!(offset_of!(NetifExtraInfoRaw, u) == 2);

impl NetifExtraInfoRaw {
    /// Reads the extra info occupying a TX request slot.
    pub fn from_tx_slot(slot: &NetifTxRequestRaw) -> NetifExtraInfoRaw {
        let b = slot.as_bytes();
        let mut out = NetifExtraInfoRaw::default();
        for (d, s) in out.as_mut_bytes().iter_mut().zip(b) {
            *d = *s;
        }
        out
    }

    /// Builds a TX request slot holding this extra info (trailing bytes zero).
    pub fn to_tx_slot(&self) -> NetifTxRequestRaw {
        let mut slot = NetifTxRequestRaw::default();
        for (d, s) in slot.as_mut_bytes().iter_mut().zip(self.as_bytes()) {
            *d = *s;
        }
        slot
    }

    /// Reads the extra info occupying an RX response slot.
    pub fn from_rx_slot(slot: &NetifRxResponseRaw) -> NetifExtraInfoRaw {
        zerocopy::transmute!(*slot)
    }

    /// Builds an RX response slot holding this extra info.
    pub fn to_rx_slot(&self) -> NetifRxResponseRaw {
        zerocopy::transmute!(*self)
    }
}

/// An RX ring request slot: an empty buffer posted by the front end.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NetifRxRequestRaw {
    /// Echoed in the response.
    pub id: u16,
    /// Zero.
    pub _pad: u16,
    /// Grant of the buffer page.
    pub gref: u32,
}

const _: () = assert!(size_of::<NetifRxRequestRaw>() == 8);
const _: () = assert!(offset_of!(NetifRxRequestRaw, id) == 0);
const _: () = assert!(offset_of!(NetifRxRequestRaw, _pad) == 2);
const _: () = assert!(offset_of!(NetifRxRequestRaw, gref) == 4);

/// An RX ring response slot.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NetifRxResponseRaw {
    /// The request's id.
    pub id: u16,
    /// Data offset within the page.
    pub offset: u16,
    /// [`NetRxFlags`].
    pub flags: u16,
    /// Bytes received if `>= 0`, else a [`NetifStatus`] error.
    pub status: i16,
}

const _: () = assert!(size_of::<NetifRxResponseRaw>() == 8);
const _: () = assert!(offset_of!(NetifRxResponseRaw, id) == 0);
const _: () = assert!(offset_of!(NetifRxResponseRaw, offset) == 2);
const _: () = assert!(offset_of!(NetifRxResponseRaw, flags) == 4);
const _: () = assert!(offset_of!(NetifRxResponseRaw, status) == 6);

/// Segmentation-offload parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gso {
    /// Segment (MSS) size, non-zero.
    pub size: u16,
    /// Protocol.
    pub kind: GsoType,
    /// `XEN_NETIF_GSO_FEAT_*` bits (none defined; passed through).
    pub features: u16,
}

/// A checked extra-info slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetExtra {
    /// Segmentation offload.
    Gso(Gso),
    /// Add a multicast address.
    McastAdd([u8; 6]),
    /// Remove a multicast address.
    McastDel([u8; 6]),
}

impl NetExtra {
    /// Validates an extra-info slot; returns it and whether another follows.
    /// Hash extras are rejected: we never advertise hashing.
    pub fn parse(raw: &NetifExtraInfoRaw) -> Result<(NetExtra, bool), NetifError> {
        let more = NetExtraFlags::from_bits_truncate(raw.flags).contains(NetExtraFlags::MORE);
        let u = raw.u;
        let extra = match raw.extra_type {
            extra_type::GSO => {
                let size = u16::from_le_bytes([u[0], u[1]]);
                let kind = match u[2] {
                    1 => GsoType::TcpV4,
                    2 => GsoType::TcpV6,
                    k => return Err(NetifError::BadGso { size, kind: k }),
                };
                if size == 0 {
                    return Err(NetifError::BadGso { size, kind: u[2] });
                }
                NetExtra::Gso(Gso {
                    size,
                    kind,
                    features: u16::from_le_bytes([u[4], u[5]]),
                })
            }
            extra_type::MCAST_ADD => NetExtra::McastAdd(u),
            extra_type::MCAST_DEL => NetExtra::McastDel(u),
            t => return Err(NetifError::BadExtraType(t)),
        };
        Ok((extra, more))
    }

    /// The extra-info type number.
    pub const fn type_code(&self) -> u8 {
        match self {
            Self::Gso(_) => extra_type::GSO,
            Self::McastAdd(_) => extra_type::MCAST_ADD,
            Self::McastDel(_) => extra_type::MCAST_DEL,
        }
    }

    /// Serialises, setting `MORE` if `more`.
    pub fn to_raw(&self, more: bool) -> NetifExtraInfoRaw {
        let u = match self {
            Self::Gso(g) => {
                let s = g.size.to_le_bytes();
                let f = g.features.to_le_bytes();
                [s[0], s[1], g.kind as u8, 0, f[0], f[1]]
            }
            Self::McastAdd(a) | Self::McastDel(a) => *a,
        };
        NetifExtraInfoRaw {
            extra_type: self.type_code(),
            flags: if more { NetExtraFlags::MORE.bits() } else { 0 },
            u,
        }
    }
}

/// One data slot of a checked TX frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetTxSlot {
    /// Grant of the data page.
    pub gref: GrantRef,
    /// Offset of the data in the page.
    pub offset: u16,
    /// This slot's own data length (`offset + len <= PAGE_SIZE`).
    pub len: u16,
    /// Request id, for the response.
    pub id: u16,
}

/// Extra-info slots one frame may carry (one per supported type).
pub const MAX_EXTRAS_PER_FRAME: usize = 3;

/// The extra info of one frame: at most one of each type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxExtras {
    /// Segmentation offload.
    pub gso: Option<Gso>,
    /// Multicast address to add.
    pub mcast_add: Option<[u8; 6]>,
    /// Multicast address to remove.
    pub mcast_del: Option<[u8; 6]>,
}

impl TxExtras {
    /// Stores `e`; fails if its type is already present.
    fn insert(&mut self, e: NetExtra) -> Result<(), NetifError> {
        let dup = match e {
            NetExtra::Gso(g) => self.gso.replace(g).is_some(),
            NetExtra::McastAdd(a) => self.mcast_add.replace(a).is_some(),
            NetExtra::McastDel(a) => self.mcast_del.replace(a).is_some(),
        };
        if dup {
            return Err(NetifError::DuplicateExtra(e.type_code()));
        }
        Ok(())
    }

    /// The extras present, in serialisation order (GSO, add, delete).
    pub fn iter(&self) -> impl Iterator<Item = NetExtra> {
        [
            self.gso.map(NetExtra::Gso),
            self.mcast_add.map(NetExtra::McastAdd),
            self.mcast_del.map(NetExtra::McastDel),
        ]
        .into_iter()
        .flatten()
    }

    /// Number of extra-info slots.
    pub fn count(&self) -> usize {
        self.iter().count()
    }
}

/// A checked TX frame: its data slots with per-slot lengths, its
/// checksum flags and its extra info.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxPacket {
    /// First-slot flags that apply to the frame (`CSUM_BLANK`,
    /// `DATA_VALIDATED`); chain flags are not kept.
    pub flags: NetTxFlags,
    /// Data slots in order (1..=18).
    pub slots: FixedVec<NetTxSlot, MAX_SLOTS_PER_FRAME>,
    /// Extra info.
    pub extras: TxExtras,
}

fn check_slot(slot: usize, offset: u16, len: u16) -> Result<(), NetifError> {
    if usize::from(offset) + usize::from(len) > PAGE_SIZE {
        return Err(NetifError::CrossesPage { slot, offset, len });
    }
    Ok(())
}

impl TxPacket {
    /// Validates the chain starting at `ring[0]` (the slots copied out of
    /// the TX ring; extra slots past the chain are ignored).
    ///
    /// Checks: first `size >= ETH_HLEN`; extras known, supported, not
    /// duplicated, GSO sane; each following slot fits in what the first
    /// slot's size leaves; every slot's data within its page; 1..=18 data
    /// slots. `Truncated` means the chain runs past `ring`: if `ring` held all
    /// published requests, the guest is misbehaving.
    pub fn parse(ring: &[NetifTxRequestRaw]) -> Result<TxPacket, NetifError> {
        let mut it = ring.iter();
        let first = it.next().ok_or(NetifError::Truncated)?;
        let first_flags = NetTxFlags::from_bits_truncate(first.flags);
        if usize::from(first.size) < ETH_HLEN {
            return Err(NetifError::FrameTooShort(first.size));
        }
        let mut pkt = TxPacket {
            flags: first_flags & (NetTxFlags::CSUM_BLANK | NetTxFlags::DATA_VALIDATED),
            ..Default::default()
        };

        let mut more_extra = first_flags.contains(NetTxFlags::EXTRA_INFO);
        while more_extra {
            let slot = it.next().ok_or(NetifError::Truncated)?;
            let (extra, more) = NetExtra::parse(&NetifExtraInfoRaw::from_tx_slot(slot))?;
            pkt.extras.insert(extra)?;
            more_extra = more;
        }

        // First slot's own length is what the following slots leave of `size`.
        let mut remaining = first.size;
        let mut more = first_flags.contains(NetTxFlags::MORE_DATA);
        let mut rest = FixedVec::<NetTxSlot, MAX_SLOTS_PER_FRAME>::new();
        while more {
            let slot = it.next().ok_or(NetifError::Truncated)?;
            let index = rest.len() + 1;
            if index >= MAX_SLOTS_PER_FRAME {
                return Err(NetifError::BadSlotCount);
            }
            remaining = remaining
                .checked_sub(slot.size)
                .ok_or(NetifError::SlotExceedsFrame(index))?;
            check_slot(index, slot.offset, slot.size)?;
            rest.try_push(NetTxSlot {
                gref: GrantRef(slot.gref),
                offset: slot.offset,
                len: slot.size,
                id: slot.id,
            })
            .map_err(|_| NetifError::BadSlotCount)?;
            more = NetTxFlags::from_bits_truncate(slot.flags).contains(NetTxFlags::MORE_DATA);
        }
        check_slot(0, first.offset, remaining)?;
        pkt.slots
            .try_push(NetTxSlot {
                gref: GrantRef(first.gref),
                offset: first.offset,
                len: remaining,
                id: first.id,
            })
            .map_err(|_| NetifError::BadSlotCount)?;
        for s in rest.iter() {
            pkt.slots
                .try_push(*s)
                .map_err(|_| NetifError::BadSlotCount)?;
        }
        Ok(pkt)
    }

    /// Total frame length.
    pub fn total_len(&self) -> usize {
        self.slots.iter().map(|s| usize::from(s.len)).sum()
    }

    /// Ring slots the frame occupies (data plus extra-info slots); the back
    /// end owes this many responses (extras get [`NetifStatus::Null`]).
    pub fn ring_slots(&self) -> usize {
        self.slots.len() + self.extras.count()
    }

    /// Serialises into `out` (front-end side); returns slots written.
    /// Validates the same rules as [`TxPacket::parse`].
    pub fn write_slots(&self, out: &mut [NetifTxRequestRaw]) -> Result<usize, NetifError> {
        let n = self.ring_slots();
        let out = out.get_mut(..n).ok_or(NetifError::Truncated)?;
        let total = self.total_len();
        if total > MAX_FRAME_SIZE {
            return Err(NetifError::FrameTooLong);
        }
        let total = total as u16;
        if usize::from(total) < ETH_HLEN {
            return Err(NetifError::FrameTooShort(total));
        }
        let (first, rest) = self.slots.split_first().ok_or(NetifError::BadSlotCount)?;
        if let Some(g) = self.extras.gso.filter(|g| g.size == 0) {
            return Err(NetifError::BadGso {
                size: 0,
                kind: g.kind as u8,
            });
        }
        for (i, s) in self.slots.iter().enumerate() {
            check_slot(i, s.offset, s.len)?;
        }
        let mut w = out.iter_mut();
        let mut flags = self.flags & (NetTxFlags::CSUM_BLANK | NetTxFlags::DATA_VALIDATED);
        flags.set(NetTxFlags::MORE_DATA, !rest.is_empty());
        let nr_extras = self.extras.count();
        flags.set(NetTxFlags::EXTRA_INFO, nr_extras != 0);
        let head = w.next().ok_or(NetifError::Truncated)?;
        *head = NetifTxRequestRaw {
            gref: first.gref.0,
            offset: first.offset,
            flags: flags.bits(),
            id: first.id,
            size: total,
        };
        for (i, e) in self.extras.iter().enumerate() {
            let slot = w.next().ok_or(NetifError::Truncated)?;
            *slot = e.to_raw(i + 1 < nr_extras).to_tx_slot();
        }
        for (i, s) in rest.iter().enumerate() {
            let slot = w.next().ok_or(NetifError::Truncated)?;
            let mut f = NetTxFlags::empty();
            f.set(NetTxFlags::MORE_DATA, i + 1 < rest.len());
            *slot = NetifTxRequestRaw {
                gref: s.gref.0,
                offset: s.offset,
                flags: f.bits(),
                id: s.id,
                size: s.len,
            };
        }
        Ok(n)
    }
}

/// A checked TX response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetTxResponse {
    /// The request's id.
    pub id: u16,
    /// Outcome.
    pub status: NetifStatus,
}

impl NetTxResponse {
    /// Validates a response slot.
    pub fn parse(raw: &NetifTxResponseRaw) -> Result<NetTxResponse, NetifError> {
        Ok(NetTxResponse {
            id: raw.id,
            status: NetifStatus::try_from(raw.status)?,
        })
    }

    /// Serialises to a response slot.
    pub fn to_raw(&self) -> NetifTxResponseRaw {
        NetifTxResponseRaw {
            id: self.id,
            status: self.status as i16,
        }
    }
}

/// A checked RX request (every raw request is valid; padding is ignored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRxRequest {
    /// Echoed in the response.
    pub id: u16,
    /// Buffer page.
    pub gref: GrantRef,
}

impl From<&NetifRxRequestRaw> for NetRxRequest {
    fn from(raw: &NetifRxRequestRaw) -> Self {
        NetRxRequest {
            id: raw.id,
            gref: GrantRef(raw.gref),
        }
    }
}

impl From<NetRxRequest> for NetifRxRequestRaw {
    fn from(r: NetRxRequest) -> Self {
        NetifRxRequestRaw {
            id: r.id,
            _pad: 0,
            gref: r.gref.0,
        }
    }
}

/// Outcome carried by an RX response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxStatus {
    /// This many bytes were placed at `offset`.
    Data(u16),
    /// Failure (`Error` or `Dropped`).
    Failed(NetifStatus),
}

/// A checked RX response (front-end side).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRxResponse {
    /// The request's id.
    pub id: u16,
    /// Data offset within the page.
    pub offset: u16,
    /// Flags.
    pub flags: NetRxFlags,
    /// Outcome.
    pub status: RxStatus,
}

impl NetRxResponse {
    /// Validates a response slot: known flags, known error status, data within its page.
    pub fn parse(raw: &NetifRxResponseRaw) -> Result<NetRxResponse, NetifError> {
        let flags = NetRxFlags::from_bits(raw.flags).ok_or(NetifError::BadRxFlags(raw.flags))?;
        let status = match u16::try_from(raw.status) {
            Ok(len) => {
                check_slot(0, raw.offset, len)?;
                RxStatus::Data(len)
            }
            Err(_) => match NetifStatus::try_from(raw.status)? {
                s @ (NetifStatus::Error | NetifStatus::Dropped) => RxStatus::Failed(s),
                _ => return Err(NetifError::UnknownStatus(raw.status)),
            },
        };
        Ok(NetRxResponse {
            id: raw.id,
            offset: raw.offset,
            flags,
            status,
        })
    }

    /// Serialises to a response slot.
    pub fn to_raw(&self) -> NetifRxResponseRaw {
        NetifRxResponseRaw {
            id: self.id,
            offset: self.offset,
            flags: self.flags.bits(),
            status: match self.status {
                RxStatus::Data(n) => i16::try_from(n).unwrap_or(i16::MAX),
                RxStatus::Failed(s) => s as i16,
            },
        }
    }
}

/// The TX ring.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetTxRing;

impl RingProtocol for NetTxRing {
    type Req = NetifTxRequestRaw;
    type Rsp = NetifTxResponseRaw;
    const NAME: &'static str = "netif-tx";
}

/// The RX ring.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetRxRing;

impl RingProtocol for NetRxRing {
    type Req = NetifRxRequestRaw;
    type Rsp = NetifRxResponseRaw;
    const NAME: &'static str = "netif-rx";
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tx(gref: u32, offset: u16, flags: NetTxFlags, id: u16, size: u16) -> NetifTxRequestRaw {
        NetifTxRequestRaw {
            gref,
            offset,
            flags: flags.bits(),
            id,
            size,
        }
    }

    #[test]
    fn single_slot_frame_parses() {
        let p = TxPacket::parse(&[tx(1, 100, NetTxFlags::CSUM_BLANK, 7, 60)]).unwrap();
        assert_eq!(p.total_len(), 60);
        assert_eq!(p.flags, NetTxFlags::CSUM_BLANK);
        assert_eq!(p.slots.len(), 1);
        assert_eq!(p.slots[0].len, 60);
        assert_eq!(p.ring_slots(), 1);
    }

    #[test]
    fn first_slot_length_is_size_minus_following_slots() {
        let ring = [
            tx(1, 0, NetTxFlags::MORE_DATA, 1, 3000),
            tx(2, 0, NetTxFlags::MORE_DATA, 2, 1000),
            tx(3, 0, NetTxFlags::empty(), 3, 500),
            tx(9, 0, NetTxFlags::empty(), 9, 9),
        ];
        let p = TxPacket::parse(&ring).unwrap();
        let lens: [u16; 3] = [p.slots[0].len, p.slots[1].len, p.slots[2].len];
        assert_eq!(lens, [1500, 1000, 500]);
        assert_eq!(p.total_len(), 3000);
    }

    #[test]
    fn frame_shorter_than_ethernet_header_is_rejected() {
        assert_eq!(
            TxPacket::parse(&[tx(1, 0, NetTxFlags::empty(), 1, 13)]),
            Err(NetifError::FrameTooShort(13))
        );
    }

    #[test]
    fn following_slots_larger_than_frame_are_rejected() {
        let ring = [
            tx(1, 0, NetTxFlags::MORE_DATA, 1, 100),
            tx(2, 0, NetTxFlags::empty(), 2, 101),
        ];
        assert_eq!(TxPacket::parse(&ring), Err(NetifError::SlotExceedsFrame(1)));
    }

    #[test]
    fn slot_crossing_its_page_is_rejected() {
        assert!(matches!(
            TxPacket::parse(&[tx(1, 4090, NetTxFlags::empty(), 1, 14)]),
            Err(NetifError::CrossesPage { slot: 0, .. })
        ));
        let ring = [
            tx(1, 0, NetTxFlags::MORE_DATA, 1, 5000),
            tx(2, 100, NetTxFlags::empty(), 2, 4000),
        ];
        assert!(matches!(
            TxPacket::parse(&ring),
            Err(NetifError::CrossesPage { slot: 1, .. })
        ));
        // A first slot whose `size` is over a page but whose own part fits is fine.
        let ring = [
            tx(1, 0, NetTxFlags::MORE_DATA, 1, 5000),
            tx(2, 0, NetTxFlags::empty(), 2, 4000),
        ];
        assert!(TxPacket::parse(&ring).is_ok());
    }

    #[test]
    fn chain_of_nineteen_slots_is_rejected_and_eighteen_accepted() {
        let mut ring = [tx(1, 0, NetTxFlags::MORE_DATA, 0, 19 * 100); 19];
        ring[18].flags = 0;
        for s in ring.iter_mut().skip(1) {
            s.size = 100;
        }
        assert_eq!(TxPacket::parse(&ring), Err(NetifError::BadSlotCount));
        ring[17].flags = 0;
        ring[0].size = 18 * 100;
        assert_eq!(TxPacket::parse(&ring).unwrap().slots.len(), 18);
    }

    #[test]
    fn chain_running_past_supplied_slots_is_truncated() {
        let ring = [tx(1, 0, NetTxFlags::MORE_DATA, 1, 100)];
        assert_eq!(TxPacket::parse(&ring), Err(NetifError::Truncated));
        assert_eq!(TxPacket::parse(&[]), Err(NetifError::Truncated));
    }

    #[test]
    fn gso_extra_is_parsed_and_bad_or_duplicate_extras_rejected() {
        let gso = NetExtra::Gso(Gso {
            size: 1448,
            kind: GsoType::TcpV4,
            features: 0,
        });
        let ring = [
            tx(1, 0, NetTxFlags::EXTRA_INFO, 1, 100),
            gso.to_raw(false).to_tx_slot(),
        ];
        let p = TxPacket::parse(&ring).unwrap();
        assert_eq!(p.extras.gso.map(|g| g.size), Some(1448));
        assert_eq!(p.ring_slots(), 2);

        let ring = [
            tx(1, 0, NetTxFlags::EXTRA_INFO, 1, 100),
            gso.to_raw(true).to_tx_slot(),
            gso.to_raw(false).to_tx_slot(),
        ];
        assert_eq!(TxPacket::parse(&ring), Err(NetifError::DuplicateExtra(1)));

        let mut bad = gso.to_raw(false);
        bad.u[0] = 0;
        bad.u[1] = 0;
        let ring = [tx(1, 0, NetTxFlags::EXTRA_INFO, 1, 100), bad.to_tx_slot()];
        assert!(matches!(
            TxPacket::parse(&ring),
            Err(NetifError::BadGso { size: 0, .. })
        ));

        let hash = NetifExtraInfoRaw {
            extra_type: extra_type::HASH,
            ..Default::default()
        };
        let ring = [tx(1, 0, NetTxFlags::EXTRA_INFO, 1, 100), hash.to_tx_slot()];
        assert_eq!(TxPacket::parse(&ring), Err(NetifError::BadExtraType(4)));
    }

    #[test]
    fn rx_response_checks_status_flags_and_page_bounds() {
        let ok = NetifRxResponseRaw {
            id: 1,
            offset: 0,
            flags: 0,
            status: 1514,
        };
        assert_eq!(
            NetRxResponse::parse(&ok).unwrap().status,
            RxStatus::Data(1514)
        );
        let over = NetifRxResponseRaw { offset: 4000, ..ok };
        assert!(matches!(
            NetRxResponse::parse(&over),
            Err(NetifError::CrossesPage { .. })
        ));
        let bad_flags = NetifRxResponseRaw {
            flags: 1 << 9,
            ..ok
        };
        assert_eq!(
            NetRxResponse::parse(&bad_flags),
            Err(NetifError::BadRxFlags(1 << 9))
        );
        let dropped = NetifRxResponseRaw { status: -2, ..ok };
        assert_eq!(
            NetRxResponse::parse(&dropped).unwrap().status,
            RxStatus::Failed(NetifStatus::Dropped)
        );
        let weird = NetifRxResponseRaw { status: -5, ..ok };
        assert_eq!(
            NetRxResponse::parse(&weird),
            Err(NetifError::UnknownStatus(-5))
        );
    }

    #[test]
    fn extra_info_fits_an_rx_slot() {
        let e = NetExtra::McastAdd([1, 2, 3, 4, 5, 6]).to_raw(false);
        let back = NetifExtraInfoRaw::from_rx_slot(&e.to_rx_slot());
        assert_eq!(
            NetExtra::parse(&back),
            Ok((NetExtra::McastAdd([1, 2, 3, 4, 5, 6]), false))
        );
    }

    #[test]
    fn tx_status_values_round_trip() {
        for s in [
            NetifStatus::Okay,
            NetifStatus::Error,
            NetifStatus::Dropped,
            NetifStatus::Null,
        ] {
            let r = NetTxResponse { id: 3, status: s };
            assert_eq!(NetTxResponse::parse(&r.to_raw()), Ok(r));
        }
        assert_eq!(NetifStatus::try_from(2), Err(NetifError::UnknownStatus(2)));
    }

    fn raw_slot() -> impl Strategy<Value = NetifTxRequestRaw> {
        (
            any::<u32>(),
            0u16..5000,
            0u16..32,
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(gref, offset, flags, id, size)| NetifTxRequestRaw {
                gref,
                offset,
                flags,
                id,
                size,
            })
    }

    fn data_slot() -> impl Strategy<Value = NetTxSlot> {
        (any::<u32>(), 0u16..=4096, any::<u16>())
            .prop_flat_map(|(g, off, id)| (Just(g), Just(off), 0..=(4096 - off), Just(id)))
            .prop_map(|(g, offset, len, id)| NetTxSlot {
                gref: GrantRef(g),
                offset,
                len,
                id,
            })
    }

    fn packet() -> impl Strategy<Value = TxPacket> {
        let extra = prop_oneof![
            (1u16.., any::<bool>(), any::<u16>()).prop_map(|(size, v6, features)| NetExtra::Gso(
                Gso {
                    size,
                    kind: if v6 { GsoType::TcpV6 } else { GsoType::TcpV4 },
                    features
                }
            )),
            any::<[u8; 6]>().prop_map(NetExtra::McastAdd),
            any::<[u8; 6]>().prop_map(NetExtra::McastDel),
        ];
        (
            proptest::collection::vec(data_slot(), 1..=MAX_SLOTS_PER_FRAME),
            proptest::collection::vec(extra, 0..=3),
            0u16..4,
        )
            .prop_filter_map("valid frame", |(slots, extras, flags)| {
                let total: usize = slots.iter().map(|s| usize::from(s.len)).sum();
                if !(ETH_HLEN..=MAX_FRAME_SIZE).contains(&total) {
                    return None;
                }
                let mut ex = TxExtras::default();
                for e in extras {
                    let _ = ex.insert(e);
                }
                Some(TxPacket {
                    flags: NetTxFlags::from_bits_truncate(flags),
                    slots: FixedVec::from_slice(&slots)?,
                    extras: ex,
                })
            })
    }

    proptest! {
        #[test]
        fn arbitrary_tx_chain_never_panics(ring in proptest::collection::vec(raw_slot(), 0..24)) {
            if let Ok(p) = TxPacket::parse(&ring) {
                prop_assert!(p.ring_slots() <= ring.len());
                prop_assert!(p.total_len() <= MAX_FRAME_SIZE);
                for s in p.slots.iter() {
                    prop_assert!(usize::from(s.offset) + usize::from(s.len) <= PAGE_SIZE);
                }
            }
        }

        #[test]
        fn arbitrary_responses_and_extras_never_panic(a in any::<[u8; 8]>(), b in any::<[u8; 4]>()) {
            let _ = NetRxResponse::parse(&NetifRxResponseRaw::read_from_bytes(&a[..]).unwrap());
            let _ = NetExtra::parse(&NetifExtraInfoRaw::read_from_bytes(&a[..]).unwrap());
            let _ = NetTxResponse::parse(&NetifTxResponseRaw::read_from_bytes(&b[..]).unwrap());
        }

        #[test]
        fn valid_packet_round_trips(p in packet()) {
            let mut ring = [NetifTxRequestRaw::default(); MAX_SLOTS_PER_FRAME + MAX_EXTRAS_PER_FRAME];
            let n = p.write_slots(&mut ring).unwrap();
            prop_assert_eq!(n, p.ring_slots());
            prop_assert_eq!(TxPacket::parse(&ring[..n]), Ok(p));
        }

        #[test]
        fn valid_rx_response_round_trips(id in any::<u16>(), off in 0u16..4096, len in 0u16..4096, flags in 0u16..32) {
            let len = len.min(4096 - off);
            let r = NetRxResponse {
                id,
                offset: off,
                flags: NetRxFlags::from_bits_truncate(flags),
                status: RxStatus::Data(len),
            };
            prop_assert_eq!(NetRxResponse::parse(&r.to_raw()), Ok(r));
        }
    }
}
