//! Checks on ResiliencePolicies before they may serve: each problem names
//! the field and what to write instead.

use std::time::Duration;

use crate::model::{proxy_defaults, OutlierDetectionSpec, ResiliencePolicy};
use crate::store::parse_gateway_duration;

/// Why a ResiliencePolicy was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The spec sets nothing, so the policy would change nothing.
    #[error("spec has neither outlierDetection nor circuitBreaker; set one, or delete the policy")]
    Empty,
    /// A targetRef names something other than a core-group Service.
    #[error(
        "spec.targetRefs[{index}]: group {group:?} kind {kind:?} cannot be targeted; use group \"\", kind Service"
    )]
    TargetKind {
        index: usize,
        group: String,
        kind: String,
    },
    /// A targetRef has an empty name.
    #[error("spec.targetRefs[{index}].name is empty; name a Service in the policy's namespace")]
    TargetName { index: usize },
    /// Outlier detection applies only through targetRefs (a route's
    /// ExtensionRef takes only the circuit breaker), and there are none.
    #[error(
        "spec.outlierDetection applies to the Services in spec.targetRefs, and there are none; \
         add targetRefs (a route's ExtensionRef filter takes only circuitBreaker)"
    )]
    OutlierDetectionWithoutTargets,
    /// A duration that is not in Gateway API format.
    #[error("spec.outlierDetection.{field}: {value:?} is not a duration like 1s or 500ms")]
    BadDuration { field: &'static str, value: String },
    /// A duration of zero.
    #[error("spec.outlierDetection.{field}: {value:?} must be longer than 0")]
    ZeroDuration { field: &'static str, value: String },
    /// The first ejection would be longer than the longest one allowed.
    #[error(
        "spec.outlierDetection: baseEjectionTime {base} is longer than maxEjectionTime {max}; \
         lower baseEjectionTime or raise maxEjectionTime"
    )]
    BaseAboveMax { base: String, max: String },
    /// A share of endpoints above 100%.
    #[error("spec.outlierDetection.maxEjectionPercent {0} is not 0-100")]
    Percent(u32),
    /// Ejection is disabled, yet fields that tune it are set.
    #[error(
        "spec.outlierDetection: consecutiveFailures 0 disables ejection, so {fields} would have \
         no effect; remove them or set consecutiveFailures to 1 or more"
    )]
    DisabledButTuned { fields: String },
    /// A circuit breaker that would shed every request.
    #[error("spec.circuitBreaker.maxRequests 0 would refuse every request; use 1 or more")]
    ZeroMaxRequests,
}

pub fn validate_policy(policy: &ResiliencePolicy) -> Result<(), PolicyError> {
    let spec = &policy.spec;
    if spec.outlier_detection.is_none() && spec.circuit_breaker.is_none() {
        return Err(PolicyError::Empty);
    }
    for (index, target) in spec.target_refs.iter().enumerate() {
        if !target.is_service() {
            return Err(PolicyError::TargetKind {
                index,
                group: target.group.clone(),
                kind: target.kind.clone(),
            });
        }
        if target.name.is_empty() {
            return Err(PolicyError::TargetName { index });
        }
    }
    if let Some(outlier) = &spec.outlier_detection {
        if spec.target_refs.is_empty() {
            return Err(PolicyError::OutlierDetectionWithoutTargets);
        }
        validate_outlier_detection(outlier)?;
    }
    if let Some(breaker) = &spec.circuit_breaker {
        if breaker.max_requests == Some(0) {
            return Err(PolicyError::ZeroMaxRequests);
        }
    }
    Ok(())
}

fn validate_outlier_detection(outlier: &OutlierDetectionSpec) -> Result<(), PolicyError> {
    if outlier.consecutive_failures == Some(0) {
        let tuned: Vec<&str> = [
            ("baseEjectionTime", outlier.base_ejection_time.is_some()),
            ("maxEjectionTime", outlier.max_ejection_time.is_some()),
            ("maxEjectionPercent", outlier.max_ejection_percent.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, set)| set.then_some(field))
        .collect();
        if !tuned.is_empty() {
            return Err(PolicyError::DisabledButTuned {
                fields: tuned.join(", "),
            });
        }
    }
    let base = duration("baseEjectionTime", outlier.base_ejection_time.as_deref())?;
    let max = duration("maxEjectionTime", outlier.max_ejection_time.as_deref())?;
    // A field left out takes the proxy's default, which must still fit.
    let shown = |value: Option<&String>, default: Duration| match value {
        Some(v) => v.clone(),
        None => format!("{}s (the proxy's default)", default.as_secs()),
    };
    let effective_base = base.unwrap_or(proxy_defaults::BASE_EJECTION_TIME);
    let effective_max = max.unwrap_or(proxy_defaults::MAX_EJECTION_TIME);
    if effective_base > effective_max {
        return Err(PolicyError::BaseAboveMax {
            base: shown(
                outlier.base_ejection_time.as_ref(),
                proxy_defaults::BASE_EJECTION_TIME,
            ),
            max: shown(
                outlier.max_ejection_time.as_ref(),
                proxy_defaults::MAX_EJECTION_TIME,
            ),
        });
    }
    if let Some(percent) = outlier.max_ejection_percent.filter(|p| *p > 100) {
        return Err(PolicyError::Percent(percent));
    }
    Ok(())
}

/// A set duration, parsed and longer than zero.
fn duration(field: &'static str, value: Option<&str>) -> Result<Option<Duration>, PolicyError> {
    let Some(value) = value else {
        return Ok(None);
    };
    match parse_gateway_duration(value) {
        None => Err(PolicyError::BadDuration {
            field,
            value: value.to_string(),
        }),
        Some(Duration::ZERO) => Err(PolicyError::ZeroDuration {
            field,
            value: value.to_string(),
        }),
        Some(d) => Ok(Some(d)),
    }
}

#[cfg(test)]
mod tests;
