//! Block-device ring protocol, after Xen's `public/io/blkif.h` (x86_64 layout).
//!
//! A ring slot holds a 112-byte [`BlkifRequestRaw`]; its first byte selects
//! which of three layouts applies (direct read/write/flush, discard,
//! indirect). The back end copies the slot out, then calls
//! [`BlkRequest::parse`]. On a parse error it still answers, using
//! [`BlkifRequestRaw::id`] (offset 8 in every layout) and
//! [`BlkifError::response_status`].

use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::fixed::FixedVec;
use crate::grant::GrantRef;
use crate::ring::RingProtocol;
use crate::{PAGE_SIZE, SECTOR_SIZE};

/// Segments carried directly in a request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Segment descriptors in one indirect page (4096 / 8).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / size_of::<BlkifSegmentRaw>();
/// Indirect pages one indirect request may reference.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Largest `nr_segments` of an indirect request (8 * 512).
pub const MAX_INDIRECT_SEGMENTS: usize =
    MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE;
/// Sectors in one page; a segment's `last_sect` is at most this minus one.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE) as u8;

/// Store keys of the block protocol (front end and back end directories).
pub mod keys {
    /// Back end: supports `FLUSH_DISKCACHE` (value "1").
    pub const FEATURE_FLUSH_CACHE: &str = "feature-flush-cache";
    /// Back end: supports `DISCARD`.
    pub const FEATURE_DISCARD: &str = "feature-discard";
    /// Back end: largest `nr_segments` accepted in an indirect request.
    pub const FEATURE_MAX_INDIRECT_SEGMENTS: &str = "feature-max-indirect-segments";
    /// Either end: persistent grants.
    pub const FEATURE_PERSISTENT: &str = "feature-persistent";
    /// Back end: most rings (queues) it supports.
    pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";
    /// Front end: rings it set up.
    pub const MULTI_QUEUE_NUM_QUEUES: &str = "multi-queue-num-queues";
    /// Front end: log2 of ring pages used.
    pub const RING_PAGE_ORDER: &str = "ring-page-order";
    /// Back end: largest ring-page-order supported.
    pub const MAX_RING_PAGE_ORDER: &str = "max-ring-page-order";
    /// Back end: disk size in 512-byte sectors.
    pub const SECTORS: &str = "sectors";
    /// Back end: logical sector size in bytes.
    pub const SECTOR_SIZE: &str = "sector-size";
    /// Back end: `VDISK_*` bits, see [`super::VdiskInfo`].
    pub const INFO: &str = "info";
    /// Front end: grant reference of the (single-page) ring.
    pub const RING_REF: &str = "ring-ref";
    /// Front end: event channel port.
    pub const EVENT_CHANNEL: &str = "event-channel";
}

bitflags! {
    /// The `info` key's `VDISK_*` bits.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct VdiskInfo: u32 {
        /// The disk is a CD-ROM.
        const CDROM = 1 << 0;
        /// The medium is removable.
        const REMOVABLE = 1 << 1;
        /// The disk is read-only.
        const READONLY = 1 << 2;
    }
}

bitflags! {
    /// The `flag` byte of a discard request.
    ///
    /// Parsed with `from_bits_truncate`: Linux blkback looks at the secure bit
    /// only and ignores the others, so we do too.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct DiscardFlags: u8 {
        /// Secure erase.
        const SECURE = 1 << 0;
    }
}

/// Request operation codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlkOp {
    /// Read into the segments.
    Read = 0,
    /// Write from the segments.
    Write = 1,
    /// Write barrier (unsupported).
    WriteBarrier = 2,
    /// Flush the disk cache, optionally after writing the segments.
    FlushDiskcache = 3,
    /// Reserved (unsupported).
    Reserved = 4,
    /// Discard a sector range.
    Discard = 5,
    /// Read or write through indirect segment pages.
    Indirect = 6,
}

impl TryFrom<u8> for BlkOp {
    type Error = BlkifError;
    fn try_from(op: u8) -> Result<Self, BlkifError> {
        Ok(match op {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::WriteBarrier,
            3 => Self::FlushDiskcache,
            4 => Self::Reserved,
            5 => Self::Discard,
            6 => Self::Indirect,
            op => return Err(BlkifError::UnknownOp(op)),
        })
    }
}

/// Data direction of an indirect request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IndirectOp {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
}

impl TryFrom<u8> for IndirectOp {
    type Error = BlkifError;
    fn try_from(op: u8) -> Result<Self, BlkifError> {
        match op {
            0 => Ok(Self::Read),
            1 => Ok(Self::Write),
            other => Err(BlkifError::BadIndirectOp(other)),
        }
    }
}

/// Response status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum BlkStatus {
    /// Success.
    Okay = 0,
    /// I/O or request error.
    Error = -1,
    /// Operation not supported.
    NotSupported = -2,
}

impl TryFrom<i16> for BlkStatus {
    type Error = BlkifError;
    fn try_from(v: i16) -> Result<Self, BlkifError> {
        Ok(match v {
            0 => Self::Okay,
            -1 => Self::Error,
            -2 => Self::NotSupported,
            v => return Err(BlkifError::UnknownStatus(v)),
        })
    }
}

