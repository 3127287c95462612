//! Grant entries (what a guest writes into its own grant table, read by the hypervisor when dom0
//! maps a grant) and the grant-table op arguments (`GNTTABOP_query_size`, `setup_table`, and the
//! reserved `copy` / `map_grant_ref` layouts).
//!
//! Input: an 8-byte v1 entry, 2 bytes naming the requester, 1 byte of access mode, then op bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_protocol::grant::{
    DomId, ENTRIES_PER_PAGE, GRANT_TYPE_MASK, GnttabCopy, GnttabMapGrantRef, GnttabQuerySize,
    GnttabSetupTable, GrantEntry, GrantEntryV1, GrantError, GrantFlags, GrantRef, GrantStatus,
    GrantType,
};
use zerocopy::{FromBytes, IntoBytes};

fn round_trip<
    T: FromBytes
        + IntoBytes
        + zerocopy::Immutable
        + zerocopy::KnownLayout
        + PartialEq
        + core::fmt::Debug,
>(
    bytes: &[u8],
) {
    if let Ok((v, _)) = T::read_from_prefix(bytes) {
        assert_eq!(v.as_bytes(), &bytes[..size_of::<T>()]);
        assert_eq!(T::read_from_bytes(v.as_bytes()).ok(), Some(v));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((raw, rest)) = GrantEntryV1::read_from_prefix(data) else {
        return;
    };
    let (requester, write, ops) = match rest {
        [a, b, w, ops @ ..] => (DomId(u16::from_le_bytes([*a, *b])), w & 1 != 0, ops),
        _ => (DomId(0), false, &[][..]),
    };
    match GrantEntry::parse(&raw) {
        Ok(e) => {
            // Only plain access grants parse, never sub-page ones, and the checked flags hold
            // no type bits.
            assert_eq!(GrantType::from_flags(raw.flags), GrantType::PermitAccess);
            assert!(raw.flags & GrantFlags::SUB_PAGE.bits() == 0);
            assert!(e.flags.bits() & GRANT_TYPE_MASK == 0);
            assert!(!e.flags.contains(GrantFlags::SUB_PAGE));
            assert_eq!((e.domid.0, e.frame), (raw.domid, raw.frame));
            assert_eq!(e.readonly(), raw.flags & GrantFlags::READONLY.bits() != 0);
            // Round trip through the front end's serialisation.
            assert_eq!(GrantEntry::parse(&e.to_raw()), Ok(e));
            // Access checks: wrong domain first, then read-only writes.
            match e.check_access(requester, write) {
                Ok(()) => assert!(requester == e.domid && !(write && e.readonly())),
                Err(GrantError::WrongDomain {
                    granted,
                    requester: r,
                }) => {
                    assert_eq!((granted, r), (e.domid.0, requester.0));
                    assert_ne!(requester, e.domid);
                }
                Err(GrantError::ReadOnly) => assert!(write && e.readonly() && requester == e.domid),
                Err(other) => panic!("unexpected {other:?}"),
            }
        }
        Err(GrantError::BadType(t)) => {
            assert_ne!(t, GrantType::PermitAccess);
            assert_eq!(GrantType::from_flags(raw.flags), t);
        }
        Err(GrantError::SubPage) => assert!(raw.flags & GrantFlags::SUB_PAGE.bits() != 0),
        Err(other) => panic!("unexpected {other:?}"),
    }
    // A grant reference names one entry of one table frame.
    let gref = GrantRef(raw.frame);
    assert!(gref.index_in_frame() < ENTRIES_PER_PAGE);
    assert_eq!(
        u64::from(gref.frame_index()) * ENTRIES_PER_PAGE as u64 + gref.index_in_frame() as u64,
        u64::from(gref.0)
    );
    // Status codes, as a front end decodes the hypervisor's answer.
    let status = raw.domid as i16;
    match GrantStatus::try_from(status) {
        Ok(s) => assert_eq!(s.as_i16(), status),
        Err(e) => assert_eq!(e, GrantError::UnknownStatus(status)),
    }
    // The op arguments are plain structs: every byte pattern reads and writes back unchanged.
    round_trip::<GnttabQuerySize>(ops);
    round_trip::<GnttabSetupTable>(ops);
    round_trip::<GnttabCopy>(ops);
    round_trip::<GnttabMapGrantRef>(ops);
});
