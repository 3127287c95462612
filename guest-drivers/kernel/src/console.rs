//! Console output: the PV console ring (one doorbell per line), with the console-write
//! hypercall as the early and last-resort path. Console input: the same page's IN ring, which
//! dom0 fills with keystrokes.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use pv_protocol::SharedRegion;
use pv_protocol::byte_ring::{ByteRingConsumer, ByteRingProducer};
use pv_protocol::console::{IN_RING, OUT_RING};
use pv_protocol::start_info::{CONSOLE_GPA, StartInfo};

use crate::hcall::Cpu;
use crate::sync::SpinLock;

/// The console ring's producer (several vCPUs print) and its event port.
static RING: SpinLock<Option<ByteRingProducer<'static>>> = SpinLock::new(None);
static PORT: AtomicU32 = AtomicU32::new(0);
/// The input ring's consumer; `None` before `init`, or for good once dom0 broke the ring.
static INPUT: SpinLock<Option<ByteRingConsumer<'static>>> = SpinLock::new(None);

/// Switches output to the console ring named in start-info.
pub fn init(si: &StartInfo) {
    // SAFETY: the console page is identity-mapped at a fixed address for the kernel's lifetime
    // and accessed (by us and the host) only atomically.
    let Ok(page) = (unsafe { SharedRegion::from_raw(CONSOLE_GPA as *mut u8, 4096) }) else {
        return;
    };
    let Ok(p) = ByteRingProducer::new(page, OUT_RING) else {
        return;
    };
    RING.with(|slot| *slot = Some(p));
    if let Ok(c) = ByteRingConsumer::new(page, IN_RING) {
        INPUT.with(|slot| *slot = Some(c));
    }
    PORT.store(si.console_evtchn, Ordering::Release);
}

/// The console's event port (dom0 signals it when it wrote input or drained output).
pub fn port() -> u32 {
    PORT.load(Ordering::Acquire)
}

/// Takes the console input waiting in the IN ring (up to `buf.len()` bytes); returns how many.
/// dom0's producer index is validated on every read: once it is bad, input is ignored for good
/// (every later call returns 0), as output falls back to the hypercall.
pub fn read_input(buf: &mut [u8]) -> usize {
    let n = INPUT.with(|c| {
        let r = c.as_mut().map(|c| c.read(buf));
        match r {
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                *c = None;
                0
            }
            None => 0,
        }
    });
    if n > 0 {
        // dom0 may hold more keystrokes for the space just freed.
        crate::evtchn::doorbell(port());
    }
    n
}

/// Longest console input line kept (the rest of a longer line is dropped).
const LINE_MAX: usize = 200;

/// Gathers console input into lines and prints each as `console: <line>` (the line without its
/// terminator, `\r`, `\n` or `\r\n`; bytes outside printable ASCII shown as `?`).
#[derive(Debug)]
pub struct LineInput {
    line: [u8; LINE_MAX],
    len: usize,
    /// The last byte was `\r` (a `\n` right after it ends no second line).
    after_cr: bool,
}

impl LineInput {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            line: [0; LINE_MAX],
            len: 0,
            after_cr: false,
        }
    }

    /// Takes what input is waiting and prints every line it completes.
    pub fn pump(&mut self, cpu: &Cpu) {
        let mut buf = [0u8; 256];
        loop {
            let n = read_input(&mut buf);
            if n == 0 {
                return;
            }
            for &b in &buf[..n] {
                self.push(cpu, b);
            }
        }
    }

    fn push(&mut self, cpu: &Cpu, b: u8) {
        let after_cr = core::mem::replace(&mut self.after_cr, b == b'\r');
        match b {
            b'\n' if after_cr => {}
            b'\r' | b'\n' => {
                let line = core::str::from_utf8(&self.line[..self.len]).unwrap_or("");
                crate::kprintln!(cpu, "console: {line}");
                self.len = 0;
            }
            _ if self.len < LINE_MAX => {
                self.line[self.len] = if (0x20..0x7f).contains(&b) { b } else { b'?' };
                self.len += 1;
            }
            _ => {}
        }
    }
}

/// Writes `bytes` to the ring (waiting for space), or by hypercall if there is no ring.
fn write(cpu: &Cpu, mut bytes: &[u8]) {
    let port = PORT.load(Ordering::Acquire);
    let mut stalls = 0;
    while !bytes.is_empty() {
        let n = RING.with(|p| p.as_mut().map(|p| p.write(bytes)));
        match n {
            Some(Ok(n)) if n > 0 => {
                bytes = &bytes[n..];
                crate::evtchn::doorbell(port);
            }
            Some(Ok(_)) if stalls < 100_000 => {
                stalls += 1;
                cpu.yield_now();
            }
            // No ring, a broken ring, or a host that stopped reading: the hypercall still works.
            _ => {
                cpu.console_write(bytes);
                return;
            }
        }
    }
}

/// Waits (boundedly) until the host has read everything written to the ring.
pub fn flush(cpu: &Cpu) {
    for _ in 0..20_000 {
        let empty = RING.with(|p| match p.as_mut().map(|p| p.free()) {
            Some(Ok(free)) => free == OUT_RING.size as usize,
            _ => true,
        });
        if empty {
            return;
        }
        cpu.yield_now();
    }
}

/// Formats into a bounded buffer (a longer message is cut, never overflows).
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints `args` on the console.
pub fn print(cpu: &Cpu, args: fmt::Arguments<'_>) {
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    let _ = line.write_fmt(args);
    write(cpu, &line.buf[..line.len]);
}

/// `kprintln!(cpu, "fmt", args...)`: prints one line on the console.
#[macro_export]
macro_rules! kprintln {
    ($cpu:expr, $($arg:tt)*) => {
        $crate::console::print($cpu, format_args!("{}\n", format_args!($($arg)*)))
    };
}
