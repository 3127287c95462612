//! `soak`: hostile guests beside bystanders, through a real `splitvisord`, for a while.
//!
//! One daemon, started for the run in a runtime directory of its own, serves:
//! - bystanders doing checked I/O for the whole run: `blksoak` (writes, flushes, reads back and
//!   checks patterns on its own disk) and `udpcheck` against a `netecho` guest (datagrams of
//!   changing sizes and contents, every byte checked) on switch `soak0`;
//! - hostile guests for the whole run: `hostile` (wild hypercalls), `nethostile` (malformed TX
//!   chains on the bystanders' own switch) and `blkhostile` (a full ring of 256-segment indirect
//!   requests, grant churn past the persistent-grant cache, malformed and out-of-range requests
//!   on its own disk).
//!
//! It passes when the bystanders report no error and exit 0, the daemon's resident memory at the
//! end of the run is within [`RSS_SLACK_KIB`] (or 10%) of what it was once everything ran, and
//! the daemon's log holds at most [`HOSTILE_LOG_LINES`] lines from each hostile domain, no more
//! at the end than half-way through plus a few. The table goes to `benchmarks/results/soak.md`.
//!
//! Usage: `soak [--seconds S] [--out FILE]` (default 60 s; needs root and /dev/kvm).

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use dom0::control::{CreateReply, DomRef, Done, Request, StatusReply};
use dom0::xlcfg::DomainSpec;
use splitvisor_xl::client::{Client, OwnDaemon};

/// Most lines one hostile domain may leave in the daemon's log over the whole run.
const HOSTILE_LOG_LINES: usize = 200;
/// Lines a hostile domain may add between half-time and the end (its warnings are capped
/// per device, so a steady attack adds none).
const HOSTILE_LOG_GROWTH: usize = 20;
/// Growth of the daemon's RSS allowed over the run (or 10%, whichever is larger).
const RSS_SLACK_KIB: u64 = 4096;

/// A domain of the run.
struct Guest {
    name: &'static str,
    hostile: bool,
    /// The line of its console that sums it up, and the words that line must start with.
    summary: &'static str,
}

const GUESTS: &[Guest] = &[
    Guest {
        name: "blk-bystander",
        hostile: false,
        summary: "blksoak: done",
    },
    Guest {
        name: "net-echo",
        hostile: false,
        summary: "",
    },
    Guest {
        name: "net-bystander",
        hostile: false,
        summary: "udpcheck:",
    },
    Guest {
        name: "hostile",
        hostile: true,
        summary: "hostile:",
    },
    Guest {
        name: "net-hostile",
        hostile: true,
        summary: "nethostile:",
    },
    Guest {
        name: "blk-hostile",
        hostile: true,
        summary: "blkhostile:",
    },
];

fn domain_file(name: &str, dir: &Path, secs: u64) -> String {
    let disk = |n: &str| {
        format!(
            "disk = [ 'vdev=xvda,size=256M,target={}/{n}.img' ]\n",
            dir.display()
        )
    };
    let vif = |ip: &str| format!("vif = [ 'bridge=soak0,ip={ip}' ]\n");
    let (extra, devices) = match name {
        "blk-bystander" => (format!("blksoak secs={secs}"), disk(name)),
        "net-echo" => ("netecho".to_string(), vif("10.77.0.1")),
        "net-bystander" => (format!("udpcheck 10.77.0.1 secs={secs}"), vif("10.77.0.2")),
        "hostile" => (format!("hostile secs={secs}"), String::new()),
        "net-hostile" => (format!("nethostile secs={secs}"), vif("10.77.0.3")),
        _ => (format!("blkhostile secs={secs}"), disk(name)),
    };
    format!(
        "name = \"{name}\"\nmemory = 64\nvcpus = 1\nextra = \"{extra}\"\n{devices}\
         on_poweroff = \"preserve\"\non_crash = \"preserve\"\n"
    )
}

/// The daemon's resident memory, KiB: all of it (`VmRSS`, which counts the guests' memory the
/// daemon maps, as far as the guests have touched it) and its own (`RssAnon`: heap and stacks,
/// what a leak would grow).
fn rss_kib(pid: u32) -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("daemon status: {e}"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("no {name} in the daemon's status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// Lines of the daemon's log about domain `id`.
fn log_lines(log: &Path, id: u64) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tag = format!("domid={id}");
    text.lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|w| w == tag || w.starts_with(&format!("{tag}:")))
        })
        .count()
}

