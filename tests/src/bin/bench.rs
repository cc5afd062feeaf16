//! The mesh's cost, measured: the same small HTTP server and load in two
//! paths, interleaved round by round in one run:
//!   direct:  client → server
//!   trellis: client → sidecar → mTLS (TLS 1.3, HTTP/2) → sidecar → server
//! Fixed-rate (open-loop) load: a lane that falls behind counts latency from
//! each request's intended send time, so a stall is not hidden (no
//! coordinated omission). The two
//! sidecars run as separate processes, so their RSS and CPU are their own.
//!
//! cargo run --release -p trellis-tests --bin bench -- [--quick] [--output json]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use trellis_control_plane::demo::apps;
use trellis_tests::{pod_yaml, service_yaml, AppClient, Mesh};

const SERVICE: &str = "hello";

struct Options {
    quick: bool,
    json: bool,
    rounds: usize,
    seconds: u64,
    rates: Vec<u64>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Options {
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
            .unwrap_or(if quick { vec![500] } else { vec![1000, 5000] }),
    }
}

/// A sidecar in its own process: this binary re-executed as `internal-proxy`.
struct ProxyProcess {
    child: Child,
    outbound: SocketAddr,
    inbound: SocketAddr,
}

impl ProxyProcess {
    async fn start(mesh: &Mesh, ip: IpAddr, sa: &str) -> Self {
        use trellis_proxy::config::*;
        let identity = trellis_proto::SpiffeId::new(trellis_tests::TRUST_DOMAIN, "default", sa);
        let (outbound, inbound, admin) = (
            SocketAddr::new(ip, 4140),
            SocketAddr::new(ip, 4143),
            SocketAddr::new(ip, 4191),
        );
        let env: HashMap<&str, String> = HashMap::from([
            (CONTROLLER, format!("http://{}", mesh.controller_addr())),
            (IDENTITY, identity.to_string()),
            (TOKEN, mesh.tokens.token_for(&identity)),
            (OUTBOUND_LISTEN, outbound.to_string()),
            (INBOUND_LISTEN, inbound.to_string()),
            (ADMIN_LISTEN, admin.to_string()),
            (APP_IP, ip.to_string()),
            (WORKLOAD, sa.to_string()),
        ]);
        let child = Command::new(std::env::current_exe().expect("own path"))
            .arg("internal-proxy")
            .envs(env)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start proxy process");
        let client = AppClient::http1(admin);
        let deadline = Instant::now() + Duration::from_secs(20);
        while client
            .get(&admin.to_string(), "/ready")
            .await
            .map(|a| a.status.as_u16())
            != Ok(200)
        {
            assert!(Instant::now() < deadline, "proxy {sa} not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            outbound,
            inbound,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// RSS in KiB and CPU (user + system) in seconds of a process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (rss, (ticks(11) + ticks(12)) / 100.0)
}

#[derive(Clone, Copy)]
struct Latencies {
    p50: f64,
    p99: f64,
    p999: f64,
    ok: usize,
    failed: usize,
}

/// Open-loop load: `rate` requests/s for `seconds` over `lanes` keep-alive
/// connections; latency from each request's intended start.
async fn open_loop(
    target: SocketAddr,
    authority: &str,
    rate: u64,
    seconds: u64,
    lanes: usize,
) -> Latencies {
    let total = (rate * seconds) as usize;
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let client = AppClient::http1(target);
        let authority = authority.to_string();
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
                match client.get(&authority, "/").await {
                    Ok(a) if a.status.is_success() => out.push(from.elapsed()),
                    _ => failed += 1,
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

/// Closed-loop maximum: `connections` clients as fast as they can.
async fn max_throughput(
    target: SocketAddr,
    authority: &str,
    seconds: u64,
    connections: usize,
) -> f64 {
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, authority) = (AppClient::http1(target), authority.to_string());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                if client
                    .get(&authority, "/")
                    .await
                    .is_ok_and(|a| a.status.is_success())
                {
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn spread(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    format!("{lo:.3}–{hi:.3}")
}

async fn internal_proxy() {
    let config =
        trellis_proxy::Config::from_strings(&trellis_proxy::config::Env).expect("proxy config");
    let proxy = trellis_proxy::start(config).await.expect("proxy starts");
    // Exit when the bench (holding our stdin) goes away.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 16];
    tokio::select! {
        () = proxy.wait() => {}
        _ = async { while stdin.read(&mut buf).await.is_ok_and(|n| n > 0) {} } => {}
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("internal-proxy") {
        return internal_proxy().await;
    }
    let opts = options();
    let mut mesh = Mesh::start().await;
    let (client_ip, server_ip) = (mesh.pod_ip(), mesh.pod_ip());
    let listener = tokio::net::TcpListener::bind((server_ip, 0))
        .await
        .expect("bind server");
    let server = listener.local_addr().expect("server addr");
    tokio::spawn(apps::hello(listener, "v1".into(), "hello-v1".into()));
    let client_proxy = ProxyProcess::start(&mesh, client_ip, "bench-client").await;
    let server_proxy = ProxyProcess::start(&mesh, server_ip, SERVICE).await;
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
    let paths = [
        ("direct", server, server.to_string()),
        ("trellis", client_proxy.outbound, authority.clone()),
    ];
    let pids = [client_proxy.pid(), server_proxy.pid()];
    let rss = |pids: &[u32]| pids.iter().map(|p| usage(*p).0).max().unwrap_or(0);
    // Warm up both paths (connections, TLS, EWMA).
    for (_, target, auth) in &paths {
        open_loop(*target, auth, 200, 1, 8).await;
    }
    let idle_rss = rss(&pids);

    let mut results = serde_json::Map::new();
    let mut table = String::from("| path | rate | p50 ms | p99 ms | p99.9 ms | added p50 | added p99 | failed |\n|---|---|---|---|---|---|---|---|\n");
    let mut load_rss = 0;
    let mut cpu_per_1000 = Vec::new();
    for &rate in &opts.rates {
        let mut per_path: Vec<Vec<Latencies>> = vec![Vec::new(), Vec::new()];
        for _ in 0..opts.rounds {
            for (i, (_, target, auth)) in paths.iter().enumerate() {
                let cpu_before: f64 = pids.iter().map(|p| usage(*p).1).sum();
                let lat = open_loop(*target, auth, rate, opts.seconds, 64).await;
                if i == 1 {
                    let cpu: f64 = pids.iter().map(|p| usage(*p).1).sum::<f64>() - cpu_before;
                    // Per proxy, per 1,000 requests (two proxies on the path).
                    cpu_per_1000.push(cpu / 2.0 / (lat.ok.max(1) as f64 / 1000.0));
                    load_rss = load_rss.max(rss(&pids));
                }
                per_path[i].push(lat);
            }
        }
        let stat = |i: usize, f: fn(&Latencies) -> f64| median(per_path[i].iter().map(f).collect());
        for (i, (name, _, _)) in paths.iter().enumerate() {
            let (p50, p99, p999) = (stat(i, |l| l.p50), stat(i, |l| l.p99), stat(i, |l| l.p999));
            let added = |q: f64, d: f64| {
                if i == 1 {
                    format!("{:.3}", q - d)
                } else {
                    "-".into()
                }
            };
            let failed: usize = per_path[i].iter().map(|l| l.failed).sum();
            table.push_str(&format!(
                "| {name} | {rate} | {p50:.3} | {p99:.3} | {p999:.3} | {} | {} | {failed} |\n",
                added(p50, stat(0, |l| l.p50)),
                added(p99, stat(0, |l| l.p99)),
            ));
            results.insert(
                format!("{name}_{rate}"),
                json!({"p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "failed": failed,
                       "p50_spread_ms": spread(&per_path[i].iter().map(|l| l.p50).collect::<Vec<_>>())}),
            );
        }
    }
    let mut throughput = [Vec::new(), Vec::new()];
    for _ in 0..opts.rounds {
        for (i, (_, target, auth)) in paths.iter().enumerate() {
            throughput[i].push(max_throughput(*target, auth, opts.seconds, 32).await);
        }
    }
    let (direct_max, trellis_max) = (median(throughput[0].clone()), median(throughput[1].clone()));
    let cpu = median(cpu_per_1000);
    results.insert(
        "max_rps".into(),
        json!({"direct": direct_max, "trellis": trellis_max, "ratio": trellis_max / direct_max}),
    );
    results.insert(
        "proxy_rss_kib".into(),
        json!({"idle": idle_rss, "under_load": load_rss}),
    );
    results.insert("proxy_cpu_seconds_per_1000_requests".into(), json!(cpu));
    results.insert("config".into(), json!({"rounds": opts.rounds, "seconds": opts.seconds, "rates": opts.rates, "quick": opts.quick}));
    if opts.json {
        println!("{}", serde_json::Value::Object(results));
    } else {
        print!("{table}");
        println!("\nmax throughput (closed loop, 32 connections): direct {direct_max:.0} rps, trellis {trellis_max:.0} rps, ratio {:.3}", trellis_max / direct_max);
        println!(
            "proxy RSS: idle {} KiB, under load {} KiB (largest of the two)",
            idle_rss, load_rss
        );
        println!("proxy CPU: {cpu:.4} s per 1,000 requests per proxy");
        println!(
            "({} rounds of {} s, medians; open-loop latency from intended send time)",
            opts.rounds, opts.seconds
        );
    }
    drop(client_proxy);
    drop(server_proxy);
}
