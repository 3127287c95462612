//! Boots one Splitvisor domain and shows its console: the project's main job until the `xl`
//! toolstack lands.
//!
//! `splitvisor-boot [--vcpus N] [--mem MIB] [--kernel ELF] [--timeout SECS] [CMDLINE...]`
//! (default command line: `selftest`). Exits with the guest's exit code, or 1 if it crashed.

use std::process::ExitCode;
use std::time::Duration;

use hypervisor::{DomainConfig, DomainState, Hypervisor};

fn usage() -> &'static str {
    "usage: splitvisor-boot [--vcpus N] [--mem MIB] [--kernel ELF] [--timeout SECS] [CMDLINE...]"
}

fn parse() -> Result<(DomainConfig, Duration), String> {
    let mut cfg = DomainConfig {
        name: "boot".into(),
        echo_console: true,
        ..Default::default()
    };
    let mut timeout = Duration::from_secs(60);
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
    Ok((cfg, timeout))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (cfg, timeout) = match parse() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("splitvisor-boot: {e}");
            return ExitCode::from(2);
        }
    };
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) => {
            eprintln!("splitvisor-boot: {}", error_chain(&e));
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
            eprintln!("splitvisor-boot: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
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
