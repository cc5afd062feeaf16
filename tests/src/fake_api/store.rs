//! The objects, like etcd holds them for an API server: one global,
//! increasing resourceVersion; the server sets uid, creationTimestamp and
//! generation; a bounded history of change events, so watches can resume
//! from a recent resourceVersion and older ones get `410 Expired`; paged
//! lists served from a snapshot, so every page is of the same state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ptr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::patch;
use super::resources::Resource;
use super::selector::Selector;
use super::status::ApiError;

/// How many change events are kept for watches resuming from an older
/// resourceVersion (and how many a watch may fall behind before it is ended).
pub const HISTORY_LIMIT: usize = 10_000;
/// How many paged-list snapshots are kept for `continue` tokens.
const SNAPSHOT_LIMIT: usize = 32;
/// The namespaces every cluster starts with.
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as a watch sees it.
#[derive(Debug)]
pub struct Event {
    pub resource_version: u64,
    pub resource: &'static Resource,
    pub event_type: EventType,
    /// The object after the change; for a deletion, the object as it was,
    /// with the resourceVersion of the deletion.
    pub object: Arc<Value>,
    /// The object before the change (for selector transitions).
    pub previous: Option<Arc<Value>>,
}

/// Who writes: API clients follow the API server's rules for `status` (a
/// create or a main-resource update doesn't set it; the `/status`
/// subresource does); the test writes objects whole, as the controllers and
/// kubelets that own `status` in a cluster would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Client,
    Test,
}

/// Which part of an object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Strategic,
    /// Server-side apply, approximated as: create if absent, else merge.
    Apply,
}

pub struct ListPage {
    pub resource_version: u64,
    pub items: Vec<Arc<Value>>,
    pub continue_token: Option<String>,
    pub remaining: usize,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// Synthetic ADDED events for every current object, then changes.
    Now,
    /// Every change after this resourceVersion.
    After(u64),
}

pub struct Subscription {
    pub initial: Vec<Arc<Value>>,
    pub backlog: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
    pub resource_version: u64,
}

struct Snapshot {
    id: u64,
    resource_version: u64,
    items: Arc<Vec<Arc<Value>>>,
}

/// `(namespace or "", name)`.
type Key = (String, String);
/// `(group, plural)`.
type ResourceId = (&'static str, &'static str);

fn id(resource: &'static Resource) -> ResourceId {
    (resource.group, resource.plural)
}

pub struct Store {
    resource_version: u64,
    objects: HashMap<ResourceId, BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Arc<Event>>,
    /// Every change after this resourceVersion is in `history`.
    history_floor: u64,
    events: broadcast::Sender<Arc<Event>>,
    snapshots: VecDeque<Snapshot>,
    next_snapshot: u64,
}

fn key(resource: &Resource, namespace: Option<&str>, name: &str) -> Key {
    let namespace = if resource.namespaced {
        namespace.unwrap_or_default()
    } else {
        ""
    };
    (namespace.to_string(), name.to_string())
}

pub fn rfc3339_now() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

pub fn new_uid() -> String {
    let hex = |n: usize| -> String {
        (0..n)
            .map(|_| char::from_digit(fastrand::u32(0..16), 16).expect("a hex digit"))
            .collect()
    };
    format!("{}-{}-4{}-a{}-{}", hex(8), hex(4), hex(3), hex(3), hex(12))
}

fn without_managed_fields(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(metadata) = object["metadata"].as_object_mut() {
        metadata.remove("managedFields");
    }
    object
}

/// The object without `metadata` and `status`: what `generation` counts.
fn desired_state(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    object
}

