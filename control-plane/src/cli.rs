//! Command-line pieces of the controller, shared by `trellis-controller`
//! and the demo's controller (`meshctl`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::controller::{ControllerConfig, Source, WebhookConfig};
use crate::transport::Plaintext;

/// Where the controller reads the mesh's objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A directory of manifests (`--manifests DIR`).
    Manifests,
    /// The Kubernetes API: in-cluster configuration in a pod, else the
    /// kubeconfig (`KUBECONFIG`, `~/.kube/config`).
    Cluster,
}

/// Flags of the controller, whichever binary starts it.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// Where the mesh's objects come from; the default is `manifests` when
    /// `--manifests` is given, `cluster` when running in a pod.
    #[arg(long, value_enum, env = "TRELLIS_SOURCE")]
    pub source: Option<SourceKind>,
    /// Directory of Kubernetes manifests to serve (local mode), hot-reloaded.
    #[arg(long, env = "TRELLIS_MANIFESTS")]
    pub manifests: Option<PathBuf>,
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
    #[arg(long, default_value = "24h", value_parser = crate::identity::parse_leaf_lifetime)]
    pub leaf_lifetime: Duration,
    /// The controller's namespace: with the service account, the SPIFFE ID
    /// its serving certificate names (proxies' TRELLIS_CONTROLLER_IDENTITY).
    #[arg(long, default_value = trellis_proto::CONTROLLER_NAMESPACE, env = "TRELLIS_NAMESPACE")]
    pub namespace: String,
    /// The controller's service account.
    #[arg(long, default_value = trellis_proto::CONTROLLER_SERVICE_ACCOUNT, env = "TRELLIS_SERVICE_ACCOUNT")]
    pub service_account: String,
    /// Serve plaintext gRPC to loopback clients too (local mode only); any
    /// other client must use TLS.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "TRELLIS_LOOPBACK_PLAINTEXT")]
    pub loopback_plaintext: bool,
    /// Cluster mode: how long the leader's Lease lasts unrenewed, in whole
    /// seconds. A crashed leader is replaced within this; the leader renews
    /// every third of it.
    #[arg(long, default_value = "15s", value_parser = crate::lease::parse_lease_duration, env = "TRELLIS_LEASE_DURATION")]
    pub lease_duration: Duration,
    /// Rollout gates read metrics from this Prometheus (its base URL, e.g.
    /// http://prometheus.monitoring:9090); without it, from every meshed
    /// pod's proxy `/metrics` directly.
    #[arg(long, env = "TRELLIS_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// Serve the injection webhook (HTTPS, `POST /inject`) on this address;
    /// without it there is no webhook.
    #[arg(long, env = "TRELLIS_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<SocketAddr>,
    /// The webhook's Service name: its certificate names
    /// `<service>.<namespace>.svc` and `<service>.<namespace>.svc.cluster.local`.
    #[arg(
        long,
        default_value = "trellis-webhook",
        env = "TRELLIS_WEBHOOK_SERVICE"
    )]
    pub webhook_service: String,
    /// YAML file of what injected proxies get (image, resources, ...); every
    /// field is optional.
    #[arg(long, env = "TRELLIS_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,
}

/// Why the flags do not make a controller.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--source manifests needs --manifests DIR")]
    NoManifestDir,
    #[error("--manifests is for --source manifests; drop one of them")]
    ManifestsWithCluster,
    #[error(
        "say where the mesh's objects are: --manifests DIR (local mode) or --source cluster \
         (the Kubernetes API; the default inside a pod)"
    )]
    NoSource,
    #[error("no Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Kubeconfig(#[from] kube::config::InferConfigError),
    #[error(transparent)]
    InjectConfig(#[from] crate::inject::ConfigError),
    #[error("--inject-config is for the webhook; add --webhook-listen ADDR or drop it")]
    InjectConfigWithoutWebhook,
}

impl ControllerArgs {
    /// The controller's configuration; cluster mode reads the in-cluster
    /// configuration or the kubeconfig.
    pub async fn into_config(self) -> Result<ControllerConfig, ArgsError> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let kind = match (self.source, &self.manifests) {
            (Some(kind), _) => kind,
            (None, Some(_)) => SourceKind::Manifests,
            (None, None) if in_pod => SourceKind::Cluster,
            (None, None) => return Err(ArgsError::NoSource),
        };
        let source = match (kind, self.manifests) {
            (SourceKind::Manifests, Some(dir)) => Source::Manifests(dir),
            (SourceKind::Manifests, None) => return Err(ArgsError::NoManifestDir),
            (SourceKind::Cluster, Some(_)) => return Err(ArgsError::ManifestsWithCluster),
            (SourceKind::Cluster, None) => Source::Cluster(Box::new(kube::Config::infer().await?)),
        };
        let inject = match &self.inject_config {
            Some(path) => crate::inject::Config::from_file(path)?,
            None => crate::inject::Config::default(),
        };
        let webhook = match self.webhook_listen {
            Some(listen) => Some(WebhookConfig {
                listen,
                service: self.webhook_service,
                inject,
            }),
            None if self.inject_config.is_some() => {
                return Err(ArgsError::InjectConfigWithoutWebhook)
            }
            None => None,
        };
        Ok(ControllerConfig {
            webhook,
            prometheus: self.prometheus_url,
            state_dir: self.state_dir,
            listen: self.listen,
            admin: self.admin,
            trust_domain: self.trust_domain,
            leaf_lifetime: self.leaf_lifetime,
            namespace: self.namespace,
            service_account: self.service_account,
            lease_duration: self.lease_duration,
            // Local mode only: in a cluster, a pod's loopback is not ours to trust.
            plaintext: match source {
                Source::Manifests(_) if self.loopback_plaintext => Plaintext::Loopback,
                _ => Plaintext::Refused,
            },
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    async fn config(extra: &[&str]) -> Result<ControllerConfig, ArgsError> {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_str().unwrap();
        let mut argv = vec!["trellis-controller", "--state-dir", dir, "--manifests", dir];
        argv.extend(extra);
        Cli::parse_from(argv).args.into_config().await
    }

    #[tokio::test]
    async fn the_webhook_flags_make_a_webhook_configuration() {
        assert!(config(&[]).await.unwrap().webhook.is_none());
        let config_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config_file.path(), "proxyUid: 4321\n").unwrap();
        let path = config_file.path().to_str().unwrap();
        let config = config(&["--webhook-listen", "0.0.0.0:8443", "--inject-config", path])
            .await
            .unwrap();
        let webhook = config.webhook.expect("a webhook");
        assert_eq!(webhook.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(webhook.inject.proxy_uid, 4321);
        assert_eq!(
            webhook.dns_names("trellis"),
            [
                "trellis-webhook.trellis.svc.cluster.local",
                "trellis-webhook.trellis.svc"
            ]
        );
        let error = self::config(&["--inject-config", path]).await.unwrap_err();
        assert!(error.to_string().contains("--webhook-listen"), "{error}");
        std::fs::write(config_file.path(), "proxyUID: 1\n").unwrap();
        let error = self::config(&["--webhook-listen", "0.0.0.0:8443", "--inject-config", path])
            .await
            .unwrap_err();
        assert!(error.to_string().contains("proxyUID"), "{error}");
    }
}
