//! Resolving a pod's inbound policy from the store's objects.

use trellis_proto::discovery::{caller, DefaultPolicy};

use crate::source::manifest;
use crate::store::{Store, EVERY_PORT};

fn store(yaml: &str) -> std::sync::Arc<Store> {
    let store = Store::new("cluster.local");
    let objects = manifest::parse(std::path::Path::new("t.yaml"), yaml).unwrap();
    store.replace_all(objects);
    store
}

const PODS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: hello-v1, labels: {app: hello}}
spec: {serviceAccountName: hello, containers: [{name: app, image: hello}]}
status: {podIP: 10.0.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec: {containers: [{name: app, image: web}]}
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: hello}
spec:
  selector: {matchLabels: {app: hello}}
  ports: [8080]
  allow:
    - from: [{serviceAccount: {name: web}}, {namespace: monitoring}]
      to: [{paths: [{type: Exact, value: /}], methods: [GET]}]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: trial}
spec:
  mode: Audit
  allow:
    - from: [{meshed: true}]
";

#[test]
fn a_pods_policies_are_resolved_per_port_with_service_accounts_as_spiffe_ids() {
    let store = store(PODS);
    let policy = store.inbound_policy("default", "hello-v1", "");
    assert_eq!(policy.workload, "default/hello-v1");
    assert_eq!(policy.default_policy(), DefaultPolicy::AllUnauthenticated);
    let ports: Vec<u32> = policy.ports.iter().map(|p| p.port).collect();
    assert_eq!(ports, [EVERY_PORT, 8080]);
    let http = &policy.ports[1];
    assert_eq!(http.enforce_policies, ["default/hello"]);
    assert_eq!(http.audit_policies, ["default/trial"]);
    let first = &http.rules[0];
    assert_eq!(
        first.callers[0].kind,
        Some(caller::Kind::Identity(
            "spiffe://cluster.local/ns/default/sa/web".into()
        ))
    );
    assert!(first.http[0].paths[0].exact);
    // Every other port: only the audit policy, which selects all pods.
    assert!(policy.ports[0].enforce_policies.is_empty());
    // The same pod by its IP; the web pod has only the audit policy.
    assert_eq!(store.inbound_policy("default", "", "10.0.0.7"), policy);
    let web = store.inbound_policy("default", "web", "");
    assert_eq!(web.ports.len(), 1);
    // Another namespace's proxy never gets this namespace's pod.
    assert_eq!(store.inbound_policy("other", "hello-v1", "").workload, "");
}

#[test]
fn an_unknown_pod_gets_the_policies_that_select_every_pod() {
    let store = store(PODS);
    for (pod, ip) in [("", "127.0.0.1"), ("missing", ""), ("", "10.9.9.9")] {
        let policy = store.inbound_policy("default", pod, ip);
        assert_eq!(policy.workload, "");
        let names: Vec<&str> = policy
            .ports
            .iter()
            .flat_map(|p| &p.audit_policies)
            .map(String::as_str)
            .collect();
        assert_eq!(names, ["default/trial"], "{pod} {ip}");
    }
}

#[test]
fn the_namespace_annotation_sets_the_default() {
    for (value, expected) in [
        ("all-meshed", DefaultPolicy::AllMeshed),
        ("deny", DefaultPolicy::Deny),
        ("all-unauthenticated", DefaultPolicy::AllUnauthenticated),
    ] {
        let store = store(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, annotations: {{trellis.dev/default-inbound-policy: {value}}}}}\n"
        ));
        assert_eq!(
            store.inbound_policy("default", "", "").default_policy(),
            expected
        );
    }
}
