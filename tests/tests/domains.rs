//! Real KVM domains running the Splitvisor guest kernel.

use std::time::Duration;

use hypervisor::{DomainConfig, DomainState};
use pv_protocol::hypercall::ShutdownReason;
use splitvisor_tests::hypervisor;

const T: Duration = Duration::from_secs(30);

fn cfg(name: &str, vcpus: u32, cmdline: &str) -> DomainConfig {
    DomainConfig {
        name: name.into(),
        vcpus,
        cmdline: cmdline.into(),
        ..Default::default()
    }
}

fn assert_selftest_passed(console: &str, state: &DomainState) {
    assert!(!console.contains("FAIL"), "a check failed:\n{console}");
    let summary = console
        .lines()
        .find(|l| l.starts_with("selftest: "))
        .unwrap_or_else(|| panic!("no summary line:\n{console}"));
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    assert!(console.contains("PASS all-vcpus-up"), "{console}");
    assert_eq!(
        *state,
        DomainState::Shutdown {
            reason: ShutdownReason::Poweroff,
            code: 0
        },
        "{console}"
    );
}

#[test]
fn selftest_passes_with_one_and_with_two_vcpus() {
    let hv = hypervisor();
    for vcpus in [1, 2] {
        let dom = hv
            .create_domain(cfg("selftest", vcpus, "selftest"))
            .unwrap();
        let state = dom.wait(T);
        assert_selftest_passed(&dom.console().text(), &state);
        assert!(
            dom.console()
                .text()
                .contains(&format!("with {vcpus} vCPU(s)"))
        );
    }
}

#[test]
fn several_domains_run_at_once_with_distinct_ids() {
    let hv = hypervisor();
    let doms: Vec<_> = (0..3)
        .map(|i| {
            hv.create_domain(cfg(&format!("d{i}"), 2, "selftest"))
                .unwrap()
        })
        .collect();
    let mut ids: Vec<u32> = doms.iter().map(|d| d.id()).collect();
    for d in &doms {
        let state = d.wait(T);
        assert_selftest_passed(&d.console().text(), &state);
        assert!(
            d.console()
                .text()
                .contains(&format!("domain {} with", d.id()))
        );
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "ids are unique");
}

#[test]
fn hostile_guest_leaves_host_and_neighbour_unharmed() {
    let hv = hypervisor();
    let hostile = hv.create_domain(cfg("hostile", 2, "hostile")).unwrap();
    let good = hv.create_domain(cfg("good", 2, "selftest")).unwrap();
    let hs = hostile.wait(T);
    let gs = good.wait(T);
    assert_selftest_passed(&good.console().text(), &gs);
    assert!(
        hostile.console().text().contains("still alive"),
        "{}",
        hostile.console().text()
    );
    assert_eq!(
        hs,
        DomainState::Shutdown {
            reason: ShutdownReason::Poweroff,
            code: 0
        }
    );
    // Its garbage was refused and counted, not obeyed.
    assert!(hostile.shared().fault_count("bad-hypercall") > 100);
    assert!(
        hostile.shared().fault_count("bad-port") > 10,
        "doorbells on random ports"
    );
    assert_eq!(
        hostile.shared().fault_count("store-ring"),
        1,
        "store ring marked broken once"
    );
    assert_eq!(
        hostile.shared().fault_count("console-ring"),
        1,
        "console ring marked broken once"
    );
    // The good guest's count holds only its own handful of deliberate probes, none of the
    // hostile's.
    assert!(good.shared().fault_count("bad-hypercall") < 10);
}

