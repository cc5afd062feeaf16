//! The Trellis sidecar proxy, as a library: `main.rs` runs it through
//! [`run`] (start, wait for SIGTERM, SIGINT or `POST /shutdown`, drain);
//! the tests start it through [`start`] and drain it with [`Proxy::drain`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod balance;
pub mod cache;
pub mod coalesce;
pub mod config;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod errors;
pub mod grpc;
pub mod http;
pub mod http2;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod listen;
pub mod metrics;
pub mod outbound;
pub mod outlier;
pub mod route;
pub mod server;
pub mod socket;
pub mod tls;
pub mod woken;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use trellis_proto::identity::identity_client::IdentityClient;

pub use config::Config;
use drain::{Drain, Drained};
use identity::IdentityManager;
use server::Server;

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
    /// The controller's URL or trust bundle is unusable.
    #[error(transparent)]
    Controller(#[from] control::ControllerError),
}

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("starting the proxy: {0}")]
    Start(#[from] StartError),
    /// The signal handlers could not be installed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
    /// One of the proxy's tasks ended, which it does only on failure.
    #[error("a proxy task stopped unexpectedly")]
    TaskStopped,
}

/// Starts the proxy, serves until SIGTERM (what the kubelet sends), SIGINT
/// or `POST /shutdown` on the admin port, then drains: listeners close,
/// in-flight requests and tunnels get until `TRELLIS_DRAIN_TIMEOUT`.
pub async fn run(config: Config) -> Result<(), RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut proxy = start(config).await?;
    let drain = proxy.drain.clone();
    let why = tokio::select! {
        _ = proxy.tasks.join_next() => return Err(RunError::TaskStopped),
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
        () = drain.started() => "POST /shutdown",
    };
    tracing::info!(signal = why, timeout = ?proxy.drain_timeout, "draining");
    let drained = proxy.drain().await;
    tracing::info!(
        elapsed = ?drained.elapsed,
        cut = drained.cut,
        "drained; exiting"
    );
    Ok(())
}

/// A running proxy. Dropping it stops its listeners (not the connections
/// they accepted); [`Proxy::drain`] stops it gracefully.
pub struct Proxy {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub identity: Arc<IdentityManager>,
    /// The traffic listeners and their connections.
    drain: Arc<Drain>,
    /// The admin listener, drained last: `/ready` says "draining" meanwhile.
    admin_drain: Arc<Drain>,
    drain_timeout: Duration,
    tasks: JoinSet<()>,
}

/// How long the admin port's connections get once traffic is drained.
const ADMIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

impl Proxy {
    /// Waits until the proxy has a certificate (and so serves meshed traffic).
    pub async fn ready(&self) {
        self.identity.ready().await;
    }

    /// Runs until one of the proxy's tasks ends (they only end on failure).
    pub async fn wait(mut self) {
        self.tasks.join_next().await;
    }

