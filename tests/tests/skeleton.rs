//! The walking skeleton end to end: client → outbound sidecar → mTLS →
//! inbound sidecar → app, with discovery from a manifest directory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_tests::*;

#[tokio::test]
async fn http1_request_travels_both_sidecars_over_mtls() {
    let mesh = HelloMesh::start().await;
    let answer = mesh
        .http1()
        .get(&mesh.authority(), "/hi?x=1")
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let greeting = answer.greeting().expect("a greeting from hello");
    assert!(["v1", "v2"].contains(&greeting.version.as_str()));
    assert_eq!(
        greeting.client_identity, "spiffe://cluster.local/ns/default/sa/frontend",
        "hello's sidecar must see the client's verified SPIFFE ID"
    );
}

#[tokio::test]
async fn http2_request_travels_both_sidecars_over_mtls() {
    let mesh = HelloMesh::start().await;
    let client = AppClient::http2(mesh.client.outbound_addr);
    let answer = client.get(&mesh.authority(), "/").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let greeting = answer.greeting().expect("a greeting from hello");
    assert_eq!(
        greeting.client_identity,
        "spiffe://cluster.local/ns/default/sa/frontend"
    );
}

#[tokio::test]
async fn requests_spread_over_both_endpoints() {
    let mesh = HelloMesh::start().await;
    let client = mesh.http1();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    // Paced over ~3 s: the balancer avoids an endpoint for a moment after a
    // slow answer (on a loaded machine that happens), but not for long.
    for _ in 0..400 {
        *counts
            .entry(client.version(&mesh.authority()).await.unwrap())
            .or_default() += 1;
        tokio::time::sleep(std::time::Duration::from_millis(7)).await;
    }
    for version in ["v1", "v2"] {
        let n = counts.get(version).copied().unwrap_or(0);
        assert!(n >= 80, "{version} got {n} of 400 requests: {counts:?}");
    }
}

/// Sends requests from `workers` loops until stopped; records every failure
/// and the last time each version answered.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    last_seen: Arc<Mutex<BTreeMap<String, Instant>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(client: AppClient, authority: String, workers: usize) -> Self {
        let load = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            failures: Arc::default(),
            last_seen: Arc::default(),
            tasks: Vec::new(),
        };
        let tasks = (0..workers)
            .map(|_| {
                let (client, authority) = (client.clone(), authority.clone());
                let (stop, ok, failures, last_seen) = (
                    load.stop.clone(),
                    load.ok.clone(),
                    load.failures.clone(),
                    load.last_seen.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match client.version(&authority).await {
                            Ok(version) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                last_seen.lock().unwrap().insert(version, Instant::now());
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { tasks, ..load }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[tokio::test]
async fn removing_an_endpoint_stops_its_traffic_within_a_second_without_failures() {
    let mesh = HelloMesh::start().await;
    let load = Load::start(mesh.http1(), mesh.authority(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        load.last_seen.lock().unwrap().contains_key("v2"),
        "v2 served before the change"
    );

    let removed_at = Instant::now();
    mesh.write_hello(&["v1"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let last_v2 = load.last_seen.lock().unwrap()["v2"];
    let (ok, failures) = load.finish().await;

    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 100, "too little traffic to tell: {ok}");
    let lag = last_v2.saturating_duration_since(removed_at);
    assert!(
        lag < Duration::from_secs(1),
        "v2 still answered {lag:?} after its removal"
    );
}

#[tokio::test]
async fn killing_the_controller_leaves_traffic_flowing() {
    let mut mesh = HelloMesh::start().await;
    let client = mesh.http1();
    // Each version by its own Service, so the test does not depend on how
    // the balancer spreads a short burst over two endpoints.
    let services: Vec<(String, &str)> = ["v1", "v2"]
        .into_iter()
        .map(|v| {
            (
                format!("hello-{v}.default.svc.cluster.local:{}", mesh.port),
                v,
            )
        })
        .collect();
    for (authority, version) in &services {
        assert_eq!(client.version(authority).await.unwrap(), *version);
    }

    mesh.controller.take().expect("controller").kill();
    for _ in 0..100 {
        for (authority, version) in &services {
            let answered = client
                .version(authority)
                .await
                .expect("traffic keeps flowing");
            assert_eq!(answered, *version);
        }
    }
}

#[tokio::test]
async fn broken_manifests_are_rejected_and_the_last_good_state_keeps_serving() {
    let mesh = HelloMesh::start().await;
    let client = mesh.http1();
    client.version(&mesh.authority()).await.unwrap();
    let mut errors = mesh.controller.as_ref().unwrap().manifest_errors.clone();

    // A file that is not YAML at all.
    mesh.write_manifest(
        "hello.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
    );
    let rejected = tokio::time::timeout(Duration::from_secs(2), errors.wait_for(|e| !e.is_empty()))
        .await
        .expect("the controller reports the broken file within 2 s")
        .unwrap()
        .clone();
    let message = rejected[0].to_string();
    assert!(
        message.contains("hello.yaml") && message.contains("not valid YAML"),
        "{message}"
    );

    // An object that refers to a Service that does not exist.
    mesh.write_manifest(
        "orphan.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: orphan\n  labels: {kubernetes.io/service-name: nowhere}\naddressType: IPv4\nendpoints: []\n",
    );
    let rejected = tokio::time::timeout(
        Duration::from_secs(2),
        errors.wait_for(|e| e.iter().any(|e| e.to_string().contains("orphan.yaml"))),
    )
    .await
    .expect("the orphan slice is reported within 2 s")
    .unwrap()
    .clone();
    let message = rejected
        .iter()
        .find(|e| e.to_string().contains("orphan.yaml"))
        .unwrap()
        .to_string();
    assert!(
        message.contains("EndpointSlice default/orphan") && message.contains("names no Service"),
        "{message}"
    );

    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        *seen
            .entry(
                client
                    .version(&mesh.authority())
                    .await
                    .expect("old state serves"),
            )
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "both endpoints still serve: {seen:?}");

    // Fixing the file clears the error.
    mesh.write_hello(&["v1", "v2"]);
    std::fs::remove_file(mesh.manifests().join("orphan.yaml")).unwrap();
    tokio::time::timeout(Duration::from_secs(2), errors.wait_for(|e| e.is_empty()))
        .await
        .expect("errors clear once the files are fixed")
        .unwrap();
}

#[tokio::test]
async fn unknown_authority_gets_a_503_that_says_why() {
    let mesh = HelloMesh::start().await;
    let started = Instant::now();
    let answer = mesh
        .http1()
        .get("nope.default.svc.cluster.local:80", "/")
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(answer.headers["trellis-proxy-error"], "unknown-service");
    assert!(
        answer
            .text()
            .contains("no Service in the mesh matches nope.default.svc.cluster.local:80"),
        "{}",
        answer.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once, not after a timeout"
    );

    let answer = mesh.http1().get("no-namespace", "/").await.unwrap();
    assert_eq!(answer.status, 503, "{}", answer.text());
}

#[tokio::test]
async fn a_service_without_endpoints_gets_a_503() {
    let mesh = HelloMesh::start().await;
    mesh.write_hello(&[]);
    let client = mesh.http1();
    let authority = mesh.authority();
    let mut last = None;
    for _ in 0..50 {
        let answer = client.get(&authority, "/").await.unwrap();
        if answer.status == 503 {
            last = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = last.expect("503 once the endpoints are gone");
    assert_eq!(answer.headers["trellis-proxy-error"], "no-endpoints");
}
