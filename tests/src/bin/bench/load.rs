//! The load: what is sent on which path, the server that answers it, and
//! the two generators (fixed-rate latency, closed-loop maximum).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use trellis_tests::AppClient;

/// Request and response body of the HTTP/2 variant: a gRPC-sized message.
pub const MESSAGE_BYTES: usize = 1024;

/// Concurrent HTTP/2 connections: the lanes multiplex over a few
/// connections, as gRPC channels do, instead of one connection per lane.
const H2_CONNECTIONS: usize = 4;

/// Lanes of the fixed-rate load, each one request at a time.
pub const LANES: usize = 64;

/// Clients of the slow-clients row: each its own connection, each sending
/// one request a second, so the proxies hold many mostly idle connections.
pub const SLOW_CLIENTS: usize = 1000;

/// The shape of one fixed-rate row.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Load {
    /// `rate` requests/s over `LANES` lanes (HTTP/2: on a few connections).
    Steady(u64),
    /// `SLOW_CLIENTS` clients, one request/s each, one connection each.
    SlowClients,
}

impl Load {
    pub fn rate(self) -> u64 {
        match self {
            Load::Steady(rate) => rate,
            Load::SlowClients => SLOW_CLIENTS as u64,
        }
    }

    /// As in row names and JSON keys: `5000`, `1000c`.
    pub fn name(self) -> String {
        match self {
            Load::Steady(rate) => rate.to_string(),
            Load::SlowClients => format!("{SLOW_CLIENTS}c"),
        }
    }

    fn lanes(self) -> usize {
        match self {
            Load::Steady(_) => LANES,
            Load::SlowClients => SLOW_CLIENTS,
        }
    }

    fn connections(self, protocol: Protocol) -> usize {
        match self {
            Load::Steady(_) => protocol.connections(LANES),
            Load::SlowClients => SLOW_CLIENTS,
        }
    }
}

/// What the load generator speaks to the first hop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 keep-alive, `GET /`, a short answer.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), `POST` of 1 KiB, 1 KiB back.
    Http2,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Http1, Protocol::Http2];

    /// As in row names (`trellis h2`) and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http1 => "h1",
            Protocol::Http2 => "h2",
        }
    }

    pub fn client(self, target: SocketAddr) -> AppClient {
        match self {
            Protocol::Http1 => AppClient::http1(target),
            Protocol::Http2 => AppClient::http2(target),
        }
    }

    /// Connections for `lanes` lanes: one each for HTTP/1.1; for HTTP/2, a
    /// few that the lanes share.
    fn connections(self, lanes: usize) -> usize {
        match self {
            Protocol::Http1 => lanes,
            Protocol::Http2 => H2_CONNECTIONS.min(lanes),
        }
    }

    /// One request; whether a complete, successful answer came back.
    pub async fn call(self, client: &AppClient, authority: &str) -> bool {
        match self {
            Protocol::Http1 => client
                .get(authority, "/")
                .await
                .is_ok_and(|a| a.status.is_success()),
            Protocol::Http2 => client
                .request(
                    http::Method::POST,
                    authority,
                    "/bench.Echo/Call",
                    &[("content-type", "application/octet-stream")],
                    Bytes::from_static(&[b'x'; MESSAGE_BYTES]),
                )
                .await
                .is_ok_and(|a| a.status.is_success() && a.body.len() == MESSAGE_BYTES),
        }
    }
}

/// Where the load generator sends requests for one path.
pub struct Target {
    pub addr: SocketAddr,
    /// Host / `:authority` of every request.
    pub authority: String,
    pub protocol: Protocol,
}

/// The server behind every path, HTTP/1.1 and h2c on one port (hyper-util's
/// auto builder): reads the whole request, then answers `GET` with a short
/// text and `POST` with 1 KiB. (The demo's `hello` speaks both protocols
/// too, but answers every request with the same small JSON.)
pub async fn serve_app(listener: tokio::net::TcpListener) {
    trellis_common::serve::serve(
        listener,
        |request: http::Request<hyper::body::Incoming>| async move {
            let post = request.method() == http::Method::POST;
            let _ = request.into_body().collect().await;
            let body = if post {
                Bytes::from_static(&[b'y'; MESSAGE_BYTES])
            } else {
                Bytes::from_static(b"Hello from the bench server\n")
            };
            http::Response::new(Full::new(body))
        },
    )
    .await
}

#[derive(Clone, Copy)]
pub struct Latencies {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub ok: usize,
    pub failed: usize,
}

/// `lanes` clients for `target` over `connections` connections (HTTP/2
/// clients share theirs), each connection opened and used once: a row
/// measures requests, not connection set-up.
async fn connect(target: &Target, lanes: usize, connections: usize) -> Vec<AppClient> {
    let protocol = target.protocol;
    let pool: Vec<AppClient> = (0..connections)
        .map(|_| protocol.client(target.addr))
        .collect();
    let mut first = tokio::task::JoinSet::new();
    for client in pool.clone() {
        let authority = target.authority.clone();
        first.spawn(async move { protocol.call(&client, &authority).await });
    }
    while first.join_next().await.is_some() {}
    (0..lanes)
        .map(|lane| pool[lane % pool.len()].clone())
        .collect()
}

/// Open-loop load: `load.rate()` requests/s for `seconds` over its lanes
/// (each one request at a time); latency from each request's intended start.
pub async fn open_loop(target: &Target, load: Load, seconds: u64) -> Latencies {
    let (rate, lanes) = (load.rate(), load.lanes());
    let clients = connect(target, lanes, load.connections(target.protocol)).await;
    let total = (rate * seconds) as usize;
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let protocol = target.protocol;
    let mut tasks = Vec::new();
    for (lane, client) in clients.into_iter().enumerate() {
        let authority = target.authority.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut failed = 0;
            let mut i = lane;
            while i < total {
                let intended = start + interval * i as u32;
                // Behind schedule (the previous answer came late): count from
                // the intended time, so the stall shows. On time: count from
                // the actual send, so the timer's wake-up lag does not.
                let from = if Instant::now() > intended {
                    intended
                } else {
                    tokio::time::sleep_until(intended.into()).await;
                    Instant::now()
                };
                if protocol.call(&client, &authority).await {
                    out.push(from.elapsed());
                } else {
                    failed += 1;
                }
                i += lanes;
            }
            (out, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (lat, f) = task.await.unwrap_or_default();
        all.extend(lat);
        failed += f;
    }
    all.sort();
    let at = |q: f64| {
        all.get(((all.len().saturating_sub(1)) as f64 * q) as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Latencies {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
        ok: all.len(),
        failed,
    }
}

/// Closed-loop maximum: `workers` clients as fast as they can (over as many
/// HTTP/1.1 connections, or multiplexed on a few HTTP/2 connections).
pub async fn max_throughput(target: &Target, seconds: u64, workers: usize) -> f64 {
    let clients = connect(target, workers, target.protocol.connections(workers)).await;
    let end = Instant::now() + Duration::from_secs(seconds);
    let protocol = target.protocol;
    let mut tasks = Vec::new();
    for client in clients {
        let authority = target.authority.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if protocol.call(&client, &authority).await {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut n = 0;
    for task in tasks {
        n += task.await.unwrap_or(0);
    }
    n as f64 / seconds as f64
}
