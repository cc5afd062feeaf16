//! Pods that die, drain or misbehave cost (almost) no failed requests:
//! failure-aware balancing, outlier detection, drain and retries of
//! connect failures, end to end through real sidecars.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpListener;
use trellis_tests::*;

/// What one paced request got: when it was sent, and the answering
/// version or why it failed.
type Outcome = (Duration, Result<String, String>);

/// Sends GETs at `rps` for `duration`, each on time whatever the others
/// do (open loop), and returns every outcome in order of sending.
async fn paced_load(
    client: AppClient,
    authority: String,
    rps: u32,
    duration: Duration,
) -> Vec<Outcome> {
    let started = Instant::now();
    let interval = Duration::from_secs(1) / rps;
    let mut tasks = Vec::new();
    let mut next = tokio::time::Instant::now();
    while started.elapsed() < duration {
        tokio::time::sleep_until(next).await;
        next += interval;
        let (client, authority) = (client.clone(), authority.clone());
        let sent = started.elapsed();
        tasks.push(tokio::spawn(async move {
            (sent, client.version(&authority).await)
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("request task"));
    }
    outcomes
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|(_, r)| r.is_err()).collect()
}

fn served_by(outcomes: &[Outcome]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, result) in outcomes {
        let key = result.clone().unwrap_or_else(|_| "failed".into());
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Writes a `ResiliencePolicy` for `hello` with `spec` (one YAML line under
/// `spec:`), and waits until the client's sidecar has it: the controller
/// holds it, and the next snapshot of `hello` has reached the proxy.
async fn apply_hello_policy(mesh: &HelloMesh, spec: &str) {
    mesh.write_manifest(
        "policy.yaml",
        &format!(
            "apiVersion: trellis.dev/v1alpha1
kind: ResiliencePolicy
metadata: {{name: hello, namespace: default}}
spec:
  targetRefs: [{{group: \"\", kind: Service, name: hello}}]
  {spec}
"
        ),
    );
    let controller = mesh.controller.as_ref().unwrap().admin_addr;
    let deadline = Instant::now() + Duration::from_secs(5);
    let kind = [("kind", "ResiliencePolicy")];
    while metric(controller, "trellis_controller_objects", &kind).await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the controller did not load the policy in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The push to the proxy follows within milliseconds of the load.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_drained_sidecar_costs_no_request() {
    let mesh = HelloMesh::start().await;
    let load = tokio::spawn(paced_load(
        mesh.http1(),
        mesh.authority(),
        200,
        Duration::from_secs(5),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let drained = mesh.hello[1].1.drain().await;
    let outcomes = load.await.unwrap();
    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let counts = served_by(&outcomes);
    assert!(
        counts.get("v2").copied().unwrap_or(0) > 50,
        "v2 served before its drain: {counts:?}"
    );
    assert!(counts["v1"] > 500, "v1 took over: {counts:?}");
    println!("drained in {:?}; served {counts:?}", drained.elapsed);
}

/// Two hello pods behind one Service; the second one's sidecar runs as its
/// own "process", so it can be killed.
struct KillableMesh {
    mesh: Mesh,
    client: trellis_proxy::Proxy,
    _survivor: trellis_proxy::Proxy,
    victim: Option<ProxyProcess>,
    authority: String,
}

impl KillableMesh {
    async fn start() -> Self {
        let mut mesh = Mesh::start().await;
        let client_ip = mesh.pod_ip();
        let client = mesh.proxy(client_ip, "frontend").await;
        let (v1_ip, v2_ip) = (mesh.pod_ip(), mesh.pod_ip());
        let v1 = hello_app(v1_ip, "v1").await;
        let listener = TcpListener::bind((v2_ip, v1.port())).await.unwrap();
        tokio::spawn(meshctl::demo::apps::hello(
            listener,
            "v2".into(),
            "hello-v2".into(),
        ));
        let version = |v: &'static str| {
            move |env: &mut std::collections::HashMap<&'static str, String>| {
                env.insert(trellis_proxy::config::VERSION, v.into());
            }
        };
        let survivor = mesh.proxy_with(v1_ip, "hello", version("v1")).await;
        let victim = ProxyProcess::start(mesh.proxy_config(v2_ip, "hello", version("v2")));
        let docs = [
            pod_yaml("hello-v1", "hello", "v1", survivor.inbound_addr.port()),
            pod_yaml("hello-v2", "hello", "v2", victim.inbound_addr.port()),
            service_yaml(
                "hello",
                v1.port(),
                &[("hello-v1", v1_ip), ("hello-v2", v2_ip)],
            ),
        ];
        mesh.write_manifest("hello.yaml", &docs.join("---\n"));
        let authority = format!("hello.default.svc.cluster.local:{}", v1.port());
        AppClient::http1(client.outbound_addr)
            .wait_routable(&authority)
            .await;
        Self {
            mesh,
            client,
            _survivor: survivor,
            victim: Some(victim),
            authority,
        }
    }
}

#[tokio::test]
async fn a_killed_sidecar_stops_costing_requests_within_a_second() {
    let mut mesh = KillableMesh::start().await;
    let client = AppClient::http1(mesh.client.outbound_addr);
    let load = tokio::spawn(paced_load(
        client,
        mesh.authority.clone(),
        200,
        Duration::from_secs(6),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    mesh.victim.take().unwrap().kill();
    let killed_after = killed_at.elapsed();
    let outcomes = load.await.unwrap();
    let failed = failures(&outcomes);
    let total = outcomes.len();
    println!(
        "{} of {total} failed; served {:?}; kill took {killed_after:?}",
        failed.len(),
        served_by(&outcomes)
    );
    assert!(
        failed.len() * 1000 <= total * 5,
        "at most 0.5% may fail: {} of {total}: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    // Sent times are offsets from the load's start (≈ kill at 2 s).
    let last_failure = failed.iter().map(|(sent, _)| *sent).max();
    if let Some(last) = last_failure {
        assert!(
            last < Duration::from_secs(3) + killed_after,
            "failures go on after the first second: the last at {last:?}"
        );
    }
    assert!(served_by(&outcomes)["v1"] > 600);
    drop(mesh.mesh);
}

/// Whether the scripted v2 app answers 503 (fast) instead of a greeting.
static V2_BROKEN: AtomicBool = AtomicBool::new(true);

#[tokio::test]
async fn an_endpoint_answering_fast_errors_is_ejected_then_probed_back() {
    let mut hits = Vec::new();
    let mesh = HelloMesh::start_with_apps(|listener, version| {
        let fail: fn(u64) -> bool = match version {
            "v2" => |_| V2_BROKEN.load(Ordering::SeqCst),
            _ => |_| false,
        };
        hits.push(scripted_app(listener, version, Duration::ZERO, fail));
    })
    .await;
    let v2_hits = hits[1].clone();
    // The Service's own policy: two failures in a row eject, for 1 s
    // doubling up to 4 s (the proxy's defaults are 5, 1 s and 60 s).
    apply_hello_policy(
        &mesh,
        "outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 1s, maxEjectionTime: 4s}",
    )
    .await;
    let before = v2_hits.load(Ordering::SeqCst);
    let outcomes = paced_load(mesh.http1(), mesh.authority(), 200, Duration::from_secs(8)).await;
    let to_v2 = v2_hits.load(Ordering::SeqCst) - before;
    let total = outcomes.len() as u64;
    println!(
        "broken v2: {to_v2} of {total} requests reached it; answers {:?}",
        served_by(&outcomes)
    );
    assert!(
        to_v2 * 100 < total * 5,
        "a failing endpoint must get < 5% of the traffic: {to_v2} of {total}"
    );
    let ejections = metric(
        mesh.client.admin_addr,
        "trellis_outlier_ejections_total",
        &[("dst_service", "hello")],
    )
    .await;
    assert!(ejections >= 1.0, "the ejection is counted: {ejections}");
    let client = mesh.http1();

    // It recovers: a probe finds out, and it gets its share back.
    V2_BROKEN.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let answers = burst(&client, &mesh.authority(), 200, 4).await;
        let counts = versions(&answers);
        if counts.get("v2").copied().unwrap_or(0) >= 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v2 never got its share back: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_twenty_mib_upload_at_one_mib_per_second_succeeds_with_default_timeouts() {
    let mesh = HelloMesh::start_with_apps(workbench_app).await;
    let mib = 1 << 20;
    let request = http::Request::post(format!("http://{}/upload", mesh.authority()))
        .body(paced_body(20, mib, Duration::from_secs(1)))
        .unwrap();
    let started = Instant::now();
    let answer = send_once(mesh.client.outbound_addr, false, request)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let greeting = answer.greeting().unwrap();
    assert!(
        greeting.message.starts_with(&format!("{} bytes", 20 * mib)),
        "{}",
        greeting.message
    );
    assert!(started.elapsed() > Duration::from_secs(19), "it was paced");
}

#[tokio::test]
async fn ten_thousand_made_up_names_leave_nothing_behind() {
    let mesh = HelloMesh::start_with_proxy_env(vec![(
        trellis_proxy::config::IDLE_AUTHORITY_TIMEOUT,
        "2s".into(),
    )])
    .await;
    let controller = mesh.controller.as_ref().unwrap().admin_addr;
    let admin = mesh.client.admin_addr;
    let scrape_size = || async move {
        AppClient::http1(admin)
            .get(&admin.to_string(), "/metrics")
            .await
            .unwrap()
            .body
            .len()
    };
    let metrics_before = scrape_size().await;
    let watches_before = metric(controller, "trellis_controller_watches", &[]).await;
    let rss_before = rss_kib();

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (client, next) = (mesh.http1(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 10_000 {
                    return;
                }
                let host = format!("x{i}-{}.default.svc.cluster.local:80", fastrand::u32(..));
                let answer = client.get(&host, "/").await.expect("an answer");
                assert_eq!(answer.status, 503);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let metrics_after = scrape_size().await;
    assert!(
        metrics_after < metrics_before * 2,
        "/metrics grew from {metrics_before} to {metrics_after} bytes"
    );
    let rss_peak = rss_kib();

    // Idle for longer than the timeouts: everything is forgotten.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut watches, mut streams);
    loop {
        watches = metric(controller, "trellis_controller_watches", &[]).await;
        // The workload's own inbound-policy stream lives as long as the proxy.
        streams = metric(admin, "trellis_discovery_streams", &[("kind", "endpoints")]).await
            + metric(admin, "trellis_discovery_streams", &[("kind", "routes")]).await;
        if watches <= watches_before && streams == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {watches} controller watches (baseline {watches_before}), {streams} proxy streams"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss_after = rss_kib();
    println!(
        "metrics {metrics_before} → {metrics_after} B; watches {watches_before} → {watches}; RSS {rss_before} → peak {rss_peak} → {rss_after} KiB"
    );
    // One process holds the test, the controller and three sidecars; glibc
    // keeps some freed memory, so the bound is loose but catches a leak of
    // 10,000 watches (~130 MB in the hostile run).
    assert!(
        rss_after < rss_before + 48 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );
}

#[tokio::test]
async fn a_refused_connection_goes_to_another_endpoint_for_any_method() {
    let mut mesh = KillableMesh::start().await;
    mesh.victim.take().unwrap().kill();
    let client = AppClient::http1(mesh.client.outbound_addr);
    for _ in 0..50 {
        let answer = client
            .request(
                http::Method::POST,
                &mesh.authority,
                "/",
                &[],
                Bytes::from_static(b"a body"),
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.greeting().unwrap().version, "v1");
    }
}

#[tokio::test]
async fn requests_beyond_the_circuit_breakers_cap_are_shed_not_queued() {
    let mesh = HelloMesh::start_with_apps(|listener, version| {
        scripted_app(listener, version, Duration::from_millis(500), |_| false);
    })
    .await;
    // Two requests in flight per endpoint: four for the two of them.
    apply_hello_policy(&mesh, "circuitBreaker: {maxRequests: 2}").await;
    let started = Instant::now();
    let answers = burst(&mesh.http1(), &mesh.authority(), 10, 10).await;
    let shed: Vec<_> = answers
        .iter()
        .flatten()
        .filter(|a| {
            a.headers
                .get("trellis-proxy-error")
                .is_some_and(|r| r == "overloaded")
        })
        .collect();
    let served = answers
        .iter()
        .flatten()
        .filter(|a| a.status.is_success())
        .count();
    assert_eq!((served, shed.len()), (4, 6), "{:?}", versions(&answers));
    assert!(shed.iter().all(|a| a.status == 503));
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "the shed requests did not wait for a slot"
    );
}
