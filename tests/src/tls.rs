//! TLS clients for poking at a proxy's inbound port the way an attacker or a
//! misconfigured peer would: without a certificate, with a foreign one.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// Accepts any server certificate: these clients test what the *server*
/// refuses, so they must not give up first.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client offering the mesh ALPN, presenting `identity` (a chain and
/// its PKCS#8 key) if given.
pub fn client(identity: Option<(Vec<Vec<u8>>, Vec<u8>)>) -> Arc<ClientConfig> {
    client_with_alpn(identity, trellis_proxy::tls::ALPN_H2)
}

/// Like [`client`], offering `alpn`.
pub fn client_with_alpn(
    identity: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    alpn: &[u8],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(
                chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// A certificate for `spiffe_id` from a CA that is not the mesh's.
pub fn foreign_identity(spiffe_id: &str) -> (Vec<Vec<u8>>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("uri"))];
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    (
        vec![cert.der().to_vec(), ca_cert.der().to_vec()],
        key.serialize_der(),
    )
}

/// Opens TLS to `addr` and tries one HTTP/2 request with the in-band target
/// port; `Ok(status)` if the proxy served it, `Err` when it refused.
pub async fn try_request(
    config: Arc<ClientConfig>,
    addr: std::net::SocketAddr,
    port: u16,
) -> Result<u16, String> {
    use http_body_util::Empty;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get("http://hello.default.svc.cluster.local/")
        .header("trellis-dst-port", port)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        sender.send_request(request),
    )
    .await
    .map_err(|_| "no answer".to_string())?
    .map_err(|e| format!("request: {e}"))?;
    Ok(response.status().as_u16())
}
