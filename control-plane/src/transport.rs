//! Connections to the controller's gRPC port. One port serves TLS (with the
//! controller's serving certificate) and, in local mode only, plaintext
//! from loopback peers; the first byte tells them apart (a TLS record
//! starts with 0x16, HTTP/2's preface with `P`). Any other plaintext
//! connection is told why in an HTTP/2 GOAWAY, closed, logged and counted.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::ControllerMetrics;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// How long a client may take to send its first byte and finish TLS.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused client gets to read the GOAWAY before the socket closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Accepted connections waiting for the gRPC server.
const QUEUE: usize = 64;
/// HTTP/2 INADEQUATE_SECURITY (RFC 9113 §7): the error a client sees.
const INADEQUATE_SECURITY: u32 = 0xc;

/// Which plaintext connections are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plaintext {
    /// None: every client uses TLS (a cluster).
    Refused,
    /// From loopback peers only (local mode: the demo and tests on one host).
    Loopback,
}

/// A served connection: TLS, or plaintext from loopback.
pub enum Connection {
    Tls(Box<TlsStream<TcpStream>>),
    Plaintext(TcpStream),
}

impl Connection {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tls(tls) => tls.get_ref().0,
            Self::Plaintext(tcp) => tcp,
        }
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp().connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
            Self::Plaintext(tcp) => Pin::new(tcp).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
            Self::Plaintext(tcp) => Pin::new(tcp).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            Self::Plaintext(tcp) => Pin::new(tcp).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            Self::Plaintext(tcp) => Pin::new(tcp).poll_shutdown(cx),
        }
    }
}

/// Accepts on `listener` and hands out connections that passed: each is
/// classified and handshaken in a task of its own, so a slow client never
/// holds up the next. Dropping the stream stops accepting.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    plaintext: Plaintext,
    metrics: Arc<ControllerMetrics>,
) -> Incoming {
    let (tx, connections) = mpsc::channel(QUEUE);
    let gate = Arc::new(Gate {
        tls: TlsAcceptor::from(tls),
        plaintext,
        metrics,
    });
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause, don't spin.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Discovery pushes small messages that must not wait for a delayed ACK.
            let _ = tcp.set_nodelay(true);
            let (gate, tx) = (gate.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(connection) = gate.admit(tcp, peer).await {
                    let _ = tx.send(connection).await;
                }
            });
        }
    });
    Incoming {
        connections,
        accept,
    }
}

/// The connections [`incoming`] admitted, for `serve_with_incoming`.
pub struct Incoming {
    connections: mpsc::Receiver<Connection>,
    accept: JoinHandle<()>,
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

struct Gate {
    tls: TlsAcceptor,
    plaintext: Plaintext,
    metrics: Arc<ControllerMetrics>,
}

impl Gate {
    async fn admit(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Connection> {
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            // Closed, failed or silent before its first byte: nothing to serve.
            _ => return None,
        }
        if first[0] == TLS_HANDSHAKE {
            return match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
                Ok(Ok(tls)) => Some(Connection::Tls(Box::new(tls))),
                Ok(Err(e)) => {
                    self.refused("handshake");
                    // rustls reports a TLS failure (an alert: the client
                    // refused our certificate) as InvalidData; anything
                    // else is a client that went away mid-handshake.
                    if e.kind() == io::ErrorKind::InvalidData {
                        tracing::warn!(%peer, error = %e, "TLS handshake on the gRPC port failed; does the client trust the mesh's bundle?");
                    } else {
                        tracing::debug!(%peer, error = %e, "gRPC client left during the TLS handshake");
                    }
                    None
                }
                Err(_) => {
                    self.refused("handshake");
                    tracing::warn!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake on the gRPC port timed out");
                    None
                }
            };
        }
        if self.plaintext == Plaintext::Loopback && peer.ip().to_canonical().is_loopback() {
            return Some(Connection::Plaintext(tcp));
        }
        self.refused("plaintext");
        let allowed = match self.plaintext {
            Plaintext::Loopback => "only from loopback in local mode",
            Plaintext::Refused => "never in this mode",
        };
        tracing::warn!(%peer, "refused plaintext gRPC: it is accepted {allowed}; the client must use https:// with the mesh's trust bundle");
        let message = format!(
            "plaintext gRPC is accepted {allowed}; use https:// with the mesh's trust bundle"
        );
        refuse_plaintext(tcp, &message).await;
        None
    }

    fn refused(&self, reason: &str) {
        self.metrics
            .connections_refused
            .with_label_values(&[reason])
            .inc();
    }
}

/// Tells an HTTP/2 client why it is refused: an empty SETTINGS frame (the
/// server preface) and a GOAWAY with INADEQUATE_SECURITY and `message`,
/// then a FIN; what the client sends meanwhile is read and dropped, so the
/// close is not a reset that could overtake the GOAWAY.
async fn refuse_plaintext(mut tcp: TcpStream, message: &str) {
    let frame = |kind: u8, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, 0, 0, 0, 0, 0];
        frame.extend_from_slice(payload);
        frame
    };
    let mut goaway = vec![0, 0, 0, 0];
    goaway.extend_from_slice(&INADEQUATE_SECURITY.to_be_bytes());
    goaway.extend_from_slice(message.as_bytes());
    let mut bytes = frame(0x4, &[]);
    bytes.extend(frame(0x7, &goaway));
    let linger = async {
        tcp.write_all(&bytes).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}
