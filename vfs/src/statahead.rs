//! Statahead: warming the source filesystem's caches for the directories a
//! listing is about to lead into.
//!
//! A program walking a tree through the mount (find, du, rsync, ls -R) lists
//! a directory, then each of its subdirectories. Every entry listed costs the
//! mount a lookup in the source filesystem; when the source's caches are
//! cold, that lookup reads directory blocks and inodes on the walker's
//! critical path, serially, and the mount's own work comes on top (its queue
//! thread shares the walker's CPU, see ARCHITECTURE.md, "How requests reach
//! the mount"). So when a listing finds subdirectories, this thread reads
//! them ahead, a getdents and an fstatat per entry (what native `find` does),
//! and the walker's requests for them find the source's caches warm. Lustre
//! calls the same idea statahead.
//!
//! It is bounded so that it can only spend time nobody else wants:
//! - the thread runs at `SCHED_IDLE`, so any runnable task preempts it;
//! - one level: a directory read ahead does not queue its own subdirectories;
//! - at most `MAX_ENTRIES` entries a directory, `MAX_QUEUED` directories
//!   queued (the oldest are dropped: the walker has passed them), and a
//!   directory queued in the last seconds is not queued again;
//! - directories are opened with `O_NOATIME` where allowed, so reading ahead
//!   leaves no trace in the source.
//!
//! Nothing it does changes what the mount answers: it only reads.

use std::collections::{HashSet, VecDeque};
use std::ffi::CString;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use journal::InodeKey;
use parking_lot::{Condvar, Mutex};

use crate::inode::PathFd;
use crate::sys;

/// Directories waiting; past this the oldest are dropped. A walker needs
/// only the next few, and each waiting directory keeps its parent's
/// descriptor open: the descriptor cache leaves half the process's limit
/// (at least 512) to everything else, this included.
const MAX_QUEUED: usize = 128;
/// Entries read ahead in one directory.
const MAX_ENTRIES: usize = 4096;
/// How long a directory read ahead is not queued again: its entries are in
/// the source's caches for far longer.
const REMEMBER_FOR: Duration = Duration::from_secs(5);

/// A directory to read ahead: where it is and what it was when listed.
pub struct Subdir {
    pub parent: PathFd,
    pub name: CString,
    pub key: InodeKey,
}

/// The statahead thread and its queue; dropping it stops the thread.
pub struct Statahead {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Signalled whenever a directory is done (tests wait on it).
    progress: Condvar,
}

#[derive(Default)]
struct Queue {
    /// Newest last: the walker goes depth first, so the directories a
    /// listing just found are the ones it needs next.
    waiting: VecDeque<Subdir>,
    /// Directories queued in the last `REMEMBER_FOR`, oldest first.
    remembered: HashSet<InodeKey>,
    remembered_order: VecDeque<(Instant, InodeKey)>,
    /// A directory is being read ahead.
    busy: bool,
    /// Directories read ahead since the start.
    done: u64,
    stop: bool,
}

impl Queue {
    /// Whether `key` was not queued recently (and remembers it now).
    fn remember(&mut self, key: InodeKey, now: Instant) -> bool {
        while let Some(&(at, old)) = self.remembered_order.front()
            && now.duration_since(at) > REMEMBER_FOR
        {
            self.remembered_order.pop_front();
            self.remembered.remove(&old);
        }
        if !self.remembered.insert(key) {
            return false;
        }
        self.remembered_order.push_back((now, key));
        true
    }
}

