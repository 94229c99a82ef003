//! The inode/path table: which files exist, their names, their inode keys,
//! whether they are dirty, and the stat snapshot a reconcile compares against.
//!
//! `Table::apply` is the one place that changes the table from records. The
//! mount's live table, the writer's checkpoint copy, recovery's replay and
//! `PathTracker` all run the same `apply`, so they cannot disagree.
//! Snapshots are the only state not carried by records; reconcile sets them.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::id::{FileId, FileKind, InodeKey, Seq};
use crate::record::{Name, Op, Record, RenameMode, Timestamp};

/// What a reconcile scan compares a clean file against.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// False once the mount changed the file in a way that moves its ctime
    /// (rename, link, chmod...): the new ctime is unknown, so a reconcile
    /// must not read a ctime difference as a content change.
    pub ctime_valid: bool,
}

impl Snapshot {
    pub fn of(md: &std::fs::Metadata) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        Snapshot {
            size: md.size(),
            mtime: Timestamp {
                sec: md.mtime(),
                nsec: md.mtime_nsec().clamp(0, 999_999_999) as u32,
            },
            ctime: Timestamp {
                sec: md.ctime(),
                nsec: md.ctime_nsec().clamp(0, 999_999_999) as u32,
            },
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            ctime_valid: true,
        }
    }
}

/// One file of the table. Stored as is (postcard) in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub kind: FileKind,
    /// `None` once the inode number was found reused by another file.
    pub key: Option<InodeKey>,
    /// Every `(parent, name)` of the file; several only for hard links.
    /// Empty only for the root.
    pub names: Vec<(FileId, Name)>,
    pub dirty: bool,
    /// Rewritten since it was last clean: further ranges add nothing.
    pub rewritten: bool,
    pub snap: Option<Snapshot>,
}

/// The table. `Clone` because the writer keeps its own copy for checkpoints.
#[derive(Clone, Debug)]
pub(crate) struct Table {
    files: HashMap<FileId, Entry>,
    by_key: HashMap<InodeKey, FileId>,
    /// The next FileId to hand out; never goes down, so ids are never reused.
    next_id: u64,
    last_seq: Seq,
    dirty: u64,
}

impl Default for Table {
    fn default() -> Self {
        Table::new()
    }
}

impl Table {
    /// A table holding only the root directory.
    pub fn new() -> Table {
        let mut files = HashMap::new();
        files.insert(
            FileId::ROOT,
            Entry {
                kind: FileKind::Dir,
                key: None,
                names: Vec::new(),
                dirty: false,
                rewritten: false,
                snap: None,
            },
        );
        Table {
            files,
            by_key: HashMap::new(),
            next_id: FileId::ROOT.0 + 1,
            last_seq: Seq(0),
            dirty: 0,
        }
    }

    /// Rebuilds a table from checkpointed entries.
    pub fn from_parts(
        entries: impl IntoIterator<Item = (FileId, Entry)>,
        next_id: u64,
        last_seq: Seq,
    ) -> Table {
        let mut t = Table::new();
        for (id, e) in entries {
            if let Some(k) = e.key {
                t.by_key.insert(k, id);
            }
            if e.dirty {
                t.dirty += 1;
            }
            t.files.insert(id, e);
        }
        t.dirty = t.files.values().filter(|e| e.dirty).count() as u64;
        t.next_id = next_id.max(t.next_id);
        t.last_seq = last_seq;
        t
    }

    pub fn get(&self, id: FileId) -> Option<&Entry> {
        self.files.get(&id)
    }

    pub fn contains(&self, id: FileId) -> bool {
        self.files.contains_key(&id)
    }

    pub fn lookup(&self, key: InodeKey) -> Option<FileId> {
        self.by_key.get(&key).copied()
    }

    pub fn entries(&self) -> impl Iterator<Item = (FileId, &Entry)> {
        self.files.iter().map(|(id, e)| (*id, e))
    }

    pub fn len(&self) -> u64 {
        self.files.len() as u64
    }

