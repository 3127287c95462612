//! `blkbench`: a guest's block I/O through blockback, against fio on the same image file in the
//! same run.
//!
//! Both sides use io_uring with O_DIRECT on a 1 GiB image filled with data: fio
//! `--bs=4k --rw=randread --iodepth=32`, and 1 MiB sequential reads and writes at depth 1; the
//! guest's `blkbench` job does the same through its ring.
//!
//! Usage: `blkbench [--seconds S] [--image FILE] [--out FILE]` (needs fio on PATH).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dom0::disk::Disk;
use dom0::vbd::Vbd;
use hypervisor::{DomainConfig, Hypervisor};

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

fn run() -> Result<(), String> {
    let mut seconds = 5u32;
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
            "--image" => image = PathBuf::from(v("--image")?),
            "--out" => out = v("--out")?,
            "-h" | "--help" => {
                println!("usage: blkbench [--seconds S] [--image FILE] [--out FILE]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if let Some(dir) = image.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    prepare(&image)?;

    eprintln!("blkbench: fio, {seconds} s per case");
    let fio_rand = fio(&image, seconds, "randread", "4k", 32)?;
    let fio_seqr = fio(&image, seconds, "read", "1M", 1)?;
    let fio_seqw = fio(&image, seconds, "write", "1M", 1)?;

    eprintln!("blkbench: guest through blockback, {seconds} s per case");
    let hv = Hypervisor::new().map_err(|e| e.to_string())?;
    let guest = |queues: u32, batch: u32| -> Result<String, String> {
        let dom = hv
            .create_domain(DomainConfig {
                name: format!("blkbench-q{queues}-b{batch}"),
                mem_mib: 128,
                cmdline: format!("blkbench {seconds} {queues} {batch}"),
                ..Default::default()
            })
            .map_err(|e| format!("create: {e}"))?;
        let disk = Disk::open_with(&image, false, true).map_err(|e| e.to_string())?;
        let vbd =
            Vbd::attach_disk(hv.store(), dom.shared(), 51712, disk).map_err(|e| e.to_string())?;
        let state = dom.wait(Duration::from_secs(u64::from(seconds) * 6 + 60));
        let text = dom.console().text();
        drop(vbd);
        if !state.is_final() {
            return Err(format!("guest did not finish: {state:?}\n{text}"));
        }
        Ok(text)
    };
    let text = guest(1, 0)?;
    let g_rand = guest_value(&text, "randread_4k_qd32_iops")?;
    let g_seqr = guest_value(&text, "seqread_1m_mbps")?;
    let g_seqw = guest_value(&text, "seqwrite_1m_mbps")?;
    // The same load spread over every queue the back end offers (one per host core).
    let queues = dom0::vbd::max_queues();
    let g_rand_mq = if queues > 1 {
        eprintln!("blkbench: again with {queues} queues");
        Some(guest_value(&guest(queues, 0)?, "randread_4k_qd32_iops")?)
    } else {
        None
    };
    // The guest sleeping until a batch of responses is ready instead of polling.
    eprintln!("blkbench: again with the guest sleeping for batches of {SLEEP_BATCH}");
    let g_rand_sleep = guest_value(&guest(1, SLEEP_BATCH)?, "randread_4k_qd32_iops")?;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# blkbench: guest block I/O through blockback vs fio on the host\n"
    );
    let _ = writeln!(
        t,
        "{cores} cores, KVM {:?}; 1 GiB image of random data on ext4, io_uring + O_DIRECT on both sides; {seconds} s per case; `cargo run --release -p splitvisor-tools --bin blkbench`.\n",
        hv.flavour()
    );
    let _ = writeln!(
        t,
        "| case | fio on the host | guest via blockback | guest / fio |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|");
    let _ = writeln!(
        t,
        "| 4 KiB random read, depth 32 (IOPS) | {fio_rand:.0} | {g_rand:.0} | {:.2}x |",
        g_rand / fio_rand
    );
    let _ = writeln!(
        t,
        "| 4 KiB random read, depth 32, guest sleeps for {SLEEP_BATCH} responses (IOPS) | {fio_rand:.0} | {g_rand_sleep:.0} | {:.2}x |",
        g_rand_sleep / fio_rand
    );
    if let Some(mq) = g_rand_mq {
        let _ = writeln!(
            t,
            "| 4 KiB random read, depth 32 over {queues} queues (IOPS) | {fio_rand:.0} | {mq:.0} | {:.2}x |",
            mq / fio_rand
        );
    }
    let _ = writeln!(
        t,
        "| 1 MiB sequential read, depth 1 (MiB/s) | {fio_seqr:.0} | {g_seqr:.0} | {:.2}x |",
        g_seqr / fio_seqr
    );
    let _ = writeln!(
        t,
        "| 1 MiB sequential write, depth 1 (MiB/s) | {fio_seqw:.0} | {g_seqw:.0} | {:.2}x |",
        g_seqw / fio_seqw
    );
    let _ = writeln!(
        t,
        "\nTarget (issue 4): >= 0.90x of fio's IOPS for 4 KiB random reads at depth 32."
    );
    print!("{t}");
    if let Some(dir) = Path::new(&out).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&out, &t).map_err(|e| format!("{out}: {e}"))?;
    eprintln!("blkbench: table written to {out}");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("blkbench: {e}");
        std::process::exit(1);
    }
}
