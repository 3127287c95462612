//! `xl`: the Splitvisor toolstack's command line, after Xen's. It talks to the dom0 daemon
//! (`splitvisord`) over its control socket; `xl create` starts the daemon when none runs.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use splitvisor_api::control::{
    self, BlockAttachReply, CreateReply, DomRef, DomainInfo, Done, InfoReply, NetworkAttachReply,
    NetworkDetachReply, Request, StatusReply, TopRow, VbdRow, VcpuRow, VifRow,
};
use splitvisor_api::peer;
use splitvisor_api::xlcfg::{DomainSpec, HostPath, Vdev};
use splitvisor_xl::client::{Client, ConnectError};

/// Splitvisor's toolstack: create, inspect and control domains.
#[derive(Debug, Parser)]
#[command(
    name = "xl",
    version,
    after_help = "Not implemented yet: mem-max, save/restore, migrate."
)]
struct Cli {
    /// The daemon's runtime directory (default: $SPLITVISOR_RUNTIME_DIR, /run/splitvisor for
    /// root, else $XDG_RUNTIME_DIR/splitvisor).
    #[arg(long, global = true)]
    runtime_dir: Option<PathBuf>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Create a domain from a domain file (xl.cfg syntax); starts the daemon if none runs.
    Create {
        /// The domain file.
        file: PathBuf,
        /// Attach to the console after creating.
        #[arg(short = 'c')]
        console: bool,
        /// Leave the domain paused.
        #[arg(short = 'p')]
        paused: bool,
        /// Settings that override the file's (`memory=256`, `extra="ticker"`).
        overrides: Vec<String>,
    },
    /// List domains: Name ID Mem VCPUs State Time(s) (Mem: MiB the domain holds now).
    List {
        /// Long listing: each domain's configuration and state detail, as JSON.
        #[arg(short = 'l', long)]
        long: bool,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Destroy a domain at once (no shutdown in the guest).
    Destroy {
        /// Name or id.
        domain: DomRef,
    },
    /// Ask a domain (or, with -a, every domain) to power off (through its control/shutdown key).
    Shutdown {
        /// Wait until it has (they have) shut down.
        #[arg(short = 'w')]
        wait: bool,
        /// Every running domain.
        #[arg(short = 'a', long = "all", conflicts_with = "domain")]
        all: bool,
        /// Name or id.
        #[arg(required_unless_present = "all")]
        domain: Option<DomRef>,
    },
    /// Ask a domain to reboot (it is rebuilt if on_reboot=restart).
    Reboot {
        /// Wait until it has gone down.
        #[arg(short = 'w')]
        wait: bool,
        /// Name or id.
        domain: DomRef,
    },
    /// Pause a domain's vCPUs.
    Pause {
        /// Name or id.
        domain: DomRef,
    },
    /// Resume a paused domain.
    Unpause {
        /// Name or id.
        domain: DomRef,
    },
    /// Attach to a domain's console (detach with Ctrl-]).
    Console {
        /// Name or id.
        domain: DomRef,
    },
    /// Show the end of the daemon's log.
    Dmesg {
        /// Lines to show.
        #[arg(short = 'n', default_value_t = 50)]
        lines: usize,
    },
    /// Host facts: KVM flavour, cores, memory, domains, versions.
    Info,
    /// Per-domain CPU time, vCPUs and I/O counters, refreshed in place.
    Top {
        /// Seconds between refreshes.
        #[arg(short = 'd', default_value_t = 1.0)]
        delay: f64,
        /// Refreshes before exiting (default: until interrupted).
        #[arg(short = 'n')]
        iterations: Option<u64>,
    },
    /// Set a domain's memory target: its balloon gives memory back or takes it again, up to
    /// its maxmem (`xl mem-set DOM 256`, `256m`, `1g`).
    MemSet {
        /// Name or id.
        domain: DomRef,
        /// The target: MiB, or with a suffix k, m or g.
        #[arg(value_parser = parse_mib)]
        mib: u64,
    },
    /// List vCPUs: Name ID VCPU CPU State Time(s) Affinity (all domains, or one).
    VcpuList {
        /// Name or id.
        domain: Option<DomRef>,
    },
    /// Pin vCPUs to host CPUs: `xl vcpu-pin DOM all 1`, `xl vcpu-pin DOM 0 0-1`.
    VcpuPin {
        /// Name or id.
        domain: DomRef,
        /// A vCPU index, or `all`.
        vcpu: String,
        /// Host CPUs (`0`, `0-1`, `0,2-3`), or `all`.
        cpus: String,
    },
    /// Hot-plug a disk: `xl block-attach DOM 'file.img,raw,xvdb,rw'`.
    BlockAttach {
        /// Name or id.
        domain: DomRef,
        /// A disk spec, as in a domain file.
        spec: String,
    },
    /// Hot-unplug a disk.
    BlockDetach {
        /// Name or id.
        domain: DomRef,
        /// The virtual device (xvdb).
        vdev: Vdev,
    },
    /// List a domain's disks.
    BlockList {
        /// Name or id.
        domain: DomRef,
    },
    /// Hot-plug a network interface: `xl network-attach DOM 'bridge=br0'`.
    NetworkAttach {
        /// Name or id.
        domain: DomRef,
        /// A vif spec, as in a domain file.
        spec: String,
    },
    /// Hot-unplug a network interface.
    NetworkDetach {
        /// Name or id.
        domain: DomRef,
        /// Device id (from network-list).
        devid: u32,
    },
    /// List a domain's network interfaces.
    NetworkList {
        /// Name or id.
        domain: DomRef,
    },
}

/// An error for people: one line, with its causes.
#[derive(Debug)]
struct Fail(String);

impl<E: std::error::Error> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(control::chain(&e))
    }
}

