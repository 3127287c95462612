//! A domain's console: a bounded history of what the guest printed, optionally echoed live.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes of console history kept per domain; older output is dropped first.
pub const HISTORY_BYTES: usize = 64 * 1024;

/// Where live console output goes besides the history.
pub type Echo = Box<dyn Fn(&[u8]) + Send + Sync>;

/// The bounded history and how many bytes were ever written (a stream position).
#[derive(Default)]
struct History {
    bytes: VecDeque<u8>,
    total: u64,
    /// The domain has stopped and its output is all in: nothing more will come.
    finished: bool,
}

/// Keystrokes queued for the guest, beyond which input is refused (a guest that does not read
/// its console cannot make dom0 buffer without bound).
pub const MAX_QUEUED_INPUT: usize = 4096;

/// Input waiting for the console ring, and how to wake the thread that serves the ring.
#[derive(Default)]
struct Input {
    queue: VecDeque<u8>,
    waker: Option<Box<dyn Fn() + Send + Sync>>,
}

/// A domain's console: its output history and its pending input.
pub struct Console {
    history: Mutex<History>,
    grew: Condvar,
    echo: Option<Echo>,
    input: Mutex<Input>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// A console that keeps history and passes output to `echo`.
    pub fn new(echo: Option<Echo>) -> Self {
        Self {
            history: Mutex::new(History::default()),
            grew: Condvar::new(),
            echo,
            input: Mutex::default(),
        }
    }

    /// Sets how [`send_input`](Self::send_input) wakes the ring server.
    pub(crate) fn set_input_waker(&self, waker: Box<dyn Fn() + Send + Sync>) {
        self.input.lock().unwrap_or_else(|p| p.into_inner()).waker = Some(waker);
    }

    /// Queues keystrokes for the guest's console input ring; returns how many were taken (fewer
    /// than offered when [`MAX_QUEUED_INPUT`] bytes already wait for a guest that does not read).
    pub fn send_input(&self, bytes: &[u8]) -> usize {
        let mut i = self.input.lock().unwrap_or_else(|p| p.into_inner());
        let n = bytes.len().min(MAX_QUEUED_INPUT - i.queue.len());
        i.queue.extend(&bytes[..n]);
        if let Some(w) = &i.waker {
            w();
        }
        n
    }

    /// Takes up to `max` queued input bytes (for the ring server).
    pub(crate) fn take_input(&self, max: usize) -> Vec<u8> {
        let mut i = self.input.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.min(i.queue.len());
        i.queue.drain(..n).collect()
    }

    /// Appends guest output. Control characters other than newline and tab become `?`, so a
    /// guest cannot drive the terminal of whoever watches.
    pub fn write(&self, bytes: &[u8]) {
        let clean: Vec<u8> = bytes
            .iter()
            .map(|&b| match b {
                b'\n' | b'\t' | 0x20..=0x7e => b,
                _ => b'?',
            })
            .collect();
        if let Some(echo) = &self.echo {
            echo(&clean);
        }
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.total += clean.len() as u64;
        h.bytes.extend(clean);
        let excess = h.bytes.len().saturating_sub(HISTORY_BYTES);
        h.bytes.drain(..excess);
        self.grew.notify_all();
    }

    /// Everything still in the history.
    pub fn history(&self) -> Vec<u8> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.bytes.iter().copied().collect()
    }

    /// Marks the output complete (the domain stopped and its last output was collected) and
    /// wakes every reader.
    pub(crate) fn finish(&self) {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished = true;
        self.grew.notify_all();
    }

    /// Whether the output is complete: the domain has stopped and nothing more will come.
    pub fn is_finished(&self) -> bool {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished
    }

    /// Streams output: waits for bytes past stream position `from`, up to `timeout` (`None`:
    /// until some come or the output is [finished](Self::is_finished)), and returns them with
    /// the new position. Bytes already dropped from the bounded history are skipped (the
    /// returned data then starts at the oldest byte kept).
    pub fn read_from(&self, from: u64, timeout: Option<Duration>) -> (Vec<u8>, u64) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = |h: &mut History| h.total <= from && !h.finished;
        let h = match timeout {
            Some(t) => {
                self.grew
                    .wait_timeout_while(h, t, waiting)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self
                .grew
                .wait_while(h, waiting)
                .unwrap_or_else(|p| p.into_inner()),
        };
        let oldest = h.total - h.bytes.len() as u64;
        let skip = from.saturating_sub(oldest) as usize;
        (h.bytes.iter().skip(skip).copied().collect(), h.total)
    }

    /// The history as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.history()).into_owned()
    }

    /// Waits until the history contains `needle` or `timeout` passes; returns whether it did.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (a, b) = h.bytes.as_slices();
            let text = [a, b].concat();
            if String::from_utf8_lossy(&text).contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            h = self
                .grew
                .wait_timeout(h, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_sanitised() {
        let c = Console::new(None);
        c.write(b"\x1b[2Jhi\n");
        assert_eq!(c.text(), "?[2Jhi\n");
        c.write(&vec![b'x'; HISTORY_BYTES]);
        let h = c.history();
        assert_eq!(h.len(), HISTORY_BYTES);
        assert!(h.iter().all(|&b| b == b'x'));
    }

    #[test]
    fn a_reader_streams_from_its_position_and_skips_what_was_dropped() {
        let c = Console::new(None);
        c.write(b"one\n");
        let (got, pos) = c.read_from(0, Some(Duration::ZERO));
        assert_eq!((got.as_slice(), pos), (b"one\n".as_slice(), 4));
        c.write(b"two\n");
        assert_eq!(c.read_from(pos, None).0, b"two\n");
        assert!(c.read_from(8, Some(Duration::from_millis(10))).0.is_empty());
        c.write(&vec![b'y'; HISTORY_BYTES]);
        let (got, total) = c.read_from(pos, Some(Duration::ZERO));
        assert_eq!(got.len(), HISTORY_BYTES, "only what is still kept");
        // A reader waiting with no timeout is woken by the end of the output.
        std::thread::scope(|s| {
            let reader = s.spawn(|| c.read_from(total, None));
            std::thread::sleep(Duration::from_millis(20));
            c.finish();
            assert_eq!(reader.join().unwrap(), (Vec::new(), total));
        });
        assert!(c.is_finished());
    }
}
