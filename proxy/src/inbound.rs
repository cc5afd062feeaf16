//! Inbound: mesh → application. Accepts mTLS from other proxies, learns the
//! target port in-band, and forwards to the local application in the HTTP
//! version it speaks, telling it the verified client identity.
//!
//! Who chooses the application port: a plaintext client (PERMISSIVE mode)
//! reaches only the port it dialled, the original destination iptables
//! redirected; its `trellis-dst-port` is ignored, and plaintext sent to the
//! inbound port itself (no original destination) is refused with 403, so no
//! outsider can reach a loopback-only port. A peer proxy proven by mTLS names
//! the port in-band.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::uri::Scheme;
use http::{HeaderValue, Request, Response, Uri, Version};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use trellis_proto::SpiffeId;

use crate::authz::{Access, Authz};
use crate::config::{Config, InboundMode};
use crate::detect::{self, Protocol};
use crate::drain::Watch;
use crate::errors::{respond_to, ProxyError};
use crate::http::{
    path_of, refuse_at_edge, strip_hop_by_hop, Body, CLIENT_ID, DST_PORT, ORIG_PROTO,
};
use crate::identity::IdentityManager;
use crate::listen::ThrottledByKind;
use crate::metrics::{Label, Metrics, RequestLabels};
use crate::server::{self, ServeError, Server};
use crate::socket::{self, Counted};
use crate::tls::{self, FailureReason};

mod app;
use app::{AppConnections, AppVersion};

/// An accepted connection, counted in the metrics.
type Accepted = Counted<TcpStream>;

/// How long connecting to the application may take, for HTTP and tunnels:
/// it is on the same host, so a connect that does not finish in this is a
/// full accept queue or a dead address, not a slow network.
pub const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// At most one "refused or failed" line per kind of refusal per this
/// period, with the count of the lines suppressed: a scan or a flood of
/// garbage must not flood the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// A client proven by mTLS, with what each of its requests needs made
/// once per connection: its metric labels (its service account stands for
/// its workload) and the header that names it to the application.
struct MeshClient {
    id: SpiffeId,
    workload: Label,
    namespace: Label,
    identity: Label,
    header: Option<HeaderValue>,
}

impl MeshClient {
    fn new(id: SpiffeId) -> Self {
        let identity = id.to_string();
        Self {
            workload: id.service_account.as_str().into(),
            namespace: id.namespace.as_str().into(),
            header: HeaderValue::from_str(&identity).ok(),
            identity: identity.into(),
            id,
        }
    }
}

