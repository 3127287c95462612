//! Memory reservation: which frames of a domain's physical map hold memory, how many it may
//! hold, and the `memory_op` hypercall with which its balloon gives frames back and takes them
//! again (Xen's `XENMEM_decrease_reservation` / `XENMEM_populate_physmap`).
//!
//! A domain's physical map is its memfd, `maxmem` long. At boot it holds the frames below
//! `memory`; the rest are *absent*. Giving a frame back marks it absent and punches a hole in
//! the memfd (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), which frees the host page; populating a frame
//! clears the mark (after punching it again, so the frame always comes back as zeros). The guest
//! may give back only its ordinary RAM (frames at or above [`KERNEL_MIN_LOAD`]: below lie every
//! page the host itself writes), only frames it holds, and only frames no other domain has
//! mapped through a grant: a back end may be doing I/O into a mapped page, so it is never freed
//! under it ([`crate::grant`] counts mappings per frame, and refuses to map an absent frame).
//! It may populate absent frames while it holds fewer than its maximum reservation, which the
//! toolstack sets (`xl mem-set` caps it at the target, as libxl does; at most `maxmem`).
//!
//! **A guest that touches a frame it gave back.** KVM maps the memfd, so such an access is not
//! a fault: the hole fills with a fresh zero page, which the host pays for. That is detected
//! from the outside: a domain can never have more pages in its memfd (`st_blocks`) than it
//! holds, unless it touched absent frames (the host writes only frames below
//! [`KERNEL_MIN_LOAD`], which are never absent, and grants of absent frames are refused). On
//! every `memory_op` and every accounting query ([`stats`]) the host compares the two; when the
//! memfd holds more, the guest fault `balloon-reuse` is counted (logged once) and every absent
//! frame is punched again, at most once per [`REPAIR_INTERVAL`]: what the guest wrote there is
//! gone and reads as zeros again. A reusing guest thus never costs the host more than it holds
//! for longer than that, and never more than its `maxmem` (the memfd's size) at all. It also
//! gains nothing but memory that may vanish under it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pv_protocol::PAGE_SIZE;
use pv_protocol::grant::DomId;
use pv_protocol::hypercall::Errno;
use pv_protocol::memory::{MemoryCmd, MemoryReservation, Reservation as ReservationArg};
use pv_protocol::start_info::KERNEL_MIN_LOAD;

use crate::domain::DomainShared;

/// The lowest frame a guest may give back.
pub const FIRST_RAM_FRAME: u64 = KERNEL_MIN_LOAD / PAGE_SIZE as u64;

/// Absent frames are punched again after a `balloon-reuse` fault at most this often.
pub const REPAIR_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the toolstack's requests here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReservationError {
    /// A maximum beyond the physical map.
    #[error("a maximum of {pages} pages exceeds the physical map of {physmap} pages")]
    BeyondPhysmap {
        /// Asked for.
        pages: u64,
        /// The physical map.
        physmap: u64,
    },
}

/// What a domain holds, as the toolstack shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Pages the domain holds (Xen's `tot_pages`): every frame not given back.
    pub held_pages: u64,
    /// Pages it may hold at most (Xen's `max_pages`: the target after `mem-set`).
    pub max_pages: u64,
    /// Frames in its physical map (`maxmem`).
    pub physmap_pages: u64,
    /// Host memory its memfd really has allocated (`st_blocks`): the pages it has touched. Pages
    /// that a back end's io_uring registration pins after they were given back are not counted
    /// (the registration is dropped at the back end's next pass).
    pub host_bytes: u64,
}

#[derive(Debug)]
struct State {
    held: u64,
    max: u64,
    last_repair: Option<Instant>,
}

/// A domain's reservation.
#[derive(Debug)]
pub struct Reservation {
    /// One bit per frame of the physical map: set while the frame is absent. Changed only under
    /// `state` and the domain's grant map-track lock; read by grant mapping under the latter.
    absent: Box<[AtomicU64]>,
    frames: u64,
    /// Bumped whenever frames are given back (a registration of the whole memory is then stale).
    generation: AtomicU64,
    state: Mutex<State>,
}

