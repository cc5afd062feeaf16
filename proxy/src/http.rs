//! HTTP plumbing shared by both directions: the body type, the in-band
//! headers between proxies (defined with the protocol), and hop-by-hop
//! header handling.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub use trellis_proto::headers::{CLIENT_ID, DST_PORT, ORIG_PROTO, PROXY_ERROR};

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A request's path and query, `/` when it has none (an authority-form
/// target), without parsing it again.
pub fn path_of(uri: &http::Uri) -> http::uri::PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), which must not be
/// forwarded and are forbidden in HTTP/2 (RFC 9113 §8.2.2).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names finds that, where
    // removing each candidate would hash every one of them.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok());
    let always = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) && *name != header::TE)
        .cloned();
    let remove: Vec<HeaderName> = named.chain(always).collect();
    for name in remove {
        headers.remove(name);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows (gRPC needs it).
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !te_trailers {
        headers.remove(header::TE);
    }
}

/// A header that is connection-specific wherever it appears (`TE` is,
/// unless its value is `trailers`).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::TE,
    ]
    .contains(name)
        || matches!(name.as_str(), "proxy-connection" | "keep-alive")
}

/// The longest request target (path and query) the
/// proxy forwards: nginx's and many applications' own limit, so a longer
/// one gets a 414 that says why from the proxy rather than an opaque
/// failure behind it.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// What the proxy refuses in any request head before routing it: several
/// `Host` headers (RFC 9112 §3.2 asks for a 400; they would be routed by one
/// and forwarded with both), a target over [`MAX_URI_BYTES`] (414), and
/// CONNECT (which only the explicit proxy serves, before this).
pub fn refuse_at_edge<B>(request: &http::Request<B>) -> Result<(), crate::errors::ProxyError> {
    use crate::errors::ProxyError;
    if request.method() == http::Method::CONNECT {
        return Err(ProxyError::ConnectUnsupported);
    }
    if request.headers().get_all(header::HOST).iter().count() > 1 {
        return Err(ProxyError::DuplicateHost);
    }
    // The path and query: the authority is the Host, which the header
    // limit covers, and between sidecars it rides in `:authority`.
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ProxyError::UriTooLong(target));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        names.sort();
        names
    }

    #[test]
    fn connection_specific_headers_are_removed_and_the_rest_kept() {
        let mut h = headers(&[
            ("connection", "close, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("x-request-id", "7"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["te", "x-request-id"]);

        let mut h = headers(&[("te", "gzip"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept"], "TE other than trailers goes");

        let mut h = headers(&[("accept", "*/*"), ("x-b3-traceid", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["accept", "x-b3-traceid"], "nothing to strip");
    }
}
