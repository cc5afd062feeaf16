//! The admin listener: `/live` and `/ready` for the kubelet and the demo.
//! Nothing here changes state.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::http::{full, Body};
use crate::identity::IdentityManager;
use crate::metrics::Metrics;

pub struct Admin {
    identity: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
}

impl Admin {
    pub fn new(identity: Arc<IdentityManager>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { identity, metrics })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        crate::http::serve(listener, move |request| {
            let admin = self.clone();
            async move { admin.handle(&request) }
        })
        .await
    }

    fn handle(&self, request: &Request<Incoming>) -> Response<Body> {
        let (status, body) = match (request.method(), request.uri().path()) {
            (&Method::GET, "/live") => (StatusCode::OK, "live\n".to_string()),
            (&Method::GET, "/ready") => match self.identity.current() {
                Some(tls) => (
                    StatusCode::OK,
                    format!("ready\nidentity: {}\n", tls.identity),
                ),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no valid certificate\n".into(),
                ),
            },
            (&Method::GET, "/metrics") => (StatusCode::OK, self.metrics.render()),
            (&Method::GET, "/identity") => match self.identity.current() {
                Some(tls) => (StatusCode::OK, certificate_json(&tls)),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no valid certificate\n".into(),
                ),
            },
            (_, "/live" | "/ready" | "/identity" | "/metrics") => {
                (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into())
            }
            _ => (
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /identity or /metrics\n".into(),
            ),
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        if request.uri().path() == "/metrics" {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                crate::http::METRICS_CONTENT_TYPE,
            );
        }
        response
    }
}

/// The current certificate as JSON: SPIFFE ID, issuer, serial, validity.
fn certificate_json(tls: &crate::tls::TlsConfigs) -> String {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let (issuer, serial, not_before) = match x509_parser::parse_x509_certificate(&tls.leaf_der) {
        Ok((_, cert)) => (
            cert.issuer().to_string(),
            cert.raw_serial_as_string(),
            cert.validity().not_before.timestamp(),
        ),
        Err(_) => (String::new(), String::new(), 0),
    };
    let json = serde_json::json!({
        "spiffe_id": tls.identity.to_string(),
        "issuer": issuer,
        "serial": serial,
        "not_before_unix": not_before,
        "not_after_unix": unix(tls.not_after),
    });
    format!("{json}\n")
}
