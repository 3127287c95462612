//! Helpers for the end-to-end scenarios in `tests/`.
#![deny(missing_docs)]

use std::process::Command;

use hypervisor::{Domain, DomainConfig, Hypervisor};

/// A command for the host tool `tool`, or a failed test with one line naming the Debian package
/// that provides it (`scripts/test` installs them all).
pub fn tool(tool: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    });
    assert!(
        found,
        "this test needs `{tool}`: install the Debian package {package} (scripts/test does)"
    );
    Command::new(tool)
}

/// Opens KVM, or fails the test with a clear message: these scenarios need a real `/dev/kvm`
/// and must never skip silently.
pub fn hypervisor() -> Hypervisor {
    match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) => panic!(
            "this test boots real domains and needs /dev/kvm: {e} ({})",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        ),
    }
}

/// Boots a domain called `name` running the guest job `cmdline`, with default resources.
pub fn domain(hv: &Hypervisor, name: &str, cmdline: &str) -> Domain {
    hv.create_domain(DomainConfig {
        name: name.into(),
        cmdline: cmdline.into(),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("creating domain {name}: {e}"))
}
