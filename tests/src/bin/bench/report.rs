//! From measurements to figures (medians over rounds, ratios), and the two
//! ways to print them: Markdown tables for people, one JSON line for scripts.

use std::future::Future;
use std::time::Duration;

use serde_json::{json, Value};

use crate::load::{Latencies, Load, Protocol, LANES, SLOW_CLIENTS};
use crate::mesh_size::Memory;
use crate::peer::Hop;
use crate::{Figures, Options, Path, Via, WORKERS};

/// CPU (user + system) in seconds of a process so far, from /proc.
fn cpu_of(pid: u32) -> f64 {
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
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds used so far by all of `pids`.
pub fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_of(*p)).sum()
}

/// The memory of the largest of `pids` (each figure its own maximum).
pub fn memory(pids: &[u32]) -> Memory {
    pids.iter()
        .map(|p| Memory::of(*p))
        .fold(Memory::default(), Memory::max)
}

/// Runs `work`, sampling the memory of `pids` twice a second meanwhile:
/// its result and the peak.
pub async fn watch_memory<T>(pids: &[u32], work: impl Future<Output = T>) -> (T, Memory) {
    let mut peak = memory(pids);
    let mut sample = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return (out, peak.max(memory(pids))),
            _ = sample.tick() => peak = peak.max(memory(pids)),
        }
    }
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

/// A path's latency under one load: medians over the rounds.
struct LatencyRow {
    name: String,
    load: Load,
    p50: f64,
    p99: f64,
    p999: f64,
    /// Over direct in the same protocol under the same load; none for direct.
    added: Option<(f64, f64)>,
    failed: usize,
    p50_spread: String,
    /// CPU seconds per 1,000 requests, per proxy; none for direct.
    cpu_per_1000: Option<f64>,
}

fn latency_rows(paths: &[Path], figures: &[Figures]) -> Vec<LatencyRow> {
    let at = |f: &Figures, load: Load| f.latency.get(&load).cloned().unwrap_or_default();
    let loads: Vec<Load> = figures
        .first()
        .map(|f| f.latency.keys().copied().collect())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for load in loads {
        for (path, f) in paths.iter().zip(figures) {
            let rounds = at(f, load);
            let (p50, p99, p999) = medians(&rounds);
            let added = match find(paths, Via::Direct, path.target.protocol) {
                Some(direct) if path.via != Via::Direct => {
                    let (d50, d99, _) = medians(&at(&figures[direct], load));
                    Some((p50 - d50, p99 - d99))
                }
                _ => None,
            };
            rows.push(LatencyRow {
                name: path.name(),
                load,
                p50,
                p99,
                p999,
                added,
                failed: rounds.iter().map(|l| l.failed).sum(),
                p50_spread: spread(&rounds.iter().map(|l| l.p50).collect::<Vec<_>>()),
                cpu_per_1000: f.cpu_per_1000.get(&load).cloned().map(median),
            });
        }
    }
    rows
}

/// p50, p99 and p99.9: each the median over the rounds.
fn medians(rounds: &[Latencies]) -> (f64, f64, f64) {
    let stat = |q: fn(&Latencies) -> f64| median(rounds.iter().map(q).collect());
    (stat(|l| l.p50), stat(|l| l.p99), stat(|l| l.p999))
}

fn find(paths: &[Path], via: Via, protocol: Protocol) -> Option<usize> {
    paths
        .iter()
        .position(|p| p.via == via && p.target.protocol == protocol)
}

/// Closed-loop maxima of one protocol: rps per `Via::ALL` (none if the
/// path did not run), and trellis over direct and over peer.
struct Throughput {
    protocol: Protocol,
    rps: [Option<f64>; 3],
    trellis_over_direct: Option<f64>,
    trellis_over_peer: Option<f64>,
}

fn throughput(paths: &[Path], figures: &[Figures], protocol: Protocol) -> Throughput {
    let rps =
        Via::ALL.map(|via| find(paths, via, protocol).map(|i| median(figures[i].max_rps.clone())));
    let [direct, trellis, peer] = rps;
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    Throughput {
        protocol,
        rps,
        trellis_over_direct: ratio(trellis, direct),
        trellis_over_peer: ratio(trellis, peer),
    }
}

/// The proxied paths' resource figures.
fn proxied<'a>(
    paths: &'a [Path],
    figures: &'a [Figures],
) -> impl Iterator<Item = (&'a Path, &'a Figures)> {
    paths
        .iter()
        .zip(figures)
        .filter(|(path, _)| !path.pids.is_empty())
}

/// CPU seconds per 1,000 requests per proxy: the median over every round
/// of the steady rates.
fn steady_cpu(f: &Figures) -> f64 {
    let steady = f
        .cpu_per_1000
        .iter()
        .filter(|(load, _)| matches!(load, Load::Steady(_)));
    median(
        steady
            .flat_map(|(_, rounds)| rounds.iter().copied())
            .collect(),
    )
}

