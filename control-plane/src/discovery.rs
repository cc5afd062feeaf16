//! The Discovery gRPC service: streams an authority's endpoints and routes
//! to proxies, and a workload's inbound authorization policy.
//!
//! A watch sends a full snapshot first, then only what changed (Add/Remove),
//! computed against what this stream last sent.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use trellis_proto::discovery::discovery_server::{Discovery, DiscoveryServer};
use trellis_proto::discovery::endpoint_update::Kind;
use trellis_proto::discovery::{
    Endpoint, EndpointUpdate, Endpoints, InboundPolicy, InboundPolicyRequest, NoEndpoints, Removed,
    Routes, Snapshot, WatchRequest,
};
use trellis_proto::SpiffeId;

use crate::identity::Authenticator;
use crate::metrics::ControllerMetrics;
use crate::store::{parse_authority, ServiceEndpoints, Store};

pub struct DiscoveryService {
    store: Arc<Store>,
    metrics: Arc<ControllerMetrics>,
    /// Checks who asks for an inbound policy; without one, nobody gets one.
    authenticator: Option<Arc<Authenticator>>,
}

impl DiscoveryService {
    pub fn new(store: Arc<Store>, metrics: Arc<ControllerMetrics>) -> Self {
        Self {
            store,
            metrics,
            authenticator: None,
        }
    }

    /// Serves inbound policies to proxies that `authenticator` accepts (the
    /// same proof as for their certificates).
    pub fn with_authenticator(mut self, authenticator: Arc<Authenticator>) -> Self {
        self.authenticator = Some(authenticator);
        self
    }

    /// The proxy's proven identity: policies are served only to a proxy of
    /// the workload's namespace, so one namespace cannot read another's.
    async fn authenticate(&self, request: &InboundPolicyRequest) -> Result<SpiffeId, Status> {
        let Some(authenticator) = &self.authenticator else {
            return Err(Status::unimplemented(
                "this controller serves no inbound policies",
            ));
        };
        let identity: SpiffeId = request
            .identity
            .parse()
            .map_err(|e: trellis_proto::InvalidSpiffeId| Status::invalid_argument(e.to_string()))?;
        authenticator
            .authenticate(&identity, &request.token)
            .await
            .map_err(|refusal| {
                tracing::warn!(identity = %request.identity, reason = refusal.reason(), error = %refusal, "inbound policy refused");
                refusal.status()
            })?;
        Ok(identity)
    }

    pub fn into_server(self) -> DiscoveryServer<Self> {
        DiscoveryServer::new(self)
    }
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchEndpointsStream = Stream<EndpointUpdate>;
    type WatchRoutesStream = Stream<Routes>;
    type WatchInboundPolicyStream = Stream<InboundPolicy>;

