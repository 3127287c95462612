//! A write acknowledged after a flush survives `kill -9` of the process running the back end.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pv_protocol::blkif::{VERIFY_REGIONS, verify_pattern};

#[test]
fn flushed_writes_survive_kill_9_of_the_vmm_process() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test boots a real domain and needs /dev/kvm"
    );
    let dir = std::env::temp_dir().join(format!("sv-durable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("xvda.img");
    let mut child = Command::new(env!("CARGO_BIN_EXE_splitvisor-boot"))
        .args(["--timeout", "120", "--disk"])
        .arg(format!("{},size=16", img.display()))
        .arg("blkwrite")
        .env("RUST_LOG", "error")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let start = Instant::now();
    let mut seen = String::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("blkwrite: flushed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no flush:\n{seen}"
        );
    }
    assert!(seen.contains("blkwrite: flushed"), "{seen}");
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());

    // A fresh look at the image: every flushed region is there.
    let bytes = std::fs::read(&img).unwrap();
    for (i, (sector, segs)) in VERIFY_REGIONS.iter().enumerate() {
        if i == 2 {
            continue;
        }
        let mut off = sector * 512;
        for &(_, first, last) in *segs {
            for _ in u64::from(first) * 512..(u64::from(last) + 1) * 512 {
                assert_eq!(
                    bytes[off as usize],
                    verify_pattern(off),
                    "region {i}, byte {off}"
                );
                off += 1;
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
