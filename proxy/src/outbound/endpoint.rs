//! One endpoint as the outbound side sees it: where to connect, whom to
//! expect there, its load and health (for the balancer and outlier
//! detection) and its HTTP/2 connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use trellis_proto::discovery::Endpoint;
use trellis_proto::SpiffeId;

use crate::balance::{InFlight, Load, Weighted};
use crate::errors::ProxyError;
use crate::http2;
use crate::metrics::Label;
use crate::outlier::{Failure, Health, Policy};
use crate::tls::{self, TlsConfigs};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The HTTP/2 between sidecars: responses as large as any sidecar lets
/// through (see there), and PINGs that find a dead peer, whose pooled
/// connection is then replaced.
const MESH_HTTP2: http2::Settings = http2::Settings {
    max_header_list_size: crate::server::MESH_HEADER_LIST_SIZE,
    max_frame_size: Some(crate::server::MESH_FRAME_SIZE),
    keepalive: true,
};

/// Cheap to clone: clones share load and connection.
#[derive(Clone)]
pub struct EndpointHandle(Arc<Inner>);

struct Inner {
    key: SocketAddr,
    endpoint: Endpoint,
    identity: Option<SpiffeId>,
    /// The metric labels of requests sent here, made once.
    version_label: Label,
    identity_label: Label,
    /// The target port as the peer's proxy reads it (`DST_PORT`), made once.
    port_header: HeaderValue,
    load: Arc<Load>,
    health: Arc<Health>,
    /// The multiplexed HTTP/2 connection to the endpoint's proxy.
    connection: Arc<Connection>,
}

#[derive(Default)]
struct Connection {
    open: ArcSwapOption<Open>,
    /// Held while connecting, so concurrent requests share one handshake.
    connecting: tokio::sync::Mutex<()>,
}

/// An HTTP/2 connection and when it must stop being used: when our
/// certificate or the peer's expires (renewal makes new connections; old
/// ones never outlive the certificates they were authenticated with).
pub struct Open {
    pub peer: http2::Connection,
    valid_until: SystemTime,
}

impl Open {
    fn usable(&self) -> bool {
        !self.peer.is_closed() && SystemTime::now() < self.valid_until
    }
}

impl EndpointHandle {
    pub fn new(endpoint: Endpoint) -> Self {
        Self::with(endpoint, Arc::default(), Arc::default(), Arc::default())
    }

    fn with(
        endpoint: Endpoint,
        load: Arc<Load>,
        health: Arc<Health>,
        connection: Arc<Connection>,
    ) -> Self {
        let ip: IpAddr = endpoint.ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let port = u16::try_from(endpoint.port).unwrap_or(0);
        let identity: Option<SpiffeId> = endpoint
            .identity
            .parse()
            .ok()
            .filter(|_| endpoint.proxy_port != 0);
        let version_label = endpoint
            .labels
            .get("version")
            .map_or_else(Label::default, |v| v.as_str().into());
        let identity_label = identity
            .as_ref()
            .map_or_else(Label::default, |id| id.to_string().into());
        Self(Arc::new(Inner {
            key: SocketAddr::new(ip, port),
            identity,
            version_label,
            identity_label,
            port_header: port.into(),
            endpoint,
            load,
            health,
            connection,
        }))
    }

    /// The same endpoint with new metadata (weight, labels), keeping its state.
    pub fn updated(&self, endpoint: Endpoint) -> Self {
        Self::with(
            endpoint,
            self.0.load.clone(),
            self.0.health.clone(),
            self.0.connection.clone(),
        )
    }

    /// Whether `endpoint` is reached the same way (same proxy, same identity),
    /// so the existing connection may be reused for it.
    pub fn same_peer(&self, endpoint: &Endpoint) -> bool {
        self.0.endpoint.identity == endpoint.identity
            && self.0.endpoint.proxy_port == endpoint.proxy_port
    }

    pub fn key(&self) -> SocketAddr {
        self.0.key
    }

    /// The `version` label of the endpoint's pod, for request metrics.
    pub fn version_label(&self) -> &Label {
        &self.0.version_label
    }

    /// The SPIFFE ID to expect there, as a label (empty: not meshed).
    pub fn identity_label(&self) -> &Label {
        &self.0.identity_label
    }

    pub fn port(&self) -> u16 {
        self.0.key.port()
    }

    /// [`Self::port`] as the header that tells the peer's proxy.
    pub fn port_header(&self) -> HeaderValue {
        self.0.port_header.clone()
    }

    /// Whether the balancer may send a request here now: not ejected, and
    /// under the circuit breaker's cap on requests in flight.
    pub fn usable(&self, policy: &Policy, now: Instant) -> bool {
        self.0.load.pending() < policy.max_requests as usize && self.0.health.available(now)
    }

