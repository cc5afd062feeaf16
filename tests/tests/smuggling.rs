//! Request smuggling at the sidecar's HTTP/1 edge (outbound): ambiguous
//! framing is refused with a 400 or read one way only, and the
//! application never sees a second request hidden in the first one's body.
//! (Content-Length with chunked is read as chunked and the connection
//! closed after the answer, RFC 9112 §6.3; bare LF ends lines, as §2.2
//! allows, and the sidecar forwards CRLF.)

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use trellis_tests::*;

/// A backend that records the path of every request it gets (reading each
/// body to the end).
fn recording_app(seen: Arc<Mutex<Vec<String>>>) -> impl FnMut(TcpListener, &str) {
    move |listener, _version| {
        let seen = seen.clone();
        tokio::spawn(trellis_common::serve::serve(
            listener,
            move |request: http::Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(request.uri().path().to_string());
                    let _ = request.into_body().collect().await;
                    http::Response::new(Full::new(Bytes::from_static(b"{}")))
                }
            },
        ));
    }
}

#[tokio::test]
async fn ambiguous_framing_never_lets_a_second_request_reach_the_app() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mesh = HelloMesh::start_with_apps(recording_app(seen.clone())).await;
    let a = mesh.authority();
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let attempts = [
        (
            "Content-Length and Transfer-Encoding",
            format!("POST /first HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "two different Content-Lengths",
            format!("POST /first HTTP/1.1\r\nHost: {a}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        ),
        (
            "an obs-folded Transfer-Encoding",
            format!("POST /first HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n{smuggled}", smuggled.len() + 5),
        ),
        (
            "bare LF line endings",
            format!("POST /first HTTP/1.1\nHost: {a}\nContent-Length: {}\n\n{smuggled}", smuggled.len()),
        ),
        (
            "Transfer-Encoding other than chunked",
            format!("POST /first HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: gzip, identity\r\n\r\n{smuggled}"),
        ),
    ];
    for (what, raw) in attempts {
        seen.lock().unwrap().clear();
        let answer = exchange_raw(mesh.client.outbound_addr, &raw).await;
        let status = answer.get(9..12).unwrap_or("none").to_string();
        let paths = seen.lock().unwrap().clone();
        println!("{what}: {status}, the app saw {paths:?}");
        assert!(
            !paths.iter().any(|p| p == "/smuggled"),
            "{what}: the app saw a smuggled request: {paths:?}\n{answer}"
        );
        assert!(
            status.starts_with('4') || status == "200",
            "{what}: a 4xx or the one request answered: {answer}"
        );
        assert!(paths.len() <= 1, "{what}: {paths:?}");
    }
    // Other clients are served all along.
    let answer = mesh.http1().get(&a, "/after").await.expect("served");
    assert_eq!(answer.status, 200, "{}", answer.text());
}
