//! A tiny IPv4 stack: Ethernet II, ARP (answers requests for our address, learns from them, keeps
//! a small cache), IPv4 without fragments (options are skipped, fragments dropped and counted),
//! ICMP echo (answered; replies handed to the caller) and UDP (handed to the caller, who
//! demultiplexes by port). All peers share one /24; there is no gateway.
//!
//! Allocation-free and pure: frames are parsed in place and built into caller buffers; the device
//! is behind [`Link`], and time and retries belong to the jobs (`netjobs`). Everything a peer sent
//! is checked against the frame's length before it is read, so no input can panic.
//!
//! The kernel binary cannot run a test harness (its link script places it at 2 MiB), so the tests
//! at the bottom run on the host as part of `cargo test --workspace`: `guest-drivers/tests/
//! net_stack.rs` includes this file (which uses only `core` and pv-protocol).

use core::fmt;

/// A MAC address.
pub type Mac = [u8; 6];
/// An IPv4 address.
pub type Ip = [u8; 4];

/// The broadcast MAC address.
pub const BROADCAST: Mac = [0xff; 6];
/// Ethernet II header bytes.
pub const ETH_HLEN: usize = 14;
/// IPv4 header bytes (we send no options).
pub const IP_HLEN: usize = 20;
/// UDP header bytes.
pub const UDP_HLEN: usize = 8;
/// ICMP echo header bytes.
pub const ICMP_HLEN: usize = 8;
/// Ethernet + IPv4 + UDP headers: where a UDP payload starts in a frame we build.
pub const UDP_HDRS: usize = ETH_HLEN + IP_HLEN + UDP_HLEN;
/// The IP MTU.
pub const MTU: usize = 1500;
/// Largest UDP payload in one unfragmented datagram.
pub const MAX_UDP_PAYLOAD: usize = MTU - IP_HLEN - UDP_HLEN;
/// Largest frame we build (without FCS).
pub const MAX_FRAME: usize = ETH_HLEN + MTU;
/// Shortest Ethernet frame (without FCS): shorter frames are padded with zeros.
pub const MIN_FRAME: usize = 60;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ARP_LEN: usize = 28;
const TTL: u8 = 64;
/// IPv4 flags and fragment offset: don't-fragment set, offset 0.
const IP_DF: u16 = 0x4000;
/// Entries of the ARP cache.
const ARP_CACHE: usize = 8;

// ---- Checksums (RFC 1071): pv-protocol's, shared with dom0 ----

pub use pv_protocol::inet::{finish, sum};

/// Folds a running sum to 16 bits (end-around carry), not complemented.
pub fn fold(acc: u64) -> u16 {
    !finish(acc)
}

/// The IPv4 pseudo-header sum of an L4 segment of `len` bytes.
pub fn pseudo_sum(src: Ip, dst: Ip, proto: u8, len: u16) -> u64 {
    pv_protocol::inet::pseudo_header_sum(src, dst, proto, len)
}

// ---- Text ----

