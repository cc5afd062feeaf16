//! The store's per-authority watches, and the guard that forgets one as
//! soon as its last holder goes away.
//!
//! Any client can ask about any authority, so the set of watched
//! authorities is chosen by clients: a sidecar sending made-up `Host`
//! names must not grow the controller for good. Each holder is counted
//! under the store's lock and the authority is forgotten when the count
//! reaches zero, without waiting for the next store change.

use std::collections::HashMap;
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

/// Which of the store's maps a watch belongs to.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Endpoints,
    Routes,
}

/// A watch of one authority's endpoints or routes. Dropping the last guard
/// of an authority forgets the authority at once.
///
/// The receiver is not handed out (no `Deref`), so every subscriber is a
/// counted holder.
pub struct AuthorityWatch<T> {
    receiver: watch::Receiver<T>,
    store: Arc<Store>,
    authority: String,
    kind: Kind,
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
        match self.kind {
            Kind::Endpoints => release(&mut state.watches, &self.authority),
            Kind::Routes => release(&mut state.route_watches, &self.authority),
        }
    }
}

impl Store {
    /// Watches the endpoints of an authority (`name.ns.svc.cluster.local:port`,
    /// `name.ns:port` or `clusterIP:port`).
    pub fn watch(self: &Arc<Self>, authority: &str) -> AuthorityWatch<Resolution> {
        let mut state = self.lock();
        let receiver = match subscribe(&mut state.watches, authority) {
            Some(receiver) => receiver,
            None => {
                let initial = Arc::new(state.resolve(authority));
                start(&mut state.watches, authority, initial)
            }
        };
        self.guard(receiver, authority, Kind::Endpoints)
    }

    /// Watches the routes of an authority (same forms as [`Store::watch`]).
    pub fn watch_routes(self: &Arc<Self>, authority: &str) -> AuthorityWatch<Arc<Routes>> {
        let mut state = self.lock();
        let receiver = match subscribe(&mut state.route_watches, authority) {
            Some(receiver) => receiver,
            None => {
                let initial = Arc::new(state.routes_for(authority));
                start(&mut state.route_watches, authority, initial)
            }
        };
        self.guard(receiver, authority, Kind::Routes)
    }

    fn guard<T>(
        self: &Arc<Self>,
        receiver: watch::Receiver<T>,
        authority: &str,
        kind: Kind,
    ) -> AuthorityWatch<T> {
        AuthorityWatch {
            receiver,
            store: self.clone(),
            authority: authority.to_string(),
            kind,
        }
    }
}

/// One more holder of `authority`'s watch, if it is already watched.
fn subscribe<T>(
    watches: &mut HashMap<String, Watched<T>>,
    authority: &str,
) -> Option<watch::Receiver<T>> {
    let watched = watches.get_mut(authority)?;
    watched.holders += 1;
    Some(watched.sender.subscribe())
}

/// The first holder of `authority`'s watch.
fn start<T>(
    watches: &mut HashMap<String, Watched<T>>,
    authority: &str,
    initial: T,
) -> watch::Receiver<T> {
    let (sender, receiver) = watch::channel(initial);
    watches.insert(authority.to_string(), Watched { sender, holders: 1 });
    receiver
}

/// One holder of `authority` went away; forgets the watch with the last.
fn release<T>(watches: &mut HashMap<String, Watched<T>>, authority: &str) {
    let Some(watched) = watches.get_mut(authority) else {
        return;
    };
    watched.holders = watched.holders.saturating_sub(1);
    if watched.holders == 0 {
        watches.remove(authority);
    }
}
