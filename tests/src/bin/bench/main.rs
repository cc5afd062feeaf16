//! The mesh's cost, measured: the same server and load over three paths,
//! interleaved round by round in one run (A B C A B C …):
//!   direct:  client → server
//!   trellis: client → sidecar → mTLS (TLS 1.3, HTTP/2) → sidecar → server
//!   peer:    client → HAProxy → mTLS (TLS 1.3, HTTP/2) → HAProxy → server
//! each once with HTTP/1.1 `GET`s and once with HTTP/2 (h2c) `POST`s of
//! 1 KiB answered with 1 KiB (gRPC-sized messages).
//! Fixed-rate (open-loop) load: a lane that falls behind counts latency from
//! each request's intended send time, so a stall is not hidden (no
//! coordinated omission). After the rates, a row of 1,000 slow clients (one
//! connection and one request a second each). The proxies run as separate processes, one thread
//! each, so their RSS and CPU are their own.
//!
//! cargo run --release -p trellis-tests --bin bench -- [--quick] [--output json]
//!     [--rounds N] [--seconds S] [--rates R1,R2] [--callgrind-dir DIR]
//!     [--proxy PATH] [--only PATHS] [--peer-hop http2|http1]
//! (`--callgrind-dir` keeps callgrind's dumps there, for `callgrind_annotate`;
//! `--proxy` runs that `trellis-proxy` binary as the sidecars, see
//! [`sidecar`]; `--only trellis-h2,peer-h2` measures just those paths, to
//! profile one of them with `perf record -p`; `--peer-hop http1` has the
//! HAProxy pair speak HTTP/1.1 between them for HTTP/1.1 clients, to
//! measure what that choice of hop costs.)

mod instructions;
mod load;
mod mesh_size;
mod peer;
mod report;
mod sidecar;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;
use load::{Latencies, Load, Protocol, Target};
use mesh_size::Memory;
use peer::Peer;
use serde_json::Value;
use sidecar::ProxyProcess;
use trellis_tests::{pod_yaml, service_yaml, AppClient, Mesh};

const SERVICE: &str = "hello";

/// Workers of the closed-loop maximum.
const WORKERS: usize = 32;

pub struct Options {
    quick: bool,
    json: bool,
    rounds: usize,
    seconds: u64,
    rates: Vec<u64>,
    callgrind_dir: Option<std::path::PathBuf>,
    /// The `trellis-proxy` binary the sidecars run, or none for this
    /// binary's own copy of the proxy.
    proxy: Option<std::path::PathBuf>,
    /// Path names (`trellis-h2`) to measure, or none for all.
    only: Option<Vec<String>>,
    /// What the HAProxy pair speaks between them for HTTP/1.1 clients.
    peer_hop: peer::Hop,
}

fn options() -> anyhow::Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Ok(Options {
        quick,
        json: value("--output").as_deref() == Some("json"),
        rounds: value("--rounds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 1 } else { 5 }),
        seconds: value("--seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if quick { 2 } else { 5 }),
        rates: value("--rates")
            .map(|v| v.split(',').filter_map(|r| r.parse().ok()).collect())
            .unwrap_or(if quick {
                vec![500]
            } else {
                vec![1000, 5000, 10_000]
            }),
        callgrind_dir: value("--callgrind-dir").map(Into::into),
        proxy: value("--proxy").map(Into::into),
        only: value("--only").map(|v| v.split(',').map(str::to_string).collect()),
        peer_hop: peer::Hop::parse(value("--peer-hop").as_deref().unwrap_or("http2"))?,
    })
}

/// What stands between the load generator and the server.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Trellis,
    Peer,
}

impl Via {
    pub const ALL: [Via; 3] = [Via::Direct, Via::Trellis, Via::Peer];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Trellis => "trellis",
            Via::Peer => "peer",
        }
    }
}

/// One row of the report: a way to the server, in one protocol.
pub struct Path {
    pub via: Via,
    pub target: Target,
    /// The proxy processes on the way (none for direct), for RSS and CPU.
    pub pids: Vec<u32>,
}

