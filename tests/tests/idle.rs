//! Idle domains cost the host nothing: with guests that connected a disk and a network interface
//! and then sleep with nothing to ask (the `block-forever` job), no host thread of theirs wakes
//! (vCPU, PV-device, block and vif threads, the switch), because none waits on a timer. Wake-ups
//! are counted from the threads' voluntary context switches, not timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dom0::disk::Disk;
use dom0::switch::Switch;
use dom0::vbd::{Vbd, state};
use dom0::vif::Vif;
use dom0::xenbus::CLOSE_TIMEOUT;
use hypervisor::{Domain, Hypervisor};
use pv_protocol::store::StoreErrno;
use splitvisor_tests::{context_switches, domain, hypervisor, wake_ups};

const T: Duration = Duration::from_secs(30);
/// xvda.
const XVDA: u32 = 51712;

/// A `block-forever` domain with a disk and a vif, both connected.
struct Idle {
    dom: Domain,
    vbd: Vbd,
    vif: Vif,
}

fn idle(hv: &Hypervisor, name: &str, switch: &Arc<Switch>) -> Idle {
    let img = std::env::temp_dir().join(format!("sv-idle-{}-{name}.img", std::process::id()));
    Disk::create_sparse(&img, 1 << 20).unwrap();
    let dom = domain(hv, name, "block-forever");
    let vbd = Vbd::attach(hv.store(), dom.shared(), XVDA, &img, false).unwrap();
    let vif = Vif::attach(hv.store(), dom.shared(), 0, None, switch).unwrap();
    // The back end keeps its own handle; the name can go.
    let _ = std::fs::remove_file(&img);
    assert!(
        dom.console().wait_for("block-forever: connected", T),
        "{}",
        dom.console().text()
    );
    assert_eq!(vbd.backend_state(), Some(state::CONNECTED));
    assert_eq!(vif.backend_state(), Some(state::CONNECTED));
    Idle { dom, vbd, vif }
}

/// The threads of `doms` (named `dom<id>-...`) and of switch `switch`, with their wake-ups over
/// `quiet`.
fn host_threads(doms: &[&Idle], switch: &str, quiet: Duration) -> Vec<(String, u64)> {
    let prefixes: Vec<String> = doms.iter().map(|d| format!("dom{}-", d.dom.id())).collect();
    let switch = format!("switch-{switch}");
    wake_ups(
        "self",
        |name| name == switch || prefixes.iter().any(|p| name.starts_with(p.as_str())),
        quiet,
    )
}

/// Both in one test: a second hypervisor in this process (another test) would number its
/// domains from 1 too, and their threads' names would mix.
#[test]
fn idle_domains_wake_no_host_thread_and_a_silent_front_end_is_closed_after_the_timeout() {
    let hv = hypervisor();
    let sw = Arc::new(Switch::new("quiet").unwrap());
    let mut doms: Vec<Idle> = (0..3)
        .map(|i| idle(&hv, &format!("idle{i}"), &sw))
        .collect();
    // Past every spin after the last traffic (the handshakes).
    std::thread::sleep(Duration::from_millis(300));
    let woke = host_threads(
        &doms.iter().collect::<Vec<_>>(),
        "quiet",
        Duration::from_secs(3),
    );
    // Every kind of thread was looked at, for every domain.
    for d in &doms {
        for kind in ["vcpu0", "pvdev", &format!("vbd{XVDA}"), "vif0"] {
            let name = format!("dom{}-{kind}", d.dom.id());
            assert!(woke.iter().any(|(n, _)| *n == name), "no {name}: {woke:?}");
        }
    }
    assert!(woke.iter().any(|(n, _)| n == "switch-quiet"), "{woke:?}");
    let busy: Vec<_> = woke.iter().filter(|(_, n)| *n > 2).collect();
    assert!(
        busy.is_empty(),
        "threads of idle domains woke in 3 s: {busy:?} (all: {woke:?})"
    );
    for d in &doms {
        assert!(!d.dom.state().is_final(), "{:?}", d.dom.state());
    }
    let deaf = doms.pop().unwrap();
    silent_front_end_is_closed_after_the_timeout(&hv, deaf);
}

/// A detach asks the front end to close and waits for it: a front end that never answers is
/// closed regardless once [`CLOSE_TIMEOUT`] has passed, and the detaching thread sleeps through
/// that wait (one timed wait, woken only by state changes) instead of polling the store.
fn silent_front_end_is_closed_after_the_timeout(hv: &Hypervisor, deaf: Idle) {
    let Idle { dom, vbd, vif } = deaf;
    let id = dom.id();
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    for (class, devid, detach) in [
        (
            "vbd",
            XVDA,
            Box::new(move || drop(vbd)) as Box<dyn FnOnce()>,
        ),
        ("vif", 0, Box::new(move || drop(vif))),
    ] {
        let front = format!("/local/domain/{id}/device/{class}/{devid}/state");
        let back = format!("/local/domain/0/backend/{class}/{id}/{devid}");
        let before = context_switches(me).unwrap();
        let t = Instant::now();
        detach();
        let took = t.elapsed();
        let woke = context_switches(me).unwrap() - before;
        assert!(
            took >= CLOSE_TIMEOUT && took < CLOSE_TIMEOUT + Duration::from_secs(2),
            "{class}: the detach took {took:?}"
        );
        assert!(
            woke <= 10,
            "{class}: the detaching thread woke {woke} times"
        );
        // Closed on regardless: the back end's directory is gone; the guest never answered.
        assert_eq!(
            hv.store().read(0, 0, &format!("{back}/state")),
            Err(StoreErrno::ENOENT)
        );
        assert_eq!(
            hv.store().read(0, 0, &front).as_deref(),
            Ok(b"4".as_slice()),
            "{class}"
        );
    }
    assert!(!dom.state().is_final());
}
