//! A target: the endpoints of one authority, kept up to date from discovery
//! by a background task so the request path only reads a snapshot, and the
//! choice of an endpoint among them (balancing, circuit breaking, outlier
//! detection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::endpoint::{Attempt, EndpointHandle};
use crate::balance;
use crate::discovery::Resolved;
use crate::errors::ProxyError;
use crate::metrics::{Label, Metrics};
use crate::outlier::{Failure, Policy};

/// How long the answer "no such Service" is believed; then the next
/// request asks again.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(2);
/// How many such names keep their watch for that time, so a Service
/// created meanwhile is seen at once (an app that starts before its
/// backend); the rest close theirs at once, so a scanner's or a typo's
/// names cost the controller no stream.
const LINGERING_NOT_FOUND: usize = 64;

/// The watches of names that are no Service, still open.
#[derive(Default)]
pub struct Lingering(AtomicUsize);

#[derive(Clone)]
enum State {
    Pending,
    /// Since when.
    NotFound(Instant),
    Ready(Arc<Endpoints>),
}

/// What a request reads: the Service's names (as the controller named
/// it), how its endpoints are judged, and their handles.
pub struct Endpoints {
    authority: String,
    /// The Service's name and namespace as metric labels, made once.
    names: (Label, Label),
    pub policy: Policy,
    pub handles: Vec<EndpointHandle>,
}

pub struct Target {
    authority: String,
    state: watch::Receiver<State>,
}

impl Target {
    /// Starts following `resolved`; endpoint handles (with their load,
    /// health and connection) survive updates that keep the endpoint. When
    /// no Service matches for [`NOT_FOUND_TTL`], the watch is dropped.
    pub fn spawn(
        authority: &str,
        mut resolved: watch::Receiver<Resolved>,
        metrics: Arc<Metrics>,
        lingering: Arc<Lingering>,
    ) -> Self {
        let (tx, rx) = watch::channel(State::Pending);
        let name = authority.to_string();
        tokio::spawn(async move {
            let mut handles: HashMap<String, EndpointHandle> = HashMap::new();
            loop {
                let state = match &*resolved.borrow_and_update() {
                    Resolved::Pending => State::Pending,
                    Resolved::NotFound => State::NotFound(Instant::now()),
                    Resolved::Endpoints(resolved) => {
                        let mut next = HashMap::new();
                        for (key, endpoint) in &resolved.endpoints {
                            let handle = match handles.remove(key) {
                                Some(h) if h.same_peer(endpoint) => h.updated(endpoint.clone()),
                                _ => EndpointHandle::new(endpoint.clone()),
                            };
                            next.insert(key.clone(), handle);
                        }
                        handles = next;
                        let service = resolved.service.as_ref();
                        if let Some(service) = service {
                            metrics.backend(&service.name, &service.namespace);
                        }
                        let names = match service {
                            Some(s) => (s.name.as_str().into(), s.namespace.as_str().into()),
                            None => {
                                let (name, namespace) = super::service_of(&name);
                                (name.into(), namespace.into())
                            }
                        };
                        State::Ready(Arc::new(Endpoints {
                            authority: name.clone(),
                            names,
                            policy: Policy::from_proto(service.and_then(|s| s.resilience.as_ref())),
                            handles: handles.values().cloned().collect(),
                        }))
                    }
                };
                let not_found = matches!(state, State::NotFound(_));
                tx.send_replace(state);
                let linger = not_found.then(|| lingering.enter()).flatten();
                if not_found && linger.is_none() {
                    return;
                }
                let given_up = async {
                    match linger {
                        Some(_linger) => tokio::time::sleep(NOT_FOUND_TTL).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = resolved.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = given_up => return,
                }
            }
        });
        Self {
            authority: authority.to_string(),
            state: rx,
        }
    }

    /// Whether this answer may still be used: anything but a "not found"
    /// older than [`NOT_FOUND_TTL`] (its watch has closed).
    pub fn fresh(&self) -> bool {
        match *self.state.borrow() {
            State::NotFound(since) => since.elapsed() < NOT_FOUND_TTL,
            _ => true,
        }
    }

    /// The current endpoints; a first request waits for discovery to answer.
    pub async fn endpoints(&self, patience: Duration) -> Result<Arc<Endpoints>, ProxyError> {
        let state = self.state.borrow().clone();
        let state = match state {
            State::Pending => {
                let mut rx = self.state.clone();
                let waited =
                    tokio::time::timeout(patience, rx.wait_for(|s| !matches!(s, State::Pending)))
                        .await;
                match waited {
                    Ok(Ok(state)) => state.clone(),
                    _ => {
                        return Err(ProxyError::DiscoveryTimeout(
                            self.authority.clone(),
                            patience,
                        ))
                    }
                }
            }
            state => state,
        };
        match state {
            State::Ready(endpoints) => Ok(endpoints),
            State::NotFound(_) => Err(ProxyError::UnknownService(self.authority.clone())),
            State::Pending => Err(ProxyError::DiscoveryTimeout(
                self.authority.clone(),
                patience,
            )),
        }
    }
}

impl Lingering {
    /// A place among the lingering watches, if one is free.
    fn enter(self: &Arc<Self>) -> Option<Linger> {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < LINGERING_NOT_FOUND).then_some(n + 1)
            })
            .ok()
            .map(|_| Linger(self.clone()))
    }
}

struct Linger(Arc<Lingering>);

impl Drop for Linger {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoints {
    /// The Service's name and namespace, for metrics: as discovery named
    /// it, or (before it did) as the authority spells it.
    pub fn names(&self) -> &(Label, Label) {
        &self.names
    }

    /// Picks an endpoint for a request, skipping the ones it already failed
    /// on; or says why none can take it.
    pub fn pick(&self, tried: &[SocketAddr]) -> Result<&EndpointHandle, ProxyError> {
        let now = Instant::now();
        let usable = |e: &EndpointHandle| !tried.contains(&e.key()) && e.usable(&self.policy, now);
        if let Some(endpoint) = balance::pick(&self.handles, usable) {
            return Ok(endpoint);
        }
        let candidates: Vec<&EndpointHandle> = self
            .handles
            .iter()
            .filter(|e| e.endpoint().weight > 0 && !tried.contains(&e.key()))
            .collect();
        let name = self.authority.clone();
        if candidates.is_empty() {
            return Err(ProxyError::NoEndpoints(name));
        }
        if candidates.iter().any(|e| e.health().available(now)) {
            Err(ProxyError::Overloaded(name, self.policy.max_requests))
        } else {
            Err(ProxyError::AllEjected(name, candidates.len()))
        }
    }

    /// Records a failed attempt; true when it ejected its endpoint. At most
    /// the policy's share of the endpoints is ejected at once.
    pub fn failed(&self, attempt: Attempt, failure: Failure) -> bool {
        // Counted before the endpoint's own health is locked to record it.
        let ejected = self.handles.iter().filter(|e| e.health().ejected()).count();
        let allowed = self.policy.max_ejection_percent as usize * self.handles.len();
        let may_eject = (ejected + 1) * 100 <= allowed;
        attempt.failed(failure, &self.policy, may_eject)
    }
}
