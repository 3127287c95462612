//! A domain's console: a bounded history of what the guest printed, optionally echoed live.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// Wakes every [`stream_from`](Self::stream_from) so that it looks at its `hung_up` flag
    /// again (call it after setting one).
    pub fn wake_readers(&self) {
        let _h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        self.grew.notify_all();
    }

    /// Whether the output is complete: the domain has stopped and nothing more will come.
    pub fn is_finished(&self) -> bool {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished
    }

    /// Output past stream position `from` (maybe none) and the new position. Bytes already
    /// dropped from the bounded history are skipped (the data then starts at the oldest byte
    /// kept).
    fn since(h: &History, from: u64) -> (Vec<u8>, u64) {
        let oldest = h.total - h.bytes.len() as u64;
        let skip = from.saturating_sub(oldest) as usize;
        (h.bytes.iter().skip(skip).copied().collect(), h.total)
    }

    /// Streams output: waits up to `timeout` for bytes past stream position `from` and returns
    /// them with the new position. Bytes already dropped from the bounded history are skipped
    /// (the returned data then starts at the oldest byte kept).
    pub fn read_from(&self, from: u64, timeout: Duration) -> (Vec<u8>, u64) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let (h, _) = self
            .grew
            .wait_timeout_while(h, timeout, |h| h.total <= from)
            .unwrap_or_else(|p| p.into_inner());
        Self::since(&h, from)
    }

    /// As [`read_from`](Self::read_from), with no timeout: waits until there are bytes past
    /// `from`, the output is [finished](Self::is_finished), or `hung_up` is set (by whoever then
    /// calls [`wake_readers`](Self::wake_readers)); returns nothing new in the last two cases.
    pub fn stream_from(&self, from: u64, hung_up: &AtomicBool) -> (Vec<u8>, u64) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        // Acquire: pairs with the Release store of whoever sets it before waking us; checked
        // under the lock `wake_readers` takes, so a hang-up after this check wakes this wait.
        let waiting =
            |h: &mut History| h.total <= from && !h.finished && !hung_up.load(Ordering::Acquire);
        let h = self
            .grew
            .wait_while(h, waiting)
            .unwrap_or_else(|p| p.into_inner());
        Self::since(&h, from)
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
        let (got, pos) = c.read_from(0, Duration::ZERO);
        assert_eq!((got.as_slice(), pos), (b"one\n".as_slice(), 4));
        c.write(b"two\n");
        assert_eq!(c.read_from(pos, Duration::ZERO).0, b"two\n");
        assert!(c.read_from(8, Duration::from_millis(10)).0.is_empty());
        c.write(&vec![b'y'; HISTORY_BYTES]);
        let (got, total) = c.read_from(pos, Duration::ZERO);
        assert_eq!(got.len(), HISTORY_BYTES, "only what is still kept");
        let hung_up = AtomicBool::new(false);
        assert_eq!(c.stream_from(pos, &hung_up).0.len(), HISTORY_BYTES);
        // A stream waiting with no timeout ends when its reader hangs up, and when the output
        // does; another stream's hang-up wakes it without ending it.
        std::thread::scope(|s| {
            let reader = s.spawn(|| c.stream_from(total, &hung_up));
            c.wake_readers();
            std::thread::sleep(Duration::from_millis(20));
            assert!(!reader.is_finished());
            hung_up.store(true, Ordering::Release);
            c.wake_readers();
            assert_eq!(reader.join().unwrap(), (Vec::new(), total));
        });
        let hung_up = AtomicBool::new(false);
        std::thread::scope(|s| {
            let reader = s.spawn(|| c.stream_from(total, &hung_up));
            std::thread::sleep(Duration::from_millis(20));
            c.finish();
            assert_eq!(reader.join().unwrap(), (Vec::new(), total));
        });
        assert!(c.is_finished());
    }
}
