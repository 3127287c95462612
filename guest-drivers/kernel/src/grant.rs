//! Grant-table client: offer pages to other domains and take the offers back.

use core::sync::atomic::{AtomicU32, Ordering};

use pv_protocol::grant::GrantFlags;
use pv_protocol::start_info::GRANT_TABLE_GPA;

fn entry(gref: u32) -> (&'static AtomicU32, &'static AtomicU32) {
    let addr = GRANT_TABLE_GPA as usize + gref as usize * 8;
    // SAFETY: the grant table is identity-mapped at a fixed address for the kernel's lifetime;
    // the caller keeps `gref` inside the table (start-info's grant_frames * 512); the host
    // touches entries only with atomic operations.
    unsafe {
        (
            AtomicU32::from_ptr(addr as *mut u32),
            AtomicU32::from_ptr((addr + 4) as *mut u32),
        )
    }
}

/// Grants `domid` access to the page at guest address `gpa`.
pub fn grant(gref: u32, domid: u16, gpa: u64, readonly: bool) {
    let (word, frame) = entry(gref);
    frame.store((gpa >> 12) as u32, Ordering::Relaxed);
    let mut flags = GrantFlags::PERMIT_ACCESS;
    if readonly {
        flags |= GrantFlags::READONLY;
    }
    // Release: the frame must be visible before the entry becomes valid (Xen's wmb()).
    word.store(
        (u32::from(domid) << 16) | u32::from(flags.bits()),
        Ordering::Release,
    );
}

/// Why a grant cannot be ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndError {
    /// The grantee still has it mapped.
    InUse,
}

/// Ends access to `gref`, unless the grantee still has it mapped.
pub fn end_access(gref: u32) -> Result<(), EndError> {
    let (word, _) = entry(gref);
    let busy = u32::from((GrantFlags::READING | GrantFlags::WRITING).bits());
    let mut w = word.load(Ordering::SeqCst);
    loop {
        if w & busy != 0 {
            return Err(EndError::InUse);
        }
        // SeqCst: pairs with the hypervisor's exchange that sets READING/WRITING.
        match word.compare_exchange(w, 0, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return Ok(()),
            Err(now) => w = now,
        }
    }
}
