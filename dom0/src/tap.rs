//! A Linux TAP device as a switch port (the uplink to the host's own network stack), read and
//! written through io_uring.
//!
//! The port keeps [`READS`] reads in flight into its own buffers; a completed read is a frame
//! from the host. Frames for the host are copied into a buffer from a recycled pool and written
//! asynchronously; at most [`MAX_WRITES`] may be in flight, beyond that frames are dropped (the
//! host is not keeping up). Completions signal an eventfd, which is what the switch sleeps on.
//! The device carries no virtio-net header, so frames reach the host with complete checksums
//! (the switch fills in blank ones first).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::switch::{FrameMeta, Port, PortCounters, PortError, UPLINK_MAX_LEARNED};

/// Errors creating a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` cannot be opened.
    #[error("/dev/net/tun")]
    Open(#[source] std::io::Error),
    /// The name is empty, too long or has a NUL.
    #[error("bad interface name {0:?}")]
    Name(String),
    /// `TUNSETIFF` failed (name taken by another kind of device, no CAP_NET_ADMIN).
    #[error("TUNSETIFF {0}")]
    SetIff(String, #[source] std::io::Error),
    /// io_uring or its eventfd could not be set up.
    #[error("io_uring")]
    Uring(#[source] std::io::Error),
}

/// A TAP network interface owned by this process; it disappears when dropped.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates (or attaches to an existing persistent) TAP device `name`, without packet-info
    /// headers.
    pub fn create(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back the chosen name into) an ifreq, which `req`
        // is laid out as and which lives for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::SetIff(
                name.into(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            file,
            name: name.into(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Reads kept in flight.
pub const READS: usize = 32;
/// Writes allowed in flight.
pub const MAX_WRITES: usize = 256;
/// Size of a read buffer: the largest frame a TAP hands out without offloads (64 KiB MTU).
const READ_BUF: usize = 65536;
/// User-data tag of writes (reads are 0..READS).
const WRITE_TAG: u64 = 1 << 32;

/// A TAP device as a switch port.
pub struct TapPort {
    // Field order is drop order: the ring (and any I/O in flight) goes before the buffers and
    // the device it reads into and from.
    uring: IoUring,
    eventfd: EventFd,
    tap: Tap,
    counters: Arc<PortCounters>,
    reads: Vec<Box<[u8]>>,
    /// Completed reads not yet handed to the switch: (buffer, length).
    ready: VecDeque<(usize, usize)>,
    /// Writes in flight, by slot.
    writes: Vec<Option<Vec<u8>>>,
    free_slots: Vec<usize>,
    spare: Vec<Vec<u8>>,
    unsubmitted: bool,
}

impl std::fmt::Debug for TapPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPort")
            .field("tap", &self.tap)
            .finish_non_exhaustive()
    }
}

impl TapPort {
    /// Serves `tap`.
    pub fn new(tap: Tap) -> Result<Self, TapError> {
        let uring = IoUring::new((READS + MAX_WRITES) as u32).map_err(TapError::Uring)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(TapError::Uring)?;
        uring
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(TapError::Uring)?;
        let mut p = Self {
            uring,
            eventfd,
            tap,
            counters: Arc::default(),
            reads: (0..READS)
                .map(|_| vec![0u8; READ_BUF].into_boxed_slice())
                .collect(),
            ready: VecDeque::new(),
            writes: (0..MAX_WRITES).map(|_| None).collect(),
            free_slots: (0..MAX_WRITES).rev().collect(),
            spare: Vec::new(),
            unsubmitted: false,
        };
        for i in 0..READS {
            p.queue_read(i);
        }
        p.uring.submit().map_err(TapError::Uring)?;
        Ok(p)
    }

    fn queue_read(&mut self, i: usize) {
        let b = &mut self.reads[i];
        let e = opcode::Read::new(
            types::Fd(self.tap.file.as_raw_fd()),
            b.as_mut_ptr(),
            b.len() as u32,
        )
        .build()
        .user_data(i as u64);
        // SAFETY: the buffer is owned by this port and not touched again until the read's
        // completion is reaped; the port (and so the buffer) outlives the ring's I/O, as the ring
        // is dropped first. The queue has room: READS reads + MAX_WRITES writes at most.
        let _ = unsafe { self.uring.submission().push(&e) };
        self.unsubmitted = true;
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .uring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in done {
            if ud >= WRITE_TAG {
                let slot = (ud - WRITE_TAG) as usize;
                if let Some(buf) = self.writes.get_mut(slot).and_then(Option::take) {
                    self.spare.push(buf);
                    self.free_slots.push(slot);
                }
                if res < 0 {
                    PortCounters::add(&self.counters.tx_dropped, 1);
                }
                continue;
            }
            let i = ud as usize;
            match usize::try_from(res) {
                Ok(len) if len > 0 => self.ready.push_back((i, len)),
                _ => {
                    if res < 0 && res != -libc::EAGAIN && res != -libc::EINTR {
                        tracing::warn!(tap = %self.tap.name, "read: {}", std::io::Error::from_raw_os_error(-res));
                    }
                    self.queue_read(i);
                }
            }
        }
    }

    fn submit(&mut self) {
        if self.unsubmitted {
            self.unsubmitted = false;
            if let Err(e) = self.uring.submit() {
                tracing::warn!(tap = %self.tap.name, "io_uring submit: {e}");
            }
        }
    }
}

impl Port for TapPort {
    fn name(&self) -> &str {
        &self.tap.name
    }

    fn counters(&self) -> &Arc<PortCounters> {
        &self.counters
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<FrameMeta>, PortError> {
        if self.ready.is_empty() {
            self.reap();
        }
        let Some((i, len)) = self.ready.pop_front() else {
            return Ok(None);
        };
        let len = len.min(buf.len());
        buf[..len].copy_from_slice(&self.reads[i][..len]);
        self.queue_read(i);
        Ok(Some(FrameMeta {
            len,
            csum_blank: false,
            data_validated: false,
        }))
    }

    fn needs_checksum(&self) -> bool {
        true
    }

    fn max_learned(&self) -> usize {
        // The hosts behind the uplink; a flood of invented sources from outside recycles only
        // these.
        UPLINK_MAX_LEARNED
    }

    fn transmit(&mut self, frame: &[u8], _meta: FrameMeta) -> bool {
        let Some(slot) = self.free_slots.pop() else {
            self.reap();
            return false;
        };
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(frame);
        let e = opcode::Write::new(
            types::Fd(self.tap.file.as_raw_fd()),
            b.as_ptr(),
            b.len() as u32,
        )
        .build()
        .user_data(WRITE_TAG + slot as u64);
        // SAFETY: the Vec moves into `writes[slot]` below (its heap buffer does not move) and
        // stays there until this write's completion is reaped; the ring is dropped before the
        // buffers. The queue has room (bounded by the free write slots).
        let _ = unsafe { self.uring.submission().push(&e) };
        self.writes[slot] = Some(b);
        self.unsubmitted = true;
        true
    }

    fn flush(&mut self) {
        self.submit();
    }

    fn arm(&mut self) -> Result<bool, PortError> {
        self.submit();
        self.reap();
        self.submit();
        Ok(!self.ready.is_empty())
    }

    fn wait_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn clear_wakeup(&mut self) {
        let _ = self.eventfd.read();
    }
}

impl Drop for TapPort {
    /// Cancels the reads in flight and waits (briefly) for every read and write to finish, so the
    /// kernel is done with the buffers before they are freed.
    fn drop(&mut self) {
        let mut pending: Vec<u64> = (0..READS as u64)
            .filter(|i| !self.ready.iter().any(|&(r, _)| r as u64 == *i))
            .collect();
        for &ud in &pending {
            let e = opcode::AsyncCancel::new(ud).build().user_data(u64::MAX);
            // SAFETY: a cancel carries no buffer.
            let _ = unsafe { self.uring.submission().push(&e) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut writes = self.writes.iter().filter(|w| w.is_some()).count();
        while (!pending.is_empty() || writes > 0) && std::time::Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.uring.submitter().submit_with_args(1, &args);
            for c in self.uring.completion() {
                let ud = c.user_data();
                if ud >= WRITE_TAG && ud != u64::MAX {
                    writes = writes.saturating_sub(1);
                } else {
                    pending.retain(|&p| p != ud);
                }
            }
        }
        if !pending.is_empty() || writes > 0 {
            // The buffers must outlive I/O we could not stop: leak them rather than free them.
            tracing::error!(tap = %self.tap.name, "I/O still in flight at close; leaking its buffers");
            std::mem::forget(std::mem::take(&mut self.reads));
            std::mem::forget(std::mem::take(&mut self.writes));
        }
    }
}
