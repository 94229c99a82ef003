//! Applying a batch to a replica directory, with a near-atomic commit.
//!
//! ferry's state for a replica `/x/r` lives beside it, on the same
//! filesystem, in `/x/.r.ferry/`:
//!
//! - `applied`: the applied sequence number, the source id and the
//!   replica id (replaced atomically: temp file, fsync, rename, fsync);
//! - `staging/`: new entries of the batch being applied, named by number,
//!   in buckets of 4,096 (`staging/<n / 4096>/<n>`); an entry whose parent
//!   directory is itself new is made inside it, under its own name, and is
//!   installed with it (a first copy of a tree installs only the root's
//!   entries);
//! - `commit/log`: the steps of a batch whose metadata phase has begun,
//!   and `commit/step.N`: an empty file whose name counts the steps done;
//! - `trees/`: the tree cache, the content tree of each large replica file
//!   by inode number (see below);
//! - `kept/`: the complete files of a batch that failed during staging
//!   (the connection was cut, a base did not match), named by the blake3
//!   of their content and made durable, so that the sender, told of them
//!   when it connects again, sends `CreateFromKept` instead of their
//!   content; emptied by every commit;
//! - `root`: the replica directory's device, inode number and birth time, so that a
//!   replica removed and made again is not taken for the old one;
//! - `lock`: flock'd by the one process applying to the replica.
//!
//! The protocol ([`apply`]), with the crash points the tests kill it at:
//!
//! 1. Finish any earlier commit (roll forward a `commit/log`), empty
//!    `staging/`, read `applied`, and check the batch's header against it:
//!    a batch already applied is skipped, a gap or an overlap is refused,
//!    a batch for another source or replica is refused.
//! 2. **Stage**: read the whole batch once, checking every operation
//!    against a model of the replica at that point of the batch (see
//!    `stage`); build every new entry (files with their final content and
//!    mode, delta results verified against base and result hashes,
//!    directories, symlinks, special files) in `staging/`. Metadata the
//!    batch gives an entry that is still in staging (owner, mode, xattrs,
//!    and, at the end of staging, a non-directory's times) is set on it
//!    there: its install carries it. Then the staged files are made durable
//!    (`durable`: one by one when few, by one syncfs when many) and
//!    `staging/` and its buckets are fsynced. In-place writes and truncations are checked
//!    against their base and result hashes (through content trees: see
//!    below) and kept for the log. Only once the trailer has been verified
//!    does anything go further: a damaged or refused batch leaves the
//!    replica untouched (crash point 1).
//! 3. **Log**: create `commit/step.0`; write the steps, each with the inode
//!    it acts on, to `commit/log.tmp`, fsync, rename to `commit/log`, fsync
//!    `commit/` (crash point 2).
//! 4. **Metadata phase** (the commit window): run the steps in batch
//!    order — installs of staged entries by rename, renames, links,
//!    unlinks, rmdirs, in-place writes and truncations, content copied
//!    into multiply-linked files, chmod, chown, utimes and xattrs — each
//!    followed by a crash point and, for every step but an install, by
//!    moving the marker `step.N` to count it (installs move it only every
//!    1,024 steps); then every utimes again, so that directory times
//!    changed by later entries end as the batch says. Then the files changed
//!    in place are fsynced and so is `staging/` (on the journaling
//!    filesystems ferry relies on, that commits every rename and metadata
//!    change made so far; a changed file no longer where the log left it
//!    means one syncfs instead), and the tree cache is brought up to date
//!    (no crash point: it is only a cache).
//! 5. Write `applied` (crash point), remove the marker and `commit/log`
//!    and fsync `commit/` (crash point), empty `staging/` (crash point).
//!
//! A crash anywhere rolls forward: the next [`apply`] or [`recover`] finds
//! `commit/log` and runs the steps from the marker on. Past the marker,
//! installs may have been done, and at most one other step (a crash
//! between it and the marker's move). An install acts only if its staged
//! entry is still in `staging/`, which is exact whatever ran after it. The
//! other step acts only if its path still holds the inode it recorded,
//! which is exact because no later non-install step has run. (Checking identity alone for every
//! step would not be: after `rename a b; rename b a; rename a b`, replaying
//! the first again would find `a` free but the second would find `b`
//! holding the inode again.) Applying the same batch twice is a no-op (its
//! `to_seq` is already applied).
//!
//! Durability: staged content, the log and `applied` are made durable; the
//! marker's renames are not, and rely on the filesystem journaling
//! metadata in order (ext4, xfs, btrfs), so that it is never ahead of the
//! renames it counts. In-place writes of the commit window are not fsynced
//! before the marker passes them: a power failure (not a killed process)
//! inside the commit window can lose them. The sync before `applied` makes
//! the whole batch durable. It never waits for the whole filesystem when
//! the batch is small: syncfs would also wait for gigabytes other programs
//! left dirty.
//!
//! Every path is resolved beneath the replica root without following a
//! symlink (see `fsops`): a batch cannot read or write outside the root.
//!
//! **The tree cache** (`tree_cache`) is what lets a small in-place change
//! to a large file be checked without reading the file: the base hash is
//! the root of the file's cached tree, and the result hash is the root of
//! that tree updated from the leaves the change touches. An entry is
//! trusted only while the file's fstat (inode, size, mtime, ctime) is what
//! it was when the entry was written, so a change behind ferry's back
//! invalidates it, and the file is then read in full, as it is when it has
//! no entry. After the sync of step 4 the applier removes the entries of
//! inodes the batch unlinked or replaced and writes those of the files
//! whose content it set (new files, delta results, files changed in place)
//! larger than one leaf, from the trees staging built. A commit rolled
//! forward after a crash writes none: those files are read once later.
//! A change behind ferry's back made while a commit runs, between the
//! step that last changes a file and the writing of its entry, is not
//! seen.

