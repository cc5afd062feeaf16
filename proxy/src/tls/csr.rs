//! A fresh key pair and the certificate signing request that asks the controller to certify it.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use trellis_proto::SpiffeId;

use super::TlsError;

/// Generates an ECDSA P-256 key in memory and a PKCS#10 CSR (DER) for it
/// whose only subject alternative name is the URI of `identity`.
///
/// The key never leaves the process: only the CSR is sent to the controller.
pub fn generate_csr(identity: &SpiffeId) -> Result<(KeyPair, Vec<u8>), TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    // X.509-SVIDs identify by URI SAN alone; the subject carries nothing.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}
