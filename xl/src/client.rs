//! A client of `splitvisord`'s control protocol ([`splitvisor_api::control`]), as `xl` and the soak test
//! use it: it checks whom it talks to before it sends anything.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;
use splitvisor_api::control::{self, Envelope, PROTOCOL_VERSION, Reply, Request};
use splitvisor_api::peer;

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    /// Where requests go (and, after `console`, the guest's input).
    pub stream: UnixStream,
    /// Where replies come from (and, after `console`, the guest's output).
    pub reader: BufReader<UnixStream>,
}

/// A request that failed: the daemon's error line, or what went wrong on the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CallError(pub String);

/// Why connecting failed: no daemon there, or one we must not talk to.
#[derive(Debug)]
pub enum ConnectError {
    /// Nothing answers (or the directory is not there yet).
    Absent(std::io::Error),
    /// The directory or the daemon cannot be trusted.
    Untrusted(String),
}

impl Client {
    /// Connects to the daemon in `dir`, after checking that the directory is one only we (or
    /// root) control, and that the daemon answering runs as root or as us.
    pub fn connect(dir: &Path) -> Result<Self, ConnectError> {
        match std::fs::symlink_metadata(dir) {
            Err(e) => return Err(ConnectError::Absent(e)),
            Ok(_) => peer::check_runtime_dir(dir)
                .map_err(|e| ConnectError::Untrusted(control::chain(&e)))?,
        }
        let stream =
            UnixStream::connect(dir.join(control::SOCKET)).map_err(ConnectError::Absent)?;
        let cred =
            peer::peer_cred(&stream).map_err(|e| ConnectError::Untrusted(control::chain(&e)))?;
        if !peer::daemon_is_trusted(cred.uid) {
            return Err(ConnectError::Untrusted(format!(
                "the daemon on {} runs as uid {} (pid {}), neither root nor us; refusing to talk to it",
                dir.display(),
                cred.uid,
                cred.pid
            )));
        }
        let reader = BufReader::new(stream.try_clone().map_err(ConnectError::Absent)?);
        Ok(Self { stream, reader })
    }

    /// Sends `req` and waits for its answer: the op's reply (`T`, the type [`control::Answer`]
    /// names for that op), or the daemon's error line. A reply that is not a `T` is an error
    /// naming the op and what is wrong with it.
    pub fn call<T: DeserializeOwned>(&mut self, req: Request) -> Result<T, CallError> {
        let op = req.op();
        let v = self.call_text(req).map_err(CallError)?;
        serde_json::from_value(v).map_err(|e| CallError(format!("unexpected reply to {op}: {e}")))
    }

    fn call_text(&mut self, req: Request) -> Result<Value, String> {
        let mut text = serde_json::to_string(&Envelope {
            v: PROTOCOL_VERSION,
            req,
        })
        .map_err(|e| format!("request: {e}"))?;
        text.push('\n');
        // A daemon that refuses us (permission, too many connections) answers with one error
        // line and hangs up, perhaps before we have written: read its answer even then.
        let sent = self.stream.write_all(text.as_bytes());
        let mut line = String::new();
        let read = self.reader.read_line(&mut line);
        if line.is_empty() {
            sent.map_err(|e| format!("daemon connection: {e}"))?;
        }
        read.map_err(|e| format!("daemon connection: {e}"))?;
        if line.is_empty() {
            return Err("the daemon closed the connection".into());
        }
        match serde_json::from_str::<Reply>(&line).map_err(|e| format!("daemon reply: {e}"))? {
            Reply::Ok(v) => Ok(v),
            Reply::Error(e) => Err(e),
        }
    }
}

/// A `splitvisord` this process started for itself (a benchmark's or a soak's), in a runtime
/// directory of its own; killed when dropped.
#[derive(Debug)]
pub struct OwnDaemon {
    child: std::process::Child,
    /// Its runtime directory.
    pub dir: std::path::PathBuf,
}

impl OwnDaemon {
    /// Starts the `splitvisord` next to this executable on `dir` and waits (10 s at most) until it
    /// answers; returns it with a connection.
    pub fn start(dir: &Path) -> Result<(Self, Client), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let daemon_exe = exe.with_file_name("splitvisord");
        let child = std::process::Command::new(&daemon_exe)
            .arg("--runtime-dir")
            .arg(dir)
            .spawn()
            .map_err(|e| format!("{}: {e}", daemon_exe.display()))?;
        let me = Self {
            child,
            dir: dir.to_owned(),
        };
        let t = std::time::Instant::now();
        loop {
            match Client::connect(dir) {
                Ok(c) => return Ok((me, c)),
                Err(_) if t.elapsed() < std::time::Duration::from_secs(10) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => return Err(format!("the daemon did not come up: {e:?}")),
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for OwnDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use splitvisor_api::control::{DomRef, Done, TopRow};

    /// A client whose daemon answers every request with `reply`.
    fn answered_with(reply: &str) -> Client {
        let (stream, mut daemon) = UnixStream::pair().unwrap();
        daemon.write_all(reply.as_bytes()).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error_naming_the_op() {
        let destroy = || Request::Destroy { dom: DomRef::Id(3) };
        let done: Done = answered_with("{\"ok\":{\"id\":3}}\n")
            .call(destroy())
            .unwrap();
        assert_eq!(done, Done { id: 3 });
        let e = answered_with("{\"ok\":{\"domid\":3}}\n")
            .call::<Done>(destroy())
            .unwrap_err();
        assert_eq!(e.0, "unexpected reply to destroy: missing field `id`");
        let e = answered_with("{\"ok\":[{\"name\":\"web\",\"id\":1}]}\n")
            .call::<Vec<TopRow>>(Request::Top)
            .unwrap_err();
        assert!(
            e.0.starts_with("unexpected reply to top: missing field"),
            "{e}"
        );
        assert!(!e.0.contains('\n'));
        let e = answered_with("{\"error\":\"no domain \\\"3\\\"\"}\n")
            .call::<Done>(destroy())
            .unwrap_err();
        assert_eq!(e.0, "no domain \"3\"");
    }
}
