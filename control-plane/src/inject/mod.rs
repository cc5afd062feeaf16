//! Sidecar injection, shared by the admission webhook (`crate::webhook`)
//! and `meshctl inject`: whether a pod gets a proxy ([`select`]), what is
//! added ([`sidecar`]), as a JSONPatch ([`patch`]), and how it is taken out
//! again ([`uninject`]).
//!
//! Pods are handled as `serde_json::Value`, never as typed structs, so
//! fields this code does not know (a newer Kubernetes' or a CRD's) pass
//! through untouched. A workload's pod template (`metadata` + `spec`) is
//! handled as a pod.

pub mod annotations;
pub mod config;
pub mod patch;
pub mod select;
pub mod sidecar;

use serde_json::{json, Value};

pub use annotations::AnnotationError;
pub use config::{Config, ConfigError};
pub use patch::{Operation, PatchError};
pub use select::{has_container, select, Placement, Selection, NAMESPACE_LABEL};

use sidecar::{Parts, Workload};

pub use crate::model::PROXY_CONTAINER;
/// The init container that installs the iptables rules.
pub const INIT_CONTAINER: &str = "trellis-init";
/// The projected service-account token (audience `trellis.dev`).
pub const TOKEN_VOLUME: &str = "trellis-token";
/// `/run` of `trellis-init`, for the xtables lock.
pub const XTABLES_VOLUME: &str = "trellis-xtables";

/// What `trellis.dev/injected-by` records.
pub const VERSION: &str = concat!("trellis-", env!("CARGO_PKG_VERSION"));

/// A pod that cannot be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A `trellis.dev/*` annotation is invalid: the pod's author must fix it.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// The object does not have a pod's shape where injection writes.
    #[error("the pod cannot be read: {field} is {found}, expected {expected}")]
    Shape {
        field: &'static str,
        found: &'static str,
        expected: &'static str,
    },
    /// The patch does not fit the pod (a shape [`check_shape`] let through).
    #[error("the pod cannot be read: {0}")]
    Patch(#[from] PatchError),
}

/// Injects proxies for one mesh: its namespace, trust domain and
/// configuration.
#[derive(Debug)]
pub struct Injector {
    parts: Parts,
    mesh_namespace: String,
    trust_domain: String,
}

impl Injector {
    pub fn new(config: Config, mesh_namespace: &str, trust_domain: &str) -> Self {
        Self {
            parts: Parts::new(config, mesh_namespace, trust_domain),
            mesh_namespace: mesh_namespace.to_string(),
            trust_domain: trust_domain.to_string(),
        }
    }

    pub fn config(&self) -> &Config {
        self.parts.config()
    }

    pub fn mesh_namespace(&self) -> &str {
        &self.mesh_namespace
    }

    /// The operations that inject `pod`, running in `namespace`, with
    /// proxies trusting `trust_bundle` (PEM). Empty if it has a proxy
    /// already (injection is idempotent). Does not [`select`]: callers decide.
    pub fn patch(
        &self,
        pod: &Value,
        namespace: &str,
        trust_bundle: &str,
    ) -> Result<Vec<Operation>, InjectError> {
        if has_container(pod, PROXY_CONTAINER) {
            return Ok(Vec::new());
        }
        check_shape(pod)?;
        let overrides = annotations::overrides(pod.pointer("/metadata/annotations"))?;
        let workload = self.workload(pod, namespace);
        let [init, proxy] = self
            .parts
            .init_containers(&workload, trust_bundle, &overrides);
        let [token, xtables] = self.parts.volumes().clone();
        let injected_by = json!({ annotations::INJECTED_BY: VERSION });

        let mut operations = Vec::with_capacity(5);
        operations.push(
            match (pod.get("metadata"), pod.pointer("/metadata/annotations")) {
                (None | Some(Value::Null), _) => {
                    Operation::add("/metadata", json!({ "annotations": injected_by }))
                }
                (_, None | Some(Value::Null)) => {
                    Operation::add("/metadata/annotations", injected_by)
                }
                _ => Operation::add(
                    format!(
                        "/metadata/annotations/{}",
                        patch::escape(annotations::INJECTED_BY)
                    ),
                    json!(VERSION),
                ),
            },
        );
        // `add /spec/initContainers/0` fails on a pod without the array.
        if is_absent(pod.pointer("/spec/initContainers")) {
            operations.push(Operation::add("/spec/initContainers", json!([init, proxy])));
        } else {
            // Both first, init before proxy: the rules must be in place
            // before anything (the proxy included) opens a connection.
            operations.push(Operation::add("/spec/initContainers/0", proxy));
            operations.push(Operation::add("/spec/initContainers/0", init));
        }
        if is_absent(pod.pointer("/spec/volumes")) {
            operations.push(Operation::add("/spec/volumes", json!([token, xtables])));
        } else {
            operations.push(Operation::add("/spec/volumes/-", token));
            operations.push(Operation::add("/spec/volumes/-", xtables));
        }
        Ok(operations)
    }

