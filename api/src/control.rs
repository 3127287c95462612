//! The dom0 daemon's control protocol, spoken over a Unix socket by `xl` (and anyone else).
//!
//! Version 1. The client sends one request per line, a JSON object with the protocol version
//! and an `op`: `{"v":1,"op":"list"}`. The daemon answers each with one line: `{"ok":VALUE}` or
//! `{"error":"cause: cause: cause"}`, where VALUE is the op's reply type ([`Answer`] lists them:
//! [`HelloReply`], [`TopRow`]s, ...). A request with another version is refused with an error
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

use crate::mac::Mac;
use crate::xlcfg::{DomainName, DomainSpec, HostPath, Shown, SwitchName, Vdev};

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

impl Request {
    /// The op's name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Info => "info",
            Request::List => "list",
            Request::Create { .. } => "create",
            Request::Destroy { .. } => "destroy",
            Request::Shutdown { .. } => "shutdown",
            Request::Pause { .. } => "pause",
            Request::Unpause { .. } => "unpause",
            Request::Console { .. } => "console",
            Request::Dmesg { .. } => "dmesg",
            Request::BlockAttach { .. } => "block-attach",
            Request::BlockDetach { .. } => "block-detach",
            Request::BlockList { .. } => "block-list",
            Request::NetworkAttach { .. } => "network-attach",
            Request::NetworkDetach { .. } => "network-detach",
            Request::NetworkList { .. } => "network-list",
            Request::Top => "top",
            Request::Status { .. } => "status",
            Request::VcpuList { .. } => "vcpu-list",
            Request::VcpuPin { .. } => "vcpu-pin",
            Request::MemSet { .. } => "mem-set",
        }
    }
}

/// A reply on the wire: `T` is the op's reply type ([`Answer`] as the daemon sends it), or
/// [`serde_json::Value`] for a client that reads any reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reply<T = serde_json::Value> {
    /// Success, with the op's data.
    Ok(T),
    /// Failure: the cause chain as one line.
    Error(String),
}

/// What the daemon answers an op with: each variant is that op's reply, and is sent as it is
/// (no tag on the wire). Every field of a reply is required, `null` ones too: a client that
/// reads a field the daemon does not send gets an error naming it, never a `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// `hello`.
    Hello(HelloReply),
    /// `info`.
    Info(InfoReply),
    /// `list`.
    List(Vec<DomainInfo>),
    /// `create`.
    Create(CreateReply),
    /// `destroy`, `shutdown`, `pause`, `unpause`, `console`, `vcpu-pin`.
    Done(Done),
    /// `dmesg`: the lines, joined by newlines.
    Dmesg(String),
    /// `block-attach`.
    BlockAttach(BlockAttachReply),
    /// `block-detach`.
    BlockDetach(BlockDetachReply),
    /// `block-list`.
    BlockList(Vec<VbdRow>),
    /// `network-attach`.
    NetworkAttach(NetworkAttachReply),
    /// `network-detach`.
    NetworkDetach(NetworkDetachReply),
    /// `network-list`.
    NetworkList(Vec<VifRow>),
    /// `top`.
    Top(Vec<TopRow>),
    /// `status`.
    Status(StatusReply),
    /// `vcpu-list`.
    VcpuList(Vec<VcpuRow>),
    /// `mem-set`.
    MemSet(MemSetReply),
}

/// The reply to an op that returns nothing but the domain it acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The domain's id.
    pub id: u32,
}

/// The reply to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The daemon's version.
    pub version: String,
    /// The protocol version it speaks.
    pub protocol: u32,
    /// Its process id.
    pub pid: u32,
    /// Its runtime directory.
    pub runtime_dir: PathBuf,
}

/// The reply to `info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoReply {
    /// The host.
    pub host: HostInfo,
    /// How many domains there are.
    pub domains: usize,
    /// The switches' names.
    pub switches: Vec<SwitchName>,
    /// The daemon's version.
    pub splitvisor: String,
    /// The protocol version it speaks.
    pub protocol: u32,
    /// Seconds since it started.
    pub uptime_s: u64,
}

/// The host, in `info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Which KVM.
    pub kvm: String,
    /// Online CPUs (-1 if unknown).
    pub cores: i64,
    /// Total memory, MiB (0 if unknown).
    pub memory_mib: u64,
    /// The kernel's release.
    pub kernel: String,
}

