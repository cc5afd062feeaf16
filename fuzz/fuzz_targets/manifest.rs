//! Manifests of every kind the local source reads (Services, EndpointSlices,
//! Pods, Namespaces, HTTPRoutes, ResiliencePolicies, Rollouts…): parsed,
//! then validated as a reload would.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use trellis_control_plane::source::manifest;

fuzz_target!(|text: &str| {
    let file = Path::new("fuzz.yaml");
    let Ok(objects) = manifest::parse(file, text) else {
        return;
    };
    let all: Vec<_> = objects.iter().collect();
    let _ = manifest::validate(file, &objects, &all);
});