/// Errors from block-protocol parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlkifError {
    /// A defined but unsupported operation (write barrier, reserved).
    #[error("unsupported op {0}")]
    Unsupported(u8),
    /// An undefined operation code.
    #[error("unknown op {0}")]
    UnknownOp(u8),
    /// Segment count outside the range the operation allows.
    #[error("bad segment count {0}")]
    BadSegmentCount(usize),
    /// A segment with `first_sect > last_sect` or `last_sect > 7`.
    #[error("bad segment {index}: sectors {first}..={last}")]
    BadSegment {
        /// Position of the segment in its request or page.
        index: usize,
        /// Its `first_sect`.
        first: u8,
        /// Its `last_sect`.
        last: u8,
    },
    /// The request's sector range wraps past `u64::MAX`.
    #[error("sector range overflows")]
    SectorOverflow,
    /// Indirect request whose inner op is not read or write.
    #[error("bad indirect op {0}")]
    BadIndirectOp(u8),
    /// Unknown response status.
    #[error("unknown status {0}")]
    UnknownStatus(i16),
}

impl BlkifError {
    /// Status the back end should answer a request that failed to parse with.
    pub const fn response_status(&self) -> BlkStatus {
        match self {
            Self::Unsupported(_) | Self::UnknownOp(_) => BlkStatus::NotSupported,
            _ => BlkStatus::Error,
        }
    }
}

/// A segment descriptor as on the wire: sectors `first_sect..=last_sect` of
/// the page granted by `gref`.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BlkifSegmentRaw {
    /// Grant reference of the data page.
    pub gref: u32,
    /// First sector in the page.
    pub first_sect: u8,
    /// Last sector in the page (inclusive).
    pub last_sect: u8,
    /// Zero.
    pub _pad: u16,
}

const _: () = assert!(size_of::<BlkifSegmentRaw>() == 8);
const _: () = assert!(offset_of!(BlkifSegmentRaw, gref) == 0);
const _: () = assert!(offset_of!(BlkifSegmentRaw, first_sect) == 4);
const _: () = assert!(offset_of!(BlkifSegmentRaw, last_sect) == 5);
const _: () = assert!(offset_of!(BlkifSegmentRaw, _pad) == 6);
const _: () = assert!(SEGMENTS_PER_INDIRECT_PAGE == 512);
const _: () = assert!(SECTORS_PER_PAGE == 8);

/// The ring-slot request: the direct read/write/flush layout. Discard and
/// indirect requests share the slot; view them with
/// [`BlkifRequestRaw::as_discard`] / [`BlkifRequestRaw::as_indirect`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BlkifRequestRaw {
    /// A [`BlkOp`] value (unchecked).
    pub operation: u8,
    /// Number of valid entries in `seg`.
    pub nr_segments: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Zero.
    pub _pad0: u32,
    /// Front end's request id, echoed in the response.
    pub id: u64,
    /// First sector (512-byte units).
    pub sector_number: u64,
    /// Segment descriptors.
    pub seg: [BlkifSegmentRaw; MAX_SEGMENTS_PER_REQUEST],
}

const _: () = assert!(size_of::<BlkifRequestRaw>() == 112);
const _: () = assert!(offset_of!(BlkifRequestRaw, operation) == 0);
const _: () = assert!(offset_of!(BlkifRequestRaw, nr_segments) == 1);
const _: () = assert!(offset_of!(BlkifRequestRaw, handle) == 2);
const _: () = assert!(offset_of!(BlkifRequestRaw, _pad0) == 4);
const _: () = assert!(offset_of!(BlkifRequestRaw, id) == 8);
const _: () = assert!(offset_of!(BlkifRequestRaw, sector_number) == 16);
const _: () = assert!(offset_of!(BlkifRequestRaw, seg) == 24);

/// Discard layout of a request slot.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlkifDiscardRaw {
    /// `BlkOp::Discard`.
    pub operation: u8,
    /// [`DiscardFlags`].
    pub flag: u8,
    /// Virtual device handle.
    pub handle: u16,
    /// Zero.
    pub _pad0: u32,
    /// Request id.
    pub id: u64,
    /// First sector to discard.
    pub sector_number: u64,
    /// Number of sectors to discard.
    pub nr_sectors: u64,
    /// Zero.
    pub _pad1: [u8; 80],
}

const _: () = assert!(size_of::<BlkifDiscardRaw>() == 112);
const _: () = assert!(offset_of!(BlkifDiscardRaw, operation) == 0);
const _: () = assert!(offset_of!(BlkifDiscardRaw, flag) == 1);
const _: () = assert!(offset_of!(BlkifDiscardRaw, handle) == 2);
const _: () = assert!(offset_of!(BlkifDiscardRaw, _pad0) == 4);
const _: () = assert!(offset_of!(BlkifDiscardRaw, id) == 8);
const _: () = assert!(offset_of!(BlkifDiscardRaw, sector_number) == 16);
const _: () = assert!(offset_of!(BlkifDiscardRaw, nr_sectors) == 24);
const _: () = assert!(offset_of!(BlkifDiscardRaw, _pad1) == 32);

