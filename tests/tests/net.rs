//! Networking end to end: real guests with netfront and a tiny IP stack, dom0's netback and
//! virtual switch, and the host's real network stack through a TAP uplink in a network
//! namespace the test creates (so nothing else on the machine is touched).

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dom0::switch::Switch;
use dom0::tap::{Tap, TapPort};
use dom0::vif::Vif;
use hypervisor::{Domain, DomainState, Hypervisor};
use splitvisor_tests::{domain, hypervisor, tool};

const T: Duration = Duration::from_secs(60);

fn plug(hv: &Hypervisor, dom: &Domain, switch: &Arc<Switch>) -> Vif {
    Vif::attach(hv.store(), dom.shared(), 0, None, switch).unwrap()
}

/// Waits for `dom` to end and returns its console, asserting it exited with `code`.
fn finished(dom: &Domain, code: u32) -> String {
    let state = dom.wait(T);
    let text = dom.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: c, .. } if c == code),
        "expected exit {code}, got {state:?}\n{text}"
    );
    text
}

fn connected(dom: &Domain) {
    assert!(
        dom.console().wait_for("connected", Duration::from_secs(20)),
        "{}",
        dom.console().text()
    );
}

#[test]
fn two_domains_on_one_switch_ping_and_exchange_udp() {
    let hv = hypervisor();
    let sw = Arc::new(Switch::new("br0").unwrap());
    let a = domain(&hv, "a", "netecho ip=10.0.0.1");
    let va = plug(&hv, &a, &sw);
    connected(&a);
    let b = domain(&hv, "b", "ping 10.0.0.1 ip=10.0.0.2 count=5");
    let vb = plug(&hv, &b, &sw);
    let text = finished(&b, 0);
    assert!(text.contains("ping: 5 sent, 5 received"), "{text}");
    assert_eq!(
        text.matches("ping: reply from 10.0.0.1 seq=").count(),
        5,
        "{text}"
    );
    drop(b);
    drop(vb);

    // UDP with content checks: sizes from 1 to 1472 bytes, every byte compared.
    let c = domain(&hv, "c", "udpcheck 10.0.0.1 ip=10.0.0.3 count=64");
    let vc = plug(&hv, &c, &sw);
    let text = finished(&c, 0);
    assert!(text.contains("udpcheck: 64 ok, 0 bad, 0 lost"), "{text}");
    drop(c);
    drop(vc);

    // The echo server's port carried all of it, and nothing was malformed.
    let s = va.counters().expect("a connected").snapshot();
    assert!(s.rx_packets >= 5 + 64 && s.tx_packets >= 5 + 64, "{s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
    assert!(!a.state().is_final(), "{:?}", a.state());
}

#[test]
fn ping_udp_echo_and_checks_run_in_domains_of_the_smallest_size() {
    use hypervisor::DomainConfig;
    use pv_protocol::start_info::MIN_MEM_MIB;
    let hv = hypervisor();
    let small = |name: &str, cmdline: &str| {
        hv.create_domain(DomainConfig {
            name: name.into(),
            mem_mib: MIN_MEM_MIB,
            cmdline: cmdline.into(),
            ..Default::default()
        })
        .unwrap()
    };
    let sw = Arc::new(Switch::new("br-small").unwrap());
    let a = small("a", "netecho ip=10.0.5.1");
    let _va = plug(&hv, &a, &sw);
    connected(&a);
    let b = small("b", "ping 10.0.5.1 ip=10.0.5.2 count=3");
    let _vb = plug(&hv, &b, &sw);
    let text = finished(&b, 0);
    assert!(text.contains("ping: 3 sent, 3 received"), "{text}");
    let c = small("c", "udpcheck 10.0.5.1 ip=10.0.5.3 count=32");
    let _vc = plug(&hv, &c, &sw);
    let text = finished(&c, 0);
    assert!(text.contains("udpcheck: 32 ok, 0 bad, 0 lost"), "{text}");
    assert_eq!(a.state(), DomainState::Running);
    // With no traffic the echo server sleeps until a frame or the toolstack wakes it.
    std::thread::sleep(Duration::from_millis(200));
    let before = a.shared().cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = a.shared().cpu_time() - before;
    assert!(
        used < Duration::from_millis(1),
        "idle netecho used {used:?} in 1 s"
    );
}

#[test]
fn domains_on_different_switches_cannot_reach_each_other() {
    let hv = hypervisor();
    let (s1, s2) = (
        Arc::new(Switch::new("net1").unwrap()),
        Arc::new(Switch::new("net2").unwrap()),
    );
    let a = domain(&hv, "a", "netecho ip=10.0.1.1");
    let _va = plug(&hv, &a, &s1);
    connected(&a);
    // Same subnet, other switch: nothing answers.
    let b = domain(&hv, "b", "ping 10.0.1.1 ip=10.0.1.2 count=2");
    let _vb = plug(&hv, &b, &s2);
    let text = finished(&b, 1);
    assert!(text.contains("ping: 2 sent, 0 received"), "{text}");
    // While a neighbour on the right switch gets through.
    let c = domain(&hv, "c", "ping 10.0.1.1 ip=10.0.1.3 count=2");
    let _vc = plug(&hv, &c, &s1);
    let text = finished(&c, 0);
    assert!(text.contains("ping: 2 sent, 2 received"), "{text}");
}

#[test]
fn a_hostile_front_end_is_dropped_and_counted_while_others_keep_talking() {
    let hv = hypervisor();
    let sw = Arc::new(Switch::new("br-h").unwrap());
    let a = domain(&hv, "a", "netecho ip=10.0.2.1");
    let _va = plug(&hv, &a, &sw);
    connected(&a);
    let h = domain(&hv, "h", "nethostile ip=10.0.2.9");
    let vh = plug(&hv, &h, &sw);
    let text = finished(&h, 0);
    assert!(text.contains("nethostile: ring scribbled"), "{text}");
    // Six kinds of garbage, each answered with an error and counted; the scribbled ring killed
    // the port (the switch dropped it), and only it.
    let s = vh.counters().expect("h connected").snapshot();
    assert!(s.errors >= 6, "{s:?}");
    let b = domain(&hv, "b", "ping 10.0.2.1 ip=10.0.2.2 count=3");
    let _vb = plug(&hv, &b, &sw);
    let text = finished(&b, 0);
    assert!(text.contains("ping: 3 sent, 3 received"), "{text}");
    let names: Vec<String> = sw.ports().unwrap().into_iter().map(|p| p.1).collect();
    assert!(
        !names.iter().any(|n| n == &format!("vif{}.0", h.id())),
        "{names:?}"
    );
}

/// A network namespace for the test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("sv-{}-{tag}", std::process::id());
        run(&["netns", "add", &name]);
        Self(name)
    }

    /// Runs `args` inside the namespace; `args[0]` comes from the Debian package `package`.
    fn exec(&self, package: &str, args: &[&str]) -> std::process::Output {
        drop(tool(args[0], package)); // fails the test, naming the package, if it is missing
        tool("ip", "iproute2")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `f` on a thread that has entered the namespace.
    fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                // SAFETY: setns on a namespace file we opened; it changes only this thread's
                // network namespace (a scoped thread that ends right after `f`).
                let r = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET)
                };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = tool("ip", "iproute2")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Runs `ip ARGS` (as root) and checks it succeeded.
