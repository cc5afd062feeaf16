//! A map for the request path, keyed by authority: each value is made once
//! and shared; entries nobody used for a while are evicted, so names an
//! application (or a scanner) sends once cannot grow the proxy for ever.
//!
//! Reads take a read lock (uncontended on the proxy's one thread) and mark
//! the entry used; inserts and evictions take the write lock and touch only
//! their own entries. A holder that skips the lookup (a connection that
//! keeps what it resolved) marks its entry used with [`Cache::touch`].

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Authorities are short and chosen by the application, not by an
/// attacker who could aim at the hash: a fast hash, not SipHash.
type Entries<V> = HashMap<String, Shared<V>, foldhash::fast::FixedState>;

pub struct Cache<V> {
    entries: RwLock<Entries<V>>,
    epoch: Instant,
}

/// What a lookup gives: shared with the cache and with other holders.
pub type Shared<V> = Arc<Cached<V>>;

/// A cached value and when it was last used.
pub struct Cached<V> {
    value: V,
    /// Milliseconds since the cache's epoch of the last use.
    used_ms: AtomicU64,
}

impl<V> Deref for Cached<V> {
    type Target = V;

    fn deref(&self) -> &V {
        &self.value
    }
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            entries: RwLock::default(),
            epoch: Instant::now(),
        }
    }
}

impl<V> Cache<V> {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The value for `key`, made by `make` the first time.
    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce() -> V) -> Shared<V> {
        self.get_fresh_or_insert_with(key, |_| true, make)
    }

    /// The value for `key` while `fresh` says it still is, else a new one
    /// made by `make`.
    pub fn get_fresh_or_insert_with(
        &self,
        key: &str,
        fresh: impl Fn(&V) -> bool,
        make: impl FnOnce() -> V,
    ) -> Shared<V> {
        let now = self.now_ms();
        let found = |entries: &Entries<V>| {
            let entry = entries.get(key).filter(|e| fresh(&e.value))?;
            entry.used_ms.store(now, Ordering::Relaxed);
            Some(entry.clone())
        };
        if let Some(entry) = found(&self.entries.read().unwrap_or_else(|p| p.into_inner())) {
            return entry;
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        // Another request may have made it while we waited for the lock.
        if let Some(entry) = found(&entries) {
            return entry;
        }
        let entry = Arc::new(Cached {
            value: make(),
            used_ms: AtomicU64::new(now),
        });
        entries.insert(key.to_string(), entry.clone());
        entry
    }

    /// Marks an entry used, as a lookup would.
    pub fn touch(&self, entry: &Cached<V>) {
        entry.used_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Removes the entries unused for `idle` or longer, and those `stale`
    /// says are no longer worth keeping; how many it removed.
    pub fn evict(&self, idle: Duration, stale: impl Fn(&V) -> bool) -> usize {
        let cutoff = self
            .now_ms()
            .saturating_sub(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let before = entries.len();
        entries.retain(|_, e| e.used_ms.load(Ordering::Relaxed) > cutoff && !stale(&e.value));
        before - entries.len()
    }

    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_each_value_once() {
        let cache = Cache::default();
        let mut made = 0;
        let a = cache.get_or_insert_with("a", || {
            made += 1;
            1
        });
        let again = cache.get_or_insert_with("a", || {
            made += 1;
            2
        });
        assert_eq!((**a, **again, made), (1, 1, 1));
        assert_eq!(**cache.get_or_insert_with("b", || 3), 3);
    }

    #[test]
    fn stale_values_are_made_again() {
        let cache = Cache::default();
        cache.get_or_insert_with("a", || 1);
        let fresh = cache.get_fresh_or_insert_with("a", |v| *v != 1, || 2);
        assert_eq!(**fresh, 2);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn idle_entries_are_evicted_and_used_ones_kept() {
        let cache = Cache::default();
        cache.get_or_insert_with("idle", || 1);
        cache.get_or_insert_with("busy", || 2);
        let held = cache.get_or_insert_with("held", || 3);
        std::thread::sleep(Duration::from_millis(30));
        cache.get_or_insert_with("busy", || 0);
        cache.touch(&held);
        assert_eq!(cache.evict(Duration::from_millis(20), |_| false), 1);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.evict(Duration::from_secs(60), |v| *v == 3), 1);
        assert_eq!(**cache.get_or_insert_with("busy", || 0), 2);
        assert_eq!(cache.evict(Duration::from_secs(60), |v| *v == 2), 1);
        assert!(cache.is_empty());
    }
}
