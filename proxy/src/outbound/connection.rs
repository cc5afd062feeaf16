//! Outbound connections: an application that dialled the proxy (explicit
//! proxy) speaks HTTP, and may open a `CONNECT` tunnel; one that iptables
//! redirected is routed by where it was going — a mesh Service's
//! ClusterIP:port or a pod's IP:port gets HTTP routing or an opaque mTLS
//! tunnel, anything else passes through untouched. Inside a tunnel to a
//! mesh destination the same choice is made.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::endpoint::connect_tcp;
use super::target::Endpoints;
use super::{Outbound, Recent, CONNECT_ATTEMPTS};
use crate::detect::{self, Protocol};
use crate::drain::Watch;
use crate::errors::{respond, ProxyError};
use crate::http::{full, Body};
use crate::outlier::Failure;
use crate::server::{Server, Version};
use crate::socket::{self, Counted};
use crate::tls;

type Client = Counted<TcpStream>;

impl Outbound {
    /// Serves one accepted connection until it closes, policed by `server`;
    /// `watch` tells when the proxy drains.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, server: Arc<Server>, watch: Watch) {
        let _ = tcp.set_nodelay(true);
        let tcp = Counted::new(tcp, "outbound", self.metrics.clone());
        match socket::original_dst(tcp.get_ref()) {
            None => match server.sniff(tcp.get_ref()).await {
                Ok(version) => self.serve_http(tcp, version, None, &server, watch).await,
                Err(error) => tracing::debug!(%error, "outbound connection closed"),
            },
            Some(dst) => self.serve_redirected(tcp, dst, &server, watch).await,
        }
    }

    /// HTTP/1.1 or HTTP/2 (prior knowledge); each request is routed by its
    /// authority, or by `authority` when the connection was redirected or
    /// tunnelled. An explicit proxy's HTTP/1.1 client may turn the
    /// connection into a tunnel with `CONNECT`, which then runs here, under
    /// the connection's slot and drain.
    async fn serve_http<I>(
        self: Arc<Self>,
        io: I,
        version: Version,
        authority: Option<String>,
        server: &Arc<Server>,
        mut watch: Watch,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let explicit_h1 = authority.is_none() && version == Version::Http1;
        let authority: Option<Arc<str>> = authority.map(Into::into);
        let (tunnels, mut opened) = mpsc::channel::<Tunnel>(1);
        let recent = Arc::new(Recent::default());
        let handler = {
            let outbound = self.clone();
            move |request: Request<Body>| {
                let (outbound, authority, tunnels, recent) = (
                    outbound.clone(),
                    authority.clone(),
                    tunnels.clone(),
                    recent.clone(),
                );
                async move {
                    if explicit_h1 && request.method() == Method::CONNECT {
                        respond(outbound.connect(request, &tunnels).await, "outbound")
                    } else {
                        outbound
                            .handle(request, authority.as_deref(), &recent)
                            .await
                    }
                }
            }
        };
        if let Err(error) = server.serve(io, version, watch.draining(), handler).await {
            tracing::debug!(%error, "outbound connection closed with an error");
        }
        if let Ok(tunnel) = opened.try_recv() {
            Box::pin(self.serve_tunnel(tunnel, server, watch)).await;
        }
    }

    /// `CONNECT host:port`: agrees to a tunnel to a mesh destination (a
    /// Service by name or ClusterIP, or a pod), or to any other only when
    /// `TRELLIS_CONNECT_EGRESS` allows it; the connection becomes the
    /// tunnel once the 200 is sent.
    async fn connect(
        &self,
        mut request: Request<Body>,
        tunnels: &mpsc::Sender<Tunnel>,
    ) -> Result<Response<Body>, ProxyError> {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .ok_or(ProxyError::NoAuthority)?;
        let destination = match self.endpoints(&authority).await {
            Ok(endpoints) => Destination::Mesh(endpoints),
            Err(ProxyError::UnknownService(_)) if self.connect_egress => Destination::Egress,
            Err(ProxyError::UnknownService(_)) => {
                return Err(ProxyError::ConnectRefused(authority))
            }
            Err(e) => return Err(e),
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let _ = tunnels.try_send(Tunnel {
            upgrade,
            authority,
            destination,
        });
        Ok(Response::new(full("")))
    }

    /// Inside a mesh destination's tunnel, what the client sends is served
    /// as a redirected connection's would be: HTTP routed per request (with
    /// routes, retries and metrics), anything else an mTLS tunnel; outside
    /// the mesh, the bytes go to the destination as they are.
    async fn serve_tunnel(self: Arc<Self>, tunnel: Tunnel, server: &Arc<Server>, watch: Watch) {
        let Tunnel {
            upgrade,
            authority,
            destination,
        } = tunnel;
        let io = match upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => return tracing::debug!(%authority, %error, "CONNECT tunnel not opened"),
        };
        let failed =
            |error: ProxyError| tracing::info!(%authority, %error, "CONNECT tunnel failed");
        let endpoints = match destination {
            Destination::Egress => return egress(io, &authority).await.unwrap_or_else(failed),
            Destination::Mesh(endpoints) => endpoints,
        };
        let port = authority.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
        let (protocol, io) = match port {
            Some(port) if self.opaque_ports.contains(&port) => {
                (Protocol::Opaque, detect::Rewind::new(io))
            }
            _ => detect::detect_read(io).await,
        };
        let version = match protocol {
            Protocol::Http1 => Version::Http1,
            Protocol::Http2 => Version::Http2,
            _ => return self.tunnel(io, &endpoints).await.unwrap_or_else(failed),
        };
        self.serve_http(io, version, Some(authority.clone()), server, watch)
            .await;
    }

    /// A connection iptables redirected: discovery says whether `dst` is a
    /// mesh Service; detection says whether it speaks HTTP. An opaque
    /// connection is a tunnel, which a drain lets run until its deadline.
    async fn serve_redirected(
        self: Arc<Self>,
        tcp: Client,
        dst: SocketAddr,
        server: &Arc<Server>,
        watch: Watch,
    ) {
        let protocol = if self.opaque_ports.contains(&dst.port()) {
            Protocol::Opaque
        } else {
            match server.handshake(detect::detect(tcp.get_ref())).await {
                Ok(protocol) => protocol,
                Err(error) => return tracing::debug!(%dst, %error, "outbound connection closed"),
            }
        };
        let authority = dst.to_string();
        let endpoints = self
            .target(&authority)
            .endpoints(self.discovery_timeout)
            .await;
        let result = match (endpoints, protocol) {
            (Err(ProxyError::UnknownService(_)), _) => passthrough(tcp, dst).await,
            // HTTP gets its answer (a 503 saying why) from the request path.
            (_, Protocol::Http1) => {
                let version = Version::Http1;
                return self
                    .serve_http(tcp, version, Some(authority), server, watch)
                    .await;
            }
            (_, Protocol::Http2) => {
                let version = Version::Http2;
                return self
                    .serve_http(tcp, version, Some(authority), server, watch)
                    .await;
            }
            (Ok(endpoints), _) => self.tunnel(tcp, &endpoints).await,
            (Err(e), _) => Err(e),
        };
        if let Err(error) = result {
            tracing::info!(%dst, ?protocol, %error, "outbound connection failed");
        }
    }

    /// Opaque TCP (or the application's own TLS) to a mesh Service: to a
    /// meshed endpoint through an mTLS tunnel to its proxy, which learns the
    /// target port from the tunnel's first two bytes; to any other endpoint
    /// directly.
    async fn tunnel<I>(&self, mut client: I, endpoints: &Endpoints) -> Result<(), ProxyError>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let mut tried = Vec::new();
        let (endpoint, mut upstream) = loop {
            let endpoint = endpoints.pick(&tried)?;
            let Some(expected) = endpoint.identity() else {
                return passthrough(client, endpoint.key()).await;
            };
            let tls = self.identity.current().ok_or(ProxyError::NoIdentity)?;
            let attempt = endpoint.start();
            match endpoint.connect_tls(&tls, expected, tls::ALPN_OPAQUE).await {
                Ok(upstream) => {
                    attempt.succeeded();
                    break (endpoint, upstream);
                }
                // Nothing was sent yet: another endpoint can take it.
                Err(error) => {
                    self.count_tls_failure(&error);
                    self.failed(endpoints, attempt, Failure::Connect);
                    tried.push(endpoint.key());
                    if tried.len() >= CONNECT_ATTEMPTS {
                        return Err(error);
                    }
                }
            }
        };
        upstream
            .write_all(&endpoint.port().to_be_bytes())
            .await
            .map_err(|e| upstream_error(endpoint.key(), e))?;
        copy(&mut client, &mut upstream, endpoint.key()).await
    }
}

