//! Trellis' `Rollout` (`trellis.dev/v1alpha1`): a canary or A/B rollout of
//! one Service's traffic from a stable backend to a canary backend, step by
//! step, behind health gates read from the mesh's own metrics.
//!
//! The spec is the user's intent (including `paused`, `promote` and `abort`,
//! which `meshctl rollout` writes); the status is the controller's whole
//! memory of where the rollout is, so a restarted or newly elected
//! controller resumes at the same step. Unknown spec fields are refused, as
//! in `ResiliencePolicy`: a misspelt gate must not quietly gate nothing.

use serde::{Deserialize, Serialize};

use super::{HttpHeaderMatch, ObjectMeta};

/// Annotation on the HTTPRoute a rollout manages, naming the rollout.
pub const ROLLOUT_ANNOTATION: &str = "trellis.dev/rollout";

/// `trellis.dev/v1alpha1/Rollout`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: RolloutSpec,
    /// Written by the controller only (in local mode it lives beside the
    /// manifests, see `rollout::local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RolloutStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The Service clients call (the managed HTTPRoute's parent).
    pub service: String,
    /// The Service port to route, when the Service has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub backends: RolloutBackends,
    /// The HTTPRoute to manage: created if missing, adopted if it exists
    /// and no one else manages it. Default: the rollout's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A/B: a cohort sent to the canary first, before any weight step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab_test: Option<AbTest>,
    /// Canary weights in percent, increasing; after the last one passes the
    /// canary gets 100%.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<RolloutStep>,
    pub analysis: Analysis,
    /// Hold the current step (`meshctl rollout pause` / `resume`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// End step N now, pause and gates or not (`meshctl rollout promote`
    /// writes the current step). Steps already past it are unaffected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<u32>,
    /// Send everything to the stable backend at once, and stop.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort: bool,
}

/// The two backend Services, in the rollout's namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutBackends {
    pub stable: String,
    pub canary: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutStep {
    /// The canary's share, 1–100.
    pub weight: u32,
    /// Absent: the step lasts one gate window. `{}`: wait for `meshctl
    /// rollout promote`. `{duration: 5m}`: at least that long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Pause>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pause {
    /// Gateway API duration (`30s`, `5m`); absent waits for a promote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbTest {
    /// Requests matching every condition go to the canary.
    #[serde(rename = "match")]
    pub cohort: Cohort,
    /// How many passing gate windows the cohort is held for.
    pub windows: u32,
}

/// Who is in the cohort: every listed condition must hold (exact values).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cohort {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeaderMatch>,
    /// Cookies, matched in the `Cookie` header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<NameValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpHeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

/// The gates, evaluated over each window on the canary's requests as its
/// clients' proxies saw them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Analysis {
    /// One gate window (Gateway API duration, e.g. `30s`).
    pub interval: String,
    /// Fewer canary requests in a window than this makes it inconclusive.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    /// Lowest passing success rate, percent (e.g. `99` or `99.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// Highest passing p99 latency (Gateway API duration, e.g. `200ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99: Option<String>,
    #[serde(default)]
    pub rollback: RollbackPolicy,
    /// Inconclusive windows in a row after which the rollout pauses with
    /// a condition saying why.
    #[serde(default = "default_inconclusive_limit")]
    pub inconclusive_limit: u32,
}

/// What a manifest gets for the fields it leaves out.
impl Default for Analysis {
    fn default() -> Self {
        Self {
            interval: String::new(),
            min_requests: default_min_requests(),
            success_rate: None,
            max_p99: None,
            rollback: RollbackPolicy::default(),
            inconclusive_limit: default_inconclusive_limit(),
        }
    }
}

fn default_min_requests() -> u32 {
    20
}

fn default_inconclusive_limit() -> u32 {
    3
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackPolicy {
    /// Failed windows in a row that roll back.
    #[serde(default = "one")]
    pub consecutive_failures: u32,
    /// Failed windows in all that roll back, in a row or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_failures: Option<u32>,
}

fn one() -> u32 {
    1
}

impl Default for RollbackPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 1,
            total_failures: None,
        }
    }
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Moving through its steps.
    #[default]
    Progressing,
    /// Holding its step: by the user, or for lack of data (see conditions).
    Paused,
    /// The canary gets 100%.
    Promoted,
    /// A gate failed: the stable backend gets 100%.
    RolledBack,
    /// `abort`: the stable backend gets 100%.
    Aborted,
    /// The spec cannot be carried out (see conditions); traffic is untouched.
    Invalid,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Progressing,
        Phase::Paused,
        Phase::Promoted,
        Phase::RolledBack,
        Phase::Aborted,
        Phase::Invalid,
    ];

    /// Whether the rollout has ended (nothing changes until the spec does).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack | Phase::Aborted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Paused => "Paused",
            Phase::Promoted => "Promoted",
            Phase::RolledBack => "RolledBack",
            Phase::Aborted => "Aborted",
            Phase::Invalid => "Invalid",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The controller's record of a rollout. Times are RFC 3339 (UTC, ms).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Which run of the rollout this is: its spec's identity (backends,
    /// service, uid); a different one starts over at step 0.
    #[serde(default)]
    pub run: String,
    /// Index into the rollout's stages (the A/B cohort first, if any, then
    /// the weight steps).
    #[serde(default)]
    pub step: u32,
    /// How many stages there are.
    #[serde(default)]
    pub steps: u32,
    /// The canary's share now, percent.
    #[serde(default)]
    pub canary_weight: u32,
    /// Whether the A/B cohort goes to the canary now.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cohort: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_started_at: Option<String>,
    /// When the controller next decides (the current window's end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_decision_at: Option<String>,
    /// Passing windows at this step.
    #[serde(default)]
    pub passed_windows: u32,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default)]
    pub total_failures: u32,
    #[serde(default)]
    pub inconclusive_windows: u32,
    /// The last window's measurements and verdicts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<GateStatus>,
    /// The last window's golden metrics of both backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Golden>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<Golden>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The last decisions, newest last (at most `HISTORY` of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Decision>,
}

/// How many decisions a status keeps.
pub const HISTORY: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Pass,
    Fail,
    /// Not enough data to say: never counts as a pass.
    Inconclusive,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GateStatus {
    /// `success-rate` or `p99`.
    pub name: String,
    /// What passes, as written (`>= 99%`, `<= 200ms`).
    pub threshold: String,
    /// The last window's value, if it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `value`'s unit: `%` or `ms`.
    pub unit: String,
    pub verdict: Verdict,
}

/// Golden metrics of one backend over a window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Golden {
    pub requests: f64,
    /// Percent; absent without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// A Kubernetes-style condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted` (the spec can be carried out) or `Progressing`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// One thing the controller decided, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub time: String,
    pub step: u32,
    pub canary_weight: u32,
    pub reason: String,
    pub message: String,
}

impl Rollout {
    /// The HTTPRoute this rollout manages.
    pub fn route_name(&self) -> &str {
        self.spec.route.as_deref().unwrap_or(&self.metadata.name)
    }
}
