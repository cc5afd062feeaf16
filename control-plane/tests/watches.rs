//! The controller's per-authority state is bounded by the streams that are
//! open: a client asking about made-up authorities costs nothing once its
//! streams end, whether it cancels them or disconnects.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Streaming;
use trellis_control_plane::controller::Controller;
use trellis_proto::discovery::discovery_client::DiscoveryClient;
use trellis_proto::discovery::endpoint_update::Kind;
use trellis_proto::discovery::{EndpointUpdate, Routes};

use support::{connect, metrics, request, series, start, HELLO};

/// Made-up authorities per kind (endpoints, routes), as a hostile client
/// would send them.
const MADE_UP: usize = 1000;
/// Connections the made-up streams are spread over.
const CONNECTIONS: usize = 10;
/// How long the controller may take to forget them.
const PATIENCE: Duration = Duration::from_secs(2);

/// Open streams of both kinds, each past its first message.
#[derive(Default)]
struct Streams {
    endpoints: Vec<Streaming<EndpointUpdate>>,
    routes: Vec<Streaming<Routes>>,
}

/// Opens an endpoint and a route watch for each of `MADE_UP` authorities
/// that no Service answers, spread over `clients`, and reads their first
/// message.
async fn watch_made_up(clients: &mut [DiscoveryClient<Channel>], round: usize) -> Streams {
    let mut streams = Streams::default();
    for i in 0..MADE_UP {
        let client = &mut clients[i % clients.len()];
        let authority = format!("x{round}-{i}.default.svc.cluster.local:80");
        let mut endpoints = client
            .watch_endpoints(request(&authority))
            .await
            .unwrap()
            .into_inner();
        let first = endpoints.message().await.unwrap().unwrap();
        assert!(
            matches!(first.kind, Some(Kind::NoEndpoints(ref n)) if !n.exists),
            "{authority} names no Service: {first:?}"
        );
        let mut routes = client
            .watch_routes(request(&authority))
            .await
            .unwrap()
            .into_inner();
        let first = routes.message().await.unwrap().unwrap();
        assert!(first.rules.is_empty(), "{authority}: {first:?}");
        streams.endpoints.push(endpoints);
        streams.routes.push(routes);
    }
    streams
}

/// The `trellis_controller_watches` gauge, as the admin port serves it.
async fn watches_gauge(admin: SocketAddr) -> i64 {
    let metrics = metrics(admin).await;
    series(&metrics, "trellis_controller_watches").expect("trellis_controller_watches in /metrics")
        as i64
}

/// Waits until the store and the gauge both count `expected` watches.
async fn assert_watches_return_to(controller: &Controller, expected: usize, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let counted = controller.store.counts().watches;
        let gauge = watches_gauge(controller.admin_addr).await;
        if counted == expected && gauge == expected as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {counted} watches in the store and {gauge} in the gauge after {PATIENCE:?}, \
             expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_of_made_up_authorities_are_forgotten_when_their_streams_end() {
    let dir = tempfile::tempdir().unwrap();
    let controller = start(dir.path(), &[("hello.yaml", HELLO)]).await;

    // A real proxy's watch of hello stays open throughout.
    let mut proxy = connect(controller.addr).await;
    let mut hello = proxy
        .watch_endpoints(request("hello.default.svc.cluster.local:8080"))
        .await
        .unwrap()
        .into_inner();
    let first = hello.message().await.unwrap().unwrap();
    assert!(matches!(first.kind, Some(Kind::Snapshot(_))), "{first:?}");
    let baseline = controller.store.counts().watches;
    assert_eq!(baseline, 1);
    let changed_at = controller.store.changed_at();
    let rss_start = rss_kib();

    // Cancelled streams on connections that stay open.
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(connect(controller.addr).await);
    }
    let streams = watch_made_up(&mut clients, 1).await;
    // A second holder of hello's watch leaves with them.
    let mut extra = proxy
        .watch_endpoints(request("hello.default.svc.cluster.local:8080"))
        .await
        .unwrap()
        .into_inner();
    extra.message().await.unwrap().unwrap();
    assert_eq!(controller.store.counts().watches, baseline + 2 * MADE_UP);
    let rss_peak = rss_kib();
    drop((streams, extra));
    assert_watches_return_to(&controller, baseline, "cancelled streams").await;
    let rss_cancelled = rss_kib();

    // Streams whose connections go away.
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(connect(controller.addr).await);
    }
    let streams = watch_made_up(&mut clients, 2).await;
    assert_eq!(controller.store.counts().watches, baseline + 2 * MADE_UP);
    drop(clients);
    drop(streams);
    assert_watches_return_to(&controller, baseline, "disconnected clients").await;
    assert_eq!(
        controller.store.changed_at(),
        changed_at,
        "the watches went without any store change"
    );
    let rss_end = rss_kib();
    println!(
        "VmRSS (test process: controller and clients): start {rss_start} KiB, \
         with {} streams {rss_peak} KiB, after cancelling {rss_cancelled} KiB, \
         after disconnecting {rss_end} KiB",
        2 * MADE_UP
    );

    // The watch that stayed open still follows hello.
    std::fs::write(
        dir.path().join("manifests/hello.yaml"),
        HELLO.replace(", {addresses: [127.0.0.4]}", ""),
    )
    .unwrap();
    let update = tokio::time::timeout(Duration::from_secs(5), hello.message())
        .await
        .expect("an update for hello within 5 s")
        .unwrap()
        .unwrap();
    assert!(
        matches!(&update.kind, Some(Kind::Remove(r)) if r.addresses == ["127.0.0.4:8080"]),
        "{update:?}"
    );
}
