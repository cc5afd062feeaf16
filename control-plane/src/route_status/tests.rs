use std::path::Path;

use super::*;
use crate::model::Object;

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec: {ports: [{port: 80}]}
";

fn document(spec: &str) -> serde_json::Value {
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: r, namespace: default}}\nspec:\n{spec}"
    );
    serde_saphyr::from_str(&yaml).unwrap()
}

fn statuses(spec: &str, refs: Refs) -> Vec<ParentStatus> {
    let objects = crate::source::manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
    let all: Vec<&Object> = objects.iter().collect();
    status_of_document(&document(spec), &References::loaded(&all), refs)
}

/// `(Accepted status, reason), (ResolvedRefs status, reason)` per parent.
fn summary(spec: &str, refs: Refs) -> Vec<[(&'static str, &'static str); 2]> {
    statuses(spec, refs)
        .iter()
        .map(|p| {
            [
                (p.accepted.status, p.accepted.reason),
                (p.resolved_refs.status, p.resolved_refs.reason),
            ]
        })
        .collect()
}

const PARENT: &str = "  parentRefs: [{group: \"\", kind: Service, name: echo}]\n";

#[test]
fn a_good_route_is_accepted_with_its_references_resolved() {
    let spec = format!("{PARENT}  rules: [{{backendRefs: [{{name: echo, port: 80}}]}}]\n");
    assert_eq!(
        summary(&spec, Refs::Report),
        [[("True", "Accepted"), ("True", "ResolvedRefs")]]
    );
}

#[test]
fn each_problem_has_its_condition_and_reason() {
    let missing = format!("{PARENT}  rules: [{{backendRefs: [{{name: nope, port: 80}}]}}]\n");
    // The API server serves it, and the missing backend fails its requests.
    assert_eq!(
        summary(&missing, Refs::Report),
        [[("True", "Accepted"), ("False", "BackendNotFound")]]
    );
    // A manifest file is refused whole instead.
    assert_eq!(
        summary(&missing, Refs::Refuse),
        [[("False", "UnresolvedRefs"), ("False", "BackendNotFound")]]
    );
    let kind = format!(
        "{PARENT}  rules: [{{backendRefs: [{{group: example.com, kind: Bucket, name: b}}]}}]\n"
    );
    assert_eq!(
        summary(&kind, Refs::Report),
        [[("True", "Accepted"), ("False", "InvalidKind")]]
    );
    let unsupported = format!("{PARENT}  rules: [{{sessionPersistence: {{type: Cookie}}}}]\n");
    let status = statuses(&unsupported, Refs::Report);
    assert_eq!(
        (status[0].accepted.status, status[0].accepted.reason),
        ("False", "UnsupportedValue")
    );
    assert!(
        status[0]
            .accepted
            .message
            .starts_with("spec.rules[0].sessionPersistence: "),
        "the message names the field: {}",
        status[0].accepted.message
    );
    let bad_value = format!("{PARENT}  rules: [{{timeouts: {{request: soon}}}}]\n");
    assert_eq!(
        summary(&bad_value, Refs::Report)[0][0],
        ("False", "UnsupportedValue")
    );
}

#[test]
fn each_service_parent_gets_its_own_entry() {
    let spec = "  parentRefs:\n  - {group: \"\", kind: Service, name: echo}\n  \
                - {group: \"\", kind: Service, name: gone}\n  \
                - {name: a-gateway}\n  rules: [{}]\n";
    assert_eq!(
        summary(spec, Refs::Report),
        [
            [("True", "Accepted"), ("True", "ResolvedRefs")],
            [("False", "NoMatchingParent"), ("True", "ResolvedRefs")],
        ],
        "a Gateway parent is not the mesh's to report on"
    );
}