impl Path {
    /// `trellis`, `trellis h2`.
    pub fn name(&self) -> String {
        match self.target.protocol {
            Protocol::Http1 => self.via.name().to_string(),
            protocol => format!("{} {}", self.via.name(), protocol.name()),
        }
    }
}

/// Everything measured on one path.
#[derive(Default)]
pub struct Figures {
    /// Per load, one entry per round.
    pub latency: BTreeMap<Load, Vec<Latencies>>,
    /// Per load, one entry per round: proxy CPU seconds per 1,000 requests,
    /// per proxy.
    pub cpu_per_1000: BTreeMap<Load, Vec<f64>>,
    /// The largest proxy on the path: after warm-up, under the steady
    /// rates, and holding the slow clients' connections.
    pub idle: Memory,
    pub under_load: Memory,
    pub slow_clients: Memory,
    /// Closed-loop requests/s, per round.
    pub max_rps: Vec<f64>,
    /// At that maximum, CPU µs per request per proxy, per round.
    pub saturated_cpu_us: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some(sidecar::INTERNAL_PROXY) {
        return sidecar::internal_proxy();
    }
    // The slow clients' connections, on every process of the bench.
    trellis_tests::raise_fd_limit();
    tokio::runtime::Runtime::new()?.block_on(bench(options()?))
}

async fn bench(opts: Options) -> anyhow::Result<()> {
    if let Some(proxy) = &opts.proxy {
        sidecar::run_binary(proxy)?;
    }
    let mut mesh = Mesh::start().await;
    let (client_ip, server_ip) = (mesh.pod_ip(), mesh.pod_ip());
    let listener = tokio::net::TcpListener::bind((server_ip, 0))
        .await
        .context("binding the server")?;
    let server = listener.local_addr()?;
    tokio::spawn(load::serve_app(listener));

    let client_proxy = ProxyProcess::start(&mesh, client_ip, "bench-client").await?;
    let server_proxy = ProxyProcess::start(&mesh, server_ip, SERVICE).await?;
    mesh.write_manifest(
        "bench.yaml",
        &(pod_yaml("hello-v1", SERVICE, "v1", server_proxy.inbound.port())
            + "---\n"
            + &service_yaml(SERVICE, server.port(), &[("hello-v1", server_ip)])),
    );
    let authority = format!("{SERVICE}.default.svc.cluster.local:{}", server.port());
    AppClient::http1(client_proxy.outbound)
        .wait_routable(&authority)
        .await;
    let peer = start_peer(&mut mesh, server, opts.peer_hop).await?;

    let mut paths = Vec::new();
    for protocol in Protocol::ALL {
        let path = |via, addr, authority: &str, pids| Path {
            via,
            target: Target {
                addr,
                authority: authority.to_string(),
                protocol,
            },
            pids,
        };
        paths.push(path(Via::Direct, server, &server.to_string(), vec![]));
        paths.push(path(
            Via::Trellis,
            client_proxy.outbound,
            &authority,
            vec![client_proxy.pid(), server_proxy.pid()],
        ));
        if let Some(peer) = &peer {
            paths.push(path(
                Via::Peer,
                peer.entry(protocol),
                &authority,
                peer.pids(),
            ));
        }
    }
    if let Some(only) = &opts.only {
        paths.retain(|path| only.contains(&path.name().replace(' ', "-")));
        anyhow::ensure!(!paths.is_empty(), "--only {only:?} names no path");
    }
    let figures = measure(&paths, &opts).await;
    let instructions = match instructions::find_valgrind()? {
        Some(valgrind) => {
            let requests = if opts.quick { 200 } else { 2_000 };
            let dir = opts.callgrind_dir.as_deref();
            let counted = instructions::measure(&mut mesh, &valgrind, requests, dir).await;
            Some(counted.context("counting instructions per request")?)
        }
        None => None,
    };
    let added = if opts.quick { 1_000 } else { 10_000 };
    let mesh_size = mesh_size::measure(&mesh, client_proxy.pid(), added).await?;
    let peer_version = peer.as_ref().map(|p| p.version.as_str());
    if opts.json {
        let mut json = report::json(&paths, &figures, &opts, peer_version);
        json["mesh_size"] = mesh_size.json();
        json["instructions"] = instructions.as_ref().map_or(Value::Null, |i| i.json());
        println!("{json}");
    } else {
        print!(
            "{}\n{}{}",
            report::markdown(&paths, &figures, &opts, peer_version),
            mesh_size.markdown(),
            instructions
                .as_ref()
                .map_or(String::new(), |i| i.markdown()),
        );
    }
    Ok(())
}

