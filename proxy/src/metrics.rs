//! The proxy's Prometheus metrics: one registry, one label struct per
//! family so label order cannot drift, rendered on the admin port.
//!
//! Labels are bounded: workloads, Services, versions, status codes and
//! identities — never paths or other per-request values.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A label value, shared: each is made once (per proxy, Service, endpoint
/// or connection) and only its count changes per request.
pub type Label = Arc<str>;

/// Who this proxy is, for the labels of everything it records.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub name: Label,
    pub namespace: Label,
    pub version: Label,
}

/// The labels of one HTTP request.
#[derive(Clone, Debug, Default)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    pub src_workload: Label,
    pub src_namespace: Label,
    pub src_version: Label,
    pub dst_service: Label,
    pub dst_namespace: Label,
    /// The Service a route's weights chose (the same as `dst_service` without routes).
    pub dst_backend: Label,
    pub dst_version: Label,
    /// Whether the hop between proxies was mutual TLS.
    pub tls: bool,
    /// The SPIFFE ID of the other proxy (server on outbound, client on inbound).
    pub peer_identity: Label,
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

/// `n` in decimal, written into `digits`: a status code's label without
/// an allocation per request.
fn decimal(digits: &mut [u8; 10], mut n: u32) -> &str {
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&digits[start..]).unwrap_or("0")
}

/// The hash of a request's label values: a fast one, as the values come
/// from bounded sets this proxy made (not from the request), so there is
/// no flooding to defend against, and SipHash over a dozen strings showed
/// in the profile of every request.
type LabelHash = foldhash::fast::FixedState;

