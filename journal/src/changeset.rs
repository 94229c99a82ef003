//! Changesets: the net effect of the records between two sequence numbers.
//!
//! A push takes a replica from the tree at `from` to the tree at `to`. What it
//! needs is not the records themselves but their net effect per file: which
//! files appeared and went away, their names before and after, which byte
//! ranges and which metadata changed. [`Changeset::compute`] folds the records
//! of `(from, to]` into that; [`Changeset::namespace_plan`] (in `plan`) turns
//! the change of names into namespace operations that can be applied one by
//! one, breaking swaps and cycles with temporary names as btrfs send does.
//!
//! A [`Namespace`] is the tree at one sequence number: the journal's table
//! (built by the table's one `apply`, so it cannot disagree with the mount's
//! table) plus an index from `(parent, name)` to the file.
//!
//! A push needs the trees at both ends. [`Namespace::advance`] makes the tree
//! at `from` into the tree at `to` in place and returns an [`Undo`]: what the
//! records replaced, for the files and names they touched. The tree at `from`
//! is then [`Namespace::rewound`]: the undo over the tree at `to`. Both cost
//! what changed; a copy of a tree of 100,000 files costs tens of
//! milliseconds, and as much again to free.
//!
//! A replica's first push starts from the tree holding the root alone, where
//! the general machinery has nothing to do: every file at `to` is new. There
//! [`Changeset::compute_and_advance`] folds the records over the tree as it
//! advances (it is the table that knows every file), and
//! [`Changeset::namespace_plan`] walks the tree at `to` from the root. Both
//! cost what the tree at `to` holds, once.
//!
//! Invariants of a `Changeset`: a file appears in `files` only if something
//! about it changed; a file that was created and removed within the range
//! does not appear at all; a rename chain shows only its two ends.

mod plan;
#[cfg(test)]
mod tests;

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use crate::id::{FileId, FileKind, Seq};
use crate::record::{ByteRange, Name, Op, Record};
use crate::table::{Entry, Table, renamed, touched};

pub use plan::{NsStep, PlanError, TEMP_PREFIX};

/// One name of a file: its parent directory and the name in it.
pub type Edge = (FileId, Name);

/// The tree at one sequence number: every file's kind and names, and which
/// file each `(parent, name)` holds.
#[derive(Clone, Debug, Default)]
pub struct Namespace {
    table: Table,
    /// `(parent, name)` -> the file with that name. Kept in step with the
    /// table's names by `apply`.
    entries: BTreeMap<Edge, FileId>,
}

impl Namespace {
    /// The tree before any record: the root directory alone.
    pub fn new() -> Namespace {
        Namespace {
            table: Table::new(),
            entries: BTreeMap::new(),
        }
    }

    /// The tree after the records with `seq <= upto` (records must come in
    /// sequence order; the first one past `upto` ends the replay).
    pub fn replay<R: Borrow<Record>>(records: impl IntoIterator<Item = R>, upto: Seq) -> Namespace {
        let mut ns = Namespace::new();
        for r in records {
            let r = r.borrow();
            if r.seq > upto {
                break;
            }
            ns.apply(r);
        }
        ns
    }

    /// The tree a table describes (the log's base after compaction).
    pub(crate) fn from_table(table: Table) -> Namespace {
        let mut entries = BTreeMap::new();
        for (id, e) in table.entries() {
            for edge in &e.names {
                entries.insert(edge.clone(), id);
            }
        }
        Namespace { table, entries }
    }

    /// Records that make an empty tree into this one: an `Exists` for each
    /// file at its first name, parents before children, then a `Link` for
    /// each further name; all numbered `seq`. (How a replica that starts
    /// from nothing is sent a tree whose early records were compacted.)
    pub(crate) fn inventory(&self, seq: Seq) -> Vec<Record> {
        let mut out = Vec::new();
        let mut links = Vec::new();
        self.walk(|dir, _, name, id, e, first| {
            let (parent, name) = (dir, name.clone());
            if !first {
                links.push(Op::Link {
                    id,
                    parent,
                    name,
                    origin: crate::record::Origin::Reconcile,
                });
                return;
            }
            out.push(Op::Exists {
                id,
                parent,
                name,
                kind: e.kind,
                key: e.key.unwrap_or(crate::id::InodeKey { dev: 0, ino: 0 }),
            });
        });
        out.into_iter()
            .chain(links)
            .map(|op| Record {
                seq,
                unix_ns: 0,
                op,
            })
            .collect()
    }

