//! Event channels between a real guest and host endpoints.

use std::time::Duration;

use hypervisor::evtchn::HostPort;
use hypervisor::{DomainConfig, DomainState};
use pv_protocol::hypercall::{Errno, ShutdownReason};
use splitvisor_tests::hypervisor;

const T: Duration = Duration::from_secs(30);

fn port_from_console(text: &str) -> u32 {
    text.lines()
        .find_map(|l| l.strip_prefix("evtchn-host port "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port line in:\n{text}"))
}

#[test]
fn host_endpoint_and_guest_exchange_each_notification_exactly_once() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "evtchn".into(),
            cmdline: "evtchn-host".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(dom.console().wait_for("evtchn-host port ", T));
    let port = port_from_console(&dom.console().text());
    let hp = HostPort::bind(dom.shared(), port).expect("guest offered the port to dom0");
    // Binding twice is refused: the port is no longer unbound.
    assert_eq!(
        HostPort::bind(dom.shared(), port).unwrap_err(),
        Errno::EINVAL
    );
    for i in 0..100 {
        hp.notify();
        // Each host notification is answered by exactly one guest doorbell write.
        assert_eq!(hp.wait(Duration::from_secs(10)), 1, "round trip {i}");
    }
    assert_eq!(
        dom.wait(T),
        DomainState::Shutdown {
            reason: ShutdownReason::Poweroff,
            code: 0
        },
        "{}",
        dom.console().text()
    );
    assert!(
        dom.console()
            .text()
            .contains("evtchn-host: 100 round trips")
    );
    // Nothing extra arrived.
    assert_eq!(hp.wait(Duration::from_millis(50)), 0);
}

#[test]
fn host_cannot_bind_a_port_not_offered_to_dom0() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "ticker".into(),
            cmdline: "ticker".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(dom.console().wait_for("tick 1\n", T));
    // The ticker allocated no ports: every port is free.
    for port in [0, 1, 5, 1023, 4095, 4096, u32::MAX] {
        assert_eq!(
            HostPort::bind(dom.shared(), port).unwrap_err(),
            Errno::EINVAL,
            "port {port}"
        );
    }
    assert_eq!(dom.destroy(), DomainState::Destroyed);
}

#[test]
fn selftest_event_channel_checks_pass_including_wakeup_of_a_blocked_vcpu() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "selftest".into(),
            vcpus: 2,
            ..Default::default()
        })
        .unwrap();
    dom.wait(T);
    let text = dom.console().text();
    for check in [
        "evtchn-bind-loopback",
        "evtchn-send-marks-pending",
        "evtchn-unmask-redelivers",
        "evtchn-doorbell-send",
        "evtchn-poll-times-out",
        "evtchn-bind-not-offered-einval",
        "evtchn-close-unbinds-peer",
        "evtchn-wakes-blocked-vcpu",
    ] {
        assert!(
            text.contains(&format!("PASS {check}\n")),
            "{check}:\n{text}"
        );
    }
}

#[test]
fn two_guests_exchange_events_over_a_channel_dom0_set_up_through_the_store() {
    use hypervisor::evtchn;
    let hv = hypervisor();
    let cfg = |name: &str| DomainConfig {
        name: name.into(),
        cmdline: "evtchn-peer".into(),
        ..Default::default()
    };
    let a = hv.create_domain(cfg("server")).unwrap();
    let b = hv.create_domain(cfg("client")).unwrap();
    // As a toolstack does: offer a port of A to B, and tell each side through the store.
    let port = evtchn::alloc_unbound(a.shared(), b.id()).unwrap();
    let s = hv.store();
    s.write(
        0,
        0,
        &format!("/local/domain/{}/peer", a.id()),
        format!("serve {port}").as_bytes(),
    )
    .unwrap();
    s.write(
        0,
        0,
        &format!("/local/domain/{}/peer", b.id()),
        format!("bind {} {port}", a.id()).as_bytes(),
    )
    .unwrap();
    for (d, role) in [(&a, "server"), (&b, "client")] {
        let state = d.wait(T);
        let text = d.console().text();
        assert!(
            matches!(state, DomainState::Shutdown { code: 0, .. }),
            "{role}: {state:?}\n{text}"
        );
        assert!(
            text.contains(&format!("100 exchanges as {role}, extra false")),
            "{text}"
        );
    }
}

#[test]
fn destroying_a_domain_unbinds_its_peers_ports() {
    use hypervisor::evtchn;
    use pv_protocol::evtchn::PortState;
    let hv = hypervisor();
    let cfg = |name: &str| DomainConfig {
        name: name.into(),
        cmdline: "ticker".into(),
        ..Default::default()
    };
    let a = hv.create_domain(cfg("a")).unwrap();
    let b = hv.create_domain(cfg("b")).unwrap();
    let pa = evtchn::alloc_unbound(a.shared(), b.id()).unwrap();
    let pb = evtchn::bind_interdomain(b.shared(), a.id(), pa).unwrap();
    assert!(matches!(
        evtchn::status(a.shared(), pa).unwrap(),
        PortState::Interdomain { .. }
    ));
    let a_shared = a.shared().clone();
    b.destroy();
    assert!(matches!(
        evtchn::status(&a_shared, pa).unwrap(),
        PortState::Unbound { .. }
    ));
    let _ = pb;
}

#[test]
fn ports_offered_or_connected_to_a_destroyed_domain_are_offered_to_nobody() {
    use hypervisor::evtchn;
    use pv_protocol::evtchn::PortState;
    use pv_protocol::grant::DomId;
    let hv = hypervisor();
    let cfg = |name: &str| DomainConfig {
        name: name.into(),
        cmdline: "idle".into(),
        start_paused: true,
        ..Default::default()
    };
    let a = hv.create_domain(cfg("a")).unwrap();
    let b = hv.create_domain(cfg("b")).unwrap();
    let offered = evtchn::alloc_unbound(a.shared(), b.id()).unwrap();
    let connected = evtchn::alloc_unbound(a.shared(), b.id()).unwrap();
    evtchn::bind_interdomain(b.shared(), a.id(), connected).unwrap();
    b.destroy();
    // Domain ids are reused: a port left offered to b's id could be bound by the next domain
    // given that id.
    for port in [offered, connected] {
        assert_eq!(
            evtchn::status(a.shared(), port).unwrap(),
            PortState::Unbound {
                dom: DomId::INVALID
            },
            "port {port}"
        );
    }
}
