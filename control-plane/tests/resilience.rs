//! A ResiliencePolicy reaches proxies over discovery: on the Snapshot of
//! every Service it targets, and on the route rules that name it; an edit
//! of the manifest reaches open streams.

mod support;

use std::time::Duration;

use tonic::Streaming;
use trellis_proto::discovery::endpoint_update::Kind;
use trellis_proto::discovery::{
    CircuitBreaker, EndpointUpdate, OutlierDetection, Resilience, Routes, Snapshot,
};

use support::{connect, metrics, request, series, start, HELLO};

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hello, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: hello}]
  rules:
    - filters:
        - type: ExtensionRef
          extensionRef: {group: trellis.dev, kind: ResiliencePolicy, name: hello-route}
";

const POLICIES: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: hello, namespace: default}
spec:
  targetRefs: [{group: \"\", kind: Service, name: hello}]
  outlierDetection:
    consecutiveFailures: 5
    baseEjectionTime: 1s
    maxEjectionTime: 60s
    maxEjectionPercent: 50
  circuitBreaker: {maxRequests: 1000}
---
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: hello-route, namespace: default}
spec:
  circuitBreaker: {maxRequests: 100}
";

const AUTHORITY: &str = "hello.default.svc.cluster.local:8080";
/// Longer than a few of the local source's 200 ms polls.
const PATIENCE: Duration = Duration::from_secs(5);

async fn next_update(stream: &mut Streaming<EndpointUpdate>) -> EndpointUpdate {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("an endpoint update in time")
        .unwrap()
        .unwrap()
}

async fn next_routes(stream: &mut Streaming<Routes>) -> Routes {
    tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a routes update in time")
        .unwrap()
        .unwrap()
}

fn snapshot(update: EndpointUpdate) -> Snapshot {
    match update.kind {
        Some(Kind::Snapshot(snapshot)) => snapshot,
        other => panic!("expected a Snapshot, got {other:?}"),
    }
}

fn service_resilience(snapshot: &Snapshot) -> Option<Resilience> {
    snapshot.service.as_ref().and_then(|s| s.resilience)
}

/// The files every test here starts from.
const MESH: &[(&str, &str)] = &[
    ("hello.yaml", HELLO),
    ("route.yaml", ROUTE),
    ("policies.yaml", POLICIES),
];

fn breaker(max_requests: u32) -> Option<CircuitBreaker> {
    Some(CircuitBreaker {
        max_requests: Some(max_requests),
    })
}

#[tokio::test]
async fn a_policy_reaches_the_snapshot_and_the_rules_and_edits_follow() {
    let dir = tempfile::tempdir().unwrap();
    let controller = start(dir.path(), MESH).await;
    assert!(controller.manifest_errors.borrow().is_empty());
    let objects = metrics(controller.admin_addr).await;
    assert_eq!(
        series(
            &objects,
            "trellis_controller_objects{kind=\"ResiliencePolicy\"}"
        ),
        Some(2.0),
        "{objects}"
    );
    let mut client = connect(controller.addr).await;

    let mut endpoints = client
        .watch_endpoints(request(AUTHORITY))
        .await
        .unwrap()
        .into_inner();
    let first = snapshot(next_update(&mut endpoints).await);
    assert_eq!(
        service_resilience(&first),
        Some(Resilience {
            outlier_detection: Some(OutlierDetection {
                consecutive_failures: Some(5),
                base_ejection_ms: Some(1_000),
                max_ejection_ms: Some(60_000),
                max_ejection_percent: Some(50),
            }),
            circuit_breaker: breaker(1000),
        })
    );
    assert_eq!(first.endpoints.len(), 2);

    let mut routes = client
        .watch_routes(request(AUTHORITY))
        .await
        .unwrap()
        .into_inner();
    let first = next_routes(&mut routes).await;
    assert_eq!(
        first.rules[0].resilience,
        Some(Resilience {
            outlier_detection: None,
            circuit_breaker: breaker(100),
        }),
        "the rule carries only the referenced policy's circuit breaker"
    );

    // Tighten both policies, leaving fields out: they arrive unset.
    let edited = POLICIES
        .replace(
            "    baseEjectionTime: 1s\n    maxEjectionTime: 60s\n    maxEjectionPercent: 50\n",
            "",
        )
        .replace("consecutiveFailures: 5", "consecutiveFailures: 2")
        .replace("maxRequests: 100}", "maxRequests: 10}");
    std::fs::write(dir.path().join("manifests/policies.yaml"), edited).unwrap();

    let update = snapshot(next_update(&mut endpoints).await);
    assert_eq!(
        service_resilience(&update),
        Some(Resilience {
            outlier_detection: Some(OutlierDetection {
                consecutive_failures: Some(2),
                ..OutlierDetection::default()
            }),
            circuit_breaker: breaker(1000),
        }),
        "a new Snapshot on the open stream"
    );
    assert_eq!(update.endpoints.len(), 2, "with every endpoint");
    let update = next_routes(&mut routes).await;
    assert_eq!(
        update.rules[0].resilience.as_ref().unwrap().circuit_breaker,
        breaker(10),
        "the route is re-published"
    );
    assert!(controller.manifest_errors.borrow().is_empty());
}

#[tokio::test]
async fn a_rejected_policy_edit_keeps_the_last_good_one_serving() {
    let dir = tempfile::tempdir().unwrap();
    let controller = start(dir.path(), MESH).await;
    let mut errors = controller.manifest_errors.clone();
    std::fs::write(
        dir.path().join("manifests/policies.yaml"),
        POLICIES.replace("maxEjectionPercent: 50", "maxEjectionPercent: 150"),
    )
    .unwrap();
    tokio::time::timeout(PATIENCE, errors.wait_for(|e| !e.is_empty()))
        .await
        .expect("the edit is rejected in time")
        .unwrap();
    let message = errors.borrow()[0].to_string();
    assert!(
        message.ends_with(
            "policies.yaml: ResiliencePolicy default/hello: \
             spec.outlierDetection.maxEjectionPercent 150 is not 0-100"
        ),
        "{message}"
    );

    let mut client = connect(controller.addr).await;
    let mut endpoints = client
        .watch_endpoints(request(AUTHORITY))
        .await
        .unwrap()
        .into_inner();
    let first = snapshot(next_update(&mut endpoints).await);
    let outlier = service_resilience(&first).unwrap().outlier_detection;
    assert_eq!(outlier.unwrap().max_ejection_percent, Some(50));
}

#[test]
fn the_local_example_protects_hello_and_caps_the_split() {
    use trellis_control_plane::source::local::LocalSource;
    use trellis_control_plane::store::Store;

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local");
    let store = Store::new("cluster.local");
    let mut source = LocalSource::new(dir, store.clone());
    source.reload().unwrap();
    assert!(source.errors().borrow().is_empty());
    for service in ["hello", "hello-v1", "hello-v2"] {
        let resolved = store
            .resolve(&format!("{service}.default.svc.cluster.local:8080"))
            .unwrap();
        let resilience = resolved.resilience.expect(service);
        let outlier = resilience.outlier_detection.unwrap();
        assert_eq!(outlier.max_ejection_ms, Some(30_000), "{service}");
        assert_eq!(resilience.circuit_breaker, breaker(500), "{service}");
    }
    let routes = store.routes(AUTHORITY, "default");
    let split = &routes.rules[1];
    assert_eq!(split.backends.len(), 2, "the 90/10 split");
    assert_eq!(
        split.resilience.as_ref().unwrap().circuit_breaker,
        breaker(200)
    );
    assert_eq!(routes.rules[0].resilience, None, "the A/B rule has no cap");
    assert_eq!(store.counts().resilience_policies, 2);
}
