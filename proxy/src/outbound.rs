//! Outbound: application → mesh. Finds the Service the request names,
//! balances over its endpoints, and carries the request to the chosen
//! endpoint's proxy over mTLS (or straight to it when it is not meshed).

mod connection;
mod endpoint;
mod retry;
mod target;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::balance::{self, InFlight};
use crate::cache::Cache;
use crate::discovery::Discovery;
use crate::discovery::RoutesState;
use crate::errors::{respond, ProxyError};
use crate::http::{boxed, strip_hop_by_hop, Body, DST_PORT, ORIG_PROTO};
use crate::identity::IdentityManager;
use crate::metrics::{Metrics, RequestLabels};
use crate::route::{self, CompiledRoutes};
pub use endpoint::EndpointHandle;
use retry::RetryBudget;
use std::time::Instant;
use target::Target;
use tokio::sync::watch;
use trellis_proto::discovery::{HeaderModifier, Retry};

/// The outbound side of one proxy.
pub struct Outbound {
    discovery: Arc<Discovery>,
    identity: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
    logicals: Cache<Logical>,
    targets: Cache<Target>,
    /// For endpoints that are not meshed: plain HTTP/1.1 and HTTP/2.
    plain_h1: Client<HttpConnector, Body>,
    plain_h2: Client<HttpConnector, Body>,
    request_timeout: Duration,
    discovery_timeout: Duration,
    /// Redirected connections to these ports skip protocol detection.
    opaque_ports: Vec<u16>,
}

impl Outbound {
    pub fn new(
        discovery: Arc<Discovery>,
        identity: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        request_timeout: Duration,
        discovery_timeout: Duration,
        opaque_ports: Vec<u16>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        Arc::new(Self {
            discovery,
            identity,
            metrics,
            logicals: Cache::default(),
            targets: Cache::default(),
            plain_h1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            plain_h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            request_timeout,
            discovery_timeout,
            opaque_ports,
        })
    }

