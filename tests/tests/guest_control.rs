//! The guest's side of the toolstack: shutdown requests through `control/shutdown`, console
//! input, and disks and network interfaces attached and detached while the guest runs (the
//! `idle` and `hotplug` jobs), driven here through the hypervisor and dom0 APIs directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dom0::disk::Disk;
use dom0::switch::Switch;
use dom0::vbd::{Vbd, state};
use dom0::vif::Vif;
use hypervisor::{Domain, DomainConfig, DomainState, Hypervisor};
use pv_protocol::blkif::verify_pattern;
use pv_protocol::grant::GrantRef;
use pv_protocol::hypercall::ShutdownReason;
use splitvisor_tests::{domain, hypervisor};

const T: Duration = Duration::from_secs(30);

fn wait_for(dom: &Domain, needle: &str) {
    assert!(
        dom.console().wait_for(needle, T),
        "no {needle:?} in:\n{}",
        dom.console().text()
    );
}

/// Waits until `needle` appears `n` times on the console.
fn wait_for_count(dom: &Domain, needle: &str, n: usize) {
    let t = Instant::now();
    while dom.console().text().matches(needle).count() < n {
        assert!(
            t.elapsed() < T,
            "{needle:?} not seen {n} times:\n{}",
            dom.console().text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn request_shutdown(hv: &Hypervisor, dom: &Domain, what: &str) {
    let key = format!("/local/domain/{}/control/shutdown", dom.id());
    hv.store().write(0, 0, &key, what.as_bytes()).unwrap();
}

/// Asks `dom` to shut down with `what` and checks it did so promptly, with `reason` and exit
/// code 0, after acknowledging (the key reads empty) and saying so.
fn shuts_down_on_request(hv: &Hypervisor, dom: &Domain, what: &str, reason: ShutdownReason) {
    let t = Instant::now();
    request_shutdown(hv, dom, what);
    let st = dom.wait(T);
    let text = dom.console().text();
    assert_eq!(st, DomainState::Shutdown { reason, code: 0 }, "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        text.contains(&format!("guest: shutdown requested ({what})\n")),
        "{text}"
    );
    let key = format!("/local/domain/{}/control/shutdown", dom.id());
    assert_eq!(
        hv.store().read(0, 0, &key).unwrap(),
        b"",
        "not acknowledged"
    );
}

#[test]
fn idle_guest_powers_off_on_request_and_echoes_console_input() {
    let hv = hypervisor();
    let dom = domain(&hv, "idle", "idle");
    wait_for(&dom, "idle: up");

    // Lines end at \r, \n or \r\n; bytes outside printable ASCII show as '?'.
    assert_eq!(dom.console().send_input(b"hello world\r"), 12);
    wait_for(&dom, "console: hello world\n");
    dom.console().send_input(b"a\x07b\x1b[A\r\nsecond line\n\n");
    wait_for(&dom, "console: second line\n");
    wait_for_count(&dom, "console: ", 4);
    let text = dom.console().text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("console: "))
        .collect();
    assert_eq!(
        lines,
        [
            "console: hello world",
            "console: a?b?[A",
            "console: second line",
            "console: ",
        ],
        "{text}"
    );
    // More input than the 1 KiB ring holds at once arrives whole, in order.
    let long: String = (0..300).map(|i| format!("line {i}\n")).collect();
    assert_eq!(dom.console().send_input(long.as_bytes()), long.len());
    wait_for(&dom, "console: line 299\n");
    let text = dom.console().text();
    for i in 0..300 {
        assert!(text.contains(&format!("console: line {i}\n")), "line {i}");
    }

    // An unknown request is reported, not acknowledged, and changes nothing.
    request_shutdown(&hv, &dom, "suspend");
    wait_for(&dom, "guest: shutdown request ignored (suspend)");
    let key = format!("/local/domain/{}/control/shutdown", dom.id());
    assert_eq!(hv.store().read(0, 0, &key).unwrap(), b"suspend");
    assert!(!dom.state().is_final());

    shuts_down_on_request(&hv, &dom, "poweroff", ShutdownReason::Poweroff);
}

#[test]
fn an_idle_domain_in_16_mib_stays_up_idles_for_free_and_powers_off_on_request() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "small".into(),
            mem_mib: 16,
            cmdline: "idle".into(),
            ..Default::default()
        })
        .unwrap();
    wait_for(&dom, "idle: up");
    // It runs inside its memory: an access outside would crash it (and, before, was answered
    // by the VMM over and over, a host core busy with one idle domain).
    std::thread::sleep(Duration::from_millis(200));
    let used = cpu_per_second(&dom, Duration::from_secs(1));
    assert_eq!(
        dom.state(),
        DomainState::Running,
        "{}",
        dom.console().text()
    );
    assert!(
        used < Duration::from_millis(1),
        "idle at 16 MiB: {used:?}/s"
    );
    dom.console().send_input(b"still here\n");
    wait_for(&dom, "console: still here\n");
    shuts_down_on_request(&hv, &dom, "poweroff", ShutdownReason::Poweroff);
}

