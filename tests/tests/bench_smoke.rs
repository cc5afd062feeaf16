//! The benchmark's quick mode completes and produces every figure (its
//! timings are not asserted: a test machine is too noisy for that).

#[test]
fn quick_benchmark_produces_all_figures() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let figures: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for path in ["direct_500", "trellis_500"] {
        for key in ["p50_ms", "p99_ms", "p999_ms"] {
            assert!(
                figures[path][key].as_f64().unwrap() > 0.0,
                "{path}.{key}: {figures}"
            );
        }
        assert_eq!(figures[path]["failed"], 0, "{figures}");
    }
    assert!(figures["max_rps"]["direct"].as_f64().unwrap() > 0.0);
    assert!(figures["max_rps"]["trellis"].as_f64().unwrap() > 0.0);
    assert!(figures["proxy_rss_kib"]["idle"].as_u64().unwrap() > 0);
    assert!(figures["proxy_rss_kib"]["under_load"].as_u64().unwrap() > 0);
    assert!(
        figures["proxy_cpu_seconds_per_1000_requests"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn quick_control_plane_benchmark_produces_all_figures() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bench-control-plane"))
        .arg("--quick")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    for figure in [
        "load into the store",
        "initial snapshots",
        "all 20 watchers",
        "RSS growth",
        "CSR/s",
    ] {
        assert!(table.contains(figure), "{figure} missing from:\n{table}");
    }
}