    /// Visits every name of the tree, breadth-first from the root and in
    /// name order within a directory: `visit(dir, dir_path, name, id, entry,
    /// first)`, where `first` says that the name is the file's first (a
    /// directory's only) name and `dir_path` is the directory's path.
    ///
    /// A directory's entries come after its own name, so a walk that makes
    /// each file at its first name and its further names at the end makes
    /// every parent before its children: how a tree is made from nothing.
    fn walk(&self, mut visit: impl FnMut(FileId, &Path, &Name, FileId, &Entry, bool)) {
        let mut queue = VecDeque::from([(FileId::ROOT, PathBuf::new())]);
        while let Some((dir, path)) = queue.pop_front() {
            for (name, id) in self.children(dir) {
                // The root is nobody's entry; a damaged table must not loop.
                let Some(e) = self.table.get(id).filter(|_| id != FileId::ROOT) else {
                    continue;
                };
                let first = e.names.first().is_some_and(|(p, n)| *p == dir && n == name);
                if first && e.kind == FileKind::Dir {
                    queue.push_back((id, path.join(name.as_os())));
                }
                visit(dir, &path, name, id, e, first);
            }
        }
    }

    /// Whether the tree holds the root alone, as [`Namespace::new`] does.
    fn holds_root_alone(&self) -> bool {
        self.is_empty() && self.names(FileId::ROOT).is_empty()
    }

    /// Applies one record, through the table's `apply`.
    pub fn apply(&mut self, r: &Record) {
        self.apply_noting(r, None);
    }

    /// Applies the records after this tree's sequence number in place (the
    /// others are skipped, as [`Changeset::compute`] does), making it the
    /// tree at the last of them, and returns what they replaced: with it,
    /// [`rewound`](Self::rewound) still shows the tree as it was.
    ///
    /// Costs time in the number of records and the files they name, not in
    /// the size of the tree.
    pub fn advance<R: Borrow<Record>>(&mut self, records: impl IntoIterator<Item = R>) -> Undo {
        let from = self.seq();
        let records = records.into_iter().filter(|r| r.borrow().seq > from);
        if self.holds_root_alone() {
            // Nothing to note: the tree at `from` is kept whole, for the
            // price of the root.
            let base = self.clone();
            for r in records {
                self.apply(r.borrow());
            }
            return Undo::over_root(base, self.seq());
        }
        let mut undo = Undo {
            from,
            to: from,
            files: HashMap::new(),
            edges: BTreeMap::new(),
            base: None,
        };
        for r in records {
            self.apply_noting(r.borrow(), Some(&mut undo));
        }
        undo.to = self.seq();
        undo
    }

    /// The tree as it was before the records `undo` comes from: `undo` over
    /// this tree. `undo` must come from [`advance`](Self::advance) on this
    /// tree, with nothing applied since.
    pub fn rewound<'a>(&'a self, undo: &'a Undo) -> Rewound<'a> {
        debug_assert_eq!(self.seq(), undo.to, "an undo of another tree");
        Rewound {
            now: undo.base.as_ref().unwrap_or(self),
            undo: Some(undo),
        }
    }

    /// Applies one record; with `undo`, first notes there what it will
    /// change that `undo` does not hold yet (see [`Undo`] for why this is
    /// all that changes).
    fn apply_noting(&mut self, r: &Record, mut undo: Option<&mut Undo>) {
        let ids = renamed(&r.op);
        for id in ids.clone() {
            let e = self.table.get(id);
            if let Some(u) = undo.as_deref_mut() {
                u.files
                    .entry(id)
                    .or_insert_with(|| e.map(|e| (e.kind, e.names.clone())));
            }
            let Some(e) = e else { continue };
            for edge in &e.names {
                let holder = self.entries.get(edge).copied();
                if let Some(u) = undo.as_deref_mut() {
                    u.note_edge(edge, holder);
                }
                if holder == Some(id) {
                    self.entries.remove(edge);
                }
            }
        }
        self.table.apply(r);
        for id in ids {
            if let Some(e) = self.table.get(id) {
                for edge in &e.names {
                    if let Some(u) = undo.as_deref_mut() {
                        // Not removed above unless noted there: what it
                        // holds now is what it held before the record.
                        u.note_edge(edge, self.entries.get(edge).copied());
                    }
                    self.entries.insert(edge.clone(), id);
                }
            }
        }
    }

