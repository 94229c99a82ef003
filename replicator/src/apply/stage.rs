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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, fchmod, fchmodat, fstatat, mkdirat, mknodat,
};
use nix::unistd::symlinkat;

use super::ApplyError;
use super::commit::{Entry, Meta, Step, copy_meta};
use super::fsops::{Kind, Root, describe, hash_file};
use crate::batch::{BatchReader, Hash, NodeKind, Op, RelPath, WriteRange};

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

/// An in-place change to a replica file, pending until the commit.
#[derive(Debug, Clone)]
enum InPlace {
    Write(Vec<WriteRange>),
    Truncate(u64),
}

/// The streamed file being received (`BeginFile` .. `EndFile`).
struct Streamed {
    file: File,
    path: RelPath,
    id: u32,
    size: u64,
    mode: u32,
    result: Hash,
    index: u64,
}

pub struct Stager<'a> {
    root: &'a Root,
    staging: &'a OwnedFd,
    overlay: BTreeMap<RelPath, Node>,
    /// Pending in-place changes per replica inode, with a start path that
    /// holds the inode.
    pending: HashMap<u64, (RelPath, Vec<InPlace>)>,
    entries: Vec<Entry>,
    /// Replica inodes whose new content (a delta's result, for a file with
    /// several links) is in a staged file that the commit copies into
    /// them: later content changes in the batch go to that staged file.
    copied: HashMap<u64, u32>,
    /// Replica inodes the batch links to (which then have several links).
    linked: HashSet<u64>,
    next_id: u32,
    streamed: Option<Streamed>,
    /// The operation being staged (frame number, name, path).
    index: u64,
    op: &'static str,
    path: RelPath,
    staged: u64,
}

/// Sizes of the pieces the virtual hash reads.
const BLOCK: usize = 1 << 20;

/// How far in-place changes may grow a replica file in one batch.
const MAX_GROWTH: u64 = 16 << 30;

