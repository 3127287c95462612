//! `hvbench`: what the hypervisor's basic operations cost on this host, measured in one run:
//! domain create to first console line, a hypercall round trip, an event-channel round trip
//! guest -> host -> guest through the ioeventfd doorbell and through the hypercall path, and the
//! raw PIO exit they are compared with.
//!
//! Usage: `hvbench [--iterations N] [--boots B] [--out FILE]`

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hypervisor::evtchn::HostPort;
use hypervisor::{DomainConfig, Hypervisor};

/// The median of the values the guest printed for `key` (one per round).
fn value(text: &str, key: &str) -> Result<f64, String> {
    let mut v: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("bench {key} ")))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if v.is_empty() {
        return Err(format!("guest printed no {key}:\n{text}"));
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn run() -> Result<(), String> {
    let mut iterations = 20_000u32;
    let mut boots = 10usize;
    let mut out = "benchmarks/results/hypervisor.md".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = |n: &str| args.next().ok_or(format!("{n} needs a value"));
        match a.as_str() {
            "--iterations" => {
                iterations = v("--iterations")?
                    .parse()
                    .map_err(|e| format!("--iterations: {e}"))?
            }
            "--boots" => boots = v("--boots")?.parse().map_err(|e| format!("--boots: {e}"))?,
            "--out" => out = v("--out")?,
            "-h" | "--help" => {
                println!("usage: hvbench [--iterations N] [--boots B] [--out FILE]");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    let hv = Hypervisor::new(guest_drivers::GUEST_KERNEL).map_err(|e| {
        format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        )
    })?;

    // Domain create -> first console line.
    let mut boot_ms = Vec::new();
    for i in 0..boots.max(1) {
        eprint!("\rhvbench: boot {}/{boots}", i + 1);
        let t = Instant::now();
        let dom = hv
            .create_domain(DomainConfig {
                name: format!("boot{i}"),
                cmdline: "ticker".into(),
                ..Default::default()
            })
            .map_err(|e| format!("create: {e}"))?;
        if !dom.console().wait_for("\n", Duration::from_secs(30)) {
            return Err("no console line within 30 s".into());
        }
        boot_ms.push(t.elapsed().as_secs_f64() * 1e3);
        dom.destroy();
    }
    eprintln!();
    boot_ms.sort_by(f64::total_cmp);
    let boot_median = boot_ms[boot_ms.len() / 2];

    // Exits and events, measured by the guest with its TSC.
    eprintln!("hvbench: {iterations} iterations of each guest operation");
    let dom = hv
        .create_domain(DomainConfig {
            name: "bench".into(),
            cmdline: format!("bench {iterations}"),
            ..Default::default()
        })
        .map_err(|e| format!("create: {e}"))?;
    if !dom
        .console()
        .wait_for("bench port ", Duration::from_secs(120))
    {
        return Err(format!(
            "guest did not reach the event test:\n{}",
            dom.console().text()
        ));
    }
    let port: u32 = dom
        .console()
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("bench port "))
        .and_then(|p| p.trim().parse().ok())
        .ok_or("no port line")?;
    let hp = Arc::new(HostPort::bind(dom.shared(), port).map_err(|e| format!("bind: {e:?}"))?);
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let (hp, stop) = (Arc::clone(&hp), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if hp.wait(Duration::from_millis(100)) > 0 {
                    hp.notify();
                }
            }
        })
    };
    let state = dom.wait(Duration::from_secs(300));
    stop.store(true, Ordering::Relaxed);
    let _ = responder.join();
    let text = dom.console().text();
    if !state.is_final() {
        return Err(format!("bench guest did not finish: {state:?}\n{text}"));
    }
    let hypercall = value(&text, "hypercall_ns")? / 1e3;
    let pio = value(&text, "pio_exit_vmm_ns")? / 1e3;
    let pio_kernel = value(&text, "pio_exit_kernel_ns")? / 1e3;
    let ev_door = value(&text, "evtchn_rtt_doorbell_ns")? / 1e3;
    let ev_hc = value(&text, "evtchn_rtt_hypercall_ns")? / 1e3;

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = String::new();
    let _ = writeln!(t, "# hvbench: hypervisor operation costs\n");
    let _ = writeln!(
        t,
        "Measured on {cores} cores, KVM flavour {:?}; `cargo run --release -p splitvisor-tools --bin hvbench`.",
        hv.flavour()
    );
    let _ = writeln!(
        t,
        "Guest-side numbers: medians of 5 rounds, each the mean of {} operations timed with the guest's TSC; boot is the median of {} boots.\n",
        iterations / 5,
        boot_ms.len()
    );
    let _ = writeln!(t, "| operation | cost | vs one raw PIO exit |");
    let _ = writeln!(t, "|---|---:|---:|");
    let _ = writeln!(
        t,
        "| raw PIO exit to the VMM and back (`out 0xe9, al`, ignored) | {pio:.2} us | 1.00x |"
    );
    let _ = writeln!(
        t,
        "| for scale: PIO exit the host kernel absorbs (`out 0x80, al` on PVM) | {pio_kernel:.2} us | {:.2}x |",
        pio_kernel / pio
    );
    let _ = writeln!(
        t,
        "| hypercall round trip (`xen_version`) | {hypercall:.2} us | {:.2}x |",
        hypercall / pio
    );
    let _ = writeln!(
        t,
        "| event channel guest -> host -> guest, doorbell via ioeventfd | {ev_door:.2} us | {:.2}x |",
        ev_door / pio
    );
    let _ = writeln!(
        t,
        "| event channel guest -> host -> guest, send hypercall | {ev_hc:.2} us | {:.2}x |",
        ev_hc / pio
    );
    let _ = writeln!(
        t,
        "| domain create -> first console line | {boot_median:.2} ms | - |"
    );
    let _ = writeln!(
        t,
        "\nThe event round trips include the host responder thread's wake-up (eventfd poll) and the guest's \
         sched_op(poll) sleep and wake-up; the doorbell variant saves the VMM exit on the guest -> host leg."
    );
    splitvisor_tools::results::publish("hvbench", &out, &t)
}

fn main() {
    splitvisor_tools::results::main("hvbench", run);
}
