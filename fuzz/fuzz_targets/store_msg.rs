//! One store message (header and payload) as a guest writes it into its store ring, checked by
//! `pv_protocol::store::StoreRequest::parse`; what parses is encoded again, framed by the
//! hypervisor's stream framing and parsed back to the same request.
//!
//! Input: the 16-byte header, then the payload (the header's `len` is replaced by the payload's
//! length half of the time, so both length mismatches and well-framed messages are tried).
#![no_main]

use hypervisor::pvdev::{Framed, next_message};
use libfuzzer_sys::fuzz_target;
use pv_protocol::store::{
    ABS_PATH_MAX, MAX_PERMS_PER_NODE, PAYLOAD_MAX, PathKind, PermList, REL_PATH_MAX, StoreError,
    StoreMsgHeader, StorePath, StoreRequest,
};
use zerocopy::FromBytes;

fn check_path(p: &StorePath<'_>, watch: bool) {
    let s = p.as_str().as_bytes();
    assert!(!s.is_empty());
    let max = if p.kind() == PathKind::Absolute {
        ABS_PATH_MAX
    } else {
        REL_PATH_MAX
    };
    assert!(s.len() <= max);
    assert!(
        s.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"/_@-".contains(c))
    );
    assert!(!s.windows(2).any(|w| w == b"//"));
    assert!(s.len() == 1 || !s.ends_with(b"/"));
    if p.kind() == PathKind::Special {
        assert!(watch && !s.contains(&b'/'));
    }
    assert_eq!(
        if watch {
            StorePath::parse_watch(s)
        } else {
            StorePath::parse(s)
        },
        Ok(*p)
    );
}

fn check(req: &StoreRequest<'_>) {
    match req {
        StoreRequest::Directory(p)
        | StoreRequest::Read(p)
        | StoreRequest::GetPerms(p)
        | StoreRequest::Mkdir(p)
        | StoreRequest::Rm(p)
        | StoreRequest::DirectoryPart { path: p, .. }
        | StoreRequest::Write { path: p, .. } => check_path(p, false),
        StoreRequest::Watch { path, token } | StoreRequest::Unwatch { path, token } => {
            check_path(path, true);
            assert!(!token.contains('\0'));
        }
        StoreRequest::SetPerms { path, perms } => {
            check_path(path, false);
            let list: Vec<_> = perms.iter().collect();
            assert!((1..=MAX_PERMS_PER_NODE).contains(&list.len()));
            assert!(list.iter().all(|p| !p.domid.is_reserved()));
            let mut buf = vec![0u8; 8 * list.len() + 8];
            let again = PermList::write(&list, &mut buf).unwrap();
            assert_eq!(again.iter().collect::<Vec<_>>(), list);
        }
        StoreRequest::Introduce { domid, port, .. } => {
            assert!(!domid.is_reserved());
            assert!(port.0 < pv_protocol::evtchn::MAX_PORTS_2L);
        }
        StoreRequest::Release(d)
        | StoreRequest::GetDomainPath(d)
        | StoreRequest::IsDomainIntroduced(d)
        | StoreRequest::Resume(d) => assert!(!d.is_reserved()),
        StoreRequest::SetTarget { domid, target } => {
            assert!(!domid.is_reserved() && !target.is_reserved())
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((mut hdr, payload)) = StoreMsgHeader::read_from_prefix(data) else {
        return;
    };
    if hdr.req_id & 1 == 0 {
        hdr.len = payload.len() as u32;
    }
    let req = match StoreRequest::parse(&hdr, payload) {
        Ok(r) => r,
        Err(StoreError::LengthMismatch { header, actual }) => {
            assert_eq!((header, actual), (hdr.len, payload.len()));
            assert_ne!(hdr.len as usize, payload.len());
            return;
        }
        Err(e) => {
            // Every refusal is answered with a store errno name.
            assert!(!e.errno().as_str().is_empty());
            return;
        }
    };
    assert_eq!(req.msg_type() as u32, hdr.msg_type);
    assert!(payload.len() <= PAYLOAD_MAX);
    check(&req);
    // Encode as a client would, frame it as the hypervisor does, parse it again.
    let mut buf = vec![0u8; 16 + PAYLOAD_MAX];
    let n = match req.encode(&mut buf, hdr.req_id, hdr.tx_id) {
        Ok(n) => n,
        // Canonical numbers are never longer than what parsed, except `TransactionStart`'s
        // empty payload, encoded as "\0": nothing else may fail to fit.
        Err(e) => panic!("{req:?} parsed but does not encode: {e:?}"),
    };
    let mut stream = buf[..n].to_vec();
    let Some(Framed::Message(h2, p2)) = next_message(&mut stream) else {
        panic!("an encoded request does not frame");
    };
    assert!(stream.is_empty());
    assert_eq!(
        (h2.msg_type, h2.req_id, h2.tx_id),
        (hdr.msg_type, hdr.req_id, hdr.tx_id)
    );
    assert_eq!(StoreRequest::parse(&h2, &p2), Ok(req));
});