fn fail(s: impl Into<String>) -> Fail {
    Fail(s.into())
}

/// Writes CPU numbers as a Xen-style list (`0-1,3`).
fn cpu_list(cpus: impl Iterator<Item = u64>) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for c in cpus {
        match runs.last_mut() {
            Some((_, hi)) if *hi + 1 == c => *hi = c,
            _ => runs.push((c, c)),
        }
    }
    runs.iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn connect(dir: &Path) -> Result<Client, Fail> {
    Client::connect(dir).map_err(|e| match e {
        ConnectError::Absent(e) => fail(format!(
            "no splitvisord on {} ({e}); `xl create` starts one, or run splitvisord",
            dir.display()
        )),
        ConnectError::Untrusted(why) => fail(why),
    })
}

/// Connects, starting the daemon in the background first if none answers.
fn connect_or_start(dir: &Path) -> Result<Client, Fail> {
    match Client::connect(dir) {
        Ok(c) => return Ok(c),
        Err(ConnectError::Untrusted(why)) => return Err(fail(why)),
        Err(ConnectError::Absent(_)) => {}
    }
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("splitvisord")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("splitvisord"));
    peer::make_runtime_dir(dir)?;
    let out_path = dir.join("daemon.out");
    let out = peer::open_append_nofollow(&out_path)
        .map_err(|e| fail(format!("{}: {e}", out_path.display())))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--runtime-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe; the child leaves our session so it outlives xl and
    // is not hit by the terminal's signals.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", exe.display())))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(c) = Client::connect(dir) {
            eprintln!(
                "xl: started splitvisord (pid {}) on {}",
                child.id(),
                dir.display()
            );
            return Ok(c);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let why = std::fs::read_to_string(&out_path).unwrap_or_default();
            return Err(fail(format!(
                "splitvisord exited ({status}): {}",
                why.trim()
            )));
        }
        if Instant::now() > deadline {
            return Err(fail("splitvisord did not come up within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `xl shutdown -a [-w]`: asks every running domain to power off, then (with `-w`) waits until
/// none of them runs any more (gone, or stopped and kept).
fn shutdown_all(dir: &Path, wait: bool) -> Result<(), Fail> {
    let mut c = connect(dir)?;
    let running = |c: &mut Client| -> Result<std::collections::HashSet<u32>, Fail> {
        let doms: Vec<DomainInfo> = c.call(Request::List)?;
        Ok(doms
            .iter()
            .filter(|d| matches!(d.state.as_str(), "r" | "b" | "p"))
            .map(|d| d.id)
            .collect())
    };
    let asked = running(&mut c)?;
    for &id in &asked {
        c.call::<Done>(Request::Shutdown {
            dom: DomRef::Id(id),
            reboot: false,
            wait: false,
        })?;
    }
    if !wait {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let still = running(&mut c)?;
        let left = asked.iter().filter(|id| still.contains(id)).count();
        if left == 0 {
            eprintln!("xl: {} domain(s) shut down", asked.len());
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "{left} of {} domains still running after 120 s",
                asked.len()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn state_column(letter: &str) -> String {
    let pos = "rbpscd".find(letter).unwrap_or(0);
    (0..6)
        .map(|i| {
            if i == pos {
                letter.chars().next().unwrap_or('-')
            } else {
                '-'
            }
        })
        .collect()
}

/// Attaches to a console: output to stdout, stdin to the guest; Ctrl-] detaches.
fn console(dir: &Path, dom: &DomRef) -> Result<(), Fail> {
    stream_console(open_console(dir, dom)?)
}

/// Attaches to `dom`'s console (its output so far comes first).
fn open_console(dir: &Path, dom: &DomRef) -> Result<Client, Fail> {
    let mut c = connect(dir)?;
    c.call::<Done>(Request::Console { dom: dom.clone() })?;
    Ok(c)
}

/// Copies an attached console to stdout and stdin to the guest until the domain goes or the
/// user detaches.
fn stream_console(c: Client) -> Result<(), Fail> {
    let mut to_guest = c.stream.try_clone()?;
    let tty = std::io::stdin().is_terminal();
    let saved = if tty { raw_mode() } else { None };
    let input = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            // Ctrl-] (0x1d) detaches, as in xl.
            if let Some(i) = buf[..n].iter().position(|&b| b == 0x1d) {
                let _ = to_guest.write_all(&buf[..i]);
                let _ = to_guest.shutdown(std::net::Shutdown::Both);
                return true;
            }
            if to_guest.write_all(&buf[..n]).is_err() {
                return false;
            }
        }
    });
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    // Whatever is left buffered after the reply line, then the stream.
    let pending = c.reader.buffer().to_vec();
    let _ = out.write_all(&pending);
    let _ = out.flush();
    let mut sock = c.stream;
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
        }
    }
    if let Some(t) = saved {
        restore_mode(&t);
    }
    drop(input);
    Ok(())
}

fn raw_mode() -> Option<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is a terminal (checked by the caller); `t` is a valid termios.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return None;
    }
    let saved = t;
    // SAFETY: cfmakeraw only edits the struct.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: as above.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    Some(saved)
}

