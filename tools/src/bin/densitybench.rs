//! `densitybench`: how many idle domains one host holds, and what they cost it.
//!
//! One `splitvisord`, started for the run, takes idle domains (the `idle` job, 1 vCPU) up to each
//! count N in turn. At each N it measures:
//! - the host's busy CPU share, system-wide from `/proc/stat`, over `--idle-secs` while all N
//!   domains idle (everything on the host counts: the daemon, every vCPU thread, the kernel);
//! - host memory per domain, two ways: the growth of the daemon's resident memory (its own and
//!   the guest pages it maps, which is all of a guest's RAM the host holds) over N, and the drop
//!   of the host's `MemAvailable` (everything, the kernel's KVM structures too, but noisy) over N;
//! - the create rate through the daemon's API (the batch that brought it to N), and the time from
//!   `create` to the guest's first console line for a sample of domains created with N-1
//!   resident (p50, p99);
//! - how long `xl list` and `xl top -n 1` take;
//! - a busy neighbour's latency: a `ping` guest pings a `netecho` guest (both on their own
//!   switch, there for the whole run) 30 times, 100 ms apart: round-trip p50 and p99 as the guest
//!   measures them, with no idle domain and with each N; and a block neighbour: a guest reading
//!   4 KiB at random offsets one at a time for 3 s, p50 and p99 as it measures them.
//!
//! At the largest N: `xl shutdown -a -w` (every guest acknowledges its shutdown and powers off
//! with code 0: the domains are kept, preserved, and checked), then the destroy rate through the
//! API; the two neighbours once more with no idle domain (the host's drift over the run); and
//! the create and destroy rate of a few domains through the `xl` binary.
//!
//! Usage: `densitybench [--counts 10,100,1000] [--idle-secs S] [--memory MIB] [--out FILE]
//! [--max-cpu PCT]`. With `--max-cpu`, it fails if the idle CPU share at the largest N is above
//! PCT (CI uses this). Needs root and /dev/kvm.

use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dom0::control::{CreateReply, DomRef, DomainInfo, Done, MemSetReply, Request, TopRow};
use dom0::xlcfg::DomainSpec;
use splitvisor_tools::results::median;
use splitvisor_xl::client::{Client, OwnDaemon};

/// Domains whose time to first console line is measured at each count.
const SAMPLE: usize = 20;

struct Args {
    counts: Vec<usize>,
    idle_secs: f64,
    memory: u64,
    out: String,
    max_cpu: Option<f64>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        counts: vec![10, 100, 1000],
        idle_secs: 10.0,
        memory: 64,
        out: "benchmarks/results/density.md".into(),
        max_cpu: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--counts" => {
                a.counts = v()?
                    .split(',')
                    .map(|n| n.parse().map_err(|_| format!("count {n:?}")))
                    .collect::<Result<_, _>>()?;
                a.counts.sort_unstable();
            }
            "--idle-secs" => a.idle_secs = v()?.parse().map_err(|_| "--idle-secs: seconds")?,
            "--memory" => a.memory = v()?.parse().map_err(|_| "--memory: MiB")?,
            "--out" => a.out = v()?,
            "--max-cpu" => a.max_cpu = Some(v()?.parse().map_err(|_| "--max-cpu: percent")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.counts.is_empty() || a.counts[0] == 0 {
        return Err("--counts: positive numbers".into());
    }
    Ok(a)
}

/// Busy and total jiffies of the whole host (`/proc/stat`'s first line).
fn cpu_jiffies() -> Result<(u64, u64), String> {
    let s = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let f: Vec<u64> = s
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .ok_or("no cpu line in /proc/stat")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let total: u64 = (0..8).map(at).sum();
    Ok((total - idle, total))
}

/// The host's busy share, percent, over `secs`.
fn busy_share(secs: f64) -> Result<f64, String> {
    let (b0, t0) = cpu_jiffies()?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (b1, t1) = cpu_jiffies()?;
    Ok(100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64)
}

/// The host's DAMON monitors that are running (`kdamond`s of the sysfs interface), with their
/// schemes' actions: proactive reclaim walks every sampled page's mappings into every domain's
/// KVM MMU notifier, so it matters here.
fn damon() -> String {
    let root = Path::new("/sys/kernel/mm/damon/admin/kdamonds");
    let read = |p: PathBuf| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let mut on = Vec::new();
    for k in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if read(k.path().join("state")).is_ok_and(|s| s == "on") {
            let actions: Vec<String> = std::fs::read_dir(k.path().join("contexts/0/schemes"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|s| read(s.path().join("action")).ok())
                .collect();
            on.push(format!(
                "kdamond {} ({})",
                k.file_name().to_string_lossy(),
                actions.join(", ")
            ));
        }
    }
    if on.is_empty() {
        "no DAMON monitor running".into()
    } else {
        format!("DAMON running: {}", on.join("; "))
    }
}