impl Default for BlkifDiscardRaw {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

/// Indirect layout of a request slot.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct BlkifIndirectRaw {
    /// `BlkOp::Indirect`.
    pub operation: u8,
    /// An [`IndirectOp`] value (unchecked).
    pub indirect_op: u8,
    /// Total segments across the indirect pages.
    pub nr_segments: u16,
    /// Zero.
    pub _pad0: u32,
    /// Request id.
    pub id: u64,
    /// First sector.
    pub sector_number: u64,
    /// Virtual device handle.
    pub handle: u16,
    /// Zero.
    pub _pad1: u16,
    /// Grant references of the indirect pages; the first
    /// `ceil(nr_segments / 512)` are used.
    pub indirect_grefs: [u32; MAX_INDIRECT_PAGES_PER_REQUEST],
    /// Zero.
    pub _pad2: [u8; 52],
}

const _: () = assert!(size_of::<BlkifIndirectRaw>() == 112);
const _: () = assert!(offset_of!(BlkifIndirectRaw, operation) == 0);
const _: () = assert!(offset_of!(BlkifIndirectRaw, indirect_op) == 1);
const _: () = assert!(offset_of!(BlkifIndirectRaw, nr_segments) == 2);
const _: () = assert!(offset_of!(BlkifIndirectRaw, _pad0) == 4);
const _: () = assert!(offset_of!(BlkifIndirectRaw, id) == 8);
const _: () = assert!(offset_of!(BlkifIndirectRaw, sector_number) == 16);
const _: () = assert!(offset_of!(BlkifIndirectRaw, handle) == 24);
const _: () = assert!(offset_of!(BlkifIndirectRaw, _pad1) == 26);
const _: () = assert!(offset_of!(BlkifIndirectRaw, indirect_grefs) == 28);
const _: () = assert!(offset_of!(BlkifIndirectRaw, _pad2) == 60);

impl Default for BlkifIndirectRaw {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl BlkifRequestRaw {
    /// The request id; at offset 8 in every layout, so valid even when the
    /// request does not parse.
    pub const fn id(&self) -> u64 {
        self.id
    }

    /// Reinterprets the slot as a discard request.
    pub fn as_discard(&self) -> BlkifDiscardRaw {
        zerocopy::transmute!(*self)
    }

    /// Reinterprets the slot as an indirect request.
    pub fn as_indirect(&self) -> BlkifIndirectRaw {
        zerocopy::transmute!(*self)
    }
}

impl From<BlkifDiscardRaw> for BlkifRequestRaw {
    fn from(d: BlkifDiscardRaw) -> Self {
        zerocopy::transmute!(d)
    }
}

impl From<BlkifIndirectRaw> for BlkifRequestRaw {
    fn from(d: BlkifIndirectRaw) -> Self {
        zerocopy::transmute!(d)
    }
}

/// The response slot.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct BlkifResponseRaw {
    /// The request's id.
    pub id: u64,
    /// The request's operation byte, echoed.
    pub operation: u8,
    /// Zero.
    pub _pad0: u8,
    /// A [`BlkStatus`] value.
    pub status: i16,
    /// Zero.
    pub _pad1: u32,
}

const _: () = assert!(size_of::<BlkifResponseRaw>() == 16);
const _: () = assert!(offset_of!(BlkifResponseRaw, id) == 0);
const _: () = assert!(offset_of!(BlkifResponseRaw, operation) == 8);
const _: () = assert!(offset_of!(BlkifResponseRaw, _pad0) == 9);
const _: () = assert!(offset_of!(BlkifResponseRaw, status) == 10);
const _: () = assert!(offset_of!(BlkifResponseRaw, _pad1) == 12);

/// A checked response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkResponse {
    /// The request's id.
    pub id: u64,
    /// The request's operation byte (raw: unsupported ops are echoed too).
    pub operation: u8,
    /// Outcome.
    pub status: BlkStatus,
}

impl BlkResponse {
    /// Validates a response slot (front-end side).
    pub fn parse(raw: &BlkifResponseRaw) -> Result<BlkResponse, BlkifError> {
        Ok(BlkResponse {
            id: raw.id,
            operation: raw.operation,
            status: BlkStatus::try_from(raw.status)?,
        })
    }

    /// Serialises to a response slot (back-end side).
    pub fn to_raw(&self) -> BlkifResponseRaw {
        BlkifResponseRaw {
            id: self.id,
            operation: self.operation,
            status: self.status as i16,
            ..Default::default()
        }
    }
}

/// A checked segment: sectors `first_sect..=last_sect` (all within one page)
/// of the page granted by `gref`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkSegment {
    /// Grant of the data page.
    pub gref: GrantRef,
    /// First sector, `<= last_sect`.
    pub first_sect: u8,
    /// Last sector, `< SECTORS_PER_PAGE`.
    pub last_sect: u8,
}

