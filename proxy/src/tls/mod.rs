//! Mutual TLS between proxies with SPIFFE X.509-SVIDs: key and CSR, rustls configurations, and peer verification.
//!
//! Certificates follow the X.509-SVID spec
//! (<https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>): the
//! identity is the leaf's single URI SAN, and DNS names play no part.

mod configs;
mod csr;
mod failure;
mod verify;

#[cfg(test)]
pub(crate) mod test_ca;
#[cfg(test)]
mod tests;

pub use configs::{chain_not_after, connect, handshake, server_auth_client, TlsConfigs};
pub use csr::generate_csr;
pub use failure::FailureReason;
pub use verify::peer_identity;

use trellis_proto::SpiffeId;

/// ALPN protocol for HTTP/2 between two proxies.
pub const ALPN_H2: &[u8] = b"trellis/h2";
/// ALPN protocol for an opaque TCP tunnel between two proxies.
pub const ALPN_OPAQUE: &[u8] = b"trellis/opaque";

/// Why a key, certificate or TLS connection could not be made or accepted.
///
/// Identities are boxed to keep the error (and every `Result` carrying it) small.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The key pair or the CSR could not be generated.
    #[error("cannot generate a key pair and CSR: {0}")]
    Csr(#[from] rcgen::Error),
    /// The controller answered with no certificate at all.
    #[error("the controller returned an empty certificate chain; check the controller's CA logs")]
    EmptyChain,
    /// The controller answered with no trust anchors.
    #[error("the controller returned no trust anchors; check the controller's CA configuration")]
    NoTrustAnchors,
    /// A PEM trust bundle cannot be parsed.
    #[error("the trust bundle is not valid PEM: {0}")]
    Bundle(String),
    /// A trust anchor is not a usable CA certificate.
    #[error("trust anchor #{index} is not a usable CA certificate: {source}")]
    TrustAnchor { index: usize, source: rustls::Error },
    /// A certificate does not carry exactly one SPIFFE ID as URI SAN.
    #[error("the certificate is not an X.509-SVID: {0}")]
    NotSpiffe(String),
    /// The issued certificate names another workload than the one requested.
    #[error("the controller issued a certificate for {issued}, but this proxy is {requested}; check the proxy's identity settings")]
    WrongIdentity {
        requested: Box<SpiffeId>,
        issued: Box<SpiffeId>,
    },
    /// rustls refused the certificate, the key or the trust anchors.
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
    /// The TLS handshake with a peer failed (the peer's certificate was refused, or ours).
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    /// The TLS handshake with a peer did not finish in time.
    #[error("TLS handshake did not finish within {0:?}; is the peer a Trellis proxy?")]
    HandshakeTimeout(std::time::Duration),
    /// The peer proved an identity, but not the one discovery said to expect.
    #[error("peer is {actual} but {expected} was expected; discovery may be stale or the endpoint belongs to another workload")]
    UnexpectedPeer {
        expected: Box<SpiffeId>,
        actual: Box<SpiffeId>,
    },
}
