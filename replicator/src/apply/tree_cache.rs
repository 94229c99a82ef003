//! The replica's tree cache: the content tree (`crate::tree`) of each large
//! replica file, kept beside the replica so that an in-place change is
//! checked by reading the leaves it touches rather than the whole file.
//!
//! `trees/<ino>` in the state directory holds the tree of the replica file
//! with inode number `ino`, as ferry last left it, with what fstat said of
//! the file then. Layout (integers little-endian):
//!
//! | bytes | field |
//! |---:|---|
//! | 8 | magic: ASCII `FERRYTR1` |
//! | 8 | `st_ino` |
//! | 8 | `st_size` |
//! | 16 | mtime: seconds (i64), nanoseconds (i64) |
//! | 16 | ctime: seconds (i64), nanoseconds (i64) |
//! | … | the tree (`ContentTree::to_bytes`) |
//! | 16 | check: the first 16 bytes of BLAKE3 of everything before it |
//!
//! **Trust.** An entry is used only if its check is right and the file's
//! fstat now shows the same inode, size, mtime and ctime. No user can set
//! a ctime: any change to the file after the entry was written — to its
//! content, even with the mtime put back (`touch -d`), or to its metadata —
//! gives it a new ctime and so invalidates the entry, provided the new
//! ctime differs from the recorded one. The kernel takes ctime from a
//! coarse clock (it ticks every few milliseconds), so a change within the
//! tick of the recorded ctime would keep it: an entry is written only once
//! that clock has passed the file's ctime ([`TreeCache::record`] waits up
//! to `MAX_SETTLE` for it, and skips the file if it has not). What is not
//! seen: a change made while a commit runs, after the commit's last step
//! on the file and before its entry is stamped.
//!
//! **What has entries.** Files larger than one leaf (smaller ones are hashed
//! directly, as cheaply as their entry would be read). The applier writes
//! entries after a commit, for the files whose content the batch set, where
//! the batch left them (not for a file left below a directory the batch
//! moved: staging does not track it there); an entry found invalid is
//! removed, and so are those
//! of the inodes a batch unlinks or replaces (one `unlink` each). A file
//! the batch only renamed, linked or changed metadata of keeps an entry
//! that no longer matches its ctime: its next in-place change reads it
//! whole once and records it again. Entries of files removed behind
//! ferry's back stay until their inode number is reused and recorded
//! again; they are never trusted (the stat differs) and take 0.2% of the
//! size of the file they described.
//!
//! **Durability.** Entries are written atomically (a temporary file renamed
//! over the entry) and never fsynced: after any crash an entry is either
//! missing, torn (its check fails), or describes a file whose ctime has
//! since moved on (the batch that made it stale synced its changes to the
//! replica before anything else). Each case makes the applier read the
//! file in full instead: a lost entry costs time, never correctness.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::stat::FileStat;

use super::fsops::Root;
use crate::batch::RelPath;
use crate::tree::{ContentTree, LEAF};

const MAGIC: &[u8; 8] = b"FERRYTR1";

/// Magic and stamp.
const HEAD: usize = 8 + 6 * 8;

/// Bytes of the check.
const CHECK: usize = 16;

/// How long [`TreeCache::record`] waits for the clock to pass the ctimes
/// of the files it records.
const MAX_SETTLE: Duration = Duration::from_millis(50);

/// What fstat says of a file, as far as the cache cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub ino: u64,
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Stamp {
    pub fn of(st: &FileStat) -> Stamp {
        Stamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    fn fields(&self) -> [u64; 6] {
        [
            self.ino,
            self.size,
            self.mtime.0 as u64,
            self.mtime.1 as u64,
            self.ctime.0 as u64,
            self.ctime.1 as u64,
        ]
    }
}

/// A file to record: where the batch left it, its inode, its tree.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: RelPath,
    pub ino: u64,
    pub tree: ContentTree,
}

/// The `trees/` directory of a replica's state directory (which
/// `Replica::open` creates).
pub struct TreeCache {
    dir: PathBuf,
}

impl TreeCache {
    pub fn new(state: &Path) -> TreeCache {
        TreeCache {
            dir: state.join("trees"),
        }
    }

    fn path(&self, ino: u64) -> PathBuf {
        self.dir.join(ino.to_string())
    }

    /// Whether a file of `size` bytes has entries.
    pub fn keeps(size: u64) -> bool {
        size > LEAF
    }

