//! Console output: the PV console ring (one doorbell per line), with the console-write
//! hypercall as the early and last-resort path.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering};

use pv_protocol::SharedRegion;
use pv_protocol::byte_ring::ByteRingProducer;
use pv_protocol::console::OUT_RING;
use pv_protocol::start_info::{CONSOLE_GPA, StartInfo};

use crate::hcall::Cpu;
use crate::sync::SpinLock;

/// The console ring's producer (several vCPUs print) and its event port.
static RING: SpinLock<Option<ByteRingProducer<'static>>> = SpinLock::new(None);
static PORT: AtomicU32 = AtomicU32::new(0);

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
    PORT.store(si.console_evtchn, Ordering::Release);
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
