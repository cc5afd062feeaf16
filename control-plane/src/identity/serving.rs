//! The controller's own certificates for its gRPC port and its webhook: an
//! X.509-SVID for the controller's service account from the mesh's CA, so a
//! proxy verifies the controller against the same trust bundle it verifies
//! its peers with; the webhook's also names its Service (DNS SANs), which
//! the API server verifies against the caBundle (the same bundle).
//! The key lives in memory only; a new key and certificate are swapped in
//! atomically, and connections already open keep the one they started with.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use trellis_proto::SpiffeId;

use super::ca::{Ca, CaError};

/// ALPN of gRPC over TLS, and of HTTP/2.
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP1: &[u8] = b"http/1.1";
/// Renew when this share of the lifetime has passed, as proxies do.
const RENEW_AT: f64 = 0.7;

pub struct ServingCertificate {
    ca: Arc<Ca>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    lifetime: Duration,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCertificate")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ServingCertificate {
    /// Issues the first certificate for `identity` (and `dns_names`), valid
    /// for `lifetime` (never past the issuer); returns it with its renewal time.
    pub fn new(
        ca: Arc<Ca>,
        identity: SpiffeId,
        dns_names: Vec<String>,
        lifetime: Duration,
    ) -> Result<(Arc<Self>, SystemTime), CaError> {
        let (key, renew_at) = issue(&ca, &identity, &dns_names, lifetime)?;
        let serving = Arc::new(Self {
            ca,
            identity,
            dns_names,
            lifetime,
            current: ArcSwap::from_pointee(key),
        });
        Ok((serving, renew_at))
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// Swaps in a new key and certificate (after a CA rotation, or before
    /// expiry); returns when to renew next. On failure the current one stays.
    pub fn renew(&self) -> Result<SystemTime, CaError> {
        let (key, renew_at) = issue(&self.ca, &self.identity, &self.dns_names, self.lifetime)?;
        self.current.store(Arc::new(key));
        Ok(renew_at)
    }

    /// The chain currently served, DER, leaf first.
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        self.current
            .load()
            .cert
            .iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    }

    /// A TLS 1.3 server configuration offering h2 that always presents the
    /// current certificate. Clients are not asked for one: the identity
    /// call authenticates them by token, and discovery is not secret.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// A TLS 1.2 and 1.3 server configuration offering h2 and http/1.1, for
    /// the webhook: the API server speaks either.
    pub fn https_server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn issue(
    ca: &Ca,
    identity: &SpiffeId,
    dns_names: &[String],
    lifetime: Duration,
) -> Result<(CertifiedKey, SystemTime), CaError> {
    let (leaf, key) = ca.issue(identity, dns_names, lifetime)?;
    let chain: Vec<CertificateDer<'static>> = leaf
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(CaError::ServingKey)?;
    let now = SystemTime::now();
    let remaining = leaf.valid_until.duration_since(now).unwrap_or_default();
    Ok((
        CertifiedKey::new(chain, signing),
        now + remaining.mul_f64(RENEW_AT),
    ))
}
