//! Who may ask for which identity: the proof a Certify request carries is
//! checked here, and every refusal has a typed reason that the gRPC status
//! and the refusal metric name.

use std::sync::Arc;

use trellis_proto::{InvalidSpiffeId, SpiffeId};

use super::ca::CaError;
use super::token_review::TokenReviewer;
use super::tokens::BootstrapTokens;

/// How the controller authenticates the proxy asking for a certificate.
pub enum Authenticator {
    /// Local mode: an HMAC of the SPIFFE ID under the controller's key.
    BootstrapTokens(Arc<BootstrapTokens>),
    /// Cluster mode: a projected service-account token, checked by the
    /// API server in a TokenReview.
    TokenReview(TokenReviewer),
}

impl Authenticator {
    /// Succeeds when `token` proves `identity`.
    pub async fn authenticate(&self, identity: &SpiffeId, token: &str) -> Result<(), Refusal> {
        match self {
            Self::BootstrapTokens(tokens) => {
                if !BootstrapTokens::well_formed(token) {
                    return Err(Refusal::InvalidToken(
                        "it is not a bootstrap token (64 hex digits)".into(),
                    ));
                }
                if !tokens.verify(identity, token) {
                    return Err(Refusal::IdentityMismatch {
                        requested: Box::new(identity.clone()),
                        detail: "the bootstrap token was issued for another identity or by another controller".into(),
                    });
                }
                Ok(())
            }
            Self::TokenReview(reviewer) => reviewer.authenticate(identity, token).await,
        }
    }
}

/// Why a certificate request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The requested identity is not a workload SPIFFE ID.
    #[error(transparent)]
    InvalidIdentity(#[from] InvalidSpiffeId),
    /// The token proves nobody: malformed, unknown, expired or revoked.
    #[error("the token is not valid: {0}")]
    InvalidToken(String),
    /// The token was issued for another audience than the mesh's: it was
    /// meant for some other service.
    #[error("the token is not meant for the mesh (audience {aud}): {0}", aud = super::token_review::AUDIENCE)]
    WrongAudience(String),
    /// The token is valid but does not prove the identity asked for.
    #[error("the token does not prove identity {requested}: {detail}")]
    IdentityMismatch {
        requested: Box<SpiffeId>,
        detail: String,
    },
    /// The API server could not be asked to review the token: not the
    /// proxy's fault, and worth retrying.
    #[error("cannot review the token with the Kubernetes API: {0}")]
    ReviewFailed(kube::Error),
    /// The CA would not sign: another trust domain, a bad CSR, an expired issuer.
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl Refusal {
    /// Every [`reason`](Self::reason), so each series exists from the start
    /// (at 0) and dashboards show "none" rather than "no data".
    pub const REASONS: &[&str] = &[
        "invalid-identity",
        "invalid-token",
        "identity-mismatch",
        "foreign-trust-domain",
        "bad-csr",
        "issuer-expired",
        "ca-error",
        "wrong-audience",
        "review-failed",
    ];

    /// The metric label and the word the gRPC status starts with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidIdentity(_) => "invalid-identity",
            Self::InvalidToken(_) => "invalid-token",
            Self::WrongAudience(_) => "wrong-audience",
            Self::ReviewFailed(_) => "review-failed",
            Self::IdentityMismatch { .. } => "identity-mismatch",
            Self::Ca(CaError::ForeignTrustDomain { .. }) => "foreign-trust-domain",
            Self::Ca(CaError::BadCsr(_) | CaError::WrongSan { .. }) => "bad-csr",
            Self::Ca(CaError::IssuerExpired { .. }) => "issuer-expired",
            Self::Ca(_) => "ca-error",
        }
    }

    /// The status a proxy sees: the code says whether retrying can help,
    /// the message starts with the reason.
    pub fn status(&self) -> tonic::Status {
        let message = format!("{}: {self}", self.reason());
        match self {
            Self::InvalidIdentity(_) | Self::Ca(CaError::BadCsr(_) | CaError::WrongSan { .. }) => {
                tonic::Status::invalid_argument(message)
            }
            Self::InvalidToken(_) | Self::WrongAudience(_) => {
                tonic::Status::unauthenticated(message)
            }
            Self::IdentityMismatch { .. } | Self::Ca(CaError::ForeignTrustDomain { .. }) => {
                tonic::Status::permission_denied(message)
            }
            Self::Ca(CaError::IssuerExpired { .. }) | Self::ReviewFailed(_) => {
                tonic::Status::unavailable(message)
            }
            Self::Ca(_) => tonic::Status::internal(message),
        }
    }
}
