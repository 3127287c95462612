//! Domain configuration files in Xen's `xl.cfg` syntax (a subset).
//!
//! A file is a list of `KEY = VALUE` settings, one per line (a list may span lines), `#` starts a
//! comment. Values are strings in single or double quotes, integers, or lists of strings in
//! brackets. Known keys: `name`, `memory` (MiB), `maxmem` (MiB the domain may balloon up to, at
//! least `memory`), `vcpus`, `cpus` (host CPUs the vCPUs may run
//! on: `"0-1,3"` or `"all"`), `kernel`, `cmdline` (or `extra`),
//! `on_poweroff` / `on_reboot` / `on_crash` (`destroy` | `restart` | `preserve`), `disk` and `vif`
//! (lists of device specs, as in xl-disk-configuration(5) and xl-network-configuration(5)).
//! Anything else, and any malformed value, is refused with the file, the line and the reason.
//!
//! The same types travel to the daemon on the control socket, whose clients are not trusted:
//! every invariant is checked when a value is built, whether from a file or from JSON (the
//! checked newtypes [`DomainName`], [`Vdev`], [`HostPath`], [`Label`] and [`Cmdline`], and
//! `deserialize_with` checks on the numeric and list fields). A [`DomainSpec`] that exists is a
//! valid one, however it arrived.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::mac::Mac;

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

/// A domain's name: 1 to 64 ASCII letters, digits, `-`, `_` and `.`, and not a number (so it is
/// never taken for a domain id).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct DomainName(String);

impl DomainName {
    /// Longest name.
    pub const MAX: usize = 64;

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DomainName {
    type Error = String;
    fn try_from(n: String) -> Result<Self, String> {
        let ok = !n.is_empty()
            && n.len() <= Self::MAX
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && n.parse::<u64>().is_err();
        if ok {
            Ok(Self(n))
        } else {
            Err(format!(
                "name {:?}: 1-{} letters, digits, `-`, `_`, `.`, not only digits",
                Shown(&n),
                Self::MAX
            ))
        }
    }
}

impl std::str::FromStr for DomainName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::try_from(s.to_owned())
    }
}

impl From<DomainName> for String {
    fn from(n: DomainName) -> String {
        n.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for DomainName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// At most the first 64 characters of an outside string, for error messages (a client's 1 MiB
/// field is not echoed back whole): `{}` shows them as they are, `{:?}` quoted and escaped.
pub struct Shown<'a>(pub &'a str);

impl Shown<'_> {
    /// The part shown, and whether some was left out.
    fn cut(&self) -> (&str, bool) {
        match self.0.char_indices().nth(64) {
            Some((i, _)) => (&self.0[..i], true),
            None => (self.0, false),
        }
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, more) = self.cut();
        write!(f, "{s}{}", if more { "..." } else { "" })
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, more) = self.cut();
        write!(f, "{s:?}{}", if more { "..." } else { "" })
    }
}

/// A Xen virtual disk name, `xvda` to `xvdz`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Vdev(u8);

impl Vdev {
    /// Disks a domain can have.
    pub const COUNT: usize = 26;

    /// The `index`th disk (`xvda` is 0), if there is one.
    pub fn from_index(index: usize) -> Option<Self> {
        u8::try_from(index)
            .ok()
            .filter(|&i| usize::from(i) < Self::COUNT)
            .map(Self)
    }

    /// Xen's device number (202 << 8 | disk << 4): 51712 for xvda.
    pub fn devid(self) -> u32 {
        (202 << 8) | (u32::from(self.0) << 4)
    }
}

impl std::str::FromStr for Vdev {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.as_bytes() {
            [b'x', b'v', b'd', c @ b'a'..=b'z'] => Ok(Self(c - b'a')),
            _ => Err(format!("vdev {:?}: use xvda .. xvdz", Shown(s))),
        }
    }
}

impl TryFrom<String> for Vdev {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Vdev> for String {
    fn from(v: Vdev) -> String {
        v.to_string()
    }
}

impl fmt::Display for Vdev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "xvd{}", char::from(b'a' + self.0))
    }
}

/// A path on the host the daemon opens (a disk image, a kernel): absolute (the daemon's working
/// directory is not the client's), at most 4095 bytes, without NUL bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "PathBuf", into = "PathBuf")]
pub struct HostPath(PathBuf);

