//! Outbound: application → mesh. One request's path, top-down: the
//! Service the application named (its routes, retry budget and endpoints;
//! looked up once per connection while its requests name the same one) →
//! the rule that matches, with its filters (`filters`: a redirect answered
//! here, rewrites, header modifiers; `mirror`: copies to other Services) →
//! the backend Service the rule's weights pick → the endpoint the balancer
//! picks among the healthy ones → that endpoint's proxy over mTLS (or the
//! endpoint itself when it is not meshed). The request's labels are made
//! once, at the end, from how far it got.

mod body;
mod connection;
mod endpoint;
mod filters;
mod mirror;
mod retry;
mod send;
mod target;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use trellis_proto::discovery::{Backend, Retry, Rule};

use crate::cache::{Cache, Cached, Shared};
use crate::config::Config;
use crate::discovery::{Discovery, RoutesState};
use crate::errors::{respond, ProxyError};
use crate::http::{refuse_at_edge, Body};
use crate::identity::IdentityManager;
use crate::metrics::{Label, Metrics, RequestLabels};
use crate::route::{self, CompiledRoutes};
use body::Timed;
pub use endpoint::{Attempt, EndpointHandle};
use retry::RetryBudget;
use send::head_of;
use target::{Endpoints, Lingering, Target};

/// The `dst_service` of requests for names that are not mesh Services: one
/// label value however many names an application (or a scanner) makes up.
pub const UNKNOWN_SERVICE: &str = "unknown";

/// How many endpoints one request may try when connecting fails (nothing
/// reached an application, so this is safe for every method).
pub(super) const CONNECT_ATTEMPTS: usize = 3;

/// The outbound side of one proxy.
pub struct Outbound {
    discovery: Arc<Discovery>,
    identity: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
    logicals: Cache<Logical>,
    targets: Cache<Target>,
    lingering: Arc<Lingering>,
    /// For endpoints that are not meshed: plain HTTP/1.1 and HTTP/2.
    plain_h1: Client<HttpConnector, Body>,
    plain_h2: Client<HttpConnector, Body>,
    request_timeout: Duration,
    discovery_timeout: Duration,
    body_idle_timeout: Duration,
    /// Redirected connections to these ports skip protocol detection.
    opaque_ports: Vec<u16>,
    /// Whether CONNECT may tunnel to destinations outside the mesh.
    connect_egress: bool,
}

impl Outbound {
    /// Must be called on the proxy's runtime: it starts the task that
    /// forgets idle authorities.
    pub fn new(
        discovery: Arc<Discovery>,
        identity: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        config: &Config,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let outbound = Arc::new(Self {
            discovery,
            identity,
            metrics,
            logicals: Cache::default(),
            targets: Cache::default(),
            lingering: Arc::default(),
            plain_h1: Client::builder(TokioExecutor::new()).build(connector.clone()),
            plain_h2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
            request_timeout: config.request_timeout,
            discovery_timeout: config.discovery_timeout,
            body_idle_timeout: config.body_idle_timeout,
            opaque_ports: config.opaque_ports.clone(),
            connect_egress: config.connect_egress,
        });
        tokio::spawn(evict_idle(
            Arc::downgrade(&outbound),
            config.idle_authority_timeout,
        ));
        outbound
    }

