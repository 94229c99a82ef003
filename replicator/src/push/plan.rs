//! Turning a changeset into batch operations, reading from the source what
//! they carry.
//!
//! Order of the batch: the namespace steps (the changeset's plan, in which
//! every step is valid when it runs; new files carry their content and
//! their metadata where they are created, read through one descriptor),
//! then content changes of files that existed, then the metadata of
//! everything else (owner before mode, since chown clears set-ID bits;
//! times last, and the applier sets every time again at the end of its
//! commit).
//!
//! How a file's content goes (the cheapest that is exact):
//! - in-place writes of a file the replica holds a tree of: the 16 KiB
//!   leaves the writes touched, whole, in one `WriteRanges` whose base and
//!   result hashes come from the cached tree updated with those leaves;
//!   nothing else of the file is read. Whole leaves, so that a write made
//!   after the barrier to another part of a sent leaf cannot make the
//!   replica's leaf differ from the tree: what is sent is what is hashed.
//! - a file rewritten wholesale, or a new file that took the name of a file
//!   the replica holds (the editor save): a delta against the cached
//!   signature of that file, unless it would be mostly literal;
//! - otherwise the whole content (sparse files as extents); an existing file
//!   is then unlinked and created again with its links and all its metadata.
//!
//! A file is read under [`Journal::freeze`] (live pushes): changes through
//! the mount to that file wait until it is read, so a read never sees half
//! a write, and every change recorded up to the barrier is in what is read.
//! Then the file is taken clean ([`journal::Frozen::settle`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use journal::{Changeset, ContentChange, FileChange, FileId, FileKind, Journal, Namespace, NsStep};

use super::cache::{ReplicaCopy, SignatureBuilder, cached_size, signature_of};
use super::read_ahead;
use super::report::{Progress, PushError};
use super::source::{Source, data_extents, read_cached, xattrs_of};
use crate::apply::Partial;
use crate::batch::{
    Chunk, Content, Extent, Hash, NodeKind, Op, OpSink, RelPath, Timestamp, WriteRange,
    limits::{MAX_CHUNK_LEN, delta_output_limit},
};
use crate::tree::{ContentTree, LEAF, TreeBuilder, leaf_count, leaf_span, leaves_of};

/// New files up to this size go in one `CreateFile`; larger ones are
/// streamed in pieces.
const INLINE_MAX: u64 = 4 << 20;
/// Piece size for streamed files and for hashing them (a multiple of the
/// leaf and of the signature block).
const PIECE: u64 = 4 << 20;
/// Largest file read into memory to compute a delta.
const MAX_DIFF_INPUT: u64 = 1 << 30;
/// A delta is used when it is at most this fraction of the content.
const DELTA_WORTH: u64 = 2;

/// What the planner works from.
pub(super) struct Plan<'a> {
    pub journal: &'a Journal,
    pub source: &'a Source,
    pub changes: &'a Changeset,
    pub steps: &'a [NsStep],
    pub after: &'a Namespace,
    /// What the replica holds of each file, for the files the batch touches.
    pub cache: &'a HashMap<FileId, ReplicaCopy>,
    /// Files to send with full content whatever the journal says (the
    /// replica's copy did not match its base).
    pub whole: &'a HashSet<FileId>,
    /// Content the replica kept from a push cut off before its commit, by
    /// hash: a new file with that content goes as `CreateFromKept`.
    pub kept: &'a HashSet<Hash>,
    /// The start of a file the replica kept from a push cut off inside it:
    /// a new file at that path and of that size goes as `ResumeFile`.
    pub partial: Option<&'a Partial>,
    /// Freeze files while reading them and take them clean afterwards;
    /// false for a dry run, which changes nothing.
    pub live: bool,
    /// zstd-compress content where it pays (for transports that carry it).
    pub compress: bool,
    /// Count the batch's content and report progress against it.
    pub progress: bool,
}

/// What writing the batch did.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub files_created: u64,
    pub files_removed: u64,
    pub renames: u64,
    pub content_bytes_read: u64,
    pub delta_files: u64,
    pub full_files: u64,
    pub range_files: u64,
    /// New files the replica had kept, and their bytes (not sent).
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// The cache entries the journal keeps once the replica acknowledges.
    pub cache: Vec<(FileId, Option<Vec<u8>>)>,
}

/// When a streamed file's tree (and signature) is made.
enum Hashing {
    /// Read once before it is sent.
    Before(ContentTree, Option<Vec<u8>>),
    /// As its pieces are sent.
    AsSent(TreeBuilder, Option<SignatureBuilder>),
}

/// How a file's content went.
enum Sent {
    Full,
    Delta,
    Ranges,
}

