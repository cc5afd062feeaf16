use std::path::Path;

use trellis_proto::discovery::{CircuitBreaker, OutlierDetection, Resilience};

use crate::model::{Object, ObjectKey};
use crate::source::manifest;
use crate::store::Store;

const MESH: &str = "\
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: default}
spec: {ports: [{port: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: hello-1, labels: {kubernetes.io/service-name: hello}}
addressType: IPv4
endpoints: [{addresses: [127.0.0.3]}]
ports: [{port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hello, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: hello, port: 8080}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: ExtensionRef
          extensionRef: {group: trellis.dev, kind: ResiliencePolicy, name: api-limit}
    - {}
---
apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {name: api-limit, namespace: default}
spec:
  circuitBreaker: {maxRequests: 50}
";

fn policy(name: &str, target: &str, spec: &str) -> Object {
    let yaml = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: ResiliencePolicy\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: {target}}}]\n{spec}"
    );
    manifest::parse(Path::new("policy.yaml"), &yaml)
        .unwrap()
        .remove(0)
}

fn store_with(extra: impl IntoIterator<Item = Object>) -> std::sync::Arc<Store> {
    let store = Store::new("cluster.local");
    let mut objects = manifest::parse(Path::new("mesh.yaml"), MESH).unwrap();
    objects.extend(extra);
    store.replace_all(objects);
    store
}

fn breaker(max_requests: u32) -> Option<CircuitBreaker> {
    Some(CircuitBreaker {
        max_requests: Some(max_requests),
    })
}

#[test]
fn a_targeted_service_carries_its_policy_field_by_field() {
    let store = store_with([policy(
        "hello",
        "hello",
        "  outlierDetection: {consecutiveFailures: 3, maxEjectionTime: 1m30s}\n  \
         circuitBreaker: {maxRequests: 200}\n",
    )]);
    let expected = Some(Resilience {
        outlier_detection: Some(OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection_ms: None,
            max_ejection_ms: Some(90_000),
            max_ejection_percent: None,
        }),
        circuit_breaker: breaker(200),
    });
    for authority in ["hello.default.svc.cluster.local:8080", "10.96.0.10:8080"] {
        let hello = store.resolve(authority).unwrap();
        assert_eq!(hello.resilience, expected, "{authority}");
        assert_eq!(hello.info().resilience, expected, "{authority}");
    }
    let other = store.resolve("other.default:8080").unwrap();
    assert_eq!(
        other.resilience, None,
        "an untargeted Service keeps the defaults"
    );
    assert_eq!(store.counts().resilience_policies, 2);
}

#[test]
fn of_two_policies_on_one_service_the_oldest_then_the_first_by_name_wins() {
    let store = store_with([
        policy("b-strict", "hello", "  circuitBreaker: {maxRequests: 10}\n"),
        policy(
            "a-loose",
            "hello",
            "  circuitBreaker: {maxRequests: 1000}\n",
        ),
    ]);
    let hello = store.resolve("hello.default:8080").unwrap();
    assert_eq!(
        hello.resilience.unwrap().circuit_breaker,
        breaker(1000),
        "no timestamps: alphabetical"
    );

    let mut older = policy("b-strict", "hello", "  circuitBreaker: {maxRequests: 10}\n");
    let Object::ResiliencePolicy(p) = &mut older else {
        unreachable!()
    };
    p.metadata.creation_timestamp = Some("2024-01-01T00:00:00Z".into());
    let mut newer = policy(
        "a-loose",
        "hello",
        "  circuitBreaker: {maxRequests: 1000}\n",
    );
    let Object::ResiliencePolicy(p) = &mut newer else {
        unreachable!()
    };
    p.metadata.creation_timestamp = Some("2025-01-01T00:00:00Z".into());
    let store = store_with([older, newer]);
    let hello = store.resolve("hello.default:8080").unwrap();
    assert_eq!(
        hello.resilience.unwrap().circuit_breaker,
        breaker(10),
        "the older one wins"
    );
}

#[tokio::test]
async fn a_policy_edit_wakes_the_targeted_services_watch() {
    let store = store_with([policy(
        "hello",
        "hello",
        "  circuitBreaker: {maxRequests: 200}\n",
    )]);
    let mut hello = store.watch("hello.default:8080");
    let mut other = store.watch("other.default:8080");
    hello.borrow_and_update();
    other.borrow_and_update();

    store.apply(policy(
        "hello",
        "hello",
        "  circuitBreaker: {maxRequests: 300}\n",
    ));
    assert!(hello.has_changed().unwrap());
    let current = hello.borrow_and_update().clone();
    let resilience = current.as_ref().as_ref().unwrap().resilience;
    assert_eq!(resilience.unwrap().circuit_breaker, breaker(300));
    assert!(!other.has_changed().unwrap(), "other is not targeted");

    store.delete("ResiliencePolicy", &ObjectKey::new("default", "hello"));
    assert!(hello.has_changed().unwrap());
    assert_eq!(
        hello
            .borrow_and_update()
            .as_ref()
            .as_ref()
            .unwrap()
            .resilience,
        None
    );
}

#[tokio::test]
async fn a_rule_naming_a_policy_gets_its_circuit_breaker_and_follows_edits() {
    let store = store_with([]);
    let mut routes = store.watch_routes("hello.default:8080", "default");
    let rules = routes.borrow_and_update().rules.clone();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].route, "default/hello#0");
    assert_eq!(
        rules[0].resilience,
        Some(Resilience {
            outlier_detection: None,
            circuit_breaker: breaker(50),
        })
    );
    assert_eq!(rules[1].resilience, None, "the rule without the filter");

    let edited = MESH.replace("maxRequests: 50", "maxRequests: 5");
    store.replace_all(manifest::parse(Path::new("mesh.yaml"), &edited).unwrap());
    assert!(routes.has_changed().unwrap(), "the route is re-published");
    let rules = routes.borrow_and_update().rules.clone();
    let breaker_now = rules[0].resilience.as_ref().unwrap().circuit_breaker;
    assert_eq!(breaker_now, breaker(5));
}
