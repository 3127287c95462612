//! `netbench`: guest-to-guest UDP through netback and the virtual switch, against the same
//! traffic between two network namespaces over a veth pair, in the same run.
//!
//! Both sides send UDP datagrams of the same payload size as fast as they can for the same time
//! and count what the receiver got: 18-byte payloads (64-byte Ethernet frames with FCS) and
//! 1472-byte payloads (1500-byte IP packets). The veth side is the host kernel's own path:
//! `sendmmsg` in one namespace, `recvmmsg` in the other. The guest side is two domains on one
//! switch: `udpbench` sending, `udpsink` counting.
//!
//! Each round runs veth, then the guests, for each size; the table shows medians over
//! `--rounds` rounds (default 5) and the range of the per-round ratios.
//!
//! Usage: `netbench [--seconds S] [--rounds R] [--out FILE]` (needs root and iproute2).

use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dom0::switch::Switch;
use dom0::vif::Vif;
use hypervisor::{DomainConfig, Hypervisor};
use splitvisor_tools::results::{median, range};

/// UDP payload sizes measured: 64-byte and 1500-byte frames.
const SIZES: [(usize, &str); 2] = [(18, "64-byte frames"), (1472, "1500-byte frames")];
/// Ethernet + IPv4 + UDP headers (frame bytes = payload + this; FCS not counted).
const HEADERS: usize = 42;
/// Datagrams per sendmmsg/recvmmsg call.
const BATCH: usize = 64;

/// Received packets and the time they took.
#[derive(Debug, Clone, Copy)]
struct Figure {
    packets: u64,
    secs: f64,
    sent: u64,
}

impl Figure {
    fn pps(&self) -> f64 {
        self.packets as f64 / self.secs
    }

