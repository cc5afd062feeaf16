//! Accepted sockets: where a redirected connection was going, and how many
//! bytes it carried.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::Metrics;

/// The destination the client dialled before iptables redirected the
/// connection to us (`SO_ORIGINAL_DST`); `None` when it was not redirected
/// (the client dialled the proxy itself: explicit proxy, or a peer proxy).
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let socket = socket2::SockRef::from(tcp);
    // Each family has its own option (`IP6T_SO_ORIGINAL_DST` for ip6tables).
    let original = match local {
        SocketAddr::V4(_) => socket.original_dst_v4(),
        SocketAddr::V6(_) => socket.original_dst_v6(),
    };
    original
        .ok()
        .and_then(|a| a.as_socket())
        .filter(|dst| *dst != local)
}

/// A connection that counts its bytes and adds them to the proxy's metrics
/// when it closes: one metrics update per connection, none per read.
pub struct Counted<S> {
    inner: S,
    read: u64,
    written: u64,
    direction: &'static str,
    metrics: Arc<Metrics>,
}

impl<S> Counted<S> {
    /// Counts `inner`, an accepted connection of `direction`.
    pub fn new(inner: S, direction: &'static str, metrics: Arc<Metrics>) -> Self {
        metrics.connection_opened(direction);
        Self {
            inner,
            read: 0,
            written: 0,
            direction,
            metrics,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.metrics
            .connection_closed(self.direction, self.read, self.written);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        poll
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
