//! Serving HTTP connections, the same way on every listener: hyper builders
//! with the proxy's header limit and keep-alive PINGs, a watchdog that closes
//! connections whose request head stalls or that sit idle, and graceful
//! shutdown when the proxy drains.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::coalesce::Coalesced;
use crate::config::{Config, MAX_HEADER_BYTES_CEILING};
use crate::detect;
#[cfg(doc)]
use crate::drain::Watch;
use crate::http::{Body, BoxError};
use crate::metrics::{ListenerMetrics, Timeout};

/// Between sidecars, an HTTP/2 PING this often finds a dead peer…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// …when its answer takes longer than this.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The header list size allowed on the HTTP/2 connections between sidecars:
/// anything any sidecar's edge accepts (at most [`MAX_HEADER_BYTES_CEILING`]),
/// plus what an HTTP/1 head grows into as HTTP/2 (32 bytes per field, RFC
/// 9113 §6.5.2, for at most hyper's 100 fields) and the in-band headers. A
/// header list over the receiver's limit is refused by h2 per stream, but
/// one far over it (or one that needs more CONTINUATION frames than h2
/// allows) is a connection error that fails every request on the shared
/// connection — so this hop never refuses what an edge let in.
pub const MESH_HEADER_LIST_SIZE: u32 = MAX_HEADER_BYTES_CEILING + 16 * 1024;

/// The frame size sidecars accept from each other. h2 refuses a header
/// block in more than `max(5, 1.25 × header list size / frame size)`
/// CONTINUATION frames, and its HPACK encoder always Huffman-codes, which
/// can triple the size of unusual bytes: frames this large let the largest
/// allowed header block through in a handful of frames.
pub const MESH_FRAME_SIZE: u32 = MAX_HEADER_BYTES_CEILING;

/// Streams a peer sidecar may have open on the one HTTP/2 connection that
/// carries every request between two pods (each application connection
/// behind it is held to `TRELLIS_MAX_CONCURRENT_STREAMS` at its own edge).
pub const MESH_MAX_CONCURRENT_STREAMS: u32 = 4096;

/// Streams a client may open and reset before the server accepted them,
/// per connection; more is the HTTP/2 rapid-reset attack (CVE-2023-44487)
/// and ends the connection with GOAWAY.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// Streams the server may reset for a client's protocol errors, per
/// connection, before it closes the connection with GOAWAY.
pub const MAX_LOCAL_ERROR_RESETS: usize = 100;

/// How a listener's connections are policed: limits and timeouts from the
/// configuration, and where to count what they close.
#[derive(Clone)]
pub struct Server {
    direction: &'static str,
    metrics: ListenerMetrics,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_header_bytes: u32,
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_body_in_flight: u32,
}

/// The HTTP version of a connection, known before hyper sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// Who is on the other end; it decides what idleness means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An application, a client outside the mesh, or the kubelet: a
    /// connection with no request in flight for the idle timeout is closed.
    App,
    /// Another sidecar, whose pooled HTTP/2 connection carries all requests
    /// between the two pods: it stays open, and keep-alive PINGs find a
    /// dead one.
    Sidecar,
}

