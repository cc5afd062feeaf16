//! The injection webhook under load: `--clients` (200) concurrent clients,
//! each on its own TLS connection verified with the mesh's CA bundle and
//! the Service's DNS name, sending AdmissionReviews of a pod in a labelled
//! namespace to an in-process controller, for `--seconds` (10) paced at
//! `--rate` (2,000) reviews/s in all, then as fast as answers come back.
//! Prints reviews/s and the review latency p50 / p99 / max of each phase;
//! the last line is the figures as JSON. Every answer must carry a patch.
//!
//! cargo run --release -p trellis-tests --bin bench-webhook -- [--seconds N] [--clients N] [--rate N]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_control_plane::controller::{Controller, ControllerConfig, WebhookConfig};
use trellis_control_plane::identity::BUNDLE;
use trellis_tests::webhook::{client_config, hello_pod, pod_review, WebhookClient, SERVICE_NAME};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * q) as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let seconds = arg("--seconds", 10);
    let clients = arg("--clients", 200) as usize;
    let rate = arg("--rate", 2000);
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests");
    std::fs::write(
        manifests.join("namespace.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {trellis.dev/inject: enabled}}\n",
    )
    .expect("namespace");
    let mut config = ControllerConfig::local(dir.path(), Ipv4Addr::LOCALHOST.into());
    config.webhook = Some(WebhookConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        service: "trellis-webhook".into(),
        inject: Default::default(),
    });
    let controller = Controller::start(config).await.expect("controller");
    let webhook = controller.webhook_addr.expect("webhook");
    let bundle = std::fs::read_to_string(dir.path().join(BUNDLE)).expect("bundle");
    let tls = client_config(&bundle);
    let body = Arc::new(
        serde_json::to_vec(&pod_review("bench", "shop", hello_pod("hello-1"), false))
            .expect("JSON"),
    );

    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        connected.push(
            WebhookClient::connect(webhook, tls.clone(), SERVICE_NAME)
                .await
                .expect("connect"),
        );
    }
    // Paced: every client sends at an even share of `--rate`, as the API
    // server does when pods are created; the latency a pod's creation sees.
    let paced = run_phase(&mut connected, &body, seconds, Some(rate)).await;
    // Saturated: every client sends its next review as soon as it has the
    // answer; the throughput (latency is then queueing: clients / rate).
    let saturated = run_phase(&mut connected, &body, seconds, None).await;
    println!(
        "webhook: {clients} concurrent clients over TLS, {} bytes per review, {seconds} s per phase",
        body.len()
    );
    for (name, phase) in [("paced", &paced), ("saturated", &saturated)] {
        println!(
            "  {name:9}: {:.0} reviews/s, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            phase.rate, phase.p50, phase.p99, phase.max
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "clients": clients,
            "paced": paced.json(),
            "saturated": saturated.json(),
        })
    );
}

struct Phase {
    reviews: usize,
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Phase {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "reviews": self.reviews,
            "reviews_per_second": self.rate,
            "p50_ms": self.p50,
            "p99_ms": self.p99,
            "max_ms": self.max,
        })
    }
}

/// Every client sends reviews for `seconds`, each at `rate / clients` per
/// second if paced, else back to back.
async fn run_phase(
    clients: &mut Vec<WebhookClient>,
    body: &Arc<Vec<u8>>,
    seconds: u64,
    rate: Option<u64>,
) -> Phase {
    let n = clients.len();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (i, mut client) in std::mem::take(clients).into_iter().enumerate() {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut pace = rate.map(|rate| {
                let period = Duration::from_secs_f64(n as f64 / rate as f64);
                // Spread the clients' sends evenly over one period.
                let first = tokio::time::Instant::now() + period.mul_f64(i as f64 / n as f64);
                let mut interval = tokio::time::interval_at(first, period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                interval
            });
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                let sent = Instant::now();
                let (status, answer) = client
                    .post("/inject", body.as_ref().clone())
                    .await
                    .expect("an answer");
                latencies.push(sent.elapsed());
                assert_eq!(status, 200);
                // The patch is there (a base64 string after "patch").
                assert!(
                    answer.windows(9).any(|w| w == b"\"patch\":\""),
                    "no patch in {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            (client, latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        let (client, mine) = task.await.expect("client");
        clients.push(client);
        latencies.extend(mine);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    Phase {
        reviews: latencies.len(),
        rate: latencies.len() as f64 / elapsed,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    }
}
