//! The controller process as a library: load the manifests, open the CA,
//! serve discovery and identity over gRPC (TLS with the controller's own
//! certificate; plaintext from loopback in local mode), and, if asked, the
//! injection webhook over HTTPS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;

use crate::discovery::DiscoveryService;
use crate::identity::{
    Authenticator, BootstrapTokens, Ca, IdentityService, IssuerChanges, IssuerError, IssuerSource,
    ServingCertificate, TokenReviewer,
};
use crate::lease::{Leadership, LeaseConfig};
use crate::metrics::ControllerMetrics;
use crate::rollout::cluster::ClusterApi;
use crate::rollout::local::LocalApi;
use crate::rollout::measure::Metrics;
use crate::rollout::{RolloutApi, RolloutController};
use crate::route_status::StatusWriter;
use crate::source::cluster::ClusterSource;
use crate::source::local::LocalSource;
use crate::source::manifest::ManifestError;
use crate::store::Store;
use crate::transport::{self, Plaintext};
use trellis_proto::SpiffeId;

/// Where the mesh's objects come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of Kubernetes manifests, hot-reloaded (local mode).
    Manifests(PathBuf),
    /// The Kubernetes API server (cluster mode).
    Cluster(Box<kube::Config>),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Manifests(dir) => write!(f, "manifests in {}", dir.display()),
            Source::Cluster(config) => write!(f, "the Kubernetes API at {}", config.cluster_url),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub source: Source,
    /// Where the CA and bootstrap-token keys live (files 0600; local mode).
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// `/live` and `/ready`.
    pub admin: SocketAddr,
    pub trust_domain: String,
    pub leaf_lifetime: Duration,
    /// The controller's own namespace and service account: its serving
    /// certificate names `spiffe://<trust-domain>/ns/<namespace>/sa/<service account>`.
    /// In cluster mode the CA's Secret and ConfigMap are in this namespace.
    pub namespace: String,
    pub service_account: String,
    /// Which plaintext gRPC connections are served (TLS always is).
    pub plaintext: Plaintext,
    /// How long the leader's Lease lasts unrenewed (cluster mode).
    pub lease_duration: Duration,
    /// The injection webhook, if served.
    pub webhook: Option<WebhookConfig>,
    /// Where rollout gates read metrics: this Prometheus (its base URL),
    /// or, when `None`, every meshed pod's `/metrics` directly.
    pub prometheus: Option<String>,
}

/// Where and as what the injection webhook is served.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    /// The webhook's Service in the controller's namespace: its serving
    /// certificate names `<service>.<namespace>.svc` (and `.cluster.local`).
    pub service: String,
    /// What injected proxies get.
    pub inject: crate::inject::Config,
}

impl WebhookConfig {
    /// The DNS names the API server may dial the webhook by.
    pub fn dns_names(&self, namespace: &str) -> Vec<String> {
        let svc = format!("{}.{namespace}.svc", self.service);
        vec![format!("{svc}.cluster.local"), svc]
    }
}

impl ControllerConfig {
    /// A local-mode controller on loopback ports the OS picks, as the
    /// tests start it: state and manifests in `dir`.
    pub fn local(dir: &std::path::Path, ip: std::net::IpAddr) -> Self {
        Self {
            source: Source::Manifests(dir.join("manifests")),
            state_dir: dir.to_path_buf(),
            listen: SocketAddr::new(ip, 0),
            admin: SocketAddr::new(ip, 0),
            trust_domain: "cluster.local".into(),
            leaf_lifetime: Duration::from_secs(3600),
            namespace: trellis_proto::CONTROLLER_NAMESPACE.into(),
            service_account: trellis_proto::CONTROLLER_SERVICE_ACCOUNT.into(),
            plaintext: Plaintext::Loopback,
            lease_duration: crate::lease::DEFAULT_LEASE_DURATION,
            webhook: None,
            prometheus: None,
        }
    }

