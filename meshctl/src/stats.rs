//! Golden metrics and the service graph, computed from proxies' own
//! `/metrics` (two scrapes a window apart), for `meshctl stat` and
//! `meshctl graph` in local mode.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use trellis_common::exposition::{deltas, histogram_quantile, sum};
pub use trellis_common::exposition::{parse, Sample};

/// Golden metrics of one Service version over a window.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServiceStats {
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub rps: f64,
    pub success_rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mtls_share: f64,
}

/// One edge of the service graph over a window.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub rps: f64,
    pub success_rate: f64,
}

/// Per Service and version, as their servers' proxies saw it (inbound).
pub fn services(before: &[Sample], after: &[Sample], window: Duration) -> Vec<ServiceStats> {
    let grown = deltas(before, after);
    let mut groups: BTreeMap<(String, String, String), Vec<&Sample>> = BTreeMap::new();
    for s in &grown {
        if s.labels.get("direction").map(String::as_str) != Some("inbound") {
            continue;
        }
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        groups
            .entry((
                label("dst_namespace"),
                label("dst_service"),
                label("dst_version"),
            ))
            .or_default()
            .push(s);
    }
    let secs = window.as_secs_f64().max(1e-9);
    groups
        .into_iter()
        .filter_map(|((namespace, service, version), samples)| {
            let total = sum(samples.iter().copied(), "trellis_requests_total", |_| true);
            if total == 0.0 {
                return None;
            }
            let ok = sum(samples.iter().copied(), "trellis_requests_total", |s| {
                s.labels.get("classification").map(String::as_str) == Some("success")
            });
            let tls = sum(samples.iter().copied(), "trellis_requests_total", |s| {
                s.labels.get("tls").map(String::as_str) == Some("true")
            });
            let quantile = |q| {
                histogram_quantile(
                    q,
                    "trellis_response_latency_seconds_bucket",
                    samples.iter().copied(),
                )
                .unwrap_or(0.0)
                    * 1000.0
            };
            Some(ServiceStats {
                namespace,
                service,
                version,
                rps: total / secs,
                success_rate: ok / total,
                p50_ms: quantile(0.5),
                p95_ms: quantile(0.95),
                p99_ms: quantile(0.99),
                mtls_share: tls / total,
            })
        })
        .collect()
}

/// Who calls whom, as the callers' proxies saw it (outbound).
pub fn graph(before: &[Sample], after: &[Sample], window: Duration) -> Vec<Edge> {
    let mut edges: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for s in deltas(before, after) {
        if s.name != "trellis_requests_total"
            || s.labels.get("direction").map(String::as_str) != Some("outbound")
        {
            continue;
        }
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        let from = format!("{}/{}", label("src_namespace"), label("src_workload"));
        let to = format!("{}/{}", label("dst_namespace"), label("dst_backend"));
        let entry = edges.entry((from, to)).or_default();
        entry.0 += s.value;
        if label("classification") == "success" {
            entry.1 += s.value;
        }
    }
    let secs = window.as_secs_f64().max(1e-9);
    edges
        .into_iter()
        .map(|((from, to), (total, ok))| Edge {
            from,
            to,
            rps: total / secs,
            success_rate: ok / total,
        })
        .collect()
}

/// The graph in Graphviz DOT.
pub fn dot(edges: &[Edge]) -> String {
    let mut out = String::from("digraph mesh {\n  rankdir=LR;\n  node [shape=box];\n");
    for e in edges {
        out.push_str(&format!(
            "  \"{}\" -> \"{}\" [label=\"{:.1} rps, {:.1}% ok\"];\n",
            e.from.replace('"', "'"),
            e.to.replace('"', "'"),
            e.rps,
            e.success_rate * 100.0
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE trellis_requests_total counter
trellis_requests_total{direction="inbound",dst_namespace="default",dst_service="hello",dst_version="v1",tls="true",classification="success"} 10
"#;
    const AFTER: &str = r#"trellis_requests_total{direction="inbound",dst_namespace="default",dst_service="hello",dst_version="v1",tls="true",classification="success"} 108
trellis_requests_total{direction="inbound",dst_namespace="default",dst_service="hello",dst_version="v1",tls="true",classification="failure"} 2
trellis_response_latency_seconds_bucket{direction="inbound",dst_namespace="default",dst_service="hello",dst_version="v1",le="0.001"} 50
trellis_response_latency_seconds_bucket{direction="inbound",dst_namespace="default",dst_service="hello",dst_version="v1",le="0.002"} 100
trellis_response_latency_seconds_bucket{direction="inbound",dst_namespace="default",dst_service="hello",dst_version="v1",le="+Inf"} 100
trellis_requests_total{direction="outbound",src_namespace="default",src_workload="frontend",dst_namespace="default",dst_backend="hello",classification="success"} 40
"#;

    #[test]
    fn golden_metrics_from_two_scrapes() {
        let stats = services(&parse(BEFORE), &parse(AFTER), Duration::from_secs(10));
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!((s.service.as_str(), s.version.as_str()), ("hello", "v1"));
        assert!((s.rps - 10.0).abs() < 1e-9, "100 new requests over 10 s");
        assert!((s.success_rate - 0.98).abs() < 1e-9);
        assert!((s.p50_ms - 1.0).abs() < 1e-9, "{}", s.p50_ms);
        assert!((s.p99_ms - 1.98).abs() < 1e-9, "{}", s.p99_ms);
        assert_eq!(s.mtls_share, 1.0);
        let edges = graph(&parse(BEFORE), &parse(AFTER), Duration::from_secs(10));
        assert_eq!(
            edges,
            [Edge {
                from: "default/frontend".into(),
                to: "default/hello".into(),
                rps: 4.0,
                success_rate: 1.0
            }]
        );
        assert!(dot(&edges).contains("\"default/frontend\" -> \"default/hello\""));
    }
}
