//! Protocol detection: from the first bytes a client sends, tell HTTP/1.1,
//! HTTP/2 (prior knowledge), TLS and anything else (opaque TCP) apart.
//!
//! A client of a server-speaks-first protocol (SMTP, MySQL…) sends nothing
//! until the server's banner: detection gives up after a short timeout and
//! treats the connection as opaque.

use std::time::Duration;

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
    let mut buf = [0u8; 64];
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await;
        match peeked {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => {
                return if seen == 0 {
                    Protocol::Opaque
                } else {
                    classify(&buf[..seen])
                };
            }
            Ok(Ok(n)) => {
                seen = n;
                let protocol = classify(&buf[..n]);
                // The H2 preface is 24 bytes; wait for it unless it already diverged.
                let maybe_h2 = n < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf[..n]);
                if !maybe_h2 && (protocol != Protocol::Opaque || n >= 16) {
                    return protocol;
                }
                if n == buf.len() {
                    return protocol;
                }
                // More bytes may be on their way; peek returns what is there.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
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
