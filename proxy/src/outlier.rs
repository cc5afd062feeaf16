//! Outlier detection: an endpoint that fails several times in a row (or
//! refuses connections) is ejected from balancing for a backoff that
//! doubles with each ejection; when the backoff ends, one request probes it,
//! and only a success brings it back.
//!
//! The balancer's latency estimate already steers traffic away from slow
//! and failing endpoints; ejection is the hard stop for endpoints that are
//! plainly broken (a dead pod, an app answering 502s in a microsecond),
//! which a cheap failure could otherwise make look attractive.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use trellis_proto::discovery::Resilience;

/// How one backend's endpoints are judged, from the Service's
/// `ResiliencePolicy` or the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Failures in a row that eject an endpoint; 0 disables ejection.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share (0–100) of the endpoints ejected at once, so a
    /// bad deploy or a broken check can never eject the whole backend.
    pub max_ejection_percent: u32,
    /// Requests in flight to one endpoint before it is skipped (circuit
    /// breaker); when every endpoint is at the cap, requests are shed.
    pub max_requests: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
            max_requests: 1000,
        }
    }
}

impl Policy {
    /// The defaults, with what the Service's policy sets.
    pub fn from_proto(resilience: Option<&Resilience>) -> Self {
        let mut policy = Self::default();
        let Some(resilience) = resilience else {
            return policy;
        };
        if let Some(o) = &resilience.outlier_detection {
            let ms = Duration::from_millis;
            policy.consecutive_failures = o
                .consecutive_failures
                .unwrap_or(policy.consecutive_failures);
            policy.base_ejection = o.base_ejection_ms.map_or(policy.base_ejection, ms);
            policy.max_ejection = o.max_ejection_ms.map_or(policy.max_ejection, ms);
            policy.max_ejection_percent = o
                .max_ejection_percent
                .unwrap_or(policy.max_ejection_percent)
                .min(100);
        }
        if let Some(max) = resilience
            .circuit_breaker
            .as_ref()
            .and_then(|c| c.max_requests)
        {
            policy.max_requests = max.max(1);
        }
        policy
    }

    /// The length of ejection number `n` (0-based): doubling from the base
    /// up to the maximum, plus up to 25% jitter so endpoints ejected together
    /// are not probed together.
    fn ejection(&self, n: u32) -> Duration {
        let doubled = self
            .base_ejection
            .checked_mul(1u32.checked_shl(n).unwrap_or(u32::MAX))
            .unwrap_or(self.max_ejection);
        doubled
            .min(self.max_ejection)
            .mul_f64(1.0 + fastrand::f64() * 0.25)
    }
}

/// What went wrong with a request, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The endpoint's proxy could not be reached (refused, timed out, TLS
    /// failed): nothing is listening there, so it is ejected at once.
    Connect,
    /// A reset, a 5xx or gRPC UNAVAILABLE: counted toward the threshold.
    Response,
}

#[derive(Debug)]
enum State {
    Healthy {
        failures: u32,
    },
    Ejected {
        until: Instant,
        ejections: u32,
    },
    /// The ejection ended and one request is testing the endpoint.
    Probing {
        ejections: u32,
    },
}

/// The health of one endpoint, kept across discovery updates.
#[derive(Debug)]
pub struct Health(Mutex<State>);

impl Default for Health {
    fn default() -> Self {
        Self(Mutex::new(State::Healthy { failures: 0 }))
    }
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the balancer may choose the endpoint now: healthy, or its
    /// ejection is over and no probe is in flight.
    pub fn available(&self, now: Instant) -> bool {
        match *self.state() {
            State::Healthy { .. } => true,
            State::Ejected { until, .. } => now >= until,
            State::Probing { .. } => false,
        }
    }

    /// Whether the endpoint is out of balancing until a probe succeeds
    /// (what the cap on ejected endpoints counts).
    pub fn ejected(&self) -> bool {
        !matches!(*self.state(), State::Healthy { .. })
    }

    /// Called when a request is sent to the endpoint: after an ejection it
    /// becomes the probe, and nobody else is sent there until it answers.
    pub fn start(&self, now: Instant) {
        let mut state = self.state();
        if let State::Ejected { until, ejections } = *state {
            if now >= until {
                *state = State::Probing { ejections };
            }
        }
    }

