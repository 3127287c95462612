//! Builds the guest kernel (`kernel/`, a freestanding binary) with a nested cargo into this
//! crate's OUT_DIR, so that `GUEST_KERNEL` can embed it. A separate target directory keeps the
//! nested build off the outer build's lock.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for dep in [
        "kernel/src",
        "kernel/link.ld",
        "kernel/build.rs",
        "kernel/Cargo.toml",
        "../pv-protocol/src",
    ] {
        println!("cargo:rerun-if-changed={}", here.join(dep).display());
    }
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(here.join("kernel"))
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "splitvisor-guest",
            "--target-dir",
        ])
        .arg(&target_dir);
    // What the outer build set for itself (clippy's wrapper, its flags) is not for the guest.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the guest kernel");
    assert!(
        status.success(),
        "building the guest kernel failed: {status}"
    );
    let image = target_dir.join("release/splitvisor-guest");
    std::fs::copy(&image, out.join("splitvisor-guest")).expect("copy the guest kernel image");
}
