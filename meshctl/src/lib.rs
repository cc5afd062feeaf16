//! `meshctl`, the Trellis command line, as a library: its commands, and the
//! local demo mesh (its manifests, applications and process supervision).
//! It is the one crate that depends on both the proxy and the control plane.

pub mod authz;
pub mod ca;
pub mod check;
pub mod context;
pub mod demo;
pub mod identity;
pub mod inject;
pub mod install;
pub mod internal;
pub mod proxy;
pub mod report;
pub mod rollout;
pub mod route;
pub mod stat;
pub mod stats;
pub mod token;
