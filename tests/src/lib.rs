//! Helpers for the end-to-end scenarios in `tests/`.
#![deny(missing_docs)]

use hypervisor::Hypervisor;

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
