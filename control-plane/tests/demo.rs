//! `meshctl demo` as a user runs it: the real binary, real processes.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line or environment mentions `needle` (our state
/// directory: the controller has it in its flags, proxies in their token path).
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let read = |file| {
            std::fs::read(entry.path().join(file))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        };
        let (Ok(cmdline), Ok(environ)) = (read("cmdline"), read("environ")) else {
            continue;
        };
        if cmdline.contains(&needle) || environ.contains(&needle) {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn demo_runs_for_a_duration_and_reports_json() {
    let state = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "demo",
            "--duration",
            "10",
            "--output",
            "json",
            "--state-dir",
        ])
        .arg(state.path())
        .arg("--prometheus-config")
        .arg(state.path().join("prometheus.yml"))
        .env("TRELLIS_CONTEXT", state.path().join("context.json"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // The scrape config it wrote is valid for Prometheus' own checker.
    match Command::new("promtool")
        .args(["check", "config"])
        .arg(state.path().join("prometheus.yml"))
        .output()
    {
        Ok(check) => assert!(
            check.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&check.stdout)
        ),
        Err(_) => assert!(
            std::env::var("CI").is_err(),
            "CI must install prometheus (promtool)"
        ),
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let last = stdout.lines().last().expect("some output");
    let summary: serde_json::Value = serde_json::from_str(last).expect("last line is JSON");
    let requests = summary["requests"].as_u64().unwrap();
    let succeeded = summary["succeeded"].as_u64().unwrap();
    assert!(requests >= 500, "about 100 rps for 10 s: {summary}");
    assert!(succeeded as f64 >= 0.99 * requests as f64, "{summary}");
    for version in ["v1", "v2"] {
        assert!(
            summary["by_version"][version].as_u64().unwrap_or(0) > requests / 5,
            "{version}: {summary}"
        );
    }
    assert!(
        summary["latency_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(
        summary["latency_ms"]["p99"].as_f64().unwrap()
            >= summary["latency_ms"]["p50"].as_f64().unwrap()
    );
    assert_eq!(summary["mtls"], true, "{summary}");
    assert_eq!(
        summary["client_identities"][0], "spiffe://cluster.local/ns/default/sa/frontend",
        "{summary}"
    );
    let left = processes_mentioning(state.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn demo_stops_everything_on_ctrl_c() {
    let state = tempfile::tempdir().unwrap();
    let mut demo = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--state-dir"])
        .arg(state.path())
        .env("TRELLIS_CONTEXT", state.path().join("context.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the mesh is up (the banner lists the pods).
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_mentioning(&state.path().join("tokens")).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the demo's proxies did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let status = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = demo.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop within 15 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    std::io::Read::read_to_string(demo.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(status.success(), "exit status {status}; stdout:\n{stdout}");
    assert!(
        stdout.contains("success rate"),
        "a summary is printed on Ctrl-C:\n{stdout}"
    );
    let left = processes_mentioning(state.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Every file below `dir`, recursively.
fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_below(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn proxy_keys_never_touch_the_disk() {
    let state = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for dir in ["home", "tmp", "cwd"] {
        std::fs::create_dir(scratch.path().join(dir)).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--duration", "3", "--output", "json", "--state-dir"])
        .arg(state.path())
        .env("TRELLIS_CONTEXT", state.path().join("context.json"))
        .env("HOME", scratch.path().join("home"))
        .env("TMPDIR", scratch.path().join("tmp"))
        .current_dir(scratch.path().join("cwd"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The only keys on disk are the controller's own (CA and token key).
    let mut keys: Vec<String> = files_below(state.path())
        .into_iter()
        .chain(files_below(scratch.path()))
        .filter(|f| {
            let bytes = std::fs::read(f).unwrap_or_default();
            String::from_utf8_lossy(&bytes).contains("PRIVATE KEY")
                || f.extension().is_some_and(|e| e == "key")
        })
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["bootstrap.key", "issuer.key", "root.key"],
        "unexpected key material on disk"
    );
    // Three proxies did get certificates: the demo saw mTLS on every hop.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.lines().last().unwrap().contains("\"mtls\":true"),
        "{stdout}"
    );
}
