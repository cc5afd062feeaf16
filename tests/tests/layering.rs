//! The crates' layering, as `cargo metadata` sees it: the proxy and the
//! control plane share only the small common crates, and `meshctl` is the
//! one crate (besides these tests) above both.

use std::collections::{BTreeMap, BTreeSet};

/// Each workspace crate and the workspace crates it depends on (normal
/// dependencies, not dev- or build-).
fn workspace_graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_string())
                .filter(|name| members.contains(name))
                .collect();
            (p["name"].as_str().expect("name").to_string(), deps)
        })
        .collect()
}

/// Everything `name` depends on, directly or not.
fn closure(graph: &BTreeMap<String, BTreeSet<String>>, name: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut next = vec![name.to_string()];
    while let Some(crate_name) = next.pop() {
        for dep in &graph[&crate_name] {
            if seen.insert(dep.clone()) {
                next.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn proxy_and_control_plane_share_only_the_common_crates_and_meshctl_sits_above_both() {
    let graph = workspace_graph();
    let control_plane = closure(&graph, "trellis-control-plane");
    let proxy = closure(&graph, "trellis-proxy");
    assert!(
        !control_plane.contains("trellis-proxy"),
        "{control_plane:?}"
    );
    assert!(!proxy.contains("trellis-control-plane"), "{proxy:?}");
    let shared: BTreeSet<_> = control_plane.intersection(&proxy).cloned().collect();
    assert_eq!(
        shared,
        BTreeSet::from(["trellis-common".to_string(), "trellis-proto".to_string()])
    );
    let above_both: BTreeSet<&str> = graph
        .keys()
        .filter(|name| {
            let deps = closure(&graph, name);
            deps.contains("trellis-proxy") && deps.contains("trellis-control-plane")
        })
        .map(String::as_str)
        .collect();
    assert_eq!(above_both, BTreeSet::from(["meshctl", "trellis-tests"]));
}
