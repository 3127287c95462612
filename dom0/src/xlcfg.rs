//! Domain configuration files in Xen's `xl.cfg` syntax (a subset).
//!
//! A file is a list of `KEY = VALUE` settings, one per line (a list may span lines), `#` starts a
//! comment. Values are strings in single or double quotes, integers, or lists of strings in
//! brackets. Known keys: `name`, `memory` (MiB), `vcpus`, `cpus` (host CPUs the vCPUs may run
//! on: `"0-1,3"` or `"all"`), `kernel`, `cmdline` (or `extra`),
//! `on_poweroff` / `on_reboot` / `on_crash` (`destroy` | `restart` | `preserve`), `disk` and `vif`
//! (lists of device specs, as in xl-disk-configuration(5) and xl-network-configuration(5)).
//! Anything else, and any malformed value, is refused with the file, the line and the reason.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::switch::Mac;

/// A configuration error: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct ConfigError {
    /// The file (or `<override>` for a command-line `key=value`).
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// A parsed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `"text"` or `'text'`.
    Str(String),
    /// `123`.
    Int(u64),
    /// `[ 'a', "b" ]`.
    List(Vec<String>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::List(l) => write!(f, "{l:?}"),
        }
    }
}

/// One `KEY = VALUE` with the line it started on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Value,
    /// 1-based line of the key.
    pub line: usize,
}

/// Splits `text` into settings (syntax only; see [`DomainSpec::from_settings`] for meaning).
pub fn parse_settings(text: &str, file: &Path) -> Result<Vec<Setting>, ConfigError> {
    let mut p = Lexer {
        chars: text.chars().collect(),
        pos: 0,
        line: 1,
        file,
    };
    let mut out = Vec::new();
    loop {
        p.skip_blank(true);
        if p.peek().is_none() {
            return Ok(out);
        }
        let line = p.line;
        let key = p.ident()?;
        p.skip_blank(false);
        if p.next() != Some('=') {
            return Err(p.err(format!("expected `=` after `{key}`")));
        }
        p.skip_blank(false);
        let value = p.value()?;
        p.skip_blank(false);
        match p.peek() {
            None | Some('\n') | Some('#') | Some(';') => {
                if p.peek() == Some(';') {
                    p.pos += 1;
                }
            }
            Some(c) => return Err(p.err(format!("unexpected `{c}` after the value of `{key}`"))),
        }
        out.push(Setting { key, value, line });
    }
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    file: &'a Path,
}

impl Lexer<'_> {
    fn err(&self, reason: String) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: self.line,
            reason,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// Skips spaces and comments; newlines too when `newlines`.
    fn skip_blank(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                '\n' if newlines => {
                    self.next();
                }
                ' ' | '\t' | '\r' => self.pos += 1,
                _ => return,
            }
        }
    }

    fn ident(&mut self) -> Result<String, ConfigError> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.pos += 1;
        }
        if self.pos == start {
            let what = self
                .peek()
                .map_or("end of file".into(), |c| format!("`{c}`"));
            return Err(self.err(format!("expected a setting name, found {what}")));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn string(&mut self) -> Result<String, ConfigError> {
        let quote = self.next().unwrap_or('"');
        let mut s = String::new();
        loop {
            if matches!(self.peek(), None | Some('\n')) {
                return Err(self.err("unterminated string".into()));
            }
            match self.next() {
                Some('\\') => match self.next() {
                    Some('n') => s.push('\n'),
                    Some(c @ ('\\' | '\'' | '"')) => s.push(c),
                    other => {
                        return Err(
                            self.err(format!("unknown escape `\\{}`", other.unwrap_or(' ')))
                        );
                    }
                },
                Some(c) if c == quote => return Ok(s),
                Some(c) => s.push(c),
                None => return Err(self.err("unterminated string".into())),
            }
        }
    }

    fn value(&mut self) -> Result<Value, ConfigError> {
        match self.peek() {
            Some('"' | '\'') => Ok(Value::Str(self.string()?)),
            Some('[') => {
                self.next();
                let mut items = Vec::new();
                loop {
                    self.skip_blank(true);
                    match self.peek() {
                        Some(']') => {
                            self.next();
                            return Ok(Value::List(items));
                        }
                        Some('"' | '\'') => items.push(self.string()?),
                        Some(c) => {
                            return Err(self.err(format!(
                                "expected a quoted string in the list, found `{c}`"
                            )));
                        }
                        None => return Err(self.err("unterminated list".into())),
                    }
                    self.skip_blank(true);
                    match self.peek() {
                        Some(',') => {
                            self.next();
                        }
                        Some(']') => {}
                        Some(c) => {
                            return Err(self.err(format!("expected `,` or `]`, found `{c}`")));
                        }
                        None => return Err(self.err("unterminated list".into())),
                    }
                }
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
                    self.pos += 1;
                }
                let text: String = self.chars[start..self.pos].iter().collect();
                text.parse()
                    .map(Value::Int)
                    .map_err(|_| self.err(format!("`{text}` is not a number")))
            }
            Some(c) => Err(self.err(format!("expected a value, found `{c}`"))),
            None => Err(self.err("expected a value, found end of file".into())),
        }
    }
}