/// Parses `a.b.c.d`.
pub fn parse_ip(s: &str) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// Parses `xx:xx:xx:xx:xx:xx` (hex digits of either case); a trailing NUL is allowed.
pub fn parse_mac(b: &[u8]) -> Option<Mac> {
    let b = b.split(|&c| c == 0).next()?;
    let s = core::str::from_utf8(b).ok()?.trim();
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Shows an IPv4 address as `a.b.c.d`.
#[derive(Debug, Clone, Copy)]
pub struct ShowIp(pub Ip);

impl fmt::Display for ShowIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Shows a MAC address as `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, Clone, Copy)]
pub struct ShowMac(pub Mac);

impl fmt::Display for ShowMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

// ---- Parsing ----

/// Why a received frame was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Addressed to another host (MAC or IP).
    NotForUs,
    /// Too short, or lengths that do not fit the frame.
    Malformed,
    /// The IPv4 header checksum is wrong.
    BadIpChecksum,
    /// An IPv4 fragment (we do not reassemble).
    Fragment,
    /// The ICMP or UDP checksum is wrong.
    BadL4Checksum,
    /// An ethertype, protocol, ARP form or ICMP type we do not handle.
    Unsupported,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_at(b: &[u8], at: usize) -> Ip {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    [b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5]]
}

/// An Ethernet II header and what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eth<'a> {
    /// Destination.
    pub dst: Mac,
    /// Source.
    pub src: Mac,
    /// Ethernet type.
    pub ethertype: u16,
    /// The payload (with any padding).
    pub payload: &'a [u8],
}

/// Splits an Ethernet II frame.
pub fn parse_eth(frame: &[u8]) -> Result<Eth<'_>, Discard> {
    if frame.len() < ETH_HLEN {
        return Err(Discard::Malformed);
    }
    Ok(Eth {
        dst: mac_at(frame, 0),
        src: mac_at(frame, 6),
        ethertype: be16(frame, 12),
        payload: &frame[ETH_HLEN..],
    })
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// Operation: 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ip,
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ip,
}

/// Parses an ARP packet for Ethernet and IPv4.
pub fn parse_arp(p: &[u8]) -> Result<Arp, Discard> {
    if p.len() < ARP_LEN {
        return Err(Discard::Malformed);
    }
    if be16(p, 0) != 1 || be16(p, 2) != ETHERTYPE_IPV4 || p[4] != 6 || p[5] != 4 {
        return Err(Discard::Unsupported);
    }
    Ok(Arp {
        op: be16(p, 6),
        sha: mac_at(p, 8),
        spa: ip_at(p, 14),
        tha: mac_at(p, 18),
        tpa: ip_at(p, 24),
    })
}

/// A checked IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4<'a> {
    /// Source address.
    pub src: Ip,
    /// Destination address.
    pub dst: Ip,
    /// Protocol.
    pub proto: u8,
    /// The payload, cut to the header's total length (Ethernet padding removed).
    pub payload: &'a [u8],
}

/// Parses and checks an IPv4 packet: version, header and total lengths, header checksum, no
/// fragment.
pub fn parse_ipv4(p: &[u8]) -> Result<Ipv4<'_>, Discard> {
    if p.len() < IP_HLEN || p[0] >> 4 != 4 {
        return Err(Discard::Malformed);
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(be16(p, 2));
    if ihl < IP_HLEN || total < ihl || total > p.len() {
        return Err(Discard::Malformed);
    }
    if finish(sum(0, &p[..ihl])) != 0 {
        return Err(Discard::BadIpChecksum);
    }
    // More-fragments flag or a fragment offset.
    if be16(p, 6) & 0x3fff != 0 {
        return Err(Discard::Fragment);
    }
    Ok(Ipv4 {
        src: ip_at(p, 12),
        dst: ip_at(p, 16),
        proto: p[9],
        payload: &p[ihl..total],
    })
}

/// A checked UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp<'a> {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// The payload.
    pub payload: &'a [u8],
}

/// Parses a UDP datagram carried in `ip`; verifies its checksum (unless 0, "none") when `verify`.
pub fn parse_udp<'a>(ip: &Ipv4<'a>, verify: bool) -> Result<Udp<'a>, Discard> {
    let seg = ip.payload;
    if seg.len() < UDP_HLEN {
        return Err(Discard::Malformed);
    }
    let len = usize::from(be16(seg, 4));
    if len < UDP_HLEN || len > seg.len() {
        return Err(Discard::Malformed);
    }
    let seg = &seg[..len];
    if verify && be16(seg, 6) != 0 {
        let acc = sum(pseudo_sum(ip.src, ip.dst, PROTO_UDP, len as u16), seg);
        if finish(acc) != 0 {
            return Err(Discard::BadL4Checksum);
        }
    }
    Ok(Udp {
        sport: be16(seg, 0),
        dport: be16(seg, 2),
        payload: &seg[UDP_HLEN..],
    })
}

/// A checked ICMP echo request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo<'a> {
    /// Type: 8 request, 0 reply.
    pub ty: u8,
    /// Identifier.
    pub id: u16,
    /// Sequence number.
    pub seq: u16,
    /// The payload.
    pub payload: &'a [u8],
}

/// Parses an ICMP echo message carried in `ip`; verifies its checksum when `verify`.
pub fn parse_echo<'a>(ip: &Ipv4<'a>, verify: bool) -> Result<Echo<'a>, Discard> {
    let m = ip.payload;
    if m.len() < ICMP_HLEN {
        return Err(Discard::Malformed);
    }
    if verify && finish(sum(0, m)) != 0 {
        return Err(Discard::BadL4Checksum);
    }
    if !matches!(m[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) || m[1] != 0 {
        return Err(Discard::Unsupported);
    }
    Ok(Echo {
        ty: m[0],
        id: be16(m, 4),
        seq: be16(m, 6),
        payload: &m[ICMP_HLEN..],
    })
}

// ---- Building ----

/// Writes an Ethernet header into `h[..14]`.
fn write_eth(h: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    h[0..6].copy_from_slice(&dst);
    h[6..12].copy_from_slice(&src);
    h[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Writes an option-less IPv4 header into `h[..20]` for `l4_len` bytes of payload.
fn write_ipv4(h: &mut [u8], src: Ip, dst: Ip, proto: u8, l4_len: usize, id: u16) {
    let total = (IP_HLEN + l4_len) as u16;
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&IP_DF.to_be_bytes());
    h[8] = TTL;
    h[9] = proto;
    h[10..12].fill(0);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = finish(sum(0, &h[..IP_HLEN]));
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Both ends of a UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Our MAC.
    pub src_mac: Mac,
    /// The next hop's MAC.
    pub dst_mac: Mac,
    /// Our address.
    pub src: Ip,
    /// The peer's address.
    pub dst: Ip,
    /// Our port.
    pub sport: u16,
    /// The peer's port.
    pub dport: u16,
}

/// How the UDP checksum field is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpCsum {
    /// The full checksum; the payload's running sum ([`sum`] from 0) is given.
    Full(u64),
    /// The pseudo-header sum only (folded, not complemented): the frame goes out with
    /// `NETTXF_csum_blank` and whoever delivers it finishes the checksum over the whole segment.
    Blank,
}

/// Writes the Ethernet, IPv4 and UDP headers of a datagram of `payload_len` bytes into
/// `h[..UDP_HDRS]`. `payload_len` must be at most [`MAX_UDP_PAYLOAD`]; `h` at least
/// [`UDP_HDRS`] bytes (both hold for every caller; a shorter `h` is left alone).
pub fn write_udp_headers(h: &mut [u8], f: &Flow, ip_id: u16, payload_len: usize, csum: UdpCsum) {
    let Some(h) = h.get_mut(..UDP_HDRS) else {
        return;
    };
    let udp_len = (UDP_HLEN + payload_len.min(MAX_UDP_PAYLOAD)) as u16;
    write_eth(h, f.dst_mac, f.src_mac, ETHERTYPE_IPV4);
    write_ipv4(
        &mut h[ETH_HLEN..],
        f.src,
        f.dst,
        PROTO_UDP,
        usize::from(udp_len),
        ip_id,
    );
    let u = &mut h[ETH_HLEN + IP_HLEN..];
    u[0..2].copy_from_slice(&f.sport.to_be_bytes());
    u[2..4].copy_from_slice(&f.dport.to_be_bytes());
    u[4..6].copy_from_slice(&udp_len.to_be_bytes());
    u[6..8].fill(0);
    let pseudo = pseudo_sum(f.src, f.dst, PROTO_UDP, udp_len);
    let c = match csum {
        UdpCsum::Blank => fold(pseudo),
        UdpCsum::Full(payload) => match finish(sum(pseudo + payload, &u[..UDP_HLEN])) {
            // 0 means "no checksum": a computed 0 is sent as its other form.
            0 => 0xffff,
            c => c,
        },
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
}

/// Length of a frame carrying `len` bytes after the Ethernet header, padded to [`MIN_FRAME`].
fn padded(buf: &mut [u8], end: usize) -> usize {
    let n = end.max(MIN_FRAME);
    buf[end..n].fill(0);
    n
}

/// Builds a UDP datagram frame into `buf`; returns its length, or `None` if the payload is over
/// [`MAX_UDP_PAYLOAD`] or `buf` is too short.
pub fn build_udp(
    buf: &mut [u8],
    f: &Flow,
    ip_id: u16,
    payload: &[u8],
    blank: bool,
) -> Option<usize> {
    let end = UDP_HDRS + payload.len();
    if payload.len() > MAX_UDP_PAYLOAD || buf.len() < end.max(MIN_FRAME) {
        return None;
    }
    buf[UDP_HDRS..end].copy_from_slice(payload);
    let csum = if blank {
        UdpCsum::Blank
    } else {
        UdpCsum::Full(sum(0, payload))
    };
    write_udp_headers(buf, f, ip_id, payload.len(), csum);
    Some(padded(buf, end))
}

/// Builds an ICMP echo frame (`ty` 8 request, 0 reply) into `buf`; returns its length, or `None`
/// if it would not fit the MTU or `buf`.
pub fn build_echo(
    buf: &mut [u8],
    src_mac: Mac,
    dst_mac: Mac,
    src: Ip,
    dst: Ip,
    ip_id: u16,
    echo: &Echo<'_>,
) -> Option<usize> {
    let l4 = ICMP_HLEN + echo.payload.len();
    let end = ETH_HLEN + IP_HLEN + l4;
    if IP_HLEN + l4 > MTU || buf.len() < end.max(MIN_FRAME) {
        return None;
    }
    write_eth(buf, dst_mac, src_mac, ETHERTYPE_IPV4);
    write_ipv4(&mut buf[ETH_HLEN..], src, dst, PROTO_ICMP, l4, ip_id);
    let m = &mut buf[ETH_HLEN + IP_HLEN..end];
    m[0] = echo.ty;
    m[1] = 0;
    m[2..4].fill(0);
    m[4..6].copy_from_slice(&echo.id.to_be_bytes());
    m[6..8].copy_from_slice(&echo.seq.to_be_bytes());
    m[ICMP_HLEN..].copy_from_slice(echo.payload);
    let c = finish(sum(0, m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    Some(padded(buf, end))
}

/// Builds an ARP frame to `eth_dst` into `buf` (at least [`MIN_FRAME`] bytes); returns its length.
pub fn build_arp(buf: &mut [u8], eth_dst: Mac, arp: &Arp) -> Option<usize> {
    let end = ETH_HLEN + ARP_LEN;
    if buf.len() < MIN_FRAME {
        return None;
    }
    write_eth(buf, eth_dst, arp.sha, ETHERTYPE_ARP);
    let p = &mut buf[ETH_HLEN..end];
    p[0..2].copy_from_slice(&1u16.to_be_bytes());
    p[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&arp.op.to_be_bytes());
    p[8..14].copy_from_slice(&arp.sha);
    p[14..18].copy_from_slice(&arp.spa);
    p[18..24].copy_from_slice(&arp.tha);
    p[24..28].copy_from_slice(&arp.tpa);
    Some(padded(buf, end))
}

// ---- The stack ----

/// Where the stack sends frames.
pub trait Link {
    /// Queues `frame` for transmission (`csum_blank`: its L4 checksum is left for the other
    /// side to finish); `false` if it was dropped for lack of room.
    fn send(&mut self, frame: &[u8], csum_blank: bool) -> bool;
}

/// Counters of the stack.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StackStats {
    /// ARP packets addressed to us.
    pub arp_in: u64,
    /// ARP replies we sent.
    pub arp_replies: u64,
    /// ICMP echo requests we answered.
    pub echo_replies: u64,
    /// UDP datagrams delivered.
    pub udp_in: u64,
    /// Frames for another host.
    pub not_for_us: u64,
    /// Malformed frames.
    pub malformed: u64,
    /// IPv4 header checksum failures.
    pub bad_ip_csum: u64,
    /// IPv4 fragments dropped.
    pub fragments: u64,
    /// ICMP/UDP checksum failures.
    pub bad_l4_csum: u64,
    /// Frames of a kind we do not handle.
    pub unsupported: u64,
    /// Frames we built but the link dropped.
    pub tx_dropped: u64,
}

impl StackStats {
    fn count(&mut self, d: Discard) {
        let c = match d {
            Discard::NotForUs => &mut self.not_for_us,
            Discard::Malformed => &mut self.malformed,
            Discard::BadIpChecksum => &mut self.bad_ip_csum,
            Discard::Fragment => &mut self.fragments,
            Discard::BadL4Checksum => &mut self.bad_l4_csum,
            Discard::Unsupported => &mut self.unsupported,
        };
        *c += 1;
    }
}

/// A UDP datagram delivered to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpIn<'a> {
    /// The sender's MAC (where a reply goes).
    pub src_mac: Mac,
    /// The sender's address.
    pub src: Ip,
    /// The destination address (ours, or a broadcast).
    pub dst: Ip,
    /// The sender's port.
    pub sport: u16,
    /// The destination port.
    pub dport: u16,
    /// The payload.
    pub payload: &'a [u8],
}

/// What a received frame means to the caller (ARP and echo requests are handled inside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Nothing for the caller.
    None,
    /// A UDP datagram.
    Udp(UdpIn<'a>),
    /// An ICMP echo reply.
    EchoReply {
        /// Who answered.
        src: Ip,
        /// Its identifier.
        id: u16,
        /// Its sequence number.
        seq: u16,
        /// Its payload.
        payload: &'a [u8],
    },
}

/// Our addresses, the ARP cache and counters.
#[derive(Debug)]
pub struct Stack {
    /// Our MAC.
    pub mac: Mac,
    /// Our address.
    pub ip: Ip,
    cache: [Option<(Ip, Mac)>; ARP_CACHE],
    /// Slot the next new cache entry replaces.
    victim: usize,
    ip_id: u16,
    /// Counters.
    pub stats: StackStats,
}

impl Stack {
    /// A stack with addresses `mac` and `ip`.
    pub fn new(mac: Mac, ip: Ip) -> Self {
        Self {
            mac,
            ip,
            cache: [None; ARP_CACHE],
            victim: 0,
            ip_id: 1,
            stats: StackStats::default(),
        }
    }

    /// The /24 broadcast address of our network.
    pub fn subnet_broadcast(&self) -> Ip {
        [self.ip[0], self.ip[1], self.ip[2], 255]
    }

    /// The cached MAC of `ip`.
    pub fn lookup(&self, ip: Ip) -> Option<Mac> {
        self.cache.iter().flatten().find(|e| e.0 == ip).map(|e| e.1)
    }

    fn learn(&mut self, ip: Ip, mac: Mac) {
        if ip == [0; 4] || ip == self.ip || mac[0] & 1 != 0 {
            return;
        }
        if let Some(e) = self.cache.iter_mut().flatten().find(|e| e.0 == ip) {
            e.1 = mac;
            return;
        }
        self.cache[self.victim] = Some((ip, mac));
        self.victim = (self.victim + 1) % ARP_CACHE;
    }

    /// The next IPv4 identification.
    pub fn next_ip_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    fn emit(&mut self, link: &mut impl Link, frame: &[u8]) -> bool {
        let ok = link.send(frame, false);
        self.stats.tx_dropped += u64::from(!ok);
        ok
    }

    /// Broadcasts an ARP request for `target`.
    pub fn send_arp_request(&mut self, link: &mut impl Link, target: Ip) -> bool {
        let mut buf = [0u8; MIN_FRAME];
        let arp = Arp {
            op: ARP_REQUEST,
            sha: self.mac,
            spa: self.ip,
            tha: [0; 6],
            tpa: target,
        };
        match build_arp(&mut buf, BROADCAST, &arp) {
            Some(n) => self.emit(link, &buf[..n]),
            None => false,
        }
    }

    /// Sends a UDP datagram (full checksum).
    pub fn send_udp(
        &mut self,
        link: &mut impl Link,
        dst_mac: Mac,
        dst: Ip,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> bool {
        let flow = Flow {
            src_mac: self.mac,
            dst_mac,
            src: self.ip,
            dst,
            sport,
            dport,
        };
        let id = self.next_ip_id();
        let mut buf = [0u8; MAX_FRAME];
        match build_udp(&mut buf, &flow, id, payload, false) {
            Some(n) => self.emit(link, &buf[..n]),
            None => false,
        }
    }

    /// Sends an ICMP echo message (`ty` 8 request, 0 reply).
    pub fn send_echo(
        &mut self,
        link: &mut impl Link,
        dst_mac: Mac,
        dst: Ip,
        echo: &Echo<'_>,
    ) -> bool {
        let id = self.next_ip_id();
        let mut buf = [0u8; MAX_FRAME];
        match build_echo(&mut buf, self.mac, dst_mac, self.ip, dst, id, echo) {
            Some(n) => self.emit(link, &buf[..n]),
            None => false,
        }
    }

    /// Handles one received frame: answers ARP requests for our address (learning the sender)
    /// and ICMP echo requests; returns UDP datagrams and echo replies to the caller. `l4_checked`:
    /// the back end vouches for (or will not have) the L4 checksum, so it is not verified.
    pub fn input<'a>(
        &mut self,
        frame: &'a [u8],
        l4_checked: bool,
        link: &mut impl Link,
    ) -> Event<'a> {
        match self.classify(frame, l4_checked, link) {
            Ok(ev) => ev,
            Err(d) => {
                self.stats.count(d);
                Event::None
            }
        }
    }

    fn classify<'a>(
        &mut self,
        frame: &'a [u8],
        l4_checked: bool,
        link: &mut impl Link,
    ) -> Result<Event<'a>, Discard> {
        let eth = parse_eth(frame)?;
        // Ours, or broadcast/multicast (the group bit).
        if eth.dst != self.mac && eth.dst[0] & 1 == 0 {
            return Err(Discard::NotForUs);
        }
        match eth.ethertype {
            ETHERTYPE_ARP => self.arp(eth.payload, link).map(|()| Event::None),
            ETHERTYPE_IPV4 => self.ipv4(eth.src, eth.payload, l4_checked, link),
            _ => Err(Discard::Unsupported),
        }
    }

    fn arp(&mut self, p: &[u8], link: &mut impl Link) -> Result<(), Discard> {
        let arp = parse_arp(p)?;
        if arp.tpa != self.ip {
            return Err(Discard::NotForUs);
        }
        self.stats.arp_in += 1;
        self.learn(arp.spa, arp.sha);
        if arp.op == ARP_REQUEST {
            let reply = Arp {
                op: ARP_REPLY,
                sha: self.mac,
                spa: self.ip,
                tha: arp.sha,
                tpa: arp.spa,
            };
            let mut buf = [0u8; MIN_FRAME];
            if let Some(n) = build_arp(&mut buf, arp.sha, &reply)
                && self.emit(link, &buf[..n])
            {
                self.stats.arp_replies += 1;
            }
        }
        Ok(())
    }

    fn ipv4<'a>(
        &mut self,
        src_mac: Mac,
        p: &'a [u8],
        l4_checked: bool,
        link: &mut impl Link,
    ) -> Result<Event<'a>, Discard> {
        let ip = parse_ipv4(p)?;
        let ours = ip.dst == self.ip;
        let broadcast = ip.dst == [255; 4] || ip.dst == self.subnet_broadcast();
        match ip.proto {
            PROTO_ICMP if ours => {
                let echo = parse_echo(&ip, !l4_checked)?;
                if echo.ty == ICMP_ECHO_REPLY {
                    return Ok(Event::EchoReply {
                        src: ip.src,
                        id: echo.id,
                        seq: echo.seq,
                        payload: echo.payload,
                    });
                }
                let reply = Echo {
                    ty: ICMP_ECHO_REPLY,
                    ..echo
                };
                // An echo that does not fit the MTU cannot be answered unfragmented.
                if self.send_echo(link, src_mac, ip.src, &reply) {
                    self.stats.echo_replies += 1;
                }
                Ok(Event::None)
            }
            PROTO_UDP if ours || broadcast => {
                let udp = parse_udp(&ip, !l4_checked)?;
                self.stats.udp_in += 1;
                Ok(Event::Udp(UdpIn {
                    src_mac,
                    src: ip.src,
                    dst: ip.dst,
                    sport: udp.sport,
                    dport: udp.dport,
                    payload: udp.payload,
                }))
            }
            PROTO_ICMP | PROTO_UDP => Err(Discard::NotForUs),
            _ => Err(Discard::Unsupported),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0a];
    const B_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0b];
    const A_IP: Ip = [10, 0, 0, 1];
    const B_IP: Ip = [10, 0, 0, 2];

    /// A link that keeps what was sent.
    #[derive(Default)]
    struct Wire {
        frames: Vec<(Vec<u8>, bool)>,
    }

    impl Link for Wire {
        fn send(&mut self, frame: &[u8], csum_blank: bool) -> bool {
            self.frames.push((frame.to_vec(), csum_blank));
            true
        }
    }

    fn flow() -> Flow {
        Flow {
            src_mac: A_MAC,
            dst_mac: B_MAC,
            src: A_IP,
            dst: B_IP,
            sport: 40000,
            dport: 7,
        }
    }

    #[test]
    fn rfc1071_example_sums_to_ddf2() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(0, &data)), 0xddf2);
        assert_eq!(finish(sum(0, &data)), !0xddf2);
    }

    #[test]
    fn word_sum_equals_halfword_sum_for_every_length() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..data.len() {
            let mut acc = 0u64;
            for c in data[..n].chunks(2) {
                acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            assert_eq!(fold(sum(0, &data[..n])), fold(acc), "length {n}");
        }
    }

    #[test]
    fn ip_and_mac_text_round_trip_and_reject_junk() {
        assert_eq!(parse_ip("192.168.7.255"), Some([192, 168, 7, 255]));
        for bad in [
            "1.2.3",
            "1.2.3.4.5",
            "1.2.3.256",
            "a.b.c.d",
            "1..2.3",
            "+1.2.3.4",
            "",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad}");
        }
        assert_eq!(format!("{}", ShowIp([10, 0, 0, 1])), "10.0.0.1");
        let mac = parse_mac(b"00:16:3E:0a:ff:01\0").unwrap();
        assert_eq!(mac, [0x00, 0x16, 0x3e, 0x0a, 0xff, 0x01]);
        assert_eq!(format!("{}", ShowMac(mac)), "00:16:3e:0a:ff:01");
        for bad in [
            &b"00:16:3e:0a:ff"[..],
            b"00:16:3e:0a:ff:01:02",
            b"0:16:3e:0a:ff:01",
            b"zz:16:3e:0a:ff:01",
        ] {
            assert_eq!(parse_mac(bad), None);
        }
    }

    #[test]
    fn udp_frame_parses_back_with_a_valid_checksum() {
        for len in [0usize, 1, 17, 18, 19, 1471, 1472] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut buf = [0u8; MAX_FRAME];
            let n = build_udp(&mut buf, &flow(), 9, &payload, false).unwrap();
            assert_eq!(n, (UDP_HDRS + len).max(MIN_FRAME));
            let eth = parse_eth(&buf[..n]).unwrap();
            assert_eq!(
                (eth.dst, eth.src, eth.ethertype),
                (B_MAC, A_MAC, ETHERTYPE_IPV4)
            );
            let ip = parse_ipv4(eth.payload).unwrap();
            assert_eq!((ip.src, ip.dst, ip.proto), (A_IP, B_IP, PROTO_UDP));
            let udp = parse_udp(&ip, true).unwrap();
            assert_eq!(
                (udp.sport, udp.dport, udp.payload),
                (40000, 7, &payload[..])
            );
        }
        let mut buf = [0u8; MAX_FRAME + 1];
        assert_eq!(
            build_udp(&mut buf, &flow(), 9, &[0; MAX_UDP_PAYLOAD + 1], false),
            None
        );
    }

    #[test]
    fn blank_udp_checksum_is_the_pseudo_header_sum_and_verifies_once_finished() {
        let payload = b"checksum me, please";
        let mut buf = [0u8; MAX_FRAME];
        let n = build_udp(&mut buf, &flow(), 9, payload, true).unwrap();
        let udp_len = (UDP_HLEN + payload.len()) as u16;
        let field = u16::from_be_bytes([buf[40], buf[41]]);
        assert_eq!(field, fold(pseudo_sum(A_IP, B_IP, PROTO_UDP, udp_len)));
        // What a back end does for NETTXF_csum_blank: sum the segment as it is (field included).
        let seg_end = UDP_HDRS + payload.len();
        let c = finish(sum(0, &buf[ETH_HLEN + IP_HLEN..seg_end]));
        buf[40..42].copy_from_slice(&c.to_be_bytes());
        let ip = parse_ipv4(&buf[ETH_HLEN..n]).unwrap();
        assert_eq!(parse_udp(&ip, true).unwrap().payload, payload);
    }

    #[test]
    fn corrupted_frames_are_counted_not_delivered() {
        let mut st = Stack::new(B_MAC, B_IP);
        let mut wire = Wire::default();
        let mut buf = [0u8; MAX_FRAME];
        let n = build_udp(&mut buf, &flow(), 9, b"hello", false).unwrap();

        let mut bad = buf;
        bad[UDP_HDRS] ^= 1;
        assert_eq!(st.input(&bad[..n], false, &mut wire), Event::None);
        assert_eq!(st.stats.bad_l4_csum, 1);
        // The back end vouched for it: not verified.
        assert!(matches!(
            st.input(&bad[..n], true, &mut wire),
            Event::Udp(_)
        ));

        let mut bad = buf;
        bad[ETH_HLEN + 8] ^= 1; // TTL
        assert_eq!(st.input(&bad[..n], true, &mut wire), Event::None);
        assert_eq!(st.stats.bad_ip_csum, 1);

        // A fragment with a correct header checksum.
        let mut frag = buf;
        frag[ETH_HLEN + 6] = 0x20;
        frag[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
        let c = finish(sum(0, &frag[ETH_HLEN..ETH_HLEN + IP_HLEN]));
        frag[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(st.input(&frag[..n], true, &mut wire), Event::None);
        assert_eq!(st.stats.fragments, 1);

        let mut other = buf;
        other[0..6].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
        assert_eq!(st.input(&other[..n], true, &mut wire), Event::None);
        assert_eq!(st.stats.not_for_us, 1);
        assert!(wire.frames.is_empty());
    }

    #[test]
    fn arp_request_is_answered_and_its_sender_learned() {
        let mut a = Stack::new(A_MAC, A_IP);
        let mut b = Stack::new(B_MAC, B_IP);
        let mut wa = Wire::default();
        let mut wb = Wire::default();
        assert!(a.send_arp_request(&mut wa, B_IP));
        let (req, _) = wa.frames.pop().unwrap();
        assert_eq!(req.len(), MIN_FRAME);
        assert_eq!(b.input(&req, false, &mut wb), Event::None);
        assert_eq!(b.lookup(A_IP), Some(A_MAC));
        let (reply, _) = wb.frames.pop().unwrap();
        assert_eq!(&reply[0..6], &A_MAC);
        a.input(&reply, false, &mut wa);
        assert_eq!(a.lookup(B_IP), Some(B_MAC));
        assert!(wa.frames.is_empty(), "a reply is not answered");
        // A request for someone else teaches nothing and is not answered.
        let mut c = Stack::new([0x02, 0, 0, 0, 0, 0x0c], [10, 0, 0, 3]);
        c.input(&req, false, &mut wb);
        assert_eq!(c.lookup(A_IP), None);
        assert!(wb.frames.is_empty());
    }

    #[test]
    fn arp_cache_keeps_the_newest_entries() {
        let mut st = Stack::new(A_MAC, A_IP);
        for i in 0..20u8 {
            st.learn([10, 0, 1, i], [2, 0, 0, 0, 1, i]);
        }
        assert_eq!(st.lookup([10, 0, 1, 19]), Some([2, 0, 0, 0, 1, 19]));
        assert_eq!(st.lookup([10, 0, 1, 0]), None);
        st.learn([10, 0, 1, 19], [2, 0, 0, 0, 2, 19]);
        assert_eq!(st.lookup([10, 0, 1, 19]), Some([2, 0, 0, 0, 2, 19]));
        st.learn([10, 0, 1, 50], BROADCAST);
        assert_eq!(st.lookup([10, 0, 1, 50]), None);
    }

    #[test]
    fn ping_is_answered_and_the_reply_delivered() {
        let mut a = Stack::new(A_MAC, A_IP);
        let mut b = Stack::new(B_MAC, B_IP);
        let mut wa = Wire::default();
        let mut wb = Wire::default();
        let payload: Vec<u8> = (0..56u8).collect();
        let req = Echo {
            ty: ICMP_ECHO_REQUEST,
            id: 0x5356,
            seq: 3,
            payload: &payload,
        };
        assert!(a.send_echo(&mut wa, B_MAC, B_IP, &req));
        let (f, _) = wa.frames.pop().unwrap();
        assert_eq!(f.len(), ETH_HLEN + IP_HLEN + ICMP_HLEN + 56);
        assert_eq!(b.input(&f, false, &mut wb), Event::None);
        assert_eq!(b.stats.echo_replies, 1);
        let (r, _) = wb.frames.pop().unwrap();
        assert_eq!(
            a.input(&r, false, &mut wa),
            Event::EchoReply {
                src: B_IP,
                id: 0x5356,
                seq: 3,
                payload: &payload,
            }
        );
    }

    #[test]
    fn udp_to_us_or_broadcast_is_delivered_and_to_others_not() {
        let mut b = Stack::new(B_MAC, B_IP);
        let mut w = Wire::default();
        let mut buf = [0u8; MAX_FRAME];
        let n = build_udp(&mut buf, &flow(), 1, b"x", false).unwrap();
        let Event::Udp(u) = b.input(&buf[..n], false, &mut w) else {
            panic!("not delivered")
        };
        assert_eq!(
            (u.src_mac, u.src, u.sport, u.dport, u.payload),
            (A_MAC, A_IP, 40000, 7, &b"x"[..])
        );
        let bc = Flow {
            dst_mac: BROADCAST,
            dst: [10, 0, 0, 255],
            ..flow()
        };
        let n = build_udp(&mut buf, &bc, 1, b"y", false).unwrap();
        assert!(matches!(b.input(&buf[..n], false, &mut w), Event::Udp(_)));
        let other = Flow {
            dst: [10, 0, 0, 9],
            ..flow()
        };
        let n = build_udp(&mut buf, &other, 1, b"z", false).unwrap();
        assert_eq!(b.input(&buf[..n], false, &mut w), Event::None);
        assert_eq!(b.stats.not_for_us, 1);
    }

    #[test]
    fn arbitrary_and_mutated_frames_never_panic() {
        let mut st = Stack::new(B_MAC, B_IP);
        let mut w = Wire::default();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut good = [0u8; MAX_FRAME];
        let n = build_udp(&mut good, &flow(), 1, &[0x55; 100], false).unwrap();
        let mut arp = [0u8; MIN_FRAME];
        let an = build_arp(
            &mut arp,
            B_MAC,
            &Arp {
                op: 1,
                sha: A_MAC,
                spa: A_IP,
                tha: [0; 6],
                tpa: B_IP,
            },
        )
        .unwrap();
        for round in 0..20_000 {
            let mut f = if round % 2 == 0 {
                good[..n].to_vec()
            } else {
                arp[..an].to_vec()
            };
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % f.len();
                f[i] = next() as u8;
            }
            f.truncate((next() as usize) % (f.len() + 1));
            let _ = st.input(&f, next() % 2 == 0, &mut w);
            let random: Vec<u8> = (0..(next() % 80)).map(|_| next() as u8).collect();
            let _ = st.input(&random, false, &mut w);
        }
    }
}
