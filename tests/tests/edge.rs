//! What the proxy's HTTP/1 edge refuses as the client's mistake: several
//! Host headers (400), a URI over the limit (414, naming it), and a malformed
//! chunked body (the client's 400, not the destination's 502).

use trellis_tests::*;

/// The sidecar refused the request itself: this status, this error name.
fn assert_refused(answer: &str, status: u16, error: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status}"))
            && answer.contains(&format!("trellis-proxy-error: {error}")),
        "expected {status} {error}: {answer}"
    );
}

#[tokio::test]
async fn duplicate_host_headers_are_a_400() {
    let mesh = HelloMesh::start_with_apps(workbench_app).await;
    let authority = mesh.authority();
    let outbound = mesh.client.outbound_addr;
    let answer = exchange_raw(
        outbound,
        &format!("GET / HTTP/1.1\r\nHost: {authority}\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_refused(&answer, 400, "duplicate-host");
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400_not_the_destinations_failure() {
    let mesh = HelloMesh::start_with_apps(workbench_app).await;
    let authority = mesh.authority();
    let outbound = mesh.client.outbound_addr;
    for _ in 0..3 {
        let answer = exchange_raw(
            outbound,
            &format!("POST /upload HTTP/1.1\r\nHost: {authority}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nZZ\r\n"),
        )
        .await;
        assert_refused(&answer, 400, "client-body");
    }
    // Not the destination's failure: it was not ejected, and serves.
    let client = AppClient::http1(outbound);
    for _ in 0..5 {
        client
            .version(&authority)
            .await
            .expect("the destination still serves");
    }
}

#[tokio::test]
async fn a_uri_over_the_limit_is_a_414_that_names_the_limit() {
    let mesh = HelloMesh::start_with_apps(workbench_app).await;
    let authority = mesh.authority();
    let outbound = mesh.client.outbound_addr;
    let limit = trellis_proxy::http::MAX_URI_BYTES;
    let long = format!("/{}", "a".repeat(limit));
    let answer = exchange_raw(
        outbound,
        &format!("GET {long} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_refused(&answer, 414, "uri-too-long");
    assert!(
        answer.contains(&format!("limit of {limit} bytes")),
        "{answer}"
    );
    // Just under the limit is forwarded (the path alone is the target).
    let under = format!("/{}", "a".repeat(limit - 1));
    let answer = exchange_raw(
        outbound,
        &format!("GET {under} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(300)]
    );
}
