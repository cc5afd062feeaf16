//! Writes held until the connection's poll ends, so that a batch of frames
//! goes out at once.
//!
//! h2 hands every DATA frame of 256 bytes or more to the I/O on its own and
//! flushes before it queues the next frame, so a batch of 1 KiB responses
//! was a flush, a `writev` and (over TLS) a record per frame. HTTP/2
//! connections write through [`Coalesced`] instead, and are driven through
//! [`Batch::drive`]: while the connection is polled, its flushes only note
//! that bytes are held; when the poll ends, the driver writes what is held
//! (over TLS, as full-size records) and flushes. A batch of responses is
//! one write, and a lone response is written as the poll that made it
//! ends (after h2 has read the socket dry, not later).

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
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
/// outside the driver's poll, or for the poll's end.
pub struct Coalesced<T>(Arc<Mutex<Held<T>>>);

/// What the connection (through [`Coalesced`]) and its driver ([`Batch`])
/// share. Only the connection's own task touches it, one at a time: the
/// lock is never contended.
struct Held<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` is already written.
    written: usize,
    /// The driver is polling the connection: flushes are put off.
    polling: bool,
    /// Bytes went to `inner` since it was last flushed (a TLS stream may
    /// still hold them as records).
    unflushed: bool,
    /// What writing a batch at a poll's end failed with, for the
    /// connection's next use of its I/O (so h2 learns of it).
    failed: Option<io::Error>,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Self(Arc::new(Mutex::new(Held {
            inner,
            held: Vec::new(),
            written: 0,
            polling: false,
            unflushed: false,
            failed: None,
        })))
    }

    /// What drives the connection over this I/O.
    pub fn batch(&self) -> Batch<T> {
        Batch(self.0.clone())
    }

    fn held(&self) -> MutexGuard<'_, Held<T>> {
        lock(&self.0)
    }
}

/// Nothing panics while holding the lock but the connection's own I/O,
/// after which the connection is gone anyway.
fn lock<T>(held: &Mutex<Held<T>>) -> MutexGuard<'_, Held<T>> {
    held.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drives the future that writes to one [`Coalesced`] I/O.
pub struct Batch<T>(Arc<Mutex<Held<T>>>);

impl<T> Batch<T> {
    /// `future`, polled so that what it flushes during a poll is written
    /// once, when the poll ends.
    pub fn drive<F: Future>(self, future: F) -> Batched<F, T> {
        Batched {
            future,
            held: self.0,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Batch::drive`].
    pub struct Batched<F, T> {
        #[pin]
        future: F,
        held: Arc<Mutex<Held<T>>>,
    }
}

impl<F: Future, T: AsyncWrite + Unpin> Future for Batched<F, T> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        lock(this.held).polling = true;
        let poll = this.future.poll(cx);
        let mut held = lock(this.held);
        held.polling = false;
        if poll.is_ready() || !held.owes_a_flush() {
            return poll;
        }
        // The batch goes out now. A full socket wakes this task when it
        // has room, and the rest goes at the end of that poll.
        if let Poll::Ready(Err(error)) = held.poll_flush_held(cx) {
            // The connection is broken: what is held is dropped, and the
            // connection, polled again at once, learns why.
            held.held.clear();
            held.written = 0;
            held.unflushed = false;
            held.failed = Some(error);
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl<T: AsyncWrite + Unpin> Held<T> {
    /// Writes out everything held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            self.unflushed = true;
        }
        if self.held.capacity() > 0 {
            return_buffer(std::mem::take(&mut self.held));
        }
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes out everything held, then flushes the I/O (a TLS stream
    /// writes its records).
    fn poll_flush_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx))?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn owes_a_flush(&self) -> bool {
        self.unflushed || self.written < self.held.len()
    }

    /// A write too large to hold, straight to `inner`.
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, slices))?;
        self.unflushed = true;
        Poll::Ready(Ok(n))
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