    /// Handles one request from the application, for `authority` (the
    /// original destination of a redirected connection) or else the one the
    /// request names. Never fails: problems become responses with a
    /// `trellis-proxy-error` header.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        authority: Option<&str>,
    ) -> Response<Body> {
        let started = Instant::now();
        let workload = &self.metrics.workload;
        let mut labels = RequestLabels {
            direction: "outbound",
            src_workload: workload.name.clone(),
            src_namespace: workload.namespace.clone(),
            src_version: workload.version.clone(),
            ..RequestLabels::default()
        };
        let response = respond(
            self.forward(request, authority, &mut labels).await,
            "outbound",
        );
        crate::grpc::record(&self.metrics, labels, started.elapsed(), response)
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        authority: Option<&str>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, ProxyError> {
        let authority = match authority {
            Some(authority) => authority.to_string(),
            None => authority_of(&request)?,
        };
        (labels.dst_service, labels.dst_namespace) = self.service_of(&authority);
        labels.dst_backend = labels.dst_service.clone();
        let logical = self.logical(&authority);
        let routes = logical.routes(self.discovery_timeout).await?;
        let (mut parts, body) = request.into_parts();
        let rule = match routes.select(&parts) {
            Some(rule) => Some(rule),
            // Routes exist but none matches: Gateway API answers 404.
            None if !routes.is_empty() => return Err(ProxyError::NoRouteMatch(authority)),
            None => None,
        };
        let timeout = rule
            .map(|r| r.timeout_ms)
            .filter(|ms| *ms > 0)
            .map_or(self.request_timeout, Duration::from_millis);
        let work = async {
            if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
                if route::fires(fault.delay_percent) {
                    self.metrics
                        .fault(&labels.dst_service, &labels.dst_namespace, "delay");
                    tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
                }
                if route::fires(fault.abort_percent) {
                    self.metrics
                        .fault(&labels.dst_service, &labels.dst_namespace, "abort");
                    return Err(ProxyError::FaultInjected(fault.abort_status as u16));
                }
            }
            if let Some(modifier) = rule.and_then(|r| r.request_headers.as_ref()) {
                modify_headers(&mut parts.headers, modifier);
            }
            // Each attempt picks its backend anew, so a retry can avoid the
            // backend that just failed.
            let backend = || match rule {
                Some(rule) => route::pick_backend(&rule.backends)
                    .map(|b| b.authority.as_str())
                    .ok_or_else(|| ProxyError::NoBackend(authority.clone())),
                None => Ok(authority.as_str()),
            };
            logical.budget.deposit();
            let retry = rule
                .and_then(|r| r.retry.as_ref())
                .filter(|_| retryable(&parts, &body));
            let Some(retry) = retry else {
                return self
                    .send_to(
                        backend()?,
                        &authority,
                        Request::from_parts(parts, boxed(body)),
                        labels,
                    )
                    .await;
            };
            // A retryable request has no body, so it can be sent again as is.
            let mut attempt = 0;
            loop {
                let request = Request::from_parts(
                    clone_parts(&parts),
                    crate::http::full(bytes::Bytes::new()),
                );
                let backend = backend()?;
                let result = self.send_to(backend, &authority, request, labels).await;
                let failed = match &result {
                    Ok(response) => should_retry(retry, response.status()),
                    Err(e) => e.is_retryable(),
                };
                attempt += 1;
                if !failed || attempt > retry.attempts || !logical.budget.withdraw() {
                    return result;
                }
                tracing::debug!(backend, attempt, "retrying");
                self.metrics
                    .retry(&labels.dst_service, &labels.dst_namespace);
                if retry.backoff_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(retry.backoff_ms)).await;
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(ProxyError::Timeout(timeout)))
    }

    /// Sends a request to one concrete Service (a route's backend, or the
    /// authority itself), balancing over its endpoints.
    async fn send_to(
        &self,
        backend: &str,
        authority: &str,
        request: Request<Body>,
        labels: &mut RequestLabels,
    ) -> Result<Response<Body>, ProxyError> {
        labels.dst_backend = self.service_of(backend).0;
        let target = self.target(backend);
        let endpoints = target.endpoints(self.discovery_timeout).await?;
        let endpoint = balance::pick(&endpoints.handles)
            .ok_or_else(|| ProxyError::NoEndpoints(backend.to_string()))?
            .clone();
        labels.dst_version = endpoint
            .endpoint()
            .labels
            .get("version")
            .cloned()
            .unwrap_or_default();
        labels.tls = endpoint.identity().is_some();
        labels.peer_identity = endpoint
            .identity()
            .map(ToString::to_string)
            .unwrap_or_default();
        let mut in_flight = endpoint.start();
        let response = self
            .send(&endpoint, authority, request, &mut in_flight)
            .await
            .inspect_err(|e| self.count_tls_failure(e))?;
        in_flight.finish();
        Ok(response)
    }

    /// Counts a failed mTLS handshake with a peer proxy.
    fn count_tls_failure(&self, error: &ProxyError) {
        if matches!(error, ProxyError::Tls { .. }) {
            self.metrics.tls_failure("outbound");
        }
    }

    /// The Service name and namespace for metrics: from the authority, or,
    /// for a ClusterIP, from what discovery said it is.
    fn service_of(&self, authority: &str) -> (String, String) {
        let (name, namespace) = service_of(authority);
        if !namespace.is_empty() {
            return (name, namespace);
        }
        match self.target(authority).service() {
            Some(service) => (service.name, service.namespace),
            None => (name, namespace),
        }
    }

    /// The routes and retry budget of an authority, created on first use.
    fn logical(&self, authority: &str) -> Arc<Logical> {
        self.logicals.get_or_insert_with(authority, || Logical {
            authority: authority.to_string(),
            routes: self.discovery.routes(authority),
            budget: RetryBudget::new(RETRY_BUDGET_RATIO, RETRY_BUDGET_PER_SECOND),
        })
    }

    /// The cached state of one authority, created on first use.
    fn target(&self, authority: &str) -> Arc<Target> {
        self.targets.get_or_insert_with(authority, || {
            Target::spawn(authority, self.discovery.endpoints(authority))
        })
    }

    async fn send(
        &self,
        endpoint: &EndpointHandle,
        authority: &str,
        request: Request<Body>,
        in_flight: &mut InFlight,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut parts, body) = request.into_parts();
        let orig_version = parts.version;
        strip_hop_by_hop(&mut parts.headers);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let upstream_error = |e: hyper::Error| ProxyError::Upstream {
            endpoint: endpoint.key().to_string(),
            reason: e.to_string(),
        };
        let response = match endpoint.identity() {
            Some(expected) => {
                let tls = self.identity.current().ok_or(ProxyError::NoIdentity)?;
                let mut sender = endpoint.connection(&tls, expected).await?;
                in_flight.restart_clock();
                // The application behind the peer sees the authority its
                // client used (a name, not the ClusterIP it resolved to).
                let visible = parts
                    .uri
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| {
                        let host = parts.headers.get(http::header::HOST)?;
                        host.to_str().ok().map(str::to_string)
                    })
                    .unwrap_or_else(|| authority.to_string());
                parts.version = Version::HTTP_2;
                parts.uri = uri(&visible, path)?;
                parts.headers.remove(http::header::HOST);
                parts.headers.insert(DST_PORT, endpoint.port().into());
                let proto = if orig_version == Version::HTTP_2 {
                    "HTTP/2"
                } else {
                    "HTTP/1.1"
                };
                parts
                    .headers
                    .insert(ORIG_PROTO, http::HeaderValue::from_static(proto));
                let request = Request::from_parts(parts, body);
                sender.send_request(request).await.map_err(upstream_error)?
            }
            None => {
                parts.uri = uri(&endpoint.key().to_string(), path)?;
                if orig_version != Version::HTTP_2
                    && !parts.headers.contains_key(http::header::HOST)
                {
                    parts
                        .headers
                        .insert(http::header::HOST, header_value(authority)?);
                }
                let request = Request::from_parts(parts, body);
                let client = if orig_version == Version::HTTP_2 {
                    &self.plain_h2
                } else {
                    &self.plain_h1
                };
                client
                    .request(request)
                    .await
                    .map_err(|e| ProxyError::Upstream {
                        endpoint: endpoint.key().to_string(),
                        reason: e.to_string(),
                    })?
            }
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, boxed(body)))
    }
}

