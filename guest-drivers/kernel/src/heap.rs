//! The kernel heap: power-of-two size classes (16 B to 1 MiB) carved from the memory above the
//! boot stacks (start-info says how much there is), with one free list per class. Small and
//! predictable; an allocation larger than 1 MiB, or beyond the memory, fails.
//!
//! A block of class c is `16 << c` bytes, aligned to its size up to a page (4 KiB) and to a page
//! above: page-sized device areas (ring and buffer pages) waste nothing to alignment.

use core::alloc::{GlobalAlloc, Layout};

use crate::sync::SpinLock;

/// Most memory the heap takes: what any job needs (4 MiB, `KERNEL_FREE_MIN`) with room to spare,
/// as the static arena had. Memory above the heap is the balloon's free RAM (`balloon.rs`).
pub const MAX_BYTES: usize = 8 << 20;
const MIN_SHIFT: u32 = 4;
const CLASSES: usize = 17; // 16 B .. 1 MiB
/// Most alignment a block has (larger alignments are refused).
const MAX_ALIGN: usize = 4096;

struct State {
    /// The first never-used byte of the arena (0: no arena yet).
    bump: usize,
    /// The end of the arena.
    end: usize,
    /// Head of each class's free list (0: empty); a free block stores the next head.
    free: [usize; CLASSES],
}

/// The global allocator.
pub struct Heap {
    state: SpinLock<State>,
}

fn class(layout: Layout) -> Option<usize> {
    if layout.align() > MAX_ALIGN {
        return None;
    }
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let c = (size.next_power_of_two().trailing_zeros() - MIN_SHIFT) as usize;
    (c < CLASSES).then_some(c)
}

/// Gives the heap the memory `base..end`, at most [`MAX_BYTES`] of it (called once, by vCPU 0,
/// before anything allocates; the range must be unused memory of the domain's, identity-mapped).
pub fn init(base: usize, end: usize) {
    HEAP.state.with(|s| {
        s.bump = base.max(1);
        s.end = end.min(s.bump.saturating_add(MAX_BYTES)).max(s.bump);
    });
}

/// The end of the heap: the first byte the kernel does not use (free RAM starts there).
pub fn end() -> usize {
    HEAP.state.with(|s| s.end)
}

/// Bytes of the arena never handed out yet (freed blocks not counted).
pub fn untouched() -> usize {
    HEAP.state.with(|s| s.end - s.bump)
}

// SAFETY: blocks are disjoint pieces of the arena (memory `init` handed over, which nothing else
// uses), each handed out once until freed; a block of class c is 16 << c bytes, aligned to
// min(its size, MAX_ALIGN), which covers the layout's size and alignment (`class` refuses
// larger alignments).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            return core::ptr::null_mut();
        };
        let size = 1usize << (c as u32 + MIN_SHIFT);
        self.state.with(|s| {
            let head = s.free[c];
            if head != 0 {
                // SAFETY: `head` is a freed block of this class inside the arena; its first word
                // holds the next free block (written by `dealloc`).
                s.free[c] = unsafe { (head as *const usize).read() };
                return head as *mut u8;
            }
            let at = s.bump.next_multiple_of(size.min(MAX_ALIGN));
            match at.checked_add(size) {
                Some(next) if s.bump != 0 && next <= s.end => {
                    s.bump = next;
                    at as *mut u8
                }
                _ => core::ptr::null_mut(),
            }
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(c) = class(layout) else {
            return;
        };
        self.state.with(|s| {
            // SAFETY: `ptr` came from `alloc` with the same layout (GlobalAlloc's contract), so it
            // is a block of class `c`, at least 16 bytes and word-aligned; it is ours again.
            unsafe { (ptr as *mut usize).write(s.free[c]) };
            s.free[c] = ptr as usize;
        });
    }
}

/// The kernel's allocator.
#[cfg_attr(not(test), global_allocator)]
pub static HEAP: Heap = Heap {
    state: SpinLock::new(State {
        bump: 0,
        end: 0,
        free: [0; CLASSES],
    }),
};

/// `n` zeroed pages (4 KiB-aligned) that are never freed: the pages a device grants, which a
/// back end may keep mapped for good. `None` when the heap cannot hold them.
pub fn pages(n: usize) -> Option<*mut u8> {
    let layout = Layout::from_size_align(n.checked_mul(4096)?, 4096).ok()?;
    if layout.size() == 0 {
        return None;
    }
    // SAFETY: `layout` has a non-zero size.
    let p = unsafe { HEAP.alloc(layout) };
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a fresh block of at least `layout.size()` bytes, ours alone.
    unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
    Some(p)
}

/// The address of the `n` pages kept in `cell`, allocated ([`pages`]) on first use and kept for
/// the kernel's life (a static area that exists only once a job needs it). `None` when the heap
/// cannot hold them. Only vCPU 0 allocates, so a plain load and store suffice.
pub fn area(cell: &core::sync::atomic::AtomicUsize, n: usize) -> Option<usize> {
    use core::sync::atomic::Ordering;
    // Relaxed: only vCPU 0 sets or reads the cells.
    match cell.load(Ordering::Relaxed) {
        0 => {
            let p = pages(n)? as usize;
            cell.store(p, Ordering::Relaxed);
            Some(p)
        }
        p => Some(p),
    }
}
