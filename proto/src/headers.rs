//! Headers that travel between proxies, and from a proxy to its application:
//! part of the protocol as much as the protos are.

use http::HeaderName;

/// The application port the request is for, set by the client's proxy and
/// consumed by the server's proxy (so the same code works with or without
/// iptables).
pub const DST_PORT: HeaderName = HeaderName::from_static("trellis-dst-port");
/// The HTTP version the application spoke, so the server's proxy can speak
/// it to its application although the hop between proxies is HTTP/2. Sent
/// for HTTP/1 (`HTTP/1.1`); a request without it is HTTP/2, as it arrives.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");
/// The verified SPIFFE ID of the client, set by the server's proxy for the
/// application (any value the client sent is removed first).
pub const CLIENT_ID: HeaderName = HeaderName::from_static("trellis-client-id");
/// Why the proxy answered instead of the application.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("trellis-proxy-error");
