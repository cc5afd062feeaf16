//! What `meshctl inject` writes is valid Kubernetes: every object of its
//! output for every workload kind passes `kubernetes-validate --strict` for
//! 1.29 (native sidecars) and the newest version the tool knows. The tool
//! has no schema for `List`, so a List's items are validated one by one.

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

#[test]
fn injected_workloads_pass_strict_validation() {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        trellis_control_plane::identity::Ca::load_or_create(dir.path(), "cluster.local").unwrap();
    let mode = Mode::Inject {
        injector: Box::new(Injector::new(Config::default(), "trellis", "cluster.local")),
        trust_bundle: ca.bundle_pem(),
        namespace: "default".into(),
    };
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
