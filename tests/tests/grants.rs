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

/// The guest's side of its grant table, played by the test on a domain that never runs (created
/// paused): entries written and ended with the same atomic operations a guest uses.
struct GuestTable<'a>(SharedRegion<'a>);

impl GuestTable<'_> {
    fn grant(&self, gref: u32, frame: u32) {
        let off = gref as usize * 8;
        self.0
            .store_u32(off + 4, frame, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
        // PERMIT_ACCESS (1) to domain 0, writable. SeqCst: after the frame, as a guest's wmb().
        self.0
            .store_u32(off, 1, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
    }

    /// The guest's end of access: succeeds only while dom0 has nothing mapped.
    fn end(&self, gref: u32) -> bool {
        let off = gref as usize * 8;
        let w = self
            .0
            .load_u32(off, std::sync::atomic::Ordering::SeqCst)
            .unwrap();
        // READING | WRITING
        if w & 0x18 != 0 {
            return false;
        }
        self.0.compare_exchange_u32(off, w, 0).unwrap().is_ok()
    }

    /// Entries dom0 has mapped now (READING set).
    fn claimed(&self, grefs: impl Iterator<Item = u32>) -> usize {
        grefs
            .filter(|&g| {
                self.0
                    .load_u32(g as usize * 8, std::sync::atomic::Ordering::SeqCst)
                    .unwrap()
                    & 0x8
                    != 0
            })
            .count()
    }
}

#[test]
fn persistent_grants_stay_bounded_and_evicted_ones_can_be_revoked() {
    use dom0::grants::{DomainGrants, GrantMapper, MAX_PERSISTENT_GRANTS};
    use std::sync::Arc;

    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "pgrants".into(),
            cmdline: "idle".into(),
            start_paused: true,
            ..Default::default()
        })
        .unwrap();
    let d = Arc::clone(dom.shared());
    let table = GuestTable(
        d.ram
            .region(pv_protocol::start_info::GRANT_TABLE_GPA, 32 * 4096)
            .unwrap(),
    );
    // 200 more grants than the bound, each of its own page (32 MiB up, far from the kernel).
    let n = MAX_PERSISTENT_GRANTS as u32 + 200;
    let frame = |g: u32| 8192 + g;
    for g in 1..=n {
        table.grant(g, frame(g));
        d.ram
            .write(
                u64::from(frame(g)) * 4096,
                format!("guest page {g:05}").as_bytes(),
            )
            .unwrap();
    }
    let all = || 1..=n + 1;

    let grants = DomainGrants::persistent(Arc::clone(&d));
    // Grant 1 is in use by a request the whole time.
    let in_use = grants.map(GrantRef(1), true).unwrap();
    for g in 1..=n {
        let mut head = [0u8; 16];
        grants.copy_from(GrantRef(g), 0, &mut head).unwrap();
        assert_eq!(&head, format!("guest page {g:05}").as_bytes());
        grants
            .copy_to(GrantRef(g), 16, format!("dom0 wrote {g:05}").as_bytes())
            .unwrap();
    }
    // The cache stays at its bound; that many grants are claimed, no more.
    assert_eq!(grants.persistent_len(), MAX_PERSISTENT_GRANTS);
    assert_eq!(table.claimed(all()), MAX_PERSISTENT_GRANTS);
    // The least recently used ones were evicted (2..=201; 1 is in use, so it stays) and are
    // unpinned: the guest can end them, and they cannot be mapped after that.
    for g in 2..=201 {
        assert!(table.end(g), "grant {g} still claimed");
        assert!(grants.copy_from(GrantRef(g), 0, &mut [0u8; 4]).is_err());
    }
    for g in std::iter::once(1).chain(202..=n) {
        assert!(!table.end(g), "grant {g} could be revoked while mapped");
    }
    // What dom0 wrote reached every page, evicted or not.
    for g in 1..=n {
        let mut b = [0u8; 16];
        d.ram.read(u64::from(frame(g)) * 4096 + 16, &mut b).unwrap();
        assert_eq!(&b, format!("dom0 wrote {g:05}").as_bytes());
    }
    // Once its request is done, grant 1 is the least recently used: the next new grant evicts it.
    drop(in_use);
    table.grant(n + 1, frame(n + 1));
    grants.copy_from(GrantRef(n + 1), 0, &mut [0u8; 4]).unwrap();
    assert_eq!(grants.persistent_len(), MAX_PERSISTENT_GRANTS);
    assert!(table.end(1), "grant 1 still claimed");

    // When every cached grant is in use, a new one is mapped for its use alone, and released
    // with it.
    // (Refs the first cache never saw.)
    for g in 1300..=1304 {
        table.grant(g, frame(g));
    }
    let small = DomainGrants::persistent_with_capacity(Arc::clone(&d), 4);
    let held: Vec<_> = (1300..1304)
        .map(|g| small.map(GrantRef(g), true).unwrap())
        .collect();
    let extra = small.map(GrantRef(1304), true).unwrap();
    assert_eq!(small.persistent_len(), 4);
    assert!(!table.end(1304), "grant 1304 revocable while in use");
    drop(extra);
    assert!(table.end(1304), "grant 1304 still claimed after its use");
    for g in 1300..1304 {
        assert!(!table.end(g), "grant {g} revocable while in use");
    }
    drop(held);
    drop(small);
    for g in 1300..1304 {
        assert!(table.end(g), "grant {g} still claimed after the cache went");
    }

    // A page held for I/O keeps the domain's memory, not the domain: once destroyed and
    // released, the domain is gone while the page stays readable.
    let held = grants.map(GrantRef(300), false).unwrap();
    drop(grants);
    assert_eq!(table.claimed(all()), 1);
    let weak = Arc::downgrade(&d);
    drop(d);
    dom.destroy();
    assert!(
        weak.upgrade().is_none(),
        "the domain outlives its destruction"
    );
    // SAFETY: a MappedPage keeps its page valid for PAGE_SIZE bytes while it lives.
    let page = unsafe { SharedRegion::from_raw(held.addr(0), 4096) }.unwrap();
    let mut head = [0u8; 16];
    page.read(0, &mut head).unwrap();
    assert_eq!(&head, b"guest page 00300");
}
