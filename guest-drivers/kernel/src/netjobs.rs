//! The network jobs: `netecho`, `ping`, `udpcheck`, `udpsink`, `udpbench`, `nethostile`.
//!
//! Each connects to one vif (index 0, or `vif=N`) with our address from `ip=A.B.C.D`, prints
//! `net: vif<devid> mac <mac> ip <ip> connected` (or `FAIL net-connect: <why>` and exits 1), then
//! runs. Host tests parse the console lines, so their formats are fixed. Besides those lines:
//! when the destination never answers ARP, udpcheck and udpbench say `<job>: no ARP reply from
//! <ip>` (udpcheck then counts every datagram as lost, udpbench exits 1; ping simply counts each
//! unanswered attempt as sent and not received, as ping(8) does), a bad argument gives
//! `FAIL net-args: <why>` (exit 1), and a ring the back end broke is reported once as
//! `net: vif<devid> ring broken: <error>`.

use alloc::vec;
use alloc::vec::Vec;

use pv_protocol::netif::{NetTxFlags, NetifTxRequestRaw};
use pv_protocol::start_info::StartInfo;

use crate::hcall::Cpu;
use crate::kprintln;
use crate::net::{
    BROADCAST, Echo, Event, Flow, Ip, MAX_UDP_PAYLOAD, MIN_FRAME, Mac, ShowIp, ShowMac, Stack,
    UDP_HDRS, UdpCsum, parse_ip, sum, write_udp_headers,
};
use crate::netfront::{NetFront, TX_PAGES};

/// Largest frame received (a 64 KiB frame may span RX pages).
const RX_BUF: usize = 64 * 1024;
/// How long to spin on the rings before arming the event and sleeping: short, since dom0's
/// switch thread needs this host's other core.
const SPIN_US: u64 = 30;
/// How long to wait for an ARP reply in all (a request every 250 ms).
const ARP_TIMEOUT_MS: u64 = 3000;
/// ICMP echo identifier of our pings.
const PING_ID: u16 = 0x5356;
/// ICMP echo payload bytes.
const PING_PAYLOAD: usize = 56;
/// The UDP echo port.
const ECHO_PORT: u16 = 7;

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no preconditions.
    unsafe { core::arch::x86_64::_rdtsc() }
}

use crate::text::{arg, num};

/// The first argument that is not `key=value`.
fn positional(cmdline: &str) -> Option<&str> {
    cmdline
        .split_whitespace()
        .skip(1)
        .find(|t| !t.contains('='))
}

/// A connected vif with the stack on top, and the clock.
struct Net<'c> {
    cpu: &'c Cpu,
    nf: NetFront,
    st: Stack,
    /// Where received frames are reassembled.
    buf: Vec<u8>,
    /// TSC ticks per millisecond.
    khz: u64,
    broken_reported: bool,
}

impl<'c> Net<'c> {
    /// Connects as the command line says; prints the `net:` line or why not.
    fn connect(cpu: &'c Cpu, si: &StartInfo, cmdline: &str) -> Option<Self> {
        let Some(ip) = arg(cmdline, "ip").and_then(parse_ip) else {
            kprintln!(cpu, "FAIL net-connect: no ip=A.B.C.D on the command line");
            return None;
        };
        let Some(vif) = num(cmdline, "vif", 0) else {
            kprintln!(cpu, "FAIL net-connect: bad vif=N");
            return None;
        };
        let nf = match NetFront::connect(cpu, vif as usize, 500) {
            Ok(nf) => nf,
            Err(e) => {
                kprintln!(cpu, "FAIL net-connect: {e}");
                return None;
            }
        };
        kprintln!(
            cpu,
            "net: vif{} mac {} ip {} connected",
            nf.devid,
            ShowMac(nf.mac),
            ShowIp(ip)
        );
        Some(Net {
            cpu,
            st: Stack::new(nf.mac, ip),
            nf,
            buf: vec![0; RX_BUF],
            khz: si.tsc_khz.max(1),
            broken_reported: false,
        })
    }

    fn ms(&self, ms: u64) -> u64 {
        ms * self.khz
    }

    fn us_of(&self, ticks: u64) -> u64 {
        ticks * 1000 / self.khz
    }

