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