    /// Starts the drain without waiting for it, as `POST /shutdown` does.
    pub fn shutdown(&self) {
        self.drain.start();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Drains (starting the drain if [`shutdown`](Self::shutdown) or
    /// `/shutdown` has not): the outbound and inbound listeners close,
    /// HTTP/2 connections get GOAWAY, HTTP/1 ones close after their request
    /// in flight, tunnels may finish; at the drain timeout the rest is cut.
    /// Then the admin listener closes. Returns how the traffic drain ended.
    pub async fn drain(&self) -> Drained {
        let drained = self.drain.run(self.drain_timeout).await;
        self.admin_drain.run(ADMIN_DRAIN_TIMEOUT).await;
        drained
    }
}

/// Binds a listener per address (one per family, for dual stack): an
/// IPv6 socket takes IPv6 only, so it shares the port with the IPv4 one.
/// An IPv6 address after the first is skipped, with a warning, on a host
/// without IPv6, so one configuration serves every cluster.
fn bind_each(what: &'static str, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, StartError> {
    let mut listeners = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        match listen::bind(*addr) {
            Ok(listener) => listeners.push(listener),
            Err(source) if i > 0 && addr.is_ipv6() && listen::no_ipv6(&source) => {
                tracing::warn!(%addr, error = %source, "this host has no IPv6: not listening on {what}'s IPv6 address");
            }
            Err(source) => {
                return Err(StartError::Bind {
                    what,
                    addr: *addr,
                    source,
                })
            }
        }
    }
    Ok(listeners)
}

/// The log a proxy process writes: `RUST_LOG`, or `info`. Also what keeps
/// the spans and events below that level cheap: without a subscriber,
/// `tracing` hands each one to the `log` crate instead.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
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
    let outbound_listeners = bind_each("outbound", &config.outbound_listen)?;
    let inbound_listeners = bind_each("inbound", &config.inbound_listen)?;
    let admin_listeners = bind_each("admin", &config.admin_listen)?;
    let addr = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);

    let identity = IdentityManager::new(config.identity.clone());
    let channel = control::channel(&config.controller, identity.subscribe())?;
    let workload = metrics::Workload {
        name: if config.workload.is_empty() {
            config.identity.service_account.as_str().into()
        } else {
            config.workload.as_str().into()
        },
        namespace: config.identity.namespace.as_str().into(),
        version: config.version.as_str().into(),
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
    let authz = authz::Authz::watch(metrics.inbound_authz.clone(), &discovery, &config);
    let drain = Drain::new();
    let admin_drain = Drain::new();
    let listeners = metrics.listeners.clone();
    let outbound_server = Server::new(&config, "outbound", listeners.clone());
    let inbound_server = Server::new(&config, "inbound", listeners.clone());
    let admin_server = Server::new(&config, "admin", listeners);
    let outbound = outbound::Outbound::new(discovery, identity.clone(), metrics.clone(), &config);
    let inbound = inbound::Inbound::new(
        identity.clone(),
        metrics.clone(),
        authz,
        inbound_server,
        &config,
    );
    let admin = admin::Admin::new(
        identity.clone(),
        metrics.clone(),
        drain.clone(),
        admin_server,
    );

    let proxy_addrs = (
        addr(&outbound_listeners[0], config.outbound_listen[0]),
        addr(&inbound_listeners[0], config.inbound_listen[0]),
        addr(&admin_listeners[0], config.admin_listen[0]),
    );
    let mut tasks = JoinSet::new();
    tasks.spawn(
        identity
            .clone()
            .run(IdentityClient::new(channel), config.token.clone()),
    );
    let outbound_server = Arc::new(outbound_server);
    for listener in outbound_listeners {
        tasks.spawn(listening(serve_outbound(
            outbound.clone(),
            outbound_server.clone(),
            listener,
            metrics.listeners.clone(),
            drain.watch(),
        )));
    }
    for listener in inbound_listeners {
        tasks.spawn(listening(inbound.clone().serve(listener, drain.watch())));
    }
    for listener in admin_listeners {
        tasks.spawn(listening(
            admin.clone().serve(listener, admin_drain.watch()),
        ));
    }
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
        drain,
        admin_drain,
        drain_timeout: config.drain_timeout,
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
async fn serve_outbound(
    outbound: Arc<outbound::Outbound>,
    server: Arc<Server>,
    listener: TcpListener,
    metrics: metrics::ListenerMetrics,
    watch: drain::Watch,
) {
    listen::accept(
        listener,
        "outbound",
        Some(metrics),
        server.max_connections,
        watch,
        move |tcp, _, watch| outbound.clone().serve(tcp, server.clone(), watch),
    )
    .await;
}

/// A listener's accept loop as a proxy task: the loop ends for a drain,
/// which is not the failure a finished task means to [`Proxy::wait`].
async fn listening(accept: impl std::future::Future<Output = ()>) {
    accept.await;
    std::future::pending::<()>().await;
}
