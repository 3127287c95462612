//! Block devices end to end: a real guest, its blkfront, dom0's blockback on io_uring, a real
//! sparse image file.

use std::time::Duration;

use dom0::disk::Disk;
use dom0::vbd::{Vbd, state};
use hypervisor::{DomainConfig, DomainState};
use pv_protocol::blkif::{VERIFY_REGIONS, verify_pattern};
use splitvisor_tests::hypervisor;

const T: Duration = Duration::from_secs(60);

#[test]
fn the_demo_with_a_disk_and_a_vif_runs_in_a_domain_of_the_smallest_size() {
    use pv_protocol::start_info::MIN_MEM_MIB;
    let dir = std::env::temp_dir().join(format!("sv-small-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("xvda.img");
    Disk::create_sparse(&img, 16 << 20).unwrap();
    let hv = hypervisor();
    let sw = std::sync::Arc::new(dom0::switch::Switch::new("br-demo").unwrap());
    let dom = hv
        .create_domain(DomainConfig {
            name: "demo".into(),
            mem_mib: MIN_MEM_MIB,
            cmdline: "demo".into(),
            ..Default::default()
        })
        .unwrap();
    let _vbd = Vbd::attach(hv.store(), dom.shared(), 51712, &img, false).unwrap();
    let _vif = dom0::vif::Vif::attach(hv.store(), dom.shared(), 0, None, &sw).unwrap();
    let state = dom.wait(T);
    let text = dom.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: 0, .. }),
        "{state:?}\n{text}"
    );
    assert!(text.contains("demo: all checks passed"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn blkverify_passes_and_the_image_holds_exactly_what_the_guest_wrote() {
    let dir = std::env::temp_dir().join(format!("sv-blkverify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("xvda.img");
    Disk::create_sparse(&img, 16 << 20).unwrap();

    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "blk".into(),
            cmdline: "blkverify".into(),
            ..Default::default()
        })
        .unwrap();
    let vbd = Vbd::attach(hv.store(), dom.shared(), 51712, &img, false).unwrap();
    let state = dom.wait(T);
    let text = dom.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: 0, .. }),
        "{state:?}\n{text}"
    );
    assert!(text.contains("blkverify: 14 passed, 0 failed"), "{text}");
    assert_eq!(
        vbd.frontend_state(),
        Some(4),
        "the front end reached Connected"
    );
    // blkverify connects with a 4-page ring (ring-page-order 2).
    let order = format!(
        "/local/domain/{}/device/vbd/51712/ring-page-order",
        dom.id()
    );
    assert_eq!(hv.store().read(0, 0, &order).unwrap(), b"2");
    // It takes every queue the back end offers (one per host core, up to 4 in the guest), each
    // with its own ring and channel in `queue-N/`; requests rotate over them.
    let queues = dom0::vbd::max_queues().min(4);
    assert!(
        text.contains(&format!("{queues} queue(s)")),
        "expected {queues} queues:\n{text}"
    );
    let fe = format!("/local/domain/{}/device/vbd/51712", dom.id());
    if queues > 1 {
        let nq = hv
            .store()
            .read(0, 0, &format!("{fe}/multi-queue-num-queues"))
            .unwrap();
        assert_eq!(nq, queues.to_string().as_bytes());
        for q in 0..queues {
            for key in ["event-channel", "ring-ref0", "ring-ref3"] {
                let p = format!("{fe}/queue-{q}/{key}");
                assert!(hv.store().read(0, 0, &p).is_ok(), "{p} missing");
            }
        }
    }
    drop(dom);
    // The back end notices the domain's end, releases everything and says Closed.
    let t = std::time::Instant::now();
    while vbd.backend_state() != Some(state::CLOSED) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(vbd.backend_state(), Some(state::CLOSED));
    drop(vbd);
    // Detaching removes the back-end directory too.
    assert!(
        hv.store()
            .directory(0, 0, "/local/domain/0/backend/vbd")
            .unwrap()
            .is_empty()
    );

    // The host reads the image directly: every written region holds the pattern, the discarded
    // one reads as zeros, and nothing else was touched.
    let bytes = std::fs::read(&img).unwrap();
    let mut written = vec![false; bytes.len()];
    for (i, (sector, segs)) in VERIFY_REGIONS.iter().enumerate() {
        let mut off = sector * 512;
        for &(_, first, last) in *segs {
            for _ in u64::from(first) * 512..(u64::from(last) + 1) * 512 {
                let want = if i == 2 { 0 } else { verify_pattern(off) };
                assert_eq!(bytes[off as usize], want, "region {i}, byte {off}");
                written[off as usize] = true;
                off += 1;
            }
        }
    }
    assert!(
        bytes.iter().zip(&written).all(|(&b, &w)| w || b == 0),
        "bytes outside the written regions are untouched"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_domains_with_their_own_disks_and_a_read_only_disk_refusing_writes() {
    let dir = std::env::temp_dir().join(format!("sv-blk2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rw_img, ro_img) = (dir.join("a.img"), dir.join("b.img"));
    Disk::create_sparse(&rw_img, 16 << 20).unwrap();
    // The read-only image holds the pattern in region 1, written by the host.
    let mut content = vec![0u8; 16 << 20];
    let (sector, segs) = VERIFY_REGIONS[1];
    let mut off = sector * 512;
    for &(_, first, last) in segs {
        for _ in u64::from(first) * 512..(u64::from(last) + 1) * 512 {
            content[off as usize] = verify_pattern(off);
            off += 1;
        }
    }
    std::fs::write(&ro_img, &content).unwrap();

    let hv = hypervisor();
    let cfg = |name: &str, cmd: &str| DomainConfig {
        name: name.into(),
        cmdline: cmd.into(),
        ..Default::default()
    };
    let a = hv.create_domain(cfg("a", "blkverify")).unwrap();
    let b = hv.create_domain(cfg("b", "blkro")).unwrap();
    let va = Vbd::attach(hv.store(), a.shared(), 51712, &rw_img, false).unwrap();
    let vb = Vbd::attach(hv.store(), b.shared(), 51712, &ro_img, true).unwrap();
    // Nobody else may open a.img writable (or at all, while it is), nor b.img writable.
    assert!(Vbd::attach(hv.store(), b.shared(), 51728, &rw_img, true).is_err());
    assert!(Vbd::attach(hv.store(), a.shared(), 51728, &ro_img, false).is_err());
    for (d, summary) in [
        (&a, "blkverify: 14 passed, 0 failed"),
        (&b, "blkro: 3 passed, 0 failed"),
    ] {
        let state = d.wait(T);
        let text = d.console().text();
        assert!(
            matches!(state, DomainState::Shutdown { code: 0, .. }),
            "{state:?}\n{text}"
        );
        assert!(text.contains(summary), "{text}");
    }
    drop((va, vb));
    assert_eq!(
        std::fs::read(&ro_img).unwrap(),
        content,
        "the read-only image is unchanged"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A front end that lies in the handshake (too many queues, a ring order past the limit, a ring
/// made of ungranted pages) gets its device closed and a fault on its account; the back end
/// never connects, and the domain keeps running.
#[test]
fn a_hostile_handshake_is_refused_and_the_device_closed() {
    let dir = std::env::temp_dir().join(format!("sv-blkhs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("a.img");
    Disk::create_sparse(&img, 1 << 20).unwrap();
    let hv = hypervisor();
    let dom = hv
        .create_domain(DomainConfig {
            name: "hs".into(),
            cmdline: "ticker".into(),
            ..Default::default()
        })
        .unwrap();
    let fe = format!("/local/domain/{}/device/vbd", dom.id());
    let bad: [&[(&str, &str)]; 3] = [
        &[("multi-queue-num-queues", "9"), ("event-channel", "1")],
        &[("ring-page-order", "5"), ("event-channel", "1")],
        &[("ring-ref", "4000"), ("event-channel", "1")],
    ];
    for (i, keys) in bad.iter().enumerate() {
        let devid = 51712 + 16 * i as u32;
        let vbd = Vbd::attach(hv.store(), dom.shared(), devid, &img, false).unwrap();
        // The toolstack (dom0) impersonates a hostile front end writing its keys.
        for (k, v) in keys.iter() {
            hv.store()
                .write(0, 0, &format!("{fe}/{devid}/{k}"), v.as_bytes())
                .unwrap();
        }
        hv.store()
            .write(0, 0, &format!("{fe}/{devid}/state"), b"3")
            .unwrap();
        let t = std::time::Instant::now();
        while vbd.backend_state() != Some(state::CLOSED) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(vbd.backend_state(), Some(state::CLOSED), "case {i}");
        assert_eq!(
            dom.shared().fault_count("vbd-handshake"),
            i as u64 + 1,
            "case {i}"
        );
        drop(vbd);
    }
    assert!(!dom.state().is_final(), "{:?}", dom.state());
    drop(dom);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `blkhostile` summary lines so far: (pass, requests, refused as expected, unexpected).
fn hostile_summaries(text: &str) -> Vec<(u64, u64, u64, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("blkhostile: pass "))
        .filter_map(|l| {
            let n: Vec<u64> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            (n.len() == 4).then(|| (n[0], n[1], n[2], n[3]))
        })
        .collect()
}

#[test]
fn a_hostile_block_front_end_gets_defined_errors_while_a_bystander_verifies_its_disk() {
    let dir = std::env::temp_dir().join(format!("sv-blkhostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (bad_img, good_img) = (dir.join("hostile.img"), dir.join("bystander.img"));
    Disk::create_sparse(&bad_img, 16 << 20).unwrap();
    Disk::create_sparse(&good_img, 16 << 20).unwrap();
    let hv = hypervisor();
    // A summary after every pass.
    let hostile = hv
        .create_domain(DomainConfig {
            name: "blkhostile".into(),
            cmdline: "blkhostile 1".into(),
            ..Default::default()
        })
        .unwrap();
    let hostile_vbd = Vbd::attach(hv.store(), hostile.shared(), 51712, &bad_img, false).unwrap();
    assert!(
        hostile.console().wait_for("blkhostile: pass 1,", T),
        "{}",
        hostile.console().text()
    );

    // Bystanders verify their own disks while the hostile guest keeps attacking.
    for round in 0..2 {
        let by = hv
            .create_domain(DomainConfig {
                name: format!("bystander{round}"),
                cmdline: "blkverify".into(),
                ..Default::default()
            })
            .unwrap();
        let vbd = Vbd::attach(hv.store(), by.shared(), 51712, &good_img, false).unwrap();
        let state = by.wait(T);
        let text = by.console().text();
        assert!(
            matches!(state, DomainState::Shutdown { code: 0, .. }),
            "{state:?}\n{text}"
        );
        assert!(text.contains("blkverify: 14 passed, 0 failed"), "{text}");
        drop(by);
        drop(vbd);
    }
    // The hostile guest kept going meanwhile: more passes, all answers as defined.
    let passes_seen = hostile_summaries(&hostile.console().text()).len() as u64;
    assert!(
        hostile
            .console()
            .wait_for(&format!("blkhostile: pass {},", passes_seen + 1), T),
        "{}",
        hostile.console().text()
    );
    let key = format!("/local/domain/{}/control/shutdown", hostile.id());
    hv.store().write(0, 0, &key, b"poweroff").unwrap();
    let state = hostile.wait(T);
    let text = hostile.console().text();
    assert!(
        matches!(state, DomainState::Shutdown { code: 0, .. }),
        "{state:?}\n{text}"
    );
    assert!(!text.contains("blkhostile: unexpected"), "{text}");
    let sums = hostile_summaries(&text);
    assert!(sums.len() >= 2, "{text}");
    for (i, &(pass, requests, refused, unexpected)) in sums.iter().enumerate() {
        assert_eq!(pass, i as u64 + 1, "{text}");
        assert_eq!(unexpected, 0, "{text}");
        // Each pass sends 2 ring-fulls of indirect requests, 1500 churned grants and 19 malformed
        // requests (and 8 using revoked grants), all answered.
        assert!(requests >= pass * (2 * 128 + 1500 + 19 + 8), "{text}");
        assert!(refused >= pass * (19 + 8), "{text}");
    }
    // The host kept serving: the hostile guest's device closes normally at its end.
    drop(hostile);
    let t = std::time::Instant::now();
    while hostile_vbd.backend_state() != Some(state::CLOSED) && t.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(hostile_vbd.backend_state(), Some(state::CLOSED));
    drop(hostile_vbd);
    std::fs::remove_dir_all(&dir).unwrap();
}
