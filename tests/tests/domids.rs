//! Domain ids are reused (round a range, never while anything of their domain is left, and only
//! after a delay), and nothing of an earlier domain reaches the next one given its id.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use hypervisor::domid::{DomidError, DomidPool, REUSE_AFTER};
use hypervisor::grant::{self, GrantCache};
use hypervisor::{Domain, DomainConfig, Hypervisor, evtchn};
use pv_protocol::evtchn::PortState;
use pv_protocol::grant::{DomId, GrantEntryV1, GrantFlags, GrantRef};
use pv_protocol::hypercall::Errno;
use pv_protocol::start_info::GRANT_TABLE_GPA;

/// A hypervisor that gives ids from `range`, reused `delay` after release.
fn hypervisor(range: Range<u32>, delay: Duration) -> Hypervisor {
    let pool = DomidPool::new(range, delay).unwrap();
    Hypervisor::with_domids(guest_drivers::GUEST_KERNEL, pool)
        .unwrap_or_else(|e| panic!("this test boots real domains and needs /dev/kvm: {e}"))
}

/// A domain whose vCPUs never run: nothing the guest does interferes with what the test writes
/// into its memory.
fn parked(hv: &Hypervisor, name: &str) -> Domain {
    hv.create_domain(DomainConfig {
        name: name.into(),
        cmdline: "idle".into(),
        start_paused: true,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("creating {name}: {e}"))
}

fn exhausted(hv: &Hypervisor) -> DomidError {
    match hv.create_domain(DomainConfig {
        name: "one too many".into(),
        start_paused: true,
        ..Default::default()
    }) {
        Err(hypervisor::Error::Domid(e)) => e,
        Err(e) => panic!("failed, but not for want of an id: {e}"),
        Ok(d) => panic!("created domain {} although no id should be free", d.id()),
    }
}

#[test]
fn ids_go_round_a_small_range_and_a_live_id_is_never_given_twice() {
    let hv = hypervisor(1..4, Duration::ZERO);
    let mut live: VecDeque<Domain> = VecDeque::new();
    let mut given = Vec::new();
    for round in 0..8 {
        let d = parked(&hv, &format!("d{round}"));
        assert!(
            live.iter().all(|l| l.id() != d.id()),
            "id {} handed out while live",
            d.id()
        );
        assert!(Arc::ptr_eq(&hv.domain(d.id()).unwrap(), d.shared()));
        given.push(d.id());
        live.push_back(d);
        // Two live at a time: the oldest goes before the next is made.
        if live.len() == 2 {
            live.pop_front().unwrap().destroy();
        }
    }
    assert_eq!(given, [1, 2, 3, 1, 2, 3, 1, 2], "round and round");
    drop(live);
    assert_eq!(hv.domids().live(), 0);
}

#[test]
fn an_id_is_held_until_the_last_reference_to_its_domain_is_gone() {
    let hv = hypervisor(1..3, Duration::ZERO);
    let a = parked(&hv, "a");
    let _b = parked(&hv, "b");
    // As a back-end thread that has not yet let go holds it.
    let remains = Arc::clone(a.shared());
    a.destroy();
    assert_eq!(
        exhausted(&hv),
        DomidError::Exhausted {
            live: 2,
            recent: 0,
            reuse_after: Duration::ZERO
        }
    );
    drop(remains);
    assert_eq!(parked(&hv, "c").id(), 1);
}

#[test]
fn an_id_is_not_reused_within_the_delay() {
    let hv = hypervisor(1..3, REUSE_AFTER);
    let a = parked(&hv, "a");
    assert_eq!(a.id(), 1);
    a.destroy();
    let b = parked(&hv, "b");
    assert_eq!(b.id(), 2, "1 was freed less than {REUSE_AFTER:?} ago");
    b.destroy();
    assert_eq!(
        exhausted(&hv),
        DomidError::Exhausted {
            live: 0,
            recent: 2,
            reuse_after: REUSE_AFTER
        }
    );
}

#[test]
fn the_next_domain_with_an_id_cannot_bind_ports_offered_to_the_last() {
    let hv = hypervisor(1..3, Duration::ZERO);
    let a = parked(&hv, "a");
    let b = parked(&hv, "b");
    let offered = evtchn::alloc_unbound(a.shared(), b.id()).unwrap();
    let connected = evtchn::alloc_unbound(a.shared(), b.id()).unwrap();
    evtchn::bind_interdomain(b.shared(), a.id(), connected).unwrap();
    let old = b.id();
    b.destroy();
    // Offered while nobody has the id.
    let meanwhile = evtchn::alloc_unbound(a.shared(), old).unwrap();
    let c = parked(&hv, "c");
    assert_eq!(c.id(), old);
    for port in [offered, connected, meanwhile] {
        assert_eq!(
            evtchn::bind_interdomain(c.shared(), a.id(), port),
            Err(Errno::EINVAL),
            "port {port}"
        );
        assert_eq!(
            evtchn::status(a.shared(), port).unwrap(),
            PortState::Unbound {
                dom: DomId::INVALID
            }
        );
    }
    // A port offered to the new domain itself is its to bind.
    let fresh = evtchn::alloc_unbound(a.shared(), c.id()).unwrap();
    evtchn::bind_interdomain(c.shared(), a.id(), fresh).unwrap();
}

/// Grants page `frame` of `d` to dom0 as `gref`, read-only, with `text` in it (what a guest
/// would do; the domain is parked, so the test writes its memory for it).
fn grant_page(d: &Domain, gref: u32, frame: u32, text: &[u8]) {
    let ram = &d.shared().ram;
    ram.write(u64::from(frame) * 4096, text).unwrap();
    let entry = GrantEntryV1 {
        flags: (GrantFlags::PERMIT_ACCESS | GrantFlags::READONLY).bits(),
        domid: 0,
        frame,
    };
    ram.write_obj(GRANT_TABLE_GPA + u64::from(gref) * 8, &entry)
        .unwrap();
}

#[test]
fn a_persistent_grant_cache_never_answers_for_an_earlier_domain_with_the_same_id() {
    let hv = hypervisor(1..2, Duration::ZERO);
    let cache = GrantCache::default();
    let frame = 0x3000; // 48 MiB into the default 64 MiB
    let a = parked(&hv, "a");
    grant_page(&a, 5, frame, b"old domain");
    let mut text = [0u8; 10];
    cache
        .get(a.shared(), GrantRef(5), 0, true)
        .unwrap()
        .read(0, &mut text)
        .unwrap();
    assert_eq!(&text, b"old domain");
    a.destroy();
    let b = parked(&hv, "b");
    assert_eq!(b.id(), 1, "the same id");
    grant_page(&b, 5, frame, b"new domain");
    cache
        .get(b.shared(), GrantRef(5), 0, true)
        .unwrap()
        .read(0, &mut text)
        .unwrap();
    assert_eq!(&text, b"new domain");
    assert_eq!(cache.len(), 1);
}

#[test]
fn a_page_pinned_for_io_holds_its_destroyed_domains_id() {
    let hv = hypervisor(1..2, Duration::ZERO);
    let a = parked(&hv, "a");
    grant_page(&a, 5, 0x3000, b"in flight");
    // As a block write the kernel has not completed keeps its page (a drain thread's).
    let pinned = grant::map(a.shared(), GrantRef(5), 0, true)
        .unwrap()
        .pin()
        .unwrap();
    a.destroy();
    assert!(hv.domain(1).is_none());
    assert_eq!(
        exhausted(&hv),
        DomidError::Exhausted {
            live: 1,
            recent: 0,
            reuse_after: Duration::ZERO
        },
        "the id came back while its domain's memory may still be written"
    );
    drop(pinned);
    assert_eq!(parked(&hv, "b").id(), 1);
}

#[test]
fn a_domain_that_fails_half_way_through_creation_gives_its_id_back() {
    let hv = hypervisor(1..2, Duration::ZERO);
    // Two ports: the store ring gets one, the console ring none, after the domain is built.
    let e = hv
        .create_domain(DomainConfig {
            name: "short of ports".into(),
            max_ports: 2,
            start_paused: true,
            ..Default::default()
        })
        .expect_err("two ports are too few");
    assert!(e.to_string().contains("console port"), "{e}");
    assert_eq!(hv.domids().live(), 0);
    assert!(hv.domain(1).is_none());
    assert_eq!(parked(&hv, "next").id(), 1);
}