/// What to do when a domain powers off, reboots or crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Tear it down.
    #[default]
    Destroy,
    /// Build it again from its configuration.
    Restart,
    /// Keep it (stopped) for inspection until destroyed.
    Preserve,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "destroy" => Ok(Self::Destroy),
            "restart" => Ok(Self::Restart),
            "preserve" => Ok(Self::Preserve),
            other => Err(format!(
                "{other:?} is not an action (destroy, restart, preserve)"
            )),
        }
    }
}

/// A disk from a `disk = [...]` spec.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskSpec {
    /// The image file.
    pub target: PathBuf,
    /// Xen virtual device name (`xvda`).
    pub vdev: String,
    /// Read-only.
    pub readonly: bool,
    /// Create a sparse image of this many bytes if the file does not exist.
    pub size: Option<u64>,
}

impl DiskSpec {
    /// Xen's device number for `xvd<letter>` (202 << 8 | disk << 4): 51712 for xvda.
    pub fn devid(&self) -> u32 {
        let disk = self.vdev.as_bytes()[3] - b'a';
        (202 << 8) | (u32::from(disk) << 4)
    }

    /// Parses one spec: positional `target[,format[,vdev[,access]]]` or `key=value` items
    /// (`target=` last, as in Xen, since a path may contain commas), plus `size=`. `index` picks
    /// the default vdev (xvda, xvdb, ...).
    pub fn parse(spec: &str, index: usize) -> Result<Self, String> {
        let (head, target_kv) = match spec.find("target=") {
            Some(i) => (&spec[..i], Some(spec[i + 7..].to_owned())),
            None => (spec, None),
        };
        let mut target = target_kv;
        let mut vdev = None;
        let mut access = None;
        let mut size = None;
        let mut positional = 0;
        for item in head.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("vdev", v)) => vdev = Some(v.to_owned()),
                Some(("access", v)) => access = Some(v.to_owned()),
                Some(("format", "raw")) => {}
                Some(("format", v)) => return Err(format!("format {v:?}: only raw images")),
                Some(("devtype", "disk")) | Some(("backendtype", "qdisk" | "phy")) => {}
                Some(("size", v)) => size = Some(parse_size(v)?),
                Some((k, _)) => return Err(format!("unknown disk setting {k:?}")),
                None => {
                    match positional {
                        0 => target = Some(item.to_owned()),
                        1 if item == "raw" => {}
                        1 => return Err(format!("format {item:?}: only raw images")),
                        2 => vdev = Some(item.to_owned()),
                        3 => access = Some(item.to_owned()),
                        _ => return Err(format!("unexpected {item:?} after the access mode")),
                    }
                    positional += 1;
                }
            }
        }
        let target = target
            .filter(|t| !t.is_empty())
            .ok_or("a disk needs a target (an image file)")?;
        let vdev = vdev.unwrap_or_else(|| format!("xvd{}", (b'a' + (index as u8 % 26)) as char));
        let ok_vdev =
            vdev.len() == 4 && vdev.starts_with("xvd") && vdev.as_bytes()[3].is_ascii_lowercase();
        if !ok_vdev {
            return Err(format!("vdev {vdev:?}: use xvda .. xvdz"));
        }
        let readonly = match access.as_deref() {
            None | Some("rw" | "w") => false,
            Some("ro" | "r") => true,
            Some(a) => return Err(format!("access {a:?}: use rw or ro")),
        };
        Ok(Self {
            target: PathBuf::from(target),
            vdev,
            readonly,
            size,
        })
    }
}

/// `1G`, `512M`, `4096K`, or bytes.
fn parse_size(v: &str) -> Result<u64, String> {
    let (num, mult) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], 1 << 20),
        Some('G' | 'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&b| b > 0 && b % 512 == 0)
        .ok_or_else(|| format!("size {v:?}: a positive multiple of 512 bytes, like 64M or 1G"))
}

