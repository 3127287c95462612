//! Domain ids: handed out round the range `1..0x7ff0` (Xen's ids below the reserved ones, which
//! the store's permissions and the event-channel ABI carry in 16 bits), each held by a
//! [`DomidLease`] for as long as anything of its domain exists, and reused only once it has been
//! free for [`REUSE_AFTER`].
//!
//! This is how Xen and libxl keep ids from running out: the hypervisor allocates by wrapping a
//! rover round the range, skipping ids in use (`domain_create`), and libxl remembers when each id
//! was freed and skips recently freed ones (`libxl__domid_history`, `LIBXL_DOMID_REUSE_TIMEOUT`),
//! so that a tool still holding an old domain's id (a console client, a log reader, `xl` racing a
//! restart) does not reach the new domain by mistake.
//!
//! The lease lives in [`crate::DomainShared`], declared after everything else there, and is
//! shared with every [`crate::grant::PinnedGrant`] (which keeps the domain's memory, for I/O the
//! kernel may still do): an id comes back only when the domain's VM fd, memory and tables are
//! gone, whoever dropped the last reference, not when `destroy` returns.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pv_protocol::grant::DomId;

/// How long an id stays unused after its domain is gone (libxl's `LIBXL_DOMID_REUSE_TIMEOUT`).
pub const REUSE_AFTER: Duration = Duration::from_secs(60);

/// Every id a domain may have: dom0 is 0, Xen's special ids start at `DOMID_FIRST_RESERVED`.
pub const RANGE: Range<u32> = 1..DomId::FIRST_RESERVED.0 as u32;

/// Errors from the id allocator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomidError {
    /// A range that is empty or leaves [`RANGE`].
    #[error("domain id range {0:?} is empty or leaves {RANGE:?}")]
    BadRange(Range<u32>),
    /// Every id is live or was freed less than the reuse delay ago.
    #[error("no domain id free: {live} in use, {recent} freed less than {reuse_after:?} ago")]
    Exhausted {
        /// Ids held by domains (or their remains).
        live: usize,
        /// Ids waiting out the reuse delay.
        recent: usize,
        /// The delay.
        reuse_after: Duration,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, DomidError>;

#[derive(Debug)]
struct State {
    /// Where the next search starts (one past the last id handed out).
    rover: u32,
    held: HashSet<u32>,
    /// When each recently released id was released; pruned once past the delay.
    freed: HashMap<u32, Instant>,
}

/// The allocator. Shared (`Arc`) with every lease it hands out.
#[derive(Debug)]
pub struct DomidPool {
    range: Range<u32>,
    reuse_after: Duration,
    state: Mutex<State>,
}

impl DomidPool {
    /// Ids from `range` (within [`RANGE`]), each reused `reuse_after` after its release.
    pub fn new(range: Range<u32>, reuse_after: Duration) -> Result<Arc<Self>> {
        if range.is_empty() || range.start < RANGE.start || range.end > RANGE.end {
            return Err(DomidError::BadRange(range));
        }
        Ok(Arc::new(Self {
            state: Mutex::new(State {
                rover: range.start,
                held: HashSet::new(),
                freed: HashMap::new(),
            }),
            range,
            reuse_after,
        }))
    }

    /// What the hypervisor uses: all of [`RANGE`], [`REUSE_AFTER`].
    pub fn standard() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                rover: RANGE.start,
                held: HashSet::new(),
                freed: HashMap::new(),
            }),
            range: RANGE,
            reuse_after: REUSE_AFTER,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next free id after the last one handed out (wrapping round the range).
    pub fn allocate(self: &Arc<Self>) -> Result<DomidLease> {
        self.allocate_at(Instant::now())
    }

    /// [`allocate`](Self::allocate) as if the time were `now` (tests choose it).
    pub fn allocate_at(self: &Arc<Self>, now: Instant) -> Result<DomidLease> {
        let mut s = self.lock();
        let reuse_after = self.reuse_after;
        // Forget releases that are past the delay: the map holds at most the range's ids, and
        // this keeps it to those still waiting.
        s.freed
            .retain(|_, at| now.saturating_duration_since(*at) < reuse_after);
        let len = self.range.end - self.range.start;
        let offset = s.rover.saturating_sub(self.range.start) % len;
        // One lap at most: every id is looked at once, then the range is known to be full.
        let found = (0..len)
            .map(|i| self.range.start + (offset + i) % len)
            .find(|id| !s.held.contains(id) && !s.freed.contains_key(id));
        let Some(id) = found else {
            return Err(DomidError::Exhausted {
                live: s.held.len(),
                recent: s.freed.len(),
                reuse_after,
            });
        };
        s.held.insert(id);
        s.rover = if id + 1 == self.range.end {
            self.range.start
        } else {
            id + 1
        };
        Ok(DomidLease {
            id,
            pool: Arc::clone(self),
        })
    }

    /// Ids held by a lease now.
    pub fn live(&self) -> usize {
        self.lock().held.len()
    }

    fn release(&self, id: u32, at: Instant) {
        let mut s = self.lock();
        if s.held.remove(&id) {
            s.freed.insert(id, at);
        }
    }
}

