//! Pods of labelled namespaces without a sidecar, and why.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::Client;
use trellis_control_plane::inject;

use super::{has_proxy, why, Item, Section, UnmeshedPod, WEBHOOK_CONFIGURATION};

/// Every pod in a namespace labelled for injection has the sidecar;
/// those that do not are listed with why.
pub(super) async fn pods_injected(client: &Client, namespace: &str) -> Item {
    let name = "Pods in labelled namespaces have a sidecar";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selector = format!("{}={}", inject::NAMESPACE_LABEL, "enabled");
    let labelled = match namespaces
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            return Item::fail(
                Section::Health,
                name,
                format!("listing namespaces: {}", why(&e)),
                "run meshctl check as a user who may list namespaces and pods",
            )
        }
    };
    let webhook_since = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(WEBHOOK_CONFIGURATION)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.metadata.creation_timestamp)
        .map(|t| t.0);
    let (mut meshed, mut unmeshed) = (0, Vec::new());
    for ns in labelled
        .iter()
        .filter(|ns| ns.metadata.name.as_deref() != Some(namespace))
    {
        let ns_name = ns.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
        let list = match pods.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                return Item::fail(
                    Section::Health,
                    name,
                    format!("listing pods in {ns_name}: {}", why(&e)),
                    "run meshctl check as a user who may list pods",
                )
            }
        };
        let labelled_at = label_time(ns);
        for pod in list {
            let value = serde_json::to_value(&pod).unwrap_or_default();
            if has_proxy(&value) {
                meshed += 1;
                continue;
            }
            let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
            unmeshed.push(why_unmeshed(
                &ns_name,
                namespace,
                &pod,
                &value,
                created,
                labelled_at,
                webhook_since,
            ));
        }
    }
    let failing: Vec<&UnmeshedPod> = unmeshed.iter().filter(|p| !p.intended).collect();
    let detail = format!(
        "{meshed} meshed, {} without a sidecar ({} by choice) in {} labelled namespace(s)",
        unmeshed.len(),
        unmeshed.len() - failing.len(),
        labelled.len()
    );
    let mut item = if failing.is_empty() {
        Item::pass(Section::Health, name, detail)
    } else {
        Item::fail(Section::Health, name, detail, "restart the listed pods' workloads so the webhook injects them (kubectl -n NS rollout restart deployment/NAME), or delete the pods")
    };
    item.pods = unmeshed;
    item
}

pub(super) fn why_unmeshed(
    namespace: &str,
    mesh_namespace: &str,
    pod: &Pod,
    value: &serde_json::Value,
    created: Option<Timestamp>,
    labelled_at: Option<Timestamp>,
    webhook_since: Option<Timestamp>,
) -> UnmeshedPod {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([(inject::NAMESPACE_LABEL.to_string(), "enabled".to_string())]);
    let placement = inject::Placement {
        namespace,
        labels: Some(&labels),
        mesh_namespace,
    };
    let (why, intended) = match inject::select(value, Some(placement)) {
        Err(invalid) => (format!("the webhook refuses its annotations: {invalid}"), false),
        Ok(inject::Selection::Inject) => match (created, labelled_at, webhook_since) {
            (Some(created), Some(labelled), _) if created <= labelled => (
                format!("created {created}, before the namespace was labelled ({labelled})"),
                false,
            ),
            (Some(created), _, Some(installed)) if created <= installed => (
                format!("created {created}, before the webhook was installed ({installed})"),
                false,
            ),
            _ => (
                "the webhook did not inject it when it was created (it was unreachable, or failurePolicy Ignore let the pod through)".to_string(),
                false,
            ),
        },
        Ok(skipped) => (format!("not injected: {}", skipped.explain()), true),
    };
    UnmeshedPod {
        namespace: namespace.to_string(),
        name,
        why,
        intended,
    }
}

/// When the injection label was last set, from the managers' records
/// (`managedFields`); `None` when the API server keeps none.
pub(super) fn label_time(namespace: &Namespace) -> Option<Timestamp> {
    let field = format!("f:{}", inject::NAMESPACE_LABEL);
    namespace
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry
                .fields_v1
                .as_ref()
                .is_some_and(|f| f.0["f:metadata"]["f:labels"].get(&field).is_some())
        })
        .filter_map(|entry| entry.time.as_ref().map(|t| t.0))
        .max()
}
