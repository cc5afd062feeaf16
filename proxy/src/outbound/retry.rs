//! The retry budget: retries may add at most a fixed share of extra load,
//! so when everything fails, retries cannot multiply the outage.

use std::sync::atomic::{AtomicI64, Ordering};

/// Tokens in thousandths: each request deposits `ratio`, each retry costs one.
pub struct RetryBudget {
    balance: AtomicI64,
    deposit: i64,
    cap: i64,
}

const UNIT: i64 = 1000;

impl RetryBudget {
    /// `ratio` extra load (0.2 = 20%), with `reserve` retries available up
    /// front so a quiet service can still retry.
    pub fn new(ratio: f64, reserve: u32) -> Self {
        let reserve = i64::from(reserve) * UNIT;
        Self {
            balance: AtomicI64::new(reserve),
            deposit: (ratio * UNIT as f64) as i64,
            cap: reserve.max(UNIT) * 10,
        }
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + self.deposit).min(self.cap))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
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
    fn the_reserve_allows_a_few_retries_at_once() {
        let budget = RetryBudget::new(0.2, 3);
        assert!((0..3).all(|_| budget.withdraw()));
        assert!(!budget.withdraw());
    }
}
