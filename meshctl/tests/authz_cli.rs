//! `meshctl authz` as a user runs it against a manifest directory.

mod support;

use support::{demo_dir, meshctl_in as meshctl, text};

#[test]
fn authz_prints_who_may_call_each_port_and_why() {
    let dir = demo_dir();
    std::fs::write(
        dir.path().join("authz.yaml"),
        "apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: hello, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  ports: [8080]
  allow:
    - from: [{serviceAccount: {name: frontend}}, {namespace: monitoring}]
      to: [{paths: [{type: PathPrefix, value: /api}], methods: [GET]}]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: trial, namespace: default}
spec:
  mode: Audit
  ports: [9090]
  allow:
    - from: [{meshed: true}]
",
    )
    .unwrap();
    let out = meshctl(dir.path(), &["authz", "hello-v1"]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    let lines: Vec<Vec<&str>> = printed
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        lines[0],
        ["PORT", "PATH/METHOD", "CALLER", "POLICY", "MODE"],
        "{printed}"
    );
    assert_eq!(
        lines[1],
        [
            "8080",
            "GET /api*",
            "spiffe://cluster.local/ns/default/sa/frontend",
            "default/hello",
            "Enforce"
        ],
        "{printed}"
    );
    assert_eq!(
        lines[2],
        [
            "8080",
            "GET /api*",
            "namespace monitoring",
            "default/hello",
            "Enforce"
        ],
        "{printed}"
    );
    assert_eq!(
        lines[3],
        [
            "9090",
            "any (and TCP)",
            "any meshed identity",
            "default/trial",
            "Audit"
        ],
        "{printed}"
    );
    assert!(
        printed.contains("port 8080: default-deny, selected by default/hello"),
        "{printed}"
    );
    assert!(
        printed.contains("port 9090: only Audit policies (default/trial) select it: the namespace default all-unauthenticated decides"),
        "{printed}"
    );
    assert!(
        printed
            .contains("other ports: the namespace default all-unauthenticated applies (everyone)"),
        "{printed}"
    );

    let out = meshctl(dir.path(), &["authz", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no Pod default/nope"), "{}", text(&out));
}