thread_local! {
    /// Metric children by (metrics instance, label values), per thread.
    static CHILDREN: RefCell<HashMap<u64, (IntCounter, Histogram), LabelHash>> =
        RefCell::new(HashMap::default());
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
    tcp_closed: IntCounterVec,
    tcp_open: IntGaugeVec,
    tcp_read_bytes: IntCounterVec,
    tcp_write_bytes: IntCounterVec,
    discovery_streams: IntGaugeVec,
    tls_failures: IntCounterVec,
    retries: IntCounterVec,
    faults: IntCounterVec,
    mirrors: IntCounterVec,
    ejections: IntCounterVec,
    cert_expiry: IntGauge,
    /// Inbound authorization decisions (see `authz`), whose series the
    /// policy resolves once when it arrives.
    pub inbound_authz: IntCounterVec,
    /// Accept errors and connection timeouts (see [`ListenerMetrics`]).
    pub listeners: ListenerMetrics,
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
            .buckets(trellis_common::metrics::LATENCY_BUCKETS.to_vec()),
            REQUEST_LABELS,
        );
        let tcp_opened = IntCounterVec::new(
            Opts::new("tcp_connections_opened_total", "Accepted TCP connections"),
            &["direction"],
        );
        let tcp_closed = IntCounterVec::new(
            Opts::new(
                "tcp_connections_closed_total",
                "Closed accepted TCP connections",
            ),
            &["direction"],
        );
        let tcp_open = IntGaugeVec::new(
            Opts::new("tcp_open_connections", "Accepted TCP connections now open"),
            &["direction"],
        );
        let tcp_read_bytes = IntCounterVec::new(
            Opts::new(
                "tcp_read_bytes_total",
                "Bytes read from accepted connections (counted when they close)",
            ),
            &["direction"],
        );
        let tcp_write_bytes = IntCounterVec::new(
            Opts::new(
                "tcp_write_bytes_total",
                "Bytes written to accepted connections (counted when they close)",
            ),
            &["direction"],
        );
        let discovery_streams = IntGaugeVec::new(
            Opts::new(
                "discovery_streams",
                "Discovery watches by kind and state: open (streaming from the controller) or reconnecting (serving the last known state)",
            ),
            &["kind", "state"],
        );
        let tls_failures = IntCounterVec::new(
            Opts::new(
                "tls_handshake_failures_total",
                "Refused or failed TLS handshakes, by reason: timeout, not_tls, no_certificate, bad_certificate, wrong_peer, alpn, closed, other",
            ),
            &["direction", "reason"],
        );
        let retries = IntCounterVec::new(
            Opts::new("retries_total", "Retried requests"),
            &["dst_service", "dst_namespace"],
        );
        let faults = IntCounterVec::new(
            Opts::new("fault_injections_total", "Injected faults"),
            &["dst_service", "dst_namespace", "kind"],
        );
        let mirrors = IntCounterVec::new(
            Opts::new(
                "request_mirrors_total",
                "Mirrored request copies (RequestMirror filters) by mirror Service and result: answered (any status), failed (no answer), abandoned (the copy could not keep up with the request body, or the request ended first)",
            ),
            &["dst_service", "dst_namespace", "result"],
        );
        let ejections = IntCounterVec::new(
            Opts::new(
                "outlier_ejections_total",
                "Endpoints ejected from load balancing by outlier detection, by backend Service",
            ),
            &["dst_service", "dst_namespace"],
        );
        let inbound_authz = IntCounterVec::new(
            Opts::new(
                "inbound_authz_total",
                "Inbound requests and TCP connections by authorization decision, the policy that decided (namespace/name, or default:<namespace default>) and its mode; decision=deny with mode=audit was allowed",
            ),
            &["decision", "policy", "mode"],
        );
        let cert_expiry = IntGauge::new(
            "identity_cert_expiration_timestamp_seconds",
            "When this proxy's current certificate expires (Unix time)",
        );
        // Names and label sets above are constants: registration cannot fail.
        let metrics = (|| -> prometheus::Result<Self> {
            let (requests, latency, tcp_opened, tcp_closed, tcp_open) =
                (requests?, latency?, tcp_opened?, tcp_closed?, tcp_open?);
            let (tcp_read_bytes, tcp_write_bytes, discovery_streams) =
                (tcp_read_bytes?, tcp_write_bytes?, discovery_streams?);
            let (tls_failures, retries, faults, ejections, cert_expiry) =
                (tls_failures?, retries?, faults?, ejections?, cert_expiry?);
            let (inbound_authz, mirrors) = (inbound_authz?, mirrors?);
            let collectors: [Box<dyn prometheus::core::Collector>; 15] = [
                Box::new(requests.clone()),
                Box::new(latency.clone()),
                Box::new(tcp_opened.clone()),
                Box::new(tcp_closed.clone()),
                Box::new(tcp_open.clone()),
                Box::new(tcp_read_bytes.clone()),
                Box::new(tcp_write_bytes.clone()),
                Box::new(discovery_streams.clone()),
                Box::new(tls_failures.clone()),
                Box::new(retries.clone()),
                Box::new(faults.clone()),
                Box::new(mirrors.clone()),
                Box::new(ejections.clone()),
                Box::new(cert_expiry.clone()),
                Box::new(inbound_authz.clone()),
            ];
            for collector in collectors {
                registry.register(collector)?;
            }
            let listeners = ListenerMetrics::register(&registry)?;
            // Connection and handshake series exist from the start, at 0,
            // so dashboards and alerts see "none yet" rather than no data.
            for direction in ["inbound", "outbound"] {
                for family in [&tcp_opened, &tcp_closed, &tcp_read_bytes, &tcp_write_bytes] {
                    family.with_label_values(&[direction]);
                }
                tcp_open.with_label_values(&[direction]);
                for reason in crate::tls::FailureReason::ALL {
                    tls_failures.with_label_values(&[direction, reason.label()]);
                }
            }
            Ok(Self {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                registry: registry.clone(),
                enabled: true,
                workload: workload.clone(),
                requests,
                latency,
                tcp_opened,
                tcp_closed,
                tcp_open,
                tcp_read_bytes,
                tcp_write_bytes,
                discovery_streams,
                tls_failures,
                retries,
                faults,
                mirrors,
                ejections,
                cert_expiry,
                inbound_authz,
                listeners,
            })
        })();
        metrics.expect("metric definitions are valid")
    }

    /// Records one finished HTTP request (response headers received, or
    /// the proxy answered itself): 5xx are failures.
    pub fn request(&self, labels: &RequestLabels, status: u16, latency: Duration) {
        if self.enabled {
            let mut digits = [0u8; 10];
            self.record(
                labels,
                decimal(&mut digits, status.into()),
                status >= 500,
                latency,
            );
        }
    }

    /// Records one finished gRPC call by its `grpc-status`. Like 5xx, only
    /// the codes that say the server or the network failed are failures
    /// (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS); a
    /// NOT_FOUND is an answer, as a 404 is.
    pub fn grpc_request(&self, labels: &RequestLabels, code: u32, latency: Duration) {
        if self.enabled {
            let failure = matches!(code, 2 | 4 | 13 | 14 | 15);
            let mut digits = [0u8; 10];
            self.record(labels, decimal(&mut digits, code), failure, latency);
        }
    }

    fn record(&self, labels: &RequestLabels, code: &str, failure: bool, latency: Duration) {
        let class = if failure { "failure" } else { "success" };
        let values = labels.values(code, class);
        // Each thread remembers the metric children of the label sets it has
        // seen, so the hot path takes no lock shared with other requests (the
        // metric vectors' own lookup does). Label sets are bounded, and so is
        // the cache.
        let key = LabelHash::default().hash_one((self.id, &values));
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
        self.tcp_open.with_label_values(&[direction]).inc();
    }

    pub fn connection_closed(&self, direction: &str, read: u64, written: u64) {
        self.tcp_closed.with_label_values(&[direction]).inc();
        self.tcp_open.with_label_values(&[direction]).dec();
        self.tcp_read_bytes
            .with_label_values(&[direction])
            .inc_by(read);
        self.tcp_write_bytes
            .with_label_values(&[direction])
            .inc_by(written);
    }

    /// A discovery watch of `kind` (`endpoints`, `routes`) moved from one
    /// state to another (`None`: it started, or it ended).
    pub fn discovery_stream(&self, kind: &str, from: Option<&str>, to: Option<&str>) {
        if let Some(from) = from {
            self.discovery_streams
                .with_label_values(&[kind, from])
                .dec();
        }
        if let Some(to) = to {
            self.discovery_streams.with_label_values(&[kind, to]).inc();
        }
    }

    pub fn tls_failure(&self, direction: &str, reason: crate::tls::FailureReason) {
        self.tls_failures
            .with_label_values(&[direction, reason.label()])
            .inc();
    }

    pub fn retry(&self, service: &str, namespace: &str) {
        self.retries.with_label_values(&[service, namespace]).inc();
    }

    pub fn fault(&self, service: &str, namespace: &str, kind: &str) {
        self.faults
            .with_label_values(&[service, namespace, kind])
            .inc();
    }

    /// One mirrored copy of a request, by how it ended.
    pub fn mirror(&self, service: &str, namespace: &str, result: &str) {
        self.mirrors
            .with_label_values(&[service, namespace, result])
            .inc();
    }

    /// A backend Service this proxy balances over: its ejection series
    /// starts at 0, so "no ejections" is data, not a missing series.
    pub fn backend(&self, service: &str, namespace: &str) {
        self.ejections.with_label_values(&[service, namespace]);
    }

    pub fn ejection(&self, service: &str, namespace: &str) {
        self.ejections
            .with_label_values(&[service, namespace])
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

// --- Listeners: accept errors and connection timeouts --------------------

/// What the listeners count: accept errors (the open-file limit, say) and
/// connections closed by a timeout.
#[derive(Clone)]
pub struct ListenerMetrics {
    accept_errors: IntCounterVec,
    accept_logs_suppressed: IntCounterVec,
    over_limit: IntCounterVec,
    timeouts: IntCounterVec,
}

/// Every listener's `direction` label.
const LISTENERS: [&str; 3] = ["outbound", "inbound", "admin"];

/// What closed a connection early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Protocol detection or the TLS handshake took too long.
    Handshake,
    /// A request head took too long to arrive.
    HeaderRead,
    /// No request for the idle timeout.
    Idle,
}