mod commit;
mod direct;
mod durable;
mod fsops;
mod new_files;
mod stage;
mod tree_cache;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

use crate::batch::{ANY_REPLICA, BatchError, BatchReader, Hash, OpSource, validate};
use commit::{CommitLog, Entry, Step};
use durable::PendingSync;
use fsops::{Root, describe, fsync_dir};
pub use stage::Partial;
use stage::{Staged, Stager};
use tree_cache::{Recorded, TreeCache};

/// At least every this many steps the commit marker moves.
const MARKER_EVERY: usize = 1024;

/// How to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Test hook: stop after this many crash points of the protocol (see
    /// the module docs), leaving everything as a kill would, and return
    /// [`ApplyError::InjectedCrash`].
    pub crash_after_step: Option<usize>,
    /// The most bytes of zeros one batch may make the applier hash: the
    /// holes of new files and the growth of files changed in place (every
    /// byte of a file is hashed; a hole is not sent but is hashed all the
    /// same). Bounds the work a few bytes of hostile batch can cause.
    pub max_zeros: u64,
    /// The most memory, roughly, the operations of one batch may hold
    /// until its commit (the model of the replica and the commit log grow
    /// with every operation: counted as its paths' bytes plus a fixed
    /// cost). Bounds what a stream of tiny hostile operations can take.
    pub max_held: u64,
}

/// [`ApplyOptions::max_zeros`] by default: a few minutes of hashing.
pub const DEFAULT_MAX_ZEROS: u64 = 1 << 40;

/// [`ApplyOptions::max_held`] by default: about 15 million operations of
/// short paths (a first copy of as many files).
pub const DEFAULT_MAX_HELD: u64 = 4 << 30;