/// Everything the domain printed, once it has ended.
fn console(dir: &Path, id: u64) -> Result<String, String> {
    let mut c = Client::connect(dir).map_err(|e| format!("console: {e:?}"))?;
    c.call::<Done>(Request::Console {
        dom: DomRef::Id(id as u32),
    })
    .map_err(|e| e.to_string())?;
    let mut out = c.reader.buffer().to_vec();
    let mut rest = Vec::new();
    let _ = c.stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = c.reader.get_mut().read_to_end(&mut rest);
    out.extend(rest);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn run() -> Result<(), String> {
    let mut secs = 60u64;
    let mut out = "benchmarks/results/soak.md".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s| s >= 10)
                    .ok_or("--seconds needs a number of at least 10")?
            }
            "--out" => out = args.next().ok_or("--out needs a file")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let work = std::env::temp_dir().join(format!("sv-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let run_dir = work.join("run");
    let (daemon, mut c) = OwnDaemon::start(&run_dir)?;
    let pid = daemon.pid();
    let log = run_dir.join(dom0::control::LOG);

    let mut ids = Vec::new();
    for g in GUESTS {
        let file = work.join(format!("{}.cfg", g.name));
        std::fs::write(&file, domain_file(g.name, &work, secs)).map_err(|e| e.to_string())?;
        let spec = DomainSpec::load(&file, &[]).map_err(|e| e.to_string())?;
        let v: CreateReply = c
            .call(Request::Create {
                spec: Box::new(spec),
                paused: false,
            })
            .map_err(|e| format!("create {}: {e}", g.name))?;
        ids.push(u64::from(v.id));
    }
    let started = Instant::now();
    eprintln!("soak: {} domains up for {secs} s", GUESTS.len());

    // Memory once everything runs, half-time log counts, memory near the end.
    let at = |frac: f64| Duration::from_secs_f64(secs as f64 * frac);
    let wait_until = |d: Duration| {
        if let Some(left) = d.checked_sub(started.elapsed()) {
            std::thread::sleep(left);
        }
    };
    wait_until(at(0.1).max(Duration::from_secs(5)));
    let (total_start, rss_start) = rss_kib(pid)?;
    let mut rss_max = rss_start;
    let mut half = Vec::new();
    let mut next_sample = started.elapsed();
    while started.elapsed() < at(0.9) {
        if started.elapsed() >= next_sample {
            rss_max = rss_max.max(rss_kib(pid)?.1);
            next_sample += Duration::from_secs(5);
            if half.is_empty() && started.elapsed() >= at(0.5) {
                half = ids.iter().map(|&id| log_lines(&log, id)).collect();
                eprintln!("soak: half-time, daemon RSS {:?} KiB", rss_kib(pid)?);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (total_end, rss_end) = rss_kib(pid)?;
    rss_max = rss_max.max(rss_end);

    // Every guest ends by itself (secs=): wait for all to be stopped (preserved).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut states: Vec<StatusReply>;
    loop {
        states = ids
            .iter()
            .map(|&id| {
                c.call(Request::Status {
                    dom: DomRef::Id(id as u32),
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("status: {e}"))?;
        let stopped = |s: &StatusReply| !s.state.starts_with("Running");
        // The echo server never ends by itself.
        if states
            .iter()
            .zip(GUESTS)
            .all(|(s, g)| g.name == "net-echo" || stopped(s))
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "guests still running 120 s after the end: {states:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let end = ids
        .iter()
        .map(|&id| log_lines(&log, id))
        .collect::<Vec<_>>();

    let mut failures = Vec::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "# Soak: hostile guests beside bystanders\n\n\
         {secs} s through one `splitvisord` (`soak --seconds {secs}`), 2-core host, KVM PVM.\n\n\
         | domain | role | how it ended | what it reported | daemon log lines (half-time / end) |\n\
         |---|---|---|---|---:|"
    );
    for (i, g) in GUESTS.iter().enumerate() {
        let text = console(&daemon.dir, ids[i])?;
        // A bystander's last report; everything a hostile guest said of itself.
        // (A hostile guest's garbage may precede its words on the same line.)
        let said: Vec<&str> = text
            .lines()
            .filter_map(|l| l.find(g.summary).map(|i| &l[i..]))
            .filter(|l| !l.contains("disk of") && (!l.contains(": pass ") || l.contains("done")))
            .collect();
        let summary = match (g.summary.is_empty(), g.hostile) {
            (true, _) => String::new(),
            (false, true) => said.join("; "),
            (false, false) => said.last().copied().unwrap_or_default().to_string(),
        };
        let s = &states[i];
        let how = match s.shutdown_code {
            Some(code) => format!("exit {code}"),
            None => s.state.clone(),
        };
        let h = half.get(i).copied().unwrap_or(0);
        let _ = writeln!(
            table,
            "| {} | {} | {how} | `{summary}` | {h} / {} |",
            g.name,
            if g.hostile { "hostile" } else { "bystander" },
            end[i]
        );
        if !g.summary.is_empty() && summary.is_empty() {
            failures.push(format!("{} printed no {:?} line", g.name, g.summary));
        }
        if !g.hostile && g.name != "net-echo" && how != "exit 0" {
            failures.push(format!("bystander {} ended {how}: {summary}", g.name));
        }
        if g.hostile {
            if end[i] > HOSTILE_LOG_LINES {
                failures.push(format!("{} left {} log lines", g.name, end[i]));
            }
            if end[i] > h + HOSTILE_LOG_GROWTH {
                failures.push(format!(
                    "{}'s log lines grew from {h} to {} in the second half",
                    g.name, end[i]
                ));
            }
            if s.crashed {
                failures.push(format!(
                    "{} crashed ({how}): its attack did not run",
                    g.name
                ));
            }
        }
    }
    let slack = RSS_SLACK_KIB.max(rss_start / 10);
    let _ = writeln!(
        table,
        "\nDaemon memory of its own (RssAnon): {rss_start} KiB once all ran, {rss_end} KiB at 90% \
         of the run (max {rss_max} KiB, sampled every 5 s); allowed growth {slack} KiB. \
         All resident memory (VmRSS, with the guest memory the daemon maps): {total_start} KiB, \
         then {total_end} KiB.\n"
    );
    if rss_end > rss_start + slack {
        failures.push(format!(
            "the daemon grew from {rss_start} KiB to {rss_end} KiB"
        ));
    }
    let _ = writeln!(
        table,
        "Result: {}",
        if failures.is_empty() {
            "pass".to_string()
        } else {
            format!("FAIL: {}", failures.join("; "))
        }
    );
    splitvisor_tools::results::publish("soak", &out, &table)?;
    drop(daemon);
    // The log stays for a look after the run.
    let kept = Path::new("target").join("soak-daemon.log");
    if std::fs::copy(&log, &kept).is_ok() {
        eprintln!("soak: the daemon's log is in {}", kept.display());
    }
    let _ = std::fs::remove_dir_all(&work);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn main() {
    splitvisor_tools::results::main("soak", run);
}