    pub fn dirty_count(&self) -> u64 {
        self.dirty
    }

    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Hands out a new FileId. The id becomes part of the table only when
    /// the record naming it is applied; `next_id` is persisted with it.
    pub fn alloc_id(&mut self) -> FileId {
        let id = FileId(self.next_id);
        self.next_id += 1;
        id
    }

    /// Points the root at the source directory's inode (it is not recorded:
    /// the root exists by definition).
    pub fn set_root(&mut self, key: InodeKey, snap: Snapshot) {
        self.set_snapshot(FileId::ROOT, key, snap);
    }

    /// Records what a scan saw of a file: its inode key and its stat.
    pub fn set_snapshot(&mut self, id: FileId, key: InodeKey, snap: Snapshot) {
        let Some(e) = self.files.get_mut(&id) else {
            return;
        };
        if e.key != Some(key) {
            if let Some(old) = e.key
                && self.by_key.get(&old) == Some(&id)
            {
                self.by_key.remove(&old);
            }
            if let Some(other) = self.by_key.insert(key, id)
                && other != id
                && let Some(o) = self.files.get_mut(&other)
            {
                o.key = None;
            }
            if let Some(e) = self.files.get_mut(&id) {
                e.key = Some(key);
            }
        }
        if let Some(e) = self.files.get_mut(&id) {
            e.snap = Some(snap);
        }
    }

    /// The path of `id` relative to the root, through each file's first name.
    pub fn path_of(&self, id: FileId) -> Option<PathBuf> {
        let mut parts: Vec<&Name> = Vec::new();
        let mut cur = id;
        while cur != FileId::ROOT {
            // A cycle cannot come from well-formed records; the bound keeps a
            // damaged table from hanging a caller.
            if parts.len() > 4096 {
                return None;
            }
            let (parent, name) = self.files.get(&cur)?.names.first()?;
            parts.push(name);
            cur = *parent;
        }
        let mut p = PathBuf::new();
        for n in parts.iter().rev() {
            p.push(n.as_os());
        }
        Some(p)
    }

    fn set_dirty(&mut self, id: FileId, rewritten: bool) {
        if let Some(e) = self.files.get_mut(&id) {
            if !e.dirty {
                e.dirty = true;
                self.dirty += 1;
            }
            e.rewritten |= rewritten;
        }
    }

    fn set_clean(&mut self, id: FileId) {
        if let Some(e) = self.files.get_mut(&id) {
            if e.dirty {
                e.dirty = false;
                self.dirty -= 1;
            }
            e.rewritten = false;
        }
    }

    fn insert_new(
        &mut self,
        id: FileId,
        kind: FileKind,
        key: InodeKey,
        parent: FileId,
        name: &Name,
        dirty: bool,
    ) {
        // An inode number still mapped to another id means that file died
        // behind our back and the number was reused: the old id loses its key.
        if let Some(old) = self.by_key.insert(key, id)
            && old != id
            && let Some(e) = self.files.get_mut(&old)
        {
            e.key = None;
        }
        let entry = Entry {
            kind,
            key: Some(key),
            names: vec![(parent, name.clone())],
            dirty,
            rewritten: false,
            snap: None,
        };
        if let Some(prev) = self.files.insert(id, entry)
            && prev.dirty
        {
            self.dirty -= 1;
        }
        if dirty {
            self.dirty += 1;
        }
        self.next_id = self.next_id.max(id.0 + 1);
    }

    fn remove_entry(&mut self, id: FileId) {
        if id == FileId::ROOT {
            return;
        }
        if let Some(e) = self.files.remove(&id) {
            if let Some(k) = e.key
                && self.by_key.get(&k) == Some(&id)
            {
                self.by_key.remove(&k);
            }
            if e.dirty {
                self.dirty -= 1;
            }
        }
    }

    /// Removes one name; the file goes away with its last name.
    fn remove_name(&mut self, id: FileId, parent: FileId, name: &Name) {
        let Some(e) = self.files.get_mut(&id) else {
            return;
        };
        e.names.retain(|(p, n)| !(*p == parent && n == name));
        if e.names.is_empty() {
            self.remove_entry(id);
        }
    }

