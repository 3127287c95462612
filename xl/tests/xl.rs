//! The real `xl` binary against a real `splitvisord` and real KVM domains, each test in its own
//! runtime directory (the daemon is started by `xl create`, and killed when the test ends).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use splitvisor_api::control::{DomainInfo, VbdRow};

mod common;
use common::{Env, Raw, XL, last_tick};

#[test]
fn create_list_console_pause_unpause_destroy() {
    let env = Env::new("basic");
    let cfg = env.cfg(
        "ticker.cfg",
        "# a guest that counts\nname = \"tick\"\nmemory = 64\nvcpus = 2\nextra = \"ticker\"\n",
    );
    // No daemon yet: a command other than create says so, in one line.
    let err = env.fails(&["list"]);
    assert!(err.contains("no splitvisord"), "{err}");
    let o = env.xl(&["create", &cfg]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("started splitvisord"), "{err}");

    let text = env.ok(&["list"]);
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["tick", "1", "64", "2"]);
    // Running, or (between its ticks, when every vCPU sleeps in the hypervisor) blocked.
    assert!(["r-----", "-b----"].contains(&row[4]), "{text}");
    let doms = env.list();
    assert_eq!(doms.len(), 1);
    assert_eq!((doms[0].name.as_str(), doms[0].id), ("tick", 1));
    assert_eq!(doms[0].spec.cmdline.as_str(), "ticker");

    let c = env.console("tick", Duration::from_millis(700));
    assert!(
        c.contains("splitvisor guest: domain 1 with 2 vCPU(s)"),
        "{c}"
    );
    assert!(last_tick(&c) > 0, "{c}");

    // Paused: the guest makes no progress; unpaused, it goes on.
    env.ok(&["pause", "tick"]);
    assert_eq!(env.list()[0].state, "p");
    let before = last_tick(&env.console("1", Duration::from_millis(300)));
    std::thread::sleep(Duration::from_millis(500));
    let during = last_tick(&env.console("tick", Duration::from_millis(300)));
    assert_eq!(before, during, "a paused guest ticked");
    env.ok(&["unpause", "tick"]);
    env.wait_until("ticks after unpause", || {
        last_tick(&env.console("tick", Duration::from_millis(200))) > during
    });
    assert!(env.list()[0].time > 0.0);

    // Names are unique; a freed id is not reused within `REUSE_AFTER` (60 s).
    let err = env.fails(&["create", &cfg]);
    assert!(err.contains("already exists"), "{err}");
    env.ok(&["destroy", "tick"]);
    assert!(env.list().is_empty());
    env.ok(&["create", &cfg]);
    assert_eq!(env.list()[0].id, 2);
    // A file named without a directory is in the current one (its relative paths too).
    let o = Command::new(XL)
        .current_dir(&env.dir)
        .arg("--runtime-dir")
        .arg(env.dir.join("run"))
        .args(["create", "ticker.cfg", "name=\"bare\""])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    env.ok(&["destroy", "bare"]);
    let err = env.fails(&["pause", "nosuch"]);
    assert!(err.contains("no domain \"nosuch\""), "{err}");
    let info = env.ok(&["info"]);
    assert!(info.contains("domains             : 1"), "{info}");
    let top = env.ok(&["top", "-n", "1"]);
    assert!(top.lines().nth(1).unwrap().starts_with("tick"), "{top}");
}

#[test]
fn bad_domain_files_are_refused_with_file_line_and_reason() {
    let env = Env::new("badcfg");
    let cfg = env.cfg("bad.cfg", "name = \"x\"\n\nmemroy = 64\n");
    let err = env.fails(&["create", &cfg]);
    assert!(err.contains("bad.cfg:3: unknown setting `memroy`"), "{err}");
    let cfg = env.cfg("bad2.cfg", "name = \"x\"\ndisk = [ 'a.img,qcow2' ]\n");
    let err = env.fails(&["create", &cfg]);
    assert!(
        err.contains("bad2.cfg:2: disk 1: format \"qcow2\""),
        "{err}"
    );
    let err = env.fails(&["create", &cfg, "memory=lots"]);
    assert!(err.contains("<command line>:1"), "{err}");
    // Less memory than the guest kernel runs in.
    let min = pv_protocol::start_info::MIN_MEM_MIB;
    let cfg = env.cfg(
        "small.cfg",
        &format!("name = \"x\"\nmemory = {}\n", min - 1),
    );
    let err = env.fails(&["create", &cfg]);
    assert!(
        err.contains(&format!(
            "small.cfg:2: `memory` = {} is below {min} MiB, the least the guest kernel runs in",
            min - 1
        )),
        "{err}"
    );
    let cfg = env.cfg("bad3.cfg", "name = \"x\"\nmemory = 128\nmaxmem = 64\n");
    let err = env.fails(&["create", &cfg]);
    assert!(
        err.contains("bad3.cfg:3: `maxmem` (64 MiB) must be at least `memory` (128 MiB)"),
        "{err}"
    );
    // Nothing was started for a file that does not parse.
    assert!(
        !env.dir
            .join("run")
            .join(splitvisor_api::control::SOCKET)
            .exists()
    );
}

