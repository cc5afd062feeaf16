//! The demo's applications: `hello` (answers with its version) and
//! `frontend` (calls `hello` through its sidecar, like the nginx frontend of
//! the Kubernetes "accessing applications" example).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// What `hello` answers, and what the frontend passes back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Greeting {
    pub message: String,
    pub version: String,
    pub pod: String,
    /// The SPIFFE ID of the caller as verified by hello's sidecar (empty when
    /// the call did not come over mTLS).
    pub client_identity: String,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

use trellis_common::serve::serve;

/// Makes `hello` fail this percentage of its requests (a whole number,
/// 0-100; `--scenario rollout-bad` sets it for hello-v2).
pub const FAIL_PERCENT_ENV: &str = "TRELLIS_DEMO_FAIL_PERCENT";

/// The share of requests `hello` fails on purpose, from [`FAIL_PERCENT_ENV`].
fn fail_percent() -> u64 {
    match std::env::var(FAIL_PERCENT_ENV) {
        Err(_) => 0,
        Ok(value) => match value.parse::<u64>() {
            Ok(percent) if percent <= 100 => percent,
            // Only the demo sets it; a bad value is its bug, shown in the log.
            _ => panic!("{FAIL_PERCENT_ENV}={value:?}: expected a whole percentage, 0 to 100"),
        },
    }
}

/// Whether request number `n` (from 0) is one of the `percent` in a
/// hundred that fail: spread evenly, so every window sees its share.
fn fails(n: u64, percent: u64) -> bool {
    (n + 1) * percent / 100 > n * percent / 100
}

/// `hello`: answers every request with a JSON greeting naming its version,
/// except the share [`FAIL_PERCENT_ENV`] asks to fail (500).
pub async fn hello(listener: TcpListener, version: String, pod: String) {
    let greeting = Arc::new((version, pod));
    let percent = fail_percent();
    let served = Arc::new(AtomicU64::new(0));
    serve(listener, move |request: Request<Incoming>| {
        let greeting = greeting.clone();
        let served = served.clone();
        async move {
            if fails(served.fetch_add(1, Ordering::Relaxed), percent) {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "{} failed this request on purpose ({FAIL_PERCENT_ENV}={percent})\n",
                        greeting.1
                    ),
                );
            }
            let client_identity = request
                .headers()
                .get(trellis_proto::headers::CLIENT_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = Greeting {
                message: format!("Hello from {} ({})", greeting.1, greeting.0),
                version: greeting.0.clone(),
                pod: greeting.1.clone(),
                client_identity,
            };
            let json = serde_json::to_vec(&body).unwrap_or_default();
            let mut response = text(StatusCode::OK, json);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
    })
    .await
}

/// `frontend`: on every request, calls `backend` (an authority such as
/// `hello.default.svc.cluster.local:8080`) through the sidecar's outbound
/// listener `proxy`, and returns what it got.
pub async fn frontend(listener: TcpListener, backend: String, proxy: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let shared = Arc::new((client, backend, proxy));
    serve(listener, move |_request: Request<Incoming>| {
        let shared = shared.clone();
        async move {
            let (client, backend, proxy) = &*shared;
            // Explicit proxy mode: connect to the sidecar, name the Service in Host.
            let request = Request::get(format!("http://{proxy}/"))
                .header(http::header::HOST, backend.as_str())
                .body(Full::new(Bytes::new()));
            let Ok(request) = request else {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "bad backend name\n");
            };
            match client.request(request).await {
                Ok(response) => {
                    let status = response.status();
                    match response.into_body().collect().await {
                        Ok(body) => text(status, body.to_bytes()),
                        Err(e) => text(
                            StatusCode::BAD_GATEWAY,
                            format!("reading backend body: {e}\n"),
                        ),
                    }
                }
                Err(e) => text(
                    StatusCode::BAD_GATEWAY,
                    format!("calling {backend} via {proxy}: {e}\n"),
                ),
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::fails;

    #[test]
    fn a_failure_share_is_spread_evenly() {
        let failed: Vec<u64> = (0..20).filter(|&n| fails(n, 20)).collect();
        assert_eq!(failed, [4, 9, 14, 19]);
        assert_eq!((0..1000).filter(|&n| fails(n, 7)).count(), 70);
        assert!(!(0..1000).any(|n| fails(n, 0)));
        assert!((0..1000).all(|n| fails(n, 100)));
    }
}
