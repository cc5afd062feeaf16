//! What `meshctl inject` writes is valid Kubernetes: every object of its
//! output for every workload kind passes `kubernetes-validate --strict` for
//! 1.29 (native sidecars) and the newest version the tool knows. The tool
//! has no schema for `List`, so a List's items are validated one by one.
//! The cluster example (`examples/cluster/`) injects as its README says.

use std::path::Path;

use meshctl::inject::{transform, Mode};
use serde_json::Value;
use trellis_control_plane::inject::{Config, Injector};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../meshctl/tests/fixtures")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

/// Injection as `meshctl inject -f FILE --trust-bundle` does it, with a
/// fresh CA's bundle in `dir`.
fn inject_mode(dir: &Path) -> Mode {
    let ca = trellis_control_plane::identity::Ca::load_or_create(dir, "cluster.local").unwrap();
    Mode::Inject {
        injector: Box::new(Injector::new(Config::default(), "trellis", "cluster.local")),
        trust_bundle: ca.bundle_pem(),
        namespace: "default".into(),
    }
}

#[test]
fn the_cluster_example_injects_its_deployments_and_passes_the_rest_through() {
    let dir = tempfile::tempdir().unwrap();
    let mode = inject_mode(dir.path());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster/hello.yaml");
    let input = std::fs::read_to_string(path).unwrap();
    let out = transform(&input, &mode).unwrap();
    assert!(out.notes.is_empty(), "{:?}", out.notes);
    let before: Vec<Value> = serde_saphyr::from_multiple(&input).unwrap();
    let after: Vec<Value> = serde_saphyr::from_multiple(&out.text).unwrap();
    assert_eq!(before.len(), after.len());
    let mut deployments = 0;
    for (before, after) in before.iter().zip(&after) {
        if after["kind"] == "Deployment" {
            deployments += 1;
            let template = &after["spec"]["template"];
            let sa = template["spec"]["serviceAccountName"].as_str().unwrap();
            let proxy = template["spec"]["initContainers"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == "trellis-proxy"))
                .unwrap_or_else(|| panic!("no sidecar in {after:#}"));
            let identity = proxy["env"]
                .as_array()
                .and_then(|env| env.iter().find(|v| v["name"] == "TRELLIS_IDENTITY"))
                .map(|v| v["value"].clone());
            assert_eq!(
                identity,
                Some(format!("spiffe://cluster.local/ns/demo/sa/{sa}").into())
            );
        } else {
            assert_eq!(before, after, "only workloads change");
        }
    }
    assert_eq!(deployments, 3);
    // Injecting the output again changes nothing.
    assert_eq!(transform(&out.text, &mode).unwrap().text, out.text);
    let file = dir.path().join("hello-injected.yaml");
    std::fs::write(&file, &out.text).unwrap();
    if let Some(result) = trellis_tests::kube_validate::strict(&file) {
        result.unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn injected_workloads_pass_strict_validation() {
    let dir = tempfile::tempdir().unwrap();
    let mode = inject_mode(dir.path());
    let out = transform(&fixture("workloads.yaml"), &mode).unwrap();
    assert!(out.notes.is_empty(), "{:?}", out.notes);

    // Lists unpacked: the tool has no schema for them.
    let mut objects = Vec::new();
    for doc in serde_saphyr::from_multiple::<Value>(&out.text).unwrap() {
        match doc["kind"].as_str() {
            Some("List") => objects.extend(doc["items"].as_array().unwrap().iter().cloned()),
            _ => objects.push(doc),
        }
    }
    assert_eq!(objects.len(), 10);
    let text: String = objects
        .iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).unwrap()))
        .collect();
    let file = dir.path().join("injected.yaml");
    std::fs::write(&file, text).unwrap();
    if let Some(result) = trellis_tests::kube_validate::strict(&file) {
        result.unwrap_or_else(|e| panic!("{e}"));
    }
}
