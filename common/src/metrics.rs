//! Conventions every Trellis metrics endpoint follows.

/// The Prometheus text exposition format; Prometheus 3 refuses a scrape
/// without it.
pub const CONTENT_TYPE: http::HeaderValue =
    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");

/// Latency buckets from 100 µs to 10 s: sub-millisecond hops, discovery
/// pushes and slow backends all resolve, and dashboards can compare them.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
