//! Outbound connections: an application that dialled the proxy (explicit
//! proxy) speaks HTTP; one that iptables redirected is routed by where it
//! was going — a mesh Service's ClusterIP:port gets HTTP routing or an
//! opaque mTLS tunnel, anything else passes through untouched.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::endpoint::connect_tcp;
use super::target::Endpoints;
use super::{Outbound, CONNECT_ATTEMPTS};
use crate::detect::{self, Protocol};
use crate::drain::Watch;
use crate::errors::ProxyError;
use crate::outlier::Failure;
use crate::server::{Peer, Server, Version};
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
    /// authority, or by `authority` when the connection was redirected.
    async fn serve_http(
        self: Arc<Self>,
        tcp: Client,
        version: Version,
        authority: Option<String>,
        server: &Server,
        mut watch: Watch,
    ) {
        let authority: Option<Arc<str>> = authority.map(Into::into);
        let handler = move |request| {
            let (outbound, authority) = (self.clone(), authority.clone());
            async move { outbound.handle(request, authority.as_deref()).await }
        };
        if let Err(error) = server
            .serve(tcp, version, Peer::App, watch.draining(), handler)
            .await
        {
            tracing::debug!(%error, "outbound connection closed with an error");
        }
    }

    /// A connection iptables redirected: discovery says whether `dst` is a
    /// mesh Service; detection says whether it speaks HTTP. An opaque
    /// connection is a tunnel, which a drain lets run until its deadline.
    async fn serve_redirected(
        self: Arc<Self>,
        tcp: Client,
        dst: SocketAddr,
        server: &Server,
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
    async fn tunnel(&self, mut client: Client, endpoints: &Endpoints) -> Result<(), ProxyError> {
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
async fn passthrough(mut client: Client, dst: SocketAddr) -> Result<(), ProxyError> {
    let mut upstream = connect_tcp(dst).await?;
    copy(&mut client, &mut upstream, dst).await
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