impl HostPath {
    /// Longest path (PATH_MAX less the NUL).
    pub const MAX: usize = 4095;

    /// `path`, taken relative to `base` when it is relative (and `base` is given).
    pub fn new(path: &Path, base: Option<&Path>) -> Result<Self, String> {
        match base {
            Some(b) if path.is_relative() => Self::try_from(b.join(path)),
            _ => Self::try_from(path.to_owned()),
        }
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for HostPath {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl TryFrom<PathBuf> for HostPath {
    type Error = String;
    fn try_from(p: PathBuf) -> Result<Self, String> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = p.as_os_str().as_bytes();
        if bytes.len() > Self::MAX || bytes.contains(&0) {
            return Err(format!(
                "path {:?}: at most {} bytes, no NUL",
                Shown(&p.to_string_lossy()),
                Self::MAX
            ));
        }
        if !p.is_absolute() {
            return Err(format!(
                "path {:?}: must be absolute",
                Shown(&p.to_string_lossy())
            ));
        }
        Ok(Self(p))
    }
}

impl From<HostPath> for PathBuf {
    fn from(p: HostPath) -> PathBuf {
        p.0
    }
}

/// A switch or interface name of 1 to `MAX` ASCII letters, digits, `-`, `_` and `.` (not `.` or
/// `..`): what Linux accepts as an interface name, and safe in the store and in logs.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Label<const MAX: usize>(String);

/// A virtual switch's name (`bridge=`).
pub type SwitchName = Label<31>;
/// A host network interface's name (`tap=`; Linux's IFNAMSIZ less the NUL).
pub type IfName = Label<15>;

impl<const MAX: usize> Label<MAX> {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> TryFrom<String> for Label<MAX> {
    type Error = String;
    fn try_from(n: String) -> Result<Self, String> {
        let ok = !n.is_empty()
            && n.len() <= MAX
            && n != "."
            && n != ".."
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if ok {
            Ok(Self(n))
        } else {
            Err(format!(
                "{:?}: 1 to {MAX} letters, digits, `-`, `_`, `.`",
                Shown(&n)
            ))
        }
    }
}

impl<const MAX: usize> std::str::FromStr for Label<MAX> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::try_from(s.to_owned())
    }
}

impl<const MAX: usize> From<Label<MAX>> for String {
    fn from(n: Label<MAX>) -> String {
        n.0
    }
}

impl<const MAX: usize> fmt::Display for Label<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A guest command line: fits the start-info page (less room for the ` ip=` the daemon may
/// add), printable ASCII and spaces.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cmdline(String);

impl Cmdline {
    /// Longest command line in a domain file (start-info holds 1023 bytes; ` ip=` and an
    /// address take at most 19).
    pub const MAX: usize = pv_protocol::start_info::CMDLINE_MAX - 32;

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Cmdline {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.len() > Self::MAX || !s.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(format!(
                "command line {:?}: at most {} printable ASCII characters",
                Shown(&s),
                Self::MAX
            ));
        }
        Ok(Self(s))
    }
}

impl From<Cmdline> for String {
    fn from(c: Cmdline) -> String {
        c.0
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
    pub target: HostPath,
    /// Xen virtual device name (`xvda`).
    pub vdev: Vdev,
    /// Read-only.
    pub readonly: bool,
    /// Create a sparse image of this many bytes if the file does not exist.
    #[serde(deserialize_with = "de_size")]
    pub size: Option<u64>,
}

/// Largest image `size=` creates: 1 PiB.
pub const MAX_IMAGE_BYTES: u64 = 1 << 50;

fn check_size(b: u64) -> Result<u64, String> {
    if b > 0 && b.is_multiple_of(512) && b <= MAX_IMAGE_BYTES {
        Ok(b)
    } else {
        Err(format!(
            "size {b}: a positive multiple of 512 bytes up to 1P, like 64M or 1G"
        ))
    }
}

fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize;
    Option::<u64>::deserialize(d)?
        .map(check_size)
        .transpose()
        .map_err(serde::de::Error::custom)
}

impl DiskSpec {
    /// Xen's device number for the vdev.
    pub fn devid(&self) -> u32 {
        self.vdev.devid()
    }

