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
    pub rollouts: std::sync::Arc<RolloutMetrics>,
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
                rollouts: std::sync::Arc::new(RolloutMetrics::register(&registry)?),
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
            ("GRPCRoute", counts.grpc_routes),
            ("HTTPFault", counts.http_faults),
            ("ResiliencePolicy", counts.resilience_policies),
            ("Rollout", counts.rollouts),
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

/// Where each rollout is, for dashboards: step, phase, the canary's weight,
/// and each gate's threshold and last value in the units the canary
/// dashboard plots (success as a ratio, latency in seconds).
pub struct RolloutMetrics {
    step: IntGaugeVec,
    weight: IntGaugeVec,
    phase: IntGaugeVec,
    threshold: prometheus::GaugeVec,
    value: prometheus::GaugeVec,
    /// Each rollout's Service label, to remove its series when it is gone.
    services: std::sync::Mutex<std::collections::HashMap<crate::model::ObjectKey, String>>,
}

const ROLLOUT_LABELS: &[&str] = &["namespace", "rollout", "service"];
const GATE_LABELS: &[&str] = &["namespace", "rollout", "service", "gate"];

impl RolloutMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let float =
            |name: &str, help: &str| prometheus::GaugeVec::new(Opts::new(name, help), GATE_LABELS);
        let metrics = Self {
            step: gauge(
                "rollout_step",
                "The rollout's current step, from 1",
                ROLLOUT_LABELS,
            )?,
            weight: gauge(
                "rollout_canary_weight_percent",
                "The canary's share of the Service's traffic",
                ROLLOUT_LABELS,
            )?,
            phase: gauge(
                "rollout_phase",
                "1 for the rollout's current phase, 0 for the others",
                &["namespace", "rollout", "service", "phase"],
            )?,
            threshold: float(
                "rollout_gate_threshold",
                "Each gate's threshold: success-rate as a ratio, p99 in seconds",
            )?,
            value: float(
                "rollout_gate_value",
                "Each gate's value in the last window, in the threshold's unit",
            )?,
            services: Default::default(),
        };
        registry.register(Box::new(metrics.step.clone()))?;
        registry.register(Box::new(metrics.weight.clone()))?;
        registry.register(Box::new(metrics.phase.clone()))?;
        registry.register(Box::new(metrics.threshold.clone()))?;
        registry.register(Box::new(metrics.value.clone()))?;
        Ok(metrics)
    }

    pub fn record(
        &self,
        rollout: &crate::model::Rollout,
        plan: Option<&crate::rollout::plan::Plan>,
        status: &crate::model::RolloutStatus,
    ) {
        let key = rollout.metadata.key();
        let before = self
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), rollout.spec.service.clone());
        // A rollout moved to another Service leaves no series behind.
        if let Some(old) = before.filter(|old| *old != rollout.spec.service) {
            self.remove_series(&key, &old);
        }
        let labels = [
            key.namespace.as_str(),
            key.name.as_str(),
            rollout.spec.service.as_str(),
        ];
        self.step
            .with_label_values(&labels)
            .set(i64::from(status.step) + 1);
        self.weight
            .with_label_values(&labels)
            .set(i64::from(status.canary_weight));
        for phase in crate::model::Phase::ALL {
            let [ns, name, service] = labels;
            self.phase
                .with_label_values(&[ns, name, service, phase.as_str()])
                .set(i64::from(phase == status.phase));
        }
        let Some(plan) = plan else { return };
        let [ns, name, service] = labels;
        let gates = [
            ("success-rate", plan.gates.success_rate.map(|r| r / 100.0)),
            ("p99", plan.gates.max_p99.map(|d| d.as_secs_f64())),
        ];
        for (gate, threshold) in gates {
            let labels = [ns, name, service, gate];
            match threshold {
                Some(t) => self.threshold.with_label_values(&labels).set(t),
                None => drop(self.threshold.remove_label_values(&labels)),
            }
            let value = status
                .gates
                .iter()
                .find(|g| g.name == gate)
                .and_then(|g| g.value);
            match value {
                Some(v) if gate == "success-rate" => {
                    self.value.with_label_values(&labels).set(v / 100.0)
                }
                Some(v) => self.value.with_label_values(&labels).set(v / 1000.0),
                None => drop(self.value.remove_label_values(&labels)),
            }
        }
    }

    /// Drops the series of a rollout that is gone.
    pub fn forget(&self, key: &crate::model::ObjectKey) {
        let service = self
            .services
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(service) = service {
            self.remove_series(key, &service);
        }
    }

    fn remove_series(&self, key: &crate::model::ObjectKey, service: &str) {
        let labels = [key.namespace.as_str(), key.name.as_str(), service];
        let _ = self.step.remove_label_values(&labels);
        let _ = self.weight.remove_label_values(&labels);
        for phase in crate::model::Phase::ALL {
            let _ =
                self.phase
                    .remove_label_values(&[labels[0], labels[1], labels[2], phase.as_str()]);
        }
        for gate in ["success-rate", "p99"] {
            let gate_labels = [labels[0], labels[1], labels[2], gate];
            let _ = self.threshold.remove_label_values(&gate_labels);
            let _ = self.value.remove_label_values(&gate_labels);
        }
    }
}