impl Default for ApplyOptions {
    fn default() -> ApplyOptions {
        ApplyOptions {
            crash_after_step: None,
            max_zeros: DEFAULT_MAX_ZEROS,
            max_held: DEFAULT_MAX_HELD,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplyReport {
    pub from_seq: u64,
    pub to_seq: u64,
    /// The batch was already applied: nothing was done.
    pub skipped: bool,
    /// An earlier, interrupted commit was rolled forward first.
    pub recovered: bool,
    /// Operations in the batch.
    pub ops: u64,
    /// Content bytes in the batch.
    pub content_bytes: u64,
    /// Entries built in staging.
    pub staged: u64,
    /// Steps of the metadata phase.
    pub steps: u64,
    /// First to last visible change, in microseconds.
    pub commit_window_us: u64,
    /// Reading the batch and building everything in staging.
    pub staging_us: u64,
    /// Making the staged content and the commit durable.
    pub sync_us: u64,
    /// Bytes of the replica's files read to check or apply content
    /// changes: the whole file for a delta's basis and for an in-place
    /// change to a file without a valid tree cache entry, else only the
    /// leaves the change touches.
    pub replica_bytes_read: u64,
    /// Metadata that could not be set (an xattr the filesystem refuses,
    /// an owner without the privilege): reported, not fatal.
    pub warnings: Vec<String>,
}

/// The replica's applied state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub seq: u64,
    pub source_id: [u8; 16],
    /// All zero until a batch made for a particular replica is applied.
    pub replica_id: [u8; 16],
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Bytes as lowercase hex, as ids appear in state files and messages.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Applied {
    fn encode(&self) -> String {
        format!(
            "ferry-replica-state 1\nseq {}\nsource {}\nreplica {}\n",
            self.seq,
            hex(&self.source_id),
            hex(&self.replica_id)
        )
    }

    fn decode(s: &str) -> Option<Applied> {
        let mut lines = s.lines();
        if lines.next()? != "ferry-replica-state 1" {
            return None;
        }
        let seq = lines.next()?.strip_prefix("seq ")?.parse().ok()?;
        let source_id = unhex16(lines.next()?.strip_prefix("source ")?)?;
        let replica_id = unhex16(lines.next()?.strip_prefix("replica ")?)?;
        Some(Applied {
            seq,
            source_id,
            replica_id,
        })
    }
}

/// Why a batch was not applied (or not completely).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Batch(#[from] BatchError),
    #[error("replica state {path}: {what}: {source}")]
    State {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "the batch starts at seq {from_seq} but the replica has applied up to seq {applied}: \
         the batch(es) covering seq {} to {from_seq} are missing; apply them first",
        applied + 1
    )]
    Gap { applied: u64, from_seq: u64 },
    #[error(
        "the batch covers seq {from_seq} to {to_seq} but the replica has applied up to seq \
         {applied}, in the middle of it: it belongs to another sequence of batches"
    )]
    Overlap {
        applied: u64,
        from_seq: u64,
        to_seq: u64,
    },
    #[error("the batch comes from source {batch} but the replica follows source {replica}")]
    WrongSource { batch: String, replica: String },
    #[error("the batch was made for replica {batch}, not for this replica ({replica})")]
    WrongReplica { batch: String, replica: String },
    #[error("op {index} ({op} {path}): {reason}; nothing was applied")]
    Op {
        index: u64,
        op: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "op {index} ({op} {path}): the replica's file does not match the batch's base hash \
         (it was changed behind ferry's back); nothing was applied: send {path} with full content"
    )]
    BaseMismatch {
        index: u64,
        op: &'static str,
        path: String,
    },
    #[error(
        "commit step {step} (op {index}, {op} {path}): {reason}; the commit log is kept and the \
         next apply (or `recover`) finishes the batch"
    )]
    Commit {
        step: usize,
        index: u64,
        op: String,
        path: String,
        reason: String,
    },
    #[error(
        "the replica directory is not the one the state {state} belongs to (it was removed and \
         made again?): remove {state} to seed the replica anew"
    )]
    ReplicaReplaced { state: PathBuf },
    #[error("injected crash after protocol step {0}")]
    InjectedCrash(usize),
}

/// The directory holding ferry's state for `replica_root`: beside it,
/// `.NAME.ferry`.
pub fn state_dir(replica_root: &Path) -> Result<PathBuf, ApplyError> {
    let err = |source| ApplyError::State {
        path: replica_root.to_path_buf(),
        what: "resolving the replica root",
        source,
    };
    let root = replica_root.canonicalize().map_err(err)?;
    match (root.parent(), root.file_name()) {
        (Some(parent), Some(name)) => {
            let mut n = std::ffi::OsString::from(".");
            n.push(name);
            n.push(".ferry");
            Ok(parent.join(n))
        }
        _ => Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the replica cannot be the filesystem root (its state lives beside it)",
        ))),
    }
}

/// The replica's applied state (`None` for a replica never applied to).
pub fn read_applied(replica_root: &Path) -> Result<Option<Applied>, ApplyError> {
    let state = state_dir(replica_root)?;
    check_root(&state, replica_root, false)?;
    read_applied_in(&state)
}

