//! AdmissionReviews, as the API server (or anyone who reaches the webhook)
//! sends them: every body gets an answer or a typed refusal.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use trellis_control_plane::identity::Ca;
use trellis_control_plane::inject::Injector;
use trellis_control_plane::metrics::ControllerMetrics;
use trellis_control_plane::store::Store;
use trellis_control_plane::webhook::Reviewer;

const TRUST_DOMAIN: &str = "cluster.local";

fn reviewer() -> &'static Reviewer {
    static REVIEWER: OnceLock<Reviewer> = OnceLock::new();
    REVIEWER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("trellis-fuzz-ca-{}", std::process::id()));
        let ca = Ca::load_or_create(&dir, TRUST_DOMAIN).expect("a CA");
        Reviewer {
            injector: Injector::new(Default::default(), "trellis-system", TRUST_DOMAIN),
            ca: Arc::new(ca),
            store: Store::new(TRUST_DOMAIN),
            metrics: Arc::new(ControllerMetrics::new()),
        }
    })
}

fuzz_target!(|body: &[u8]| {
    if let Ok(answer) = reviewer().review(body) {
        // An answer is always a v1-shaped AdmissionReview with a response.
        assert_eq!(answer["kind"], "AdmissionReview");
        assert!(answer["response"]["uid"].is_string());
        assert!(answer["response"]["allowed"].is_boolean());
    }
});
