//! The cluster source: one kube-rs watcher per kind the mesh reads, feeding
//! the store through the same interface, and the same reader and checks, as
//! the manifest directory.
//!
//! A watcher lists before it watches, and lists again whenever the watch
//! cannot resume (`410 Gone` after compaction, a dropped watch, an API server
//! that restarted). Each list (`Init`, `InitApply`…, `InitDone`) is buffered
//! and swapped into the store in one step: an object listed again unchanged
//! wakes no proxy, one that is no longer listed is gone, and nothing flaps
//! in between. Failed requests are retried with jittered exponential backoff
//! (kube-runtime's default: 0.8 s doubling to 30 s); watch bookmarks are on,
//! so a resumed watch rarely needs a list.

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::manifest::{self, References};
use crate::model::Object;
use crate::store::Store;

/// At most one "watch failed" line per kind per this period: an API server
/// that is away would otherwise log at every backoff step of every kind.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Watches the cluster into a store.
pub struct ClusterSource {
    client: Client,
    store: Arc<Store>,
    /// The kinds listed at least once.
    synced: watch::Sender<Vec<&'static str>>,
}

impl ClusterSource {
    pub fn new(client: Client, store: Arc<Store>) -> Self {
        Self {
            client,
            store,
            synced: watch::channel(Vec::new()).0,
        }
    }

    /// Returns once every kind has been listed, so the store is complete.
    pub fn synced(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut synced = self.synced.subscribe();
        async move {
            let _ = synced
                .wait_for(|kinds| kinds.len() == Object::KINDS.len())
                .await;
        }
    }

    /// Runs the watchers (forever: they retry on every failure).
    pub async fn run(self) {
        let mut watchers = JoinSet::new();
        let client = &self.client;
        let kinds = Kinds {
            store: &self.store,
            synced: &self.synced,
        };
        watchers.spawn(kinds.follow(Api::<Namespace>::all(client.clone())));
        watchers.spawn(kinds.follow(Api::<Service>::all(client.clone())));
        watchers.spawn(kinds.follow(Api::<EndpointSlice>::all(client.clone())));
        watchers.spawn(kinds.follow(Api::<Pod>::all(client.clone())));
        // Routes as the API server has them: a typed watch would drop the
        // fields gateway-api's types lack (experimental ones, newer ones)
        // before the checks could refuse a route that has them.
        for routes in [
            ApiResource::erase::<HttpRoute>(&()),
            ApiResource::erase::<GrpcRoute>(&()),
        ] {
            watchers.spawn(kinds.follow_dynamic(Api::all_with(client.clone(), &routes), routes));
        }
        // Trellis' own kinds: their JSON goes to the same reader as the
        // manifests' (the model types are the schema).
        for kind in [
            "HTTPFault",
            "ResiliencePolicy",
            "Rollout",
            "AuthorizationPolicy",
        ] {
            let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
                crate::model::TRELLIS_GROUP,
                "v1alpha1",
                kind,
            ));
            watchers
                .spawn(kinds.follow_dynamic(Api::all_with(client.clone(), &resource), resource));
        }
        while watchers.join_next().await.is_some() {}
    }
}

struct Kinds<'a> {
    store: &'a Arc<Store>,
    synced: &'a watch::Sender<Vec<&'static str>>,
}

impl Kinds<'_> {
    /// The watcher of a kind with a Rust type (built-in kinds, Gateway API).
    fn follow<K>(&self, api: Api<K>) -> impl Future<Output = ()> + Send + 'static
    where
        K: Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + Debug
            + Send
            + 'static,
    {
        let kind = kind_name(&K::kind(&()));
        self.watch(kind, K::api_version(&()).into_owned(), api)
    }

    /// The watcher of one of Trellis' own kinds, read as JSON.
    fn follow_dynamic(
        &self,
        api: Api<DynamicObject>,
        resource: ApiResource,
    ) -> impl Future<Output = ()> + Send + 'static {
        self.watch(kind_name(&resource.kind), resource.api_version, api)
    }

    fn watch<K>(
        &self,
        kind: &'static str,
        api_version: String,
        api: Api<K>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
    {
        let store = self.store.clone();
        let synced = self.synced.clone();
        async move {
            let read = |object: &K| read(kind, &api_version, object);
            let events = watcher(api, watcher::Config::default()).default_backoff();
            let mut events = std::pin::pin!(events);
            // The objects of a list in progress.
            let mut listing: Vec<Object> = Vec::new();
            let mut last_logged: Option<Instant> = None;
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(object)) => {
                        listing.extend(read(&object));
                    }
                    Ok(watcher::Event::InitDone) => {
                        let count = listing.len();
                        store.replace_kind(kind, std::mem::take(&mut listing));
                        synced.send_if_modified(|kinds| {
                            let new = !kinds.contains(&kind);
                            if new {
                                kinds.push(kind);
                            }
                            new
                        });
                        tracing::debug!(kind, count, "listed");
                    }
                    Ok(watcher::Event::Apply(object)) => {
                        if let Some(object) = read(&object) {
                            store.apply(object);
                        }
                    }
                    Ok(watcher::Event::Delete(object)) => {
                        // Read like any other, so its key is made alike; one
                        // the checks refuse was never in the store.
                        if let Some(object) = read(&object) {
                            store.delete(kind, &object.key());
                        }
                    }
                    Err(error) => {
                        if last_logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                            last_logged = Some(Instant::now());
                            tracing::warn!(kind, %error, "watching the API server failed; retrying with backoff, serving the last state meanwhile");
                        }
                    }
                }
            }
        }
    }
}

/// The model's name of a kind (the `&'static str` of [`Object::kind`]).
fn kind_name(kind: &str) -> &'static str {
    Object::KINDS
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("unknown")
}

/// An API object in the mesh's model, through the manifests' reader and
/// checks; one the checks refuse is logged and left out.
fn read<K: Serialize>(kind: &'static str, api_version: &str, object: &K) -> Option<Object> {
    let refused = |reason: String| {
        tracing::warn!(kind, %reason, "object refused; fix it in the cluster");
        None
    };
    let mut value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => return refused(e.to_string()),
    };
    // List items may come without their type (the list has it).
    if let Some(fields) = value.as_object_mut() {
        fields
            .entry("apiVersion")
            .or_insert_with(|| api_version.into());
        fields.entry("kind").or_insert_with(|| kind.into());
    }
    match manifest::from_value(value) {
        Ok(Some(object)) => match manifest::check(&object, &References::unchecked()) {
            Ok(()) => Some(object),
            Err(reason) => refused(format!("{object}: {reason}")),
        },
        Ok(None) => None,
        Err(refusal) => refused(refusal.to_string()),
    }
}
