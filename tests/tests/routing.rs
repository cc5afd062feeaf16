//! Routing end to end: HTTPRoutes in the manifest directory steer real
//! traffic through real sidecars.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_tests::*;

/// Share of `key` in percent.
fn share(counts: &std::collections::BTreeMap<String, usize>, key: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(key).copied().unwrap_or(0) as f64 * 100.0 / total as f64
}

/// Waits until a burst of requests shows the route applied.
async fn until_applied(
    mesh: &HelloMesh,
    check: impl Fn(&std::collections::BTreeMap<String, usize>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let counts = versions(&burst(&mesh.http1(), &mesh.authority(), 50, 4).await);
        if check(&counts) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "route not applied within 3 s: {counts:?}"
        );
    }
}

#[tokio::test]
async fn weighted_splits_land_within_two_points() {
    let mesh = HelloMesh::start().await;
    for (v1, v2) in [(90, 10), (50, 50), (100, 0)] {
        mesh.write_manifest("route.yaml", &split_route(mesh.port, v1, v2, ""));
        until_applied(&mesh, |c| {
            if v2 == 0 {
                !c.contains_key("v2")
            } else {
                (share(c, "v2") - f64::from(v2)).abs() < 15.0
            }
        })
        .await;
        let counts = versions(&burst(&mesh.http1(), &mesh.authority(), 10_000, 8).await);
        assert_eq!(counts.get("error"), None, "{counts:?}");
        let got = share(&counts, "v1");
        assert!(
            (got - f64::from(v1)).abs() <= 2.0,
            "{v1}/{v2}: v1 got {got:.2}% ({counts:?})"
        );
        if v2 == 0 {
            assert!(
                !counts.contains_key("v2"),
                "weight 0 must get nothing: {counts:?}"
            );
        }
    }
}

#[tokio::test]
async fn header_match_sends_matching_requests_to_v2_only() {
    let mesh = HelloMesh::start().await;
    let port = mesh.port;
    mesh.write_manifest(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: hello-ab}}
