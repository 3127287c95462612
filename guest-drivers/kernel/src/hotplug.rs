//! The `hotplug [ip=A.B.C.D]` job: disks and network interfaces that the toolstack attaches and
//! detaches while the guest runs.
//!
//! It watches `device` in the store and each connected device's back-end `state` (Xen's
//! front-end watches), and lists `device/vbd` and `device/vif` whenever one fires; it wakes for
//! nothing else but the vifs' traffic and console input. A device whose front-end `state` is
//! Initialising (1) and whose back end (its `backend` key) waits in InitWait (2) is connected
//! through the usual handshake:
//!
//! - a disk prints `hotplug: vbd <devid> connected <sectors> sectors`, then checks I/O on sectors
//!   0..8 (writes a pattern and reads it back, or only reads if the back end's `info` says
//!   read-only) and prints `hotplug: vbd <devid> io ok` or `hotplug: vbd <devid> io FAILED <why>`;
//! - a vif prints `hotplug: vif <devid> connected mac <mac>`; with `ip=`, every connected vif
//!   answers ARP, pings and UDP echo (port 7) with that address.
//!
//! A connection that fails prints `hotplug: <class> <devid> connect FAILED <why>` and sets the
//! front end Closed, so it is tried again only once the toolstack publishes the device anew.
//!
//! A connected device is released when its back end leaves Connected (Closing, Closed, or a
//! restart) or its back-end or front-end directory disappears: the job stops using it, says
//! Closing (the back end then stops serving and unmaps what it kept mapped, persistent grants
//! included) and waits up to [`BACKEND_CLOSE_MS`] ms for the back end's Closed, ends access to
//! every page the device granted (pages the back end still maps are leaked, never reused:
//! `hotplug: <class> <devid> leaked <n> page(s) still mapped`), closes its event channel, sets
//! the front end Closed and prints `hotplug: <class> <devid> released`. The same device id can
//! then be attached and connected again.
//!
//! Meanwhile console input lines are echoed (`console: <line>`) and the toolstack's shutdown
//! requests obeyed (see [`crate::control`]).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use pv_protocol::blkif::{BlkStatus, verify_pattern};
use pv_protocol::store::{MsgType, StoreErrno};

use crate::blkfront::{BlkFront, DevDisk};
use crate::console::LineInput;
use crate::control;
use crate::hcall::Cpu;
use crate::kprintln;
use crate::net::{Ip, ShowMac, Stack, parse_ip};
use crate::netfront::NetFront;
use crate::store::{Path, W_BACKEND, W_DEVICE};
use crate::store::{StoreFail, request};
use crate::text::{fmt_u32, parse_u32, parse_u64};

/// How long a release waits for the back end to say Closed after we said Closing (dom0 waits
/// 2 s for our Closed before it tears down regardless).
const BACKEND_CLOSE_MS: u64 = 1000;
/// How long a release then retries ending access to pages the back end still maps.
const END_ACCESS_MS: u64 = 500;
/// Largest frame received.
const RX_BUF: usize = 64 * 1024;

/// A device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Vbd,
    Vif,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Vbd => "vbd",
            Class::Vif => "vif",
        }
    }

    fn dir(self) -> &'static [u8] {
        match self {
            Class::Vbd => b"device/vbd",
            Class::Vif => b"device/vif",
        }
    }
}

impl Path {
    /// The front-end directory of `class` device `devid`.
    fn front(class: Class, devid: u32) -> Self {
        let mut d = [0u8; 16];
        Path::new(&[class.dir(), fmt_u32(&mut d, devid)])
    }

    fn key(&self, k: &[u8]) -> Self {
        Path::new(&[self.as_bytes(), k])
    }
}

fn read(cpu: &Cpu, path: &Path, out: &mut [u8]) -> Result<usize, StoreFail> {
    let r = request(cpu, MsgType::Read, 0, &[path.as_bytes(), b"\0"], out)?;
    Ok(out[..r.len].iter().position(|&b| b == 0).unwrap_or(r.len))
}

