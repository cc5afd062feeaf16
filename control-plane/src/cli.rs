//! Command-line pieces of the controller, shared by `trellis-controller`
//! and the demo's controller (`meshctl`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::controller::ControllerConfig;

/// Flags of the controller, whichever binary starts it.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Directory of Kubernetes manifests to serve (local mode), hot-reloaded.
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    pub manifests: PathBuf,
    /// Where the CA and token keys are kept (created 0600 on first start).
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    pub state_dir: PathBuf,
    /// gRPC address for discovery and identity.
    #[arg(long, default_value = "127.0.0.1:8090", env = "TRELLIS_LISTEN")]
    pub listen: SocketAddr,
    /// Admin address: /live, /ready.
    #[arg(long, default_value = "127.0.0.1:9990", env = "TRELLIS_ADMIN")]
    pub admin: SocketAddr,
    #[arg(long, default_value = "cluster.local", env = "TRELLIS_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Lifetime of workload certificates, e.g. 24h or 30s.
    #[arg(long, default_value = "24h", value_parser = trellis_common::duration::parse)]
    pub leaf_lifetime: Duration,
}

impl From<ControllerArgs> for ControllerConfig {
    fn from(args: ControllerArgs) -> Self {
        ControllerConfig {
            manifests: args.manifests,
            state_dir: args.state_dir,
            listen: args.listen,
            admin: args.admin,
            trust_domain: args.trust_domain,
            leaf_lifetime: args.leaf_lifetime,
        }
    }
}

/// Logs to stderr, `info` unless RUST_LOG says otherwise.
pub fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