    /// Parses one spec: positional `target[,format[,vdev[,access]]]` or `key=value` items
    /// (`target=` last, as in Xen, since a path may contain commas), plus `size=`. `index` picks
    /// the default vdev (xvda, xvdb, ...). A relative target is taken relative to `base`, and
    /// refused without one.
    pub fn parse(spec: &str, index: usize, base: Option<&Path>) -> Result<Self, String> {
        let (head, target_kv) = match spec.find("target=") {
            Some(i) => (&spec[..i], Some(&spec[i + "target=".len()..])),
            None => (spec, None),
        };
        let mut target = target_kv;
        let mut vdev = None;
        let mut access = None;
        let mut size = None;
        let mut positional = 0;
        for item in head.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("vdev", v)) => vdev = Some(v),
                Some(("access", v)) => access = Some(v),
                Some(("format", "raw")) => {}
                Some(("format", v)) => {
                    return Err(format!("format {:?}: only raw images", Shown(v)));
                }
                Some(("devtype", "disk")) | Some(("backendtype", "qdisk" | "phy")) => {}
                Some(("size", v)) => size = Some(parse_size(v)?),
                Some((k, _)) => return Err(format!("unknown disk setting {:?}", Shown(k))),
                None => {
                    match positional {
                        0 => target = Some(item),
                        1 if item == "raw" => {}
                        1 => return Err(format!("format {:?}: only raw images", Shown(item))),
                        2 => vdev = Some(item),
                        3 => access = Some(item),
                        _ => {
                            return Err(format!(
                                "unexpected {:?} after the access mode",
                                Shown(item)
                            ));
                        }
                    }
                    positional += 1;
                }
            }
        }
        let target = target
            .filter(|t| !t.is_empty())
            .ok_or("a disk needs a target (an image file)")?;
        let target = HostPath::new(Path::new(target), base)?;
        let vdev = match vdev {
            Some(v) => v.parse()?,
            None => Vdev::from_index(index).ok_or(format!(
                "disk {}: a domain has at most {} disks",
                index + 1,
                Vdev::COUNT
            ))?,
        };
        let readonly = match access {
            None | Some("rw" | "w") => false,
            Some("ro" | "r") => true,
            Some(a) => return Err(format!("access {:?}: use rw or ro", Shown(a))),
        };
        Ok(Self {
            target,
            vdev,
            readonly,
            size,
        })
    }
}

/// `1G`, `512M`, `4096K`, `1T`, or bytes.
fn parse_size(v: &str) -> Result<u64, String> {
    let (num, shift) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 30),
        Some(b'T' | b't') => (&v[..v.len() - 1], 40),
        Some(b'P' | b'p') => (&v[..v.len() - 1], 50),
        _ => (v, 0),
    };
    let bad = || {
        format!(
            "size {:?}: a positive multiple of 512 bytes up to 1P, like 64M or 1G",
            Shown(v)
        )
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift)
        .ok_or_else(bad)
        .and_then(|b| check_size(b).map_err(|_| bad()))
}

/// A network interface from a `vif = [...]` spec.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VifSpec {
    /// Fixed MAC (generated if absent): a unicast address, not all zeros.
    #[serde(deserialize_with = "de_mac")]
    pub mac: Option<Mac>,
    /// The switch to plug into (`xenbr0` when not given, as in Xen).
    pub bridge: SwitchName,
    /// Attach a TAP device to the switch (the host's uplink), named `tap=` or after the switch.
    pub uplink_tap: Option<IfName>,
    /// The guest's IP address, passed to the guest kernel's network stack.
    pub ip: Option<std::net::Ipv4Addr>,
}

fn check_mac(m: Mac) -> Result<Mac, String> {
    if m.is_multicast() || m.0 == [0; 6] {
        Err(format!("mac {m}: a vif needs a unicast address"))
    } else {
        Ok(m)
    }
}

fn de_mac<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Mac>, D::Error> {
    use serde::Deserialize;
    Option::<Mac>::deserialize(d)?
        .map(check_mac)
        .transpose()
        .map_err(serde::de::Error::custom)
}

