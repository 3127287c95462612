//! Who is on the other end of the control socket, and who may use it.
//!
//! The daemon reads the connecting process's credentials from the kernel (`SO_PEERCRED`, which
//! it cannot fake) and serves only root, the daemon's own user, and members of one group named
//! in its configuration (`splitvisord --group NAME`, as `dockerd -G`). `xl` checks the other way
//! round: the daemon it talks to must run as root or as the same user ([`daemon_is_trusted`]),
//! and the runtime directory must be one nobody else can write ([`check_runtime_dir`]).
//!
//! A group member is not the daemon's equal: the files it names (kernels, disk images) are
//! opened with its own filesystem identity ([`as_user`]), so it can use only files it could
//! open itself.

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
    /// Taking on a user's filesystem identity failed.
    #[error("cannot act as uid {0}")]
    Identity(u32, #[source] std::io::Error),
    /// A daemon that is not root cannot open files as someone else.
    #[error(
        "uid {0} may not name files: this daemon does not run as root, so it cannot open them as that user"
    )]
    NotRoot(u32),
}

/// What a peer the daemon serves may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Root or the daemon's own user: files it names are opened as the daemon.
    Owner,
    /// A member of the configured group: files it names are opened as that user.
    Member(Cred),
}

impl Role {
    /// Runs `f`, which opens files a request named, with the identity those files must be opened
    /// with (see [`as_user`]).
    pub fn open_files<R>(&self, f: impl FnOnce() -> R) -> Result<R, PeerError> {
        match self {
            Role::Owner => Ok(f()),
            Role::Member(c) => as_user(c, f),
        }
    }
}

/// Runs `f` with this thread's filesystem identity (fsuid, fsgid and supplementary groups; the
/// kernel keeps them per thread) set to `who`'s, so that the files `f` opens are only those
/// `who` could open itself; restores the thread's own afterwards. Only root can do this.
pub fn as_user<R>(who: &Cred, f: impl FnOnce() -> R) -> Result<R, PeerError> {
    if !Uid::effective().is_root() {
        return Err(PeerError::NotRoot(who.uid));
    }
    let groups = groups_of(who);
    let saved = nix::unistd::getgroups().map_err(|e| PeerError::Identity(who.uid, e.into()))?;
    let saved: Vec<libc::gid_t> = saved.iter().map(|g| g.as_raw()).collect();
    let fail = |e: std::io::Error| PeerError::Identity(who.uid, e);
    // Raw system calls: glibc's setgroups() would change every thread of the daemon.
    set_groups(&groups).map_err(fail)?;
    // SAFETY: setfsgid/setfsuid take plain ids and change only this thread's credentials.
    unsafe {
        libc::syscall(libc::SYS_setfsgid, who.gid);
        libc::syscall(libc::SYS_setfsuid, who.uid);
    }
    // setfsuid reports no errors: ask for the current value (an invalid id changes nothing).
    // SAFETY: as above.
    let now = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) };
    let r = if now == i64::from(who.uid) {
        Ok(f())
    } else {
        Err(fail(std::io::Error::other("setfsuid did not take")))
    };
    // SAFETY: as above; back to root's own filesystem identity.
    unsafe {
        libc::syscall(libc::SYS_setfsuid, 0u32);
        libc::syscall(libc::SYS_setfsgid, Gid::effective().as_raw());
    }
    // Restoring root's groups cannot fail for root; if it did, this thread would keep fewer
    // rights than it should, never more.
    let _ = set_groups(&saved);
    r
}

/// Sets this thread's supplementary groups.
fn set_groups(groups: &[libc::gid_t]) -> std::io::Result<()> {
    // SAFETY: `groups` is a valid array of `groups.len()` ids, only read by the kernel.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `who`'s groups as the system's group database has them (just its group without an entry).
fn groups_of(who: &Cred) -> Vec<libc::gid_t> {
    let from_db = User::from_uid(Uid::from_raw(who.uid))
        .ok()
        .flatten()
        .and_then(|u| {
            let name = std::ffi::CString::new(u.name).ok()?;
            nix::unistd::getgrouplist(&name, Gid::from_raw(who.gid)).ok()
        });
    match from_db {
        Some(gs) => gs.iter().map(|g| g.as_raw()).collect(),
        None => vec![who.gid],
    }
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

    /// Whether `c` may use the daemon, and as what; the reason when not.
    pub fn check(&self, c: &Cred) -> Result<Role, String> {
        if c.uid == 0 || c.uid == self.uid {
            return Ok(Role::Owner);
        }
        if let Some((_, gid)) = &self.group
            && (c.gid == *gid || user_in_group(c.uid, *gid))
        {
            return Ok(Role::Member(*c));
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
        assert_eq!(a.check(&cred(0, 0)), Ok(Role::Owner));
        assert_eq!(a.check(&cred(1000, 1000)), Ok(Role::Owner));
        let e = a.check(&cred(1001, 1001)).unwrap_err();
        assert!(e.contains("uid 1001"), "{e}");
        let g = Access {
            uid: 1000,
            group: Some(("sv".into(), 4242)),
        };
        assert_eq!(
            g.check(&cred(1001, 4242)),
            Ok(Role::Member(cred(1001, 4242)))
        );
        assert!(g.check(&cred(1001, 1001)).unwrap_err().contains("group sv"));
    }

    #[test]
    fn files_are_opened_with_the_members_identity_and_root_is_restored() {
        let base = std::env::temp_dir().join(format!("sv-peer-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mine = base.join("mine.img");
        let roots = base.join("roots.img");
        std::fs::write(&mine, b"m").unwrap();
        std::fs::write(&roots, b"r").unwrap();
        std::os::unix::fs::chown(&mine, Some(4242), Some(4242)).unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).unwrap();
        let member = Role::Member(Cred {
            pid: 1,
            uid: 4242,
            gid: 4242,
        });
        let open = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p);
        // These tests run as root: the member gets its own file, not root's.
        assert!(member.open_files(|| open(&mine)).unwrap().is_ok());
        let e = member.open_files(|| open(&roots)).unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        // What it creates (where it may) is its own.
        let home = base.join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
        assert!(
            member
                .open_files(|| std::fs::File::create(base.join("no.img")))
                .unwrap()
                .is_err()
        );
        let made = home.join("made.img");
        member
            .open_files(|| std::fs::File::create(&made))
            .unwrap()
            .unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().uid(), 4242);
        // The thread is root again, with its groups.
        assert!(open(&roots).is_ok());
        assert!(Role::Owner.open_files(|| open(&roots)).unwrap().is_ok());
        std::fs::remove_dir_all(&base).unwrap();
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
