//! The certificate manager: obtains this proxy's X.509-SVID from the controller, renews it before it expires, and publishes it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::watch;
use tonic::transport::Channel;
use trellis_proto::identity::identity_client::IdentityClient;
use trellis_proto::identity::CertifyRequest;
use trellis_proto::SpiffeId;

pub use crate::config::TokenSource;
use crate::tls::{generate_csr, TlsConfigs, TlsError};

/// Renew when this share of the remaining lifetime has passed (linkerd and
/// ztunnel do the same), so a failing controller leaves 30 % to retry in.
const RENEW_AT: f64 = 0.7;
/// Spreads the renewals of proxies started together.
const RENEW_JITTER: f64 = 0.05;
/// Bounds of the delay until renewal. The upper bound also refreshes the
/// trust anchors of long-lived certificates.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(24 * 60 * 60);
/// Retries after a failed renewal.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long the controller may take to answer one Certify call.
const CERTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Holds this proxy's current certificate and keeps it fresh.
///
/// Readers on the connection path call [`current`](Self::current) (no lock);
/// whoever must react to a change (readiness, closing connections)
/// [`subscribe`](Self::subscribe)s.
pub struct IdentityManager {
    identity: SpiffeId,
    current: ArcSwapOption<TlsConfigs>,
    changes: watch::Sender<Option<Arc<TlsConfigs>>>,
    /// Why the last attempt failed, until one succeeds (for `/ready`).
    last_error: ArcSwapOption<String>,
}

impl IdentityManager {
    /// A manager for `identity`, without a certificate until [`run`](Self::run)
    /// obtains one (or a test [`install`](Self::install)s one).
    pub fn new(identity: SpiffeId) -> Arc<Self> {
        let (changes, _) = watch::channel(None);
        Arc::new(Self {
            identity,
            current: ArcSwapOption::empty(),
            changes,
            last_error: ArcSwapOption::empty(),
        })
    }

    /// The identity this proxy asks certificates for.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The configurations of the current certificate, or `None` if there is
    /// none or it has expired: an expired certificate is never handed out.
    pub fn current(&self) -> Option<Arc<TlsConfigs>> {
        self.current
            .load_full()
            .filter(|configs| configs.is_valid_at(SystemTime::now()))
    }

    /// Why the last attempt to get a certificate failed, if it did.
    pub fn last_error(&self) -> Option<Arc<String>> {
        self.last_error.load_full()
    }

