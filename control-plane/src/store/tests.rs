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
    store_with(&[])
}

/// The store holding `MESH` and each of `files` (YAML documents).
fn store_with(files: &[&str]) -> Arc<Store> {
    let store = Store::new("cluster.local");
    let mut objects = manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
    for (i, file) in files.iter().enumerate() {
        objects.extend(manifest::parse(Path::new(&format!("extra-{i}.yaml")), file).unwrap());
    }
    store.replace_all(objects);
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

/// A dual-stack Service answers at either family's ClusterIP, with the
/// endpoints of both families' slices.
#[test]
fn dual_stack_services_resolve_by_either_cluster_ip() {
    const DUAL: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50, "fd00:96::50"]
  ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v4, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
endpoints: [{addresses: ["127.0.0.3"], targetRef: {kind: Pod, name: hello-v1}}]
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v6, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
endpoints: [{addresses: ["fd00:10::3"], targetRef: {kind: Pod, name: hello-v1}}]
ports: [{name: http, port: 8080}]
"#;
    let store = store_with(&[DUAL]);
    for authority in ["10.96.0.50:8080", "[fd00:96::50]:8080", "dual.default:8080"] {
        let resolved = store.resolve(authority).expect(authority);
        assert_eq!(resolved.service.name, "dual");
        let keys: Vec<&String> = resolved.endpoints.keys().collect();
        assert_eq!(keys, ["127.0.0.3:8080", "fd00:10::3:8080"], "{authority}");
        let v6 = &resolved.endpoints["fd00:10::3:8080"];
        assert_eq!(v6.identity, "spiffe://cluster.local/ns/default/sa/hello");
    }
    let (service, pod) = {
        let resolved = store
            .resolve("[fd00:10::3]:9000")
            .expect("the pod by its IPv6");
        (
            resolved.service.name,
            resolved.endpoints.into_values().next().unwrap(),
        )
    };
    assert_eq!(
        (service.as_str(), pod.ip.as_str(), pod.port),
        ("dual", "fd00:10::3", 9000)
    );
}

/// A connection straight to a pod (by IP, or by its name under a headless
/// Service) gets that pod alone on the port dialled, with its identity,
/// ready or not; an IP no pod or several pods have names none.
#[test]
fn pod_ips_and_per_pod_names_resolve_to_that_pod() {
    const MORE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: None
  ports: [{name: peer, port: 7000}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
  - addresses: ["127.0.0.20"]
    hostname: web-0
    conditions: {ready: false}
    targetRef: {kind: Pod, name: web-0}
ports: [{name: peer, port: 7000, appProtocol: kubernetes.io/h2c}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0}
spec:
  serviceAccountName: web
  containers: [{name: web, image: web}, {name: trellis-proxy, image: trellis-proxy}]
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, namespace: default}
spec:
  containers: [{name: app, image: app}, {name: trellis-proxy, image: trellis-proxy}]
status: {podIP: 127.0.0.30}
---
apiVersion: v1
kind: Pod
metadata: {name: host-a}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 127.0.0.40}
---
apiVersion: v1
kind: Pod
metadata: {name: host-b}
spec: {containers: [{name: app, image: app}]}
status: {podIP: 127.0.0.40}
"#;
    let store = store_with(&[MORE]);
    let only = |authority: &str| {
        let resolved = store.resolve(authority).expect(authority);
        assert_eq!(resolved.endpoints.len(), 1, "{authority}: {resolved:?}");
        let endpoint = resolved.endpoints.values().next().cloned().unwrap();
        (resolved.service.name, endpoint)
    };

    let (service, v1) = only("127.0.0.3:9000");
    assert_eq!(service, "hello", "the Service the pod backs");
    assert_eq!(
        (v1.ip.as_str(), v1.port),
        ("127.0.0.3", 9000),
        "the port dialled"
    );
    assert_eq!(v1.identity, "spiffe://cluster.local/ns/default/sa/hello");
    assert_eq!(v1.pod, "hello-v1");
    assert!(
        store.routes("127.0.0.3:9000", "default").rules.is_empty(),
        "the Service's routes are for the Service, not its pods"
    );

    for name in [
        "web-0.web.default.svc.cluster.local:7000",
        "web-0.web.default:7000",
        "127.0.0.20:7000",
    ] {
        let (service, web) = only(name);
        assert_eq!(service, "web");
        assert_eq!(
            web.ip, "127.0.0.20",
            "{name}: not ready, but asked for by name"
        );
        assert_eq!(web.identity, "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(
            web.protocol,
            trellis_proto::discovery::ProtocolHint::Http2 as i32
        );
    }

    let (service, lonely) = only("127.0.0.30:8080");
    assert_eq!(service, "lonely", "a pod behind no Service is named itself");
    assert_eq!(
        lonely.identity,
        "spiffe://cluster.local/ns/default/sa/default"
    );

    let (_, unmeshed) = only("127.0.0.4:8080");
    assert_eq!(unmeshed.identity, "", "hello-v2 has no sidecar");

    for none in [
        "127.0.0.40:80",
        "127.0.0.99:80",
        "web-1.web.default:7000",
        "web-0.nope.default:7000",
    ] {
        assert!(store.resolve(none).is_none(), "{none}");
    }
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
    let with =
        |routes: &[&String]| store_with(&routes.iter().map(|r| r.as_str()).collect::<Vec<_>>());
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
