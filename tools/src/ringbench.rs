//! The workload of the `ringbench` binary: message types, the two ring ends and their wait
//! strategies, and the little OS glue (shared mappings, CPU pinning) it needs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pv_protocol::{BackRing, FrontRing};
use vmm_sys_util::eventfd::EventFd;

pub use pv_protocol::test_utils::{
    EchoReq as Req, EchoRing as BenchRing, EchoRsp as Rsp, echo_answer as answer,
    echo_request as make_request,
};

/// A stop flag alone in its cache lines, so that polling it does not bounce a line the other
/// thread writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct StopFlag(pub AtomicBool);

/// How an end waits when the ring has nothing for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Final check, then sleep on the eventfd.
    Sleep,
    /// Poll the ring for up to this long, then final check and sleep.
    SpinThenSleep(Duration),
    /// Never sleep.
    Poll,
}

impl WaitMode {
    /// Encodes the mode for the back-end child's command line.
    pub fn to_arg(self) -> String {
        match self {
            WaitMode::Sleep => "sleep".into(),
            WaitMode::Poll => "poll".into(),
            WaitMode::SpinThenSleep(d) => format!("spin{}", d.as_nanos()),
        }
    }

    /// Decodes [`to_arg`](Self::to_arg).
    pub fn from_arg(s: &str) -> Option<Self> {
        match s {
            "sleep" => Some(WaitMode::Sleep),
            "poll" => Some(WaitMode::Poll),
            _ => Some(WaitMode::SpinThenSleep(Duration::from_nanos(
                s.strip_prefix("spin")?.parse().ok()?,
            ))),
        }
    }
}

/// What one run measured.
#[derive(Debug, Default, Clone)]
pub struct Measurement {
    /// Completed request + response round trips.
    pub round_trips: u64,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Eventfd signals sent by both ends.
    pub notifications: u64,
    /// Responses with a wrong id or checksum.
    pub errors: u64,
}

impl Measurement {
    /// Round trips per second.
    pub fn rate(&self) -> f64 {
        self.round_trips as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Eventfd signals per round trip.
    pub fn notifications_per_request(&self) -> f64 {
        self.notifications as f64 / self.round_trips.max(1) as f64
    }

    /// Checks response `r`, expected to answer request `id`.
    pub fn check(&mut self, id: u64, r: &Rsp) {
        if *r != answer(&make_request(id)) {
            self.errors += 1;
        }
    }
}

/// What a polling loop does between two looks at the ring (a PAUSE hint, as in rtrb's and
/// crossbeam's own spin loops).
#[inline(always)]
pub fn relax() {
    std::hint::spin_loop();
}

/// Waits until `ready(ring)` under `mode`; `final_check(ring)` re-arms the event index and
/// reports whether work arrived meanwhile (then there is no sleep).
fn wait<R>(
    mode: WaitMode,
    evt: &EventFd,
    ring: &mut R,
    ready: impl Fn(&mut R) -> bool,
    final_check: impl Fn(&mut R) -> bool,
) {
    if let WaitMode::SpinThenSleep(budget) = mode {
        let start = Instant::now();
        while start.elapsed() < budget {
            for _ in 0..64 {
                if ready(ring) {
                    return;
                }
                relax();
            }
        }
    }
    match mode {
        WaitMode::Poll => relax(),
        WaitMode::Sleep | WaitMode::SpinThenSleep(_) => {
            if !final_check(ring) {
                // A failed read (never expected on a live eventfd) just means one more loop.
                let _ = evt.read();
            }
        }
    }
}

/// The front end: keeps `window` requests in flight for `dur`, then drains, checking every
/// response. `kick` signals the back end, `irq` is signalled by it.
///
/// # Panics
/// If the (local, honest) back end breaks the ring.
pub fn run_front(
    ring: &mut FrontRing<'_, BenchRing>,
    kick: &EventFd,
    irq: &EventFd,
    mode: WaitMode,
    window: u32,
    dur: Duration,
) -> Measurement {
    let mut m = Measurement::default();
    let (mut sent, mut got) = (0u64, 0u64);
    let start = Instant::now();
    let mut next_clock = 64u64;
    let mut deadline_hit = false;
    loop {
        if !deadline_hit {
            while ring.in_flight() < window {
                ring.push_request(&make_request(sent)).expect("free slot");
                sent += 1;
            }
        }
        if ring.commit_requests() {
            kick.write(1).expect("eventfd write");
            m.notifications += 1;
        }
        let before = got;
        while let Some(r) = ring.take_response().expect("honest back end") {
            m.check(got, &r);
            got += 1;
        }
        if got >= next_clock {
            next_clock = got + 64;
            deadline_hit |= start.elapsed() >= dur;
        }
        if deadline_hit && got == sent {
            break;
        }
        if got == before {
            wait(
                mode,
                irq,
                ring,
                |r| r.has_unconsumed_responses().unwrap_or(true),
                |r| r.final_check_for_responses().unwrap_or(true),
            );
        }
    }
    m.elapsed = start.elapsed();
    m.round_trips = got;
    m
}

/// The back end: answers requests until `stop` is set (and it is kicked) or a request with id
/// `u64::MAX` arrives. Returns the number of notifications it sent.
///
/// # Panics
/// If the (local, honest) front end breaks the ring.
pub fn run_back(
    ring: &mut BackRing<'_, BenchRing>,
    kick: &EventFd,
    irq: &EventFd,
    mode: WaitMode,
    stop: &StopFlag,
) -> u64 {
    let mut notifications = 0;
    let mut done = false;
    while !done {
        let mut n = 0;
        while let Some(r) = ring.take_request().expect("honest front end") {
            done |= r.id == u64::MAX;
            ring.push_response(&answer(&r))
                .expect("request outstanding");
            n += 1;
        }
        if ring.commit_responses() {
            irq.write(1).expect("eventfd write");
            notifications += 1;
        }
        done |= stop.0.load(Ordering::Relaxed);
        if n == 0 && !done {
            wait(
                mode,
                kick,
                ring,
                |r| stop.0.load(Ordering::Relaxed) || r.has_unconsumed_requests().unwrap_or(true),
                |r| r.final_check_for_requests().unwrap_or(true),
            );
        }
    }
    notifications
}

/// Pins the calling thread to `cpu` when the machine has more than one core.
pub fn bind_to_cpu(cpu: usize) {
    // Not `available_parallelism()`: it reports the calling thread's affinity, which is already
    // narrowed to one core in a thread spawned by a pinned thread.
    // SAFETY: sysconf has no memory-safety preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    if cores < 2 {
        return;
    }
    // SAFETY: `set` is a plain bitmask initialised by CPU_ZERO/CPU_SET before use, and
    // sched_setaffinity only reads it. Failure leaves the thread unpinned, which is harmless.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu % cores, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A `MAP_SHARED` mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and writable.
    pub fn shared(fd: &OwnedFd, len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing existing is replaced. The result
        // is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// First byte of the mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a successful map).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `shared`, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A one-page memfd and a shared mapping of it, for a ring shared between processes.
pub fn memfd_ring() -> std::io::Result<(OwnedFd, Mapping)> {
    // SAFETY: the name is a NUL-terminated literal; the returned descriptor is checked.
    let fd = unsafe { libc::memfd_create(c"splitvisor-ringbench".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on a descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let map = Mapping::shared(&fd, 4096)?;
    Ok((fd, map))
}