    /// The tree of the file `st` describes, if its entry is valid. An
    /// invalid entry is removed.
    pub fn load(&self, st: &FileStat) -> Option<ContentTree> {
        let stamp = Stamp::of(st);
        if !TreeCache::keeps(stamp.size) {
            return None;
        }
        let path = self.path(stamp.ino);
        let bytes = fs::read(&path).ok()?;
        match decode(&bytes) {
            Some((s, tree)) if s == stamp => Some(tree),
            // Stale or damaged: never trusted again. Best effort; a
            // failure leaves it to fail the same checks next time.
            _ => {
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Writes the entry of the file `stamp` describes (see the module docs
    /// for why it is not fsynced).
    pub fn store(&self, stamp: &Stamp, tree: &ContentTree) -> io::Result<()> {
        // One applier at a time (the replica's lock): one temporary name,
        // which a crash cannot leave behind for long.
        let tmp = self.dir.join("entry.tmp");
        fs::write(&tmp, encode(stamp, tree))?;
        fs::rename(&tmp, self.path(stamp.ino))
    }

    /// Removes the entry of `ino`, if there is one.
    pub fn remove(&self, ino: u64) -> io::Result<()> {
        match fs::remove_file(self.path(ino)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes the entries of `files` (replica files whose content a commit
    /// has just set and synced) with their current stamps; returns a
    /// warning for each entry that could not be written. A file no longer
    /// at its path, or whose size is not its tree's (changed behind
    /// ferry's back during the commit), gets no entry; nor does one whose
    /// ctime the clock has not passed within `MAX_SETTLE` (see the module
    /// docs).
    pub fn record(&self, root: &Root, files: &[Recorded]) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut todo: Vec<&Recorded> = files.iter().collect();
        let deadline = Instant::now() + MAX_SETTLE;
        while !todo.is_empty() && Instant::now() < deadline {
            // Read before the stat: a change after the stat happens later
            // still, so it gets a ctime of at least `now`.
            let now = coarse_now();
            let mut racy = Vec::new();
            let mut latest = (i64::MIN, 0);
            for f in todo {
                let Some(stamp) = current_stamp(root, f) else {
                    continue;
                };
                if !settled(stamp.ctime, now) {
                    latest = latest.max(stamp.ctime);
                    racy.push(f);
                } else if let Err(e) = self.store(&stamp, &f.tree) {
                    warnings.push(format!(
                        "tree cache: writing the entry of {} ({}): {e}",
                        f.path,
                        self.path(f.ino).display()
                    ));
                }
            }
            if !racy.is_empty() && !wait_past(latest, deadline) {
                break;
            }
            todo = racy;
        }
        warnings
    }
}

/// The stamp of the file at `f.path` if it still is `f`'s inode, with
/// `f`'s size.
fn current_stamp(root: &Root, f: &Recorded) -> Option<Stamp> {
    let st = root.stat(&f.path).ok()??;
    let stamp = Stamp::of(&st);
    (st.st_mode & libc::S_IFMT == libc::S_IFREG
        && stamp.ino == f.ino
        && stamp.size == f.tree.size())
    .then_some(stamp)
}

/// The kernel's coarse realtime clock, which file timestamps come from.
fn coarse_now() -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the whole call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    assert_eq!(
        r, 0,
        "CLOCK_REALTIME_COARSE exists on every supported Linux"
    );
    (ts.tv_sec, ts.tv_nsec)
}

/// Whether every change from `now` on gets a ctime other than `ctime`.
/// A ctime of a whole second is taken to come from a filesystem that
/// keeps only seconds: the clock must be in a later second.
fn settled(ctime: (i64, i64), now: (i64, i64)) -> bool {
    if ctime.1 == 0 {
        now.0 > ctime.0
    } else {
        now > ctime
    }
}

/// Waits until the coarse clock has passed `ctime`; false if that does not
/// happen before `deadline`.
fn wait_past(ctime: (i64, i64), deadline: Instant) -> bool {
    loop {
        if settled(ctime, coarse_now()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn encode(stamp: &Stamp, tree: &ContentTree) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + 40 + 32 * tree.size().div_ceil(LEAF) as usize);
    out.extend_from_slice(MAGIC);
    for v in stamp.fields() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&tree.to_bytes());
    let check = blake3::hash(&out);
    out.extend_from_slice(&check.as_bytes()[..CHECK]);
    out
}

/// An entry's stamp and tree; `None` unless its check, magic and lengths
/// are right.
fn decode(b: &[u8]) -> Option<(Stamp, ContentTree)> {
    let (body, check) = b.split_at_checked(b.len().checked_sub(CHECK)?)?;
    if blake3::hash(body).as_bytes()[..CHECK] != *check || !body.starts_with(MAGIC) {
        return None;
    }
    let field = |i: usize| {
        let at = MAGIC.len() + 8 * i;
        u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"))
    };
    let tree = ContentTree::from_bytes(body.get(HEAD..)?)?;
    let stamp = Stamp {
        ino: field(0),
        size: field(1),
        mtime: (field(2) as i64, field(3) as i64),
        ctime: (field(4) as i64, field(5) as i64),
    };
    (tree.size() == stamp.size).then_some((stamp, tree))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            ino: 77,
            size: 3 * LEAF + 5,
            mtime: (-5, 999_999_999),
            ctime: (1_700_000_000, 12),
        }
    }

    fn tree() -> ContentTree {
        ContentTree::of_bytes(&vec![7u8; (3 * LEAF + 5) as usize])
    }

    #[test]
    fn entries_round_trip_and_any_damage_is_refused() {
        let bytes = encode(&stamp(), &tree());
        assert_eq!(decode(&bytes), Some((stamp(), tree())));
        for at in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert_eq!(decode(&bad), None, "flip at {at}");
        }
        for len in [0, 1, CHECK, HEAD, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..len]), None, "cut at {len}");
        }
    }

    #[test]
    fn a_tree_of_another_size_is_refused() {
        let s = Stamp {
            size: 4 * LEAF,
            ..stamp()
        };
        assert_eq!(decode(&encode(&s, &tree())), None);
    }

    #[test]
    fn settled_needs_the_clock_past_the_ctime() {
        assert!(!settled((10, 5), (10, 5)));
        assert!(settled((10, 5), (10, 6)));
        assert!(!settled((10, 0), (10, 900_000_000)));
        assert!(settled((10, 0), (11, 0)));
    }
}