fn mem_available_kib() -> Result<u64, String> {
    let s = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no MemAvailable".into())
}

/// The resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("daemon status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Loads domain file `text`, written to `dir/name.cfg`.
fn load(dir: &Path, name: &str, text: &str) -> Result<DomainSpec, String> {
    let file = dir.join(format!("{name}.cfg"));
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    DomainSpec::load(&file, &[]).map_err(|e| e.to_string())
}

/// A domain file for idle domain `name`.
fn spec(dir: &Path, name: &str, memory: u64) -> Result<DomainSpec, String> {
    load(
        dir,
        "idle",
        &format!(
            "name = \"{name}\"\nmemory = {memory}\nvcpus = 1\nextra = \"idle\"\n\
             on_poweroff = \"preserve\"\n"
        ),
    )
}

fn create(c: &mut Client, spec: DomainSpec) -> Result<u32, String> {
    let v: CreateReply = c
        .call(Request::Create {
            spec: Box::new(spec),
            paused: false,
        })
        .map_err(|e| format!("create: {e}"))?;
    Ok(v.id)
}

/// The guest memory the host backs for the idle domains (their memfds' allocated blocks, `xl
/// top`'s HOST(k)) and what they hold (MEM(k)), KiB, summed.
fn backed_kib(c: &mut Client) -> Result<(u64, u64), String> {
    let v: Vec<TopRow> = c.call(Request::Top).map_err(|e| format!("top: {e}"))?;
    let idle = || v.iter().filter(|d| d.name.as_str().starts_with("idle"));
    Ok((
        idle().map(|d| d.host_kib).sum(),
        idle().map(|d| d.mem_kib).sum(),
    ))
}

/// A domain file for a guest running `extra` on switch `nb0`.
fn net_spec(dir: &Path, name: &str, extra: &str, ip: &str) -> Result<DomainSpec, String> {
    load(
        dir,
        "net",
        &format!(
            "name = \"{name}\"\nmemory = 64\nvcpus = 1\nextra = \"{extra}\"\n\
             vif = [ 'bridge=nb0,ip={ip}' ]\non_poweroff = \"preserve\"\n"
        ),
    )
}

/// Boots `spec`, feeds its console lines to `f` until `f` gives an answer (or the console ends,
/// or a minute passes), then destroys the domain.
fn run_guest<T>(
    dir: &Path,
    c: &mut Client,
    spec: DomainSpec,
    mut f: impl FnMut(&str) -> Option<Result<T, String>>,
) -> Result<T, String> {
    let name = spec.name.to_string();
    let id = create(c, spec)?;
    let answer = (|| {
        let mut con = Client::connect(dir).map_err(|e| format!("{e:?}"))?;
        con.call::<Done>(Request::Console {
            dom: DomRef::Id(id),
        })
        .map_err(|e| e.to_string())?;
        let _ = con.stream.set_read_timeout(Some(Duration::from_secs(60)));
        for line in (&mut con.reader).lines() {
            let line = line.map_err(|e| format!("console: {e}"))?;
            if let Some(answer) = f(&line) {
                return answer;
            }
        }
        Err("the console ended without a result".into())
    })();
    c.call::<Done>(Request::Destroy {
        dom: DomRef::Id(id),
    })
    .map_err(|e| e.to_string())?;
    answer.map_err(|e| format!("{name}: {e}"))
}

/// Round trips (us) of 30 pings from a fresh guest to the `netecho` guest at 10.99.0.1: p50, p99.
fn ping_rtt(dir: &Path, work: &Path, c: &mut Client, k: usize) -> Result<(f64, f64), String> {
    let spec = net_spec(
        work,
        &format!("pinger{k}"),
        "ping 10.99.0.1 count=30",
        "10.99.0.2",
    )?;
    let mut rtts = Vec::new();
    run_guest(dir, c, spec, |line| {
        if let Some(us) = line.split_whitespace().find_map(|w| {
            w.strip_prefix("time=")?
                .strip_suffix("us")?
                .parse::<f64>()
                .ok()
        }) {
            rtts.push(us);
        }
        if !(line.starts_with("ping: ") && line.contains(" sent, ")) {
            None
        } else if rtts.len() < 30 {
            Some(Err(format!("{} replies ({line})", rtts.len())))
        } else {
            Some(Ok((percentile(&rtts, 0.5), percentile(&rtts, 0.99))))
        }
    })
}

