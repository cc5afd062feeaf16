//! `meshctl stat` and `meshctl graph` against a running demo mesh.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn stat_and_graph_agree_with_the_traffic_sent() {
    let state = tempfile::tempdir().unwrap();
    let context = state.path().join("context.json");
    let meshctl = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        command
            .env("TRELLIS_CONTEXT", &context)
            .stdin(Stdio::null());
        command
    };
    // The demo sends a fixed 50 requests/s (open loop) to the frontend.
    let mut demo = meshctl()
        .args([
            "demo",
            "--rps",
            "50",
            "--duration",
            "12",
            "--output",
            "json",
            "--state-dir",
        ])
        .arg(state.path().join("demo"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !context.exists() {
        assert!(Instant::now() < deadline, "the demo did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));

    let out = meshctl()
        .args(["stat", "--window", "4s", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let hello: Vec<_> = rows.iter().filter(|r| r["service"] == "hello").collect();
    let versions: Vec<&str> = hello
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["v1", "v2"], "{rows:?}");
    let rps: f64 = hello.iter().map(|r| r["rps"].as_f64().unwrap()).sum();
    assert!(
        (rps - 50.0).abs() <= 2.5,
        "hello served {rps} rps, 50 were sent ({rows:?})"
    );
    for row in &hello {
        assert_eq!(row["success_rate"], 1.0);
        assert_eq!(row["mtls_share"], 1.0);
        assert!(row["p99_ms"].as_f64().unwrap() >= row["p50_ms"].as_f64().unwrap());
    }

    let out = meshctl()
        .args(["graph", "--window", "2s", "-o", "dot"])
        .output()
        .unwrap();
    let dot = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dot.contains("\"default/frontend\" -> \"default/hello\""),
        "{dot}"
    );
    // `dot` (Graphviz) parses it, where installed; CI installs it.
    match Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), dot.as_bytes()).unwrap();
            let result = child.wait_with_output().unwrap();
            assert!(
                result.status.success(),
                "dot rejected it: {}",
                String::from_utf8_lossy(&result.stderr)
            );
            assert!(String::from_utf8_lossy(&result.stdout).contains("<svg"));
        }
        Err(_) => assert!(std::env::var("CI").is_err(), "CI must install graphviz"),
    }
    let status = demo.wait().unwrap();
    assert!(status.success());
}
