//! Workload identity: the CA that signs X.509-SVIDs, the bootstrap tokens
//! that prove who asks (local mode), and the gRPC service that ties them.

mod ca;
mod service;
mod tokens;

pub use ca::{
    activate_next_root, add_root, retire_old_roots, rotate_issuer, Ca, CaError, SignedLeaf,
};
pub use service::IdentityService;
pub use tokens::BootstrapTokens;

#[cfg(test)]
mod tests;
