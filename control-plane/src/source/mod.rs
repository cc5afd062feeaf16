//! Where the store's objects come from.
//!
//! `local` reads a directory of Kubernetes manifests (the embedded default,
//! used by `meshctl demo` and most tests). A cluster source built on kube-rs
//! watchers feeds the same `Store` API.

pub mod api_validation;
pub mod authz_validation;
pub mod cluster;
pub mod local;
pub mod manifest;
pub mod resilience_validation;
pub mod route_validation;
