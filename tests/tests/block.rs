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
