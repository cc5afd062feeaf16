//! Trellis' `ResiliencePolicy` (`trellis.dev/v1alpha1`): outlier detection
//! and circuit breaking, overriding the proxy's defaults for the Services it
//! targets (Gateway API policy attachment, GEP-713) or for a route rule
//! whose `ExtensionRef` filter names it.
//!
//! Unlike the other kinds, unknown fields are refused: a misspelt
//! `consecutiveFailure` must not quietly leave the default in place.

use serde::{Deserialize, Serialize};

use super::ObjectMeta;

/// `trellis.dev/v1alpha1/ResiliencePolicy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResiliencePolicy {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ResiliencePolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResiliencePolicySpec {
    /// Services in the policy's namespace (Gateway API
    /// `LocalPolicyTargetReference`, so no namespace field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// `""`, the core group, when absent.
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

impl PolicyTargetReference {
    /// The only target Trellis supports: a core-group Service.
    pub fn is_service(&self) -> bool {
        self.group.is_empty() && self.kind == "Service"
    }
}

/// Every field is optional: absent keeps the proxy's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Failures in a row that eject an endpoint; 0 disables ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Gateway API duration, e.g. `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Gateway API duration, e.g. `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<String>,
    /// 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// Requests in flight per endpoint (targetRefs) or per rule (ExtensionRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// The proxy's defaults (documented in the README), which the controller
/// needs only to check that `baseEjectionTime <= maxEjectionTime` still
/// holds when one of them is left out.
pub mod proxy_defaults {
    use std::time::Duration;

    pub const BASE_EJECTION_TIME: Duration = Duration::from_secs(1);
    pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(60);
}
