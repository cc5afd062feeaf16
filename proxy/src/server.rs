//! Serving HTTP connections, the same way on every listener: HTTP/1 on
//! hyper, HTTP/2 on [`http2::serve`], with the proxy's header limit, a
//! watchdog that closes connections whose request head stalls or that sit
//! idle, and graceful shutdown when the proxy drains. The mesh listener's
//! connections from peer sidecars are HTTP/2 with limits of their own and
//! no idle timeout.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::coalesce::Coalesced;
use crate::config::{Config, MAX_HEADER_BYTES_CEILING};
use crate::detect;
#[cfg(doc)]
use crate::drain::Watch;
use crate::http::{boxed, Body, BoxError};
use crate::http2;
use crate::metrics::{ListenerMetrics, Timeout};
use crate::woken::when_woken;

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

/// The HTTP version of a connection, known before it is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
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
    #[error(transparent)]
    Http2(#[from] http2::Error),
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
    /// the requests in flight finished. The client is an application, a
    /// client outside the mesh, or the kubelet: a connection with no
    /// request in flight for the idle timeout is closed.
    pub async fn serve<I, F, Fut>(
        &self,
        io: I,
        version: Version,
        shutdown: impl Future<Output = ()>,
        handler: F,
    ) -> Result<(), ServeError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Body>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let activity = Arc::new(Activity::new(version));
        // A request is in flight until its response body is done. Its
        // future is boxed: it is large (routing, retries, filters), and
        // hyper and h2's stream tasks move what they are given; a pointer
        // moves for the price of one allocation.
        let handler = {
            let activity = activity.clone();
            move |request| {
                let guard = activity.start();
                let response = Box::pin(handler(request));
                async move {
                    let response = response.await;
                    response.map(|body| Tracked {
                        body,
                        _guard: guard,
                    })
                }
            }
        };
        match version {
            Version::Http1 => {
                let io = Watched {
                    inner: io,
                    activity: activity.clone(),
                };
                let service = service_fn(move |request: Request<Incoming>| {
                    let response = handler(request.map(boxed));
                    async move { Ok::<_, std::convert::Infallible>(response.await) }
                });
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
                let watchdog = Watchdog {
                    server: self,
                    activity: &activity,
                };
                watchdog.drive(connection, shutdown).await
            }
            Version::Http2 => {
                // GOAWAY on the drain, or once idle for the idle timeout
                // (HTTP/2 has no request head to time: h2 reads frames).
                let closing = async {
                    tokio::select! {
                        biased;
                        () = shutdown => {}
                        expired = activity.expired(self) => {
                            self.metrics.timed_out(self.direction, expired);
                        }
                    }
                };
                let limits = Http2Limits {
                    // h2 answers 431 on the stream for a header list over it.
                    max_header_list_size: self.max_header_bytes,
                    max_frame_size: None,
                    max_concurrent_streams: self.max_concurrent_streams,
                };
                self.serve_http2(io, limits, closing, handler).await
            }
        }
    }

    /// Serves the HTTP/2 connection of a peer sidecar until it closes, a
    /// keep-alive PING goes unanswered, or `shutdown` resolved and the
    /// streams in flight finished. The pooled connection carries every
    /// request between the two pods: it has no idle timeout.
    pub async fn serve_mesh<I, F, Fut>(
        &self,
        io: I,
        shutdown: impl Future<Output = ()>,
        handler: F,
    ) -> Result<(), ServeError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
        F: Fn(Request<Body>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        // Boxed, as `serve` does.
        let handler = move |request| Box::pin(handler(request));
        let limits = Http2Limits {
            max_header_list_size: MESH_HEADER_LIST_SIZE,
            max_frame_size: Some(MESH_FRAME_SIZE),
            max_concurrent_streams: MESH_MAX_CONCURRENT_STREAMS.max(self.max_concurrent_streams),
        };
        self.serve_http2(io, limits, shutdown, handler).await
    }

    /// HTTP/2 on h2 with these limits, until `closing` (then GOAWAY, and
    /// the streams in flight finish).
    async fn serve_http2<I, F, Fut, B>(
        &self,
        io: I,
        limits: Http2Limits,
        closing: impl Future<Output = ()>,
        handler: F,
    ) -> Result<(), ServeError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
        F: Fn(Request<Body>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
    {
        let mut builder = h2::server::Builder::new();
        builder
            // Flow control bounds the body bytes a connection has in the
            // proxy (RFC 9113 §5.2).
            .initial_window_size(self.max_body_in_flight)
            .initial_connection_window_size(self.max_body_in_flight)
            .max_send_buffer_size(http2::SEND_BUFFER)
            .max_header_list_size(limits.max_header_list_size)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
        if let Some(size) = limits.max_frame_size {
            builder.max_frame_size(size);
        }
        // The client's preface and SETTINGS are part of the handshake. A
        // batch of frames goes out together (`coalesce`).
        let io = Coalesced::new(io);
        let batch = io.batch();
        let connection = self
            .handshake(builder.handshake(io))
            .await?
            .map_err(http2::Error::from)?;
        Ok(batch
            .drive(http2::serve(connection, closing, handler))
            .await?)
    }
}