/// A network interface from a `vif = [...]` spec.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VifSpec {
    /// Fixed MAC (generated if absent).
    pub mac: Option<Mac>,
    /// The switch to plug into (`xenbr0` when not given, as in Xen).
    pub bridge: String,
    /// Attach a TAP device to the switch (the host's uplink), named `tap=` or after the switch.
    pub uplink_tap: Option<String>,
    /// The guest's IP address, passed to the guest kernel's network stack.
    pub ip: Option<std::net::Ipv4Addr>,
}

impl VifSpec {
    /// Parses `key=value` items: `mac`, `bridge`, `uplink=tap`, `tap=IFNAME`, `ip`,
    /// `type=vif`/`model=` (accepted, ignored).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut v = VifSpec {
            mac: None,
            bridge: "xenbr0".into(),
            uplink_tap: None,
            ip: None,
        };
        let mut uplink = false;
        let mut tap = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, val) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: vif settings are key=value"))?;
            match k {
                "mac" => {
                    v.mac = Some(
                        val.parse()
                            .map_err(|e: crate::switch::BadMac| e.to_string())?,
                    )
                }
                "bridge" if !val.is_empty() && val.len() < 32 => v.bridge = val.into(),
                "bridge" => return Err(format!("bridge {val:?}: 1 to 31 characters")),
                "uplink" if val == "tap" => uplink = true,
                "uplink" => return Err(format!("uplink {val:?}: only `tap`")),
                "tap" if !val.is_empty() && val.len() < 16 => tap = Some(val.to_owned()),
                "tap" => {
                    return Err(format!(
                        "tap {val:?}: an interface name of 1 to 15 characters"
                    ));
                }
                "ip" => {
                    v.ip = Some(
                        val.parse()
                            .map_err(|_| format!("ip {val:?}: not an IPv4 address"))?,
                    )
                }
                "type" | "model" | "script" => {}
                other => return Err(format!("unknown vif setting {other:?}")),
            }
        }
        if uplink || tap.is_some() {
            v.uplink_tap = Some(tap.unwrap_or_else(|| {
                let mut n = format!("sv{}", v.bridge);
                n.truncate(15);
                n
            }));
        }
        Ok(v)
    }
}

