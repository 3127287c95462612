//! The control socket is a trust boundary: a real `splitvisord` with a real bystander domain
//! takes a corpus of malformed requests and a property test of arbitrary JSON on its socket,
//! and checks who connects. After every request the daemon answers with exactly one line, and
//! the bystander keeps running and answering (its ticks go on; at the end it shuts down
//! cleanly when asked, which takes the guest's cooperation).

use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use splitvisor_api::control::{CreateReply, HelloReply, MAX_REQUEST, Reply};

mod common;
use common::{Env, Raw, XL, last_tick};

/// The daemon's pid (from `hello`).
fn daemon_pid(raw: &mut Raw) -> u64 {
    raw.call::<HelloReply>(br#"{"v":1,"op":"hello"}"#)
        .pid
        .into()
}

/// The bystander is listed and running (r or b), and its ticks have gone past `after`.
fn bystander_alive(env: &Env, after: u64) -> u64 {
    let doms = env.list();
    let d = doms
        .iter()
        .find(|d| d.name.as_str() == "bystander")
        .expect("bystander listed");
    assert!(
        d.state == "r" || d.state == "b",
        "bystander state {}",
        d.state
    );
    let mut tick = 0;
    env.wait_until("the bystander ticks on", || {
        tick = last_tick(&env.console("bystander", Duration::from_millis(300)));
        tick > after
    });
    tick
}

fn with_bystander(tag: &str) -> Env {
    let env = Env::new(tag);
    let cfg = env.cfg("by.cfg", "name = \"bystander\"\nextra = \"ticker\"\n");
    env.ok(&["create", &cfg]);
    env
}

/// A valid `create` request for a domain called `name`, to be broken one field at a time.
fn create(name: &str, dir: &Path) -> Value {
    json!({
        "v": 1, "op": "create", "paused": true,
        "spec": {
            "name": name, "memory": 64, "maxmem": null, "vcpus": 1, "cpus": null, "kernel": null,
            "cmdline": "idle", "on_poweroff": "destroy", "on_reboot": "destroy",
            "on_crash": "destroy",
            "disks": [{
                "target": dir.join(format!("{name}.img")), "vdev": "xvda",
                "readonly": false, "size": 1048576,
            }],
            "vifs": [{ "mac": null, "bridge": "ctl0", "uplink_tap": null, "ip": null }],
        },
    })
}

/// `base` with the JSON pointer `at` set to `v`.
fn with(base: &Value, at: &str, v: Value) -> Value {
    let mut r = base.clone();
    *r.pointer_mut(at).unwrap_or_else(|| panic!("{at}")) = v;
    r
}

#[test]
fn malformed_requests_get_errors_and_the_daemon_and_a_bystander_live_on() {
    let env = with_bystander("ctl-corpus");
    let mut raw = Raw::new(&env);
    let pid = daemon_pid(&mut raw);
    let mut tick = bystander_alive(&env, 0);

    let fifo = env.dir.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo_s = fifo.to_string_lossy().into_owned();

    let ok = create("fresh", &env.dir);
    let long = "x".repeat(5000);
    let many_disks: Vec<Value> = (0..27)
        .map(|i| json!({"target": format!("/tmp/d{i}"), "vdev": "xvda", "readonly": false, "size": null}))
        .collect();
    let vif = |k: &str, v: Value| with(&ok, &format!("/spec/vifs/0/{k}"), v);
    let disk = |k: &str, v: Value| with(&ok, &format!("/spec/disks/0/{k}"), v);
    let spec = |k: &str, v: Value| with(&ok, &format!("/spec/{k}"), v);

    // (request, a word the error must contain)
    let corpus: Vec<(Value, &str)> = vec![
        // The case that used to kill the daemon: a vdev shorter than 4 bytes.
        (disk("vdev", json!("xv")), "vdev"),
        (disk("vdev", json!("")), "vdev"),
        (disk("vdev", json!("xvd")), "vdev"),
        (disk("vdev", json!("xvdA")), "vdev"),
        (disk("vdev", json!("xvdaa")), "vdev"),
        (disk("vdev", json!("xvdé")), "vdev"),
        (disk("vdev", json!(7)), "invalid type"),
        (spec("name", json!("")), "name"),
        (spec("name", json!("a".repeat(65))), "name"),
        (spec("name", json!("../etc")), "name"),
        (spec("name", json!("a b")), "name"),
        (spec("name", json!("42")), "name"),
        (spec("name", json!("bystander")), "already exists"),
        (spec("memory", json!(0)), "memory"),
        (
            spec("memory", json!(pv_protocol::start_info::MIN_MEM_MIB - 1)),
            "the least the guest kernel runs in",
        ),
        (spec("memory", json!(16385)), "memory"),
        (spec("memory", json!(u64::MAX)), "memory"),
        (spec("memory", json!(-1)), "invalid value"),
        (spec("memory", json!(1.5)), "invalid type"),
        (spec("memory", json!("64")), "invalid type"),
        (spec("vcpus", json!(0)), "vcpus"),
        (spec("vcpus", json!(33)), "vcpus"),
        (spec("vcpus", json!(1u64 << 32)), "invalid value"),
        (spec("cpus", json!([])), "CPU list"),
        (spec("cpus", json!([2000])), "CPU list"),
        (spec("cpus", json!([1, 0])), "CPU list"),
        (spec("cpus", json!([0, 0])), "CPU list"),
        (
            spec("cpus", json!((0..2000).collect::<Vec<u32>>())),
            "CPU list",
        ),
        (spec("cpus", json!([1000])), "cpus"),
        (spec("kernel", json!("relative/vmlinux")), "absolute"),
        (spec("kernel", json!("/dev/zero")), "regular file"),
        (spec("kernel", json!(fifo_s)), "regular file"),
        (spec("kernel", json!("/nonexistent/k")), "kernel"),
        (spec("kernel", json!(format!("/{long}"))), "4095 bytes"),
        (spec("kernel", json!("/a\u{0}b")), "NUL"),
        (spec("cmdline", json!(long)), "command line"),
        (spec("cmdline", json!("a\nb")), "command line"),
        (spec("cmdline", json!("a\u{0}b")), "command line"),
        (spec("on_crash", json!("reboot")), "unknown variant"),
        (spec("disks", json!(many_disks)), "two disks"),
        (disk("target", json!("rel.img")), "absolute"),
        (disk("target", json!(fifo_s)), "regular file"),
        (disk("target", json!("/dev/zero")), "regular file"),
        (disk("size", json!(0)), "size"),
        (disk("size", json!(513)), "size"),
        (disk("size", json!(1u64 << 63)), "size"),
        (
            spec("vifs", json!(vec![ok["spec"]["vifs"][0].clone(); 9])),
            "at most 8",
        ),
        (vif("mac", json!("ff:ff:ff:ff:ff:ff")), "unicast"),
        (vif("mac", json!("01:00:5e:00:00:01")), "unicast"),
        (vif("mac", json!("00:00:00:00:00:00")), "unicast"),
        (vif("mac", json!("02:00:00:00:00")), "MAC"),
        (vif("bridge", json!("")), "letters"),
        (vif("bridge", json!("b".repeat(32))), "letters"),
        (vif("bridge", json!("a/b")), "letters"),
        (vif("uplink_tap", json!("t".repeat(16))), "letters"),
        (vif("uplink_tap", json!("..")), "letters"),
        (vif("ip", json!("1.2.3")), "invalid"),
        (json!({"op": "list"}), "missing field `v`"),
        (json!({"v": 2, "op": "list"}), "protocol version 2"),
        (json!({"v": -1, "op": "list"}), "invalid value"),
        (json!({"v": 1}), "missing field `op`"),
        (json!({"v": 1, "op": "reformat-disk"}), "unknown variant"),
        (json!({"v": 1, "op": 3}), "bad request"),
        (json!({"v": 1, "op": "destroy"}), "missing field `dom`"),
        (
            json!({"v": 1, "op": "destroy", "dom": "no such!"}),
            "not a domain name",
        ),
        (
            json!({"v": 1, "op": "destroy", "dom": long}),
            "not a domain name",
        ),
        (json!({"v": 1, "op": "pause", "dom": "99999"}), "no domain"),
        (
            json!({"v": 1, "op": "console", "dom": "nosuch"}),
            "no domain",
        ),
        (
            json!({"v": 1, "op": "block-attach", "dom": "bystander", "spec": "x".repeat(9000)}),
            "longer than",
        ),
        (
            json!({"v": 1, "op": "block-attach", "dom": "bystander", "spec": "rel.img"}),
            "absolute",
        ),
        (
            json!({"v": 1, "op": "block-attach", "dom": "bystander", "spec": "rel.img", "base": "also/rel"}),
            "absolute",
        ),
        (
            json!({"v": 1, "op": "block-attach", "dom": "bystander", "spec": format!("{fifo_s},raw,xvdb")}),
            "regular file",
        ),
        (
            json!({"v": 1, "op": "block-attach", "dom": "bystander", "spec": "/tmp/x.img,raw,xv"}),
            "vdev",
        ),
        (
            json!({"v": 1, "op": "block-detach", "dom": "bystander", "vdev": "xv"}),
            "vdev",
        ),
        (
            json!({"v": 1, "op": "block-detach", "dom": "bystander", "vdev": "xvdq"}),
            "no device",
        ),
        (
            json!({"v": 1, "op": "network-attach", "dom": "bystander", "spec": "mac=ff:ff:ff:ff:ff:ff"}),
            "unicast",
        ),
        (
            json!({"v": 1, "op": "network-attach", "dom": "bystander", "spec": "tap=../../x,uplink=tap"}),
            "letters",
        ),
        (
            json!({"v": 1, "op": "network-detach", "dom": "bystander", "devid": u32::MAX}),
            "no device",
        ),
        (
            json!({"v": 1, "op": "vcpu-pin", "dom": "bystander", "vcpu": u32::MAX, "cpus": null}),
            "vCPU",
        ),
        (
            json!({"v": 1, "op": "vcpu-pin", "dom": "bystander", "vcpu": 0, "cpus": [99999]}),
            "CPU list",
        ),
        (
            json!({"v": 1, "op": "vcpu-pin", "dom": "bystander", "vcpu": 0, "cpus": [1000]}),
            "host CPU set",
        ),
        (json!({"v": 1, "op": "dmesg", "lines": -5}), "invalid value"),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander"}),
            "missing field `mib`",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander", "mib": 0}),
            "memory target must be 1 to 16384 MiB",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander", "mib": 16385}),
            "memory target must be",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander", "mib": u64::MAX}),
            "memory target must be",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander", "mib": -1}),
            "invalid value",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander", "mib": "64"}),
            "invalid type",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "bystander", "mib": 65}),
            "maxmem 64 MiB",
        ),
        (
            json!({"v": 1, "op": "mem-set", "dom": "99999", "mib": 32}),
            "no domain",
        ),
        (spec("maxmem", json!(32)), "must be at least `memory`"),
        (spec("maxmem", json!(16385)), "maxmem"),
        (spec("maxmem", json!(-3)), "invalid value"),
        (json!({"v": 1, "op": "status", "dom": 1}), "invalid type"),
        (json!(null), "invalid type"),
        (json!([]), "invalid type"),
        (json!("list"), "invalid type"),
    ];
    let mut wrong = Vec::new();
    for (req, word) in &corpus {
        let e = raw.refused(req);
        if !e.contains(word) {
            wrong.push(format!("{req}: {e:?} lacks {word:?}"));
        }
        // A client's megabyte is not echoed back.
        assert!(e.len() < 1024, "{req}: a {}-byte error", e.len());
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Bytes that are not JSON, or not UTF-8, or nest deeper than the parser goes.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    for junk in [
        &b"garbage"[..],
        b"{",
        b"{}",
        b"\xff\xfe\x00",
        b"",
        deep.as_bytes(),
    ] {
        match raw.send(junk) {
            Reply::Error(e) => assert!(e.starts_with("bad request"), "{junk:?}: {e}"),
            Reply::Ok(v) => panic!("{junk:?} accepted: {v}"),
        }
    }
    // dmesg with a huge line count is fine, and answers.
    assert!(matches!(
        raw.send(br#"{"v":1,"op":"dmesg","lines":18446744073709551615}"#),
        Reply::Ok(_)
    ));
    // The malformed ones did nothing: no domain, no switch, no image.
    assert_eq!(env.list().len(), 1);
    assert!(!env.dir.join("fresh.img").exists());
    // The refusals are logged.
    let log =
        std::fs::read_to_string(env.dir.join("run").join(splitvisor_api::control::LOG)).unwrap();
    assert!(!log.contains("panicked"), "{log}");
    // And the valid request next to them works.
    let v: CreateReply = raw.call(ok.to_string().as_bytes());
    assert_eq!(v.name.as_str(), "fresh");
    env.ok(&["destroy", "fresh"]);

    // A line longer than the limit gets an error, then the connection is closed.
    let mut big = Raw::new(&env);
    let huge = vec![b'x'; MAX_REQUEST + 10];
    // The daemon may hang up before the last bytes are written (EPIPE): the reply is there.
    let _ = std::io::Write::write_all(&mut big.w, &huge);
    let mut reply = String::new();
    big.r.read_line(&mut reply).unwrap();
    match serde_json::from_str::<Reply>(&reply).unwrap() {
        Reply::Error(e) => assert!(e.contains("longer than"), "{e}"),
        Reply::Ok(v) => panic!("{v}"),
    }
    let mut rest = String::new();
    assert_eq!(
        big.r.read_line(&mut rest).unwrap_or(0),
        0,
        "closed after: {rest:?}"
    );

    assert_eq!(daemon_pid(&mut raw), pid, "the same daemon answers");
    tick = bystander_alive(&env, tick);
    let _ = tick;
    env.ok(&["shutdown", "-w", "bystander"]);
    assert!(env.list().is_empty());
}

/// Any JSON value, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        "\\PC{0,12}".prop_map(Value::String),
        "(xvd[a-z]?|[0-9]{1,3}|/tmp/[a-z]{1,4}|[a-z]{1,6})".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const OPS: &[&str] = &[
    "hello",
    "mem-set",
    "info",
    "list",
    "create",
    "destroy",
    "shutdown",
    "pause",
    "unpause",
    "console",
    "dmesg",
    "block-attach",
    "block-detach",
    "block-list",
    "network-attach",
    "network-detach",
    "network-list",
    "top",
    "status",
    "vcpu-list",
    "vcpu-pin",
    "bogus",
];

/// Requests: arbitrary JSON; envelopes of a real op with arbitrary fields; and the valid create
/// with one field replaced by arbitrary JSON.
fn any_request(dir: &Path) -> impl Strategy<Value = Value> {
    let ok = create("prop", dir);
    const FIELDS: &[&str] = &[
        "/spec/name",
        "/spec/memory",
        "/spec/maxmem",
        "/spec/vcpus",
        "/spec/cpus",
        "/spec/kernel",
        "/spec/cmdline",
        "/spec/on_crash",
        "/spec/disks",
        "/spec/disks/0/target",
        "/spec/disks/0/vdev",
        "/spec/disks/0/size",
        "/spec/disks/0/readonly",
        "/spec/vifs",
        "/spec/vifs/0/mac",
        "/spec/vifs/0/bridge",
        "/spec/vifs/0/uplink_tap",
        "/spec/vifs/0/ip",
        "/v",
        "/op",
        "/paused",
        "/spec",
    ];
    prop_oneof![
        any_json(),
        (
            prop::sample::select(OPS),
            prop::collection::btree_map(
                prop::sample::select(
                    &[
                        "dom", "spec", "vdev", "devid", "vcpu", "cpus", "lines", "reboot", "wait",
                        "base", "mib", "x"
                    ][..]
                ),
                any_json(),
                0..4
            )
        )
            .prop_map(|(op, f)| {
                let mut m: serde_json::Map<String, Value> =
                    f.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                m.insert("v".into(), json!(1));
                m.insert("op".into(), json!(op));
                Value::Object(m)
            }),
        (prop::sample::select(FIELDS), any_json()).prop_map(move |(at, v)| with(&ok, at, v)),
    ]
}

/// Whether `req` could legitimately act on the bystander (domain 1, "bystander"): those are
/// left out, since a valid destroy of it is no attack.
fn names_the_bystander(req: &Value) -> bool {
    matches!(
        req.get("dom").and_then(Value::as_str),
        Some("1" | "bystander")
    )
}

#[test]
fn arbitrary_json_requests_never_stop_the_daemon_or_a_bystander() {
    let env = with_bystander("ctl-prop");
    let raw = std::cell::RefCell::new(Raw::new(&env));
    let pid = daemon_pid(&mut raw.borrow_mut());
    let tick = bystander_alive(&env, 0);
    let mut runner = TestRunner::new(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    let accepted = std::cell::Cell::new(0u32);
    runner
        .run(&any_request(&env.dir), |req| {
            if names_the_bystander(&req) {
                return Ok(());
            }
            match raw.borrow_mut().send(req.to_string().as_bytes()) {
                Reply::Error(_) => {}
                Reply::Ok(_) => accepted.set(accepted.get() + 1),
            }
            Ok(())
        })
        .unwrap();
    // Whatever was accepted was a valid request (a domain "prop" may have been made; pause or
    // status of a missing domain is not among them).
    eprintln!(
        "{} of 2000 arbitrary requests were valid ones",
        accepted.get()
    );
    let _ = env.xl(&["destroy", "prop"]);
    assert_eq!(
        daemon_pid(&mut raw.borrow_mut()),
        pid,
        "the same daemon answers"
    );
    bystander_alive(&env, tick);
    env.ok(&["shutdown", "-w", "bystander"]);
}

/// The peer check: a process that is not root, not the daemon's user and not in its group is
/// refused even when the socket's permissions let it connect; a member of the group is served.
#[test]
fn only_root_the_daemons_user_and_its_group_are_served() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("ctl-peer");
    let daemon = Path::new(XL).parent().unwrap().join("splitvisord");
    let run = env.dir.join("run");
    // nogroup (65534) is Debian's; a uid without a passwd entry is in no group by name.
    let mut child = Command::new(&daemon)
        .arg("--runtime-dir")
        .arg(&run)
        .args(["--group", "nogroup"])
        .spawn()
        .unwrap();
    env.wait_until("the daemon listens", || {
        run.join(splitvisor_api::control::SOCKET).exists()
    });
    // xl as uid 4242 with nogroup only as a supplementary group: the directory and socket let it
    // in, the daemon does not (its credentials name neither the user nor the group).
    let as_user = |uid: u32, gid: u32, groups: &'static [u32], args: &[&str]| {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(XL);
        c.arg("--runtime-dir").arg(&run).args(args);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.output().unwrap()
    };
    let o = as_user(4242, 4242, &[65534], &["list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("permission denied: uid 4242"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Its primary group is the configured one: served.
    let o = as_user(4242, 65534, &[], &["list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A member names only files it could open itself: root's image is refused, its own is
    // used (and one it has the daemon create is its own).
    let roots = env.dir.join("roots.img");
    std::fs::write(&roots, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&roots, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mine = env.dir.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::os::unix::fs::chown(&mine, Some(4242), Some(65534)).unwrap();
    let theirs = env.cfg(
        "theirs.cfg",
        &format!(
            "name = \"m1\"\nextra = \"idle\"\ndisk = [ '{},raw,xvda,ro' ]\n",
            roots.display()
        ),
    );
    let o = as_user(4242, 65534, &[], &["create", &theirs]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("Permission denied"),
        "{err}"
    );
    let own = env.cfg(
        "own.cfg",
        &format!(
            "name = \"m2\"\nextra = \"idle\"\ndisk = [ 'vdev=xvda,size=1M,target={}/d.img' ]\n",
            mine.display()
        ),
    );
    let o = as_user(4242, 65534, &[], &["create", &own]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(mine.join("d.img")).unwrap().uid(), 4242);
    let log = std::fs::read_to_string(run.join(splitvisor_api::control::LOG)).unwrap();
    assert!(
        log.contains("connection refused") && log.contains("uid=4242"),
        "{log}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// `xl` trusts neither a runtime directory another user made (or could write, or that is a
/// symlink) nor a daemon running as another user: both are refused with one line.
#[test]
fn xl_refuses_a_runtime_dir_or_a_daemon_it_cannot_trust() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("ctl-trust");
    let run = env.dir.join("run");
    let xl_list = || {
        let o = Command::new(XL)
            .arg("--runtime-dir")
            .arg(&run)
            .arg("list")
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    };
    // Made first by someone else (uid 4242), with a planted daemon.out symlink.
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(4242), Some(4242)).unwrap();
    let e = xl_list();
    assert!(e.contains("belongs to uid 4242"), "{e}");
    let cfg = env.cfg("t.cfg", "name = \"t\"\nextra = \"ticker\"\n");
    let victim = env.dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, run.join("daemon.out")).unwrap();
    let o = env.xl(&["create", &cfg]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("belongs to uid 4242"));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::fs::remove_dir_all(&run).unwrap();
    // Writable by others.
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
    assert!(xl_list().contains("others may write"));
    std::fs::remove_dir(&run).unwrap();
    // A symlink to a directory.
    let real = env.dir.join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &run).unwrap();
    assert!(xl_list().contains("symlink"));
    std::fs::remove_file(&run).unwrap();

    // A trustworthy directory, but the socket in it is served by another user's process: xl
    // hangs up before sending anything (no keystroke reaches an impostor).
    std::fs::create_dir(&run).unwrap();
    let sock =
        std::os::unix::net::UnixListener::bind(run.join(splitvisor_api::control::SOCKET)).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    // The child says on this pipe when it listens: a connection made before that would carry
    // the parent's (root's) credentials.
    let mut ready = [0i32; 2];
    // SAFETY: pipe fills the two descriptors.
    assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes async-signal-safe system calls, then exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: as above. The peer credentials of a connection are those of whoever called
        // listen() last, here uid 4242.
        unsafe {
            if libc::setgid(4242) != 0 || libc::setuid(4242) != 0 {
                libc::_exit(1);
            }
            libc::listen(fd, 4);
            libc::write(ready[1], [1u8].as_ptr().cast(), 1);
            let c = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
            let mut b = [0u8; 1];
            // Waits until xl hangs up; would see the request's first byte if it sent one.
            let n = libc::read(c, b.as_mut_ptr().cast(), 1);
            libc::_exit(if n == 0 { 0 } else { 2 });
        }
    }
    let mut b = [0u8; 1];
    // SAFETY: reads one byte into `b` from the pipe made above.
    assert_eq!(unsafe { libc::read(ready[0], b.as_mut_ptr().cast(), 1) }, 1);
    let e = xl_list();
    assert!(e.contains("runs as uid 4242"), "{e}");
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the impostor got bytes"
    );
}
