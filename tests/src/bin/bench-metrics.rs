//! What request metrics cost: the same mesh (client → sidecar → mTLS →
//! sidecar → app) with metrics on and off, interleaved round by round in
//! one run, closed-loop load. Prints medians, spread and the ratio.
//!
//! cargo run --release -p trellis-tests --bin bench-metrics -- [rounds] [seconds] [concurrency]

use std::time::{Duration, Instant};

use trellis_tests::{AppClient, HelloMesh};

struct Round {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(mesh: &HelloMesh, seconds: u64, concurrency: usize) -> Round {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, authority): (AppClient, String) = (mesh.http1(), mesh.authority());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < end {
                let started = Instant::now();
                if client.version(&authority).await.is_ok() {
                    latencies.push(started.elapsed());
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap_or_default());
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
    let concurrency = args.get(2).copied().unwrap_or(16) as usize;
    let on = HelloMesh::start().await;
    let off =
        HelloMesh::start_with_proxy_env(vec![(trellis_proxy::config::METRICS, "off".into())]).await;
    let mut results: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (i, mesh) in [&on, &off].into_iter().enumerate() {
            let r = run(mesh, seconds, concurrency).await;
            eprintln!(
                "round {round} metrics {}: {:.0} rps",
                if i == 0 { "on" } else { "off" },
                r.rps
            );
            results[i].push(r);
        }
    }
    println!("| metrics | rps (median) | rps min–max | p50 | p99 |");
    println!("|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (i, name) in ["on", "off"].into_iter().enumerate() {
        let rps: Vec<f64> = results[i].iter().map(|r| r.rps).collect();
        let (min, max) = rps
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let p50 = median(
            results[i]
                .iter()
                .map(|r| r.p50.as_secs_f64() * 1000.0)
                .collect(),
        );
        let p99 = median(
            results[i]
                .iter()
                .map(|r| r.p99.as_secs_f64() * 1000.0)
                .collect(),
        );
        let m = median(rps);
        medians.push(m);
        println!("| {name} | {m:.0} | {min:.0}–{max:.0} | {p50:.3} ms | {p99:.3} ms |");
    }
    println!(
        "\nmetrics on / off throughput: {:.3} ({rounds} interleaved rounds of {seconds} s, {concurrency} concurrent clients)",
        medians[0] / medians[1]
    );
}
