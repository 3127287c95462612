//! Disk images: raw files (sparse by default), opened read-only or exclusively writable.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use pv_protocol::SECTOR_SIZE;

/// Errors opening or creating an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file cannot be opened or created.
    #[error("{}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// Another back-end has the image open writable (or we want it writable and someone has it).
    #[error("{} is in use by another domain", .0.display())]
    InUse(PathBuf),
    /// The path is not a regular file (a FIFO would block the daemon; devices are not images).
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// The image size is not a whole number of sectors.
    #[error("{path} is {size} bytes, not a multiple of {SECTOR_SIZE}", path = .0.display(), size = .1)]
    BadSize(PathBuf, u64),
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
}

impl Disk {
    /// Creates a sparse image of `bytes` (a multiple of the sector size) unless something
    /// exists at `path` already (which is left alone: [`open`](Self::open) checks it).
    pub fn create_sparse(path: &Path, bytes: u64) -> Result<(), DiskError> {
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadSize(path.into(), bytes));
        }
        // O_EXCL: never opens (and blocks on) a FIFO or device someone put there.
        let f = match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(DiskError::Open(path.into(), e)),
        };
        f.set_len(bytes)
            .map_err(|e| DiskError::Open(path.into(), e))
    }

    /// Opens an image. A writable open takes an exclusive lock, a read-only one a shared lock, so
    /// two domains can never both have the same image writable.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, DiskError> {
        Self::open_with(path, readonly, false)
    }

    /// As [`open`](Self::open); `direct` bypasses the host page cache (`O_DIRECT`: guest pages
    /// are page-aligned and segments sector-aligned, which is what it needs).
    pub fn open_with(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let direct = if direct { libc::O_DIRECT } else { 0 };
        let file = open_regular(path, !readonly, direct).map_err(|e| match e {
            None => DiskError::NotAFile(path.into()),
            Some(e) => DiskError::Open(path.into(), e),
        })?;
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(DiskError::InUse(path.into()));
        }
        let bytes = file
            .metadata()
            .map_err(|e| DiskError::Open(path.into(), e))?
            .len();
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::BadSize(path.into(), bytes));
        }
        Ok(Self {
            file,
            path: path.into(),
            sectors: bytes / SECTOR_SIZE,
            readonly,
        })
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether writes are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The file (for I/O submission).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A second handle on the same open image (one per queue of a multi-queue device). It shares
    /// the open file description, so the lock is held until the last handle is dropped.
    pub fn try_clone(&self) -> Result<Self, DiskError> {
        Ok(Self {
            file: self
                .file
                .try_clone()
                .map_err(|e| DiskError::Open(self.path.clone(), e))?,
            path: self.path.clone(),
            sectors: self.sectors,
            readonly: self.readonly,
        })
    }
}

/// Opens `path` only if it is a regular file: without blocking (`O_NONBLOCK`, so a FIFO does
/// not stall the caller) and without taking a terminal (`O_NOCTTY`), checks the type of what was
/// opened, then turns blocking back on (io_uring honours `O_NONBLOCK` on files). `None` for
/// something that is not a regular file.
pub fn open_regular(path: &Path, write: bool, flags: i32) -> Result<File, Option<std::io::Error>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(Some)?;
    if !file.metadata().map_err(Some)?.is_file() {
        return Err(None);
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0
    {
        return Err(Some(std::io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
impl Disk {
    /// Any open file as a writable disk of `sectors` (tests: a FIFO stands for a device whose I/O
    /// completes only when the test says so).
    pub(crate) fn from_file_for_tests(file: File, path: &Path, sectors: u64) -> Self {
        Self {
            file,
            path: path.into(),
            sectors,
            readonly: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_cannot_be_opened_writable_twice_and_readonly_shares() {
        let dir = std::env::temp_dir().join(format!("sv-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.img");
        Disk::create_sparse(&img, 1 << 20).unwrap();
        let rw = Disk::open(&img, false).unwrap();
        assert_eq!(rw.sectors(), 2048);
        assert!(matches!(Disk::open(&img, false), Err(DiskError::InUse(_))));
        assert!(matches!(Disk::open(&img, true), Err(DiskError::InUse(_))));
        // A clone (a second queue) keeps the lock after the first handle goes.
        let clone = rw.try_clone().unwrap();
        drop(rw);
        assert!(matches!(Disk::open(&img, false), Err(DiskError::InUse(_))));
        drop(clone);
        let ro1 = Disk::open(&img, true).unwrap();
        let _ro2 = Disk::open(&img, true).unwrap();
        assert!(ro1.readonly());
        assert!(matches!(Disk::open(&img, false), Err(DiskError::InUse(_))));
        // Sparse: no blocks allocated yet.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&img).unwrap().blocks(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fifos_devices_and_directories_are_not_images_and_never_block() {
        let dir = std::env::temp_dir().join(format!("sv-disk-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Without O_NONBLOCK this open would wait for a writer forever.
        for ro in [true, false] {
            assert!(matches!(Disk::open(&fifo, ro), Err(DiskError::NotAFile(_))));
        }
        // create_sparse leaves what is there alone (and does not block on it either).
        Disk::create_sparse(&fifo, 1 << 20).unwrap();
        assert!(matches!(
            Disk::open(Path::new("/dev/zero"), true),
            Err(DiskError::NotAFile(_))
        ));
        assert!(matches!(
            Disk::open(&dir, true),
            Err(DiskError::NotAFile(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
