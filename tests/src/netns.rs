//! Pods as network namespaces, for tests with transparent interception.
//!
//! Each pod is a network namespace with an `eth0` veth whose peer sits on a
//! bridge in a namespace of its own (the "node"), so pods reach each other
//! and a controller on the bridge, and nothing reaches the host's network.
//! Pods are dual stack: an IPv4 and an IPv6 address each, with the
//! sidecar's rules in both families' tables.
//! Sidecars and the controller run in this process, each on a runtime whose
//! thread entered the namespace (sockets belong to the namespace of the
//! thread that creates them); the applications are real programs started
//! with `ip netns exec`, as an unprivileged user so the sidecar's iptables
//! rules (which skip the proxy's UID, root here) intercept them.
//!
//! Everything is undone on drop, also when a test fails: deleting a
//! namespace deletes its interfaces and rules.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use trellis_control_plane::controller::ControllerConfig;
use trellis_control_plane::identity::BootstrapTokens;
use trellis_proto::SpiffeId;

use crate::{ControllerProcess, TRUST_DOMAIN};

/// The user applications run as: not the proxy's, so they are intercepted.
const APP_UID: &str = "65534";
/// The sidecar's ports inside a pod (the injector's defaults).
pub const INBOUND_PORT: u16 = trellis_proxy::init::DEFAULT_INBOUND_PORT;
pub const OUTBOUND_PORT: u16 = trellis_proxy::init::DEFAULT_OUTBOUND_PORT;
pub const ADMIN_PORT: u16 = trellis_proxy::init::DEFAULT_ADMIN_PORT;

/// What this machine lacks for namespace tests, each with its fix.
pub fn missing_requirements(programs: &[(&str, &str)]) -> Vec<String> {
    let mut missing = Vec::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1));
    if uid != Some("0") {
        missing.push("not running as root, which network namespaces need".to_string());
    }
    let base = [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("ip6tables", "iptables"),
        ("setpriv", "util-linux"),
    ];
    for (program, package) in base.iter().chain(programs) {
        if find(program).is_none() {
            missing.push(format!(
                "`{program}` is not on PATH (Debian: apt-get install -y {package})"
            ));
        }
    }
    missing
}

/// Whether a namespace test can run: `false` (after saying why) when it
/// must skip; under `CI=true` a missing requirement fails the test instead.
pub fn can_run(programs: &[(&str, &str)]) -> bool {
    let missing = missing_requirements(programs);
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and this test cannot run: {why}");
    }
    eprintln!("skipping: {why}");
    false
}

pub fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Runs `ip` (iproute2) with `args`, panicking with its error output on failure.
fn run_ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn add(name: String) -> Self {
        run_ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip("link set lo up");
        ns
    }

    /// Runs `ip -n <this namespace> <command>` (words split on spaces).
    fn ip(&self, command: &str) {
        let mut args = vec!["-n", &self.name];
        args.extend(command.split_whitespace());
        run_ip(&args);
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `program` inside the namespace, as root.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .kill_on_drop(true);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deleted = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !deleted.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

/// Enters the namespace at `path` on the current thread.
fn enter(path: &Path) {
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("cannot enter {}: {e}", path.display()));
}

/// Runs `f` on a thread inside the namespace at `path`, and returns its result.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(path);
                f()
            })
            .join()
            .expect("namespace thread panicked")
    })
}

/// A single-threaded runtime whose thread lives in a namespace: every task
/// spawned on it opens its sockets there. Stopped (tasks dropped) on drop.
pub struct NetnsRuntime {
    pub handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetnsRuntime {
    pub fn start(path: &Path) -> Self {
        let path = path.to_path_buf();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            handle_tx.send(runtime.handle().clone()).expect("handle");
            runtime.block_on(async {
                let _ = stopped.await;
            });
            runtime.shutdown_timeout(Duration::from_millis(100));
        });
        let handle = handle_rx.recv().expect("namespace runtime started");
        Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Runs `future` to completion on the namespace's thread.
    pub async fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> T {
        self.handle
            .spawn(future)
            .await
            .expect("task in the namespace panicked")
    }
}

