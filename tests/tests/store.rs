//! The config store between real domains: each sees its own subtree and nobody else's.

use std::time::Duration;

use hypervisor::{DomainConfig, DomainState};
use pv_protocol::store::StoreErrno;
use splitvisor_tests::hypervisor;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_domain_cannot_read_or_write_another_domains_subtree() {
    let hv = hypervisor();
    let victim = hv
        .create_domain(DomainConfig {
            name: "victim".into(),
            cmdline: "ticker".into(),
            ..Default::default()
        })
        .unwrap();
    let peeker = hv
        .create_domain(DomainConfig {
            name: "peeker".into(),
            cmdline: format!("store-peek {}", victim.id()),
            ..Default::default()
        })
        .unwrap();
    let state = peeker.wait(T);
    let text = peeker.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: 0, .. }),
        "{state:?}\n{text}"
    );
    assert!(text.contains("Errno(EACCES)"), "{text}");
    let home = format!("/local/domain/{}/name", victim.id());
    assert_eq!(hv.store().read(0, 0, &home).unwrap(), b"victim");
    let id = victim.id();
    victim.destroy();
    // Destroy releases the domain's subtree.
    assert_eq!(
        hv.store().read(0, 0, &format!("/local/domain/{id}")),
        Err(StoreErrno::ENOENT)
    );
}

#[test]
fn dom0_writes_are_seen_by_a_guest_only_where_permitted() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "reader".into(),
            cmdline: "ticker".into(),
            ..Default::default()
        })
        .unwrap();
    let id = dom.id();
    let s = hv.store();
    s.write(
        0,
        0,
        &format!("/local/domain/{id}/device/vbd/51712/backend"),
        b"/backend/vbd",
    )
    .unwrap();
    // Dom0 wrote inside the guest's home: the node inherits the home's ACL (guest read/write).
    assert_eq!(
        s.read(id, 0, "device/vbd/51712/backend").unwrap(),
        b"/backend/vbd"
    );
    s.write(0, 0, "/backend/vbd/x", b"secret").unwrap();
    assert_eq!(s.read(id, 0, "/backend/vbd/x"), Err(StoreErrno::EACCES));
    dom.destroy();
}

#[test]
fn a_guest_cannot_remove_or_take_over_its_home() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "homeless".into(),
            cmdline: "store-home".into(),
            ..Default::default()
        })
        .unwrap();
    let state = dom.wait(T);
    let text = dom.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: 0, .. }),
        "{state:?}\n{text}"
    );
    let id = dom.id();
    let s = hv.store();
    let perms = s.get_perms(0, 0, &format!("/local/domain/{id}")).unwrap();
    assert_eq!(perms[0].domid.0, 0, "dom0 still owns the home: {perms:?}");
    assert_eq!(
        s.read(0, 0, &format!("/local/domain/{id}/name")).unwrap(),
        b"homeless"
    );
    assert_eq!(
        s.read(0, 0, &format!("/local/domain/{id}/data/kept"))
            .unwrap(),
        b"yes"
    );
    dom.destroy();
}
