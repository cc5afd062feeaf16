//! The trellis path's sidecars, each in its own process, so their RSS and
//! CPU are their own: this binary re-executed as `internal-proxy`, or with
//! `--proxy PATH` a `trellis-proxy` binary (`trellis-proxy run`).
//!
//! The two differ. This binary is built with the whole workspace's
//! features, and kube-client turns on `tracing`'s `log` feature, which
//! makes every disabled trace span in h2 (a dozen per request) cost a
//! check and an out-of-line drop: about 7% more instructions per request.
//! `cargo build --release -p trellis-proxy` builds the proxy with its own
//! features, as it ships.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use trellis_tests::{AppClient, Mesh};

/// The argument that turns this binary into a sidecar.
pub const INTERNAL_PROXY: &str = "internal-proxy";

/// The `trellis-proxy` binary sidecars run, when not this one.
static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Sidecars run `binary` (`trellis-proxy run`) from now on.
pub fn run_binary(binary: &Path) -> anyhow::Result<()> {
    let binary = binary.canonicalize().with_context(|| {
        format!(
            "--proxy {}: build it with `cargo build --release -p trellis-proxy`",
            binary.display()
        )
    })?;
    BINARY
        .set(binary)
        .map_err(|_| anyhow::anyhow!("the sidecars' binary is already chosen"))
}

/// A sidecar process, killed when dropped.
pub struct ProxyProcess {
    child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
}

/// How a sidecar process is started: as it is, or under a tool (valgrind).
pub struct Launch {
    /// The program, with its arguments, that runs this binary's sidecar.
    pub wrapper: Vec<OsString>,
    /// How long it may take to become ready.
    pub ready_within: Duration,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            wrapper: Vec::new(),
            ready_within: Duration::from_secs(20),
        }
    }
}

impl ProxyProcess {
    pub async fn start(mesh: &Mesh, ip: IpAddr, sa: &str) -> anyhow::Result<Self> {
        Self::launch(mesh, ip, sa, Launch::default()).await
    }

    pub async fn launch(mesh: &Mesh, ip: IpAddr, sa: &str, how: Launch) -> anyhow::Result<Self> {
        use trellis_proxy::config::*;
        let identity = trellis_proto::SpiffeId::new(trellis_tests::TRUST_DOMAIN, "default", sa);
        let (outbound, inbound, admin) = (
            SocketAddr::new(ip, 4140),
            SocketAddr::new(ip, 4143),
            SocketAddr::new(ip, 4191),
        );
        let mut env: HashMap<&str, String> = HashMap::from([
            (IDENTITY, identity.to_string()),
            (TOKEN, mesh.tokens.token_for(&identity)),
            (OUTBOUND_LISTEN, outbound.to_string()),
            (INBOUND_LISTEN, inbound.to_string()),
            (ADMIN_LISTEN, admin.to_string()),
            (APP_IP, ip.to_string()),
            (WORKLOAD, sa.to_string()),
        ]);
        env.extend(trellis_tests::controller_env(
            mesh.controller_addr(),
            mesh.dir.path(),
        ));
        let (program, subcommand) = match BINARY.get() {
            Some(binary) => (binary.clone(), "run"),
            None => (std::env::current_exe().context("own path")?, INTERNAL_PROXY),
        };
        let mut command = match how.wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut command = Command::new(wrapper);
                command.args(args).arg(program);
                command
            }
            None => Command::new(program),
        };
        let child = command
            .arg(subcommand)
            .envs(env)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            // Its logs go to stderr: stdout is the bench's report, whose
            // last line `--output json` promises is the JSON.
            .stdout(std::io::stderr())
            .kill_on_drop(true)
            .spawn()
            .context("starting a proxy process")?;
        let client = AppClient::http1(admin);
        let deadline = Instant::now() + how.ready_within;
        while client
            .get(&admin.to_string(), "/ready")
            .await
            .map(|a| a.status.as_u16())
            != Ok(200)
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "proxy {sa} not ready in {:?}",
                how.ready_within
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            child,
            outbound,
            inbound,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// The sidecar process: the proxy with the log and on the runtime
/// `trellis-proxy run` uses (one thread unless `TRELLIS_WORKER_THREADS`
/// says otherwise, inherited from the bench's environment), with the
/// workspace's features (see above).
pub fn internal_proxy() -> anyhow::Result<()> {
    trellis_proxy::init_logging();
    let config = trellis_proxy::Config::from_strings(&trellis_proxy::config::Env)?;
    let runtime = trellis_proxy::runtime(config.worker_threads).context("proxy runtime")?;
    runtime.block_on(async {
        let proxy = trellis_proxy::start(config).await?;
        // Exit when the bench (holding our stdin) goes away.
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 16];
        tokio::select! {
            () = proxy.wait() => anyhow::bail!("a proxy task stopped"),
            _ = async { while stdin.read(&mut buf).await.is_ok_and(|n| n > 0) {} } => Ok(()),
        }
    })
}
