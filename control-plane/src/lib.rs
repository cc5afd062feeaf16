//! The Trellis control plane: the object store and its sources, endpoint
//! discovery, the workload CA, and the `meshctl` CLI.

pub mod admin;
pub mod cli;
pub mod context;
pub mod controller;
pub mod demo;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod source;
pub mod stats;
pub mod store;
pub mod transport;
