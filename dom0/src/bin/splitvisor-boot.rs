//! Boots one Splitvisor domain and shows its console: the project's main job until the `xl`
//! toolstack lands.
//!
//! `splitvisor-boot [--vcpus N] [--mem MIB] [--kernel ELF] [--disk PATH[,ro][,size=MIB]]...
//! [--timeout SECS] [CMDLINE...]` (default command line: `selftest`). Each `--disk` attaches a raw
//! image (created sparse with `size=` if missing) as xvda, xvdb, ... Exits with the guest's exit
//! code, or 1 if it crashed.

use std::process::ExitCode;
use std::time::Duration;

use std::path::PathBuf;

use dom0::disk::Disk;
use dom0::vbd::Vbd;
use hypervisor::{DomainConfig, DomainState, Hypervisor};

fn usage() -> &'static str {
    "usage: splitvisor-boot [--vcpus N] [--mem MIB] [--kernel ELF] [--disk PATH[,ro][,size=MIB]]... [--timeout SECS] [CMDLINE...]"
}

/// One `--disk PATH[,ro][,size=MIB]`.
struct DiskArg {
    path: PathBuf,
    readonly: bool,
    size_mib: Option<u64>,
}

fn parse_disk(spec: &str) -> Result<DiskArg, String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("--disk needs a path")?;
    let mut d = DiskArg {
        path: PathBuf::from(path),
        readonly: false,
        size_mib: None,
    };
    for p in parts {
        match p.split_once('=') {
            None if p == "ro" => d.readonly = true,
            None if p == "rw" => d.readonly = false,
            Some(("size", v)) => {
                d.size_mib = Some(
                    v.trim_end_matches('M')
                        .parse()
                        .map_err(|e| format!("--disk size {v:?}: {e}"))?,
                )
            }
            _ => return Err(format!("--disk: unknown option {p:?} (ro, rw, size=MIB)")),
        }
    }
    Ok(d)
}

fn parse() -> Result<(DomainConfig, Duration, Vec<DiskArg>), String> {
    let mut cfg = DomainConfig {
        name: "boot".into(),
        echo_console: true,
        ..Default::default()
    };
    let mut timeout = Duration::from_secs(60);
    let mut disks = Vec::new();
    let mut cmdline = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or(format!("{name} needs a value; {}", usage()))
        };
        match a.as_str() {
            "--vcpus" => {
                cfg.vcpus = value("--vcpus")?
                    .parse()
                    .map_err(|e| format!("--vcpus: {e}"))?
            }
            "--mem" => cfg.mem_mib = value("--mem")?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--kernel" => {
                let path = value("--kernel")?;
                cfg.kernel = Some(std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?);
            }
            "--disk" => disks.push(parse_disk(&value("--disk")?)?),
            "--timeout" => {
                timeout = Duration::from_secs(
                    value("--timeout")?
                        .parse()
                        .map_err(|e| format!("--timeout: {e}"))?,
                )
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            _ => cmdline.push(a),
        }
    }
    if !cmdline.is_empty() {
        cfg.cmdline = cmdline.join(" ");
    }
    Ok((cfg, timeout, disks))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (cfg, timeout, disks) = match parse() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("splitvisor-boot: {e}");
            return ExitCode::from(2);
        }
    };
    let hv = match Hypervisor::new(guest_drivers::GUEST_KERNEL) {
        Ok(hv) => hv,
        Err(e) => {
            eprintln!("splitvisor-boot: {}", dom0::control::chain(&e));
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "splitvisor-boot: KVM is {:?}; booting {} vCPU(s), {} MiB, cmdline {:?}",
        hv.flavour(),
        cfg.vcpus,
        cfg.mem_mib,
        cfg.cmdline
    );
    let started = std::time::Instant::now();
    let dom = match hv.create_domain(cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("splitvisor-boot: {}", dom0::control::chain(&e));
            return ExitCode::from(2);
        }
    };
    let mut vbds = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let create = d.size_mib.filter(|_| !d.path.exists());
        if let Some(Err(e)) = create.map(|mib| Disk::create_sparse(&d.path, mib << 20)) {
            eprintln!("splitvisor-boot: {}", dom0::control::chain(&e));
            return ExitCode::from(2);
        }
        // Xen numbering: xvda = 51712, xvdb = 51728, ...
        let devid = 51712 + 16 * i as u32;
        match Vbd::attach(hv.store(), dom.shared(), devid, &d.path, d.readonly) {
            Ok(v) => vbds.push(v),
            Err(e) => {
                eprintln!(
                    "splitvisor-boot: {}: {}",
                    d.path.display(),
                    dom0::control::chain(&e)
                );
                return ExitCode::from(2);
            }
        }
    }
    let state = dom.wait(timeout);
    let state = if state.is_final() {
        state
    } else {
        dom.destroy()
    };
    eprintln!(
        "splitvisor-boot: domain ended after {:.3} s: {state:?}",
        started.elapsed().as_secs_f64()
    );
    match state {
        DomainState::Shutdown { code, .. } => ExitCode::from(code.min(255) as u8),
        _ => ExitCode::from(1),
    }
}