fn restore_mode(t: &libc::termios) {
    // SAFETY: restores settings read from the same terminal.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn run(cli: Cli) -> Result<(), Fail> {
    let dir = cli.runtime_dir.unwrap_or_else(control::default_runtime_dir);
    match cli.verb {
        Verb::Create {
            file,
            console: attach,
            paused,
            overrides,
        } => {
            let spec = DomainSpec::load(&file, &overrides)?;
            let mut c = connect_or_start(&dir)?;
            // With -c the domain starts paused until the console is attached, so a guest that
            // ends at once still shows its output and its exit status.
            let v: CreateReply = c.call(Request::Create {
                spec: Box::new(spec),
                paused: paused || attach,
            })?;
            eprintln!("xl: created domain {} (id {})", v.name, v.id);
            if attach {
                let id = DomRef::Id(v.id);
                let con = open_console(&dir, &id)?;
                if !paused {
                    c.call::<Done>(Request::Unpause { dom: id.clone() })?;
                }
                stream_console(con)?;
                // The console ends when the domain goes: say how it ended, and pass a guest's
                // failure on as ours.
                // (Whether it is still listed — preserved, or about to be restarted — or gone.)
                let s: StatusReply = connect(&dir)?.call(Request::Status { dom: id.clone() })?;
                if s.crashed {
                    return Err(fail(format!("domain {id} crashed: {}", s.state)));
                }
                if let Some(c) = s.shutdown_code.filter(|&c| c != 0) {
                    return Err(fail(format!("domain {id} exited with code {c}")));
                }
            }
        }
        Verb::List { long, json } => {
            let doms: Vec<DomainInfo> = connect(&dir)?.call(Request::List)?;
            if json || long {
                println!("{}", serde_json::to_string_pretty(&doms)?);
                return Ok(());
            }
            let mut rows = vec![
                ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
                    .map(String::from)
                    .to_vec(),
            ];
            for d in &doms {
                rows.push(vec![
                    d.name.to_string(),
                    d.id.to_string(),
                    d.mem.to_string(),
                    d.vcpus.to_string(),
                    state_column(&d.state),
                    format!("{:.1}", d.time),
                ]);
            }
            print_table(&rows);
        }
        Verb::Destroy { domain } => {
            connect(&dir)?.call::<Done>(Request::Destroy { dom: domain })?;
        }
        Verb::Shutdown { wait, all, domain } => match domain {
            Some(dom) if !all => {
                connect(&dir)?.call::<Done>(Request::Shutdown {
                    dom,
                    reboot: false,
                    wait,
                })?;
            }
            _ => shutdown_all(&dir, wait)?,
        },
        Verb::Reboot { wait, domain } => {
            connect(&dir)?.call::<Done>(Request::Shutdown {
                dom: domain,
                reboot: true,
                wait,
            })?;
        }
        Verb::Pause { domain } => {
            connect(&dir)?.call::<Done>(Request::Pause { dom: domain })?;
        }
        Verb::Unpause { domain } => {
            connect(&dir)?.call::<Done>(Request::Unpause { dom: domain })?;
        }
        Verb::Console { domain } => console(&dir, &domain)?,
        Verb::Dmesg { lines } => {
            let text: String = connect(&dir)?.call(Request::Dmesg { lines })?;
            println!("{text}");
        }
        Verb::Info => {
            let v: InfoReply = connect(&dir)?.call(Request::Info)?;
            let h = &v.host;
            for (k, val) in [
                ("kvm", h.kvm.clone()),
                ("nr_cpus", h.cores.to_string()),
                ("total_memory", format!("{} MiB", h.memory_mib)),
                ("host_kernel", h.kernel.clone()),
                ("domains", v.domains.to_string()),
                ("switches", serde_json::to_string(&v.switches)?),
                ("splitvisor_version", v.splitvisor),
                ("protocol_version", v.protocol.to_string()),
                ("daemon_uptime", format!("{} s", v.uptime_s)),
            ] {
                println!("{k:<20}: {val}");
            }
        }
        Verb::VcpuList { domain } => {
            let v: Vec<VcpuRow> = connect(&dir)?.call(Request::VcpuList { dom: domain })?;
            let mut rows = vec![
                ["Name", "ID", "VCPU", "CPU", "State", "Time(s)", "Affinity"]
                    .map(String::from)
                    .to_vec(),
            ];
            for d in v {
                let affinity = match d.affinity {
                    None => "all".to_string(),
                    Some(a) => cpu_list(a.into_iter().map(u64::from)),
                };
                rows.push(vec![
                    d.name.to_string(),
                    d.id.to_string(),
                    d.vcpu.to_string(),
                    or_dash(d.cpu),
                    d.state,
                    format!("{:.1}", d.time_s),
                    affinity,
                ]);
            }
            print_table(&rows);
        }
        Verb::VcpuPin { domain, vcpu, cpus } => {
            let vcpu = match vcpu.as_str() {
                "all" => None,
                n => Some(
                    n.parse::<u32>()
                        .map_err(|_| fail(format!("vCPU {n:?}: not an index or `all`")))?,
                ),
            };
            let cpus = match cpus.as_str() {
                "all" => None,
                c => Some(splitvisor_api::xlcfg::parse_cpu_list(c).map_err(fail)?),
            };
            connect(&dir)?.call::<Done>(Request::VcpuPin {
                dom: domain,
                vcpu,
                cpus,
            })?;
        }
        Verb::MemSet { domain, mib } => {
            connect(&dir)?.call::<control::MemSetReply>(Request::MemSet { dom: domain, mib })?;
        }
        Verb::Top { delay, iterations } => {
            let mut c = connect(&dir)?;
            let tty = std::io::stdout().is_terminal();
            let mut n = 0;
            loop {
                let v: Vec<TopRow> = c.call(Request::Top)?;
                if tty {
                    print!("\x1b[H\x1b[2J");
                }
                let mut rows = vec![
                    [
                        "NAME",
                        "ID",
                        "STATE",
                        "CPU(s)",
                        "VCPUS",
                        "MEM(k)",
                        "MAXMEM(k)",
                        "HOST(k)",
                        "NET_RX(pkts)",
                        "NET_TX(pkts)",
                        "NET_RX(B)",
                        "NET_TX(B)",
                        "VBDS",
                        "VBD_RD",
                        "VBD_WR",
                        "VBD_RSECT",
                        "VBD_WSECT",
                        "VBD_ERR",
                    ]
                    .map(String::from)
                    .to_vec(),
                ];
                for d in v {
                    rows.push(vec![
                        d.name.to_string(),
                        d.id.to_string(),
                        d.state,
                        format!("{:.2}", d.cpu_s),
                        d.vcpus.to_string(),
                        d.mem_kib.to_string(),
                        d.maxmem_kib.to_string(),
                        d.host_kib.to_string(),
                        d.net_rx_packets.to_string(),
                        d.net_tx_packets.to_string(),
                        d.net_rx_bytes.to_string(),
                        d.net_tx_bytes.to_string(),
                        d.disks.to_string(),
                        d.vbd_rd.to_string(),
                        d.vbd_wr.to_string(),
                        d.vbd_rsect.to_string(),
                        d.vbd_wsect.to_string(),
                        d.vbd_err.to_string(),
                    ]);
                }
                print_table(&rows);
                let _ = std::io::stdout().flush();
                n += 1;
                if iterations.is_some_and(|i| n >= i) {
                    break;
                }
                std::thread::sleep(Duration::from_secs_f64(delay.max(0.1)));
            }
        }
        Verb::BlockAttach { domain, spec } => {
            // A relative image path is relative to where xl runs, not to the daemon.
            let base = std::env::current_dir()
                .ok()
                .and_then(|d| HostPath::new(&d, None).ok());
            let v: BlockAttachReply = connect(&dir)?.call(Request::BlockAttach {
                dom: domain,
                spec,
                base,
            })?;
            eprintln!("xl: attached {} (device {})", v.vdev, v.devid);
        }
        Verb::BlockDetach { domain, vdev } => {
            connect(&dir)?
                .call::<control::BlockDetachReply>(Request::BlockDetach { dom: domain, vdev })?;
        }
        Verb::BlockList { domain } => {
            let v: Vec<VbdRow> = connect(&dir)?.call(Request::BlockList { dom: domain })?;
            let mut rows = vec![
                ["Vdev", "BE", "State", "FE-State", "RO", "Target"]
                    .map(String::from)
                    .to_vec(),
            ];
            for d in v {
                rows.push(vec![
                    d.vdev.to_string(),
                    d.devid.to_string(),
                    or_dash(d.backend_state),
                    or_dash(d.frontend_state),
                    if d.readonly { "ro" } else { "rw" }.into(),
                    d.target.as_path().display().to_string(),
                ]);
            }
            print_table(&rows);
        }
        Verb::NetworkAttach { domain, spec } => {
            let v: NetworkAttachReply =
                connect(&dir)?.call(Request::NetworkAttach { dom: domain, spec })?;
            eprintln!("xl: attached vif {} (mac {})", v.devid, v.mac);
        }
        Verb::NetworkDetach { domain, devid } => {
            connect(&dir)?
                .call::<NetworkDetachReply>(Request::NetworkDetach { dom: domain, devid })?;
        }
        Verb::NetworkList { domain } => {
            let v: Vec<VifRow> = connect(&dir)?.call(Request::NetworkList { dom: domain })?;
            let mut rows = vec![
                [
                    "Idx", "Mac", "Bridge", "BE-State", "FE-State", "RX", "TX", "Dropped", "Errors",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for d in v {
                rows.push(vec![
                    d.devid.to_string(),
                    d.mac.to_string(),
                    d.bridge.to_string(),
                    or_dash(d.backend_state),
                    or_dash(d.frontend_state),
                    d.tx_packets.to_string(),
                    d.rx_packets.to_string(),
                    d.tx_dropped.to_string(),
                    d.errors.to_string(),
                ]);
            }
            print_table(&rows);
        }
    }
    Ok(())
}

/// A number, or `-` for none.
fn or_dash(n: Option<u32>) -> String {
    n.map_or("-".into(), |n| n.to_string())
}

/// A memory size as `xl mem-set` takes it: MiB, or a number with `k`, `m` or `g` (any case);
/// whole MiB, at least 1.
fn parse_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit_kib) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &t[..i],
            match c.to_ascii_lowercase() {
                'k' => 1,
                'm' => 1 << 10,
                'g' => 1 << 20,
                _ => return Err(format!("{s:?}: the unit must be k, m or g")),
            },
        ),
        _ => (t, 1 << 10),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: not a memory size"))?;
    let kib = n
        .checked_mul(unit_kib)
        .ok_or_else(|| format!("{s:?}: too large"))?;
    if kib % 1024 != 0 || kib == 0 {
        return Err(format!("{s:?}: must be a whole number of MiB, at least 1"));
    }
    Ok(kib / 1024)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(e)) => {
            eprintln!("xl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_as_xl_takes_them() {
        assert_eq!(parse_mib("256"), Ok(256));
        assert_eq!(parse_mib("256m"), Ok(256));
        assert_eq!(parse_mib("2G"), Ok(2048));
        assert_eq!(parse_mib("4096k"), Ok(4));
        for bad in [
            "",
            "0",
            "1k",
            "x",
            "12t",
            "-1",
            "99999999999999999999g",
            "g",
        ] {
            assert!(parse_mib(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cpu_lists_print_as_xen_writes_them() {
        assert_eq!(cpu_list([0, 1, 2, 5, 7, 8].into_iter()), "0-2,5,7-8");
        assert_eq!(cpu_list([3].into_iter()), "3");
    }
}