impl Reservation {
    /// A physical map of `frames` frames of which the first `held` hold memory; the domain may
    /// hold up to `frames`.
    pub(crate) fn new(held: u64, frames: u64) -> Self {
        let held = held.min(frames);
        // Word `w` covers frames 64w..64w+64: the bits of frames from `held` up to `frames`.
        let mask = |n: u64| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        let absent: Box<[AtomicU64]> = (0..frames.div_ceil(64))
            .map(|w| {
                let base = w * 64;
                let lo = held.saturating_sub(base);
                let hi = frames - base;
                AtomicU64::new(mask(hi) & !mask(lo))
            })
            .collect();
        Self {
            absent,
            frames,
            generation: AtomicU64::new(0),
            state: Mutex::new(State {
                held,
                max: frames,
                last_repair: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `frame` is outside the physical map or absent.
    pub fn is_absent(&self, frame: u64) -> bool {
        // Acquire: pairs with the Release of the change, made under the map-track lock.
        frame >= self.frames
            || self.absent[(frame / 64) as usize].load(Ordering::Acquire) & (1 << (frame % 64)) != 0
    }

    fn set_absent(&self, frame: u64, absent: bool) {
        let (w, bit) = (&self.absent[(frame / 64) as usize], 1u64 << (frame % 64));
        // Release: grant mapping reads the bit (Acquire) under the lock the writer holds.
        if absent {
            w.fetch_or(bit, Ordering::Release);
        } else {
            w.fetch_and(!bit, Ordering::Release);
        }
    }

    /// Frames of the physical map.
    pub fn physmap_pages(&self) -> u64 {
        self.frames
    }

    /// Pages held now.
    pub fn held_pages(&self) -> u64 {
        self.lock().held
    }

    /// Changes whenever frames are given back.
    pub fn generation(&self) -> u64 {
        // Acquire: a back end that sees the new value after taking a request sees the frames
        // given back before the guest could have asked for I/O into them again.
        self.generation.load(Ordering::Acquire)
    }

    /// Runs of absent frames, `(first, count)`, in order.
    fn absent_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, w) in self.absent.iter().enumerate() {
            // Relaxed: read under `state`, which every writer holds.
            let mut bits = w.load(Ordering::Relaxed);
            while bits != 0 {
                let f = i as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                match runs.last_mut() {
                    Some((first, n)) if *first + *n == f => *n += 1,
                    _ => runs.push((f, 1)),
                }
            }
        }
        runs
    }
}

/// Sorted runs `(first, count)` of `frames`.
fn runs_of(frames: &mut [u64]) -> Vec<(u64, u64)> {
    frames.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &f in frames.iter() {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == f => *n += 1,
            _ => runs.push((f, 1)),
        }
    }
    runs
}

fn punch(dom: &DomainShared, runs: &[(u64, u64)]) {
    for &(first, n) in runs {
        let (gpa, len) = (first * PAGE_SIZE as u64, n * PAGE_SIZE as u64);
        if let Err(e) = dom.ram.punch(gpa, len) {
            // The memory stays allocated (st_blocks shows it); the frames are absent all the same.
            tracing::error!(domid = dom.id, "cannot free guest frames: {e}");
        }
    }
}

/// Compares the host memory of the domain with what it holds (under `st`): more means it
/// touched frames it gave back (see the module's documentation).
fn check_host_memory(dom: &DomainShared, st: &mut State) -> u64 {
    let host = match dom.ram.allocated_bytes() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(domid = dom.id, "cannot read guest memory size: {e}");
            return 0;
        }
    };
    let pages = host / PAGE_SIZE as u64;
    if pages <= st.held {
        return host;
    }
    let repair = st
        .last_repair
        .is_none_or(|t| t.elapsed() >= REPAIR_INTERVAL);
    dom.guest_fault(
        "balloon-reuse",
        format_args!(
            "{pages} pages of host memory for {} held: frames it gave back were touched{}",
            st.held,
            if repair { "; they are freed again" } else { "" }
        ),
    );
    if !repair {
        return host;
    }
    st.last_repair = Some(Instant::now());
    punch(dom, &dom.reservation.absent_runs());
    dom.ram.allocated_bytes().unwrap_or(host)
}

/// What `dom` holds (and a check that it holds no more: see the module's documentation).
pub fn stats(dom: &DomainShared) -> MemoryStats {
    let r = &dom.reservation;
    let mut st = r.lock();
    let host_bytes = check_host_memory(dom, &mut st);
    MemoryStats {
        held_pages: st.held,
        max_pages: st.max,
        physmap_pages: r.frames,
        host_bytes,
    }
}

