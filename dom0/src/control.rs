//! The dom0 daemon's control protocol, spoken over a Unix socket by `xl` (and anyone else).
//!
//! Version 1. The client sends one request per line, a JSON object with the protocol version
//! and an `op`: `{"v":1,"op":"list"}`. The daemon answers each with one line: `{"ok":VALUE}` or
//! `{"error":"cause: cause: cause"}`. A request with another version is refused with an error
//! naming both versions. After a successful `console` request the connection stops being
//! line-based: the daemon streams the guest's console output (history first) and forwards every
//! byte the client sends to the guest's console input, until either side closes.
//!
//! Ops (fields in parentheses; `dom` is a domain name or id):
//! `hello`, `info`, `list`, `create` (`spec`: a parsed domain file, `paused`), `destroy` (`dom`),
//! `shutdown` (`dom`, `reboot`, `wait`), `pause` / `unpause` (`dom`), `console` (`dom`),
//! `dmesg` (`lines`), `block-attach` (`dom`, `spec`: one disk spec, `base`: the directory a
//! relative target is relative to), `block-detach` (`dom`,
//! `vdev`), `block-list` (`dom`), `network-attach` (`dom`, `spec`: one vif spec),
//! `network-detach` (`dom`, `devid`), `network-list` (`dom`), `top`, `status` (`dom`: also a
//! domain that ended recently: `{"live":false,"shutdown_code":0,"crashed":false,...}`),
//! `vcpu-list` (`dom`, optional: all domains), `vcpu-pin` (`dom`, `vcpu`: an index or null for
//! all, `cpus`: host CPU numbers or null for all), `mem-set` (`dom`, `mib`: the balloon's new
//! target, 1 MiB up to the domain's `maxmem`).
//!
//! Clients are not trusted: a request line is at most [`MAX_REQUEST`] bytes, and every field is
//! checked as it is parsed ([`parse_request`]): a [`DomainSpec`] or a [`DomRef`] that exists is a
//! valid one (see [`crate::xlcfg`]). A request that does not parse gets `{"error":...}`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::xlcfg::{DomainName, DomainSpec, HostPath, Shown, Vdev};

/// Longest request line, newline included. A longer one is answered with an error and the
/// connection is closed.
pub const MAX_REQUEST: usize = 1 << 20;

/// Longest device spec in `block-attach` / `network-attach`: a path plus a few settings.
pub const MAX_DEVICE_SPEC: usize = 8192;

/// A request that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, an unknown op, or a field out of its bounds.
    #[error("bad request")]
    Malformed(#[source] serde_json::Error),
    /// Another protocol version.
    #[error("protocol version {0} requested; this daemon speaks {PROTOCOL_VERSION}")]
    Version(u32),
}

/// Parses and checks one request line.
pub fn parse_request(line: &[u8]) -> Result<Envelope, RequestError> {
    let env: Envelope = serde_json::from_slice(line).map_err(RequestError::Malformed)?;
    if env.v != PROTOCOL_VERSION {
        return Err(RequestError::Version(env.v));
    }
    Ok(env)
}

/// A domain named in a request: its id, or its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DomRef {
    /// A domain id.
    Id(u32),
    /// A domain name.
    Name(DomainName),
}

impl DomRef {
    /// Whether domain `id` called `name` is the one meant.
    pub fn matches(&self, id: u32, name: &DomainName) -> bool {
        match self {
            DomRef::Id(i) => *i == id,
            DomRef::Name(n) => n == name,
        }
    }
}

impl TryFrom<String> for DomRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if let Ok(id) = s.parse() {
            return Ok(DomRef::Id(id));
        }
        DomainName::try_from(s)
            .map(DomRef::Name)
            .map_err(|_| "not a domain name or id".to_string())
    }
}

impl std::str::FromStr for DomRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::try_from(s.to_owned())
    }
}

impl From<DomRef> for String {
    fn from(d: DomRef) -> String {
        d.to_string()
    }
}

impl fmt::Display for DomRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomRef::Id(i) => write!(f, "{i}"),
            DomRef::Name(n) => write!(f, "{n}"),
        }
    }
}

/// A device spec from a client: at most [`MAX_DEVICE_SPEC`] bytes (parsed by the daemon).
fn de_device_spec<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.len() > MAX_DEVICE_SPEC {
        return Err(serde::de::Error::custom(format!(
            "device spec {:?}: longer than {MAX_DEVICE_SPEC} bytes",
            Shown(&s)
        )));
    }
    Ok(s)
}

/// A host CPU list from a client: as in a domain file.
fn de_cpus<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u32>>, D::Error> {
    crate::xlcfg::de_cpus(d)
}

