//! What the tests of the real `xl` binary and the real `splitvisord` share: a runtime directory
//! per test with its daemon (started by `xl create`, killed when the test ends).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use splitvisor_api::control::{DomainInfo, Reply};

/// The `xl` binary under test.
pub const XL: &str = env!("CARGO_BIN_EXE_xl");

/// Makes sure an up-to-date `splitvisord` sits next to `xl` (it belongs to another package, so
/// `cargo test -p splitvisor-xl` alone would not build it, and a stale one would embed a
/// stale guest kernel); a no-op when it is fresh.
pub fn daemon_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(XL).parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "dom0", "--bin", "splitvisord"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building splitvisord");
    });
}

/// A runtime directory with its daemon; both go when the test ends.
pub struct Env {
    /// The test's directory; the runtime directory is `run` in it.
    pub dir: PathBuf,
}

impl Env {
    /// A fresh directory for the test tagged `tag`.
    pub fn new(tag: &str) -> Self {
        daemon_built();
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: these tests boot real domains"
        );
        let dir = std::env::temp_dir().join(format!("sv-xl-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// Runs xl on the test's runtime directory.
    pub fn xl(&self, args: &[&str]) -> Output {
        Command::new(XL)
            .arg("--runtime-dir")
            .arg(self.dir.join("run"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs xl, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.xl(args);
        assert!(
            o.status.success(),
            "xl {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs xl, asserting failure with one line on stderr; returns it.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.xl(args);
        assert!(!o.status.success(), "xl {args:?} should fail");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.starts_with("xl: "), "{err:?}");
        err
    }

    /// Writes a domain file; returns its path.
    pub fn cfg(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    /// `xl list --json`.
    pub fn list(&self) -> Vec<DomainInfo> {
        serde_json::from_str(&self.ok(&["list", "--json"])).unwrap()
    }

    /// The console as `xl console` shows it within `for_how_long` (history first), then
    /// detaches with Ctrl-].
    pub fn console(&self, dom: &str, for_how_long: Duration) -> String {
        self.console_typing(dom, b"", for_how_long)
    }

    /// As [`console`](Self::console), typing `keys` first.
    pub fn console_typing(&self, dom: &str, keys: &[u8], for_how_long: Duration) -> String {
        let mut child = Command::new(XL)
            .arg("--runtime-dir")
            .arg(self.dir.join("run"))
            .args(["console", dom])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = out.read_to_end(&mut s);
            s
        });
        child.stdin.as_mut().unwrap().write_all(keys).unwrap();
        std::thread::sleep(for_how_long);
        let _ = child.stdin.as_mut().unwrap().write_all(&[0x1d]);
        let status = child.wait().unwrap();
        assert!(status.success(), "xl console exited {status}");
        String::from_utf8_lossy(&reader.join().unwrap()).into_owned()
    }

    /// Waits (30 s at most) until `f` holds.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let lock = self.dir.join("run").join(splitvisor_api::control::LOCK);
        if let Some(pid) = std::fs::read_to_string(lock)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill on the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw connection to the daemon.
pub struct Raw {
    /// Where requests go.
    pub w: UnixStream,
    /// Where replies come from.
    pub r: BufReader<UnixStream>,
}

impl Raw {
    /// Connects to `env`'s daemon.
    pub fn new(env: &Env) -> Self {
        let w =
            UnixStream::connect(env.dir.join("run").join(splitvisor_api::control::SOCKET)).unwrap();
        // A request that makes the daemon hang fails the test instead of hanging it.
        w.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Self { w, r }
    }

    /// Sends `line` (a newline is added) and returns the one reply line, parsed.
    pub fn send(&mut self, line: &[u8]) -> Reply {
        self.w.write_all(line).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut back = String::new();
        self.r
            .read_line(&mut back)
            .unwrap_or_else(|e| panic!("no reply to {:?}: {e}", String::from_utf8_lossy(line)));
        assert!(back.ends_with('\n'), "reply to {line:?}: {back:?}");
        serde_json::from_str(&back).unwrap_or_else(|e| panic!("reply {back:?}: {e}"))
    }

    /// Sends `line` and expects the op's reply, a `T`.
    pub fn call<T: serde::de::DeserializeOwned>(&mut self, line: &[u8]) -> T {
        let req = String::from_utf8_lossy(line).into_owned();
        match self.send(line) {
            Reply::Ok(v) => serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("reply to {req}: {e}: {v}")),
            Reply::Error(e) => panic!("{req} was refused: {e}"),
        }
    }

    /// Sends `req` and expects an error reply; returns its text.
    pub fn refused(&mut self, req: &Value) -> String {
        match self.send(req.to_string().as_bytes()) {
            Reply::Error(e) => e,
            Reply::Ok(v) => panic!("{req} was accepted: {v}"),
        }
    }
}

/// The highest `tick N` the `ticker` job printed in `console`.
pub fn last_tick(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}