/// Sets the most pages `dom` may hold (the toolstack's target, enforced as `xl mem-set` does);
/// pages it holds beyond it stay until it gives them back.
pub fn set_max_pages(dom: &DomainShared, pages: u64) -> Result<(), ReservationError> {
    let r = &dom.reservation;
    if pages > r.frames {
        return Err(ReservationError::BeyondPhysmap {
            pages,
            physmap: r.frames,
        });
    }
    r.lock().max = pages;
    Ok(())
}

/// Runs `register` with the domain's whole memory (host address, length) if no frame of it is
/// absent, so that it can be registered with the kernel (io_uring fixed buffers, which pin every
/// page: with absent frames that would allocate them again). Returns the
/// [`Reservation::generation`] the registration is valid for while `register` said it succeeded.
pub fn with_whole_memory(
    dom: &DomainShared,
    register: &mut dyn FnMut(std::ptr::NonNull<u8>, usize) -> bool,
) -> Option<u64> {
    let r = &dom.reservation;
    // Held: no frame can be given back while the kernel pins the pages.
    let st = r.lock();
    if st.held != r.frames {
        return None;
    }
    let base = std::ptr::NonNull::new(dom.ram.host_base() as *mut u8)?;
    let generation = r.generation();
    let ok = register(base, dom.ram.size() as usize);
    drop(st);
    ok.then_some(generation)
}

/// One refused frame: why, for the guest and for the log.
struct Refusal {
    kind: &'static str,
    errno: Errno,
    why: &'static str,
}

fn refuse(kind: &'static str, errno: Errno, why: &'static str) -> Refusal {
    Refusal { kind, errno, why }
}

/// Validates a frame any `memory_op` may name.
fn check_frame(r: &Reservation, frame: u64) -> Result<(), Refusal> {
    if frame >= r.frames {
        return Err(refuse(
            "balloon-bad-frame",
            Errno::EINVAL,
            "outside the physical map",
        ));
    }
    if frame < FIRST_RAM_FRAME {
        return Err(refuse(
            "balloon-bad-frame",
            Errno::EPERM,
            "below the kernel's load address (host-written pages)",
        ));
    }
    Ok(())
}

/// Gives `frames` back, in order, up to the first refused; returns how many were.
fn decrease(dom: &DomainShared, frames: &[u64]) -> (u64, Option<(u64, Refusal)>) {
    let r = &dom.reservation;
    let mut st = r.lock();
    let mut done = Vec::with_capacity(frames.len());
    let mut refused = None;
    {
        // The map-track lock: no grant of these frames can be mapped from here on (mapping
        // checks the absent bit under the same lock), and none is mapped now.
        let track = crate::grant::track(dom);
        for &f in frames {
            let ok = check_frame(r, f).and_then(|()| {
                if r.is_absent(f) {
                    return Err(refuse(
                        "balloon-not-held",
                        Errno::ENOENT,
                        "not held (given back already)",
                    ));
                }
                if track.frame_mapped(f) {
                    return Err(refuse(
                        "balloon-busy",
                        Errno::EBUSY,
                        "mapped by another domain through a grant",
                    ));
                }
                Ok(())
            });
            if let Err(e) = ok {
                refused = Some((f, e));
                break;
            }
            r.set_absent(f, true);
            done.push(f);
        }
    }
    let n = done.len() as u64;
    if n > 0 {
        punch(dom, &runs_of(&mut done));
        st.held -= n;
        // Release: see `generation`.
        r.generation.fetch_add(1, Ordering::Release);
    }
    check_host_memory(dom, &mut st);
    (n, refused)
}

/// Backs `frames` with (zeroed) memory again, in order, up to the first refused.
fn populate(dom: &DomainShared, frames: &[u64]) -> (u64, Option<(u64, Refusal)>) {
    let r = &dom.reservation;
    let mut st = r.lock();
    let mut done = Vec::with_capacity(frames.len());
    let mut refused = None;
    for &f in frames {
        let ok = check_frame(r, f).and_then(|()| {
            // A frame named twice in the list is held by its second mention.
            if !r.is_absent(f) || done.contains(&f) {
                return Err(refuse("balloon-held", Errno::EEXIST, "held already"));
            }
            if st.held + done.len() as u64 >= st.max {
                return Err(refuse(
                    "balloon-over-max",
                    Errno::ENOMEM,
                    "at its maximum reservation",
                ));
            }
            Ok(())
        });
        if let Err(e) = ok {
            refused = Some((f, e));
            break;
        }
        done.push(f);
    }
    let n = done.len() as u64;
    if n > 0 {
        // What a guest wrote into an absent frame goes: populated memory reads as zeros.
        punch(dom, &runs_of(&mut done));
        let _track = crate::grant::track(dom);
        for &f in &done {
            r.set_absent(f, false);
        }
        st.held += n;
    }
    check_host_memory(dom, &mut st);
    (n, refused)
}