/// Why a connection ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no protocol detected or handshake done within {0:?}")]
    Handshake(Duration),
    #[error("detecting the protocol: {0}")]
    Detect(#[source] io::Error),
    #[error("no complete request head within {0:?}")]
    HeaderRead(Duration),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl Server {
    pub fn new(config: &Config, direction: &'static str, metrics: ListenerMetrics) -> Self {
        Self {
            direction,
            metrics,
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            handshake_timeout: config.handshake_timeout,
            max_header_bytes: config.max_header_bytes,
            max_connections: config.max_connections,
            max_concurrent_streams: config.max_concurrent_streams,
            max_body_in_flight: config.max_body_in_flight,
        }
    }

    /// Runs `handshake` (protocol detection, TLS) within the handshake timeout.
    pub async fn handshake<T>(&self, handshake: impl Future<Output = T>) -> Result<T, ServeError> {
        tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| {
                self.metrics.timed_out(self.direction, Timeout::Handshake);
                ServeError::Handshake(self.handshake_timeout)
            })
    }

    /// The HTTP version of a connection whose client dialled the proxy to
    /// speak HTTP: HTTP/2 when it starts with the preface.
    pub async fn sniff(&self, tcp: &TcpStream) -> Result<Version, ServeError> {
        match self.handshake(detect::http_version(tcp)).await? {
            Ok(detect::Protocol::Http2) => Ok(Version::Http2),
            Ok(_) => Ok(Version::Http1),
            Err(e) => Err(ServeError::Detect(e)),
        }
    }

    /// Serves HTTP on `io` until the client closes, a timeout closes it, or
    /// `shutdown` (the drain, typically: [`Watch::draining`]) resolved and
    /// the requests in flight finished.
    pub async fn serve<I, F, Fut>(
        &self,
        io: I,
        version: Version,
        peer: Peer,
        shutdown: impl Future<Output = ()>,
        handler: F,
    ) -> Result<(), ServeError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let activity = Arc::new(Activity::new(version));
        let io = Watched {
            inner: io,
            activity: activity.clone(),
        };
        let service = {
            let activity = activity.clone();
            service_fn(move |request| {
                let guard = activity.start();
                // Boxed: a request's future is large (routing, retries,
                // filters) and hyper moves what the service returns (into
                // its dispatcher, into a task per HTTP/2 stream); a pointer
                // moves for the price of one allocation.
                let response = Box::pin(handler(request));
                async move {
                    let response = response.await;
                    Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                        body,
                        _guard: guard,
                    }))
                }
            })
        };
        let watchdog = Watchdog {
            server: self,
            activity: &activity,
            version,
            peer,
        };
        match version {
            Version::Http1 => {
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    // The watchdog times request heads: hyper's own timer
                    // would also cut kept-alive connections between requests
                    // at the header timeout, long before the idle timeout.
                    .header_read_timeout(None)
                    // A head over the limit gets hyper's own 431. (Its
                    // `max_buf_size` is no limit: a head that arrives in
                    // one read larger than it is parsed all the same.)
                    .max_header_size(self.max_header_bytes as usize)
                    // What hyper reads ahead of the handler is its read
                    // buffer: bounded, a body streams with backpressure.
                    .max_buf_size(self.max_body_in_flight.max(self.max_header_bytes) as usize)
                    .serve_connection(TokioIo::new(io), service)
                    // A CONNECT the handler agrees to hands the connection over.
                    .with_upgrades();
                watchdog
                    .drive(connection, |c| c.graceful_shutdown(), shutdown)
                    .await
            }
            Version::Http2 => {
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
                    .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
                    // Flow control bounds the body bytes a connection has
                    // in the proxy (RFC 9113 §5.2).
                    .initial_connection_window_size(self.max_body_in_flight)
                    .initial_stream_window_size(self.max_body_in_flight);
                match peer {
                    // h2 answers 431 on the stream for a header list over it.
                    Peer::App => builder
                        .max_header_list_size(self.max_header_bytes)
                        .max_concurrent_streams(self.max_concurrent_streams),
                    Peer::Sidecar => builder
                        .max_header_list_size(MESH_HEADER_LIST_SIZE)
                        .max_frame_size(MESH_FRAME_SIZE)
                        .max_concurrent_streams(
                            MESH_MAX_CONCURRENT_STREAMS.max(self.max_concurrent_streams),
                        ),
                };
                // A batch of frames goes out as one write (`coalesce`).
                let connection =
                    builder.serve_connection(TokioIo::new(Coalesced::new(io)), service);
                watchdog
                    .drive(connection, |c| c.graceful_shutdown(), shutdown)
                    .await
            }
        }
    }
}

/// One connection's timeouts and drain, around hyper's connection future.
struct Watchdog<'a> {
    server: &'a Server,
    activity: &'a Activity,
    version: Version,
    peer: Peer,
}

