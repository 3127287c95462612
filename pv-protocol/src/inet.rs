//! Internet checksums (RFC 1071) and the one frame fix-up a back end owes a peer that cannot take
//! a blank checksum: filling in the L4 checksum of an IPv4 TCP/UDP/ICMP frame whose sender set
//! `NETTXF_csum_blank`.
//!
//! Shared by dom0 (which finishes checksums between ports) and the guest's network stack. Frames
//! come from guests: every length and offset is checked against the frame before it is used.

/// Ethernet type of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethernet type of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IP protocol numbers.
pub const IPPROTO_ICMP: u8 = 1;
/// TCP.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Adds `data` to a running ones'-complement sum (big-endian 16-bit words; an odd last byte is
/// padded with zero). Fold with [`finish`].
///
/// Sums big-endian 32-bit words: they fold to the same 16-bit ones'-complement sum (2^16 = 1
/// mod 0xffff), at half the additions; each addend is below 2^32, so the u64 cannot overflow for
/// any frame (or any slice shorter than 2^32 words).
pub fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum into the final checksum (ones' complement of the folded sum).
pub fn finish(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(0, data))
}

/// The IPv4 pseudo-header sum for an L4 segment of `len` bytes.
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u64 {
    sum(sum(0, &src), &dst) + u64::from(proto) + u64::from(len)
}

/// Why a frame's checksum could not be filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CsumError {
    /// Not an IPv4 frame (or too short to be one).
    #[error("not an IPv4 frame")]
    NotIpv4,
    /// The IPv4 header or total length does not fit the frame.
    #[error("bad IPv4 header")]
    BadHeader,
    /// A fragment: its L4 header is elsewhere.
    #[error("IPv4 fragment")]
    Fragment,
    /// Not TCP, UDP or ICMP.
    #[error("protocol {0} has no checksum we fill in")]
    Protocol(u8),
}

/// Fills in the L4 checksum of an Ethernet frame carrying IPv4 TCP, UDP or ICMP, computed from
/// scratch (whatever partial sum the field held). A UDP checksum that comes out 0 is sent as
/// 0xffff (0 means "none").
pub fn fill_l4_checksum(frame: &mut [u8]) -> Result<(), CsumError> {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return Err(CsumError::NotIpv4);
    }
    let ip = &frame[ETH..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return Err(CsumError::BadHeader);
    }
    // More-fragments flag or a fragment offset.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return Err(CsumError::Fragment);
    }
    let proto = ip[9];
    let (src, dst) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    );
    let l4 = &mut frame[ETH + ihl..ETH + total];
    let field = match proto {
        IPPROTO_UDP => 6,
        IPPROTO_TCP => 16,
        IPPROTO_ICMP => 2,
        p => return Err(CsumError::Protocol(p)),
    };
    if l4.len() < field + 2 || (proto == IPPROTO_TCP && l4.len() < 20) {
        return Err(CsumError::BadHeader);
    }
    l4[field..field + 2].fill(0);
    let start = if proto == IPPROTO_ICMP {
        0
    } else {
        pseudo_header_sum(src, dst, proto, l4.len() as u16)
    };
    let mut c = finish(sum(start, l4));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A UDP frame from 10.0.0.1:1000 to 10.0.0.2:7 with `payload`, its checksum field holding
    /// `csum`.
    fn udp_frame(payload: &[u8], csum: u16) -> std::vec::Vec<u8> {
        let mut f = std::vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = [
            0x45,
            0,
            0,
            0,
            0,
            1,
            0x40,
            0,
            64,
            IPPROTO_UDP,
            0,
            0,
            10,
            0,
            0,
            1,
            10,
            0,
            0,
            2,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let hc = checksum(&ip);
        ip[10..12].copy_from_slice(&hc.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&1000u16.to_be_bytes());
        f.extend_from_slice(&7u16.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is 0xddf2 (checksum 0x220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn a_filled_udp_checksum_verifies() {
        let mut f = udp_frame(b"hello, world!", 0x1234);
        fill_l4_checksum(&mut f).unwrap();
        let l4 = &f[34..];
        let ph = pseudo_header_sum([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_UDP, l4.len() as u16);
        // A correct checksum makes the whole sum fold to 0xffff (finish -> 0).
        assert_eq!(finish(sum(ph, l4)), 0);
        assert_ne!(&f[40..42], &[0, 0]);
    }

    #[test]
    fn refuses_what_it_cannot_fix() {
        assert_eq!(fill_l4_checksum(&mut [0u8; 10]), Err(CsumError::NotIpv4));
        let mut f = udp_frame(b"x", 0);
        f[14 + 9] = 47; // GRE
        assert_eq!(fill_l4_checksum(&mut f), Err(CsumError::Protocol(47)));
        let mut f = udp_frame(b"x", 0);
        f[14 + 2..14 + 4].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(fill_l4_checksum(&mut f), Err(CsumError::BadHeader));
        let mut f = udp_frame(b"x", 0);
        f[14 + 6] = 0x20; // more fragments
        assert_eq!(fill_l4_checksum(&mut f), Err(CsumError::Fragment));
    }

    proptest! {
        /// Any bytes: never panics, and whatever it fills in verifies.
        #[test]
        fn hostile_frames_never_panic(mut f in proptest::collection::vec(any::<u8>(), 0..200)) {
            if fill_l4_checksum(&mut f).is_ok() {
                let ihl = usize::from(f[14] & 0xf) * 4;
                let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
                let l4 = &f[14 + ihl..14 + total];
                let start = if f[23] == IPPROTO_ICMP {
                    0
                } else {
                    let s = [f[26], f[27], f[28], f[29]];
                    let d = [f[30], f[31], f[32], f[33]];
                    pseudo_header_sum(s, d, f[23], l4.len() as u16)
                };
                prop_assert_eq!(finish(sum(start, l4)), 0);
            }
        }

        #[test]
        fn udp_of_any_payload_verifies(payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut f = udp_frame(&payload, 0xabcd);
            fill_l4_checksum(&mut f).unwrap();
            let ph = pseudo_header_sum([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_UDP, (8 + payload.len()) as u16);
            prop_assert_eq!(finish(sum(ph, &f[34..])), 0);
        }
    }
}
