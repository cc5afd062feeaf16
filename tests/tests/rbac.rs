//! The chart's RBAC is exactly what the controller uses: run as its
//! service account against the fake API server holding the chart's
//! ClusterRole, Role and bindings (as `meshctl install` renders them, which
//! `chart.rs` holds equal to Helm's), a mesh serving requests makes no call
//! the RBAC refuses, and uses every grant (a rollout runs, so its status
//! and its route are written too). The same grants are
//! `control-plane::permissions`, what `meshctl check` asks about.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use trellis_control_plane::permissions::{Scope, PERMISSIONS};
use trellis_proto::CONTROLLER_NAMESPACE;
use trellis_tests::cluster_ca::{authenticate_as_controller, controller_user};
use trellis_tests::fake_api::{Attributes, FakeApi};
use trellis_tests::{eventually, HelloMesh};

const RBAC_KINDS: [&str; 4] = ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// The chart's RBAC objects, as `meshctl install` prints them.
fn chart_rbac() -> Vec<Value> {
    let args = meshctl::install::InstallArgs::new(vec![], vec![], None, CONTROLLER_NAMESPACE);
    let yaml = meshctl::install::render(&args).expect("meshctl install renders");
    let objects: Vec<Value> = serde_saphyr::from_multiple(&yaml).expect("YAML");
    objects
        .into_iter()
        .filter(|o| RBAC_KINDS.contains(&o["kind"].as_str().unwrap_or_default()))
        .collect()
}

/// One grant: (namespace or none, group, resource, verb, name or none).
type Grant = (Option<String>, String, String, String, Option<String>);

/// Every grant the chart's roles make to the controller.
fn chart_grants(objects: &[Value]) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for role in objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let namespace = role["metadata"]["namespace"].as_str().map(str::to_string);
        for rule in role["rules"].as_array().into_iter().flatten() {
            let list = |key: &str| -> Vec<Option<String>> {
                match rule[key].as_array() {
                    Some(items) if !items.is_empty() => items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect(),
                    _ => vec![None],
                }
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        for name in list("resourceNames") {
                            grants.insert((
                                namespace.clone(),
                                group.clone().unwrap_or_default(),
                                resource.clone().unwrap_or_default(),
                                verb.clone().unwrap_or_default(),
                                name,
                            ));
                        }
                    }
                }
            }
        }
    }
    grants
}

fn listed_grants() -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for p in PERMISSIONS {
        let namespace = match p.scope {
            Scope::Cluster => None,
            Scope::ControllerNamespace => Some(CONTROLLER_NAMESPACE.to_string()),
        };
        for (verb, name) in p.grants() {
            grants.insert((
                namespace.clone(),
                p.group.into(),
                p.resource.into(),
                verb.into(),
                name.map(str::to_string),
            ));
        }
    }
    grants
}

/// Whether a call is one use of the grant (a subresource's grant names it
/// as RBAC rules do: `rollouts/status`).
fn uses(call: &Attributes, (namespace, group, resource, verb, name): &Grant) -> bool {
    let called = match &call.subresource {
        Some(sub) => format!("{}/{sub}", call.resource),
        None => call.resource.clone(),
    };
    call.group == *group
        && called == *resource
        && call.verb == *verb
        && (namespace.is_none() || call.namespace == *namespace)
        && (name.is_none() || call.name == *name)
}

#[test]
fn the_chart_grants_what_the_permission_list_says() {
    assert_eq!(chart_grants(&chart_rbac()), listed_grants());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_makes_only_calls_the_chart_grants_and_uses_every_grant() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster_with(api.clone(), |config| {
        authenticate_as_controller(config, &api);
        for object in chart_rbac() {
            api.apply(object);
        }
        // Renewed every second, so the test sees an update soon.
        config.lease_duration = Duration::from_secs(3);
    })
    .await;
    // Certificates (TokenReviews) and discovery (watches) served requests.
    mesh.http1()
        .get(&mesh.authority(), "/")
        .await
        .expect("a request through two sidecars");
    // A rollout: its status written, its route created and then applied.
    api.apply(rollout());
    // A GRPCRoute (on another port, so it takes no HTTP traffic): its
    // status written.
    api.apply(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "hello-grpc", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "hello", "port": 9}],
            "rules": [{"backendRefs": [{"name": "hello-v1", "port": 9}]}],
        },
    }));

    let user = controller_user();
    let calls = eventually(
        Duration::from_secs(10),
        "the controller renews its Lease and writes the rollout's status and route",
        || {
            let calls = api.calls_by(&user);
            let made = |resource: &str, subresource: Option<&str>, verb: &str| {
                calls.iter().any(|(call, _)| {
                    call.resource == resource
                        && call.subresource.as_deref() == subresource
                        && call.verb == verb
                })
            };
            let done = made("leases", None, "update")
                && made("rollouts", Some("status"), "patch")
                && made("httproutes", None, "create")
                && made("grpcroutes", Some("status"), "patch");
            async move {
                if done {
                    Ok(calls)
                } else {
                    Err(format!("calls so far: {calls:#?}"))
                }
            }
        },
    )
    .await;
    let refused: Vec<&(Attributes, u16)> =
        calls.iter().filter(|(_, status)| *status == 403).collect();
    assert!(
        refused.is_empty(),
        "calls the permissions do not grant: {refused:#?}"
    );
    for grant in chart_grants(&chart_rbac()) {
        assert!(
            calls.iter().any(|(call, _)| uses(call, &grant)),
            "the chart grants {grant:?}, which the controller never used; its calls: {calls:#?}"
        );
    }
}

/// A rollout of `hello` from `hello-v1` to `hello-v2` that holds its first
/// step until promoted.
fn rollout() -> Value {
    serde_json::json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Rollout",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {
            "service": "hello",
            "backends": {"stable": "hello-v1", "canary": "hello-v2"},
            "steps": [{"weight": 50, "pause": {}}],
            "analysis": {"interval": "10s", "successRate": 99},
        },
    })
}
