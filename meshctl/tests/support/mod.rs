//! What meshctl's CLI tests share. (They cannot use the trellis-tests
//! harness, which depends on meshctl.) Each test file uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshctl::demo::manifests;

/// `meshctl ARGS --manifests DIR`, with no demo context to fall back on.
pub fn meshctl_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .arg("--manifests")
        .arg(dir)
        .env("TRELLIS_CONTEXT", dir.join("no-context.json"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Stdout then stderr.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A manifest directory with the demo's Services.
pub fn demo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("demo.yaml"),
        manifests::render(&manifests::pods([127, 0, 9])),
    )
    .unwrap();
    dir
}

/// Polls `check` every 100 ms until it gives a value; fails after 30 s
/// with `what` and the last thing `check` saw.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => panic!("{what} within 30 s; last: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