/// Parses a host CPU list as Xen writes them: `1`, `0-3`, `0,2-3` (sorted, without repeats).
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, String> {
    let bad = || format!("CPU list {text:?}: expected numbers and ranges like 0,2-3, or `all`");
    let mut cpus = Vec::new();
    for part in text.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (u32, u32) = (
            lo.trim().parse().map_err(|_| bad())?,
            hi.trim().parse().map_err(|_| bad())?,
        );
        if lo > hi || hi >= 1024 {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// A domain as a configuration file describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainSpec {
    /// Unique name.
    pub name: String,
    /// Memory in MiB.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Host CPUs the vCPUs may run on (all when absent).
    #[serde(default)]
    pub cpus: Option<Vec<u32>>,
    /// Kernel ELF (the project's own guest kernel when absent).
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// On poweroff.
    pub on_poweroff: Action,
    /// On reboot.
    pub on_reboot: Action,
    /// On crash.
    pub on_crash: Action,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Network interfaces (1 to 8).
    pub vifs: Vec<VifSpec>,
}

/// Most vifs per domain.
pub const MAX_VIFS: usize = 8;

impl DomainSpec {
    /// Reads and checks a configuration file; relative image and kernel paths are taken relative
    /// to the file's directory (as xl does with its config dir).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            reason: e.to_string(),
        })?;
        let mut settings = parse_settings(&text, path)?;
        let ov = Path::new("<command line>");
        for (i, o) in overrides.iter().enumerate() {
            let mut s = parse_settings(o, ov).map_err(|e| ConfigError { line: i + 1, ..e })?;
            settings.append(&mut s);
        }
        let mut spec = Self::from_settings(&settings, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for d in &mut spec.disks {
            if d.target.is_relative() {
                d.target = base.join(&d.target);
            }
        }
        if let Some(k) = spec.kernel.as_mut().filter(|k| k.is_relative()) {
            *k = base.join(&*k);
        }
        Ok(spec)
    }

    /// Gives the settings meaning; a later setting of the same key wins (overrides).
    pub fn from_settings(settings: &[Setting], file: &Path) -> Result<Self, ConfigError> {
        let mut spec = DomainSpec {
            name: String::new(),
            memory: 64,
            vcpus: 1,
            cpus: None,
            kernel: None,
            cmdline: String::new(),
            on_poweroff: Action::Destroy,
            on_reboot: Action::Restart,
            on_crash: Action::Destroy,
            disks: Vec::new(),
            vifs: Vec::new(),
        };
        let mut name_line = None;
        for s in settings {
            let err = |reason: String| ConfigError {
                file: file.to_owned(),
                line: s.line,
                reason,
            };
            let want_str = || match &s.value {
                Value::Str(v) => Ok(v.clone()),
                other => Err(err(format!(
                    "`{}` must be a quoted string, not {other}",
                    s.key
                ))),
            };
            let want_int = |lo: u64, hi: u64| match &s.value {
                Value::Int(v) if (lo..=hi).contains(v) => Ok(*v),
                other => Err(err(format!(
                    "`{}` must be a number from {lo} to {hi}, not {other}",
                    s.key
                ))),
            };
            let want_list = || match &s.value {
                Value::List(v) => Ok(v.clone()),
                other => Err(err(format!(
                    "`{}` must be a list like ['...'], not {other}",
                    s.key
                ))),
            };
            match s.key.as_str() {
                "name" => {
                    let n = want_str()?;
                    let ok = !n.is_empty()
                        && n.len() <= 64
                        && n.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                    if !ok {
                        return Err(err(format!(
                            "name {n:?}: 1-64 letters, digits, `-`, `_`, `.`"
                        )));
                    }
                    spec.name = n;
                    name_line = Some(s.line);
                }
                "memory" => spec.memory = want_int(16, 16384)?,
                "vcpus" => spec.vcpus = want_int(1, 32)? as u32,
                "cpus" => {
                    spec.cpus = match want_str()?.as_str() {
                        "all" => None,
                        list => Some(parse_cpu_list(list).map_err(err)?),
                    }
                }
                "kernel" => spec.kernel = Some(PathBuf::from(want_str()?)),
                "cmdline" | "extra" => spec.cmdline = want_str()?,
                "on_poweroff" | "on_reboot" | "on_crash" => {
                    let a: Action = want_str()?.parse().map_err(err)?;
                    match s.key.as_str() {
                        "on_poweroff" => spec.on_poweroff = a,
                        "on_reboot" => spec.on_reboot = a,
                        _ => spec.on_crash = a,
                    }
                }
                "disk" => {
                    spec.disks = want_list()?
                        .iter()
                        .enumerate()
                        .map(|(i, d)| {
                            DiskSpec::parse(d, i).map_err(|r| err(format!("disk {}: {r}", i + 1)))
                        })
                        .collect::<Result<_, _>>()?;
                    let mut seen = std::collections::HashSet::new();
                    if let Some(d) = spec.disks.iter().find(|d| !seen.insert(d.vdev.clone())) {
                        return Err(err(format!("two disks are {}", d.vdev)));
                    }
                }
                "vif" => {
                    let l = want_list()?;
                    if l.len() > MAX_VIFS {
                        return Err(err(format!("{} vifs; at most {MAX_VIFS}", l.len())));
                    }
                    spec.vifs = l
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            VifSpec::parse(v).map_err(|r| err(format!("vif {}: {r}", i + 1)))
                        })
                        .collect::<Result<_, _>>()?;
                }
                // Accepted for compatibility, meaningless here.
                "type" | "builder" => {
                    let _ = want_str()?;
                }
                other => return Err(err(format!("unknown setting `{other}`"))),
            }
        }
        if name_line.is_none() {
            return Err(ConfigError {
                file: file.to_owned(),
                line: settings.last().map_or(1, |s| s.line),
                reason: "no `name`".into(),
            });
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(text: &str) -> Result<DomainSpec, ConfigError> {
        let f = Path::new("t.cfg");
        DomainSpec::from_settings(&parse_settings(text, f)?, f)
    }

    #[test]
    fn cpu_lists_parse_as_xen_writes_them() {
        assert_eq!(parse_cpu_list("0,2-3,2").unwrap(), [0, 2, 3]);
        assert_eq!(parse_cpu_list("1").unwrap(), [1]);
        for bad in ["", "x", "3-1", "0-", "1,,2", "0-4096"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
        assert_eq!(spec("name = \"a\"\ncpus = \"all\"\n").unwrap().cpus, None);
        let e = spec("name = \"a\"\ncpus = \"2-1\"\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.reason.contains("CPU list \"2-1\""), "{e}");
    }

    #[test]
    fn a_full_file_parses() {
        let s = spec(
            r#"
# A demo domain
name = "demo"
memory = 128
vcpus = 2
cpus = "1,0"
extra = "blkverify"   # the job
on_crash = 'restart'
disk = [ 'vdev=xvda,access=rw,size=1G,target=/tmp/a,b.img',
         'b.img,raw,xvdb,ro' ]
vif = [ 'mac=02:53:00:00:00:01,bridge=br0,ip=10.0.0.2', 'bridge=lan,uplink=tap' ]
"#,
        )
        .unwrap();
        assert_eq!(s.name, "demo");
        assert_eq!((s.memory, s.vcpus), (128, 2));
        assert_eq!(s.cpus, Some(vec![0, 1]));
        assert_eq!(s.cmdline, "blkverify");
        assert_eq!(s.on_crash, Action::Restart);
        assert_eq!(s.on_reboot, Action::Restart);
        assert_eq!(s.disks[0].target, PathBuf::from("/tmp/a,b.img"));
        assert_eq!((s.disks[0].devid(), s.disks[0].readonly), (51712, false));
        assert_eq!(s.disks[0].size, Some(1 << 30));
        assert_eq!(
            (s.disks[1].vdev.as_str(), s.disks[1].readonly),
            ("xvdb", true)
        );
        assert_eq!(s.disks[1].devid(), 51728);
        assert_eq!(s.vifs[0].mac.unwrap().to_string(), "02:53:00:00:00:01");
        assert_eq!(s.vifs[0].ip, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(s.vifs[1].bridge, "lan");
        assert_eq!(s.vifs[1].uplink_tap.as_deref(), Some("svlan"));
    }

    #[test]
    fn errors_name_the_line_and_the_reason() {
        let cases = [
            ("name = \"x\"\nbogus = 1\n", 2, "unknown setting `bogus`"),
            ("name = \"x\"\nmemory = \"lots\"\n", 2, "must be a number"),
            ("name = \"x\"\n\nmemory = 1\n", 3, "from 16 to 16384"),
            (
                "name = \"x\"\ndisk = [ 'a.img,qcow2' ]\n",
                2,
                "only raw images",
            ),
            (
                "name = \"x\"\ndisk = [ 'a.img,raw,xvda,rw', 'b.img,raw,xvda' ]\n",
                2,
                "two disks are xvda",
            ),
            (
                "name = \"x\"\nvif = [ 'mac=nope' ]\n",
                2,
                "not a MAC address",
            ),
            ("name = \"x\"\nvif = [ 'bridge' ]\n", 2, "key=value"),
            ("name = \"x\"\non_crash = \"reboot\"\n", 2, "not an action"),
            ("name = \"x\nmemory = 5\n", 1, "unterminated string"),
            ("name = \"x\"\ndisk = [ 'a.img'\n", 3, "unterminated list"),
            ("memory = 64\n", 1, "no `name`"),
            ("name = \"x\" memory = 64\n", 1, "unexpected `m`"),
            ("= 3\n", 1, "expected a setting name"),
            ("name = 'a b'\n", 1, "letters, digits"),
        ];
        for (text, line, why) in cases {
            let e = spec(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.reason.contains(why), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("t.cfg:{line}: ")), "{e}");
        }
    }

    #[test]
    fn overrides_win_and_paths_are_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("sv-xlcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.cfg");
        std::fs::write(&f, "name = 'd'\nmemory = 64\ndisk = ['x.img']\n").unwrap();
        let s = DomainSpec::load(&f, &["memory=256".into(), "extra='ticker'".into()]).unwrap();
        assert_eq!(s.memory, 256);
        assert_eq!(s.cmdline, "ticker");
        assert_eq!(s.disks[0].target, dir.join("x.img"));
        let e = DomainSpec::load(&f, &["memory=oops".into()]).unwrap_err();
        assert_eq!(e.file, PathBuf::from("<command line>"));
        let e = DomainSpec::load(&dir.join("missing.cfg"), &[]).unwrap_err();
        assert!(e.to_string().contains("missing.cfg"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        /// Any text: an answer, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = spec(&text);
        }

        #[test]
        fn disk_and_vif_specs_never_panic(s in "[a-z=,./:0-9]{0,60}") {
            let _ = DiskSpec::parse(&s, 0);
            let _ = VifSpec::parse(&s);
        }
    }
}