    /// Whether a ring broke (said once on the console).
    fn broken(&mut self) -> bool {
        let Some(e) = self.nf.broken() else {
            return false;
        };
        if !self.broken_reported {
            self.broken_reported = true;
            kprintln!(self.cpu, "net: vif{} ring broken: {e}", self.nf.devid);
        }
        true
    }

    /// Handles every frame waiting (the stack answers ARP and pings), passing each event to `f`
    /// until it returns `Some`; then publishes replies and reclaims TX pages. Returns how many
    /// frames it handled.
    fn drain<T>(
        &mut self,
        f: &mut impl FnMut(&mut Stack, &mut NetFront, Event<'_>) -> Option<T>,
    ) -> (u32, Option<T>) {
        let mut n = 0;
        let mut out = None;
        while let Some(fr) = self.nf.recv(&mut self.buf) {
            n += 1;
            let frame = &self.buf[..fr.len];
            let ev = self.st.input(frame, fr.l4_checked, &mut self.nf);
            out = f(&mut self.st, &mut self.nf, ev);
            if out.is_some() {
                break;
            }
            // Replies go out in batches, but not held back for long.
            if n % 32 == 0 {
                self.nf.flush();
            }
        }
        self.nf.flush();
        self.nf.reclaim();
        (n, out)
    }

    /// Handles traffic until `f` returns `Some` or the TSC passes `deadline` (`None`: no
    /// deadline); polls briefly, then sleeps on the event channel (and the timer, for a
    /// deadline; and the store, for the toolstack's shutdown requests, obeyed meanwhile). `None`
    /// also if a ring broke.
    fn run_until<T>(
        &mut self,
        deadline: Option<u64>,
        mut f: impl FnMut(&mut Stack, &mut NetFront, Event<'_>) -> Option<T>,
    ) -> Option<T> {
        let spin = SPIN_US * self.khz / 1000;
        loop {
            crate::control::poll(self.cpu);
            let (n, out) = self.drain(&mut f);
            if out.is_some() {
                return out;
            }
            let now = rdtsc();
            if deadline.is_some_and(|d| now >= d) || self.broken() {
                return None;
            }
            if n > 0 {
                continue;
            }
            let mut woke = false;
            while rdtsc() - now < spin {
                if self.nf.rx_pending() {
                    woke = true;
                    break;
                }
                core::hint::spin_loop();
            }
            if !woke && self.nf.prepare_sleep() {
                crate::control::sleep(self.cpu, &[self.nf.port()], deadline, 0, None);
            }
        }
    }

    /// Waits `ms` while serving traffic.
    fn pause(&mut self, ms: u64) {
        let until = rdtsc() + self.ms(ms);
        let _ = self.run_until::<()>(Some(until), |_, _, _| None);
    }

    /// The MAC of `ip`: from the cache, or by ARP (a request every 250 ms until the TSC passes
    /// `deadline`).
    fn resolve_by(&mut self, ip: Ip, deadline: u64) -> Option<Mac> {
        if let Some(m) = self.st.lookup(ip) {
            return Some(m);
        }
        while rdtsc() < deadline && !self.broken() {
            self.st.send_arp_request(&mut self.nf, ip);
            self.nf.flush();
            let next = (rdtsc() + self.ms(250)).min(deadline);
            if let Some(m) = self.run_until(Some(next), |st, _, _| st.lookup(ip)) {
                return Some(m);
            }
        }
        None
    }

    /// [`resolve_by`](Self::resolve_by) with [`ARP_TIMEOUT_MS`] from now.
    fn resolve(&mut self, ip: Ip) -> Option<Mac> {
        let deadline = rdtsc() + self.ms(ARP_TIMEOUT_MS);
        self.resolve_by(ip, deadline)
    }
}

/// The destination address argument, or why not.
fn dst_arg(cpu: &Cpu, cmdline: &str) -> Option<Ip> {
    let dst = positional(cmdline).and_then(parse_ip);
    if dst.is_none() {
        kprintln!(cpu, "FAIL net-args: no destination address");
    }
    dst
}

/// Answers `ev` if it is a UDP echo request (port 7) to us. The stack itself answers ARP and
/// pings; this is the rest of what `netecho` (and `hotplug ip=`) serve.
pub fn udp_echo(st: &mut Stack, nf: &mut NetFront, ev: Event<'_>) {
    if let Event::Udp(u) = ev
        && u.dport == ECHO_PORT
        && u.dst == st.ip
    {
        st.send_udp(nf, u.src_mac, u.src, ECHO_PORT, u.sport, u.payload);
    }
}

/// `netecho ip=A.B.C.D`: answers ARP, pings and UDP echo (port 7) until the toolstack asks for a
/// shutdown (a store watch, seen busy or idle). Idle, it sleeps until a frame or the watch.
pub fn netecho(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let Some(mut net) = Net::connect(cpu, si, cmdline) else {
        return 1;
    };
    // Returns only when a ring broke.
    while !net.broken() {
        let _ = net.run_until::<()>(None, |st, nf, ev| {
            udp_echo(st, nf, ev);
            None
        });
    }
    1
}

fn ping_payload(seq: u16) -> [u8; PING_PAYLOAD] {
    core::array::from_fn(|i| (i as u8).wrapping_mul(7).wrapping_add(seq as u8) ^ 0xa5)
}

/// `ping <dst> ip=A.B.C.D [count=N]`: N echo requests 100 ms apart, 1 s timeout each, checking
/// each reply's payload. Exit 0 iff every one was answered.
pub fn ping(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let (Some(dst), Some(count)) = (dst_arg(cpu, cmdline), num(cmdline, "count", 5)) else {
        return 1;
    };
    let Some(mut net) = Net::connect(cpu, si, cmdline) else {
        return 1;
    };
    let (mut sent, mut received) = (0u64, 0u64);
    for seq in 1..=count.min(u64::from(u16::MAX)) as u16 {
        let t0 = rdtsc();
        let timeout = t0 + net.ms(1000);
        // Every attempt counts as sent, as with ping(8): an unanswered ARP request loses it.
        sent += 1;
        let payload = ping_payload(seq);
        let req = Echo {
            ty: 8,
            id: PING_ID,
            seq,
            payload: &payload,
        };
        let got = match net.resolve_by(dst, timeout) {
            Some(mac) if net.st.send_echo(&mut net.nf, mac, dst, &req) => {
                net.nf.flush();
                net.run_until(Some(timeout), |_, _, ev| match ev {
                    Event::EchoReply {
                        src,
                        id,
                        seq: s,
                        payload: p,
                    } if src == dst && id == PING_ID && s == seq => {
                        Some((p == payload, p.len(), rdtsc()))
                    }
                    _ => None,
                })
            }
            _ => None,
        };
        match got {
            Some((true, len, t1)) => {
                received += 1;
                kprintln!(
                    cpu,
                    "ping: reply from {} seq={seq} bytes={} time={}us",
                    ShowIp(dst),
                    len + 8,
                    net.us_of(t1 - t0)
                );
            }
            Some((false, ..)) => {
                kprintln!(cpu, "ping: corrupt reply from {} seq={seq}", ShowIp(dst))
            }
            None => {}
        }
        let next = t0 + net.ms(100);
        if rdtsc() < next {
            net.pause(net.us_of(next - rdtsc()) / 1000);
        }
    }
    kprintln!(cpu, "ping: {sent} sent, {received} received");
    u32::from(received != count)
}

/// Payload size of udpcheck datagram `seq`: the edge cases first, then a spread of odd and even
/// sizes over 1..=1472.
fn udpcheck_size(seq: u64) -> usize {
    const FIRST: [usize; 12] = [1, 18, 1472, 2, 17, 19, 63, 511, 512, 513, 1471, 1001];
    match FIRST.get(seq as usize) {
        Some(&s) => s,
        None => 1 + (seq as usize * 337 + 11) % MAX_UDP_PAYLOAD,
    }
}

fn udpcheck_byte(seq: u64, j: usize) -> u8 {
    (seq as u8).wrapping_mul(131) ^ (j as u8).wrapping_mul(7) ^ ((j >> 8) as u8).wrapping_mul(13)
}

/// `udpcheck <dst> ip=A.B.C.D [count=N] [secs=S]`: N datagrams (or as many as S seconds allow)
/// of varied sizes to the echo port, each waited for (1 s, one retry) and compared byte for
/// byte. Exit 0 iff all came back intact.
pub fn udpcheck(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let deadline = crate::control::secs_deadline(cmdline);
    let (Some(dst), Some(count)) = (dst_arg(cpu, cmdline), num(cmdline, "count", 64)) else {
        return 1;
    };
    let count = if deadline.is_some() { u64::MAX } else { count };
    let Some(mut net) = Net::connect(cpu, si, cmdline) else {
        return 1;
    };
    let (mut ok, mut bad, mut lost) = (0u64, 0u64, 0u64);
    let Some(mac) = net.resolve(dst) else {
        kprintln!(cpu, "udpcheck: no ARP reply from {}", ShowIp(dst));
        kprintln!(cpu, "udpcheck: 0 ok, 0 bad, {count} lost");
        return 1;
    };
    let mut payload = [0u8; MAX_UDP_PAYLOAD];
    let mut sent = 0u64;
    for seq in 0..count {
        if deadline.is_some_and(crate::control::past) {
            break;
        }
        sent += 1;
        let size = udpcheck_size(seq);
        for (j, b) in payload[..size].iter_mut().enumerate() {
            *b = udpcheck_byte(seq, j);
        }
        let want = &payload[..size];
        // A port per datagram: a late echo of an earlier one is told apart and ignored.
        let sport = 40000 + (seq % 20000) as u16;
        let mut outcome = None;
        for _ in 0..2 {
            net.st
                .send_udp(&mut net.nf, mac, dst, sport, ECHO_PORT, want);
            net.nf.flush();
            let deadline = rdtsc() + net.ms(1000);
            outcome = net.run_until(Some(deadline), |_, _, ev| match ev {
                Event::Udp(u) if u.src == dst && u.sport == ECHO_PORT && u.dport == sport => {
                    Some(u.payload == want)
                }
                _ => None,
            });
            if outcome.is_some() {
                break;
            }
        }
        match outcome {
            Some(true) => ok += 1,
            Some(false) => bad += 1,
            None => lost += 1,
        }
    }
    kprintln!(cpu, "udpcheck: {ok} ok, {bad} bad, {lost} lost");
    u32::from(ok != sent)
}

/// `udpsink ip=A.B.C.D [port=P] [secs=S]`: counts UDP datagrams to port P from the first one
/// until S seconds passed or none came for 1 s (or none at all came for 60 s).
pub fn udpsink(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let (Some(port), Some(secs)) = (num(cmdline, "port", 9), num(cmdline, "secs", 30)) else {
        kprintln!(cpu, "FAIL net-args: bad port= or secs=");
        return 1;
    };
    let port = port as u16;
    let Some(mut net) = Net::connect(cpu, si, cmdline) else {
        return 1;
    };
    kprintln!(cpu, "udpsink: ready");
    let ready = rdtsc();
    let (mut first, mut last) = (None::<u64>, 0u64);
    let (mut packets, mut bytes) = (0u64, 0u64);
    loop {
        // Done S seconds after the first datagram or 1 s after the last; 60 s without any.
        let done_at = match first {
            Some(t) => (t + net.ms(secs * 1000)).min(last + net.ms(1000)),
            None => ready + net.ms(60_000),
        };
        if rdtsc() >= done_at || net.broken() {
            break;
        }
        let was_first = first.is_none();
        // Back here at the first datagram (the deadline changes), else at the deadline: the
        // loop then looks again, `last` having moved on meanwhile.
        let _ = net.run_until::<()>(Some(done_at), |_, _, ev| {
            if let Event::Udp(u) = ev
                && u.dport == port
            {
                let t = rdtsc();
                first.get_or_insert(t);
                last = t;
                packets += 1;
                bytes += u.payload.len() as u64;
                if was_first {
                    return Some(());
                }
            }
            None
        });
    }
    let us = first.map_or(0, |t| net.us_of(last - t));
    kprintln!(cpu, "udpsink: {packets} packets {bytes} bytes in {us} us");
    0
}

/// `udpbench <dst> ip=A.B.C.D [port=P] [size=N] [secs=S] [csum=blank]`: sends N-byte datagrams
/// to P as fast as the ring takes them for S seconds. Every TX page holds the payload from the
/// start; per datagram only the 42 header bytes are written (the payload's checksum sum is
/// computed once). No RX is handled meanwhile, so nothing else writes the TX pages.
pub fn udpbench(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let args = (
        dst_arg(cpu, cmdline),
        num(cmdline, "port", 9),
        num(cmdline, "size", MAX_UDP_PAYLOAD as u64),
        num(cmdline, "secs", 5),
    );
    let (Some(dst), Some(port), Some(size), Some(secs)) = args else {
        kprintln!(cpu, "FAIL net-args: bad port=, size= or secs=");
        return 1;
    };
    let size = (size as usize).clamp(1, MAX_UDP_PAYLOAD);
    let blank = arg(cmdline, "csum") == Some("blank");
    let Some(mut net) = Net::connect(cpu, si, cmdline) else {
        return 1;
    };
    let Some(dst_mac) = net.resolve(dst) else {
        kprintln!(cpu, "udpbench: no ARP reply from {}", ShowIp(dst));
        return 1;
    };
    // Every page off the ring before the payload goes in.
    let idle_by = rdtsc() + net.ms(1000);
    while net.nf.tx_in_flight() > 0 && rdtsc() < idle_by {
        net.nf.reclaim();
        net.nf.sleep(cpu, 1_000_000, net.nf.tx_in_flight());
    }
    if net.nf.tx_in_flight() > 0 {
        kprintln!(cpu, "udpbench: TX ring never drained");
        return 1;
    }
    let payload: [u8; MAX_UDP_PAYLOAD] = core::array::from_fn(|j| j as u8);
    let payload = &payload[..size];
    for page in 0..TX_PAGES as u16 {
        net.nf.tx_write(page, UDP_HDRS, payload);
    }
    let flow = Flow {
        src_mac: net.nf.mac,
        dst_mac,
        src: net.st.ip,
        dst,
        sport: 40009,
        dport: port as u16,
    };
    let (csum, flags) = if blank {
        (UdpCsum::Blank, NetTxFlags::CSUM_BLANK)
    } else {
        (UdpCsum::Full(sum(0, payload)), NetTxFlags::empty())
    };
    let frame_len = (UDP_HDRS + size).max(MIN_FRAME);
    let errors0 = net.nf.stats.tx_errors + net.nf.stats.tx_bad;
    let spin = SPIN_US * net.khz / 1000 * 2 / 3;
    let mut hdr = [0u8; UDP_HDRS];
    let mut sent = 0u64;
    let start = rdtsc();
    let end = start + net.ms(secs * 1000);
    loop {
        net.nf.reclaim();
        let mut pushed = 0;
        while pushed < 64 {
            let Some(page) = net.nf.tx_alloc() else { break };
            let id = net.st.next_ip_id();
            write_udp_headers(&mut hdr, &flow, id, size, csum);
            net.nf.tx_write(page, 0, &hdr);
            if !net.nf.tx_push(page, frame_len, flags) {
                break;
            }
            pushed += 1;
        }
        sent += pushed;
        net.nf.flush();
        let now = rdtsc();
        if now >= end || net.broken() {
            break;
        }
        if pushed == 0 {
            // Ring full: spin a little for completions, then sleep for half of what is in flight.
            while rdtsc() - now < spin && !net.nf.tx_pending() {
                core::hint::spin_loop();
            }
            if !net.nf.tx_pending() {
                let half = (net.nf.tx_in_flight() / 2).max(1);
                net.nf.sleep(cpu, 10_000_000, half);
            }
        }
    }
    // Wait (up to a second) for the last responses, so that errors are counted.
    let drain_by = rdtsc() + net.ms(1000);
    while net.nf.tx_in_flight() > 0 && rdtsc() < drain_by && !net.broken() {
        net.nf.reclaim();
        if net.nf.tx_in_flight() > 0 {
            net.nf.sleep(cpu, 10_000_000, net.nf.tx_in_flight());
        }
    }
    let us = net.us_of(rdtsc() - start);
    let errors =
        net.nf.stats.tx_errors + net.nf.stats.tx_bad - errors0 + u64::from(net.nf.tx_in_flight());
    kprintln!(
        cpu,
        "udpbench: sent {sent} packets {} bytes in {us} us errors {errors}",
        sent * size as u64
    );
    0
}

/// `nethostile ip=A.B.C.D`: malformed TX requests, each followed by a good frame; then a
/// scribbled TX `req_prod`. Exit 0 (surviving is the back end's part).
pub fn nethostile(cpu: &Cpu, si: &StartInfo, cmdline: &str) -> u32 {
    let deadline = crate::control::secs_deadline(cmdline);
    let Some(mut net) = Net::connect(cpu, si, cmdline) else {
        return 1;
    };
    let mut good_seq = 0u8;
    // A UDP broadcast to the discard port: a frame the back end must still take.
    let mut good = |net: &mut Net<'_>| {
        good_seq += 1;
        let msg = [b'g', b'o', b'o', b'd', b' ', b'0' + good_seq];
        let bcast = net.st.subnet_broadcast();
        net.st.send_udp(&mut net.nf, BROADCAST, bcast, 9, 9, &msg);
        net.nf.flush();
    };
    // A TX page holding a well-formed frame (only the request describing it is wrong).
    let page = |net: &mut Net<'_>| -> Option<u16> {
        let p = net.nf.tx_alloc()?;
        let mut frame = [0u8; MIN_FRAME];
        let flow = Flow {
            src_mac: net.nf.mac,
            dst_mac: BROADCAST,
            src: net.st.ip,
            dst: net.st.subnet_broadcast(),
            sport: 9,
            dport: 9,
        };
        let id = net.st.next_ip_id();
        crate::net::build_udp(&mut frame, &flow, id, b"garbage", false)?;
        net.nf.tx_write(p, 0, &frame);
        Some(p)
    };
    let req = |gref: u32, offset: u16, flags: NetTxFlags, id: u16, size: u16| NetifTxRequestRaw {
        gref,
        offset,
        flags: flags.bits(),
        id,
        size,
    };
    let more = NetTxFlags::MORE_DATA;
    let none = NetTxFlags::empty();
    let mut pushed = true;
    // One round of garbage; with `secs=`, rounds (5 ms apart) until the time is up.
    let mut rounds = 0u64;
    loop {
        rounds += 1;

        // A grant reference nobody granted.
        if let Some(p) = page(&mut net) {
            pushed &= net.nf.push_raw(&req(9999, 0, none, p, 60), Some(p));
        }
        good(&mut net);
        // Shorter than an Ethernet header.
        if let Some(p) = page(&mut net) {
            pushed &= net
                .nf
                .push_raw(&req(net.nf.tx_gref(p), 0, none, p, 10), Some(p));
        }
        good(&mut net);
        // Past the end of its page.
        if let Some(p) = page(&mut net) {
            pushed &= net
                .nf
                .push_raw(&req(net.nf.tx_gref(p), 4000, none, p, 200), Some(p));
        }
        good(&mut net);
        // A second slot larger than the whole frame's size.
        if let (Some(a), Some(b)) = (page(&mut net), page(&mut net)) {
            pushed &= net
                .nf
                .push_raw(&req(net.nf.tx_gref(a), 0, more, a, 100), Some(a));
            pushed &= net
                .nf
                .push_raw(&req(net.nf.tx_gref(b), 0, none, b, 200), Some(b));
        }
        good(&mut net);
        // A chain of 19 slots (18 is the most).
        for i in 0..19u16 {
            let Some(p) = page(&mut net) else { break };
            let (flags, size) = match i {
                0 => (more, 1900),
                18 => (none, 100),
                _ => (more, 100),
            };
            pushed &= net
                .nf
                .push_raw(&req(net.nf.tx_gref(p), 0, flags, p, size), Some(p));
        }
        good(&mut net);
        // A page granted to domain 7, not to dom0.
        if let Some(p) = page(&mut net) {
            let gref = net.nf.grant_spare(p, 7);
            pushed &= net.nf.push_raw(&req(gref, 0, none, p, 60), Some(p));
        }
        good(&mut net);
        if deadline.is_none_or(crate::control::past) {
            break;
        }
        net.pause(5);
    }
    if !pushed {
        kprintln!(cpu, "nethostile: TX ring refused some garbage");
    }
    kprintln!(cpu, "nethostile: garbage sent ({rounds} rounds)");
    net.pause(200);
    net.nf.scribble_tx_req_prod(100_000);
    kprintln!(cpu, "nethostile: ring scribbled");
    0
}