    pub(crate) fn table(&self) -> &Table {
        &self.table
    }

    /// The sequence number of the last record applied.
    pub fn seq(&self) -> Seq {
        self.table.last_seq()
    }

    pub fn contains(&self, id: FileId) -> bool {
        self.table.contains(id)
    }

    pub fn kind(&self, id: FileId) -> Option<FileKind> {
        self.table.get(id).map(|e| e.kind)
    }

    /// Every name of `id` (several only for hard links; none for the root or
    /// an unknown file), in the order the table keeps them.
    pub fn names(&self, id: FileId) -> &[Edge] {
        self.table
            .get(id)
            .map(|e| e.names.as_slice())
            .unwrap_or(&[])
    }

    /// The file named `name` in directory `parent`.
    pub fn lookup(&self, parent: FileId, name: &Name) -> Option<FileId> {
        self.entries.get(&(parent, name.clone())).copied()
    }

    /// The entries of directory `parent`, in name order.
    pub fn children(&self, parent: FileId) -> impl Iterator<Item = (&Name, FileId)> + '_ {
        self.entries
            .range(under(parent))
            .map(|((_, n), id)| (n, *id))
    }

    /// Every `(parent, name) -> file` of the tree, in `(parent, name)` order.
    pub fn edges(&self) -> impl Iterator<Item = (&Edge, FileId)> + '_ {
        self.entries.iter().map(|(e, id)| (e, *id))
    }

    /// The path of `id` relative to the root, through its first name.
    pub fn path_of(&self, id: FileId) -> Option<PathBuf> {
        self.table.path_of(id)
    }

    /// The path of the name `name` in directory `parent`.
    pub fn edge_path(&self, parent: FileId, name: &Name) -> Option<PathBuf> {
        let mut p = self.path_of(parent)?;
        p.push(name.as_os());
        Some(p)
    }

    /// Number of files, the root included.
    pub fn len(&self) -> u64 {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }
}

/// What [`Namespace::advance`] replaced: for every file whose names the
/// records may change (the ids `table::renamed` gives: those namespace
/// records name) its kind and names before the first of them, and for every
/// `(parent, name)` among those files' names before or after any record, the
/// file it held before the first.
///
/// Invariant: every other file and edge is the same at `from` as at `to`.
/// It holds because `Namespace::apply` changes kinds and names only of the
/// files `renamed` gives (the table's `apply` touches no other file's names;
/// it may clear another file's inode key, which a `Rewound` does not show),
/// and changes entries only at those files' names before and after the
/// record; `apply_noting` notes each one before its first change. So
/// [`Rewound`] answers from here for what is noted and from the tree at `to`
/// for the rest.
///
/// When the tree at `from` held the root alone (a replica's first push),
/// nothing is noted: the undo keeps that tree itself (`base`), which costs
/// less than noting every file, and [`Rewound`] answers from it.
#[derive(Clone, Debug)]
pub struct Undo {
    from: Seq,
    to: Seq,
    /// Each touched file's kind and names at `from`; `None`: it did not exist.
    files: HashMap<FileId, Option<(FileKind, Vec<Edge>)>>,
    /// Each touched edge's file at `from`; `None`: the name was free.
    edges: BTreeMap<Edge, Option<FileId>>,
    /// The tree at `from`, when it held the root alone; then `files` and
    /// `edges` are empty.
    base: Option<Namespace>,
}

impl Undo {
    /// The undo of records applied to `base`, a tree holding the root alone,
    /// up to `to`.
    fn over_root(base: Namespace, to: Seq) -> Undo {
        debug_assert!(base.holds_root_alone());
        Undo {
            from: base.seq(),
            to,
            files: HashMap::new(),
            edges: BTreeMap::new(),
            base: Some(base),
        }
    }

    /// Keeps the first value seen: the one at `from`.
    fn note_edge(&mut self, edge: &Edge, holder: Option<FileId>) {
        if !self.edges.contains_key(edge) {
            self.edges.insert(edge.clone(), holder);
        }
    }
}

