//! A map for the request path: reads are lock-free (an `ArcSwap` snapshot);
//! inserts, which happen once per new key, copy the map under a mutex.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

pub struct Cache<V> {
    entries: ArcSwap<HashMap<String, Arc<V>>>,
    insert: Mutex<()>,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            entries: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
        }
    }
}

impl<V> Cache<V> {
    /// The value for `key`, made by `make` the first time.
    pub fn get_or_insert_with(&self, key: &str, make: impl FnOnce() -> V) -> Arc<V> {
        if let Some(value) = self.entries.load().get(key) {
            return value.clone();
        }
        let _insert = self.insert.lock().unwrap_or_else(|p| p.into_inner());
        // Another request may have inserted it while we waited.
        if let Some(value) = self.entries.load().get(key) {
            return value.clone();
        }
        let value = Arc::new(make());
        let mut next = HashMap::clone(&self.entries.load());
        next.insert(key.to_string(), value.clone());
        self.entries.store(Arc::new(next));
        value
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
        assert_eq!((*a, *again, made), (1, 1, 1));
        assert_eq!(*cache.get_or_insert_with("b", || 3), 3);
    }
}