/// CPU time of `dom`'s vCPU threads over `window`, per second.
fn cpu_per_second(dom: &Domain, window: Duration) -> Duration {
    let before = dom.shared().cpu_time();
    std::thread::sleep(window);
    (dom.shared().cpu_time() - before).div_f64(window.as_secs_f64())
}

#[test]
fn an_idle_domain_costs_its_host_almost_no_cpu() {
    let hv = hypervisor();
    let dom = domain(&hv, "idle", "idle");
    wait_for(&dom, "idle: up");
    // Settled: what boot left (console output, the first watch event) is done.
    std::thread::sleep(Duration::from_millis(200));
    let used = cpu_per_second(&dom, Duration::from_secs(3));
    println!("idle vCPU: {used:?} of CPU per second");
    // Asleep in the hypervisor with nothing to wake it: no periodic store reads, no timer.
    // (Before, it woke every 50 ms for a store read: ~10 ms per second here.)
    assert!(
        used < Duration::from_millis(1),
        "an idle vCPU used {used:?} of CPU per second"
    );
    assert!(dom.shared().is_blocked(), "the idle vCPU is not asleep");
    // And it still wakes for what matters.
    dom.console().send_input(b"wake\n");
    wait_for(&dom, "console: wake\n");
    shuts_down_on_request(&hv, &dom, "poweroff", ShutdownReason::Poweroff);
}

#[test]
fn a_guest_timer_fires_after_the_asked_delay_and_not_before() {
    let hv = hypervisor();
    let dom = domain(&hv, "timer", "timer ms=150");
    let st = dom.wait(T);
    let text = dom.console().text();
    assert_eq!(
        st,
        DomainState::Shutdown {
            reason: ShutdownReason::Poweroff,
            code: 0
        },
        "{text}"
    );
    // Each wake-up, by the guest's TSC: at least the delay asked, and not far beyond it.
    for how in ["poll", "block"] {
        let us: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("timer: {how} woke after ")))
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {how} line:\n{text}"));
        assert!((150_000..400_000).contains(&us), "{how}: {us} us\n{text}");
    }
    for check in [
        "timer-bind-twice-eexist",
        "timer-bind-no-vcpu-enoent",
        "timer-other-vcpu-einval",
        "timer-absurd-einval",
        "timer-past-etime",
        "timer-unbound-enoent",
        "timer-stop-and-replace",
    ] {
        assert!(
            text.contains(&format!("PASS {check}\n")),
            "{check}:\n{text}"
        );
    }
    // A misbehaving timer request is the guest's fault, counted (and logged once).
    assert!(dom.shared().fault_count("bad-timer") >= 4);
}

#[test]
fn ticker_reboots_and_idle_halts_on_request() {
    let hv = hypervisor();
    let ticker = domain(&hv, "ticker", "ticker");
    wait_for(&ticker, "tick 100");
    shuts_down_on_request(&hv, &ticker, "reboot", ShutdownReason::Reboot);
    // `halt` is a power-off.
    let idle = domain(&hv, "idle", "idle");
    wait_for(&idle, "idle: up");
    shuts_down_on_request(&hv, &idle, "halt", ShutdownReason::Poweroff);
}

#[test]
fn netecho_powers_off_on_request() {
    let hv = hypervisor();
    let sw = Arc::new(Switch::new("br-ctl").unwrap());
    let dom = domain(&hv, "echo", "netecho ip=10.0.6.1");
    let _vif = Vif::attach(hv.store(), dom.shared(), 0, None, &sw).unwrap();
    wait_for(&dom, "connected");
    shuts_down_on_request(&hv, &dom, "poweroff", ShutdownReason::Poweroff);
}

/// Whether the guest's grant `gref` can still be mapped by dom0.
fn granted(dom: &Domain, gref: u32) -> bool {
    hypervisor::grant::map(dom.shared(), GrantRef(gref), 0, true).is_ok()
}

/// The first 4 KiB of `img`, checked to hold the hotplug I/O check's pattern: `verify_pattern`
/// XOR one seed byte, which it returns.
fn check_pattern(img: &std::path::Path) -> u8 {
    let data = std::fs::read(img).unwrap();
    let seed = data[0] ^ verify_pattern(0);
    for (i, &b) in data[..4096].iter().enumerate() {
        assert_eq!(b, verify_pattern(i as u64) ^ seed, "byte {i}");
    }
    seed
}

/// Drops (detaches) `dev`, checking that the guest released it within dom0's 2 s grace period
/// and returning how long it took.
fn detach<D>(dev: D) -> Duration {
    let t = Instant::now();
    drop(dev);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(1900),
        "detach waited {took:?}: the guest did not release the device"
    );
    took
}