impl BlkSegment {
    /// Validates one segment; `index` is only used in the error.
    pub fn parse(raw: &BlkifSegmentRaw, index: usize) -> Result<BlkSegment, BlkifError> {
        if raw.first_sect > raw.last_sect || raw.last_sect >= SECTORS_PER_PAGE {
            return Err(BlkifError::BadSegment {
                index,
                first: raw.first_sect,
                last: raw.last_sect,
            });
        }
        Ok(BlkSegment {
            gref: GrantRef(raw.gref),
            first_sect: raw.first_sect,
            last_sect: raw.last_sect,
        })
    }

    /// Serialises to the wire form.
    pub fn to_raw(&self) -> BlkifSegmentRaw {
        BlkifSegmentRaw {
            gref: self.gref.0,
            first_sect: self.first_sect,
            last_sect: self.last_sect,
            _pad: 0,
        }
    }

    /// Sectors covered (1..=8 for a checked segment).
    pub const fn nr_sectors(&self) -> u64 {
        (self.last_sect as u64 + 1).saturating_sub(self.first_sect as u64)
    }

    /// Byte offset of the data within its page.
    pub const fn byte_offset(&self) -> usize {
        self.first_sect as usize * SECTOR_SIZE as usize
    }

    /// Byte length of the data (offset + len <= PAGE_SIZE for a checked segment).
    pub const fn byte_len(&self) -> usize {
        self.nr_sectors() as usize * SECTOR_SIZE as usize
    }
}

/// Total bytes moved by a list of segments.
pub fn segments_byte_len(segs: &[BlkSegment]) -> u64 {
    segs.iter().map(|s| s.nr_sectors() * SECTOR_SIZE).sum()
}

fn segments_sectors(segs: &[BlkSegment]) -> u64 {
    segs.iter().map(BlkSegment::nr_sectors).sum()
}

/// Segments carried directly in a request (0..=11).
pub type DirectSegments = FixedVec<BlkSegment, MAX_SEGMENTS_PER_REQUEST>;
/// Segments read from one indirect page (1..=512).
pub type IndirectPageSegments = FixedVec<BlkSegment, SEGMENTS_PER_INDIRECT_PAGE>;
/// Grant references of an indirect request's pages (1..=8).
pub type IndirectGrefs = FixedVec<GrantRef, MAX_INDIRECT_PAGES_PER_REQUEST>;

/// A checked block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequest {
    /// Read `segments` (1..=11) starting at `sector`.
    Read {
        /// Request id.
        id: u64,
        /// Virtual device handle.
        handle: u16,
        /// First sector.
        sector: u64,
        /// Data segments, in disk order.
        segments: DirectSegments,
    },
    /// Write `segments` (1..=11) starting at `sector`.
    Write {
        /// Request id.
        id: u64,
        /// Virtual device handle.
        handle: u16,
        /// First sector.
        sector: u64,
        /// Data segments, in disk order.
        segments: DirectSegments,
    },
    /// Flush the disk cache. Xen allows a flush to carry data: the segments
    /// (0..=11) are written at `sector` first (Linux front ends do this for
    /// FUA/preflush writes); with no segments `sector` is meaningless.
    Flush {
        /// Request id.
        id: u64,
        /// Virtual device handle.
        handle: u16,
        /// First sector of the data, if any.
        sector: u64,
        /// Data to write before flushing (may be empty).
        segments: DirectSegments,
    },
    /// Discard `nr_sectors` sectors starting at `sector`.
    Discard {
        /// Request id.
        id: u64,
        /// Virtual device handle.
        handle: u16,
        /// First sector.
        sector: u64,
        /// Sectors to discard.
        nr_sectors: u64,
        /// Secure erase requested.
        secure: bool,
    },
    /// Read or write whose segments live in indirect pages.
    Indirect {
        /// Request id.
        id: u64,
        /// Virtual device handle.
        handle: u16,
        /// Direction.
        op: IndirectOp,
        /// First sector.
        sector: u64,
        /// Total segments (1..=4096); parse each page with
        /// [`parse_indirect_page`] and [`indirect_page_count`].
        nr_segments: u16,
        /// Grants of the `ceil(nr_segments / 512)` indirect pages.
        pages: IndirectGrefs,
    },
}

fn check_direct(raw: &BlkifRequestRaw, min: usize) -> Result<DirectSegments, BlkifError> {
    let n = usize::from(raw.nr_segments);
    if n < min || n > MAX_SEGMENTS_PER_REQUEST {
        return Err(BlkifError::BadSegmentCount(n));
    }
    let mut segs = DirectSegments::new();
    for (index, s) in raw.seg.iter().take(n).enumerate() {
        let seg = BlkSegment::parse(s, index)?;
        segs.try_push(seg)
            .map_err(|_| BlkifError::BadSegmentCount(n))?;
    }
    raw.sector_number
        .checked_add(segments_sectors(&segs))
        .ok_or(BlkifError::SectorOverflow)?;
    Ok(segs)
}