    /// The SPIFFE ID the controller's serving certificate names.
    pub fn identity(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The manifest directory cannot be read.
    #[error(
        "cannot read the manifest directory {dir}: {source}; create it or pass another --manifests"
    )]
    Manifests {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The CA could not be used.
    #[error(transparent)]
    Ca(#[from] crate::identity::CaError),
    /// The CA's issuer could not be read or created.
    #[error(transparent)]
    Issuer(#[from] crate::identity::IssuerError),
    /// The bootstrap-token key could not be opened or created.
    #[error("bootstrap tokens in {dir}: {reason}")]
    Tokens { dir: PathBuf, reason: String },
    /// The serving certificate cannot be used by rustls.
    #[error("the controller's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// No Kubernetes client could be built from the configuration.
    #[error(
        "cannot reach the Kubernetes API: {0}; check the kubeconfig or the pod's service account"
    )]
    Kubernetes(#[from] kube::Error),
    /// The gRPC listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running controller. Dropping it stops its tasks (open gRPC streams end
/// with the runtime that runs them).
pub struct Controller {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The webhook's HTTPS address, if served.
    pub webhook_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub ca: Arc<Ca>,
    /// Local mode's bootstrap tokens (cluster mode uses TokenReview).
    pub tokens: Option<Arc<BootstrapTokens>>,
    /// The certificate the gRPC port presents.
    pub serving: Arc<ServingCertificate>,
    /// The problems of the last manifest reload.
    pub manifest_errors: watch::Receiver<Vec<ManifestError>>,
    /// Whether this replica leads (see [`crate::lease`]).
    pub leadership: Leadership,
    tasks: JoinSet<()>,
}

/// How often the serving certificate is checked for a CA rotation or its
/// renewal time.
const SERVING_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a failed renewal of the serving certificate is retried.
const SERVING_RETRY: Duration = Duration::from_secs(10);

impl Controller {
    pub async fn start(config: ControllerConfig) -> Result<Self, ControllerError> {
        let store = Store::new(&config.trust_domain);
        let mut tasks = JoinSet::new();
        let metrics = Arc::new(ControllerMetrics::new());
        // Rollouts write their routes and statuses where the objects come from.
        let (manifest_errors, leadership, client, rollout_api) = match &config.source {
            Source::Manifests(dir) => {
                let mut source = LocalSource::new(dir, store.clone());
                // Load once before serving, so the first answers are complete.
                source
                    .reload()
                    .map_err(|source| ControllerError::Manifests {
                        dir: dir.clone(),
                        source,
                    })?;
                let errors = source.errors();
                tasks.spawn(source.run());
                let api = RolloutApi::Local(LocalApi {
                    manifests: dir.clone(),
                });
                (errors, Leadership::sole(&metrics.leader), None, api)
            }
            Source::Cluster(kube_config) => {
                let client = kube::Client::try_from(kube_config.as_ref().clone())?;
                let source = ClusterSource::new(client.clone(), store.clone());
                let synced = source.synced();
                tasks.spawn(source.run());
                // Serve once every kind is listed: a proxy asking earlier
                // would be told a Service has no endpoints.
                tracing::info!(api = %kube_config.cluster_url, "listing the cluster's objects");
                synced.await;
                // Only a replica with the whole store may lead.
                let lease = LeaseConfig::new(&config.namespace, config.lease_duration);
                let leadership = Leadership::elect(client.clone(), lease, metrics.leader.clone());
                // The leader reports each route's conditions where users look.
                let leader = leadership.is_leader();
                tasks.spawn(
                    StatusWriter::http_routes(client.clone(), store.clone(), leader.clone()).run(),
                );
                tasks.spawn(StatusWriter::grpc_routes(client.clone(), store.clone(), leader).run());
                let api = RolloutApi::Cluster(ClusterApi {
                    client: client.clone(),
                });
                (watch::channel(Vec::new()).1, leadership, Some(client), api)
            }
        };

        // Local mode: the CA's files and bootstrap tokens in the state
        // directory. Cluster mode: a Secret and a ConfigMap, and TokenReview.
        let (issuer, tokens, authenticator) = match client {
            None => {
                let tokens = Arc::new(BootstrapTokens::load_or_create(&config.state_dir).map_err(
                    |e| ControllerError::Tokens {
                        dir: config.state_dir.clone(),
                        reason: e.to_string(),
                    },
                )?);
                let authenticator = Authenticator::BootstrapTokens(tokens.clone());
                let issuer = IssuerSource::Files(config.state_dir.clone());
                (issuer, Some(tokens), authenticator)
            }
            Some(client) => {
                let issuer = IssuerSource::cluster(client.clone(), &config.namespace);
                let authenticator = Authenticator::TokenReview(TokenReviewer::new(client));
                (issuer, None, authenticator)
            }
        };
        let ca = Arc::new(issuer.open(&config.trust_domain).await?);

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ControllerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().unwrap_or(config.listen);
        let admin_listener =
            TcpListener::bind(config.admin)
                .await
                .map_err(|source| ControllerError::Bind {
                    addr: config.admin,
                    source,
                })?;
        let admin_addr = admin_listener.local_addr().unwrap_or(config.admin);
        let admin = Arc::new(crate::admin::Admin {
            ca: ca.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            manifest_errors: manifest_errors.clone(),
        });

        let (serving, renew_at) = ServingCertificate::new(
            ca.clone(),
            config.identity(),
            Vec::new(),
            config.leaf_lifetime,
        )?;
        let tls = serving.server_config()?;
        let authenticator = Arc::new(authenticator);
        let identity = IdentityService::new(
            ca.clone(),
            authenticator.clone(),
            config.leaf_lifetime,
            metrics.clone(),
        );
        let router = tonic::transport::Server::builder()
            .add_service(
                DiscoveryService::new(store.clone(), metrics.clone())
                    .with_authenticator(authenticator)
                    .into_server(),
            )
            .add_service(identity.into_server());

        let gate_metrics = match &config.prometheus {
            Some(url) => Metrics::prometheus(url),
            None => Metrics::proxies(),
        };
        tasks.spawn(
            RolloutController::new(
                store.clone(),
                rollout_api,
                gate_metrics,
                leadership.is_leader(),
                metrics.rollouts.clone(),
            )
            .run(),
        );
        tasks.spawn(admin.serve(admin_listener));
        tasks.spawn(follow_issuer(ca.clone(), issuer.changes(), metrics.clone()));
        tasks.spawn(maintain_serving(ca.clone(), serving.clone(), renew_at));
        let webhook_addr = match &config.webhook {
            None => None,
            Some(webhook) => {
                Some(start_webhook(&config, webhook, &ca, &store, &metrics, &mut tasks).await?)
            }
        };
        let incoming = transport::incoming(listener, tls, config.plaintext, metrics.clone());
        tasks.spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        });
        tracing::info!(%addr, identity = %serving.identity(), plaintext = ?config.plaintext, source = %config.source, "controller started");
        Ok(Self {
            addr,
            admin_addr,
            webhook_addr,
            store,
            ca,
            tokens,
            serving,
            manifest_errors,
            leadership,
            tasks,
        })
    }

    /// Runs until one of the controller's tasks ends (they only end on failure).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }

    /// A graceful stop: hands the Lease over at once, then stops serving.
    /// (Dropping the controller instead is a crash to its peers: the Lease
    /// is taken over when it expires.)
    pub async fn shutdown(self) {
        let Self { leadership, .. } = self;
        leadership.release().await;
    }
}

