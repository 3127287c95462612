//! What every benchmark binary does at the end: show its table and keep it in
//! `benchmarks/results/`.

use std::path::Path;

/// Prints `table`, writes it to `out` (creating the directory) and says where it went, as
/// `tool`.
pub fn publish(tool: &str, out: &str, table: &str) -> Result<(), String> {
    print!("{table}");
    if let Some(dir) = Path::new(out)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(out, table).map_err(|e| format!("{out}: {e}"))?;
    eprintln!("{tool}: table written to {out}");
    Ok(())
}

/// Runs a benchmark's `run`; on failure prints `tool: error` and exits 1.
pub fn main(tool: &str, run: impl FnOnce() -> Result<(), String>) {
    if let Err(e) = run() {
        eprintln!("{tool}: {e}");
        std::process::exit(1);
    }
}

/// The median of `v` (NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The smallest and largest of `v`.
pub fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_and_range() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(super::median(&[]).is_nan());
        assert_eq!(super::range(&[2.0, -1.0, 5.0]), (-1.0, 5.0));
    }
}
