//! Grant tables: a real guest grants pages; the host maps, copies and is refused exactly where
//! the rules say.

use std::time::Duration;

use hypervisor::evtchn::HostPort;
use hypervisor::grant::{self, GrantCache, GrantError};
use hypervisor::{DomainConfig, DomainState};
use pv_protocol::SharedRegion;
use pv_protocol::grant::GrantRef;
use splitvisor_tests::hypervisor;

const T: Duration = Duration::from_secs(30);

#[test]
fn grant_rules_hold_for_a_real_guest() {
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "grants".into(),
            cmdline: "grant-offer".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(
        dom.console().wait_for("grant-offer port ", T),
        "{}",
        dom.console().text()
    );
    let text = dom.console().text();
    let port: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("grant-offer port "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let d = dom.shared().clone();
    let hp = HostPort::bind(&d, port).unwrap();

    // Read-only page: readable, pattern intact; a writable map is refused.
    let ro = grant::map(&d, GrantRef(1), 0, true).unwrap();
    let mut buf = [0u8; 64];
    ro.read(100, &mut buf).unwrap();
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, &b)| b == ((100 + i) * 7) as u8)
    );
    assert_eq!(ro.write(0, b"x"), Err(GrantError::ReadOnly(1)));
    assert_eq!(
        grant::map(&d, GrantRef(1), 0, false).unwrap_err(),
        GrantError::ReadOnly(1)
    );
    // Bounded to the page.
    assert_eq!(
        ro.read(4090, &mut buf),
        Err(GrantError::OutOfPage {
            offset: 4090,
            len: 64
        })
    );
    drop(ro);

    // Each kind of bad grant gets its own error.
    assert_eq!(
        grant::map(&d, GrantRef(3), 0, true).unwrap_err(),
        GrantError::WrongDomain {
            gref: 3,
            granted_to: 7,
            mapper: 0
        }
    );
    assert!(matches!(
        grant::map(&d, GrantRef(4), 0, true).unwrap_err(),
        GrantError::BadFrame { gref: 4, .. }
    ));
    assert_eq!(
        grant::map(&d, GrantRef(5), 0, true).unwrap_err(),
        GrantError::NotGranted(5)
    );
    assert_eq!(
        grant::map(&d, GrantRef(32 * 512), 0, true).unwrap_err(),
        GrantError::BadRef(16384)
    );
    assert_eq!(
        grant::map(&d, GrantRef(u32::MAX), 0, true).unwrap_err(),
        GrantError::BadRef(u32::MAX)
    );

    // A two-page ring from frames that are not neighbours (refs 6 and 7, a page apart) is shown
    // back to back through a second mapping that shares the guest's pages.
    let ring = grant::map_ring(&d, &[GrantRef(6), GrantRef(7)], 0).unwrap();
    assert!(ring.is_view());
    assert_eq!(ring.page_count(), 2);
    // SAFETY: `ring` keeps both pages mapped, writable and claimed until it is dropped below.
    let view = unsafe { SharedRegion::from_raw(ring.host_addr(), 2 * 4096) }.unwrap();
    view.write(0, b"ring page 0").unwrap();
    view.write(4096, b"ring page 1").unwrap();
    for (gref, text) in [(6, b"ring page 0"), (7, b"ring page 1")] {
        let mut b = [0u8; 11];
        grant::copy_from(&d, GrantRef(gref), 0, 0, &mut b).unwrap();
        assert_eq!(&b, text);
    }
    drop(ring);
    let one = grant::map_ring(&d, &[GrantRef(6)], 0).unwrap();
    assert!(!one.is_view());
    drop(one);
    // Every page must be granted writable.
    assert_eq!(
        grant::map_ring(&d, &[GrantRef(6), GrantRef(1)], 0).unwrap_err(),
        GrantError::ReadOnly(1)
    );
    assert_eq!(
        grant::map_ring(&d, &[], 0).unwrap_err(),
        GrantError::View(0)
    );

    // Writable page, kept in the persistent cache; the guest cannot revoke it meanwhile.
    let cache = GrantCache::default();
    let rw = cache.get(&d, GrantRef(2), 0, false).unwrap();
    rw.write(0, b"written by dom0!").unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&rw, &cache.get(&d, GrantRef(2), 0, true).unwrap()),
        "cache hit"
    );
    drop(rw);
    hp.notify();
    assert_eq!(hp.wait(T), 1);
    // The guest's console lines travel through its console ring: wait for them.
    assert!(
        dom.console().wait_for("revoke-while-mapped refused", T),
        "{}",
        dom.console().text()
    );

    // Unmapped: now the guest may revoke, and it sees what we wrote.
    cache.evict(d.id, GrantRef(2));
    assert!(cache.is_empty());
    // Copy without a mapping, too.
    let mut head = [0u8; 16];
    grant::copy_from(&d, GrantRef(2), 0, 0, &mut head).unwrap();
    assert_eq!(&head, b"written by dom0!");
    hp.notify();
    assert_eq!(hp.wait(T), 1);
    for line in ["revoke-after-unmap ok", "host-data ok", "revoke-ro ok"] {
        assert!(
            dom.console().wait_for(line, T),
            "{line}:\n{}",
            dom.console().text()
        );
    }
    // Revoked entries grant nothing.
    assert_eq!(
        grant::map(&d, GrantRef(2), 0, true).unwrap_err(),
        GrantError::NotGranted(2)
    );
    assert_eq!(
        grant::map(&d, GrantRef(1), 0, true).unwrap_err(),
        GrantError::NotGranted(1)
    );
    hp.notify();

    assert!(matches!(dom.wait(T), DomainState::Shutdown { code: 0, .. }));
    let id = d.id;
    drop(hp);
    dom.destroy();
    // Mapping after destroy fails cleanly (the memory is still ours until `d` goes).
    assert_eq!(
        grant::map(&d, GrantRef(1), 0, true).unwrap_err(),
        GrantError::BadDomain(id)
    );
}