/// Forwards the connection unchanged to where the application sent it.
async fn passthrough<I>(mut client: I, dst: SocketAddr) -> Result<(), ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = connect_tcp(dst).await?;
    copy(&mut client, &mut upstream, dst).await
}

/// How long reaching a destination outside the mesh may take (its name
/// resolved, a connection made): farther away than any endpoint.
const EGRESS_TIMEOUT: Duration = Duration::from_secs(10);

/// A CONNECT tunnel to a destination outside the mesh, by name or address.
async fn egress<I>(mut client: I, authority: &str) -> Result<(), ProxyError>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let failed = |reason: String| ProxyError::Connect {
        endpoint: authority.to_string(),
        reason,
    };
    let mut upstream = tokio::time::timeout(EGRESS_TIMEOUT, TcpStream::connect(authority))
        .await
        .map_err(|_| failed(format!("no connection within {EGRESS_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    let peer = upstream.peer_addr().map_err(|e| failed(e.to_string()))?;
    copy(&mut client, &mut upstream, peer).await
}

/// A tunnel the explicit proxy agreed to, waiting for its connection.
struct Tunnel {
    upgrade: OnUpgrade,
    authority: String,
    destination: Destination,
}

enum Destination {
    Mesh(Arc<Endpoints>),
    Egress,
}

async fn copy<A, B>(a: &mut A, b: &mut B, peer: SocketAddr) -> Result<(), ProxyError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(a, b)
        .await
        .map(|_| ())
        .map_err(|e| upstream_error(peer, e))
}

fn upstream_error(peer: SocketAddr, e: std::io::Error) -> ProxyError {
    ProxyError::Upstream {
        endpoint: peer.to_string(),
        reason: e.to_string(),
    }
}
