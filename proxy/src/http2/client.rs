//! The HTTP/2 client: to peer proxies (every mesh request) and to an
//! application that speaks HTTP/2. A request goes from its own task
//! straight onto the connection and its response is awaited there; only a
//! request body still streaming after the head gets a task, to send it
//! while the response comes back (a gRPC stream, an upload).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use h2::client::SendRequest;
use http::{Request, Response};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{keepalive, send_body, set_content_length, RecvBody, SEND_BUFFER};
#[cfg(doc)]
use super::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::coalesce::Coalesced;
use crate::http::Body;
use crate::woken::when_woken;

/// Flow-control windows, as hyper's client has them: a stream may have
/// this much unread response data in flight…
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// …and the whole connection this much.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

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
    /// the connection. A batch of frames goes out together
    /// ([`Coalesced`]).
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
        let io = Coalesced::new(io);
        let batch = io.batch();
        let (sender, mut connection) = builder.handshake(io).await?;
        let closed = Arc::new(AtomicBool::new(false));
        let pings = connection.ping_pong().filter(|_| settings.keepalive);
        let ended = closed.clone();
        tokio::spawn(batch.drive(async move {
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
        }));
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
        set_content_length(&mut head.headers, &body);
        let sent = sender.send_request(Request::from_parts(head, ()), end_of_stream);
        let (response, stream) = sent.map_err(|error| SendError {
            error,
            unsent: None,
        })?;
        if !end_of_stream {
            // A body that is all there already goes out without a task.
            let mut sending = Box::pin(send_body(body, stream));
            if (&mut sending).now_or_never().is_none() {
                tokio::spawn(sending);
            }
        }
        let response = response.await.map_err(|error| SendError {
            error,
            unsent: None,
        })?;
        let (head, stream) = response.into_parts();
        let body = RecvBody::boxed(stream, &head.headers);
        Ok(Response::from_parts(head, body))
    }
}