/// The reply to `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateReply {
    /// The new domain's id.
    pub id: u32,
    /// Its name.
    pub name: DomainName,
}

/// The reply to `block-attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockAttachReply {
    /// The domain's id.
    pub id: u32,
    /// The disk's device name.
    pub vdev: Vdev,
    /// Its device id.
    pub devid: u32,
}

/// The reply to `block-detach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDetachReply {
    /// The domain's id.
    pub id: u32,
    /// The disk's device name.
    pub vdev: Vdev,
}

/// One row of `block-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VbdRow {
    /// Device name.
    pub vdev: Vdev,
    /// Device id.
    pub devid: u32,
    /// The image file.
    pub target: HostPath,
    /// Read-only.
    pub readonly: bool,
    /// The back end's XenBus state.
    #[serde(deserialize_with = "Option::deserialize")]
    pub backend_state: Option<u32>,
    /// The front end's XenBus state.
    #[serde(deserialize_with = "Option::deserialize")]
    pub frontend_state: Option<u32>,
    /// Reads served.
    pub reads: u64,
    /// Writes served.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Failed and unsupported requests.
    pub errors: u64,
}

/// The reply to `network-attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachReply {
    /// The domain's id.
    pub id: u32,
    /// The interface's device id.
    pub devid: u32,
    /// Its MAC.
    pub mac: Mac,
}

/// The reply to `network-detach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetachReply {
    /// The domain's id.
    pub id: u32,
    /// The interface's device id.
    pub devid: u32,
}

/// One row of `network-list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VifRow {
    /// Device id.
    pub devid: u32,
    /// MAC.
    pub mac: Mac,
    /// The switch it is plugged into.
    pub bridge: SwitchName,
    /// The back end's XenBus state.
    #[serde(deserialize_with = "Option::deserialize")]
    pub backend_state: Option<u32>,
    /// The front end's XenBus state.
    #[serde(deserialize_with = "Option::deserialize")]
    pub frontend_state: Option<u32>,
    /// Frames the switch port received (the guest sent).
    pub rx_packets: u64,
    /// Frames the switch port sent (to the guest).
    pub tx_packets: u64,
    /// Frames to the guest dropped.
    pub tx_dropped: u64,
    /// Errors.
    pub errors: u64,
}

/// One row of `top`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    /// Name.
    pub name: DomainName,
    /// Id.
    pub id: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory the domain holds, KiB.
    pub mem_kib: u64,
    /// The most it may hold, KiB.
    pub maxmem_kib: u64,
    /// Its balloon's target, KiB.
    pub target_kib: u64,
    /// The host memory it really uses, KiB.
    pub host_kib: u64,
    /// xl's state letter.
    pub state: String,
    /// CPU seconds used.
    pub cpu_s: f64,
    /// Frames the guest received.
    pub net_rx_packets: u64,
    /// Frames the guest sent.
    pub net_tx_packets: u64,
    /// Bytes the guest received.
    pub net_rx_bytes: u64,
    /// Bytes the guest sent.
    pub net_tx_bytes: u64,
    /// Disks.
    pub disks: usize,
    /// Block reads.
    pub vbd_rd: u64,
    /// Block writes.
    pub vbd_wr: u64,
    /// Sectors read.
    pub vbd_rsect: u64,
    /// Sectors written.
    pub vbd_wsect: u64,
    /// Failed and unsupported block requests.
    pub vbd_err: u64,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// Id.
    pub id: u32,
    /// Name.
    pub name: DomainName,
    /// Still there (else it ended recently).
    pub live: bool,
    /// Its state (`Running`, `Shutdown { reason: .., code: .. }`, ...).
    pub state: String,
    /// The guest's exit code, if it shut down.
    #[serde(deserialize_with = "Option::deserialize")]
    pub shutdown_code: Option<u32>,
    /// It crashed.
    pub crashed: bool,
}

/// One row of `vcpu-list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuRow {
    /// The domain's name.
    pub name: DomainName,
    /// The domain's id.
    pub id: u32,
    /// The vCPU's index.
    pub vcpu: u32,
    /// The host CPU it last ran on.
    #[serde(deserialize_with = "Option::deserialize")]
    pub cpu: Option<u32>,
    /// xl's state: `r--`, `-b-`, `--p` or `---`.
    pub state: String,
    /// CPU seconds used.
    pub time_s: f64,
    /// The host CPUs it may run on (all when absent).
    #[serde(deserialize_with = "Option::deserialize")]
    pub affinity: Option<Vec<u32>>,
}

