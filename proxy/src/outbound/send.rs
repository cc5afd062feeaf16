//! Sending one request to a backend Service: the balancer picks an
//! endpoint, the request goes to its proxy over mTLS (or to it directly when
//! it is not meshed), and the outcome is recorded for the balancer and
//! outlier detection; when nothing reached an application, another
//! endpoint gets it.

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};

use super::body::ClientBodyFailure;
use super::endpoint::{Attempt, EndpointHandle};
use super::target::Endpoints;
use super::{Outbound, Reached, CONNECT_ATTEMPTS};
use crate::errors::ProxyError;
use crate::http::{boxed, path_of, strip_hop_by_hop, Body, DST_PORT, ORIG_PROTO};
use crate::outlier::Failure;

impl Outbound {
    /// Sends a request to one backend Service, balancing over its
    /// endpoints; when connecting to one fails, nothing reached an
    /// application, so the request goes to another.
    pub(super) async fn send_to(
        &self,
        endpoints: &Endpoints,
        authority: &str,
        mut request: Request<Body>,
        reached: &mut Reached,
    ) -> Result<Response<Body>, ProxyError> {
        reached.backend = Some(endpoints.names().0.clone());
        let mut tried = Vec::new();
        // When no other endpoint is left, the client hears what went wrong.
        let mut last_error = None;
        loop {
            let endpoint = match endpoints.pick(&tried) {
                Ok(endpoint) => endpoint.clone(),
                Err(none_left) => return Err(last_error.unwrap_or(none_left)),
            };
            reached.endpoint = Some(endpoint.clone());
            // A request without a body can go elsewhere if the peer says
            // it reached no application (its app refused the connection),
            // and an idempotent one also when the connection broke under it
            // (a peer that drained or died as it was sent): RFC 9110 §9.2.2
            // allows repeating it.
            let replay =
                hyper::body::Body::is_end_stream(request.body()).then(|| head_of(&request));
            let idempotent = request.method().is_idempotent();
            let client_failure = request.extensions().get::<ClientBodyFailure>().cloned();
            let mut attempt = endpoint.start();
            let result = self.send(&endpoint, authority, request, &mut attempt).await;
            // The client broke its own body: its 400, and the endpoint's
            // attempt is abandoned, not failed (no outlier detection).
            if let Some(reason) = client_failure.as_ref().and_then(|f| f.reason()) {
                if result.is_err() {
                    return Err(ProxyError::ClientBody(reason.to_string()));
                }
            }
            match result {
                Ok(response) if unreached(&response) && tried.len() + 1 < CONNECT_ATTEMPTS => {
                    self.failed(endpoints, attempt, Failure::Connect);
                    tried.push(endpoint.key());
                    // Without another endpoint, the peer's answer stands.
                    match replay.filter(|_| endpoints.pick(&tried).is_ok()) {
                        Some(replay) => {
                            tracing::debug!(endpoint = %endpoint.key(), "its application is unreachable; trying another endpoint");
                            request = replay;
                        }
                        None => return Ok(response),
                    }
                }
                Ok(response) => {
                    if is_failure(&response) {
                        self.failed(endpoints, attempt, Failure::Response);
                    } else {
                        attempt.succeeded();
                    }
                    return Ok(response);
                }
                Err(failed) => {
                    self.count_tls_failure(&failed.error);
                    let failure = match failed.error {
                        ProxyError::Connect { .. } | ProxyError::Tls { .. } => Failure::Connect,
                        _ => Failure::Response,
                    };
                    self.failed(endpoints, attempt, failure);
                    tried.push(endpoint.key());
                    let broken = idempotent && matches!(failed.error, ProxyError::Upstream { .. });
                    let resend = failed.unsent.or(replay.filter(|_| broken));
                    match resend {
                        Some(unsent) if tried.len() < CONNECT_ATTEMPTS => {
                            tracing::debug!(endpoint = %endpoint.key(), error = %failed.error, "trying another endpoint");
                            request = unsent;
                            last_error = Some(failed.error);
                        }
                        _ => return Err(failed.error),
                    }
                }
            }
        }
    }

    /// Counts a failed mTLS handshake with a peer proxy.
    pub(super) fn count_tls_failure(&self, error: &ProxyError) {
        if let ProxyError::Tls { cause, .. } = error {
            self.metrics.tls_failure("outbound", *cause);
        }
    }

