//! Open file and directory handles, by the `fh` the kernel passes back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

const SHARDS: usize = 16;

/// `fh` -> handle. Handle numbers are never reused within a mount.
pub struct HandleTable<T> {
    shards: Vec<RwLock<HashMap<u64, Arc<T>>>>,
    next: AtomicU64,
}

impl<T> HandleTable<T> {
    pub fn new() -> Self {
        HandleTable {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            next: AtomicU64::new(1),
        }
    }

    fn shard(&self, fh: u64) -> &RwLock<HashMap<u64, Arc<T>>> {
        &self.shards[(fh as usize) % SHARDS]
    }

    pub fn insert(&self, handle: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(fh).write().insert(fh, Arc::new(handle));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.shard(fh).read().get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.shard(fh).write().remove(&fh)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

impl<T> Default for HandleTable<T> {
    fn default() -> Self {
        Self::new()
    }
}
