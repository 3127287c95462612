//! `blkbench`: a guest's block I/O through blockback, against fio on the same image file in the
//! same run.
//!
//! Both sides use io_uring with O_DIRECT on a 1 GiB image filled with data: fio
//! `--bs=4k --rw=randread --iodepth=32`, and 1 MiB sequential reads and writes at depth 1; the
//! guest's `blkbench` job does the same through its ring.
//!
//! The host's own disk is a shared virtual disk whose speed drifts by tens of percent from one
//! minute to the next, so the two are not measured once each: fio runs before and after every
//! guest run, each guest run is compared with the mean of the fio runs on either side of it, and
//! the table shows the medians over `--rounds` rounds (default 5) and the spread of the ratios.
//!
//! Usage: `blkbench [--seconds S] [--rounds R] [--only CASES] [--no-fio] [--image FILE]
//! [--out FILE]` (needs fio on PATH). CASES is a comma list of `poll`, `sleep`, `mq`, `seq`;
//! `--no-fio` only runs the guest (to profile it).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dom0::disk::Disk;
use dom0::vbd::Vbd;
use hypervisor::{DomainConfig, Hypervisor};
use splitvisor_tools::results::{median, range};

const IMAGE_BYTES: u64 = 1 << 30;

fn fio(image: &Path, seconds: u32, rw: &str, bs: &str, depth: u32) -> Result<f64, String> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            "--ioengine=io_uring",
            "--direct=1",
            &format!("--filename={}", image.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            &format!("--runtime={seconds}"),
            "--time_based",
            "--output-format=json",
        ])
        .output()
        .map_err(|e| format!("cannot run fio (install it: apt-get install fio): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("fio output: {e}"))?;
    let dir = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let job = &v["jobs"][0][dir];
    let value = if bs == "4k" {
        job["iops"].as_f64()
    } else {
        job["bw_bytes"].as_f64().map(|b| b / (1 << 20) as f64)
    };
    value.ok_or_else(|| "fio reported no figure".to_string())
}

/// The guest's figure for `key`; refuses a case that had I/O errors.
fn guest_value(text: &str, key: &str) -> Result<f64, String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("blkbench {key} ")))
        .ok_or_else(|| format!("guest printed no {key}:\n{text}"))?;
    let mut words = line.split_whitespace();
    let value: f64 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad {key} line {line:?}"))?;
    if words.next() == Some("errors") && words.next() != Some("0") {
        return Err(format!("the guest saw I/O errors in {key}: {line:?}"));
    }
    Ok(value)
}

fn prepare(image: &Path) -> Result<(), String> {
    if std::fs::metadata(image).is_ok_and(|m| m.len() == IMAGE_BYTES) {
        return Ok(());
    }
    eprintln!("blkbench: writing a 1 GiB image at {}", image.display());
    let mut f = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 4 << 20];
    for i in 0..IMAGE_BYTES / chunk.len() as u64 {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        eprint!("\rblkbench: {} MiB", (i + 1) * 4);
    }
    eprintln!();
    f.sync_all()
        .map_err(|e| format!("{}: {e}", image.display()))
}

/// Responses a sleeping guest waits for before it is woken (half the queue depth).
const SLEEP_BATCH: u32 = 16;

/// The guest cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// 4 KiB random reads on one queue, the guest polling.
    Poll,
    /// The same, the guest sleeping for batches of responses.
    Sleep,
    /// The same load over every queue the back end offers.
    MultiQueue,
    /// 1 MiB sequential reads, then writes, at depth 1.
    Seq,
}

impl Case {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "poll" => Self::Poll,
            "sleep" => Self::Sleep,
            "mq" => Self::MultiQueue,
            "seq" => Self::Seq,
            _ => return Err(format!("unknown case {s:?} (poll, sleep, mq, seq)")),
        })
    }
}

/// A figure measured over several rounds, each paired with fio around it.
#[derive(Debug, Default)]
struct Series {
    fio: Vec<f64>,
    guest: Vec<f64>,
}

impl Series {
    fn ratios(&self) -> Vec<f64> {
        self.guest
            .iter()
            .zip(&self.fio)
            .map(|(g, f)| g / f)
            .collect()
    }

