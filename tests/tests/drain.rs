//! Draining a sidecar: what it has in flight finishes, then the drain
//! completes; what arrives meanwhile is served by the other endpoints.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use trellis_tests::*;

#[tokio::test]
async fn a_drained_sidecar_finishes_uploads_and_streams_and_new_requests_go_elsewhere() {
    // The 10 s upload must not meet the request timeout (which covers the
    // body today): this test is about the drain.
    let env = vec![(trellis_proxy::config::REQUEST_TIMEOUT, "120s".to_string())];
    let mut mesh = HelloMesh::start_with_apps_and_env(env, workbench_app).await;
    let v1 = format!("hello-v1.default.svc.cluster.local:{}", mesh.port);
    mesh.http1().wait_routable(&v1).await;
    let outbound = mesh.client.outbound_addr;

    // In flight on hello-v1: an upload of 10 MiB at 1 MiB/s over HTTP/1.1…
    let upload = {
        let request = http::Request::post(format!("http://{v1}/upload"))
            .body(paced_body(40, 256 * 1024, Duration::from_millis(250)))
            .expect("request");
        tokio::spawn(send_once(outbound, false, request))
    };
    // …and a streaming response of 40 lines over 8 s over HTTP/2.
    let stream = {
        let request = http::Request::get(format!("http://{v1}/stream/40"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        tokio::spawn(send_once(outbound, true, request))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (v1_ip, v1_proxy) = mesh.hello.remove(0);
    let (v1_inbound, v1_admin) = (v1_proxy.inbound_addr, v1_proxy.admin_addr);
    let drain_started = Instant::now();
    let drain = tokio::spawn(async move {
        let drained = v1_proxy.drain().await;
        (drained, drain_started.elapsed(), v1_proxy)
    });

    // During the drain: hello-v1's sidecar refuses new connections and is
    // not ready; requests to `hello` keep being answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = tokio::net::TcpStream::connect(v1_inbound).await;
    let ready = AppClient::http1(v1_admin)
        .get(&v1_admin.to_string(), "/ready")
        .await;
    let client = mesh.http1();
    let mut during = Vec::new();
    for _ in 0..50 {
        during.push(client.get(&mesh.authority(), "/").await);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }

    let upload = upload.await.expect("upload task").expect("the upload");
    assert_eq!(upload.status, 200, "{}", upload.text());
    let greeting = upload.greeting().expect("greeting");
    assert_eq!(
        (greeting.version.as_str(), greeting.message.as_str()),
        ("v1", "10485760 bytes, x-big 0"),
        "the whole upload reached hello-v1"
    );
    let stream = stream.await.expect("stream task").expect("the stream");
    assert_eq!(stream.status, 200);
    assert_eq!(stream.text().lines().count(), 40, "{}", stream.text());

    let (drained, elapsed, _v1_proxy) = tokio::time::timeout(Duration::from_secs(25), drain)
        .await
        .expect("the drain ends within its timeout")
        .expect("drain task");
    assert_eq!(drained.cut, 0, "nothing was cut: {drained:?}");
    assert!(
        elapsed >= Duration::from_secs(7),
        "the drain waited for the upload and the stream: {elapsed:?}"
    );
    eprintln!("hello-v1 ({v1_ip}) drained in {elapsed:?}");

    assert!(
        refused.is_err(),
        "hello-v1's inbound listener accepted a connection during the drain"
    );
    let ready = ready.expect("/ready answers during the drain");
    assert_eq!(
        (ready.status.as_u16(), ready.text()),
        (503, "draining\n".into())
    );

    // Needs the balancer to treat a refused or GOAWAY'd endpoint as
    // unavailable and retry on another (outbound work merged separately).
    let counts = versions(&during);
    let failure = during.iter().find_map(|a| match a {
        Ok(a) if a.status.is_success() => None,
        Ok(a) => Some(a.text()),
        Err(e) => Some(e.clone()),
    });
    assert_eq!(
        counts.get("v2").copied(),
        Some(during.len()),
        "requests during the drain are all served by hello-v2: {counts:?}; e.g. {failure:?}"
    );
}