/// A read-only view of the tree at an earlier sequence number: a tree now
/// with an [`Undo`] over it ([`Namespace::rewound`]), or a plain
/// [`Namespace`] (`From`). Answers as the [`Namespace`] at
/// [`seq`](Self::seq) would.
#[derive(Clone, Copy, Debug)]
pub struct Rewound<'a> {
    /// The tree the undo is read over: the tree at `to`, or the undo's own
    /// base.
    now: &'a Namespace,
    undo: Option<&'a Undo>,
}

impl<'a> From<&'a Namespace> for Rewound<'a> {
    fn from(ns: &'a Namespace) -> Rewound<'a> {
        Rewound {
            now: ns,
            undo: None,
        }
    }
}

impl<'a> Rewound<'a> {
    /// The sequence number of the last record applied.
    pub fn seq(&self) -> Seq {
        self.undo.map_or(self.now.seq(), |u| u.from)
    }

    /// Whether the tree holds the root alone. Known only of a tree read
    /// whole (a plain [`Namespace`], or an undo's base); false for a view
    /// through noted changes, whatever they are.
    pub(crate) fn holds_root_alone(&self) -> bool {
        self.undo.is_none_or(|u| u.base.is_some()) && self.now.holds_root_alone()
    }

    /// What the undo says of `id`, when the records touched it.
    fn was(&self, id: FileId) -> Option<Option<&'a (FileKind, Vec<Edge>)>> {
        self.undo?.files.get(&id).map(Option::as_ref)
    }

    pub fn contains(&self, id: FileId) -> bool {
        match self.was(id) {
            Some(was) => was.is_some(),
            None => self.now.contains(id),
        }
    }

    pub fn kind(&self, id: FileId) -> Option<FileKind> {
        match self.was(id) {
            Some(was) => was.map(|(kind, _)| *kind),
            None => self.now.kind(id),
        }
    }

    /// As [`Namespace::names`].
    pub fn names(&self, id: FileId) -> &'a [Edge] {
        match self.was(id) {
            Some(was) => was.map_or(&[], |(_, names)| names.as_slice()),
            None => self.now.names(id),
        }
    }

    /// The file named `name` in directory `parent`.
    pub fn lookup(&self, parent: FileId, name: &Name) -> Option<FileId> {
        self.at(&(parent, name.clone()))
    }

    pub(crate) fn at(&self, edge: &Edge) -> Option<FileId> {
        match self.undo.and_then(|u| u.edges.get(edge)) {
            Some(holder) => *holder,
            None => self.now.entries.get(edge).copied(),
        }
    }

    /// The entries of directory `parent`, in name order.
    pub fn children(&self, parent: FileId) -> impl Iterator<Item = (&'a Name, FileId)> + 'a {
        let undo = self.undo;
        // Two sorted, disjoint sequences: the entries the records left
        // alone, and the noted ones that held a file; merged by name.
        let mut now = self
            .now
            .entries
            .range(under(parent))
            .filter(move |(edge, _)| !undo.is_some_and(|u| u.edges.contains_key(*edge)))
            .map(|(edge, id)| (edge, *id))
            .peekable();
        let mut was = undo
            .into_iter()
            .flat_map(move |u| u.edges.range(under(parent)))
            .filter_map(|(edge, holder)| holder.map(|id| (edge, id)))
            .peekable();
        std::iter::from_fn(move || {
            let from_now = match (now.peek(), was.peek()) {
                (Some(a), Some(b)) => a.0 < b.0,
                (a, _) => a.is_some(),
            };
            if from_now { now.next() } else { was.next() }
        })
        .map(|((_, name), id)| (name, id))
    }
}

/// The bounds of the keys `(parent, _)` of a map keyed by edges.
fn under(parent: FileId) -> (Bound<Edge>, Bound<Edge>) {
    let lo = Bound::Included((parent, Name(Vec::new())));
    let hi = match parent.0.checked_add(1) {
        Some(next) => Bound::Excluded((FileId(next), Name(Vec::new()))),
        None => Bound::Unbounded,
    };
    (lo, hi)
}

/// The net effect of the records in `(from, to]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changeset {
    pub from: Seq,
    pub to: Seq,
    pub files: BTreeMap<FileId, FileChange>,
}

