//! Test harness: a controller on its own runtime (so a test can kill it),
//! sidecars and apps in-process on per-test loopback addresses, and helpers
//! to send traffic and wait for conditions.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fake_api::FakeApi;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use meshctl::demo::apps::{self, Greeting};
use tokio::net::TcpListener;
use trellis_control_plane::controller::{Controller, ControllerConfig};
use trellis_control_plane::identity::{BootstrapTokens, AUDIENCE};
use trellis_control_plane::source::manifest::ManifestError;
use trellis_proto::SpiffeId;

pub mod cluster_ca;
pub mod conformance;
pub mod fake_api;
pub mod kube_validate;
pub mod netns;
pub mod tls;
pub mod webhook;

pub const TRUST_DOMAIN: &str = "cluster.local";

/// Runs a Python `script` (with `args`) that needs the pip package
/// `package`, and returns its stdout. When the script fails (the package
/// is missing, mostly) the test skips, except under `CI=true`, where a
/// missing capability fails it.
pub fn python_with(package: &str, install: &str, script: &str, args: &[&str]) -> Option<Vec<u8>> {
    python_with_env(package, install, script, args, &[])
}

/// [`python_with`], with environment variables set for the script.
pub fn python_with_env(
    package: &str,
    install: &str,
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Option<Vec<u8>> {
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("python3 runs");
    if out.status.success() {
        return Some(out.stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim().lines().last().unwrap_or("");
    let why = format!("{package} is not usable ({last}); install it with `{install}`");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and {why}"
    );
    eprintln!("skipping: {why}");
    None
}

/// The Python the gRPC apps run on: Debian's, where the CI installs
/// grpcio (`python3-grpcio`), whatever `python3` is first on the PATH.
pub const GRPC_PYTHON: &str = "/usr/bin/python3";

/// Whether [`GRPC_PYTHON`] imports grpcio; a test without it skips,
/// except under `CI=true`, where it fails.
pub fn grpcio_available() -> bool {
    let ok = std::process::Command::new(GRPC_PYTHON)
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = "python3 cannot import grpc (Debian: apt-get install -y python3-grpcio)";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {why}"
        );
        eprintln!("skipping: {why}");
    }
    ok
}

/// Logs for tests, once per process; `RUST_LOG` picks the level. They go
/// to stderr, never stdout: the benches share this harness, and their
/// stdout is a report whose last line `--output json` promises is the JSON
/// (a warning logged at shutdown once landed after it).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// A random `127.x.y.0/24` block, so tests running in parallel never share
/// addresses.
pub fn loopback_block() -> [u8; 3] {
    [127, fastrand::u8(1..=254), fastrand::u8(1..=254)]
}

/// Something started on a runtime and thread of its own, so `kill` ends it
/// like a crash (`kill -9`): every task and socket is dropped at once. A
/// graceful stop runs its shutdown first.
struct Isolated {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Isolated {
    /// Runs `start` on `runtime` in a new thread; returns what `report`
    /// said of the started thing once it has started. `shutdown` is its
    /// graceful stop.
    fn start<T, R, S>(
        runtime: impl FnOnce() -> tokio::runtime::Runtime + Send + 'static,
        start: impl std::future::Future<Output = T> + Send + 'static,
        report: impl FnOnce(&T) -> R + Send + 'static,
        shutdown: impl FnOnce(T) -> S + Send + 'static,
    ) -> (Self, R)
    where
        T: 'static,
        R: Send + 'static,
        S: std::future::Future<Output = ()>,
    {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = runtime();
            let started = runtime.block_on(start);
            started_tx.send(report(&started)).expect("report start");
            // A one-thread runtime drives its tasks only while it blocks on something.
            let graceful = runtime.block_on(async {
                let stop = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
                matches!(stop, Ok(Ok(())))
            });
            if graceful {
                runtime.block_on(shutdown(started));
            } else {
                drop(started);
            }
            runtime.shutdown_timeout(Duration::from_millis(100));
        });
        let report = started_rx.recv().expect("started");
        let isolated = Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        (isolated, report)
    }

    /// Stops gracefully, and waits until it has.
    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The controller, on a runtime of its own so `kill` ends it like a crash.
