//! Protocol detection: from the first bytes a client sends, tell HTTP/1.1,
//! HTTP/2 (prior knowledge), TLS and anything else (opaque TCP) apart.
//!
//! A client of a server-speaks-first protocol (SMTP, MySQL…) sends nothing
//! until the server's banner: detection gives up after a short timeout and
//! treats the connection as opaque.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long to wait for the client's first bytes before calling it opaque.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Opaque,
}

/// Classifies the first bytes of a connection.
pub fn classify(first: &[u8]) -> Protocol {
    if first.first() == Some(&0x16) {
        return Protocol::Tls;
    }
    if first.starts_with(H2_PREFACE) {
        return Protocol::Http2;
    }
    // An HTTP/1 request line: a method token, a space, a target.
    let line_end = first
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(first.len());
    let line = &first[..line_end];
    let method_len = line.iter().take_while(|b| b.is_ascii_uppercase()).count();
    let is_http1 = method_len > 0
        && line.get(method_len) == Some(&b' ')
        && (line.windows(7).any(|w| w == b" HTTP/1") || line_end == first.len());
    if is_http1 && is_method(&line[..method_len]) {
        Protocol::Http1
    } else {
        Protocol::Opaque
    }
}

fn is_method(token: &[u8]) -> bool {
    matches!(
        token,
        b"GET"
            | b"HEAD"
            | b"POST"
            | b"PUT"
            | b"DELETE"
            | b"CONNECT"
            | b"OPTIONS"
            | b"TRACE"
            | b"PATCH"
    )
}

/// Peeks at `tcp` without consuming anything and classifies what it sees.
pub async fn detect(tcp: &TcpStream) -> Protocol {
    let mut buf = [0u8; SNIFF_BYTES];
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await;
        match peeked {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return classify(&buf[..seen]),
            Ok(Ok(n)) => {
                seen = n;
                if let Some(protocol) = decided(&buf[..n]) {
                    return protocol;
                }
                // More bytes may be on their way; peek returns what is there.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// How many first bytes detection looks at, at most.
const SNIFF_BYTES: usize = 64;

/// The protocol, once `first` says it; `None` while more bytes could change
/// the answer (part of the HTTP/2 preface, a few bytes that are no method).
fn decided(first: &[u8]) -> Option<Protocol> {
    let protocol = classify(first);
    // The H2 preface is 24 bytes; wait for it unless it already diverged.
    let maybe_h2 = first.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(first);
    let sure = !maybe_h2 && (protocol != Protocol::Opaque || first.len() >= 16);
    (sure || first.len() >= SNIFF_BYTES).then_some(protocol)
}

/// Detection for a stream that cannot be peeked (a CONNECT tunnel): reads
/// the first bytes, classifies them, and gives the stream back with them
/// in front, so nothing is lost.
pub async fn detect_read<I: AsyncRead + Unpin>(mut io: I) -> (Protocol, Rewind<I>) {
    let mut first = Vec::with_capacity(SNIFF_BYTES);
    let mut chunk = [0u8; SNIFF_BYTES];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let protocol = loop {
        let room = SNIFF_BYTES - first.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break classify(&first),
            Ok(Ok(n)) => {
                first.extend_from_slice(&chunk[..n]);
                if let Some(protocol) = decided(&first) {
                    break protocol;
                }
            }
        }
    };
    (protocol, Rewind { first, read: 0, io })
}

/// A stream with the bytes detection read put back in front.
pub struct Rewind<I> {
    first: Vec<u8>,
    read: usize,
    io: I,
}

impl<I> Rewind<I> {
    /// `io` with nothing read from it.
    pub fn new(io: I) -> Self {
        Self {
            first: Vec::new(),
            read: 0,
            io,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.first.len() {
            let rest = &this.first[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// For a client that dialled the proxy to speak HTTP: HTTP/2 when the
/// connection starts with the preface (prior knowledge), else HTTP/1. Waits
/// for as many bytes as that takes; the caller bounds the wait.
pub async fn http_version(tcp: &TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if !H2_PREFACE.starts_with(&buf[..n]) {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // More of the preface may be on its way; peek returns what is there.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_clients_send_first() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Protocol::Http1
        );
        assert_eq!(classify(b"POST /api HTTP/1.0\r\n"), Protocol::Http1);
        assert_eq!(classify(H2_PREFACE), Protocol::Http2);
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02]), Protocol::Tls);
        assert_eq!(classify(b"\x00\x00\x00\x01binary"), Protocol::Opaque);
        assert_eq!(classify(b"HELO example.org\r\n"), Protocol::Opaque);
        assert_eq!(
            classify(b"get / HTTP/1.1\r\n"),
            Protocol::Opaque,
            "methods are upper case"
        );
        assert_eq!(classify(b""), Protocol::Opaque);
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let started = std::time::Instant::now();
        assert_eq!(detect(&server).await, Protocol::Opaque);
        assert!(started.elapsed() >= DETECT_TIMEOUT);
    }

    #[tokio::test]
    async fn the_http_version_waits_for_the_first_bytes() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut h2 = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let sniffing = tokio::spawn(async move { http_version(&server).await.unwrap() });
        h2.write_all(&H2_PREFACE[..10]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sniffing.is_finished(), "a partial preface decides nothing");
        h2.write_all(&H2_PREFACE[10..]).await.unwrap();
        assert_eq!(sniffing.await.unwrap(), Protocol::Http2);
        let mut h1 = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        h1.write_all(b"G").await.unwrap();
        assert_eq!(http_version(&server).await.unwrap(), Protocol::Http1);
    }

    #[tokio::test]
    async fn reading_detection_gives_back_what_it_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let detecting = tokio::spawn(detect_read(server));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !detecting.is_finished(),
            "a partial preface decides nothing"
        );
        client.write_all(&H2_PREFACE[10..]).await.unwrap();
        client.write_all(b"SETTINGS").await.unwrap();
        let (protocol, mut rewound) = detecting.await.unwrap();
        assert_eq!(protocol, Protocol::Http2);
        drop(client);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, [H2_PREFACE, b"SETTINGS"].concat());
    }

    #[tokio::test]
    async fn detection_consumes_nothing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(detect(&server).await, Protocol::Http1);
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET");
    }
}
