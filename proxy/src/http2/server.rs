//! The HTTP/2 server, on every listener ([`crate::server::Server`] sets
//! its limits and timeouts). The connection's task accepts streams and
//! spawns one task per stream, which runs the handler and sends its
//! response; nothing else sits between h2 and the handler.

use std::future::{poll_fn, Future};

use bytes::Bytes;
use h2::server::{Connection, SendResponse};
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{keepalive, send_body, set_content_length, Error, RecvBody};
use crate::http::{strip_hop_by_hop, Body, BoxError};
use crate::woken::when_woken;

/// Serves `connection` (its handshake done) until the client closes it, a
/// keep-alive PING goes unanswered, or `shutdown` resolved and the streams
/// in flight finished (GOAWAY tells the client to open no more).
pub async fn serve<T, F, Fut, B>(
    mut connection: Connection<T, Bytes>,
    shutdown: impl Future<Output = ()>,
    handler: F,
) -> Result<(), Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<Body>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
{
    // The drain and the PINGs are looked at only when they are due, not
    // on every wake-up of the connection (every frame).
    let shutdown = when_woken(shutdown);
    let dead = when_woken(keepalive(connection.ping_pong()));
    tokio::pin!(shutdown, dead);
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    tokio::spawn(answer(request, respond, handler.clone()));
                }
                Some(Err(error)) => return Err(error.into()),
                None => return Ok(()),
            },
            () = shutdown.as_mut(), if !closing => {
                connection.graceful_shutdown();
                closing = true;
            }
            dead = dead.as_mut() => return Err(dead),
        }
    }
}

