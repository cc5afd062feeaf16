//! Why a request failed in the proxy, and how that is told to the client:
//! one mapping from cause to status code, `trellis-proxy-error` header and
//! body, so every failure looks the same to applications and dashboards.

use std::time::Duration;

use http::{Response, StatusCode};

use crate::http::{full, Body, PROXY_ERROR};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request names no authority (no Host header, no absolute URI).
    #[error("the request has no authority; send a Host header or an absolute URI")]
    NoAuthority,
    /// A request between proxies lacks the in-band target.
    #[error("the request has no valid trellis-dst-port header")]
    NoTarget,
    /// No Service matches the authority.
    #[error("no Service in the mesh matches {0}; check the name (name.namespace.svc.cluster.local:port) and that the Service exists")]
    UnknownService(String),
    /// The Service exists but has no ready endpoint with weight.
    #[error("Service {0} has no ready endpoints")]
    NoEndpoints(String),
    /// Discovery did not answer in time for a first request.
    #[error("discovery did not answer for {0} within {1:?}; is the controller reachable?")]
    DiscoveryTimeout(String, Duration),
    /// The proxy has no valid certificate, so it cannot make meshed calls.
    #[error("this proxy has no valid certificate yet (or it expired); meshed traffic is refused")]
    NoIdentity,
    /// Connecting to the endpoint (TCP or TLS) failed.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// The mTLS handshake with the endpoint's proxy failed, or it presented
    /// another identity than the one discovery named.
    #[error("mTLS with {endpoint} failed: {reason}")]
    Tls {
        endpoint: String,
        reason: String,
        /// What failed, for `trellis_tls_handshake_failures_total`.
        cause: crate::tls::FailureReason,
    },
    /// The upstream failed after the request was sent.
    #[error("upstream {endpoint} failed: {reason}")]
    Upstream { endpoint: String, reason: String },
    /// Routes exist for the authority but no rule matches the request.
    #[error("no route rule of {0} matches this request")]
    NoRouteMatch(String),
    /// The matching rule's backends all have weight 0.
    #[error("the route rule for {0} has no backend with a weight above 0")]
    NoBackend(String),
    /// A fault-injection filter aborted the request.
    #[error("fault injected: aborted with status {0}")]
    FaultInjected(u16),
    /// The whole request took longer than its timeout.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// Every endpoint is at its circuit breaker's cap on requests in flight.
    #[error("{0} is overloaded: every endpoint has {1} requests in flight (the circuit breaker's cap); try again later")]
    Overloaded(String, u32),
    /// The route rule is at its circuit breaker's cap on requests in flight.
    #[error("route rule {0} has {1} requests in flight (its ResiliencePolicy's maxRequests); try again later")]
    RouteOverloaded(String, u32),
    /// Every endpoint failed and was ejected: fail fast rather than queue.
    #[error("all {1} endpoints of {0} are failing and ejected (outlier detection); they are probed again after a backoff")]
    AllEjected(String, usize),
    /// A request or response body stalled with no data for too long.
    #[error("the {0} body sent no data for {1:?}")]
    BodyIdle(&'static str, Duration),
    /// The client's request body was malformed or cut short.
    #[error("the request body is malformed or was cut short: {0}")]
    ClientBody(String),
    /// More than one Host header (RFC 9112 §3.2: answered with 400).
    #[error("the request has more than one Host header; send exactly one")]
    DuplicateHost,
    /// Plaintext sent to the inbound port itself: only a redirected
    /// connection's original destination may be a plaintext client's target.
    #[error("plaintext clients cannot choose the application port: dial the application's port (redirected to this proxy), or call through the mesh with mTLS")]
    PlaintextTarget,
    /// The request target is longer than the proxy forwards.
    #[error("the request path and query are {0} bytes, over this proxy's limit of {limit} bytes; shorten the URI (move data into the body)", limit = crate::http::MAX_URI_BYTES)]
    UriTooLong(usize),
    /// CONNECT anywhere but an HTTP/1.1 request to the explicit proxy.
    #[error("CONNECT is served only over HTTP/1.1 by the outbound listener, to an application that uses it as its HTTP proxy")]
    ConnectUnsupported,
    /// CONNECT to a destination outside the mesh, which is not allowed.
    #[error("CONNECT to {0} refused: it is not a Service or pod of the mesh, and this proxy does not tunnel elsewhere (TRELLIS_CONNECT_EGRESS=deny)")]
    ConnectRefused(String),
    /// The workload's authorization policy does not allow the request; the
    /// text names the caller, the policy and why.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// No authorization policy from the controller yet: nobody is let in
    /// until it is known.
    #[error("unauthorized for now: the authorization policy of this workload is not known yet (none from the controller within {0:?}); try again")]
    AuthorizationPending(Duration),
}

impl From<crate::authz::Refused> for ProxyError {
    fn from(refused: crate::authz::Refused) -> Self {
        match refused {
            crate::authz::Refused::Unauthorized(reason) => Self::Unauthorized(reason),
            crate::authz::Refused::Pending(waited) => Self::AuthorizationPending(waited),
        }
    }
}