/// A memory target from a client: 1 MiB up to the most a domain file allows (the daemon then
/// checks it against the domain's own `maxmem`).
fn de_target_mib<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let m = u64::deserialize(d)?;
    let max = *crate::xlcfg::MEMORY_MIB.end();
    if !(1..=max).contains(&m) {
        return Err(serde::de::Error::custom(format!(
            "memory target must be 1 to {max} MiB, not {m}"
        )));
    }
    Ok(m)
}

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Socket file in the runtime directory.
pub const SOCKET: &str = "control.sock";
/// Lock file held by the running daemon.
pub const LOCK: &str = "daemon.lock";
/// The daemon's log.
pub const LOG: &str = "daemon.log";

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Version handshake (answered with the daemon's version and pid).
    Hello,
    /// Host facts.
    Info,
    /// Every domain.
    List,
    /// Builds and starts a domain.
    Create {
        /// What to build.
        spec: Box<DomainSpec>,
        /// Leave it paused.
        #[serde(default)]
        paused: bool,
    },
    /// Tears a domain down now.
    Destroy {
        /// Name or id.
        dom: DomRef,
    },
    /// Asks the guest to power off (or reboot).
    Shutdown {
        /// Name or id.
        dom: DomRef,
        /// Reboot instead.
        #[serde(default)]
        reboot: bool,
        /// Answer only once the domain is gone (or restarted).
        #[serde(default)]
        wait: bool,
    },
    /// Pauses the vCPUs.
    Pause {
        /// Name or id.
        dom: DomRef,
    },
    /// Resumes the vCPUs.
    Unpause {
        /// Name or id.
        dom: DomRef,
    },
    /// Attaches to the console (the connection becomes a byte stream).
    Console {
        /// Name or id.
        dom: DomRef,
    },
    /// The last lines of the daemon's log.
    Dmesg {
        /// How many.
        #[serde(default = "default_lines")]
        lines: usize,
    },
    /// Hot-plugs a disk.
    BlockAttach {
        /// Name or id.
        dom: DomRef,
        /// One disk spec, as in a domain file.
        #[serde(deserialize_with = "de_device_spec")]
        spec: String,
        /// The directory a relative target is relative to (the client's; without it a relative
        /// target is refused).
        #[serde(default)]
        base: Option<HostPath>,
    },
    /// Hot-unplugs a disk.
    BlockDetach {
        /// Name or id.
        dom: DomRef,
        /// `xvdb`.
        vdev: Vdev,
    },
    /// A domain's disks.
    BlockList {
        /// Name or id.
        dom: DomRef,
    },
    /// Hot-plugs a network interface.
    NetworkAttach {
        /// Name or id.
        dom: DomRef,
        /// One vif spec, as in a domain file.
        #[serde(deserialize_with = "de_device_spec")]
        spec: String,
    },
    /// Hot-unplugs a network interface.
    NetworkDetach {
        /// Name or id.
        dom: DomRef,
        /// Device id (0..7).
        devid: u32,
    },
    /// A domain's network interfaces.
    NetworkList {
        /// Name or id.
        dom: DomRef,
    },
    /// Per-domain counters (CPU time, block and network I/O).
    Top,
    /// A domain's state, also for a while after it is gone (how it ended).
    Status {
        /// Name or id.
        dom: DomRef,
    },
    /// vCPUs: host CPU, state, time, affinity.
    VcpuList {
        /// Name or id; every domain when absent.
        #[serde(default)]
        dom: Option<DomRef>,
    },
    /// Restricts vCPUs to host CPUs.
    VcpuPin {
        /// Name or id.
        dom: DomRef,
        /// One vCPU, or every one when absent.
        #[serde(default)]
        vcpu: Option<u32>,
        /// Host CPUs; every one when absent.
        #[serde(default, deserialize_with = "de_cpus")]
        cpus: Option<Vec<u32>>,
    },
    /// Sets a domain's memory target (Xen's `xl mem-set`): its balloon gives memory back or takes
    /// it again, up to this.
    MemSet {
        /// Name or id.
        dom: DomRef,
        /// The target, MiB.
        #[serde(deserialize_with = "de_target_mib")]
        mib: u64,
    },
}

fn default_lines() -> usize {
    50
}

/// A request on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version.
    pub v: u32,
    /// The request.
    #[serde(flatten)]
    pub req: Request,
}

/// A reply on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Success, with the op's data.
    Ok(serde_json::Value),
    /// Failure: the cause chain as one line.
    Error(String),
}

/// One row of `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Name.
    pub name: DomainName,
    /// Id.
    pub id: u32,
    /// Memory the domain holds now, MiB (its reservation, rounded down: what it has not given
    /// back; the host's real use is `host_kib` in `top`).
    pub mem: u64,
    /// Its balloon's target, MiB (`memory` until `mem-set`).
    #[serde(default)]
    pub target: u64,
    /// The most it may hold, MiB (`maxmem`, else `memory`).
    #[serde(default)]
    pub maxmem: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// xl's state letters: r(unning) b(locked) p(aused) s(hutdown) c(rashed) d(ying).
    pub state: String,
    /// CPU seconds used.
    pub time: f64,
    /// Detail of a final state (shutdown reason and code, crash registers).
    #[serde(default)]
    pub detail: String,
    /// How many times `on_*=restart` rebuilt it.
    #[serde(default)]
    pub restarts: u32,
    /// Its configuration.
    pub spec: DomainSpec,
}

/// Where the daemon's files live: `$SPLITVISOR_RUNTIME_DIR`, else `/run/splitvisor` for root,
/// else `$XDG_RUNTIME_DIR/splitvisor`, else `/tmp/splitvisor-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPLITVISOR_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/splitvisor");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(x) => Path::new(&x).join("splitvisor"),
        None => PathBuf::from(format!("/tmp/splitvisor-{uid}")),
    }
}

/// A string with a cause chain, as the CLI and the daemon print errors.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_with_their_version() {
        let e = Envelope {
            v: PROTOCOL_VERSION,
            req: Request::Shutdown {
                dom: "web".parse().unwrap(),
                reboot: false,
                wait: true,
            },
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"op":"shutdown","dom":"web","reboot":false,"wait":true}"#
        );
        let back: Envelope = serde_json::from_str(r#"{"v":1,"op":"dmesg"}"#).unwrap();
        assert_eq!(back.req, Request::Dmesg { lines: 50 });
        let r = serde_json::to_string(&Reply::Error("no such domain".into())).unwrap();
        assert_eq!(r, r#"{"error":"no such domain"}"#);
        assert!(serde_json::from_str::<Envelope>(r#"{"v":1,"op":"reformat-disk"}"#).is_err());
    }
}
