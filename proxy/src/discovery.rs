//! The discovery client: gRPC watches of an authority's endpoints and
//! routes, reconnecting with backoff and keeping the last known state while
//! the controller is away. A watch lives as long as someone holds its
//! receiver (the outbound caches, which share one per authority and drop it
//! when the authority goes idle): then its stream is closed, here and in
//! the controller.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Status, Streaming};
use trellis_proto::discovery::discovery_client::DiscoveryClient;
use trellis_proto::discovery::endpoint_update::Kind;
use trellis_proto::discovery::{
    Endpoint, InboundPolicy, InboundPolicyRequest, ServiceInfo, WatchRequest,
};

use crate::metrics::Metrics;
use crate::route::CompiledRoutes;

/// What the proxy knows about an authority's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolved {
    /// No answer from the controller yet.
    Pending,
    /// No Service matches the authority.
    NotFound,
    /// The Service's endpoints (possibly none).
    Endpoints(Arc<ServiceEndpoints>),
}

/// A Service and its endpoints, as the controller last described them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceEndpoints {
    /// Which Service the authority resolved to (a ClusterIP authority
    /// learns its name here).
    pub service: Option<ServiceInfo>,
    /// Keyed by `ip:port`.
    pub endpoints: BTreeMap<String, Endpoint>,
}

/// An authority's routes; `None` until the controller first answers.
pub type RoutesState = Option<Arc<CompiledRoutes>>;

/// Opens watches for the rest of the proxy.
pub struct Discovery {
    client: DiscoveryClient<Channel>,
    identity: String,
    metrics: Arc<Metrics>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Discovery {
    /// `channel` may be lazy: nothing is connected until the first watch.
    pub fn new(channel: Channel, identity: String, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            client: DiscoveryClient::new(channel),
            identity,
            metrics,
        })
    }

    fn request(&self, authority: &str) -> WatchRequest {
        WatchRequest {
            authority: authority.to_string(),
            client_identity: self.identity.clone(),
        }
    }

    /// Starts a watch of an authority's endpoints.
    pub fn endpoints(&self, authority: &str) -> watch::Receiver<Resolved> {
        let (tx, rx) = watch::channel(Resolved::Pending);
        let (client, request) = (self.client.clone(), self.request(authority));
        let stream = Stream::new("endpoints", authority, self.metrics.clone());
        tokio::spawn(follow(
            stream,
            move || {
                let (mut client, request) = (client.clone(), request.clone());
                async move {
                    client
                        .watch_endpoints(request)
                        .await
                        .map(|r| r.into_inner())
                }
            },
            // Each stream starts from nothing: its first message is a snapshot.
            || {
                let mut state = ServiceEndpoints::default();
                move |update: trellis_proto::discovery::EndpointUpdate| {
                    apply(&mut state, update.kind)
                }
            },
            tx,
            Resolved::NotFound,
        ));
        rx
    }

    /// Starts a watch of an authority's routes.
    pub fn routes(&self, authority: &str) -> watch::Receiver<RoutesState> {
        let (tx, rx) = watch::channel(None);
        let (client, request) = (self.client.clone(), self.request(authority));
        let stream = Stream::new("routes", authority, self.metrics.clone());
        tokio::spawn(follow(
            stream,
            move || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.watch_routes(request).await.map(|r| r.into_inner()) }
            },
            || |routes| Some(Some(Arc::new(CompiledRoutes::new(routes)))),
            tx,
            Some(Arc::default()),
        ));
        rx
    }
}

impl Discovery {
    /// Starts the watch of this workload's inbound policy: `request` builds
    /// each (re)connection's request (with a fresh token), `apply` gets
    /// every policy, and `arrived` turns true at the first. The watch lives
    /// as long as someone holds a receiver of `arrived`.
    pub fn inbound_policy<Request, Fut, Apply>(
        &self,
        request: Request,
        apply: Apply,
        arrived: watch::Sender<bool>,
    ) where
        Request: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<InboundPolicyRequest, Status>> + Send + 'static,
        Apply: Fn(InboundPolicy) + Send + Sync + 'static,
    {
        let client = self.client.clone();
        let apply = Arc::new(apply);
        let stream = Stream::new("policy", "inbound", self.metrics.clone());
        tokio::spawn(follow(
            stream,
            move || {
                let (mut client, request) = (client.clone(), request());
                async move {
                    client
                        .watch_inbound_policy(request.await?)
                        .await
                        .map(|r| r.into_inner())
                }
            },
            move || {
                let apply = apply.clone();
                move |policy| {
                    apply(policy);
                    Some(true)
                }
            },
            arrived,
            false,
        ));
    }
}

