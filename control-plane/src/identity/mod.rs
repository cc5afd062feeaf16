//! Workload identity: the CA that signs X.509-SVIDs, the authenticator
//! that checks who asks (bootstrap tokens in local mode), the gRPC service
//! that ties them, and the controller's own serving certificate.

mod authenticator;
mod ca;
mod service;
mod serving;
mod tokens;

pub use authenticator::{Authenticator, Refusal};

pub use ca::{
    activate_next_root, add_root, retire_old_roots, rotate_issuer, Ca, CaError, SignedLeaf, BUNDLE,
};
pub use service::IdentityService;
pub use serving::ServingCertificate;
pub use tokens::BootstrapTokens;

#[cfg(test)]
mod tests;
