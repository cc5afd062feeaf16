//! Load balancing: power of two choices over peak-EWMA latency, honouring
//! endpoint weights.
//!
//! Each pick samples two endpoints (weighted at random) and keeps the one with
//! the lower cost, where cost is the latency estimate times the requests in
//! flight, divided by the weight. Slow or busy endpoints get less traffic
//! without a global view, and one random bad pick cannot pile up load.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How fast old latency observations fade (the EWMA's time constant).
/// Short, so one slow answer (a GC pause, a noisy neighbour) starves an
/// endpoint for well under a second rather than for many seconds.
const DECAY: Duration = Duration::from_millis(250);
/// Costs within this fraction of each other count as equal.
const TIE: f64 = 0.25;
/// The estimate for an endpoint that has not answered yet, so new endpoints
/// are tried but not flooded.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// What a failure counts as in the latency estimate: far above any healthy
/// answer, so an endpoint that fails fast never looks cheaper than one that
/// works (a failure costs more than slowness).
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// The load-balancing state of one endpoint, kept across discovery updates.
#[derive(Debug)]
pub struct Load {
    /// EWMA of the latency in nanoseconds, as f64 bits.
    rtt_ns: AtomicU64,
    /// Nanoseconds since `epoch` of the last observation.
    updated_ns: AtomicU64,
    pending: AtomicUsize,
    epoch: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            updated_ns: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Load {
    /// Marks a request as started; the guard records its outcome (the
    /// latency of a success, a penalty for a failure, the time waited for
    /// one abandoned) and releases the pending slot.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: Instant::now(),
            recorded: false,
        }
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn rtt(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) as u64)
    }

    fn observe(&self, rtt: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let (old, weight) = self.decayed(now);
        self.updated_ns.store(now, Ordering::Relaxed);
        let sample = rtt.as_nanos() as f64;
        // Peak-EWMA: a slower sample takes over at once, faster ones blend in.
        let next = if sample > old {
            sample
        } else {
            old * weight + sample * (1.0 - weight)
        };
        // Races between concurrent observations lose a sample at worst.
        self.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The estimate faded by the time since the last observation, and that
    /// fading factor. An endpoint that stopped getting traffic after one slow
    /// answer becomes cheap again and is retried, instead of being starved
    /// forever on an old peak.
    fn decayed(&self, now: u64) -> (f64, f64) {
        let elapsed = now.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        let weight = (-elapsed / DECAY.as_nanos() as f64).exp();
        (
            f64::from_bits(self.rtt_ns.load(Ordering::Relaxed)) * weight,
            weight,
        )
    }

    fn cost(&self, weight: u32) -> f64 {
        let (rtt, _) = self.decayed(self.epoch.elapsed().as_nanos() as u64);
        rtt * (self.pending() as f64 + 1.0) / f64::from(weight.max(1))
    }
}

/// One request in flight on an endpoint.
pub struct InFlight {
    load: Arc<Load>,
    started: Instant,
    recorded: bool,
}

impl InFlight {
    /// Starts the latency clock again, e.g. once a connection is established,
    /// so connecting is not counted as the endpoint's response latency.
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Records the latency of a good response (headers received).
    pub fn succeeded(mut self) {
        self.record(self.started.elapsed());
    }

    /// Records a failure: at least the penalty, however fast it failed.
    pub fn failed(mut self) {
        self.record(self.started.elapsed().max(FAILURE_PENALTY));
    }