    fn add_name(&mut self, id: FileId, parent: FileId, name: &Name) {
        if let Some(e) = self.files.get_mut(&id)
            && !e.names.iter().any(|(p, n)| *p == parent && n == name)
        {
            e.names.push((parent, name.clone()));
        }
    }

    fn move_name(&mut self, id: FileId, from: (FileId, &Name), to: (FileId, &Name)) {
        let Some(e) = self.files.get_mut(&id) else {
            return;
        };
        match e
            .names
            .iter_mut()
            .find(|(p, n)| *p == from.0 && n == from.1)
        {
            Some(slot) => *slot = (to.0, to.1.clone()),
            None => self.add_name(id, to.0, to.1),
        }
    }

    /// Applies one record. Records about unknown files change nothing: a
    /// write to a file unlinked while open, for instance.
    pub fn apply(&mut self, r: &Record) {
        self.last_seq = self.last_seq.max(r.seq);
        match &r.op {
            // A hard link found by the inventory: one more name of a known file.
            Op::Exists {
                id, parent, name, ..
            } if self.files.contains_key(id) => self.add_name(*id, *parent, name),
            Op::Exists {
                id,
                parent,
                name,
                kind,
                key,
            } => self.insert_new(*id, *kind, *key, *parent, name, false),
            Op::Create {
                id,
                parent,
                name,
                kind,
                key,
                ..
            } => self.insert_new(*id, *kind, *key, *parent, name, true),
            Op::Link {
                id, parent, name, ..
            } => self.add_name(*id, *parent, name),
            Op::Unlink {
                id, parent, name, ..
            } => self.remove_name(*id, *parent, name),
            Op::Rmdir { id, .. } => self.remove_entry(*id),
            Op::Rename {
                id,
                from_parent,
                from_name,
                to_parent,
                to_name,
                mode,
                replaced,
                ..
            } => {
                match (mode, replaced) {
                    (RenameMode::Exchange, Some(other)) => {
                        self.move_name(*other, (*to_parent, to_name), (*from_parent, from_name))
                    }
                    (RenameMode::Replace, Some(other)) => {
                        self.remove_name(*other, *to_parent, to_name)
                    }
                    _ => {}
                }
                self.move_name(*id, (*from_parent, from_name), (*to_parent, to_name));
            }
            Op::Dirty { id } => self.set_dirty(*id, false),
            Op::Rewritten { id, .. } => self.set_dirty(*id, true),
            Op::Clean { id } => self.set_clean(*id),
            Op::Write { .. }
            | Op::Truncate { .. }
            | Op::SetAttr { .. }
            | Op::SetXattr { .. }
            | Op::RemoveXattr { .. }
            | Op::MountStart { .. }
            | Op::MountStop => {}
        }
        // Any change but the inventory moves the file's ctime to a value we
        // do not know; see `Snapshot::ctime_valid`.
        if !matches!(r.op, Op::Exists { .. })
            && let Some(id) = r.op.file_id()
            && let Some(snap) = self.files.get_mut(&id).and_then(|e| e.snap.as_mut())
        {
            snap.ctime_valid = false;
        }
    }
}

/// The files a record changes in the table (the subject, and for renames
/// the file that was replaced or exchanged).
pub(crate) fn touched(op: &Op) -> impl Iterator<Item = FileId> + Clone {
    let other = match op {
        Op::Rename { replaced, .. } => *replaced,
        _ => None,
    };
    op.file_id().into_iter().chain(other)
}

