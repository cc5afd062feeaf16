//! The controller's admin listener: `/live`, `/ready` and `/metrics`. Ready means the
//! CA can sign (an expired issuer makes the controller unready, loudly) and
//! the manifests loaded without error. Nothing here changes state.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::identity::Ca;
use crate::metrics::ControllerMetrics;
use crate::source::manifest::ManifestError;
use crate::store::Store;

pub struct Admin {
    pub ca: Arc<Ca>,
    pub store: Arc<Store>,
    pub metrics: Arc<ControllerMetrics>,
    pub manifest_errors: watch::Receiver<Vec<ManifestError>>,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        trellis_common::serve::serve(listener, move |request| {
            let admin = self.clone();
            async move { admin.handle(&request) }
        })
        .await
    }

    fn handle(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match (request.method(), request.uri().path()) {
            (&Method::GET, "/live") => (StatusCode::OK, "live\n".to_string()),
            (&Method::GET, "/ready") => self.readiness(),
            (&Method::GET, "/metrics") => {
                let errors = self.manifest_errors.borrow().len();
                (StatusCode::OK, self.metrics.render(&self.store, errors))
            }
            (_, "/live" | "/ready" | "/metrics") => {
                (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into())
            }
            _ => (
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready or /metrics\n".into(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if request.uri().path() == "/metrics" {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                trellis_common::metrics::CONTENT_TYPE,
            );
        }
        response
    }

    fn readiness(&self) -> (StatusCode, String) {
        let mut problems = Vec::new();
        if let Err(e) = self.ca.healthy() {
            problems.push(e.to_string());
        }
        problems.extend(
            self.manifest_errors
                .borrow()
                .iter()
                .map(|e| format!("manifest rejected: {e}")),
        );
        if problems.is_empty() {
            (StatusCode::OK, "ready\n".into())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready:\n{}\n", problems.join("\n")),
            )
        }
    }
}
