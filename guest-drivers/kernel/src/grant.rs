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

/// Ends access to grant references `first..first + count`, retrying (about every 2 ms, for at
/// most `timeout_ms`) while the grantee still has some mapped. Returns how many stayed mapped:
/// their pages must be leaked, never reused, since the grantee can still reach them. Ending a
/// reference that is not granted is a no-op, so a range may include unused references.
pub fn end_access_range(cpu: &crate::hcall::Cpu, first: u32, count: u32, timeout_ms: u64) -> u32 {
    let mut waited_ms = 0;
    loop {
        let busy = (first..first + count)
            .filter(|&g| end_access(g).is_err())
            .count() as u32;
        if busy == 0 || waited_ms >= timeout_ms {
            return busy;
        }
        crate::evtchn::poll(cpu, &[], 2_000_000);
        waited_ms += 2;
    }
}