impl Drop for NetnsRuntime {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A bridge ("the node"), a controller on it, and the pods a test adds.
pub struct PodNetwork {
    /// Short and unique: namespace and interface names derive from it.
    tag: String,
    subnet: [u8; 3],
    next_host: u8,
    pub dir: tempfile::TempDir,
    pub tokens: BootstrapTokens,
    controller: Option<ControllerProcess>,
    controller_addr: SocketAddr,
    controller_admin: SocketAddr,
    node: Netns,
}

impl PodNetwork {
    /// A node namespace with a bridge on a random `10.x.y.0/24` and
    /// `fd00:x:y::/64`, and a controller listening on the bridge; `None`
    /// when the test must skip.
    pub fn start(extra_programs: &[(&str, &str)]) -> Option<Self> {
        if !can_run(extra_programs) {
            return None;
        }
        crate::init_tracing();
        let tag = format!("tr{:06x}", fastrand::u32(..0x100_0000));
        let subnet = [10, fastrand::u8(1..=254), fastrand::u8(1..=254)];
        let node = Netns::add(format!("{tag}-node"));
        let gateway = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 1);
        node.ip("link add br0 type bridge");
        // A bridge takes the lowest MAC of its ports unless given one: a pod
        // joining later would change it under the ARP caches of the pods
        // already there, and their packets to the node would be dropped.
        node.ip("link set br0 address 02:00:00:00:00:01");
        node.ip(&format!("addr add {gateway}/24 dev br0"));
        // No duplicate address detection: the address works at once.
        node.ip(&format!("addr add {}/64 dev br0 nodad", ipv6(subnet, 1)));
        node.ip("link set br0 up");

        let dir = tempfile::tempdir().expect("tempdir");
        // Applications run unprivileged and read their configuration here.
        set_mode(dir.path(), 0o755);
        std::fs::create_dir_all(dir.path().join("manifests")).expect("manifests dir");
        let config = ControllerConfig::local(dir.path(), gateway.into());
        // The controller's runtime thread is started from inside the
        // namespace, so it inherits it.
        let controller = in_netns(&node.path(), move || ControllerProcess::start(config));
        let tokens = BootstrapTokens::load_or_create(dir.path()).expect("tokens");
        Some(Self {
            tag,
            subnet,
            next_host: 2,
            dir,
            tokens,
            controller_addr: controller.addr,
            controller_admin: controller.admin_addr,
            controller: Some(controller),
            node,
        })
    }