    /// `| fio | guest | ratio | range |` cells.
    fn cells(&self) -> String {
        let r = self.ratios();
        let (lo, hi) = range(&r);
        if self.fio.is_empty() {
            return format!("- | {:.0} | - | - |", median(&self.guest));
        }
        format!(
            "{:.0} | {:.0} | {:.2}x | {lo:.2}-{hi:.2}x |",
            median(&self.fio),
            median(&self.guest),
            median(&r)
        )
    }
}

struct Bench {
    hv: Hypervisor,
    image: PathBuf,
    seconds: u32,
    fio: bool,
}

impl Bench {
    /// Boots a guest running `blkbench` with `queues` queues, sleeping for `batch` responses
    /// (0: polling), running `cases` (1: random reads, 2: sequential); returns its console.
    fn guest(&self, queues: u32, batch: u32, cases: u32) -> Result<String, String> {
        let seconds = self.seconds;
        let dom = self
            .hv
            .create_domain(DomainConfig {
                name: format!("blkbench-q{queues}-b{batch}"),
                mem_mib: 128,
                cmdline: format!("blkbench {seconds} {queues} {batch} {cases}"),
                ..Default::default()
            })
            .map_err(|e| format!("create: {e}"))?;
        let disk = Disk::open_with(&self.image, false, true).map_err(|e| e.to_string())?;
        let vbd = Vbd::attach_disk(self.hv.store(), dom.shared(), 51712, disk)
            .map_err(|e| e.to_string())?;
        let state = dom.wait(Duration::from_secs(u64::from(seconds) * 6 + 60));
        let text = dom.console().text();
        drop(vbd);
        if !state.is_final() {
            return Err(format!("guest did not finish: {state:?}\n{text}"));
        }
        Ok(text)
    }

    fn fio(&self, rw: &str, bs: &str, depth: u32) -> Result<Option<f64>, String> {
        if !self.fio {
            return Ok(None);
        }
        fio(&self.image, self.seconds, rw, bs, depth).map(Some)
    }
}

