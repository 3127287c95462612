//! Store (xenstore) wire format, after Xen's `public/io/xs_wire.h`.
//!
//! A message is a [`StoreMsgHeader`] followed by `len` payload bytes. The
//! payload is a sequence of NUL-terminated strings, except that a `WRITE`
//! value runs, unterminated, to the end of the payload. The back end reads
//! a header and payload off the request ring and calls
//! [`StoreRequest::parse`]; answers and watch events are built with the
//! allocation-free encoders ([`encode_message`], [`encode_error`],
//! [`encode_watch_event`]).
//!
//! Also holds the shared-page layout [`StoreInterface`] (byte-ring logic is
//! elsewhere).

use core::mem::{offset_of, size_of};

use bitflags::bitflags;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::evtchn::Port;
use crate::grant::DomId;

/// Largest payload of one message.
pub const PAYLOAD_MAX: usize = 4096;
/// Longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// Longest relative path (and special watch name).
pub const REL_PATH_MAX: usize = 2048;
/// Most permission entries accepted in one `SET_PERMS` (xenstored's default quota).
pub const MAX_PERMS_PER_NODE: usize = 5;
/// Bytes in each of the interface page's rings.
pub const RING_SIZE: usize = 1024;

/// The message header.
#[derive(
    FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct StoreMsgHeader {
    /// A [`MsgType`] value.
    pub msg_type: u32,
    /// Client's request id, echoed in the answer.
    pub req_id: u32,
    /// Transaction id, 0 for none.
    pub tx_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}

const _: () = assert!(size_of::<StoreMsgHeader>() == 16);
const _: () = assert!(offset_of!(StoreMsgHeader, msg_type) == 0);
const _: () = assert!(offset_of!(StoreMsgHeader, req_id) == 4);
const _: () = assert!(offset_of!(StoreMsgHeader, tx_id) == 8);
const _: () = assert!(offset_of!(StoreMsgHeader, len) == 12);

/// Message types (`XS_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    /// Daemon control command.
    Control = 0,
    /// List children.
    Directory = 1,
    /// Read a value.
    Read = 2,
    /// Read permissions.
    GetPerms = 3,
    /// Add a watch.
    Watch = 4,
    /// Remove a watch.
    Unwatch = 5,
    /// Start a transaction.
    TransactionStart = 6,
    /// End a transaction.
    TransactionEnd = 7,
    /// Introduce a domain (privileged).
    Introduce = 8,
    /// Release a domain (privileged).
    Release = 9,
    /// Get a domain's home path.
    GetDomainPath = 10,
    /// Write a value.
    Write = 11,
    /// Create a node.
    Mkdir = 12,
    /// Remove a node.
    Rm = 13,
    /// Set permissions.
    SetPerms = 14,
    /// Watch fired (server to client only).
    WatchEvent = 15,
    /// Error answer (server to client only).
    Error = 16,
    /// Is a domain introduced (privileged).
    IsDomainIntroduced = 17,
    /// Resume a domain (privileged).
    Resume = 18,
    /// Set a domain's target (privileged).
    SetTarget = 19,
    /// Remove all of the caller's watches.
    ResetWatches = 21,
    /// List children, one chunk at a time.
    DirectoryPart = 22,
}

impl TryFrom<u32> for MsgType {
    type Error = StoreError;
    fn try_from(v: u32) -> Result<Self, StoreError> {
        use MsgType::*;
        Ok(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            v => return Err(StoreError::UnknownType(v)),
        })
    }
}

/// Error names sent in `ERROR` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreErrno {
    /// Invalid argument.
    EINVAL,
    /// Permission denied.
    EACCES,
    /// Node exists.
    EEXIST,
    /// Is a directory.
    EISDIR,
    /// No such node.
    ENOENT,
    /// Out of memory.
    ENOMEM,
    /// Quota exceeded.
    ENOSPC,
    /// I/O error.
    EIO,
    /// Directory not empty.
    ENOTEMPTY,
    /// Not implemented.
    ENOSYS,
    /// Read-only.
    EROFS,
    /// Busy.
    EBUSY,
    /// Try again (transaction conflict).
    EAGAIN,
    /// Already connected.
    EISCONN,
    /// Too big.
    E2BIG,
    /// Not permitted.
    EPERM,
}

const ERRNO_NAMES: [(StoreErrno, &str); 16] = [
    (StoreErrno::EINVAL, "EINVAL"),
    (StoreErrno::EACCES, "EACCES"),
    (StoreErrno::EEXIST, "EEXIST"),
    (StoreErrno::EISDIR, "EISDIR"),
    (StoreErrno::ENOENT, "ENOENT"),
    (StoreErrno::ENOMEM, "ENOMEM"),
    (StoreErrno::ENOSPC, "ENOSPC"),
    (StoreErrno::EIO, "EIO"),
    (StoreErrno::ENOTEMPTY, "ENOTEMPTY"),
    (StoreErrno::ENOSYS, "ENOSYS"),
    (StoreErrno::EROFS, "EROFS"),
    (StoreErrno::EBUSY, "EBUSY"),
    (StoreErrno::EAGAIN, "EAGAIN"),
    (StoreErrno::EISCONN, "EISCONN"),
    (StoreErrno::E2BIG, "E2BIG"),
    (StoreErrno::EPERM, "EPERM"),
];

