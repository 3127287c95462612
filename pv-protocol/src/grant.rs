//! Grant tables (v1), after Xen's `public/grant_table.h`.
//!
//! A granting domain fills [`GrantEntryV1`] slots in its grant table; the
//! table lives in guest memory, so every entry is hostile input and must go
//! through [`GrantEntry::parse`] before use.

use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::PAGE_SIZE;

/// Number of v1 entries in one grant-table frame.
pub const ENTRIES_PER_PAGE: usize = PAGE_SIZE / size_of::<GrantEntryV1>();

/// Reference to an entry of a domain's grant table (its index).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantRef(pub u32);

impl GrantRef {
    /// Grant-table frame holding this entry.
    pub const fn frame_index(self) -> u32 {
        self.0 / ENTRIES_PER_PAGE as u32
    }

    /// Index of this entry within its frame.
    pub const fn index_in_frame(self) -> usize {
        self.0 as usize % ENTRIES_PER_PAGE
    }
}

/// A domain identifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomId(pub u16);

impl DomId {
    /// The control domain.
    pub const DOM0: DomId = DomId(0);
    /// First identifier reserved for special meanings; real domains are below it.
    pub const FIRST_RESERVED: DomId = DomId(0x7ff0);
    /// "The calling domain" in hypercall arguments.
    pub const SELF: DomId = DomId(0x7ff0);
    /// Xen's `DOMID_IO`.
    pub const IO: DomId = DomId(0x7ff1);
    /// Xen's `DOMID_XEN`.
    pub const XEN: DomId = DomId(0x7ff2);
    /// Xen's `DOMID_INVALID`.
    pub const INVALID: DomId = DomId(0x7ff4);

    /// True for the special identifiers at or above [`DomId::FIRST_RESERVED`].
    pub const fn is_reserved(self) -> bool {
        self.0 >= Self::FIRST_RESERVED.0
    }
}

bitflags! {
    /// The `flags` word of a v1 grant entry.
    ///
    /// Bits 0..=1 form the [`GrantType`] field; [`GrantFlags::PERMIT_ACCESS`]
    /// and [`GrantFlags::ACCEPT_TRANSFER`] name its two bits so that
    /// `from_bits` knows them. Cache-attribute bits are listed because Xen
    /// accepts (and on HVM ignores) them; [`GrantFlags::SUB_PAGE`] is listed so
    /// that [`GrantEntry::parse`] can reject it, as Xen does for v1 entries.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct GrantFlags: u16 {
        /// Type field value 1: the grantee may map or copy the frame.
        const PERMIT_ACCESS = 1 << 0;
        /// Type field value 2: the grantee may transfer a frame in.
        const ACCEPT_TRANSFER = 1 << 1;
        /// The grantee may only read.
        const READONLY = 1 << 2;
        /// Set by the hypervisor while the grantee holds a read mapping.
        const READING = 1 << 3;
        /// Set by the hypervisor while the grantee holds a write mapping.
        const WRITING = 1 << 4;
        /// Cache attribute: page write-through.
        const PWT = 1 << 5;
        /// Cache attribute: page cache disable.
        const PCD = 1 << 6;
        /// Cache attribute: PAT.
        const PAT = 1 << 7;
        /// Sub-page grant (v2 only; rejected in v1 entries).
        const SUB_PAGE = 1 << 8;
    }
}

/// Mask of the type field inside [`GrantFlags`].
pub const GRANT_TYPE_MASK: u16 = 0b11;

/// The type field of a grant entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GrantType {
    /// The entry grants nothing.
    Invalid = 0,
    /// The grantee may map or copy the frame.
    PermitAccess = 1,
    /// The grantee may transfer a frame into this entry.
    AcceptTransfer = 2,
    /// Transitive grant (v2 only).
    Transitive = 3,
}

impl GrantType {
    /// Extracts the type field from a raw `flags` word (total: every value is a type).
    pub const fn from_flags(flags: u16) -> GrantType {
        match flags & GRANT_TYPE_MASK {
            0 => GrantType::Invalid,
            1 => GrantType::PermitAccess,
            2 => GrantType::AcceptTransfer,
            _ => GrantType::Transitive,
        }
    }
}

/// Errors from grant-table parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The entry's type is not usable here (invalid, transfer, transitive).
    #[error("grant type {0:?} not usable")]
    BadType(GrantType),
    /// The entry sets the sub-page flag, which v1 does not support.
    #[error("sub-page flag in v1 grant")]
    SubPage,
    /// The entry names another domain than the one asking.
    #[error("grant is for domain {granted}, not {requester}")]
    WrongDomain {
        /// Domain the entry grants to.
        granted: u16,
        /// Domain that tried to use it.
        requester: u16,
    },
    /// Write access requested on a read-only grant.
    #[error("grant is read-only")]
    ReadOnly,
    /// The grant reference is beyond the table.
    #[error("grant ref {0} out of range")]
    RefOutOfRange(u32),
    /// A status code outside the known range.
    #[error("unknown grant status {0}")]
    UnknownStatus(i16),
}

