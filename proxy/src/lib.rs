//! The Trellis sidecar proxy, as a library: `main.rs` and the tests both
//! start it through [`start`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod cache;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod errors;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod metrics;
pub mod outbound;
pub mod outlier;
pub mod route;
pub mod socket;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::transport::Endpoint;
use trellis_proto::identity::identity_client::IdentityClient;

pub use config::Config;
use identity::IdentityManager;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The controller address is not a valid URL.
    #[error("invalid controller address {0:?}")]
    Controller(String),
}

/// A running proxy. Dropping it stops every task.
pub struct Proxy {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub identity: Arc<IdentityManager>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Waits until the proxy has a certificate (and so serves meshed traffic).
    pub async fn ready(&self) {
        self.identity.ready().await;
    }

    /// Runs until one of the proxy's tasks ends (they only end on failure).
    pub async fn wait(mut self) {
        self.tasks.join_next().await;
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// The runtime a proxy process runs on: one thread, or `worker_threads`.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    builder.enable_all().build()
}

/// Binds the listeners and starts the proxy's tasks on the current runtime.
pub async fn start(config: Config) -> Result<Proxy, StartError> {
    let outbound_listener = bind("outbound", config.outbound_listen).await?;
    let inbound_listener = bind("inbound", config.inbound_listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;
    let addr = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);

    let channel = Endpoint::from_shared(config.controller.clone())
        .map_err(|_| StartError::Controller(config.controller.clone()))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy();
    let identity = IdentityManager::new(config.identity.clone());
    let workload = metrics::Workload {
        name: if config.workload.is_empty() {
            config.identity.service_account.clone()
        } else {
            config.workload.clone()
        },
        namespace: config.identity.namespace.clone(),
        version: config.version.clone(),
    };
    let metrics = Arc::new(if config.metrics {
        metrics::Metrics::new(workload)
    } else {
        metrics::Metrics::disabled(workload)
    });
    let discovery = discovery::Discovery::new(
        channel.clone(),
        config.identity.to_string(),
        metrics.clone(),
    );
    let outbound = outbound::Outbound::new(discovery, identity.clone(), metrics.clone(), &config);
    let inbound = inbound::Inbound::new(
        identity.clone(),
        metrics.clone(),
        config.app_ip,
        config.inbound_mode,
        config.opaque_ports.clone(),
    );
    let admin = admin::Admin::new(identity.clone(), metrics.clone());

    let proxy_addrs = (
        addr(&outbound_listener, config.outbound_listen),
        addr(&inbound_listener, config.inbound_listen),
        addr(&admin_listener, config.admin_listen),
    );
    let mut tasks = JoinSet::new();
    tasks.spawn(
        identity
            .clone()
            .run(IdentityClient::new(channel), config.token.clone()),
    );
    tasks.spawn(serve_outbound(outbound, outbound_listener));
    tasks.spawn(inbound.serve(inbound_listener));
    tasks.spawn(admin.serve(admin_listener));
    tasks.spawn(export_certificate_expiry(identity.clone(), metrics));
    tracing::info!(
        identity = %config.identity,
        outbound = %proxy_addrs.0,
        inbound = %proxy_addrs.1,
        admin = %proxy_addrs.2,
        "proxy started"
    );
    Ok(Proxy {
        outbound_addr: proxy_addrs.0,
        inbound_addr: proxy_addrs.1,
        admin_addr: proxy_addrs.2,
        identity,
        tasks,
    })
}

/// Keeps the certificate-expiry gauge current.
async fn export_certificate_expiry(identity: Arc<IdentityManager>, metrics: Arc<metrics::Metrics>) {
    let mut changes = identity.subscribe();
    loop {
        if let Some(tls) = changes.borrow_and_update().clone() {
            metrics.certificate(tls.not_after);
        }
        if changes.changed().await.is_err() {
            // The manager is gone with the proxy; park rather than end the
            // task set (which signals a failure).
            std::future::pending::<()>().await;
        }
    }
}

/// The outbound listener: applications that dial it as an explicit proxy
/// (`http_proxy`), and connections iptables redirected to it.
async fn serve_outbound(outbound: Arc<outbound::Outbound>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(outbound.clone().serve(tcp));
            }
            Err(e) => tracing::warn!(error = %e, "outbound accept failed"),
        }
    }
}