impl BlkRequest {
    /// Validates a request slot copied out of shared memory.
    ///
    /// Checks: known, supported op; segment counts (read/write 1..=11, flush
    /// 0..=11, indirect 1..=4096); every direct segment's sector range;
    /// no `u64` wrap of the sector range; indirect inner op read/write.
    /// The back end must still check sectors against the disk size and an
    /// indirect count against its advertised `feature-max-indirect-segments`.
    pub fn parse(raw: &BlkifRequestRaw) -> Result<BlkRequest, BlkifError> {
        let (id, handle, sector) = (raw.id, raw.handle, raw.sector_number);
        match BlkOp::try_from(raw.operation)? {
            BlkOp::Read => Ok(Self::Read {
                id,
                handle,
                sector,
                segments: check_direct(raw, 1)?,
            }),
            BlkOp::Write => Ok(Self::Write {
                id,
                handle,
                sector,
                segments: check_direct(raw, 1)?,
            }),
            BlkOp::FlushDiskcache => Ok(Self::Flush {
                id,
                handle,
                sector,
                segments: check_direct(raw, 0)?,
            }),
            BlkOp::WriteBarrier | BlkOp::Reserved => Err(BlkifError::Unsupported(raw.operation)),
            BlkOp::Discard => {
                let d = raw.as_discard();
                d.sector_number
                    .checked_add(d.nr_sectors)
                    .ok_or(BlkifError::SectorOverflow)?;
                Ok(Self::Discard {
                    id: d.id,
                    handle: d.handle,
                    sector: d.sector_number,
                    nr_sectors: d.nr_sectors,
                    secure: DiscardFlags::from_bits_truncate(d.flag).contains(DiscardFlags::SECURE),
                })
            }
            BlkOp::Indirect => {
                let r = raw.as_indirect();
                let op = IndirectOp::try_from(r.indirect_op)?;
                let n = usize::from(r.nr_segments);
                if n == 0 || n > MAX_INDIRECT_SEGMENTS {
                    return Err(BlkifError::BadSegmentCount(n));
                }
                let nr_pages = n.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
                let mut pages = IndirectGrefs::new();
                for g in r.indirect_grefs.iter().take(nr_pages) {
                    pages
                        .try_push(GrantRef(*g))
                        .map_err(|_| BlkifError::BadSegmentCount(n))?;
                }
                Ok(Self::Indirect {
                    id: r.id,
                    handle: r.handle,
                    op,
                    sector: r.sector_number,
                    nr_segments: r.nr_segments,
                    pages,
                })
            }
        }
    }

    /// A read (`write == false`) or write of `segments` at `sector`.
    pub const fn data(
        write: bool,
        id: u64,
        handle: u16,
        sector: u64,
        segments: DirectSegments,
    ) -> Self {
        if write {
            Self::Write {
                id,
                handle,
                sector,
                segments,
            }
        } else {
            Self::Read {
                id,
                handle,
                sector,
                segments,
            }
        }
    }

    /// The request id.
    pub const fn id(&self) -> u64 {
        match self {
            Self::Read { id, .. }
            | Self::Write { id, .. }
            | Self::Flush { id, .. }
            | Self::Discard { id, .. }
            | Self::Indirect { id, .. } => *id,
        }
    }

    /// The operation code, as echoed in the response.
    pub const fn op(&self) -> BlkOp {
        match self {
            Self::Read { .. } => BlkOp::Read,
            Self::Write { .. } => BlkOp::Write,
            Self::Flush { .. } => BlkOp::FlushDiskcache,
            Self::Discard { .. } => BlkOp::Discard,
            Self::Indirect { .. } => BlkOp::Indirect,
        }
    }

    /// Serialises to a request slot (front-end side); padding is zero.
    pub fn to_raw(&self) -> BlkifRequestRaw {
        let direct = |op: BlkOp, id, handle, sector, segs: &DirectSegments| {
            let mut raw = BlkifRequestRaw {
                operation: op as u8,
                nr_segments: segs.len() as u8,
                handle,
                id,
                sector_number: sector,
                ..Default::default()
            };
            for (slot, s) in raw.seg.iter_mut().zip(segs.iter()) {
                *slot = s.to_raw();
            }
            raw
        };
        match self {
            Self::Read {
                id,
                handle,
                sector,
                segments,
            } => direct(BlkOp::Read, *id, *handle, *sector, segments),
            Self::Write {
                id,
                handle,
                sector,
                segments,
            } => direct(BlkOp::Write, *id, *handle, *sector, segments),
            Self::Flush {
                id,
                handle,
                sector,
                segments,
            } => direct(BlkOp::FlushDiskcache, *id, *handle, *sector, segments),
            Self::Discard {
                id,
                handle,
                sector,
                nr_sectors,
                secure,
            } => BlkifDiscardRaw {
                operation: BlkOp::Discard as u8,
                flag: if *secure {
                    DiscardFlags::SECURE.bits()
                } else {
                    0
                },
                handle: *handle,
                id: *id,
                sector_number: *sector,
                nr_sectors: *nr_sectors,
                ..Default::default()
            }
            .into(),
            Self::Indirect {
                id,
                handle,
                op,
                sector,
                nr_segments,
                pages,
            } => {
                let mut r = BlkifIndirectRaw {
                    operation: BlkOp::Indirect as u8,
                    indirect_op: *op as u8,
                    nr_segments: *nr_segments,
                    id: *id,
                    sector_number: *sector,
                    handle: *handle,
                    ..Default::default()
                };
                for (slot, g) in r.indirect_grefs.iter_mut().zip(pages.iter()) {
                    *slot = g.0;
                }
                r.into()
            }
        }
    }
}

