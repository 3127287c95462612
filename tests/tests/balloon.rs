//! Ballooning with real guests: memory given back is really freed on the host (the domain's
//! memfd shrinks), taken back up to the maximum and no further, and a hostile balloon gets a
//! defined error for every rule it breaks, while the host and a neighbour are unharmed.

use std::time::{Duration, Instant};

use hypervisor::grant::{self, GrantError};
use hypervisor::reservation::{self, MemoryStats};
use hypervisor::{DomainConfig, DomainShared, DomainState, Hypervisor};
use pv_protocol::grant::GrantRef;
use splitvisor_tests::hypervisor;

const T: Duration = Duration::from_secs(60);
const MIB_PAGES: u64 = 256;

/// What `xl mem-set` does: caps the reservation at the target and tells the guest.
fn mem_set(hv: &Hypervisor, d: &DomainShared, mib: u64) {
    reservation::set_max_pages(d, mib * MIB_PAGES).unwrap();
    hv.store()
        .write(
            0,
            0,
            &format!("/local/domain/{}/memory/target", d.id),
            (mib * 1024).to_string().as_bytes(),
        )
        .unwrap();
}

fn wait_stats(d: &DomainShared, what: &str, ok: impl Fn(&MemoryStats) -> bool) -> MemoryStats {
    let end = Instant::now() + T;
    loop {
        let s = reservation::stats(d);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < end, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[test]
fn memory_given_back_is_freed_on_the_host_and_taken_back_up_to_maxmem() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "balloon".into(),
            mem_mib: 64,
            max_mem_mib: Some(96),
            cmdline: "balloon".into(),
            ..Default::default()
        })
        .unwrap();
    let d = dom.shared().clone();
    assert!(
        dom.console().wait_for("balloon: up", T),
        "{}",
        dom.console().text()
    );
    let boot = reservation::stats(&d);
    assert_eq!(boot.held_pages, 64 * MIB_PAGES);
    assert_eq!(boot.physmap_pages, 96 * MIB_PAGES);
    // The balloon stamped every free page: the host backs nearly all 64 MiB now.
    assert!(boot.host_bytes > 40 << 20, "{boot:?}");

    mem_set(&hv, &d, 4);
    assert!(
        dom.console().wait_for("balloon: target 4096 KiB", T),
        "{}",
        dom.console().text()
    );
    let low = wait_stats(&d, "down", |s| s.held_pages < 32 * MIB_PAGES);
    // It cannot go below its kernel image (BSS included), but every free page went back, and
    // the host's memory for it is what it touched of the kernel.
    assert!(low.host_bytes < 8 << 20, "{low:?}");
    assert!(low.host_bytes / 4096 <= low.held_pages);
    eprintln!(
        "64 MiB domain: host memory {:.1} MiB, after mem-set 4: {:.1} MiB (holds {:.1} MiB)",
        mib(boot.host_bytes),
        mib(low.host_bytes),
        mib(low.held_pages * 4096)
    );
    assert_eq!(d.fault_count("balloon-reuse"), 0);

    // Up to maxmem: every page comes back, zeroed, and the stamps of those kept are intact.
    mem_set(&hv, &d, 96);
    assert!(
        dom.console()
            .wait_for("balloon: target 98304 KiB, holding 98304 KiB", T),
        "{}",
        dom.console().text()
    );
    let high = reservation::stats(&d);
    assert_eq!(high.held_pages, 96 * MIB_PAGES);
    let text = dom.console().text();
    assert!(!text.contains("check FAILED"), "{text}");
    assert!(!text.contains("host refused"), "{text}");
    // The store shows what the guest holds.
    let cur = hv
        .store()
        .read(0, 0, &format!("/local/domain/{}/memory/current", d.id))
        .unwrap();
    assert_eq!(cur, b"98304");

    // Beyond maxmem nothing is possible: the maximum cannot be raised past the physical map.
    assert!(reservation::set_max_pages(&d, 96 * MIB_PAGES + 1).is_err());
    // Down again, halfway: the guest settles at the target exactly.
    mem_set(&hv, &d, 48);
    wait_stats(&d, "halfway", |s| s.held_pages == 48 * MIB_PAGES);
    assert_eq!(d.fault_count("balloon-reuse"), 0);
    assert!(matches!(dom.state(), DomainState::Running));
    dom.destroy();
}