pub struct ControllerProcess {
    pub addr: SocketAddr,
    /// `/live`, `/ready`, `/metrics`.
    pub admin_addr: SocketAddr,
    pub manifest_errors: tokio::sync::watch::Receiver<Vec<ManifestError>>,
    /// The controller's store, to compare with its source.
    pub store: Arc<trellis_control_plane::store::Store>,
    /// The injection webhook's HTTPS address, if it serves one.
    pub webhook_addr: Option<SocketAddr>,
    _isolated: Isolated,
}

impl ControllerProcess {
    pub fn start(config: ControllerConfig) -> Self {
        let runtime = || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("controller runtime")
        };
        let start = async { Controller::start(config).await.expect("controller starts") };
        let (isolated, (addr, admin_addr, manifest_errors, store, webhook_addr)) = Isolated::start(
            runtime,
            start,
            |c: &Controller| {
                (
                    c.addr,
                    c.admin_addr,
                    c.manifest_errors.clone(),
                    c.store.clone(),
                    c.webhook_addr,
                )
            },
            Controller::shutdown,
        );
        Self {
            admin_addr,
            addr,
            manifest_errors,
            store,
            webhook_addr,
            _isolated: isolated,
        }
    }

    /// Stops the controller abruptly.
    pub fn kill(self) {}

    /// Stops the controller as SIGTERM does: it hands over its Lease first.
    pub fn stop(self) {
        self._isolated.stop();
    }
}

/// A sidecar on a runtime of its own, so `kill` ends it like `kill -9`:
/// every task and socket (its pooled connections too) is dropped at once,
/// with no drain.
pub struct ProxyProcess {
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    _isolated: Isolated,
}

impl ProxyProcess {
    /// Starts the sidecar and waits for its certificate.
    pub fn start(config: trellis_proxy::Config) -> Self {
        let runtime = || trellis_proxy::runtime(1).expect("proxy runtime");
        let start = async {
            let proxy = trellis_proxy::start(config).await.expect("proxy starts");
            tokio::time::timeout(Duration::from_secs(10), proxy.ready())
                .await
                .expect("proxy gets a certificate within 10 s");
            proxy
        };
        let (isolated, (inbound_addr, admin_addr)) = Isolated::start(
            runtime,
            start,
            |p: &trellis_proxy::Proxy| (p.inbound_addr, p.admin_addr),
            |p| async move { drop(p) },
        );
        Self {
            inbound_addr,
            admin_addr,
            _isolated: isolated,
        }
    }

    /// Stops the sidecar abruptly.
    pub fn kill(self) {}
}

/// A test mesh: a state directory with `manifests/`, a controller, and the
/// pods the test adds.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub controller: Option<ControllerProcess>,
    pub tokens: BootstrapTokens,
    /// Variables every proxy of this mesh gets (before per-proxy tuning).
    pub proxy_env: Vec<(&'static str, String)>,
    /// In cluster mode, the API server the controller watches: manifests
    /// are applied to it instead of written to `manifests/`.
    pub api: Option<Arc<FakeApi>>,
    block: [u8; 3],
    next_host: u8,
}

impl Mesh {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A mesh whose controller watches `api` (cluster mode): its CA is
    /// published there, and its proxies prove themselves with token files
    /// the API server reviews.
    pub async fn start_in_cluster(api: Arc<FakeApi>) -> Self {
        Self::start_in_cluster_with(api, |_| {}).await
    }

    /// Like `start_in_cluster`, with the controller tuned.
    pub async fn start_in_cluster_with(
        api: Arc<FakeApi>,
        tune: impl FnOnce(&mut ControllerConfig),
    ) -> Self {
        let mut mesh = Self::start_with(|config| {
            cluster_ca::in_cluster(config, &api);
            tune(config);
        })
        .await;
        mesh.api = Some(api);
        mesh
    }

