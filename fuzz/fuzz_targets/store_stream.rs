//! A guest's store connection end to end, without a VM: the byte stream it writes into its store
//! ring, cut into arbitrary chunks, framed by the hypervisor (`pvdev::next_message`) and answered
//! by the real request handling (`pvdev::answer`) against a real `hypervisor::store::Store`.
//!
//! Input: byte 0 picks the mode and the chunk size. Raw mode (bit 7 set): the rest is the stream
//! as is. Decoded mode: the rest is a message sequence `[type, req_id, tx_id, len_lo, len_hi,
//! payload...]`, each turned into a well-framed message (the length fixed to what follows), so
//! the fuzzer spends its time in the store rather than in framing.
//!
//! Checks: every framed message gets exactly one well-formed reply echoing its ids, of its own
//! type or `ERROR`; framing accounts for every byte; the attacker (domain 2) can never read,
//! list, change or remove anything in domain 3's home, whatever it sends, including inside
//! transactions.
#![no_main]

use std::collections::VecDeque;

use hypervisor::pvdev::{Framed, answer, next_message};
use hypervisor::store::Store;
use libfuzzer_sys::fuzz_target;
use pv_protocol::store::{
    MsgType, PAYLOAD_MAX, StoreErrno, StoreMsgHeader, StoreRequest, encode_watch_event,
};
use zerocopy::IntoBytes;

const ATTACKER: u32 = 2;
const VICTIM: u32 = 3;
const SECRET: &[u8] = b"value-of-three";

fn decoded_stream(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let [t, id, tx, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let hdr = StoreMsgHeader {
            msg_type: u32::from(*t % 24),
            req_id: u32::from(*id),
            tx_id: u32::from(*tx % 16),
            len: len as u32,
        };
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(&tail[..len]);
        rest = &tail[len..];
    }
    out
}

/// Whether `path`, as the attacker names it, lies in the victim's home.
fn in_victim_home(path: &str) -> bool {
    let abs = Store::absolute(ATTACKER, path);
    let home = hypervisor::store::home(VICTIM);
    abs == home || abs.starts_with(&format!("{home}/"))
}

fn victim_view(s: &Store) -> (Vec<String>, Vec<u8>, Vec<pv_protocol::store::Perm>) {
    let home = hypervisor::store::home(VICTIM);
    (
        s.directory(0, 0, &home).unwrap(),
        s.read(0, 0, &format!("{home}/secret")).unwrap(),
        s.get_perms(0, 0, &format!("{home}/secret")).unwrap(),
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 0x80 != 0 {
        rest.to_vec()
    } else {
        decoded_stream(rest)
    };
    let chunk = usize::from(mode & 0x7f) + 1;

    let store = Store::default();
    store.introduce(ATTACKER, "two", Box::new(|| {}));
    store.introduce(VICTIM, "three", Box::new(|| {}));
    let home = hypervisor::store::home(VICTIM);
    store
        .write(0, 0, &format!("{home}/secret"), SECRET)
        .unwrap();
    let before = victim_view(&store);

    let mut inbuf = Vec::new();
    for piece in stream.chunks(chunk) {
        inbuf.extend_from_slice(piece);
        let mut used = 0;
        let buffered = inbuf.len();
        let mut cleared = false;
        while let Some(f) = next_message(&mut inbuf) {
            let (hdr, payload) = match f {
                Framed::Message(h, p) => (h, p),
                Framed::Oversize(h) => {
                    assert!(h.len as usize > PAYLOAD_MAX);
                    assert!(inbuf.is_empty());
                    cleared = true;
                    continue;
                }
            };
            assert_eq!(payload.len(), hdr.len as usize);
            used += 16 + payload.len();
            let mut out = VecDeque::new();
            let parsed = answer(&store, ATTACKER, &hdr, &payload, &mut out);
            // Exactly one reply, well framed, echoing the request's ids.
            let mut reply: Vec<u8> = out.into_iter().collect();
            let Some(Framed::Message(rh, rp)) = next_message(&mut reply) else {
                panic!("no reply to {hdr:?}");
            };
            assert!(reply.is_empty(), "more than one reply to {hdr:?}");
            assert_eq!((rh.req_id, rh.tx_id), (hdr.req_id, hdr.tx_id));
            let is_error = rh.msg_type == MsgType::Error as u32;
            assert!(is_error || rh.msg_type == hdr.msg_type);
            if is_error {
                let name = rp.strip_suffix(b"\0").expect("NUL-terminated error name");
                assert!(StoreErrno::from_name(name).is_some(), "{name:?}");
            }
            match parsed {
                Err(_) => assert!(is_error),
                Ok(()) => {
                    let req = StoreRequest::parse(&hdr, &payload).unwrap();
                    match req {
                        StoreRequest::Read(p)
                        | StoreRequest::Directory(p)
                        | StoreRequest::GetPerms(p)
                            if in_victim_home(p.as_str()) =>
                        {
                            assert!(is_error, "domain 2 read {p:?} in domain 3's home");
                        }
                        _ => {}
                    }
                }
            }
        }
        if !cleared {
            assert_eq!(used + inbuf.len(), buffered);
        }
        // Watch events queued for the attacker encode as the ring server sends them.
        while let Some((path, token)) = store.next_event(ATTACKER) {
            let mut m = vec![0u8; 16 + path.len() + token.len() + 2];
            assert!(encode_watch_event(&mut m, &path, &token).is_ok());
        }
    }
    assert_eq!(
        victim_view(&store),
        before,
        "domain 2 changed domain 3's home"
    );
});
