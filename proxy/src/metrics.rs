//! The proxy's Prometheus metrics: one registry, one label struct per
//! family so label order cannot drift, rendered on the admin port.
//!
//! Labels are bounded: workloads, Services, versions, status codes and
//! identities — never paths or other per-request values.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Buckets from 100 µs to 10 s: sub-millisecond hops and slow backends both resolve.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Who this proxy is, for the labels of everything it records.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub version: String,
}

/// The labels of one HTTP request.
#[derive(Clone, Debug, Default)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub src_workload: String,
    pub src_namespace: String,
    pub src_version: String,
    pub dst_service: String,
    pub dst_namespace: String,
    /// The Service a route's weights chose (the same as `dst_service` without routes).
    pub dst_backend: String,
    pub dst_version: String,
    /// Whether the hop between proxies was mutual TLS.
    pub tls: bool,
    /// The SPIFFE ID of the other proxy (server on outbound, client on inbound).
    pub peer_identity: String,
}

const REQUEST_LABELS: &[&str] = &[
    "direction",
    "src_workload",
    "src_namespace",
    "src_version",
    "dst_service",
    "dst_namespace",
    "dst_backend",
    "dst_version",
    "tls",
    "peer_identity",
    "status_code",
    "classification",
];

impl RequestLabels {
    fn values<'a>(&'a self, status: &'a str, classification: &'a str) -> [&'a str; 12] {
        [
            self.direction,
            &self.src_workload,
            &self.src_namespace,
            &self.src_version,
            &self.dst_service,
            &self.dst_namespace,
            &self.dst_backend,
            &self.dst_version,
            if self.tls { "true" } else { "false" },
            &self.peer_identity,
            status,
            classification,
        ]
    }
}

thread_local! {
    /// Metric children by (metrics instance, label values), per thread.
    static CHILDREN: RefCell<HashMap<u64, (IntCounter, Histogram)>> = RefCell::new(HashMap::new());
}

/// Distinguishes `Metrics` instances (tests run several proxies per process).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

pub struct Metrics {
    id: u64,
    registry: Registry,
    /// Off only to measure what request metrics cost.
    enabled: bool,
    pub workload: Workload,
    requests: IntCounterVec,
    latency: HistogramVec,
    tcp_opened: IntCounterVec,
    tls_failures: IntCounterVec,
    retries: IntCounterVec,
    faults: IntCounterVec,
    cert_expiry: IntGauge,
}

impl Metrics {
    /// Metrics that skip per-request recording (everything else stays).
    pub fn disabled(workload: Workload) -> Self {
        Self {
            enabled: false,
            ..Self::new(workload)
        }
    }

    pub fn new(workload: Workload) -> Self {
        let registry = Registry::new_custom(Some("trellis".into()), None).unwrap_or_default();
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "HTTP requests by source, destination and response",
            ),
            REQUEST_LABELS,
        );
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "response_latency_seconds",
                "Time from request to response headers, as the proxy saw it",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            REQUEST_LABELS,
        );
        let tcp_opened = IntCounterVec::new(
            Opts::new("tcp_connections_opened_total", "Accepted TCP connections"),
            &["direction"],
        );
        let tls_failures = IntCounterVec::new(
            Opts::new(
                "tls_handshake_failures_total",
                "Refused or failed TLS handshakes",
            ),
            &["direction"],
        );
        let retries = IntCounterVec::new(
            Opts::new("retries_total", "Retried requests"),
            &["dst_service", "dst_namespace"],
        );
        let faults = IntCounterVec::new(
            Opts::new("fault_injections_total", "Injected faults"),
            &["dst_service", "dst_namespace", "kind"],
        );
        let cert_expiry = IntGauge::new(
            "identity_cert_expiration_timestamp_seconds",
            "When this proxy's current certificate expires (Unix time)",
        );
        // Names and label sets above are constants: registration cannot fail.
        let metrics = (|| -> prometheus::Result<Self> {
            let (requests, latency, tcp_opened, tls_failures, retries, faults, cert_expiry) = (
                requests?,
                latency?,
                tcp_opened?,
                tls_failures?,
                retries?,
                faults?,
                cert_expiry?,
            );
            registry.register(Box::new(requests.clone()))?;
            registry.register(Box::new(latency.clone()))?;
            registry.register(Box::new(tcp_opened.clone()))?;
            registry.register(Box::new(tls_failures.clone()))?;
            registry.register(Box::new(retries.clone()))?;
            registry.register(Box::new(faults.clone()))?;
            registry.register(Box::new(cert_expiry.clone()))?;
            Ok(Self {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                registry: registry.clone(),
                enabled: true,
                workload: workload.clone(),
                requests,
                latency,
                tcp_opened,
                tls_failures,
                retries,
                faults,
                cert_expiry,
            })
        })();
        metrics.expect("metric definitions are valid")
    }

    /// Records one finished request (response headers received, or the
    /// proxy answered itself).
    pub fn request(&self, labels: &RequestLabels, status: u16, latency: Duration) {
        if !self.enabled {
            return;
        }
        let code = status.to_string();
        let class = if status >= 500 { "failure" } else { "success" };
        let values = labels.values(&code, class);
        // Each thread remembers the metric children of the label sets it has
        // seen, so the hot path takes no lock shared with other requests (the
        // metric vectors' own lookup does). Label sets are bounded, and so is
        // the cache.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.id, &values).hash(&mut hasher);
        let key = hasher.finish();
        CHILDREN.with(|children| {
            let mut children = children.borrow_mut();
            let (requests, latency_histogram) = children.entry(key).or_insert_with(|| {
                (
                    self.requests.with_label_values(&values),
                    self.latency.with_label_values(&values),
                )
            });
            requests.inc();
            latency_histogram.observe(latency.as_secs_f64());
        });
    }

    pub fn connection_opened(&self, direction: &str) {
        self.tcp_opened.with_label_values(&[direction]).inc();
    }

    pub fn tls_failure(&self, direction: &str) {
        self.tls_failures.with_label_values(&[direction]).inc();
    }

    pub fn retry(&self, service: &str, namespace: &str) {
        self.retries.with_label_values(&[service, namespace]).inc();
    }

    pub fn fault(&self, service: &str, namespace: &str, kind: &str) {
        self.faults
            .with_label_values(&[service, namespace, kind])
            .inc();
    }

    pub fn certificate(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.cert_expiry
            .set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