/// Adds a piece of a streamed file to its tree and its signature. The two
/// hash the same bytes independently: the signature (MD4 per block) is
/// made on a second thread meanwhile, for a seed's large files kept the
/// planner's thread busy reading and hashing while the applier waited.
/// One scoped thread per piece (4 MiB, a few milliseconds of hashing)
/// costs tens of microseconds.
fn hash_piece(tree: &mut TreeBuilder, signature: Option<&mut SignatureBuilder>, piece: &[u8]) {
    let Some(sig) = signature else {
        return tree.update(piece);
    };
    let piece_sig = std::thread::scope(|s| {
        let beside =
            std::thread::Builder::new().spawn_scoped(s, || SignatureBuilder::of_piece(piece));
        tree.update(piece);
        match beside {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            // The system refused a thread: one after the other.
            Err(_) => SignatureBuilder::of_piece(piece),
        }
    });
    sig.append(&piece_sig);
}

fn rel(p: &Path) -> Result<RelPath, PushError> {
    RelPath::from_components(p.components().map(|c| c.as_os_str().as_bytes().to_vec()))
        .map_err(|e| PushError::Other(format!("path {}: {e}", p.display())))
}

/// An error reading the content of the file that goes to `path`.
fn read_err(path: &RelPath) -> impl Fn(io::Error) -> PushError + Copy + '_ {
    move |e| PushError::Other(format!("reading {path} from the source: {e}"))
}

fn time(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    }
}

/// Whether the file may have holes: fewer blocks allocated than its size
/// needs (a file with holes and preallocated blocks counts as dense, and is
/// copied densely).
fn is_sparse(md: &Metadata) -> bool {
    md.blocks().saturating_mul(512) < md.len()
}

fn perm(md: &Metadata) -> u32 {
    md.mode() & 0o7777
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    // Past the end (the file shrank under a read that did not freeze it)
    // reads as zeros, like a hole.
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => {
                buf[done..].fill(0);
                break;
            }
            n => done += n,
        }
    }
    Ok(())
}

/// A regular file opened for a batch, with what was read of it.
struct Reading<'f> {
    file: &'f File,
    size: u64,
    read: u64,
    /// The whole content, once read and handed back (`keep`): later reads
    /// come from it instead of the file.
    kept: Option<Vec<u8>>,
    /// The first read had to wait for the disk (the file's first page was
    /// not in the page cache).
    waited: bool,
}

