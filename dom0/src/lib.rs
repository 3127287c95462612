//! Splitvisor's control domain (dom0): the back-ends that serve guests' PV devices.
//!
//! Back-ends are written against small traits ([`grants::GrantMapper`], a ring endpoint from
//! pv-protocol, a notifier), never against KVM or guest memory directly, so the same code can
//! later run in its own process.
#![deny(missing_docs)]

pub mod balloon;
pub mod blkback;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod grants;
pub mod netback;
pub mod peer;
pub mod switch;
pub mod tap;
pub mod vbd;
pub mod vif;
pub mod xenbus;
pub mod xlcfg;

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
}
