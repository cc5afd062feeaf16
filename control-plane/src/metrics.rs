//! The controller's Prometheus metrics, served on its admin port.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::Store;

pub struct ControllerMetrics {
    registry: Registry,
    objects: IntGaugeVec,
    watches: IntGauge,
    manifest_errors: IntGauge,
    /// Discovery messages sent to proxies.
    pub updates_pushed: IntCounter,
    /// From a change in the store to its update on a proxy's stream.
    pub push_latency: Histogram,
    pub certificates_issued: IntCounter,
    /// Refused certificate requests, by [`crate::identity::Refusal::reason`].
    pub certificates_refused: IntCounterVec,
    /// Connections to the gRPC port closed before serving: plaintext from
    /// where only TLS is accepted, or a failed TLS handshake.
    pub connections_refused: IntCounterVec,
    /// 1 while this replica leads (holds the Lease; always in local mode).
    pub leader: IntGauge,
    /// New issuers or bundles seen, by result: `applied`, or `rejected`
    /// (the previous issuer keeps signing).
    pub issuer_updates: IntCounterVec,
    /// Admission reviews answered by the webhook, by result (`injected`,
    /// `skipped`, `denied`, `invalid`) and reason (why skipped, denied or
    /// invalid; empty for `injected`).
    pub injections: IntCounterVec,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("trellis_controller".into()), None).unwrap_or_default();
        // Names and labels are constants: creating and registering cannot fail.
        let build = || -> prometheus::Result<Self> {
            let metrics = Self {
                registry: registry.clone(),
                objects: IntGaugeVec::new(
                    Opts::new("objects", "Objects in the store by kind"),
                    &["kind"],
                )?,
                watches: IntGauge::new("watches", "Open discovery watches (endpoints and routes)")?,
                manifest_errors: IntGauge::new(
                    "manifest_errors",
                    "Manifests rejected at the last reload",
                )?,
                updates_pushed: IntCounter::new(
                    "updates_pushed_total",
                    "Discovery updates sent to proxies",
                )?,
                push_latency: Histogram::with_opts(
                    HistogramOpts::new(
                        "push_latency_seconds",
                        "Time from a change in the store to its discovery update being sent",
                    )
                    .buckets(trellis_common::metrics::LATENCY_BUCKETS.to_vec()),
                )?,
                certificates_issued: IntCounter::new(
                    "certificates_issued_total",
                    "Workload certificates issued",
                )?,
                certificates_refused: IntCounterVec::new(
                    Opts::new(
                        "certificates_refused_total",
                        "Certificate requests refused, by reason",
                    ),
                    &["reason"],
                )?,
                connections_refused: IntCounterVec::new(
                    Opts::new(
                        "connections_refused_total",
                        "gRPC connections closed unserved, by reason (plaintext, handshake)",
                    ),
                    &["reason"],
                )?,
                leader: IntGauge::new(
                    "leader",
                    "1 while this replica is the leader (holds the controllers' Lease)",
                )?,
                issuer_updates: IntCounterVec::new(
                    Opts::new(
                        "issuer_updates_total",
                        "New CA issuers or trust bundles seen, by result (applied or rejected)",
                    ),
                    &["result"],
                )?,
                injections: IntCounterVec::new(
                    Opts::new(
                        "injections_total",
                        "Admission reviews answered by the injection webhook, by result and reason",
                    ),
                    &["result", "reason"],
                )?,
            };
            registry.register(Box::new(metrics.objects.clone()))?;
            registry.register(Box::new(metrics.watches.clone()))?;
            registry.register(Box::new(metrics.manifest_errors.clone()))?;
            registry.register(Box::new(metrics.updates_pushed.clone()))?;
            registry.register(Box::new(metrics.push_latency.clone()))?;
            registry.register(Box::new(metrics.certificates_issued.clone()))?;
            registry.register(Box::new(metrics.certificates_refused.clone()))?;
            registry.register(Box::new(metrics.connections_refused.clone()))?;
            registry.register(Box::new(metrics.leader.clone()))?;
            registry.register(Box::new(metrics.issuer_updates.clone()))?;
            registry.register(Box::new(metrics.injections.clone()))?;
            for reason in crate::identity::Refusal::REASONS {
                metrics.certificates_refused.with_label_values(&[*reason]);
            }
            for result in ["applied", "rejected"] {
                metrics.issuer_updates.with_label_values(&[result]);
            }
            for reason in ["plaintext", "handshake"] {
                metrics.connections_refused.with_label_values(&[reason]);
            }
            Ok(metrics)
        };
        build().expect("metric definitions are valid")
    }

    /// One discovery update sent, caused by the store change at `cause`
    /// (`None` for a stream's first message).
    pub fn pushed(&self, cause: Option<std::time::Instant>) {
        self.updates_pushed.inc();
        if let Some(changed_at) = cause {
            self.push_latency
                .observe(changed_at.elapsed().as_secs_f64());
        }
    }

    /// The text exposition, with the store's gauges read now.
    pub fn render(&self, store: &Store, manifest_errors: usize) -> String {
        let counts = store.counts();
        for (kind, n) in [
            ("Namespace", counts.namespaces),
            ("Service", counts.services),
            ("EndpointSlice", counts.endpoint_slices),
            ("Pod", counts.pods),
            ("HTTPRoute", counts.http_routes),
            ("HTTPFault", counts.http_faults),
            ("ResiliencePolicy", counts.resilience_policies),
        ] {
            self.objects.with_label_values(&[kind]).set(n as i64);
        }
        self.watches.set(counts.watches as i64);
        self.manifest_errors.set(manifest_errors as i64);
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
