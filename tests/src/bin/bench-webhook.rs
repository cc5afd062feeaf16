//! The injection webhook under load: `--clients` (200) concurrent clients,
//! each on its own TLS connection verified with the mesh's CA bundle and
//! the Service's DNS name, sending AdmissionReviews of a pod in a labelled
//! namespace to an in-process controller for `--seconds` (10). Prints the
//! review latency p50 / p99 / max and reviews per second; the last line is
//! the figures as JSON. Every answer must carry a patch.
//!
//! cargo run --release -p trellis-tests --bin bench-webhook -- [--seconds N] [--clients N]

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
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut client in connected {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
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
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let max = latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let rate = latencies.len() as f64 / elapsed;
    println!(
        "webhook: {clients} concurrent clients over TLS for {seconds} s, {} reviews, {} bytes each",
        latencies.len(),
        body.len()
    );
    println!("  latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    println!("  {rate:.0} reviews/s");
    println!(
        "{}",
        serde_json::json!({
            "clients": clients,
            "reviews": latencies.len(),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": max,
            "reviews_per_second": rate,
        })
    );
}
