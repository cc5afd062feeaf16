//! The benchmarks' quick modes complete and produce every figure (their
//! timings are not asserted: a test machine is too noisy for that).

#[test]
fn quick_benchmark_produces_all_figures() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--quick", "--output", "json"])
        .output()
        .unwrap();
    let figures = json_report(&output);
    let number = |value: &serde_json::Value, what: &str| {
        value
            .as_f64()
            .unwrap_or_else(|| panic!("{what} is not a number: {figures}"))
    };
    let positive = |value: &serde_json::Value, what: &str| {
        assert!(
            number(value, what) > 0.0,
            "{what} is not positive: {figures}"
        );
    };

    // The peer path (HAProxy) is skipped only where haproxy is missing, and
    // never under CI.
    let peer_ran = figures["config"]["peer"].is_string();
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(peer_ran, "CI=true but the peer path did not run: {figures}");
    }
    // As between sidecars, unless `--peer-hop` asks otherwise.
    assert_eq!(figures["config"]["peer_hop"], "http2", "{figures}");
    let mut paths = vec!["direct", "trellis"];
    if peer_ran {
        paths.push("peer");
    }

    for (protocol, suffix) in [("h1", ""), ("h2", "_h2")] {
        for path in &paths {
            // The quick rate, and the row of 1,000 slow clients.
            for load in ["500", "1000c"] {
                let row = format!("{path}{suffix}_{load}");
                for key in ["p50_ms", "p99_ms", "p999_ms"] {
                    positive(&figures[&row][key], &format!("{row}.{key}"));
                }
                assert_eq!(figures[&row]["failed"], 0, "{row}: {figures}");
                if *path != "direct" {
                    positive(
                        &figures[&row]["cpu_seconds_per_1000_requests"],
                        &format!("{row}.cpu_seconds_per_1000_requests"),
                    );
                    for key in ["added_p50_ms", "added_p99_ms"] {
                        number(&figures[&row][key], &format!("{row}.{key}"));
                    }
                }
            }
            positive(
                &figures["max_rps"][protocol][path],
                &format!("max_rps.{protocol}.{path}"),
            );
            if *path == "direct" {
                continue;
            }
            let proxies = &figures["proxies"][format!("{path}{suffix}")];
            for key in [
                "rss_idle_kib",
                "rss_under_load_kib",
                "private_under_load_kib",
                "rss_slow_clients_kib",
                "private_slow_clients_kib",
                "cpu_seconds_per_1000_requests",
                "cpu_us_per_request_at_max_rps",
            ] {
                positive(&proxies[key], &format!("proxies.{path}{suffix}.{key}"));
            }
        }
        let ratios: &[&str] = if peer_ran {
            &["trellis/direct", "trellis/peer"]
        } else {
            &["trellis/direct"]
        };
        for ratio in ratios {
            positive(
                &figures["max_rps"][protocol][ratio],
                &format!("max_rps.{protocol}.{ratio}"),
            );
        }
    }
    let mesh_size = &figures["mesh_size"];
    for key in [
        "rss_before_kib",
        "rss_after_kib",
        "private_before_kib",
        "private_after_kib",
    ] {
        positive(&mesh_size[key], &format!("mesh_size.{key}"));
    }
    assert_eq!(mesh_size["added_services"], 1000, "{figures}");

    // Instructions per request need valgrind, which CI installs.
    let instructions = &figures["instructions"];
    if std::env::var("CI").as_deref() == Ok("true") {
        assert!(
            instructions.is_object(),
            "CI=true but no instruction count: {figures}"
        );
    }
    if instructions.is_object() {
        assert_eq!(instructions["requests"], 200, "{figures}");
        for side in ["client_side_per_request", "server_side_per_request"] {
            positive(&instructions[side], &format!("instructions.{side}"));
        }
    }
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
        "cluster source: 100 Services",
        "cluster source: API change → all 20 watchers",
        "peak during a full re-list",
    ] {
        assert!(table.contains(figure), "{figure} missing from:\n{table}");
    }
}

#[test]
fn the_webhook_benchmark_produces_its_figures() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bench-webhook"))
        .args(["--seconds", "1", "--clients", "20", "--rate", "200"])
        .output()
        .unwrap();
    let figures = json_report(&output);
    assert_eq!(figures["clients"], 20, "{figures}");
    for phase in ["paced", "saturated"] {
        let figures = &figures[phase];
        assert!(
            figures["reviews"].as_u64().unwrap() > 20,
            "{phase}: {figures}"
        );
        for figure in ["p50_ms", "p99_ms", "max_ms", "reviews_per_second"] {
            assert!(
                figures[figure].as_f64().unwrap() > 0.0,
                "{phase} {figure}: {figures}"
            );
        }
    }
}

/// A bench's figures: the last line of its stdout, which must be JSON, from
/// a run that succeeded.
fn json_report(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last stdout line is not the JSON ({e}):\n{stdout}"))
}
