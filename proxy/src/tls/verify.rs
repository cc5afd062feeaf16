//! Certificate verification between proxies: chain, usage and validity from webpki, plus the SPIFFE ID.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use trellis_proto::SpiffeId;
use x509_parser::extensions::GeneralName;

use super::TlsError;

/// The SPIFFE ID of a peer: the single URI SAN of its end-entity
/// certificate (the first of `certs`, as rustls hands them out).
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, TlsError> {
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::NotSpiffe("the peer sent no certificate".into()))?;
    spiffe_id(leaf)
}

/// The SPIFFE ID of one DER certificate. X.509-SVID §2: exactly one URI SAN.
pub(super) fn spiffe_id(der: &[u8]) -> Result<SpiffeId, TlsError> {
    let not_spiffe = |reason: String| TlsError::NotSpiffe(reason);
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| not_spiffe(format!("it cannot be parsed: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| not_spiffe(format!("its subjectAltName is invalid: {e}")))?
        .ok_or_else(|| not_spiffe("it has no subjectAltName".into()))?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri.parse().map_err(|e| not_spiffe(format!("{e}"))),
        (None, _) => Err(not_spiffe("it has no URI SAN".into())),
        (Some(_), Some(_)) => Err(not_spiffe("it has more than one URI SAN".into())),
    }
}

/// Turns a SPIFFE check failure into the error rustls expects from a verifier,
/// keeping our message for the handshake error.
fn require_spiffe(end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    spiffe_id(end_entity).map(|_| ()).map_err(|e| {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    })
}

/// Server side: requires a client certificate that chains to a trust anchor,
/// allows clientAuth, is within its validity, and names one SPIFFE ID.
#[derive(Debug)]
pub(super) struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl SpiffeClientVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        Ok(Self { webpki })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        require_spiffe(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Client side: requires a server certificate that chains to a trust anchor,
/// allows serverAuth, is within its validity, and names one SPIFFE ID.
///
/// Unlike rustls' WebPkiServerVerifier it ignores the server name: an
/// X.509-SVID has no DNS SAN. Which SPIFFE ID is acceptable depends on the
/// endpoint, so [`super::connect`] checks it after the handshake.
#[derive(Debug)]
pub(super) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub(super) fn new(roots: Arc<RootCertStore>, provider: &CryptoProvider) -> Self {
        Self {
            roots,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        require_spiffe(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
