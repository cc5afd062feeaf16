//! The rustls server and client configurations built from one issued certificate, and connecting to a peer proxy.

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::KeyPair;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::NoServerSessionStorage;
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_proto::SpiffeId;

use super::verify::{spiffe_id, SpiffeClientVerifier, SpiffeServerVerifier};
use super::{peer_identity, TlsError, ALPN_H2, ALPN_OPAQUE};

/// How long a TLS handshake with a peer proxy may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything this proxy needs to speak mTLS with one certificate. Built once
/// per issued certificate and shared behind an `Arc`, so a connection keeps
/// the configuration it started with across a rotation.
pub struct TlsConfigs {
    /// Inbound: presents our chain, requires and verifies a client SVID.
    pub server: Arc<ServerConfig>,
    /// Outbound, offering [`ALPN_H2`]: presents our chain, verifies the server's.
    pub client: Arc<ClientConfig>,
    /// As `client`, offering [`ALPN_OPAQUE`].
    client_opaque: Arc<ClientConfig>,
    /// This proxy's SPIFFE ID, as the certificate names it.
    pub identity: SpiffeId,
    /// When the first certificate of the chain expires.
    pub not_after: SystemTime,
    /// Our leaf certificate, DER.
    pub leaf_der: Vec<u8>,
    /// The mesh's trust anchors this certificate came with, DER: peers are
    /// verified against them, and so is the controller on a reconnect
    /// (`control`), so a proxy follows a root rotation without a restart.
    pub trust_anchors_der: Vec<Vec<u8>>,
}

impl TlsConfigs {
    /// Builds the configurations from what the controller issued: the chain
    /// (leaf first), the key the CSR was made with, and the trust anchors.
    ///
    /// Fails if the leaf does not name `identity`, so a misconfigured CA is
    /// caught here rather than by every peer.
    pub fn new(
        identity: SpiffeId,
        chain_der: Vec<Vec<u8>>,
        key: &KeyPair,
        trust_anchors_der: Vec<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let leaf_der = chain_der.first().ok_or(TlsError::EmptyChain)?.clone();
        let issued = spiffe_id(&leaf_der)?;
        if issued != identity {
            return Err(TlsError::WrongIdentity {
                requested: Box::new(identity),
                issued: Box::new(issued),
            });
        }
        // An intermediate that expires before the leaf ends the chain's
        // usefulness just the same.
        let not_after = chain_der
            .iter()
            .map(|der| not_after(der))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .min()
            .ok_or(TlsError::EmptyChain)?;
        let roots = Arc::new(root_store(trust_anchors_der.clone())?);

        // Explicit provider: nothing here depends on a process-wide default.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let chain: Vec<CertificateDer<'static>> =
            chain_der.into_iter().map(CertificateDer::from).collect();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                roots.clone(),
                provider.clone(),
            )?))
            .with_single_cert(chain.clone(), key_der.clone_key())
            .map_err(TlsError::Config)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_OPAQUE.to_vec()];
        // No resumption, either side: every connection verifies a full chain,
        // so an expired certificate or a removed trust anchor cannot live on
        // in a resumed session.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});

        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(roots, &provider)))
            .with_client_auth_cert(chain, key_der)
            .map_err(TlsError::Config)?;
        client.resumption = Resumption::disabled();
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        let mut client_opaque = client.clone();
        client_opaque.alpn_protocols = vec![ALPN_OPAQUE.to_vec()];

        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            client_opaque: Arc::new(client_opaque),
            identity,
            not_after,
            leaf_der,
            trust_anchors_der,
        })
    }

    /// The client configuration offering `alpn`: pre-built for [`ALPN_H2`]
    /// and [`ALPN_OPAQUE`], derived on the spot for anything else.
    pub fn client_with_alpn(&self, alpn: &[u8]) -> Arc<ClientConfig> {
        if alpn == ALPN_H2 {
            self.client.clone()
        } else if alpn == ALPN_OPAQUE {
            self.client_opaque.clone()
        } else {
            let mut config = (*self.client).clone();
            config.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(config)
        }
    }

    /// Whether the certificate is still valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.not_after
    }
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Opens mTLS on `tcp` to a peer proxy offering `alpn`, and requires the
/// peer to prove `expected` (the identity discovery announced for it).
pub async fn connect(
    configs: &TlsConfigs,
    tcp: TcpStream,
    expected: &SpiffeId,
    alpn: &[u8],
) -> Result<TlsStream<TcpStream>, TlsError> {
    let (stream, actual) = handshake(configs.client_with_alpn(alpn), tcp).await?;
    if actual != *expected {
        return Err(TlsError::UnexpectedPeer {
            expected: Box::new(expected.clone()),
            actual: Box::new(actual),
        });
    }
    Ok(stream)
}

/// Opens TLS on `tcp` with `config` (whose verifier checks the chain and
/// that the leaf names one SPIFFE ID); returns the stream and that ID, for
/// the caller to compare with the one it expects.
pub async fn handshake(
    config: Arc<ClientConfig>,
    tcp: TcpStream,
) -> Result<(TlsStream<TcpStream>, SpiffeId), TlsError> {
    // The verifier ignores the server name (SVIDs have no DNS SAN). An IP
    // address keeps rustls from sending a meaningless SNI.
    let name = ServerName::IpAddress(Ipv4Addr::UNSPECIFIED.into());
    let stream = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| TlsError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
    .map_err(TlsError::Handshake)?;
    let (_, session) = stream.get_ref();
    let identity = peer_identity(session.peer_certificates().unwrap_or_default())?;
    Ok((stream, identity))
}

/// A client configuration that authenticates the server only (no client
/// certificate: the controller's identity call, which a proxy makes before
/// it has one), verifying X.509-SVIDs against the roots in `bundle_pem` and
/// `more_anchors_der`, offering `alpn`.
pub fn server_auth_client(
    bundle_pem: &[u8],
    more_anchors_der: &[Vec<u8>],
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let mut anchors = CertificateDer::pem_slice_iter(bundle_pem)
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Bundle(e.to_string()))?;
    if anchors.is_empty() {
        return Err(TlsError::Bundle("it holds no certificate".into()));
    }
    anchors.extend(
        more_anchors_der
            .iter()
            .filter(|der| !anchors.contains(der))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let roots = Arc::new(root_store(anchors)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(roots, &provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

fn root_store(trust_anchors_der: Vec<Vec<u8>>) -> Result<RootCertStore, TlsError> {
    if trust_anchors_der.is_empty() {
        return Err(TlsError::NoTrustAnchors);
    }
    let mut roots = RootCertStore::empty();
    for (index, der) in trust_anchors_der.into_iter().enumerate() {
        roots
            .add(CertificateDer::from(der))
            .map_err(|source| TlsError::TrustAnchor { index, source })?;
    }
    Ok(roots)
}

/// When the first certificate of a peer's chain expires: a connection
/// authenticated with it must not outlive it.
pub fn chain_not_after(certs: &[CertificateDer<'_>]) -> Option<SystemTime> {
    certs.iter().filter_map(|c| not_after(c).ok()).min()
}

fn not_after(der: &[u8]) -> Result<SystemTime, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| {
        TlsError::Config(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))
    })?;
    // A notAfter before 1970 is simply long expired.
    let secs = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}