impl Reading<'_> {
    fn at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(data) = &self.kept else {
            let first = self.read == 0;
            self.read += buf.len() as u64;
            if first && !buf.is_empty() {
                match read_cached(self.file, buf, offset)? {
                    Some(n) => return read_at(self.file, &mut buf[n..], offset + n as u64),
                    None => self.waited = true,
                }
            }
            return read_at(self.file, buf, offset);
        };
        let start = (offset as usize).min(data.len());
        let n = (data.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&data[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn all(&mut self) -> io::Result<Vec<u8>> {
        if let Some(data) = self.kept.take() {
            return Ok(data);
        }
        let mut data = vec![0u8; self.size as usize];
        self.at(&mut data, 0)?;
        Ok(data)
    }

    /// Hands back content `all` returned, for the reads that follow.
    fn keep(&mut self, data: Vec<u8>) {
        self.kept = Some(data);
    }

    /// The tree and (if the file is cached) the signature, one pass.
    fn summarize(&mut self) -> io::Result<(ContentTree, Option<Vec<u8>>)> {
        let mut sig = cached_size(self.size).then(SignatureBuilder::new);
        let mut piece = Vec::new();
        let mut piece_at = u64::MAX;
        let size = self.size;
        let tree = ContentTree::build(size, |i, buf| {
            let (start, len) = leaf_span(i, size);
            let at = start - start % PIECE;
            if at != piece_at {
                piece.resize((size - at).min(PIECE) as usize, 0);
                self.at(&mut piece, at)?;
                piece_at = at;
                if let Some(s) = &mut sig {
                    s.add(&piece);
                }
            }
            let off = (start - at) as usize;
            buf.copy_from_slice(&piece[off..off + len]);
            Ok(())
        })?;
        Ok((tree, sig.map(SignatureBuilder::finish)))
    }
}

impl Plan<'_> {
    /// Writes every operation of the batch to `out`.
    /// `owners` receives, as operations are sent, the file each content
    /// operation is about by operation number (kept when writing fails, to
    /// find the file a replica refused).
    pub fn write(
        &self,
        out: &mut impl OpSink,
        progress: &mut dyn FnMut(Progress),
        owners: &mut Vec<(u64, FileId)>,
    ) -> Result<Written, PushError> {
        let read_ahead = read_ahead::Planner::default();
        std::thread::scope(|scope| {
            // Without the thread the planner reads as it goes.
            let _ = std::thread::Builder::new()
                .name("ferry-read-ahead".into())
                .spawn_scoped(scope, || {
                    let locate = |id| self.journal.locate(id);
                    read_ahead::run(self.steps, locate, self.source, &read_ahead);
                });
            let _stop_reading_ahead = read_ahead.stopping();
            // The progress totals take a stat of every file the batch sends
            // (a fifth of a second for 100,000 files): counted beside the
            // sending, not before it, and only when someone looks.
            let totals = self.progress.then(|| {
                let (totals_tx, totals) = std::sync::mpsc::sync_channel(1);
                let inline = totals_tx.clone();
                let counting = std::thread::Builder::new()
                    .name("ferry-count".into())
                    .spawn_scoped(scope, move || {
                        let _ = totals_tx.send(self.content_totals());
                    });
                if counting.is_err() {
                    let _ = inline.send(self.content_totals());
                }
                totals
            });
            let mut w = Writing {
                plan: self,
                out,
                owners,
                done: Written::default(),
                progress: Progress::default(),
                report: progress,
                totals,
                touched_parents: BTreeSet::new(),
                full_metadata: HashSet::new(),
                metadata_sent: HashSet::new(),
                kept_used: HashSet::new(),
                partial_used: false,
                at_step: 0,
                read_ahead: &read_ahead,
            };
            self.write_with(&mut w)
        })
    }

    /// The files whose content goes and their sizes now (a file that cannot
    /// be stat'ed counts as empty: its sending reports the error).
    fn content_totals(&self) -> (u64, u64) {
        let (mut files, mut bytes) = (0, 0);
        for (id, c) in &self.changes.files {
            let content =
                c.created() || c.content != ContentChange::Unchanged || self.whole.contains(id);
            if !(c.exists_after && c.kind == FileKind::File && content) {
                continue;
            }
            if let Some((path, key)) = self.journal.locate(*id) {
                files += 1;
                bytes += self
                    .source
                    .stat(&path, key)
                    .ok()
                    .flatten()
                    .map_or(0, |m| m.len());
            }
        }
        (files, bytes)
    }

    fn write_with<S: OpSink>(&self, w: &mut Writing<'_, '_, S>) -> Result<Written, PushError> {
        if self.changes.from == journal::Seq(0) {
            // A replica's first batch: the root exists on both sides, and
            // all of its metadata goes.
            w.full_metadata.insert(FileId::ROOT);
            w.touched_parents.insert(FileId::ROOT);
        }
        for (i, step) in self.steps.iter().enumerate() {
            w.at_step = i;
            w.step(step)?;
        }
        for (id, change) in &self.changes.files {
            if change.existed_before && change.exists_after && change.kind == FileKind::File {
                let changed = change.content != ContentChange::Unchanged;
                if changed || self.whole.contains(id) {
                    w.update(*id, change)?;
                }
            }
        }
        // Directories the batch changes beyond what the changeset says get
        // their times again.
        let parents = std::mem::take(&mut w.touched_parents);
        for (id, change) in &self.changes.files {
            if change.exists_after && !w.metadata_sent.contains(id) {
                let full = change.created() || w.full_metadata.contains(id);
                w.metadata(*id, full, Some(change), parents.contains(id))?;
            }
        }
        for p in parents {
            if !self.changes.files.get(&p).is_some_and(|c| c.exists_after) {
                let full = w.full_metadata.contains(&p);
                w.metadata(p, full, None, true)?;
            }
        }
        w.done.files_removed = self.changes.files.values().filter(|c| c.removed()).count() as u64;
        w.take_totals(true);
        Ok(std::mem::take(&mut w.done))
    }
}

struct Writing<'p, 'o, S: OpSink> {
    plan: &'p Plan<'p>,
    out: &'o mut S,
    owners: &'o mut Vec<(u64, FileId)>,
    done: Written,
    progress: Progress,
    report: &'o mut dyn FnMut(Progress),
    /// The progress totals, while they are being counted (none when
    /// progress is not reported: see `file_done`).
    totals: Option<std::sync::mpsc::Receiver<(u64, u64)>>,
    /// Directories whose entries the replica changes beyond what the
    /// changeset says (a file installed anew by rename): their times are
    /// set again from the source.
    touched_parents: BTreeSet<FileId>,
    /// Existing files sent anew: all their metadata goes too.
    full_metadata: HashSet<FileId>,
    /// New files whose metadata went with their content.
    metadata_sent: HashSet<FileId>,
    /// Kept content already named by a `CreateFromKept` (the replica holds
    /// one copy of each).
    kept_used: HashSet<Hash>,
    /// The kept partial file was named by a `ResumeFile`.
    partial_used: bool,
    /// The namespace step being written, and the thread that reads the
    /// next steps' files ahead once a read of the planner's waits.
    at_step: usize,
    read_ahead: &'o read_ahead::Planner,
}