impl StoreErrno {
    /// The name as sent on the wire (without the NUL).
    pub fn as_str(self) -> &'static str {
        ERRNO_NAMES
            .iter()
            .find(|(e, _)| *e == self)
            .map_or("EINVAL", |(_, n)| n)
    }

    /// Looks a name up (client side).
    pub fn from_name(name: &[u8]) -> Option<StoreErrno> {
        ERRNO_NAMES
            .iter()
            .find(|(_, n)| n.as_bytes() == name)
            .map(|(e, _)| *e)
    }
}

/// Errors from store-message parsing and encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Header `len` differs from the payload supplied.
    #[error("length {header} does not match payload {actual}")]
    LengthMismatch {
        /// Header's `len`.
        header: u32,
        /// Bytes supplied.
        actual: usize,
    },
    /// Payload above [`PAYLOAD_MAX`].
    #[error("payload too long")]
    PayloadTooLong,
    /// Unknown message type.
    #[error("unknown type {0}")]
    UnknownType(u32),
    /// A server-only type sent as a request.
    #[error("{0:?} is not a request")]
    NotARequest(MsgType),
    /// Wrong number of strings, or a missing terminator.
    #[error("bad arguments")]
    BadArgs,
    /// Path fails the syntax rules.
    #[error("bad path")]
    BadPath,
    /// Path longer than allowed.
    #[error("path too long")]
    PathTooLong,
    /// Malformed permission string.
    #[error("bad permission")]
    BadPerm,
    /// More than [`MAX_PERMS_PER_NODE`] permissions.
    #[error("too many permissions")]
    TooManyPerms,
    /// Malformed or reserved domain id, or other number.
    #[error("bad number")]
    BadNumber,
    /// Watch token not UTF-8.
    #[error("bad token")]
    BadToken,
    /// Output buffer too small.
    #[error("buffer too small")]
    BufferTooSmall,
}

impl StoreError {
    /// The error name to answer a malformed request with.
    pub const fn errno(&self) -> StoreErrno {
        match self {
            Self::UnknownType(_) => StoreErrno::ENOSYS,
            Self::PayloadTooLong | Self::PathTooLong => StoreErrno::E2BIG,
            Self::TooManyPerms => StoreErrno::ENOSPC,
            _ => StoreErrno::EINVAL,
        }
    }
}

/// Whether a path is absolute, relative to the caller's home, or a special
/// watch name (`@introduceDomain`, `@releaseDomain`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    /// Starts with `/`.
    Absolute,
    /// Relative to `/local/domain/<id>`.
    Relative,
    /// Starts with `@`; only valid in `WATCH`/`UNWATCH`.
    Special,
}

/// A checked store path.
///
/// Rules (as xenstored): characters `[A-Za-z0-9/_@-]`, no `//`, no trailing
/// `/` except the root `/`, not empty, at most [`ABS_PATH_MAX`] bytes if
/// absolute, [`REL_PATH_MAX`] otherwise. A leading `@` is only accepted by
/// [`StorePath::parse_watch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StorePath<'a>(&'a str);

fn path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'/' | b'_' | b'@' | b'-')
}

impl<'a> StorePath<'a> {
    /// Validates a node path (absolute or relative).
    pub fn parse(bytes: &'a [u8]) -> Result<StorePath<'a>, StoreError> {
        let p = Self::parse_watch(bytes)?;
        if p.kind() == PathKind::Special {
            return Err(StoreError::BadPath);
        }
        Ok(p)
    }

    /// Validates a watch path: a node path or a special `@name`.
    pub fn parse_watch(bytes: &'a [u8]) -> Result<StorePath<'a>, StoreError> {
        let max = if bytes.first() == Some(&b'/') {
            ABS_PATH_MAX
        } else {
            REL_PATH_MAX
        };
        if bytes.len() > max {
            return Err(StoreError::PathTooLong);
        }
        if bytes.is_empty()
            || !bytes.iter().all(|c| path_char(*c))
            || bytes.windows(2).any(|w| w == b"//")
            || (bytes.len() > 1 && bytes.last() == Some(&b'/'))
            || (bytes.first() == Some(&b'@') && bytes.contains(&b'/'))
        {
            return Err(StoreError::BadPath);
        }
        core::str::from_utf8(bytes)
            .map(StorePath)
            .map_err(|_| StoreError::BadPath)
    }

    /// The path text.
    pub const fn as_str(&self) -> &'a str {
        self.0
    }

    /// Absolute, relative or special.
    pub fn kind(&self) -> PathKind {
        match self.0.as_bytes().first() {
            Some(b'/') => PathKind::Absolute,
            Some(b'@') => PathKind::Special,
            _ => PathKind::Relative,
        }
    }
}

/// Access a permission entry grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PermKind {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

/// One permission entry, e.g. `r5`. The first entry of a node names its
/// owner and the access everyone else gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Access.
    pub kind: PermKind,
    /// Domain.
    pub domid: DomId,
}

impl Perm {
    /// Parses one entry (without its NUL).
    pub fn parse(s: &[u8]) -> Result<Perm, StoreError> {
        let (k, id) = s.split_first().ok_or(StoreError::BadPerm)?;
        let kind = match k {
            b'n' => PermKind::None,
            b'r' => PermKind::Read,
            b'w' => PermKind::Write,
            b'b' => PermKind::Both,
            _ => return Err(StoreError::BadPerm),
        };
        Ok(Perm {
            kind,
            domid: parse_domid(id).map_err(|_| StoreError::BadPerm)?,
        })
    }

