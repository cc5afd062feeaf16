//! Whether a pod gets a proxy, and if not, why: the one decision both the
//! webhook (which knows the namespace's labels) and `meshctl inject`
//! (which injects whatever it is given, unless the pod itself says no)
//! make.

use std::collections::BTreeMap;

use serde_json::Value;

use super::annotations::{self, AnnotationError};
use super::{INIT_CONTAINER, PROXY_CONTAINER};

/// The namespace label that turns injection on (`enabled`) or off (`disabled`).
pub const NAMESPACE_LABEL: &str = "trellis.dev/inject";

/// Namespaces the mesh never injects: the cluster's own.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// The outcome of [`select`], with the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    Inject,
    /// The namespace is not labelled `trellis.dev/inject=enabled` and the
    /// pod does not opt in.
    NamespaceNotLabelled,
    /// The pod is annotated `trellis.dev/inject: disabled`.
    OptedOut,
    SystemNamespace,
    /// The mesh's own namespace: the controller must start without itself.
    MeshNamespace,
    /// The pod shares the node's network: its iptables are the node's.
    HostNetwork,
    /// A container or init container is named `trellis-proxy` already.
    AlreadyInjected,
}

impl Selection {
    /// The metric label and log field of a skip.
    pub fn reason(self) -> &'static str {
        match self {
            Selection::Inject => "injected",
            Selection::NamespaceNotLabelled => "namespace-not-labelled",
            Selection::OptedOut => "opted-out",
            Selection::SystemNamespace => "system-namespace",
            Selection::MeshNamespace => "mesh-namespace",
            Selection::HostNetwork => "host-network",
            Selection::AlreadyInjected => "already-injected",
        }
    }

    /// Why, in words, for `meshctl inject`'s notes.
    pub fn explain(self) -> &'static str {
        match self {
            Selection::Inject => "injected",
            Selection::NamespaceNotLabelled => {
                "its namespace is not labelled trellis.dev/inject=enabled and it is not annotated trellis.dev/inject: enabled"
            }
            Selection::OptedOut => "it is annotated trellis.dev/inject: disabled",
            Selection::SystemNamespace => "it is in a Kubernetes system namespace",
            Selection::MeshNamespace => "it is in the mesh's own namespace",
            Selection::HostNetwork => "it uses hostNetwork",
            Selection::AlreadyInjected => "it has a trellis-proxy container already",
        }
    }
}

/// Where the pod is, for the webhook's decision. Offline (`meshctl
/// inject`) there is none: the user asked for the injection.
#[derive(Clone, Copy, Debug)]
pub struct Placement<'a> {
    pub namespace: &'a str,
    /// The namespace's labels; `None` if the namespace is not known (yet).
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub mesh_namespace: &'a str,
}

/// Decides for `pod` (a Pod, or a workload's pod template: `metadata` and
/// `spec`). An invalid `trellis.dev/inject` annotation is an error.
pub fn select(pod: &Value, placement: Option<Placement<'_>>) -> Result<Selection, AnnotationError> {
    let choice = annotations::inject_choice(pod.pointer("/metadata/annotations"))?;
    if let Some(placement) = placement {
        if SYSTEM_NAMESPACES.contains(&placement.namespace) {
            return Ok(Selection::SystemNamespace);
        }
        if placement.namespace == placement.mesh_namespace {
            return Ok(Selection::MeshNamespace);
        }
    }
    if pod.pointer("/spec/hostNetwork") == Some(&Value::Bool(true)) {
        return Ok(Selection::HostNetwork);
    }
    if has_container(pod, PROXY_CONTAINER) || has_container(pod, INIT_CONTAINER) {
        return Ok(Selection::AlreadyInjected);
    }
    if choice == Some(false) {
        return Ok(Selection::OptedOut);
    }
    let Some(placement) = placement else {
        return Ok(Selection::Inject);
    };
    let label = placement
        .labels
        .and_then(|labels| labels.get(NAMESPACE_LABEL))
        .map(String::as_str);
    match (label, choice) {
        (Some("enabled"), _) => Ok(Selection::Inject),
        // A namespace that says no is not overruled by its pods.
        (Some("disabled"), _) => Ok(Selection::NamespaceNotLabelled),
        (_, Some(true)) => Ok(Selection::Inject),
        _ => Ok(Selection::NamespaceNotLabelled),
    }
}

/// Whether `containers` or `initContainers` holds one named `name`.
pub fn has_container(pod: &Value, name: &str) -> bool {
    ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|list| pod.pointer(list)?.as_array())
        .flatten()
        .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(annotations: Value, spec: Value) -> Value {
        json!({"metadata": {"name": "p", "annotations": annotations}, "spec": spec})
    }

    #[test]
    fn the_namespace_label_and_the_pod_annotation_decide() {
        let plain = pod(json!({}), json!({"containers": [{"name": "app"}]}));
        let enabled = BTreeMap::from([(NAMESPACE_LABEL.to_string(), "enabled".to_string())]);
        let disabled = BTreeMap::from([(NAMESPACE_LABEL.to_string(), "disabled".to_string())]);
        let none = BTreeMap::new();
        let at = |namespace, labels| {
            Some(Placement {
                namespace,
                labels,
                mesh_namespace: "trellis",
            })
        };
        assert_eq!(
            select(&plain, at("shop", Some(&enabled))),
            Ok(Selection::Inject)
        );
        assert_eq!(
            select(&plain, at("shop", Some(&none))),
            Ok(Selection::NamespaceNotLabelled)
        );
        assert_eq!(
            select(&plain, at("shop", None)),
            Ok(Selection::NamespaceNotLabelled)
        );
        assert_eq!(select(&plain, None), Ok(Selection::Inject), "offline");
        let opt_in = pod(
            json!({"trellis.dev/inject": "enabled"}),
            json!({"containers": []}),
        );
        assert_eq!(
            select(&opt_in, at("shop", Some(&none))),
            Ok(Selection::Inject)
        );
        assert_eq!(
            select(&opt_in, at("shop", Some(&disabled))),
            Ok(Selection::NamespaceNotLabelled)
        );
        let opt_out = pod(json!({"trellis.dev/inject": "disabled"}), json!({}));
        assert_eq!(
            select(&opt_out, at("shop", Some(&enabled))),
            Ok(Selection::OptedOut)
        );
        assert_eq!(select(&opt_out, None), Ok(Selection::OptedOut));
        assert_eq!(
            select(&opt_in, at("kube-system", Some(&enabled))),
            Ok(Selection::SystemNamespace)
        );
        assert_eq!(
            select(&opt_in, at("trellis", Some(&enabled))),
            Ok(Selection::MeshNamespace)
        );
        let host = pod(json!({}), json!({"hostNetwork": true}));
        assert_eq!(select(&host, None), Ok(Selection::HostNetwork));
        for list in ["containers", "initContainers"] {
            let injected = pod(json!({}), json!({ list: [{"name": "trellis-proxy"}] }));
            assert_eq!(
                select(&injected, at("shop", Some(&enabled))),
                Ok(Selection::AlreadyInjected),
                "{list}"
            );
        }
        let bad = pod(json!({"trellis.dev/inject": "true"}), json!({}));
        assert!(select(&bad, None).is_err());
    }
}
