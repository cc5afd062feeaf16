use std::path::Path;

use super::*;
use crate::source::manifest;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 8080, targetPort: 8080, appProtocol: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: hello-1
  labels: {kubernetes.io/service-name: hello}
addressType: IPv4
endpoints:
  - addresses: ["127.0.0.3"]
    targetRef: {kind: Pod, name: hello-v1}
  - addresses: ["127.0.0.4"]
    targetRef: {kind: Pod, name: hello-v2}
  - addresses: ["127.0.0.5"]
    conditions: {ready: false}
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: hello-v1, labels: {app: hello, version: v1}}
spec:
  serviceAccountName: hello
  containers: [{name: hello, image: hello}, {name: trellis-proxy, image: trellis-proxy}]
---
apiVersion: v1
kind: Pod
metadata: {name: hello-v2, labels: {app: hello, version: v2}}
spec:
  containers: [{name: hello, image: hello}]
"#;

fn store() -> Arc<Store> {
    let store = Store::new("cluster.local");
    store.replace_all(manifest::parse(Path::new("mesh.yaml"), MESH).unwrap());
    store
}

#[test]
fn resolves_names_and_cluster_ips_to_ready_endpoints() {
    let store = store();
    for authority in [
        "hello.default.svc.cluster.local:8080",
        "hello.default.svc:8080",
        "hello.default:8080",
        "10.96.0.10:8080",
    ] {
        let resolved = store.resolve(authority).expect(authority);
        assert_eq!(resolved.service, ObjectKey::new("default", "hello"));
        let keys: Vec<&String> = resolved.endpoints.keys().collect();
        assert_eq!(keys, ["127.0.0.3:8080", "127.0.0.4:8080"], "{authority}");
    }
    assert!(
        store.resolve("hello.default:9999").is_none(),
        "unknown port"
    );
    assert!(
        store.resolve("nope.default:8080").is_none(),
        "unknown service"
    );
    assert!(store.resolve("hello:8080").is_none(), "no namespace");
}

#[test]
fn endpoints_carry_identity_labels_and_protocol_of_their_pod() {
    let resolved = store().resolve("hello.default:8080").unwrap();
    let v1 = &resolved.endpoints["127.0.0.3:8080"];
    assert_eq!(v1.identity, "spiffe://cluster.local/ns/default/sa/hello");
    assert_eq!(v1.proxy_port, 4143);
    assert_eq!(v1.labels["version"], "v1");
    assert_eq!(v1.pod, "hello-v1");
    assert_eq!(
        v1.protocol,
        trellis_proto::discovery::ProtocolHint::Http1 as i32
    );
    let v2 = &resolved.endpoints["127.0.0.4:8080"];
    assert_eq!(v2.identity, "", "a pod without the sidecar is not meshed");
    assert_eq!(v2.proxy_port, 0);
}

#[tokio::test]
async fn watchers_wake_only_when_their_answer_changes() {
    let store = store();
    let mut hello = store.watch("hello.default:8080");
    let mut other = store.watch("other.default:80");
    assert!(other.borrow_and_update().is_none());
    hello.borrow_and_update();

    // An unrelated Pod changes nothing for either watch.
    let unrelated = manifest::parse(
        Path::new("x.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: unrelated}\nspec: {containers: [{name: app, image: app}]}\n",
    )
    .unwrap();
    store.apply(unrelated.into_iter().next().unwrap());
    assert!(!hello.has_changed().unwrap());
    assert!(!other.has_changed().unwrap());

    store.delete("Pod", &ObjectKey::new("default", "hello-v1"));
    assert!(hello.has_changed().unwrap());
    let after = hello.borrow_and_update().clone();
    let v1 = &after.as_ref().as_ref().unwrap().endpoints["127.0.0.3:8080"];
    assert_eq!(v1.identity, "", "identity follows the pod");
    assert!(!other.has_changed().unwrap());
}

#[test]
fn a_watch_is_forgotten_when_its_last_holder_drops_it() {
    let store = store();
    let changed_at = store.changed_at();
    let first = store.watch("made-up.default:80");
    let second = store.watch("made-up.default:80");
    let routes = store.watch_routes("made-up.default:80", "default");
    assert_eq!(store.counts().watches, 2, "one per authority and kind");

    drop(first);
    assert_eq!(store.counts().watches, 2, "the second holder keeps it");
    drop(second);
    drop(routes);
    assert_eq!(
        store.counts().watches,
        0,
        "forgotten at once, without a store change"
    );
    assert_eq!(store.changed_at(), changed_at, "nothing changed meanwhile");
}

#[tokio::test]
async fn a_shared_watch_keeps_working_after_another_holder_leaves() {
    let store = store();
    let mut kept = store.watch("hello.default:8080");
    kept.borrow_and_update();
    drop(store.watch("hello.default:8080"));

    store.delete("Pod", &ObjectKey::new("default", "hello-v1"));
    assert!(kept.has_changed().unwrap(), "still wired to the store");
    assert_eq!(store.counts().watches, 1);
}

/// GAMMA's producer and consumer routes: a route in the Service's own
/// namespace applies to every client, one in another namespace only to
/// clients of that namespace, and for them it replaces the producer's.
#[test]
fn consumer_routes_apply_only_to_their_namespace_and_win_there() {
    let route = |namespace: &str, backend: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: to-{backend}, namespace: {namespace}}}