    /// Handles one request from the application on a connection that
    /// resolved `recent`, for `authority` (the original destination of a
    /// redirected connection) or else the one the request names. Never
    /// fails: problems become responses with a `trellis-proxy-error` header.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Body>,
        authority: Option<&str>,
        recent: &Recent,
    ) -> Response<Body> {
        let started = Instant::now();
        let mut reached = Reached::default();
        let response = respond(
            self.forward(request, authority, recent, &mut reached).await,
            "outbound",
        );
        let labels = reached.labels(&self.metrics.workload);
        crate::grpc::record(&self.metrics, labels, started.elapsed(), response)
    }

    async fn forward(
        self: &Arc<Self>,
        request: Request<Body>,
        authority: Option<&str>,
        recent: &Recent,
        reached: &mut Reached,
    ) -> Result<Response<Body>, ProxyError> {
        refuse_at_edge(&request)?;
        let authority = match authority {
            Some(authority) => Cow::Borrowed(authority),
            None => Cow::Owned(authority_of(&request)?),
        };
        let (logical, own) = self.named(recent, &authority).await?;
        reached.service = Some(own.names().clone());
        let routes = logical.routes(self.discovery_timeout).await?;
        let (mut parts, body) = request.into_parts();
        let rule = match routes.select(&parts) {
            Some(rule) => Some(rule),
            // Routes exist but none matches: Gateway API answers 404.
            None if !routes.is_empty() => {
                return Err(ProxyError::NoRouteMatch(authority.into_owned()))
            }
            None => None,
        };
        let _admitted = match rule {
            Some(rule) => routes
                .admit(rule)
                .map_err(|max| ProxyError::RouteOverloaded(rule.route.clone(), max))?,
            None => None,
        };
        let timeout = rule
            .map(|r| r.timeout_ms)
            .filter(|ms| *ms > 0)
            .map_or(self.request_timeout, Duration::from_millis);
        let retry = rule
            .and_then(|r| r.retry.as_ref())
            .filter(|_| retryable(&parts, &body));
        let (body, sent, client_failure) = Timed::request(body, self.body_idle_timeout);
        if let Some(client_failure) = client_failure {
            parts.extensions.insert(client_failure);
        }
        let work = async {
            if let Some(fault) = rule.and_then(|r| r.fault.as_ref()) {
                if route::fires(fault.delay_percent) {
                    let (service, namespace) = own.names();
                    self.metrics.fault(service, namespace, "delay");
                    tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
                }
                if route::fires(fault.abort_percent) {
                    let (service, namespace) = own.names();
                    self.metrics.fault(service, namespace, "abort");
                    return Err(ProxyError::FaultInjected(fault.abort_status as u16));
                }
            }
            let body = match rule {
                Some(rule) => {
                    if let Some(redirect) = &rule.redirect {
                        return filters::redirect(&parts, redirect, rule);
                    }
                    filters::apply_to_request(&mut parts, rule);
                    self.mirror(&rule.mirrors, &parts, body, timeout)
                }
                None => body,
            };
            // Each attempt picks its backend anew, so a retry can avoid the
            // backend that just failed.
            let backend = || async {
                match rule {
                    Some(rule) => {
                        let backend = route::pick_backend(&rule.backends)
                            .ok_or_else(|| ProxyError::NoBackend(authority.to_string()))?;
                        Ok((Some(backend), self.endpoints(&backend.authority).await?))
                    }
                    None => Ok::<_, ProxyError>((None, own.clone())),
                }
            };
            logical.budget.deposit();
            let Some(retry) = retry else {
                let (backend, endpoints) = backend().await?;
                let request = Request::from_parts(parts, body);
                return self
                    .attempt(rule, backend, &endpoints, &authority, request, reached)
                    .await;
            };
            // A retryable request has no body, so it can be sent again as is.
            let template = Request::from_parts(parts, body);
            let mut attempt = 0;
            loop {
                let (backend, endpoints) = backend().await?;
                let request = head_of(&template);
                let result = self
                    .attempt(rule, backend, &endpoints, &authority, request, reached)
                    .await;
                let failed = match &result {
                    Ok(response) => should_retry(retry, response.status()),
                    // A timeout here is one attempt's (backendRequest).
                    Err(e) => e.is_retryable() || matches!(e, ProxyError::Timeout(_)),
                };
                attempt += 1;
                if !failed || attempt > retry.attempts || !logical.budget.withdraw() {
                    return result;
                }
                tracing::debug!(backend = %endpoints.names().0, attempt, "retrying");
                let (service, namespace) = own.names();
                self.metrics.retry(service, namespace);
                if retry.backoff_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(retry.backoff_ms)).await;
                }
            }
        };
        // The timeout runs from when the request has been sent whole (at
        // once without a body) to its response head: an upload takes as
        // long as it takes while data flows (the body idle timeout guards
        // a stalled one).
        let deadline = async {
            sent.await;
            tokio::time::sleep(timeout).await;
        };
        // `biased`: in order, without drawing a random number per poll.
        let response = tokio::select! {
            biased;
            response = work => response?,
            () = deadline => return Err(ProxyError::Timeout(timeout)),
        };
        let idle = self.body_idle_timeout;
        Ok(response.map(|body| Timed::response(body, idle)))
    }

    /// One attempt at a backend: its own request header filter (after the
    /// rule's), the rule's backendRequest timeout, and the response header
    /// filters (the rule's, then the backend's).
    async fn attempt(
        &self,
        rule: Option<&Rule>,
        backend: Option<&Backend>,
        endpoints: &Endpoints,
        authority: &str,
        mut request: Request<Body>,
        reached: &mut Reached,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(modifier) = backend.and_then(|b| b.request_headers.as_ref()) {
            filters::modify_headers(request.headers_mut(), modifier);
        }
        let send = self.send_to(endpoints, authority, request, reached);
        let per_attempt = rule
            .map(|r| r.backend_timeout_ms)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let mut response = match per_attempt {
            Some(limit) => tokio::time::timeout(limit, send)
                .await
                .map_err(|_| ProxyError::Timeout(limit))??,
            None => send.await?,
        };
        let modifiers = rule
            .and_then(|r| r.response_headers.as_ref())
            .into_iter()
            .chain(backend.and_then(|b| b.response_headers.as_ref()));
        for modifier in modifiers {
            filters::modify_headers(response.headers_mut(), modifier);
        }
        Ok(response)
    }

    /// The current endpoints of an authority (a Service the application
    /// named, or a route's backend).
    async fn endpoints(&self, authority: &str) -> Result<Arc<Endpoints>, ProxyError> {
        self.target(authority)
            .endpoints(self.discovery_timeout)
            .await
    }

    /// The Service `authority` names: its routes and its own endpoints.
    async fn named(
        &self,
        recent: &Recent,
        authority: &str,
    ) -> Result<(Shared<Logical>, Arc<Endpoints>), ProxyError> {
        if let Some((logical, own)) = self.recall(recent, authority) {
            return Ok((logical, own.endpoints(self.discovery_timeout).await?));
        }
        let own = self.target(authority);
        let endpoints = own.endpoints(self.discovery_timeout).await?;
        // Only a mesh Service gets routes (and their watch).
        let logical = self.logical(authority);
        *recent.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Named {
            authority: authority.to_string(),
            logical: Arc::downgrade(&logical),
            own: Arc::downgrade(&own),
        });
        Ok((logical, endpoints))
    }

    /// The connection's last Service, when it is the one `authority` names
    /// and still current.
    fn recall(
        &self,
        recent: &Recent,
        authority: &str,
    ) -> Option<(Shared<Logical>, Shared<Target>)> {
        let last = recent.0.lock().unwrap_or_else(|p| p.into_inner());
        let named = last.as_ref().filter(|n| n.authority == authority)?;
        let (logical, own) = (named.logical.upgrade()?, named.own.upgrade()?);
        if !own.fresh() {
            return None;
        }
        self.logicals.touch(&logical);
        self.targets.touch(&own);
        Some((logical, own))
    }

    /// The routes and retry budget of an authority, created on first use.
    fn logical(&self, authority: &str) -> Shared<Logical> {
        self.logicals.get_or_insert_with(authority, || Logical {
            authority: authority.to_string(),
            routes: self.discovery.routes(authority),
            budget: RetryBudget::new(RETRY_BUDGET_RATIO, RETRY_BUDGET_PER_SECOND),
        })
    }

    /// The cached state of one authority, created on first use (and again
    /// once a "no such Service" answer is old).
    fn target(&self, authority: &str) -> Shared<Target> {
        self.targets
            .get_fresh_or_insert_with(authority, Target::fresh, || {
                Target::spawn(
                    authority,
                    self.discovery.endpoints(authority),
                    self.metrics.clone(),
                    self.lingering.clone(),
                )
            })
    }
}

