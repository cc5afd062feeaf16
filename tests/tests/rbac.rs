//! The controller's API permissions (`control-plane::permissions`, which
//! the chart's ClusterRole and Role are held equal to in `chart.rs`) are
//! exactly what it uses: run as its service account against the fake API
//! server with RBAC granting only those permissions, a mesh serving
//! requests makes no call the RBAC refuses, and uses every permission
//! listed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use trellis_control_plane::permissions::{Scope, PERMISSIONS};
use trellis_proto::{CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT};
use trellis_tests::cluster_ca::{authenticate_as_controller, controller_user};
use trellis_tests::fake_api::{Attributes, FakeApi};
use trellis_tests::{eventually, HelloMesh};

/// RBAC objects granting exactly `PERMISSIONS` to the controller's
/// service account.
fn rbac_objects() -> Vec<Value> {
    let rules = |scope: Scope| -> Vec<Value> {
        PERMISSIONS
            .iter()
            .filter(|p| p.scope == scope)
            .map(|p| {
                let mut rule =
                    json!({"apiGroups": [p.group], "resources": [p.resource], "verbs": p.verbs});
                if !p.names.is_empty() {
                    rule["resourceNames"] = json!(p.names);
                }
                rule
            })
            .collect()
    };
    let subjects = json!([{"kind": "ServiceAccount", "name": CONTROLLER_SERVICE_ACCOUNT, "namespace": CONTROLLER_NAMESPACE}]);
    let role_ref = |kind: &str| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": "trellis-controller"});
    let rbac = "rbac.authorization.k8s.io/v1";
    vec![
        json!({"apiVersion": rbac, "kind": "ClusterRole", "metadata": {"name": "trellis-controller"},
               "rules": rules(Scope::Cluster)}),
        json!({"apiVersion": rbac, "kind": "ClusterRoleBinding", "metadata": {"name": "trellis-controller"},
               "roleRef": role_ref("ClusterRole"), "subjects": subjects}),
        json!({"apiVersion": rbac, "kind": "Role",
               "metadata": {"name": "trellis-controller", "namespace": CONTROLLER_NAMESPACE},
               "rules": rules(Scope::ControllerNamespace)}),
        json!({"apiVersion": rbac, "kind": "RoleBinding",
               "metadata": {"name": "trellis-controller", "namespace": CONTROLLER_NAMESPACE},
               "roleRef": role_ref("Role"), "subjects": subjects}),
    ]
}

/// Whether a call is one use of `verb` on `name` of the permission.
fn uses(
    call: &Attributes,
    permission: &trellis_control_plane::permissions::Permission,
    verb: &str,
    name: Option<&str>,
) -> bool {
    call.group == permission.group
        && call.resource == permission.resource
        && call.subresource.is_none()
        && call.verb == verb
        && (permission.scope == Scope::Cluster
            || call.namespace.as_deref() == Some(CONTROLLER_NAMESPACE))
        && name.is_none_or(|name| call.name.as_deref() == Some(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_uses_exactly_its_listed_permissions() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster_with(api.clone(), |config| {
        authenticate_as_controller(config, &api);
        for object in rbac_objects() {
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

    let user = controller_user();
    let calls = eventually(
        Duration::from_secs(10),
        "the controller renews its Lease",
        || {
            let calls = api.calls_by(&user);
            let renewed = calls
                .iter()
                .any(|(call, _)| call.resource == "leases" && call.verb == "update");
            async move {
                if renewed {
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
    for permission in PERMISSIONS {
        let names: Vec<Option<&str>> = if permission.names.is_empty() {
            vec![None]
        } else {
            permission.names.iter().map(|n| Some(*n)).collect()
        };
        for verb in permission.verbs {
            for name in &names {
                assert!(
                    calls.iter().any(|(call, _)| uses(call, permission, verb, *name)),
                    "the controller never used {verb} {} {name:?} ({permission:?}); calls: {calls:#?}",
                    permission.resource
                );
            }
        }
    }
}