/// The reply to `mem-set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemSetReply {
    /// The domain's id.
    pub id: u32,
    /// Its new target, MiB.
    pub target: u64,
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
        let r = serde_json::to_string(&Reply::<Answer>::Error("no such domain".into())).unwrap();
        assert_eq!(r, r#"{"error":"no such domain"}"#);
        assert!(serde_json::from_str::<Envelope>(r#"{"v":1,"op":"reformat-disk"}"#).is_err());
    }

    fn name(n: &str) -> DomainName {
        DomainName::try_from(n.to_string()).unwrap()
    }

    fn spec() -> DomainSpec {
        let f = Path::new("/cfg/web.cfg");
        let text = "name = \"web\"\nmemory = 96\nvcpus = 2\n\
                    disk = [ '/img/web.img,raw,xvda,rw' ]\nvif = [ 'bridge=br0' ]\n";
        let settings = crate::xlcfg::parse_settings(text, f).unwrap();
        DomainSpec::from_settings(&settings, f, Some(Path::new("/cfg"))).unwrap()
    }

    /// Serializes `reply` as the daemon sends it (inside [`Answer`] and [`Reply`]), reads it back
    /// as a client does, and checks it came back equal; returns the `ok` value's JSON.
    fn round_trip<T>(reply: T, wrap: fn(T) -> Answer) -> String
    where
        T: Serialize + serde::de::DeserializeOwned + PartialEq + fmt::Debug + Clone,
    {
        let text = serde_json::to_string(&Reply::Ok(wrap(reply.clone()))).unwrap();
        let back: Reply<T> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, Reply::Ok(reply.clone()), "{text}");
        serde_json::to_string(&reply).unwrap()
    }

    #[test]
    fn every_reply_round_trips() {
        let mac: Mac = "00:16:3e:00:00:01".parse().unwrap();
        let xvdb = Vdev::from_index(1).unwrap();
        let br: SwitchName = "br0".to_string().try_into().unwrap();
        round_trip(
            HelloReply {
                version: "0.1.0".into(),
                protocol: PROTOCOL_VERSION,
                pid: 42,
                runtime_dir: "/run/splitvisor".into(),
            },
            Answer::Hello,
        );
        round_trip(
            InfoReply {
                host: HostInfo {
                    kvm: "Upstream".into(),
                    cores: 8,
                    memory_mib: 16384,
                    kernel: "6.8.0".into(),
                },
                domains: 3,
                switches: vec![br.clone()],
                splitvisor: "0.1.0".into(),
                protocol: PROTOCOL_VERSION,
                uptime_s: 77,
            },
            Answer::Info,
        );
        round_trip(
            vec![DomainInfo {
                name: name("web"),
                id: 1,
                mem: 95,
                target: 96,
                maxmem: 96,
                vcpus: 2,
                state: "b".into(),
                time: 1.5,
                detail: String::new(),
                restarts: 0,
                spec: spec(),
            }],
            Answer::List,
        );
        round_trip(
            CreateReply {
                id: 1,
                name: name("web"),
            },
            Answer::Create,
        );
        round_trip(Done { id: 1 }, Answer::Done);
        round_trip("a\nb".to_string(), Answer::Dmesg);
        round_trip(
            BlockAttachReply {
                id: 1,
                vdev: xvdb,
                devid: xvdb.devid(),
            },
            Answer::BlockAttach,
        );
        round_trip(BlockDetachReply { id: 1, vdev: xvdb }, Answer::BlockDetach);
        round_trip(
            vec![VbdRow {
                vdev: xvdb,
                devid: xvdb.devid(),
                target: HostPath::new(Path::new("/img/b.img"), None).unwrap(),
                readonly: true,
                backend_state: Some(4),
                frontend_state: None,
                reads: 1,
                writes: 2,
                read_bytes: 512,
                written_bytes: 1024,
                errors: 0,
            }],
            Answer::BlockList,
        );
        round_trip(
            NetworkAttachReply {
                id: 1,
                devid: 0,
                mac,
            },
            Answer::NetworkAttach,
        );
        round_trip(
            NetworkDetachReply { id: 1, devid: 0 },
            Answer::NetworkDetach,
        );
        round_trip(
            vec![VifRow {
                devid: 0,
                mac,
                bridge: br,
                backend_state: Some(4),
                frontend_state: Some(4),
                rx_packets: 3,
                tx_packets: 4,
                tx_dropped: 0,
                errors: 0,
            }],
            Answer::NetworkList,
        );
        round_trip(vec![top_row()], Answer::Top);
        round_trip(
            StatusReply {
                id: 1,
                name: name("web"),
                live: false,
                state: "Shutdown { reason: Poweroff, code: 3 }".into(),
                shutdown_code: Some(3),
                crashed: false,
            },
            Answer::Status,
        );
        round_trip(
            vec![VcpuRow {
                name: name("web"),
                id: 1,
                vcpu: 0,
                cpu: None,
                state: "-b-".into(),
                time_s: 0.25,
                affinity: Some(vec![0, 2]),
            }],
            Answer::VcpuList,
        );
        round_trip(MemSetReply { id: 1, target: 32 }, Answer::MemSet);
    }

    fn top_row() -> TopRow {
        TopRow {
            name: name("web"),
            id: 1,
            vcpus: 2,
            mem_kib: 98304,
            maxmem_kib: 98304,
            target_kib: 98304,
            host_kib: 2048,
            state: "b".into(),
            cpu_s: 0.5,
            net_rx_packets: 1,
            net_tx_packets: 2,
            net_rx_bytes: 60,
            net_tx_bytes: 120,
            disks: 1,
            vbd_rd: 3,
            vbd_wr: 4,
            vbd_rsect: 5,
            vbd_wsect: 6,
            vbd_err: 0,
        }
    }

    /// The field names are the wire format: renaming one must fail here (and be a new protocol
    /// version), not print `null` in an old client.
    #[test]
    fn replies_keep_their_wire_format() {
        let top = serde_json::to_string(&Reply::Ok(Answer::Top(vec![top_row()]))).unwrap();
        assert_eq!(
            top,
            r#"{"ok":[{"name":"web","id":1,"vcpus":2,"mem_kib":98304,"maxmem_kib":98304,"#
                .to_owned()
                + r#""target_kib":98304,"host_kib":2048,"state":"b","cpu_s":0.5,"#
                + r#""net_rx_packets":1,"net_tx_packets":2,"net_rx_bytes":60,"net_tx_bytes":120,"#
                + r#""disks":1,"vbd_rd":3,"vbd_wr":4,"vbd_rsect":5,"vbd_wsect":6,"vbd_err":0}]}"#
        );
        let status = StatusReply {
            id: 7,
            name: name("web"),
            live: true,
            state: "Running".into(),
            shutdown_code: None,
            crashed: false,
        };
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"id":7,"name":"web","live":true,"state":"Running","shutdown_code":null,"crashed":false}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::Ok(Answer::Done(Done { id: 7 }))).unwrap(),
            r#"{"ok":{"id":7}}"#
        );
        let hello = HelloReply {
            version: "0.1.0".into(),
            protocol: 1,
            pid: 9,
            runtime_dir: "/run/splitvisor".into(),
        };
        assert_eq!(
            serde_json::to_string(&hello).unwrap(),
            r#"{"version":"0.1.0","protocol":1,"pid":9,"runtime_dir":"/run/splitvisor"}"#
        );
        // A reply from before (keys in another order) still reads; one missing a field does not.
        let old = r#"{"crashed":true,"id":7,"live":false,"name":"web","shutdown_code":null,"state":"Crashed"}"#;
        assert!(serde_json::from_str::<StatusReply>(old).unwrap().crashed);
        let renamed =
            r#"{"crashed":true,"id":7,"live":false,"name":"web","code":null,"state":"x"}"#;
        assert!(serde_json::from_str::<StatusReply>(renamed).is_err());
    }

    #[test]
    fn op_names_are_the_wire_tags() {
        for req in [
            Request::Hello,
            Request::Top,
            Request::VcpuList { dom: None },
            Request::MemSet {
                dom: DomRef::Id(1),
                mib: 4,
            },
            Request::NetworkDetach {
                dom: DomRef::Id(1),
                devid: 0,
            },
        ] {
            let v = serde_json::to_value(&req).unwrap();
            assert_eq!(v.get("op").and_then(|o| o.as_str()), Some(req.op()));
        }
    }
}