/// Forgets authorities nobody asked for in `idle` (their watches close,
/// here and in the controller), and "no such Service" answers once they
/// are old; ends with the proxy.
async fn evict_idle(outbound: Weak<Outbound>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(100), target::NOT_FOUND_TTL);
    loop {
        tokio::time::sleep(every).await;
        let Some(outbound) = outbound.upgrade() else {
            return;
        };
        let targets = outbound.targets.evict(idle, |t| !t.fresh());
        let logicals = outbound.logicals.evict(idle, |_| false);
        if targets + logicals > 0 {
            tracing::debug!(targets, logicals, "forgot idle authorities");
        }
    }
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
    let from_host;
    let authority = match request.uri().authority() {
        Some(authority) => authority,
        None => {
            let host = request
                .headers()
                .get(http::header::HOST)
                .ok_or(ProxyError::NoAuthority)?;
            from_host = http::uri::Authority::try_from(host.as_bytes())
                .map_err(|_| ProxyError::NoAuthority)?;
            &from_host
        }
    };
    let (host, port) = (authority.host(), authority.port_u16().unwrap_or(80));
    // One allocation, no second parse of what the URI already parsed, and
    // no formatting machinery: this runs for every request.
    let mut port_digits = itoa::Buffer::new();
    let port = port_digits.format(port);
    let mut key = String::with_capacity(host.len() + 1 + port.len());
    key.push_str(host);
    key.make_ascii_lowercase();
    key.push(':');
    key.push_str(port);
    Ok(key)
}

/// What one application connection resolved last: a keep-alive
/// connection's requests look their Service up once. Weak, because the
/// caches decide when a Service nobody asks for is forgotten.
#[derive(Default)]
pub struct Recent(Mutex<Option<Named>>);

struct Named {
    authority: String,
    logical: Weak<Cached<Logical>>,
    own: Weak<Cached<Target>>,
}

/// How far a request got, recorded as the path decides (the Service, then
/// each attempt's backend and endpoint); its labels are made from it once.
#[derive(Default)]
struct Reached {
    service: Option<(Label, Label)>,
    backend: Option<Label>,
    endpoint: Option<EndpointHandle>,
}

impl Reached {
    /// Only a mesh Service gets a label of its own; without a backend, the
    /// Service is its own.
    fn labels(self, workload: &crate::metrics::Workload) -> RequestLabels {
        let (dst_service, dst_namespace) = self
            .service
            .unwrap_or_else(|| (UNKNOWN_SERVICE.into(), Label::default()));
        let endpoint = self.endpoint.as_ref();
        RequestLabels {
            direction: "outbound",
            src_workload: workload.name.clone(),
            src_namespace: workload.namespace.clone(),
            src_version: workload.version.clone(),
            dst_backend: self.backend.unwrap_or_else(|| dst_service.clone()),
            dst_service,
            dst_namespace,
            dst_version: endpoint
                .map(|e| e.version_label().clone())
                .unwrap_or_default(),
            tls: endpoint.is_some_and(|e| e.identity().is_some()),
            peer_identity: endpoint
                .map(|e| e.identity_label().clone())
                .unwrap_or_default(),
        }
    }
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
fn retryable(parts: &http::request::Parts, body: &Body) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