/// The state beside a replica describes one directory (`root`: its device
/// and inode numbers and birth time). A replica directory removed and made again would
/// otherwise inherit the old one's applied sequence number and never be
/// sent what it lacks. With `record`, a state without `root` (new, or
/// older than the file) records the directory it is used with.
fn check_root(state: &Path, replica_root: &Path, record: bool) -> Result<(), ApplyError> {
    use std::os::unix::fs::MetadataExt;
    let err = |path: &Path, what: &'static str| {
        let path = path.to_path_buf();
        move |source| ApplyError::State { path, what, source }
    };
    let md = fs::metadata(replica_root).map_err(err(replica_root, "reading"))?;
    // The inode number of a directory removed and made again may be the
    // same; its birth time is not (where the filesystem keeps one).
    let born = md
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let id = format!("{} {} {born}\n", md.dev(), md.ino());
    let path = state.join("root");
    match fs::read_to_string(&path) {
        Ok(found) if found == id => Ok(()),
        Ok(_) => Err(ApplyError::ReplicaReplaced {
            state: state.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if record {
                // Whole or not at all: a torn file would read as another root.
                let tmp = state.join("root.tmp");
                fs::write(&tmp, id).map_err(err(&tmp, "writing"))?;
                fs::rename(&tmp, &path).map_err(err(&path, "writing"))?;
            }
            Ok(())
        }
        Err(e) => Err(err(&path, "reading")(e)),
    }
}

fn read_applied_in(state: &Path) -> Result<Option<Applied>, ApplyError> {
    let path = state.join("applied");
    match fs::read_to_string(&path) {
        Ok(s) => Applied::decode(&s)
            .map(Some)
            .ok_or_else(|| ApplyError::State {
                path,
                what: "reading",
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    "not a ferry replica state file",
                ),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ApplyError::State {
            path,
            what: "reading",
            source,
        }),
    }
}

/// Counts the protocol's crash points and stops at the chosen one.
struct Crash {
    n: usize,
    at: Option<usize>,
}

impl Crash {
    fn point(&mut self) -> Result<(), ApplyError> {
        self.n += 1;
        if self.at == Some(self.n) {
            return Err(ApplyError::InjectedCrash(self.n));
        }
        Ok(())
    }
}

/// An opened, locked replica.
struct Replica {
    state: PathBuf,
    root: Root,
    staging: OwnedFd,
    kept: OwnedFd,
    trees: TreeCache,
    _lock: Flock<File>,
}

