//! Turning ResiliencePolicies into the `Resilience` a proxy applies: a
//! Service's from the policy that targets it, a route rule's from the
//! policy its `ExtensionRef` filter names.

use trellis_proto::discovery::{CircuitBreaker, OutlierDetection, Resilience};

use super::routes::parse_gateway_duration;
use super::State;
use crate::model::{CircuitBreakerSpec, ObjectKey, OutlierDetectionSpec, ResiliencePolicy};

impl State {
    /// The resilience of a Service: from the policy whose `targetRefs` name
    /// it. When several do, the oldest (`creationTimestamp`; none counts as
    /// oldest) wins, then the first by name — Gateway API's rule for
    /// conflicting policies (GEP-713). The winner applies whole; the others
    /// do not apply to that Service.
    pub(crate) fn service_resilience(&self, service: &ObjectKey) -> Option<Resilience> {
        let created = |p: &ResiliencePolicy| p.metadata.creation_timestamp.clone();
        let policy = self
            .policies
            .iter()
            .filter(|(key, policy)| {
                key.namespace == service.namespace
                    && policy
                        .spec
                        .target_refs
                        .iter()
                        .any(|t| t.is_service() && t.name == service.name)
            })
            .min_by(|(a_key, a), (b_key, b)| {
                created(a)
                    .unwrap_or_default()
                    .cmp(&created(b).unwrap_or_default())
                    .then_with(|| a_key.cmp(b_key))
            })
            .map(|(_, policy)| policy)?;
        Some(Resilience {
            outlier_detection: policy
                .spec
                .outlier_detection
                .as_ref()
                .map(outlier_detection),
            circuit_breaker: policy.spec.circuit_breaker.as_ref().map(circuit_breaker),
        })
    }

    /// The resilience of a route rule whose filter names `policy`: only its
    /// circuit breaker, since outlier detection belongs to endpoints (the
    /// backend Service's own policy). Validation refuses a route naming a
    /// policy with outlierDetection, so nothing is dropped silently.
    pub(crate) fn rule_resilience(&self, policy: &ObjectKey) -> Option<Resilience> {
        let policy = self.policies.get(policy)?;
        Some(Resilience {
            outlier_detection: None,
            circuit_breaker: policy.spec.circuit_breaker.as_ref().map(circuit_breaker),
        })
    }
}

fn outlier_detection(spec: &OutlierDetectionSpec) -> OutlierDetection {
    let millis = |d: &Option<String>| {
        d.as_deref()
            .and_then(parse_gateway_duration)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    };
    OutlierDetection {
        consecutive_failures: spec.consecutive_failures,
        base_ejection_ms: millis(&spec.base_ejection_time),
        max_ejection_ms: millis(&spec.max_ejection_time),
        max_ejection_percent: spec.max_ejection_percent,
    }
}

fn circuit_breaker(spec: &CircuitBreakerSpec) -> CircuitBreaker {
    CircuitBreaker {
        max_requests: spec.max_requests,
    }
}

#[cfg(test)]
mod tests;
