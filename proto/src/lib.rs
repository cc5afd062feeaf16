//! Trellis control-plane API: endpoint discovery and workload identity, and
//! the identity type and in-band headers both sides share.

pub mod headers;
pub mod spiffe;

pub use spiffe::{InvalidSpiffeId, SpiffeId, CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT};

/// Discovery: a proxy watches an authority and receives its endpoints.
pub mod discovery {
    tonic::include_proto!("trellis.discovery.v1");
}

/// Identity: a proxy exchanges a CSR and a proof of who it is for a certificate.
pub mod identity {
    tonic::include_proto!("trellis.identity.v1");
}
