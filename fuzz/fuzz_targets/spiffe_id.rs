//! SPIFFE IDs come from peer certificates and the controller's requests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proto::SpiffeId;

fuzz_target!(|text: &str| {
    if let Ok(id) = text.parse::<SpiffeId>() {
        // What parses prints back to the same ID.
        let printed = id.to_string();
        assert_eq!(printed.parse::<SpiffeId>().ok(), Some(id), "{text:?}");
    }
});
