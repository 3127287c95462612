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
    match Hypervisor::new(guest_drivers::GUEST_KERNEL) {
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

/// How many times thread `tid` of this process went to sleep (its voluntary context switches;
/// each wake-up from a sleep adds one); `None` once the thread is gone.
pub fn context_switches(tid: libc::pid_t) -> Option<u64> {
    proc_switches(&format!("/proc/self/task/{tid}"))
}

/// Voluntary context switches of the task whose `/proc` directory is `dir`.
fn proc_switches(dir: &str) -> Option<u64> {
    std::fs::read_to_string(format!("{dir}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// Every thread of process `pid` (`"self"` for this one): id, name and voluntary context
/// switches so far.
pub fn threads(pid: &str) -> std::collections::BTreeMap<libc::pid_t, (String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .filter_map(|e| {
            let e = e.ok()?;
            let tid = e.file_name().to_str()?.parse().ok()?;
            let dir = e.path().to_string_lossy().into_owned();
            let name = std::fs::read_to_string(format!("{dir}/comm")).ok()?;
            Some((tid, (name.trim_end().to_owned(), proc_switches(&dir)?)))
        })
        .collect()
}

/// The threads of process `pid` whose name satisfies `pick`, with how often each woke between
/// two looks `quiet` apart (a thread that started meanwhile counts from zero).
pub fn wake_ups(
    pid: &str,
    pick: impl Fn(&str) -> bool,
    quiet: std::time::Duration,
) -> Vec<(String, u64)> {
    let before = threads(pid);
    std::thread::sleep(quiet);
    threads(pid)
        .into_iter()
        .filter(|(_, (name, _))| pick(name))
        .map(|(tid, (name, n))| {
            let was = before.get(&tid).map_or(0, |b| b.1);
            (name, n.saturating_sub(was))
        })
        .collect()
}