/// The HAProxy pair on two fresh pod IPs, or `None` (said on stderr) when
/// HAProxy is not installed — except under `CI=true`, where the comparison
/// must not silently disappear.
async fn start_peer(
    mesh: &mut Mesh,
    app: SocketAddr,
    hop: peer::Hop,
) -> anyhow::Result<Option<Peer>> {
    let Some(haproxy) = peer::find_haproxy() else {
        anyhow::ensure!(
            std::env::var("CI").as_deref() != Ok("true"),
            "haproxy not found (PATH, /usr/sbin) and CI=true requires the peer path: \
             install the Debian package `haproxy`"
        );
        eprintln!(
            "haproxy not found (PATH, /usr/sbin): skipping the peer path; \
             install the Debian package `haproxy` to compare against it"
        );
        return Ok(None);
    };
    let (client_ip, server_ip) = (mesh.pod_ip(), mesh.pod_ip());
    let peer = Peer::start(&haproxy, client_ip, server_ip, app, hop)
        .await
        .context("starting the peer path (haproxy)")?;
    Ok(Some(peer))
}

/// Runs every path at every load, then the closed-loop maximum, each
/// interleaved round by round so machine noise hits all paths alike.
async fn measure(paths: &[Path], opts: &Options) -> Vec<Figures> {
    // Warm up every path (connections, TLS, EWMA) before measuring.
    for path in paths {
        load::open_loop(&path.target, Load::Steady(200), 1).await;
    }
    let mut figures: Vec<Figures> = paths
        .iter()
        .map(|path| Figures {
            idle: report::memory(&path.pids),
            ..Figures::default()
        })
        .collect();
    let loads = opts.rates.iter().map(|&rate| Load::Steady(rate));
    for load in loads.chain([Load::SlowClients]) {
        for _ in 0..opts.rounds {
            for (path, figures) in paths.iter().zip(&mut figures) {
                let cpu_before = report::cpu(&path.pids);
                let run = load::open_loop(&path.target, load, opts.seconds);
                let (lat, memory) = report::watch_memory(&path.pids, run).await;
                if !path.pids.is_empty() {
                    let cpu = report::cpu(&path.pids) - cpu_before;
                    let thousands = lat.ok.max(1) as f64 / 1000.0;
                    let per_proxy = cpu / path.pids.len() as f64 / thousands;
                    figures
                        .cpu_per_1000
                        .entry(load)
                        .or_default()
                        .push(per_proxy);
                    let peak = match load {
                        Load::Steady(_) => &mut figures.under_load,
                        Load::SlowClients => &mut figures.slow_clients,
                    };
                    *peak = peak.max(memory);
                }
                figures.latency.entry(load).or_default().push(lat);
            }
        }
    }
    for _ in 0..opts.rounds {
        for (path, figures) in paths.iter().zip(&mut figures) {
            let cpu_before = report::cpu(&path.pids);
            let rps = load::max_throughput(&path.target, opts.seconds, WORKERS).await;
            figures.max_rps.push(rps);
            if !path.pids.is_empty() {
                let cpu = report::cpu(&path.pids) - cpu_before;
                let requests = (rps * opts.seconds as f64).max(1.0);
                let per_proxy = cpu / path.pids.len() as f64 / requests;
                figures.saturated_cpu_us.push(per_proxy * 1e6);
            }
        }
    }
    figures
}
