//! Building blocks of `meshctl demo`: the demo's manifests and applications.
//! (The process orchestration lives in the `meshctl` binary.)

pub mod apps;
pub mod manifests;