/// One stream: the handler's response, then its body. A client that
/// resets the stream no longer wants the answer: the handler's work (and
/// the request it forwarded) is dropped.
async fn answer<F, Fut, B>(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: F,
) where
    F: Fn(Request<Body>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let (head, stream) = request.into_parts();
    let body = RecvBody::boxed(stream, &head.headers);
    // Held inline: a large handler future (routing, retries, the
    // application's connection) comes boxed, or it would make this task's
    // future as large, copied as the task is spawned and run.
    let response = tokio::select! {
        biased;
        response = handler(Request::from_parts(head, body)) => response,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (mut head, body) = response.into_parts();
    // h2 refuses to send connection-specific headers (RFC 9113 §8.2.2),
    // which a route's response header filter could have set.
    strip_hop_by_hop(&mut head.headers);
    let end_of_stream = body.is_end_stream();
    set_content_length(&mut head.headers, &body);
    // Fails only when the stream or the connection is already gone.
    let Ok(stream) = respond.send_response(Response::from_parts(head, ()), end_of_stream) else {
        return;
    };
    if !end_of_stream {
        send_body(body, stream).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{oneshot, Notify};

    use super::*;
    use crate::http::full;

    /// Serves one plaintext connection with `handler`; `shutdown` starts
    /// the drain. Returns the address and how serving ended.
    async fn serve_one<F, Fut>(
        handler: F,
        shutdown: oneshot::Receiver<()>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<(), Error>>,
    )
    where
        F: Fn(Request<Body>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let connection = h2::server::handshake(tcp).await?;
            let shutdown = async {
                let _ = shutdown.await;
            };
            serve(connection, shutdown, handler).await
        });
        (addr, served)
    }

    async fn client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        client.ready().await.unwrap()
    }

    #[tokio::test]
    async fn a_request_body_and_trailers_reach_the_handler_and_its_answer_has_a_length() {
        let handler = |request: Request<Body>| async move {
            let length = hyper::body::Body::size_hint(request.body()).exact();
            let collected = request.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().unwrap_or_default();
            let answer = format!(
                "{length:?} {} {:?}",
                String::from_utf8_lossy(&collected.to_bytes()),
                trailers.get("grpc-status")
            );
            Response::new(full(answer))
        };
        let (_drain, shutdown) = oneshot::channel();
        let (addr, _served) = serve_one(handler, shutdown).await;
        let mut client = client(addr).await;
        let request = Request::post("http://a/")
            .header("content-length", "5")
            .body(())
            .unwrap();
        let (response, mut stream) = client.send_request(request, false).unwrap();
        stream.send_data(Bytes::from("hello"), false).unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        stream.send_trailers(trailers).unwrap();
        let response = response.await.unwrap();
        let expected = "Some(5) hello Some(\"0\")";
        assert_eq!(
            response.headers()["content-length"],
            expected.len().to_string().as_str(),
            "a body of known size is sent with its length"
        );
        let mut body = response.into_body();
        let mut received = Vec::new();
        while let Some(data) = body.data().await {
            received.extend_from_slice(&data.unwrap());
        }
        assert_eq!(String::from_utf8_lossy(&received), expected);
    }

    #[tokio::test]
    async fn connection_specific_response_headers_are_not_sent() {
        let handler = |_request: Request<Body>| async {
            let mut response = Response::new(full("ok"));
            response
                .headers_mut()
                .insert(http::header::CONNECTION, "close".parse().unwrap());
            response
        };
        let (_drain, shutdown) = oneshot::channel();
        let (addr, _served) = serve_one(handler, shutdown).await;
        let mut client = client(addr).await;
        let (response, _) = client
            .send_request(Request::get("http://a/").body(()).unwrap(), true)
            .unwrap();
        let response = response.await.expect("answered, not reset");
        assert_eq!(response.status(), 200);
        assert!(!response.headers().contains_key(http::header::CONNECTION));
    }

    #[tokio::test]
    async fn a_stream_the_client_resets_drops_its_handler() {
        let (dropped, handler_gone) = oneshot::channel::<()>();
        let dropped = std::sync::Arc::new(std::sync::Mutex::new(Some(dropped)));
        let handler = move |_request: Request<Body>| {
            // Held by the handler's future until it is dropped.
            let guard = dropped.lock().unwrap().take();
            async move {
                let _guard = guard;
                std::future::pending::<Response<Body>>().await
            }
        };
        let (_drain, shutdown) = oneshot::channel();
        let (addr, _served) = serve_one(handler, shutdown).await;
        let mut client = client(addr).await;
        let (_response, mut stream) = client
            .send_request(Request::get("http://a/").body(()).unwrap(), true)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.send_reset(h2::Reason::CANCEL);
        tokio::time::timeout(Duration::from_secs(5), handler_gone)
            .await
            .expect("the handler of a reset stream is dropped")
            .expect_err("dropped, not completed");
    }

    #[tokio::test]
    async fn shutdown_lets_streams_in_flight_finish_and_refuses_new_ones() {
        let release = std::sync::Arc::new(Notify::new());
        let handler = {
            let release = release.clone();
            move |_request: Request<Body>| {
                let release = release.clone();
                async move {
                    release.notified().await;
                    Response::new(full("finished"))
                }
            }
        };
        let (drain, shutdown) = oneshot::channel();
        let (addr, served) = serve_one(handler, shutdown).await;
        let mut client = client(addr).await;
        let (in_flight, _) = client
            .send_request(Request::get("http://a/").body(()).unwrap(), true)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drain.send(()).unwrap();
        // h2's graceful GOAWAY takes a PING round trip to settle.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let another = async {
            let mut ready = client.clone().ready().await?;
            let (response, _) =
                ready.send_request(Request::get("http://a/").body(()).unwrap(), true)?;
            response.await.map(|_| ())
        };
        // Served, it would wait for the release like the first.
        let refused = tokio::time::timeout(Duration::from_secs(2), another)
            .await
            .expect("a stream opened after GOAWAY is refused, not served");
        assert!(refused.is_err(), "a stream opened after GOAWAY is refused");
        release.notify_one();
        let response = in_flight.await.expect("the stream in flight is answered");
        assert_eq!(response.status(), 200);
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection ends once its streams are done")
            .unwrap()
            .unwrap();
    }
}