#[test]
fn paused_domain_makes_no_progress_until_unpaused() {
    let hv = hypervisor();
    let dom = hv.create_domain(cfg("ticker", 2, "ticker")).unwrap();
    assert!(
        dom.console().wait_for("tick 5\n", T),
        "{}",
        dom.console().text()
    );
    dom.pause().unwrap();
    assert_eq!(dom.state(), DomainState::Paused);
    // Lines the guest wrote into its console ring just before the pause may still be on their
    // way into the history: let it settle first.
    let mut frozen = dom.console().history().len();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = dom.console().history().len();
        if now == frozen {
            break;
        }
        frozen = now;
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        dom.console().history().len(),
        frozen,
        "no output while paused"
    );
    dom.unpause().unwrap();
    let last = dom
        .console()
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap();
    // It resumes from where it stopped: the next tick follows the last one.
    assert!(dom.console().wait_for(&format!("tick {}\n", last + 3), T));
    assert_eq!(dom.destroy(), DomainState::Destroyed);
}

#[test]
fn domain_created_paused_starts_only_when_unpaused() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            start_paused: true,
            ..cfg("paused", 1, "selftest")
        })
        .unwrap();
    assert_eq!(dom.wait(Duration::from_millis(300)), DomainState::Paused);
    assert!(dom.console().history().is_empty());
    dom.unpause().unwrap();
    let state = dom.wait(T);
    assert_selftest_passed(&dom.console().text(), &state);
}

