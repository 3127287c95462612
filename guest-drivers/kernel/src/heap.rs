//! The kernel heap: power-of-two size classes (16 B to 1 MiB) carved from a static arena, with
//! one free list per class. Small and predictable; an allocation larger than 1 MiB fails.

use core::alloc::{GlobalAlloc, Layout};

use crate::sync::SpinLock;

const ARENA_BYTES: usize = 8 << 20;
const MIN_SHIFT: u32 = 4;
const CLASSES: usize = 17; // 16 B .. 1 MiB

#[repr(C, align(4096))]
struct Arena([u8; ARENA_BYTES]);

static mut ARENA: Arena = Arena([0; ARENA_BYTES]);

struct State {
    /// Offset of the first never-used byte of the arena.
    bump: usize,
    /// Head of each class's free list (0: empty); a free block stores the next head.
    free: [usize; CLASSES],
}

/// The global allocator.
pub struct Heap {
    state: SpinLock<State>,
}

fn class(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_SHIFT);
    let c = (size.next_power_of_two().trailing_zeros() - MIN_SHIFT) as usize;
    (c < CLASSES).then_some(c)
}

// SAFETY: blocks are disjoint pieces of the arena, each handed out once until freed; a block of
// class c is 16 << c bytes, aligned to its size, which covers the layout's size and alignment.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            return core::ptr::null_mut();
        };
        let size = 1usize << (c as u32 + MIN_SHIFT);
        let base = (&raw mut ARENA).cast::<u8>();
        self.state.with(|s| {
            let head = s.free[c];
            if head != 0 {
                // SAFETY: `head` is a freed block of this class inside the arena; its first word
                // holds the next free block (written by `dealloc`).
                s.free[c] = unsafe { (head as *const usize).read() };
                return head as *mut u8;
            }
            let off = s.bump.next_multiple_of(size);
            if off + size > ARENA_BYTES {
                return core::ptr::null_mut();
            }
            s.bump = off + size;
            // SAFETY: `off + size <= ARENA_BYTES`: inside the arena.
            unsafe { base.add(off) }
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
        free: [0; CLASSES],
    }),
};