    pub async fn start_with(tune: impl FnOnce(&mut ControllerConfig)) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("manifests")).expect("manifests dir");
        let block = loopback_block();
        let ip = IpAddr::V4(Ipv4Addr::new(block[0], block[1], block[2], 1));
        let mut config = ControllerConfig::local(dir.path(), ip);
        tune(&mut config);
        let controller = ControllerProcess::start(config);
        let tokens = BootstrapTokens::load_or_create(dir.path()).expect("tokens");
        Self {
            dir,
            controller: Some(controller),
            tokens,
            proxy_env: Vec::new(),
            api: None,
            block,
            next_host: 2,
        }
    }

    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn controller_addr(&self) -> SocketAddr {
        self.controller.as_ref().expect("controller running").addr
    }

    /// The controller's injection webhook, if it serves one.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.controller
            .as_ref()
            .expect("controller running")
            .webhook_addr
    }

    /// A fresh pod IP in this mesh's block.
    pub fn pod_ip(&mut self) -> IpAddr {
        let host = self.next_host;
        self.next_host += 1;
        IpAddr::V4(Ipv4Addr::new(
            self.block[0],
            self.block[1],
            self.block[2],
            host,
        ))
    }

    /// Starts a sidecar for a pod at `ip` with service account `sa`.
    pub async fn proxy(&self, ip: IpAddr, sa: &str) -> trellis_proxy::Proxy {
        self.proxy_with(ip, sa, |_| {}).await
    }

    pub async fn proxy_with(
        &self,
        ip: IpAddr,
        sa: &str,
        tune: impl FnOnce(&mut HashMap<&'static str, String>),
    ) -> trellis_proxy::Proxy {
        self.proxy_in(ip, "default", sa, tune).await
    }

    /// A sidecar for a pod of `namespace` (its identity's namespace).
    pub async fn proxy_in(
        &self,
        ip: IpAddr,
        namespace: &str,
        sa: &str,
        tune: impl FnOnce(&mut HashMap<&'static str, String>),
    ) -> trellis_proxy::Proxy {
        let config = self.proxy_config_in(ip, namespace, sa, tune);
        let proxy = trellis_proxy::start(config).await.expect("proxy starts");
        tokio::time::timeout(Duration::from_secs(10), proxy.ready())
            .await
            .expect("proxy gets a certificate within 10 s");
        proxy
    }

    /// In cluster mode, the token file of service account `sa`'s sidecars.
    pub fn token_file(&self, sa: &str) -> PathBuf {
        self.dir.path().join(format!("{sa}.token"))
    }

    /// The configuration of a sidecar for a pod at `ip` with service
    /// account `sa`, as `proxy_with` starts it.
    pub fn proxy_config(
        &self,
        ip: IpAddr,
        sa: &str,
        tune: impl FnOnce(&mut HashMap<&'static str, String>),
    ) -> trellis_proxy::Config {
        self.proxy_config_in(ip, "default", sa, tune)
    }

    /// Like `proxy_config`, for a pod of `namespace`.
    pub fn proxy_config_in(
        &self,
        ip: IpAddr,
        namespace: &str,
        sa: &str,
        tune: impl FnOnce(&mut HashMap<&'static str, String>),
    ) -> trellis_proxy::Config {
        use trellis_proxy::config::*;
        let identity = SpiffeId::new(TRUST_DOMAIN, namespace, sa);
        let mut env = sidecar_env(&identity, ip);
        let token = self.tokens.token_for(&identity);
        match &self.api {
            None => {
                env.insert(TOKEN, token);
            }
            // A projected service-account token, as the injector mounts it.
            Some(api) => {
                let username = format!("system:serviceaccount:{namespace}:{sa}");
                api.add_token(&token, &username, &[AUDIENCE], true);
                let file = self.token_file(sa);
                std::fs::write(&file, &token).expect("write the token file");
                env.insert(TOKEN_FILE, file.display().to_string());
            }
        }
        env.extend(controller_env(self.controller_addr(), self.dir.path()));
        env.extend(self.proxy_env.iter().cloned());
        tune(&mut env);
        Config::from_strings(&env).expect("proxy config")
    }

    /// Writes (atomically) a manifest file, as an editor or `meshctl` would;
    /// in cluster mode, applies its objects to the API server instead.
    pub fn write_manifest(&self, name: &str, contents: &str) {
        match &self.api {
            None => write_atomically(&self.manifests().join(name), contents),
            Some(api) => api.apply_yaml(contents),
        }
    }
}

/// Polls `check` every 50 ms until it returns `Ok`, and returns that; after
/// `within`, fails the test with `what` and the last `Err`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The variables of a sidecar for `identity` on a pod at `ip` (listeners on
/// ports the OS picks), without its token and controller.
pub fn sidecar_env(identity: &SpiffeId, ip: IpAddr) -> HashMap<&'static str, String> {
    use trellis_proxy::config::*;
    HashMap::from([
        (IDENTITY, identity.to_string()),
        (OUTBOUND_LISTEN, format!("{ip}:0")),
        (INBOUND_LISTEN, format!("{ip}:0")),
        (ADMIN_LISTEN, format!("{ip}:0")),
        (APP_IP, ip.to_string()),
        (REQUEST_TIMEOUT, "5s".into()),
    ])
}

/// The variables that point a proxy at the controller at `addr` whose
/// state (CA) is in `state_dir`: TLS, verified against the mesh's bundle.
pub fn controller_env(addr: SocketAddr, state_dir: &Path) -> [(&'static str, String); 2] {
    use trellis_proxy::config::{CONTROLLER, CONTROLLER_TRUST};
    let bundle = state_dir.join(trellis_control_plane::identity::BUNDLE);
    [
        (CONTROLLER, format!("https://{addr}")),
        (CONTROLLER_TRUST, bundle.display().to_string()),
    ]
}

pub fn write_atomically(path: &Path, contents: &str) {
    trellis_control_plane::source::local::write_atomically(path, contents.as_bytes())
        .expect("write manifest");
}

/// A TCP echo server on `ip` (port chosen by the OS), as an opaque app.
pub async fn echo_app(ip: IpAddr) -> u16 {
    let echo = TcpListener::bind((ip, 0)).await.expect("bind echo");
    let port = echo.local_addr().expect("echo addr").port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    port
}

/// A certificate (chain, key) for `id` from `mesh`'s CA, as a test client
/// that is not a sidecar presents it.
pub fn mesh_identity(mesh: &Mesh, id: &SpiffeId, lifetime: Duration) -> (Vec<Vec<u8>>, Vec<u8>) {
    let ca = trellis_control_plane::identity::Ca::load_or_create(mesh.dir.path(), TRUST_DOMAIN)
        .expect("the mesh's CA");
    let (key, csr) = trellis_proxy::tls::generate_csr(id).expect("CSR");
    let leaf = ca.sign(id, &csr, lifetime).expect("signed");
    (leaf.chain_der, key.serialize_der())
}

/// Starts the demo's `hello` app on `ip` (port chosen by the OS).
pub async fn hello_app(ip: IpAddr, version: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind hello");
    let addr = listener.local_addr().expect("hello addr");
    tokio::spawn(apps::hello(
        listener,
        version.to_string(),
        format!("hello-{version}"),
    ));
    addr
}

/// A meshed pod in a manifest: a Pod with the sidecar container.
pub fn pod_yaml(name: &str, sa: &str, version: &str, inbound_port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: hello, version: {version}}}
  annotations: {{trellis.dev/inbound-port: \"{inbound_port}\"}}
spec:
  serviceAccountName: {sa}
  containers: [{{name: app, image: hello}}, {{name: trellis-proxy, image: trellis-proxy}}]
"
    )
}

/// A Service on `port` and one EndpointSlice with the given `(pod, ip)`s.
pub fn service_yaml(name: &str, port: u16, endpoints: &[(&str, IpAddr)]) -> String {
    service_manifest(name, None, &[("http", port, "")], endpoints)
}

/// A Service (with a ClusterIP when given) and one EndpointSlice over
/// `(pod, ip)` endpoints; each port is `(name, port, appProtocol or "")`.
pub fn service_manifest(
    name: &str,
    cluster_ip: Option<&str>,
    ports: &[(&str, u16, &str)],
    endpoints: &[(&str, IpAddr)],
) -> String {
    let endpoints: String = endpoints
        .iter()
        .map(|(pod, ip)| {
            format!("  - addresses: [\"{ip}\"]\n    targetRef: {{kind: Pod, name: {pod}}}\n")
        })
        .collect();
    let endpoints = if endpoints.is_empty() {
        "  []\n".to_string()
    } else {
        endpoints
    };
    let ports: Vec<String> = ports
        .iter()
        .map(|(port_name, port, protocol)| match *protocol {
            "" => format!("{{name: {port_name}, port: {port}}}"),
            protocol => format!("{{name: {port_name}, port: {port}, appProtocol: {protocol}}}"),
        })
        .collect();
    let ports = ports.join(", ");
    let cluster_ip = cluster_ip.map_or(String::new(), |ip| format!("  clusterIP: {ip}\n"));
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
{cluster_ip}  ports: [{ports}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints:
{endpoints}ports: [{ports}]
"
    )
}

/// An HTTP client that uses a sidecar's outbound listener as its proxy, as
/// `http_proxy` clients do: requests carry the Service in an absolute URI
/// (HTTP/1.1) or `:authority` (HTTP/2).
#[derive(Clone)]
pub struct AppClient {
    proxy: SocketAddr,
    http2: bool,
    /// Idle HTTP/1.1 connections, reused like a browser's pool.
    idle: Arc<std::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>>,
    /// The one multiplexed HTTP/2 connection.
    shared: Arc<tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>>>,
}

/// What came back for one request.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn greeting(&self) -> Option<Greeting> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl AppClient {
    pub fn http1(proxy: SocketAddr) -> Self {
        Self {
            proxy,
            http2: false,
            idle: Arc::default(),
            shared: Arc::default(),
        }
    }

    pub fn http2(proxy: SocketAddr) -> Self {
        Self {
            http2: true,
            ..Self::http1(proxy)
        }
    }

    /// GET `path` on `authority`, sent to the proxy.
    pub async fn get(&self, authority: &str, path: &str) -> Result<Answer, String> {
        self.get_with(authority, path, &[]).await
    }

    /// GET with extra request headers.
    pub async fn get_with(
        &self,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        self.request(http::Method::GET, authority, path, headers, Bytes::new())
            .await
    }

    /// Any request, with a body.
    pub async fn request(
        &self,
        method: http::Method,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, String> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{authority}{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(10), self.send(request))
            .await
            .map_err(|_| "no response within 10 s".to_string())?
    }

    async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<Answer, String> {
        let connect = || async {
            let tcp = tokio::net::TcpStream::connect(self.proxy)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, String>(hyper_util::rt::TokioIo::new(tcp))
        };
        if self.http2 {
            let mut shared = self.shared.lock().await;
            let sender = match shared.as_ref().filter(|s| !s.is_closed()) {
                Some(sender) => sender.clone(),
                None => {
                    let (sender, connection) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        connect().await?,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    tokio::spawn(connection);
                    *shared = Some(sender.clone());
                    sender
                }
            };
            drop(shared);
            let mut sender = sender;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("{e:?}"))?;
            return collect(response).await;
        }
        let idle = self
            .idle
            .lock()
            .expect("pool")
            .pop()
            .filter(|s| s.is_ready());
        let mut sender = match idle {
            Some(sender) => sender,
            None => {
                let (sender, connection) = hyper::client::conn::http1::handshake(connect().await?)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                sender
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let answer = collect(response).await?;
        self.idle.lock().expect("pool").push(sender);
        Ok(answer)
    }

    /// Waits (up to 5 s) until the controller has loaded the Service behind
    /// `authority`, i.e. the proxy no longer answers "unknown" or "no endpoints".
    pub async fn wait_routable(&self, authority: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = self.get(authority, "/").await;
            let reason = answer
                .as_ref()
                .ok()
                .and_then(|a| a.headers.get("trellis-proxy-error").cloned());
            if !matches!(
                reason.as_ref().map(|r| r.as_bytes()),
                Some(b"unknown-service" | b"no-endpoints")
            ) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{authority} is not routable within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET and require a greeting; the version that answered.
    pub async fn version(&self, authority: &str) -> Result<String, String> {
        let answer = self.get(authority, "/").await?;
        match answer.greeting() {
            Some(g) if answer.status.is_success() => Ok(g.version),
            _ => Err(format!("{}: {}", answer.status, answer.text())),
        }
    }
}

async fn collect(response: http::Response<hyper::body::Incoming>) -> Result<Answer, String> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `frontend` (a client pod with a sidecar) and the Service `hello` served by
/// pods `hello-v1` and `hello-v2`, each with its sidecar, plus per-version
/// Services `hello-v1` and `hello-v2` for routing.
pub struct HelloMesh {
    pub mesh: Mesh,
    pub client: trellis_proxy::Proxy,
    pub hello: Vec<(IpAddr, trellis_proxy::Proxy)>,
    pub port: u16,
}

impl std::ops::Deref for HelloMesh {
    type Target = Mesh;
    fn deref(&self) -> &Mesh {
        &self.mesh
    }
}

impl std::ops::DerefMut for HelloMesh {
    fn deref_mut(&mut self) -> &mut Mesh {
        &mut self.mesh
    }
}

impl HelloMesh {
    pub async fn start() -> Self {
        Self::start_with_apps(serve_hello).await
    }

    /// Like `start`, with the controller tuned (e.g. short leaf lifetimes).
    pub async fn start_tuned(tune: impl FnOnce(&mut ControllerConfig)) -> Self {
        Self::build(tune, serve_hello).await
    }

    /// Like `start`, with the test's own app behind each version.
    pub async fn start_with_apps(app: impl FnMut(TcpListener, &str)) -> Self {
        Self::build(|_| {}, app).await
    }

    /// Like `start`, with extra environment for every proxy.
    pub async fn start_with_proxy_env(proxy_env: Vec<(&'static str, String)>) -> Self {
        Self::build_with(|_| {}, proxy_env, serve_hello).await
    }

    async fn build(
        tune: impl FnOnce(&mut ControllerConfig),
        app: impl FnMut(TcpListener, &str),
    ) -> Self {
        Self::build_with(tune, Vec::new(), app).await
    }

    async fn build_with(
        tune: impl FnOnce(&mut ControllerConfig),
        proxy_env: Vec<(&'static str, String)>,
        app: impl FnMut(TcpListener, &str),
    ) -> Self {
        let mut mesh = Mesh::start_with(tune).await;
        mesh.proxy_env = proxy_env;
        Self::populate(mesh, app).await
    }

    /// `hello` in cluster mode: its objects are applied to `api`.
    pub async fn start_in_cluster(api: Arc<FakeApi>) -> Self {
        Self::start_in_cluster_with(api, |_| {}).await
    }

    /// Like `start_in_cluster`, with the controller tuned.
    pub async fn start_in_cluster_with(
        api: Arc<FakeApi>,
        tune: impl FnOnce(&mut ControllerConfig),
    ) -> Self {
        let mesh = Mesh::start_in_cluster_with(api, tune).await;
        Self::populate(mesh, serve_hello).await
    }

    async fn populate(mut mesh: Mesh, mut app: impl FnMut(TcpListener, &str)) -> Self {
        let client_ip = mesh.pod_ip();
        let client = mesh.proxy(client_ip, "frontend").await;
        let mut hello = Vec::new();
        let mut port = 0;
        for version in ["v1", "v2"] {
            let ip = mesh.pod_ip();
            // Both versions listen on the same port, as pods of one Service do.
            let listener = TcpListener::bind((ip, port)).await.expect("bind hello");
            port = listener.local_addr().expect("addr").port();
            app(listener, version);
            let proxy = mesh
                .proxy_with(ip, "hello", |env| {
                    env.insert(trellis_proxy::config::WORKLOAD, "hello".into());
                    env.insert(trellis_proxy::config::VERSION, version.into());
                })
                .await;
            hello.push((ip, proxy));
        }
        let this = Self {
            mesh,
            client,
            hello,
            port,
        };
        this.write_hello(&["v1", "v2"]);
        // The controller reads the directory every 200 ms: wait until it serves.
        this.http1().wait_routable(&this.authority()).await;
        this
    }

    pub fn authority(&self) -> String {
        format!("hello.default.svc.cluster.local:{}", self.port)
    }

    /// Writes `hello.yaml`: the pods, `hello` with endpoints for the given
    /// versions only, and `hello-v1` / `hello-v2` with theirs.
    pub fn write_hello(&self, versions: &[&str]) {
        let mut docs = Vec::new();
        let mut endpoints = Vec::new();
        for (i, version) in ["v1", "v2"].iter().enumerate() {
            let (ip, proxy) = &self.hello[i];
            let pod = format!("hello-{version}");
            docs.push(pod_yaml(&pod, "hello", version, proxy.inbound_addr.port()));
            docs.push(service_yaml(&pod, self.port, &[(pod.as_str(), *ip)]));
            if versions.contains(version) {
                endpoints.push((pod, *ip));
            }
        }
        let endpoints: Vec<(&str, IpAddr)> =
            endpoints.iter().map(|(p, ip)| (p.as_str(), *ip)).collect();
        docs.push(service_yaml("hello", self.port, &endpoints));
        self.mesh.write_manifest("hello.yaml", &docs.join("---\n"));
    }

    /// A client whose requests go through the frontend's sidecar.
    pub fn http1(&self) -> AppClient {
        AppClient::http1(self.client.outbound_addr)
    }
}

/// The demo's `hello` app of `version` on `listener`, as pod `hello-<version>`.
fn serve_hello(listener: TcpListener, version: &str) {
    tokio::spawn(apps::hello(
        listener,
        version.into(),
        format!("hello-{version}"),
    ));
}

/// Opens a discovery watch of `authority` at `url` (`http://` is plaintext,
/// which the controller serves to loopback clients in local mode), as a
/// test client identity. Errors carry their whole chain of causes.
pub async fn watch_endpoints(
    url: &str,
    authority: &str,
) -> Result<tonic::Streaming<trellis_proto::discovery::EndpointUpdate>, String> {
    use trellis_proto::discovery::discovery_client::DiscoveryClient;
    let chain = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(e) = cause {
            text = format!("{text}: {e}");
            cause = e.source();
        }
        text
    };
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| chain(&e))?
        .connect()
        .await
        .map_err(|e| chain(&e))?;
    let request = trellis_proto::discovery::WatchRequest {
        authority: authority.into(),
        client_identity: "spiffe://cluster.local/ns/default/sa/test".into(),
    };
    let stream = DiscoveryClient::new(channel)
        .watch_endpoints(request)
        .await
        .map_err(|e| chain(&e))?;
    Ok(stream.into_inner())
}

/// An HTTPRoute for `hello` splitting between `hello-v1` and `hello-v2`,
/// with optional extra rule fields (YAML, indented for a rule).
pub fn split_route(port: u16, v1: u32, v2: u32, extra: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: hello}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: hello, port: {port}}}]
  rules:
    - backendRefs:
        - {{name: hello-v1, port: {port}, weight: {v1}}}
        - {{name: hello-v2, port: {port}, weight: {v2}}}
{extra}"
    )
}

