//! Routes that name a ResiliencePolicy through an ExtensionRef filter, and
//! fields Trellis refuses rather than ignores.

use std::path::Path;

use crate::model::Object;
use crate::source::manifest;

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: limit, namespace: default}
spec:
  circuitBreaker: {maxRequests: 50}
---
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: hello, namespace: default}
spec:
  targetRefs: [{kind: Service, name: hello}]
  outlierDetection: {consecutiveFailures: 3}
  circuitBreaker: {maxRequests: 500}
";

/// An HTTPRoute for hello whose one rule has these filters.
fn route(filters: &[&str]) -> String {
    let filters: Vec<String> = filters
        .iter()
        .map(|name| {
            format!(
                "        - type: ExtensionRef\n          \
                 extensionRef: {{group: trellis.dev, kind: ResiliencePolicy, name: {name}}}\n"
            )
        })
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: hello, namespace: default}}\nspec:\n  \
         parentRefs: [{{group: \"\", kind: Service, name: hello}}]\n  rules:\n    \
         - filters:\n{}",
        filters.concat()
    )
}

fn validate(route_yaml: &str) -> Result<(), String> {
    let file = Path::new("route.yaml");
    let objects = manifest::parse(file, route_yaml).map_err(|e| e.to_string())?;
    let mut all = manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
    all.extend(objects.iter().cloned());
    let all: Vec<&Object> = all.iter().collect();
    manifest::validate(file, &objects, &all).map_err(|e| e.to_string())
}

#[test]
fn a_rule_may_name_a_circuit_breaker_policy() {
    validate(&route(&["limit"])).unwrap();
}

#[test]
fn a_rule_naming_an_unknown_policy_is_refused() {
    assert_eq!(
        validate(&route(&["nope"])).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].filters[0]: \
         ResiliencePolicy default/nope does not exist"
    );
}

#[test]
fn a_rule_naming_a_policy_with_outlier_detection_is_refused() {
    assert_eq!(
        validate(&route(&["hello"])).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].filters[0]: \
         ResiliencePolicy default/hello sets outlierDetection, which applies per Service \
         through its spec.targetRefs, not per route rule; reference a policy with only circuitBreaker"
    );
}

#[test]
fn a_rule_takes_one_policy() {
    assert_eq!(
        validate(&route(&["limit", "limit"])).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].filters[1]: \
         a rule takes one ResiliencePolicy, and filters[0] already names one"
    );
}

#[test]
fn other_extension_kinds_are_refused_with_the_supported_ones() {
    let yaml = route(&["limit"]).replace("kind: ResiliencePolicy", "kind: RateLimit");
    let err = validate(&yaml).unwrap_err();
    assert!(
        err.ends_with(
            "extensionRef trellis.dev/RateLimit is not supported; \
             use group trellis.dev, kind HTTPFault or ResiliencePolicy"
        ),
        "{err}"
    );
}

#[test]
fn filters_on_one_backend_are_refused_not_ignored() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: hello, namespace: default}\nspec:\n  \
                parentRefs: [{group: \"\", kind: Service, name: hello}]\n  rules:\n    \
                - backendRefs:\n      - name: hello\n        port: 8080\n        \
                filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: y}]}}]\n";
    assert_eq!(
        validate(yaml).unwrap_err(),
        "route.yaml: HTTPRoute default/hello: spec.rules[0].backendRefs[0].filters: \
         filters on one backend are not supported yet; move them to the rule's filters \
         (they then apply to all its backends) or split the rule"
    );
    // The same route without them is accepted.
    let plain = yaml.split("        filters").next().unwrap();
    validate(plain).unwrap();
}

#[test]
fn fields_trellis_does_not_read_are_refused_not_ignored() {
    let base = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: hello, namespace: default}\nspec:\n  \
                parentRefs: [{group: \"\", kind: Service, name: hello}]\n";
    let refused = [
        (
            "  rules: [{sessionPersistence: {type: Cookie}, backendRefs: [{name: hello, port: 8080}]}]\n",
            "spec.rules[0].sessionPersistence",
        ),
        // A typo the API server's schema would prune.
        (
            "  rules: [{backendRef: [{name: hello, port: 8080}]}]\n",
            "spec.rules[0].backendRef",
        ),
        (
            "  rules: [{matches: [{path: {value: /x}, header: [{name: a, value: b}]}]}]\n",
            "spec.rules[0].matches[0].header",
        ),
    ];
    for (spec, field) in refused {
        let err = validate(&format!("{base}{spec}")).unwrap_err();
        assert_eq!(
            err,
            format!(
                "route.yaml: HTTPRoute hello: {field}: Trellis does not implement this field; \
                 remove it (a route is never applied with part of it ignored)"
            )
        );
    }
    // GAMMA routes may carry hostnames, which a mesh must not act on.
    validate(&format!(
        "{base}  hostnames: [hello.example]\n  rules: [{{backendRefs: [{{name: hello, port: 8080}}]}}]\n"
    ))
    .unwrap();
}
