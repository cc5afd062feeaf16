//! Metrics end to end: what the proxies count equals what was sent.

use std::collections::BTreeMap;

use trellis_tests::*;

/// Scrapes a proxy's `/metrics` and sums the series of `family` whose
/// labels include every `(name, value)` of `filter`.
async fn sum(proxy: &trellis_proxy::Proxy, family: &str, filter: &[(&str, &str)]) -> f64 {
    sum_series(&scrape_addr(proxy.admin_addr).await, family, filter)
}

async fn scrape_addr(addr: std::net::SocketAddr) -> String {
    let client = AppClient::http1(addr);
    let answer = client.get(&addr.to_string(), "/metrics").await.unwrap();
    assert_eq!(answer.status, 200);
    let content_type = answer.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    answer.text()
}

#[tokio::test]
async fn request_counters_match_the_traffic_exactly() {
    let mesh = HelloMesh::start().await;
    // The set-up's readiness probes count too: measure from here.
    let before_out = sum(
        &mesh.client,
        "trellis_requests_total",
        &[("direction", "outbound")],
    )
    .await;
    let inbound_filter = |version: &'static str| {
        [
            ("direction", "inbound"),
            ("src_workload", "frontend"),
            ("dst_version", version),
            ("status_code", "200"),
            (
                "peer_identity",
                "spiffe://cluster.local/ns/default/sa/frontend",
            ),
        ]
    };
    let mut before_in = Vec::new();
    for (i, version) in ["v1", "v2"].into_iter().enumerate() {
        before_in.push(
            sum(
                &mesh.hello[i].1,
                "trellis_requests_total",
                &inbound_filter(version),
            )
            .await,
        );
    }
    let answers = burst(&mesh.http1(), &mesh.authority(), 300, 4).await;
    let counts: BTreeMap<String, usize> = versions(&answers);
    assert_eq!(counts.values().sum::<usize>(), 300);

    let out = |version: &'static str| {
        let filter = [
            ("direction", "outbound"),
            ("dst_service", "hello"),
            ("dst_namespace", "default"),
            ("dst_version", version),
            ("status_code", "200"),
            ("classification", "success"),
            ("tls", "true"),
            (
                "peer_identity",
                "spiffe://cluster.local/ns/default/sa/hello",
            ),
        ];
        async move { filter }
    };
    let mut total = 0.0;
    for version in ["v1", "v2"] {
        let filter = out(version).await;
        let counted = sum(&mesh.client, "trellis_requests_total", &filter).await;
        let histogram = sum(
            &mesh.client,
            "trellis_response_latency_seconds_count",
            &filter,
        )
        .await;
        assert_eq!(
            histogram, counted,
            "{version}: one latency observation per request"
        );
        total += counted;
        // The server side counts the same requests, with the verified client.
        let i = if version == "v1" { 0 } else { 1 };
        let inbound = sum(
            &mesh.hello[i].1,
            "trellis_requests_total",
            &inbound_filter(version),
        )
        .await
            - before_in[i];
        let sent = counts.get(version).copied().unwrap_or(0) as f64;
        assert_eq!(
            inbound, sent,
            "{version}: the server's proxy counts what its app answered"
        );
    }
    let after_out = sum(
        &mesh.client,
        "trellis_requests_total",
        &[("direction", "outbound")],
    )
    .await;
    assert_eq!(after_out - before_out, 300.0, "exactly the requests sent");
    assert!(total >= 300.0);

    let expiry = sum(
        &mesh.client,
        "trellis_identity_cert_expiration_timestamp_seconds",
        &[],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        expiry > now && expiry < now + 7200.0,
        "certificate expiry exported: {expiry}"
    );
}

#[tokio::test]
async fn failures_are_counted_with_their_status() {
    let mesh = HelloMesh::start().await;
    // A name that is no mesh Service shares one label value, so made-up
    // names cannot grow the metrics (the mesh's start-up polled one too).
    let unknown = [
        ("direction", "outbound"),
        ("dst_service", "unknown"),
        ("status_code", "503"),
        ("classification", "failure"),
    ];
    let before = sum(&mesh.client, "trellis_requests_total", &unknown).await;
    for _ in 0..7 {
        let answer = mesh
            .http1()
            .get("nope.default.svc.cluster.local:80", "/")
            .await
            .unwrap();
        assert_eq!(answer.status, 503);
    }
    let after = sum(&mesh.client, "trellis_requests_total", &unknown).await;
    assert_eq!(after - before, 7.0);
    let text = scrape_addr(mesh.client.admin_addr).await;
    assert!(
        !text.contains("\"nope\""),
        "no series names the made-up Service"
    );
}