/// Segments held by indirect page `page_index` of a request with
/// `nr_segments` segments (0 past the last page).
pub fn indirect_page_count(nr_segments: u16, page_index: usize) -> usize {
    let before = page_index.saturating_mul(SEGMENTS_PER_INDIRECT_PAGE);
    usize::from(nr_segments)
        .saturating_sub(before)
        .min(SEGMENTS_PER_INDIRECT_PAGE)
}

/// Validates the first `count` (1..=512) segment descriptors of an indirect page.
pub fn parse_indirect_page(
    page: &[u8; PAGE_SIZE],
    count: usize,
) -> Result<IndirectPageSegments, BlkifError> {
    if count == 0 || count > SEGMENTS_PER_INDIRECT_PAGE {
        return Err(BlkifError::BadSegmentCount(count));
    }
    let mut out = IndirectPageSegments::new();
    for (index, chunk) in page
        .chunks_exact(size_of::<BlkifSegmentRaw>())
        .take(count)
        .enumerate()
    {
        let raw = BlkifSegmentRaw::read_from_bytes(chunk)
            .map_err(|_| BlkifError::BadSegmentCount(count))?;
        out.try_push(BlkSegment::parse(&raw, index)?)
            .map_err(|_| BlkifError::BadSegmentCount(count))?;
    }
    Ok(out)
}

/// Writes segments into an indirect page (front-end side); the rest of the
/// page is zeroed. At most 512 segments fit.
pub fn write_indirect_page(
    segs: &[BlkSegment],
    page: &mut [u8; PAGE_SIZE],
) -> Result<(), BlkifError> {
    if segs.len() > SEGMENTS_PER_INDIRECT_PAGE {
        return Err(BlkifError::BadSegmentCount(segs.len()));
    }
    page.fill(0);
    for (chunk, s) in page
        .chunks_exact_mut(size_of::<BlkifSegmentRaw>())
        .zip(segs)
    {
        chunk.copy_from_slice(s.to_raw().as_bytes());
    }
    Ok(())
}

/// The block ring: 112-byte request slots, 16-byte responses.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlkRing;

impl RingProtocol for BlkRing {
    type Req = BlkifRequestRaw;
    type Rsp = BlkifResponseRaw;
    const NAME: &'static str = "blkif";
}

/// The byte the guest's `blkverify` job writes at disk byte `offset`: a function of the position
/// alone, so the host can check an image afterwards without talking to the guest.
pub const fn verify_pattern(offset: u64) -> u8 {
    ((offset / 512).wrapping_mul(131) + (offset % 512).wrapping_mul(7) + 0x5a) as u8
}

/// One segment of `blkverify`'s data pages: (page, first sector, last sector).
pub type VerifySeg = (usize, u8, u8);

