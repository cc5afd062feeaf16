//! Trellis' `AuthorizationPolicy` (`trellis.dev/v1alpha1`): who may call
//! the selected pods' ports, and which paths and methods.
//!
//! Like `ResiliencePolicy`, unknown fields are refused: a misspelt
//! `serviceAcount` must not silently allow nobody (or everybody).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ObjectMeta;

/// Namespace annotation naming what a port no policy selects allows.
pub const DEFAULT_INBOUND_POLICY_ANNOTATION: &str = "trellis.dev/default-inbound-policy";

/// `trellis.dev/v1alpha1/AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Pods of the policy's namespace; `{}` (or absent) selects all of them.
    #[serde(default)]
    pub selector: LabelSelector,
    /// Application ports; empty selects every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub mode: PolicyMode,
    /// Any rule allows; no rule allows nobody (the port is default-deny).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<AllowRule>,
}

/// `matchLabels` only: what pods a policy selects.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// Whether it selects every pod (so also one the store does not know).
    pub fn selects_all(&self) -> bool {
        self.match_labels.is_empty()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyMode {
    /// Requests no rule allows are refused.
    #[default]
    Enforce,
    /// Nothing is refused because of this policy; what it would refuse is
    /// counted and logged.
    Audit,
}

/// A caller in `from` AND a request in `to`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowRule {
    /// Any of these callers; required and non-empty.
    #[serde(default)]
    pub from: Vec<CallerSpec>,
    /// Any of these requests; absent: any request (and TCP connections).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RequestSpec>,
}

/// One kind of caller: exactly one field is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CallerSpec {
    /// An exact SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
    /// Any identity of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `true`: any mTLS-verified identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meshed: Option<bool>,
    /// `true`: anyone, with or without an identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountRef {
    pub name: String,
    /// The policy's namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestSpec {
    /// Any of these; empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathSpec>,
    /// Any of these; empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    /// `PathPrefix` (the default) or `Exact`, as in Gateway API.
    #[serde(default = "path_prefix", rename = "type")]
    pub match_type: String,
    pub value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}