/// What happened to one file between `from` and `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileChange {
    pub kind: FileKind,
    /// False: the file was created in `(from, to]` (and still exists).
    pub existed_before: bool,
    /// False: the file was removed by `to` (and existed at `from`).
    pub exists_after: bool,
    /// The file's names at `from`, sorted; empty when it did not exist.
    pub names_before: Vec<Edge>,
    /// The file's names at `to`, sorted; empty when it is gone.
    pub names_after: Vec<Edge>,
    pub content: ContentChange,
    pub metadata: MetadataChange,
}

impl FileChange {
    pub fn created(&self) -> bool {
        !self.existed_before
    }

    pub fn removed(&self) -> bool {
        !self.exists_after
    }

    /// Whether the file's set of names changed.
    pub fn names_changed(&self) -> bool {
        self.names_before != self.names_after
    }
}

/// How a file's bytes changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ContentChange {
    #[default]
    Unchanged,
    /// Changed in place. The replica's copy becomes the source's by:
    /// truncating to `truncated_to` (when set), writing `ranges` read from the
    /// source, then setting the size to the source's size.
    Ranges {
        /// Sorted, disjoint and not adjacent (merged).
        ranges: Vec<ByteRange>,
        /// The smallest size a truncation gave the file in the range. Bytes
        /// past it that are not in `ranges` are zeros at the source (holes).
        truncated_to: Option<u64>,
    },
    /// The whole content must be treated as new: the file was created in the
    /// range (its content is sent whole) or rewritten wholesale (a delta
    /// against what the replica holds).
    Rewritten,
}

/// Which metadata changed. The final values are read from the source when
/// the batch is made; the changeset says only what to read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetadataChange {
    /// Permission bits.
    pub mode: bool,
    /// uid or gid.
    pub owner: bool,
    /// atime or mtime: set explicitly, or moved by a change of content or,
    /// for a directory, of its entries.
    pub times: bool,
    /// Extended attributes set or removed, by name. For a created file this
    /// is what the records said; the push must copy all of its xattrs.
    pub xattrs: BTreeSet<Name>,
}

impl MetadataChange {
    pub fn is_empty(&self) -> bool {
        !self.mode && !self.owner && !self.times && self.xattrs.is_empty()
    }

    fn all() -> MetadataChange {
        MetadataChange {
            mode: true,
            owner: true,
            times: true,
            xattrs: BTreeSet::new(),
        }
    }
}

/// Per-file state while folding records.
#[derive(Default)]
struct Fold {
    created: bool,
    rewritten: bool,
    dirty: bool,
    /// Unsorted until the end; clipped by each truncation.
    ranges: Vec<ByteRange>,
    truncated_to: Option<u64>,
    metadata: MetadataChange,
}

impl Fold {
    fn content(&mut self) -> ContentChange {
        if self.created || self.rewritten {
            return ContentChange::Rewritten;
        }
        if !self.dirty && self.ranges.is_empty() && self.truncated_to.is_none() {
            return ContentChange::Unchanged;
        }
        ContentChange::Ranges {
            ranges: merge_ranges(std::mem::take(&mut self.ranges)),
            truncated_to: self.truncated_to,
        }
    }
}

/// Sorts ranges and merges the overlapping and adjacent ones; drops empty ones.
pub fn merge_ranges(mut ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    ranges.retain(|r| r.len > 0);
    ranges.sort_unstable();
    let mut out: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.offset <= last.end() => {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
            }
            _ => out.push(r),
        }
    }
    out
}

/// The table the records are applied to while they are folded: the tree at
/// `to`, as far as the fold needs it.
enum After<'a> {
    /// The files the records name (`ids`), from the tree at `from` (only
    /// those, so that the cost does not grow with the tree); every other
    /// file keeps its names.
    Named { table: Table, ids: HashSet<FileId> },
    /// The whole tree, advanced in place from a tree holding the root alone.
    Whole(&'a mut Namespace),
}

impl After<'_> {
    fn contains(&self, id: FileId) -> bool {
        match self {
            After::Named { table, .. } => table.contains(id),
            After::Whole(tree) => tree.contains(id),
        }
    }

    fn apply(&mut self, r: &Record) {
        match self {
            After::Named { table, .. } => table.apply(r),
            After::Whole(tree) => tree.apply(r),
        }
    }

    /// The file at `to`; `None` when it is gone (or never was).
    fn get<'e>(&'e self, id: FileId, before: &'e Namespace) -> Option<&'e Entry> {
        match self {
            // A directory that is only the parent of a change keeps its names.
            After::Named { ids, .. } if !ids.contains(&id) => before.table.get(id),
            After::Named { table, .. } => table.get(id),
            After::Whole(tree) => tree.table.get(id),
        }
    }
}