fn metadata_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"][field].as_str().filter(|s| !s.is_empty())
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(HISTORY_LIMIT);
        let mut store = Store {
            resource_version: 0,
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_floor: 0,
            events,
            snapshots: VecDeque::new(),
            next_snapshot: 0,
        };
        let namespaces = Resource::by_kind("v1", "Namespace").expect("namespaces are served");
        for name in INITIAL_NAMESPACES {
            let namespace =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            store
                .create(namespaces, None, namespace, Writer::Client)
                .expect("a fresh store takes the initial namespaces");
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    fn table(&mut self, resource: &'static Resource) -> &mut BTreeMap<Key, Arc<Value>> {
        self.objects.entry(id(resource)).or_default()
    }

    pub fn get(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        self.objects
            .get(&id(resource))
            .and_then(|table| table.get(&key(resource, namespace, name)))
            .cloned()
            .ok_or_else(|| ApiError::not_found(resource, name))
    }

    /// Every object of `resource` in `namespace` (all, when `None`) that
    /// `selector` selects, ordered by namespace and name.
    pub fn select(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        selector: &Selector,
    ) -> Vec<Arc<Value>> {
        let Some(table) = self.objects.get(&id(resource)) else {
            return Vec::new();
        };
        table
            .iter()
            .filter(|((ns, _), _)| namespace.is_none_or(|wanted| ns == wanted))
            .filter(|(_, object)| selector.matches(object))
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// Records a change: a new resourceVersion, the table, the history and
    /// the live watches.
    fn record(
        &mut self,
        resource: &'static Resource,
        event_type: EventType,
        key: Key,
        mut object: Value,
    ) -> Arc<Value> {
        self.resource_version += 1;
        let resource_version = self.resource_version;
        object["metadata"]["resourceVersion"] = json!(resource_version.to_string());
        let object = Arc::new(object);
        let previous = if event_type == EventType::Deleted {
            self.table(resource).remove(&key)
        } else {
            self.table(resource).insert(key, object.clone())
        };
        let event = Arc::new(Event {
            resource_version,
            resource,
            event_type,
            object: object.clone(),
            previous,
        });
        self.history.push_back(event.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(oldest) = self.history.pop_front() {
                self.history_floor = oldest.resource_version;
            }
        }
        // No receivers is fine: nobody watches.
        let _ = self.events.send(event);
        object
    }

    fn check_type(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
        if !object.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body of a {} request must be a JSON object",
                resource.kind
            )));
        }
        let api_version = resource.api_version();
        for (field, expected) in [
            ("apiVersion", api_version.as_str()),
            ("kind", resource.kind),
        ] {
            match object[field].as_str() {
                None | Some("") => object[field] = json!(expected),
                Some(actual) if actual == expected => {}
                Some(actual) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {actual:?} does not match the resource {} (expected {expected:?})",
                        resource.qualified()
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        resource: &'static Resource,
        namespace: Option<&str>,
        object: Value,
        writer: Writer,
    ) -> Result<Arc<Value>, ApiError> {
        let (key, object) = self.prepare_create(resource, namespace, object, writer)?;
        Ok(self.record(resource, EventType::Added, key, object))
    }

    /// What `create` would store (`dryRun=All`), without storing it.
    pub fn dry_run_create(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let (_, object) = self.prepare_create(resource, namespace, object, Writer::Client)?;
        Ok(Arc::new(object))
    }

    fn prepare_create(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        mut object: Value,
        writer: Writer,
    ) -> Result<(Key, Value), ApiError> {
        Self::check_type(resource, &mut object)?;
        let name = match (
            metadata_str(&object, "name"),
            metadata_str(&object, "generateName"),
        ) {
            (Some(name), _) => name.to_string(),
            (None, Some(prefix)) => format!("{prefix}{}", fastrand::u32(10_000..100_000)),
            (None, None) => {
                return Err(ApiError::invalid(
                    resource,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ))
            }
        };
        if resource.namespaced {
            let namespace = match (namespace, metadata_str(&object, "namespace")) {
                (Some(url), Some(body)) if url != body => {
                    return Err(ApiError::bad_request(format!(
                        "the namespace of the provided object ({body}) does not match the \
                         namespace sent on the request ({url})"
                    )))
                }
                (Some(ns), _) | (None, Some(ns)) => ns.to_string(),
                (None, None) => "default".to_string(),
            };
            let namespaces = Resource::by_kind("v1", "Namespace").expect("namespaces are served");
            self.get(namespaces, None, &namespace)?;
            object["metadata"]["namespace"] = json!(namespace);
        } else if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("namespace");
        }
        let key = key(resource, metadata_str(&object, "namespace"), &name);
        if self
            .objects
            .get(&id(resource))
            .is_some_and(|table| table.contains_key(&key))
        {
            return Err(ApiError::already_exists(resource, &name));
        }
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        metadata["uid"] = json!(new_uid());
        metadata["creationTimestamp"] = json!(rfc3339_now());
        metadata["generation"] = json!(1);
        if let Some(metadata) = metadata.as_object_mut() {
            metadata.remove("resourceVersion");
        }
        if resource.kind == "Namespace" {
            object["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
            if writer == Writer::Client || object["status"]["phase"].is_null() {
                object["status"] = json!({"phase": "Active"});
            }
        } else if resource.status && writer == Writer::Client {
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
        }
        Ok((key, object))
    }

    /// PUT: replaces the object (or its status), if the resourceVersion the
    /// body carries (if any) is the current one.
    pub fn update(
        &mut self,
        resource: &'static Resource,
        namespace: Option<&str>,
        name: &str,
        mut object: Value,
        part: Part,
        writer: Writer,
    ) -> Result<Arc<Value>, ApiError> {
        Self::check_type(resource, &mut object)?;
        let current = self.get(resource, namespace, name)?;
        match metadata_str(&object, "name") {
            Some(body) if body != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({body}) does not match the name on the URL ({name})"
                )))
            }
            _ => {}
        }
        if let Some(version) = metadata_str(&object, "resourceVersion") {
            if Some(version) != metadata_str(&current, "resourceVersion") {
                return Err(ApiError::conflict(resource, name));
            }
        }
        let mut updated = match part {
            Part::Status => {
                let mut updated = (*current).clone();
                updated["status"] = object["status"].take();
                updated
            }
            Part::Main => {
                if writer == Writer::Client && resource.status {
                    object["status"] = current["status"].clone();
                }
                for field in [
                    "uid",
                    "creationTimestamp",
                    "namespace",
                    "name",
                    "generation",
                ] {
                    object["metadata"][field] = current["metadata"][field].clone();
                }
                object
            }
        };
        if let Some(map) = updated.as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        updated["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        // A write that changes nothing but its own bookkeeping is a no-op.
        if without_managed_fields(&updated) == without_managed_fields(&current) {
            return Ok(current);
        }
        if desired_state(&updated) != desired_state(&current) {
            let generation = current["metadata"]["generation"].as_u64().unwrap_or(0);
            updated["metadata"]["generation"] = json!(generation + 1);
        }
        let key = key(resource, namespace, name);
        Ok(self.record(resource, EventType::Modified, key, updated))
    }

    pub fn patch(
        &mut self,
        resource: &'static Resource,
        namespace: Option<&str>,
        name: &str,
        patch_type: PatchType,
        body: &Value,
        part: Part,
    ) -> Result<Arc<Value>, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("a patch must be a JSON object"));
        }
        let current = match self.get(resource, namespace, name) {
            Err(not_found) if patch_type == PatchType::Apply => {
                return match part {
                    Part::Main => self.create(resource, namespace, body.clone(), Writer::Client),
                    Part::Status => Err(not_found),
                };
            }
            other => other?,
        };
        let mut patched = (*current).clone();
        match patch_type {
            PatchType::Merge | PatchType::Apply => patch::merge(&mut patched, body),
            PatchType::Strategic => patch::strategic(&mut patched, body, resource.kind),
        }
        self.update(resource, namespace, name, patched, part, Writer::Client)
    }

    /// Deletes the object, if `precondition` (a resourceVersion) is absent
    /// or current; deleting a namespace deletes what is in it.
    pub fn delete(
        &mut self,
        resource: &'static Resource,
        namespace: Option<&str>,
        name: &str,
        precondition: Option<&str>,
    ) -> Result<Arc<Value>, ApiError> {
        let current = self.get(resource, namespace, name)?;
        if precondition.is_some_and(|rv| Some(rv) != metadata_str(&current, "resourceVersion")) {
            return Err(ApiError::conflict(resource, name));
        }
        if resource.kind == "Namespace" {
            let contained: Vec<(&'static Resource, Key)> = super::resources::RESOURCES
                .iter()
                .filter(|r| r.namespaced)
                .flat_map(|r| {
                    self.objects
                        .get(&id(r))
                        .into_iter()
                        .flat_map(|table| table.keys())
                        .filter(|(ns, _)| ns == name)
                        .map(move |k| (r, k.clone()))
                })
                .collect();
            for (r, k) in contained {
                let object = Value::clone(&self.table(r)[&k]);
                self.record(r, EventType::Deleted, k, object);
            }
        }
        let key = key(resource, namespace, name);
        Ok(self.record(resource, EventType::Deleted, key, (*current).clone()))
    }

    /// A list, paged when `limit` is set: later pages (`continue_token`)
    /// come from the snapshot the first page was cut from, as etcd serves
    /// them at the first page's revision.
    pub fn list(
        &mut self,
        resource: &'static Resource,
        namespace: Option<&str>,
        selector: &Selector,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let expired = || {
            ApiError::expired(
                "The provided continue parameter is too old to display a consistent list \
                 result. You can start a new list without the continue parameter.",
            )
        };
        let (snapshot_id, offset, resource_version, items) = match continue_token {
            Some(token) => {
                let (id, offset) = token
                    .split_once(':')
                    .and_then(|(id, offset)| {
                        Some((id.parse::<u64>().ok()?, offset.parse::<usize>().ok()?))
                    })
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("continue token {token:?} is not valid"))
                    })?;
                let snapshot = self
                    .snapshots
                    .iter()
                    .find(|s| s.id == id)
                    .filter(|s| s.resource_version >= self.history_floor)
                    .ok_or_else(expired)?;
                (
                    Some(id),
                    offset,
                    snapshot.resource_version,
                    snapshot.items.clone(),
                )
            }
            None => (
                None,
                0,
                self.resource_version,
                Arc::new(self.select(resource, namespace, selector)),
            ),
        };
        let limit = limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let end = offset.saturating_add(limit).min(items.len());
        let page = items.get(offset..end).unwrap_or_default().to_vec();
        let remaining = items.len() - end;
        let continue_token = (remaining > 0).then(|| {
            let id = snapshot_id.unwrap_or_else(|| {
                self.next_snapshot += 1;
                self.snapshots.push_back(Snapshot {
                    id: self.next_snapshot,
                    resource_version,
                    items: items.clone(),
                });
                if self.snapshots.len() > SNAPSHOT_LIMIT {
                    self.snapshots.pop_front();
                }
                self.next_snapshot
            });
            format!("{id}:{end}")
        });
        Ok(ListPage {
            resource_version,
            items: page,
            continue_token,
            remaining,
        })
    }

    /// Starts a watch: what it must send first, and the live changes after.
    pub fn subscribe(
        &self,
        resource: &'static Resource,
        namespace: Option<&str>,
        selector: &Selector,
        start: WatchStart,
    ) -> Result<Subscription, ApiError> {
        let (initial, backlog) = match start {
            WatchStart::Now => (self.select(resource, namespace, selector), Vec::new()),
            WatchStart::After(version) if version < self.history_floor => {
                return Err(ApiError::expired(format!(
                    "too old resource version: {version} ({})",
                    self.history_floor
                )))
            }
            WatchStart::After(version) => {
                let backlog = self
                    .history
                    .iter()
                    .filter(|e| e.resource_version > version && ptr::eq(e.resource, resource))
                    .cloned()
                    .collect();
                (Vec::new(), backlog)
            }
        };
        Ok(Subscription {
            initial,
            backlog,
            live: self.events.subscribe(),
            resource_version: self.resource_version,
        })
    }

    /// Forgets the history (and list snapshots), as an etcd compaction does,
    /// after advancing the resourceVersion as writes to kinds this server
    /// doesn't serve would: so every resourceVersion issued so far, even the
    /// latest, is too old to resume from.
    pub fn expire_history(&mut self) {
        self.resource_version += 1;
        self.history.clear();
        self.snapshots.clear();
        self.history_floor = self.resource_version;
    }
}