/// One domain's hold on its id; dropping it frees the id (reusable after the pool's delay).
#[derive(Debug)]
pub struct DomidLease {
    id: u32,
    pool: Arc<DomidPool>,
}

impl DomidLease {
    /// The id.
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for DomidLease {
    fn drop(&mut self) {
        self.pool.release(self.id, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(leases: &[DomidLease]) -> Vec<u32> {
        leases.iter().map(DomidLease::id).collect()
    }

    #[test]
    fn ids_go_round_the_range_skipping_live_ones() {
        let pool = DomidPool::new(1..5, Duration::ZERO).unwrap();
        let mut held: Vec<DomidLease> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(ids(&held), [1, 2, 3]);
        // 2 goes; the rover goes on to 4 first, then wraps past live 1 to the freed 2.
        held.remove(1);
        let four = pool.allocate().unwrap();
        let two = pool.allocate().unwrap();
        assert_eq!((four.id(), two.id()), (4, 2));
        assert_eq!(pool.live(), 4);
    }

    #[test]
    fn a_full_range_is_an_error_and_a_release_makes_room() {
        let pool = DomidPool::new(7..10, Duration::ZERO).unwrap();
        let held: Vec<DomidLease> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(ids(&held), [7, 8, 9]);
        assert_eq!(
            pool.allocate().unwrap_err(),
            DomidError::Exhausted {
                live: 3,
                recent: 0,
                reuse_after: Duration::ZERO
            }
        );
        let mut held = held;
        held.remove(0);
        assert_eq!(pool.allocate().unwrap().id(), 7);
    }

    #[test]
    fn a_released_id_waits_out_the_delay() {
        let delay = Duration::from_secs(60);
        let pool = DomidPool::new(1..3, delay).unwrap();
        let one = pool.allocate().unwrap();
        let two = pool.allocate().unwrap();
        let before = Instant::now();
        drop(one);
        let after = Instant::now();
        // Released at some point in [before, after]: just short of the delay it is still
        // waiting, and with 2 live nothing is free.
        assert_eq!(
            pool.allocate_at(before + delay - Duration::from_nanos(1))
                .unwrap_err(),
            DomidError::Exhausted {
                live: 1,
                recent: 1,
                reuse_after: delay
            }
        );
        let again = pool.allocate_at(after + delay).unwrap();
        assert_eq!(again.id(), 1);
        drop(two);
    }

    #[test]
    fn a_recently_freed_id_is_skipped_for_a_fresh_one() {
        let pool = DomidPool::new(1..4, REUSE_AFTER).unwrap();
        let one = pool.allocate().unwrap();
        drop(one);
        let t = Instant::now();
        // Rover at 2: 2 and 3 come next, then only 1 is left and it is still waiting.
        let two = pool.allocate_at(t).unwrap();
        let three = pool.allocate_at(t).unwrap();
        assert_eq!((two.id(), three.id()), (2, 3));
        assert!(matches!(
            pool.allocate_at(t),
            Err(DomidError::Exhausted {
                live: 2,
                recent: 1,
                ..
            })
        ));
        drop(three);
        assert!(matches!(
            pool.allocate_at(t),
            Err(DomidError::Exhausted {
                live: 1,
                recent: 2,
                ..
            })
        ));
        drop(two);
    }

    #[test]
    fn the_id_is_held_until_the_last_holder_of_the_lease_is_gone() {
        // What DomainShared does: the lease sits in a value many threads share.
        let pool = DomidPool::new(1..2, Duration::ZERO).unwrap();
        let remains = Arc::new(pool.allocate().unwrap());
        let back_end = Arc::clone(&remains);
        drop(remains);
        assert!(
            pool.allocate().is_err(),
            "a back end still holds the domain"
        );
        drop(back_end);
        assert_eq!(pool.allocate().unwrap().id(), 1);
    }

    #[test]
    fn ranges_outside_the_real_ids_are_refused() {
        for r in [0..5, 5..5, 1..0x7ff1, 0x7ff0..0x7ff5] {
            assert_eq!(
                DomidPool::new(r.clone(), Duration::ZERO).unwrap_err(),
                DomidError::BadRange(r)
            );
        }
        assert_eq!(DomidPool::standard().range, 1..0x7ff0);
    }

    #[test]
    fn the_whole_range_goes_round_more_than_once() {
        // Every id, several laps: none handed out twice while held.
        let pool = DomidPool::new(1..0x7ff0, Duration::ZERO).unwrap();
        let keep = pool.allocate().unwrap();
        let mut seen = 0u32;
        for _ in 0..3 * 0x7fef {
            let l = pool.allocate().unwrap();
            assert_ne!(l.id(), keep.id());
            seen += 1;
        }
        assert_eq!(seen, 3 * 0x7fef);
        assert_eq!(pool.live(), 1);
    }
}