/// Sends `n` requests with `concurrency` in flight; the results in order of completion.
pub async fn burst(
    client: &AppClient,
    authority: &str,
    n: usize,
    concurrency: usize,
) -> Vec<Result<Answer, String>> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, authority, next, results) = (
            client.clone(),
            authority.to_string(),
            next.clone(),
            results.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let answer = client.get(&authority, "/").await;
                results.lock().expect("results").push(answer);
            }
        }));
    }
    for task in tasks {
        task.await.expect("burst worker");
    }
    let mut results = results.lock().expect("results");
    std::mem::take(&mut *results)
}

/// Requests sent one after another through a sidecar until stopped, to
/// show that something happening meanwhile fails none of them.
pub struct RequestLoop {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Result<Answer, String>>>,
}

impl RequestLoop {
    pub fn start(client: AppClient, authority: &str) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let authority = authority.to_string();
        let task = tokio::spawn(async move {
            let mut answers = Vec::new();
            while !*stopped.borrow_and_update() {
                answers.push(client.get(&authority, "/").await);
            }
            answers
        });
        Self { stop, task }
    }

    /// Stops after the request in flight; every answer, in order.
    pub async fn stop(self) -> Vec<Result<Answer, String>> {
        let _ = self.stop.send(true);
        self.task.await.expect("request loop")
    }
}

