//! Pre-flight: is the cluster one the mesh can run on.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use kube::Client;
use trellis_control_plane::permissions::{Scope, PERMISSIONS};

use super::{why, Item, Section};

/// Native sidecars (`restartPolicy: Always` init containers) are on by
/// default from Kubernetes 1.29.
const MINIMUM_MINOR: u32 = 29;
const CONTROLLER_SERVICE_ACCOUNT: &str = "trellis-controller";
/// The kinds the mesh reads that CRDs provide: (group/version, plural).
const CUSTOM_RESOURCES: &[(&str, &str)] = &[
    ("gateway.networking.k8s.io/v1", "httproutes"),
    ("gateway.networking.k8s.io/v1", "grpcroutes"),
    ("trellis.dev/v1alpha1", "httpfaults"),
    ("trellis.dev/v1alpha1", "resiliencepolicies"),
    ("trellis.dev/v1alpha1", "rollouts"),
    ("trellis.dev/v1alpha1", "authorizationpolicies"),
];

pub(super) fn kubernetes_version(major: &str, minor: &str) -> Item {
    let name = "Kubernetes ≥ 1.29 (native sidecars)";
    // Minor versions may carry a suffix ("29+" on some providers).
    let minor_number: Option<u32> = minor.trim_end_matches('+').parse().ok();
    match (major, minor_number) {
        ("1", Some(m)) if m >= MINIMUM_MINOR => {
            Item::pass(Section::PreFlight, name, format!("{major}.{m}"))
        }
        _ => Item::fail(
            Section::PreFlight,
            name,
            format!("the API server is {major}.{minor}"),
            "upgrade the cluster to Kubernetes 1.29 or newer: the proxy runs as a native sidecar (an init container with restartPolicy: Always)",
        ),
    }
}

pub(super) async fn custom_resources(client: &Client) -> Item {
    let name = "CRDs installed";
    let mut missing = Vec::new();
    for (group_version, plural) in CUSTOM_RESOURCES {
        let served = client
            .list_api_group_resources(group_version)
            .await
            .is_ok_and(|list| list.resources.iter().any(|r| r.name == *plural));
        if !served {
            missing.push(format!("{plural}.{group_version}"));
        }
    }
    if missing.is_empty() {
        return Item::pass(
            Section::PreFlight,
            name,
            "HTTPRoute (Gateway API), HTTPFault, ResiliencePolicy, Rollout, AuthorizationPolicy",
        );
    }
    let gateway = missing
        .iter()
        .any(|m| m.contains("gateway.networking.k8s.io"));
    let fix = if gateway {
        "install the Gateway API CRDs (standard channel, v1.2 or newer), then the chart's: meshctl install | kubectl apply -f -"
    } else {
        "install the chart's CRDs: meshctl install | kubectl apply -f - (or helm install)"
    };
    Item::fail(
        Section::PreFlight,
        name,
        format!("not served: {}", missing.join(", ")),
        fix,
    )
}

/// Asks the API server, in a SubjectAccessReview per permission, whether
/// the controller's service account may do what it needs.
pub(super) async fn controller_rbac(client: &Client, namespace: &str) -> Item {
    let name = "RBAC for the controller";
    let user = format!("system:serviceaccount:{namespace}:{CONTROLLER_SERVICE_ACCOUNT}");
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for permission in PERMISSIONS {
        let scope = match permission.scope {
            Scope::Cluster => None,
            Scope::ControllerNamespace => Some(namespace.to_string()),
        };
        for (verb, object) in permission.grants() {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    groups: Some(vec![
                        "system:serviceaccounts".into(),
                        format!("system:serviceaccounts:{namespace}"),
                        "system:authenticated".into(),
                    ]),
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(permission.group.into()),
                        resource: Some(permission.resource.into()),
                        verb: Some(verb.to_string()),
                        namespace: scope.clone(),
                        name: object.map(str::to_string),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let allowed = match reviews.create(&PostParams::default(), &review).await {
                    Ok(answer) => answer.status.is_some_and(|s| s.allowed),
                    Err(e) => {
                        return Item::fail(
                            Section::PreFlight,
                            name,
                            format!("cannot ask the API server (SubjectAccessReview): {}", why(&e)),
                            "run meshctl check as a user who may create subjectaccessreviews (cluster-admin)",
                        )
                    }
                };
            if !allowed {
                let group = if permission.group.is_empty() {
                    "core"
                } else {
                    permission.group
                };
                let object = object.map(|n| format!(" {n}")).unwrap_or_default();
                let place = scope
                    .as_deref()
                    .map(|ns| format!(" in {ns}"))
                    .unwrap_or_default();
                missing.push(format!(
                    "{verb} {}{object} ({group}){place}",
                    permission.resource
                ));
            }
        }
    }
    if missing.is_empty() {
        Item::pass(
            Section::PreFlight,
            name,
            format!("{user} may do all it needs"),
        )
    } else {
        Item::fail(
            Section::PreFlight,
            name,
            format!("{user} may not: {}", missing.join("; ")),
            "apply the chart's ClusterRole, Role and bindings: meshctl install | kubectl apply -f - (or helm upgrade)",
        )
    }
}