/// The files whose kind or names a record may change in the table: those it
/// [`touched`], for the records of the namespace; none for the others, which
/// `apply` lets change only dirty state and snapshots.
pub(crate) fn renamed(op: &Op) -> impl Iterator<Item = FileId> + Clone {
    let names = match op {
        Op::Exists { .. }
        | Op::Create { .. }
        | Op::Link { .. }
        | Op::Unlink { .. }
        | Op::Rmdir { .. }
        | Op::Rename { .. } => true,
        Op::Dirty { .. }
        | Op::Write { .. }
        | Op::Truncate { .. }
        | Op::Rewritten { .. }
        | Op::SetAttr { .. }
        | Op::SetXattr { .. }
        | Op::RemoveXattr { .. }
        | Op::MountStart { .. }
        | Op::MountStop
        | Op::Clean { .. } => false,
    };
    touched(op).filter(move |_| names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;

    fn rec(seq: u64, op: Op) -> Record {
        Record {
            seq: Seq(seq),
            unix_ns: 0,
            op,
        }
    }
    fn n(s: &str) -> Name {
        Name(s.as_bytes().to_vec())
    }
    fn key(ino: u64) -> InodeKey {
        InodeKey { dev: 1, ino }
    }

    #[test]
    fn names_links_renames_and_removal() {
        let mut t = Table::new();
        let (a, d) = (FileId(2), FileId(3));
        t.apply(&rec(
            1,
            Op::Create {
                id: d,
                parent: FileId::ROOT,
                name: n("d"),
                kind: FileKind::Dir,
                key: key(3),
                origin: Origin::Mount,
            },
        ));
        t.apply(&rec(
            2,
            Op::Exists {
                id: a,
                parent: FileId::ROOT,
                name: n("a"),
                kind: FileKind::File,
                key: key(2),
            },
        ));
        t.apply(&rec(
            3,
            Op::Link {
                id: a,
                parent: d,
                name: n("b"),
                origin: Origin::Mount,
            },
        ));
        assert_eq!(t.get(a).map(|e| e.names.len()), Some(2));
        t.apply(&rec(
            4,
            Op::Rename {
                id: a,
                from_parent: FileId::ROOT,
                from_name: n("a"),
                to_parent: d,
                to_name: n("c"),
                mode: RenameMode::NoReplace,
                replaced: None,
                origin: Origin::Mount,
            },
        ));
        assert_eq!(t.path_of(a), Some(PathBuf::from("d/c")));
        t.apply(&rec(
            5,
            Op::Unlink {
                id: a,
                parent: d,
                name: n("b"),
                origin: Origin::Mount,
            },
        ));
        assert_eq!(t.path_of(a), Some(PathBuf::from("d/c")));
        t.apply(&rec(
            6,
            Op::Unlink {
                id: a,
                parent: d,
                name: n("c"),
                origin: Origin::Mount,
            },
        ));
        assert!(!t.contains(a));
        assert_eq!(t.lookup(key(2)), None);
        assert_eq!(t.dirty_count(), 1);
        assert_eq!(t.next_id(), 4);
    }

    #[test]
    fn reused_inode_number_drops_stale_mapping() {
        let mut t = Table::new();
        t.apply(&rec(
            1,
            Op::Exists {
                id: FileId(2),
                parent: FileId::ROOT,
                name: n("a"),
                kind: FileKind::File,
                key: key(9),
            },
        ));
        t.apply(&rec(
            2,
            Op::Create {
                id: FileId(3),
                parent: FileId::ROOT,
                name: n("b"),
                kind: FileKind::File,
                key: key(9),
                origin: Origin::Mount,
            },
        ));
        assert_eq!(t.lookup(key(9)), Some(FileId(3)));
        assert_eq!(t.get(FileId(2)).and_then(|e| e.key), None);
    }

    #[test]
    fn exchange_swaps_names() {
        let mut t = Table::new();
        t.apply(&rec(
            1,
            Op::Exists {
                id: FileId(2),
                parent: FileId::ROOT,
                name: n("a"),
                kind: FileKind::File,
                key: key(2),
            },
        ));
        t.apply(&rec(
            2,
            Op::Exists {
                id: FileId(3),
                parent: FileId::ROOT,
                name: n("b"),
                kind: FileKind::File,
                key: key(3),
            },
        ));
        t.apply(&rec(
            3,
            Op::Rename {
                id: FileId(2),
                from_parent: FileId::ROOT,
                from_name: n("a"),
                to_parent: FileId::ROOT,
                to_name: n("b"),
                mode: RenameMode::Exchange,
                replaced: Some(FileId(3)),
                origin: Origin::Mount,
            },
        ));
        assert_eq!(t.path_of(FileId(2)), Some(PathBuf::from("b")));
        assert_eq!(t.path_of(FileId(3)), Some(PathBuf::from("a")));
    }
}
