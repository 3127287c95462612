//! A domain's console: a bounded history of what the guest printed, optionally echoed live.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes of console history kept per domain; older output is dropped first.
pub const HISTORY_BYTES: usize = 64 * 1024;

/// Where live console output goes besides the history.
pub type Echo = Box<dyn Fn(&[u8]) + Send + Sync>;

/// A domain's console output.
pub struct Console {
    history: Mutex<VecDeque<u8>>,
    grew: Condvar,
    echo: Option<Echo>,
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
            history: Mutex::new(VecDeque::new()),
            grew: Condvar::new(),
            echo,
        }
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
        h.extend(clean);
        let excess = h.len().saturating_sub(HISTORY_BYTES);
        h.drain(..excess);
        self.grew.notify_all();
    }

    /// Everything still in the history.
    pub fn history(&self) -> Vec<u8> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().copied().collect()
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
            let (a, b) = h.as_slices();
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
}
