//! Splitvisor's control domain (dom0): the back-ends that serve guests' PV devices.
//!
//! Back-ends are written against small traits ([`grants::GrantMapper`], a ring endpoint from
//! pv-protocol, a notifier), never against KVM or guest memory directly, so the same code can
//! later run in its own process.
#![deny(missing_docs)]

pub mod balloon;
pub mod blkback;
pub mod daemon;
pub mod disk;
pub mod grants;
pub mod netback;
pub mod notify;
pub mod switch;
pub mod tap;
pub mod vbd;
pub mod vif;
pub mod xenbus;

// The control protocol, the domain-file parser and the trust checks live in the light API crate
// (which `xl` uses alone); re-exported so the daemon's paths stay `dom0::control` and so on.
pub use splitvisor_api::{control, peer, xlcfg};

#[cfg(test)]
pub(crate) mod test_util {
    /// How many times thread `tid` of this process went to sleep (its voluntary context
    /// switches): each sleep is one, so the count grows by one per wake-up.
    pub(crate) fn context_switches(tid: libc::pid_t) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    /// The id of this process's thread called `name` (the first one, if several).
    pub(crate) fn thread_named(name: &str) -> Option<libc::pid_t> {
        std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim_end() == name)
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
    }
}
