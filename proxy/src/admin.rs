//! The admin listener: `/live`, `/ready`, `/metrics` and `/identity` for the
//! kubelet, Prometheus and `meshctl`; `POST /shutdown` starts a drain, and
//! only from the pod itself (a loopback peer) — nothing else changes state.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use tokio::net::TcpListener;

use crate::drain::{Drain, Watch};
use crate::http::{full, Body};
use crate::identity::IdentityManager;
use crate::metrics::Metrics;
use crate::server::Server;

pub struct Admin {
    identity: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
    /// The proxy's drain, which `/shutdown` starts and `/ready` reports.
    drain: Arc<Drain>,
    server: Server,
}

impl Admin {
    pub fn new(
        identity: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        drain: Arc<Drain>,
        server: Server,
    ) -> Arc<Self> {
        Arc::new(Self {
            identity,
            metrics,
            drain,
            server,
        })
    }

    /// Serves until `watch` drains: the admin port outlives the traffic
    /// listeners' drain, so the kubelet sees `/ready` fail meanwhile.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, watch: Watch) {
        let metrics = self.metrics.listeners.clone();
        let max_connections = self.server.max_connections;
        crate::listen::accept(listener, "admin", Some(metrics), max_connections, watch, |tcp, peer, mut watch| {
            let admin = self.clone();
            async move {
                let _ = tcp.set_nodelay(true);
                let version = match admin.server.sniff(&tcp).await {
                    Ok(version) => version,
                    Err(error) => return tracing::debug!(%peer, %error, "admin connection"),
                };
                let handler = {
                    let admin = admin.clone();
                    move |request: http::Request<Body>| {
                        let admin = admin.clone();
                        async move { admin.handle(request.method(), request.uri().path(), peer) }
                    }
                };
                let served = admin
                    .server
                    .serve(tcp, version, watch.draining(), handler);
                if let Err(error) = served.await {
                    tracing::debug!(%peer, %error, "admin connection closed");
                }
            }
        })
        .await
    }

    fn handle(&self, method: &Method, path: &str, peer: SocketAddr) -> Response<Body> {
        let (status, body) = match (method, path) {
            (&Method::GET, "/live") => (StatusCode::OK, "live\n".to_string()),
            // The kubelet stops sending traffic to a pod that is not ready.
            (&Method::GET, "/ready") if self.drain.is_draining() => {
                (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
            }
            (&Method::GET, "/ready") => match self.identity.current() {
                Some(tls) => (
                    StatusCode::OK,
                    format!("ready\nidentity: {}\n", tls.identity),
                ),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    match self.identity.last_error() {
                        Some(error) => format!("not ready: no valid certificate: {error}\n"),
                        None => "not ready: no valid certificate\n".into(),
                    },
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
            // The admin port is reachable from inside the pod only, and not
            // authenticated: a peer from elsewhere may read, not stop us.
            (&Method::POST, "/shutdown") if !peer.ip().to_canonical().is_loopback() => (
                StatusCode::FORBIDDEN,
                "/shutdown is accepted from a loopback address only\n".into(),
            ),
            (&Method::POST, "/shutdown") => {
                if self.drain.start() {
                    tracing::info!(%peer, "draining: POST /shutdown");
                }
                (StatusCode::ACCEPTED, "draining\n".into())
            }
            (_, "/shutdown") => (StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into()),
            (_, "/live" | "/ready" | "/identity" | "/metrics") => {
                (StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into())
            }
            _ => (
                StatusCode::NOT_FOUND,
                "not found; try /live, /ready, /identity, /metrics or POST /shutdown\n".into(),
            ),
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        if status == StatusCode::METHOD_NOT_ALLOWED {
            let allow = if path == "/shutdown" { "POST" } else { "GET" };
            response
                .headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
        }
        if path == "/metrics" {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                trellis_common::metrics::CONTENT_TYPE,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{Config, CONTROLLER, IDENTITY, TOKEN};
    use crate::metrics::Workload;

    fn admin() -> Arc<Admin> {
        let env: HashMap<&str, String> = HashMap::from([
            (CONTROLLER, "http://127.0.0.1:1".to_string()),
            (
                IDENTITY,
                "spiffe://cluster.local/ns/default/sa/a".to_string(),
            ),
            (TOKEN, "t".to_string()),
        ]);
        let config = Config::from_strings(&env).unwrap();
        let metrics = Arc::new(Metrics::new(Workload::default()));
        let server = Server::new(&config, "admin", metrics.listeners.clone());
        Admin::new(
            IdentityManager::new(config.identity.clone()),
            metrics,
            Drain::new(),
            server,
        )
    }

    #[test]
    fn shutdown_is_a_post_from_loopback_and_makes_ready_fail() {
        let admin = admin();
        let outside: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let inside: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        assert_eq!(
            admin.handle(&Method::POST, "/shutdown", mapped).status(),
            StatusCode::FORBIDDEN
        );
        let status = |method: Method, path: &str, peer| admin.handle(&method, path, peer).status();
        assert_eq!(
            status(Method::POST, "/shutdown", outside),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status(Method::GET, "/shutdown", inside),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(
            !admin.drain.is_draining(),
            "refused requests change nothing"
        );
        // Not ready yet: no certificate (not the drain).
        let ready = admin.handle(&Method::GET, "/ready", inside);
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            status(Method::POST, "/shutdown", inside),
            StatusCode::ACCEPTED
        );
        assert!(admin.drain.is_draining());
        assert_eq!(
            status(Method::POST, "/shutdown", inside),
            StatusCode::ACCEPTED
        );
    }

    #[tokio::test]
    async fn ready_says_draining_during_the_drain() {
        use http_body_util::BodyExt;
        let admin = admin();
        let inside: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        admin.drain.start();
        let ready = admin.handle(&Method::GET, "/ready", inside);
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = ready.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"draining\n");
    }
}
