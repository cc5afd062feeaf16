//! Connections to the application: HTTP/1.1 ones kept for reuse, and per
//! port one HTTP/2 connection that every stream shares. Made directly, not
//! through a general-purpose pool: the address is always this pod's own,
//! so there is no name to resolve and no host to key by; a request costs a
//! look-up by port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::{connect_app, InboundError, APP_CONNECT_TIMEOUT};
use crate::http::{boxed, Body};
use crate::http2;

/// An HTTP/1.1 connection unused this long is closed: shorter than the
/// shortest keep-alive timeout common servers have (Node.js: 5 s), so the
/// proxy is not the one that finds a connection closed under a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// HTTP/1.1 connections kept per port, in use or idle; more are closed
/// once their response ends.
const MAX_KEPT_PER_PORT: usize = 256;

/// What the application speaks to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppVersion {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Connect(#[from] InboundError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Http2(#[from] h2::Error),
}

/// The application's connections, by port.
pub struct AppConnections {
    ip: IpAddr,
    /// The longest response head the application may send.
    max_header_bytes: u32,
    ports: Mutex<HashMap<u16, Port>>,
}

#[derive(Default)]
struct Port {
    /// Most recently used last; each with when it was kept.
    http1: Vec<(Instant, http1::SendRequest<Body>)>,
    http2: Option<Arc<http2::Connection>>,
}

impl AppConnections {
    pub fn new(ip: IpAddr, max_header_bytes: u32) -> Self {
        Self {
            ip,
            max_header_bytes,
            ports: Mutex::default(),
        }
    }