    async fn watch_inbound_policy(
        &self,
        request: Request<InboundPolicyRequest>,
    ) -> Result<Response<Self::WatchInboundPolicyStream>, Status> {
        let request = request.into_inner();
        let identity = self.authenticate(&request).await?;
        let (metrics, store) = (self.metrics.clone(), self.store.clone());
        let mut changes = store.changes();
        let (tx, rx) = mpsc::channel(4);
        tracing::debug!(%identity, pod = %request.pod, ip = %request.pod_ip, "inbound policy watch opened");
        tokio::spawn(async move {
            let mut sent: Option<InboundPolicy> = None;
            let mut cause = None;
            loop {
                changes.borrow_and_update();
                let current =
                    store.inbound_policy(&identity.namespace, &request.pod, &request.pod_ip);
                // Most store changes are about other workloads: send only news.
                if sent.as_ref() != Some(&current) {
                    if tx.send(Ok(current.clone())).await.is_err() {
                        return;
                    }
                    metrics.pushed(cause);
                    sent = Some(current);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
                cause = store.changed_at();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn watch_routes(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let request = request.into_inner();
        let authority = request.authority;
        if let Err(e) = parse_authority(&authority) {
            return Err(Status::invalid_argument(e.to_string()));
        }
        // Consumer routes apply to the clients of their namespace, which
        // the proxy's identity names. A proxy without a valid one (a tool)
        // sees producer routes only.
        let client_namespace = request
            .client_identity
            .parse::<SpiffeId>()
            .map(|id| id.namespace)
            .unwrap_or_default();
        let mut watch = self.store.watch_routes(&authority, &client_namespace);
        let (metrics, store) = (self.metrics.clone(), self.store.clone());
        let (tx, rx) = mpsc::channel(4);
        // When the client cancels or disconnects, tonic drops `rx`: the task
        // ends at `tx.closed()` and dropping `watch` releases the authority
        // (tests/watches.rs).
        tokio::spawn(async move {
            // The store change that caused the update (none for the first).
            let mut cause = None;
            loop {
                let routes = (**watch.borrow_and_update()).clone();
                if tx.send(Ok(routes)).await.is_err() {
                    return;
                }
                metrics.pushed(cause);
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
                cause = store.changed_at();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn watch_endpoints(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchEndpointsStream>, Status> {
        let request = request.into_inner();
        let authority = request.authority;
        if let Err(e) = parse_authority(&authority) {
            return Err(Status::invalid_argument(e.to_string()));
        }
        let mut watch = self.store.watch(&authority);
        let (metrics, store) = (self.metrics.clone(), self.store.clone());
        let (tx, rx) = mpsc::channel(16);
        tracing::debug!(%authority, client = %request.client_identity, "endpoint watch opened");
        tokio::spawn(async move {
            let mut sent: Option<ServiceEndpoints> = None;
            let mut cause = None;
            loop {
                let current = (**watch.borrow_and_update()).clone();
                for update in diff(sent.as_ref(), current.as_ref()) {
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                    metrics.pushed(cause);
                }
                sent = current;
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
                cause = store.changed_at();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The updates that take a client from `sent` to `current`.
///
/// A Snapshot starts over whenever the client holds no endpoints (its first
/// message, or after NoEndpoints) or the ServiceInfo changed (another
/// Service behind a ClusterIP, or its ResiliencePolicy), so the client
/// always has the ServiceInfo that goes with its endpoints.
fn diff(
    sent: Option<&ServiceEndpoints>,
    current: Option<&ServiceEndpoints>,
) -> Vec<EndpointUpdate> {
    let update = |kind| EndpointUpdate { kind: Some(kind) };
    let Some(current) = current else {
        return vec![update(Kind::NoEndpoints(NoEndpoints { exists: false }))];
    };
    if current.endpoints.is_empty() {
        // NoEndpoints carries no ServiceInfo: a change of it waits for the
        // Snapshot that brings endpoints back.
        return match sent {
            Some(sent) if sent.endpoints.is_empty() => Vec::new(),
            _ => vec![update(Kind::NoEndpoints(NoEndpoints { exists: true }))],
        };
    }
    let previous = match sent {
        Some(sent) if !sent.endpoints.is_empty() && sent.info() == current.info() => {
            &sent.endpoints
        }
        _ => {
            return vec![update(Kind::Snapshot(Snapshot {
                service: Some(current.info()),
                endpoints: current.endpoints.values().cloned().collect(),
            }))];
        }
    };
    let removed: Vec<String> = previous
        .keys()
        .filter(|k| !current.endpoints.contains_key(*k))
        .cloned()
        .collect();
    let added: Vec<Endpoint> = current
        .endpoints
        .iter()
        .filter(|(k, ep)| previous.get(*k) != Some(ep))
        .map(|(_, ep)| ep.clone())
        .collect();
    let mut updates = Vec::new();
    if !added.is_empty() {
        updates.push(update(Kind::Add(Endpoints { endpoints: added })));
    }
    if !removed.is_empty() {
        updates.push(update(Kind::Remove(Removed { addresses: removed })));
    }
    updates
}

#[cfg(test)]
mod tests;
