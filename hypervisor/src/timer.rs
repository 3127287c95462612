//! One-shot vCPU timers (`VCPU_OP(SET_SINGLESHOT_TIMER)`) and their `VIRQ_TIMER` events.
//!
//! One thread per [`Hypervisor`](crate::Hypervisor) (started with the first timer) holds every
//! armed timer of every domain in a map ordered by deadline, and sleeps on a condition variable
//! until the earliest one. With none armed it sleeps with no timeout at all: an idle host takes
//! no timer wake-ups. A vCPU has at most one timer (arming again replaces it; Xen's rule), so the
//! map holds at most one entry per vCPU, whatever a guest does. At expiry the thread makes the
//! vCPU's `VIRQ_TIMER` port pending ([`crate::evtchn::deliver`]), which wakes the vCPU if it
//! sleeps in `sched_op` block (port unmasked) or poll (port listed).
//!
//! Locking: the map's mutex and a domain's state mutex are never held together. Each vCPU's
//! armed key lives in its slot of the domain state; the thread fires an entry only if the slot
//! still holds that key, so a timer re-armed or stopped meanwhile never fires late.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::domain::DomainShared;

/// What identifies one arming of a timer: its deadline and a number no other arming has.
pub(crate) type TimerKey = (Instant, u64);

/// The vCPU an armed timer belongs to.
#[derive(Debug)]
struct Target {
    dom: Weak<DomainShared>,
    vcpu: u32,
}

#[derive(Debug, Default)]
struct State {
    armed: BTreeMap<TimerKey, Target>,
    /// The thread has been started (it runs until `stop`).
    running: bool,
    /// Every handle is gone: the thread exits.
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Live [`Timers`] handles; the last one to go stops the thread.
    handles: AtomicUsize,
    /// The number of the next arming.
    next_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle on the timer service, held by the hypervisor and by every domain.
#[derive(Debug)]
pub(crate) struct Timers {
    shared: Arc<Shared>,
}

impl Default for Timers {
    fn default() -> Self {
        let shared = Arc::new(Shared::default());
        // Relaxed: a plain count; the stop decision is made under the state mutex.
        shared.handles.store(1, Ordering::Relaxed);
        Self { shared }
    }
}

impl Clone for Timers {
    fn clone(&self) -> Self {
        // Relaxed: as in `default`.
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        // AcqRel: the last handle's decrement sees every other handle's (none is left to arm).
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.lock().stop = true;
            self.shared.wake.notify_all();
        }
    }
}

impl Timers {
    /// A key for a new arming with `deadline`: record it as the vCPU's before
    /// [`arm`](Self::arm)ing it, so that the thread finds it there when it expires.
    pub(crate) fn key(&self, deadline: Instant) -> TimerKey {
        // Relaxed: only uniqueness matters.
        (
            deadline,
            self.shared.next_id.fetch_add(1, Ordering::Relaxed),
        )
    }

    /// Arms timer `key` of `vcpu` of `dom`, forgetting `replaces` (the vCPU's previous timer).
    /// `false` if the timer thread could not be started.
    pub(crate) fn arm(
        &self,
        dom: &Arc<DomainShared>,
        vcpu: u32,
        key: TimerKey,
        replaces: Option<TimerKey>,
    ) -> bool {
        let mut g = self.shared.lock();
        if let Some(old) = replaces {
            g.armed.remove(&old);
        }
        if !g.running {
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("timers".into())
                .spawn(move || run(&shared));
            if let Err(e) = spawned {
                tracing::error!("cannot start the timer thread: {e}");
                return false;
            }
            g.running = true;
        }
        let earliest = g.armed.first_key_value().is_none_or(|(k, _)| key < *k);
        g.armed.insert(
            key,
            Target {
                dom: Arc::downgrade(dom),
                vcpu,
            },
        );
        drop(g);
        if earliest {
            self.shared.wake.notify_all();
        }
        true
    }

    /// Forgets an armed timer (it will not fire).
    pub(crate) fn cancel(&self, key: TimerKey) {
        // The thread is not woken: an entry gone only makes its next wake-up later.
        self.shared.lock().armed.remove(&key);
    }

    /// Timers armed, over all domains.
    #[cfg(test)]
    fn armed(&self) -> usize {
        self.shared.lock().armed.len()
    }
}

/// The timer thread: fires what is due, then sleeps until the next deadline (or, with nothing
/// armed, until something is).
fn run(shared: &Shared) {
    let mut g = shared.lock();
    loop {
        if g.stop {
            g.running = false;
            return;
        }
        let now = Instant::now();
        let next = g.armed.first_key_value().map(|(k, _)| k.0);
        match next {
            None => {
                g = shared.wake.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            Some(t) if t > now => {
                g = shared
                    .wake
                    .wait_timeout(g, t - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(_) => {
                let mut due = Vec::new();
                while let Some(e) = g.armed.first_entry() {
                    if e.key().0 > now {
                        break;
                    }
                    due.push(e.remove_entry());
                }
                // Delivery takes domain locks: never under ours.
                drop(g);
                for (key, t) in due {
                    if let Some(d) = t.dom.upgrade() {
                        d.timer_expired(t.vcpu, key);
                    }
                }
                g = shared.lock();
            }
        }
    }
}

/// The deadline `ns` nanoseconds from now, if the clock can represent it.
pub(crate) fn deadline_in(ns: u64) -> Option<Instant> {
    Instant::now().checked_add(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_stops_with_the_last_handle_and_nothing_fires_for_a_gone_domain() {
        let t = Timers::default();
        let t2 = t.clone();
        let shared = Arc::clone(&t.shared);
        // A target whose domain never existed (a dangling Weak): expiry finds nobody.
        let dom: Weak<DomainShared> = Weak::new();
        {
            let key = t.key(Instant::now());
            let mut g = shared.lock();
            g.armed.insert(key, Target { dom, vcpu: 0 });
            g.running = true;
        }
        let s2 = Arc::clone(&shared);
        let th = std::thread::spawn(move || run(&s2));
        let start = Instant::now();
        while t.armed() > 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "never fired");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(t);
        assert!(!th.is_finished() || shared.lock().stop);
        drop(t2);
        th.join().unwrap();
        assert!(!shared.lock().running);
    }
}