impl Replica {
    fn open(replica_root: &Path) -> Result<Replica, ApplyError> {
        let state = state_dir(replica_root)?;
        let st = |path: &Path, what: &'static str| {
            let path = path.to_path_buf();
            move |source| ApplyError::State { path, what, source }
        };
        for d in [
            state.clone(),
            state.join("staging"),
            state.join("commit"),
            state.join("trees"),
            state.join("kept"),
        ] {
            // 0700: staged content must not be readable before the
            // replica's own permissions apply to it.
            match fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(st(&d, "creating")(e)),
            }
        }
        let lock_path = state.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(st(&lock_path, "opening"))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| st(&lock_path, "locking")(e.into()))?;
        let root = Root::open(replica_root).map_err(st(replica_root, "opening the replica"))?;
        let staging_path = state.join("staging");
        let staging = nix::fcntl::open(
            &staging_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| st(&staging_path, "opening")(e.into()))?;
        let sdev = nix::sys::stat::fstat(&staging)
            .map_err(|e| st(&staging_path, "stat")(e.into()))?
            .st_dev;
        if sdev != root.dev {
            return Err(st(&staging_path, "checking")(io::Error::other(
                "the state directory is not on the replica's filesystem",
            )));
        }
        let kept_path = state.join("kept");
        let kept = nix::fcntl::open(
            &kept_path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| st(&kept_path, "opening")(e.into()))?;
        check_root(&state, replica_root, true)?;
        Ok(Replica {
            trees: TreeCache::new(&state),
            state,
            root,
            staging,
            kept,
            _lock: lock,
        })
    }

    /// The hashes of the content in `kept/` (at most `limit`).
    fn kept(&self, limit: usize) -> Result<Vec<Hash>, ApplyError> {
        let dir = self.state.join("kept");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(self.err(dir.clone(), "listing"))? {
            if out.len() == limit {
                break;
            }
            let e = e.map_err(self.err(dir.clone(), "listing"))?;
            if let Some(h) = e.file_name().to_str().and_then(Hash::from_hex) {
                out.push(h);
            }
        }
        Ok(out)
    }

    fn err(&self, path: PathBuf, what: &'static str) -> impl FnOnce(io::Error) -> ApplyError {
        move |source| ApplyError::State { path, what, source }
    }

    fn log_path(&self) -> PathBuf {
        self.state.join("commit").join("log")
    }

    /// fsyncs `staging/` and its buckets, so that the staged entries'
    /// names are durable before the commit log names them.
    fn sync_staging_dirs(&self) -> Result<(), ApplyError> {
        let dir = self.state.join("staging");
        for e in fs::read_dir(&dir).map_err(self.err(dir.clone(), "listing"))? {
            let p = e.map_err(self.err(dir.clone(), "listing"))?.path();
            fsync_dir(&p).map_err(self.err(p, "fsync"))?;
        }
        fsync_dir(&dir).map_err(self.err(dir, "fsync"))
    }

    fn clean_staging(&self) -> Result<(), ApplyError> {
        self.empty_dir("staging")
    }

    /// Removes everything in the state's directory `name`.
    fn empty_dir(&self, name: &str) -> Result<(), ApplyError> {
        let dir = self.state.join(name);
        let entries = fs::read_dir(&dir).map_err(self.err(dir.clone(), "listing"))?;
        for e in entries {
            let e = e.map_err(self.err(dir.clone(), "listing"))?;
            let p = e.path();
            let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(self.err(p, "removing"))?;
        }
        Ok(())
    }

    fn write_applied(&self, a: &Applied) -> Result<(), ApplyError> {
        let tmp = self.state.join("applied.tmp");
        let path = self.state.join("applied");
        let mut f = File::create(&tmp).map_err(self.err(tmp.clone(), "creating"))?;
        f.write_all(a.encode().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(self.err(tmp.clone(), "writing"))?;
        fs::rename(&tmp, &path).map_err(self.err(path.clone(), "replacing"))?;
        fsync_dir(&self.state).map_err(self.err(self.state.clone(), "fsync"))
    }

    fn write_log(&self, log: &CommitLog) -> Result<(), ApplyError> {
        let dir = self.state.join("commit");
        let tmp = dir.join("log.tmp");
        let bytes = postcard::to_stdvec(log).expect("a commit log always serializes");
        let mut f = File::create(&tmp).map_err(self.err(tmp.clone(), "creating"))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(self.err(tmp.clone(), "writing"))?;
        fs::rename(&tmp, self.log_path()).map_err(self.err(self.log_path(), "renaming"))?;
        fsync_dir(&dir).map_err(self.err(dir, "fsync"))
    }

    /// The number of steps done, from the marker `commit/step.N`.
    fn read_progress(&self) -> Result<usize, ApplyError> {
        Ok(self.markers()?.into_iter().max().unwrap_or(0))
    }

    fn markers(&self) -> Result<Vec<usize>, ApplyError> {
        let dir = self.state.join("commit");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(self.err(dir.clone(), "listing"))? {
            let e = e.map_err(self.err(dir.clone(), "listing"))?;
            if let Some(n) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("step."))
                .and_then(|n| n.parse().ok())
            {
                out.push(n);
            }
        }
        Ok(out)
    }

    fn marker(&self, n: usize) -> PathBuf {
        self.state.join("commit").join(format!("step.{n}"))
    }

    /// Moves the marker past step `i`: one rename, no fsync. A rename is
    /// journaled metadata, ordered after the step's own renames on the
    /// journaling filesystems ferry supports, so the marker is never ahead
    /// of the namespace changes it counts.
    fn advance(&self, from: usize, to: usize) -> Result<(), ApplyError> {
        fs::rename(self.marker(from), self.marker(to))
            .map_err(self.err(self.marker(to), "moving the commit marker"))
    }

    /// Removes every marker.
    fn remove_progress(&self) -> Result<(), ApplyError> {
        for n in self.markers()? {
            match fs::remove_file(self.marker(n)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.err(self.marker(n), "removing")(e)),
            }
        }
        Ok(())
    }

    fn read_log(&self) -> Result<Option<CommitLog>, ApplyError> {
        let path = self.log_path();
        match fs::read(&path) {
            Ok(b) => postcard::from_bytes(&b)
                .map(Some)
                .map_err(|e| ApplyError::State {
                    path,
                    what: "decoding the commit log",
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(path, "reading")(e)),
        }
    }

    /// Finishes an interrupted commit, if there is one. Returns whether
    /// there was.
    fn recover(&self, report: &mut ApplyReport) -> Result<bool, ApplyError> {
        let Some(log) = self.read_log()? else {
            self.clean_staging()?;
            return Ok(false);
        };
        let applied = read_applied_in(&self.state)?;
        let mut crash = Crash { n: 0, at: None };
        if applied.is_some_and(|a| a.seq >= log.to_seq && a.source_id == log.source_id) {
            self.finish(&mut crash)?;
        } else {
            self.commit(&log, report, &mut crash, &[])?;
        }
        Ok(true)
    }

    /// The metadata phase and what follows it. `trees` are the trees of
    /// the files whose content the batch sets, for the tree cache.
    fn commit(
        &self,
        log: &CommitLog,
        report: &mut ApplyReport,
        crash: &mut Crash,
        trees: &[Recorded],
    ) -> Result<(), ApplyError> {
        // Steps before the marker are done; the one after it may be (a
        // crash between a step and the marker's move): its inode check
        // tells, and only for that step is the check exact, since no later
        // step has run.
        let done = self.read_progress()?;
        let start = Instant::now();
        let mut marker = done;
        for (i, e) in log.entries.iter().enumerate().skip(done) {
            self.run(i, e, report)?;
            crash.point()?;
            // An install is found done exactly (its entry left staging),
            // so it need not move the marker: after a crash, the steps
            // past the marker are installs and at most one other step.
            // Moving it now and then bounds the replay.
            if !e.step.is_install() || i + 1 - marker >= MARKER_EVERY {
                self.advance(marker, i + 1)?;
                marker = i + 1;
            }
        }
        // Times last: later entries change their directories' mtimes.
        for (i, e) in log.entries.iter().enumerate() {
            if e.step.is_utimes() {
                self.run(i, e, report)?;
            }
        }
        report.commit_window_us = micros(start);
        report.steps = log.entries.len() as u64;
        let sync_started = Instant::now();
        self.sync_commit(log)?;
        report.sync_us += micros(sync_started);
        self.update_tree_cache(log, trees, report);
        self.write_applied(&Applied {
            seq: log.to_seq,
            source_id: log.source_id,
            replica_id: log.replica_id,
        })?;
        crash.point()?;
        self.finish(crash)
    }

    /// Makes the commit durable: the files it changed in place (their
    /// data), then the fsync of `staging/`, which on the journaling
    /// filesystems the marker already relies on (ext4, xfs, btrfs) commits
    /// the journal transaction holding every rename and metadata change
    /// made so far. A changed file no longer where the log left it means
    /// one syncfs instead. `staging/` is on the replica's filesystem
    /// (checked at open).
    fn sync_commit(&self, log: &CommitLog) -> Result<(), ApplyError> {
        let mut files = PendingSync::default();
        let mut lost = false;
        for e in &log.entries {
            let (Step::Write { path, ino, .. }
            | Step::Truncate { path, ino, .. }
            | Step::CopyInto { path, ino, .. }) = &e.step
            else {
                continue;
            };
            let f = self.root.parent(path).and_then(|p| p.open_file(false));
            match f.and_then(|f| commit::check_ino(&f, *ino).map(|()| f)) {
                Ok(f) => files
                    .add(&f)
                    .map_err(self.err(self.state.clone(), "syncing the commit"))?,
                Err(_) => lost = true,
            }
        }
        let staging = self.state.join("staging");
        if lost {
            nix::unistd::syncfs(&self.staging).map_err(|e| self.err(staging, "syncfs")(e.into()))
        } else {
            files
                .sync(&self.staging)
                .map_err(self.err(staging.clone(), "syncing the commit"))?;
            nix::unistd::fsync(&self.staging).map_err(|e| self.err(staging, "fsync")(e.into()))
        }
    }

    /// Brings the tree cache up to date once the commit is synced: removes
    /// the entries of the inodes the batch took a name from (their ctime
    /// changed), then writes those of `trees`. Failures are warnings: the
    /// cache only saves reads.
    fn update_tree_cache(&self, log: &CommitLog, trees: &[Recorded], report: &mut ApplyReport) {
        for ino in log.entries.iter().filter_map(|e| e.step.released()) {
            if let Err(e) = self.trees.remove(ino) {
                report.warnings.push(format!(
                    "tree cache: removing the entry of inode {ino}: {e}"
                ));
            }
        }
        report.warnings.extend(self.trees.record(&self.root, trees));
    }

    /// Removes the commit log, then whatever is left in staging.
    fn finish(&self, crash: &mut Crash) -> Result<(), ApplyError> {
        let dir = self.state.join("commit");
        // The progress first: it belongs to this log, and must not outlive
        // it.
        self.remove_progress()?;
        match fs::remove_file(self.log_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.err(self.log_path(), "removing")(e)),
        }
        fsync_dir(&dir).map_err(self.err(dir, "fsync"))?;
        crash.point()?;
        self.clean_staging()?;
        self.empty_dir("kept")?;
        crash.point()
    }

    fn run(&self, i: usize, e: &Entry, report: &mut ApplyReport) -> Result<(), ApplyError> {
        use std::os::fd::AsFd;
        match commit::run(&self.root, self.staging.as_fd(), &e.step) {
            Ok(()) => Ok(()),
            // Metadata the filesystem or our privileges refuse is reported
            // and the commit goes on (as rsync does); never a symlink in
            // the path.
            Err(err) if e.step.is_meta() && !matches!(err, Errno::ELOOP | Errno::EXDEV) => {
                report.warnings.push(format!(
                    "op {} ({} {}): {}",
                    e.index,
                    e.op,
                    e.step.path(),
                    describe(err)
                ));
                Ok(())
            }
            Err(err) => Err(ApplyError::Commit {
                step: i,
                index: e.index,
                op: e.op.clone(),
                path: e.step.path().to_string(),
                reason: describe(err),
            }),
        }
    }
}

