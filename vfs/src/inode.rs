//! The inode table: every inode the kernel currently knows, with its lookup
//! count, the way back to its backing inode, and its journal state.
//!
//! Node ids are the backing filesystem's inode numbers (fuser sends
//! `attr.ino` as the node id), except the source root, which is always node 1.
//!
//! Lookup-count contract: every reply that hands the kernel an entry
//! (lookup, create, mkdir, mknod, symlink, link, readdirplus) adds one; the
//! kernel's `forget(n)` removes n; at zero the inode leaves the table. This
//! module is the only place that mutates the table.
//!
//! Descriptors: the kernel keeps every inode of a large tree cached while
//! memory allows, but a process may hold only so many descriptors (and an
//! unprivileged container cannot raise the hard limit). So each inode keeps
//! a kernel file handle, which costs no descriptor, and an `O_PATH`
//! descriptor only while it sits in a bounded cache (`FdCache`); an evicted
//! inode is reopened from its handle when next used. Inodes whose filesystem
//! makes no handles (and the root) keep their descriptor for life.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Weak};

use journal::{FileKind, FileState, InodeKey};
use nix::errno::Errno;
use parking_lot::{Mutex, RwLock};

use crate::open::OpenState;
use crate::sys::{self, FileHandle};

pub const ROOT_NODE: u64 = 1;

/// One backing inode the kernel holds a reference to.
pub struct Inode {
    pub node: u64,
    pub key: InodeKey,
    pub kind: FileKind,
    /// How to reopen the inode; `None`: its descriptor is never closed.
    handle: Option<FileHandle>,
    fd: Mutex<Option<Arc<OwnedFd>>>,
    cache: Arc<FdCache>,
    /// The file's journal identity and dirty state.
    pub file: Arc<FileState>,
    /// How the inode is currently open (see `open.rs`).
    pub open: Mutex<OpenState>,
    /// Guarded by the shard's write lock when it reaches zero.
    lookups: Mutex<u64>,
}

/// What a new reference is made from.
pub enum Backing {
    /// A fresh `O_PATH` descriptor of the inode.
    Fd(OwnedFd),
    /// The handle alone, for an inode that `reopens_by_handle`: a listing
    /// references many inodes that nothing will open, and a descriptor
    /// each would cost an open and, once the cache is full, a close.
    Handle(FileHandle),
}

/// An `O_PATH` descriptor of an inode, valid while this value lives even if
/// the cache evicts it meanwhile.
#[derive(Clone)]
pub struct PathFd(Arc<OwnedFd>);

#[cfg(test)]
impl PathFd {
    pub fn open(path: &std::path::Path) -> PathFd {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        PathFd(Arc::new(sys::open_path(&c).unwrap()))
    }
}

impl AsFd for PathFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Inode {
    /// The inode's `O_PATH` descriptor, reopened from its handle if evicted.
    pub fn fd(self: &Arc<Self>) -> Result<PathFd, Errno> {
        let mut slot = self.fd.lock();
        if let Some(fd) = &*slot {
            return Ok(PathFd(fd.clone()));
        }
        let handle = self
            .handle
            .as_ref()
            .expect("only inodes with a handle lose their descriptor");
        let fd = sys::open_by_handle(self.cache.mount.as_fd(), handle)?;
        // A handle taken by name beside a stat of that name (a listing's
        // entries) names another inode if the name was replaced in between:
        // never serve that one under this node.
        if crate::fs::key_of(&sys::stat_fd(fd.as_fd())?) != self.key {
            return Err(Errno::ESTALE);
        }
        let fd = Arc::new(fd);
        *slot = Some(fd.clone());
        drop(slot);
        self.cache.opened(self);
        Ok(PathFd(fd))
    }

    fn close_fd(&self) {
        if self.handle.is_some() {
            self.fd.lock().take();
        }
    }
}

/// The bounded set of inodes holding an open descriptor, evicted oldest first.
struct FdCache {
    /// A (non-`O_PATH`) descriptor on the source's filesystem, for `open_by_handle_at`.
    mount: OwnedFd,
    open: Mutex<VecDeque<Weak<Inode>>>,
    capacity: usize,
}