/// The regions the guest's `blkverify` job writes: (first disk sector, segments), in several
/// sizes and alignments up to the largest direct request (region 2: 11 full pages, which it
/// discards afterwards). Shared with the host-side test that checks the image.
pub const VERIFY_REGIONS: [(u64, &[VerifySeg]); 5] = [
    (0, &[(0, 0, 0)]),
    (8, &[(0, 0, 7)]),
    (
        1000,
        &[
            (0, 0, 7),
            (1, 0, 7),
            (2, 0, 7),
            (3, 0, 7),
            (4, 0, 7),
            (5, 0, 7),
            (6, 0, 7),
            (7, 0, 7),
            (8, 0, 7),
            (9, 0, 7),
            (10, 0, 7),
        ],
    ),
    (5000, &[(3, 3, 5)]),
    (7001, &[(0, 2, 7), (1, 0, 7), (2, 0, 3)]),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn seg(gref: u32, first: u8, last: u8) -> BlkifSegmentRaw {
        BlkifSegmentRaw {
            gref,
            first_sect: first,
            last_sect: last,
            _pad: 0,
        }
    }

    fn rw(op: u8, nr: u8) -> BlkifRequestRaw {
        let mut r = BlkifRequestRaw {
            operation: op,
            nr_segments: nr,
            handle: 0x300,
            id: 42,
            sector_number: 100,
            ..Default::default()
        };
        for (i, s) in r.seg.iter_mut().enumerate() {
            *s = seg(i as u32 + 1, 0, 7);
        }
        r
    }

    #[test]
    fn read_with_full_segments_parses() {
        let req = BlkRequest::parse(&rw(0, 11)).unwrap();
        let BlkRequest::Read { id, segments, .. } = req else {
            panic!("not a read: {req:?}");
        };
        assert_eq!(id, 42);
        assert_eq!(segments.len(), 11);
        assert_eq!(segments_byte_len(&segments), 11 * 4096);
    }

    #[test]
    fn read_with_zero_segments_is_rejected() {
        assert_eq!(
            BlkRequest::parse(&rw(0, 0)),
            Err(BlkifError::BadSegmentCount(0))
        );
    }

    #[test]
    fn write_with_twelve_segments_is_rejected() {
        assert_eq!(
            BlkRequest::parse(&rw(1, 12)),
            Err(BlkifError::BadSegmentCount(12))
        );
    }

    #[test]
    fn segment_with_first_after_last_or_last_beyond_page_is_rejected() {
        let mut r = rw(1, 2);
        r.seg[1] = seg(9, 5, 4);
        assert_eq!(
            BlkRequest::parse(&r),
            Err(BlkifError::BadSegment {
                index: 1,
                first: 5,
                last: 4
            })
        );
        r.seg[1] = seg(9, 0, 8);
        assert!(matches!(
            BlkRequest::parse(&r),
            Err(BlkifError::BadSegment { index: 1, .. })
        ));
    }

    #[test]
    fn segments_beyond_nr_segments_are_ignored() {
        let mut r = rw(0, 1);
        r.seg[5] = seg(0, 7, 0);
        assert!(BlkRequest::parse(&r).is_ok());
    }

    #[test]
    fn segment_offset_and_length_follow_sectors() {
        let s = BlkSegment::parse(&seg(1, 2, 5), 0).unwrap();
        assert_eq!(s.byte_offset(), 1024);
        assert_eq!(s.byte_len(), 2048);
        assert_eq!(s.nr_sectors(), 4);
    }

    #[test]
    fn flush_without_segments_parses() {
        assert_eq!(
            BlkRequest::parse(&rw(3, 0)),
            Ok(BlkRequest::Flush {
                id: 42,
                handle: 0x300,
                sector: 100,
                segments: DirectSegments::new()
            })
        );
    }

    #[test]
    fn barrier_and_reserved_ops_are_unsupported_with_not_supported_status() {
        for op in [2, 4] {
            let e = BlkRequest::parse(&rw(op, 1)).unwrap_err();
            assert_eq!(e, BlkifError::Unsupported(op));
            assert_eq!(e.response_status(), BlkStatus::NotSupported);
        }
        let e = BlkRequest::parse(&rw(99, 1)).unwrap_err();
        assert_eq!(e, BlkifError::UnknownOp(99));
        assert_eq!(e.response_status(), BlkStatus::NotSupported);
        assert_eq!(rw(99, 1).id(), 42);
    }

    #[test]
    fn sector_range_wrapping_u64_is_rejected() {
        let mut r = rw(0, 1);
        r.sector_number = u64::MAX - 3;
        assert_eq!(BlkRequest::parse(&r), Err(BlkifError::SectorOverflow));
        let d = BlkifDiscardRaw {
            operation: 5,
            sector_number: u64::MAX,
            nr_sectors: 1,
            ..Default::default()
        };
        assert_eq!(
            BlkRequest::parse(&d.into()),
            Err(BlkifError::SectorOverflow)
        );
    }

    #[test]
    fn discard_reads_secure_bit_and_ignores_others() {
        let d = BlkifDiscardRaw {
            operation: 5,
            flag: 0xff,
            handle: 1,
            id: 7,
            sector_number: 8,
            nr_sectors: 16,
            ..Default::default()
        };
        assert_eq!(
            BlkRequest::parse(&d.into()),
            Ok(BlkRequest::Discard {
                id: 7,
                handle: 1,
                sector: 8,
                nr_sectors: 16,
                secure: true
            })
        );
    }

    fn indirect(op: u8, n: u16) -> BlkifRequestRaw {
        BlkifIndirectRaw {
            operation: 6,
            indirect_op: op,
            nr_segments: n,
            id: 5,
            sector_number: 0,
            handle: 2,
            indirect_grefs: [10, 11, 12, 13, 14, 15, 16, 17],
            ..Default::default()
        }
        .into()
    }

    #[test]
    fn indirect_takes_ceil_of_segments_over_512_pages() {
        let BlkRequest::Indirect { pages, .. } = BlkRequest::parse(&indirect(1, 513)).unwrap()
        else {
            panic!("not indirect");
        };
        assert_eq!(pages.as_slice(), &[GrantRef(10), GrantRef(11)]);
        assert_eq!(indirect_page_count(513, 0), 512);
        assert_eq!(indirect_page_count(513, 1), 1);
        assert_eq!(indirect_page_count(513, 2), 0);
    }

    #[test]
    fn indirect_with_bad_count_or_inner_op_is_rejected() {
        assert_eq!(
            BlkRequest::parse(&indirect(0, 0)),
            Err(BlkifError::BadSegmentCount(0))
        );
        assert_eq!(
            BlkRequest::parse(&indirect(0, 4097)),
            Err(BlkifError::BadSegmentCount(4097))
        );
        assert_eq!(
            BlkRequest::parse(&indirect(3, 1)),
            Err(BlkifError::BadIndirectOp(3))
        );
        assert!(BlkRequest::parse(&indirect(0, 4096)).is_ok());
    }

    #[test]
    fn indirect_page_with_bad_segment_is_rejected() {
        let mut page = [0u8; PAGE_SIZE];
        let segs = [BlkSegment {
            gref: GrantRef(1),
            first_sect: 0,
            last_sect: 7,
        }; 3];
        write_indirect_page(&segs, &mut page).unwrap();
        assert_eq!(parse_indirect_page(&page, 3).unwrap().as_slice(), &segs);
        page[8 + 5] = 9; // second segment's last_sect
        assert!(matches!(
            parse_indirect_page(&page, 3),
            Err(BlkifError::BadSegment { index: 1, .. })
        ));
        assert_eq!(
            parse_indirect_page(&page, 513),
            Err(BlkifError::BadSegmentCount(513))
        );
    }

    #[test]
    fn response_round_trips_and_unknown_status_is_rejected() {
        let r = BlkResponse {
            id: 3,
            operation: 4,
            status: BlkStatus::NotSupported,
        };
        assert_eq!(BlkResponse::parse(&r.to_raw()), Ok(r));
        let mut raw = r.to_raw();
        raw.status = -3;
        assert_eq!(BlkResponse::parse(&raw), Err(BlkifError::UnknownStatus(-3)));
    }

    fn segment() -> impl Strategy<Value = BlkSegment> {
        (any::<u32>(), 0u8..8)
            .prop_flat_map(|(g, first)| (Just(g), Just(first), first..8))
            .prop_map(|(g, first_sect, last_sect)| BlkSegment {
                gref: GrantRef(g),
                first_sect,
                last_sect,
            })
    }

    fn direct(min: usize) -> impl Strategy<Value = DirectSegments> {
        proptest::collection::vec(segment(), min..=MAX_SEGMENTS_PER_REQUEST)
            .prop_map(|v| DirectSegments::from_slice(&v).unwrap())
    }

    fn request() -> impl Strategy<Value = BlkRequest> {
        let sector = 0u64..(1 << 40);
        prop_oneof![
            (any::<u64>(), any::<u16>(), sector.clone(), direct(1)).prop_map(
                |(id, handle, sector, segments)| BlkRequest::Read {
                    id,
                    handle,
                    sector,
                    segments
                }
            ),
            (any::<u64>(), any::<u16>(), sector.clone(), direct(1)).prop_map(
                |(id, handle, sector, segments)| BlkRequest::Write {
                    id,
                    handle,
                    sector,
                    segments
                }
            ),
            (any::<u64>(), any::<u16>(), sector.clone(), direct(0)).prop_map(
                |(id, handle, sector, segments)| BlkRequest::Flush {
                    id,
                    handle,
                    sector,
                    segments
                }
            ),
            (
                any::<u64>(),
                any::<u16>(),
                sector.clone(),
                sector.clone(),
                any::<bool>()
            )
                .prop_map(|(id, handle, sector, nr_sectors, secure)| {
                    BlkRequest::Discard {
                        id,
                        handle,
                        sector,
                        nr_sectors,
                        secure,
                    }
                }),
            (
                any::<u64>(),
                any::<u16>(),
                any::<bool>(),
                sector,
                1u16..=4096,
                any::<[u32; 8]>()
            )
                .prop_map(|(id, handle, write, sector, nr_segments, g)| {
                    let n = usize::from(nr_segments).div_ceil(512);
                    let grefs: [GrantRef; 8] = g.map(GrantRef);
                    BlkRequest::Indirect {
                        id,
                        handle,
                        op: if write {
                            IndirectOp::Write
                        } else {
                            IndirectOp::Read
                        },
                        sector,
                        nr_segments,
                        pages: IndirectGrefs::from_slice(&grefs[..n]).unwrap(),
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_request_bytes_never_panic(bytes in any::<[u8; 112]>(), op in 0u8..8) {
            let mut raw = BlkifRequestRaw::read_from_bytes(&bytes[..]).unwrap();
            let _ = BlkRequest::parse(&raw);
            raw.operation = op;
            if let Ok(req) = BlkRequest::parse(&raw) {
                prop_assert_eq!(req.id(), raw.id());
            }
        }

        #[test]
        fn arbitrary_indirect_page_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), PAGE_SIZE),
            count in 0usize..600,
        ) {
            let page: &[u8; PAGE_SIZE] = bytes.as_slice().try_into().unwrap();
            let _ = parse_indirect_page(page, count);
        }

        #[test]
        fn arbitrary_response_never_panics(bytes in any::<[u8; 16]>()) {
            let raw = BlkifResponseRaw::read_from_bytes(&bytes[..]).unwrap();
            let _ = BlkResponse::parse(&raw);
        }

        #[test]
        fn valid_request_round_trips(req in request()) {
            prop_assert_eq!(BlkRequest::parse(&req.to_raw()), Ok(req));
        }

        #[test]
        fn valid_indirect_page_round_trips(
            segs in proptest::collection::vec(segment(), 1..=SEGMENTS_PER_INDIRECT_PAGE)
        ) {
            let mut page = [0u8; PAGE_SIZE];
            write_indirect_page(&segs, &mut page).unwrap();
            let parsed = parse_indirect_page(&page, segs.len()).unwrap();
            prop_assert_eq!(parsed.as_slice(), segs.as_slice());
        }
    }
}