/// Counts answers by greeting version ("error" for anything else).
pub fn versions(answers: &[Result<Answer, String>]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for answer in answers {
        let key = match answer {
            Ok(a) if a.status.is_success() => {
                a.greeting().map_or("error".to_string(), |g| g.version)
            }
            Ok(a) => a.status.as_u16().to_string(),
            Err(_) => "error".to_string(),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// A test backend that answers with a greeting for `version` after `delay`,
/// or 503 when `fail(hit_number)` says so; counts its hits.
pub fn scripted_app(
    listener: TcpListener,
    version: &str,
    delay: Duration,
    fail: fn(u64) -> bool,
) -> Arc<std::sync::atomic::AtomicU64> {
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (counter, version) = (hits.clone(), version.to_string());
    tokio::spawn(trellis_common::serve::serve(listener, move |_request| {
        let (counter, version) = (counter.clone(), version.clone());
        async move {
            let hit = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            if fail(hit) {
                let mut response =
                    http::Response::new(Full::new(Bytes::from_static(b"scripted failure\n")));
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
            let greeting = Greeting {
                message: "scripted".into(),
                version,
                pod: String::new(),
                client_identity: String::new(),
            };
            http::Response::new(Full::new(Bytes::from(
                serde_json::to_vec(&greeting).unwrap_or_default(),
            )))
        }
    }));
    hits
}

// --- Drain and connection-hygiene tests ------------------------------------

impl HelloMesh {
    /// Like `start_with_apps`, with extra environment for every proxy.
    pub async fn start_with_apps_and_env(
        proxy_env: Vec<(&'static str, String)>,
        app: impl FnMut(TcpListener, &str),
    ) -> Self {
        Self::build_with(|_| {}, proxy_env, app).await
    }
}

/// A backend for the drain and hygiene tests. It reads every request body
/// to the end; `GET /stream/<n>` answers with `n` lines 200 ms apart; any
/// other request gets a greeting whose message says how many body bytes
/// came and how long the `x-big` header was: `"<bytes> bytes, x-big <len>"`.
pub fn workbench_app(listener: TcpListener, version: &str) {
    use trellis_proxy::http::{boxed, full};
    let version = version.to_string();
    tokio::spawn(trellis_common::serve::serve(
        listener,
        move |request: http::Request<hyper::body::Incoming>| {
            let version = version.clone();
            async move {
                let big = request.headers().get("x-big").map_or(0, |v| v.len());
                let path = request.uri().path().to_string();
                if let Some(n) = path.strip_prefix("/stream/") {
                    let n: usize = n.parse().unwrap_or(1);
                    let (sender, receiver) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(async move {
                        for i in 0..n {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if sender
                                .send(Bytes::from(format!("line {i}\n")))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    });
                    return http::Response::new(boxed(Paced(receiver)));
                }
                let mut body = request.into_body();
                let mut received = 0usize;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => received += frame.data_ref().map_or(0, |d| d.len()),
                        Err(_) => {
                            let mut response = http::Response::new(full("body failed\n"));
                            *response.status_mut() = http::StatusCode::BAD_REQUEST;
                            return response;
                        }
                    }
                }
                let greeting = Greeting {
                    message: format!("{received} bytes, x-big {big}"),
                    version,
                    pod: String::new(),
                    client_identity: String::new(),
                };
                http::Response::new(full(serde_json::to_vec(&greeting).unwrap_or_default()))
            }
        },
    ));
}

/// A body whose chunks come from a channel, as a task produces them.
pub struct Paced(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Paced {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(hyper::body::Frame::data(data))))
    }
}

/// A request body of `chunks` chunks of `size` bytes, one every `every`:
/// an upload that stays in flight for `chunks × every`.
pub fn paced_body(chunks: usize, size: usize, every: Duration) -> Paced {
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'u'; size]);
        for _ in 0..chunks {
            tokio::time::sleep(every).await;
            if sender.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    Paced(receiver)
}

/// Sends one request on a new connection to `proxy` (an outbound listener:
/// the request names its Service), HTTP/2 with prior knowledge or HTTP/1.1,
/// and reads the whole answer.
pub async fn send_once<B>(
    proxy: SocketAddr,
    http2: bool,
    request: http::Request<B>,
) -> Result<Answer, String>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(tcp);
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(1 << 20)
                .handshake(io)
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        sender.send_request(request).await
    };
    collect(response.map_err(|e| format!("{e:?}"))?).await
}

