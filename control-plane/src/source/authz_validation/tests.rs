//! Malformed AuthorizationPolicies are refused with the field named.

use std::path::Path;

use crate::model::Object;
use crate::source::manifest;

fn refusal(spec: &str) -> String {
    let yaml = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
    );
    let objects = match manifest::parse(Path::new("p.yaml"), &yaml) {
        Ok(objects) => objects,
        Err(e) => return e.to_string(),
    };
    let all: Vec<&Object> = objects.iter().collect();
    manifest::validate(Path::new("p.yaml"), &objects, &all)
        .expect_err("refused")
        .to_string()
}

#[test]
fn each_mistake_is_refused_with_the_file_object_and_field() {
    for (spec, says) in [
        ("  allow: [{from: []}]\n", "p.yaml: AuthorizationPolicy default/p: spec.allow[0].from is empty"),
        ("  allow: [{from: [{}]}]\n", "spec.allow[0].from[0] sets 0 of"),
        ("  allow: [{from: [{meshed: true, namespace: x}]}]\n", "sets 2 of"),
        ("  allow: [{from: [{meshed: false}]}]\n", "meshed is false"),
        ("  allow: [{from: [{identity: \"spiffe://x/sa/y\"}]}]\n", "spec.allow[0].from[0].identity"),
        ("  allow: [{from: [{meshed: true}], to: [{paths: [{type: RegularExpression, value: /x}]}]}]\n", "use PathPrefix or Exact"),
        ("  allow: [{from: [{meshed: true}], to: [{paths: [{value: api}]}]}]\n", "must start with /"),
        ("  allow: [{from: [{meshed: true}], to: [{methods: [get]}]}]\n", "is not an HTTP method"),
        ("  allow: [{from: [{meshed: true}], to: [{}]}]\n", "has neither paths nor methods"),
        ("  ports: [0]\n", "spec.ports[0] is 0"),
        ("  mode: Dry\n", "spec.mode"),
        ("  allow: [{from: [{serviceAcount: {name: x}}]}]\n", "unknown field `serviceAcount`"),
    ] {
        let refusal = refusal(spec);
        assert!(refusal.contains(says), "{spec}: {refusal}");
    }
}

#[test]
fn a_namespace_default_must_be_a_known_policy() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, annotations: {trellis.dev/default-inbound-policy: open}}\n";
    let objects = manifest::parse(Path::new("ns.yaml"), yaml).unwrap();
    let all: Vec<&Object> = objects.iter().collect();
    let error = manifest::validate(Path::new("ns.yaml"), &objects, &all).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("use all-unauthenticated, all-meshed or deny"),
        "{error}"
    );
}