    pub fn succeeded(&self) {
        *self.state() = State::Healthy { failures: 0 };
    }

    /// A request that ended without an outcome (cancelled by its client):
    /// a probe gives its turn to the next request.
    pub fn abandoned(&self, now: Instant) {
        let mut state = self.state();
        if let State::Probing { ejections } = *state {
            *state = State::Ejected {
                until: now,
                ejections,
            };
        }
    }

    /// Records a failure; true when it ejected the endpoint. `may_eject`
    /// says whether the backend can spare one more ejected endpoint.
    pub fn failed(&self, failure: Failure, policy: &Policy, now: Instant, may_eject: bool) -> bool {
        let mut state = self.state();
        let ejections = match *state {
            // A failed probe: straight back out, for longer.
            State::Probing { ejections } => ejections,
            State::Healthy { failures } => {
                let failures = failures.saturating_add(1);
                let threshold_reached = policy.consecutive_failures > 0
                    && (failure == Failure::Connect || failures >= policy.consecutive_failures);
                if !threshold_reached || !may_eject {
                    *state = State::Healthy { failures };
                    return false;
                }
                0
            }
            // Failures of requests sent before the ejection add nothing.
            State::Ejected { .. } => return false,
        };
        *state = State::Ejected {
            until: now + policy.ejection(ejections),
            ejections: ejections.saturating_add(1),
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(4),
            ..Policy::default()
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_count() {
        let (health, policy, now) = (Health::default(), policy(), Instant::now());
        assert!(!health.failed(Failure::Response, &policy, now, true));
        assert!(!health.failed(Failure::Response, &policy, now, true));
        health.succeeded();
        assert!(!health.failed(Failure::Response, &policy, now, true));
        assert!(!health.failed(Failure::Response, &policy, now, true));
        assert!(health.failed(Failure::Response, &policy, now, true));
        assert!(!health.available(now));
        assert!(health.available(now + Duration::from_millis(1300)));
    }

    #[test]
    fn a_refused_connection_ejects_at_once_unless_too_many_are_out() {
        let (policy, now) = (policy(), Instant::now());
        let health = Health::default();
        assert!(!health.failed(Failure::Connect, &policy, now, false));
        assert!(health.available(now), "the cap keeps it in balancing");
        assert!(health.failed(Failure::Connect, &policy, now, true));
        assert!(health.ejected());
    }

    #[test]
    fn one_probe_after_the_backoff_and_a_failed_probe_doubles_it() {
        let (health, policy, now) = (Health::default(), policy(), Instant::now());
        health.failed(Failure::Connect, &policy, now, true);
        let later = now + Duration::from_millis(1300);
        health.start(later);
        assert!(!health.available(later), "only one probe at a time");
        assert!(health.failed(Failure::Response, &policy, later, false));
        let after_one = later + Duration::from_millis(1300);
        assert!(
            !health.available(after_one),
            "the second ejection is longer"
        );
        assert!(health.available(later + Duration::from_millis(2600)));
        health.start(later + Duration::from_millis(2600));
        health.succeeded();
        assert!(health.available(later + Duration::from_millis(2600)));
        assert!(!health.ejected());
    }

    #[test]
    fn ejections_never_exceed_the_maximum() {
        let policy = policy();
        for n in 0..40 {
            assert!(policy.ejection(n) <= Duration::from_secs(5), "{n}");
        }
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let (health, policy, now) = (Health::default(), policy(), Instant::now());
        health.failed(Failure::Connect, &policy, now, true);
        let later = now + Duration::from_secs(2);
        health.start(later);
        health.abandoned(later);
        assert!(health.available(later));
    }

    #[test]
    fn zero_consecutive_failures_disables_ejection() {
        let policy = Policy {
            consecutive_failures: 0,
            ..policy()
        };
        let (health, now) = (Health::default(), Instant::now());
        assert!(!health.failed(Failure::Connect, &policy, now, true));
        assert!(health.available(now));
    }
}