    fn letter(&self) -> u8 {
        match self.kind {
            PermKind::None => b'n',
            PermKind::Read => b'r',
            PermKind::Write => b'w',
            PermKind::Both => b'b',
        }
    }
}

/// A checked list of 1..=[`MAX_PERMS_PER_NODE`] permissions, borrowed from the
/// payload (`r0\0w1\0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermList<'a> {
    bytes: &'a [u8],
}

impl<'a> PermList<'a> {
    /// Validates NUL-terminated permission strings.
    pub fn parse(bytes: &'a [u8]) -> Result<PermList<'a>, StoreError> {
        let body = bytes.strip_suffix(b"\0").ok_or(StoreError::BadArgs)?;
        let mut n = 0;
        for p in body.split(|c| *c == 0) {
            Perm::parse(p)?;
            n += 1;
        }
        if n > MAX_PERMS_PER_NODE {
            return Err(StoreError::TooManyPerms);
        }
        Ok(PermList { bytes })
    }

    /// Writes `perms` into `buf` and returns the list borrowing it.
    pub fn write(perms: &[Perm], buf: &'a mut [u8]) -> Result<PermList<'a>, StoreError> {
        if perms.is_empty() {
            return Err(StoreError::BadPerm);
        }
        let mut w = Writer { buf, pos: 0 };
        for p in perms {
            w.put(&[p.letter()])?;
            w.put_u64(u64::from(p.domid.0))?;
            w.put(b"\0")?;
        }
        let n = w.pos;
        let shared: &'a [u8] = w.buf;
        Self::parse(shared.get(..n).ok_or(StoreError::BufferTooSmall)?)
    }

    /// The entries.
    pub fn iter(&self) -> impl Iterator<Item = Perm> + 'a {
        let body = self.bytes.strip_suffix(b"\0").unwrap_or(self.bytes);
        body.split(|c| *c == 0).filter_map(|p| Perm::parse(p).ok())
    }

    /// Raw bytes, each entry NUL-terminated.
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// A checked request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreRequest<'a> {
    /// Daemon control command; raw payload.
    Control(&'a [u8]),
    /// List children.
    Directory(StorePath<'a>),
    /// List children from byte `offset` of the listing.
    DirectoryPart {
        /// Node.
        path: StorePath<'a>,
        /// Offset into the full listing.
        offset: u32,
    },
    /// Read a value.
    Read(StorePath<'a>),
    /// Read permissions.
    GetPerms(StorePath<'a>),
    /// Add a watch.
    Watch {
        /// Node or special name.
        path: StorePath<'a>,
        /// Client's token, echoed in events.
        token: &'a str,
    },
    /// Remove a watch.
    Unwatch {
        /// Node or special name.
        path: StorePath<'a>,
        /// Token given to `Watch`.
        token: &'a str,
    },
    /// Start a transaction.
    TransactionStart,
    /// End the header's transaction.
    TransactionEnd {
        /// `T` commits, `F` aborts.
        commit: bool,
    },
    /// Introduce a domain's store ring.
    Introduce {
        /// Domain.
        domid: DomId,
        /// Frame of its interface page.
        mfn: u64,
        /// Its event channel port.
        port: Port,
    },
    /// Forget a domain.
    Release(DomId),
    /// Ask for a domain's home path.
    GetDomainPath(DomId),
    /// Write a value (arbitrary bytes).
    Write {
        /// Node.
        path: StorePath<'a>,
        /// Value.
        value: &'a [u8],
    },
    /// Create a node.
    Mkdir(StorePath<'a>),
    /// Remove a node and its children.
    Rm(StorePath<'a>),
    /// Set permissions.
    SetPerms {
        /// Node.
        path: StorePath<'a>,
        /// New permissions.
        perms: PermList<'a>,
    },
    /// Is a domain introduced.
    IsDomainIntroduced(DomId),
    /// Resume a domain.
    Resume(DomId),
    /// Let `target`'s privileges extend to `domid`.
    SetTarget {
        /// Domain gaining rights.
        domid: DomId,
        /// Domain it may act on.
        target: DomId,
    },
    /// Remove all of the caller's watches.
    ResetWatches,
}

/// Splits a payload of exactly `N` NUL-terminated strings.
fn args<const N: usize>(payload: &[u8]) -> Result<[&[u8]; N], StoreError> {
    let body = payload.strip_suffix(b"\0").ok_or(StoreError::BadArgs)?;
    let mut out: [&[u8]; N] = [&[]; N];
    let mut parts = body.split(|c| *c == 0);
    for slot in out.iter_mut() {
        *slot = parts.next().ok_or(StoreError::BadArgs)?;
    }
    if parts.next().is_some() {
        return Err(StoreError::BadArgs);
    }
    Ok(out)
}

fn parse_u64(s: &[u8]) -> Result<u64, StoreError> {
    if s.is_empty() || s.len() > 20 {
        return Err(StoreError::BadNumber);
    }
    s.iter().try_fold(0u64, |acc, c| {
        if !c.is_ascii_digit() {
            return Err(StoreError::BadNumber);
        }
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
            .ok_or(StoreError::BadNumber)
    })
}

fn parse_domid(s: &[u8]) -> Result<DomId, StoreError> {
    let d = DomId(u16::try_from(parse_u64(s)?).map_err(|_| StoreError::BadNumber)?);
    if d.is_reserved() {
        return Err(StoreError::BadNumber);
    }
    Ok(d)
}

fn parse_token(s: &[u8]) -> Result<&str, StoreError> {
    core::str::from_utf8(s).map_err(|_| StoreError::BadToken)
}

impl<'a> StoreRequest<'a> {
    /// Validates a request: header length matches, type known and a request,
    /// arguments well-formed (count, terminators, paths, numbers, perms).
    /// Authorisation and the meaning of `tx_id` are the caller's concern.
    pub fn parse(
        header: &StoreMsgHeader,
        payload: &'a [u8],
    ) -> Result<StoreRequest<'a>, StoreError> {
        if usize::try_from(header.len).ok() != Some(payload.len()) {
            return Err(StoreError::LengthMismatch {
                header: header.len,
                actual: payload.len(),
            });
        }
        if payload.len() > PAYLOAD_MAX {
            return Err(StoreError::PayloadTooLong);
        }
        let path1 = || args::<1>(payload).and_then(|[p]| StorePath::parse(p));
        let dom1 = || args::<1>(payload).and_then(|[d]| parse_domid(d));
        Ok(match MsgType::try_from(header.msg_type)? {
            t @ (MsgType::WatchEvent | MsgType::Error) => return Err(StoreError::NotARequest(t)),
            MsgType::Control => Self::Control(payload),
            MsgType::Directory => Self::Directory(path1()?),
            MsgType::DirectoryPart => {
                let [p, o] = args::<2>(payload)?;
                Self::DirectoryPart {
                    path: StorePath::parse(p)?,
                    offset: u32::try_from(parse_u64(o)?).map_err(|_| StoreError::BadNumber)?,
                }
            }
            MsgType::Read => Self::Read(path1()?),
            MsgType::GetPerms => Self::GetPerms(path1()?),
            MsgType::Mkdir => Self::Mkdir(path1()?),
            MsgType::Rm => Self::Rm(path1()?),
            MsgType::Watch | MsgType::Unwatch => {
                let [p, t] = args::<2>(payload)?;
                let path = StorePath::parse_watch(p)?;
                let token = parse_token(t)?;
                if header.msg_type == MsgType::Watch as u32 {
                    Self::Watch { path, token }
                } else {
                    Self::Unwatch { path, token }
                }
            }
            MsgType::TransactionStart => {
                if !(payload.is_empty() || payload == b"\0") {
                    return Err(StoreError::BadArgs);
                }
                Self::TransactionStart
            }
            MsgType::TransactionEnd => Self::TransactionEnd {
                commit: match args::<1>(payload)? {
                    [b"T"] => true,
                    [b"F"] => false,
                    _ => return Err(StoreError::BadArgs),
                },
            },
            MsgType::Introduce => {
                let [d, m, p] = args::<3>(payload)?;
                Self::Introduce {
                    domid: parse_domid(d)?,
                    mfn: parse_u64(m)?,
                    port: u32::try_from(parse_u64(p)?)
                        .ok()
                        .and_then(|p| Port::new(p).ok())
                        .ok_or(StoreError::BadNumber)?,
                }
            }
            MsgType::Release => Self::Release(dom1()?),
            MsgType::GetDomainPath => Self::GetDomainPath(dom1()?),
            MsgType::IsDomainIntroduced => Self::IsDomainIntroduced(dom1()?),
            MsgType::Resume => Self::Resume(dom1()?),
            MsgType::SetTarget => {
                let [d, t] = args::<2>(payload)?;
                Self::SetTarget {
                    domid: parse_domid(d)?,
                    target: parse_domid(t)?,
                }
            }
            MsgType::Write => {
                let nul = payload
                    .iter()
                    .position(|c| *c == 0)
                    .ok_or(StoreError::BadArgs)?;
                let (p, rest) = payload.split_at(nul);
                Self::Write {
                    path: StorePath::parse(p)?,
                    value: rest.get(1..).unwrap_or(&[]),
                }
            }
            MsgType::SetPerms => {
                let nul = payload
                    .iter()
                    .position(|c| *c == 0)
                    .ok_or(StoreError::BadArgs)?;
                let (p, rest) = payload.split_at(nul);
                Self::SetPerms {
                    path: StorePath::parse(p)?,
                    perms: PermList::parse(rest.get(1..).unwrap_or(&[]))?,
                }
            }
            MsgType::ResetWatches => Self::ResetWatches,
        })
    }

    /// The message type this request travels as.
    pub const fn msg_type(&self) -> MsgType {
        match self {
            Self::Control(_) => MsgType::Control,
            Self::Directory(_) => MsgType::Directory,
            Self::DirectoryPart { .. } => MsgType::DirectoryPart,
            Self::Read(_) => MsgType::Read,
            Self::GetPerms(_) => MsgType::GetPerms,
            Self::Watch { .. } => MsgType::Watch,
            Self::Unwatch { .. } => MsgType::Unwatch,
            Self::TransactionStart => MsgType::TransactionStart,
            Self::TransactionEnd { .. } => MsgType::TransactionEnd,
            Self::Introduce { .. } => MsgType::Introduce,
            Self::Release(_) => MsgType::Release,
            Self::GetDomainPath(_) => MsgType::GetDomainPath,
            Self::Write { .. } => MsgType::Write,
            Self::Mkdir(_) => MsgType::Mkdir,
            Self::Rm(_) => MsgType::Rm,
            Self::SetPerms { .. } => MsgType::SetPerms,
            Self::IsDomainIntroduced(_) => MsgType::IsDomainIntroduced,
            Self::Resume(_) => MsgType::Resume,
            Self::SetTarget { .. } => MsgType::SetTarget,
            Self::ResetWatches => MsgType::ResetWatches,
        }
    }

    /// Encodes header and payload into `buf` (client side); returns bytes used.
    pub fn encode(&self, buf: &mut [u8], req_id: u32, tx_id: u32) -> Result<usize, StoreError> {
        let mut w = Writer::message(buf)?;
        match *self {
            Self::Control(p) => w.put(p)?,
            Self::Directory(p)
            | Self::Read(p)
            | Self::GetPerms(p)
            | Self::Mkdir(p)
            | Self::Rm(p) => w.put_str(p.0.as_bytes())?,
            Self::DirectoryPart { path, offset } => {
                w.put_str(path.0.as_bytes())?;
                w.put_u64(u64::from(offset))?;
                w.put(b"\0")?;
            }
            Self::Watch { path, token } | Self::Unwatch { path, token } => {
                w.put_str(path.0.as_bytes())?;
                w.put_str(token.as_bytes())?;
            }
            Self::TransactionStart => w.put(b"\0")?,
            Self::TransactionEnd { commit } => w.put(if commit { b"T\0" } else { b"F\0" })?,
            Self::Introduce { domid, mfn, port } => {
                for v in [u64::from(domid.0), mfn, u64::from(port.0)] {
                    w.put_u64(v)?;
                    w.put(b"\0")?;
                }
            }
            Self::Release(d)
            | Self::GetDomainPath(d)
            | Self::IsDomainIntroduced(d)
            | Self::Resume(d) => {
                w.put_u64(u64::from(d.0))?;
                w.put(b"\0")?;
            }
            Self::SetTarget { domid, target } => {
                for d in [domid, target] {
                    w.put_u64(u64::from(d.0))?;
                    w.put(b"\0")?;
                }
            }
            Self::Write { path, value } => {
                w.put_str(path.0.as_bytes())?;
                w.put(value)?;
            }
            Self::SetPerms { path, perms } => {
                w.put_str(path.0.as_bytes())?;
                w.put(perms.bytes)?;
            }
            Self::ResetWatches => {}
        }
        w.finish(self.msg_type(), req_id, tx_id)
    }
}

/// Bounded writer over a caller buffer.
struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> Writer<'b> {
    /// Starts a message: reserves the header.
    fn message(buf: &'b mut [u8]) -> Result<Self, StoreError> {
        let hdr = size_of::<StoreMsgHeader>();
        if buf.len() < hdr {
            return Err(StoreError::BufferTooSmall);
        }
        Ok(Writer { buf, pos: hdr })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let end = self
            .pos
            .checked_add(bytes.len())
            .ok_or(StoreError::BufferTooSmall)?;
        self.buf
            .get_mut(self.pos..end)
            .ok_or(StoreError::BufferTooSmall)?
            .copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// A string plus its NUL.
    fn put_str(&mut self, s: &[u8]) -> Result<(), StoreError> {
        self.put(s)?;
        self.put(b"\0")
    }

    fn put_u64(&mut self, mut v: u64) -> Result<(), StoreError> {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            if let Some(d) = digits.get_mut(i) {
                *d = b'0' + (v % 10) as u8;
            }
            v /= 10;
            if v == 0 || i == 0 {
                break;
            }
        }
        self.put(digits.get(i..).unwrap_or(&[]))
    }

    /// Fills in the header; returns total bytes.
    fn finish(self, t: MsgType, req_id: u32, tx_id: u32) -> Result<usize, StoreError> {
        let hdr = size_of::<StoreMsgHeader>();
        let len = self.pos - hdr;
        if len > PAYLOAD_MAX {
            return Err(StoreError::PayloadTooLong);
        }
        let h = StoreMsgHeader {
            msg_type: t as u32,
            req_id,
            tx_id,
            len: len as u32,
        };
        self.buf
            .get_mut(..hdr)
            .ok_or(StoreError::BufferTooSmall)?
            .copy_from_slice(h.as_bytes());
        Ok(self.pos)
    }
}

/// Encodes a message whose payload is the concatenation of `parts` (no
/// terminators added: include them as the answer's format needs, e.g. a
/// `READ` answer is the bare value, a `DIRECTORY` answer is `a\0b\0`, a
/// `WRITE` answer is `OK\0`). Returns bytes used.
pub fn encode_message(
    buf: &mut [u8],
    msg_type: MsgType,
    req_id: u32,
    tx_id: u32,
    parts: &[&[u8]],
) -> Result<usize, StoreError> {
    let mut w = Writer::message(buf)?;
    for p in parts {
        w.put(p)?;
    }
    w.finish(msg_type, req_id, tx_id)
}

/// Encodes an `ERROR` answer (`NAME\0`).
pub fn encode_error(
    buf: &mut [u8],
    req_id: u32,
    tx_id: u32,
    err: StoreErrno,
) -> Result<usize, StoreError> {
    encode_message(
        buf,
        MsgType::Error,
        req_id,
        tx_id,
        &[err.as_str().as_bytes(), b"\0"],
    )
}

/// Encodes a `WATCH_EVENT` (`path\0token\0`, ids zero).
pub fn encode_watch_event(buf: &mut [u8], path: &str, token: &str) -> Result<usize, StoreError> {
    encode_message(
        buf,
        MsgType::WatchEvent,
        0,
        0,
        &[path.as_bytes(), b"\0", token.as_bytes(), b"\0"],
    )
}

bitflags! {
    /// `server_features` bits of the interface page.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct ServerFeatures: u32 {
        /// The server supports the reconnection protocol.
        const RECONNECTION = 1 << 0;
        /// The server reports errors in `error`.
        const ERROR = 1 << 1;
    }
}

/// `connection` value: connected.
pub const CONNECTION_CONNECTED: u32 = 0;
/// `connection` value: guest asks for a reconnect.
pub const CONNECTION_RECONNECT: u32 = 1;
/// `error` value: none.
pub const ERROR_NONE: u32 = 0;
/// `error` value: communication problem.
pub const ERROR_COMM: u32 = 1;
/// `error` value: invalid ring index.
pub const ERROR_RINGIDX: u32 = 2;
/// `error` value: protocol violation.
pub const ERROR_PROTO: u32 = 3;

/// The store interface page (first 2076 bytes of the shared page). Indices
/// are free-running `u32` counters written by a possibly hostile peer.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct StoreInterface {
    /// Requests: guest produces, server consumes.
    pub req: [u8; RING_SIZE],
    /// Responses: server produces, guest consumes.
    pub rsp: [u8; RING_SIZE],
    /// Server's consumer index into `req`.
    pub req_cons: u32,
    /// Guest's producer index into `req`.
    pub req_prod: u32,
    /// Guest's consumer index into `rsp`.
    pub rsp_cons: u32,
    /// Server's producer index into `rsp`.
    pub rsp_prod: u32,
    /// [`ServerFeatures`].
    pub server_features: u32,
    /// `CONNECTION_*`.
    pub connection: u32,
    /// `ERROR_*`.
    pub error: u32,
}

/// The request ring (guest produces, store server consumes).
pub const REQ_RING: crate::byte_ring::ByteRingLayout = crate::byte_ring::ByteRingLayout {
    data: offset_of!(StoreInterface, req),
    size: RING_SIZE as u32,
    cons: offset_of!(StoreInterface, req_cons),
    prod: offset_of!(StoreInterface, req_prod),
};

/// The response ring (store server produces, guest consumes).
pub const RSP_RING: crate::byte_ring::ByteRingLayout = crate::byte_ring::ByteRingLayout {
    data: offset_of!(StoreInterface, rsp),
    size: RING_SIZE as u32,
    cons: offset_of!(StoreInterface, rsp_cons),
    prod: offset_of!(StoreInterface, rsp_prod),
};

const _: () = assert!(size_of::<StoreInterface>() == 2076);
const _: () = assert!(offset_of!(StoreInterface, req) == 0);
const _: () = assert!(offset_of!(StoreInterface, rsp) == 1024);
const _: () = assert!(offset_of!(StoreInterface, req_cons) == 2048);
const _: () = assert!(offset_of!(StoreInterface, req_prod) == 2052);
const _: () = assert!(offset_of!(StoreInterface, rsp_cons) == 2056);
const _: () = assert!(offset_of!(StoreInterface, rsp_prod) == 2060);
const _: () = assert!(offset_of!(StoreInterface, server_features) == 2064);
const _: () = assert!(offset_of!(StoreInterface, connection) == 2068);
const _: () = assert!(offset_of!(StoreInterface, error) == 2072);
const _: () = assert!(size_of::<StoreInterface>() <= crate::PAGE_SIZE);

impl Default for StoreInterface {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    extern crate std;
    use std::string::String;
    use std::vec;
    use std::vec::Vec;

    fn hdr(t: MsgType, len: usize) -> StoreMsgHeader {
        StoreMsgHeader {
            msg_type: t as u32,
            req_id: 1,
            tx_id: 0,
            len: len as u32,
        }
    }

    fn parse(t: MsgType, p: &[u8]) -> Result<StoreRequest<'_>, StoreError> {
        StoreRequest::parse(&hdr(t, p.len()), p)
    }

    #[test]
    fn read_of_valid_paths_parses() {
        let r = parse(MsgType::Read, b"/local/domain/1/device/vbd/768/state\0").unwrap();
        let StoreRequest::Read(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!(p.kind(), PathKind::Absolute);
        assert!(matches!(
            parse(MsgType::Read, b"device/vif/0\0"),
            Ok(StoreRequest::Read(p)) if p.kind() == PathKind::Relative
        ));
        assert!(parse(MsgType::Read, b"/\0").is_ok());
    }

    #[test]
    fn bad_paths_are_rejected() {
        for p in [
            &b"\0"[..],
            b"/a//b\0",
            b"/a/b/\0",
            b"/a b\0",
            b"/a.b\0",
            b"@releaseDomain\0",
            b"/a\xff\0",
        ] {
            assert_eq!(parse(MsgType::Read, p), Err(StoreError::BadPath), "{p:?}");
        }
    }

    #[test]
    fn path_length_limits_differ_for_absolute_and_relative() {
        let mut abs = Vec::from(&b"/"[..]);
        abs.resize(ABS_PATH_MAX, b'a');
        abs.push(0);
        assert!(parse(MsgType::Read, &abs).is_ok());
        abs.insert(1, b'a');
        assert_eq!(parse(MsgType::Read, &abs), Err(StoreError::PathTooLong));
        let mut rel = Vec::new();
        rel.resize(REL_PATH_MAX + 1, b'a');
        rel.push(0);
        assert_eq!(parse(MsgType::Read, &rel), Err(StoreError::PathTooLong));
    }

    #[test]
    fn single_argument_needs_exactly_one_terminated_string() {
        assert_eq!(parse(MsgType::Read, b"/a"), Err(StoreError::BadArgs));
        assert_eq!(parse(MsgType::Read, b"/a\0/b\0"), Err(StoreError::BadArgs));
    }

    #[test]
    fn header_length_must_match_payload() {
        let h = hdr(MsgType::Read, 5);
        assert!(matches!(
            StoreRequest::parse(&h, b"/a\0"),
            Err(StoreError::LengthMismatch {
                header: 5,
                actual: 3
            })
        ));
    }

    #[test]
    fn unknown_and_server_only_types_are_rejected() {
        let h = StoreMsgHeader {
            msg_type: 20,
            ..Default::default()
        };
        let e = StoreRequest::parse(&h, b"").unwrap_err();
        assert_eq!(e, StoreError::UnknownType(20));
        assert_eq!(e.errno(), StoreErrno::ENOSYS);
        assert_eq!(
            parse(MsgType::WatchEvent, b"/a\0t\0"),
            Err(StoreError::NotARequest(MsgType::WatchEvent))
        );
    }

    #[test]
    fn write_value_is_everything_after_the_path() {
        assert_eq!(
            parse(MsgType::Write, b"/a/b\0x\0y"),
            Ok(StoreRequest::Write {
                path: StorePath("/a/b"),
                value: b"x\0y"
            })
        );
        assert!(matches!(
            parse(MsgType::Write, b"/a\0"),
            Ok(StoreRequest::Write { value: b"", .. })
        ));
    }

    #[test]
    fn watch_accepts_special_paths_and_transaction_end_needs_t_or_f() {
        assert!(matches!(
            parse(MsgType::Watch, b"@introduceDomain\0tok\0"),
            Ok(StoreRequest::Watch { token: "tok", .. })
        ));
        assert_eq!(parse(MsgType::Watch, b"/a\0"), Err(StoreError::BadArgs));
        assert_eq!(
            parse(MsgType::TransactionEnd, b"T\0"),
            Ok(StoreRequest::TransactionEnd { commit: true })
        );
        assert_eq!(
            parse(MsgType::TransactionEnd, b"X\0"),
            Err(StoreError::BadArgs)
        );
    }

    #[test]
    fn permissions_parse_and_malformed_ones_are_rejected() {
        let r = parse(MsgType::SetPerms, b"/a\0n0\0r5\0").unwrap();
        let StoreRequest::SetPerms { perms, .. } = r else {
            panic!("{r:?}")
        };
        let v: Vec<Perm> = perms.iter().collect();
        assert_eq!(
            v,
            [
                Perm {
                    kind: PermKind::None,
                    domid: DomId(0)
                },
                Perm {
                    kind: PermKind::Read,
                    domid: DomId(5)
                }
            ]
        );
        for bad in [
            &b"/a\0\0"[..],
            b"/a\0x1\0",
            b"/a\0r\0",
            b"/a\0r-1\0",
            b"/a\0r1",
            b"/a\0",
        ] {
            assert!(parse(MsgType::SetPerms, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse(MsgType::SetPerms, b"/a\0r1\0r2\0r3\0r4\0r5\0r6\0"),
            Err(StoreError::TooManyPerms)
        );
    }

    #[test]
    fn domain_ids_must_be_plain_decimal_and_not_reserved() {
        assert_eq!(
            parse(MsgType::GetDomainPath, b"7\0"),
            Ok(StoreRequest::GetDomainPath(DomId(7)))
        );
        for bad in [
            &b"+7\0"[..],
            b"7a\0",
            b"\0",
            b"32752\0",
            b"99999999999999999999999\0",
        ] {
            assert_eq!(
                parse(MsgType::GetDomainPath, bad),
                Err(StoreError::BadNumber)
            );
        }
    }

    #[test]
    fn error_and_watch_event_encode_as_xen_does() {
        let mut buf = [0u8; 64];
        let n = encode_error(&mut buf, 9, 2, StoreErrno::ENOENT).unwrap();
        assert_eq!(n, 16 + 7);
        let h = StoreMsgHeader::read_from_bytes(&buf[..16]).unwrap();
        assert_eq!((h.msg_type, h.req_id, h.tx_id, h.len), (16, 9, 2, 7));
        assert_eq!(&buf[16..n], b"ENOENT\0");
        assert_eq!(StoreErrno::from_name(b"ENOENT"), Some(StoreErrno::ENOENT));
        let n = encode_watch_event(&mut buf, "/a", "t").unwrap();
        assert_eq!(&buf[16..n], b"/a\0t\0");
        assert_eq!(
            encode_watch_event(&mut buf[..18], "/a", "t"),
            Err(StoreError::BufferTooSmall)
        );
    }

    #[test]
    fn every_errno_name_round_trips() {
        for (e, n) in ERRNO_NAMES {
            assert_eq!(e.as_str(), n);
            assert_eq!(StoreErrno::from_name(n.as_bytes()), Some(e));
        }
    }

    #[test]
    fn interface_page_defaults_to_zero() {
        assert_eq!(StoreInterface::default().as_bytes(), &[0u8; 2076][..]);
    }

    /// Owned description of a valid request, for generating round trips.
    #[derive(Debug, Clone)]
    enum Spec {
        Path(u8, String),
        DirPart(String, u32),
        Watch(bool, String, String),
        Write(String, Vec<u8>),
        Perms(String, Vec<(u8, u16)>),
        Dom(u8, u16),
        Introduce(u16, u64, u32),
        Target(u16, u16),
        TxEnd(bool),
        Plain(u8),
        Control(Vec<u8>),
    }

    fn path() -> impl Strategy<Value = String> {
        prop_oneof![
            "(/[a-zA-Z0-9_@-]{1,8}){1,5}",
            "[a-zA-Z0-9_-]{1,8}(/[a-z0-9]{1,8}){0,3}",
            Just(String::from("/"))
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let dom = 0u16..0x7ff0;
        prop_oneof![
            (0u8..5, path()).prop_map(|(k, p)| Spec::Path(k, p)),
            (path(), any::<u32>()).prop_map(|(p, o)| Spec::DirPart(p, o)),
            (
                any::<bool>(),
                prop_oneof![path(), "@[a-zA-Z]{1,16}"],
                "[^\u{0}]{0,12}"
            )
                .prop_map(|(w, p, t)| Spec::Watch(w, p, t)),
            (path(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(p, v)| Spec::Write(p, v)),
            (
                path(),
                proptest::collection::vec((0u8..4, dom.clone()), 1..=MAX_PERMS_PER_NODE)
            )
                .prop_map(|(p, v)| Spec::Perms(p, v)),
            (0u8..4, dom.clone()).prop_map(|(k, d)| Spec::Dom(k, d)),
            (dom.clone(), any::<u64>(), 0u32..4096).prop_map(|(d, m, p)| Spec::Introduce(d, m, p)),
            (dom.clone(), dom).prop_map(|(a, b)| Spec::Target(a, b)),
            any::<bool>().prop_map(Spec::TxEnd),
            (0u8..2).prop_map(Spec::Plain),
            proptest::collection::vec(any::<u8>(), 0..32).prop_map(Spec::Control),
        ]
    }

    fn check_round_trip(req: StoreRequest<'_>) -> Result<(), TestCaseError> {
        let mut buf = [0u8; 16 + PAYLOAD_MAX];
        let n = req.encode(&mut buf, 3, 4).unwrap();
        let (h, payload) = buf[..n].split_at(16);
        let h = StoreMsgHeader::read_from_bytes(h).unwrap();
        prop_assert_eq!((h.req_id, h.tx_id), (3, 4));
        prop_assert_eq!(StoreRequest::parse(&h, payload), Ok(req));
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_messages_never_panic(t in 0u32..24, payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let h = StoreMsgHeader { msg_type: t, req_id: 0, tx_id: 0, len: payload.len() as u32 };
            if let Err(e) = StoreRequest::parse(&h, &payload) {
                let _ = e.errno();
            }
        }

        #[test]
        fn arbitrary_text_payloads_never_panic(t in 0u32..24, s in "[/a-z0-9@TF\u{0}rwbn-]{0,40}") {
            let h = StoreMsgHeader { msg_type: t, req_id: 0, tx_id: 0, len: s.len() as u32 };
            let _ = StoreRequest::parse(&h, s.as_bytes());
        }

        #[test]
        fn valid_request_round_trips(spec in spec()) {
            fn p(s: &str) -> StorePath<'_> {
                StorePath::parse(s.as_bytes()).unwrap()
            }
            let mut pbuf = [0u8; 64];
            let req = match &spec {
                Spec::Path(k, s) => match k {
                    0 => StoreRequest::Read(p(s)),
                    1 => StoreRequest::Directory(p(s)),
                    2 => StoreRequest::GetPerms(p(s)),
                    3 => StoreRequest::Mkdir(p(s)),
                    _ => StoreRequest::Rm(p(s)),
                },
                Spec::DirPart(s, o) => StoreRequest::DirectoryPart { path: p(s), offset: *o },
                Spec::Watch(w, s, t) => {
                    let path = StorePath::parse_watch(s.as_bytes()).unwrap();
                    if *w { StoreRequest::Watch { path, token: t } } else { StoreRequest::Unwatch { path, token: t } }
                }
                Spec::Write(s, v) => StoreRequest::Write { path: p(s), value: v },
                Spec::Perms(s, v) => {
                    let kinds = [PermKind::None, PermKind::Read, PermKind::Write, PermKind::Both];
                    let perms: Vec<Perm> = v.iter().map(|(k, d)| Perm { kind: kinds[usize::from(*k)], domid: DomId(*d) }).collect();
                    let list = PermList::write(&perms, &mut pbuf).unwrap();
                    prop_assert_eq!(list.iter().collect::<Vec<_>>(), perms);
                    StoreRequest::SetPerms { path: p(s), perms: list }
                }
                Spec::Dom(k, d) => {
                    let d = DomId(*d);
                    match k {
                        0 => StoreRequest::Release(d),
                        1 => StoreRequest::GetDomainPath(d),
                        2 => StoreRequest::IsDomainIntroduced(d),
                        _ => StoreRequest::Resume(d),
                    }
                }
                Spec::Introduce(d, m, port) => StoreRequest::Introduce { domid: DomId(*d), mfn: *m, port: Port(*port) },
                Spec::Target(a, b) => StoreRequest::SetTarget { domid: DomId(*a), target: DomId(*b) },
                Spec::TxEnd(c) => StoreRequest::TransactionEnd { commit: *c },
                Spec::Plain(0) => StoreRequest::TransactionStart,
                Spec::Plain(_) => StoreRequest::ResetWatches,
                Spec::Control(c) => StoreRequest::Control(c),
            };
            check_round_trip(req)?;
        }
    }
}