fn run(args: &[&str]) {
    let out = tool("ip", "iproute2").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_host_pings_a_guest_and_echoes_udp_through_the_tap_uplink() {
    let hv = hypervisor();
    let ns = Netns::new("tap");
    let tap_name = format!("svt{}", std::process::id() % 100_000);
    let tap = Tap::create(&tap_name).expect("TAP device (needs root and /dev/net/tun)");
    // Move the host end into the namespace and give it an address there.
    run(&["link", "set", "dev", &tap_name, "netns", &ns.0]);
    for cmd in [
        vec!["ip", "addr", "add", "10.9.0.1/24", "dev", &tap_name],
        vec!["ip", "link", "set", "dev", &tap_name, "up"],
    ] {
        let out = ns.exec("iproute2", &cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sw = Arc::new(Switch::new("uplink").unwrap());
    sw.add_port(Box::new(TapPort::new(tap).unwrap())).unwrap();
    let g = domain(&hv, "g", "netecho ip=10.9.0.2");
    let vg = plug(&hv, &g, &sw);
    connected(&g);

    // The host's own ping, from inside the namespace.
    let out = ns.exec(
        "iputils-ping",
        &["ping", "-c", "3", "-W", "2", "-i", "0.2", "10.9.0.2"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 received"), "{text}");

    // A UDP socket of the host stack: datagrams echoed byte for byte by the guest.
    ns.enter(|| {
        let s = UdpSocket::bind("10.9.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for (i, len) in [1usize, 18, 100, 999, 1472].into_iter().enumerate() {
            let msg: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            s.send_to(&msg, "10.9.0.2:7").unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).expect("echo from the guest");
            assert_eq!(from.to_string(), "10.9.0.2:7");
            assert_eq!(&buf[..n], &msg[..], "datagram {i} of {len} bytes");
        }
    });
    let st = vg.counters().unwrap().snapshot();
    assert!(st.rx_packets >= 3 + 5 && st.errors == 0, "{st:?}");
    let t = Instant::now();
    drop(vg);
    drop(g);
    assert!(t.elapsed() < Duration::from_secs(5));
}