impl<S: OpSink> Writing<'_, '_, S> {
    fn push(&mut self, op: Op) -> Result<(), PushError> {
        Ok(self.out.send(op)?)
    }

    /// Notes that the next operation carries the content of `id`.
    fn owns_next(&mut self, id: FileId) {
        self.owners.push((self.out.ops_sent() + 1, id));
    }

    fn source_err(&self, rel: &Path) -> impl Fn(io::Error) -> PushError + '_ {
        let path = self.plan.source.path(rel);
        move |source| PushError::Source {
            path: path.clone(),
            source,
        }
    }

    /// Takes the progress totals once they are counted (waiting for them
    /// when `wait`), and reports them.
    fn take_totals(&mut self, wait: bool) {
        let Some(rx) = &self.totals else { return };
        let got = if wait {
            rx.recv().ok()
        } else {
            rx.try_recv().ok()
        };
        if let Some((files, bytes)) = got {
            self.totals = None;
            self.progress.files_total = files;
            self.progress.bytes_total = bytes;
            (self.report)(self.progress);
        }
    }

    fn file_done(&mut self, bytes: u64) {
        self.take_totals(false);
        self.progress.files_done += 1;
        self.progress.bytes_done += bytes;
        // Nothing to show against until the totals are in.
        if self.plan.progress && self.totals.is_none() {
            (self.report)(self.progress);
        }
    }

    fn step(&mut self, step: &NsStep) -> Result<(), PushError> {
        match step {
            NsStep::Create {
                id,
                kind,
                path,
                replaced,
            } => {
                self.done.files_created += 1;
                self.create(*id, *kind, &rel(path)?, *replaced)
            }
            NsStep::Link { existing, new, .. } => self.push(Op::Link {
                existing: rel(existing)?,
                new: rel(new)?,
            }),
            NsStep::Rename { from, to, .. } => {
                self.done.renames += 1;
                self.push(Op::Rename {
                    from: rel(from)?,
                    to: rel(to)?,
                    exchange: false,
                })
            }
            NsStep::Unlink { path, .. } => self.push(Op::Unlink { path: rel(path)? }),
            NsStep::Rmdir { path, .. } => self.push(Op::Rmdir { path: rel(path)? }),
        }
    }

    /// A new entry at `path`. Content and mode are read from the file as it
    /// is now (wherever it is now); the rest of its metadata comes later.
    fn create(
        &mut self,
        id: FileId,
        kind: FileKind,
        path: &RelPath,
        replaced: Option<FileId>,
    ) -> Result<(), PushError> {
        if kind == FileKind::File {
            // Located, opened and stat'ed once, through its descriptor.
            return self.create_file(id, path, replaced);
        }
        let located = self.plan.journal.locate(id);
        let md = match &located {
            Some((src, key)) => self
                .plan
                .source
                .stat(src, *key)
                .map_err(self.source_err(src))?,
            None => None,
        };
        let mode = md.as_ref().map_or(0o700, perm);
        let op = match kind {
            FileKind::File => unreachable!("regular files are created above"),
            FileKind::Dir => Op::Mkdir {
                path: path.clone(),
                mode,
            },
            FileKind::Symlink => {
                let target = match (&located, &md) {
                    (Some((src, _)), Some(_)) => self
                        .plan
                        .source
                        .read_link(src)
                        .map_err(self.source_err(src))?,
                    // Gone since the barrier: the next push removes it.
                    _ => b".".to_vec(),
                };
                Op::Symlink {
                    path: path.clone(),
                    target,
                }
            }
            FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice => {
                let kind = match kind {
                    FileKind::Fifo => NodeKind::Fifo,
                    FileKind::Socket => NodeKind::Socket,
                    FileKind::CharDevice => NodeKind::Char,
                    _ => NodeKind::Block,
                };
                let rdev = match (kind, &md) {
                    (NodeKind::Char | NodeKind::Block, Some(m)) => m.rdev(),
                    _ => 0,
                };
                Op::Mknod {
                    path: path.clone(),
                    kind,
                    mode,
                    rdev,
                }
            }
        };
        self.push(op)
    }

    /// Opens the file `id` as it is now, under a freeze when live, and runs
    /// `f` on it; `None` when it is not the file the journal knows any more
    /// (then, if it still exists, the next push sends it again).
    fn with_file<T>(
        &mut self,
        id: FileId,
        f: impl FnOnce(&mut Self, &mut Reading<'_>, &Metadata) -> Result<T, PushError>,
    ) -> Result<Option<T>, PushError> {
        let Some((src, key)) = self.plan.journal.locate(id) else {
            return Ok(None);
        };
        let frozen = if self.plan.live {
            self.plan.journal.freeze(id)
        } else {
            None
        };
        let opened = self
            .plan
            .source
            .open(&src, key)
            .map_err(self.source_err(&src))?;
        let Some((file, md)) = opened else {
            drop(frozen);
            if self.plan.live {
                self.plan.journal.resend(id);
            }
            return Ok(None);
        };
        let mut reading = Reading {
            file: &file,
            size: md.len(),
            read: 0,
            kept: None,
            waited: false,
        };
        let result = f(self, &mut reading, &md);
        self.done.content_bytes_read += reading.read;
        if reading.waited {
            self.read_ahead.missed(self.at_step);
        }
        if result.is_ok()
            && let Some(frozen) = frozen
        {
            frozen.settle();
        }
        self.file_done(md.len());
        result.map(Some)
    }

    fn create_file(
        &mut self,
        id: FileId,
        path: &RelPath,
        replaced: Option<FileId>,
    ) -> Result<(), PushError> {
        let basis = replaced
            .filter(|_| !self.plan.whole.contains(&id))
            .and_then(|old| self.plan.cache.get(&old));
        let sent = self.with_file(id, |w, r, md| {
            let sent = match basis {
                Some(copy) => w.delta(id, path, r, md, copy, true)?,
                None => w.full(id, path, r, md).map(|()| Sent::Full)?,
            };
            // Its metadata goes now, from what is open, rather than after
            // the batch's content, which would look the file up again.
            let xattrs = xattrs_of(r.file).map_err(read_err(path))?;
            w.all_metadata(id, path.clone(), md, xattrs)?;
            w.metadata_sent.insert(id);
            Ok(sent)
        })?;
        match sent {
            Some(Sent::Delta) => self.done.delta_files += 1,
            Some(_) => self.done.full_files += 1,
            // Gone since the barrier: an empty file holds its place until
            // the next push removes it.
            None => {
                self.owns_next(id);
                self.push(Op::CreateFile {
                    path: path.clone(),
                    mode: 0o600,
                    content: Content::Raw(Vec::new()),
                    result: Hash::of(&[]),
                })?;
                self.done.cache.push((id, None));
            }
        }
        Ok(())
    }

    /// The whole content of a new file at `path`.
    fn full(
        &mut self,
        id: FileId,
        path: &RelPath,
        r: &mut Reading<'_>,
        md: &Metadata,
    ) -> Result<(), PushError> {
        let src_err = read_err(path);
        let extents = if is_sparse(md) {
            data_extents(r.file, r.size).map_err(src_err)?
        } else {
            vec![(0, r.size)]
        };
        let sparse = extents.iter().map(|e| e.1).sum::<u64>() < r.size;
        let (tree, signature) = if r.size <= INLINE_MAX {
            let data = r.all().map_err(src_err)?;
            let tree = ContentTree::of_bytes(&data);
            let signature = cached_size(r.size).then(|| signature_of(&data));
            if self.create_from_kept(id, path, md, &tree)? {
                self.remember(id, tree, signature);
                return Ok(());
            }
            let content = if sparse {
                Content::Sparse {
                    size: r.size,
                    extents: extents
                        .iter()
                        .map(|(off, len)| Extent {
                            offset: *off,
                            data: self.chunk(&data[*off as usize..(off + len) as usize]),
                        })
                        .collect(),
                }
            } else if self.plan.compress {
                Content::compress_if_it_pays(&data)
            } else {
                Content::Raw(data)
            };
            self.owns_next(id);
            self.push(Op::CreateFile {
                path: path.clone(),
                mode: perm(md),
                content,
                result: tree.root(),
            })?;
            (tree, signature)
        } else {
            // Hashed before it is sent only where the hash decides what
            // goes (a replica that kept content from a cut-off push), or
            // where holes make one pass awkward; otherwise hashed as it
            // is sent, the file read once.
            let mut hashing = if sparse || !self.plan.kept.is_empty() {
                let (tree, signature) = r.summarize().map_err(src_err)?;
                let signature = signature.filter(|_| r.size <= MAX_DIFF_INPUT);
                if self.create_from_kept(id, path, md, &tree)? {
                    self.remember(id, tree, signature);
                    return Ok(());
                }
                Hashing::Before(tree, signature)
            } else {
                let signature =
                    (cached_size(r.size) && r.size <= MAX_DIFF_INPUT).then(SignatureBuilder::new);
                Hashing::AsSent(TreeBuilder::new(), signature)
            };
            self.owns_next(id);
            // What the replica kept of this file is read and hashed here,
            // not sent.
            let have = self.resumable(id, path, r.size);
            if have > 0 {
                self.push(Op::ResumeFile {
                    path: path.clone(),
                    mode: perm(md),
                    size: r.size,
                    from: have,
                })?;
                self.done.kept_bytes += have;
            } else {
                self.push(Op::BeginFile {
                    path: path.clone(),
                    mode: perm(md),
                    size: r.size,
                })?;
            }
            let mut buf = Vec::new();
            for (start, len) in extents {
                let mut at = start;
                while at < start + len {
                    let n = (start + len - at).min(PIECE);
                    buf.resize(n as usize, 0);
                    r.at(&mut buf, at).map_err(src_err)?;
                    // Without holes the pieces come in order from 0, each
                    // a whole number of signature blocks but the last.
                    if let Hashing::AsSent(tree, signature) = &mut hashing {
                        hash_piece(tree, signature.as_mut(), &buf);
                    }
                    let send_from = have.max(at);
                    if send_from < at + n {
                        let data = self.chunk(&buf[(send_from - at) as usize..]);
                        self.push(Op::FileData {
                            offset: send_from,
                            data,
                        })?;
                    }
                    at += n;
                }
            }
            let (tree, signature) = match hashing {
                Hashing::Before(tree, signature) => (tree, signature),
                Hashing::AsSent(tree, signature) => {
                    (tree.finish(), signature.map(SignatureBuilder::finish))
                }
            };
            self.push(Op::EndFile {
                result: tree.root(),
            })?;
            (tree, signature)
        };
        self.remember(id, tree, signature);
        Ok(())
    }

    /// How many bytes at the start of the new file `id` at `path` (of
    /// `size` bytes) the replica kept from a push cut off inside it: 0
    /// unless it kept a partial file at that path and of that size, not
    /// yet used, and the file is not to be sent whole. The `EndFile` hash
    /// checks that what it kept is this file's start.
    fn resumable(&mut self, id: FileId, path: &RelPath, size: u64) -> u64 {
        match self.plan.partial {
            Some(p)
                if !self.partial_used
                    && p.path == *path
                    && p.size == size
                    && !self.plan.whole.contains(&id) =>
            {
                self.partial_used = true;
                p.have
            }
            _ => 0,
        }
    }

    /// Creates the new file at `path` from content the replica kept, if it
    /// kept content with the tree's hash; whether it did.
    fn create_from_kept(
        &mut self,
        id: FileId,
        path: &RelPath,
        md: &Metadata,
        tree: &ContentTree,
    ) -> Result<bool, PushError> {
        let hash = tree.root();
        if tree.size() == 0 || !self.plan.kept.contains(&hash) || !self.kept_used.insert(hash) {
            return Ok(false);
        }
        self.owns_next(id);
        self.push(Op::CreateFromKept {
            path: path.clone(),
            mode: perm(md),
            result: hash,
        })?;
        self.done.kept_files += 1;
        self.done.kept_bytes += tree.size();
        Ok(true)
    }

    fn chunk(&self, data: &[u8]) -> Chunk {
        if self.plan.compress {
            Chunk::compress_if_it_pays(data)
        } else {
            Chunk::Raw(data.to_vec())
        }
    }

    fn remember(&mut self, id: FileId, tree: ContentTree, signature: Option<Vec<u8>>) {
        let entry = cached_size(tree.size()).then(|| ReplicaCopy { tree, signature }.encode());
        // A file new in this batch has no entry to remove.
        let existed = self
            .plan
            .changes
            .files
            .get(&id)
            .is_some_and(|c| c.existed_before);
        if entry.is_some() || existed {
            self.done.cache.push((id, entry));
        }
    }

    /// A delta against `copy` (what the replica holds: at `path` itself, or
    /// for a new file, in the file it replaces there), or the whole content
    /// when no usable delta can be made.
    fn delta(
        &mut self,
        id: FileId,
        path: &RelPath,
        r: &mut Reading<'_>,
        md: &Metadata,
        copy: &ReplicaCopy,
        new_file: bool,
    ) -> Result<Sent, PushError> {
        let src_err = read_err(path);
        // A delta's result is written whole: a sparse file goes as extents.
        let sparse = is_sparse(md);
        let signature = copy
            .usable_signature()
            .filter(|_| r.size <= MAX_DIFF_INPUT && !sparse);
        let Some(signature) = signature else {
            return self.anew(id, path, r, md, new_file);
        };
        let data = r.all().map_err(src_err)?;
        let mut delta = Vec::new();
        fast_rsync::diff(&signature.index(), &data, &mut delta)
            .map_err(|e| PushError::Other(format!("computing the delta of {path}: {e}")))?;
        if delta.len() as u64 > (data.len() as u64 / DELTA_WORTH).max(1024)
            || delta.len() as u64 > MAX_CHUNK_LEN
            || r.size > delta_output_limit(copy.tree.size(), delta.len() as u64)
        {
            // Mostly literal: the whole content costs no more (and is in
            // memory already).
            r.keep(data);
            return self.anew(id, path, r, md, new_file);
        }
        let tree = ContentTree::of_bytes(&data);
        let signature = signature_of(&data);
        self.owns_next(id);
        let op = if new_file {
            Op::CreateFromDelta {
                path: path.clone(),
                basis: path.clone(),
                base: copy.tree.root(),
                delta,
                mode: perm(md),
                result: tree.root(),
            }
        } else {
            Op::Delta {
                path: path.clone(),
                base: copy.tree.root(),
                delta,
                result: tree.root(),
            }
        };
        self.push(op)?;
        self.remember(id, tree, Some(signature));
        Ok(Sent::Delta)
    }

    /// The whole content, for a file that is new at `path` or (not
    /// `new_file`) replaces the replica's copy.
    fn anew(
        &mut self,
        id: FileId,
        path: &RelPath,
        r: &mut Reading<'_>,
        md: &Metadata,
        new_file: bool,
    ) -> Result<Sent, PushError> {
        if !new_file {
            self.unlink_everywhere(id)?;
        }
        self.full(id, path, r, md)?;
        if !new_file {
            self.relink(id, path)?;
        }
        Ok(Sent::Full)
    }

    /// Removes every name the file has at the end of the batch, so that it
    /// can be created again with new content.
    fn unlink_everywhere(&mut self, id: FileId) -> Result<(), PushError> {
        for (parent, name) in self.plan.after.names(id).to_vec() {
            let p = self
                .plan
                .after
                .edge_path(parent, &name)
                .ok_or_else(|| PushError::Other(format!("file {id} has no path")))?;
            self.push(Op::Unlink { path: rel(&p)? })?;
            self.touched_parents.insert(parent);
        }
        self.full_metadata.insert(id);
        Ok(())
    }

    /// Gives the file created again at `first` its other names.
    fn relink(&mut self, id: FileId, first: &RelPath) -> Result<(), PushError> {
        for (parent, name) in self.plan.after.names(id).to_vec() {
            let p = rel(&self
                .plan
                .after
                .edge_path(parent, &name)
                .ok_or_else(|| PushError::Other(format!("file {id} has no path")))?)?;
            if p != *first {
                self.push(Op::Link {
                    existing: first.clone(),
                    new: p,
                })?;
            }
        }
        Ok(())
    }

    /// New content for a file the replica holds.
    fn update(&mut self, id: FileId, change: &FileChange) -> Result<(), PushError> {
        let path = self
            .plan
            .after
            .path_of(id)
            .ok_or_else(|| PushError::Other(format!("file {id} has no path at the end")))?;
        let path = rel(&path)?;
        let copy = self
            .plan
            .cache
            .get(&id)
            .filter(|_| !self.plan.whole.contains(&id));
        let sent = self.with_file(id, |w, r, md| {
            let Some(copy) = copy else {
                return w.anew(id, &path, r, md, false);
            };
            if let ContentChange::Ranges {
                ranges,
                truncated_to: None,
            } = &change.content
                && let Some(sent) = w.ranges(id, &path, r, copy, ranges)?
            {
                return Ok(sent);
            }
            w.delta(id, &path, r, md, copy, false)
        })?;
        match sent {
            Some(Sent::Full) => self.done.full_files += 1,
            Some(Sent::Delta) => {
                self.done.delta_files += 1;
                // Installed by rename: the directory's time moves.
                for (parent, _) in self.plan.after.names(id) {
                    self.touched_parents.insert(*parent);
                }
            }
            Some(Sent::Ranges) => self.done.range_files += 1,
            None => {}
        }
        Ok(())
    }

    /// The leaves the ranges touched, as one `WriteRanges`; `None` when
    /// that does not fit (the file shrank, or grew by more than it is
    /// worth, or the leaves exceed one operation).
    fn ranges(
        &mut self,
        id: FileId,
        path: &RelPath,
        r: &mut Reading<'_>,
        copy: &ReplicaCopy,
        ranges: &[journal::ByteRange],
    ) -> Result<Option<Sent>, PushError> {
        let (old, size) = (copy.tree.size(), r.size);
        if size < old {
            return Ok(None);
        }
        let mut leaves: BTreeSet<u64> = ranges
            .iter()
            .flat_map(|b| leaves_of(b.offset, b.len, size))
            .collect();
        // Leaves a change of size alters, as `ContentTree::updated` rereads them.
        if size != old {
            leaves.extend(old / LEAF..leaf_count(size));
        }
        if leaf_count(size) == 1 {
            leaves.insert(0);
        }
        if leaves.is_empty() {
            // Marked changed, no byte written (an empty write).
            return Ok(Some(Sent::Ranges));
        }
        let bytes: u64 = leaves.iter().map(|i| leaf_span(*i, size).1 as u64).sum();
        if bytes > MAX_CHUNK_LEN || bytes > size / 2 {
            return Ok(None);
        }
        let src_err = read_err(path);
        let mut writes: Vec<WriteRange> = Vec::new();
        for i in &leaves {
            let (start, len) = leaf_span(*i, size);
            let mut buf = vec![0u8; len];
            r.at(&mut buf, start).map_err(src_err)?;
            match writes.last_mut() {
                Some(w) if w.offset + w.data.len() as u64 == start => w.data.extend(buf),
                _ => writes.push(WriteRange {
                    offset: start,
                    data: buf,
                }),
            }
        }
        let tree = copy
            .tree
            .updated(size, &leaves, |i, buf| {
                let (start, _) = leaf_span(i, size);
                let w = writes
                    .iter()
                    .find(|w| w.offset <= start && start < w.offset + w.data.len() as u64)
                    .expect("every reread leaf was read");
                let off = (start - w.offset) as usize;
                buf.copy_from_slice(&w.data[off..off + buf.len()]);
                Ok(())
            })
            .map_err(src_err)?;
        let signature = copy.patched_signature(size, &writes);
        self.owns_next(id);
        self.push(Op::WriteRanges {
            path: path.clone(),
            ranges: writes,
            base: copy.tree.root(),
            result: tree.root(),
        })?;
        self.remember(id, tree, signature);
        Ok(Some(Sent::Ranges))
    }

    /// Metadata of `id` at its path at the end of the batch: all of it when
    /// `full`, else what `change` says changed, and its times when `times`.
    fn metadata(
        &mut self,
        id: FileId,
        full: bool,
        change: Option<&FileChange>,
        times: bool,
    ) -> Result<(), PushError> {
        let Some((src, key)) = self.plan.journal.locate(id) else {
            return Ok(()); // gone since the barrier: the next push removes it
        };
        let Some(md) = self
            .plan
            .source
            .stat(&src, key)
            .map_err(self.source_err(&src))?
        else {
            return Ok(());
        };
        let Some(path) = self.plan.after.path_of(id) else {
            return Ok(());
        };
        let path = rel(&path)?;
        if full {
            let xattrs = self
                .plan
                .source
                .xattrs(&src)
                .map_err(self.source_err(&src))?;
            return self.all_metadata(id, path, &md, xattrs);
        }
        let m = change.map(|c| &c.metadata);
        if m.is_some_and(|m| m.owner) {
            self.push(Op::Chown {
                path: path.clone(),
                uid: md.uid(),
                gid: md.gid(),
            })?;
        }
        if !md.file_type().is_symlink() && m.is_some_and(|m| m.mode || m.owner) {
            self.push(Op::Chmod {
                path: path.clone(),
                mode: perm(&md),
            })?;
        }
        for name in m.into_iter().flat_map(|m| &m.xattrs) {
            let value = self
                .plan
                .source
                .xattr(&src, &name.0)
                .map_err(self.source_err(&src))?;
            let op = match value {
                Some(value) => Op::SetXattr {
                    path: path.clone(),
                    name: name.0.clone(),
                    value,
                },
                None => Op::RemoveXattr {
                    path: path.clone(),
                    name: name.0.clone(),
                },
            };
            self.push(op)?;
        }
        if times || m.is_some_and(|m| m.times) {
            self.push(Op::Utimes {
                path,
                atime: time(md.atime(), md.atime_nsec()),
                mtime: time(md.mtime(), md.mtime_nsec()),
            })?;
        }
        Ok(())
    }

    /// All the metadata `md` and `xattrs` describe, for the entry `id` at
    /// `path` (made by the batch, or sent anew). A new entry got its mode
    /// when it was made; only set-ID bits, which the chown before clears,
    /// need setting again (and the root's, which the batch does not make).
    fn all_metadata(
        &mut self,
        id: FileId,
        path: RelPath,
        md: &Metadata,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), PushError> {
        self.push(Op::Chown {
            path: path.clone(),
            uid: md.uid(),
            gid: md.gid(),
        })?;
        if !md.file_type().is_symlink() && (id == FileId::ROOT || perm(md) & 0o6000 != 0) {
            self.push(Op::Chmod {
                path: path.clone(),
                mode: perm(md),
            })?;
        }
        for (name, value) in xattrs {
            self.push(Op::SetXattr {
                path: path.clone(),
                name,
                value,
            })?;
        }
        self.push(Op::Utimes {
            path,
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hashed_beside_make_the_whole_tree_and_signature() {
        let data: Vec<u8> = (0..3 * PIECE as usize + 12_345)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let (mut tree, mut sig) = (TreeBuilder::new(), SignatureBuilder::new());
        for piece in data.chunks(PIECE as usize) {
            hash_piece(&mut tree, Some(&mut sig), piece);
        }
        assert_eq!(tree.finish(), ContentTree::of_bytes(&data));
        assert_eq!(sig.finish(), signature_of(&data));
    }
}
