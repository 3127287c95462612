//! Who is on the other end of the control socket, and who may use it.
//!
//! The daemon reads the connecting process's credentials from the kernel (`SO_PEERCRED`, which
//! it cannot fake) and serves only root, the daemon's own user, and members of one group named
//! in its configuration (`splitvisord --group NAME`, as `dockerd -G`). `xl` checks the other way
//! round: the daemon it talks to must run as root or as the same user ([`daemon_is_trusted`]),
//! and the runtime directory must be one nobody else can write ([`check_runtime_dir`]).

use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Group, Uid, User};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// `SO_PEERCRED` failed.
    #[error("cannot read the peer's credentials")]
    Cred(#[source] std::io::Error),
    /// The configured group does not exist.
    #[error("no group {0:?}")]
    NoGroup(String),
    /// Looking the group up failed.
    #[error("looking up group {0:?}")]
    Lookup(String, #[source] std::io::Error),
    /// The runtime directory cannot be trusted.
    #[error("runtime directory {0}: {1}")]
    Dir(String, String),
}

/// The kernel's word on who connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// The credentials of the process at the other end of a connected Unix socket.
pub fn peer_cred(sock: &impl AsFd) -> Result<Cred, PeerError> {
    let c = getsockopt(sock, PeerCredentials).map_err(|e| PeerError::Cred(e.into()))?;
    Ok(Cred {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// The daemon's access rule: root, its own user, and members of an optional group.
#[derive(Debug, Clone)]
pub struct Access {
    uid: u32,
    group: Option<(String, u32)>,
}

impl Access {
    /// Root and this process's user, plus the members of `group` when named.
    pub fn new(group: Option<&str>) -> Result<Self, PeerError> {
        let group = match group {
            None => None,
            Some(name) => {
                let g = Group::from_name(name)
                    .map_err(|e| PeerError::Lookup(name.into(), e.into()))?
                    .ok_or_else(|| PeerError::NoGroup(name.into()))?;
                Some((name.to_owned(), g.gid.as_raw()))
            }
        };
        Ok(Self {
            uid: Uid::effective().as_raw(),
            group,
        })
    }

    /// The group whose members are served, if one is configured.
    pub fn group(&self) -> Option<(&str, u32)> {
        self.group.as_ref().map(|(n, g)| (n.as_str(), *g))
    }

    /// Whether `c` may use the daemon; the reason when not.
    pub fn check(&self, c: &Cred) -> Result<(), String> {
        if c.uid == 0 || c.uid == self.uid {
            return Ok(());
        }
        if let Some((_, gid)) = &self.group
            && (c.gid == *gid || user_in_group(c.uid, *gid))
        {
            return Ok(());
        }
        let also = match &self.group {
            Some((name, _)) => format!(", nor in group {name}"),
            None => String::new(),
        };
        Err(format!(
            "uid {} (pid {}) is not root, not the daemon's uid {}{also}",
            c.uid, c.pid, self.uid
        ))
    }
}

/// Whether user `uid` is a member of group `gid` (primary or supplementary, as the system's
/// group database says now).
fn user_in_group(uid: u32, gid: u32) -> bool {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    if user.gid.as_raw() == gid {
        return true;
    }
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return false;
    };
    nix::unistd::getgrouplist(&name, user.gid).is_ok_and(|gs| gs.contains(&Gid::from_raw(gid)))
}

/// Whether a daemon running as `daemon_uid` may be trusted by this process: root's, or our own
/// user's (a daemon of another user could read every console keystroke).
pub fn daemon_is_trusted(daemon_uid: u32) -> bool {
    daemon_uid == 0 || daemon_uid == Uid::effective().as_raw()
}

/// Checks that `dir` can be trusted with the control socket and the daemon's files: a real
/// directory (not a symlink), owned by us or by root, and writable by its owner only. A
/// directory of our own (not root's) must be exactly 0700, as a per-user runtime directory is.
pub fn check_runtime_dir(dir: &Path) -> Result<(), PeerError> {
    let bad = |why: String| PeerError::Dir(dir.display().to_string(), why);
    let m = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    if m.file_type().is_symlink() {
        return Err(bad("is a symlink".into()));
    }
    if !m.is_dir() {
        return Err(bad("is not a directory".into()));
    }
    let me = Uid::effective().as_raw();
    let mode = m.permissions().mode() & 0o7777;
    if m.uid() != me && m.uid() != 0 {
        return Err(bad(format!(
            "belongs to uid {}, not to us (uid {me}) or root",
            m.uid()
        )));
    }
    if mode & 0o022 != 0 {
        return Err(bad(format!("mode {mode:04o}: others may write to it")));
    }
    if m.uid() == me && me != 0 && mode != 0o700 {
        return Err(bad(format!("mode {mode:04o}: must be 0700")));
    }
    Ok(())
}

/// Creates `dir` (mode 0700; its parents as usual) unless it exists, then checks it
/// ([`check_runtime_dir`]).
pub fn make_runtime_dir(dir: &Path) -> Result<(), PeerError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| PeerError::Dir(dir.display().to_string(), e.to_string()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(PeerError::Dir(dir.display().to_string(), e.to_string())),
    }
    check_runtime_dir(dir)
}

/// Opens `path` for appending (created 0600), refusing to follow a symlink at its last
/// component: files in the runtime directory are never opened through a planted link.
pub fn open_append_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_credentials_are_the_kernels() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = peer_cred(&a).unwrap();
        assert_eq!(c.pid, std::process::id() as i32);
        assert_eq!(c.uid, Uid::effective().as_raw());
        assert_eq!(c.gid, Gid::effective().as_raw());
    }

    #[test]
    fn access_takes_root_and_our_user_and_the_group_only() {
        let a = Access {
            uid: 1000,
            group: None,
        };
        let cred = |uid, gid| Cred { pid: 1, uid, gid };
        assert!(a.check(&cred(0, 0)).is_ok());
        assert!(a.check(&cred(1000, 1000)).is_ok());
        let e = a.check(&cred(1001, 1001)).unwrap_err();
        assert!(e.contains("uid 1001"), "{e}");
        let g = Access {
            uid: 1000,
            group: Some(("sv".into(), 4242)),
        };
        assert!(g.check(&cred(1001, 4242)).is_ok());
        assert!(g.check(&cred(1001, 1001)).unwrap_err().contains("group sv"));
    }

    #[test]
    fn runtime_dirs_others_could_touch_are_refused() {
        let base = std::env::temp_dir().join(format!("sv-peer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let d = base.join("run");
        make_runtime_dir(&d).unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_runtime_dir(&d).unwrap_err().to_string();
        assert!(e.contains("others may write"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = make_runtime_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        // A planted symlink in the directory is not followed.
        let victim = base.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("daemon.out")).unwrap();
        let e = open_append_nofollow(&d.join("daemon.out")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