/// Why an inbound connection was refused or ended early.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// STRICT mode and the client is outside the mesh (`port`: the
    /// application port it dialled, when iptables redirected it).
    #[error("{} refused: this workload's inbound mode is STRICT (mTLS from the mesh only)", match .0 { Some(port) => format!("connection to port {port}"), None => "plaintext".to_string() })]
    Strict(Option<u16>),
    /// This proxy's certificate expired and no new one came yet.
    #[error("no valid certificate to serve mTLS with")]
    NoCertificate,
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
    #[error("the client presented no certificate")]
    NoClientCertificate,
    #[error("the client certificate has no SPIFFE ID")]
    NoSpiffeId,
    #[error("unsupported ALPN protocol")]
    Alpn,
    /// The workload's authorization policy refuses the connection.
    #[error("connection to port {port} refused: {refused}")]
    Unauthorized {
        port: u16,
        refused: crate::authz::Refused,
    },
    #[error("reading the tunnel's target port: {0}")]
    TargetPort(#[source] std::io::Error),
    #[error("connecting to the application at {app}: {source}")]
    AppConnect {
        app: SocketAddr,
        source: std::io::Error,
    },
    /// The application did not accept the connection in time (its accept
    /// queue is full, or nothing answers at that address).
    #[error("connecting to the application at {app}: no answer within {after:?}; is the application overloaded or not listening on that port?")]
    AppConnectTimeout { app: SocketAddr, after: Duration },
    #[error("tunnel to the application at {app}: {source}")]
    Tunnel {
        app: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

impl InboundError {
    /// The kind of refusal, which the log is rate-limited by.
    fn kind(&self) -> &'static str {
        match self {
            InboundError::Strict(_) => "strict",
            InboundError::NoCertificate => "no_own_certificate",
            InboundError::Tls(e) => FailureReason::of_io(e).label(),
            InboundError::NoClientCertificate => FailureReason::NoCertificate.label(),
            InboundError::NoSpiffeId => FailureReason::BadCertificate.label(),
            InboundError::Alpn => FailureReason::Alpn.label(),
            InboundError::Unauthorized { .. } => "unauthorized",
            InboundError::TargetPort(_) => "target_port",
            InboundError::AppConnect { .. } | InboundError::AppConnectTimeout { .. } => {
                "app_connect"
            }
            InboundError::Tunnel { .. } => "tunnel",
            InboundError::Serve(ServeError::Handshake(_)) => FailureReason::Timeout.label(),
            InboundError::Serve(ServeError::HeaderRead(_)) => "header_read",
            InboundError::Serve(_) => "http",
        }
    }
}

/// The inbound side of one proxy.
pub struct Inbound {
    identity: Arc<IdentityManager>,
    metrics: Arc<Metrics>,
    mode: InboundMode,
    app_ip: IpAddr,
    /// Redirected plaintext to these ports is forwarded without detection.
    opaque_ports: Vec<u16>,
    /// Who may call which port: checked before the application sees a byte.
    authz: Arc<Authz>,
    app: Arc<AppConnections>,
    server: Server,
    /// Turns for TLS handshakes (`TRELLIS_MAX_TLS_HANDSHAKES`).
    handshakes: Semaphore,
    refusals: ThrottledByKind,
}

impl Inbound {
    /// Must be called on the proxy's runtime: it starts the task that
    /// closes idle connections to the application.
    pub fn new(
        identity: Arc<IdentityManager>,
        metrics: Arc<Metrics>,
        authz: Arc<Authz>,
        server: Server,
        config: &Config,
    ) -> Arc<Self> {
        // The application gets what the client's edge accepted (requests
        // within the limit); its responses are held to the same limit, so
        // every response fits the connection between sidecars.
        let app = Arc::new(AppConnections::new(config.app_ip, server.max_header_bytes));
        tokio::spawn(AppConnections::close_idle(Arc::downgrade(&app)));
        Arc::new(Self {
            identity,
            metrics,
            mode: config.inbound_mode,
            app_ip: config.app_ip,
            opaque_ports: config.opaque_ports.clone(),
            authz,
            app,
            server,
            handshakes: Semaphore::new(config.max_tls_handshakes),
            refusals: ThrottledByKind::every(REFUSAL_LOG_EVERY),
        })
    }

    /// Accepts connections until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, watch: Watch) {
        let metrics = self.metrics.listeners.clone();
        crate::listen::accept(
            listener,
            "inbound",
            Some(metrics),
            self.server.max_connections,
            watch,
            |tcp, peer, watch| {
                let inbound = self.clone();
                let tcp = Counted::new(tcp, "inbound", self.metrics.clone());
                async move {
                    if let Err(error) = inbound.clone().serve_connection(tcp, peer, watch).await {
                        inbound.log_refusal(peer, &error);
                    }
                }
            },
        )
        .await
    }

    fn log_refusal(&self, peer: SocketAddr, error: &InboundError) {
        let kind = error.kind();
        if let Some(suppressed) = self.refusals.allow(kind) {
            tracing::info!(%peer, %error, kind, suppressed, "inbound connection refused or failed");
        }
    }

    /// Peer proxies dial the inbound port itself; a connection iptables
    /// redirected from an application port comes from outside the mesh.
    async fn serve_connection(
        self: Arc<Self>,
        tcp: Accepted,
        peer: SocketAddr,
        mut watch: Watch,
    ) -> Result<(), InboundError> {
        let _ = tcp.get_ref().set_nodelay(true);
        let redirected = socket::original_dst(tcp.get_ref()).map(|dst| dst.port());
        if let Some(port) = redirected {
            return match self.mode {
                InboundMode::Strict => Err(InboundError::Strict(Some(port))),
                InboundMode::Permissive => self.serve_outside(tcp, port, watch).await,
            };
        }
        let protocol = self.server.handshake(detect::detect(tcp.get_ref())).await?;
        if protocol != Protocol::Tls {
            return match self.mode {
                InboundMode::Strict => Err(InboundError::Strict(None)),
                InboundMode::Permissive => self.serve_plaintext(tcp, protocol, None, watch).await,
            };
        }
        // Without a valid certificate this proxy cannot prove who it is:
        // refuse rather than serve an expired one.
        let tls = self.identity.current().ok_or(InboundError::NoCertificate)?;
        let acceptor = TlsAcceptor::from(tls.server.clone());
        // Waiting for a turn counts against the handshake timeout.
        let accepted = self
            .server
            .handshake(async {
                let _turn = self.handshakes.acquire().await;
                acceptor.accept(tcp).await
            })
            .await;
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.metrics
                    .tls_failure("inbound", FailureReason::of_io(&e));
                return Err(InboundError::Tls(e));
            }
            Err(timeout) => {
                self.metrics.tls_failure("inbound", FailureReason::Timeout);
                return Err(timeout.into());
            }
        };
        let (_, session) = stream.get_ref();
        // The connection must not outlive our certificate or the client's.
        let peer_not_after = session.peer_certificates().and_then(tls::chain_not_after);
        let expires = peer_not_after.map_or(tls.not_after, |p| p.min(tls.not_after));
        let client = session
            .peer_certificates()
            .ok_or(InboundError::NoClientCertificate)
            .and_then(|certs| tls::peer_identity(certs).map_err(|_| InboundError::NoSpiffeId));
        let client = match client {
            Ok(client) => client,
            Err(e) => return Err(self.tls_refused(e)),
        };
        match session.alpn_protocol() {
            Some(alpn) if alpn == tls::ALPN_H2 => {}
            Some(alpn) if alpn == tls::ALPN_OPAQUE => return self.tunnel(stream, &client).await,
            _ => return Err(self.tls_refused(InboundError::Alpn)),
        }
        tracing::debug!(%peer, %client, "inbound mTLS connection");
        let client = Arc::new(MeshClient::new(client));
        let until_expiry = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Finish what is in flight, then close: on a drain, or before a
        // certificate expires (the client reconnects with fresh ones).
        let shutdown = async {
            tokio::select! {
                () = watch.draining() => {}
                () = tokio::time::sleep(until_expiry) => {}
            }
        };
        let inbound = self.clone();
        let handler = move |request| {
            let (inbound, client) = (inbound.clone(), client.clone());
            async move { inbound.handle(request, Some(&client), None).await }
        };
        self.server.serve_mesh(stream, shutdown, handler).await?;
        Ok(())
    }

    /// Counts a handshake that succeeded but whose result is refused.
    fn tls_refused(&self, error: InboundError) -> InboundError {
        let reason = match error {
            InboundError::Alpn => FailureReason::Alpn,
            InboundError::NoClientCertificate => FailureReason::NoCertificate,
            _ => FailureReason::BadCertificate,
        };
        self.metrics.tls_failure("inbound", reason);
        error
    }

    /// An opaque TCP tunnel (ALPN `trellis/opaque`): the client's proxy
    /// sends the target port as two big-endian bytes, then the stream.
    async fn tunnel(
        &self,
        mut stream: tokio_rustls::server::TlsStream<Accepted>,
        client: &SpiffeId,
    ) -> Result<(), InboundError> {
        use tokio::io::AsyncReadExt;
        let mut port = [0u8; 2];
        self.server
            .handshake(stream.read_exact(&mut port))
            .await?
            .map_err(InboundError::TargetPort)?;
        let port = u16::from_be_bytes(port);
        tracing::debug!(%client, port, "opaque tunnel");
        self.authorize_connection(port, Some(client)).await?;
        self.forward_tcp(&mut stream, port).await
    }

    /// Copies a connection to the application's `port` until either closes
    /// (a drain lets it run until its deadline).
    async fn forward_tcp<S>(&self, stream: &mut S, port: u16) -> Result<(), InboundError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let app = SocketAddr::new(self.app_ip, port);
        let mut upstream = connect_app(app, APP_CONNECT_TIMEOUT).await?;
        tokio::io::copy_bidirectional(stream, &mut upstream)
            .await
            .map(|_| ())
            .map_err(|source| InboundError::Tunnel { app, source })
    }

    /// PERMISSIVE mode, a client outside the mesh that dialled the
    /// application's `port`: HTTP is served (and measured) per request,
    /// anything else forwarded as it is.
    async fn serve_outside(
        self: Arc<Self>,
        mut tcp: Accepted,
        port: u16,
        watch: Watch,
    ) -> Result<(), InboundError> {
        let protocol = if self.opaque_ports.contains(&port) {
            Protocol::Opaque
        } else {
            self.server.handshake(detect::detect(tcp.get_ref())).await?
        };
        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                self.serve_plaintext(tcp, protocol, Some(port), watch).await
            }
            Protocol::Tls | Protocol::Opaque => {
                self.authorize_connection(port, None).await?;
                self.forward_tcp(&mut tcp, port).await
            }
        }
    }

    /// A TCP connection to `port` is authorized once, at its start.
    async fn authorize_connection(
        &self,
        port: u16,
        client: Option<&SpiffeId>,
    ) -> Result<(), InboundError> {
        self.authz
            .check(port, client, Access::Connection)
            .await
            .map_err(|refused| InboundError::Unauthorized { port, refused })
    }

    /// PERMISSIVE mode's plaintext HTTP from a client outside the mesh, for
    /// the application's `port`, or the one the in-band header names.
    async fn serve_plaintext(
        self: Arc<Self>,
        tcp: Accepted,
        protocol: Protocol,
        original: Option<u16>,
        mut watch: Watch,
    ) -> Result<(), InboundError> {
        let version = match protocol {
            Protocol::Http2 => server::Version::Http2,
            _ => server::Version::Http1,
        };
        let inbound = self.clone();
        let handler = move |request| {
            let inbound = inbound.clone();
            async move { inbound.handle(request, None, original).await }
        };
        self.server
            .serve(tcp, version, watch.draining(), handler)
            .await?;
        Ok(())
    }

    async fn handle(
        &self,
        request: Request<Body>,
        client: Option<&MeshClient>,
        port: Option<u16>,
    ) -> Response<Body> {
        let started = Instant::now();
        let workload = &self.metrics.workload;
        let label =
            |field: fn(&MeshClient) -> &Label| client.map(field).cloned().unwrap_or_default();
        let labels = RequestLabels {
            direction: "inbound",
            src_workload: label(|c| &c.workload),
            src_namespace: label(|c| &c.namespace),
            dst_service: workload.name.clone(),
            dst_namespace: workload.namespace.clone(),
            dst_backend: workload.name.clone(),
            dst_version: workload.version.clone(),
            tls: client.is_some(),
            peer_identity: label(|c| &c.identity),
            ..RequestLabels::default()
        };
        let grpc = crate::grpc::is_grpc(request.headers());
        let response = respond_to(self.forward(request, client, port).await, "inbound", grpc);
        crate::grpc::record(&self.metrics, labels, started.elapsed(), response)
    }

    async fn forward(
        &self,
        request: Request<Body>,
        client: Option<&MeshClient>,
        port: Option<u16>,
    ) -> Result<Response<Body>, ProxyError> {
        refuse_at_edge(&request)?;
        let (mut parts, body) = request.into_parts();
        let in_band = parts
            .headers
            .remove(DST_PORT)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let port: u16 = match (port, client) {
            (Some(original), _) => original,
            (None, Some(_)) => in_band.ok_or(ProxyError::NoTarget)?,
            (None, None) => return Err(ProxyError::PlaintextTarget),
        };
        let access = Access::Http {
            method: &parts.method,
            path: parts.uri.path(),
        };
        self.authz
            .check(port, client.map(|c| &c.id), access)
            .await?;
        let http1 = match parts.headers.remove(ORIG_PROTO) {
            Some(proto) => proto.as_bytes() != b"HTTP/2",
            None => parts.version != Version::HTTP_2,
        };
        strip_hop_by_hop(&mut parts.headers);
        // Only this proxy may say who the client is (an insert replaces
        // every value the client sent).
        match client.and_then(|c| c.header.clone()) {
            Some(id) => parts.headers.insert(CLIENT_ID, id),
            None => parts.headers.remove(CLIENT_ID),
        };
        let path = path_of(&parts.uri);
        let version = if http1 {
            parts.version = Version::HTTP_11;
            // The application sees the Host its client asked for, and the
            // request target in origin form.
            if let Some(host) = parts.uri.authority() {
                if let Ok(host) = HeaderValue::from_str(host.as_str()) {
                    parts.headers.insert(http::header::HOST, host);
                }
            }
            parts.uri = Uri::from(path);
            AppVersion::Http1
        } else {
            parts.version = Version::HTTP_2;
            // HTTP/2 needs `:scheme`; `:authority` stays the client's.
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            uri.path_and_query = Some(path);
            if uri.authority.is_none() {
                uri.authority = SocketAddr::new(self.app_ip, port).to_string().parse().ok();
            }
            parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::NoTarget)?;
            AppVersion::Http2
        };
        let response = self
            .app
            .send(port, version, Request::from_parts(parts, body))
            .await
            .map_err(|e| ProxyError::Connect {
                endpoint: SocketAddr::new(self.app_ip, port).to_string(),
                reason: e.to_string(),
            })?;
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

/// Connects to the application, within `timeout`.
async fn connect_app(app: SocketAddr, timeout: Duration) -> Result<TcpStream, InboundError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(app))
        .await
        .map_err(|_| InboundError::AppConnectTimeout {
            app,
            after: timeout,
        })?
        .map_err(|source| InboundError::AppConnect { app, source })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connect_to_an_application_that_does_not_accept_is_bounded() {
        // A listener whose accept queue is full drops further SYNs (Linux),
        // as an overloaded application does: the connect would hang for
        // the kernel's SYN retries (over a minute).
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let app = socket.local_addr().unwrap().as_socket().unwrap();
        let mut queued = Vec::new();
        let after = Duration::from_millis(300);
        let started = Instant::now();
        let error = loop {
            match connect_app(app, after).await {
                Ok(tcp) => queued.push(tcp),
                Err(error) => break error,
            }
            assert!(queued.len() < 64, "the accept queue never filled");
        };
        assert!(
            matches!(error, InboundError::AppConnectTimeout { .. }),
            "{error}"
        );
        assert!(started.elapsed() < after * 3, "{:?}", started.elapsed());
        let text = error.to_string();
        assert!(
            text.contains(&app.to_string()) && text.contains("300ms"),
            "{text}"
        );
    }
}