#[test]
fn hotplugged_disks_connect_do_io_release_and_come_back() {
    let dir = std::env::temp_dir().join(format!("sv-hotplug-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (img, ro_img) = (dir.join("xvda.img"), dir.join("xvdb.img"));
    Disk::create_sparse(&img, 4 << 20).unwrap();
    Disk::create_sparse(&ro_img, 1 << 20).unwrap();
    let mut ro_data = std::fs::read(&ro_img).unwrap();
    ro_data[..4096].fill(0x77);
    std::fs::write(&ro_img, &ro_data).unwrap();

    let hv = hypervisor();
    let dom = domain(&hv, "hp", "hotplug");
    wait_for(&dom, "hotplug: watching");

    // Attach: connected, the I/O check passes and really wrote the disk.
    let vbd = Vbd::attach(hv.store(), dom.shared(), 51712, &img, false).unwrap();
    wait_for(&dom, "hotplug: vbd 51712 connected 8192 sectors\n");
    wait_for(&dom, "hotplug: vbd 51712 io ok\n");
    assert_eq!(vbd.frontend_state(), Some(state::CONNECTED));
    let seed1 = check_pattern(&img);
    // Slot 0's ring and data pages (grant refs 8192, 8193) are granted while connected.
    assert!(granted(&dom, 8192) && granted(&dom, 8193));

    // A read-only disk next to it: only read, its contents untouched.
    let ro = Vbd::attach(hv.store(), dom.shared(), 51728, &ro_img, true).unwrap();
    wait_for(&dom, "hotplug: vbd 51728 connected 2048 sectors\n");
    wait_for(&dom, "hotplug: vbd 51728 io ok\n");
    assert_eq!(std::fs::read(&ro_img).unwrap(), ro_data);

    // Detach: the guest releases it within the grace period and says Closed; its grants end.
    detach(vbd);
    wait_for(&dom, "hotplug: vbd 51712 released\n");
    assert!(!granted(&dom, 8192) && !granted(&dom, 8193));
    let fe_state = format!("/local/domain/{}/device/vbd/51712/state", dom.id());
    assert_eq!(hv.store().read(0, 0, &fe_state).unwrap(), b"6");
    // The other disk is unaffected.
    assert_eq!(ro.frontend_state(), Some(state::CONNECTED));

    // The same device id comes back: connected again, with a fresh pattern.
    let vbd = Vbd::attach(hv.store(), dom.shared(), 51712, &img, false).unwrap();
    wait_for_count(&dom, "hotplug: vbd 51712 io ok\n", 2);
    let seed2 = check_pattern(&img);
    assert_ne!(seed1, seed2, "the second check wrote its own pattern");

    // A back end that vanishes without saying Closing first is released as well.
    let be = format!("/local/domain/0/backend/vbd/{}/51712", dom.id());
    hv.store().rm(0, 0, &be).unwrap();
    wait_for_count(&dom, "hotplug: vbd 51712 released\n", 2);
    drop(vbd);
    detach(ro);
    wait_for(&dom, "hotplug: vbd 51728 released\n");

    let text = dom.console().text();
    assert!(!text.contains("FAILED"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
    shuts_down_on_request(&hv, &dom, "poweroff", ShutdownReason::Poweroff);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hotplugged_vif_answers_ping_and_udp_and_can_be_replugged() {
    let hv = hypervisor();
    let sw = Arc::new(Switch::new("br-hp").unwrap());
    let dom = domain(&hv, "hp", "hotplug ip=10.0.7.1");
    wait_for(&dom, "hotplug: watching");

    let vif = Vif::attach(hv.store(), dom.shared(), 0, None, &sw).unwrap();
    wait_for(
        &dom,
        &format!("hotplug: vif 0 connected mac {}\n", vif.mac()),
    );

    let peer = |name: &str, cmdline: &str, want: &str| {
        let d = domain(&hv, name, cmdline);
        let v = Vif::attach(hv.store(), d.shared(), 0, None, &sw).unwrap();
        let st = d.wait(T);
        let text = d.console().text();
        assert!(
            matches!(st, DomainState::Shutdown { code: 0, .. }),
            "{st:?}\n{text}"
        );
        assert!(text.contains(want), "{text}");
        drop(d);
        drop(v);
    };
    peer(
        "ping",
        "ping 10.0.7.1 ip=10.0.7.2 count=3",
        "ping: 3 sent, 3 received",
    );
    peer(
        "udp",
        "udpcheck 10.0.7.1 ip=10.0.7.3 count=16",
        "udpcheck: 16 ok, 0 bad, 0 lost",
    );

    // Detach: released promptly, every grant of its slot (refs 2048..) ended.
    assert!(granted(&dom, 2048) && granted(&dom, 2048 + 2));
    detach(vif);
    wait_for(&dom, "hotplug: vif 0 released\n");
    assert!((2048..2048 + 386).all(|g| !granted(&dom, g)));

    // Plugged again (a new MAC): connected and answering again.
    let vif = Vif::attach(hv.store(), dom.shared(), 0, None, &sw).unwrap();
    wait_for(
        &dom,
        &format!("hotplug: vif 0 connected mac {}\n", vif.mac()),
    );
    peer(
        "ping2",
        "ping 10.0.7.1 ip=10.0.7.4 count=2",
        "ping: 2 sent, 2 received",
    );
    detach(vif);
    wait_for_count(&dom, "hotplug: vif 0 released\n", 2);

    let text = dom.console().text();
    assert!(!text.contains("FAILED"), "{text}");
    assert!(!text.contains("leaked"), "{text}");
    shuts_down_on_request(&hv, &dom, "reboot", ShutdownReason::Reboot);
}
