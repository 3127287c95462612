//! `splitvisord`: the dom0 daemon. Owns the hypervisor, every domain and every back end, and
//! serves the control protocol (`dom0::control`) on `<runtime dir>/control.sock` (mode 0600).
//!
//! `splitvisord [--runtime-dir DIR]` (default: `$SPLITVISOR_RUNTIME_DIR`, `/run/splitvisor` for
//! root, else `$XDG_RUNTIME_DIR/splitvisor` or `/tmp/splitvisor-<uid>`). Logs go to
//! `<runtime dir>/daemon.log` (`RUST_LOG` honoured, default `info`). Only one daemon runs per
//! runtime directory (an exclusive lock on `daemon.lock`); a socket left by a killed daemon is
//! replaced.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use dom0::control::{self, LOCK, LOG, SOCKET};
use dom0::daemon::Daemon;
use hypervisor::Hypervisor;

fn run() -> Result<(), String> {
    let mut dir = control::default_runtime_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runtime-dir" => {
                dir = PathBuf::from(args.next().ok_or("--runtime-dir needs a value")?)
            }
            "-h" | "--help" => {
                println!("usage: splitvisord [--runtime-dir DIR]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("runtime dir {}: {e}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("runtime dir {}: {e}", dir.display()))?;
    // One daemon per runtime directory: the lock is held for the life of the process.
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
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

    let log: File = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(LOG))
        .map_err(|e| format!("{}: {e}", dir.join(LOG).display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(Mutex::new(log))
        .init();

    let hv = Hypervisor::new().map_err(|e| format!("hypervisor: {}", control::chain(&e)))?;
    // We hold the lock, so a socket file here is a dead daemon's: replace it.
    let sock = dir.join(SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    tracing::info!(
        pid = std::process::id(),
        kvm = ?hv.flavour(),
        "splitvisord {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        sock.display()
    );
    Daemon::new(hv, &dir).serve(listener);
    Ok(())
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
