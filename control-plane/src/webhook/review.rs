//! One AdmissionReview in, its answer out: a pure function of the request
//! body, the store's namespaces and the CA's bundle (tested without sockets).

use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};

use crate::identity::Ca;
use crate::inject::{self, InjectError, Injector, Placement, Selection};
use crate::metrics::ControllerMetrics;
use crate::store::Store;

/// The only AdmissionReview version injection handles.
pub const ADMISSION_V1: &str = "admission.k8s.io/v1";

/// A body that is not an AdmissionReview: there is no uid to answer, so
/// the answer is HTTP 400 with this text.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not JSON: {0}; send an AdmissionReview (admission.k8s.io/v1)")]
    NotJson(String),
    #[error("the body is not an AdmissionReview with a request.uid; send an AdmissionReview (admission.k8s.io/v1)")]
    NotAReview,
}

/// How a review was answered, for the metric and the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(Selection),
    /// Refused: the pod's `trellis.dev/*` annotations are invalid.
    Denied,
    /// Allowed untouched with a warning: not something injection handles.
    Invalid(&'static str),
}

impl Outcome {
    /// `(result, reason)` labels of `trellis_controller_injections_total`.
    pub fn labels(self) -> [&'static str; 2] {
        match self {
            Outcome::Injected => ["injected", ""],
            Outcome::Skipped(selection) => ["skipped", selection.reason()],
            Outcome::Denied => ["denied", "invalid-annotation"],
            Outcome::Invalid(reason) => ["invalid", reason],
        }
    }
}

/// Answers admission reviews for one mesh.
pub struct Reviewer {
    pub injector: Injector,
    pub ca: Arc<Ca>,
    pub store: Arc<Store>,
    pub metrics: Arc<ControllerMetrics>,
}

impl Reviewer {
    /// The AdmissionReview answering `body`, or why there is none. Counts it.
    pub fn review(&self, body: &[u8]) -> Result<Value, BadReview> {
        let review: Value =
            serde_json::from_slice(body).map_err(|e| BadReview::NotJson(e.to_string()))?;
        let uid = review
            .pointer("/request/uid")
            .and_then(Value::as_str)
            .filter(|_| review.get("kind").and_then(Value::as_str) == Some("AdmissionReview"))
            .ok_or(BadReview::NotAReview)?;
        let api_version = review
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or(ADMISSION_V1);
        let (outcome, mut response) = self.decide(api_version, &review["request"]);
        self.metrics
            .injections
            .with_label_values(&outcome.labels())
            .inc();
        response["uid"] = json!(uid);
        // Answered in the version asked, so the API server can read a
        // refusal of another version.
        Ok(json!({
            "apiVersion": api_version,
            "kind": "AdmissionReview",
            "response": response,
        }))
    }

    fn decide(&self, api_version: &str, request: &Value) -> (Outcome, Value) {
        let text = |pointer: &str| request.pointer(pointer).and_then(Value::as_str);
        let warn = |reason: &'static str, warning: String| {
            tracing::warn!(uid = text("/uid"), %warning, "admission review not handled");
            (
                Outcome::Invalid(reason),
                json!({"allowed": true, "warnings": [warning]}),
            )
        };
        if api_version != ADMISSION_V1 {
            return warn(
                "version",
                format!("trellis injection handles only {ADMISSION_V1} AdmissionReviews, not {api_version}; the pod was not injected (set admissionReviewVersions: [v1])"),
            );
        }
        let kind = (
            text("/kind/group"),
            text("/kind/version"),
            text("/kind/kind"),
        );
        if kind != (Some(""), Some("v1"), Some("Pod")) {
            return warn(
                "kind",
                format!(
                    "trellis injection handles only v1 Pods, not {}; nothing was injected (the webhook's rules should select pods only)",
                    request.get("kind").unwrap_or(&Value::Null)
                ),
            );
        }
        if text("/operation") != Some("CREATE") {
            return warn(
                "operation",
                "trellis injection handles only CREATE; nothing was injected".into(),
            );
        }
        let pod = &request["object"];
        let Some(namespace) = text("/namespace").or_else(|| text("/object/metadata/namespace"))
        else {
            return warn(
                "pod",
                "the review names no namespace; the pod was not injected".into(),
            );
        };
        let labels = self.store.namespace_labels(namespace);
        let placement = Placement {
            namespace,
            labels: labels.as_ref(),
            mesh_namespace: self.injector.mesh_namespace(),
        };
        let denied = |error: &dyn std::fmt::Display| {
            (
                Outcome::Denied,
                json!({
                    "allowed": false,
                    "status": {
                        "code": 400,
                        "reason": "BadRequest",
                        "message": format!("trellis injection: {error}"),
                    },
                }),
            )
        };
        match inject::select(pod, Some(placement)) {
            Err(e) => denied(&e),
            Ok(Selection::Inject) => {
                match self.injector.patch(pod, namespace, &self.ca.bundle_pem()) {
                    Ok(operations) if operations.is_empty() => (
                        Outcome::Skipped(Selection::AlreadyInjected),
                        json!({"allowed": true}),
                    ),
                    Ok(operations) => {
                        let patch = serde_json::to_vec(&operations).unwrap_or_default();
                        (
                            Outcome::Injected,
                            json!({
                                "allowed": true,
                                "patchType": "JSONPatch",
                                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
                            }),
                        )
                    }
                    Err(InjectError::Annotation(e)) => denied(&e),
                    Err(e) => warn("pod", format!("{e}; the pod was not injected")),
                }
            }
            Ok(skip) => {
                tracing::debug!(
                    namespace,
                    pod = text("/object/metadata/name").or(text("/object/metadata/generateName")),
                    reason = skip.reason(),
                    "not injected"
                );
                (Outcome::Skipped(skip), json!({"allowed": true}))
            }
        }
    }
}