impl VifSpec {
    /// Parses `key=value` items: `mac`, `bridge`, `uplink=tap`, `tap=IFNAME`, `ip`,
    /// `type=vif`/`model=` (accepted, ignored).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut mac = None;
        let mut bridge: Option<SwitchName> = None;
        let mut ip = None;
        let mut uplink = false;
        let mut tap: Option<IfName> = None;
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, val) = item
                .split_once('=')
                .ok_or_else(|| format!("{:?}: vif settings are key=value", Shown(item)))?;
            match k {
                "mac" => {
                    let m = val.parse().map_err(|e: crate::mac::BadMac| e.to_string())?;
                    mac = Some(check_mac(m)?);
                }
                "bridge" => bridge = Some(val.parse().map_err(|e| format!("bridge {e}"))?),
                "uplink" if val == "tap" => uplink = true,
                "uplink" => return Err(format!("uplink {:?}: only `tap`", Shown(val))),
                "tap" => tap = Some(val.parse().map_err(|e| format!("tap {e}"))?),
                "ip" => {
                    ip = Some(
                        val.parse()
                            .map_err(|_| format!("ip {:?}: not an IPv4 address", Shown(val)))?,
                    )
                }
                "type" | "model" | "script" => {}
                other => return Err(format!("unknown vif setting {:?}", Shown(other))),
            }
        }
        let bridge = match bridge {
            Some(b) => b,
            None => "xenbr0".parse()?,
        };
        let uplink_tap = match tap {
            Some(t) => Some(t),
            None if uplink => {
                // `sv` + the switch's name, cut to an interface name's length (ASCII: cut
                // anywhere).
                let mut n = format!("sv{bridge}");
                n.truncate(15);
                Some(n.parse()?)
            }
            None => None,
        };
        Ok(Self {
            mac,
            bridge,
            uplink_tap,
            ip,
        })
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

/// A domain as a configuration file describes it. Deserialized through `SpecFields`, which
/// checks each field, and then how they fit together (`maxmem` at least `memory`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "SpecFields")]
pub struct DomainSpec {
    /// Unique name.
    pub name: DomainName,
    /// Memory in MiB (at boot).
    pub memory: u64,
    /// Most memory in MiB the domain may balloon up to (Xen's `maxmem`; `memory` when absent).
    pub maxmem: Option<u64>,
    /// vCPUs.
    pub vcpus: u32,
    /// Host CPUs the vCPUs may run on (all when absent).
    pub cpus: Option<Vec<u32>>,
    /// Kernel ELF (the project's own guest kernel when absent).
    pub kernel: Option<HostPath>,
    /// Kernel command line.
    pub cmdline: Cmdline,
    /// On poweroff.
    pub on_poweroff: Action,
    /// On reboot.
    pub on_reboot: Action,
    /// On crash.
    pub on_crash: Action,
    /// Disks (at most one per vdev).
    pub disks: Vec<DiskSpec>,
    /// Network interfaces (1 to 8).
    pub vifs: Vec<VifSpec>,
}

/// A [`DomainSpec`]'s fields as they arrive from a client, each checked on its own.
#[derive(serde::Deserialize)]
struct SpecFields {
    name: DomainName,
    #[serde(deserialize_with = "de_memory")]
    memory: u64,
    #[serde(default, deserialize_with = "de_maxmem")]
    maxmem: Option<u64>,
    #[serde(deserialize_with = "de_vcpus")]
    vcpus: u32,
    #[serde(default, deserialize_with = "de_cpus")]
    cpus: Option<Vec<u32>>,
    kernel: Option<HostPath>,
    cmdline: Cmdline,
    on_poweroff: Action,
    on_reboot: Action,
    on_crash: Action,
    #[serde(deserialize_with = "de_disks")]
    disks: Vec<DiskSpec>,
    #[serde(deserialize_with = "de_vifs")]
    vifs: Vec<VifSpec>,
}

impl TryFrom<SpecFields> for DomainSpec {
    type Error = String;
    fn try_from(f: SpecFields) -> Result<Self, String> {
        check_maxmem(f.memory, f.maxmem)?;
        Ok(DomainSpec {
            name: f.name,
            memory: f.memory,
            maxmem: f.maxmem,
            vcpus: f.vcpus,
            cpus: f.cpus,
            kernel: f.kernel,
            cmdline: f.cmdline,
            on_poweroff: f.on_poweroff,
            on_reboot: f.on_reboot,
            on_crash: f.on_crash,
            disks: f.disks,
            vifs: f.vifs,
        })
    }
}