/// What an HTTP/2 connection's client may send.
struct Http2Limits {
    max_header_list_size: u32,
    /// h2's default (16 KiB) when `None`.
    max_frame_size: Option<u32>,
    max_concurrent_streams: u32,
}

/// An HTTP/1 connection's timeouts and drain, around hyper's connection
/// future.
struct Watchdog<'a> {
    server: &'a Server,
    activity: &'a Activity,
}

impl Watchdog<'_> {
    async fn drive<I, S>(
        &self,
        connection: hyper::server::conn::http1::UpgradeableConnection<I, S>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = Tracked>,
    {
        tokio::pin!(connection);
        // The drain and the timeouts, polled only when one of them is due
        // rather than on every wake-up of the connection (every frame).
        let events = when_woken(async {
            tokio::select! {
                biased;
                () = shutdown => Event::Drain,
                expired = self.activity.expired(self.server) => Event::Expired(expired),
            }
        });
        tokio::pin!(events);
        let mut closing = false;
        loop {
            // `biased`: the connection first, and no random number drawn
            // each time it wakes.
            let event = tokio::select! {
                biased;
                result = connection.as_mut() => return result.map_err(ServeError::Http),
                event = events.as_mut(), if !closing => event,
            };
            match event {
                // hyper would keep a connection that has not had a request
                // yet for one more request: close it now.
                Event::Drain if self.activity.is_idle() => return Ok(()),
                // The response in flight says `connection: close`.
                Event::Drain => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                Event::Expired(expired) => {
                    self.server
                        .metrics
                        .timed_out(self.server.direction, expired);
                    return match expired {
                        Timeout::HeaderRead => {
                            Err(ServeError::HeaderRead(self.server.header_read_timeout))
                        }
                        _ => Ok(()),
                    };
                }
            }
        }
    }
}

/// What the watchdog saw happen.
enum Event {
    Drain,
    Expired(Timeout),
}

/// What a connection is doing, for its watchdog: requests in flight, and
/// since when it has had none (or since when a request head is arriving).
///
/// Nothing wakes the watchdog when a request starts or ends (that would
/// be a wake-up of the connection per request): it sleeps until the first
/// moment a timeout could expire and looks again.
struct Activity {
    version: Version,
    in_flight: AtomicUsize,
    since: Mutex<Since>,
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
        }
    }

    fn update(&self, change: impl FnOnce(&mut Since)) {
        if let Ok(mut since) = self.since.lock() {
            change(&mut since);
        }
    }

    /// Bytes arrived. On an idle HTTP/1 connection they start the next
    /// request head. (On HTTP/2 PINGs and window updates also arrive: only
    /// streams count there.)
    fn on_read(&self) {
        if self.version != Version::Http1 || !self.is_idle() {
            return;
        }
        self.update(|since| {
            if !since.awaiting_head {
                *since = Since {
                    at: Instant::now(),
                    awaiting_head: true,
                }
            }
        });
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
    async fn expired(&self, server: &Server) -> Timeout {
        loop {
            let now = Instant::now();
            match self.next_look(server, now) {
                Look::Expired(timeout) => return timeout,
                Look::At(at) => tokio::time::sleep_until(at).await,
                Look::Never => std::future::pending().await,
            }
        }
    }

    /// When the watchdog must look again, given what it sees `now`.
    fn next_look(&self, server: &Server, now: Instant) -> Look {
        let header_read = server.header_read_timeout;
        // A head may start on an idle HTTP/1 connection at any moment; its
        // timeout then expires no sooner than one header-read timeout
        // from now. (Checked: a deadline past what Instant holds is none.)
        let mut next = match self.version {
            Version::Http1 => now.checked_add(header_read),
            Version::Http2 => None,
        };
        let mut look_by = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |next| next.min(at)));
            }
        };
        if !self.is_idle() {
            // The connection may go idle at any moment, and be idle too
            // long no sooner than one idle timeout from now.
            look_by(now.checked_add(server.idle_timeout));
        } else if let Ok(since) = self.since.lock().map(|since| *since) {
            let (after, timeout) = if since.awaiting_head {
                (header_read, Timeout::HeaderRead)
            } else {
                (server.idle_timeout, Timeout::Idle)
            };
            match since.at.checked_add(after) {
                Some(deadline) if deadline <= now => return Look::Expired(timeout),
                deadline => look_by(deadline),
            }
        }
        next.map_or(Look::Never, Look::At)
    }
}