/// A v1 grant-table entry as it sits in the granting domain's table.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct GrantEntryV1 {
    /// [`GrantFlags`] plus the [`GrantType`] field.
    pub flags: u16,
    /// Domain being granted access.
    pub domid: u16,
    /// Guest frame number of the granted page.
    pub frame: u32,
}

const _: () = assert!(size_of::<GrantEntryV1>() == 8);
const _: () = assert!(offset_of!(GrantEntryV1, flags) == 0);
const _: () = assert!(offset_of!(GrantEntryV1, domid) == 2);
const _: () = assert!(offset_of!(GrantEntryV1, frame) == 4);
const _: () = assert!(ENTRIES_PER_PAGE == 512);

/// A checked v1 grant entry that permits access to a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantEntry {
    /// Domain being granted access.
    pub domid: DomId,
    /// Guest frame number of the granted page.
    pub frame: u32,
    /// Known flag bits other than the type field (unknown bits are dropped).
    pub flags: GrantFlags,
}

impl GrantEntry {
    /// Validates an entry read from a guest's table.
    ///
    /// Only `PermitAccess` entries parse. Unknown flag bits (9..=15) are
    /// ignored with `from_bits_truncate`, as Xen ignores them; the sub-page bit
    /// is rejected, as Xen rejects it in v1 entries.
    pub fn parse(raw: &GrantEntryV1) -> Result<GrantEntry, GrantError> {
        let kind = GrantType::from_flags(raw.flags);
        if kind != GrantType::PermitAccess {
            return Err(GrantError::BadType(kind));
        }
        let flags = GrantFlags::from_bits_truncate(raw.flags);
        if flags.contains(GrantFlags::SUB_PAGE) {
            return Err(GrantError::SubPage);
        }
        let flags = flags.difference(GrantFlags::PERMIT_ACCESS | GrantFlags::ACCEPT_TRANSFER);
        Ok(GrantEntry {
            domid: DomId(raw.domid),
            frame: raw.frame,
            flags,
        })
    }

    /// True when the grantee may only read.
    pub const fn readonly(&self) -> bool {
        self.flags.contains(GrantFlags::READONLY)
    }

    /// Checks that `requester` may use this grant, for writing if `write`.
    pub fn check_access(&self, requester: DomId, write: bool) -> Result<(), GrantError> {
        if self.domid != requester {
            return Err(GrantError::WrongDomain {
                granted: self.domid.0,
                requester: requester.0,
            });
        }
        if write && self.readonly() {
            return Err(GrantError::ReadOnly);
        }
        Ok(())
    }

    /// Serialises to the raw form a front end writes into its table.
    pub fn to_raw(&self) -> GrantEntryV1 {
        GrantEntryV1 {
            flags: (self.flags | GrantFlags::PERMIT_ACCESS).bits(),
            domid: self.domid.0,
            frame: self.frame,
        }
    }
}

/// Grant-table hypercall status codes (`GNTST_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i16)]
pub enum GrantStatus {
    /// Success.
    Okay = 0,
    /// Unspecified error.
    GeneralError = -1,
    /// Unrecognised domain.
    BadDomain = -2,
    /// Unrecognised or inappropriate grant reference.
    BadGntref = -3,
    /// Unrecognised or inappropriate handle.
    BadHandle = -4,
    /// Inappropriate virtual address to map.
    BadVirtAddr = -5,
    /// Inappropriate device address to unmap.
    BadDevAddr = -6,
    /// Out of space in I/O MMU.
    NoDeviceSpace = -7,
    /// Not enough privilege for operation.
    PermissionDenied = -8,
    /// Specified page was invalid for operation.
    BadPage = -9,
    /// Copy arguments cross a page boundary.
    BadCopyArg = -10,
    /// Page address size too large.
    AddressTooBig = -11,
    /// Operation not done; try again.
    Eagain = -12,
}

impl GrantStatus {
    /// Wire value.
    pub const fn as_i16(self) -> i16 {
        self as i16
    }
}

impl TryFrom<i16> for GrantStatus {
    type Error = GrantError;
    fn try_from(v: i16) -> Result<Self, GrantError> {
        Ok(match v {
            0 => Self::Okay,
            -1 => Self::GeneralError,
            -2 => Self::BadDomain,
            -3 => Self::BadGntref,
            -4 => Self::BadHandle,
            -5 => Self::BadVirtAddr,
            -6 => Self::BadDevAddr,
            -7 => Self::NoDeviceSpace,
            -8 => Self::PermissionDenied,
            -9 => Self::BadPage,
            -10 => Self::BadCopyArg,
            -11 => Self::AddressTooBig,
            -12 => Self::Eagain,
            other => return Err(GrantError::UnknownStatus(other)),
        })
    }
}

