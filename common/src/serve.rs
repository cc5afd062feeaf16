//! A small HTTP server (HTTP/1.1 and HTTP/2) for what is not the proxy's data
//! path: the controller's admin port and the demo's and tests' applications.
//! (The proxy's own listeners drain and count; they have their own loop.)

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `handler` on every connection `listener` accepts, until the task
/// is dropped.
pub async fn serve<F, Fut, B>(listener: TcpListener, handler: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut backoff = BACKOFF_START;
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => {
                backoff = BACKOFF_START;
                tcp
            }
            Err(error) => {
                // Out of file descriptors and the like: the connection stays
                // in the backlog, so the next accept would fail at once.
                tracing::warn!(%error, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        // Answers go out as soon as they are written, as servers do.
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(request).await) }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            // HTTP/2 heads as large as a sidecar lets through by default
            // (HTTP/1 allows ~400 KiB already), as most servers allow.
            builder.http2().max_header_list_size(2 * 65536);
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}