fn uri(authority: &str, path: &str) -> Result<Uri, ProxyError> {
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| ProxyError::NoAuthority)
}

fn header_value(s: &str) -> Result<http::HeaderValue, ProxyError> {
    http::HeaderValue::from_str(s).map_err(|_| ProxyError::NoAuthority)
}

/// The Service name and namespace an authority names (`name.ns…:port`); a
/// ClusterIP authority is labelled by its address.
fn service_of(authority: &str) -> (String, String) {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host);
    match host.split('.').collect::<Vec<_>>().as_slice() {
        [name, namespace, ..] if host.parse::<std::net::IpAddr>().is_err() => {
            (name.to_string(), namespace.to_string())
        }
        _ => (host.to_string(), String::new()),
    }
}

/// The authority a request is for: the absolute URI (explicit proxy mode, and
/// HTTP/2's `:authority`) or the Host header, lowercased, port 80 by default.
pub fn authority_of<B>(request: &Request<B>) -> Result<String, ProxyError> {
    let raw = match request.uri().authority() {
        Some(authority) => authority.as_str().to_string(),
        None => request
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(ProxyError::NoAuthority)?
            .to_string(),
    };
    let authority: http::uri::Authority = raw.parse().map_err(|_| ProxyError::NoAuthority)?;
    let host = authority.host().to_ascii_lowercase();
    Ok(format!("{host}:{}", authority.port_u16().unwrap_or(80)))
}

