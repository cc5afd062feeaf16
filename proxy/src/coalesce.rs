//! Writes held until the writer flushes, so that one flush is one write.
//!
//! h2 hands every DATA frame of 256 bytes or more to the I/O on its own, so
//! a batch of small responses became a `writev` per frame and, over TLS, a
//! record per frame. HTTP/2 connections write through [`Coalesced`]
//! instead: h2 flushes after each batch, and the batch goes out as one write
//! (over TLS, as full-size records).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// At most this much is held: a larger batch is written as it fills, and
/// one write this large goes straight through. One TLS record's worth.
const LIMIT: usize = 16 * 1024;

/// A buffer grown past this is freed once written out: a mostly idle
/// connection (of thousands) holds little, while the usual batch of a few
/// small frames reuses its buffer.
const KEEP: usize = 4 * 1024;

/// An I/O whose writes wait in a buffer (at most [`LIMIT`]) for a flush.
pub struct Coalesced<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` is already written.
    written: usize,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            written: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesced<T> {
    /// Writes out everything held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.held.capacity() > KEEP {
            self.held = Vec::new();
        } else {
            self.held.clear();
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes; `false` when they are better
    /// written straight through.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.held.len() + len <= LIMIT {
            return Poll::Ready(Ok(true));
        }
        ready!(self.poll_write_held(cx))?;
        Poll::Ready(Ok(len < LIMIT))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !ready!(this.poll_room(cx, data.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.held.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = slices.iter().map(|s| s.len()).sum();
        if !ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, slices);
        }
        for slice in slices {
            this.held.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }

    /// Slices are copied into one buffer, which is cheap: writers may hand
    /// over frames without joining them first.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A writer that counts the writes that reach it.
    #[derive(Default)]
    struct Counting {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.bytes.extend_from_slice(data);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_until_a_flush_are_one_write_and_large_ones_go_straight_through() {
        let mut io = Coalesced::new(Counting::default());
        for frame in 0..10u8 {
            io.write_all(&[frame; 1033]).await.unwrap();
        }
        assert_eq!(io.inner.writes, 0, "nothing is written before a flush");
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, 1);

        // More than the limit between flushes: written as the buffer fills.
        for frame in 0..40u8 {
            io.write_all(&[frame; 1033]).await.unwrap();
        }
        io.flush().await.unwrap();
        assert_eq!(io.inner.writes, 1 + 3, "40 KiB in three writes");

        io.write_all(&[7; LIMIT + 1]).await.unwrap();
        assert_eq!(io.inner.writes, 5, "a large write is not held");

        let expected: Vec<u8> = (0..10u8)
            .flat_map(|f| [f; 1033])
            .chain((0..40u8).flat_map(|f| [f; 1033]))
            .chain([7; LIMIT + 1])
            .collect();
        assert_eq!(io.inner.bytes, expected, "every byte, in order");
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (client, mut server) = tokio::io::duplex(100);
        let mut io = Coalesced::new(client);
        let writer = tokio::spawn(async move {
            for i in 0..5_000u32 {
                io.write_all(&i.to_be_bytes()).await.unwrap();
                if i % 7 == 0 {
                    io.flush().await.unwrap();
                }
            }
            io.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        let expected: Vec<u8> = (0..5_000u32).flat_map(u32::to_be_bytes).collect();
        assert_eq!(received, expected);
    }
}