impl ProxyError {
    /// The reason of [`ProxyError::Connect`], which tells a client's proxy
    /// that the request reached no application.
    pub const CONNECT_REASON: &'static str = "connect";

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoAuthority
            | ProxyError::NoTarget
            | ProxyError::ClientBody(_)
            | ProxyError::DuplicateHost => StatusCode::BAD_REQUEST,
            ProxyError::ConnectUnsupported => StatusCode::NOT_IMPLEMENTED,
            ProxyError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ProxyError::PlaintextTarget
            | ProxyError::Unauthorized(_)
            | ProxyError::ConnectRefused(_) => StatusCode::FORBIDDEN,
            ProxyError::UnknownService(_)
            | ProxyError::NoEndpoints(_)
            | ProxyError::DiscoveryTimeout(..)
            | ProxyError::NoIdentity
            | ProxyError::Overloaded(..)
            | ProxyError::RouteOverloaded(..)
            | ProxyError::AllEjected(..)
            | ProxyError::AuthorizationPending(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Tls { .. } | ProxyError::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Timeout(_) | ProxyError::BodyIdle(..) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoRouteMatch(_) => StatusCode::NOT_FOUND,
            ProxyError::NoBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::FaultInjected(status) => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    /// A short, stable reason for headers and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoAuthority => "no-authority",
            ProxyError::NoTarget => "no-target",
            ProxyError::UnknownService(_) => "unknown-service",
            ProxyError::NoEndpoints(_) => "no-endpoints",
            ProxyError::DiscoveryTimeout(..) => "discovery-timeout",
            ProxyError::NoIdentity => "no-identity",
            ProxyError::Connect { .. } => Self::CONNECT_REASON,
            ProxyError::Tls { .. } => "tls",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::NoRouteMatch(_) => "no-route-match",
            ProxyError::NoBackend(_) => "no-backend",
            ProxyError::FaultInjected(_) => "fault-injected",
            ProxyError::Overloaded(..) | ProxyError::RouteOverloaded(..) => "overloaded",
            ProxyError::AllEjected(..) => "unavailable",
            ProxyError::BodyIdle(..) => "body-idle",
            ProxyError::ClientBody(_) => "client-body",
            ProxyError::DuplicateHost => "duplicate-host",
            ProxyError::ConnectUnsupported => "connect-unsupported",
            ProxyError::ConnectRefused(_) => "connect-refused",
            ProxyError::UriTooLong(_) => "uri-too-long",
            ProxyError::PlaintextTarget => "plaintext-target",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::AuthorizationPending(_) => "authorization-pending",
        }
    }

    /// The gRPC status a gRPC client gets instead of the HTTP status, for
    /// the errors whose meaning gRPC has a code for (the others answer in
    /// HTTP, which gRPC clients map themselves).
    pub fn grpc_status(&self) -> Option<u32> {
        match self {
            // PERMISSION_DENIED
            ProxyError::Unauthorized(_) => Some(7),
            // UNAVAILABLE: retry later.
            ProxyError::AuthorizationPending(_) => Some(14),
            _ => None,
        }
    }

    /// A trailers-only gRPC response (gRPC over HTTP/2, "Responses"):
    /// status 200, the code in `grpc-status`, the text in `grpc-message`
    /// (percent-encoded).
    fn into_grpc_response(self, code: u32) -> Response<Body> {
        let message: String = self
            .to_string()
            .bytes()
            .map(|b| match b {
                b' '..=b'~' if b != b'%' => char::from(b).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let mut response = Response::new(full(""));
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", http::HeaderValue::from(code));
        if let Ok(message) = http::HeaderValue::from_str(&message) {
            headers.insert("grpc-message", message);
        }
        headers.insert(PROXY_ERROR, http::HeaderValue::from_static(self.reason()));
        response
    }

    /// Whether another attempt could succeed: the request never reached an
    /// application, or the endpoint failed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::Tls { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::NoEndpoints(_)
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let mut response = Response::new(full(format!("{self}\n")));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(PROXY_ERROR, http::HeaderValue::from_static(self.reason()));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        response
    }
}

/// The response for a request's outcome: the upstream's, or the error's.
pub fn respond(
    result: Result<Response<Body>, ProxyError>,
    direction: &'static str,
) -> Response<Body> {
    respond_to(result, direction, false)
}

/// Like [`respond`], for a request that may be gRPC (`grpc`): errors with a
/// gRPC code answer in gRPC.
pub fn respond_to(
    result: Result<Response<Body>, ProxyError>,
    direction: &'static str,
    grpc: bool,
) -> Response<Body> {
    result.unwrap_or_else(|error| {
        tracing::debug!(%error, direction, "request failed in the proxy");
        match error.grpc_status() {
            Some(code) if grpc => error.into_grpc_response(code),
            _ => error.into_response(),
        }
    })
}
