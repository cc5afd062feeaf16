//! The retry budget: retries may add at most a fixed share of extra load
//! (plus a small floor per second, so a quiet service can still retry), so
//! when everything fails, retries cannot multiply the outage.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

/// Tokens in thousandths: each request deposits `ratio`, each retry costs one.
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    per_second: i64,
    cap: i64,
    epoch: Instant,
    /// Milliseconds since `epoch` up to which the per-second floor was paid.
    refilled_ms: AtomicU64,
}

const UNIT: i64 = 1000;

impl RetryBudget {
    /// `ratio` extra load (0.2 = 20%), and at least `per_second` retries each second.
    pub fn new(ratio: f64, per_second: u32) -> Self {
        let per_second = i64::from(per_second) * UNIT;
        Self {
            balance: AtomicI64::new(per_second),
            deposit: (ratio * UNIT as f64) as i64,
            per_second,
            // Unused budget does not pile up beyond a few seconds' worth.
            cap: per_second.max(UNIT) * 10,
            epoch: Instant::now(),
            refilled_ms: AtomicU64::new(0),
        }
    }

    fn add(&self, tokens: i64) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + tokens).min(self.cap))
            });
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        self.add(self.deposit);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let before = self.refilled_ms.swap(now, Ordering::Relaxed);
        let elapsed = i64::try_from(now.saturating_sub(before)).unwrap_or(i64::MAX / UNIT);
        self.add(self.per_second.saturating_mul(elapsed) / 1000);
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= UNIT).then_some(b - UNIT)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_by_the_ratio() {
        let budget = RetryBudget::new(0.2, 0);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 200, "20% of 1000 requests");
    }

    #[test]
    fn a_floor_of_retries_per_second_refills_over_time() {
        let budget = RetryBudget::new(0.0, 10);
        assert!(
            (0..10).all(|_| budget.withdraw()),
            "the first second's floor is there at once"
        );
        assert!(!budget.withdraw());
        std::thread::sleep(std::time::Duration::from_millis(220));
        assert!(
            budget.withdraw() && budget.withdraw(),
            "about 2 retries after 0.2 s"
        );
    }
}