impl Watchdog<'_> {
    async fn drive<C>(
        &self,
        connection: C,
        graceful_shutdown: impl Fn(Pin<&mut C>),
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError>
    where
        C: Future<Output = hyper::Result<()>>,
    {
        tokio::pin!(connection);
        tokio::pin!(shutdown);
        let mut closing = false;
        loop {
            // `biased`: the connection first, and no random number drawn
            // each time it wakes.
            tokio::select! {
                biased;
                result = connection.as_mut() => return result.map_err(ServeError::Http),
                () = shutdown.as_mut(), if !closing => {
                    // hyper would keep an HTTP/1 connection that has not had
                    // a request yet for one more request: close it now.
                    if self.version == Version::Http1 && self.activity.is_idle() {
                        return Ok(());
                    }
                    // HTTP/2: GOAWAY, then the open streams finish. HTTP/1:
                    // the response in flight says `connection: close`.
                    graceful_shutdown(connection.as_mut());
                    closing = true;
                }
                expired = self.activity.expired(self.server, self.peer), if !closing => {
                    self.server.metrics.timed_out(self.server.direction, expired);
                    match expired {
                        Timeout::HeaderRead => {
                            return Err(ServeError::HeaderRead(self.server.header_read_timeout));
                        }
                        _ if self.version == Version::Http1 => return Ok(()),
                        // GOAWAY tells the client not to send more on it.
                        _ => {
                            graceful_shutdown(connection.as_mut());
                            closing = true;
                        }
                    }
                }
            }
        }
    }
}

/// What a connection is doing, for its watchdog: requests in flight, and
/// since when it has had none (or since when a request head is arriving).
struct Activity {
    version: Version,
    in_flight: AtomicUsize,
    since: Mutex<Since>,
    changed: Notify,
}

#[derive(Clone, Copy)]
struct Since {
    at: Instant,
    /// HTTP/1 only: a request head is expected (the connection is new) or
    /// its first bytes came; the header-read timeout runs from `at`.
    awaiting_head: bool,
}

impl Activity {
    fn new(version: Version) -> Self {
        Self {
            version,
            in_flight: AtomicUsize::new(0),
            since: Mutex::new(Since {
                at: Instant::now(),
                // A new connection owes its first request head at once.
                awaiting_head: version == Version::Http1,
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, change: impl FnOnce(&mut Since)) {
        if let Ok(mut since) = self.since.lock() {
            change(&mut since);
        }
        self.changed.notify_one();
    }

    /// Bytes arrived. On an idle HTTP/1 connection they start the next
    /// request head. (On HTTP/2 PINGs and window updates also arrive: only
    /// streams count there.)
    fn on_read(&self) {
        if self.version != Version::Http1 || self.in_flight.load(Ordering::Acquire) > 0 {
            return;
        }
        let starts_head = self.since.lock().map(|s| !s.awaiting_head).unwrap_or(false);
        if starts_head {
            self.update(|since| {
                *since = Since {
                    at: Instant::now(),
                    awaiting_head: true,
                }
            });
        }
    }

    /// A request arrived (its head is complete); the guard ends it.
    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.update(|since| since.awaiting_head = false);
        InFlight(self.clone())
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Resolves when a timeout expires: the header-read timeout of a
    /// request head that has not arrived, or the idle timeout.
    async fn expired(&self, server: &Server, peer: Peer) -> Timeout {
        loop {
            let changed = self.changed.notified();
            match self.deadline(server, peer) {
                Some((deadline, timeout)) if deadline <= Instant::now() => return timeout,
                Some((deadline, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    fn deadline(&self, server: &Server, peer: Peer) -> Option<(Instant, Timeout)> {
        if !self.is_idle() {
            return None;
        }
        let since = *self.since.lock().ok()?;
        let (after, timeout) = if since.awaiting_head {
            (server.header_read_timeout, Timeout::HeaderRead)
        } else if peer == Peer::App {
            (server.idle_timeout, Timeout::Idle)
        } else {
            return None;
        };
        // Checked: a deadline past what Instant holds is no deadline.
        Some((since.at.checked_add(after)?, timeout))
    }
}

/// A request in flight; dropped when its response body is done (or the
/// request was abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.update(|since| since.at = Instant::now());
        }
    }
}

/// A response body that keeps its request counted as in flight.
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's I/O, telling its [`Activity`] when bytes arrive.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