    /// A new pod: its namespace, `eth0` on the bridge, a default route.
    pub fn pod(&mut self, name: &str) -> Pod {
        let host = self.next_host;
        self.next_host += 1;
        let ip = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host);
        let netns = Netns::add(format!("{}-{host}", self.tag));
        let peer = format!("{}v{host}", self.tag);
        netns.ip(&format!(
            "link add eth0 type veth peer name {peer} netns {}",
            self.node.name
        ));
        self.node.ip(&format!("link set {peer} master br0 up"));
        let ip6 = ipv6(self.subnet, host);
        netns.ip(&format!("addr add {ip}/24 dev eth0"));
        netns.ip(&format!("addr add {ip6}/64 dev eth0 nodad"));
        netns.ip("link set eth0 up");
        let gateway = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1);
        netns.ip(&format!("route add default via {gateway}"));
        netns.ip(&format!(
            "-6 route add default via {}",
            ipv6(self.subnet, 1)
        ));
        Pod {
            name: name.to_string(),
            ip,
            ip6,
            dir: self.dir.path().join(name),
            apps: Vec::new(),
            sidecar: None,
            netns,
        }
        .with_dir()
    }

    /// Runs `program args` as root on the node, outside every pod (no
    /// interception): the view of a scraper or a probe.
    pub async fn node_command(&self, program: &str, args: &[&str]) -> Output {
        let output = self.node.command(program).args(args).output();
        tokio::time::timeout(Duration::from_secs(20), output)
            .await
            .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 20 s"))
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    /// Writes a manifest file atomically and waits until the controller
    /// holds every object of every manifest (by its `objects` gauges).
    pub async fn write_manifest(&self, name: &str, contents: &str) {
        let manifests = self.dir.path().join("manifests");
        crate::write_atomically(&manifests.join(name), contents);
        let expected: usize = std::fs::read_dir(&manifests)
            .expect("manifests dir")
            .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
            .map(|text| {
                text.lines()
                    .filter(|l| {
                        let kind = l.strip_prefix("kind: ").unwrap_or_default().trim();
                        ["Service", "EndpointSlice", "Pod", "HTTPRoute"].contains(&kind)
                    })
                    .count()
            })
            .sum();
        let url = format!("http://{}/metrics", self.controller_admin);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .node_command("curl", &["-sS", "--max-time", "2", &url])
                .await;
            let held: f64 = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("trellis_controller_objects{"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum();
            if held as usize == expected {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the controller holds {held} objects, not {expected}, 10 s after {name} was written"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `pod`'s sidecar (after its iptables rules) as service account
    /// `sa`, with extra proxy variables; waits for its certificate.
    pub async fn sidecar(&self, pod: &mut Pod, sa: &str, extra: &[(&'static str, &str)]) {
        use trellis_proxy::config::*;
        pod.intercept();
        let identity = SpiffeId::new(TRUST_DOMAIN, "default", sa);
        let mut env: std::collections::HashMap<&'static str, String> = [
            (IDENTITY, identity.to_string()),
            (TOKEN, self.tokens.token_for(&identity)),
            (
                OUTBOUND_LISTEN,
                format!("127.0.0.1:{OUTBOUND_PORT},[::1]:{OUTBOUND_PORT}"),
            ),
            (
                INBOUND_LISTEN,
                format!("0.0.0.0:{INBOUND_PORT},[::]:{INBOUND_PORT}"),
            ),
            (
                ADMIN_LISTEN,
                format!("0.0.0.0:{ADMIN_PORT},[::]:{ADMIN_PORT}"),
            ),
            (APP_IP, pod.ip.to_string()),
            (WORKLOAD, pod.name.clone()),
        ]
        .into_iter()
        .collect();
        env.extend(crate::controller_env(self.controller_addr, self.dir.path()));
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        let config = Config::from_strings(&env).expect("proxy config");
        let runtime = NetnsRuntime::start(&pod.netns.path());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        runtime.handle.spawn(async move {
            let proxy = trellis_proxy::start(config).await.expect("proxy starts");
            proxy.ready().await;
            let _ = ready_tx.send(());
            proxy.wait().await;
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("sidecar gets a certificate within 10 s")
            .expect("sidecar started");
        pod.sidecar = Some(runtime);
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Some(controller) = self.controller.take() {
            controller.kill();
        }
    }
}

/// Host `host` of the network's IPv6 subnet, `fd00:x:y::host`.
fn ipv6(subnet: [u8; 3], host: u8) -> Ipv6Addr {
    let [_, x, y] = subnet.map(u16::from);
    Ipv6Addr::new(0xfd00, x, y, 0, 0, 0, 0, u16::from(host))
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// One pod: a namespace, its applications, and (when meshed) its sidecar.
/// On drop the applications are killed, then the sidecar stops, then the
/// namespace goes.
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The pod's files (application configs, logs), readable by the apps.
    pub dir: PathBuf,
    apps: Vec<tokio::process::Child>,
    sidecar: Option<NetnsRuntime>,
    pub netns: Netns,
}

impl Pod {
    fn with_dir(self) -> Self {
        std::fs::create_dir_all(&self.dir).expect("pod dir");
        set_mode(&self.dir, 0o777);
        self
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }

    /// Installs the interception rules, as `trellis-proxy init` does in a
    /// pod's init container: everything but root's (the sidecar's)
    /// traffic, in both families.
    fn intercept(&self) {
        use trellis_proxy::init::{rules, Config, Family, Iptables};
        for (family, program) in [(Family::V4, "iptables"), (Family::V6, "ip6tables")] {
            let steps = rules::apply(&Config::new(0), family).expect("valid init config");
            in_netns(&self.netns.path(), || Iptables::new(program).run(&steps))
                .unwrap_or_else(|e| panic!("{program} rules not installed: {e}"));
        }
    }

    /// `args` as the application user inside the pod.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = self.netns.command("setpriv");
        command
            .args([
                &format!("--reuid={APP_UID}"),
                &format!("--regid={APP_UID}"),
                "--clear-groups",
                "--",
            ])
            .args(args)
            .current_dir(&self.dir)
            // Its own process group, so the pod's end takes the children
            // (nginx's workers) along.
            .process_group(0);
        command
    }

    /// Starts a long-running application; it is killed with the pod.
    pub fn spawn(&mut self, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.apps.len())))
            .expect("app log");
        let child = self
            .command(args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"));
        self.apps.push(child);
    }

    /// Runs a client to completion (at most 20 s).
    pub async fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output();
        tokio::time::timeout(Duration::from_secs(20), output)
            .await
            .unwrap_or_else(|_| panic!("{args:?} did not finish within 20 s"))
            .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
    }

    /// Kills every application process, children included.
    fn kill_apps(&mut self) {
        for app in &self.apps {
            if let Some(pid) = app.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
        self.apps.clear();
    }

    /// What the applications printed, for failure messages.
    pub fn logs(&self) -> String {
        (0..self.apps.len())
            .map(|i| std::fs::read_to_string(self.dir.join(format!("{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until something in the pod listens on `port`.
    pub async fn wait_listening(&self, port: u16) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let addr = self.addr(port);
        loop {
            let connected = in_netns(&self.netns.path(), || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            });
            if connected.is_ok() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nothing listens on {addr} in pod {} after 10 s; its logs:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill_apps();
    }
}