fn arg_fault(dom: &DomainShared, vcpu: u32, errno: Errno, what: std::fmt::Arguments<'_>) -> Errno {
    dom.guest_fault(
        "balloon-arg",
        format_args!("vCPU {vcpu}: memory_op: {what}"),
    );
    errno
}

/// The domain named in an argument must be the caller.
fn own(dom: &DomainShared, vcpu: u32, d: DomId) -> Result<(), Errno> {
    if d == DomId::SELF || u32::from(d.0) == dom.id {
        Ok(())
    } else {
        Err(arg_fault(
            dom,
            vcpu,
            Errno::EPERM,
            format_args!("names domain {}", d.0),
        ))
    }
}

/// `memory_op` from vCPU `vcpu`: the argument and the frame list are copied out once.
pub(crate) fn memory_op(dom: &DomainShared, vcpu: u32, cmd: MemoryCmd) -> Result<u64, Errno> {
    let (arg, give_back) = match cmd {
        MemoryCmd::CurrentReservation { arg } | MemoryCmd::MaximumReservation { arg } => {
            let d: u16 = dom
                .ram
                .read_obj(arg.0)
                .map_err(|e| arg_fault(dom, vcpu, Errno::EFAULT, format_args!("domain id: {e}")))?;
            own(dom, vcpu, DomId(d))?;
            let s = stats(dom);
            return Ok(match cmd {
                MemoryCmd::CurrentReservation { .. } => s.held_pages,
                _ => s.max_pages,
            });
        }
        MemoryCmd::DecreaseReservation { arg } => (arg, true),
        MemoryCmd::PopulatePhysmap { arg } => (arg, false),
    };
    let raw: MemoryReservation = dom
        .ram
        .read_obj(arg.0)
        .map_err(|e| arg_fault(dom, vcpu, Errno::EFAULT, format_args!("argument: {e}")))?;
    let res = ReservationArg::parse(&raw)
        .map_err(|e| arg_fault(dom, vcpu, e.errno(), format_args!("{e}")))?;
    own(dom, vcpu, res.domid)?;
    let mut bytes = vec![0u8; res.count as usize * 8];
    dom.ram
        .read(res.frames.0, &mut bytes)
        .map_err(|e| arg_fault(dom, vcpu, Errno::EFAULT, format_args!("frame list: {e}")))?;
    let frames: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let (done, refused) = if give_back {
        decrease(dom, &frames)
    } else {
        populate(dom, &frames)
    };
    match refused {
        None => Ok(done),
        Some((frame, r)) => {
            dom.guest_fault(
                r.kind,
                format_args!(
                    "vCPU {vcpu}: {} frame {frame:#x}: {} ({} of {} done)",
                    if give_back {
                        "giving back"
                    } else {
                        "populating"
                    },
                    r.why,
                    done,
                    frames.len()
                ),
            );
            if done == 0 { Err(r.errno) } else { Ok(done) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_map_holds_the_first_frames_and_knows_the_rest_absent() {
        let r = Reservation::new(1000, 1100);
        assert!(!r.is_absent(0));
        assert!(!r.is_absent(999));
        assert!(r.is_absent(1000));
        assert!(r.is_absent(1099));
        assert!(r.is_absent(1100), "outside the map counts as absent");
        assert!(r.is_absent(u64::MAX));
        assert_eq!(r.absent_runs(), [(1000, 100)]);
        assert_eq!(r.held_pages(), 1000);
        r.set_absent(5, true);
        r.set_absent(6, true);
        r.set_absent(1000, false);
        assert_eq!(r.absent_runs(), [(5, 2), (1001, 99)]);
        for (held, frames) in [(0, 64), (64, 64), (63, 129), (128, 130), (1, 1), (0, 0)] {
            let r = Reservation::new(held, frames);
            let want: Vec<(u64, u64)> = (held < frames)
                .then_some((held, frames - held))
                .into_iter()
                .collect();
            assert_eq!(r.absent_runs(), want, "{held} of {frames}");
        }
    }

    #[test]
    fn runs_are_sorted_and_merged() {
        assert_eq!(
            runs_of(&mut [9, 3, 4, 5, 10, 20]),
            [(3, 3), (9, 2), (20, 1)]
        );
        assert!(runs_of(&mut []).is_empty());
    }
}