#[tokio::test]
async fn the_controller_exports_its_store_pushes_and_certificates() {
    let mesh = HelloMesh::start().await;
    let text = scrape_addr(mesh.controller.as_ref().unwrap().admin_addr).await;
    assert_eq!(
        sum_series(&text, "trellis_controller_objects", &[("kind", "Service")]),
        3.0,
        "{text}"
    );
    assert_eq!(
        sum_series(&text, "trellis_controller_objects", &[("kind", "Pod")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sum_series(&text, "trellis_controller_certificates_issued_total", &[]),
        3.0,
        "one per proxy"
    );
    assert_eq!(
        sum_series(&text, "trellis_controller_certificates_refused_total", &[]),
        0.0
    );
    assert!(
        sum_series(&text, "trellis_controller_updates_pushed_total", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        sum_series(&text, "trellis_controller_watches", &[]) >= 2.0,
        "{text}"
    );
    assert_eq!(
        sum_series(&text, "trellis_controller_manifest_errors", &[]),
        0.0
    );
}

#[tokio::test]
async fn connections_bytes_and_discovery_state_are_exported() {
    let mut mesh = HelloMesh::start().await;
    let client = mesh.http1();
    let mut answered = 0;
    for _ in 0..10 {
        answered += client.get(&mesh.authority(), "/").await.unwrap().body.len();
    }
    // Bytes are counted when a connection closes: close the client's.
    drop(client);
    let outbound = [("direction", "outbound")];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while sum(
        &mesh.client,
        "trellis_tcp_connections_closed_total",
        &outbound,
    )
    .await
        < 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "connections not closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = scrape_addr(mesh.client.admin_addr).await;
    // The readiness probe's connection and the client's, both closed now.
    assert_eq!(
        sum_series(&text, "trellis_tcp_connections_opened_total", &outbound),
        2.0,
        "{text}"
    );
    assert_eq!(
        sum_series(&text, "trellis_tcp_open_connections", &outbound),
        0.0
    );
    let written = sum_series(&text, "trellis_tcp_write_bytes_total", &outbound);
    assert!(
        written > answered as f64,
        "{written} bytes written to clients, {answered} bytes of bodies alone"
    );
    assert!(sum_series(&text, "trellis_tcp_read_bytes_total", &outbound) > 10.0 * 16.0);

    // Discovery: streaming while the controller is up, reconnecting after.
    let streams = |state| [("kind", "endpoints"), ("state", state)];
    assert!(sum_series(&text, "trellis_discovery_streams", &streams("open")) >= 1.0);
    assert_eq!(
        sum_series(&text, "trellis_discovery_streams", &streams("reconnecting")),
        0.0
    );
    mesh.controller.take().unwrap().kill();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = scrape_addr(mesh.client.admin_addr).await;
        let open = sum_series(&text, "trellis_discovery_streams", &streams("open"));
        let reconnecting = sum_series(&text, "trellis_discovery_streams", &streams("reconnecting"));
        if open == 0.0 && reconnecting >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stream reconnecting 5 s after the controller died:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_controller_measures_how_fast_a_change_reaches_the_proxies() {
    let mesh = HelloMesh::start().await;
    let admin = mesh.controller.as_ref().unwrap().admin_addr;
    let pushes =
        |text: &str| sum_series(text, "trellis_controller_push_latency_seconds_count", &[]);
    let before = pushes(&scrape_addr(admin).await);
    // hello loses v2: the client's watch of hello gets one update.
    mesh.write_hello(&["v1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = scrape_addr(admin).await;
        if pushes(&text) > before {
            let seconds = sum_series(&text, "trellis_controller_push_latency_seconds_sum", &[]);
            assert!(seconds < 1.0, "a push took {seconds} s:\n{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no push measured:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