impl DomainSpec {
    /// The most memory in MiB the domain may hold: `maxmem`, else `memory`.
    pub fn max_memory(&self) -> u64 {
        self.maxmem.unwrap_or(self.memory)
    }
}

/// Most vifs per domain.
pub const MAX_VIFS: usize = 8;
/// Memory a domain may have, MiB: from the guest kernel's real minimum (its image, boot stacks
/// for every vCPU and the free memory the boot ABI promises it; the hypervisor refuses less too,
/// and checks each kernel image) up.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = pv_protocol::start_info::MIN_MEM_MIB..=16384;
/// vCPUs a domain may have.
pub const VCPUS: std::ops::RangeInclusive<u64> = 1..=32;
/// Host CPU numbers a CPU list may name (0 to this, exclusive).
pub const MAX_CPU: u32 = 1024;

/// Deserializes a `T` and checks it with `check` (the same check a domain file gets).
fn checked<'de, D, T>(d: D, check: impl FnOnce(&T) -> Result<(), String>) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    let v = T::deserialize(d)?;
    check(&v).map_err(serde::de::Error::custom)?;
    Ok(v)
}

fn check_range(what: &str, v: u64, r: &std::ops::RangeInclusive<u64>) -> Result<(), String> {
    if r.contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "`{what}` must be a number from {} to {}, not {v}",
            r.start(),
            r.end()
        ))
    }
}

/// `memory`'s check: in [`MEMORY_MIB`], saying why when below.
fn check_memory(m: u64) -> Result<(), String> {
    if m < *MEMORY_MIB.start() {
        return Err(format!(
            "`memory` = {m} is below {} MiB, the least the guest kernel runs in",
            MEMORY_MIB.start()
        ));
    }
    check_range("memory", m, &MEMORY_MIB)
}

fn de_memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    checked(d, |&m: &u64| check_memory(m))
}

fn de_maxmem<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    checked(d, |m: &Option<u64>| {
        m.map_or(Ok(()), |m| check_range("maxmem", m, &MEMORY_MIB))
    })
}

/// `maxmem`, when set, is at least `memory` (Xen refuses less too).
fn check_maxmem(memory: u64, maxmem: Option<u64>) -> Result<(), String> {
    match maxmem {
        Some(m) if m < memory => Err(format!(
            "`maxmem` ({m} MiB) must be at least `memory` ({memory} MiB)"
        )),
        _ => Ok(()),
    }
}

fn de_vcpus<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    checked(d, |&v: &u32| check_range("vcpus", v.into(), &VCPUS))
}

fn check_cpus(cpus: &[u32]) -> Result<(), String> {
    let sorted = cpus.windows(2).all(|w| w[0] < w[1]);
    if cpus.is_empty() || !sorted || cpus.iter().any(|&c| c >= MAX_CPU) {
        return Err(format!(
            "CPU list: sorted, distinct CPU numbers below {MAX_CPU}, at least one"
        ));
    }
    Ok(())
}

/// A CPU list field: sorted, distinct, each below [`MAX_CPU`] (what [`parse_cpu_list`] gives).
pub(crate) fn de_cpus<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<u32>>, D::Error> {
    checked(d, |c: &Option<Vec<u32>>| {
        c.as_deref().map_or(Ok(()), check_cpus)
    })
}

fn check_disks(disks: &[DiskSpec]) -> Result<(), String> {
    let mut seen = [false; Vdev::COUNT];
    for d in disks {
        let slot = &mut seen[usize::from(d.vdev.0)];
        if std::mem::replace(slot, true) {
            return Err(format!("two disks are {}", d.vdev));
        }
    }
    Ok(())
}

fn de_disks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DiskSpec>, D::Error> {
    checked(d, |v: &Vec<DiskSpec>| check_disks(v))
}