    /// Marks a request as started on this endpoint, for the balancer and
    /// (after an ejection, as the probe) for outlier detection.
    pub fn start(&self) -> Attempt {
        self.0.health.start(Instant::now());
        Attempt {
            in_flight: Some(self.0.load.start()),
            health: self.0.health.clone(),
        }
    }

    pub fn health(&self) -> &Health {
        &self.0.health
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.0.endpoint
    }

    /// The SPIFFE ID to require of the peer; `None` when not meshed.
    pub fn identity(&self) -> Option<&SpiffeId> {
        self.0.identity.as_ref()
    }

    /// An open HTTP/2 connection to the endpoint's proxy, connecting (mTLS,
    /// peer identity checked) when there is none.
    pub async fn connection(
        &self,
        tls: &TlsConfigs,
        expected: &SpiffeId,
    ) -> Result<Arc<Open>, ProxyError> {
        if let Some(open) = self.0.connection.open.load_full().filter(|o| o.usable()) {
            return Ok(open);
        }
        let _connecting = self.0.connection.connecting.lock().await;
        if let Some(open) = self.0.connection.open.load_full().filter(|o| o.usable()) {
            return Ok(open);
        }
        // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is rare and its
        // future is large; unboxed, every request's future would carry it.
        let open = Arc::new(Box::pin(self.connect(tls, expected)).await?);
        self.0.connection.open.store(Some(open.clone()));
        Ok(open)
    }

    /// A new mTLS connection to the endpoint's proxy, speaking `alpn`.
    pub async fn connect_tls(
        &self,
        tls: &TlsConfigs,
        expected: &SpiffeId,
        alpn: &[u8],
    ) -> Result<TlsStream<TcpStream>, ProxyError> {
        let proxy_port = u16::try_from(self.0.endpoint.proxy_port).unwrap_or(0);
        let addr = SocketAddr::new(self.0.key.ip(), proxy_port);
        let tcp = connect_tcp(addr).await?;
        tls::connect(tls, tcp, expected, alpn)
            .await
            .map_err(|e| ProxyError::Tls {
                endpoint: addr.to_string(),
                reason: e.to_string(),
                cause: e.failure_reason(),
            })
    }

    async fn connect(&self, tls: &TlsConfigs, expected: &SpiffeId) -> Result<Open, ProxyError> {
        let stream = self.connect_tls(tls, expected, tls::ALPN_H2).await?;
        let addr = stream.get_ref().0.peer_addr().unwrap_or(self.0.key);
        let error = |reason: String| ProxyError::Connect {
            endpoint: self.key().to_string(),
            reason,
        };
        let peer_not_after =
            tls::chain_not_after(stream.get_ref().1.peer_certificates().unwrap_or_default());
        let valid_until = peer_not_after.map_or(tls.not_after, |p| p.min(tls.not_after));
        let peer = http2::Connection::handshake(stream, &MESH_HTTP2, addr)
            .await
            .map_err(|e| error(e.to_string()))?;
        tracing::debug!(peer = %addr, identity = %expected, "connected to peer proxy");
        Ok(Open { peer, valid_until })
    }
}

/// One request on one endpoint, until its outcome is known: a success or
/// a failure feeds the latency estimate and the endpoint's health; an
/// attempt dropped without one (a timeout, a client that went away) gives
/// up its probe turn, if it was the probe.
pub struct Attempt {
    in_flight: Option<InFlight>,
    health: Arc<Health>,
}

impl Attempt {
    /// Restarts the latency clock once connected: connecting is not the
    /// endpoint's response latency.
    pub fn connected(&mut self) {
        if let Some(in_flight) = &mut self.in_flight {
            in_flight.restart_clock();
        }
    }

    pub fn succeeded(mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.succeeded();
        }
        self.health.succeeded();
    }

    /// Records a failure; true when it ejected the endpoint (`may_eject`
    /// says whether its backend can spare one more).
    pub fn failed(mut self, failure: Failure, policy: &Policy, may_eject: bool) -> bool {
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.failed();
        }
        self.health
            .failed(failure, policy, Instant::now(), may_eject)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.in_flight.is_some() {
            self.health.abandoned(Instant::now());
        }
    }
}

impl Weighted for EndpointHandle {
    fn weight(&self) -> u32 {
        self.0.endpoint.weight
    }

    fn load(&self) -> &Load {
        &self.0.load
    }
}

/// A TCP connection with the proxy's connect timeout and no Nagle delay.
pub async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    let error = |reason: String| ProxyError::Connect {
        endpoint: addr.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| error(format!("no answer within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| error(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}
