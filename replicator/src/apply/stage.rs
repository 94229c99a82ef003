//! Staging: reads the batch once, checks every operation against a model
//! of the replica as it will be at that point of the batch, builds every
//! new entry in the staging directory, and returns the steps of the
//! metadata phase. Nothing visible changes here.
//!
//! The model is an overlay on the replica as found on disk: a map from the
//! paths the batch has touched so far to what they hold (an entry of the
//! replica as it was at the start, a staged entry, or nothing). A path not
//! in the map is looked up through its longest mapped prefix, so renaming a
//! directory maps everything below it without listing it. Checking the
//! whole batch against the model first is what lets the metadata phase
//! treat any mismatch as "already done".
//!
//! Content is checked through content trees (`crate::tree`): every staged
//! file's tree is built as it is written, and an in-place change to a
//! replica file updates the file's tree from the leaves it touches. The
//! tree a replica file starts from is its tree cache entry when valid (see
//! `tree_cache`), else one built by reading the file once; later changes in
//! the batch start from the tree the earlier ones left. The trees of the
//! files the batch sets are returned for the cache.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, fchmod, fchmodat, fstatat, mkdirat, mknodat,
};
use nix::unistd::symlinkat;

use super::commit::{
    Entry, Meta, STAGING_BUCKET, Step, copy_meta, set_meta, staged_bucket, staged_name,
};
use super::direct::DirectWriter;
use super::durable::PendingSync;
use super::fsops::{Kind, Root, describe};
use super::new_files::{Hashed, Job, WRITTEN_IN_LINE, Writer, finish_content, write_new_file};
use super::tree_cache::{Recorded, TreeCache};
use super::{ApplyError, ApplyOptions};
use crate::batch::limits::delta_output_limit;
use crate::batch::{Content, Hash, NodeKind, Op, OpSource, RelPath, Timestamp, WriteRange};
use crate::tree::{ContentTree, LEAF, TreeBuilder, leaves_of};

/// What a path holds at a point of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    /// An entry of the replica as found at the start, at `start`.
    Replica {
        start: RelPath,
        ino: u64,
        kind: Kind,
    },
    /// An entry made in staging.
    Staged { id: u32, ino: u64, kind: Kind },
    /// Nothing (removed or moved away).
    Gone,
}

impl Node {
    fn kind(&self) -> Option<Kind> {
        match self {
            Node::Replica { kind, .. } | Node::Staged { kind, .. } => Some(*kind),
            Node::Gone => None,
        }
    }

    fn ino(&self) -> u64 {
        match self {
            Node::Replica { ino, .. } | Node::Staged { ino, .. } => *ino,
            Node::Gone => 0,
        }
    }
}

/// An in-place change to a file.
#[derive(Debug, Clone)]
enum InPlace {
    Write(Vec<WriteRange>),
    Truncate(u64),
}

impl InPlace {
    /// The size after the change, from `size`.
    fn size_after(&self, size: u64) -> u64 {
        match self {
            InPlace::Write(ranges) => ranges
                .last()
                .map_or(size, |r| size.max(r.offset + r.data.len() as u64)),
            InPlace::Truncate(s) => *s,
        }
    }

    /// The leaves of the new content (of `size` bytes) the change writes;
    /// a change of size is the tree's own business.
    fn leaves(&self, size: u64) -> BTreeSet<u64> {
        match self {
            InPlace::Write(ranges) => ranges
                .iter()
                .flat_map(|r| leaves_of(r.offset, r.data.len() as u64, size))
                .collect(),
            InPlace::Truncate(_) => BTreeSet::new(),
        }
    }
}

/// The in-place changes to a replica file, pending until the commit.
#[derive(Default)]
struct Pending {
    changes: Vec<InPlace>,
    /// The tree of the content the changes leave, once known: truncations
    /// of a file without a valid tree cache entry leave it unknown rather
    /// than read the file.
    tree: Option<ContentTree>,
}

impl Pending {
    /// The size the changes leave a file of `disk` bytes.
    fn size(&self, disk: u64) -> u64 {
        self.changes.iter().fold(disk, |s, c| c.size_after(s))
    }
}

/// What staging produced.
pub struct Staged {
    /// The steps of the metadata phase.
    pub entries: Vec<Entry>,
    /// Entries built in staging.
    pub count: u64,
    /// The files larger than a leaf whose content the batch sets, where
    /// it leaves them, with their trees (for the tree cache).
    pub trees: Vec<Recorded>,
    /// Bytes of replica files read to check or apply content changes.
    pub replica_bytes_read: u64,
    /// The staged files, to be made durable before the commit log.
    pub to_sync: PendingSync,
    /// Metadata of staged entries that could not be set.
    pub warnings: Vec<String>,
}

/// The times a batch gives a staged non-directory, and its kind.
#[derive(Clone, Copy)]
struct StagedTimes(Kind, Timestamp, Timestamp);

/// The streamed file being received (`BeginFile` .. `EndFile`).
struct Streamed {
    file: File,
    content: Hashed,
    path: RelPath,
    id: u32,
    size: u64,
    mode: u32,
    index: u64,
    /// Started from a kept partial file (`ResumeFile`).
    resumed: bool,
}

/// A streamed file a batch that failed was receiving: its first `have`
/// bytes are in `kept/partial`, described by `kept/partial.meta`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Partial {
    pub path: RelPath,
    pub size: u64,
    pub have: u64,
}

/// Names of the kept partial file and its description in `kept/`.
pub(super) const PARTIAL: &str = "partial";
pub(super) const PARTIAL_META: &str = "partial.meta";

