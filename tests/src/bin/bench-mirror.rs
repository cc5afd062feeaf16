//! What a slow mirror costs the requests it copies: the same route on the
//! conformance mesh (client sidecar → mTLS → echo-v1's sidecar → echo)
//! with and without a RequestMirror to a pod that takes 2 s to answer,
//! interleaved round by round in one run, closed-loop load. Prints p50 and
//! p99 per mode (medians over rounds) and their ratios.
//!
//! cargo run --release -p trellis-tests --bin bench-mirror -- [rounds] [seconds] [concurrency]

use std::time::{Duration, Instant};

use trellis_tests::conformance::{ConformanceMesh, Echoed, MESH_NS};
use trellis_tests::{eventually, metric, AppClient};

struct Round {
    rps: f64,
    p50: Duration,
    p99: Duration,
    failures: usize,
}

/// The route on `echo` to echo-v1, marked with `mode` in a request header
/// (so a round can tell it applied), with a mirror to `slow` or without.
fn route(mode: &str) -> String {
    let mirror = match mode {
        "mirror" => ", {type: RequestMirror, requestMirror: {backendRef: {name: slow, port: 80}}}",
        _ => "",
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bench-mirror, namespace: {MESH_NS}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]
  rules:
    - filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-mode, value: {mode}}}]}}}}{mirror}]
      backendRefs: [{{name: echo-v1, port: 80}}]
"
    )
}

async fn switch(mesh: &ConformanceMesh, mode: &str) {
    mesh.apply("route.yaml", &route(mode));
    let (client, host) = (mesh.client(), format!("echo.{MESH_NS}"));
    eventually(Duration::from_secs(10), "the route applies", || async {
        let answer = client.get(&host, "/").await?;
        let echoed: Echoed = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
        match echoed.header("x-mode") {
            Some(m) if m == mode => Ok(()),
            other => Err(format!("mode {other:?}")),
        }
    })
    .await;
}

async fn run(client: &AppClient, seconds: u64, concurrency: usize) -> Round {
    let end = Instant::now() + Duration::from_secs(seconds);
    let host = format!("echo.{MESH_NS}");
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, host) = (client.clone(), host.clone());
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), 0);
            while Instant::now() < end {
                let started = Instant::now();
                match client.get(&host, "/").await {
                    Ok(a) if a.status == 200 => latencies.push(started.elapsed()),
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let (mut latencies, mut failures) = (Vec::new(), 0);
    for worker in workers {
        let (l, f) = worker.await.unwrap_or_default();
        latencies.extend(l);
        failures += f;
    }
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len().saturating_sub(1)) as f64 * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Round {
        rps: latencies.len() as f64 / seconds as f64,
        p50: at(0.5),
        p99: at(0.99),
        failures,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(5) as usize;
    let seconds = args.get(1).copied().unwrap_or(3);
    let concurrency = args.get(2).copied().unwrap_or(8) as usize;
    let mut mesh = ConformanceMesh::start().await;
    let slow = mesh.recorder("slow", Duration::from_secs(2)).await;
    let client = mesh.client();
    let modes = ["plain", "mirror"];
    let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, mode) in modes.into_iter().enumerate() {
            switch(&mesh, mode).await;
            let r = run(&client, seconds, concurrency).await;
            eprintln!(
                "round {round} {mode}: {:.0} rps, p50 {:?}, p99 {:?}, {} failed",
                r.rps, r.p50, r.p99, r.failures
            );
            results[i].push(r);
        }
    }
    println!("| mode | rps (median) | p50 | p99 | failed |");
    println!("|---|---|---|---|---|");
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        let ms = |f: fn(&Round) -> Duration| {
            median(
                results[i]
                    .iter()
                    .map(|r| f(r).as_secs_f64() * 1000.0)
                    .collect(),
            )
        };
        let (p50, p99) = (ms(|r| r.p50), ms(|r| r.p99));
        let rps = median(results[i].iter().map(|r| r.rps).collect());
        let failed: usize = results[i].iter().map(|r| r.failures).sum();
        p50s.push(p50);
        p99s.push(p99);
        println!("| {mode} | {rps:.0} | {p50:.3} ms | {p99:.3} ms | {failed} |");
    }
    // Copies still in flight end within the mirror's 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin = mesh.echo[0].proxy.admin_addr;
    let mut copies = Vec::new();
    for result in ["answered", "failed", "abandoned"] {
        let filter = [("dst_service", "slow"), ("result", result)];
        let n = metric(admin, "trellis_request_mirrors_total", &filter).await;
        copies.push(format!("{n} {result}"));
    }
    let received = slow.seen.lock().map_or(0, |s| s.len());
    println!(
        "\nmirrored copies: {} ({received} received by the mirror)",
        copies.join(", ")
    );
    println!(
        "with / without a 2 s mirror: p50 {:.3}, p99 {:.3} ({rounds} interleaved rounds of {seconds} s, {concurrency} concurrent clients)",
        p50s[1] / p50s[0],
        p99s[1] / p99s[0]
    );
}
