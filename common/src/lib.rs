//! What the proxy and the controller share beyond the wire protocol (which is
//! `trellis-proto`): the small HTTP server their admin ports and the demo's
//! applications run, the conventions of their metrics, and the one grammar
//! of durations in flags and environment variables.

pub mod duration;
pub mod exposition;
pub mod metrics;
pub mod serve;
