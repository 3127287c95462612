//! `splitvisord`: the dom0 daemon. Owns the hypervisor, every domain and every back end, and
//! serves the control protocol (`dom0::control`) on `<runtime dir>/control.sock` (mode 0600).
//!
//! `splitvisord [--runtime-dir DIR] [--group NAME]` (default: `$SPLITVISOR_RUNTIME_DIR`,
//! `/run/splitvisor` for root, else `$XDG_RUNTIME_DIR/splitvisor` or `/tmp/splitvisor-<uid>`).
//! Logs go to `<runtime dir>/daemon.log` (`RUST_LOG` honoured, default `info`). Only one daemon
//! runs per runtime directory (an exclusive lock on `daemon.lock`); a socket left by a killed
//! daemon is replaced.
//!
//! Who may connect: root and the daemon's own user, checked on every connection from the
//! kernel's `SO_PEERCRED`; with `--group NAME` also that group's members (the runtime directory
//! becomes 0710 and the socket 0660, both of that group, as `dockerd -G` does). The runtime
//! directory must be a real directory that only its owner (the daemon's user or root) can
//! write; files in it are never opened through a symlink.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use dom0::control::{self, LOCK, LOG, SOCKET};
use dom0::daemon::Daemon;
use dom0::peer::{self, Access};
use hypervisor::Hypervisor;

fn run() -> Result<(), String> {
    let mut dir = control::default_runtime_dir();
    let mut group = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runtime-dir" => {
                dir = PathBuf::from(args.next().ok_or("--runtime-dir needs a value")?)
            }
            "--group" | "-G" => group = Some(args.next().ok_or("--group needs a group name")?),
            "-h" | "--help" => {
                println!("usage: splitvisord [--runtime-dir DIR] [--group NAME]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    one_malloc_arena();
    raise_fd_limit();
    let access = Access::new(group.as_deref()).map_err(|e| control::chain(&e))?;
    peer::make_runtime_dir(&dir).map_err(|e| control::chain(&e))?;
    // With a group, its members may reach the socket (and nothing else in the directory).
    let dir_mode = if access.group().is_some() {
        0o710
    } else {
        0o700
    };
    if let Some((_, gid)) = access.group() {
        chown_group(&dir, gid)?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(dir_mode))
        .map_err(|e| format!("runtime dir {}: {e}", dir.display()))?;
    // One daemon per runtime directory: the lock is held for the life of the process.
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(LOCK))
        .map_err(|e| format!("{}: {e}", dir.join(LOCK).display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(dir.join(LOCK)).unwrap_or_default();
        return Err(format!(
            "another splitvisord (pid {}) runs on {}",
            pid.trim(),
            dir.display()
        ));
    }
    lock.set_len(0).map_err(|e| e.to_string())?;
    writeln!(lock, "{}", std::process::id()).map_err(|e| e.to_string())?;

    let log: File = peer::open_append_nofollow(&dir.join(LOG))
        .map_err(|e| format!("{}: {e}", dir.join(LOG).display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(Mutex::new(log))
        .init();

    let hv = Hypervisor::new(guest_drivers::GUEST_KERNEL)
        .map_err(|e| format!("hypervisor: {}", control::chain(&e)))?;
    // We hold the lock, so a socket file here is a dead daemon's: replace it.
    let sock = dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let sock_mode = match access.group() {
        Some((_, gid)) => {
            chown_group(&sock, gid)?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(sock_mode))
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    tracing::info!(
        pid = std::process::id(),
        kvm = ?hv.flavour(),
        "splitvisord {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        sock.display()
    );
    Daemon::new(hv, &dir, access).serve(listener);
    Ok(())
}

/// Raises the soft limit on open files to the hard one: every domain holds a dozen descriptors
/// (VM, vCPUs, memory, eventfds, io_uring, images), so the usual 1024 would stop at ~80 domains.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("splitvisord: cannot raise the open-file limit from {soft} to {hard}: {e}");
    }
}

/// Keeps every thread on glibc's main malloc arena. All domains' guest memory is mapped in this
/// one process, and KVM registers an MMU notifier per domain, so every change to the address
/// space (mprotect, munmap, madvise) is announced to every domain's KVM: O(domains) each. Per-
/// thread arenas grow with mprotect and shrink with madvise, many times per request (a `list` of
/// 1000 domains took 250 ms, nearly all of it in those notifiers), while the main arena grows with
/// brk, which announces nothing. The cost is one lock for all allocations, which the back ends'
/// small per-request allocations (segment lists, mapping handles) share: see
/// `benchmarks/results/density.md` for the A/B on the data path.
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        eprintln!(
            "splitvisord: cannot limit malloc to one arena (address-space changes will be slower)"
        );
    }
}

/// Gives `path` (not following a symlink) to group `gid`, keeping its owner.
fn chown_group(path: &Path, gid: u32) -> Result<(), String> {
    std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("splitvisord: {e}");
            ExitCode::FAILURE
        }
    }
}
