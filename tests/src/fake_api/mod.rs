//! A fake Kubernetes API server for tests: no real API server runs in the
//! tests, so the cluster path is tested against this one, which speaks the
//! real REST/JSON protocol well enough for the real kube-rs client and the
//! real `kubectl`.
//!
//! It serves, over plain HTTP on 127.0.0.1 (any bearer token accepted):
//! discovery (`/version`, `/api`, `/apis`, group versions, a minimal
//! OpenAPI v3 for kubectl), get/list/watch/create/update/patch/delete on
//! the kinds in [`resources::RESOURCES`], with one global resourceVersion,
//! paged lists, label and field selectors, bookmarks, `410 Expired` for a
//! resourceVersion older than the history, `409` on stale updates, and
//! TokenReview against tokens the test registers.
//!
//! Authentication and authorization (`rbac`): a bearer token registered
//! with [`FakeApi::add_token`] for the API server's audience, or an admin's
//! `Impersonate-User` (kubectl `--as`; kubectl sends no token over plain
//! HTTP), is held to the Roles, ClusterRoles and bindings stored here, with
//! the API server's 403 wording; SubjectAccessReviews answer from the same
//! rules; any other client is the admin. Mutating admission (`admission`):
//! a Pod create goes through the MutatingWebhookConfigurations' webhooks
//! over TLS checked against their caBundle; `dryRun=All` creates store
//! nothing. `metadata.managedFields` are kept approximately (per manager:
//! its time and the fields it set).
//!
//! Not covered: validating admission and other kinds' admission, schema
//! validation (`fieldValidation` is accepted and not enforced), finalizers
//! and graceful deletion (a delete is immediate; deleting a namespace
//! deletes its objects at once), `deletecollection`, JSON patch, field
//! ownership conflicts (server-side apply is a create-or-merge), Table
//! output (kubectl prints its default columns), protobuf (so `kubectl
//! create role|namespace` fail; `kubectl apply` works), aggregated
//! discovery (kubectl falls back to the legacy documents), and Service
//! cluster IP allocation.

mod admission;
mod kubectl;
mod managed_fields;
mod patch;
mod rbac;
mod requests;
pub mod resources;
mod routes;
mod selector;
mod status;
mod store;
mod tokens;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use kubectl::Kubectl;
pub use rbac::Attributes;
pub use status::ApiError;
pub use store::HISTORY_LIMIT;
pub use tokens::API_SERVER_AUDIENCE;
pub use watch::BOOKMARK_INTERVAL;

use requests::RequestLog;
use resources::Resource;
use store::{Part, Store, Writer};
use tokens::Tokens;

/// What the server's connections share; outlives restarts, like etcd.
struct Shared {
    store: Mutex<Store>,
    tokens: Mutex<Tokens>,
    requests: Mutex<RequestLog>,
    service_routes: Mutex<admission::ServiceRoutes>,
    /// Changed to end every open watch.
    watch_ends: tokio::sync::watch::Sender<u64>,
    addr: SocketAddr,
}

