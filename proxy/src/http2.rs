//! The proxy's HTTP/2 client, on the h2 crate itself: to peer proxies
//! (every mesh request) and to an application that speaks HTTP/2. A
//! request goes from its own task straight onto the connection and its
//! response is awaited there. hyper's client would spawn a task for every
//! request and hand each through a channel to the connection's task; here
//! only a request body still streaming after the head gets a task, to pump
//! it while the response comes back (a gRPC stream, an upload).

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::{Body, BoxError};
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::woken::when_woken;

/// Flow-control windows, as hyper's client has them: a stream may have
/// this much unread response data in flight…
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// …and the whole connection this much.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// Request data queued for the connection beyond what flow control lets
/// out, per stream.
const SEND_BUFFER: usize = 1024 * 1024;

/// How a connection is set up.
pub struct Settings {
    /// The largest response head accepted.
    pub max_header_list_size: u32,
    /// The largest frame accepted (h2's default when `None`).
    pub max_frame_size: Option<u32>,
    /// Whether to PING the server every [`KEEPALIVE_INTERVAL`], busy or
    /// idle, and close the connection when one goes unanswered for
    /// [`KEEPALIVE_TIMEOUT`] (a peer gone without a word).
    pub keepalive: bool,
}

/// An open HTTP/2 connection. The connection closes when the server closes
/// it, when a keep-alive PING goes unanswered, or once nothing refers to it.
pub struct Connection {
    sender: SendRequest<Bytes>,
    /// Set when the connection has ended, so it is replaced before a
    /// request is lost on it.
    closed: Arc<AtomicBool>,
}

/// A request that failed on the connection; with the request when it was
/// never sent (the connection had closed or been told to go away), so it
/// can go elsewhere.
pub struct SendError {
    pub error: h2::Error,
    pub unsent: Option<Request<Body>>,
}

impl Connection {
    /// The HTTP/2 handshake over `io` (to `server`), and the task that runs
    /// the connection.
    pub async fn handshake<T>(
        io: T,
        settings: &Settings,
        server: SocketAddr,
    ) -> Result<Self, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(settings.max_header_list_size)
            .enable_push(false);
        if let Some(size) = settings.max_frame_size {
            builder.max_frame_size(size);
        }
        let (sender, mut connection) = builder.handshake(io).await?;
        let closed = Arc::new(AtomicBool::new(false));
        let pings = connection.ping_pong().filter(|_| settings.keepalive);
        let ended = closed.clone();
        tokio::spawn(async move {
            // `biased`: the connection first, and no random number drawn
            // each time it wakes (every frame); the keep-alive timer is
            // looked at only when it fires.
            let outcome = tokio::select! {
                biased;
                result = &mut connection => result.map_err(|e| e.to_string()),
                dead = when_woken(keepalive(pings)) => Err(dead.to_string()),
            };
            ended.store(true, Ordering::Release);
            if let Err(error) = outcome {
                tracing::debug!(%server, %error, "HTTP/2 connection closed");
            }
        });
        Ok(Self { sender, closed })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `request` (absolute URI, HTTP/2 headers only) and waits for
    /// the response head.
    pub async fn send(&self, request: Request<Body>) -> Result<Response<Body>, SendError> {
        // Ready means the connection can open a stream now: what fails
        // here never reached the peer.
        let mut sender = match self.sender.clone().ready().await {
            Ok(sender) => sender,
            Err(error) => {
                return Err(SendError {
                    error,
                    unsent: Some(request),
                })
            }
        };
        let (mut head, body) = request.into_parts();
        let end_of_stream = body.is_end_stream();
        // A body of known size tells the peer (and the application behind
        // it) its length, as hyper's client would.
        if let Some(length) = body.size_hint().exact().filter(|n| *n > 0) {
            head.headers
                .entry(CONTENT_LENGTH)
                .or_insert_with(|| length.into());
        }
        let sent = sender.send_request(Request::from_parts(head, ()), end_of_stream);
        let (response, stream) = sent.map_err(|error| SendError {
            error,
            unsent: None,
        })?;
        if !end_of_stream {
            // A body that is all there already goes out without a task.
            let mut pump = Box::pin(pump(body, stream));
            if (&mut pump).now_or_never().is_none() {
                tokio::spawn(pump);
            }
        }
        let response = response.await.map_err(|error| SendError {
            error,
            unsent: None,
        })?;
        let length = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        Ok(response.map(|stream| Body::new(ResponseBody::new(stream, length))))
    }
}

/// PINGs the server every [`KEEPALIVE_INTERVAL`]; returns when one goes
/// unanswered for [`KEEPALIVE_TIMEOUT`] (never without `pings`).
async fn keepalive(pings: Option<h2::PingPong>) -> DeadPeer {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        let pong = tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await;
        if !matches!(pong, Ok(Ok(_))) {
            return DeadPeer;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no answer to a keep-alive PING within {KEEPALIVE_TIMEOUT:?}")]
struct DeadPeer;

/// Sends a request body on its stream, then its trailers or its end;
/// resets the stream if the body fails, and stops when the peer resets
/// it. The body is read only while the stream has room for more (h2
/// buffers what one frame brings beyond it, up to [`SEND_BUFFER`]), so a
/// slow reader holds the body back rather than filling memory.
async fn pump(mut body: Body, mut stream: SendStream<Bytes>) {
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
                tracing::debug!(%error, "request body failed; resetting its stream");
                stream.send_reset(Reason::CANCEL);
                return;
            }
        };
        if last || sent.is_err() {
            return;
        }
    }
}

/// A response body as it arrives: each chunk read gives its window back
/// to the peer; the trailers (gRPC's status) come last.
struct ResponseBody {
    stream: RecvStream,
    data_done: bool,
    /// What `content-length` says is still to come, for the size hint
    /// (an HTTP/1 client of this proxy gets a length, not chunks).
    remaining: Option<u64>,
}

impl ResponseBody {
    fn new(stream: RecvStream, content_length: Option<u64>) -> Self {
        // A stream that has already ended has nothing more to come.
        let remaining = content_length.or_else(|| stream.is_end_stream().then_some(0));
        Self {
            stream,
            data_done: false,
            remaining,
        }
    }
}

impl hyper::body::Body for ResponseBody {
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
