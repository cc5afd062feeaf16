//! Route status in cluster mode: the leader writes each HTTPRoute's and
//! GRPCRoute's
//! `status.parents[]` (controllerName `trellis.dev/mesh`, `Accepted` and
//! `ResolvedRefs` with Gateway API's reasons and `observedGeneration`)
//! through the fake API server's `/status` subresource, and real `kubectl`
//! reads it back. A refused route says why there, and the last good
//! version keeps serving.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use trellis_tests::fake_api::{FakeApi, Kubectl};
use trellis_tests::{burst, eventually, versions, HelloMesh};

const ROUTE: (&str, &str) = ("gateway.networking.k8s.io/v1", "HTTPRoute");
const GRPC_ROUTE: (&str, &str) = ("gateway.networking.k8s.io/v1", "GRPCRoute");

/// The HTTPRoute `hello` sending everything to `backend`, with `extra`
/// fields on its rule.
fn route(port: u16, backend: &str, extra: Value) -> Value {
    route_of(ROUTE, port, backend, extra)
}

/// The route of `kind` named `hello` sending everything to `backend`.
fn route_of(kind: (&str, &str), port: u16, backend: &str, extra: Value) -> Value {
    let mut rule = json!({"backendRefs": [{"name": backend, "port": port}]});
    if let (Some(rule), Some(extra)) = (rule.as_object_mut(), extra.as_object()) {
        rule.extend(extra.clone());
    }
    json!({
        "apiVersion": kind.0, "kind": kind.1,
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "hello"}],
            "rules": [rule],
        },
        // Another implementation's entry, which Trellis must leave alone.
        "status": {"parents": [{
            "parentRef": {"name": "a-gateway"},
            "controllerName": "example.com/gateway",
            "conditions": [],
        }]},
    })
}

/// Waits until Trellis' entry for the Service `hello` on the HTTPRoute has
/// the conditions `(type, status, reason)`, for the route's current
/// generation; returns the route.
async fn until_status(api: &FakeApi, expected: [(&str, &str, &str); 2]) -> Value {
    until_status_of(api, ROUTE, expected).await
}

/// [`until_status`] for the route of `kind`.
async fn until_status_of(
    api: &FakeApi,
    kind: (&str, &str),
    expected: [(&str, &str, &str); 2],
) -> Value {
    eventually(Duration::from_secs(10), "the route's status", || async {
        let route = api
            .objects(kind.0, kind.1)
            .into_iter()
            .next()
            .ok_or("no route")?;
        let generation = &route["metadata"]["generation"];
        let ours: Vec<&Value> = route["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["controllerName"] == "trellis.dev/mesh")
            .collect();
        let got: Vec<(String, String, String)> = ours
            .iter()
            .flat_map(|p| p["conditions"].as_array().into_iter().flatten())
            .filter(|c| &c["observedGeneration"] == generation)
            .map(|c| {
                let text = |f: &str| c[f].as_str().unwrap_or_default().to_string();
                (text("type"), text("status"), text("reason"))
            })
            .collect();
        let want: Vec<(String, String, String)> = expected
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        if ours.len() == 1
            && ours[0]["parentRef"] == json!({"group": "", "kind": "Service", "name": "hello"})
            && got == want
        {
            Ok(route)
        } else {
            Err(format!("{:#}", route["status"]))
        }
    })
    .await
}

/// Whether a burst of requests to `hello` is all answered by `version`.
async fn only(mesh: &HelloMesh, version: &str) -> Result<(), String> {
    let counts = versions(&burst(&mesh.http1(), &mesh.authority(), 40, 4).await);
    match counts.keys().collect::<Vec<_>>().as_slice() {
        [v] if v.as_str() == version => Ok(()),
        _ => Err(format!("{counts:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_reports_each_routes_conditions_and_a_refused_one_says_why() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster(api.clone()).await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };

    api.apply(route(mesh.port, "hello-v2", json!({})));
    let accepted = until_status(
        &api,
        [
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "True", "ResolvedRefs"),
        ],
    )
    .await;
    assert_eq!(
        accepted["status"]["parents"][0]["controllerName"], "example.com/gateway",
        "another controller's entry is kept: {:#}",
        accepted["status"]
    );
    eventually(Duration::from_secs(5), "all traffic on v2", || {
        only(&mesh, "v2")
    })
    .await;

    // A field Trellis does not implement: refused, and the field named.
    api.apply(route(
        mesh.port,
        "hello-v1",
        json!({"sessionPersistence": {"type": "Cookie"}}),
    ));
    let refused = until_status(
        &api,
        [
            ("Accepted", "False", "UnsupportedValue"),
            ("ResolvedRefs", "True", "ResolvedRefs"),
        ],
    )
    .await;
    let message = refused["status"]["parents"][1]["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("spec.rules[0].sessionPersistence"),
        "{message}"
    );
    // The last good version keeps serving.
    let counts = versions(&burst(&mesh.http1(), &mesh.authority(), 100, 4).await);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["v2"], "{counts:?}");

    // A backend that does not exist: served (its requests fail), and said.
    api.apply(route(mesh.port, "hello-v3", json!({})));
    until_status(
        &api,
        [
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "False", "BackendNotFound"),
        ],
    )
    .await;

    // kubectl, a second client, reads the same status.
    let printed = kubectl
        .run(&[
            "get",
            "httproutes.gateway.networking.k8s.io",
            "hello",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.parents[1].conditions[1].reason}",
        ])
        .await;
    assert_eq!(printed, "BackendNotFound");
}

/// A GRPCRoute is watched, routes and gets its status as an HTTPRoute does;
/// a filter GRPCRoute does not have is refused and named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcroutes_route_and_report_their_status() {
    let api = Arc::new(FakeApi::start().await);
    let mesh = HelloMesh::start_in_cluster(api.clone()).await;
    let Some(kubectl) = Kubectl::new(&api) else {
        return;
    };
    // Without matches a GRPCRoute's rule takes every request, so plain
    // HTTP requests show where it sends them.
    api.apply(route_of(GRPC_ROUTE, mesh.port, "hello-v2", json!({})));
    until_status_of(
        &api,
        GRPC_ROUTE,
        [
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "True", "ResolvedRefs"),
        ],
    )
    .await;
    eventually(Duration::from_secs(5), "all traffic on v2", || {
        only(&mesh, "v2")
    })
    .await;

    let redirect = json!({"filters": [{
        "type": "RequestRedirect",
        "requestRedirect": {"statusCode": 301},
    }]});
    api.apply(route_of(GRPC_ROUTE, mesh.port, "hello-v1", redirect));
    let refused = until_status_of(
        &api,
        GRPC_ROUTE,
        [
            ("Accepted", "False", "UnsupportedValue"),
            ("ResolvedRefs", "True", "ResolvedRefs"),
        ],
    )
    .await;
    let message = &refused["status"]["parents"][1]["conditions"][0]["message"];
    assert!(
        message
            .as_str()
            .unwrap_or_default()
            .contains("spec.rules[0].filters[0]"),
        "{message}"
    );
    // The last good version keeps serving.
    let counts = versions(&burst(&mesh.http1(), &mesh.authority(), 100, 4).await);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["v2"], "{counts:?}");

    let printed = kubectl
        .run(&[
            "get",
            "grpcroutes.gateway.networking.k8s.io",
            "hello",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.parents[1].conditions[0].reason}",
        ])
        .await;
    assert_eq!(printed, "UnsupportedValue");
}
