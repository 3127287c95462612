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
