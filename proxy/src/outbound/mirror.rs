//! RequestMirror: a copy of a request goes to another backend Service,
//! fire and forget. The copy travels the normal endpoint path (balancer,
//! mTLS), its answer is discarded, and it never slows or fails the request
//! it copies: a request body is teed through a bounded buffer, and a copy
//! that falls behind is abandoned rather than waited for.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::sync::mpsc;
use trellis_proto::discovery::Mirror;

use super::{service_of, Outbound, Reached};
use crate::http::{boxed, Body, BoxError};

/// How far a copy may lag behind the request before it is abandoned, in
/// body frames and in bytes: a slow mirror costs at most this much memory
/// per request (a frame can be as large as a read, so both are bounded).
const MIRROR_LAG_FRAMES: usize = 16;
const MIRROR_LAG_BYTES: usize = 1024 * 1024;

impl Outbound {
    /// Starts the rule's mirrors that fire for this request (their share
    /// of requests), each with a copy of the head; returns the body to send
    /// on, which feeds the copies as it is read.
    pub(super) fn mirror(
        self: &Arc<Self>,
        mirrors: &[Mirror],
        head: &http::request::Parts,
        body: Body,
        patience: Duration,
    ) -> Body {
        let firing: Vec<&Mirror> = mirrors
            .iter()
            .filter(|m| m.backend.is_some() && crate::route::fires(m.percent))
            .collect();
        if firing.is_empty() {
            return body;
        }
        let bodiless = body.is_end_stream();
        let mut copies = Vec::new();
        for mirror in firing {
            let Some(backend) = &mirror.backend else {
                continue;
            };
            let mut copy = Request::new(crate::http::full(Bytes::new()));
            *copy.method_mut() = head.method.clone();
            *copy.uri_mut() = head.uri.clone();
            *copy.version_mut() = head.version;
            *copy.headers_mut() = head.headers.clone();
            let abandoned = Arc::new(AtomicBool::new(false));
            if !bodiless {
                let (tx, rx) = mpsc::channel(MIRROR_LAG_FRAMES);
                let lag = Arc::new(AtomicUsize::new(0));
                copies.push(Feed {
                    tx,
                    lag: lag.clone(),
                });
                *copy.body_mut() = boxed(CopiedBody {
                    rx,
                    lag,
                    abandoned: abandoned.clone(),
                    hint: body.size_hint(),
                });
            }
            tokio::spawn(self.clone().send_copy(
                backend.authority.clone(),
                copy,
                abandoned,
                patience,
            ));
        }
        if bodiless {
            body
        } else {
            boxed(Tee {
                inner: body,
                copies,
            })
        }
    }

    /// Sends one copy and counts how it ended; its answer is read to the
    /// end (so the connection can be reused) and dropped.
    async fn send_copy(
        self: Arc<Self>,
        authority: String,
        copy: Request<Body>,
        abandoned: Arc<AtomicBool>,
        patience: Duration,
    ) {
        let send = async {
            let endpoints = self.endpoints(&authority).await?;
            // Mirrors are not the client's requests: their own counter
            // records them, not the request metrics.
            let response = self
                .send_to(&endpoints, &authority, copy, &mut Reached::default())
                .await?;
            let _ = response.into_body().collect().await;
            Ok::<_, crate::errors::ProxyError>(())
        };
        let outcome = tokio::time::timeout(patience, send).await;
        let result = match outcome {
            _ if abandoned.load(Ordering::Relaxed) => "abandoned",
            Ok(Ok(())) => "answered",
            Ok(Err(e)) => {
                tracing::debug!(mirror = %authority, error = %e, "mirrored copy failed");
                "failed"
            }
            Err(_) => "failed",
        };
        let (service, namespace) = service_of(&authority);
        self.metrics.mirror(&service, &namespace, result);
    }
}

/// One frame of the request body for a copy, or its end.
enum Copied {
    Frame(Frame<Bytes>),
    End,
}

/// Where the tee feeds one copy its frames, and the bytes handed over
/// that the copy has not taken yet.
struct Feed {
    tx: mpsc::Sender<Copied>,
    lag: Arc<AtomicUsize>,
}

impl Feed {
    /// Hands `copied` over; false when the copy lags too far behind for it.
    fn offer(&self, copied: Copied) -> bool {
        let size = match &copied {
            Copied::Frame(frame) => frame.data_ref().map_or(0, Bytes::len),
            Copied::End => 0,
        };
        // Counted before the copy can take it (and count it off).
        let lag = self.lag.fetch_add(size, Ordering::Relaxed) + size;
        lag <= MIRROR_LAG_BYTES && self.tx.try_send(copied).is_ok()
    }
}

/// The request body on its way to the backend, handing each frame to the
/// copies without ever waiting for them.
struct Tee {
    inner: Body,
    copies: Vec<Feed>,
}