/// The largest base a delta is applied to (it is read into memory).
const MAX_DELTA_BASE: u64 = 4 << 30;

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
    pub fn new(root: &'a Root, staging: &'a OwnedFd) -> Stager<'a> {
        Stager {
            root,
            staging,
            overlay: BTreeMap::new(),
            pending: HashMap::new(),
            entries: Vec::new(),
            copied: HashMap::new(),
            linked: HashSet::new(),
            next_id: 0,
            streamed: None,
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

    /// Opens the staged file numbered `id` (staged files are named by number).
    fn open_staged(&self, id: u32, access: OFlag) -> Result<File, ApplyError> {
        let name = CString::new(id.to_string()).expect("digits");
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
    /// batch's trailer has been verified.
    pub fn run<R: Read>(
        mut self,
        reader: &mut BatchReader<R>,
    ) -> Result<(Vec<Entry>, u64), ApplyError> {
        while let Some(op) = reader.next_op()? {
            self.index = reader.stats().ops;
            self.op = op.name();
            if let Some(p) = op.paths().first() {
                self.path = (*p).clone();
            }
            self.stage(op)?;
        }
        Ok((self.entries, self.staged))
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

    fn new_id(&mut self) -> (u32, CString) {
        let id = self.next_id;
        self.next_id += 1;
        self.staged += 1;
        (id, CString::new(id.to_string()).expect("digits"))
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
        self.take_subtree(p);
        self.overlay.insert(
            p.clone(),
            Node::Staged {
                id,
                ino: st.st_ino,
                kind,
            },
        );
        self.push(Step::Install {
            id,
            path: p.clone(),
            ino: st.st_ino,
            replaces,
        });
    }

    fn create_staged_file(&mut self) -> Result<(u32, File), ApplyError> {
        let (id, name) = self.new_id();
        let fd = openat(
            self.staging,
            name.as_c_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.errno("creating the staged file", e))?;
        Ok((id, File::from(fd)))
    }

    /// Sets the mode, checks the content against `result`, fsyncs, and
    /// installs the staged file at `p`.
    fn finish_file(
        &mut self,
        p: &RelPath,
        id: u32,
        mut file: File,
        size: u64,
        mode: u32,
        result: Hash,
    ) -> Result<(), ApplyError> {
        file.set_len(size)
            .map_err(|e| self.io("sizing the staged file", e))?;
        fchmod(file.as_fd(), Mode::from_bits_retain(mode))
            .map_err(|e| self.errno("setting the mode", e))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| self.io("rereading", e))?;
        let got = hash_file(&mut file).map_err(|e| self.io("rereading", e))?;
        if got != result {
            return Err(self.err("the content does not match its result hash"));
        }
        file.sync_all().map_err(|e| self.io("fsync", e))?;
        let st = nix::sys::stat::fstat(file.as_fd()).map_err(|e| self.errno("fstat", e))?;
        self.install(p, id, &st);
        Ok(())
    }

    fn stage(&mut self, op: Op) -> Result<(), ApplyError> {
        match op {
            Op::Mkdir { path, mode } => {
                self.check_new(&path, true)?;
                let (id, name) = self.new_id();
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
                let (id, name) = self.new_id();
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
                let (id, name) = self.new_id();
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
            } => {
                self.check_new(&path, false)?;
                let (id, file) = self.create_staged_file()?;
                content
                    .for_each_piece(|off, piece| file.write_all_at(piece, off))
                    .map_err(|e| self.err(format!("writing the staged file: {e}")))?;
                self.finish_file(&path, id, file, content.size(), mode, result)?;
            }
            Op::BeginFile {
                path,
                mode,
                size,
                result,
            } => {
                self.check_new(&path, false)?;
                let (id, file) = self.create_staged_file()?;
                self.streamed = Some(Streamed {
                    file,
                    path,
                    id,
                    size,
                    mode,
                    result,
                    index: self.index,
                });
            }
            Op::FileData { offset, data } => {
                let s = self.streamed.as_ref().expect("the reader checks the order");
                self.path = s.path.clone();
                data.for_each_piece(offset, |off, piece| s.file.write_all_at(piece, off))
                    .map_err(|e| self.err(format!("writing the staged file: {e}")))?;
            }
            Op::EndFile => {
                let s = self.streamed.take().expect("the reader checks the order");
                self.path = s.path.clone();
                self.index = s.index;
                self.check_new(&s.path, false)?;
                self.finish_file(&s.path, s.id, s.file, s.size, s.mode, s.result)?;
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
            Op::Chmod { path, mode } => self.meta(path, Meta::Chmod(mode))?,
            Op::Chown { path, uid, gid } => self.meta(path, Meta::Chown(uid, gid))?,
            Op::Utimes { path, atime, mtime } => self.meta(path, Meta::Utimes(atime, mtime))?,
            Op::SetXattr { path, name, value } => self.meta(path, Meta::SetXattr(name, value))?,
            Op::RemoveXattr { path, name } => self.meta(path, Meta::RemoveXattr(name))?,
        }
        Ok(())
    }

    fn meta(&mut self, path: RelPath, meta: Meta) -> Result<(), ApplyError> {
        let n = self.need(&path)?;
        let kind = n.kind().expect("exists");
        self.push(Step::Meta {
            path,
            ino: n.ino(),
            kind,
            meta,
        });
        Ok(())
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

    /// Opens the replica file behind a `Replica` node for reading.
    fn open_replica(&self, start: &RelPath, ino: u64) -> Result<File, ApplyError> {
        let f = self
            .root
            .parent(start)
            .and_then(|p| p.open_file(false))
            .map_err(|e| self.errno(&format!("opening {start}"), e))?;
        let st = nix::sys::stat::fstat(f.as_fd()).map_err(|e| self.errno("fstat", e))?;
        if st.st_ino != ino {
            return Err(self.err(format!("{start} changed while the batch was staged")));
        }
        Ok(f)
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
                let (open_at, earlier) = self
                    .pending
                    .get(&ino)
                    .map(|(s, v)| (s.clone(), v.clone()))
                    .unwrap_or((start, Vec::new()));
                if let Some((base, result)) = hashes {
                    let f = self.open_replica(&open_at, ino)?;
                    let (b, r) = virtual_hashes(&f, &earlier, &change)
                        .map_err(|e| self.io("reading the file", e))?;
                    if b != base {
                        return Err(self.base_mismatch());
                    }
                    if r != result {
                        return Err(self.err("the writes do not produce the result hash"));
                    }
                }
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
                self.push(step);
                self.pending
                    .entry(ino)
                    .or_insert((open_at, Vec::new()))
                    .1
                    .push(change);
            }
            Node::Staged { id, .. } => {
                // Not visible yet: change the staged file itself.
                let mut f = self.open_staged(id, OFlag::O_RDWR)?;
                if let Some((base, _)) = hashes
                    && hash_file(&mut f).map_err(|e| self.io("reading", e))? != base
                {
                    return Err(self.base_mismatch());
                }
                match &change {
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
                if let Some((_, result)) = hashes {
                    f.seek(SeekFrom::Start(0))
                        .map_err(|e| self.io("reading", e))?;
                    if hash_file(&mut f).map_err(|e| self.io("reading", e))? != result {
                        return Err(self.err("the writes do not produce the result hash"));
                    }
                }
                f.sync_all().map_err(|e| self.io("fsync", e))?;
            }
            Node::Gone => unreachable!("looked up"),
        }
        Ok(())
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

    fn delta(
        &mut self,
        path: &RelPath,
        n: Node,
        base: Hash,
        delta: &[u8],
        result: Hash,
    ) -> Result<(), ApplyError> {
        let n = self.redirect(n);
        // The base content as it is at this point of the batch.
        let (mut basis, src) = match &n {
            Node::Replica { start, ino, .. } => {
                let (open_at, earlier) = self
                    .pending
                    .get(ino)
                    .map(|(s, v)| (s.clone(), v.clone()))
                    .unwrap_or((start.clone(), Vec::new()));
                let mut f = self.open_replica(&open_at, *ino)?;
                let disk = f.metadata().map_err(|e| self.io("stat", e))?.len();
                let refs: Vec<&InPlace> = earlier.iter().collect();
                if disk.max(size_after(disk, &refs)) > MAX_DELTA_BASE {
                    return Err(self.err(format!(
                        "the file is larger than {MAX_DELTA_BASE} bytes: send it with full content"
                    )));
                }
                let mut data = Vec::new();
                f.read_to_end(&mut data)
                    .map_err(|e| self.io("reading", e))?;
                for c in &earlier {
                    apply_in_memory(&mut data, c);
                }
                (data, f)
            }
            Node::Staged { id, .. } => {
                let mut f = self.open_staged(*id, OFlag::O_RDONLY)?;
                if f.metadata().map_err(|e| self.io("stat", e))?.len() > MAX_DELTA_BASE {
                    return Err(self.err(format!(
                        "the file is larger than {MAX_DELTA_BASE} bytes: send it with full content"
                    )));
                }
                let mut data = Vec::new();
                f.read_to_end(&mut data)
                    .map_err(|e| self.io("reading", e))?;
                (data, f)
            }
            Node::Gone => unreachable!("looked up"),
        };
        if Hash::of(&basis) != base {
            return Err(self.base_mismatch());
        }
        // A delta's output is bounded by what its copy commands can take
        // from the base and its literals; bound it so a hostile delta
        // cannot fill the disk.
        let limit = basis
            .len()
            .saturating_add(delta.len())
            .saturating_mul(16)
            .max(1 << 20);
        let (id, file) = self.create_staged_file()?;
        let mut out = HashingWriter {
            inner: io::BufWriter::new(&file),
            hasher: blake3::Hasher::new(),
        };
        fast_rsync::apply_limited(&basis, delta, &mut out, limit)
            .map_err(|e| self.err(format!("the delta does not apply: {e}")))?;
        let got: Hash = out.hasher.finalize().into();
        out.inner.flush().map_err(|e| self.io("writing", e))?;
        drop(out);
        basis.clear();
        if got != result {
            return Err(self.err("the delta does not produce the result hash"));
        }
        let st = nix::sys::stat::fstat(src.as_fd()).map_err(|e| self.errno("fstat", e))?;
        if let Node::Replica { ino, .. } = n
            && (st.st_nlink > 1 || self.linked.contains(&ino))
        {
            // The file has other links, which must see the new content as
            // they would after an in-place rewrite: the commit copies the
            // staged content into the inode instead of replacing it.
            file.sync_all().map_err(|e| self.io("fsync", e))?;
            self.copied.insert(ino, id);
            self.push(Step::CopyInto {
                id,
                path: path.clone(),
                ino,
            });
            return Ok(());
        }
        // A staged file replaced in staging keeps its metadata now; a
        // replica file's is copied at the commit, when the batch's earlier
        // metadata changes to it have been made.
        if matches!(n, Node::Staged { .. }) {
            copy_meta(&src, &file).map_err(|e| self.io("copying metadata", e))?;
        }
        file.sync_all().map_err(|e| self.io("fsync", e))?;
        let st = nix::sys::stat::fstat(file.as_fd()).map_err(|e| self.errno("fstat", e))?;
        match n {
            Node::Staged { id: old, .. } => {
                // Replace the staged file in staging (it is not visible):
                // it keeps its id, its inode changes.
                let old_name = CString::new(old.to_string()).expect("digits");
                let new_name = CString::new(id.to_string()).expect("digits");
                nix::fcntl::renameat(
                    self.staging,
                    new_name.as_c_str(),
                    self.staging,
                    old_name.as_c_str(),
                )
                .map_err(|e| self.errno("staging", e))?;
                self.staged -= 1;
                self.retarget(old, st.st_ino);
            }
            Node::Replica { ino, .. } => self.install_replacing(path, id, &st, Some(ino)),
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

struct HashingWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
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

/// The size after a list of changes, from `size`.
fn size_after(mut size: u64, changes: &[&InPlace]) -> u64 {
    for c in changes {
        match c {
            InPlace::Write(ranges) => {
                if let Some(r) = ranges.last() {
                    size = size.max(r.offset + r.data.len() as u64);
                }
            }
            InPlace::Truncate(s) => size = *s,
        }
    }
    size
}

/// Applies `c` to the block of the file at `[at, at + buf.len())`.
fn apply_to_block(buf: &mut [u8], at: u64, c: &InPlace) {
    let end = at + buf.len() as u64;
    match c {
        InPlace::Write(ranges) => {
            for r in ranges {
                let (ro, re) = (r.offset, r.offset + r.data.len() as u64);
                let (s, e) = (ro.max(at), re.min(end));
                if s < e {
                    buf[(s - at) as usize..(e - at) as usize]
                        .copy_from_slice(&r.data[(s - ro) as usize..(e - ro) as usize]);
                }
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

/// The hashes of the file with `earlier` applied, and with `earlier` and
/// then `change` applied, in one read of the file.
fn virtual_hashes(f: &File, earlier: &[InPlace], change: &InPlace) -> io::Result<(Hash, Hash)> {
    let disk = f.metadata()?.len();
    let refs: Vec<&InPlace> = earlier.iter().collect();
    let before = size_after(disk, &refs);
    let mut all = refs.clone();
    all.push(change);
    let after = size_after(disk, &all);
    // Hashing reads every byte up to the size: bound the work a hostile
    // offset can cause (holes beyond the file are hashed as zeros).
    if before.max(after) > disk.saturating_add(MAX_GROWTH) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("grows the file by more than {MAX_GROWTH} bytes"),
        ));
    }
    let (mut hb, mut ha) = (blake3::Hasher::new(), blake3::Hasher::new());
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0u64;
    while at < before.max(after) {
        let len = (before.max(after) - at).min(BLOCK as u64) as usize;
        let block = &mut buf[..len];
        block.fill(0);
        if at < disk {
            let want = ((disk - at) as usize).min(len);
            f.read_exact_at(&mut block[..want], at)?;
        }
        for c in &refs {
            apply_to_block(block, at, c);
        }
        if at < before {
            hb.update(&block[..((before - at) as usize).min(len)]);
        }
        apply_to_block(block, at, change);
        if at < after {
            ha.update(&block[..((after - at) as usize).min(len)]);
        }
        at += len as u64;
    }
    Ok((hb.finalize().into(), ha.finalize().into()))
}