/// The changeset of `records` (those after `before`, in order) over
/// `before`, the tree at `from`, applying them to `after` as they come.
fn fold<'r>(
    before: &Namespace,
    records: impl IntoIterator<Item = &'r Record>,
    mut after: After<'_>,
) -> Changeset {
    let from = before.seq();
    let mut to = from;
    let mut folds: BTreeMap<FileId, Fold> = BTreeMap::new();
    // Directories whose entries changed: their mtime moved at the source.
    let mut parents: BTreeSet<FileId> = BTreeSet::new();
    for r in records {
        to = to.max(r.seq);
        let known = r.op.file_id().is_some_and(|id| after.contains(id));
        // A file new to the replica: created, or found by the inventory
        // when `from` is before it.
        let new = matches!(&r.op, Op::Exists { id, .. } | Op::Create { id, .. }
            if !known && !before.contains(*id));
        if let (true, Some(id)) = (new, r.op.file_id()) {
            folds.entry(id).or_default().created = true;
        }
        after.apply(r);
        if !known && !new {
            continue;
        }
        match &r.op {
            Op::MountStart { .. } | Op::MountStop | Op::Clean { .. } => {}
            // A further name found by the inventory is a new entry too.
            Op::Exists { parent, .. }
            | Op::Create { parent, .. }
            | Op::Link { parent, .. }
            | Op::Unlink { parent, .. }
            | Op::Rmdir { parent, .. } => {
                parents.insert(*parent);
            }
            Op::Rename {
                from_parent,
                to_parent,
                ..
            } => {
                parents.insert(*from_parent);
                parents.insert(*to_parent);
            }
            Op::Dirty { id } => {
                let f = folds.entry(*id).or_default();
                f.dirty = true;
                f.metadata.times = true;
            }
            Op::Write { id, ranges } => {
                let f = folds.entry(*id).or_default();
                if !f.rewritten && !f.created {
                    f.ranges.extend(ranges.iter().copied());
                }
                f.metadata.times = true;
            }
            Op::Truncate { id, size } => {
                let f = folds.entry(*id).or_default();
                if !f.rewritten && !f.created {
                    // Bytes past the new size are gone; if the file grows
                    // again they come back as zeros, not as what was written.
                    f.ranges.retain_mut(|r| {
                        r.len = r.end().min(*size).saturating_sub(r.offset);
                        r.len > 0
                    });
                    f.truncated_to = Some(f.truncated_to.map_or(*size, |t| t.min(*size)));
                }
                f.metadata.times = true;
            }
            Op::Rewritten { id, .. } => {
                let f = folds.entry(*id).or_default();
                f.rewritten = true;
                f.ranges = Vec::new();
                f.truncated_to = None;
                f.metadata.times = true;
            }
            Op::SetAttr { id, change, .. } => {
                let m = &mut folds.entry(*id).or_default().metadata;
                m.mode |= change.mode.is_some();
                m.owner |= change.uid.is_some() || change.gid.is_some();
                m.times |= change.atime.is_some() || change.mtime.is_some();
            }
            Op::SetXattr { id, name, .. } | Op::RemoveXattr { id, name, .. } => {
                folds
                    .entry(*id)
                    .or_default()
                    .metadata
                    .xattrs
                    .insert(name.clone());
            }
        }
    }
    for p in parents {
        folds.entry(p).or_default().metadata.times = true;
    }
    // Every file the records name is a candidate, even with nothing folded
    // into it (a rename changes only names). In a whole tree grown from the
    // root alone, every file but the root was created by a record, which
    // folded into it; the others the records name exist at neither end.
    match &after {
        After::Named { ids, .. } => {
            for id in ids {
                folds.entry(*id).or_default();
            }
        }
        After::Whole(_) => {
            folds.entry(FileId::ROOT).or_default();
        }
    }

    // In id order, as `folds` is.
    let mut files = Vec::with_capacity(folds.len());
    for (id, mut fold) in folds {
        let was = before.table.get(id);
        let now = after.get(id, before);
        let (existed_before, exists_after) = (was.is_some(), now.is_some());
        let Some(kind) = was.or(now).map(|e| e.kind) else {
            // Created and removed within the range: nothing to send.
            continue;
        };
        let sorted = |e: Option<&Entry>| {
            let mut v = e.map_or_else(Vec::new, |e| e.names.clone());
            v.sort();
            v
        };
        let names_before = sorted(was);
        let names_after = sorted(now);
        let (content, metadata) = if !exists_after {
            (ContentChange::Unchanged, MetadataChange::default())
        } else if !existed_before {
            let mut m = MetadataChange::all();
            m.xattrs = std::mem::take(&mut fold.metadata.xattrs);
            let content = if kind == FileKind::Dir {
                ContentChange::Unchanged
            } else {
                ContentChange::Rewritten
            };
            (content, m)
        } else {
            let content = if kind == FileKind::Dir {
                ContentChange::Unchanged
            } else {
                fold.content()
            };
            (content, fold.metadata)
        };
        let change = FileChange {
            kind,
            existed_before,
            exists_after,
            names_before,
            names_after,
            content,
            metadata,
        };
        let unchanged = existed_before
            && exists_after
            && !change.names_changed()
            && change.content == ContentChange::Unchanged
            && change.metadata.is_empty();
        if !unchanged {
            files.push((id, change));
        }
    }
    Changeset {
        from,
        to,
        files: files.into_iter().collect(),
    }
}

