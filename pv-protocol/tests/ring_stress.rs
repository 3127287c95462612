//! Two threads move ten million requests and responses through one shared ring, sleeping on
//! eventfds whenever the event-index protocol lets them, and check that nothing is lost,
//! duplicated, reordered or corrupted.

use std::thread;

use pv_protocol::test_utils::{EchoRing as StressRing, RingMemory, echo_answer, echo_request};
use pv_protocol::{BackRing, FrontRing};
use vmm_sys_util::eventfd::EventFd;

const TOTAL: u64 = 10_000_000;

/// Sleeps until `evt` is signalled. A side that went to sleep after a final check that found no
/// work must be notified; ten seconds of silence means a lost wake-up, and fails the test.
fn wait(evt: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(evt),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    assert!(n == 1, "lost wake-up: no notification within 10 s");
    evt.read().unwrap();
}

#[derive(Debug, Default)]
struct Stats {
    notifications: u64,
    sleeps: u64,
}

fn back_end_n(
    mut ring: BackRing<'_, StressRing>,
    kick: &EventFd,
    irq: &EventFd,
    total: u64,
) -> Stats {
    let mut stats = Stats::default();
    let mut seen = 0u64;
    while seen < total {
        while let Some(req) = ring.take_request().expect("front end is honest") {
            assert_eq!(
                req.id, seen,
                "requests arrive in order, none lost or repeated"
            );
            seen += 1;
            ring.push_response(&echo_answer(&req))
                .expect("a request is outstanding");
        }
        if ring.commit_responses() {
            irq.write(1).unwrap();
            stats.notifications += 1;
        }
        if seen < total && !ring.final_check_for_requests().unwrap() {
            stats.sleeps += 1;
            wait(kick);
        }
    }
    stats
}

fn front_end_n(
    mut ring: FrontRing<'_, StressRing>,
    kick: &EventFd,
    irq: &EventFd,
    total: u64,
) -> Stats {
    let mut stats = Stats::default();
    let (mut sent, mut received) = (0u64, 0u64);
    while received < total {
        while sent < total && ring.free_requests() > 0 {
            ring.push_request(&echo_request(sent)).unwrap();
            sent += 1;
        }
        if ring.commit_requests() {
            kick.write(1).unwrap();
            stats.notifications += 1;
        }
        let mut got = false;
        while let Some(rsp) = ring.take_response().expect("back end is honest") {
            assert_eq!(
                rsp.id, received,
                "responses arrive in order, none lost or repeated"
            );
            assert_eq!(
                rsp,
                echo_answer(&echo_request(received)),
                "response {received} corrupted"
            );
            received += 1;
            got = true;
        }
        if !got && received < total && !ring.final_check_for_responses().unwrap() {
            stats.sleeps += 1;
            wait(irq);
        }
    }
    stats
}

#[test]
fn ten_million_round_trips_with_eventfd_wakeups_lose_nothing() {
    for pages in [1usize, 4] {
        let mut mem = RingMemory::new(pages);
        let region = mem.region();
        let front = FrontRing::<StressRing>::new(region, pages).unwrap();
        let back = BackRing::<StressRing>::attach(region, pages).unwrap();
        let kick = EventFd::new(0).unwrap();
        let irq = EventFd::new(0).unwrap();
        let total = if pages == 1 { TOTAL } else { TOTAL / 10 };
        let (fs, bs) = thread::scope(|s| {
            let b = s.spawn(|| back_end_n(back, &kick, &irq, total));
            let f = front_end_n(front, &kick, &irq, total);
            (f, b.join().unwrap())
        });
        eprintln!("{pages} page(s), {total} round trips: front {fs:?}, back {bs:?}",);
        // Every sleep was ended by a real notification from the other side.
        assert!(fs.sleeps <= bs.notifications);
        assert!(bs.sleeps <= fs.notifications);
    }
}