    fn gbps(&self, payload: usize) -> f64 {
        self.pps() * ((payload + HEADERS) * 8) as f64 / 1e9
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Two namespaces joined by a veth pair, 10.77.0.1 (a) and 10.77.0.2 (b); removed on drop.
struct VethPair {
    a: String,
    b: String,
}

impl VethPair {
    fn new() -> Result<Self, String> {
        let id = std::process::id();
        let p = Self {
            a: format!("nb-{id}-a"),
            b: format!("nb-{id}-b"),
        };
        sh(&["ip", "netns", "add", &p.a])?;
        sh(&["ip", "netns", "add", &p.b])?;
        sh(&[
            "ip", "link", "add", "nbva", "netns", &p.a, "type", "veth", "peer", "name", "nbvb",
            "netns", &p.b,
        ])?;
        for (ns, dev, ip) in [
            (&p.a, "nbva", "10.77.0.1/24"),
            (&p.b, "nbvb", "10.77.0.2/24"),
        ] {
            sh(&["ip", "-n", ns, "addr", "add", ip, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(p)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn enter(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("{ns}: {e}"))?;
    // SAFETY: setns on a namespace file we opened; it moves only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The kernel's path: `seconds` of sendmmsg from a to b over the veth pair.
fn veth(pair: &VethPair, payload: usize, seconds: u32) -> Result<Figure, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (ns, stop, ready) = (pair.b.clone(), Arc::clone(&stop), Arc::clone(&ready));
        std::thread::spawn(move || -> Result<(u64, f64), String> {
            enter(&ns)?;
            let s = std::net::UdpSocket::bind("10.77.0.2:9").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .map_err(|e| e.to_string())?;
            ready.store(true, Ordering::Release);
            let mut bufs = vec![[0u8; 2048]; BATCH];
            let mut iovs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
            for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            let (mut n, mut first, mut last) = (0u64, None, Instant::now());
            while !stop.load(Ordering::Acquire) {
                // SAFETY: `msgs` points at `iovs` and `bufs`, all alive for the call.
                let r = unsafe {
                    libc::recvmmsg(
                        s.as_raw_fd(),
                        msgs.as_mut_ptr(),
                        BATCH as u32,
                        0,
                        std::ptr::null_mut(),
                    )
                };
                if r > 0 {
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                    n += r as u64;
                }
            }
            let secs = first.map_or(1.0, |f| last.duration_since(f).as_secs_f64());
            Ok((n, secs))
        })
    };
    while !ready.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let sender = {
        let ns = pair.a.clone();
        std::thread::spawn(move || -> Result<u64, String> {
            enter(&ns)?;
            let s = std::net::UdpSocket::bind("10.77.0.1:0").map_err(|e| e.to_string())?;
            s.connect("10.77.0.2:9").map_err(|e| e.to_string())?;
            let payload = vec![0x5au8; payload];
            let mut iov = libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            };
            // SAFETY: as above.
            let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
            for m in &mut msgs {
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
            }
            let end = Instant::now() + Duration::from_secs(u64::from(seconds));
            let mut sent = 0u64;
            while Instant::now() < end {
                // SAFETY: every header points at `iov`, which points at `payload`; all alive.
                let r =
                    unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
                if r > 0 {
                    sent += r as u64;
                }
            }
            Ok(sent)
        })
    };
    let sent = sender.join().map_err(|_| "sender panicked")??;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let (packets, secs) = receiver.join().map_err(|_| "receiver panicked")??;
    Ok(Figure {
        packets,
        secs,
        sent,
    })
}

fn number_after(text: &str, prefix: &str, key: &str) -> Option<u64> {
    // The last such line: `udpsink: ready` comes before the figures.
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with(prefix) && l.contains(" packets "))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if let Some(v) = words.clone().next().filter(|_| w == key) {
            return v.parse().ok();
        }
    }
    None
}

/// Two guests on one switch: `udpbench` in one, `udpsink` in the other.
fn guests(hv: &Hypervisor, payload: usize, seconds: u32) -> Result<Figure, String> {
    let sw = Arc::new(Switch::new("bench").map_err(|e| e.to_string())?);
    let cfg = |name: &str, cmdline: String| DomainConfig {
        name: name.into(),
        cmdline,
        ..Default::default()
    };
    let sink = hv
        .create_domain(cfg(
            "sink",
            format!("udpsink ip=10.0.0.2 port=9 secs={}", seconds + 5),
        ))
        .map_err(|e| format!("create: {e}"))?;
    let vs = Vif::attach(hv.store(), sink.shared(), 0, None, &sw).map_err(|e| e.to_string())?;
    if !sink
        .console()
        .wait_for("udpsink: ready", Duration::from_secs(20))
    {
        return Err(format!("sink never ready:\n{}", sink.console().text()));
    }
    let src = hv
        .create_domain(cfg(
            "source",
            format!("udpbench 10.0.0.2 ip=10.0.0.1 port=9 size={payload} secs={seconds}"),
        ))
        .map_err(|e| format!("create: {e}"))?;
    let vb = Vif::attach(hv.store(), src.shared(), 0, None, &sw).map_err(|e| e.to_string())?;
    let limit = Duration::from_secs(u64::from(seconds) + 60);
    let (s1, s2) = (src.wait(limit), sink.wait(limit));
    let (t_src, t_sink) = (src.console().text(), sink.console().text());
    drop((vb, vs));
    if !s1.is_final() || !s2.is_final() {
        return Err(format!("guests did not finish:\n{t_src}\n{t_sink}"));
    }
    let packets = number_after(&t_sink, "udpsink:", "udpsink:")
        .ok_or_else(|| format!("no udpsink line:\n{t_sink}"))?;
    let us = number_after(&t_sink, "udpsink:", "in").ok_or("no udpsink time")?;
    let sent = number_after(&t_src, "udpbench:", "sent").unwrap_or(0);
    let errors = number_after(&t_src, "udpbench:", "errors").unwrap_or(0);
    if errors > 0 {
        return Err(format!("the sender saw {errors} errors:\n{t_src}"));
    }
    Ok(Figure {
        packets,
        secs: us as f64 / 1e6,
        sent,
    })
}

fn run() -> Result<(), String> {
    let mut seconds = 5u32;
    let mut rounds = 5u32;
    let mut out = "benchmarks/results/net.md".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = |n: &str| args.next().ok_or(format!("{n} needs a value"));
        match a.as_str() {
            "--seconds" => {
                seconds = v("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--rounds" => {
                rounds = v("--rounds")?
                    .parse::<u32>()
                    .map_err(|e| format!("--rounds: {e}"))?
                    .max(1)
            }
            "--out" => out = v("--out")?,
            "-h" | "--help" => {
                println!("usage: netbench [--seconds S] [--rounds R] [--out FILE]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    let hv = Hypervisor::new(guest_drivers::GUEST_KERNEL).map_err(|e| e.to_string())?;
    let pair = VethPair::new()?;
    // Rounds of (veth, guests) for each size: the host's speed drifts, so each guest run is
    // compared with the veth run just before it, and the table shows medians.
    let mut runs: Vec<Vec<(Figure, Figure)>> = vec![Vec::new(); SIZES.len()];
    for round in 0..rounds {
        for ((payload, label), r) in SIZES.iter().zip(&mut runs) {
            let v = veth(&pair, *payload, seconds)?;
            let g = guests(&hv, *payload, seconds)?;
            eprintln!(
                "netbench: round {round}, {label}: veth {:.0} kpps, guests {:.0} kpps -> {:.2}x",
                v.pps() / 1e3,
                g.pps() / 1e3,
                g.pps() / v.pps()
            );
            r.push((v, g));
        }
    }
    drop(pair);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# netbench: guest-to-guest UDP through netback and the switch vs two namespaces over veth\n"
    );
    let _ = writeln!(
        t,
        "{cores} cores, KVM {:?}; one UDP flow, {seconds} s per run, received packets counted at the receiver; Gbit/s of Ethernet frames without FCS (payload + 42 bytes); medians over {rounds} round(s) of a veth run then a guest run, the ratio range across rounds in the last-but-one column; `cargo run --release -p splitvisor-tools --bin netbench -- --seconds {seconds} --rounds {rounds}`.\n",
        hv.flavour()
    );
    let _ = writeln!(
        t,
        "| frames | veth (kpps) | veth (Gbit/s) | guests (kpps) | guests (Gbit/s) | guests / veth | ratio range | guest sender delivered |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for ((payload, label), r) in SIZES.iter().zip(&runs) {
        let col =
            |f: &dyn Fn(&(Figure, Figure)) -> f64| median(&r.iter().map(f).collect::<Vec<_>>());
        let ratios: Vec<f64> = r.iter().map(|(v, g)| g.pps() / v.pps()).collect();
        let (lo, hi) = range(&ratios);
        let _ = writeln!(
            t,
            "| {label} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2}x | {lo:.2}-{hi:.2}x | {:.0}% |",
            col(&|(v, _)| v.pps()) / 1e3,
            col(&|(v, _)| v.gbps(*payload)),
            col(&|(_, g)| g.pps()) / 1e3,
            col(&|(_, g)| g.gbps(*payload)),
            median(&ratios),
            col(&|(_, g)| 100.0 * g.packets as f64 / (g.sent.max(1)) as f64),
        );
    }
    let _ = writeln!(
        t,
        "\nTarget (issue 5): >= 1.0x veth for 1500-byte frames. \"delivered\": share of the guest sender's datagrams that reached the sink (the rest were dropped for want of posted receive buffers)."
    );
    splitvisor_tools::results::publish("netbench", &out, &t)
}

fn main() {
    splitvisor_tools::results::main("netbench", run);
}