pub struct Stager<'a> {
    root: &'a Root,
    staging: &'a OwnedFd,
    /// `kept/`: content of complete staged files kept from batches that
    /// did not finish, by hash (see `keep_complete`).
    kept: &'a OwnedFd,
    trees: &'a TreeCache,
    overlay: BTreeMap<RelPath, Node>,
    /// Pending in-place changes per replica inode.
    pending: HashMap<u64, Pending>,
    /// The tree of every staged regular file, by staged id.
    staged_trees: HashMap<u32, ContentTree>,
    /// Replica inodes whose content the batch sets (in place, or by a
    /// copy), with the path that held them when the batch began.
    content_set: HashMap<u64, RelPath>,
    replica_bytes_read: u64,
    entries: Vec<Entry>,
    /// Replica inodes whose new content (a delta's result, for a file with
    /// several links) is in a staged file that the commit copies into
    /// them: later content changes in the batch go to that staged file.
    copied: HashMap<u64, u32>,
    /// Replica inodes the batch links to (which then have several links).
    linked: HashSet<u64>,
    next_id: u32,
    streamed: Option<Streamed>,
    /// Writes the streamed file's data with `O_DIRECT` (made at the first
    /// streamed file; inactive when the filesystem refuses it).
    direct: Option<DirectWriter>,
    /// The operation being staged (frame number, name, path).
    index: u64,
    op: &'static str,
    path: RelPath,
    staged: u64,
    /// Staged files written and not yet durable.
    to_sync: PendingSync,
    /// Times of staged non-directories not set yet, by staged id: set in
    /// the order the entries were made (mostly the order of their inodes,
    /// whose blocks the filesystem then journals once each: a seed's
    /// 100,000 files took half the time of hash order), as soon as nothing
    /// writes to the first of them any more (`set_times_of_written`), the
    /// rest at the end of staging.
    staged_times: BTreeMap<u32, StagedTimes>,
    /// Times set before the end of staging, by staged id: a later write to
    /// the file moves them, and puts them back in `staged_times`.
    times_set: HashMap<u32, StagedTimes>,
    warnings: Vec<String>,
    /// Zeros hashed so far for holes and growth, and the most the batch
    /// may make it hash (`ApplyOptions::max_zeros`).
    zeros: u64,
    max_zeros: u64,
    /// What the batch's operations hold until the commit, counted as
    /// `OP_HELD` per operation plus its paths' bytes, and the bound
    /// (`ApplyOptions::max_held`).
    held: u64,
    max_held: u64,
    /// Staged entries whose install takes a replica file's metadata
    /// (which would undo metadata set on them during staging).
    takes_meta_at_commit: HashSet<u32>,
    /// Owners of staged files as made (a chown to the same is skipped).
    staged_owners: HashMap<u32, (u32, u32)>,
    /// New files made so far by `CreateFile`, and the thread that writes
    /// their content once they are many (`new_files`).
    created: u64,
    writer: Option<Writer>,
    /// Staged entries made inside a staged directory, by their location
    /// below `staging/` (the others are in buckets, named by number).
    nested: HashMap<u32, CString>,
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` back
/// to disk, without waiting. Only a hint: failures are ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// How far in-place changes may grow a file: a replica file in one batch,
/// a staged file in one change.
const MAX_GROWTH: u64 = 16 << 30;

/// What one operation is counted to hold until the commit besides its
/// paths (its model entry and commit log step, measured at about 160
/// bytes).
const OP_HELD: u64 = 256;

/// The largest base a delta is applied to (it is read into memory). A
/// sender makes deltas only against files up to 1 GiB.
const MAX_DELTA_BASE: u64 = 1 << 30;

fn prefix(p: &RelPath, n: usize) -> RelPath {
    RelPath::from_components(p.components().take(n)).expect("a prefix of a valid path is valid")
}

/// `p` with its prefix `from` replaced by `to`.
fn rebase(p: &RelPath, from: &RelPath, to: &RelPath) -> Option<RelPath> {
    let mut out = to.clone();
    for c in p.components().skip(from.components().len()) {
        out.push(c.to_vec()).ok()?;
    }
    Some(out)
}

fn starts_with(p: &RelPath, q: &RelPath) -> bool {
    p.components().len() >= q.components().len()
        && p.components().zip(q.components()).all(|(a, b)| a == b)
}

impl<'a> Stager<'a> {
    pub fn new(
        root: &'a Root,
        staging: &'a OwnedFd,
        kept: &'a OwnedFd,
        trees: &'a TreeCache,
        options: &ApplyOptions,
    ) -> Stager<'a> {
        Stager {
            zeros: 0,
            max_zeros: options.max_zeros,
            held: 0,
            max_held: options.max_held,
            root,
            staging,
            kept,
            trees,
            overlay: BTreeMap::new(),
            pending: HashMap::new(),
            staged_trees: HashMap::new(),
            to_sync: PendingSync::default(),
            staged_times: BTreeMap::new(),
            times_set: HashMap::new(),
            nested: HashMap::new(),
            staged_owners: HashMap::new(),
            created: 0,
            writer: None,
            takes_meta_at_commit: HashSet::new(),
            warnings: Vec::new(),
            content_set: HashMap::new(),
            replica_bytes_read: 0,
            entries: Vec::new(),
            copied: HashMap::new(),
            linked: HashSet::new(),
            next_id: 0,
            streamed: None,
            direct: None,
            index: 0,
            op: "",
            path: RelPath::root(),
            staged: 0,
        }
    }

    fn err(&self, reason: impl Into<String>) -> ApplyError {
        ApplyError::Op {
            index: self.index,
            op: self.op,
            path: self.path.to_string(),
            reason: reason.into(),
        }
    }

    fn errno(&self, what: &str, e: Errno) -> ApplyError {
        self.err(format!("{what}: {}", describe(e)))
    }

    /// Opens staged entry `id`. What is done through the descriptor may
    /// move the entry's times (a read its atime, a write its mtime): any
    /// the batch already set on it are set again at the end of staging.
    fn open_staged(&mut self, id: u32, access: OFlag) -> Result<File, ApplyError> {
        if let Some(times) = self.times_set.remove(&id) {
            self.staged_times.insert(id, times);
        }
        let name = self.location(id);
        openat(
            self.staging,
            name.as_c_str(),
            access | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map(File::from)
        .map_err(|e| self.errno("opening the staged file", e))
    }

    fn io(&self, what: &str, e: io::Error) -> ApplyError {
        self.err(format!("{what}: {e}"))
    }

    fn push(&mut self, step: Step) {
        self.entries.push(Entry {
            index: self.index,
            op: self.op.to_string(),
            step,
        });
    }

    /// Reads every operation and stages it; returns the steps once the
    /// batch's trailer has been verified. A batch that fails leaves the
    /// content of its complete files in `kept/` (`keep_complete`).
    pub fn run(mut self, reader: &mut impl OpSource) -> Result<Staged, ApplyError> {
        if let Err(e) = self.stage_all(reader).and_then(|()| self.written()) {
            let e = self.earliest_failure(e);
            self.keep_complete();
            return Err(e);
        }
        for (id, StagedTimes(kind, a, m)) in std::mem::take(&mut self.staged_times) {
            self.set_staged_meta(id, kind, &Meta::Utimes(a, m));
        }
        Ok(Staged {
            trees: self.final_trees()?,
            warnings: self.warnings,
            entries: self.entries,
            count: self.staged,
            replica_bytes_read: self.replica_bytes_read,
            to_sync: self.to_sync,
        })
    }

    fn stage_all(&mut self, reader: &mut impl OpSource) -> Result<(), ApplyError> {
        while let Some(op) = reader.next_op()? {
            self.index = reader.stats().ops;
            self.op = op.name();
            if let Some(p) = op.paths().first() {
                self.path = (*p).clone();
            }
            let held = op.paths().iter().map(|p| p.byte_len() as u64).sum::<u64>() + OP_HELD;
            self.held = self.held.saturating_add(held);
            if self.held > self.max_held {
                return Err(self.err(format!(
                    "the batch holds more than {} bytes of operations until its commit; \
                     it is too large to apply at once",
                    self.max_held
                )));
            }
            self.stage(op)?;
        }
        Ok(())
    }

    /// `e`, or the failure of a file handed to the writer before `e`
    /// happened (errors are reported in batch order, as when every file is
    /// written in line), once every handed file is collected.
    fn earliest_failure(&mut self, e: ApplyError) -> ApplyError {
        let Err(handed) = self.written() else {
            return e;
        };
        match (&e, &handed) {
            // `e` is itself the writer's first failure.
            (ApplyError::Op { index: a, .. }, ApplyError::Op { index: b, .. }) if a <= b => e,
            _ => handed,
        }
    }

    /// Moves every complete staged file of a batch that failed (cut off,
    /// refused) to `kept/<hash of its content>` and makes them durable, so
    /// that a sender told of them on its next connection need not send
    /// them again (`CreateFromKept`). Best effort: what cannot be kept is
    /// sent again. A staged file's tree is its current content (in-place
    /// changes in the batch update it), and a failure comes between
    /// operations, never inside one: the name is exact.
    fn keep_complete(&mut self) {
        let partial = self.keep_partial();
        let mut kept = usize::from(partial);
        for (id, tree) in &self.staged_trees {
            if tree.size() == 0 {
                continue;
            }
            let to = CString::new(tree.root().to_string()).expect("hex has no NUL");
            let from = self.location(*id);
            if nix::fcntl::renameat(self.staging, from.as_c_str(), self.kept, to.as_c_str()).is_ok()
            {
                kept += 1;
            }
        }
        if kept == 0 {
            return;
        }
        let synced = std::mem::take(&mut self.to_sync)
            .sync(self.staging)
            .and_then(|()| nix::unistd::fsync(self.kept).map_err(io::Error::from));
        if let Err(e) = synced {
            tracing::warn!("syncing the content kept from a failed batch: {e}");
        }
        tracing::info!(files = kept, "kept the complete files of a failed batch");
    }

    /// Keeps the first bytes of the streamed file a failed batch was
    /// receiving, if it was receiving one in order: `kept/partial` and its
    /// description `kept/partial.meta`, both made durable (the description
    /// last). Whether it kept one.
    fn keep_partial(&mut self) -> bool {
        let Some(s) = self.streamed.take() else {
            return false;
        };
        let have = s.content.end();
        if have == 0 || !s.content.in_order() || self.finish_direct(&s.file).is_err() {
            return false;
        }
        let partial = Partial {
            path: s.path.clone(),
            size: s.size,
            have,
        };
        let name = CString::new(PARTIAL).expect("no NUL");
        let meta = CString::new(PARTIAL_META).expect("no NUL");
        let kept = s
            .file
            .sync_data()
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(|()| unlinkat_missing_ok(self.kept, &meta))
            .and_then(|()| {
                nix::fcntl::renameat(
                    self.staging,
                    self.location(s.id).as_c_str(),
                    self.kept,
                    name.as_c_str(),
                )
            })
            .and_then(|()| {
                write_durably(
                    self.kept,
                    &meta,
                    &postcard::to_stdvec(&partial).expect("serializes"),
                )
            });
        match kept {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("keeping the partial file {}: {e}", s.path);
                false
            }
        }
    }

    /// Writes what the streamed file's direct writer still holds.
    fn finish_direct(&mut self, file: &File) -> Result<(), ApplyError> {
        match self.direct.as_mut().filter(|d| d.active()) {
            Some(d) => d
                .finish(file)
                .map_err(|e| self.io("writing the staged file", e)),
            None => Ok(()),
        }
    }

    /// Starts the streamed file at `path` from the partial file kept from
    /// a transfer cut off inside it: its first `from` bytes are kept, and
    /// hashed again here (they are on this disk; the `EndFile` hash covers
    /// them).
    fn resume_file(
        &mut self,
        path: RelPath,
        mode: u32,
        size: u64,
        from: u64,
    ) -> Result<(), ApplyError> {
        self.check_new(&path, false)?;
        let meta =
            read_partial(self.kept).map_err(|e| self.errno("reading the kept partial file", e))?;
        match meta {
            Some(m) if m.path == path && m.size == size && from <= m.have => {}
            _ => {
                return Err(self.err(format!(
                    "the replica kept no partial file {path} of {size} bytes with {from} bytes"
                )));
            }
        }
        let (id, name) = self.new_entry(&path)?;
        let kept = CString::new(PARTIAL).expect("no NUL");
        nix::fcntl::renameat(self.kept, kept.as_c_str(), self.staging, name.as_c_str())
            .map_err(|e| self.errno("taking the kept partial file", e))?;
        let _ = unlinkat_missing_ok(self.kept, &CString::new(PARTIAL_META).expect("no NUL"));
        let file = self.open_staged(id, OFlag::O_RDWR)?;
        self.forget_metadata(&file)?;
        file.set_len(from)
            .map_err(|e| self.io("sizing the kept partial file", e))?;
        let mut content = Hashed::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < from {
            let n = (from - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| self.io("reading the kept partial file", e))?;
            content.piece(at, &buf[..n]);
            at += n as u64;
        }
        self.streamed = Some(Streamed {
            file,
            content,
            path,
            id,
            size,
            mode,
            index: self.index,
            resumed: true,
        });
        Ok(())
    }

    /// The current tree of the replica inode `ino`, if the batch sets its
    /// content.
    fn replica_tree(&self, ino: u64) -> Option<&ContentTree> {
        match self.copied.get(&ino) {
            Some(id) => self.staged_trees.get(id),
            None => self.pending.get(&ino).and_then(|p| p.tree.as_ref()),
        }
    }

    /// The files the batch sets the content of, where the model has them
    /// at the end: at a path the overlay maps to them (made or moved by
    /// the batch), or at their own start path if the model still has
    /// them there. A replica file left below a directory the batch moved
    /// is neither, and gets no tree cache entry.
    fn final_trees(&self) -> Result<Vec<Recorded>, ApplyError> {
        let mut out: HashMap<u64, (RelPath, &ContentTree)> = HashMap::new();
        for (path, node) in &self.overlay {
            let (ino, tree) = match node {
                Node::Staged {
                    id,
                    ino,
                    kind: Kind::File,
                } => (*ino, self.staged_trees.get(id)),
                Node::Replica {
                    ino,
                    kind: Kind::File,
                    ..
                } => (*ino, self.replica_tree(*ino)),
                _ => continue,
            };
            if let Some(tree) = tree {
                out.entry(ino).or_insert((path.clone(), tree));
            }
        }
        for (ino, start) in &self.content_set {
            if !out.contains_key(ino)
                && self.lookup(start)?.is_some_and(|n| n.ino() == *ino)
                && let Some(tree) = self.replica_tree(*ino)
            {
                out.insert(*ino, (start.clone(), tree));
            }
        }
        Ok(out
            .into_iter()
            .filter(|(_, (_, tree))| TreeCache::keeps(tree.size()))
            .map(|(ino, (path, tree))| Recorded {
                path,
                ino,
                tree: tree.clone(),
            })
            .collect())
    }

    /// What `p` holds now, looked up through its longest mapped prefix.
    fn lookup(&self, p: &RelPath) -> Result<Option<Node>, ApplyError> {
        let n = p.components().len();
        for k in (1..=n).rev() {
            let q = prefix(p, k);
            let Some(node) = self.overlay.get(&q) else {
                continue;
            };
            if k == n {
                return Ok((*node != Node::Gone).then(|| node.clone()));
            }
            return match node {
                Node::Replica {
                    start,
                    kind: Kind::Dir,
                    ..
                } => match rebase(p, &q, start) {
                    Some(sp) => self.disk(&sp),
                    None => Ok(None),
                },
                // Below a new directory only what the overlay holds exists;
                // below anything else nothing does.
                _ => Ok(None),
            };
        }
        self.disk(p)
    }

    fn disk(&self, p: &RelPath) -> Result<Option<Node>, ApplyError> {
        match self.root.stat(p) {
            Ok(Some(st)) => Ok(Some(Node::Replica {
                start: p.clone(),
                ino: st.st_ino,
                kind: Kind::of(&st),
            })),
            Ok(None) | Err(Errno::ENOTDIR) => Ok(None),
            Err(e) => Err(self.errno(&format!("looking up {p}"), e)),
        }
    }

    /// The parent of `p` must be a directory now.
    fn need_parent(&self, p: &RelPath) -> Result<(), ApplyError> {
        let Some(parent) = p.parent() else {
            return Ok(());
        };
        if parent.is_root() {
            return Ok(());
        }
        match self.lookup(&parent)? {
            Some(n) if n.kind() == Some(Kind::Dir) => Ok(()),
            Some(n) if n.kind() == Some(Kind::Symlink) => Err(self.err(format!(
                "{parent} is a symlink (paths are never resolved through symlinks)"
            ))),
            Some(_) => Err(self.err(format!("{parent} is not a directory"))),
            None => Err(self.err(format!("parent directory {parent} does not exist"))),
        }
    }

    /// `p` must exist now.
    fn need(&self, p: &RelPath) -> Result<Node, ApplyError> {
        self.lookup(p)?
            .ok_or_else(|| self.err(format!("{p} does not exist")))
    }

    fn need_file(&self, p: &RelPath) -> Result<Node, ApplyError> {
        let n = self.need(p)?;
        if n.kind() != Some(Kind::File) {
            return Err(self.err(format!("{p} is not a regular file")));
        }
        Ok(n)
    }

    /// A new entry may go at `p` if its parent is a directory and `p` is
    /// free, or holds a non-directory that a non-directory replaces.
    fn check_new(&self, p: &RelPath, dir: bool) -> Result<(), ApplyError> {
        self.need_parent(p)?;
        match self.lookup(p)? {
            None => Ok(()),
            Some(n) if !dir && n.kind() != Some(Kind::Dir) => Ok(()),
            Some(_) => Err(self.err(format!("{p} already exists"))),
        }
    }

    /// Removes `p` and everything mapped below it from the overlay,
    /// returning the entries below it (not `p` itself).
    fn take_subtree(&mut self, p: &RelPath) -> Vec<(RelPath, Node)> {
        let keys: Vec<RelPath> = self
            .overlay
            .range(p.clone()..)
            .take_while(|(k, _)| starts_with(k, p))
            .map(|(k, _)| k.clone())
            .collect();
        let mut below = Vec::new();
        for k in keys {
            let v = self.overlay.remove(&k).expect("listed");
            if k != *p {
                below.push((k, v));
            }
        }
        below
    }

    /// A new staged entry's number and name (making its bucket first).
    fn new_id(&mut self) -> Result<(u32, CString), ApplyError> {
        let id = self.next_id;
        if id.is_multiple_of(STAGING_BUCKET) {
            match mkdirat(
                self.staging,
                staged_bucket(id).as_c_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(self.errno("making a staging bucket", e)),
            }
        }
        self.next_id += 1;
        self.staged += 1;
        Ok((id, staged_name(id)))
    }

    /// A new staged entry for `path`: made inside its parent when the
    /// parent is a directory made by this batch (still in staging), so that
    /// installing the parent installs it too, else in a bucket.
    fn new_entry(&mut self, path: &RelPath) -> Result<(u32, CString), ApplyError> {
        let Some(location) = self.nested_location(path)? else {
            return self.new_id();
        };
        let id = self.next_id;
        self.next_id += 1;
        self.staged += 1;
        self.nested.insert(id, location.clone());
        Ok((id, location))
    }

    /// Where `path` goes inside its staged parent directory, if it has one
    /// and no earlier operation of the batch named `path`. The entry is then
    /// in place from the parent's install on, which comes before every step
    /// of the operations between the two: none of them may touch that name
    /// (a file renamed there and then unlinked would otherwise replace the
    /// new entry, then take it away).
    fn nested_location(&self, path: &RelPath) -> Result<Option<CString>, ApplyError> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(None);
        };
        if self.overlay.contains_key(path) {
            return Ok(None);
        }
        let Some(Node::Staged {
            id,
            kind: Kind::Dir,
            ..
        }) = self.lookup(&parent)?
        else {
            return Ok(None);
        };
        let mut location = self.location(id).into_bytes();
        location.push(b'/');
        location.extend_from_slice(name);
        let location = CString::new(location).map_err(|_| self.err("NUL in a name"))?;
        Ok(Some(location))
    }

    /// Where staged entry `id` is, relative to `staging/`.
    fn location(&self, id: u32) -> CString {
        self.nested
            .get(&id)
            .cloned()
            .unwrap_or_else(|| staged_name(id))
    }

    fn staged_stat(&self, name: &CString) -> Result<FileStat, ApplyError> {
        fstatat(self.staging, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| self.errno("staging", e))
    }

    /// Records a staged entry at `p` and the step that installs it.
    /// Gives a new staged entry its final mode (made private first, so no
    /// one can open it meanwhile) and records it as the entry at `p`.
    fn finish_staged(
        &mut self,
        p: &RelPath,
        id: u32,
        name: &CString,
        mode: Option<u32>,
    ) -> Result<(), ApplyError> {
        if let Some(mode) = mode {
            fchmodat(
                self.staging,
                name.as_c_str(),
                Mode::from_bits_retain(mode),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| self.errno("chmod in staging", e))?;
        }
        let st = self.staged_stat(name)?;
        self.install(p, id, &st);
        Ok(())
    }

    fn install(&mut self, p: &RelPath, id: u32, st: &FileStat) {
        self.install_replacing(p, id, st, None);
    }

    /// As `install`; `replaces` is the replica file whose metadata the
    /// staged file takes at the commit.
    fn install_replacing(&mut self, p: &RelPath, id: u32, st: &FileStat, replaces: Option<u64>) {
        let kind = Kind::of(st);
        if replaces.is_some() {
            self.takes_meta_at_commit.insert(id);
        }
        self.take_subtree(p);
        self.overlay.insert(
            p.clone(),
            Node::Staged {
                id,
                ino: st.st_ino,
                kind,
            },
        );
        if self.nested.contains_key(&id) {
            // Already inside its parent: installed with it.
            return;
        }
        self.push(Step::Install {
            id,
            path: p.clone(),
            ino: st.st_ino,
            replaces,
        });
    }

    fn create_staged_file(&mut self) -> Result<(u32, File), ApplyError> {
        let (id, name) = self.new_id()?;
        self.create_file_at(id, name)
    }

    /// A staged file for the new file at `path` (see `new_entry`).
    fn create_staged_file_for(&mut self, path: &RelPath) -> Result<(u32, File), ApplyError> {
        let (id, name) = self.new_entry(path)?;
        self.create_file_at(id, name)
    }

    fn create_file_at(&mut self, id: u32, name: CString) -> Result<(u32, File), ApplyError> {
        let fd = openat(
            self.staging,
            name.as_c_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.errno("creating the staged file", e))?;
        Ok((id, File::from(fd)))
    }

    /// Sizes the staged file whose data has been written, checks its
    /// content (whose tree is `tree`, hashed as it was written, or `None`
    /// to read it back) against `result`, and installs it at `p`.
    #[allow(clippy::too_many_arguments)]
    fn finish_file(
        &mut self,
        p: &RelPath,
        id: u32,
        file: File,
        size: u64,
        mode: u32,
        result: Hash,
        content: Hashed,
    ) -> Result<(), ApplyError> {
        let tree = finish_content(&file, size, result, content).map_err(|r| self.err(r))?;
        self.finish_new_file(p, id, &file, mode, tree)
    }

    /// Gives a new staged file (whose content has been checked) its mode,
    /// notes it to be synced, and installs it at `p`.
    fn finish_new_file(
        &mut self,
        p: &RelPath,
        id: u32,
        file: &File,
        mode: u32,
        tree: ContentTree,
    ) -> Result<(), ApplyError> {
        fchmod(file.as_fd(), Mode::from_bits_retain(mode))
            .map_err(|e| self.errno("setting the mode", e))?;
        self.install_new_file(p, id, file)?;
        self.staged_trees.insert(id, tree);
        Ok(())
    }

    /// Notes a new staged file to be synced and installs it at `p`.
    fn install_new_file(&mut self, p: &RelPath, id: u32, file: &File) -> Result<(), ApplyError> {
        self.to_sync
            .add(file)
            .map_err(|e| self.io("keeping the file to sync", e))?;
        let st = nix::sys::stat::fstat(file.as_fd()).map_err(|e| self.errno("fstat", e))?;
        self.install(p, id, &st);
        self.staged_owners.insert(id, (st.st_uid, st.st_gid));
        Ok(())
    }

    /// Stages the new file `path` of `content`: written here, or, once the
    /// batch has made many, made and installed here and handed to the
    /// writer for the rest.
    fn create_file(
        &mut self,
        path: RelPath,
        mode: u32,
        content: Content,
        result: Hash,
    ) -> Result<(), ApplyError> {
        self.check_new(&path, false)?;
        self.charge_zeros(content.size().saturating_sub(content.data_len()))?;
        let (id, file) = self.create_staged_file_for(&path)?;
        self.created += 1;
        if self.created == WRITTEN_IN_LINE + 1 {
            // Once: without the thread, files are written in line.
            self.writer = Writer::start();
        }
        if self.writer.is_none() || !Writer::takes(&content) {
            let tree = write_new_file(&file, &content, mode, result).map_err(|r| self.err(r))?;
            self.install_new_file(&path, id, &file)?;
            self.staged_trees.insert(id, tree);
            return Ok(());
        }
        self.install_new_file(&path, id, &file)?;
        let job = Job {
            id,
            file,
            content,
            mode,
            result,
            index: self.index,
            path,
        };
        let writer = self.writer.as_mut().expect("checked above");
        writer.hand(job, &mut self.staged_trees)?;
        self.set_times_of_written();
        Ok(())
    }

    /// After a file was handed to the writer: sets the times waiting for
    /// the first staged entries, in the order they were made, up to the
    /// first one the writer still holds. A seed's times are set while its
    /// content still arrives, not in a loop after it. (A streamed file has
    /// no times to wait for before its `EndFile`: only then is it in the
    /// model, where a `Utimes` can name it.)
    fn set_times_of_written(&mut self) {
        while let Some(first) = self.staged_times.first_entry() {
            let id = *first.key();
            if self.writer.as_ref().is_some_and(|w| w.holds(id)) {
                return;
            }
            let times = first.remove();
            let StagedTimes(kind, a, m) = times;
            self.set_staged_meta(id, kind, &Meta::Utimes(a, m));
            self.times_set.insert(id, times);
        }
    }

    /// Waits for every file handed to the writer, collecting their trees.
    fn written(&mut self) -> Result<(), ApplyError> {
        match self.writer.as_mut() {
            Some(writer) => writer.wait(&mut self.staged_trees),
            None => Ok(()),
        }
    }

    fn stage(&mut self, op: Op) -> Result<(), ApplyError> {
        if matches!(
            op,
            Op::WriteRanges { .. }
                | Op::Truncate { .. }
                | Op::Delta { .. }
                | Op::CreateFromDelta { .. }
        ) {
            // They read a file's content and tree, which may be a file the
            // writer has not written yet.
            self.written()?;
        }
        match op {
            Op::Mkdir { path, mode } => {
                self.check_new(&path, true)?;
                let (id, name) = self.new_entry(&path)?;
                mkdirat(
                    self.staging,
                    name.as_c_str(),
                    Mode::from_bits_truncate(0o700),
                )
                .map_err(|e| self.errno("mkdir in staging", e))?;
                self.finish_staged(&path, id, &name, Some(mode))?;
            }
            Op::Symlink { path, target } => {
                self.check_new(&path, false)?;
                let (id, name) = self.new_entry(&path)?;
                symlinkat(OsStr::from_bytes(&target), self.staging, name.as_c_str())
                    .map_err(|e| self.errno("symlink in staging", e))?;
                self.finish_staged(&path, id, &name, None)?;
            }
            Op::Mknod {
                path,
                kind,
                mode,
                rdev,
            } => {
                self.check_new(&path, false)?;
                let (id, name) = self.new_entry(&path)?;
                let sflag = match kind {
                    NodeKind::Fifo => SFlag::S_IFIFO,
                    NodeKind::Socket => SFlag::S_IFSOCK,
                    NodeKind::Char => SFlag::S_IFCHR,
                    NodeKind::Block => SFlag::S_IFBLK,
                };
                mknodat(
                    self.staging,
                    name.as_c_str(),
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    rdev,
                )
                .map_err(|e| self.errno("mknod in staging", e))?;
                self.finish_staged(&path, id, &name, Some(mode))?;
            }
            Op::CreateFile {
                path,
                mode,
                content,
                result,
            } => self.create_file(path, mode, content, result)?,
            Op::BeginFile { path, mode, size } => {
                self.check_new(&path, false)?;
                let (id, file) = self.create_staged_file_for(&path)?;
                // Where O_DIRECT is refused, ordinary writes do.
                if let Ok(direct) = self.open_staged(id, OFlag::O_WRONLY | OFlag::O_DIRECT) {
                    self.direct
                        .get_or_insert_with(DirectWriter::new)
                        .begin(direct);
                }
                self.streamed = Some(Streamed {
                    file,
                    content: Hashed::default(),
                    path,
                    id,
                    size,
                    mode,
                    index: self.index,
                    resumed: false,
                });
            }
            Op::FileData { offset, data } => {
                let mut s = self.streamed.take().expect("the reader checks the order");
                self.path = s.path.clone();
                self.charge_zeros(offset.saturating_sub(s.content.end()))?;
                let mut direct = self.direct.as_mut().filter(|d| d.active());
                let len = data.len();
                let written = data.for_each_piece(offset, |off, piece| {
                    match &mut direct {
                        Some(d) => d.write_at(&s.file, piece, off)?,
                        None => s.file.write_all_at(piece, off)?,
                    }
                    s.content.piece(off, piece);
                    Ok(())
                });
                if direct.is_none() {
                    // Start writing it back now: the sync before the
                    // commit then has less to wait for.
                    start_writeback(&s.file, offset, len);
                }
                self.streamed = Some(s);
                written.map_err(|e| self.err(format!("writing the staged file: {e}")))?;
            }
            Op::EndFile { result } => {
                let s = self.streamed.take().expect("the reader checks the order");
                self.path = s.path.clone();
                // Errors name the file's BeginFile.
                self.index = s.index;
                self.check_new(&s.path, false)?;
                self.charge_zeros(s.size.saturating_sub(s.content.end()))?;
                self.finish_direct(&s.file)?;
                let resumed = s.resumed;
                let finished =
                    self.finish_file(&s.path, s.id, s.file, s.size, s.mode, result, s.content);
                match finished {
                    // The kept start was not the start of this content
                    // (the file changed since): the sender sends it whole.
                    Err(ApplyError::Op { .. }) if resumed => return Err(self.base_mismatch()),
                    other => other?,
                }
            }
            Op::Link { existing, new } => {
                let n = self.need(&existing)?;
                if n.kind() == Some(Kind::Dir) {
                    return Err(self.err(format!("{existing} is a directory")));
                }
                self.need_parent(&new)?;
                if self.lookup(&new)?.is_some() {
                    return Err(self.err(format!("{new} already exists")));
                }
                if let Node::Replica { ino, .. } = n {
                    self.linked.insert(ino);
                }
                self.push(Step::Link {
                    existing,
                    new: new.clone(),
                    ino: n.ino(),
                });
                self.overlay.insert(new, n);
            }
            Op::Rename { from, to, exchange } => self.rename(from, to, exchange)?,
            Op::Unlink { path } => {
                let n = self.need(&path)?;
                if n.kind() == Some(Kind::Dir) {
                    return Err(self.err(format!("{path} is a directory")));
                }
                self.push(Step::Unlink {
                    path: path.clone(),
                    ino: n.ino(),
                });
                self.overlay.insert(path, Node::Gone);
            }
            Op::Rmdir { path } => {
                let n = self.need(&path)?;
                if n.kind() != Some(Kind::Dir) {
                    return Err(self.err(format!("{path} is not a directory")));
                }
                if !self.is_empty_dir(&path, &n)? {
                    return Err(self.err(format!("{path} is not empty")));
                }
                self.push(Step::Rmdir {
                    path: path.clone(),
                    ino: n.ino(),
                });
                self.take_subtree(&path);
                self.overlay.insert(path, Node::Gone);
            }
            Op::WriteRanges {
                path,
                ranges,
                base,
                result,
            } => {
                let n = self.need_file(&path)?;
                self.in_place(&path, n, InPlace::Write(ranges), Some((base, result)))?;
            }
            Op::Truncate { path, size } => {
                let n = self.need_file(&path)?;
                self.in_place(&path, n, InPlace::Truncate(size), None)?;
            }
            Op::Delta {
                path,
                base,
                delta,
                result,
            } => {
                let n = self.need_file(&path)?;
                self.delta(&path, n, base, &delta, result)?;
            }
            Op::CreateFromDelta {
                path,
                basis,
                base,
                delta,
                mode,
                result,
            } => {
                self.check_new(&path, false)?;
                let n = self.need_file(&basis)?;
                let n = self.redirect(n);
                let (data, _) = self.read_basis(&n)?;
                let (id, file, tree) = self.stage_delta(data, base, &delta, result)?;
                self.finish_new_file(&path, id, &file, mode, tree)?;
            }
            Op::CreateFromKept { path, mode, result } => {
                self.check_new(&path, false)?;
                let (id, name) = self.new_entry(&path)?;
                let kept = CString::new(result.to_string()).expect("hex has no NUL");
                nix::fcntl::renameat(self.kept, kept.as_c_str(), self.staging, name.as_c_str())
                    .map_err(|e| match e {
                        Errno::ENOENT => self.err(format!("the replica kept no content {result}")),
                        e => self.errno("taking kept content", e),
                    })?;
                let file = self.open_staged(id, OFlag::O_RDWR)?;
                self.forget_metadata(&file)?;
                let size = file.metadata().map_err(|e| self.io("fstat", e))?.len();
                // Checked again: the kept file is only a name in the state
                // directory, and reading it is far cheaper than a resend.
                let tree = ContentTree::build(size, |i, buf| file.read_exact_at(buf, i * LEAF))
                    .map_err(|e| self.io("reading the kept content", e))?;
                if tree.root() != result {
                    return Err(self.err("the kept content does not match its hash"));
                }
                self.finish_new_file(&path, id, &file, mode, tree)?;
            }
            Op::ResumeFile {
                path,
                mode,
                size,
                from,
            } => self.resume_file(path, mode, size, from)?,
            Op::Chmod { path, mode } => self.meta(path, Meta::Chmod(mode))?,
            Op::Chown { path, uid, gid } => self.meta(path, Meta::Chown(uid, gid))?,
            Op::Utimes { path, atime, mtime } => self.meta(path, Meta::Utimes(atime, mtime))?,
            Op::SetXattr { path, name, value } => self.meta(path, Meta::SetXattr(name, value))?,
            Op::RemoveXattr { path, name } => self.meta(path, Meta::RemoveXattr(name))?,
        }
        Ok(())
    }

    /// Removes the extended attributes a kept file had from the batch it
    /// was staged for: the batch that takes it sets its own.
    fn forget_metadata(&self, file: &File) -> Result<(), ApplyError> {
        use xattr::FileExt as _;
        let names = file
            .list_xattr()
            .map_err(|e| self.io("listing xattrs", e))?;
        for name in names {
            file.remove_xattr(&name)
                .map_err(|e| self.io("removing an xattr", e))?;
        }
        Ok(())
    }

    fn meta(&mut self, path: RelPath, meta: Meta) -> Result<(), ApplyError> {
        let n = self.need(&path)?;
        let kind = n.kind().expect("exists");
        if let Node::Staged { id, .. } = n
            && !self.takes_meta_at_commit.contains(&id)
        {
            // Not visible yet: set on the staged entry now, and its install
            // carries it, saving a commit step per new file. A file's times
            // wait until nothing writes to it (`set_times_of_written`, or
            // the end of staging), and a directory's for the commit
            // (installs into it move them).
            match meta {
                Meta::Utimes(..) if kind == Kind::Dir => {}
                Meta::Utimes(a, m) => {
                    self.times_set.remove(&id);
                    self.staged_times.insert(id, StagedTimes(kind, a, m));
                    return Ok(());
                }
                // Made by us, it may have that owner already.
                Meta::Chown(uid, gid) => {
                    if self.staged_owners.insert(id, (uid, gid)) != Some((uid, gid)) {
                        self.set_staged_meta_written(id, kind, &Meta::Chown(uid, gid))?;
                    }
                    return Ok(());
                }
                meta => {
                    self.set_staged_meta_written(id, kind, &meta)?;
                    return Ok(());
                }
            }
        }
        self.push(Step::Meta {
            path,
            ino: n.ino(),
            kind,
            meta,
        });
        Ok(())
    }

    /// As `set_staged_meta`, once the writer is done with `id` (it gives
    /// the file its mode, which must come before what the batch sets
    /// later: a chown clears set-ID bits).
    fn set_staged_meta_written(
        &mut self,
        id: u32,
        kind: Kind,
        meta: &Meta,
    ) -> Result<(), ApplyError> {
        if self.writer.as_ref().is_some_and(|w| w.holds(id)) {
            self.written()?;
        }
        self.set_staged_meta(id, kind, meta);
        Ok(())
    }

    /// Sets metadata on staged entry `id`; what the filesystem or our
    /// privileges refuse is a warning, as in the commit.
    fn set_staged_meta(&mut self, id: u32, kind: Kind, meta: &Meta) {
        let name = self.location(id);
        let proc_path = || {
            std::path::PathBuf::from(format!(
                "/proc/self/fd/{}/{}",
                self.staging.as_raw_fd(),
                name.to_string_lossy()
            ))
        };
        if let Err(e) = set_meta(self.staging.as_fd(), &name, proc_path, kind, meta) {
            self.warnings.push(format!(
                "op {} ({} {}): {}",
                self.index,
                self.op,
                self.path,
                describe(e)
            ));
        }
    }

    fn rename(&mut self, from: RelPath, to: RelPath, exchange: bool) -> Result<(), ApplyError> {
        let a = self.need(&from)?;
        self.need_parent(&to)?;
        if from == to {
            return Ok(());
        }
        if starts_with(&to, &from) || (exchange && starts_with(&from, &to)) {
            return Err(self.err(format!("{to} is inside {from}")));
        }
        let b = self.lookup(&to)?;
        if exchange {
            let Some(b) = b else {
                return Err(self.err(format!("{to} does not exist (exchange)")));
            };
            self.push(Step::Rename {
                from: from.clone(),
                to: to.clone(),
                from_ino: a.ino(),
                to_ino: Some(b.ino()),
                exchange: true,
            });
            let below_a = self.take_subtree(&from);
            let below_b = self.take_subtree(&to);
            for (k, v) in below_a {
                let k = rebase(&k, &from, &to).ok_or_else(|| self.err("path too long"))?;
                self.overlay.insert(k, v);
            }
            for (k, v) in below_b {
                let k = rebase(&k, &to, &from).ok_or_else(|| self.err("path too long"))?;
                self.overlay.insert(k, v);
            }
            self.overlay.insert(from, b);
            self.overlay.insert(to, a);
            return Ok(());
        }
        if let Some(b) = &b {
            if b.ino() == a.ino() {
                // Two links to one file: rename(2) does nothing.
                return Ok(());
            }
            match (a.kind() == Some(Kind::Dir), b.kind() == Some(Kind::Dir)) {
                (true, true) => {
                    if !self.is_empty_dir(&to, b)? {
                        return Err(self.err(format!("{to} is a directory that is not empty")));
                    }
                }
                (false, false) => {}
                (true, false) => return Err(self.err(format!("{to} is not a directory"))),
                (false, true) => return Err(self.err(format!("{to} is a directory"))),
            }
        }
        self.push(Step::Rename {
            from: from.clone(),
            to: to.clone(),
            from_ino: a.ino(),
            to_ino: b.as_ref().map(Node::ino),
            exchange: false,
        });
        let below = self.take_subtree(&from);
        self.take_subtree(&to);
        for (k, v) in below {
            let k = rebase(&k, &from, &to).ok_or_else(|| self.err("path too long"))?;
            self.overlay.insert(k, v);
        }
        self.overlay.insert(from, Node::Gone);
        self.overlay.insert(to, a);
        Ok(())
    }

    /// Whether the directory `p` (holding `n`) has no entries now.
    fn is_empty_dir(&self, p: &RelPath, n: &Node) -> Result<bool, ApplyError> {
        let mapped = self
            .overlay
            .range(p.clone()..)
            .skip_while(|(k, _)| *k == p)
            .take_while(|(k, _)| starts_with(k, p))
            .any(|(k, v)| k.components().len() == p.components().len() + 1 && *v != Node::Gone);
        if mapped {
            return Ok(false);
        }
        let Node::Replica { start, .. } = n else {
            return Ok(true);
        };
        for name in self.list_dir(start)? {
            let child = p.join(name).map_err(|e| self.err(e.to_string()))?;
            if self.lookup(&child)?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The names in the replica directory `start`, as found on disk.
    fn list_dir(&self, start: &RelPath) -> Result<Vec<Vec<u8>>, ApplyError> {
        let dir = self
            .root
            .open_dir(start)
            .map_err(|e| self.errno(&format!("opening {start}"), e))?;
        let fd = openat(
            &dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.errno(&format!("reading {start}"), e))?;
        let mut d = nix::dir::Dir::from_fd(fd).map_err(|e| self.errno("readdir", e))?;
        let mut names = Vec::new();
        for e in d.iter() {
            let e = e.map_err(|e| self.errno("readdir", e))?;
            let name = e.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        Ok(names)
    }

    /// Opens the replica file behind a `Replica` node for reading; returns
    /// it with its stat.
    fn open_replica(&self, start: &RelPath, ino: u64) -> Result<(File, FileStat), ApplyError> {
        let f = self
            .root
            .parent(start)
            .and_then(|p| p.open_file(false))
            .map_err(|e| self.errno(&format!("opening {start}"), e))?;
        let st = nix::sys::stat::fstat(f.as_fd()).map_err(|e| self.errno("fstat", e))?;
        if st.st_ino != ino {
            return Err(self.err(format!("{start} changed while the batch was staged")));
        }
        Ok((f, st))
    }

    fn in_place(
        &mut self,
        path: &RelPath,
        n: Node,
        change: InPlace,
        hashes: Option<(Hash, Hash)>,
    ) -> Result<(), ApplyError> {
        match self.redirect(n) {
            Node::Replica { start, ino, .. } => {
                let step = match &change {
                    InPlace::Write(ranges) => Step::Write {
                        path: path.clone(),
                        ino,
                        ranges: ranges.clone(),
                    },
                    InPlace::Truncate(size) => Step::Truncate {
                        path: path.clone(),
                        ino,
                        size: *size,
                    },
                };
                self.in_place_replica(&start, ino, change, hashes)?;
                self.push(step);
                self.content_set.entry(ino).or_insert(start);
            }
            Node::Staged { id, .. } => self.in_place_staged(id, &change, hashes)?,
            Node::Gone => unreachable!("looked up"),
        }
        Ok(())
    }

    /// Checks an in-place change to the replica file `ino` against its
    /// hashes, with the batch's earlier changes to it, and adds it to
    /// `pending` with the tree it leaves. Reads only the leaves the change
    /// touches once the file's tree is known (see the module docs).
    fn in_place_replica(
        &mut self,
        start: &RelPath,
        ino: u64,
        change: InPlace,
        hashes: Option<(Hash, Hash)>,
    ) -> Result<(), ApplyError> {
        let (f, st) = self.open_replica(start, ino)?;
        let disk = st.st_size as u64;
        let mut pending = self.pending.remove(&ino).unwrap_or_default();
        let size = change.size_after(pending.size(disk));
        self.check_growth(disk, size)?;
        self.charge_zeros(size.saturating_sub(pending.size(disk)))?;
        let base = match pending.tree.take() {
            Some(tree) => Some(tree),
            None => self.base_tree(&f, &st, &pending, hashes.is_some())?,
        };
        if let Some(base) = base {
            self.check_base(hashes, &base)?;
            let mut file = VirtualFile::new(&f, disk, pending.changes.iter().chain([&change]));
            let after = base.updated(size, &change.leaves(size), |i, buf| {
                file.read(i * LEAF, buf)
            });
            self.replica_bytes_read += file.bytes_read;
            let after = after.map_err(|e| self.io("reading the file", e))?;
            self.check_result(hashes, &after)?;
            pending.tree = Some(after);
        }
        pending.changes.push(change);
        self.pending.insert(ino, pending);
        Ok(())
    }

    /// The tree of the replica file `f` with the batch's earlier changes
    /// to it, when its tree is not known yet: its tree cache entry if there
    /// are none and it is valid, else (only if `needed`) built by reading
    /// the file.
    fn base_tree(
        &mut self,
        f: &File,
        st: &FileStat,
        earlier: &Pending,
        needed: bool,
    ) -> Result<Option<ContentTree>, ApplyError> {
        if earlier.changes.is_empty()
            && let Some(tree) = self.trees.load(st)
        {
            return Ok(Some(tree));
        }
        if !needed {
            return Ok(None);
        }
        let disk = st.st_size as u64;
        let mut file = VirtualFile::new(f, disk, &earlier.changes);
        let tree = ContentTree::build(earlier.size(disk), |i, buf| file.read(i * LEAF, buf));
        self.replica_bytes_read += file.bytes_read;
        tree.map(Some).map_err(|e| self.io("reading the file", e))
    }

    /// An in-place change to a staged file (not visible yet): made to the
    /// file itself, checked through its tree.
    fn in_place_staged(
        &mut self,
        id: u32,
        change: &InPlace,
        hashes: Option<(Hash, Hash)>,
    ) -> Result<(), ApplyError> {
        let f = self.open_staged(id, OFlag::O_RDWR)?;
        let tree = self
            .staged_trees
            .remove(&id)
            .expect("every staged regular file has a tree");
        self.check_base(hashes, &tree)?;
        let size = change.size_after(tree.size());
        self.check_growth(tree.size(), size)?;
        self.charge_zeros(size.saturating_sub(tree.size()))?;
        match change {
            InPlace::Write(ranges) => {
                for r in ranges {
                    f.write_all_at(&r.data, r.offset)
                        .map_err(|e| self.io("writing", e))?;
                }
            }
            InPlace::Truncate(size) => {
                f.set_len(*size).map_err(|e| self.io("truncating", e))?;
            }
        }
        let after = tree
            .updated(size, &change.leaves(size), |i, buf| {
                f.read_exact_at(buf, i * LEAF)
            })
            .map_err(|e| self.io("reading", e))?;
        self.check_result(hashes, &after)?;
        self.to_sync
            .add(&f)
            .map_err(|e| self.io("keeping the file to sync", e))?;
        self.staged_trees.insert(id, after);
        Ok(())
    }

    /// Counts `n` more zeros to hash, refusing the batch past its bound.
    /// A hash covers the whole content, holes included, and blake3 hashes
    /// each zero leaf by its position: a few bytes of batch declaring a
    /// huge sparse file, or growing a file again and again, would
    /// otherwise keep the applier hashing for hours.
    fn charge_zeros(&mut self, n: u64) -> Result<(), ApplyError> {
        self.zeros = self.zeros.saturating_add(n);
        if self.zeros > self.max_zeros {
            return Err(self.err(format!(
                "the batch's holes and growth come to more than {} bytes",
                self.max_zeros
            )));
        }
        Ok(())
    }

    /// Refuses an in-place change that grows a file of `from` bytes to
    /// `to` by more than `MAX_GROWTH`: the new leaves are hashed (bytes
    /// beyond the file are zeros), so this bounds the work a hostile
    /// offset can cause.
    fn check_growth(&self, from: u64, to: u64) -> Result<(), ApplyError> {
        if to > from.saturating_add(MAX_GROWTH) {
            return Err(self.err(format!("grows the file by more than {MAX_GROWTH} bytes")));
        }
        Ok(())
    }

    /// The tree before an in-place change must have the change's base hash.
    fn check_base(
        &self,
        hashes: Option<(Hash, Hash)>,
        before: &ContentTree,
    ) -> Result<(), ApplyError> {
        match hashes {
            Some((base, _)) if before.root() != base => Err(self.base_mismatch()),
            _ => Ok(()),
        }
    }

    /// The tree after an in-place change must have its result hash.
    fn check_result(
        &self,
        hashes: Option<(Hash, Hash)>,
        after: &ContentTree,
    ) -> Result<(), ApplyError> {
        match hashes {
            Some((_, result)) if after.root() != result => {
                Err(self.err("the writes do not produce the result hash"))
            }
            _ => Ok(()),
        }
    }

    /// A replica inode whose new content is staged for copying stands for
    /// that staged file.
    fn redirect(&self, n: Node) -> Node {
        match n {
            Node::Replica { ino, .. } if self.copied.contains_key(&ino) => Node::Staged {
                id: self.copied[&ino],
                ino: 0,
                kind: Kind::File,
            },
            n => n,
        }
    }

    fn base_mismatch(&self) -> ApplyError {
        ApplyError::BaseMismatch {
            index: self.index,
            op: self.op,
            path: self.path.to_string(),
        }
    }

    /// The content of the regular file `n` at this point of the batch (a
    /// delta's basis: it is read into memory), and the file.
    fn read_basis(&mut self, n: &Node) -> Result<(Vec<u8>, File), ApplyError> {
        let (mut f, pending) = match n {
            Node::Replica { start, ino, .. } => {
                (self.open_replica(start, *ino)?.0, self.pending.get(ino))
            }
            Node::Staged { id, .. } => (self.open_staged(*id, OFlag::O_RDONLY)?, None),
            Node::Gone => unreachable!("looked up"),
        };
        let disk = f.metadata().map_err(|e| self.io("stat", e))?.len();
        if disk.max(pending.map_or(disk, |p| p.size(disk))) > MAX_DELTA_BASE {
            return Err(self.err(format!(
                "the file is larger than {MAX_DELTA_BASE} bytes: send it with full content"
            )));
        }
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .map_err(|e| self.io("reading", e))?;
        for c in pending.iter().flat_map(|p| &p.changes) {
            apply_in_memory(&mut data, c);
        }
        if matches!(n, Node::Replica { .. }) {
            self.replica_bytes_read += disk;
        }
        Ok((data, f))
    }

    /// Applies `delta` to `basis`, which must hash to `base`, into a new
    /// staged file, whose content must hash to `result`. Returns the staged
    /// file and its tree.
    fn stage_delta(
        &mut self,
        basis: Vec<u8>,
        base: Hash,
        delta: &[u8],
        result: Hash,
    ) -> Result<(u32, File, ContentTree), ApplyError> {
        if Hash::of(&basis) != base {
            return Err(self.base_mismatch());
        }
        // A hostile delta must not fill the disk; senders keep to the same
        // bound.
        let limit = delta_output_limit(basis.len() as u64, delta.len() as u64);
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let (id, file) = self.create_staged_file()?;
        let tree = self.write_delta(&file, &basis, delta, limit)?;
        if tree.root() != result {
            return Err(self.err("the delta does not produce the result hash"));
        }
        Ok((id, file, tree))
    }

    /// Writes the output of `delta` applied to `basis` to `file`, at most
    /// `limit` bytes; returns its tree.
    fn write_delta(
        &self,
        file: &File,
        basis: &[u8],
        delta: &[u8],
        limit: usize,
    ) -> Result<ContentTree, ApplyError> {
        let mut out = TreeWriter {
            inner: io::BufWriter::new(file),
            tree: TreeBuilder::new(),
        };
        fast_rsync::apply_limited(basis, delta, &mut out, limit)
            .map_err(|e| self.err(format!("the delta does not apply: {e}")))?;
        out.inner.flush().map_err(|e| self.io("writing", e))?;
        Ok(out.tree.finish())
    }

    fn delta(
        &mut self,
        path: &RelPath,
        n: Node,
        base: Hash,
        delta: &[u8],
        result: Hash,
    ) -> Result<(), ApplyError> {
        let n = self.redirect(n);
        let (basis, src) = self.read_basis(&n)?;
        let (id, file, tree) = self.stage_delta(basis, base, delta, result)?;
        let st = nix::sys::stat::fstat(src.as_fd()).map_err(|e| self.errno("fstat", e))?;
        if let Node::Replica { ino, start, .. } = &n
            && (st.st_nlink > 1 || self.linked.contains(ino))
        {
            // The file has other links, which must see the new content as
            // they would after an in-place rewrite: the commit copies the
            // staged content into the inode instead of replacing it.
            self.to_sync
                .add(&file)
                .map_err(|e| self.io("keeping the file to sync", e))?;
            self.copied.insert(*ino, id);
            self.staged_trees.insert(id, tree);
            self.content_set.entry(*ino).or_insert(start.clone());
            self.push(Step::CopyInto {
                id,
                path: path.clone(),
                ino: *ino,
            });
            return Ok(());
        }
        // A staged file replaced in staging keeps its metadata now; a
        // replica file's is copied at the commit, when the batch's earlier
        // metadata changes to it have been made.
        if matches!(n, Node::Staged { .. }) {
            copy_meta(&src, &file).map_err(|e| self.io("copying metadata", e))?;
        }
        self.to_sync
            .add(&file)
            .map_err(|e| self.io("keeping the file to sync", e))?;
        let st = nix::sys::stat::fstat(file.as_fd()).map_err(|e| self.errno("fstat", e))?;
        match n {
            Node::Staged { id: old, .. } => {
                // Replace the staged file in staging (it is not visible):
                // it keeps its id, its inode changes.
                let old_name = self.location(old);
                let new_name = self.location(id);
                nix::fcntl::renameat(
                    self.staging,
                    new_name.as_c_str(),
                    self.staging,
                    old_name.as_c_str(),
                )
                .map_err(|e| self.errno("staging", e))?;
                self.staged -= 1;
                self.retarget(old, st.st_ino);
                self.staged_trees.insert(old, tree);
            }
            Node::Replica { ino, .. } => {
                self.install_replacing(path, id, &st, Some(ino));
                self.staged_trees.insert(id, tree);
            }
            Node::Gone => unreachable!("looked up"),
        }
        Ok(())
    }

    /// The staged entry `id` now has inode `ino`: update the model and the
    /// steps that name it.
    fn retarget(&mut self, id: u32, ino: u64) {
        let mut old_ino = None;
        for v in self.overlay.values_mut() {
            if let Node::Staged { id: i, ino: n, .. } = v
                && *i == id
            {
                old_ino = Some(*n);
                *n = ino;
            }
        }
        let Some(old) = old_ino else { return };
        for e in &mut self.entries {
            match &mut e.step {
                Step::Install { ino: n, .. }
                | Step::Link { ino: n, .. }
                | Step::Unlink { ino: n, .. }
                | Step::Meta { ino: n, .. }
                | Step::Rename { from_ino: n, .. }
                    if *n == old =>
                {
                    *n = ino
                }
                _ => {}
            }
            if let Step::Rename {
                to_ino: Some(n), ..
            } = &mut e.step
                && *n == old
            {
                *n = ino;
            }
        }
    }
}

/// Writes through to `inner`, building the tree of what it writes.
struct TreeWriter<W> {
    inner: W,
    tree: TreeBuilder,
}

impl<W: Write> Write for TreeWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tree.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A replica file as the batch's changes so far leave it, read by pieces
/// (bytes past the end of the file on disk read as zeros); counts the
/// bytes it reads from the disk.
struct VirtualFile<'f> {
    file: &'f File,
    disk: u64,
    changes: Vec<&'f InPlace>,
    bytes_read: u64,
}

impl<'f> VirtualFile<'f> {
    fn new(file: &'f File, disk: u64, changes: impl IntoIterator<Item = &'f InPlace>) -> Self {
        VirtualFile {
            file,
            disk,
            changes: changes.into_iter().collect(),
            bytes_read: 0,
        }
    }

    fn read(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        if at < self.disk {
            let want = ((self.disk - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..want], at)?;
            self.bytes_read += want as u64;
        }
        for c in &self.changes {
            apply_to_block(buf, at, c);
        }
        Ok(())
    }
}

fn apply_in_memory(data: &mut Vec<u8>, c: &InPlace) {
    match c {
        InPlace::Write(ranges) => {
            for r in ranges {
                let (off, end) = (r.offset as usize, r.offset as usize + r.data.len());
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[off..end].copy_from_slice(&r.data);
            }
        }
        InPlace::Truncate(size) => data.resize(*size as usize, 0),
    }
}

/// Applies `c` to the block of the file at `[at, at + buf.len())`.
fn apply_to_block(buf: &mut [u8], at: u64, c: &InPlace) {
    let end = at + buf.len() as u64;
    match c {
        InPlace::Write(ranges) => {
            // Ranges are in increasing offset order and do not overlap:
            // skip to the first that ends inside the block.
            let first = ranges.partition_point(|r| r.offset + r.data.len() as u64 <= at);
            for r in ranges[first..].iter().take_while(|r| r.offset < end) {
                let (ro, re) = (r.offset, r.offset + r.data.len() as u64);
                let (s, e) = (ro.max(at), re.min(end));
                buf[(s - at) as usize..(e - at) as usize]
                    .copy_from_slice(&r.data[(s - ro) as usize..(e - ro) as usize]);
            }
        }
        // Bytes beyond a truncation read as zeros if the file grows again.
        InPlace::Truncate(size) => {
            if *size < end {
                let from = size.saturating_sub(at) as usize;
                buf[from..].fill(0);
            }
        }
    }
}

/// Removes `name` in `dir` if it is there.
fn unlinkat_missing_ok(dir: &OwnedFd, name: &CString) -> Result<(), Errno> {
    match nix::unistd::unlinkat(
        dir,
        name.as_c_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to `name` in `dir` whole or not at all: a temporary
/// name, fsync, rename, fsync of `dir`.
fn write_durably(dir: &OwnedFd, name: &CString, bytes: &[u8]) -> Result<(), Errno> {
    let mut tmp = name.as_bytes().to_vec();
    tmp.extend_from_slice(b".tmp");
    let tmp = CString::new(tmp).expect("no NUL");
    let fd = openat(
        dir,
        tmp.as_c_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    let f = File::from(fd);
    f.write_all_at(bytes, 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    nix::fcntl::renameat(dir, tmp.as_c_str(), dir, name.as_c_str())?;
    nix::unistd::fsync(dir)
}

/// The kept partial file's description, if there is one (a damaged one
/// counts as none).
pub(super) fn read_partial(kept: &OwnedFd) -> Result<Option<Partial>, Errno> {
    let name = CString::new(PARTIAL_META).expect("no NUL");
    let fd = match openat(
        kept,
        name.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    File::from(fd)
        .take(64 << 10)
        .read_to_end(&mut bytes)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(postcard::from_bytes(&bytes).ok())
}