/// Binds the webhook's port and serves it with its own certificate, kept
/// fresh like the gRPC one.
async fn start_webhook(
    config: &ControllerConfig,
    webhook: &WebhookConfig,
    ca: &Arc<Ca>,
    store: &Arc<Store>,
    metrics: &Arc<ControllerMetrics>,
    tasks: &mut JoinSet<()>,
) -> Result<SocketAddr, ControllerError> {
    let listener =
        TcpListener::bind(webhook.listen)
            .await
            .map_err(|source| ControllerError::Bind {
                addr: webhook.listen,
                source,
            })?;
    let addr = listener.local_addr().unwrap_or(webhook.listen);
    let (serving, renew_at) = ServingCertificate::new(
        ca.clone(),
        config.identity(),
        webhook.dns_names(&config.namespace),
        config.leaf_lifetime,
    )?;
    let tls = serving.https_server_config()?;
    let reviewer = Arc::new(crate::webhook::Reviewer {
        injector: crate::inject::Injector::new(
            webhook.inject.clone(),
            &config.namespace,
            &config.trust_domain,
        ),
        ca: ca.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
    });
    tasks.spawn(maintain_serving(ca.clone(), serving, renew_at));
    tasks.spawn(crate::webhook::serve(reviewer, listener, tls));
    tracing::info!(%addr, names = ?webhook.dns_names(&config.namespace), "injection webhook started");
    Ok(addr)
}

/// Swaps in every new issuer and bundle the source reports, or refuses it
/// with the reason logged and counted once (the previous issuer keeps signing).
async fn follow_issuer(ca: Arc<Ca>, mut issuer: IssuerChanges, metrics: Arc<ControllerMetrics>) {
    let reject = |error: &dyn std::fmt::Display| {
        metrics
            .issuer_updates
            .with_label_values(&["rejected"])
            .inc();
        tracing::error!(%error, "rejected the new issuer; still signing with the previous one");
    };
    // Files are read every second: a bad version is reported once.
    let mut rejected = None;
    loop {
        let material = match issuer.next().await {
            Ok(material) if rejected.as_ref() == Some(&material) => continue,
            Ok(material) => material,
            Err(e @ IssuerError::Malformed(_)) => {
                reject(&e);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the CA's issuer; still signing with the previous one");
                continue;
            }
        };
        match ca.replace(material.clone()) {
            Ok(false) => {}
            Ok(true) => {
                metrics.issuer_updates.with_label_values(&["applied"]).inc();
                tracing::info!(issuer = %material.cert.origin, "the CA's issuer or bundle changed; now signing with the new one");
            }
            Err(e) => {
                reject(&e);
                rejected = Some(material);
            }
        }
    }
}

/// Keeps the serving certificate fresh: re-issued by the new issuer after
/// a rotation, and before it expires.
async fn maintain_serving(ca: Arc<Ca>, serving: Arc<ServingCertificate>, mut renew_at: SystemTime) {
    let mut tick = tokio::time::interval(SERVING_CHECK_INTERVAL);
    let mut generation = ca.generation();
    loop {
        tick.tick().await;
        let rotated = ca.generation() != generation;
        generation = ca.generation();
        if rotated || SystemTime::now() >= renew_at {
            match serving.renew() {
                Ok(next) => {
                    renew_at = next;
                    tracing::info!(identity = %serving.identity(), "serving certificate renewed");
                }
                Err(e) => {
                    // The current certificate serves on; try again shortly.
                    renew_at = SystemTime::now() + SERVING_RETRY;
                    tracing::error!(error = %e, "cannot renew the controller's serving certificate");
                }
            }
        }
    }
}

/// Accepted gRPC connections, with Nagle off: discovery pushes small
/// messages that must not wait for a delayed ACK.
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(tcp) = &accepted {
            let _ = tcp.set_nodelay(true);
        }
        accepted
    })
}