/// A running fake API server; dropping it stops the server.
pub struct FakeApi {
    shared: Arc<Shared>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeApi {
    /// Serves on a free port of 127.0.0.1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("a bound address");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            tokens: Mutex::new(Tokens::default()),
            requests: Mutex::new(RequestLog::default()),
            service_routes: Mutex::new(Default::default()),
            watch_ends: tokio::sync::watch::channel(0).0,
            addr,
        });
        let server = tokio::spawn(serve(listener, shared.clone()));
        FakeApi {
            shared,
            server: Mutex::new(Some(server)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes `dir/kubeconfig` for this server (context `fake`, namespace
    /// `default`, a bearer token: the admin's) and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.write_kubeconfig_as(dir, "kubeconfig", "fake-api-token")
    }

    /// Writes `dir/file`, a kubeconfig authenticating with `token` (one
    /// registered with [`FakeApi::add_token`] is that user, held to RBAC).
    pub fn write_kubeconfig_as(&self, dir: &Path, file: &str, token: &str) -> PathBuf {
        let path = dir.join(file);
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n- name: fake\n  user:\n    token: {token}\n",
            self.url()
        );
        std::fs::write(&path, kubeconfig).expect("write the kubeconfig");
        path
    }

    fn resource(api_version: &str, kind: &str) -> &'static Resource {
        Resource::by_kind(api_version, kind).unwrap_or_else(|| {
            panic!("the fake API server does not serve {api_version} {kind}; see fake_api::resources::RESOURCES")
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.shared.store.lock().expect("store lock")
    }

    /// Creates the object, or replaces it whole (status included) if it
    /// exists, as a controller watching would then see it; returns it as
    /// stored. A namespaced object without a namespace goes to `default`.
    pub fn apply(&self, object: Value) -> Value {
        let (api_version, kind) = (
            object["apiVersion"].as_str().unwrap_or_default(),
            object["kind"].as_str().unwrap_or_default(),
        );
        let resource = Self::resource(api_version, kind);
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = object["metadata"]["namespace"].as_str().or(Some("default"));
        let mut store = self.store();
        let result = if store.get(resource, namespace, name).is_ok() {
            let mut object = object.clone();
            if let Some(metadata) = object["metadata"].as_object_mut() {
                metadata.remove("resourceVersion");
            }
            store.update(resource, namespace, name, object, Part::Main, Writer::Test)
        } else {
            store.create(resource, namespace, object.clone(), Writer::Test)
        };
        match result {
            Ok(stored) => (*stored).clone(),
            Err(error) => panic!("fake API server refused {kind} {name:?}: {error}"),
        }
    }

    /// Applies every document of a YAML manifest (as the harness writes
    /// them for local mode), in order.
    pub fn apply_yaml(&self, manifest: &str) {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(manifest).expect("the manifest is YAML");
        for document in documents.into_iter().filter(|d| !d.is_null()) {
            self.apply(document);
        }
    }

    /// Deletes the object; false if there was none.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let resource = Self::resource(api_version, kind);
        self.store().delete(resource, namespace, name, None).is_ok()
    }

    /// Every object of the kind, ordered by namespace and name.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let resource = Self::resource(api_version, kind);
        let everything = selector::Selector::default();
        self.store()
            .select(resource, None, &everything)
            .iter()
            .map(|object| (**object).clone())
            .collect()
    }

    /// The current (latest issued) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store().resource_version()
    }

    /// Ends every open watch stream at once (their connections stay).
    pub fn drop_watches(&self) {
        self.shared.watch_ends.send_modify(|n| *n += 1);
    }

    /// Forgets the history, as an etcd compaction does: a watch resuming
    /// from any resourceVersion issued before (the latest included) gets
    /// `410 Expired`, and so does a paged list continuing from before. Open
    /// watches go on; `drop_watches` after this makes every watcher resume,
    /// get the 410 and re-list.
    pub fn expire_history(&self) {
        self.store().expire_history();
    }

    /// Stops serving — closes the listener and every connection, ending
    /// every watch — then serves again on the same port with the same
    /// objects and history, like an API server restarting over etcd.
    pub async fn restart(&self) {
        let running = self.server.lock().expect("server lock").take();
        if let Some(server) = running {
            server.abort();
            let _ = server.await;
        }
        self.drop_watches();
        let listener = TcpListener::bind(self.shared.addr)
            .await
            .expect("bind the fake API server's port again");
        let server = tokio::spawn(serve(listener, self.shared.clone()));
        *self.server.lock().expect("server lock") = Some(server);
    }

    /// Where the Service `namespace/name`'s `port` is served, for the
    /// webhooks that name it (no cluster network here).
    pub fn route_service(&self, namespace: &str, name: &str, port: u16, addr: SocketAddr) {
        self.shared
            .service_routes
            .lock()
            .expect("routes lock")
            .insert((namespace.to_string(), name.to_string(), port), addr);
    }

    /// Every distinct call `user` (e.g. `system:serviceaccount:NS:SA`)
    /// made, as RBAC names it, with the HTTP status it last got.
    pub fn calls_by(&self, user: &str) -> Vec<(Attributes, u16)> {
        self.shared
            .requests
            .lock()
            .expect("request log lock")
            .calls_by(user)
            .into_iter()
            .map(|(call, status)| (call.attributes, status))
            .collect()
    }

    /// Registers a token for TokenReview: `username` (e.g.
    /// `system:serviceaccount:NS:SA`), the audiences it was issued for, and
    /// whether it is still good (false: expired or revoked).
    pub fn add_token(&self, token: &str, username: &str, audiences: &[&str], authenticated: bool) {
        self.shared.tokens.lock().expect("tokens lock").add(
            token,
            username,
            audiences,
            authenticated,
        );
    }

    /// How many `verb` requests (`list`, `watch`, `get`, `create`,
    /// `update`, `patch`, `delete`) came for `resource` (plural, e.g.
    /// `endpointslices`), over restarts.
    pub fn requests(&self, verb: &str, resource: &str) -> u64 {
        self.shared
            .requests
            .lock()
            .expect("request log lock")
            .count(verb, resource)
    }

    /// The last requests, `METHOD URI -> STATUS`, oldest first.
    pub fn request_log(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .expect("request log lock")
            .recent()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().expect("server lock").take() {
            server.abort();
        }
        self.drop_watches();
    }
}

/// Accepts connections until aborted; aborting drops the listener and,
/// with the `JoinSet`, every connection.
async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, most likely: let some close.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        connections.spawn(async move {
            let service =
                hyper::service::service_fn(move |request| routes::handle(shared.clone(), request));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}
