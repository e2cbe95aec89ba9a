//! The load tool's binary, for the tests that run it. `sluicegate-load` is a package of its own
//! (load/), and Cargo gives `CARGO_BIN_EXE_<name>` only to a package's own tests, so it is built here,
//! once per test process, by the Cargo that built these tests (a no-op when it is up to date: never a
//! stale binary), and found from Cargo's own report of what it built.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A `sluicegate-load` built from this tree, in the profile these tests were built with.
pub fn path() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(p) => p,
        Err(e) => panic!("cannot build sluicegate-load: {e}"),
    }
}

fn build() -> Result<PathBuf, String> {
    // This test runs from target/<profile directory>/deps/; the dev profile's directory is "debug".
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile = match exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
    {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let cargo = env!("CARGO");
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--message-format=json"])
        // The workspace's features (the library with `docker`, as these tests built it): with
        // `--package` alone Cargo would build the library a second time without them.
        .args(["--workspace", "--bin", "sluicegate-load"])
        .args(["--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map_err(|e| format!("{cargo}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --workspace --bin sluicegate-load --profile {profile}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "sluicegate-load")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo reported no sluicegate-load executable".to_string())
}