/// Retries may add at most 20% load on top of the original requests…
const RETRY_BUDGET_RATIO: f64 = 0.2;
/// …plus this many per second, so a service with little traffic can still retry.
const RETRY_BUDGET_PER_SECOND: u32 = 10;

/// The Service a client asked for: its routes and retry budget.
struct Logical {
    authority: String,
    routes: watch::Receiver<RoutesState>,
    budget: RetryBudget,
}

impl Logical {
    /// The current routes; a first request waits for the controller's answer.
    async fn routes(&self, patience: Duration) -> Result<Arc<CompiledRoutes>, ProxyError> {
        if let Some(routes) = self.routes.borrow().clone() {
            return Ok(routes);
        }
        let mut rx = self.routes.clone();
        let answered = tokio::time::timeout(patience, rx.wait_for(Option::is_some)).await;
        let routes = match answered {
            Ok(Ok(routes)) => routes.clone(),
            _ => None,
        };
        routes.ok_or_else(|| ProxyError::DiscoveryTimeout(self.authority.clone(), patience))
    }
}

/// Only requests without a body and with an idempotent method are retried
/// (RFC 9110 §9.2.2), so a retry never repeats a side effect or needs a
/// buffered body.
fn retryable(parts: &http::request::Parts, body: &Incoming) -> bool {
    use hyper::body::Body as _;
    parts.method.is_idempotent() && body.size_hint().exact() == Some(0)
}

fn should_retry(retry: &Retry, status: http::StatusCode) -> bool {
    if retry.codes.is_empty() {
        matches!(status.as_u16(), 502..=504)
    } else {
        retry.codes.contains(&u32::from(status.as_u16()))
    }
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut builder = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(headers) = builder.headers_mut() {
        *headers = parts.headers.clone();
    }
    builder
        .body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| Request::new(()).into_parts().0)
}

/// Applies a RequestHeaderModifier filter (set, then add, then remove).
fn modify_headers(headers: &mut http::HeaderMap, modifier: &HeaderModifier) {
    let pair = |h: &trellis_proto::discovery::Header| {
        Some((
            http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            http::HeaderValue::from_str(&h.value).ok()?,
        ))
    };
    for (name, value) in modifier.set.iter().filter_map(pair) {
        headers.insert(name, value);
    }
    for (name, value) in modifier.add.iter().filter_map(pair) {
        headers.append(name, value);
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::discovery::Header;

    #[test]
    fn header_modifier_sets_adds_then_removes() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-env", "prod".parse().unwrap());
        headers.insert("x-debug", "1".parse().unwrap());
        let header = |name: &str, value: &str| Header {
            name: name.into(),
            value: value.into(),
        };
        modify_headers(
            &mut headers,
            &HeaderModifier {
                set: vec![header("x-env", "canary")],
                add: vec![header("x-tag", "a"), header("x-tag", "b")],
                remove: vec!["x-debug".into()],
            },
        );
        assert_eq!(headers["x-env"], "canary");
        assert_eq!(headers.get_all("x-tag").iter().count(), 2);
        assert!(!headers.contains_key("x-debug"));
    }

    #[test]
    fn authorities_and_service_names() {
        let request = Request::get("http://Hello.Default.svc.cluster.local/x")
            .body(())
            .unwrap();
        assert_eq!(
            authority_of(&request).unwrap(),
            "hello.default.svc.cluster.local:80"
        );
        let request = Request::get("/x")
            .header("host", "hello.default:8080")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&request).unwrap(), "hello.default:8080");
        assert!(authority_of(&Request::get("/x").body(()).unwrap()).is_err());
        assert_eq!(
            service_of("hello.default.svc.cluster.local:8080"),
            ("hello".into(), "default".into())
        );
        assert_eq!(
            service_of("10.96.0.20:8080"),
            ("10.96.0.20".into(), String::new())
        );
    }
}