/// Applies the batch read from `batch` to the replica at `replica_root`
/// (see the module docs for the protocol). The batch is read once;
/// nothing visible changes before its trailer has been verified.
pub fn apply<R: Read>(
    replica_root: &Path,
    batch: R,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    apply_from(replica_root, &mut BatchReader::new(batch)?, options)
}

/// As [`apply`], from a reader whose header has been read (a batch
/// embedded in a protocol stream: [`BatchReader::in_stream`]). A batch
/// that is skipped as already applied is left unread: the caller drains
/// or drops the stream.
pub fn apply_from(
    replica_root: &Path,
    reader: &mut impl OpSource,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    Session::open(replica_root)?.apply_from(reader, options)
}

/// A replica opened for applying: locked (anyone else opening it waits)
/// and with any interrupted commit finished, until dropped. A receiver
/// holds one for a whole connection, so that what it tells the sender
/// (the applied state, the kept content) stays true until the sender's
/// batch arrives.
pub struct Session {
    rep: Replica,
    /// An interrupted commit was finished at open (reported once).
    recovered: bool,
}

impl Session {
    pub fn open(replica_root: &Path) -> Result<Session, ApplyError> {
        let rep = Replica::open(replica_root)?;
        let recovered = rep.recover(&mut ApplyReport::default())?;
        Ok(Session { rep, recovered })
    }

