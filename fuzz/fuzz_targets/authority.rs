//! Authorities come from clients (Host, absolute URIs, `:authority`) and from
//! proxies' discovery requests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_control_plane::store::parse_authority;
use trellis_proxy::outbound::authority_of;

fuzz_target!(|text: &str| {
    // The controller's parser: a port, when it accepts, is the one written.
    if let Ok((_, port)) = parse_authority(text) {
        if let Some((_, written)) = text.rsplit_once(':').filter(|(h, _)| !h.ends_with(':')) {
            if let Ok(written) = written.parse::<u16>() {
                assert_eq!(port, written, "{text:?}");
            }
        }
    }
    // The proxy's, from a Host header: what it returns always has a port
    // and is lowercase.
    let Ok(request) = http::Request::builder()
        .header(http::header::HOST, text)
        .body(())
    else {
        return;
    };
    if let Ok(authority) = authority_of(&request) {
        let (_, port) = authority.rsplit_once(':').expect("a port");
        assert!(port.parse::<u16>().is_ok(), "{authority:?}");
        assert_eq!(authority, authority.to_ascii_lowercase());
    }
});
