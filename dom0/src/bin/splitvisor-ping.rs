//! Two domains on one virtual switch: one answers (`netecho`), the other pings it and checks UDP
//! echoes; shows both consoles. The network demo until the `xl` toolstack lands.
//!
//! `splitvisor-ping [--count N] [--tap IFNAME]`: with `--tap`, a TAP device of that name joins
//! the switch as an uplink, so the host can reach the answering guest (10.0.0.1) too, for
//! example after `ip addr add 10.0.0.254/24 dev IFNAME && ip link set IFNAME up`. Exits with the
//! pinging guest's exit code.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dom0::switch::Switch;
use dom0::tap::{Tap, TapPort};
use dom0::vif::Vif;
use hypervisor::{DomainConfig, DomainState, Hypervisor};

fn run() -> Result<u32, String> {
    let mut count = 5u32;
    let mut tap = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |n: &str| args.next().ok_or(format!("{n} needs a value"));
        match a.as_str() {
            "--count" => {
                count = value("--count")?
                    .parse()
                    .map_err(|e| format!("--count: {e}"))?
            }
            "--tap" => tap = Some(value("--tap")?),
            "-h" | "--help" => {
                println!("usage: splitvisor-ping [--count N] [--tap IFNAME]");
                return Ok(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    let hv =
        Hypervisor::new(guest_drivers::GUEST_KERNEL).map_err(|e| format!("hypervisor: {e}"))?;
    let sw = Arc::new(Switch::new("br0").map_err(|e| e.to_string())?);
    if let Some(name) = &tap {
        let t = Tap::create(name).map_err(|e| format!("tap {name}: {e}"))?;
        sw.add_port(Box::new(TapPort::new(t).map_err(|e| e.to_string())?))
            .map_err(|e| e.to_string())?;
        eprintln!("splitvisor-ping: TAP {name} is on the switch");
    }
    let boot = |name: &str, cmdline: String| {
        hv.create_domain(DomainConfig {
            name: name.into(),
            cmdline,
            echo_console: true,
            ..Default::default()
        })
        .map_err(|e| format!("create {name}: {e}"))
    };
    let echo = boot("echo", "netecho ip=10.0.0.1".into())?;
    let _v1 = Vif::attach(hv.store(), echo.shared(), 0, None, &sw).map_err(|e| e.to_string())?;
    if !echo
        .console()
        .wait_for("connected", Duration::from_secs(20))
    {
        return Err("the echo domain never connected".into());
    }
    let ping = boot("ping", format!("ping 10.0.0.1 ip=10.0.0.2 count={count}"))?;
    let _v2 = Vif::attach(hv.store(), ping.shared(), 0, None, &sw).map_err(|e| e.to_string())?;
    let state = ping.wait(Duration::from_secs(60 + u64::from(count)));
    if tap.is_some() {
        eprintln!("splitvisor-ping: 10.0.0.1 keeps answering; Ctrl-C to stop");
        echo.wait(Duration::from_secs(u64::MAX / 4));
    }
    for (_, name, s) in sw.ports().map_err(|e| e.to_string())? {
        eprintln!(
            "splitvisor-ping: port {name}: rx {} frames, tx {} frames, {} dropped, {} errors",
            s.rx_packets, s.tx_packets, s.tx_dropped, s.errors
        );
    }
    match state {
        DomainState::Shutdown { code, .. } => Ok(code),
        other => Err(format!("the pinging domain ended as {other:?}")),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code.min(255) as u8),
        Err(e) => {
            eprintln!("splitvisor-ping: {e}");
            ExitCode::FAILURE
        }
    }
}
