//! Workload identity: the CA that signs X.509-SVIDs (its issuer from files
//! in local mode, from a Secret and a ConfigMap in cluster mode), the
//! authenticator that checks who asks (bootstrap tokens in local mode,
//! TokenReview in cluster mode), the gRPC service that ties them, and the
//! controller's own serving certificate.

mod authenticator;
mod ca;
mod issuer_source;
mod service;
mod serving;
mod token_review;
mod tokens;

pub use authenticator::{Authenticator, Refusal};

pub use ca::{
    activate_next_root, add_root, parse_issuer_lifetime, parse_leaf_lifetime, retire_old_roots,
    rotate_issuer, Ca, CaError, IssuerMaterial, LifetimeError, PemText, SignedLeaf, BUNDLE,
    MAX_LEAF_LIFETIME,
};
pub use issuer_source::{
    ClusterIssuer, IssuerChanges, IssuerError, IssuerSource, BUNDLE_KEY, ISSUER_SECRET,
    TRUST_ROOTS_CONFIG_MAP,
};
pub use service::IdentityService;
pub use serving::ServingCertificate;
pub use token_review::{TokenReviewer, AUDIENCE};
pub use tokens::BootstrapTokens;

#[cfg(test)]
mod tests;
