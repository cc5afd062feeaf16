//! The HTTPRoute a rollout manages, for where the rollout is: the cohort
//! rule (A/B) first, then the weighted split of everything else.

use crate::model::{
    BackendRef, HttpHeaderMatch, HttpRouteMatch, HttpRouteRule, HttpRouteSpec, ObjectMeta,
    ParentReference, Rollout, RolloutStatus, GATEWAY_API_VERSION, ROLLOUT_ANNOTATION,
};
use crate::model::{Cohort, HttpRoute};

use super::plan::Plan;

/// Who writes the rollouts' routes (the label `app.kubernetes.io/managed-by`).
pub const MANAGER: &str = "trellis-rollouts";

/// The route for `status` (its weight and cohort); `existing` is the route
/// as it is now, whose metadata (labels, annotations) is kept.
pub fn desired(
    rollout: &Rollout,
    plan: &Plan,
    status: &RolloutStatus,
    existing: Option<&HttpRoute>,
) -> HttpRoute {
    let key = rollout.metadata.key();
    let mut metadata = existing.map_or_else(ObjectMeta::default, |r| ObjectMeta {
        labels: r.metadata.labels.clone(),
        annotations: r.metadata.annotations.clone(),
        ..ObjectMeta::default()
    });
    metadata.name = rollout.route_name().to_string();
    metadata.namespace = Some(key.namespace.clone());
    metadata
        .labels
        .insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    metadata
        .annotations
        .insert(ROLLOUT_ANNOTATION.into(), key.name.clone());

    let backend = |name: &str, weight: u32| BackendRef {
        group: None,
        kind: None,
        name: name.to_string(),
        namespace: None,
        port: Some(plan.port),
        weight: Some(weight),
        filters: Vec::new(),
    };
    let backends = &rollout.spec.backends;
    let split = match status.canary_weight {
        0 => vec![backend(&backends.stable, 1)],
        100 => vec![backend(&backends.canary, 1)],
        w => vec![
            backend(&backends.stable, 100 - w),
            backend(&backends.canary, w),
        ],
    };
    let mut rules = Vec::new();
    if let (true, Some(cohort)) = (status.cohort, &plan.cohort) {
        rules.push(HttpRouteRule {
            name: Some("cohort".into()),
            matches: vec![cohort_match(cohort)],
            backend_refs: vec![backend(&backends.canary, 1)],
            ..HttpRouteRule::default()
        });
    }
    rules.push(HttpRouteRule {
        name: Some("split".into()),
        backend_refs: split,
        ..HttpRouteRule::default()
    });
    HttpRoute {
        api_version: GATEWAY_API_VERSION.into(),
        kind: "HTTPRoute".into(),
        metadata,
        spec: HttpRouteSpec {
            parent_refs: vec![ParentReference {
                group: Some(String::new()),
                kind: Some("Service".into()),
                name: rollout.spec.service.clone(),
                namespace: None,
                port: Some(plan.port),
            }],
            rules,
            ..HttpRouteSpec::default()
        },
    }
}

/// Whether `current` already routes as `desired` does (metadata included).
pub fn matches(current: &HttpRoute, desired: &HttpRoute) -> bool {
    current.spec == desired.spec
        && desired
            .metadata
            .labels
            .iter()
            .all(|(k, v)| current.metadata.labels.get(k) == Some(v))
        && desired
            .metadata
            .annotations
            .iter()
            .all(|(k, v)| current.metadata.annotations.get(k) == Some(v))
}

/// One HTTPRoute match for the whole cohort; a cookie is a regular
/// expression on the `Cookie` header (Gateway API has no cookie match;
/// the proxy anchors it to the whole value).
fn cohort_match(cohort: &Cohort) -> HttpRouteMatch {
    let exact = |m: &HttpHeaderMatch| HttpHeaderMatch {
        kind: "Exact".into(),
        name: m.name.clone(),
        value: m.value.clone(),
    };
    let mut headers: Vec<HttpHeaderMatch> = cohort.headers.iter().map(exact).collect();
    headers.extend(cohort.cookies.iter().map(|c| HttpHeaderMatch {
        kind: "RegularExpression".into(),
        name: "cookie".into(),
        value: format!(
            "(.*;\\s*)?{}={}(\\s*;.*)?",
            regex::escape(&c.name),
            regex::escape(&c.value)
        ),
    }));
    HttpRouteMatch {
        headers,
        query_params: cohort.query_params.iter().map(exact).collect(),
        ..HttpRouteMatch::default()
    }
}