impl Statahead {
    pub fn start() -> std::io::Result<Statahead> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            progress: Condvar::new(),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-statahead".into())
            .spawn(move || {
                lower_priority();
                worker.run();
            })?;
        Ok(Statahead {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues the subdirectories a listing found, in listing order.
    pub fn ahead(&self, subdirs: Vec<Subdir>) {
        if subdirs.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut queue = self.shared.queue.lock();
        // Pushed in reverse so that the first found is taken first.
        for subdir in subdirs.into_iter().rev() {
            if queue.remember(subdir.key, now) {
                queue.waiting.push_back(subdir);
            }
        }
        let excess = queue.waiting.len().saturating_sub(MAX_QUEUED);
        queue.waiting.drain(..excess);
        drop(queue);
        self.shared.wake.notify_one();
    }
}

impl Drop for Statahead {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn run(&self) {
        let mut buf = vec![0u8; 32 * 1024];
        let mut entries = Vec::new();
        loop {
            let subdir = {
                let mut queue = self.queue.lock();
                loop {
                    if queue.stop {
                        return;
                    }
                    if let Some(subdir) = queue.waiting.pop_back() {
                        queue.busy = true;
                        break subdir;
                    }
                    self.wake.wait(&mut queue);
                }
            };
            // Errors end this directory's read-ahead only: the mount's own
            // request meets the same error and reports it.
            let _ = read_ahead(&subdir, &mut buf, &mut entries);
            let mut queue = self.queue.lock();
            queue.busy = false;
            queue.done += 1;
            self.progress.notify_all();
        }
    }
}

/// Lists `subdir` and stats each entry, as the mount's lookups will. (Were
/// the name renamed meanwhile, another directory is read ahead: harmless.)
fn read_ahead(
    subdir: &Subdir,
    buf: &mut [u8],
    entries: &mut Vec<sys::DirEntry>,
) -> sys::SysResult<()> {
    let dir = sys::open_dir_noatime(subdir.parent.as_fd(), &subdir.name)?;
    let mut seen = 0;
    while seen < MAX_ENTRIES {
        entries.clear();
        if sys::getdents(&dir, buf, entries)? == 0 {
            break;
        }
        for entry in entries.iter().take(MAX_ENTRIES - seen) {
            let name = entry.name.as_bytes();
            if name != b"." && name != b".." {
                let _ = sys::stat_at(dir.as_fd(), &entry.name);
            }
        }
        seen += entries.len();
    }
    Ok(())
}

/// Makes the calling thread run only when its CPU has nothing else to do.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's own policy; `param` is valid.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "statahead runs at normal priority"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    impl Statahead {
        /// Waits until the queue is empty and nothing is being read;
        /// returns how many directories were read ahead.
        fn wait_idle(&self) -> u64 {
            let mut queue = self.shared.queue.lock();
            while queue.busy || !queue.waiting.is_empty() {
                self.shared.progress.wait(&mut queue);
            }
            queue.done
        }
    }

    fn subdir(root: &std::path::Path, name: &str) -> Subdir {
        let parent = crate::inode::PathFd::open(root);
        let meta = std::fs::symlink_metadata(root.join(name)).unwrap();
        Subdir {
            parent,
            name: CString::new(name).unwrap(),
            key: InodeKey {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        }
    }

    #[test]
    fn reads_each_subdirectory_once_and_leaves_atimes_alone() {
        let root = tempfile::tempdir().unwrap();
        for d in ["a", "b"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
            std::fs::write(root.path().join(d).join("f"), b"x").unwrap();
            // An atime older than the mtime: a plain listing would update it.
            let old = std::fs::FileTimes::new()
                .set_accessed(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1));
            std::fs::File::open(root.path().join(d))
                .unwrap()
                .set_times(old)
                .unwrap();
        }
        let statahead = Statahead::start().unwrap();
        statahead.ahead(vec![subdir(root.path(), "a"), subdir(root.path(), "b")]);
        assert_eq!(statahead.wait_idle(), 2);
        // Listed again at once: remembered, not read again.
        statahead.ahead(vec![subdir(root.path(), "a")]);
        assert_eq!(statahead.wait_idle(), 2);
        for d in ["a", "b"] {
            let atime = std::fs::metadata(root.path().join(d)).unwrap().atime();
            assert_eq!(atime, 1, "{d}: reading ahead changed the atime");
        }
    }

    #[test]
    fn a_directory_is_remembered_for_a_while() {
        let mut queue = Queue::default();
        let now = Instant::now();
        for ino in 0..3 {
            assert!(queue.remember(InodeKey { dev: 1, ino }, now));
        }
        assert!(!queue.remember(InodeKey { dev: 1, ino: 0 }, now));
        let later = now + REMEMBER_FOR + Duration::from_millis(1);
        assert!(
            queue.remember(InodeKey { dev: 1, ino: 0 }, later),
            "forgotten in time"
        );
    }
}
