//! The back ends' end of an event channel: how a block or network back end signals its guest and
//! learns of the guest's signals, written as a trait so each back end can be tested against a
//! mock of the other end.

use std::os::fd::{AsRawFd, RawFd};

/// How a port tells its guest about responses, and learns of its requests.
pub trait Notify: Send {
    /// Signals the guest.
    fn notify(&self);
    /// Readable when the guest signalled.
    fn wait_fd(&self) -> RawFd;
    /// Consumes the guest's signals.
    fn clear(&self);
}

impl Notify for hypervisor::evtchn::HostPort {
    fn notify(&self) {
        hypervisor::evtchn::HostPort::notify(self);
    }

    fn wait_fd(&self) -> RawFd {
        self.eventfd().as_raw_fd()
    }

    fn clear(&self) {
        let _ = self.eventfd().read();
    }
}
