//! The store's per-authority watches, and the guard that forgets one as
//! soon as its last holder goes away.
//!
//! Any client can ask about any authority, so the set of watched
//! authorities is chosen by clients: a sidecar sending made-up `Host`
//! names must not grow the controller for good. Each holder is counted
//! under the store's lock and the authority is forgotten when the count
//! reaches zero, without waiting for the next store change.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use tokio::sync::watch;

use trellis_proto::discovery::Routes;

use super::{Resolution, Store};

/// One watched authority: its sender and how many guards hold it.
pub(crate) struct Watched<T> {
    pub(crate) sender: watch::Sender<T>,
    /// Counted by hand rather than read from `receiver_count()`: a guard's
    /// receiver is dropped only after its `Drop` has released the lock, so
    /// two guards dropping together could each still see the other's.
    holders: usize,
}

/// What a routes watch is about. Routes depend on who asks as well as on
/// the authority: a consumer route (one in another namespace than its
/// Service) applies only to clients of its own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RoutesKey {
    pub(crate) authority: String,
    pub(crate) client_namespace: String,
}

/// Which of the store's maps a watch belongs to, and its key there.
#[derive(Clone, Debug)]
enum Key {
    Endpoints(String),
    Routes(RoutesKey),
}

/// A watch of one authority's endpoints or routes. Dropping the last guard
/// of an authority forgets the authority at once.
///
/// The receiver is not handed out (no `Deref`), so every subscriber is a
/// counted holder.
pub struct AuthorityWatch<T> {
    receiver: watch::Receiver<T>,
    store: Arc<Store>,
    key: Key,
}

impl<T> AuthorityWatch<T> {
    /// The current value, marked as seen.
    pub fn borrow_and_update(&mut self) -> watch::Ref<'_, T> {
        self.receiver.borrow_and_update()
    }

    /// Whether a value not yet seen is waiting.
    pub fn has_changed(&self) -> Result<bool, watch::error::RecvError> {
        self.receiver.has_changed()
    }

    /// Waits for a value not yet seen.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.receiver.changed().await
    }
}

impl<T> Drop for AuthorityWatch<T> {
    fn drop(&mut self) {
        let mut state = self.store.lock();
        match &self.key {
            Key::Endpoints(authority) => release(&mut state.watches, authority),
            Key::Routes(key) => release(&mut state.route_watches, key),
        }
    }
}

impl Store {
    /// Watches the endpoints of an authority (`name.ns.svc.cluster.local:port`,
    /// `name.ns:port` or `clusterIP:port`).
    pub fn watch(self: &Arc<Self>, authority: &str) -> AuthorityWatch<Resolution> {
        let mut state = self.lock();
        let key = authority.to_string();
        let receiver = match subscribe(&mut state.watches, &key) {
            Some(receiver) => receiver,
            None => {
                let initial = Arc::new(state.resolve(authority));
                start(&mut state.watches, key.clone(), initial)
            }
        };
        self.guard(receiver, Key::Endpoints(key))
    }

    /// Watches the routes of an authority (same forms as [`Store::watch`])
    /// as a client of `client_namespace` sees them.
    pub fn watch_routes(
        self: &Arc<Self>,
        authority: &str,
        client_namespace: &str,
    ) -> AuthorityWatch<Arc<Routes>> {
        let mut state = self.lock();
        let key = RoutesKey {
            authority: authority.to_string(),
            client_namespace: client_namespace.to_string(),
        };
        let receiver = match subscribe(&mut state.route_watches, &key) {
            Some(receiver) => receiver,
            None => {
                let initial = Arc::new(state.routes_for(authority, client_namespace));
                start(&mut state.route_watches, key.clone(), initial)
            }
        };
        self.guard(receiver, Key::Routes(key))
    }

    fn guard<T>(self: &Arc<Self>, receiver: watch::Receiver<T>, key: Key) -> AuthorityWatch<T> {
        AuthorityWatch {
            receiver,
            store: self.clone(),
            key,
        }
    }
}

/// One more holder of `key`'s watch, if it is already watched.
fn subscribe<K: Hash + Eq, T>(
    watches: &mut HashMap<K, Watched<T>>,
    key: &K,
) -> Option<watch::Receiver<T>> {
    let watched = watches.get_mut(key)?;
    watched.holders += 1;
    Some(watched.sender.subscribe())
}

/// The first holder of `key`'s watch.
fn start<K: Hash + Eq, T>(
    watches: &mut HashMap<K, Watched<T>>,
    key: K,
    initial: T,
) -> watch::Receiver<T> {
    let (sender, receiver) = watch::channel(initial);
    watches.insert(key, Watched { sender, holders: 1 });
    receiver
}

/// One holder of `key` went away; forgets the watch with the last.
fn release<K: Hash + Eq, T>(watches: &mut HashMap<K, Watched<T>>, key: &K) {
    let Some(watched) = watches.get_mut(key) else {
        return;
    };
    watched.holders = watched.holders.saturating_sub(1);
    if watched.holders == 0 {
        watches.remove(key);
    }
}
