//! A target: the endpoints of one authority, kept up to date from discovery
//! by a background task so the request path only reads a snapshot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::endpoint::EndpointHandle;
use crate::discovery::Resolved;
use crate::errors::ProxyError;
use trellis_proto::discovery::ServiceInfo;

#[derive(Clone)]
enum State {
    Pending,
    NotFound,
    Ready(Arc<Endpoints>),
}

/// What a request reads: the Service (when the controller named it) and
/// the handles of its endpoints.
pub struct Endpoints {
    pub service: Option<ServiceInfo>,
    pub handles: Vec<EndpointHandle>,
}

pub struct Target {
    authority: String,
    state: watch::Receiver<State>,
}

impl Target {
    /// Starts following `resolved`; endpoint handles (with their load and
    /// connection) survive updates that keep the endpoint.
    pub fn spawn(authority: &str, mut resolved: watch::Receiver<Resolved>) -> Self {
        let (tx, rx) = watch::channel(State::Pending);
        tokio::spawn(async move {
            let mut handles: HashMap<String, EndpointHandle> = HashMap::new();
            loop {
                let state = match &*resolved.borrow_and_update() {
                    Resolved::Pending => State::Pending,
                    Resolved::NotFound => State::NotFound,
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
                        State::Ready(Arc::new(Endpoints {
                            service: resolved.service.clone(),
                            handles: handles.values().cloned().collect(),
                        }))
                    }
                };
                tx.send_replace(state);
                tokio::select! {
                    changed = resolved.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Self {
            authority: authority.to_string(),
            state: rx,
        }
    }

    /// The Service discovery resolved the authority to, if it answered yet.
    pub fn service(&self) -> Option<ServiceInfo> {
        match &*self.state.borrow() {
            State::Ready(endpoints) => endpoints.service.clone(),
            _ => None,
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
            State::NotFound => Err(ProxyError::UnknownService(self.authority.clone())),
            State::Pending => Err(ProxyError::DiscoveryTimeout(
                self.authority.clone(),
                patience,
            )),
        }
    }
}
