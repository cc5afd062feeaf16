use std::path::Path;

use crate::model::Object;
use crate::source::manifest::{self, ManifestError};

const HELLO: &str = "\
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {ports: [{port: 8080}]}
";

fn policy(spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {{name: hello, namespace: default}}\nspec:\n{spec}"
    )
}

/// Parses and validates `policy.yaml` next to the hello Service.
fn load(yaml: &str) -> Result<Vec<Object>, ManifestError> {
    let file = Path::new("policy.yaml");
    let objects = manifest::parse(file, yaml)?;
    let mut all = manifest::parse(Path::new("hello.yaml"), HELLO).unwrap();
    all.extend(objects.iter().cloned());
    let all: Vec<&Object> = all.iter().collect();
    manifest::validate(file, &objects, &all)?;
    Ok(objects)
}

fn refusal(yaml: &str) -> String {
    match load(yaml) {
        Ok(objects) => panic!("accepted: {objects:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_complete_policy_parses_field_by_field() {
    let objects = load(&policy(
        "  targetRefs: [{group: \"\", kind: Service, name: hello}]
  outlierDetection:
    consecutiveFailures: 3
    baseEjectionTime: 500ms
    maxEjectionTime: 1m
    maxEjectionPercent: 30
  circuitBreaker: {maxRequests: 100}
",
    ))
    .unwrap();
    let [Object::ResiliencePolicy(p)] = &objects[..] else {
        panic!("{objects:?}")
    };
    let outlier = p.spec.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_failures, Some(3));
    assert_eq!(outlier.base_ejection_time.as_deref(), Some("500ms"));
    assert_eq!(outlier.max_ejection_time.as_deref(), Some("1m"));
    assert_eq!(outlier.max_ejection_percent, Some(30));
    assert_eq!(
        p.spec.circuit_breaker.as_ref().unwrap().max_requests,
        Some(100)
    );
    assert_eq!(p.spec.target_refs[0].name, "hello");
}

#[test]
fn a_target_that_does_not_exist_yet_is_accepted() {
    load(&policy(
        "  targetRefs: [{kind: Service, name: not-yet}]\n  circuitBreaker: {maxRequests: 5}\n",
    ))
    .expect("applies when the Service appears");
}

#[test]
fn unknown_fields_are_refused_with_file_object_and_field() {
    let err = refusal(&policy(
        "  targetRefs: [{kind: Service, name: hello}]\n  outlierDetection: {consecutiveFailure: 3}\n",
    ));
    assert!(
        err.starts_with(
            "policy.yaml: ResiliencePolicy hello: spec.outlierDetection.consecutiveFailure: \
             does not match the Kubernetes schema: unknown field `consecutiveFailure`, \
             expected one of `consecutiveFailures`"
        ),
        "{err}"
    );
    let err = refusal(&policy("  circuitBreakers: {maxRequests: 3}\n"));
    assert!(err.contains("unknown field `circuitBreakers`"), "{err}");
    let err = refusal(&policy(
        "  targetRefs: [{kind: Service, name: hello, namespace: other}]\n  circuitBreaker: {}\n",
    ));
    assert!(
        err.contains("unknown field `namespace`"),
        "targets are in the policy's namespace: {err}"
    );
}

#[test]
fn each_invalid_setting_is_refused_with_what_to_write_instead() {
    let outlier = |fields: &str| {
        policy(&format!(
            "  targetRefs: [{{kind: Service, name: hello}}]\n  outlierDetection: {{{fields}}}\n"
        ))
    };
    let cases = [
        (
            policy("  targetRefs: [{kind: Service, name: hello}]\n"),
            "spec has neither outlierDetection nor circuitBreaker; set one, or delete the policy",
        ),
        (
            policy("  targetRefs: [{group: apps, kind: Deployment, name: hello}]\n  circuitBreaker: {}\n"),
            "spec.targetRefs[0]: group \"apps\" kind \"Deployment\" cannot be targeted; use group \"\", kind Service",
        ),
        (
            policy("  targetRefs: [{kind: Service, name: \"\"}]\n  circuitBreaker: {}\n"),
            "spec.targetRefs[0].name is empty; name a Service in the policy's namespace",
        ),
        (
            policy("  outlierDetection: {consecutiveFailures: 3}\n"),
            "spec.outlierDetection applies to the Services in spec.targetRefs, and there are none; \
             add targetRefs (a route's ExtensionRef filter takes only circuitBreaker)",
        ),
        (
            outlier("baseEjectionTime: 1.5s"),
            "spec.outlierDetection.baseEjectionTime: \"1.5s\" is not a duration like 1s or 500ms",
        ),
        (
            outlier("maxEjectionTime: 0s"),
            "spec.outlierDetection.maxEjectionTime: \"0s\" must be longer than 0",
        ),
        (
            outlier("baseEjectionTime: 10s, maxEjectionTime: 5s"),
            "spec.outlierDetection: baseEjectionTime 10s is longer than maxEjectionTime 5s; \
             lower baseEjectionTime or raise maxEjectionTime",
        ),
        (
            outlier("baseEjectionTime: 2m"),
            "spec.outlierDetection: baseEjectionTime 2m is longer than maxEjectionTime \
             60s (the proxy's default); lower baseEjectionTime or raise maxEjectionTime",
        ),
        (
            outlier("maxEjectionPercent: 101"),
            "spec.outlierDetection.maxEjectionPercent 101 is not 0-100",
        ),
        (
            outlier("consecutiveFailures: 0, baseEjectionTime: 1s, maxEjectionPercent: 10"),
            "spec.outlierDetection: consecutiveFailures 0 disables ejection, so baseEjectionTime, \
             maxEjectionPercent would have no effect; remove them or set consecutiveFailures to 1 or more",
        ),
        (
            policy("  circuitBreaker: {maxRequests: 0}\n"),
            "spec.circuitBreaker.maxRequests 0 would refuse every request; use 1 or more",
        ),
    ];
    for (yaml, reason) in cases {
        assert_eq!(
            refusal(&yaml),
            format!("policy.yaml: ResiliencePolicy default/hello: {reason}"),
            "{yaml}"
        );
    }
}

#[test]
fn boundary_values_are_accepted() {
    let yaml = policy(
        "  targetRefs: [{kind: Service, name: hello}]
  outlierDetection: {consecutiveFailures: 0}
  circuitBreaker: {maxRequests: 1}
",
    );
    load(&yaml).expect("0 failures disables ejection; 1 request is a valid cap");
    let yaml = policy(
        "  targetRefs: [{kind: Service, name: hello}]
  outlierDetection: {baseEjectionTime: 60s, maxEjectionPercent: 100}
",
    );
    load(&yaml).expect("base equal to the default max, and 100%");
}

#[test]
fn a_wrong_api_version_names_the_supported_one() {
    let yaml = policy("  circuitBreaker: {}\n").replace("v1alpha1", "v1");
    let err = refusal(&yaml);
    assert!(
        err.contains("apiVersion \"trellis.dev/v1\" is not supported for ResiliencePolicy")
            && err.contains(
                "trellis.dev/v1alpha1 (HTTPFault, ResiliencePolicy, Rollout, AuthorizationPolicy)"
            ),
        "{err}"
    );
}