impl<T> Held<T> {
    /// The error a batch's write failed with, once.
    fn take_failure(&mut self) -> io::Result<()> {
        self.failed.take().map_or(Ok(()), Err)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut held = self.held();
        held.take_failure()?;
        if !ready!(held.poll_room(cx, data.len()))? {
            return held.poll_write_through(cx, &[IoSlice::new(data)]);
        }
        held.held.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut held = self.held();
        held.take_failure()?;
        let len = slices.iter().map(|s| s.len()).sum();
        if !ready!(held.poll_room(cx, len))? {
            return held.poll_write_through(cx, slices);
        }
        for slice in slices {
            held.held.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }

    /// Slices are copied into one buffer, which is cheap: writers may hand
    /// over frames without joining them first.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = self.held();
        held.take_failure()?;
        if held.polling {
            // Written when the driver's poll ends.
            return Poll::Ready(Ok(()));
        }
        held.poll_flush_held(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut held = self.held();
        held.take_failure()?;
        ready!(held.poll_write_held(cx))?;
        Pin::new(&mut held.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut held = self.held();
        held.take_failure()?;
        Pin::new(&mut held.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
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

    /// A connection whose writes fail.
    struct Broken;

    impl AsyncWrite for Broken {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl<T> Coalesced<T> {
        fn inner<R>(&self, f: impl FnOnce(&T) -> R) -> R {
            f(&self.held().inner)
        }
    }

    #[tokio::test]
    async fn writes_until_a_flush_are_one_write_and_large_ones_go_straight_through() {
        let mut io = Coalesced::new(Counting::default());
        for frame in 0..10u8 {
            io.write_all(&[frame; 1033]).await.unwrap();
        }
        assert_eq!(
            io.inner(|c| c.writes),
            0,
            "nothing is written before a flush"
        );
        io.flush().await.unwrap();
        assert_eq!(io.inner(|c| c.writes), 1);
        assert_eq!(
            io.held().held.capacity(),
            0,
            "a flushed connection holds no buffer"
        );

        // More than the limit between flushes: written as the buffer fills.
        for frame in 0..40u8 {
            io.write_all(&[frame; 1033]).await.unwrap();
        }
        io.flush().await.unwrap();
        assert_eq!(io.inner(|c| c.writes), 1 + 3, "40 KiB in three writes");

        io.write_all(&[7; LIMIT + 1]).await.unwrap();
        assert_eq!(io.inner(|c| c.writes), 5, "a large write is not held");

        let expected: Vec<u8> = (0..10u8)
            .flat_map(|f| [f; 1033])
            .chain((0..40u8).flat_map(|f| [f; 1033]))
            .chain([7; LIMIT + 1])
            .collect();
        assert_eq!(
            io.inner(|c| c.bytes.clone()),
            expected,
            "every byte, in order"
        );
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
                assert_eq!(io.inner(|c| c.writes), 0, "flushes are put off");
                // The poll ends here, and the driver writes the batch.
                tokio::task::yield_now().await;
                assert_eq!(io.inner(|c| c.writes), 1, "eight frames, one write");
                assert_eq!(io.inner(|c| c.bytes.len()), 8 * 1033);
                io.flush().await.unwrap();
                tokio::task::yield_now().await;
                assert_eq!(io.inner(|c| c.writes), 1, "nothing more to write");
            })
            .await;
    }

    #[tokio::test]
    async fn a_batch_that_fails_to_go_out_fails_the_connections_next_use_of_its_io() {
        let mut io = Coalesced::new(Broken);
        let batch = io.batch();
        batch
            .drive(async move {
                io.write_all(b"frame").await.unwrap();
                io.flush().await.unwrap();
                tokio::task::yield_now().await;
                let error = io.flush().await.unwrap_err();
                assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
                assert!(
                    io.held().held.is_empty(),
                    "a broken connection holds nothing"
                );
            })
            .await;
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_socket_takes_goes_out_as_the_reader_makes_room() {
        let (client, mut server) = tokio::io::duplex(100);
        let mut io = Coalesced::new(client);
        let batch = io.batch();
        let connection = tokio::spawn(batch.drive(async move {
            for i in 0..2_000u32 {
                io.write_all(&i.to_be_bytes()).await.unwrap();
                io.flush().await.unwrap();
            }
            // As h2 does between batches: it waits for the peer's frames,
            // and only the driver writes what is held.
            let read = io.read(&mut [0; 1]).await.unwrap();
            assert_eq!(read, 0, "the reader closed");
        }));
        let mut received = vec![0; 8_000];
        let reading = server.read_exact(&mut received);
        tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("the held batch reaches the reader")
            .unwrap();
        drop(server);
        connection.await.unwrap();
        let expected: Vec<u8> = (0..2_000u32).flat_map(u32::to_be_bytes).collect();
        assert_eq!(received, expected);
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