impl Timeout {
    pub fn label(self) -> &'static str {
        match self {
            Timeout::Handshake => "handshake",
            Timeout::HeaderRead => "header_read",
            Timeout::Idle => "idle",
        }
    }
}

impl ListenerMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let accept_errors = IntCounterVec::new(
            Opts::new(
                "accept_errors_total",
                "Failed accepts (e.g. the open-file limit); the listener backs off",
            ),
            &["direction"],
        )?;
        let accept_logs_suppressed = IntCounterVec::new(
            Opts::new(
                "accept_error_logs_suppressed_total",
                "Accept errors not logged: at most one line a second is written",
            ),
            &["direction"],
        )?;
        let over_limit = IntCounterVec::new(
            Opts::new(
                "connections_over_limit_total",
                "Connections accepted and closed at once: the listener held TRELLIS_MAX_CONNECTIONS already",
            ),
            &["direction"],
        )?;
        let timeouts = IntCounterVec::new(
            Opts::new(
                "connection_timeouts_total",
                "Accepted connections closed by a timeout: handshake, header_read or idle",
            ),
            &["direction", "timeout"],
        )?;
        registry.register(Box::new(accept_errors.clone()))?;
        registry.register(Box::new(accept_logs_suppressed.clone()))?;
        registry.register(Box::new(over_limit.clone()))?;
        registry.register(Box::new(timeouts.clone()))?;
        for direction in LISTENERS {
            accept_errors.with_label_values(&[direction]);
            accept_logs_suppressed.with_label_values(&[direction]);
            over_limit.with_label_values(&[direction]);
            for timeout in [Timeout::Handshake, Timeout::HeaderRead, Timeout::Idle] {
                timeouts.with_label_values(&[direction, timeout.label()]);
            }
        }
        Ok(Self {
            accept_errors,
            accept_logs_suppressed,
            over_limit,
            timeouts,
        })
    }

    pub fn accept_error(&self, direction: &str) {
        self.accept_errors.with_label_values(&[direction]).inc();
    }

    pub fn accept_log_suppressed(&self, direction: &str) {
        self.accept_logs_suppressed
            .with_label_values(&[direction])
            .inc();
    }

    pub fn over_limit(&self, direction: &str) {
        self.over_limit.with_label_values(&[direction]).inc();
    }

    pub fn timed_out(&self, direction: &str, timeout: Timeout) {
        self.timeouts
            .with_label_values(&[direction, timeout.label()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_codes_are_written_in_decimal() {
        let mut digits = [0u8; 10];
        for n in [0, 7, 14, 200, 503, u32::MAX] {
            assert_eq!(super::decimal(&mut digits, n), n.to_string());
        }
    }
}