    /// The replica's applied state (`None` for a replica never applied to).
    pub fn applied(&self) -> Result<Option<Applied>, ApplyError> {
        read_applied_in(&self.rep.state)
    }

    /// The hashes of the content kept from batches that failed (at most
    /// `limit` of them): a batch may name them in `CreateFromKept`.
    pub fn kept(&self, limit: usize) -> Result<Vec<Hash>, ApplyError> {
        self.rep.kept(limit)
    }

    /// The streamed file a failed batch was receiving, of which the
    /// replica kept the start: a batch may continue it with `ResumeFile`.
    pub fn partial(&self) -> Result<Option<Partial>, ApplyError> {
        stage::read_partial(&self.rep.kept).map_err(|e| ApplyError::State {
            path: self.rep.state.join("kept"),
            what: "reading the kept partial file",
            source: e.into(),
        })
    }

    /// Applies one batch (see the module docs).
    pub fn apply_from(
        &mut self,
        reader: &mut impl OpSource,
        options: &ApplyOptions,
    ) -> Result<ApplyReport, ApplyError> {
        let rep = &self.rep;
        let mut report = ApplyReport {
            recovered: std::mem::take(&mut self.recovered),
            ..ApplyReport::default()
        };
        // A commit that failed earlier in this session (a step the
        // filesystem refused) is finished first, as at open: its staged
        // entries are still needed, and it may be the batch that follows.
        if rep.recover(&mut ApplyReport::default())? {
            report.recovered = true;
        }
        let applied = read_applied_in(&rep.state)?;
        let h = reader.header().clone();
        report.from_seq = h.from_seq;
        report.to_seq = h.to_seq;
        let mut replica_id = h.replica_id;
        if let Some(a) = applied {
            if a.source_id != h.source_id {
                return Err(ApplyError::WrongSource {
                    batch: hex(&h.source_id),
                    replica: hex(&a.source_id),
                });
            }
            if a.replica_id != ANY_REPLICA {
                if h.replica_id != ANY_REPLICA && h.replica_id != a.replica_id {
                    return Err(ApplyError::WrongReplica {
                        batch: hex(&h.replica_id),
                        replica: hex(&a.replica_id),
                    });
                }
                replica_id = a.replica_id;
            }
            if h.to_seq <= a.seq {
                report.skipped = true;
                return Ok(report);
            }
        }
        let applied_seq = applied.map_or(0, |a| a.seq);
        if h.from_seq > applied_seq {
            return Err(ApplyError::Gap {
                applied: applied_seq,
                from_seq: h.from_seq,
            });
        }
        if h.from_seq < applied_seq {
            return Err(ApplyError::Overlap {
                applied: applied_seq,
                from_seq: h.from_seq,
                to_seq: h.to_seq,
            });
        }

        let mut crash = Crash {
            n: 0,
            at: options.crash_after_step,
        };
        let staging_started = Instant::now();
        let staged =
            Stager::new(&rep.root, &rep.staging, &rep.kept, &rep.trees, options).run(reader);
        let Staged {
            entries,
            count,
            trees,
            replica_bytes_read,
            to_sync,
            warnings,
        } = match staged {
            Ok(s) => s,
            Err(e) => {
                // Best effort: the next apply empties staging anyway.
                let _ = rep.clean_staging();
                return Err(e);
            }
        };
        report.staging_us = micros(staging_started);
        let sync_started = Instant::now();
        to_sync
            .sync(&rep.staging)
            .map_err(rep.err(rep.state.join("staging"), "syncing the staged files"))?;
        rep.sync_staging_dirs()?;
        report.sync_us = micros(sync_started);
        report.ops = reader.stats().ops;
        report.content_bytes = reader.stats().content_bytes;
        report.staged = count;
        report.replica_bytes_read = replica_bytes_read;
        report.warnings = warnings;
        crash.point()?;

        let log = CommitLog {
            source_id: h.source_id,
            replica_id,
            from_seq: h.from_seq,
            to_seq: h.to_seq,
            entries,
        };
        rep.remove_progress()?;
        File::create(rep.marker(0)).map_err(rep.err(rep.marker(0), "creating"))?;
        rep.write_log(&log)?;
        crash.point()?;
        rep.commit(&log, &mut report, &mut crash, &trees)?;
        Ok(report)
    }
}

/// Applies a batch file: validates the whole file first (every frame,
/// every compressed chunk, the trailer), then applies it.
pub fn apply_file(
    replica_root: &Path,
    batch: &Path,
    options: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let open = || {
        File::open(batch)
            .map(BufReader::new)
            .map_err(|source| ApplyError::State {
                path: batch.to_path_buf(),
                what: "opening the batch",
                source,
            })
    };
    validate(open()?)?;
    apply(replica_root, open()?, options)
}

/// Finishes a commit interrupted by a crash, if there is one; returns
/// whether there was. [`apply`] does this first on its own.
pub fn recover(replica_root: &Path) -> Result<bool, ApplyError> {
    Replica::open(replica_root)?.recover(&mut ApplyReport::default())
}