impl Tee {
    /// Offers `item` to every copy; one that lags too far behind is
    /// dropped (its body then fails, which abandons that copy).
    fn offer(&mut self, item: impl Fn() -> Option<Copied>) {
        self.copies.retain(|copy| match item() {
            Some(copied) => copy.offer(copied),
            None => false,
        });
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let data = frame.data_ref().cloned();
                let trailers = frame.trailers_ref().cloned();
                self.offer(|| match (&data, &trailers) {
                    (Some(data), _) => Some(Copied::Frame(Frame::data(data.clone()))),
                    (None, Some(trailers)) => {
                        Some(Copied::Frame(Frame::trailers(trailers.clone())))
                    }
                    (None, None) => None,
                });
                // Whoever reads a body that knows its length stops at its
                // last frame, without polling for the end.
                if self.inner.is_end_stream() {
                    self.offer(|| Some(Copied::End));
                    self.copies.clear();
                }
            }
            Poll::Ready(None) => {
                self.offer(|| Some(Copied::End));
                self.copies.clear();
            }
            // A broken request body breaks the copies too.
            Poll::Ready(Some(Err(_))) => self.copies.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A copy's body: the frames the tee handed over. Ending without the
/// tee's end marker means the copy was abandoned.
struct CopiedBody {
    rx: mpsc::Receiver<Copied>,
    lag: Arc<AtomicUsize>,
    abandoned: Arc<AtomicBool>,
    hint: SizeHint,
}

impl hyper::body::Body for CopiedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Copied::Frame(frame))) => {
                let size = frame.data_ref().map_or(0, Bytes::len);
                self.lag.fetch_sub(size, Ordering::Relaxed);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Copied::End)) => Poll::Ready(None),
            Poll::Ready(None) => {
                self.abandoned.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(
                    "mirror abandoned: it fell behind the request body".into(),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    /// A body of `n` frames that arrive as fast as they are read.
    fn frames(n: usize) -> Body {
        let chunks = (0..n).map(|i| Ok::<_, BoxError>(Frame::data(Bytes::from(format!("{i},")))));
        boxed(StreamBody::new(futures_util::stream::iter(chunks)))
    }

    fn tee(body: Body) -> (Tee, CopiedBody) {
        let (tx, rx) = mpsc::channel(MIRROR_LAG_FRAMES);
        let lag = Arc::new(AtomicUsize::new(0));
        let copied = CopiedBody {
            rx,
            lag: lag.clone(),
            abandoned: Arc::default(),
            hint: SizeHint::default(),
        };
        (
            Tee {
                inner: body,
                copies: vec![Feed { tx, lag }],
            },
            copied,
        )
    }

    #[tokio::test]
    async fn a_copy_that_keeps_up_gets_the_whole_body() {
        let (tee, copied) = tee(frames(5));
        let (sent, copy) = tokio::join!(BodyExt::collect(tee), async {
            BodyExt::collect(copied).await
        });
        let sent = sent.unwrap().to_bytes();
        assert_eq!(sent, "0,1,2,3,4,");
        assert_eq!(copy.unwrap().to_bytes(), sent);
    }

    #[tokio::test]
    async fn a_copy_ends_when_a_body_of_known_length_is_read_whole() {
        // Readers of such a body stop at its last frame (hyper does), so
        // the tee must not wait to be polled for the end.
        let (mut tee, copied) = tee(crate::http::full("whole"));
        let frame = std::future::poll_fn(|cx| Pin::new(&mut tee).poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "whole");
        assert!(tee.is_end_stream());
        assert_eq!(BodyExt::collect(copied).await.unwrap().to_bytes(), "whole");
    }

    #[tokio::test]
    async fn a_copy_that_falls_behind_is_abandoned_and_the_request_goes_on() {
        // The copy is never read while the request is: its buffer fills.
        let (tee, copied) = tee(frames(MIRROR_LAG_FRAMES * 4));
        let abandoned = copied.abandoned.clone();
        let sent = BodyExt::collect(tee).await.unwrap().to_bytes();
        assert_eq!(
            sent.iter().filter(|b| **b == b',').count(),
            MIRROR_LAG_FRAMES * 4
        );
        assert!(
            BodyExt::collect(copied).await.is_err(),
            "the copy must fail, not end short"
        );
        assert!(abandoned.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_copy_may_lag_only_so_many_bytes_however_few_frames() {
        // Two frames, but more bytes than a copy may hold back.
        let half = Bytes::from(vec![b'x'; MIRROR_LAG_BYTES / 2 + 1]);
        let chunks = [half.clone(), half].map(|b| Ok::<_, BoxError>(Frame::data(b)));
        let body = boxed(StreamBody::new(futures_util::stream::iter(chunks)));
        let (tee, copied) = tee(body);
        let abandoned = copied.abandoned.clone();
        let sent = BodyExt::collect(tee).await.unwrap().to_bytes();
        assert_eq!(sent.len(), MIRROR_LAG_BYTES + 2);
        assert!(BodyExt::collect(copied).await.is_err());
        assert!(abandoned.load(Ordering::Relaxed));
    }
}