/// What the watchdog does next.
enum Look {
    Expired(Timeout),
    At(Instant),
    Never,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{CONTROLLER, IDENTITY, TOKEN};
    use crate::metrics::{Metrics, Workload};

    const HEADER_READ: Duration = Duration::from_millis(300);
    /// Much longer than the header-read timeout: a head that starts on a
    /// kept-alive connection is timed from its start, not at the next
    /// idle deadline.
    const IDLE: Duration = Duration::from_millis(1_200);
    /// Longer than either timeout: a request this slow must not be cut.
    const SLOW: Duration = Duration::from_millis(1_400);

    /// A server with the default limits, and short timeouts.
    fn server() -> Server {
        let env: HashMap<&str, String> = [
            (CONTROLLER, "http://127.0.0.1:1"),
            (IDENTITY, "spiffe://cluster.local/ns/default/sa/test"),
            (TOKEN, "t"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        let config = Config::from_strings(&env).unwrap();
        let metrics = Metrics::new(Workload::default());
        let mut server = Server::new(&config, "inbound", metrics.listeners.clone());
        server.header_read_timeout = HEADER_READ;
        server.idle_timeout = IDLE;
        server
    }

    /// Serves one connection; `/slow` answers after [`SLOW`]. Returns the
    /// address and how serving ended.
    async fn serve_one(
        version: Version,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<(), ServeError>>) {
        let server = server();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let handler = |request: Request<Body>| async move {
                if request.uri().path() == "/slow" {
                    tokio::time::sleep(SLOW).await;
                }
                Response::new(Body::new(
                    Full::new(bytes::Bytes::from("ok")).map_err(Into::into),
                ))
            };
            let never = std::future::pending();
            server.serve(tcp, version, never, handler).await
        });
        (addr, served)
    }

    /// Reads until the server closes; how long that took.
    async fn until_closed(tcp: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0; 1024];
        while tcp.read(&mut buf).await.unwrap_or(0) > 0 {}
        started.elapsed()
    }

    #[tokio::test]
    async fn http1_head_after_a_request_is_timed_from_its_first_byte() {
        let (addr, served) = serve_one(Version::Http1).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut response = [0; 64];
        let n = tcp.read(&mut response).await.unwrap();
        assert!(
            response[..n].starts_with(b"HTTP/1.1 200"),
            "a request slower than both timeouts is answered: {:?}",
            String::from_utf8_lossy(&response[..n])
        );
        // Idle for a while, short of either timeout, then half a head.
        tokio::time::sleep(HEADER_READ / 2).await;
        tcp.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let after = until_closed(&mut tcp).await;
        assert!(
            after >= HEADER_READ - Duration::from_millis(50) && after < HEADER_READ * 2,
            "closed {after:?} after the head started (header-read timeout {HEADER_READ:?})"
        );
        assert!(matches!(
            served.await.unwrap(),
            Err(ServeError::HeaderRead(_))
        ));
    }

    #[tokio::test]
    async fn http2_connection_is_closed_once_idle_not_while_a_stream_is_open() {
        let (addr, served) = serve_one(Version::Http2).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = Request::get("http://a/slow").body(()).unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let response = response
            .await
            .expect("a stream slower than the idle timeout is answered");
        assert_eq!(response.status(), 200);
        let answered = Instant::now();
        // The server says GOAWAY once idle; the connection then ends.
        tokio::time::timeout(IDLE * 5, connection)
            .await
            .expect("the idle connection is closed")
            .unwrap()
            .unwrap();
        let after = answered.elapsed();
        assert!(
            after >= IDLE - Duration::from_millis(50),
            "closed {after:?} after the last stream"
        );
        served.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_mesh_connection_flooded_with_reset_streams_is_closed() {
        let server = server();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let handler = |_request| async { Response::new(crate::http::full("ok")) };
            let never = std::future::pending();
            server.serve_mesh(tcp, never, handler).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        // HEADERS then RST_STREAM, as fast as the client can.
        let mut sent = 0;
        for _ in 0..1_000 {
            match client.clone().ready().await {
                Ok(ready) => client = ready,
                Err(_) => break,
            }
            let request = Request::get("http://a/").body(()).unwrap();
            let Ok((_, mut stream)) = client.send_request(request, true) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            sent += 1;
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .expect("the flooding connection ends")
            .unwrap();
        let Err(error) = ended else {
            panic!("{sent} streams opened and reset, and the connection ended cleanly");
        };
        // The GOAWAY, or the closed socket when the client was still writing.
        assert!(error.is_go_away() || error.is_io(), "{error}");
        let served = served.await.unwrap();
        let reason = match &served {
            Err(ServeError::Http2(http2::Error::Protocol(error))) => error.reason(),
            _ => None,
        };
        assert_eq!(
            reason,
            Some(h2::Reason::ENHANCE_YOUR_CALM),
            "the server ended the connection for the flood: {served:?}"
        );
    }
}