    /// Waits until a valid certificate is installed.
    pub async fn ready(&self) {
        let mut changes = self.changes.subscribe();
        while self.current().is_none() {
            if changes.changed().await.is_err() {
                // Unreachable: `self` owns the sender. Never claim readiness.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Follows the certificate: the value changes when a new one is
    /// installed, and to `None` when [`run`](Self::run) finds it expired.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<TlsConfigs>>> {
        self.changes.subscribe()
    }

    /// Makes `configs` current. Connections already open keep the
    /// configuration they started with (they hold their own `Arc`).
    pub fn install(&self, configs: TlsConfigs) {
        let configs = Arc::new(configs);
        self.current.store(Some(configs.clone()));
        self.changes.send_replace(Some(configs));
    }

    /// Obtains a certificate and renews it forever: a fresh key and CSR each
    /// time, renewal at ~70 % of the lifetime, retries with backoff that
    /// never sleep past the current certificate's expiry.
    pub async fn run(self: Arc<Self>, mut client: IdentityClient<Channel>, token: TokenSource) {
        let mut backoff = Backoff::default();
        loop {
            let delay = match self.renew(&mut client, &token).await {
                Ok(configs) => {
                    backoff.reset();
                    self.last_error.store(None);
                    let remaining = remaining(&configs);
                    let delay = refresh_delay(remaining);
                    tracing::info!(
                        identity = %self.identity,
                        valid_for = ?remaining,
                        renew_in = ?delay,
                        "certificate issued"
                    );
                    self.install(configs);
                    delay
                }
                Err(error) => {
                    let retry = backoff.next_delay();
                    // Keep using the current certificate while it lasts, but
                    // try again no later than its expiry.
                    let delay = self.current().map_or(retry, |c| retry.min(remaining(&c)));
                    self.publish_expiry();
                    self.last_error.store(Some(Arc::new(error.to_string())));
                    tracing::warn!(identity = %self.identity, %error, retry_in = ?delay, "cannot renew certificate");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// One Certify round trip. Neither the token nor the key is logged.
    async fn renew(
        &self,
        client: &mut IdentityClient<Channel>,
        token: &TokenSource,
    ) -> Result<TlsConfigs, RenewError> {
        let token = read_token(token).await?;
        let (key, csr_der) = generate_csr(&self.identity)?;
        let request = CertifyRequest {
            identity: self.identity.to_string(),
            token,
            csr_der,
        };
        let response = tokio::time::timeout(CERTIFY_TIMEOUT, client.certify(request))
            .await
            .map_err(|_| RenewError::Timeout(CERTIFY_TIMEOUT))?
            .map_err(|status| RenewError::Certify {
                code: status.code(),
                message: with_causes(&status),
            })?
            .into_inner();
        let configs = TlsConfigs::new(
            self.identity.clone(),
            response.chain_der,
            &key,
            response.trust_anchors_der,
        )?;
        if !configs.is_valid_at(SystemTime::now()) {
            return Err(RenewError::Expired);
        }
        Ok(configs)
    }

    /// Tells subscribers that the certificate expired without renewal (once).
    fn publish_expiry(&self) {
        let now = SystemTime::now();
        let expired = self.changes.send_if_modified(|value| {
            if value.as_ref().is_some_and(|c| !c.is_valid_at(now)) {
                *value = None;
                true
            } else {
                false
            }
        });
        if expired {
            tracing::error!(identity = %self.identity, "certificate expired; meshed traffic stops until renewal succeeds");
        }
    }
}

/// Why one renewal failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenewError {
    /// The token file could not be read.
    #[error("cannot read the identity token from {path}: {source}; check the token volume mount")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The token file is empty (e.g. not yet projected).
    #[error("the identity token file {0} is empty")]
    EmptyToken(PathBuf),
    /// The controller refused or failed the request.
    #[error("the controller did not certify ({code:?}): {message}")]
    Certify { code: tonic::Code, message: String },
    /// The controller did not answer in time.
    #[error("the controller did not answer within {0:?}; is it reachable?")]
    Timeout(Duration),
    /// The key, CSR or issued certificate is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The issued certificate was already expired on arrival.
    #[error("the controller issued an already expired certificate; check the clocks of controller and proxy")]
    Expired,
}

/// A status's message and the errors under it: a transport failure says
/// only "transport error" itself, its cause (an untrusted controller
/// certificate, a refused connection) is further down.
fn with_causes(status: &tonic::Status) -> String {
    let mut message = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        let text = error.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = error.source();
    }
    message
}

/// The token as sent (with Certify, and to watch the inbound policy): a
/// file is re-read every time because projected service-account tokens rotate.
pub(crate) async fn read_token(source: &TokenSource) -> Result<String, RenewError> {
    match source {
        TokenSource::Static(token) => Ok(token.clone()),
        TokenSource::File(path) => {
            let token =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| RenewError::Token {
                        path: path.clone(),
                        source,
                    })?;
            let token = token.trim();
            if token.is_empty() {
                return Err(RenewError::EmptyToken(path.clone()));
            }
            Ok(token.to_string())
        }
    }
}

/// Time left until `configs` expires (zero if it has).
fn remaining(configs: &TlsConfigs) -> Duration {
    configs
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

/// When to renew a certificate with `remaining` lifetime: ~70 % of it,
/// ±5 %, within [`MIN_REFRESH`, `MAX_REFRESH`], and never later than 90 % of
/// it, so even a one-second certificate is renewed before it expires. The
/// [`BACKOFF_MIN`] floor keeps a CA issuing absurdly short certificates from
/// being hammered.
fn refresh_delay(remaining: Duration) -> Duration {
    let jitter = 1.0 + RENEW_JITTER * (2.0 * fastrand::f64() - 1.0);
    remaining
        .mul_f64(RENEW_AT * jitter)
        .clamp(MIN_REFRESH, MAX_REFRESH)
        .min(remaining.mul_f64(0.9))
        .max(BACKOFF_MIN)
}

/// Exponential backoff with jitter between failed renewals.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next delay, ±20 % so proxies retrying together spread out.
    fn next_delay(&mut self) -> Duration {
        let delay = self
            .next
            .mul_f64(0.8 + 0.4 * fastrand::f64())
            .min(BACKOFF_MAX);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests;