/// The image the block neighbour reads: 64 MiB of pseudo-random data, written once.
const LAT_IMAGE_MIB: usize = 64;

/// Latency (us) of 4 KiB random reads at depth 1, from a fresh guest on `image` for 3 s (at
/// most 2000 reads): p50, p99, as the guest measures them.
fn blk_latency(dir: &Path, work: &Path, c: &mut Client, k: usize) -> Result<(f64, f64), String> {
    let image = work.join("lat.img");
    if !image.exists() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..LAT_IMAGE_MIB << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&image, data).map_err(|e| format!("{}: {e}", image.display()))?;
    }
    let spec = load(
        work,
        "blk",
        &format!(
            "name = \"reader{k}\"\nmemory = 64\nvcpus = 1\nextra = \"blkbench 3 1 0 4\"\n\
             disk = [ 'vdev=xvda,access=ro,target={}' ]\non_poweroff = \"preserve\"\n",
            image.display()
        ),
    )?;
    run_guest(dir, c, spec, |line| {
        let rest = line.strip_prefix("blkbench randread_4k_qd1_us ")?;
        let w: Vec<&str> = rest.split_whitespace().collect();
        let num = |key: &str| {
            w.iter()
                .position(|&v| v == key)
                .and_then(|i| w.get(i + 1)?.parse::<f64>().ok())
        };
        Some(
            match (num("p50"), num("p99"), num("reads"), num("errors")) {
                (Some(p50), Some(p99), Some(n), Some(e)) if n >= 100.0 && e == 0.0 => {
                    Ok((p50, p99))
                }
                _ => Err(format!("bad result: {line}")),
            },
        )
    })
}