/// Scrapes the `/metrics` of the admin port at `admin` and sums the series
/// of `family` whose labels include every `(name, value)` of `filter`.
pub async fn metric(admin: SocketAddr, family: &str, filter: &[(&str, &str)]) -> f64 {
    let client = AppClient::http1(admin);
    let Ok(answer) = client.get(&admin.to_string(), "/metrics").await else {
        return f64::NAN;
    };
    sum_series(&answer.text(), family, filter)
}

/// In a Prometheus text exposition, the sum of the series of `family` whose
/// labels include every `(name, value)` of `filter`: the harness's one
/// metrics parser.
pub fn sum_series(text: &str, family: &str, filter: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let wanted = name == family
                && filter
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Raises this process's open-file limit to its hard limit, and returns it.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).expect("raise RLIMIT_NOFILE");
    limit.maximum.unwrap_or(u64::MAX)
}

/// Sends `raw` bytes to `addr` and reads the answer until the server
/// closes (or 10 s passed: a kept-alive connection answers what it read).
pub async fn exchange_raw(addr: SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(raw.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// This process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// The resident set of process `pid` (or `"self"`), in KiB.
pub fn rss_kib_of(pid: impl std::fmt::Display) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time this process has used (user + system), from `/proc/self/stat`.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command (which may contain spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based), in USER_HZ = 100 ticks/s.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// A real Prometheus for the dashboards' and the rollouts' tests.
pub mod prometheus;
