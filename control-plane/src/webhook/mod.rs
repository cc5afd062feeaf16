//! The mutating admission webhook: `POST /inject` over HTTPS (HTTP/1.1 or
//! h2), an AdmissionReview `admission.k8s.io/v1` in, a JSONPatch out that
//! injects the proxy ([`crate::inject`]).
//!
//! The rule for input it cannot use:
//! - a body that is not JSON, or not an AdmissionReview with a
//!   `request.uid` → HTTP 400 with the reason (there is no uid to answer);
//! - an AdmissionReview of another version, for another kind than a v1 Pod,
//!   of another operation than CREATE, or whose pod cannot be read →
//!   `allowed: true` and a warning: the webhook never blocks what it does
//!   not handle;
//! - a pod whose `trellis.dev/*` annotations are invalid → `allowed:
//!   false` with a message naming the annotation, its value and the form
//!   expected: the pod's author must fix it.
//!
//! A `dryRun` review is answered the same (answering has no side effects).
//! Bodies over [`MAX_BODY`] get 413, a body not sent within [`READ_TIMEOUT`]
//! 408. Every review is counted in `trellis_controller_injections_total`.

mod review;

pub use review::{BadReview, Outcome, Reviewer, ADMISSION_V1};

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The largest review accepted (a pod is rarely over 100 KiB; the API
/// server's own request limit is 3 MiB).
pub const MAX_BODY: usize = 4 << 20;
/// How long a client may take to send a request's head or body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The webhook's path.
pub const PATH: &str = "/inject";

/// Serves `reviewer` on `listener` with `tls` until the task is dropped.
pub async fn serve(reviewer: Arc<Reviewer>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                tracing::warn!(%error, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let reviewer = reviewer.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper::service::service_fn(move |request| {
                let reviewer = reviewer.clone();
                async move { Ok::<_, Infallible>(handle(&reviewer, request).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT);
            builder.http2().timer(TokioTimer::new());
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

async fn handle(reviewer: &Reviewer, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found; the webhook is POST {PATH}\n"),
        );
    }
    if request.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, format!("use POST {PATH}\n"));
    }
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return too_large();
    }
    let body = Limited::new(request.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(READ_TIMEOUT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(error)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {error}\n"),
            )
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body was not sent within {READ_TIMEOUT:?}\n"),
            )
        }
    };
    match reviewer.review(&body) {
        Ok(answer) => {
            let mut response = Response::new(Full::new(Bytes::from(
                serde_json::to_vec(&answer).unwrap_or_default(),
            )));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(bad) => {
            reviewer
                .metrics
                .injections
                .with_label_values(&["invalid", "bad-request"])
                .inc();
            text(StatusCode::BAD_REQUEST, format!("{bad}\n"))
        }
    }
}

fn too_large() -> Response<Full<Bytes>> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the review is larger than {MAX_BODY} bytes\n"),
    )
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