spec:
  parentRefs: [{{kind: Service, name: hello, namespace: default}}]
  rules: [{{backendRefs: [{{name: {backend}, namespace: default, port: 8080}}]}}]
"
        )
    };
    let backends = |store: &Store, client: &str| -> Vec<String> {
        store
            .routes("hello.default:8080", client)
            .rules
            .iter()
            .flat_map(|r| r.backends.iter().map(|b| b.name.clone()))
            .collect()
    };
    let store = store();
    let mut objects = manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
    objects
        .extend(manifest::parse(Path::new("r.yaml"), &route("consumer", "consumer-pick")).unwrap());
    store.replace_all(objects.clone());
    assert_eq!(backends(&store, "consumer"), ["consumer-pick"]);
    assert!(
        backends(&store, "default").is_empty(),
        "a consumer route must not touch other namespaces' clients"
    );
    assert!(backends(&store, "elsewhere").is_empty());

    objects
        .extend(manifest::parse(Path::new("p.yaml"), &route("default", "producer-pick")).unwrap());
    store.replace_all(objects);
    assert_eq!(backends(&store, "default"), ["producer-pick"]);
    assert_eq!(backends(&store, "elsewhere"), ["producer-pick"]);
    assert_eq!(
        backends(&store, "consumer"),
        ["consumer-pick"],
        "the consumer route wins for its namespace"
    );
}

/// When HTTPRoutes and GRPCRoutes attach to one Service port, only one
/// kind applies: the kind of the oldest route (Gateway API's rule for a
/// listener with both).
#[test]
fn one_route_kind_per_service_port_the_oldest_routes() {
    let route = |kind: &str, name: &str, created: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: {kind}
metadata: {{name: {name}, namespace: default, creationTimestamp: \"{created}\"}}
spec:
  parentRefs: [{{kind: Service, name: hello, port: 8080}}]
  rules: [{{backendRefs: [{{name: {name}, port: 8080}}]}}]
"
        )
    };
    let backends = |store: &Store| -> Vec<String> {
        let mut names: Vec<String> = store
            .routes("hello.default:8080", "default")
            .rules
            .iter()
            .flat_map(|r| r.backends.iter().map(|b| b.name.clone()))
            .collect();
        names.sort();
        names
    };
    let with = |routes: &[&String]| {
        let store = store();
        let mut objects = manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
        for (i, route) in routes.iter().enumerate() {
            objects.extend(manifest::parse(Path::new(&format!("r{i}.yaml")), route).unwrap());
        }
        store.replace_all(objects);
        store
    };
    let http = route("HTTPRoute", "http-new", "2026-02-01T00:00:00Z");
    let http_old = route("HTTPRoute", "http-old", "2026-01-01T00:00:00Z");
    let grpc = route("GRPCRoute", "grpc", "2026-01-15T00:00:00Z");

    assert_eq!(backends(&with(&[&grpc])), ["grpc"]);
    assert_eq!(
        backends(&with(&[&http, &grpc])),
        ["grpc"],
        "the GRPCRoute is older than the only HTTPRoute"
    );
    assert_eq!(
        backends(&with(&[&http, &grpc, &http_old])),
        ["http-new", "http-old"],
        "an older HTTPRoute brings every HTTPRoute back"
    );
}
