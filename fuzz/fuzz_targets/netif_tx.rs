//! Network TX chains as a front end writes them into consecutive TX ring slots (data slots and
//! extra-info slots), plus the extra-info slot and the TX/RX response slots a front end reads.
//!
//! Input: consecutive 12-byte TX request slots (what netback copied off the ring); the first 8
//! bytes also serve as an RX response slot and the first 4 as a TX response slot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_protocol::PAGE_SIZE;
use pv_protocol::netif::{
    ETH_HLEN, MAX_SLOTS_PER_FRAME, NetExtra, NetRxResponse, NetTxFlags, NetTxResponse,
    NetifExtraInfoRaw, NetifRxResponseRaw, NetifTxRequestRaw, NetifTxResponseRaw, TxPacket,
};
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    if let Ok((r, _)) = NetifTxResponseRaw::read_from_prefix(data) {
        if let Ok(p) = NetTxResponse::parse(&r) {
            assert_eq!(NetTxResponse::parse(&p.to_raw()), Ok(p));
        }
    }
    if let Ok((r, _)) = NetifRxResponseRaw::read_from_prefix(data) {
        if let Ok(p) = NetRxResponse::parse(&r) {
            assert_eq!(NetRxResponse::parse(&p.to_raw()), Ok(p));
            if let pv_protocol::netif::RxStatus::Data(n) = p.status {
                assert!(usize::from(p.offset) + usize::from(n) <= PAGE_SIZE);
            }
        }
    }
    let slots: Vec<NetifTxRequestRaw> = data
        .chunks_exact(12)
        .take(64)
        .map(|c| NetifTxRequestRaw::read_from_bytes(c).unwrap())
        .collect();
    for s in &slots {
        let raw = NetifExtraInfoRaw::from_tx_slot(s);
        if let Ok((e, more)) = NetExtra::parse(&raw) {
            assert_eq!(NetExtra::parse(&e.to_raw(more)), Ok((e, more)));
        }
    }
    let Ok(pkt) = TxPacket::parse(&slots) else {
        return;
    };
    let first = slots[0];
    // 1..=18 data slots, each inside its page, adding up to the frame size of the first slot.
    assert!((1..=MAX_SLOTS_PER_FRAME).contains(&pkt.slots.len()));
    for s in pkt.slots.iter() {
        assert!(usize::from(s.offset) + usize::from(s.len) <= PAGE_SIZE);
    }
    assert_eq!(pkt.total_len(), usize::from(first.size));
    assert!(pkt.total_len() >= ETH_HLEN);
    // The chain never claims more slots than were supplied: netback answers exactly these.
    assert!(pkt.ring_slots() <= slots.len());
    assert_eq!(pkt.slots[0].gref.0, first.gref);
    assert_eq!(
        pkt.flags,
        NetTxFlags::from_bits_truncate(first.flags)
            & (NetTxFlags::CSUM_BLANK | NetTxFlags::DATA_VALIDATED)
    );
    // Serialise and parse again: the same frame, in as many slots.
    let mut out = vec![NetifTxRequestRaw::default(); pkt.ring_slots()];
    assert_eq!(pkt.write_slots(&mut out), Ok(pkt.ring_slots()));
    assert_eq!(TxPacket::parse(&out), Ok(pkt));
    assert!(pkt.write_slots(&mut out[..pkt.ring_slots() - 1]).is_err());
});
