//! The bounded cache of symbol lookups, kept across intervals.
//!
//! Least recently used entries are evicted when full. Each entry costs ~100-200 bytes
//! (key, chain of function names and files), so the default bound is ~5 MiB.

use std::num::NonZeroUsize;

use lru::LruCache;

use super::{Resolved, SymKey};

/// Default bound on cached lookups.
pub const MAX_SYMBOL_CACHE_ENTRIES: usize = 32_768;

/// LRU map from lookup key to what was found (including "nothing").
pub struct SymbolCache {
    entries: LruCache<SymKey, Resolved>,
    /// Entries evicted to stay within the bound.
    pub evictions: u64,
}

impl SymbolCache {
    pub fn new(capacity: usize) -> Self {
        SymbolCache {
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("non-zero")),
            evictions: 0,
        }
    }

    pub fn get(&mut self, key: &SymKey) -> Option<Resolved> {
        self.entries.get(key).cloned()
    }

    pub fn insert(&mut self, key: SymKey, value: Resolved) {
        if self
            .entries
            .push(key, value)
            .is_some_and(|(old, _)| old != key)
        {
            self.evictions += 1;
        }
    }

    /// Drops every entry whose key `forget` selects; returns how many.
    pub fn forget(&mut self, forget: impl Fn(&SymKey) -> bool) -> usize {
        let keys: Vec<SymKey> = self
            .entries
            .iter()
            .map(|(key, _)| *key)
            .filter(|key| forget(key))
            .collect();
        for key in &keys {
            self.entries.pop(key);
        }
        keys.len()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache never holds more than its capacity and counts what it evicts.
    #[test]
    fn evicts_least_recently_used() {
        let mut cache = SymbolCache::new(2);
        cache.insert(SymKey::Kernel(1), None);
        cache.insert(SymKey::Kernel(2), None);
        assert!(cache.get(&SymKey::Kernel(1)).is_some()); // 1 is now most recent
        cache.insert(SymKey::Kernel(3), None);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.evictions, 1);
        assert!(cache.get(&SymKey::Kernel(2)).is_none());
        assert!(cache.get(&SymKey::Kernel(1)).is_some());
    }
}
