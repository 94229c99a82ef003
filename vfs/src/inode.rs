//! The inode table: every inode the kernel currently knows, with its lookup
//! count, its `O_PATH` handle on the backing inode, and its journal state.
//!
//! Node ids are the backing filesystem's inode numbers (fuser sends
//! `attr.ino` as the node id), except the source root, which is always node 1.
//! Holding the `O_PATH` descriptor pins the backing inode, so its number
//! cannot be reused by the filesystem while the kernel still knows the node.
//!
//! Lookup-count contract: every reply that hands the kernel an entry
//! (lookup, create, mkdir, mknod, symlink, link, readdirplus) adds one; the
//! kernel's `forget(n)` removes n; at zero the inode leaves the table. This
//! module is the only place that mutates the table.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use journal::{FileKind, FileState, InodeKey};
use parking_lot::{Mutex, RwLock};

use crate::open::OpenState;

pub const ROOT_NODE: u64 = 1;

/// One backing inode the kernel holds a reference to.
pub struct Inode {
    pub node: u64,
    pub key: InodeKey,
    pub kind: FileKind,
    fd: OwnedFd,
    /// The file's journal identity and dirty state.
    pub file: Arc<FileState>,
    /// How the inode is currently open (see `open.rs`).
    pub open: Mutex<OpenState>,
    /// Guarded by the shard's write lock when it reaches zero.
    lookups: Mutex<u64>,
}

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const SHARDS: usize = 64;

/// Node id -> inode, sharded so that concurrent operations on different
/// inodes do not contend on one lock.
pub struct InodeTable {
    shards: Vec<RwLock<HashMap<u64, Arc<Inode>>>>,
    root_key: InodeKey,
}

impl InodeTable {
    pub fn new(root_fd: OwnedFd, root_key: InodeKey, root_file: Arc<FileState>) -> InodeTable {
        let table = InodeTable {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            root_key,
        };
        let root = Inode {
            node: ROOT_NODE,
            key: root_key,
            kind: FileKind::Dir,
            fd: root_fd,
            file: root_file,
            open: Mutex::new(OpenState::default()),
            // The kernel never forgets the root.
            lookups: Mutex::new(1),
        };
        table
            .shard(ROOT_NODE)
            .write()
            .insert(ROOT_NODE, Arc::new(root));
        table
    }

    fn shard(&self, node: u64) -> &RwLock<HashMap<u64, Arc<Inode>>> {
        &self.shards[(node as usize) % SHARDS]
    }

    /// The node id the kernel uses for a backing inode.
    pub fn node_of(&self, key: InodeKey) -> u64 {
        if key == self.root_key {
            ROOT_NODE
        } else {
            key.ino
        }
    }

    pub fn get(&self, node: u64) -> Option<Arc<Inode>> {
        self.shard(node).read().get(&node).cloned()
    }

    /// Adds one kernel reference to the inode for `key`, creating the entry
    /// with `make` (which receives the freshly opened descriptor) if the
    /// kernel did not know it. When the inode is already known, `fd` is dropped.
    pub fn reference(
        &self,
        key: InodeKey,
        kind: FileKind,
        fd: OwnedFd,
        make_file: impl FnOnce() -> Arc<FileState>,
    ) -> Arc<Inode> {
        let node = self.node_of(key);
        let mut shard = self.shard(node).write();
        if let Some(inode) = shard.get(&node) {
            if inode.key == key {
                *inode.lookups.lock() += 1;
                return inode.clone();
            }
            // Same number on another device: the source spans filesystems.
            // The newer inode wins; the old one stays reachable through its handles.
            tracing::warn!(node, ?key, old = ?inode.key, "inode number collision across devices");
        }
        let inode = Arc::new(Inode {
            node,
            key,
            kind,
            fd,
            file: make_file(),
            open: Mutex::new(OpenState::default()),
            lookups: Mutex::new(1),
        });
        shard.insert(node, inode.clone());
        inode
    }

    /// Adds one kernel reference to an inode already in the table.
    pub fn reference_known(&self, inode: &Inode) {
        *inode.lookups.lock() += 1;
    }

    /// Drops `n` kernel references; the inode leaves the table at zero.
    pub fn forget(&self, node: u64, n: u64) {
        if node == ROOT_NODE {
            return;
        }
        let mut shard = self.shard(node).write();
        let gone = match shard.get(&node) {
            Some(inode) => {
                let mut lookups = inode.lookups.lock();
                *lookups = lookups.saturating_sub(n);
                *lookups == 0
            }
            None => false,
        };
        if gone {
            shard.remove(&node);
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}
