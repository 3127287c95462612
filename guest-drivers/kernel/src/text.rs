//! Decimal numbers in store values and command lines, without an allocator.

/// Parses a decimal number that ends at a NUL or the end of `b` (surrounding spaces allowed).
pub fn parse_u64(b: &[u8]) -> Option<u64> {
    let digits = b.split(|&c| c == 0).next()?;
    core::str::from_utf8(digits).ok()?.trim().parse().ok()
}

/// As [`parse_u64`], for values that must fit a `u32`.
pub fn parse_u32(b: &[u8]) -> Option<u32> {
    parse_u64(b).and_then(|v| u32::try_from(v).ok())
}

/// The value of `key=value` on the command line (after the job's name).
pub fn arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .skip(1)
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

/// A numeric `key=value`, or `default` if absent (`None` if present but not a number).
pub fn num(cmdline: &str, key: &str, default: u64) -> Option<u64> {
    arg(cmdline, key).map_or(Some(default), |v| parse_u64(v.as_bytes()))
}

/// Formats `v` in decimal at the end of `buf`; returns the digits.
pub fn fmt_u32(buf: &mut [u8; 16], mut v: u32) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}
