//! Cluster mode's API for rollouts: the managed HTTPRoute by server-side
//! apply, the status through the Rollout's `/status` subresource.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::Value;

use crate::model::{HttpRoute, Rollout, RolloutStatus, TRELLIS_GROUP};

use super::route::MANAGER;
use super::WriteError;

pub struct ClusterApi {
    pub client: Client,
}

impl ClusterApi {
    fn api(&self, namespace: &str, group: &str, version: &str, kind: &str) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        Api::namespaced_with(self.client.clone(), namespace, &resource)
    }

    /// Replaces the status: fields the new status leaves out are removed.
    pub async fn write_status(
        &self,
        rollout: &Rollout,
        previous: &RolloutStatus,
        status: &RolloutStatus,
    ) -> Result<(), WriteError> {
        let key = rollout.metadata.key();
        // Until the object has a status, `previous` is the default one, and
        // a diff against it would leave out every field still at its
        // default (phase Progressing, step 0): write the whole status.
        let old = match &rollout.status {
            Some(_) => serde_json::to_value(previous).unwrap_or(Value::Null),
            None => Value::Null,
        };
        let new = serde_json::to_value(status).unwrap_or(Value::Null);
        let patch = serde_json::json!({"status": merge_patch(&old, &new)});
        self.api(&key.namespace, TRELLIS_GROUP, "v1alpha1", "Rollout")
            .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        Ok(())
    }

    /// Server-side apply as the rollouts' field manager, forced: the
    /// controller checked the route is this rollout's before writing.
    pub async fn apply_route(&self, route: &HttpRoute) -> Result<(), WriteError> {
        let key = route.metadata.key();
        let params = PatchParams::apply(MANAGER).force();
        self.api(
            &key.namespace,
            "gateway.networking.k8s.io",
            "v1",
            "HTTPRoute",
        )
        .patch(&key.name, &params, &Patch::Apply(route))
        .await?;
        Ok(())
    }
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: removed
/// fields become `null`, arrays are replaced whole.
fn merge_patch(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = serde_json::Map::new();
            for (k, v) in new {
                match old.get(k) {
                    Some(o) if o == v => {}
                    Some(o) => drop(patch.insert(k.clone(), merge_patch(o, v))),
                    None => drop(patch.insert(k.clone(), v.clone())),
                }
            }
            for k in old.keys().filter(|k| !new.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        (_, new) => new.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    #[test]
    fn a_merge_patch_removes_what_is_gone_and_keeps_what_is_equal() {
        let old = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]});
        let new = json!({"a": 1, "b": {"c": 5}, "e": [1]});
        let patch = merge_patch(&old, &new);
        assert_eq!(patch, json!({"b": {"c": 5, "d": null}, "e": [1]}));
        let mut applied = old.clone();
        json_patch::merge(&mut applied, &patch);
        assert_eq!(applied, new);
    }
}
