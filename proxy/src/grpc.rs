//! Recording a finished request: an HTTP response is measured by its
//! status at once; a gRPC response answers `200` and carries its outcome in
//! the `grpc-status` trailer, so it is measured when the trailer passes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, Response};
use hyper::body::{Frame, SizeHint};

use crate::http::{Body, BoxError};
use crate::metrics::{Metrics, RequestLabels};

/// gRPC's CANCELLED: the client went away before the call ended.
const CANCELLED: u32 = 1;
/// gRPC's UNKNOWN: the stream ended without a status.
const UNKNOWN: u32 = 2;

/// Records `response` for `labels`, now or (gRPC) when its status arrives;
/// `latency` is the time to the response headers.
pub fn record(
    metrics: &Arc<Metrics>,
    labels: RequestLabels,
    latency: Duration,
    response: Response<Body>,
) -> Response<Body> {
    if !is_grpc(response.headers()) {
        metrics.request(&labels, response.status().as_u16(), latency);
        return response;
    }
    // A trailers-only response (an error before any message) carries the
    // status in its headers.
    if let Some(code) = status(response.headers()) {
        metrics.grpc_request(&labels, code, latency);
        return response;
    }
    let (parts, inner) = response.into_parts();
    let pending = Some(Pending {
        metrics: metrics.clone(),
        labels,
        latency,
    });
    Response::from_parts(parts, Body::new(GrpcBody { inner, pending }))
}

pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

struct Pending {
    metrics: Arc<Metrics>,
    labels: RequestLabels,
    latency: Duration,
}

/// A gRPC response body that records the call once its status is known.
struct GrpcBody {
    inner: Body,
    pending: Option<Pending>,
}

impl GrpcBody {
    fn finish(&mut self, code: u32) {
        if let Some(p) = self.pending.take() {
            p.metrics.grpc_request(&p.labels, code, p.latency);
        }
    }
}

impl hyper::body::Body for GrpcBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status(trailers).unwrap_or(UNKNOWN);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.finish(UNKNOWN),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GrpcBody {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}