/// Argument of `GNTTABOP_query_size`: how large is a domain's grant table.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct GnttabQuerySize {
    /// In: domain to query (normally [`DomId::SELF`]).
    pub dom: u16,
    /// Zero.
    pub _pad0: u16,
    /// Out: frames currently in the table.
    pub nr_frames: u32,
    /// Out: maximum frames the table may grow to.
    pub max_nr_frames: u32,
    /// Out: a [`GrantStatus`].
    pub status: i16,
    /// Zero.
    pub _pad1: u16,
}

const _: () = assert!(size_of::<GnttabQuerySize>() == 16);
const _: () = assert!(offset_of!(GnttabQuerySize, dom) == 0);
const _: () = assert!(offset_of!(GnttabQuerySize, _pad0) == 2);
const _: () = assert!(offset_of!(GnttabQuerySize, nr_frames) == 4);
const _: () = assert!(offset_of!(GnttabQuerySize, max_nr_frames) == 8);
const _: () = assert!(offset_of!(GnttabQuerySize, status) == 12);
const _: () = assert!(offset_of!(GnttabQuerySize, _pad1) == 14);

/// Argument of `GNTTABOP_setup_table`: size the table and learn its frames.
///
/// `frame_list` is the guest-physical address of an array of `nr_frames`
/// little-endian `u64` frame numbers that the hypervisor fills.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct GnttabSetupTable {
    /// In: domain (normally [`DomId::SELF`]).
    pub dom: u16,
    /// Zero.
    pub _pad0: u16,
    /// In: number of frames wanted.
    pub nr_frames: u32,
    /// Out: a [`GrantStatus`].
    pub status: i16,
    /// Zero.
    pub _pad1: [u8; 6],
    /// In: guest-physical address of the `u64` frame array to fill.
    pub frame_list: u64,
}

const _: () = assert!(size_of::<GnttabSetupTable>() == 24);
const _: () = assert!(offset_of!(GnttabSetupTable, dom) == 0);
const _: () = assert!(offset_of!(GnttabSetupTable, _pad0) == 2);
const _: () = assert!(offset_of!(GnttabSetupTable, nr_frames) == 4);
const _: () = assert!(offset_of!(GnttabSetupTable, status) == 8);
const _: () = assert!(offset_of!(GnttabSetupTable, _pad1) == 10);
const _: () = assert!(offset_of!(GnttabSetupTable, frame_list) == 16);

bitflags! {
    /// `GNTCOPY_*` flags of a [`GnttabCopy`].
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct GnttabCopyFlags: u16 {
        /// The source is a grant reference (else a local frame).
        const SOURCE_GREF = 1 << 0;
        /// The destination is a grant reference (else a local frame).
        const DEST_GREF = 1 << 1;
    }
}

/// One side of a [`GnttabCopy`].
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct GnttabCopyPtr {
    /// Grant reference or local frame number, per the copy flags.
    pub ref_or_frame: u64,
    /// Domain owning the grant.
    pub domid: u16,
    /// Byte offset within the page.
    pub offset: u16,
    /// Zero.
    pub _pad: u32,
}

const _: () = assert!(size_of::<GnttabCopyPtr>() == 16);
const _: () = assert!(offset_of!(GnttabCopyPtr, ref_or_frame) == 0);
const _: () = assert!(offset_of!(GnttabCopyPtr, domid) == 8);
const _: () = assert!(offset_of!(GnttabCopyPtr, offset) == 10);
const _: () = assert!(offset_of!(GnttabCopyPtr, _pad) == 12);

/// Argument element of `GNTTABOP_copy` (reserved for later use).
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct GnttabCopy {
    /// Where to copy from.
    pub source: GnttabCopyPtr,
    /// Where to copy to.
    pub dest: GnttabCopyPtr,
    /// Bytes to copy; source and dest ranges must each stay within one page.
    pub len: u16,
    /// [`GnttabCopyFlags`].
    pub flags: u16,
    /// Out: a [`GrantStatus`].
    pub status: i16,
    /// Zero.
    pub _pad: u16,
}

const _: () = assert!(size_of::<GnttabCopy>() == 40);
const _: () = assert!(offset_of!(GnttabCopy, source) == 0);
const _: () = assert!(offset_of!(GnttabCopy, dest) == 16);
const _: () = assert!(offset_of!(GnttabCopy, len) == 32);
const _: () = assert!(offset_of!(GnttabCopy, flags) == 34);
const _: () = assert!(offset_of!(GnttabCopy, status) == 36);
const _: () = assert!(offset_of!(GnttabCopy, _pad) == 38);