spec:
  parentRefs: [{{kind: Service, name: hello}}]
  rules:
    - matches: [{{headers: [{{name: x-canary, value: \"true\"}}]}}]
      backendRefs: [{{name: hello-v2, port: {port}}}]
    - backendRefs: [{{name: hello-v1, port: {port}}}]
"
        ),
    );
    until_applied(&mesh, |c| c.keys().eq(["v1"])).await;
    let client = mesh.http1();
    for _ in 0..200 {
        let canary = client
            .get_with(&mesh.authority(), "/", &[("x-canary", "true")])
            .await
            .unwrap();
        assert_eq!(canary.greeting().unwrap().version, "v2");
        assert_eq!(client.version(&mesh.authority()).await.unwrap(), "v1");
    }
}

#[tokio::test]
async fn route_flips_under_load_fail_nothing_and_apply_within_a_second() {
    let mesh = HelloMesh::start().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, authority, stop, failures, ok) = (
            mesh.http1(),
            mesh.authority(),
            stop.clone(),
            failures.clone(),
            ok.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.version(&authority).await {
                    Ok(_) => drop(ok.fetch_add(1, Ordering::Relaxed)),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    let client = mesh.http1();
    for flip in 0..20 {
        let (v1, v2, want) = if flip % 2 == 0 {
            (100, 0, "v1")
        } else {
            (0, 100, "v2")
        };
        mesh.write_manifest("route.yaml", &split_route(mesh.port, v1, v2, ""));
        let written = Instant::now();
        // Visible once several requests in a row come from the new version.
        let mut streak = 0;
        while streak < 5 {
            assert!(
                written.elapsed() < Duration::from_secs(1),
                "flip {flip} to {want} not visible within 1 s"
            );
            streak = if client.version(&mesh.authority()).await.unwrap() == want {
                streak + 1
            } else {
                0
            };
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "failed requests during flips: {failures:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 200, "too little load to tell");
}

fn fault(name: &str, spec: &str) -> String {
    format!("---\napiVersion: trellis.dev/v1alpha1\nkind: HTTPFault\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}

const FAULT_FILTER: &str = "      filters: [{type: ExtensionRef, extensionRef: {group: trellis.dev, kind: HTTPFault, name: f}}]\n";

#[tokio::test]
async fn abort_fault_hits_its_share() {
    let mesh = HelloMesh::start().await;
    let yaml = split_route(mesh.port, 50, 50, FAULT_FILTER)
        + &fault("f", "{abort: {httpStatus: 503, percent: 10}}");
    mesh.write_manifest("route.yaml", &yaml);
    until_applied(&mesh, |c| c.contains_key("503")).await;
    let answers = burst(&mesh.http1(), &mesh.authority(), 5_000, 8).await;
    let counts = versions(&answers);
    let aborted = share(&counts, "503");
    assert!(
        (aborted - 10.0).abs() <= 2.0,
        "503s: {aborted:.2}% ({counts:?})"
    );
    let injected = answers.iter().flatten().find(|a| a.status == 503).unwrap();
    assert_eq!(injected.headers["trellis-proxy-error"], "fault-injected");
}

#[tokio::test]
async fn delay_fault_delays_its_share() {
    let mesh = HelloMesh::start().await;
    let yaml = split_route(mesh.port, 50, 50, FAULT_FILTER)
        + &fault("f", "{delay: {fixedDelay: 200ms, percent: 50}}");
    mesh.write_manifest("route.yaml", &yaml);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // 8 clients × 25 requests, each timed.
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, authority) = (mesh.http1(), mesh.authority());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for _ in 0..25 {
                let started = Instant::now();
                client.version(&authority).await.unwrap();
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let (mut delayed, mut direct): (Vec<Duration>, Vec<Duration>) = latencies
        .into_iter()
        .partition(|l| *l >= Duration::from_millis(200));
    let share = delayed.len() as f64 / 2.0;
    assert!((35.0..=65.0).contains(&share), "{share}% delayed");
    delayed.sort();
    direct.sort();
    let added = delayed[delayed.len() / 2] - direct[direct.len() / 2];
    assert!(
        added >= Duration::from_millis(190) && added < Duration::from_millis(300),
        "the delay adds {added:?} at p50 to the affected share"
    );
}

#[tokio::test]
async fn route_timeout_answers_504_at_the_deadline() {
    let mesh = HelloMesh::start_with_apps(|listener, version| {
        scripted_app(listener, version, Duration::from_millis(800), |_| false);
    })
    .await;
    let yaml = split_route(mesh.port, 50, 50, "      timeouts: {request: 300ms}\n");
    mesh.write_manifest("route.yaml", &yaml);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let started = Instant::now();
    let answer = mesh.http1().get(&mesh.authority(), "/").await.unwrap();
    let took = started.elapsed();
    assert_eq!(answer.status, 504, "{}", answer.text());
    assert_eq!(answer.headers["trellis-proxy-error"], "timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(700),
        "took {took:?}"
    );
}

#[tokio::test]
async fn retries_recover_from_a_flaky_backend() {
    // v2 fails every other request; v1 is healthy. Retries pick their
    // backend anew; at this pace the budget (20% + 10/s) covers them.
    let mesh = HelloMesh::start_with_apps(|listener, version| {
        let flaky: fn(u64) -> bool = if version == "v2" {
            |hit| hit % 2 == 0
        } else {
            |_| false
        };
        scripted_app(listener, version, Duration::ZERO, flaky);
    })
    .await;
    let yaml = split_route(mesh.port, 50, 50, "      retry: {attempts: 2}\n");
    mesh.write_manifest("route.yaml", &yaml);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let client = mesh.http1();
    for i in 0..200 {
        client
            .version(&mesh.authority())
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_retry_budget_caps_retries_when_everything_fails() {
    // The budget's floor (10 up front, then 10 per second) accrues from the
    // first request, during set-up.
    let window = std::time::Instant::now();
    let hits: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
    let recorded = hits.clone();
    let mesh = HelloMesh::start_with_apps(move |listener, version| {
        recorded
            .lock()
            .unwrap()
            .push(scripted_app(listener, version, Duration::ZERO, |_| true));
    })
    .await;
    let yaml = split_route(mesh.port, 50, 50, "      retry: {attempts: 3}\n");
    mesh.write_manifest("route.yaml", &yaml);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before: u64 = hits
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.load(Ordering::SeqCst))
        .sum();
    let requests = 500;
    let answers = burst(&mesh.http1(), &mesh.authority(), requests, 4).await;
    let seconds = window.elapsed().as_secs() + 1;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|a| a.status == 503)),
        "every request fails"
    );
    let after: u64 = hits
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.load(Ordering::SeqCst))
        .sum();
    let sent = after - before;
    // Without a budget 3 retries would mean 4x the load; the budget allows
    // 20% more plus 10 per second.
    assert!(
        sent <= requests as u64 * 12 / 10 + 10 + 10 * seconds,
        "{sent} backend hits for {requests} requests"
    );
    assert!(sent > requests as u64, "some retries happen: {sent}");
}

#[tokio::test]
async fn an_invalid_route_is_rejected_and_the_last_good_one_keeps_serving() {
    let mesh = HelloMesh::start().await;
    mesh.write_manifest("route.yaml", &split_route(mesh.port, 100, 0, ""));
    until_applied(&mesh, |c| c.keys().eq(["v1"])).await;
    let mut errors = mesh.controller.as_ref().unwrap().manifest_errors.clone();
    mesh.write_manifest("route.yaml", &split_route(mesh.port, 0, 0, ""));
    let rejected = tokio::time::timeout(Duration::from_secs(2), errors.wait_for(|e| !e.is_empty()))
        .await
        .expect("reported")
        .unwrap()
        .clone();
    assert!(
        rejected[0].to_string().contains("every weight is 0"),
        "{}",
        rejected[0]
    );
    let counts = versions(&burst(&mesh.http1(), &mesh.authority(), 200, 4).await);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["v1"],
        "the last good route serves: {counts:?}"
    );
}

#[tokio::test]
async fn requests_with_side_effects_are_never_retried() {
    let hits: Arc<std::sync::Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
    let recorded = hits.clone();
    let mesh = HelloMesh::start_with_apps(move |listener, version| {
        recorded
            .lock()
            .unwrap()
            .push(scripted_app(listener, version, Duration::ZERO, |_| true));
    })
    .await;
    mesh.write_manifest(
        "route.yaml",
        &split_route(mesh.port, 50, 50, "      retry: {attempts: 3}\n"),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let total = || -> u64 {
        hits.lock()
            .unwrap()
            .iter()
            .map(|h| h.load(Ordering::SeqCst))
            .sum()
    };
    let client = mesh.http1();

    // POST is not idempotent: one attempt, whatever the route says.
    let before = total();
    let answer = client
        .request(
            http::Method::POST,
            &mesh.authority(),
            "/",
            &[],
            bytes::Bytes::from_static(b"order=1"),
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(
        total() - before,
        1,
        "a POST reached the backend more than once"
    );

    // A PUT (idempotent) with a body is not retried either: the body is not buffered.
    let before = total();
    client
        .request(
            http::Method::PUT,
            &mesh.authority(),
            "/",
            &[],
            bytes::Bytes::from_static(b"x"),
        )
        .await
        .unwrap();
    assert_eq!(total() - before, 1, "a request with a body was retried");

    // The control: a bodiless GET is retried.
    let before = total();
    client.get(&mesh.authority(), "/").await.unwrap();
    assert!(total() - before > 1, "a GET was not retried");
}