impl Changeset {
    /// Folds the records of `(from, to]` over the tree at `from`.
    ///
    /// `before` is the namespace at `from` (`before.seq()` is taken as
    /// `from`); `records` are the records with seq in `(from, to]`, in order
    /// (records at or before `from` are skipped, so a log read from its start
    /// may be passed, cut at `to`).
    /// Costs time in the number of records and the files they name, not in
    /// the size of the tree.
    ///
    /// Records about files unknown at that point change nothing, as in the
    /// table (a write to a file unlinked while open). A `Dirty` record without
    /// the `Write` records that follow it reads as "changed, no bytes known
    /// yet": the caller must have the journal record pending ranges before it
    /// chooses `to`.
    pub fn compute<R: Borrow<Record>>(
        before: &Namespace,
        records: impl IntoIterator<Item = R>,
    ) -> Changeset {
        let from = before.seq();
        let records: Vec<R> = records
            .into_iter()
            .filter(|r| r.borrow().seq > from)
            .collect();

        // The names after: the table's own `apply`, run over a table that
        // holds only the files the records name, so the cost does not grow
        // with the tree.
        let mut ids: HashSet<FileId> = HashSet::new();
        for r in &records {
            ids.extend(touched(&r.borrow().op));
        }
        let seed = ids
            .iter()
            .filter(|id| **id != FileId::ROOT)
            .filter_map(|id| before.table.get(*id).map(|e| (*id, e.clone())));
        let table = Table::from_parts(seed, before.table.next_id(), from);
        fold(
            before,
            records.iter().map(Borrow::borrow),
            After::Named { table, ids },
        )
    }

    /// [`compute`](Self::compute) over `tree`, the tree at `from`, then
    /// [`Namespace::advance`] of `tree` by the same records, in place: what a
    /// push needs. `None`, with `tree` left as it was, when the changeset is
    /// empty.
    ///
    /// When `tree` holds the root alone (a replica's first push, where every
    /// file at `to` is new), the records are folded over `tree` itself as it
    /// advances: the table of the files the records name that `compute`
    /// builds would be the whole tree at `to`, built a second time. The
    /// changeset is the same.
    pub fn compute_and_advance(
        tree: &mut Namespace,
        records: &[Record],
    ) -> Option<(Changeset, Undo)> {
        if !tree.holds_root_alone() {
            let changes = Changeset::compute(tree, records);
            if changes.is_empty() {
                return None;
            }
            let undo = tree.advance(records);
            return Some((changes, undo));
        }
        let base = tree.clone();
        let from = base.seq();
        let records = records.iter().filter(|r| r.seq > from);
        let changes = fold(&base, records, After::Whole(tree));
        if changes.is_empty() {
            *tree = base;
            return None;
        }
        let undo = Undo::over_root(base, tree.seq());
        Some((changes, undo))
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}
