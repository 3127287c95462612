//! The real daemon with idle domains: none of its threads wakes while the guests sleep (each
//! connected a disk and a vif, then blocks with nothing to ask: the `block-forever` job), and a
//! domain that stops is handled at once by a lifecycle thread that otherwise sleeps (no scan of
//! every domain on a timer). Wake-ups are counted from the threads' voluntary context switches.

mod common;

use std::time::Duration;

use common::Env;
use splitvisor_tests::wake_ups;

/// The daemon's pid, from its lock file.
fn daemon_pid(env: &Env) -> String {
    let lock = env.dir.join("run").join(splitvisor_api::control::LOCK);
    std::fs::read_to_string(lock).unwrap().trim().to_owned()
}

/// Seconds since midnight of a log line's timestamp (`2026-12-01T23:23:14.496643Z ...`).
fn stamp(line: &str) -> f64 {
    let t = line.split_whitespace().next().unwrap();
    let hms = t.split_once('T').unwrap().1.trim_end_matches('Z');
    hms.split(':')
        .map(|f| f.parse::<f64>().unwrap())
        .fold(0.0, |acc, f| acc * 60.0 + f)
}

#[test]
fn idle_domains_wake_no_daemon_thread_and_a_stop_is_handled_at_once() {
    let env = Env::new("idle");
    for i in 0..3 {
        let img = env.dir.join(format!("i{i}.img"));
        let cfg = env.cfg(
            &format!("i{i}.cfg"),
            &format!(
                "name = \"idle{i}\"\nextra = \"block-forever\"\n\
                 disk = [ 'vdev=xvda,size=1M,target={}' ]\nvif = [ 'bridge=idle' ]\n",
                img.display()
            ),
        );
        env.ok(&["create", &cfg]);
    }
    for i in 0..3 {
        let name = format!("idle{i}");
        env.wait_until("connected", || {
            env.console(&name, Duration::from_millis(50))
                .contains("block-forever: connected")
        });
    }
    let pid = daemon_pid(&env);
    // The consoles' clients are gone, and every spin after the handshakes is over.
    std::thread::sleep(Duration::from_millis(300));
    let woke = wake_ups(&pid, |_| true, Duration::from_secs(3));
    for name in [
        "lifecycle",
        "switch-idle",
        "dom1-pvdev",
        "dom3-vif0",
        "dom2-vbd51712",
    ] {
        assert!(woke.iter().any(|(n, _)| n == name), "no {name}: {woke:?}");
    }
    // The consoles' streams ended with their clients, however quiet their guests.
    let lingering: Vec<_> = woke
        .iter()
        .filter(|(n, _)| n == "client" || n == "console-in")
        .collect();
    assert!(lingering.is_empty(), "{lingering:?}");
    let busy: Vec<_> = woke.iter().filter(|(_, n)| *n > 2).collect();
    assert!(
        busy.is_empty(),
        "daemon threads woke in 3 s while every guest slept: {busy:?} (all: {woke:?})"
    );

    // A domain that crashes is preserved at once: the lifecycle thread wakes for it alone.
    let cfg = env.cfg(
        "c.cfg",
        "name = \"crasher\"\nextra = \"crash\"\non_crash = \"preserve\"\n",
    );
    let before = splitvisor_tests::threads(&pid);
    env.ok(&["create", &cfg]);
    env.wait_until("crashed and kept", || {
        env.list()
            .iter()
            .any(|d| d.name.as_str() == "crasher" && d.state == "c")
    });
    std::thread::sleep(Duration::from_millis(300));
    let after = splitvisor_tests::threads(&pid);
    let (tid, (_, n)) = after.iter().find(|(_, (n, _))| n == "lifecycle").unwrap();
    let woke = n - before[tid].1;
    assert!(
        woke <= 3,
        "the lifecycle thread woke {woke} times for one stop"
    );
    let log = env.ok(&["dmesg", "-n", "100"]);
    let id = env
        .list()
        .iter()
        .find(|d| d.name.as_str() == "crasher")
        .unwrap()
        .id;
    let line = |what: &str| {
        log.lines()
            .find(|l| l.contains(what) && l.split_whitespace().any(|w| w == format!("domid={id}")))
            .unwrap_or_else(|| panic!("no {what:?} for {id}: {log}"))
    };
    let stopped = stamp(line("domain stopped"));
    let acted = stamp(line("on_crash=Preserve"));
    assert!(
        (0.0..0.5).contains(&(acted - stopped)),
        "acted on {:.3} s after the stop",
        acted - stopped
    );
    // The idle ones are untouched, asleep in the hypervisor.
    let list = env.list();
    for i in 0..3 {
        let d = list
            .iter()
            .find(|d| d.name.as_str() == format!("idle{i}"))
            .unwrap();
        assert_eq!(d.state, "b", "{d:?}");
    }
}
