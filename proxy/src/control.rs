//! The gRPC channel to the controller, which discovery and identity share:
//! TLS that authenticates the controller (its chain against the trust
//! bundle given at start, its leaf naming the controller's SPIFFE ID), or
//! plaintext to a controller on loopback (local mode). The proxy presents
//! no certificate: its first one is what it asks for, and the token in the
//! request authenticates it.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};
use trellis_proto::SpiffeId;

use crate::config::{
    ControllerAddress, ControllerTls, TrustBundle, CONTROLLER_IDENTITY, CONTROLLER_TRUST,
    CONTROLLER_TRUST_PEM,
};
use crate::tls::{handshake, server_auth_client, TlsConfigs, TlsError};

/// How long connecting to the controller (TCP) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC runs over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// Why the controller could not be reached or was not trusted.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The URL is not one tonic accepts.
    #[error("invalid controller URL {0:?}")]
    Url(String),
    /// The trust bundle file cannot be read or used.
    #[error("{CONTROLLER_TRUST}={path:?}: {reason}; point it at the mesh's trust bundle (PEM)")]
    Trust { path: PathBuf, reason: String },
    /// The inline trust bundle cannot be used.
    #[error("{CONTROLLER_TRUST_PEM}: {reason}; set it to the mesh's trust bundle (PEM text)")]
    TrustPem { reason: String },
    /// The URL has no host or port to dial.
    #[error("the controller URL {0} has no host and port")]
    NoAuthority(Uri),
    /// TCP to the controller failed.
    #[error("cannot connect to the controller at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// The TLS handshake failed, most often because the controller's
    /// certificate does not chain to the bundle.
    #[error("TLS to the controller at {addr} failed: {source}; {CONTROLLER_TRUST} must hold the bundle of the CA that issued the controller's certificate")]
    Tls { addr: String, source: TlsError },
    /// The controller proved another identity than the one expected.
    #[error("the controller at {addr} is {actual}, not {expected}; if it runs under another namespace or service account, set {CONTROLLER_IDENTITY}")]
    WrongIdentity {
        addr: String,
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
}

/// A lazy channel to the controller: nothing is dialled until the first call.
/// Fails at once if the trust bundle cannot be used, so a bad mount is a
/// start error rather than a retry loop.
///
/// Besides the bundle it was given, a connection trusts the anchors the
/// proxy's current certificate came with (`certificates`): the bundle the
/// controller hands out, which holds a new root from its `add_root` on. So
/// a proxy whose bundle is fixed at start (`TRELLIS_CONTROLLER_TRUST_PEM`,
/// as injected) still trusts the controller after the root rotates.
pub fn channel(
    address: &ControllerAddress,
    certificates: watch::Receiver<Option<Arc<TlsConfigs>>>,
) -> Result<Channel, ControllerError> {
    let endpoint = Endpoint::from_shared(address.url.clone())
        .map_err(|_| ControllerError::Url(address.url.clone()))?
        .connect_timeout(CONNECT_TIMEOUT);
    Ok(match &address.tls {
        None => endpoint.connect_lazy(),
        Some(tls) => {
            client_config(&tls.trust_bundle, &[])?;
            endpoint.connect_with_connector_lazy(Connector {
                tls: Arc::new(tls.clone()),
                certificates,
            })
        }
    })
}

/// Reads a bundle file now, so a rotated one applies to the next connection.
fn client_config(
    bundle: &TrustBundle,
    learned: &[Vec<u8>],
) -> Result<Arc<rustls::ClientConfig>, ControllerError> {
    match bundle {
        TrustBundle::File(path) => {
            let trust = |reason: String| ControllerError::Trust {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| trust(e.to_string()))?;
            server_auth_client(&pem, learned, ALPN_H2).map_err(|e| trust(e.to_string()))
        }
        TrustBundle::Inline(pem) => {
            server_auth_client(pem.as_bytes(), learned, ALPN_H2).map_err(|e| {
                ControllerError::TrustPem {
                    reason: e.to_string(),
                }
            })
        }
    }
}

/// Dials the controller and opens TLS, for tonic.
#[derive(Clone)]
struct Connector {
    tls: Arc<ControllerTls>,
    certificates: watch::Receiver<Option<Arc<TlsConfigs>>>,
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, ControllerError>> + Send>>;

impl tonic::codegen::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ControllerError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let learned = self
            .certificates
            .borrow()
            .as_ref()
            .map(|c| c.trust_anchors_der.clone())
            .unwrap_or_default();
        Box::pin(async move {
            let result = connect(&tls, &learned, uri).await;
            if let Err(e) = &result {
                // tonic reports only "transport error"; the cause is here.
                tracing::warn!(error = %e, "cannot reach the controller");
            }
            result.map(TokioIo::new)
        })
    }
}

async fn connect(
    tls: &ControllerTls,
    learned: &[Vec<u8>],
    uri: Uri,
) -> Result<TlsStream<TcpStream>, ControllerError> {
    let authority = uri
        .authority()
        .ok_or_else(|| ControllerError::NoAuthority(uri.clone()))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(443);
    let addr = authority.to_string();
    let config = client_config(&tls.trust_bundle, learned)?;
    let tcp =
        TcpStream::connect((host, port))
            .await
            .map_err(|source| ControllerError::Connect {
                addr: addr.clone(),
                source,
            })?;
    let _ = tcp.set_nodelay(true);
    let (stream, actual) = handshake(config, tcp)
        .await
        .map_err(|source| ControllerError::Tls {
            addr: addr.clone(),
            source,
        })?;
    if actual != tls.identity {
        return Err(ControllerError::WrongIdentity {
            addr,
            expected: Box::new(tls.identity.clone()),
            actual: Box::new(actual),
        });
    }
    Ok(stream)
}
