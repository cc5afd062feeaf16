//! `meshctl check` as a user runs it, where no API server answers: the
//! first item fails with its fix, nothing else is claimed, and the exit
//! status says it failed (the checks against an API are in
//! tests/tests/cluster_inject.rs, on the fake API server).

use std::process::Command;

fn check(output: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'http://127.0.0.1:{port}'}}\n\
             contexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{token: t}}\n"
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["check", "-o", output, "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap()
}

#[test]
fn an_unreachable_api_fails_the_first_item_with_its_fix_and_the_exit_status() {
    let table = check("table");
    assert!(!table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with("Pre-flight\n  ✖ Kubernetes API reachable: "),
        "{text}"
    );
    assert!(
        text.contains("fix: check the kubeconfig's current context"),
        "{text}"
    );
    assert!(text.ends_with("1 check(s) failed.\n"), "{text}");

    let json = check("json");
    assert!(!json.status.success());
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1, "{report:#}");
    assert_eq!(checks[0]["section"], "pre-flight");
    assert_eq!(checks[0]["ok"], false);
}