/// A XenbusState key: the state, `Ok(None)` if the key (or its directory) is gone, `Err` if
/// the store did not answer.
fn state(cpu: &Cpu, path: &Path) -> Result<Option<u64>, StoreFail> {
    let mut out = [0u8; 24];
    match read(cpu, path, &mut out) {
        Ok(n) => Ok(Some(parse_u64(&out[..n]).unwrap_or(0))),
        Err(StoreFail::Errno(StoreErrno::ENOENT)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn write(cpu: &Cpu, path: &Path, value: &[u8]) -> bool {
    request(
        cpu,
        MsgType::Write,
        0,
        &[path.as_bytes(), b"\0", value],
        &mut [0u8; 16],
    )
    .is_ok()
}

/// The device ids listed under `class`'s directory (`None` if the store did not answer; an
/// absent directory lists nothing).
fn list(cpu: &Cpu, class: Class) -> Option<Vec<u32>> {
    let mut out = [0u8; 1024];
    let dir = Path::new(&[class.dir()]);
    match request(
        cpu,
        MsgType::Directory,
        0,
        &[dir.as_bytes(), b"\0"],
        &mut out,
    ) {
        Ok(r) => Some(
            out[..r.len]
                .split(|&b| b == 0)
                .filter(|n| !n.is_empty())
                .filter_map(parse_u32)
                .collect(),
        ),
        Err(StoreFail::Errno(StoreErrno::ENOENT)) => Some(Vec::new()),
        Err(_) => None,
    }
}

/// What a connected device is.
#[derive(Debug)]
enum Io {
    Disk(Box<DevDisk>),
    /// A vif, with its stack when the job serves an address.
    Nic(Box<NetFront>, Option<Stack>),
}

/// A connected device.
#[derive(Debug)]
struct Dev {
    class: Class,
    devid: u32,
    front: Path,
    back: Path,
    io: Io,
}

/// `hotplug [ip=A.B.C.D]`: see the module documentation. Runs until a shutdown request.
pub fn hotplug(cpu: &Cpu, cmdline: &str) -> u32 {
    let ip = match crate::text::arg(cmdline, "ip") {
        None => None,
        Some(v) => match parse_ip(v) {
            Some(ip) => Some(ip),
            None => {
                kprintln!(cpu, "FAIL hotplug-args: bad ip=A.B.C.D");
                return 1;
            }
        },
    };
    // Fires at once: the first scan finds devices attached before we got here.
    if crate::store::watch(cpu, b"device", W_DEVICE).is_err() {
        kprintln!(cpu, "FAIL hotplug: cannot watch device");
        return 1;
    }
    kprintln!(cpu, "hotplug: watching");
    let mut devs: Vec<Dev> = Vec::new();
    let mut input = LineInput::new();
    let mut buf = vec![0u8; RX_BUF];
    loop {
        if crate::store::take_fired(W_DEVICE | W_BACKEND) != 0 {
            scan(cpu, &mut devs, ip);
        }
        // Serve the vifs, then sleep on their ports (and the console's and the store's) until
        // something happens.
        let mut ports = [0u32; 7];
        let mut nports = 0;
        let mut busy = false;
        for d in devs.iter_mut() {
            if let Io::Nic(nf, Some(st)) = &mut d.io {
                serve(nf, st, &mut buf);
                busy |= !nf.prepare_sleep();
                if nports < ports.len() {
                    ports[nports] = nf.port();
                    nports += 1;
                }
            }
        }
        if busy {
            input.pump(cpu);
            control::poll(cpu);
            continue;
        }
        control::sleep(
            cpu,
            &ports[..nports],
            None,
            W_DEVICE | W_BACKEND,
            Some(&mut input),
        );
    }
}

/// Handles every frame waiting on `nf`: the stack answers ARP and pings, we answer UDP echo.
fn serve(nf: &mut NetFront, st: &mut Stack, buf: &mut [u8]) {
    let mut n = 0u32;
    while let Some(fr) = nf.recv(buf) {
        let ev = st.input(&buf[..fr.len], fr.l4_checked, nf);
        crate::netjobs::udp_echo(st, nf, ev);
        n += 1;
        // Replies go out in batches, but not held back for long.
        if n.is_multiple_of(32) {
            nf.flush();
        }
    }
    nf.flush();
    nf.reclaim();
}

/// One pass over the store: releases devices that went away, connects new ones.
fn scan(cpu: &Cpu, devs: &mut Vec<Dev>, ip: Option<Ip>) {
    for class in [Class::Vbd, Class::Vif] {
        let Some(ids) = list(cpu, class) else {
            continue;
        };
        // Released first: a device detached and attached again between two scans is connected
        // anew in the same pass.
        let mut i = 0;
        while i < devs.len() {
            let d = &devs[i];
            if d.class == class && gone(cpu, d, &ids) {
                let d = devs.swap_remove(i);
                release(cpu, d);
            } else {
                i += 1;
            }
        }
        for &devid in &ids {
            if devs.iter().any(|d| d.class == class && d.devid == devid) {
                continue;
            }
            if let Some(d) = connect(cpu, class, devid, ip) {
                devs.push(d);
            }
        }
    }
}

/// Whether connected device `d` must be released: its front-end directory is no longer listed,
/// or its back end left Connected or went away. A store that does not answer changes nothing.
fn gone(cpu: &Cpu, d: &Dev, listed: &[u32]) -> bool {
    if !listed.contains(&d.devid) {
        return true;
    }
    match state(cpu, &d.back.key(b"state")) {
        Ok(Some(4)) => false,
        Ok(_) => true,
        Err(_) => false,
    }
}

/// Connects `class` device `devid` if it is new (front end Initialising, back end in InitWait).
fn connect(cpu: &Cpu, class: Class, devid: u32, ip: Option<Ip>) -> Option<Dev> {
    let front = Path::front(class, devid);
    if state(cpu, &front.key(b"state")) != Ok(Some(1)) {
        return None;
    }
    let mut out = [0u8; 128];
    let n = read(cpu, &front.key(b"backend"), &mut out).ok()?;
    let back = Path::new(&[&out[..n]]);
    if state(cpu, &back.key(b"state")) != Ok(Some(2)) {
        return None;
    }
    let name = class.name();
    let io = match class {
        Class::Vbd => BlkFront::connect_devid(cpu, devid).map(|mut disk| {
            kprintln!(
                cpu,
                "hotplug: vbd {devid} connected {} sectors",
                disk.disk.sectors
            );
            match io_check(cpu, &mut disk) {
                Ok(()) => kprintln!(cpu, "hotplug: vbd {devid} io ok"),
                Err(why) => kprintln!(cpu, "hotplug: vbd {devid} io FAILED {why}"),
            }
            Io::Disk(Box::new(disk))
        }),
        Class::Vif => NetFront::connect_devid(cpu, devid).map(|nf| {
            kprintln!(
                cpu,
                "hotplug: vif {devid} connected mac {}",
                ShowMac(nf.mac)
            );
            let st = ip.map(|ip| Stack::new(nf.mac, ip));
            Io::Nic(Box::new(nf), st)
        }),
    };
    match io {
        Ok(io) => {
            // Its back end's changes wake us (Closing, a restart, its directory removed).
            let _ = crate::store::watch(cpu, back.key(b"state").as_bytes(), W_BACKEND);
            Some(Dev {
                class,
                devid,
                front,
                back,
                io,
            })
        }
        Err(why) => {
            kprintln!(cpu, "hotplug: {name} {devid} connect FAILED {why}");
            // Not tried again until the toolstack publishes the device anew (state 1).
            write(cpu, &front.key(b"state"), b"6");
            None
        }
    }
}

/// Seeds of successive I/O checks (each writes a different pattern, so a read that returned
/// an earlier check's data would not pass).
static IO_CHECKS: core::sync::atomic::AtomicU32 = core::sync::atomic::AtomicU32::new(0);

/// The byte an I/O check with `seed` writes at disk offset `off`.
fn check_byte(seed: u8, off: usize) -> u8 {
    verify_pattern(off as u64) ^ seed
}

/// Writes a pattern to sectors 0..8 and reads it back (or, read-only, just reads them).
fn io_check(cpu: &Cpu, d: &mut DevDisk) -> Result<(), &'static str> {
    if d.disk.sectors < 8 {
        return Err("disk smaller than 8 sectors");
    }
    let page = pv_protocol::PAGE_SIZE;
    if d.readonly {
        return match d.rw_page(cpu, false, 0) {
            BlkStatus::Okay => Ok(()),
            _ => Err("read failed"),
        };
    }
    let n = IO_CHECKS.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
    let seed = 0x3c ^ (n as u8).wrapping_mul(0x1d);
    let mut bytes = [0u8; 4096];
    for (off, b) in bytes.iter_mut().enumerate().take(page) {
        *b = check_byte(seed, off);
    }
    d.data.write(0, &bytes).map_err(|_| "data page")?;
    if d.rw_page(cpu, true, 0) != BlkStatus::Okay {
        return Err("write failed");
    }
    d.data.write(0, &[0u8; 4096]).map_err(|_| "data page")?;
    if d.rw_page(cpu, false, 0) != BlkStatus::Okay {
        return Err("read failed");
    }
    d.data.read(0, &mut bytes).map_err(|_| "data page")?;
    if (0..page).any(|off| bytes[off] != check_byte(seed, off)) {
        return Err("data read back differs from data written");
    }
    Ok(())
}

/// Releases `d` (see the module documentation).
fn release(cpu: &Cpu, d: Dev) {
    let Dev {
        class,
        devid,
        front,
        back,
        io,
    } = d;
    let name = class.name();
    let front_state = front.key(b"state");
    // A front-end directory that went away is not written back into existence.
    let front_there = state(cpu, &front_state).is_ok_and(|s| s.is_some());
    if front_there {
        write(cpu, &front_state, b"5");
    }
    // Wait for the back end to stop serving and unmap: Closed, or its directory gone.
    let back_state = back.key(b"state");
    let _ = crate::store::unwatch(cpu, back_state.as_bytes(), W_BACKEND);
    crate::store::wait_for(cpu, back_state.as_bytes(), BACKEND_CLOSE_MS, |v| {
        v.is_none_or(|v| parse_u64(v) == Some(6))
    });
    let leaked = match io {
        Io::Disk(disk) => (*disk).release(cpu, END_ACCESS_MS),
        Io::Nic(nf, _) => (*nf).release(cpu, END_ACCESS_MS),
    };
    if leaked > 0 {
        kprintln!(
            cpu,
            "hotplug: {name} {devid} leaked {leaked} page(s) still mapped"
        );
    }
    if front_there {
        write(cpu, &front_state, b"6");
    }
    kprintln!(cpu, "hotplug: {name} {devid} released");
}