#[test]
fn a_hostile_balloon_gets_defined_errors_and_harms_nobody() {
    let hv = hypervisor();
    let neighbour = splitvisor_tests::domain(&hv, "neighbour", "selftest");
    let dom = hv
        .create_domain(DomainConfig {
            name: "balloonhostile".into(),
            mem_mib: 32,
            max_mem_mib: Some(40),
            cmdline: "balloonhostile".into(),
            start_paused: true,
            ..Default::default()
        })
        .unwrap();
    let d = dom.shared().clone();
    // As after `xl mem-set` to its memory: it may not populate above 32 MiB.
    reservation::set_max_pages(&d, 32 * MIB_PAGES).unwrap();
    dom.unpause().unwrap();

    assert!(
        dom.console()
            .wait_for("balloonhostile: grant ref 1 frame ", T),
        "{}",
        dom.console().text()
    );
    let text = dom.console().text();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("balloonhostile: grant ref 1 frame "))
        .unwrap();
    let mut words = line.split_whitespace();
    let frame = u64::from_str_radix(words.next().unwrap().trim_start_matches("0x"), 16).unwrap();
    let port: u32 = words.nth(1).unwrap().parse().unwrap();
    let hp = hypervisor::evtchn::HostPort::bind(&d, port).unwrap();

    // Mapped by dom0: the guest's give-back must be refused.
    let mapped = grant::map(&d, GrantRef(1), 0, false).unwrap();
    mapped.write(0, b"dom0 was here").unwrap();
    hp.notify();
    assert_eq!(hp.wait(T), 1, "{}", dom.console().text());
    let mut b = [0u8; 13];
    mapped.read(0, &mut b).unwrap();
    assert_eq!(&b, b"dom0 was here", "the page stayed while mapped");
    drop(mapped);
    hp.notify();
    assert_eq!(hp.wait(T), 1, "{}", dom.console().text());
    // Given back now: a grant of it maps nothing.
    assert_eq!(
        grant::map(&d, GrantRef(1), 0, false).unwrap_err(),
        GrantError::GivenBack {
            gref: 1,
            frame: frame as u32
        }
    );
    hp.notify();

    let end = dom.wait(T);
    let text = dom.console().text();
    assert!(
        matches!(end, DomainState::Shutdown { code: 0, .. }),
        "{end:?}\n{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
    for kind in [
        "balloon-arg",
        "balloon-bad-frame",
        "balloon-not-held",
        "balloon-busy",
        "balloon-held",
        "balloon-over-max",
        "balloon-reuse",
    ] {
        assert!(d.fault_count(kind) >= 1, "{kind} not counted");
    }
    assert_eq!(d.fault_count("balloon-arg"), 9);
    // Two frames are given back at the end (the granted one and 16 reused ones, repaired), and
    // the host's memory is no more than the domain holds once the reuse is repaired again.
    std::thread::sleep(reservation::REPAIR_INTERVAL);
    let s = reservation::stats(&d);
    assert_eq!(s.held_pages, 32 * MIB_PAGES - 17, "{s:?}");
    let s = reservation::stats(&d);
    assert!(s.host_bytes / 4096 <= s.held_pages, "{s:?}");

    // The neighbour never noticed: every one of its checks passed.
    let n = neighbour.wait(T);
    assert!(
        matches!(n, DomainState::Shutdown { code: 0, .. }),
        "{n:?}\n{}",
        neighbour.console().text()
    );
    drop(hp);
    dom.destroy();
    neighbour.destroy();
}

/// Buffers registered with io_uring by this process (every ring's `UserBufs` in fdinfo).
fn registered_buffers() -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        n += text
            .lines()
            .filter_map(|l| l.strip_prefix("UserBufs:"))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    n
}

#[test]
fn a_disk_keeps_working_while_its_domain_gives_memory_back_and_takes_it_again() {
    let dir = std::env::temp_dir().join(format!("sv-balloon-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("xvda.img");
    dom0::disk::Disk::create_sparse(&img, 16 << 20).unwrap();
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "balloonblk".into(),
            cmdline: "blksoak secs=6 balloon=1".into(),
            ..Default::default()
        })
        .unwrap();
    let d = dom.shared().clone();
    let vbd = dom0::vbd::Vbd::attach(hv.store(), &d, 51712, &img, false).unwrap();
    assert!(
        dom.console().wait_for("blksoak: disk of", T),
        "{}",
        dom.console().text()
    );
    // Block I/O goes through the whole memory, registered with io_uring (which pins it all).
    assert!(registered_buffers() >= 1);
    assert!(reservation::stats(&d).host_bytes > 48 << 20);

    mem_set(&hv, &d, 4);
    assert!(
        dom.console().wait_for("balloon: target 4096 KiB", T),
        "{}",
        dom.console().text()
    );
    // The pins would keep the pages given back alive (and stale): the back end drops them.
    let end = Instant::now() + T;
    while registered_buffers() > 0 {
        assert!(Instant::now() < end, "the registration stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What is left is what it holds (the registration faulted in all of its kernel's BSS).
    let low = reservation::stats(&d);
    assert!(low.host_bytes / 4096 <= low.held_pages, "{low:?}");
    assert!(low.held_pages < 20 * MIB_PAGES, "{low:?}");
    mem_set(&hv, &d, 64);
    assert!(
        dom.console()
            .wait_for("balloon: target 65536 KiB, holding 65536 KiB", T),
        "{}",
        dom.console().text()
    );
    let state = dom.wait(T);
    let text = dom.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: 0, .. }),
        "{state:?}\n{text}"
    );
    assert!(text.contains(" 0 errors"), "{text}");
    assert!(!text.contains("check FAILED"), "{text}");
    assert!(vbd.stats().reads > 0);
    drop(vbd);
    dom.destroy();
    let _ = std::fs::remove_dir_all(&dir);
}
