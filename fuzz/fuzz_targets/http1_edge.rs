//! The proxy's HTTP/1 edge: whatever bytes a client sends are parsed by the
//! proxy's server (its limits and timeouts) and each request head goes
//! through the checks every request meets before routing.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::Response;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_proxy::config::{Config, CONTROLLER, IDENTITY, TOKEN};
use trellis_proxy::errors::respond;
use trellis_proxy::http::{full, refuse_at_edge};
use trellis_proxy::metrics::{Metrics, Workload};
use trellis_proxy::outbound::authority_of;
use trellis_proxy::server::{Server, Version};

struct Edge {
    runtime: tokio::runtime::Runtime,
    server: Server,
}

fn edge() -> &'static Edge {
    static EDGE: OnceLock<Edge> = OnceLock::new();
    EDGE.get_or_init(|| {
        // Only the edge's own settings matter: its limits and timeouts are
        // the defaults a sidecar starts with.
        let env = HashMap::from([
            (
                IDENTITY,
                "spiffe://cluster.local/ns/fuzz/sa/edge".to_string(),
            ),
            (CONTROLLER, "http://127.0.0.1:1".to_string()),
            (TOKEN, "unused".to_string()),
        ]);
        let config = Config::from_strings(&env).expect("the default configuration");
        let metrics = Arc::new(Metrics::new(Workload {
            name: "edge".into(),
            namespace: "fuzz".into(),
            version: "".into(),
        }));
        Edge {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            server: Server::new(&config, "outbound", metrics.listeners.clone()),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let edge = edge();
    edge.runtime.block_on(async {
        let (mut client, proxy) = tokio::io::duplex(64 * 1024);
        let handler = |request: http::Request<trellis_proxy::http::Body>| async move {
            let checked = refuse_at_edge(&request).and_then(|()| authority_of(&request));
            // The body is read to its end, as forwarding would stream it.
            let (_, body) = request.into_parts();
            let _ = body.collect().await;
            respond(checked.map(|a| Response::new(full(a))), "outbound")
        };
        let serving = edge.server.serve(
            proxy,
            Version::Http1,
            std::future::pending(),
            handler,
        );
        let talking = async {
            let _ = client.write_all(input).await;
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let (_, answer) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(serving, talking)
        })
        .await
        .expect("a client that closed is answered and let go at once");
        // Whatever the proxy sends back is HTTP/1 responses (1.0 to 1.0).
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1."),
            "{answer:?}"
        );
    });
});
