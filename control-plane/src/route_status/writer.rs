//! Cluster mode: the leader keeps every HTTPRoute's `status.parents[]`
//! entries for its Service parents current, through the `/status`
//! subresource.
//!
//! Routes are watched here as the API server has them, refused ones
//! included: those are the ones whose status matters most. Entries of
//! other controllers (a Gateway's, another mesh's) are written back as
//! they were read. A route is written only when its conditions changed, so
//! a write's own watch event settles without another.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::jiff::{Timestamp, Unit};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{status_of_document, Condition, ParentStatus, Refs, CONTROLLER_NAME};
use crate::model::{Object, ObjectKey, ParentReference};
use crate::source::manifest::References;
use crate::store::Store;

/// How long changes gather before statuses are recomputed: endpoints
/// churn, and each recomputation reads the whole store.
const SETTLE: Duration = Duration::from_millis(250);

/// The status writer of one route kind.
pub struct StatusWriter {
    client: Client,
    store: Arc<Store>,
    leader: watch::Receiver<bool>,
    resource: ApiResource,
}

impl StatusWriter {
    /// For HTTPRoutes.
    pub fn http_routes(client: Client, store: Arc<Store>, leader: watch::Receiver<bool>) -> Self {
        let resource = ApiResource::erase::<gateway_api::httproutes::HttpRoute>(&());
        Self::new(client, store, leader, resource)
    }

    /// For GRPCRoutes.
    pub fn grpc_routes(client: Client, store: Arc<Store>, leader: watch::Receiver<bool>) -> Self {
        let resource = ApiResource::erase::<gateway_api::grpcroutes::GrpcRoute>(&());
        Self::new(client, store, leader, resource)
    }

    fn new(
        client: Client,
        store: Arc<Store>,
        leader: watch::Receiver<bool>,
        resource: ApiResource,
    ) -> Self {
        Self {
            client,
            store,
            leader,
            resource,
        }
    }

    fn api(&self, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &self.resource),
            None => Api::all_with(self.client.clone(), &self.resource),
        }
    }

    /// Runs for the controller's life.
    pub async fn run(mut self) {
        let events = watcher(self.api(None), watcher::Config::default()).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut changes = self.store.changes();
        let mut routes: BTreeMap<ObjectKey, Value> = BTreeMap::new();
        let mut listing: BTreeMap<ObjectKey, Value> = BTreeMap::new();
        let mut dirty = false;
        loop {
            let leading = *self.leader.borrow();
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { return };
                    match event {
                        Ok(Event::Init) => listing.clear(),
                        Ok(Event::InitApply(o)) => drop(listing.insert(key_of(&o), to_json(&o))),
                        Ok(Event::InitDone) => routes = std::mem::take(&mut listing),
                        Ok(Event::Apply(o)) => drop(routes.insert(key_of(&o), to_json(&o))),
                        Ok(Event::Delete(o)) => drop(routes.remove(&key_of(&o))),
                        Err(error) => tracing::debug!(kind = %self.resource.kind, %error, "watching routes for their status failed; retrying"),
                    }
                    dirty = true;
                }
                changed = changes.changed() => {
                    if changed.is_err() { return }
                    dirty = true;
                }
                changed = self.leader.changed() => {
                    if changed.is_err() { return }
                    dirty = true;
                }
                () = tokio::time::sleep(SETTLE), if dirty && leading => {
                    dirty = false;
                    self.write_all(&routes).await;
                }
            }
        }
    }

    /// Writes the status of every route whose conditions changed.
    async fn write_all(&self, routes: &BTreeMap<ObjectKey, Value>) {
        let objects = self.store.objects();
        let all: Vec<&Object> = objects.iter().collect();
        let references = References::loaded(&all);
        let now = Timestamp::now()
            .round(Unit::Second)
            .unwrap_or(Timestamp::now());
        for (key, route) in routes {
            let desired = status_of_document(route, &references, Refs::Report);
            let Some(parents) = updated_parents(route, &desired, now) else {
                continue;
            };
            let patch = json!({"status": {"parents": parents}});
            let written = self
                .api(Some(&key.namespace))
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(patch))
                .await;
            match written {
                Ok(_) => tracing::debug!(route = %key, "route status written"),
                Err(error) => {
                    tracing::warn!(route = %key, %error, "writing the route's status failed; retrying at the next change")
                }
            }
        }
    }
}

fn key_of(object: &DynamicObject) -> ObjectKey {
    ObjectKey::new(
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default(),
    )
}

fn to_json(object: &DynamicObject) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// The route's new `status.parents`, or `None` when Trellis' entries
/// already say what `desired` says for this generation.
fn updated_parents(route: &Value, desired: &[ParentStatus], now: Timestamp) -> Option<Vec<Value>> {
    let generation = route
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let current: Vec<Value> = route
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (ours, others): (Vec<Value>, Vec<Value>) = current
        .into_iter()
        .partition(|p| p.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME));
    let entries: Vec<Value> = desired
        .iter()
        .map(|parent| {
            let previous = ours.iter().find(|p| same_parent(p, parent));
            let conditions: Vec<Value> = [&parent.accepted, &parent.resolved_refs]
                .into_iter()
                .map(|c| condition(c, generation, previous, now))
                .collect();
            json!({
                "parentRef": status_ref(&parent.parent_ref),
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions,
            })
        })
        .collect();
    if entries == ours {
        return None;
    }
    Some(others.into_iter().chain(entries).collect())
}

fn same_parent(entry: &Value, parent: &ParentStatus) -> bool {
    entry.get("parentRef") == Some(&status_ref(&parent.parent_ref))
}

/// A Service parentRef with its group and kind spelled out: in status, an
/// absent group defaults to Gateway API's own, which would name a Gateway.
fn status_ref(parent: &ParentReference) -> Value {
    let mut reference = json!({"group": "", "kind": "Service", "name": parent.name});
    if let Some(namespace) = &parent.namespace {
        reference["namespace"] = json!(namespace);
    }
    if let Some(port) = parent.port {
        reference["port"] = json!(port);
    }
    reference
}

/// A condition as the API stores it; its transition time is kept while
/// its status stays the same.
fn condition(c: &Condition, generation: i64, previous: Option<&Value>, now: Timestamp) -> Value {
    let since = previous
        .and_then(|p| p.get("conditions")?.as_array())
        .and_then(|list| {
            list.iter().find(|old| {
                old.get("type").and_then(Value::as_str) == Some(c.kind)
                    && old.get("status").and_then(Value::as_str) == Some(c.status)
            })
        })
        .and_then(|old| old.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now.to_string()));
    json!({
        "type": c.kind,
        "status": c.status,
        "reason": c.reason,
        "message": c.message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}
