//! HTTP/2 on the h2 crate itself: the client (to peer proxies, and to an
//! application that speaks HTTP/2) and the server (every listener's
//! HTTP/2 connections: from peer sidecars and from applications). hyper
//! would put a channel hop and a spawned task per request on the client
//! side, and its own task, body type and header conversions per stream on
//! the server side; here a request goes from its task straight onto the
//! connection, and a stream served is one task that answers it.
//!
//! Shared by both ends: bodies as they arrive ([`RecvBody`]), bodies sent
//! with backpressure ([`send_body`]), and keep-alive PINGs.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};

use crate::http::{Body, BoxError};

mod client;
mod server;

pub use client::{Connection, SendError, Settings};
pub use server::serve;

/// An HTTP/2 PING this often finds a dead peer (on every connection
/// served, and on the client's connections to peer sidecars)…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// …when its answer takes longer than this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Data queued for a connection beyond what flow control lets out, per
/// stream.
pub const SEND_BUFFER: usize = 1024 * 1024;

/// Why an HTTP/2 connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Protocol(#[from] h2::Error),
    #[error("no answer to a keep-alive PING within {KEEPALIVE_TIMEOUT:?}")]
    DeadPeer,
}

/// PINGs the peer every [`KEEPALIVE_INTERVAL`]; returns when one goes
/// unanswered for [`KEEPALIVE_TIMEOUT`] (never without `pings`).
async fn keepalive(pings: Option<h2::PingPong>) -> Error {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await;
        if !matches!(pong, Ok(Ok(_))) {
            return Error::DeadPeer;
        }
    }
}

/// What `content-length` says, when it is there and a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

/// Sets `content-length` from a body of known, non-zero size, as hyper
/// would: the peer (and an HTTP/1 hop after it) learns the length.
fn set_content_length(headers: &mut HeaderMap, body: &impl hyper::body::Body) {
    if let Some(length) = body.size_hint().exact().filter(|n| *n > 0) {
        headers
            .entry(CONTENT_LENGTH)
            .or_insert_with(|| length.into());
    }
}

/// Sends a body on its stream, then its trailers or its end; resets the
/// stream if the body fails, and stops when the peer resets it. The body
/// is read only while the stream has room for more (h2 buffers what one
/// frame brings beyond it, up to [`SEND_BUFFER`]), so a slow reader holds
/// the body back rather than filling memory.
async fn send_body<B>(mut body: B, mut stream: SendStream<Bytes>)
where
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    loop {
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                // Reset, or the connection closed.
                _ => return,
            }
        }
        let frame = tokio::select! {
            biased;
            frame = body.frame() => frame,
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        // Whether that was the last frame, and whether it could be sent.
        let (last, sent) = match frame.map(|f| f.map(Frame::into_data)) {
            None => (true, stream.send_data(Bytes::new(), true)),
            Some(Ok(Ok(data))) => {
                let last = body.is_end_stream();
                (last, stream.send_data(data, last))
            }
            Some(Ok(Err(frame))) => match frame.into_trailers() {
                Ok(trailers) => (true, stream.send_trailers(trailers)),
                Err(_) => continue,
            },
            Some(Err(error)) => {
                tracing::debug!(%error, "body failed; resetting its stream");
                stream.send_reset(Reason::CANCEL);
                return;
            }
        };
        if last || sent.is_err() {
            return;
        }
    }
}

/// A body as it arrives: each chunk read gives its window back to the
/// peer; the trailers (gRPC's status) come last.
struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// What `content-length` says is still to come, for the size hint
    /// (an HTTP/1 hop after this one gets a length, not chunks).
    remaining: Option<u64>,
}

impl RecvBody {
    /// The body of a message with these `headers`.
    fn boxed(stream: RecvStream, headers: &HeaderMap) -> Body {
        // A stream that has already ended has nothing more to come.
        let remaining = content_length(headers).or_else(|| stream.is_end_stream().then_some(0));
        Body::new(Self {
            stream,
            data_done: false,
            remaining,
        })
    }
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    if let Some(remaining) = &mut self.remaining {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(remaining) => SizeHint::with_exact(remaining),
            None => SizeHint::default(),
        }
    }
}
