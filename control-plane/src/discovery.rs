//! The Discovery gRPC service: streams an authority's endpoints to proxies.
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
    Endpoint, EndpointUpdate, Endpoints, NoEndpoints, Removed, Routes, Snapshot, WatchRequest,
};

use crate::metrics::ControllerMetrics;
use crate::store::{parse_authority, ServiceEndpoints, Store};

pub struct DiscoveryService {
    store: Arc<Store>,
    metrics: Arc<ControllerMetrics>,
}

impl DiscoveryService {
    pub fn new(store: Arc<Store>, metrics: Arc<ControllerMetrics>) -> Self {
        Self { store, metrics }
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

    async fn watch_routes(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchRoutesStream>, Status> {
        let authority = request.into_inner().authority;
        if let Err(e) = parse_authority(&authority) {
            return Err(Status::invalid_argument(e.to_string()));
        }
        let mut watch = self.store.watch_routes(&authority);
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
