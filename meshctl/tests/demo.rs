//! `meshctl demo` as a user runs it: the real binary, real processes.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line or environment mentions `needle` (our state
/// directory: the controller has it in its flags, proxies in their token path).
fn processes_mentioning(needle: &Path) -> Vec<String> {
    processes(needle)
        .into_iter()
        .map(|(_, cmdline)| cmdline)
        .collect()
}

/// Pid and command line of the processes that mention `needle`.
fn processes(needle: &Path) -> Vec<(String, String)> {
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
            found.push((entry.file_name().to_string_lossy().into_owned(), cmdline));
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
    assert_eq!(summary["scenario"], "steady", "{summary}");
    assert_eq!(summary["failed"], requests - succeeded, "{summary}");
    assert_eq!(
        summary["restarts"]["total"], 0,
        "nothing crashed: {summary}"
    );
    assert_eq!(
        summary["restarts"]["by_process"]
            .as_object()
            .map(|m| m.len()),
        Some(7),
        "the controller and three pods of two processes each: {summary}"
    );
    assert_eq!(summary["disruptions"], serde_json::json!([]), "{summary}");
    let left = processes_mentioning(state.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Runs `meshctl demo <args> --output json` in `state` and returns its
/// exit status, the summary and stderr.
fn demo_json(state: &Path, args: &[&str]) -> (std::process::ExitStatus, serde_json::Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .arg("demo")
        .args(args)
        .args(["--output", "json", "--state-dir"])
        .arg(state)
        .env("TRELLIS_CONTEXT", state.join("context.json"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let last = stdout.lines().last().unwrap_or_default();
    let summary = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"));
    (output.status, summary, stderr)
}

#[test]
fn a_crashed_controller_is_restarted_and_traffic_never_notices() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_path_buf();
    let demo = std::thread::spawn(move || demo_json(&dir, &["--duration", "10"]));
    // Once the proxies run, kill the controller as an OOM killer would.
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_mentioning(&state.path().join("tokens")).len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the demo's proxies did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let controllers: Vec<String> = processes(state.path())
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("internal controller"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(controllers.len(), 1, "{controllers:?}");
    let killed = Command::new("kill")
        .args(["-KILL", &controllers[0]])
        .status()
        .unwrap();
    assert!(killed.success());

    let (status, summary, stderr) = demo.join().unwrap();
    assert!(status.success(), "{summary}\nstderr:\n{stderr}");
    assert_eq!(
        summary["restarts"]["by_process"]["controller"], 1,
        "{summary}"
    );
    assert_eq!(summary["restarts"]["total"], 1, "{summary}");
    // Proxies keep their last routes and certificate while it is away.
    assert_eq!(summary["failed"], 0, "{summary}");
    // The restarted controller wrote below the first one's lines.
    let log = std::fs::read_to_string(state.path().join("logs/controller.log")).unwrap();
    let marker = log
        .find("controller exited (signal: 9 (SIGKILL)); restart 1")
        .unwrap_or_else(|| panic!("no restart marker in the log:\n{log}"));
    assert!(log[..marker].contains("controller started"), "{log}");
    assert!(log[marker..].contains("controller started"), "{log}");
    let left = processes_mentioning(state.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// The goal: a `hello` pod stopped and crashed again and again while
/// traffic runs, and not one request fails.
#[test]
fn chaos_restarts_the_disrupted_pod_and_no_request_fails() {
    let state = tempfile::tempdir().unwrap();
    let (status, summary, stderr) =
        demo_json(state.path(), &["--scenario", "chaos", "--duration", "30"]);
    assert!(status.success(), "{summary}\nstderr:\n{stderr}");
    assert_eq!(summary["scenario"], "chaos", "{summary}");
    assert!(
        summary["requests"].as_u64().unwrap() >= 2000,
        "about 100 rps for 30 s: {summary}"
    );
    let disruptions = summary["disruptions"].as_array().unwrap();
    for kind in ["graceful", "crash"] {
        assert!(
            disruptions.iter().any(|d| d["kind"] == kind),
            "no {kind} disruption: {summary}"
        );
    }
    for disruption in disruptions {
        let process = disruption["process"].as_str().unwrap();
        assert!(
            process.starts_with("hello-v2"),
            "chaos hits one hello pod: {disruption}"
        );
        assert!(
            summary["restarts"]["by_process"][process].as_u64().unwrap() >= 1,
            "{process} was disrupted, so restarted: {summary}"
        );
    }
    assert!(
        summary["restarts"]["total"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert_eq!(
        summary["failed"], 0,
        "requests failed while the pod was disrupted (by disruption: {}; why: {})",
        summary["disruptions"], summary["failures"]
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

/// The rollout's decisions in a rollout scenario's summary, as
/// (seconds from the start of traffic, reason, canary weight).
fn decisions(summary: &serde_json::Value) -> Vec<(f64, String, u64)> {
    summary["rollout"]["decisions"]
        .as_array()
        .unwrap_or_else(|| panic!("no rollout decisions: {summary}"))
        .iter()
        .map(|d| {
            (
                d["at_s"].as_f64().unwrap(),
                d["reason"].as_str().unwrap().to_string(),
                d["canary_weight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The goal: a canary failing 20% of its requests is rolled back
/// within one gate window of getting traffic, and gets none afterwards.
#[test]
fn rollout_bad_is_rolled_back_and_the_json_says_so() {
    let state = tempfile::tempdir().unwrap();
    let (status, summary, stderr) = demo_json(
        state.path(),
        &["--scenario", "rollout-bad", "--duration", "40"],
    );
    assert!(status.success(), "{summary}\nstderr:\n{stderr}");
    assert_eq!(summary["scenario"], "rollout-bad", "{summary}");
    let rollout = &summary["rollout"];
    assert_eq!(rollout["phase"], "RolledBack", "{summary}");
    assert_eq!(rollout["outcome_reached"], true, "{summary}");
    let decisions = decisions(&summary);
    let reasons: Vec<&str> = decisions.iter().map(|(_, r, _)| r.as_str()).collect();
    assert_eq!(reasons, ["Started", "GateFailed"], "{summary}");
    let (started, _, first_weight) = &decisions[0];
    let (rolled_back, _, weight) = &decisions[1];
    assert_eq!((*first_weight, *weight), (20, 0), "{summary}");
    // One 3 s window after the canary first got traffic (and a tick).
    assert!(
        rolled_back - started <= 3.5,
        "rolled back {:.1} s after the start: {summary}",
        rolled_back - started
    );
    // The status names the failed gate and its value.
    let gate = &rollout["gates"][0];
    assert_eq!(gate["name"], "success-rate", "{summary}");
    assert_eq!(gate["verdict"], "Fail", "{summary}");
    let value = gate["value"].as_f64().unwrap();
    assert!((70.0..90.0).contains(&value), "about 80%: {summary}");
    // Afterwards hello-v2 gets nothing, and nothing fails.
    let after = &rollout["after_end"];
    assert!(after["requests"].as_u64().unwrap() >= 1000, "{summary}");
    assert_eq!(
        after["by_version"]["v2"],
        serde_json::Value::Null,
        "{summary}"
    );
    assert_eq!(after["failed"], 0, "{summary}");
    assert!(
        summary["failures"]
            .as_object()
            .unwrap()
            .keys()
            .all(|why| why.contains("on purpose")),
        "only hello-v2's own failures: {summary}"
    );
    let left = processes_mentioning(state.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn rollout_promotes_a_healthy_canary_step_by_step() {
    let state = tempfile::tempdir().unwrap();
    let (status, summary, stderr) =
        demo_json(state.path(), &["--scenario", "rollout", "--duration", "25"]);
    assert!(status.success(), "{summary}\nstderr:\n{stderr}");
    assert_eq!(summary["rollout"]["phase"], "Promoted", "{summary}");
    let decisions = decisions(&summary);
    let steps: Vec<(&str, u64)> = decisions
        .iter()
        .map(|(_, reason, weight)| (reason.as_str(), *weight))
        .collect();
    assert_eq!(
        steps,
        [
            ("Started", 20),
            ("StepPassed", 50),
            ("StepPassed", 100),
            ("Promoted", 100)
        ],
        "{summary}"
    );
    // No step ends before its 3 s window.
    for pair in decisions.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= 2.9, "{pair:?}: {summary}");
    }
    // Each step's weight is what the demo's requests saw.
    for decision in summary["rollout"]["decisions"].as_array().unwrap() {
        let traffic = &decision["traffic"];
        let requests = traffic["requests"].as_u64().unwrap();
        let v2 = traffic["by_version"]["v2"].as_u64().unwrap_or(0);
        let share = 100.0 * v2 as f64 / requests.max(1) as f64;
        let weight = decision["canary_weight"].as_f64().unwrap();
        assert!(requests >= 100, "{decision}");
        assert!(
            (share - weight).abs() <= 10.0,
            "{share:.1}% to v2: {decision}"
        );
    }
    let after = &summary["rollout"]["after_end"];
    assert_eq!(
        after["by_version"]["v1"],
        serde_json::Value::Null,
        "{summary}"
    );
    assert!(
        after["by_version"]["v2"].as_u64().unwrap() >= 500,
        "{summary}"
    );
    let requests = summary["requests"].as_u64().unwrap();
    assert!(
        summary["succeeded"].as_u64().unwrap() as f64 >= 0.99 * requests as f64,
        "{summary}"
    );
}

/// Exit status 0 means the outcome happened: a run too short for the
/// rollback fails.
#[test]
fn a_rollout_scenario_that_does_not_reach_its_outcome_fails() {
    let state = tempfile::tempdir().unwrap();
    let (status, summary, stderr) = demo_json(
        state.path(),
        &["--scenario", "rollout-bad", "--duration", "4"],
    );
    assert!(!status.success(), "{summary}\nstderr:\n{stderr}");
    assert_eq!(summary["rollout"]["outcome_reached"], false, "{summary}");
    assert_ne!(summary["rollout"]["phase"], "RolledBack", "{summary}");
}
