//! Helpers for the end-to-end scenarios in `tests/`.
#![deny(missing_docs)]

use hypervisor::{Domain, DomainConfig, Hypervisor};

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