    /// Records a failed attempt, and counts the ejection it caused.
    pub(super) fn failed(&self, endpoints: &Endpoints, attempt: Attempt, failure: Failure) {
        if endpoints.failed(attempt, failure) {
            let (service, namespace) = endpoints.names();
            tracing::info!(%service, %namespace, "endpoint ejected after failures");
            self.metrics.ejection(service, namespace);
        }
    }

    async fn send(
        &self,
        endpoint: &EndpointHandle,
        authority: &str,
        request: Request<Body>,
        attempt: &mut Attempt,
    ) -> Result<Response<Body>, SendError> {
        let response = match endpoint.identity() {
            Some(expected) => {
                let tls = self.identity.current().ok_or(ProxyError::NoIdentity)?;
                let open = match endpoint.connection(&tls, expected).await {
                    Ok(open) => open,
                    Err(error) => {
                        return Err(SendError {
                            error,
                            unsent: Some(request),
                        })
                    }
                };
                attempt.connected();
                let request = to_peer(request, endpoint, authority)?;
                // Given back unsent when the connection closed (a GOAWAY,
                // say) before the request left.
                open.peer.send(request).await.map_err(|e| SendError {
                    error: ProxyError::Upstream {
                        endpoint: endpoint.key().to_string(),
                        reason: e.error.to_string(),
                    },
                    unsent: e.unsent,
                })?
            }
            None => {
                let (mut parts, body) = request.into_parts();
                let orig_version = parts.version;
                strip_hop_by_hop(&mut parts.headers);
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
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
                let response = client.request(request).await.map_err(|e| {
                    let reason = e.to_string();
                    let endpoint = endpoint.key().to_string();
                    match e.is_connect() {
                        true => ProxyError::Connect { endpoint, reason },
                        false => ProxyError::Upstream { endpoint, reason },
                    }
                })?;
                response.map(boxed)
            }
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// A failed send; with the request when it never reached the peer, so it
/// can go to another endpoint whatever its method.
struct SendError {
    error: ProxyError,
    unsent: Option<Request<Body>>,
}

impl From<ProxyError> for SendError {
    fn from(error: ProxyError) -> Self {
        Self {
            error,
            unsent: None,
        }
    }
}

/// The request as the endpoint's proxy takes it: HTTP/2, the target port
/// in-band. Idempotent, so a request given back unsent can be sent again.
fn to_peer(
    request: Request<Body>,
    endpoint: &EndpointHandle,
    authority: &str,
) -> Result<Request<Body>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // HTTP/2 needs no word: it is what arrives (one header fewer to encode
    // and decode per request).
    if parts.version != Version::HTTP_2 && !parts.headers.contains_key(ORIG_PROTO) {
        parts
            .headers
            .insert(ORIG_PROTO, http::HeaderValue::from_static("HTTP/1.1"));
    }
    // The application behind the peer sees the authority its client used
    // (a name, not the ClusterIP it resolved to).
    // Built from the parts already parsed, not from strings parsed again.
    let visible = match parts.uri.authority() {
        Some(visible) => visible.clone(),
        None => parts
            .headers
            .get(http::header::HOST)
            .and_then(|host| Authority::try_from(host.as_bytes()).ok())
            .or_else(|| Authority::try_from(authority).ok())
            .ok_or(ProxyError::NoAuthority)?,
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(visible);
    uri.path_and_query = Some(path_of(&parts.uri));
    parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::NoAuthority)?;
    parts.version = Version::HTTP_2;
    parts.headers.remove(http::header::HOST);
    parts.headers.insert(DST_PORT, endpoint.port_header());
    Ok(Request::from_parts(parts, body))
}

/// Whether the endpoint's proxy answered that it could not reach its
/// application: nothing was processed there.
fn unreached(response: &Response<Body>) -> bool {
    response.status() == http::StatusCode::BAD_GATEWAY
        && response
            .headers()
            .get(crate::http::PROXY_ERROR)
            .is_some_and(|reason| reason == ProxyError::CONNECT_REASON)
}

/// A copy of a request without a body.
pub(super) fn head_of(request: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(crate::http::full(bytes::Bytes::new()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Whether a response counts against its endpoint: a 5xx, or a gRPC
/// UNAVAILABLE answered at once (trailers-only, in the headers).
fn is_failure(response: &Response<Body>) -> bool {
    response.status().is_server_error()
        || response
            .headers()
            .get("grpc-status")
            .is_some_and(|code| code.as_bytes() == b"14")
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