/// Creates a domain and times it until its console's first line.
fn time_to_first_line(dir: &Path, c: &mut Client, spec: DomainSpec) -> Result<f64, String> {
    let t = Instant::now();
    let id = create(c, spec)?;
    let mut con = Client::connect(dir).map_err(|e| format!("{e:?}"))?;
    con.call::<Done>(Request::Console {
        dom: DomRef::Id(id),
    })
    .map_err(|e| e.to_string())?;
    let _ = con.stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = Vec::new();
    con.reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("console of {id}: {e}"))?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn xl(xl: &Path, dir: &Path, args: &[&str]) -> Result<f64, String> {
    let t = Instant::now();
    let o = Command::new(xl)
        .arg("--runtime-dir")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("xl: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "xl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// What was measured at one count.
struct Row {
    n: usize,
    busy: f64,
    ping: (f64, f64),
    blk: (f64, f64),
    backed_kib: f64,
    rss_kib: f64,
    mem_kib: f64,
    /// None when every create of the batch was a timed-to-first-line sample.
    creates_per_s: Option<f64>,
    ttfl: (f64, f64),
    list_ms: f64,
    top_ms: f64,
}

fn run() -> Result<(), String> {
    let a = args()?;
    let work = std::env::temp_dir().join(format!("sv-density-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let run_dir = work.join("run");
    let xl_exe: PathBuf = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .with_file_name("xl");
    let base_mem = mem_available_kib()?;
    let base_busy = busy_share(a.idle_secs.min(5.0))?;
    let (daemon, mut c) = OwnDaemon::start(&run_dir)?;
    let base_rss = rss_kib(daemon.pid())?;
    eprintln!("densitybench: host busy {base_busy:.2}% before any domain");
    create(&mut c, net_spec(&work, "echo", "netecho", "10.99.0.1")?)?;
    let ping0 = ping_rtt(&run_dir, &work, &mut c, 0)?;
    let blk0 = blk_latency(&run_dir, &work, &mut c, 0)?;
    eprintln!("densitybench: with no idle neighbour: ping {ping0:?} us, 4 KiB read {blk0:?} us");

    let mut rows = Vec::new();
    let mut made = 0usize;
    for &n in &a.counts {
        let batch = n.saturating_sub(made);
        let timed = batch.saturating_sub(SAMPLE.min(batch));
        let t = Instant::now();
        for _ in 0..timed {
            create(&mut c, spec(&work, &format!("idle{made}"), a.memory)?)?;
            made += 1;
        }
        let creates_per_s = (timed > 0).then(|| timed as f64 / t.elapsed().as_secs_f64().max(1e-9));
        let mut ttfl = Vec::new();
        while made < n {
            ttfl.push(time_to_first_line(
                &run_dir,
                &mut c,
                spec(&work, &format!("idle{made}"), a.memory)?,
            )?);
            made += 1;
        }
        // Let every guest finish booting before idling.
        std::thread::sleep(Duration::from_secs(2));
        let busy = busy_share(a.idle_secs)?;
        let ping = ping_rtt(&run_dir, &work, &mut c, n)?;
        let blk = blk_latency(&run_dir, &work, &mut c, n)?;
        let mem_kib = base_mem.saturating_sub(mem_available_kib()?) as f64 / n as f64;
        let rss_kib = rss_kib(daemon.pid())?.saturating_sub(base_rss) as f64 / n as f64;
        let backed_kib = backed_kib(&mut c)?.0 as f64 / n as f64;
        let list_ms = xl(&xl_exe, &run_dir, &["list"])?;
        let top_ms = xl(&xl_exe, &run_dir, &["top", "-n", "1"])?;
        eprintln!(
            "densitybench: {n} idle: host busy {busy:.2}%, {rss_kib:.0} KiB each, \
             {} creates/s, xl list {list_ms:.0} ms, ping {ping:?} us, 4 KiB read {blk:?} us",
            show_rate(creates_per_s)
        );
        rows.push(Row {
            n,
            busy,
            ping,
            blk,
            backed_kib,
            rss_kib,
            mem_kib,
            creates_per_s,
            ttfl: (percentile(&ttfl, 0.5), percentile(&ttfl, 0.99)),
            list_ms,
            top_ms,
        });
    }

    // Ballooned down: every idle domain is asked to hold 4 MiB.
    let n = made;
    let (before_backed, before_held) = backed_kib(&mut c)?;
    let rss_before = rss_kib(daemon.pid())?;
    for i in 0..n {
        c.call::<MemSetReply>(Request::MemSet {
            dom: DomRef::Name(format!("idle{i}").parse()?),
            mib: 4,
        })
        .map_err(|e| format!("mem-set idle{i}: {e}"))?;
    }
    let t = Instant::now();
    let mut after = backed_kib(&mut c)?;
    while t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        let now = backed_kib(&mut c)?;
        if now == after {
            break;
        }
        after = now;
    }
    let rss_after = rss_kib(daemon.pid())?;
    let balloon = format!(
        "After `mem-set` of every idle domain to 4 MiB (settled in {:.1} s): they hold {:.0} KiB \
         each (was {:.0}), the host backs {:.0} KiB of guest memory each (was {:.0}); the \
         daemon's RSS per domain went from {:.0} to {:.0} KiB.",
        t.elapsed().as_secs_f64(),
        after.1 as f64 / n as f64,
        before_held as f64 / n as f64,
        after.0 as f64 / n as f64,
        before_backed as f64 / n as f64,
        rss_before.saturating_sub(base_rss) as f64 / n as f64,
        rss_after.saturating_sub(base_rss) as f64 / n as f64,
    );
    eprintln!("densitybench: {balloon}");

    // Every guest is asked to power off at once and must acknowledge it.
    let shutdown_ms = xl(&xl_exe, &run_dir, &["shutdown", "-a", "-w"])?;
    let doms: Vec<DomainInfo> = c.call(Request::List).map_err(|e| e.to_string())?;
    let clean = doms
        .iter()
        .filter(|d| d.name.as_str().starts_with("idle"))
        .filter(|d| d.state == "s" && d.detail.starts_with("Poweroff, exit code 0"))
        .count();
    let t = Instant::now();
    for d in &doms {
        c.call::<Done>(Request::Destroy {
            dom: DomRef::Id(d.id),
        })
        .map_err(|e| format!("destroy {}: {e}", d.id))?;
    }
    let destroys_per_s = doms.len() as f64 / t.elapsed().as_secs_f64().max(1e-9);

    // The neighbours again with no idle domain, so that the host's drift over the run shows.
    let echo = create(&mut c, net_spec(&work, "echo", "netecho", "10.99.0.1")?)?;
    let ping_end = ping_rtt(&run_dir, &work, &mut c, n + 1)?;
    let blk_end = blk_latency(&run_dir, &work, &mut c, n + 1)?;
    c.call::<Done>(Request::Destroy {
        dom: DomRef::Id(echo),
    })
    .map_err(|e| e.to_string())?;
    eprintln!(
        "densitybench: no idle neighbour again: ping {ping_end:?} us, 4 KiB read {blk_end:?} us"
    );

    // A few through the xl binary (its start-up included).
    let cfg = work.join("xl.cfg");
    let (mut xl_create, mut xl_destroy) = (Vec::new(), Vec::new());
    for i in 0..10 {
        std::fs::write(
            &cfg,
            format!(
                "name = \"x{i}\"\nmemory = {}\nvcpus = 1\nextra = \"idle\"\n",
                a.memory
            ),
        )
        .map_err(|e| e.to_string())?;
        xl_create.push(xl(&xl_exe, &run_dir, &["create", &cfg.to_string_lossy()])?);
    }
    for i in 0..10 {
        xl_destroy.push(xl(&xl_exe, &run_dir, &["destroy", &format!("x{i}")])?);
    }
    drop(c);
    drop(daemon);

    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Density: idle domains on one host\n\n\
         `densitybench --counts {}` on a 2-core, 24 GiB host (KVM PVM), `idle` job, 1 vCPU, \
         {} MiB each; host busy before any domain: {base_busy:.2}%; {}.\n\n\
         | idle domains | host CPU busy | guest memory backed per domain | \
         memory per domain: daemon RSS / MemAvailable | \
         creates/s (API) | first console line p50 / p99 | `xl list` | `xl top -n 1` | \
         neighbour ping p50 / p99 | neighbour 4 KiB read p50 / p99 |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        a.counts
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        a.memory,
        damon()
    );
    for r in &rows {
        let _ = writeln!(
            t,
            "| {} | {:.2}% | {:.0} KiB | {:.0} / {:.0} KiB | {} | {:.1} / {:.1} ms | {:.0} ms | \
             {:.0} ms | {:.0} / {:.0} us | {:.0} / {:.0} us |",
            r.n,
            r.busy,
            r.backed_kib,
            r.rss_kib,
            r.mem_kib,
            show_rate(r.creates_per_s),
            r.ttfl.0,
            r.ttfl.1,
            r.list_ms,
            r.top_ms,
            r.ping.0,
            r.ping.1,
            r.blk.0,
            r.blk.1
        );
    }
    let _ = writeln!(
        t,
        "\nThe neighbours with no idle domain beside them (p50 / p99), first / after the largest \
         count was destroyed: ping {:.0} / {:.0} us, then {:.0} / {:.0} us; 4 KiB read \
         {:.0} / {:.0} us, then {:.0} / {:.0} us. The ping neighbour is a fresh `ping` guest pinging a \
         `netecho` guest (there for the whole run, and counted in host busy) 30 times, 100 ms \
         apart; the block neighbour a fresh guest reading 4 KiB at random offsets of a {} MiB \
         image one at a time for 3 s (at most 2000 reads), asleep on its event channel while each \
         is in flight. Creates/s is left out (-) where every create of the batch was one of the {} \
         timed to their first console line.",
        ping0.0,
        ping0.1,
        ping_end.0,
        ping_end.1,
        blk0.0,
        blk0.1,
        blk_end.0,
        blk_end.1,
        LAT_IMAGE_MIB,
        SAMPLE
    );
    let _ = writeln!(t, "\n{balloon}");
    let _ = writeln!(
        t,
        "\nAt {n} domains: `xl shutdown -a -w` took {shutdown_ms:.0} ms and {clean} of {n} guests \
         acknowledged and powered off with code 0; destroy through the API: \
         {destroys_per_s:.0}/s. Through the `xl` binary (its start-up included): create \
         {:.1} ms, destroy {:.1} ms (medians of 10).",
        median(&xl_create),
        median(&xl_destroy)
    );
    splitvisor_tools::results::publish("densitybench", &a.out, &t)?;
    let _ = std::fs::remove_dir_all(&work);
    let mut fails = Vec::new();
    if clean != n {
        fails.push(format!(
            "{} of {n} guests did not acknowledge their shutdown",
            n - clean
        ));
    }
    if let (Some(max), Some(last)) = (a.max_cpu, rows.last())
        && last.busy > max
    {
        fails.push(format!(
            "{} idle domains keep the host {:.2}% busy (at most {max}%)",
            last.n, last.busy
        ));
    }
    if fails.is_empty() {
        Ok(())
    } else {
        Err(fails.join("; "))
    }
}

fn show_rate(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.0}"))
}

fn main() {
    splitvisor_tools::results::main("densitybench", run);
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_pick_from_the_sorted_values() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(super::percentile(&v, 0.5), 3.0);
        assert_eq!(super::percentile(&v, 0.99), 5.0);
        assert!(super::percentile(&[], 0.5).is_nan());
    }
}
