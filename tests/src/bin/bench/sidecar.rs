//! The trellis path's sidecars, each in its own process (this binary
//! re-executed as `internal-proxy`), so their RSS and CPU are their own.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use trellis_tests::{AppClient, Mesh};

/// The argument that turns this binary into a sidecar.
pub const INTERNAL_PROXY: &str = "internal-proxy";

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
        let own = std::env::current_exe().context("own path")?;
        let mut command = match how.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(own);
                command
            }
            None => Command::new(own),
        };
        let child = command
            .arg(INTERNAL_PROXY)
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
/// `trellis-proxy run` uses
/// (one thread unless `TRELLIS_WORKER_THREADS` says otherwise, inherited
/// from the bench's environment), so the bench measures what ships.
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
