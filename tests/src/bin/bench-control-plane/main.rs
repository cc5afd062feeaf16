//! Control-plane scale: 1,000 Services with 10 endpoints each, 100 discovery
//! watchers over real gRPC on loopback; how long an endpoint change takes to
//! reach every watcher, how long the initial snapshots take, and how fast
//! the CA signs. Then the same through the cluster source: a controller
//! process watching the fake API server (`cluster.rs`).
//!
//! cargo run --release -p trellis-tests --bin bench-control-plane -- [--quick]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Streaming;
use trellis_control_plane::discovery::DiscoveryService;
use trellis_control_plane::identity::Ca;
use trellis_control_plane::metrics::ControllerMetrics;
use trellis_control_plane::model::Object;
use trellis_control_plane::source::manifest;
use trellis_control_plane::store::Store;
use trellis_proto::discovery::discovery_client::DiscoveryClient;
use trellis_proto::discovery::{EndpointUpdate, WatchRequest};
use trellis_proto::SpiffeId;

/// One Service and its EndpointSlice with `endpoints` addresses; `salt`
/// changes the last address (an endpoint change).
pub(crate) fn service(i: usize, endpoints: usize, salt: usize) -> String {
    let addresses: Vec<String> = (0..endpoints)
        .map(|e| {
            // The last address moves with `salt`, away from the others.
            let last = if e + 1 == endpoints {
                100 + salt % 150
            } else {
                e + 1
            };
            format!("\"10.{}.{}.{}\"", i / 250, i % 250, last)
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec: {{ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-1, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
         addressType: IPv4\nendpoints: [{}]\nports: [{{port: 8080}}]\n",
        addresses.iter().map(|a| format!("{{addresses: [{a}]}}")).collect::<Vec<_>>().join(", ")
    )
}

fn objects(yaml: &str) -> Vec<Object> {
    manifest::parse(Path::new("bench.yaml"), yaml).expect("valid manifests")
}

pub(crate) fn percentile(sorted: &[Duration], q: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * q) as usize)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

mod cluster;

/// The Service every watcher follows.
const TARGET: &str = "svc-7.default.svc.cluster.local:80";

/// `n` discovery streams of [`TARGET`] over one connection, each past its
/// snapshot.
async fn open_watchers(addr: SocketAddr, n: usize) -> Vec<Streaming<EndpointUpdate>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut streams = Vec::new();
    for _ in 0..n {
        let request = WatchRequest {
            authority: TARGET.into(),
            client_identity: String::new(),
        };
        let mut stream = DiscoveryClient::new(channel.clone())
            .watch_endpoints(request)
            .await
            .expect("watch")
            .into_inner();
        stream.message().await.expect("snapshot").expect("snapshot");
        streams.push(stream);
    }
    streams
}

/// Makes `changes` endpoint changes of [`TARGET`] with `change(1..)` and
/// times each until every stream has it; sorted.
async fn measure_changes(
    streams: &mut [Streaming<EndpointUpdate>],
    changes: usize,
    mut change: impl FnMut(usize),
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for n in 1..=changes {
        let started = Instant::now();
        change(n);
        let mut arrivals = Vec::new();
        for stream in streams.iter_mut() {
            // An Add and a Remove arrive for a moved address.
            for _ in 0..2 {
                tokio::time::timeout(Duration::from_secs(10), stream.message())
                    .await
                    .expect("an update within 10 s")
                    .expect("update")
                    .expect("update");
            }
            arrivals.push(started.elapsed());
        }
        latencies.push(arrivals.into_iter().max().unwrap_or_default());
    }
    latencies.sort();
    latencies
}

use trellis_tests::rss_kib;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, api, state] = &args[..] {
        if flag == cluster::CONTROLLER_FLAG {
            return cluster::run_controller(api, state).await;
        }
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (services, endpoints, watchers, changes) = if quick {
        (100, 10, 20, 10)
    } else {
        (1000, 10, 100, 50)
    };
    let rss_before = rss_kib();

    // One file per Service, as a directory of manifests would hold them.
    let files: Vec<String> = (0..services).map(|i| service(i, endpoints, 0)).collect();
    let loaded = Instant::now();
    let store = Store::new("cluster.local");
    store.replace_all(files.iter().flat_map(|yaml| objects(yaml)));
    let load_time = loaded.elapsed();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let discovery = DiscoveryService::new(store.clone(), Arc::new(ControllerMetrics::new()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(discovery.into_server())
            .serve_with_incoming(trellis_control_plane::controller::incoming(listener)),
    );
    // Every watcher follows the same Service (the worst fan-out), plus the
    // store keeps every other Service's state.
    let snapshot_start = Instant::now();
    let mut streams = open_watchers(addr, watchers).await;
    let snapshot_time = snapshot_start.elapsed();
    let latencies = measure_changes(&mut streams, changes, |change| {
        for object in objects(&service(7, endpoints, change)) {
            store.apply(object);
        }
    })
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::load_or_create(dir.path(), "cluster.local").expect("ca");
    let id = SpiffeId::new("cluster.local", "default", "bench");
    let csrs: Vec<Vec<u8>> = (0..if quick { 200 } else { 2000 })
        .map(|_| trellis_proxy::tls::generate_csr(&id).expect("csr").1)
        .collect();
    let signing = Instant::now();
    for csr in &csrs {
        ca.sign(&id, csr, Duration::from_secs(3600)).expect("sign");
    }
    let csr_per_second = csrs.len() as f64 / signing.elapsed().as_secs_f64();

    println!("| figure | value |\n|---|---|");
    println!("| Services × endpoints | {services} × {endpoints} |");
    println!(
        "| load into the store | {:.1} ms |",
        load_time.as_secs_f64() * 1000.0
    );
    println!(
        "| {watchers} initial snapshots (sequential) | {:.1} ms |",
        snapshot_time.as_secs_f64() * 1000.0
    );
    println!(
        "| endpoint change → all {watchers} watchers, p50 / p99 ({changes} changes) | {:.2} ms / {:.2} ms |",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!(
        "| process RSS growth (store, server, clients) | {} KiB |",
        rss_kib().saturating_sub(rss_before)
    );
    println!("| CA signing rate (one core) | {csr_per_second:.0} CSR/s |");

    cluster::bench(quick).await;
}
