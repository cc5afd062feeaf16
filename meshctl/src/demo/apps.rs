//! The demo's applications: `hello` (answers with its version) and
//! `frontend` (calls `hello` through its sidecar, like the nginx frontend of
//! the Kubernetes "accessing applications" example).

use std::net::SocketAddr;
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

/// `hello`: answers every request with a JSON greeting naming its version.
pub async fn hello(listener: TcpListener, version: String, pod: String) {
    let greeting = Arc::new((version, pod));
    serve(listener, move |request: Request<Incoming>| {
        let greeting = greeting.clone();
        async move {
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