/// Follows one watch for as long as anyone holds its receiver: opens the
/// stream, applies each message, and on failure keeps the last state and
/// reopens with jittered backoff. `refused` is published when the controller
/// says the authority can never resolve.
async fn follow<M, T, Open, Fut, NewApply, Apply>(
    mut stream_state: Stream,
    open: Open,
    new_apply: NewApply,
    tx: watch::Sender<T>,
    refused: T,
) where
    Open: Fn() -> Fut,
    Fut: Future<Output = Result<Streaming<M>, Status>>,
    NewApply: Fn() -> Apply,
    Apply: FnMut(M) -> Option<T>,
{
    let authority = stream_state.authority.clone();
    let mut backoff = BACKOFF_MIN;
    loop {
        match open().await {
            Ok(mut stream) => {
                stream_state.set(OPEN);
                let mut apply = new_apply();
                loop {
                    let message = tokio::select! {
                        m = stream.message() => m,
                        () = tx.closed() => return,
                    };
                    match message {
                        Ok(Some(message)) => {
                            backoff = BACKOFF_MIN;
                            if let Some(state) = apply(message) {
                                tx.send_replace(state);
                            }
                        }
                        Ok(None) => {
                            tracing::warn!(%authority, "discovery stream ended; keeping the last known state");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(%authority, error = %status.message(), "discovery stream failed; keeping the last known state");
                            break;
                        }
                    }
                }
                stream_state.set(RECONNECTING);
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                tracing::debug!(%authority, error = %status.message(), "the controller refuses this authority");
                tx.send_replace(refused);
                return;
            }
            Err(status) => {
                tracing::debug!(%authority, error = %status.message(), "discovery unavailable")
            }
        }
        let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
        tokio::select! {
            () = tokio::time::sleep(backoff + jitter) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The endpoints of an update that can be dialled: one whose address is no
/// IP or whose port is out of range would otherwise be dialled as
/// `0.0.0.0:0` and fail every request sent to it. The others are dropped,
/// with one warning per update.
fn usable(endpoints: Vec<Endpoint>) -> impl Iterator<Item = Endpoint> {
    let (good, bad): (Vec<Endpoint>, Vec<Endpoint>) = endpoints.into_iter().partition(|e| {
        e.ip.parse::<std::net::IpAddr>().is_ok() && (1..=u32::from(u16::MAX)).contains(&e.port)
    });
    if !bad.is_empty() {
        let examples: Vec<String> = bad
            .iter()
            .take(3)
            .map(|e| format!("{:?}:{}", e.ip, e.port))
            .collect();
        tracing::warn!(
            dropped = bad.len(),
            examples = %examples.join(", "),
            "discovery sent endpoints with an unusable address; ignoring them (check the Service's EndpointSlices)"
        );
    }
    good.into_iter()
}

const OPEN: &str = "open";
const RECONNECTING: &str = "reconnecting";

/// One watch's state in the `discovery_streams` gauge: reconnecting until
/// its stream opens, and out of the gauge once the watch ends.
struct Stream {
    kind: &'static str,
    authority: String,
    state: &'static str,
    metrics: Arc<Metrics>,
}

impl Stream {
    fn new(kind: &'static str, authority: &str, metrics: Arc<Metrics>) -> Self {
        metrics.discovery_stream(kind, None, Some(RECONNECTING));
        Self {
            kind,
            authority: authority.to_string(),
            state: RECONNECTING,
            metrics,
        }
    }

    fn set(&mut self, state: &'static str) {
        if state != self.state {
            self.metrics
                .discovery_stream(self.kind, Some(self.state), Some(state));
            self.state = state;
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.metrics
            .discovery_stream(self.kind, Some(self.state), None);
    }
}

/// Applies one endpoint update to the endpoints of a stream.
fn apply(state: &mut ServiceEndpoints, kind: Option<Kind>) -> Option<Resolved> {
    let key = |e: &Endpoint| format!("{}:{}", e.ip, e.port);
    let endpoints = &mut state.endpoints;
    match kind? {
        Kind::Snapshot(snapshot) => {
            state.service = snapshot.service;
            *endpoints = usable(snapshot.endpoints).map(|e| (key(&e), e)).collect();
        }
        Kind::Add(add) => endpoints.extend(usable(add.endpoints).map(|e| (key(&e), e))),
        Kind::Remove(removed) => {
            for address in removed.addresses {
                endpoints.remove(&address);
            }
        }
        Kind::NoEndpoints(no) => {
            endpoints.clear();
            if !no.exists {
                return Some(Resolved::NotFound);
            }
        }
    }
    Some(Resolved::Endpoints(Arc::new(state.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::discovery::{Endpoints, Snapshot};

    fn endpoint(ip: &str, port: u32) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            port,
            ..Endpoint::default()
        }
    }

    #[test]
    fn endpoints_with_unusable_addresses_are_dropped() {
        let mut state = ServiceEndpoints::default();
        let snapshot = Kind::Snapshot(Snapshot {
            endpoints: vec![
                endpoint("10.0.0.1", 8080),
                endpoint("not-an-ip", 8080),
                endpoint("10.0.0.2", 0),
                endpoint("10.0.0.3", 70_000),
            ],
            ..Snapshot::default()
        });
        let Some(Resolved::Endpoints(resolved)) = apply(&mut state, Some(snapshot)) else {
            panic!("a snapshot resolves");
        };
        let keys: Vec<&String> = resolved.endpoints.keys().collect();
        assert_eq!(keys, ["10.0.0.1:8080"]);
        let add = Kind::Add(Endpoints {
            endpoints: vec![endpoint("", 80), endpoint("fd00::1", 80)],
        });
        let Some(Resolved::Endpoints(resolved)) = apply(&mut state, Some(add)) else {
            panic!("an addition resolves");
        };
        let keys: Vec<&String> = resolved.endpoints.keys().collect();
        assert_eq!(keys, ["10.0.0.1:8080", "fd00::1:80"]);
    }
}
