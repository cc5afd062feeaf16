//! Protocol detection classifies whatever a client sends first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::detect::{classify, Protocol};

fuzz_target!(|first: &[u8]| {
    let protocol = classify(first);
    // A TLS ClientHello record starts with 0x16 and nothing else does.
    assert_eq!(protocol == Protocol::Tls, first.first() == Some(&0x16));
});