    fn record(&mut self, latency: Duration) {
        self.load.observe(latency);
        self.recorded = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Abandoned (a timeout, or the client went away): the endpoint took
        // at least this long, which is all that is known.
        if !self.recorded {
            self.load.observe(self.started.elapsed());
        }
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Something the balancer can choose.
pub trait Weighted {
    fn weight(&self) -> u32;
    fn load(&self) -> &Load;
}

/// Picks an endpoint by P2C among those `usable` says may take a request;
/// `None` when no usable endpoint has a non-zero weight.
pub fn pick<T: Weighted>(endpoints: &[T], usable: impl Fn(&T) -> bool) -> Option<&T> {
    let weight = |e: &T| if usable(e) { u64::from(e.weight()) } else { 0 };
    let total: u64 = endpoints.iter().map(weight).sum();
    if total == 0 {
        return None;
    }
    let a = weighted_sample(endpoints, total, weight)?;
    let candidates = endpoints.iter().filter(|e| weight(e) > 0).count();
    if candidates == 1 {
        return Some(a);
    }
    // Draw the second choice until it differs from the first.
    let b = loop {
        let b = weighted_sample(endpoints, total, weight)?;
        if !std::ptr::eq(a, b) {
            break b;
        }
    };
    // Near-ties keep the random first draw, so equal endpoints share evenly
    // even under sequential load where measured latencies differ by noise.
    if b.load().cost(b.weight()) < a.load().cost(a.weight()) * (1.0 - TIE) {
        Some(b)
    } else {
        Some(a)
    }
}

fn weighted_sample<T>(endpoints: &[T], total: u64, weight: impl Fn(&T) -> u64) -> Option<&T> {
    let mut point = fastrand::u64(0..total);
    for endpoint in endpoints {
        let w = weight(endpoint);
        if point < w {
            return Some(endpoint);
        }
        point -= w;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ep(u32, Arc<Load>);
    impl Weighted for Ep {
        fn weight(&self) -> u32 {
            self.0
        }
        fn load(&self) -> &Load {
            &self.1
        }
    }

    fn counts(endpoints: &[Ep], n: usize) -> Vec<usize> {
        let mut counts = vec![0; endpoints.len()];
        for _ in 0..n {
            let picked = pick(endpoints, |_| true).unwrap();
            let i = endpoints
                .iter()
                .position(|e| std::ptr::eq(e, picked))
                .unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn equal_endpoints_share_evenly_and_zero_weight_gets_nothing() {
        let eps = vec![
            Ep(1, Arc::default()),
            Ep(1, Arc::default()),
            Ep(0, Arc::default()),
        ];
        let c = counts(&eps, 10_000);
        assert_eq!(c[2], 0, "weight 0 must never be picked: {c:?}");
        assert!((4_500..=5_500).contains(&c[0]), "{c:?}");
        assert!(pick(&[Ep(0, Arc::default())], |_| true).is_none());
        assert!(pick::<Ep>(&[], |_| true).is_none());
        let only_second = pick(&eps, |e| std::ptr::eq(e, &eps[1])).unwrap();
        assert!(
            std::ptr::eq(only_second, &eps[1]),
            "unusable endpoints are never picked"
        );
        assert!(pick(&eps, |_| false).is_none());
    }

    #[test]
    fn slow_and_busy_endpoints_get_less_traffic() {
        let eps = vec![Ep(1, Arc::default()), Ep(1, Arc::default())];
        eps[1].1.observe(Duration::from_millis(50));
        let c = counts(&eps, 1_000);
        assert!(c[0] > 700, "the fast endpoint should win most picks: {c:?}");

        let eps = vec![Ep(1, Arc::default()), Ep(1, Arc::default())];
        let _busy: Vec<InFlight> = (0..10).map(|_| eps[0].1.start()).collect();
        let c = counts(&eps, 1_000);
        assert!(c[1] > 700, "the idle endpoint should win most picks: {c:?}");
    }

    #[test]
    fn in_flight_guard_tracks_pending_and_latency() {
        let load = Arc::new(Load::default());
        let guard = load.start();
        assert_eq!(load.pending(), 1);
        std::thread::sleep(Duration::from_millis(20));
        guard.succeeded();
        assert_eq!(load.pending(), 0);
        assert!(load.rtt() >= Duration::from_millis(20), "{:?}", load.rtt());
        drop(load.start());
        assert_eq!(load.pending(), 0, "a dropped request releases its slot");
    }

    #[test]
    fn an_endpoint_that_fails_fast_costs_more_than_a_slow_one() {
        let eps = vec![Ep(1, Arc::default()), Ep(1, Arc::default())];
        eps[0].1.observe(Duration::from_millis(50));
        eps[1].1.start().failed();
        let c = counts(&eps, 1_000);
        assert!(
            c[0] > 700,
            "the slow endpoint should win over the failing one: {c:?}"
        );
    }
}
