//! Command-line pieces shared by `trellis-controller` and `meshctl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::controller::ControllerConfig;
use crate::transport::Plaintext;

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
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub leaf_lifetime: Duration,
    /// The controller's namespace: with the service account, the SPIFFE ID
    /// its serving certificate names (proxies' TRELLIS_CONTROLLER_IDENTITY).
    #[arg(long, default_value = trellis_proto::CONTROLLER_NAMESPACE, env = "TRELLIS_NAMESPACE")]
    pub namespace: String,
    /// The controller's service account.
    #[arg(long, default_value = trellis_proto::CONTROLLER_SERVICE_ACCOUNT, env = "TRELLIS_SERVICE_ACCOUNT")]
    pub service_account: String,
    /// Serve plaintext gRPC to loopback clients too (local mode); any other
    /// client must use TLS.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "TRELLIS_LOOPBACK_PLAINTEXT")]
    pub loopback_plaintext: bool,
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
            namespace: args.namespace,
            service_account: args.service_account,
            plaintext: if args.loopback_plaintext {
                Plaintext::Loopback
            } else {
                Plaintext::Refused
            },
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `24h`.
pub fn duration(s: &str) -> Result<Duration, String> {
    trellis_proxy::config::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration; use e.g. 500ms, 30s, 5m or 24h"))
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
