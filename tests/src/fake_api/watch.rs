//! Watch streams: newline-delimited JSON `WatchEvent`s, sent chunked as
//! changes happen, with bookmarks, timeouts, and `410 Expired` as an ERROR
//! event when the resourceVersion is older than the history.

use std::ptr;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::resources::Resource;
use super::selector::Selector;
use super::store::{Event, EventType, Store, Subscription, WatchStart};
use crate::Paced;

/// How often a watch that allows bookmarks gets one (a real server sends
/// about one a minute; tests want to see them sooner).
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

pub struct WatchRequest {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub start: WatchStart,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: a bookmark marks the end of the initial
    /// ADDED events.
    pub initial_events_end: bool,
    pub timeout: Option<Duration>,
}

/// Starts the watch; its events come out of the returned body. It ends
/// when `ends` changes (dropped watches, a restart), on the timeout, or
/// when the client goes away.
pub fn start(store: &Store, request: WatchRequest, ends: watch::Receiver<u64>) -> Paced {
    let (sender, receiver) = mpsc::channel(64);
    let subscription = store.subscribe(
        request.resource,
        request.namespace.as_deref(),
        &request.selector,
        request.start,
    );
    match subscription {
        Ok(subscription) => {
            tokio::spawn(run(request, subscription, sender, ends));
        }
        Err(expired) => {
            // As a real server does: 200, one ERROR event, end of stream.
            let event = json!({"type": "ERROR", "object": expired.to_status()});
            let _ = sender.try_send(line(&event));
        }
    }
    Paced(receiver)
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    // Written by hand so the (shared) object isn't cloned into a new Value.
    let mut bytes = format!("{{\"type\":\"{event_type}\",\"object\":").into_bytes();
    serde_json::to_writer(&mut bytes, object).expect("JSON values serialize");
    bytes.extend_from_slice(b"}\n");
    Bytes::from(bytes)
}

fn bookmark(resource: &Resource, resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object =
        json!({"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": metadata});
    line(&json!({"type": "BOOKMARK", "object": object}))
}

/// What this watch shows of `event`, if anything: a change that moves an
/// object into or out of the watch's selection is an ADDED or DELETED.
fn view<'a>(event: &'a Event, request: &WatchRequest) -> Option<(&'static str, &'a Value)> {
    if !ptr::eq(event.resource, request.resource) {
        return None;
    }
    let selects = |object: &Value| {
        request
            .namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
            && request.selector.matches(object)
    };
    let now = selects(&event.object);
    let before = event.previous.as_deref().is_some_and(selects);
    let shown = match (event.event_type, before, now) {
        (EventType::Modified, true, true) => EventType::Modified,
        (EventType::Modified, true, false) => EventType::Deleted,
        (EventType::Modified, false, true) => EventType::Added,
        (EventType::Added | EventType::Deleted, _, true) => event.event_type,
        _ => return None,
    };
    Some((shown.as_str(), &event.object))
}

async fn run(
    request: WatchRequest,
    subscription: Subscription,
    sender: mpsc::Sender<Bytes>,
    mut ends: watch::Receiver<u64>,
) {
    let Subscription {
        initial,
        backlog,
        mut live,
        resource_version: mut seen,
    } = subscription;
    let first: Vec<Bytes> = initial
        .iter()
        .map(|object| event_line("ADDED", object))
        .chain(
            (request.initial_events_end && request.bookmarks)
                .then(|| bookmark(request.resource, seen, true)),
        )
        .chain(
            backlog
                .iter()
                .filter_map(|event| view(event, &request))
                .map(|(event_type, object)| event_line(event_type, object)),
        )
        .collect();
    drop((initial, backlog));
    for bytes in first {
        if sender.send(bytes).await.is_err() {
            return;
        }
    }
    let timeout = async {
        match request.timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    let mut bookmarks =
        tokio::time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
    loop {
        let bytes = tokio::select! {
            event = live.recv() => match event {
                Ok(event) if event.resource_version > seen => {
                    seen = event.resource_version;
                    match view(&event, &request) {
                        Some((event_type, object)) => event_line(event_type, object),
                        None => continue,
                    }
                }
                Ok(_) => continue,
                // Lagged: this client fell more than the history behind; a
                // real server ends such a watch too. Closed: the store is gone.
                Err(_) => return,
            },
            _ = bookmarks.tick(), if request.bookmarks => bookmark(request.resource, seen, false),
            _ = &mut timeout => return,
            _ = ends.changed() => return,
            _ = sender.closed() => return,
        };
        if sender.send(bytes).await.is_err() {
            return;
        }
    }
}
