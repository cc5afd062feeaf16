//! The in-memory model of the mesh, and the watches that stream it.
//!
//! Every source (the manifest directory, kube-rs watchers) feeds the same
//! `apply` / `delete` / `replace_all`; every consumer subscribes to an
//! authority and gets a `tokio::sync::watch` of its endpoints, forgotten as
//! soon as its last holder drops it. After each change only the watches
//! whose answer changed are woken.

mod authz;
mod resilience;
mod resolve;
mod routes;
mod watches;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::watch;

use trellis_proto::discovery::Routes;

use crate::model::{
    AuthorizationPolicy, EndpointSlice, GrpcRoute, HttpFault, HttpRoute, Namespace, Object,
    ObjectKey, Pod, ResiliencePolicy, Rollout, Service,
};
pub use authz::{DefaultInboundPolicy, EVERY_PORT};
pub use resolve::{parse_authority, AuthorityError, HostRef, ServiceEndpoints};
pub use routes::parse_gateway_duration;
pub use watches::AuthorityWatch;
use watches::{RoutesKey, Watched};

/// What a watch of one authority sees: the Service's endpoints, or `None`
/// when no Service matches.
pub type Resolution = Arc<Option<ServiceEndpoints>>;

/// The mesh's objects and the open watches over them.
pub struct Store {
    state: Mutex<State>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) trust_domain: String,
    pub(crate) namespaces: HashMap<ObjectKey, Namespace>,
    pub(crate) services: HashMap<ObjectKey, Service>,
    pub(crate) slices: HashMap<ObjectKey, EndpointSlice>,
    pub(crate) pods: HashMap<ObjectKey, Pod>,
    pub(crate) routes: HashMap<ObjectKey, HttpRoute>,
    pub(crate) grpc_routes: HashMap<ObjectKey, GrpcRoute>,
    pub(crate) faults: HashMap<ObjectKey, HttpFault>,
    pub(crate) policies: HashMap<ObjectKey, ResiliencePolicy>,
    pub(crate) rollouts: HashMap<ObjectKey, Rollout>,
    pub(crate) authorization_policies: HashMap<ObjectKey, AuthorizationPolicy>,
    /// When the objects last changed, for push-latency metrics.
    changed_at: Option<Instant>,
    /// Bumped at every change, for consumers that re-read the store (rollouts).
    changes: Option<watch::Sender<u64>>,
    watches: HashMap<String, Watched<Resolution>>,
    route_watches: HashMap<RoutesKey, Watched<Arc<Routes>>>,
}

/// How many objects of each kind the store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub namespaces: usize,
    pub services: usize,
    pub endpoint_slices: usize,
    pub pods: usize,
    pub http_routes: usize,
    pub grpc_routes: usize,
    pub http_faults: usize,
    pub resilience_policies: usize,
    pub rollouts: usize,
    pub authorization_policies: usize,
    pub watches: usize,
}

impl Store {
    pub fn new(trust_domain: &str) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                trust_domain: trust_domain.to_string(),
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds or replaces one object.
    pub fn apply(&self, object: Object) {
        let mut state = self.lock();
        state.insert(object);
        state.notify();
    }

    /// Removes one object; unknown keys are ignored.
    pub fn delete(&self, kind: &str, key: &ObjectKey) {
        let mut state = self.lock();
        if state.remove(kind, key) {
            state.notify();
        }
    }

    /// Replaces everything at once (a reload of the manifest directory), so
    /// watchers never see a half-applied state.
    pub fn replace_all(&self, objects: impl IntoIterator<Item = Object>) {
        let mut state = self.lock();
        for kind in Object::KINDS {
            state.clear(kind);
        }
        for object in objects {
            state.insert(object);
        }
        state.notify();
    }

    /// Replaces every object of one kind at once (a watcher's re-list): an
    /// object listed again unchanged wakes no watch, one missing from the
    /// list is gone.
    pub fn replace_kind(&self, kind: &str, objects: impl IntoIterator<Item = Object>) {
        let mut state = self.lock();
        state.clear(kind);
        for object in objects {
            state.insert(object);
        }
        state.notify();
    }

    /// The current routes of an authority for a client of
    /// `client_namespace`, without watching them.
    pub fn routes(&self, authority: &str, client_namespace: &str) -> Routes {
        self.lock().routes_for(authority, client_namespace)
    }

    /// The labels of namespace `name`, if the store holds it.
    pub fn namespace_labels(
        &self,
        name: &str,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        self.lock()
            .namespaces
            .get(&ObjectKey::cluster_scoped(name))
            .map(|namespace| namespace.metadata.labels.clone())
    }

    /// Changes whenever the store's objects change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.lock()
            .changes
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    pub fn rollouts(&self) -> Vec<Rollout> {
        let mut rollouts: Vec<Rollout> = self.lock().rollouts.values().cloned().collect();
        rollouts.sort_by_key(|r| r.metadata.key());
        rollouts
    }

    pub fn rollout(&self, key: &ObjectKey) -> Option<Rollout> {
        self.lock().rollouts.get(key).cloned()
    }

    pub fn service(&self, key: &ObjectKey) -> Option<Service> {
        self.lock().services.get(key).cloned()
    }

    pub fn route(&self, key: &ObjectKey) -> Option<HttpRoute> {
        self.lock().routes.get(key).cloned()
    }

    /// The HTTPRoutes whose parent is Service `service`.
    pub fn routes_of(&self, service: &ObjectKey) -> Vec<HttpRoute> {
        let state = self.lock();
        let mut routes: Vec<HttpRoute> = state
            .routes
            .values()
            .filter(|r| r.service_parents().any(|(parent, _)| parent == *service))
            .cloned()
            .collect();
        routes.sort_by_key(|r| r.metadata.key());
        routes
    }