fn run() -> Result<(), String> {
    let mut seconds = 5u32;
    let mut rounds = 5u32;
    let mut cases = vec![Case::Poll, Case::MultiQueue, Case::Sleep, Case::Seq];
    let mut with_fio = true;
    let mut image = PathBuf::from("target/blkbench.img");
    let mut out = "benchmarks/results/block.md".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = |n: &str| args.next().ok_or(format!("{n} needs a value"));
        match a.as_str() {
            "--seconds" => {
                seconds = v("--seconds")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?
            }
            "--rounds" => {
                rounds = v("--rounds")?
                    .parse::<u32>()
                    .map_err(|e| format!("--rounds: {e}"))?
                    .max(1)
            }
            "--only" => {
                cases = v("--only")?
                    .split(',')
                    .map(Case::parse)
                    .collect::<Result<_, _>>()?
            }
            "--no-fio" => with_fio = false,
            "--image" => image = PathBuf::from(v("--image")?),
            "--out" => out = v("--out")?,
            "-h" | "--help" => {
                println!(
                    "usage: blkbench [--seconds S] [--rounds R] [--only poll,sleep,mq,seq] [--no-fio] [--image FILE] [--out FILE]"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if let Some(dir) = image.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    prepare(&image)?;
    let b = Bench {
        hv: Hypervisor::new(guest_drivers::GUEST_KERNEL).map_err(|e| e.to_string())?,
        image,
        seconds,
        fio: with_fio,
    };
    let queues = dom0::vbd::max_queues();

    // Random reads: fio, guest case, fio, guest case, ..., fio; each guest run against the mean
    // of the fio runs just before and just after it.
    let random: Vec<Case> = cases
        .iter()
        .copied()
        .filter(|&c| c != Case::Seq && (c != Case::MultiQueue || queues > 1))
        .collect();
    let mut series: Vec<Series> = random.iter().map(|_| Series::default()).collect();
    if !random.is_empty() {
        eprintln!(
            "blkbench: 4 KiB random reads, {rounds} round(s) of {:?}, fio around each, {seconds} s per run",
            random
        );
        let mut before = b.fio("randread", "4k", 32)?;
        for round in 0..rounds {
            for (case, s) in random.iter().zip(&mut series) {
                let (q, batch) = match case {
                    Case::Poll => (1, 0),
                    Case::Sleep => (1, SLEEP_BATCH),
                    _ => (queues, 0),
                };
                let g = guest_value(&b.guest(q, batch, 1)?, "randread_4k_qd32_iops")?;
                let after = b.fio("randread", "4k", 32)?;
                s.guest.push(g);
                if let (Some(x), Some(y)) = (before, after) {
                    s.fio.push((x + y) / 2.0);
                    eprintln!(
                        "blkbench: round {round} {case:?}: guest {g:.0} fio {x:.0}/{y:.0} -> {:.2}x",
                        2.0 * g / (x + y)
                    );
                } else {
                    eprintln!("blkbench: round {round} {case:?}: guest {g:.0}");
                }
                before = after;
            }
        }
    }

    // Sequential: the same rounds, fio's reads and writes between the guest runs.
    let (mut seqr, mut seqw) = (Series::default(), Series::default());
    if cases.contains(&Case::Seq) {
        eprintln!(
            "blkbench: 1 MiB sequential reads and writes, {rounds} round(s), {seconds} s per run"
        );
        let mut before = (b.fio("read", "1M", 1)?, b.fio("write", "1M", 1)?);
        for round in 0..rounds {
            let text = b.guest(1, 0, 2)?;
            let g = (
                guest_value(&text, "seqread_1m_mbps")?,
                guest_value(&text, "seqwrite_1m_mbps")?,
            );
            let after = (b.fio("read", "1M", 1)?, b.fio("write", "1M", 1)?);
            seqr.guest.push(g.0);
            seqw.guest.push(g.1);
            if let ((Some(r0), Some(w0)), (Some(r1), Some(w1))) = (before, after) {
                seqr.fio.push((r0 + r1) / 2.0);
                seqw.fio.push((w0 + w1) / 2.0);
            }
            eprintln!(
                "blkbench: round {round} seq: guest read {:.0} write {:.0} MiB/s",
                g.0, g.1
            );
            before = after;
        }
    }

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# blkbench: guest block I/O through blockback vs fio on the host\n"
    );
    let _ = writeln!(
        t,
        "{cores} cores, KVM {:?}; 1 GiB image of random data on ext4, io_uring + O_DIRECT on both sides; {seconds} s per run; `cargo run --release -p splitvisor-tools --bin blkbench -- --seconds {seconds} --rounds {rounds}`.\n",
        b.hv.flavour()
    );
    let _ = writeln!(
        t,
        "The host disk's speed drifts from minute to minute, so fio runs just before and just after every guest run and the guest is compared with their mean; figures are medians over {rounds} round(s), the last column the range of the per-round ratios.\n"
    );
    let _ = writeln!(
        t,
        "| case | fio on the host | guest via blockback | guest / fio | ratio range |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|");
    for (case, s) in random.iter().zip(&series) {
        let name = match case {
            Case::Poll => "4 KiB random read, depth 32, guest polls (IOPS)".to_string(),
            Case::Sleep => format!(
                "4 KiB random read, depth 32, guest sleeps for {SLEEP_BATCH} responses (IOPS)"
            ),
            _ => format!("4 KiB random read, depth 32 over {queues} queues (IOPS)"),
        };
        let _ = writeln!(t, "| {name} | {}", s.cells());
    }
    if cases.contains(&Case::Seq) {
        let _ = writeln!(
            t,
            "| 1 MiB sequential read, depth 1 (MiB/s) | {}",
            seqr.cells()
        );
        let _ = writeln!(
            t,
            "| 1 MiB sequential write, depth 1 (MiB/s) | {}",
            seqw.cells()
        );
    }
    let _ = writeln!(
        t,
        "\nTarget (issue 4): >= 0.90x of fio's IOPS for 4 KiB random reads at depth 32."
    );
    splitvisor_tools::results::publish("blkbench", &out, &t)
}

fn main() {
    splitvisor_tools::results::main("blkbench", run);
}