#[test]
fn on_crash_restart_rebuilds_the_domain_and_preserve_keeps_it() {
    let env = Env::new("crash");
    let cfg = env.cfg(
        "c.cfg",
        "name = \"phoenix\"\nextra = \"crash\"\non_crash = \"restart\"\n",
    );
    env.ok(&["create", &cfg]);
    // It crashes at once, is rebuilt with a new id, crashes again... until the restart limit.
    env.wait_until("restarted", || {
        env.list()
            .first()
            .is_some_and(|d| d.restarts >= 1 && d.id > 1)
    });
    let log = env.ok(&["dmesg", "-n", "200"]);
    assert!(log.contains("domain crashed"), "{log}");
    assert!(log.contains("domain restarted"), "{log}");
    env.wait_until("restart limit", || env.list().is_empty());
    let log = env.ok(&["dmesg", "-n", "200"]);
    assert!(log.contains("giving up"), "{log}");

    let cfg = env.cfg(
        "p.cfg",
        "name = \"kept\"\nextra = \"crash\"\non_crash = \"preserve\"\n",
    );
    env.ok(&["create", &cfg]);
    env.wait_until("crashed and kept", || {
        env.list().first().is_some_and(|d| d.state == "c")
    });
    let d = &env.list()[0];
    assert!(!d.detail.is_empty(), "the crash is described: {d:?}");
    // A console attached to a stopped domain shows its output and ends; `create -c` of a guest
    // that fails fails too.
    let c = env.console("kept", Duration::from_millis(100));
    assert!(c.contains("cmdline \"crash\""), "{c}");
    let cfg = env.cfg("f.cfg", "name = \"failing\"\nextra = \"nosuchjob\"\n");
    let o = env.xl(&["create", &cfg, "-c"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.trim_end().ends_with("exited with code 2"), "{err}");
    env.ok(&["destroy", "kept"]);
    assert!(env.list().is_empty());
}

#[test]
fn a_guest_touching_memory_it_lacks_crashes_and_on_crash_applies() {
    let env = Env::new("beyond");
    let cfg = env.cfg(
        "b.cfg",
        "name = \"beyond\"\nmemory = 16\nextra = \"touch-beyond\"\non_crash = \"preserve\"\n",
    );
    env.ok(&["create", &cfg]);
    env.wait_until("crashed and kept", || {
        env.list().first().is_some_and(|d| d.state == "c")
    });
    let d = &env.list()[0];
    assert!(
        d.detail
            .contains("at gpa 0x1001000, outside the domain's memory"),
        "{d:?}"
    );
    env.ok(&["destroy", "beyond"]);
    let cfg = env.cfg(
        "d.cfg",
        "name = \"gone\"\nmemory = 16\nextra = \"touch-beyond\"\non_crash = \"destroy\"\n",
    );
    env.ok(&["create", &cfg]);
    env.wait_until("crashed and destroyed", || env.list().is_empty());
    let log = env.ok(&["dmesg", "-n", "200"]);
    assert!(log.contains("gpa 0x1001000"), "{log}");
}

/// A domain that crashes at once is restarted at once the first time, then after a back-off that
/// doubles (0.25 s, 0.5 s, 1 s, 2 s, ...): a crash or reboot loop cannot use up the host.
#[test]
fn crash_loops_back_off_exponentially_before_each_restart() {
    let env = Env::new("backoff");
    let cfg = env.cfg(
        "c.cfg",
        "name = \"looper\"\nextra = \"crash\"\non_crash = \"restart\"\n",
    );
    env.ok(&["create", &cfg]);
    // When each restart count was first seen.
    let mut seen: Vec<(u32, Instant)> = Vec::new();
    let mut put_off = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        let doms = env.list();
        let Some(d) = doms.first() else { break };
        put_off |= d.detail.contains("restart in");
        if seen.last().is_none_or(|(n, _)| *n != d.restarts) {
            seen.push((d.restarts, Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(put_off, "xl list -l showed no pending restart");
    let at = |n: u32| seen.iter().find(|(r, _)| *r == n).map(|(_, t)| *t);
    let (r3, r4, r5) = (at(3).unwrap(), at(4).unwrap(), at(5).unwrap());
    // Restart 4 waits 1 s, restart 5 waits 2 s (each plus a boot and a crash).
    assert!(r4 - r3 >= Duration::from_millis(900), "{seen:?}");
    assert!(r5 - r4 >= Duration::from_millis(1900), "{seen:?}");
    let log = env.ok(&["dmesg", "-n", "400"]);
    assert!(log.contains("put off by 2s"), "{log}");
    // The give-up rule still holds: 5 restarts within 10 s and it is destroyed.
    assert!(log.contains("giving up"), "{log}");
    assert!(env.list().is_empty());
}

/// A preserved domain's devices are released without the daemon's lock held (a detach may wait
/// for a guest, though not for a stopped one), and meanwhile every request is served.
#[test]
fn preserving_a_domain_does_not_stall_the_daemon() {
    let env = Env::new("preserve");
    let img = env.dir.join("p.img");
    let cfg = env.cfg(
        "p.cfg",
        &format!(
            "name = \"p\"\nextra = \"blkverify\"\non_poweroff = \"preserve\"\n\
             disk = [ 'vdev=xvda,size=16M,target={}' ]\n",
            img.display()
        ),
    );
    env.ok(&["create", &cfg]);
    // The longest answer to `hello` while the guest checks its disk, powers off without
    // releasing it, and is preserved.
    let mut raw = Raw::new(&env);
    let mut worst = Duration::ZERO;
    let t = Instant::now();
    loop {
        // Only the daemon's answers are timed (not the start-up of xl processes).
        let asked = Instant::now();
        raw.send(br#"{"v":1,"op":"hello"}"#);
        let doms: Vec<DomainInfo> = raw.call(br#"{"v":1,"op":"list"}"#);
        // Preserved: its disk goes (blkverify never released it; the stopped guest is not
        // waited for).
        let done = doms.first().is_some_and(|d| d.state == "s")
            && raw
                .call::<Vec<VbdRow>>(br#"{"v":1,"op":"block-list","dom":"p"}"#)
                .is_empty();
        worst = worst.max(asked.elapsed());
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not preserved: {doms:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give the detach its whole wait, answering throughout.
    let t = Instant::now();
    while t.elapsed() < dom0::xenbus::CLOSE_TIMEOUT {
        let asked = Instant::now();
        raw.send(br#"{"v":1,"op":"list"}"#);
        worst = worst.max(asked.elapsed());
    }
    assert!(
        worst < dom0::xenbus::CLOSE_TIMEOUT / 2,
        "a request waited {worst:?} while a preserved domain's disk was released"
    );
    env.ok(&["destroy", "p"]);
}

#[test]
fn one_daemon_per_runtime_dir_and_a_stale_socket_is_replaced() {
    let env = Env::new("daemons");
    let cfg = env.cfg("t.cfg", "name = \"t\"\nextra = \"ticker\"\n");
    env.ok(&["create", &cfg]);
    let daemon = Path::new(XL).parent().unwrap().join("splitvisord");
    let o = Command::new(&daemon)
        .arg("--runtime-dir")
        .arg(env.dir.join("run"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("another splitvisord"), "{err}");
    // Kill it hard: the socket file stays behind.
    let pid: i32 = std::fs::read_to_string(env.dir.join("run").join(splitvisor_api::control::LOCK))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill on the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    env.wait_until("daemon gone", || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(
        env.dir
            .join("run")
            .join(splitvisor_api::control::SOCKET)
            .exists()
    );
    // Until the kernel has closed the dead daemon's listening socket a connection may still be
    // accepted and then reset; after that, the one-line "no daemon" answer.
    env.wait_until("connections refused", || {
        let o = env.xl(&["list"]);
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no splitvisord")
    });
    // A new create starts a new daemon over the stale socket.
    env.ok(&["create", &cfg]);
    assert_eq!(env.list().len(), 1);
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn the_demo_file_boots_a_guest_that_checks_itself_on_the_console() {
    let env = Env::new("demo");
    let cfg = repo().join("examples/demo.cfg");
    let img = env.dir.join("xvda.img");
    let disk = format!(
        "disk = [ 'vdev=xvda,access=rw,size=64M,target={}' ]",
        img.display()
    );
    let o = env.xl(&["create", cfg.to_str().unwrap(), "-c", &disk]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("selftest: 40 passed, 0 failed"), "{out}");
    assert!(out.contains("blkverify: 14 passed, 0 failed"), "{out}");
    assert!(out.contains("PASS net-tx 8 frames queued"), "{out}");
    assert!(out.contains("demo: all checks passed"), "{out}");
    // on_poweroff = destroy: gone, and its image released and sparse.
    assert!(env.list().is_empty());
    assert!(std::fs::metadata(&img).unwrap().len() == 64 << 20);
}

#[test]
fn two_domains_from_the_examples_ping_each_other() {
    let env = Env::new("examples");
    env.ok(&["create", repo().join("examples/echo.cfg").to_str().unwrap()]);
    env.wait_until("echo connected", || {
        env.console("echo", Duration::from_millis(100))
            .contains("connected")
    });
    let o = env.xl(&[
        "create",
        repo().join("examples/ping.cfg").to_str().unwrap(),
        "-c",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ping: 5 sent, 5 received"), "{out}");
    let doms = env.list();
    assert_eq!(doms.len(), 1, "ping powered off and went: {doms:?}");
    assert_eq!(doms[0].name.as_str(), "echo");
}

#[test]
fn hotplug_console_input_reboot_and_shutdown() {
    let env = Env::new("hotplug");
    let cfg = env.cfg("h.cfg", "name = \"h\"\nextra = \"hotplug ip=10.0.9.1\"\n");
    env.ok(&["create", &cfg]);
    let sees = |what: &str| {
        env.wait_until(what, || {
            env.console("h", Duration::from_millis(100)).contains(what)
        })
    };
    sees("hotplug: watching");
    // Between its looks at the store the guest sleeps in the hypervisor: xl's "b".
    env.wait_until("state b", || env.list()[0].state == "b");

    // A disk, hot-plugged: the guest connects, checks I/O, and releases it on detach.
    let img = env.dir.join("b.img");
    let spec = format!("vdev=xvdb,size=16M,target={}", img.display());
    env.ok(&["block-attach", "h", &spec]);
    sees("hotplug: vbd 51728 io ok");
    let list = env.ok(&["block-list", "h"]);
    assert!(list.contains("xvdb  51728  4      4"), "{list}");
    // The check wrote one page and read it back: xl top counts 1 read and 1 write of 8 sectors.
    let top = env.ok(&["top", "-n", "1"]);
    let cols = |line: &str| {
        line.split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let (head, row) = (
        cols(top.lines().next().unwrap()),
        cols(top.lines().nth(1).unwrap()),
    );
    let vbd: Vec<&str> = [
        "VBDS",
        "VBD_RD",
        "VBD_WR",
        "VBD_RSECT",
        "VBD_WSECT",
        "VBD_ERR",
    ]
    .iter()
    .map(|c| row[head.iter().position(|h| h == c).unwrap()].as_str())
    .collect();
    assert_eq!(vbd, ["1", "1", "1", "8", "8", "0"], "{top}");
    env.ok(&["block-detach", "h", "xvdb"]);
    sees("hotplug: vbd 51728 released");
    assert!(!env.ok(&["block-list", "h"]).contains("xvdb"));
    let err = env.fails(&["block-detach", "h", "xvdb"]);
    assert!(err.contains("no device xvdb"), "{err}");

    // A network interface, hot-plugged; a second domain on the same switch pings the guest.
    env.ok(&["network-attach", "h", "bridge=hp"]);
    sees("hotplug: vif 0 connected mac");
    let p = env.cfg(
        "p.cfg",
        "name = \"p\"\nextra = \"ping 10.0.9.1 count=3\"\nvif = [ 'bridge=hp,ip=10.0.9.2' ]\n",
    );
    let o = env.xl(&["create", &p, "-c"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ping: 3 sent, 3 received"), "{out}");
    let nl = env.ok(&["network-list", "h"]);
    assert!(
        nl.lines().nth(1).is_some_and(|l| l.starts_with("0 ")),
        "{nl}"
    );
    env.ok(&["network-detach", "h", "0"]);
    sees("hotplug: vif 0 released");

    // Keystrokes reach the guest's console input.
    let c = env.console_typing("h", b"hello xl\r", Duration::from_millis(500));
    assert!(c.contains("console: hello xl"), "{c}");

    // Reboot: the guest acknowledges, and on_reboot=restart (the default) builds it again.
    env.ok(&["reboot", "-w", "h"]);
    let d = env.list();
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].name.as_str(), d[0].restarts), ("h", 1));
    assert!(d[0].id > 1);
    // Shutdown -w returns once it is gone (on_poweroff=destroy).
    env.wait_until("rebooted guest up", || {
        env.console("h", Duration::from_millis(100))
            .contains("hotplug: watching")
    });
    env.ok(&["shutdown", "-w", "h"]);
    assert!(env.list().is_empty());
    let log = env.ok(&["dmesg", "-n", "100"]);
    assert!(log.contains("asked to poweroff"), "{log}");
}

/// A pseudo-terminal pair: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors into `m` and `s`; the name, termios and winsize
    // pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

fn termios(f: &std::fs::File) -> libc::termios {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for the terminal `f`.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `f` is an open terminal; `t` is a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
    t
}

#[test]
fn console_on_a_terminal_is_raw_while_attached_and_restored_after_detach() {
    let env = Env::new("pty");
    let cfg = env.cfg("i.cfg", "name = \"i\"\nextra = \"idle\"\n");
    env.ok(&["create", &cfg]);
    let (mut master, slave) = pty();
    let before = termios(&slave);
    assert_ne!(before.c_lflag & libc::ICANON, 0, "a fresh pty is cooked");
    let mut child = Command::new(XL)
        .arg("--runtime-dir")
        .arg(env.dir.join("run"))
        .args(["console", "i"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    // Everything xl writes to the terminal, read on a thread (the master blocks).
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut m = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let mut wait_for = |what: &str| {
        let t = Instant::now();
        while !seen.contains(what) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no {what:?} in {seen:?}"
            );
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(50)) {
                seen.push_str(&String::from_utf8_lossy(&b));
            }
        }
    };
    wait_for("idle: up");
    // Raw while attached: no line editing, no echo, no signals from Ctrl-C / Ctrl-].
    let raw = termios(&slave);
    assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
    // Keys go through one by one (a cooked terminal would hold them until the line ends).
    master.write_all(b"typed on a tty\r").unwrap();
    wait_for("console: typed on a tty");
    // Ctrl-] detaches: xl exits cleanly and the terminal is as it was.
    master.write_all(&[0x1d]).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "xl console did not detach"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "xl console exited {status}");
    let after = termios(&slave);
    assert_eq!(
        (after.c_iflag, after.c_oflag, after.c_cflag, after.c_lflag),
        (
            before.c_iflag,
            before.c_oflag,
            before.c_cflag,
            before.c_lflag
        ),
        "terminal modes restored"
    );
    // The guest is still running.
    assert_eq!(env.list()[0].name.as_str(), "i");
}

/// `Cpus_allowed_list` of the daemon's thread named `name`, as the kernel reports it.
fn thread_cpus(env: &Env, name: &str) -> String {
    try_thread_cpus(env, name).unwrap_or_else(|| panic!("no thread {name}"))
}

fn try_thread_cpus(env: &Env, name: &str) -> Option<String> {
    let lock = env.dir.join("run").join(splitvisor_api::control::LOCK);
    let pid = std::fs::read_to_string(lock).unwrap();
    let tasks = format!("/proc/{}/task", pid.trim());
    for t in std::fs::read_dir(&tasks).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|l| l.trim().to_owned());
        }
    }
    None
}

#[test]
fn vcpu_list_and_vcpu_pin() {
    let env = Env::new("vcpus");
    let cfg = env.cfg("v.cfg", "name = \"v\"\nvcpus = 2\nextra = \"idle\"\n");
    env.ok(&["create", &cfg]);
    let rows = |env: &Env| -> Vec<Vec<String>> {
        env.ok(&["vcpu-list", "v"])
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(String::from).collect())
            .collect()
    };
    // Two vCPUs, idle: asleep in the hypervisor, free to run anywhere.
    env.wait_until("both vCPUs blocked", || {
        let r = rows(&env);
        r.len() == 2 && r.iter().all(|r| r[4] == "-b-")
    });
    let r = rows(&env);
    assert_eq!((r[0][2].as_str(), r[1][2].as_str()), ("0", "1"));
    assert!(r.iter().all(|r| r[6] == "all"), "{r:?}");
    let online = std::thread::available_parallelism().unwrap().get();
    assert_eq!(thread_cpus(&env, "dom1-vcpu1"), format!("0-{}", online - 1));

    // Pinned: the kernel applies it and vcpu-list shows it.
    env.ok(&["vcpu-pin", "v", "all", "0"]);
    assert_eq!(thread_cpus(&env, "dom1-vcpu0"), "0");
    assert_eq!(thread_cpus(&env, "dom1-vcpu1"), "0");
    env.wait_until("vCPUs on CPU 0", || {
        rows(&env).iter().all(|r| r[3] == "0" && r[6] == "0")
    });
    env.ok(&["vcpu-pin", "v", "1", "all"]);
    assert_eq!(thread_cpus(&env, "dom1-vcpu1"), format!("0-{}", online - 1));
    let r = rows(&env);
    assert_eq!((r[0][6].as_str(), r[1][6].as_str()), ("0", "all"));
    // Paused vCPUs say so.
    env.ok(&["pause", "v"]);
    assert!(rows(&env).iter().all(|r| r[4] == "--p"));
    env.ok(&["unpause", "v"]);

    // Refused: a vCPU or a CPU that does not exist, a list that does not parse.
    let err = env.fails(&["vcpu-pin", "v", "2", "0"]);
    assert!(err.contains("has no vCPU 2"), "{err}");
    let err = env.fails(&["vcpu-pin", "v", "0", &online.to_string()]);
    assert!(err.contains("names a CPU outside"), "{err}");
    let err = env.fails(&["vcpu-pin", "v", "0", "1-0"]);
    assert!(err.contains("CPU list \"1-0\""), "{err}");
    assert_eq!(
        thread_cpus(&env, "dom1-vcpu0"),
        "0",
        "a refused pin changes nothing"
    );

    // xl.cfg's `cpus` pins every vCPU from the start; a CPU the host lacks is refused.
    let cfg = env.cfg("w.cfg", "name = \"w\"\ncpus = \"0\"\nextra = \"idle\"\n");
    env.ok(&["create", &cfg]);
    env.wait_until("dom2's vCPU pinned as it starts", || {
        try_thread_cpus(&env, "dom2-vcpu0").as_deref() == Some("0")
    });
    let w = env.ok(&["vcpu-list", "w"]);
    assert!(w.lines().nth(1).unwrap().ends_with(" 0"), "{w}");
    let cfg = env.cfg("x.cfg", &format!("name = \"x\"\ncpus = \"{online}\"\n"));
    let err = env.fails(&["create", &cfg]);
    assert!(err.contains("cpus"), "{err}");
}

/// One domain's row of `xl top -n 1`, by column name.
fn top_row(env: &Env, name: &str) -> std::collections::HashMap<String, String> {
    let top = env.ok(&["top", "-n", "1"]);
    let mut lines = top.lines();
    let head: Vec<String> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect();
    let row = lines
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} in {top}"));
    head.into_iter()
        .zip(row.split_whitespace().map(String::from))
        .collect()
}

fn kib(row: &std::collections::HashMap<String, String>, col: &str) -> u64 {
    row[col].parse().unwrap()
}

#[test]
fn mem_set_moves_a_domain_down_and_up_to_its_maxmem_and_no_further() {
    let env = Env::new("memset");
    let cfg = env.cfg(
        "b.cfg",
        "name = \"b\"\nmemory = 64\nmaxmem = 96\nextra = \"balloon\"\n",
    );
    env.ok(&["create", &cfg]);
    let idle = env.cfg("i.cfg", "name = \"i\"\nmemory = 64\nextra = \"idle\"\n");
    env.ok(&["create", &idle]);
    env.wait_until("the balloon is up", || {
        env.console("b", Duration::from_millis(200))
            .contains("balloon: up")
    });
    let d = env
        .list()
        .into_iter()
        .find(|d| d.name.as_str() == "b")
        .unwrap();
    assert_eq!((d.mem, d.target, d.maxmem), (64, 64, 96));
    let before = top_row(&env, "b");
    assert_eq!(kib(&before, "MEM(k)"), 64 << 10);
    assert_eq!(kib(&before, "MAXMEM(k)"), 96 << 10);
    // The checking balloon touched every free page: the host backs them.
    assert!(kib(&before, "HOST(k)") > 40 << 10, "{before:?}");

    let idle_before = top_row(&env, "i");
    // Down: the list shows what it holds, the host's memory for it really drops.
    env.ok(&["mem-set", "b", "4"]);
    env.ok(&["mem-set", "i", "4m"]);
    env.wait_until("b gave its free memory back", || {
        env.list()
            .iter()
            .any(|d| d.name.as_str() == "b" && d.mem < 20)
    });
    env.wait_until("the idle domain gave its free memory back", || {
        env.list()
            .iter()
            .any(|d| d.name.as_str() == "i" && d.mem < 20)
    });
    let low = top_row(&env, "b");
    assert!(kib(&low, "HOST(k)") < 8 << 10, "{low:?}");
    assert!(kib(&low, "MEM(k)") < 20 << 10, "{low:?}");
    let idle_low = top_row(&env, "i");
    assert!(
        kib(&idle_low, "HOST(k)") <= kib(&idle_low, "MEM(k)"),
        "{idle_low:?}"
    );
    eprintln!(
        "64 MiB domains, mem-set 4: checking balloon host {} -> {} KiB; idle host {} -> {} KiB, \
         holding {} -> {} KiB",
        kib(&before, "HOST(k)"),
        kib(&low, "HOST(k)"),
        kib(&idle_before, "HOST(k)"),
        kib(&idle_low, "HOST(k)"),
        kib(&idle_before, "MEM(k)"),
        kib(&idle_low, "MEM(k)"),
    );
    let text = env.ok(&["list"]);
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("b "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert!(row[2].parse::<u64>().unwrap() < 20, "{text}");

    // Up to maxmem, and its checks still pass.
    env.ok(&["mem-set", "b", "96"]);
    env.wait_until("b is back at 96 MiB", || {
        env.list()
            .iter()
            .any(|d| d.name.as_str() == "b" && d.mem == 96)
    });
    let c = env.console("b", Duration::from_millis(300));
    assert!(
        c.contains("holding 98304 KiB, 0 given back, check ok"),
        "{c}"
    );
    assert!(!c.contains("FAILED"), "{c}");
    // Not beyond it, not to nothing, not for a domain that is not there.
    let err = env.fails(&["mem-set", "b", "97"]);
    assert!(err.contains("maxmem 96 MiB"), "{err}");
    let err = env.fails(&["mem-set", "i", "65"]);
    assert!(err.contains("maxmem 64 MiB"), "{err}");
    let o = env.xl(&["mem-set", "b", "0"]);
    assert!(!o.status.success());
    let err = env.fails(&["mem-set", "nosuch", "64"]);
    assert!(err.contains("no domain"), "{err}");
    assert_eq!(
        env.list()
            .iter()
            .find(|d| d.name.as_str() == "b")
            .unwrap()
            .target,
        96
    );
    env.ok(&["shutdown", "-w", "b"]);
    env.ok(&["shutdown", "-w", "i"]);
}

#[test]
fn shutdown_all_waits_until_every_guest_has_acknowledged() {
    let env = Env::new("shutall");
    for name in ["a", "b", "c"] {
        let cfg = env.cfg(
            &format!("{name}.cfg"),
            &format!("name = \"{name}\"\nextra = \"idle\"\non_poweroff = \"preserve\"\n"),
        );
        env.ok(&["create", &cfg]);
    }
    // Every guest is asked at once; -w returns when each has powered off by itself.
    let out = env.xl(&["shutdown", "-a", "-w"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 domain(s) shut down"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doms = env.list();
    assert_eq!(doms.len(), 3);
    for d in &doms {
        assert_eq!(d.state, "s", "{d:?}");
        assert!(d.detail.starts_with("Poweroff, exit code 0"), "{d:?}");
    }
    // Nothing left running: -a has nothing to ask.
    let out = env.xl(&["shutdown", "-a", "-w"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 domain(s) shut down"));
}