/// Argument element of `GNTTABOP_map_grant_ref` (reserved for later use).
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct GnttabMapGrantRef {
    /// In: where to map (guest-physical address in the mapping domain).
    pub host_addr: u64,
    /// In: mapping flags (read-only etc.), reserved.
    pub flags: u32,
    /// In: grant reference to map.
    pub gref: u32,
    /// In: granting domain.
    pub dom: u16,
    /// Out: a [`GrantStatus`].
    pub status: i16,
    /// Out: handle for the later unmap.
    pub handle: u32,
    /// Out: bus address for device access, if any.
    pub dev_bus_addr: u64,
}

const _: () = assert!(size_of::<GnttabMapGrantRef>() == 32);
const _: () = assert!(offset_of!(GnttabMapGrantRef, host_addr) == 0);
const _: () = assert!(offset_of!(GnttabMapGrantRef, flags) == 8);
const _: () = assert!(offset_of!(GnttabMapGrantRef, gref) == 12);
const _: () = assert!(offset_of!(GnttabMapGrantRef, dom) == 16);
const _: () = assert!(offset_of!(GnttabMapGrantRef, status) == 18);
const _: () = assert!(offset_of!(GnttabMapGrantRef, handle) == 20);
const _: () = assert!(offset_of!(GnttabMapGrantRef, dev_bus_addr) == 24);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(flags: u16) -> GrantEntryV1 {
        GrantEntryV1 {
            flags,
            domid: 3,
            frame: 0x1234,
        }
    }

    #[test]
    fn permit_access_entry_parses() {
        let e = GrantEntry::parse(&entry(1 | GrantFlags::READONLY.bits())).unwrap();
        assert_eq!(e.domid, DomId(3));
        assert_eq!(e.frame, 0x1234);
        assert!(e.readonly());
    }

    #[test]
    fn invalid_and_transitive_entries_are_rejected() {
        assert_eq!(
            GrantEntry::parse(&entry(0)),
            Err(GrantError::BadType(GrantType::Invalid))
        );
        assert_eq!(
            GrantEntry::parse(&entry(3)),
            Err(GrantError::BadType(GrantType::Transitive))
        );
        assert_eq!(
            GrantEntry::parse(&entry(2)),
            Err(GrantError::BadType(GrantType::AcceptTransfer))
        );
    }

    #[test]
    fn sub_page_flag_is_rejected_and_unknown_high_bits_ignored() {
        assert_eq!(
            GrantEntry::parse(&entry(1 | 1 << 8)),
            Err(GrantError::SubPage)
        );
        let e = GrantEntry::parse(&entry(1 | 1 << 15)).unwrap();
        assert!(e.flags.is_empty());
    }

    #[test]
    fn write_to_readonly_grant_or_other_domain_is_denied() {
        let e = GrantEntry::parse(&entry(1 | GrantFlags::READONLY.bits())).unwrap();
        assert_eq!(e.check_access(DomId(3), false), Ok(()));
        assert_eq!(e.check_access(DomId(3), true), Err(GrantError::ReadOnly));
        assert!(matches!(
            e.check_access(DomId(4), false),
            Err(GrantError::WrongDomain { .. })
        ));
    }

    #[test]
    fn grant_status_round_trips_and_rejects_unknown() {
        for v in -12..=0 {
            assert_eq!(GrantStatus::try_from(v).unwrap().as_i16(), v);
        }
        assert_eq!(
            GrantStatus::try_from(-13),
            Err(GrantError::UnknownStatus(-13))
        );
    }

    #[test]
    fn grant_ref_splits_into_frame_and_index() {
        assert_eq!(GrantRef(513).frame_index(), 1);
        assert_eq!(GrantRef(513).index_in_frame(), 1);
        assert!(DomId::SELF.is_reserved());
        assert!(!DomId::DOM0.is_reserved());
    }

    proptest! {
        #[test]
        fn arbitrary_entry_bytes_never_panic(bytes in any::<[u8; 8]>()) {
            if let Ok(raw) = GrantEntryV1::read_from_bytes(&bytes[..]) {
                let _ = GrantEntry::parse(&raw);
            }
        }

        #[test]
        fn valid_entry_round_trips(domid in any::<u16>(), frame in any::<u32>(), ro in any::<bool>(), rd in any::<bool>()) {
            let mut flags = GrantFlags::empty();
            flags.set(GrantFlags::READONLY, ro);
            flags.set(GrantFlags::READING, rd);
            let e = GrantEntry { domid: DomId(domid), frame, flags };
            prop_assert_eq!(GrantEntry::parse(&e.to_raw()), Ok(e));
        }
    }
}
