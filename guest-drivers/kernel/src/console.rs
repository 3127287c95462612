//! Console output through the console-write hypercall, one line per call.

use core::fmt::{self, Write};

use crate::hcall::Cpu;

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
    cpu.console_write(&line.buf[..line.len]);
}

/// `kprintln!(cpu, "fmt", args...)`: prints one line on the console.
#[macro_export]
macro_rules! kprintln {
    ($cpu:expr, $($arg:tt)*) => {
        $crate::console::print($cpu, format_args!("{}\n", format_args!($($arg)*)))
    };
}