fn check_vifs(vifs: &[VifSpec]) -> Result<(), String> {
    if vifs.len() > MAX_VIFS {
        return Err(format!("{} vifs; at most {MAX_VIFS}", vifs.len()));
    }
    Ok(())
}

fn de_vifs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<VifSpec>, D::Error> {
    checked(d, |v: &Vec<VifSpec>| check_vifs(v))
}

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
        // The daemon needs absolute paths; a relative one is relative to the file's directory.
        // (A bare file name's parent is "", which `absolute` refuses: that is ".".)
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            reason: format!("its directory: {e}"),
        })?;
        Self::from_settings(&settings, path, Some(&base))
    }

    /// Gives the settings meaning; a later setting of the same key wins (overrides). Relative
    /// paths are taken relative to `base`, and refused without one.
    pub fn from_settings(
        settings: &[Setting],
        file: &Path,
        base: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let mut spec = DomainSpec {
            name: DomainName(String::new()),
            memory: 64,
            maxmem: None,
            vcpus: 1,
            cpus: None,
            kernel: None,
            cmdline: Cmdline::default(),
            on_poweroff: Action::Destroy,
            on_reboot: Action::Restart,
            on_crash: Action::Destroy,
            disks: Vec::new(),
            vifs: Vec::new(),
        };
        let mut name_line = None;
        let mut maxmem_line = None;
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
            let want_int = |r: &std::ops::RangeInclusive<u64>| match &s.value {
                Value::Int(v) => check_range(&s.key, *v, r).map(|()| *v).map_err(err),
                other => Err(err(format!(
                    "`{}` must be a number from {} to {}, not {other}",
                    s.key,
                    r.start(),
                    r.end()
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
                    spec.name = want_str()?.try_into().map_err(err)?;
                    name_line = Some(s.line);
                }
                "memory" => {
                    let m = want_int(&(0..=u64::MAX))?;
                    check_memory(m).map_err(err)?;
                    spec.memory = m;
                }
                "maxmem" => {
                    spec.maxmem = Some(want_int(&MEMORY_MIB)?);
                    maxmem_line = Some(s.line);
                }
                "vcpus" => spec.vcpus = want_int(&VCPUS)? as u32,
                "cpus" => {
                    spec.cpus = match want_str()?.as_str() {
                        "all" => None,
                        list => Some(parse_cpu_list(list).map_err(err)?),
                    }
                }
                "kernel" => {
                    spec.kernel = Some(HostPath::new(Path::new(&want_str()?), base).map_err(err)?)
                }
                "cmdline" | "extra" => spec.cmdline = want_str()?.try_into().map_err(err)?,
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
                            DiskSpec::parse(d, i, base)
                                .map_err(|r| err(format!("disk {}: {r}", i + 1)))
                        })
                        .collect::<Result<_, _>>()?;
                    check_disks(&spec.disks).map_err(err)?;
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
                other => return Err(err(format!("unknown setting `{}`", Shown(other)))),
            }
        }
        if let (Some(line), Err(reason)) = (maxmem_line, check_maxmem(spec.memory, spec.maxmem)) {
            return Err(ConfigError {
                file: file.to_owned(),
                line,
                reason,
            });
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
        DomainSpec::from_settings(&parse_settings(text, f)?, f, Some(Path::new("/cfg")))
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
        assert_eq!(s.name.as_str(), "demo");
        assert_eq!((s.memory, s.vcpus), (128, 2));
        assert_eq!(s.cpus, Some(vec![0, 1]));
        assert_eq!(s.cmdline.as_str(), "blkverify");
        assert_eq!(s.on_crash, Action::Restart);
        assert_eq!(s.on_reboot, Action::Restart);
        assert_eq!(s.disks[0].target.as_path(), Path::new("/tmp/a,b.img"));
        assert_eq!(s.disks[1].target.as_path(), Path::new("/cfg/b.img"));
        assert_eq!((s.disks[0].devid(), s.disks[0].readonly), (51712, false));
        assert_eq!(s.disks[0].size, Some(1 << 30));
        assert_eq!(
            (s.disks[1].vdev.to_string().as_str(), s.disks[1].readonly),
            ("xvdb", true)
        );
        assert_eq!(s.disks[1].devid(), 51728);
        assert_eq!(s.vifs[0].mac.unwrap().to_string(), "02:53:00:00:00:01");
        assert_eq!(s.vifs[0].ip, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(s.vifs[1].bridge.as_str(), "lan");
        assert_eq!(
            s.vifs[1].uplink_tap.as_ref().map(IfName::as_str),
            Some("svlan")
        );
    }

    #[test]
    fn errors_name_the_line_and_the_reason() {
        let cases = [
            ("name = \"x\"\nbogus = 1\n", 2, "unknown setting `bogus`"),
            ("name = \"x\"\nmemory = \"lots\"\n", 2, "must be a number"),
            (
                "name = \"x\"\n\nmemory = 8\n",
                3,
                "`memory` = 8 is below 9 MiB, the least the guest kernel runs in",
            ),
            ("name = \"x\"\nmemory = 16385\n", 2, "from 9 to 16384"),
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
            (
                "name = \"x\"\nmaxmem = 32\nmemory = 64\n",
                2,
                "`maxmem` (32 MiB) must be at least `memory` (64 MiB)",
            ),
            ("name = \"x\"\nmaxmem = 8\n", 2, "from 9 to 16384"),
            ("name = \"x\"\nmaxmem = \"1G\"\n", 2, "must be a number"),
        ];
        for (text, line, why) in cases {
            let e = spec(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.reason.contains(why), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("t.cfg:{line}: ")), "{e}");
        }
    }

    #[test]
    fn memory_goes_down_to_the_guest_kernels_real_minimum_and_no_further() {
        let min = pv_protocol::start_info::MIN_MEM_MIB;
        let s = spec(&format!("name = 'x'\nmemory = {min}\n")).unwrap();
        assert_eq!(s.memory, min);
        let e = spec(&format!("name = 'x'\nmemory = {}\n", min - 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "t.cfg:2: `memory` = {} is below {min} MiB, the least the guest kernel runs in",
                min - 1
            )
        );
        // The daemon checks a spec that did not come from a file the same way.
        let mut json = serde_json::to_value(&s).unwrap();
        json["memory"] = (min - 1).into();
        let e = serde_json::from_value::<DomainSpec>(json).unwrap_err();
        assert!(
            e.to_string().contains("the least the guest kernel runs in"),
            "{e}"
        );
    }

    #[test]
    fn maxmem_is_optional_and_at_least_memory() {
        let s = spec("name = \"x\"\nmemory = 64\n").unwrap();
        assert_eq!((s.maxmem, s.max_memory()), (None, 64));
        let s = spec("name = \"x\"\nmaxmem = 128\nmemory = 64\n").unwrap();
        assert_eq!((s.maxmem, s.max_memory()), (Some(128), 128));
        assert!(spec("name = \"x\"\nmaxmem = 64\n").is_ok(), "equal is fine");
        // The same check holds for a spec that arrives as JSON.
        let mut v = serde_json::to_value(&s).unwrap();
        v["maxmem"] = serde_json::json!(32);
        let e = serde_json::from_value::<DomainSpec>(v.clone()).unwrap_err();
        assert!(e.to_string().contains("must be at least `memory`"), "{e}");
        v["maxmem"] = serde_json::json!(1 << 20);
        assert!(serde_json::from_value::<DomainSpec>(v.clone()).is_err());
        v.as_object_mut().unwrap().remove("maxmem");
        assert_eq!(
            serde_json::from_value::<DomainSpec>(v).unwrap().maxmem,
            None
        );
    }

    #[test]
    fn overrides_win_and_paths_are_relative_to_the_file() {
        let dir = std::env::temp_dir().join(format!("sv-xlcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("d.cfg");
        std::fs::write(&f, "name = 'd'\nmemory = 64\ndisk = ['x.img']\n").unwrap();
        let s = DomainSpec::load(&f, &["memory=256".into(), "extra='ticker'".into()]).unwrap();
        assert_eq!(s.memory, 256);
        assert_eq!(s.cmdline.as_str(), "ticker");
        assert_eq!(s.disks[0].target.as_path(), dir.join("x.img"));
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
            let _ = DiskSpec::parse(&s, 0, Some(Path::new("/b")));
            let _ = DiskSpec::parse(&s, 30, None);
            let _ = VifSpec::parse(&s);
        }
    }
}
