//! Writes held until the connection's poll ends, so that a batch of frames
//! goes out at once.
//!
//! h2 hands every DATA frame of 256 bytes or more to the I/O on its own and
//! flushes before it queues the next frame, so a batch of 1 KiB responses
//! was a flush, a `writev` and (over TLS) a record per frame. HTTP/2
//! connections write through [`Coalesced`] instead, and are driven through
//! [`Batch::drive`]: while the connection is polled, the first flush writes
//! (a lone response is written at once, as before) and any later one only
//! notes that bytes are held; when the poll ends, the driver polls once
//! more with flushes let through, and h2's flush at the end of that poll
//! writes the rest of the batch at once (over TLS, as full-size records).
//! A batch of responses is two writes, not one per response.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// At most this much is held: a larger batch is written as it fills, and
/// one write this large goes straight through. One TLS record's worth.
const LIMIT: usize = 16 * 1024;

/// Written-out buffers kept per thread for the next batch. A connection
/// holds a buffer only from its first write to its flush, and connections
/// on one thread flush one after another, so a few serve them all.
const SPARES: usize = 4;

thread_local! {
    /// Empty buffers of [`LIMIT`] bytes: a batch neither allocates nor
    /// regrows its buffer, and an idle connection (of thousands) holds none.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn spare_buffer() -> Vec<u8> {
    SPARE
        .with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(LIMIT))
}

fn return_buffer(mut buffer: Vec<u8>) {
    buffer.clear();
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARES {
            spare.push(buffer);
        }
    });
}

/// An I/O whose writes wait in a buffer (at most [`LIMIT`]) for a flush
/// outside the driver's poll.
pub struct Coalesced<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` is already written.
    written: usize,
    gate: Arc<Gate>,
}

/// What a [`Coalesced`] I/O and the future that drives it share. Only the
/// connection's own task touches either, so `Relaxed` is enough.
#[derive(Default)]
struct Gate {
    /// The driver is polling: flushes after the first are put off.
    polling: AtomicBool,
    /// A flush wrote during this poll.
    flushed: AtomicBool,
    /// A flush was put off during this poll.
    put_off: AtomicBool,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            written: 0,
            gate: Arc::default(),
        }
    }

    /// What drives the connection over this I/O.
    pub fn batch(&self) -> Batch {
        Batch(self.gate.clone())
    }
}

/// Drives the future that writes to one [`Coalesced`] I/O.
pub struct Batch(Arc<Gate>);

impl Batch {
    /// `future`, polled so that what it flushes after its first flush in a
    /// poll is written once at the poll's end. Its writes must be followed
    /// by a flush in the same poll (h2 flushes at the end of every poll).
    pub fn drive<F: Future>(self, future: F) -> Batched<F> {
        Batched {
            future,
            gate: self.0,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Batch::drive`].
    pub struct Batched<F> {
        #[pin]
        future: F,
        gate: Arc<Gate>,
    }
}

impl<F: Future> Future for Batched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        this.gate.polling.store(true, Relaxed);
        this.gate.flushed.store(false, Relaxed);
        let poll = this.future.as_mut().poll(cx);
        this.gate.polling.store(false, Relaxed);
        if poll.is_ready() || !this.gate.put_off.swap(false, Relaxed) {
            return poll;
        }
        // Once more, flushes let through: the held batch is written now
        // (or waits for the socket, which then wakes this task).
        this.future.poll(cx)
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
        if self.held.capacity() > 0 {
            return_buffer(std::mem::take(&mut self.held));
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes; `false` when they are better
    /// written straight through.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.held.len() + len > LIMIT {
            ready!(self.poll_write_held(cx))?;
            if len >= LIMIT {
                return Poll::Ready(Ok(false));
            }
        }
        if self.held.capacity() == 0 {
            self.held = spare_buffer();
        }
        Poll::Ready(Ok(true))
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
        if this.gate.polling.load(Relaxed) && this.written < this.held.len() {
            // The first flush of a poll writes: most polls have one.
            if this.gate.flushed.swap(true, Relaxed) {
                this.gate.put_off.store(true, Relaxed);
                return Poll::Ready(Ok(()));
            }
        }
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
        assert_eq!(
            io.held.capacity(),
            0,
            "a flushed connection holds no buffer"
        );

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
    async fn flushes_during_a_driven_poll_are_one_write_when_it_ends() {
        let mut io = Coalesced::new(Counting::default());
        let batch = io.batch();
        batch
            .drive(async move {
                // As h2 writes DATA frames: each one flushed before the next.
                for frame in 0..8u8 {
                    io.write_all(&[frame; 1033]).await.unwrap();
                    io.flush().await.unwrap();
                }
                assert_eq!(io.inner.writes, 1, "flushes after the first are put off");
                // The poll ends here; the driver's second poll lets the
                // flush at its end through.
                tokio::task::yield_now().await;
                io.flush().await.unwrap();
                assert_eq!(io.inner.writes, 2, "eight frames, two writes");
                assert_eq!(io.inner.bytes.len(), 8 * 1033);
            })
            .await;
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