#[test]
fn triple_fault_is_a_crash_with_registers_and_harms_no_neighbour() {
    let hv = hypervisor();
    let bad = hv.create_domain(cfg("crash", 1, "crash")).unwrap();
    let good = hv.create_domain(cfg("good", 1, "selftest")).unwrap();
    match bad.wait(T) {
        DomainState::Crashed { detail } => {
            assert!(detail.contains("triple fault"), "{detail}");
            assert!(detail.contains("rip=0x2"), "registers logged: {detail}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    let gs = good.wait(T);
    assert_selftest_passed(&good.console().text(), &gs);
}

/// Whoever must act on a domain's end hears of it when it happens, on the thread that stopped
/// the domain, instead of looking at the state on a timer; a late watcher hears at once.
#[test]
fn a_stop_watch_is_called_when_the_domain_stops_and_not_after_it_is_dropped() {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::{Arc, mpsc};
    let hv = hypervisor();
    let bad = hv.create_domain(cfg("crash", 1, "crash")).unwrap();
    let (tx, rx) = mpsc::channel();
    let seen = {
        let shared = Arc::clone(bad.shared());
        bad.shared().watch_stop(Box::new(move || {
            let _ = tx.send(shared.state());
        }))
    };
    // The state the callback reads is already the final one.
    assert!(matches!(
        rx.recv_timeout(T),
        Ok(DomainState::Crashed { .. })
    ));
    drop(seen);
    let late = Arc::new(AtomicU32::new(0));
    let l = Arc::clone(&late);
    let _w = bad.shared().watch_stop(Box::new(move || {
        l.fetch_add(1, SeqCst);
    }));
    assert_eq!(late.load(SeqCst), 1, "already stopped: called at once");

    let dom = hv.create_domain(cfg("ticker", 1, "ticker")).unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let (c, d) = (Arc::clone(&calls), Arc::clone(&calls));
    let kept = dom.shared().watch_stop(Box::new(move || {
        c.fetch_add(1, SeqCst);
    }));
    let dropped = dom.shared().watch_stop(Box::new(move || {
        d.fetch_add(100, SeqCst);
    }));
    assert!(dom.console().wait_for("tick 1\n", T));
    assert_eq!(calls.load(SeqCst), 0, "not while it runs");
    drop(dropped);
    dom.destroy();
    assert_eq!(calls.load(SeqCst), 1);
    drop(kept);
}

#[test]
fn destroying_a_running_domain_stops_every_vcpu() {
    let hv = hypervisor();
    let dom = hv.create_domain(cfg("ticker", 4, "ticker")).unwrap();
    assert!(dom.console().wait_for("tick 3\n", T));
    assert_eq!(dom.destroy(), DomainState::Destroyed);
}

#[test]
fn cpu_time_is_accounted_for_running_and_finished_vcpus() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "cpu".into(),
            cmdline: "ticker".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(dom.console().wait_for("tick 3", Duration::from_secs(10)));
    let running = dom.shared().cpu_time();
    assert!(running > Duration::ZERO, "{running:?}");
    let shared = std::sync::Arc::clone(dom.shared());
    dom.destroy();
    // The vCPU threads are gone; their time is kept.
    assert!(shared.cpu_time() >= running);
}

#[test]
fn out_of_range_configurations_are_refused_before_anything_is_built() {
    let hv = hypervisor();
    for (mem_mib, vcpus, max_ports, grant_frames) in [
        (0, 1, 64, 1),
        (u64::MAX, 1, 64, 1),
        ((1 << 44) + 64, 1, 64, 1),
        (64, 0, 64, 1),
        (64, 10_000, 64, 1),
        (64, 1, 0, 1),
        (64, 1, 64, 0),
    ] {
        let e = hv
            .create_domain(DomainConfig {
                name: "bad".into(),
                mem_mib,
                vcpus,
                max_ports,
                grant_frames,
                ..Default::default()
            })
            .map(|d| d.id())
            .expect_err("created");
        assert!(
            matches!(e, hypervisor::Error::Config(_)),
            "{mem_mib} MiB, {vcpus} vCPUs: {e}"
        );
    }
}

#[test]
fn a_guest_touching_memory_beyond_its_ram_crashes_naming_the_gpa_and_its_neighbour_runs_on() {
    let hv = hypervisor();
    let neighbour = hv.create_domain(cfg("neighbour", 1, "idle")).unwrap();
    assert!(neighbour.console().wait_for("idle: up", T));
    let dom = hv
        .create_domain(DomainConfig {
            mem_mib: 16,
            ..cfg("toucher", 1, "touch-beyond")
        })
        .unwrap();
    let state = dom.wait(T);
    let text = dom.console().text();
    // 16 MiB end at 0x1000000; the job writes a page past it.
    let DomainState::Crashed { detail } = &state else {
        panic!("{state:?}\n{text}");
    };
    assert!(
        detail.contains("write of 1 byte(s) at gpa 0x1001000, outside the domain's memory"),
        "{detail}"
    );
    assert!(detail.contains("rip="), "with the registers: {detail}");
    assert!(!text.contains("still running"), "{text}");
    // The neighbour is untouched: still running, still answering.
    assert_eq!(neighbour.state(), DomainState::Running);
    neighbour.console().send_input(b"ok?\n");
    assert!(neighbour.console().wait_for("console: ok?", T));
    assert_eq!(neighbour.destroy(), DomainState::Destroyed);
}

#[test]
fn memory_below_the_kernels_minimum_is_refused_with_a_defined_error() {
    use pv_protocol::start_info::MIN_MEM_MIB;
    let hv = hypervisor();
    for (mem_mib, vcpus) in [(4, 1), (MIN_MEM_MIB - 1, 1), (MIN_MEM_MIB - 1, 32)] {
        let e = hv
            .create_domain(DomainConfig {
                mem_mib,
                ..cfg("small", vcpus, "idle")
            })
            .map(|d| d.id())
            .expect_err("created");
        assert!(
            matches!(e, hypervisor::Error::MemoryTooSmall { mem_mib: m, need_mib } if m == mem_mib && need_mib == MIN_MEM_MIB),
            "{mem_mib} MiB: {e}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "{mem_mib} MiB of memory is too little: the kernel needs at least {MIN_MEM_MIB} MiB"
            )
        );
    }
    // The real minimum runs, with every vCPU the guest can have.
    let dom = hv
        .create_domain(DomainConfig {
            mem_mib: MIN_MEM_MIB,
            ..cfg("smallest", 32, "selftest")
        })
        .unwrap();
    let state = dom.wait(T);
    assert_selftest_passed(&dom.console().text(), &state);
}
