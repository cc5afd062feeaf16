//! HTTP plumbing shared by both directions: the body type, the in-band
//! headers between proxies, and hop-by-hop header handling.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// The application port the request is for, set by the client's proxy and
/// consumed by the server's proxy (so the same code works with or without
/// iptables).
pub const DST_PORT: HeaderName = HeaderName::from_static("trellis-dst-port");
/// The HTTP version the application spoke, so the server's proxy can speak
/// it to its application although the hop between proxies is HTTP/2.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");
/// The verified SPIFFE ID of the client, set by the server's proxy for the
/// application (any value the client sent is removed first).
pub const CLIENT_ID: HeaderName = HeaderName::from_static("trellis-client-id");
/// The Prometheus text exposition format; Prometheus 3 refuses a scrape
/// without it.
pub const METRICS_CONTENT_TYPE: http::HeaderValue =
    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// Why the proxy answered instead of the application.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("trellis-proxy-error");

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

/// Removes connection-specific headers (RFC 9110 §7.6.1), which must not be
/// forwarded and are forbidden in HTTP/2 (RFC 9113 §8.2.2).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
    ] {
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

/// Serves `handler` on every connection `listener` accepts (HTTP/1.1 and
/// HTTP/2), until the task is dropped. For small servers outside the proxy:
/// the controller's admin port and test or demo applications.
pub async fn serve<F, Fut, B>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Never drained: it serves until the task is dropped.
    let drain = crate::drain::Drain::new();
    crate::listen::accept(listener, "app", None, drain.watch(), |tcp, _, _| {
        let handler = handler.clone();
        async move {
            let service = hyper::service::service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(request).await) }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // HTTP/2 heads as large as a sidecar lets through by default
            // (HTTP/1 allows ~400 KiB already), as most servers allow.
            builder.http2().max_header_list_size(2 * 65536);
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        }
    })
    .await;
}
