//! The Trellis control plane: the object store and its sources, endpoint
//! discovery, the workload CA, the injection webhook and rollouts.

pub mod admin;
pub mod cli;
pub mod controller;
pub mod discovery;
pub mod identity;
pub mod inject;
pub mod lease;
pub mod metrics;
pub mod model;
pub mod permissions;
pub mod rollout;
pub mod route_status;
pub mod source;
pub mod store;
pub mod transport;
pub mod webhook;
