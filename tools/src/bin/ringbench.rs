//! `ringbench`: request/response round trips through a pv-protocol shared ring, measured in the
//! same run against `crossbeam-channel` and the `rtrb` SPSC ring.
//!
//! Every variant runs the same workload: a front end keeps up to `window` 64-byte requests in
//! flight; a back end answers each with a 16-byte response carrying a checksum of the request; the
//! front end checks each response's id and checksum. Threads are pinned to separate cores when
//! the machine has two or more.
//!
//! Usage: `ringbench [--seconds S] [--runs N] [--spin-us U] [--out FILE]`

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use pv_protocol::{BackRing, FrontRing, SharedRegion};
use splitvisor_tools::ringbench::{
    Measurement, Req, Rsp, StopFlag, WaitMode, answer, bind_to_cpu, make_request, memfd_ring,
    relax, run_back, run_front,
};
use vmm_sys_util::eventfd::EventFd;

const WINDOWS: [u32; 3] = [1, 8, 32];

struct Opts {
    seconds: f64,
    runs: usize,
    spin: Duration,
    out: String,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 1.0,
        runs: 5,
        spin: Duration::from_micros(50),
        out: "benchmarks/results/ringbench.md".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--seconds" => {
                o.seconds = val("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--runs" => o.runs = val("--runs")?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--spin-us" => {
                o.spin = Duration::from_micros(
                    val("--spin-us")?
                        .parse()
                        .map_err(|e| format!("--spin-us: {e}"))?,
                )
            }
            "--out" => o.out = val("--out")?,
            "-h" | "--help" => {
                println!("usage: ringbench [--seconds S] [--runs N] [--spin-us U] [--out FILE]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if o.runs == 0 || o.seconds <= 0.0 {
        return Err("--runs and --seconds must be positive".into());
    }
    Ok(o)
}

/// pv-protocol ring, front and back end on two threads sharing one page.
fn pv_threads(window: u32, dur: Duration, mode: WaitMode) -> Measurement {
    let (_memfd, map) = memfd_ring().expect("memfd ring");
    // SAFETY: `map` is a live shared mapping of one page that outlives both ring ends (they are
    // dropped at the end of this function, before `map`).
    let region = unsafe { SharedRegion::from_raw(map.ptr(), map.len()) }.expect("aligned page");
    let mut front = FrontRing::new(region, 1).expect("one-page ring");
    let kick = EventFd::new(0).expect("eventfd");
    let irq = EventFd::new(0).expect("eventfd");
    let stop = StopFlag::default();
    thread::scope(|s| {
        let (kick, irq, stop) = (&kick, &irq, &stop);
        // The back end's state lives on its own thread's stack: endpoints next to each other on
        // one stack would share cache lines and bounce them between the cores.
        let b = s.spawn(move || {
            bind_to_cpu(1);
            let mut back = BackRing::attach(region, 1).expect("one-page ring");
            run_back(&mut back, kick, irq, mode, stop)
        });
        bind_to_cpu(0);
        let mut m = run_front(&mut front, kick, irq, mode, window, dur);
        stop.0.store(true, Ordering::Relaxed);
        kick.write(1).expect("eventfd write");
        m.notifications += b.join().expect("back-end thread");
        m
    })
}

/// pv-protocol ring, back end in a second process mapping the same memfd page.
fn pv_processes(window: u32, dur: Duration, mode: WaitMode) -> Result<Measurement, String> {
    let (memfd, map) = memfd_ring().map_err(|e| format!("memfd ring: {e}"))?;
    // SAFETY: `map` is a live MAP_SHARED mapping of one page, unmapped only when `map` drops at the
    // end of this function, after the front ring (which borrows this region) is gone.
    let region = unsafe { SharedRegion::from_raw(map.ptr(), map.len()) }
        .map_err(|e| format!("region: {e}"))?;
    let mut front = FrontRing::new(region, 1).map_err(|e| format!("ring: {e}"))?;
    let kick = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
    let irq = EventFd::new(0).map_err(|e| format!("eventfd: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let fds = [memfd.as_raw_fd(), kick.as_raw_fd(), irq.as_raw_fd()];
    for fd in fds {
        clear_cloexec(fd)?;
    }
    let mut child = Command::new(exe)
        .arg("--back-end-child")
        .args(fds.iter().map(|f| f.to_string()))
        .arg(mode.to_arg())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn back-end process: {e}"))?;
    bind_to_cpu(0);
    let mut m = run_front(&mut front, &kick, &irq, mode, window, dur);
    // Tell the child to stop with an id it can never see otherwise, then wake it.
    front
        .push_request(&make_request(u64::MAX))
        .map_err(|e| format!("stop request: {e}"))?;
    front.commit_requests();
    kick.write(1).map_err(|e| format!("kick: {e}"))?;
    let out = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| format!("child output: {e}"))?;
    let status = child.wait().map_err(|e| format!("child: {e}"))?;
    if !status.success() {
        return Err(format!("back-end process failed: {status}"));
    }
    let n: u64 = line
        .trim()
        .strip_prefix("notifications ")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("unexpected child output {line:?}"))?;
    m.notifications += n;
    Ok(m)
}

fn clear_cloexec(fd: RawFd) -> Result<(), String> {
    // SAFETY: F_SETFD on a descriptor we own; no memory is passed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    if r < 0 {
        return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The child side of [`pv_processes`]: maps the memfd and serves until the stop request.
fn back_end_child(args: &[String]) -> Result<(), String> {
    let fd = |i: usize| -> Result<RawFd, String> {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| "usage: --back-end-child MEMFD KICK IRQ MODE".to_string())
    };
    // SAFETY: the parent passed these descriptors to us open and did not keep them for us;
    // each is wrapped exactly once.
    let (memfd, kick, irq) = unsafe {
        (
            OwnedFd::from_raw_fd(fd(0)?),
            EventFd::from_raw_fd(fd(1)?),
            EventFd::from_raw_fd(fd(2)?),
        )
    };
    let mode =
        WaitMode::from_arg(args.get(3).map(String::as_str).unwrap_or("")).ok_or("bad wait mode")?;
    let map = splitvisor_tools::ringbench::Mapping::shared(&memfd, 4096)
        .map_err(|e| format!("mmap: {e}"))?;
    // SAFETY: `map` outlives the back ring, which is dropped at the end of this function first.
    let region = unsafe { SharedRegion::from_raw(map.ptr(), map.len()) }
        .map_err(|e| format!("region: {e}"))?;
    let mut back = BackRing::attach(region, 1).map_err(|e| format!("ring: {e}"))?;
    bind_to_cpu(1);
    let stop = StopFlag::default();
    let n = run_back(&mut back, &kick, &irq, mode, &stop);
    println!("notifications {n}");
    Ok(())
}

/// crossbeam-channel: bounded request and response channels of capacity `window`.
fn crossbeam(window: u32, dur: Duration) -> Measurement {
    let (req_tx, req_rx) = crossbeam_channel::bounded::<Req>(window as usize);
    let (rsp_tx, rsp_rx) = crossbeam_channel::bounded::<Rsp>(window as usize);
    thread::scope(|s| {
        s.spawn(move || {
            bind_to_cpu(1);
            while let Ok(r) = req_rx.recv() {
                if rsp_tx.send(answer(&r)).is_err() {
                    break;
                }
            }
        });
        bind_to_cpu(0);
        let mut m = Measurement::default();
        let (mut sent, mut got) = (0u64, 0u64);
        let start = Instant::now();
        let mut deadline_hit = false;
        while !deadline_hit || got < sent {
            while !deadline_hit && sent - got < u64::from(window) {
                req_tx.send(make_request(sent)).expect("back end alive");
                sent += 1;
            }
            let r = rsp_rx.recv().expect("back end alive");
            m.check(got, &r);
            got += 1;
            if got.is_multiple_of(256) && start.elapsed() >= dur {
                deadline_hit = true;
            }
        }
        m.elapsed = start.elapsed();
        m.round_trips = got;
        drop(req_tx);
        m
    })
}

/// rtrb: one SPSC ring per direction, both ends spinning and moving whole batches with rtrb's
/// chunk API (its fastest path), as the pv-ring ends do.
fn rtrb_spsc(window: u32, dur: Duration) -> Measurement {
    let (mut req_tx, mut req_rx) = rtrb::RingBuffer::<Req>::new(window as usize);
    let (mut rsp_tx, mut rsp_rx) = rtrb::RingBuffer::<Rsp>::new(window as usize);
    let stop = StopFlag::default();
    thread::scope(|s| {
        let stop = &stop;
        s.spawn(move || {
            bind_to_cpu(1);
            while !stop.0.load(Ordering::Relaxed) {
                // At most `window` requests are in flight and the response ring holds `window`,
                // so there is always room for the answers.
                let n = req_rx.slots().min(rsp_tx.slots());
                if n == 0 {
                    relax();
                    continue;
                }
                let reqs = req_rx.read_chunk(n).expect("n slots readable");
                let rsps = rsp_tx.write_chunk_uninit(n).expect("n slots writable");
                rsps.fill_from_iter(reqs.into_iter().map(|r| answer(&r)));
            }
        });
        bind_to_cpu(0);
        let mut m = Measurement::default();
        let (mut sent, mut got) = (0u64, 0u64);
        let start = Instant::now();
        let mut next_clock = 64u64;
        let mut deadline_hit = false;
        while !deadline_hit || got < sent {
            if !deadline_hit {
                let n = (u64::from(window) - (sent - got)).min(req_tx.slots() as u64);
                if n > 0 {
                    let chunk = req_tx
                        .write_chunk_uninit(n as usize)
                        .expect("n slots writable");
                    sent += chunk.fill_from_iter((sent..sent + n).map(make_request)) as u64;
                }
            }
            let n = rsp_rx.slots();
            if n == 0 {
                relax();
                continue;
            }
            for r in rsp_rx.read_chunk(n).expect("n slots readable") {
                m.check(got, &r);
                got += 1;
            }
            if got >= next_clock {
                next_clock = got + 64;
                deadline_hit |= start.elapsed() >= dur;
            }
        }
        m.elapsed = start.elapsed();
        m.round_trips = got;
        stop.0.store(true, Ordering::Relaxed);
        m
    })
}

/// The median of `runs` by throughput.
fn median(mut runs: Vec<Measurement>) -> Measurement {
    runs.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let mid = runs.len() / 2;
    runs.swap_remove(mid)
}

fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--back-end-child") {
        if let Err(e) = back_end_child(&args[2..]) {
            eprintln!("ringbench back-end child: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run() {
        eprintln!("ringbench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let o = parse_args()?;
    let dur = Duration::from_secs_f64(o.seconds);
    let spin = WaitMode::SpinThenSleep(o.spin);
    let variants: Vec<(&str, String)> = vec![
        ("pv-ring, 2 threads, eventfd (no spin)", "pv-sleep".into()),
        (
            "pv-ring, 2 threads, eventfd after spin",
            format!("pv-spin ({} us)", o.spin.as_micros()),
        ),
        ("pv-ring, 2 threads, polling", "pv-poll".into()),
        (
            "pv-ring, 2 processes (memfd), eventfd after spin",
            "pv-proc".into(),
        ),
        ("crossbeam-channel bounded (peer)", "crossbeam".into()),
        ("rtrb SPSC, polling (peer)", "rtrb".into()),
    ];
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "ringbench: {} variants x {} windows x {} runs of {:.1} s on {cores} cores",
        variants.len(),
        WINDOWS.len(),
        o.runs,
        o.seconds
    );
    // results[variant][window]
    // Rounds run every variant once, so a slow spell on this shared machine hits all of them
    // alike; the table keeps each cell's median over the rounds. samples[variant][window][round]
    let mut samples: Vec<Vec<Vec<Measurement>>> =
        vec![vec![Vec::new(); WINDOWS.len()]; variants.len()];
    for round in 1..=o.runs {
        eprintln!("round {round} of {}", o.runs);
        for (vi, (name, _)) in variants.iter().enumerate() {
            for (wi, &w) in WINDOWS.iter().enumerate() {
                let m = match vi {
                    0 => pv_threads(w, dur, WaitMode::Sleep),
                    1 => pv_threads(w, dur, spin),
                    2 => pv_threads(w, dur, WaitMode::Poll),
                    3 => pv_processes(w, dur, spin)?,
                    4 => crossbeam(w, dur),
                    _ => rtrb_spsc(w, dur),
                };
                if m.errors > 0 {
                    return Err(format!(
                        "{name}: {} responses failed their checks",
                        m.errors
                    ));
                }
                eprintln!(
                    "  {name}, window {w}: {:.2} M round trips/s",
                    m.rate() / 1e6
                );
                samples[vi][wi].push(m);
            }
        }
    }
    let results: Vec<Vec<Measurement>> = samples
        .into_iter()
        .map(|row| row.into_iter().map(median).collect())
        .collect();

    let mut t = String::new();
    let _ = writeln!(
        t,
        "# ringbench: shared-ring round trips vs crossbeam-channel and rtrb\n"
    );
    let _ = writeln!(
        t,
        "Measured {} on {cores} cores; `cargo run --release -p splitvisor-tools --bin ringbench`.",
        utc_date()
    );
    let _ = writeln!(
        t,
        "64-byte requests, 16-byte responses with a checksum checked by the front end; median of {} rounds of {:.1} s per cell (each round runs every variant); threads pinned one per core.\n",
        o.runs, o.seconds
    );
    let _ = writeln!(t, "## Round trips per second (millions)\n");
    let _ = write!(t, "| variant |");
    for w in WINDOWS {
        let _ = write!(t, " window {w} |");
    }
    let _ = writeln!(t, " notifications/request at window 32 |");
    let _ = writeln!(t, "|---|---:|---:|---:|---:|");
    for (i, (_, label)) in variants.iter().enumerate() {
        let _ = write!(t, "| {label} |");
        for m in &results[i] {
            let _ = write!(t, " {:.3} |", m.rate() / 1e6);
        }
        let last = &results[i][WINDOWS.len() - 1];
        if i < 4 {
            let _ = writeln!(t, " {:.4} |", last.notifications_per_request());
        } else {
            let _ = writeln!(t, " n/a (internal) |");
        }
    }
    let _ = writeln!(t, "\n## Ratios (pv-ring / peer)\n");
    let _ = write!(t, "| pv-ring variant | peer |");
    for w in WINDOWS {
        let _ = write!(t, " window {w} |");
    }
    let _ = writeln!(t, "\n|---|---|---:|---:|---:|");
    for (pi, peer) in [(4usize, "crossbeam-channel"), (5, "rtrb")] {
        for vi in 0..4 {
            let _ = write!(t, "| {} | {peer} |", variants[vi].1);
            for (ours, theirs) in results[vi].iter().zip(&results[pi]) {
                let _ = write!(t, " {:.2}x |", ours.rate() / theirs.rate());
            }
            let _ = writeln!(t);
        }
    }
    // Verdicts against issue 2's targets, for the eventfd variant with spinning (the mode a real
    // back end runs in) at the largest window.
    let last = WINDOWS.len() - 1;
    let (ours, cb, rt) = (&results[1][last], &results[4][last], &results[5][last]);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let vs_cb = ours.rate() / cb.rate();
    let vs_rt = ours.rate() / rt.rate();
    let npr = ours.notifications_per_request();
    let _ = writeln!(
        t,
        "\n## Targets at window 32 (issue 2), for {}\n",
        variants[1].1
    );
    let _ = writeln!(
        t,
        "- >= 10x crossbeam-channel: {vs_cb:.2}x, {}",
        met(vs_cb >= 10.0)
    );
    let _ = writeln!(t, "- >= 0.8x rtrb: {vs_rt:.2}x, {}", met(vs_rt >= 0.8));
    let _ = writeln!(
        t,
        "- <= 0.05 notifications per request: {npr:.4}, {}",
        met(npr <= 0.05)
    );
    let _ = writeln!(
        t,
        "\nFor scale: the rtrb reference itself reaches {:.2}x crossbeam-channel in this run.",
        rt.rate() / cb.rate()
    );
    let _ = writeln!(
        t,
        "\nVariants: *pv-sleep* sleeps on an eventfd as soon as a final check finds no work; *pv-spin* first \
         polls the ring for up to the spin budget (busy-poll, as NAPI or Xen's netback do under load), then \
         does the final check and sleeps; *pv-poll* never sleeps. In every eventfd variant a side signals the \
         other only when the event-index rule says the other side asked for it."
    );
    splitvisor_tools::results::publish("ringbench", &o.out, &t)
}