    /// Injects `pod` in place (see [`patch`](Self::patch)); returns whether
    /// it changed.
    pub fn inject(
        &self,
        pod: &mut Value,
        namespace: &str,
        trust_bundle: &str,
    ) -> Result<bool, InjectError> {
        let operations = self.patch(pod, namespace, trust_bundle)?;
        patch::apply(pod, &operations)?;
        Ok(!operations.is_empty())
    }

    /// Identity from the namespace and service account; the workload's
    /// name and version from the usual labels.
    fn workload(&self, pod: &Value, namespace: &str) -> Workload {
        let text = |pointer: &str| pod.pointer(pointer).and_then(Value::as_str);
        let label = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| text(&format!("/metadata/labels/{}", patch::escape(name))))
                .map(str::to_string)
        };
        let service_account = text("/spec/serviceAccountName")
            .or_else(|| text("/spec/serviceAccount"))
            .unwrap_or("default");
        let identity = trellis_proto::SpiffeId::new(&self.trust_domain, namespace, service_account);
        Workload {
            identity: identity.to_string(),
            name: label(&["app.kubernetes.io/name", "app"])
                .unwrap_or_else(|| service_account.to_string()),
            version: label(&["app.kubernetes.io/version", "version"]),
        }
    }
}

fn is_absent(value: Option<&Value>) -> bool {
    matches!(value, None | Some(Value::Null))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Where injection writes, the pod must have objects and arrays.
fn check_shape(pod: &Value) -> Result<(), InjectError> {
    let expect = |field: &'static str, value: Option<&Value>, array: bool| {
        let ok = match value {
            None | Some(Value::Null) => field != "spec",
            Some(Value::Array(_)) => array,
            Some(Value::Object(_)) => !array,
            Some(_) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(InjectError::Shape {
                field,
                found: value.map_or("missing", kind_of),
                expected: if array { "an array" } else { "an object" },
            })
        }
    };
    if !pod.is_object() {
        return Err(InjectError::Shape {
            field: "the object",
            found: kind_of(pod),
            expected: "an object",
        });
    }
    expect("metadata", pod.get("metadata"), false)?;
    expect(
        "metadata.annotations",
        pod.pointer("/metadata/annotations"),
        false,
    )?;
    expect("spec", pod.get("spec"), false)?;
    expect(
        "spec.initContainers",
        pod.pointer("/spec/initContainers"),
        true,
    )?;
    expect("spec.volumes", pod.pointer("/spec/volumes"), true)
}

/// Takes out exactly what injection added, in place: the two init
/// containers, the two volumes, the `injected-by` annotation, and the
/// lists and maps injection created. Returns whether anything changed.
pub fn uninject(pod: &mut Value) -> bool {
    let mut changed = false;
    let mut remove_named = |list: &str, names: [&str; 2]| {
        let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
            return;
        };
        let Some(Value::Array(items)) = spec.get_mut(list) else {
            return;
        };
        let before = items.len();
        items.retain(|c| !names.contains(&c.get("name").and_then(Value::as_str).unwrap_or("")));
        if items.len() != before {
            changed = true;
            if items.is_empty() {
                spec.remove(list);
            }
        }
    };
    remove_named("initContainers", [INIT_CONTAINER, PROXY_CONTAINER]);
    remove_named("volumes", [TOKEN_VOLUME, XTABLES_VOLUME]);
    if let Some(metadata) = pod.get_mut("metadata").and_then(Value::as_object_mut) {
        if let Some(Value::Object(annotations)) = metadata.get_mut("annotations") {
            if annotations.remove(annotations::INJECTED_BY).is_some() {
                changed = true;
                if annotations.is_empty() {
                    metadata.remove("annotations");
                }
            }
        }
        if metadata.is_empty() {
            if let Some(object) = pod.as_object_mut() {
                object.remove("metadata");
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests;