impl FdCache {
    /// Records that `inode` now holds a descriptor, closing the oldest
    /// others' beyond capacity. An inode may be queued more than once; an
    /// early eviction only costs a reopen.
    fn opened(&self, inode: &Arc<Inode>) {
        if inode.handle.is_none() {
            return;
        }
        let victims: Vec<Weak<Inode>> = {
            let mut open = self.open.lock();
            open.push_back(Arc::downgrade(inode));
            let excess = open.len().saturating_sub(self.capacity);
            open.drain(..excess).collect()
        };
        for victim in victims.iter().filter_map(Weak::upgrade) {
            victim.close_fd();
        }
    }
}

/// How many inode descriptors to keep open: half of what the process may
/// open, leaving the rest for open files, directories and the journal.
fn fd_capacity() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    (soft / 2).clamp(256, 1 << 20) as usize
}

const SHARDS: usize = 64;

/// Node id -> inode, sharded so that concurrent operations on different
/// inodes do not contend on one lock.
pub struct InodeTable {
    shards: Vec<RwLock<HashMap<u64, Arc<Inode>>>>,
    root_key: InodeKey,
    cache: Arc<FdCache>,
}

impl InodeTable {
    pub fn new(
        root_fd: OwnedFd,
        root_key: InodeKey,
        root_file: Arc<FileState>,
    ) -> Result<InodeTable, Errno> {
        let cache = Arc::new(FdCache {
            // open_by_handle_at refuses an O_PATH descriptor here.
            mount: sys::reopen(root_fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?.into(),
            open: Mutex::new(VecDeque::new()),
            capacity: fd_capacity(),
        });
        let table = InodeTable {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            root_key,
            cache: cache.clone(),
        };
        let root = Inode {
            node: ROOT_NODE,
            key: root_key,
            kind: FileKind::Dir,
            handle: None,
            fd: Mutex::new(Some(Arc::new(root_fd))),
            cache,
            file: root_file,
            open: Mutex::new(OpenState::default()),
            // The kernel never forgets the root.
            lookups: Mutex::new(1),
        };
        table
            .shard(ROOT_NODE)
            .write()
            .insert(ROOT_NODE, Arc::new(root));
        Ok(table)
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

    /// Whether inodes with `key` can be reopened from a handle: handles are
    /// opened through the root's filesystem, so an inode on another device
    /// keeps its descriptor instead.
    pub fn reopens_by_handle(&self, key: InodeKey) -> bool {
        key.dev == self.root_key.dev
    }

    /// Adds one kernel reference to the inode `backing` names, creating the
    /// entry with `make_file` if the kernel did not know it.
    pub fn reference(
        &self,
        key: InodeKey,
        kind: FileKind,
        backing: Backing,
        make_file: impl FnOnce() -> Arc<FileState>,
    ) -> Result<Arc<Inode>, Errno> {
        let (fd, handle) = match backing {
            Backing::Fd(fd) => {
                let handle = match self.reopens_by_handle(key) {
                    true => sys::name_to_handle(fd.as_fd())?,
                    false => None,
                };
                (Some(fd), handle)
            }
            Backing::Handle(handle) => (None, Some(handle)),
        };
        let holds_fd = fd.is_some();
        let node = self.node_of(key);
        let mut shard = self.shard(node).write();
        // The kernel counts lookups per node id: a node id that now names
        // another inode inherits the count the kernel still holds for it.
        let mut inherited = 0;
        if let Some(inode) = shard.get(&node) {
            // A number the filesystem reused for a new file (the old one is
            // gone) has another handle: that is a new inode.
            let same_file = match (&inode.handle, &handle) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            if inode.key == key && same_file {
                *inode.lookups.lock() += 1;
                return Ok(inode.clone());
            }
            if node == ROOT_NODE {
                // Inode 1 of another filesystem inside the source: node 1 is
                // the root's, whatever else carries the number.
                tracing::warn!(
                    ?key,
                    "an inode numbered 1 inside the source cannot be served"
                );
                return Err(Errno::EIO);
            }
            tracing::debug!(node, ?key, old = ?inode.key, "node number now names another inode");
            inherited = *inode.lookups.lock();
        }
        let inode = Arc::new(Inode {
            node,
            key,
            kind,
            handle,
            fd: Mutex::new(fd.map(Arc::new)),
            cache: self.cache.clone(),
            file: make_file(),
            open: Mutex::new(OpenState::default()),
            lookups: Mutex::new(inherited + 1),
        });
        shard.insert(node, inode.clone());
        drop(shard);
        if holds_fd {
            self.cache.opened(&inode);
        }
        Ok(inode)
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
