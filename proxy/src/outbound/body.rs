//! Bodies in flight through the outbound side: a stream that sends no data
//! for the idle timeout fails (so a stalled upload or download cannot hold
//! a request for ever), and a request body says when it has been sent, which
//! is when the request timeout starts: an upload takes as long as it takes
//! while data flows. A request body that the client itself broke (a
//! malformed chunk, a connection cut mid-body) is recorded, so the failure
//! is the client's, not the destination's.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::errors::ProxyError;
use crate::http::{Body, BoxError};

/// A body that fails after `idle` without a frame.
pub struct Timed {
    inner: Body,
    what: &'static str,
    idle: Duration,
    /// Created when the body first waits, reset by every frame.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Told when the body has ended (or is dropped before it does).
    ended: Option<oneshot::Sender<()>>,
    /// Request bodies: where the client's own failure is recorded.
    client_failure: Option<ClientBodyFailure>,
}

/// Why the client's request body failed, once it has: carried in the
/// request's extensions so whoever sends it can tell a broken request from
/// a failing destination.
#[derive(Clone, Debug, Default)]
pub struct ClientBodyFailure(Arc<OnceLock<String>>);

impl ClientBodyFailure {
    pub fn reason(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    fn record(&self, error: &BoxError) {
        let _ = self.0.set(error.to_string());
    }
}

/// Resolves when a request body has been sent whole (at once for a
/// request without one).
pub struct Sent(Option<oneshot::Receiver<()>>);

impl Future for Sent {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            None => Poll::Ready(()),
            Some(rx) => Pin::new(rx).poll(cx).map(|_| ()),
        }
    }
}

impl Timed {
    /// A request body with its idle timeout, when it was sent, and where
    /// a failure of the client's own body is recorded (none without a body).
    pub fn request(inner: Body, idle: Duration) -> (Body, Sent, Option<ClientBodyFailure>) {
        if inner.is_end_stream() {
            return (inner, Sent(None), None);
        }
        let failure = ClientBodyFailure::default();
        let (tx, rx) = oneshot::channel();
        let body = Self {
            inner,
            what: "request",
            idle,
            sleep: None,
            ended: Some(tx),
            client_failure: Some(failure.clone()),
        };
        (Body::new(body), Sent(Some(rx)), Some(failure))
    }

    /// A response body with its idle timeout.
    pub fn response(inner: Body, idle: Duration) -> Body {
        if inner.is_end_stream() {
            return inner;
        }
        Body::new(Self {
            inner,
            what: "response",
            idle,
            sleep: None,
            ended: None,
            client_failure: None,
        })
    }

    fn end(&mut self) {
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
    }
}

impl hyper::body::Body for Timed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(sleep) = &mut this.sleep {
                    sleep.as_mut().reset(Instant::now() + this.idle);
                }
                if this.inner.is_end_stream() {
                    this.end();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => {
                if let (Some(Err(error)), Some(failure)) = (&other, &this.client_failure) {
                    failure.record(error);
                }
                this.end();
                Poll::Ready(other)
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.end();
                        let error = ProxyError::BodyIdle(this.what, idle);
                        Poll::Ready(Some(Err(error.into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use tokio_stream::StreamExt as _;

    fn streamed() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, BoxError>(Frame::data(b)));
        (tx, Body::new(StreamBody::new(stream)))
    }

    #[tokio::test]
    async fn a_body_that_keeps_sending_lives_and_says_when_it_was_sent() {
        let (tx, body) = streamed();
        let (mut body, mut sent, _) = Timed::request(body, Duration::from_millis(300));
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            frame.expect("data within the idle timeout is fine");
            frames += 1;
            let polled = futures_util::FutureExt::now_or_never(&mut sent);
            assert!(polled.is_none(), "not sent before the body ends");
        }
        assert_eq!(frames, 5, "more time in all than the idle timeout");
        tokio::time::timeout(Duration::from_millis(100), sent)
            .await
            .expect("sent once the body ended");
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_idle_timeout() {
        let (tx, body) = streamed();
        let mut body = Timed::response(body, Duration::from_millis(200));
        tx.send(Bytes::from_static(b"x")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.to_string().contains("no data for 200ms"), "{error}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(tx);
    }

    #[test]
    fn a_request_without_a_body_is_sent_at_once() {
        let (body, sent, failure) =
            Timed::request(crate::http::full(Bytes::new()), Duration::from_secs(1));
        assert!(body.is_end_stream());
        assert!(sent.0.is_none());
        assert!(failure.is_none(), "nothing of the client's can fail");
    }
}