    /// Sends `request` to the application's `port`. A request that a kept
    /// connection could not take (the application closed it meanwhile) is
    /// sent again on a new one: none of it was written.
    pub async fn send(
        &self,
        port: u16,
        version: AppVersion,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, AppError> {
        loop {
            // Each failure with the request when none of it was sent.
            let (kept, sent) = match version {
                AppVersion::Http1 => {
                    let (kept, mut sender) = match self.kept_http1(port) {
                        Some(sender) => (true, sender),
                        None => (false, self.connect_http1(port).await?),
                    };
                    let sent = sender.try_send_request(request).await;
                    // Busy until its response body ends; taken again once ready.
                    self.keep_http1(port, sender);
                    let sent = sent
                        .map(|response| response.map(boxed))
                        .map_err(|mut e| (e.take_message(), AppError::from(e.into_error())));
                    (kept, sent)
                }
                AppVersion::Http2 => {
                    let (kept, connection) = match self.kept_http2(port) {
                        Some(connection) => (true, connection),
                        None => (false, self.connect_http2(port).await?),
                    };
                    let sent = connection.send(request).await;
                    (kept, sent.map_err(|e| (e.unsent, e.error.into())))
                }
            };
            match sent {
                Ok(response) => return Ok(response),
                Err((Some(unsent), _)) if kept => request = unsent,
                Err((_, error)) => return Err(error),
            }
        }
    }

    fn port<T>(&self, port: u16, f: impl FnOnce(&mut Port) -> T) -> T {
        let mut ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        f(ports.entry(port).or_default())
    }

    /// The most recently kept HTTP/1.1 connection that is ready (its last
    /// response has ended).
    fn kept_http1(&self, port: u16) -> Option<http1::SendRequest<Body>> {
        self.port(port, |p| {
            let ready = p.http1.iter().rposition(|(_, sender)| sender.is_ready())?;
            Some(p.http1.remove(ready).1)
        })
    }

    fn keep_http1(&self, port: u16, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        self.port(port, |p| {
            if p.http1.len() < MAX_KEPT_PER_PORT {
                p.http1.push((Instant::now(), sender));
            }
        });
    }

    fn kept_http2(&self, port: u16) -> Option<Arc<http2::Connection>> {
        self.port(port, |p| p.http2.clone().filter(|c| !c.is_closed()))
    }

    async fn connect_http1(&self, port: u16) -> Result<http1::SendRequest<Body>, AppError> {
        let tcp = connect_app(self.addr(port), APP_CONNECT_TIMEOUT).await?;
        let (sender, connection) = http1::Builder::new()
            .max_buf_size(self.max_header_bytes as usize)
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// A new HTTP/2 connection, kept for the next requests. (Two requests
    /// that find none at once both connect; the later one is kept, the
    /// other closes when its stream ends.)
    async fn connect_http2(&self, port: u16) -> Result<Arc<http2::Connection>, AppError> {
        let tcp = connect_app(self.addr(port), APP_CONNECT_TIMEOUT).await?;
        let settings = http2::Settings {
            max_header_list_size: self.max_header_bytes,
            max_frame_size: None,
            // The application is local: a dead one closes its sockets.
            keepalive: false,
        };
        let connection = http2::Connection::handshake(tcp, &settings, self.addr(port)).await?;
        let connection = Arc::new(connection);
        self.port(port, |p| p.http2 = Some(connection.clone()));
        Ok(connection)
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, port)
    }

    /// Closes the HTTP/1.1 connections idle too long, every `IDLE_TIMEOUT`,
    /// for as long as `connections` is alive.
    pub async fn close_idle(connections: Weak<Self>) {
        let mut every = tokio::time::interval(IDLE_TIMEOUT);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(connections) = connections.upgrade() else {
                return;
            };
            let now = Instant::now();
            let mut ports = connections.ports.lock().unwrap_or_else(|e| e.into_inner());
            ports.retain(|_, p| {
                // Ready is idle (a busy one's response is still streaming).
                let idle_too_long = |since: Instant, s: &http1::SendRequest<Body>| {
                    s.is_ready() && now - since > IDLE_TIMEOUT
                };
                p.http1
                    .retain(|(since, s)| !(s.is_closed() || idle_too_long(*since, s)));
                p.http2.take_if(|c| c.is_closed());
                p.http2.is_some() || !p.http1.is_empty()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioExecutor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use tokio::net::TcpListener;

    /// An application on loopback that counts its connections and, when
    /// `close_after` is set, closes each that long after its first answer
    /// (a server's keep-alive timeout).
    async fn application(close_after: Option<Duration>) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(
                            Empty::<bytes::Bytes>::new(),
                        ))
                    });
                    let serve = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .into_owned();
                    match close_after {
                        Some(after) => {
                            let _ = tokio::time::timeout(after, serve).await;
                        }
                        None => {
                            let _ = serve.await;
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    fn request(version: AppVersion) -> Request<Body> {
        let uri = match version {
            AppVersion::Http1 => "/",
            AppVersion::Http2 => "http://app.test/",
        };
        Request::get(uri)
            .body(crate::http::boxed(Empty::<bytes::Bytes>::new()))
            .unwrap()
    }

    async fn call(app: &AppConnections, port: u16, version: AppVersion) {
        let response = app.send(port, version, request(version)).await.unwrap();
        assert!(response.status().is_success());
        response.into_body().collect().await.unwrap();
    }

    #[tokio::test]
    async fn http1_connections_are_reused_one_request_at_a_time() {
        let (port, accepted) = application(None).await;
        let app = AppConnections::new(IpAddr::from([127, 0, 0, 1]), 65536);
        for _ in 0..5 {
            call(&app, port, AppVersion::Http1).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        // Concurrent requests each need a connection of their own.
        let app = &app;
        futures_util::future::join_all((0..3).map(|_| call(app, port, AppVersion::Http1))).await;
        assert!(accepted.load(Ordering::SeqCst) <= 3);
    }

    #[tokio::test]
    async fn concurrent_http2_requests_share_one_connection() {
        let (port, accepted) = application(None).await;
        let app = AppConnections::new(IpAddr::from([127, 0, 0, 1]), 65536);
        call(&app, port, AppVersion::Http2).await;
        let app = &app;
        futures_util::future::join_all((0..20).map(|_| call(app, port, AppVersion::Http2))).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_application_closed_is_replaced_without_a_failure() {
        for version in [AppVersion::Http1, AppVersion::Http2] {
            let (port, accepted) = application(Some(Duration::from_millis(50))).await;
            let app = AppConnections::new(IpAddr::from([127, 0, 0, 1]), 65536);
            call(&app, port, version).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            call(&app, port, version).await;
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{version:?}");
        }
    }

    #[tokio::test]
    async fn an_application_that_is_not_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let app = AppConnections::new(IpAddr::from([127, 0, 0, 1]), 65536);
        let error = app
            .send(port, AppVersion::Http1, request(AppVersion::Http1))
            .await
            .unwrap_err();
        assert!(
            matches!(error, AppError::Connect(InboundError::AppConnect { .. })),
            "{error}"
        );
    }
}