pub fn json(paths: &[Path], figures: &[Figures], opts: &Options, peer: Option<&str>) -> Value {
    let key = |name: &str| name.replace(' ', "_");
    let mut out = serde_json::Map::new();
    for row in latency_rows(paths, figures) {
        out.insert(
            format!("{}_{}", key(&row.name), row.load.name()),
            json!({"rate": row.load.rate(), "p50_ms": row.p50, "p99_ms": row.p99, "p999_ms": row.p999,
                   "added_p50_ms": row.added.map(|a| a.0), "added_p99_ms": row.added.map(|a| a.1),
                   "failed": row.failed, "p50_spread_ms": row.p50_spread,
                   "cpu_seconds_per_1000_requests": row.cpu_per_1000}),
        );
    }
    let mut max_rps = serde_json::Map::new();
    for t in Protocol::ALL.map(|p| throughput(paths, figures, p)) {
        let mut entry: serde_json::Map<String, Value> = Via::ALL
            .iter()
            .zip(t.rps)
            .map(|(via, rps)| (via.name().to_string(), json!(rps)))
            .collect();
        entry.insert("trellis/direct".into(), json!(t.trellis_over_direct));
        entry.insert("trellis/peer".into(), json!(t.trellis_over_peer));
        max_rps.insert(t.protocol.name().into(), Value::Object(entry));
    }
    out.insert("max_rps".into(), Value::Object(max_rps));
    let proxies: serde_json::Map<String, Value> = proxied(paths, figures)
        .map(|(path, f)| {
            let figures = json!({"rss_idle_kib": f.idle.rss, "rss_under_load_kib": f.under_load.rss,
                                 "private_under_load_kib": f.under_load.private,
                                 "rss_slow_clients_kib": f.slow_clients.rss,
                                 "private_slow_clients_kib": f.slow_clients.private,
                                 "cpu_seconds_per_1000_requests": steady_cpu(f),
                                 "cpu_us_per_request_at_max_rps": median(f.saturated_cpu_us.clone())});
            (key(&path.name()), figures)
        })
        .collect();
    out.insert("proxies".into(), Value::Object(proxies));
    out.insert(
        "config".into(),
        json!({"rounds": opts.rounds, "seconds": opts.seconds, "rates": opts.rates,
               "quick": opts.quick, "lanes": LANES, "slow_clients": SLOW_CLIENTS,
               "workers": WORKERS, "peer": peer, "peer_hop": opts.peer_hop.name(),
               "proxy": opts.proxy.as_ref().map_or("built in".into(), |p| p.display().to_string())}),
    );
    Value::Object(out)
}

pub fn markdown(paths: &[Path], figures: &[Figures], opts: &Options, peer: Option<&str>) -> String {
    let num = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    let mut out = String::from(
        "| path | rate | p50 ms | p99 ms | p99.9 ms | added p50 | added p99 | failed | CPU s per 1,000 |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for row in latency_rows(paths, figures) {
        let rate = match row.load {
            Load::Steady(rate) => rate.to_string(),
            Load::SlowClients => format!("{} ({SLOW_CLIENTS} slow clients)", row.load.rate()),
        };
        out += &format!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
            row.name,
            rate,
            row.p50,
            row.p99,
            row.p999,
            num(row.added.map(|a| a.0), 3),
            num(row.added.map(|a| a.1), 3),
            row.failed,
            num(row.cpu_per_1000, 4),
        );
    }
    out += &format!(
        "\nMax throughput (closed loop, {WORKERS} workers), rps:\n\n\
         | protocol | direct | trellis | peer | trellis/direct | trellis/peer |\n\
         |---|---|---|---|---|---|\n"
    );
    for t in Protocol::ALL.map(|p| throughput(paths, figures, p)) {
        let [direct, trellis, peer] = t.rps;
        out += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            t.protocol.name(),
            num(direct, 0),
            num(trellis, 0),
            num(peer, 0),
            num(t.trellis_over_direct, 3),
            num(t.trellis_over_peer, 3),
        );
    }
    out += &format!(
        "\nProxies (memory: the larger of the two, KiB; CPU: per proxy, over the steady rates, and during the closed-loop maximum):\n\n\
         | path | RSS idle | RSS under load | private under load | RSS, {SLOW_CLIENTS} slow clients | private, {SLOW_CLIENTS} slow clients | CPU s per 1,000 requests | CPU µs per request at max rps |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for (path, f) in proxied(paths, figures) {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.4} | {:.1} |\n",
            path.name(),
            f.idle.rss,
            f.under_load.rss,
            f.under_load.private,
            f.slow_clients.rss,
            f.slow_clients.private,
            steady_cpu(f),
            median(f.saturated_cpu_us.clone()),
        );
    }
    out += &format!(
        "\n{} rounds of {} s, medians; open-loop latency from intended send time; peer: {}{}\n",
        opts.rounds,
        opts.seconds,
        peer.unwrap_or("skipped (haproxy not found)"),
        match opts.peer_hop {
            Hop::Http2 => "",
            Hop::Http1 => " (HTTP/1.1 between the two for HTTP/1.1 clients)",
        },
    );
    out
}