    /// Every meshed pod that has an IP.
    pub fn meshed_pods(&self) -> Vec<Pod> {
        let mut pods: Vec<Pod> = self
            .lock()
            .pods
            .values()
            .filter(|p| p.is_meshed() && p.status.as_ref().is_some_and(|s| s.pod_ip.is_some()))
            .cloned()
            .collect();
        pods.sort_by_key(|p| p.metadata.key());
        pods
    }

    /// When the store's objects last changed.
    pub fn changed_at(&self) -> Option<Instant> {
        self.lock().changed_at
    }

    /// The current answer for an authority, without watching it.
    pub fn resolve(&self, authority: &str) -> Option<ServiceEndpoints> {
        self.lock().resolve(authority)
    }

    /// Every object, ordered by kind and key (to compare a store with its
    /// source).
    pub fn objects(&self) -> Vec<Object> {
        let state = self.lock();
        let mut objects: Vec<Object> = (state.namespaces.values().cloned().map(Object::Namespace))
            .chain(state.services.values().cloned().map(Object::Service))
            .chain(state.slices.values().cloned().map(Object::EndpointSlice))
            .chain(state.pods.values().cloned().map(Object::Pod))
            .chain(state.routes.values().cloned().map(Object::HttpRoute))
            .chain(state.grpc_routes.values().cloned().map(Object::GrpcRoute))
            .chain(state.faults.values().cloned().map(Object::HttpFault))
            .chain(
                state
                    .policies
                    .values()
                    .cloned()
                    .map(Object::ResiliencePolicy),
            )
            .chain(
                state
                    .rollouts
                    .values()
                    .cloned()
                    .map(|r| Object::Rollout(Box::new(r))),
            )
            .chain(
                state
                    .authorization_policies
                    .values()
                    .cloned()
                    .map(Object::AuthorizationPolicy),
            )
            .collect();
        objects.sort_by_key(|o| (o.kind(), o.key()));
        objects
    }

    pub fn counts(&self) -> Counts {
        let state = self.lock();
        Counts {
            namespaces: state.namespaces.len(),
            services: state.services.len(),
            endpoint_slices: state.slices.len(),
            pods: state.pods.len(),
            http_routes: state.routes.len(),
            grpc_routes: state.grpc_routes.len(),
            http_faults: state.faults.len(),
            resilience_policies: state.policies.len(),
            rollouts: state.rollouts.len(),
            authorization_policies: state.authorization_policies.len(),
            watches: state.watches.len() + state.route_watches.len(),
        }
    }
}

impl State {
    fn insert(&mut self, object: Object) {
        let key = object.key();
        match object {
            Object::Namespace(o) => drop(self.namespaces.insert(key, o)),
            Object::Service(o) => drop(self.services.insert(key, o)),
            Object::EndpointSlice(o) => drop(self.slices.insert(key, o)),
            Object::Pod(o) => drop(self.pods.insert(key, o)),
            Object::HttpRoute(o) => drop(self.routes.insert(key, o)),
            Object::GrpcRoute(o) => drop(self.grpc_routes.insert(key, o)),
            Object::HttpFault(o) => drop(self.faults.insert(key, o)),
            Object::ResiliencePolicy(o) => drop(self.policies.insert(key, o)),
            Object::Rollout(o) => drop(self.rollouts.insert(key, *o)),
            Object::AuthorizationPolicy(o) => drop(self.authorization_policies.insert(key, o)),
        }
    }

    /// Removes one object; whether it was there.
    fn remove(&mut self, kind: &str, key: &ObjectKey) -> bool {
        match kind {
            "Namespace" => self.namespaces.remove(key).is_some(),
            "Service" => self.services.remove(key).is_some(),
            "EndpointSlice" => self.slices.remove(key).is_some(),
            "Pod" => self.pods.remove(key).is_some(),
            "HTTPRoute" => self.routes.remove(key).is_some(),
            "GRPCRoute" => self.grpc_routes.remove(key).is_some(),
            "HTTPFault" => self.faults.remove(key).is_some(),
            "ResiliencePolicy" => self.policies.remove(key).is_some(),
            "Rollout" => self.rollouts.remove(key).is_some(),
            "AuthorizationPolicy" => self.authorization_policies.remove(key).is_some(),
            _ => false,
        }
    }

    fn clear(&mut self, kind: &str) {
        match kind {
            "Namespace" => self.namespaces.clear(),
            "Service" => self.services.clear(),
            "EndpointSlice" => self.slices.clear(),
            "Pod" => self.pods.clear(),
            "HTTPRoute" => self.routes.clear(),
            "GRPCRoute" => self.grpc_routes.clear(),
            "HTTPFault" => self.faults.clear(),
            "ResiliencePolicy" => self.policies.clear(),
            "Rollout" => self.rollouts.clear(),
            "AuthorizationPolicy" => self.authorization_policies.clear(),
            _ => {}
        }
    }

    /// Recomputes every watched authority and wakes the watchers whose answer
    /// changed. (Watches nobody holds are already gone: see `watches`.)
    fn notify(&mut self) {
        self.changed_at = Some(Instant::now());
        if let Some(changes) = &self.changes {
            changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        for (authority, watched) in &self.watches {
            publish(&watched.sender, self.resolve(authority));
        }
        for (key, watched) in &self.route_watches {
            publish(
                &watched.sender,
                self.routes_for(&key.authority, &key.client_namespace),
            );
        }
    }
}

/// Sends `value` only if it differs from what the watchers have.
fn publish<T: PartialEq>(sender: &watch::Sender<Arc<T>>, value: T) {
    sender.send_if_modified(|current| {
        if **current == value {
            return false;
        }
        *current = Arc::new(value);
        true
    });
}

#[cfg(test)]
mod tests;
