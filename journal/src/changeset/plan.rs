//! Ordering a changeset's namespace changes so that each step is valid when
//! it runs.
//!
//! The planner keeps the tree as it stands after the steps emitted so far (an
//! overlay over the tree at `from`, so its cost follows the change, not the
//! tree) and repeats, until every changed file has exactly its names at `to`:
//!
//! 1. every placement that is possible now: a create, a rename of a name that
//!    must go to one that must appear, a link of a further name. A rename of a
//!    non-directory (or a create of one) may replace a name whose file has
//!    more names to lose than to gain (the editor save pattern stays one
//!    atomic rename);
//! 2. when no placement is possible, every removal that is: unlinks of names
//!    nobody needs any more, rmdirs of directories that are empty now (so
//!    children go before their parents, and entries moved out go first);
//! 3. when neither is possible, a cycle (a swap, a rotation, a directory that
//!    must go below a descendant whose way out is held): a name that must be
//!    given is held by a file that must itself move. The holder is renamed to
//!    a temporary name `.ferry-tmp-<id>` in its own directory, which no name
//!    at `to` uses (`break_cycle` says why such a holder always exists).
//!
//! Every step gives a name that is kept to the end, takes away one that is
//! not needed, or (kind 3) frees a name for good, so the loop ends; a bound
//! on the rounds turns inconsistent input into an error.
//!
//! From a tree holding the root alone (a replica's first push) none of this
//! has anything to do: every file at `to` is new and no name is held. The
//! plan is then the tree at `to` walked from the root (`seed_plan`): each
//! file created at its first name, parents before children, then its
//! further names linked. The same steps the loop would find, in another
//! valid order, for the cost of the walk.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use super::{Changeset, Edge, Namespace, Rewound, under};
use crate::id::{FileId, FileKind};
use crate::record::Name;

/// One namespace operation. Paths are relative to the root and are the paths
/// at the moment the step runs, after every earlier step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsStep {
    /// A new file at `path`; its content and metadata come later. With
    /// `replaced` (never for a directory), `path` holds that non-directory,
    /// which loses the name: the new file takes its place in one rename from
    /// staging, and what the replica held there is the natural delta basis
    /// (the editor save pattern). Without, `path` does not exist.
    Create {
        id: FileId,
        kind: FileKind,
        path: PathBuf,
        replaced: Option<FileId>,
    },
    /// A further name for the non-directory at `existing`.
    Link {
        id: FileId,
        existing: PathBuf,
        new: PathBuf,
    },
    /// `from` moves to `to` (a directory with its subtree). With `replaced`,
    /// `to` holds that non-directory, which loses the name (and is gone if it
    /// was its last); without, `to` does not exist.
    Rename {
        id: FileId,
        from: PathBuf,
        to: PathBuf,
        replaced: Option<FileId>,
    },
    /// One name of a non-directory goes away (the file with its last name).
    Unlink { id: FileId, path: PathBuf },
    /// An empty directory goes away.
    Rmdir { id: FileId, path: PathBuf },
}

impl NsStep {
    pub fn id(&self) -> FileId {
        match self {
            NsStep::Create { id, .. }
            | NsStep::Link { id, .. }
            | NsStep::Rename { id, .. }
            | NsStep::Unlink { id, .. }
            | NsStep::Rmdir { id, .. } => *id,
        }
    }
}

/// The two trees given to [`Changeset::namespace_plan`] do not fit the
/// changeset (they are not the trees at its `from` and `to`, or they come from
/// damaged records): no order of steps leads from one to the other.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("no valid order for the namespace changes (stuck at file {id})")]
pub struct PlanError {
    pub id: FileId,
}

/// The prefix of temporary names. No name at `to` is ever given to a
/// temporary (the planner checks), so the prefix is only a hint for humans.
pub const TEMP_PREFIX: &str = ".ferry-tmp-";

impl Changeset {
    /// The namespace operations that turn the tree at `from` into the tree at
    /// `to`, in an order in which applying them one by one is always valid.
    ///
    /// `before` and `after` are the trees at `self.from` and `self.to`:
    /// `before` a [`Namespace`], or `after` rewound
    /// ([`Namespace::advance`], [`Namespace::rewound`]) so that no copy of
    /// the tree is needed. Only files in `self.files` are considered: every
    /// other file keeps its names. Content and metadata are not part of the
    /// plan.
    pub fn namespace_plan<'a>(
        &self,
        before: impl Into<Rewound<'a>>,
        after: &'a Namespace,
    ) -> Result<Vec<NsStep>, PlanError> {
        let before = before.into();
        if before.holds_root_alone()
            && let Some(steps) = self.seed_plan(after)
        {
            return Ok(steps);
        }
        self.general_plan(before, after)
    }

    /// The plan from a tree at `from` that holds the root alone: the tree at
    /// `to` walked from the root. `None` when the changeset is not the whole
    /// tree at `to`, new (the trees do not fit it: the general planner says
    /// what it can do).
    pub(super) fn seed_plan(&self, after: &Namespace) -> Option<Vec<NsStep>> {
        // Every file whose names change must be new and at `to`, and every
        // file at `to` but the root must be one of them.
        let mut new = 0u64;
        for (id, f) in &self.files {
            if !f.names_changed() {
                continue;
            }
            if !f.created() || !after.contains(*id) {
                return None;
            }
            new += 1;
        }
        if new + 1 != after.len() {
            return None;
        }
        let mut steps = Vec::with_capacity(new as usize);
        let mut links = Vec::new();
        let mut fits = true;
        after.walk(|_, dir_path, name, id, e, first| {
            let path = dir_path.join(name.as_os());
            if first {
                steps.push(NsStep::Create {
                    id,
                    kind: e.kind,
                    path,
                    replaced: None,
                });
            } else {
                fits &= e.kind != FileKind::Dir;
                links.push((id, path));
            }
        });
        // A file the walk does not reach is not below the root.
        if !fits || steps.len() as u64 != new {
            return None;
        }
        for (id, new) in links {
            // Its path through its first name, made above.
            let existing = after.path_of(id)?;
            steps.push(NsStep::Link { id, existing, new });
        }
        Some(steps)
    }

    /// The plan in general: the loop of the module's docs.
    pub(super) fn general_plan(
        &self,
        before: Rewound<'_>,
        after: &Namespace,
    ) -> Result<Vec<NsStep>, PlanError> {
        let mut w = Work {
            before,
            after,
            names: HashMap::new(),
            edges: BTreeMap::new(),
            steps: Vec::new(),
        };
        let mut pending: BTreeSet<FileId> = self
            .files
            .keys()
            .copied()
            .filter(|id| !w.done(*id))
            .collect();
        let names: usize = self
            .files
            .values()
            .map(|f| f.names_before.len() + f.names_after.len() + 1)
            .sum();
        // Each round emits at least one step; there are at most a few steps
        // per name (a temporary, a placement, a removal).
        let bound = 4 * names + 16;
        let mut rounds = 0;
        while let Some(&first) = pending.first() {
            rounds += 1;
            if rounds > bound {
                return Err(PlanError { id: first });
            }
            let mut progressed = false;
            for id in pending.clone() {
                progressed |= w.place(id);
            }
            if !progressed {
                for id in pending.clone() {
                    progressed |= w.remove(id);
                }
            }
            if !progressed {
                let moved = w.break_cycle(&pending).ok_or(PlanError { id: first })?;
                pending.insert(moved);
            }
            pending.retain(|id| !w.done(*id));
        }
        Ok(w.steps)
    }
}

/// Why a name cannot be given now.
enum Target {
    /// Possible now; replacing that file's name if `Some`.
    Ready(Option<FileId>),
    /// The parent directory does not exist yet.
    NoParent,
    /// Another file holds the name and cannot simply lose it.
    Held(FileId),
    /// A directory would move below itself.
    Inside,
}

struct Work<'a> {
    before: Rewound<'a>,
    after: &'a Namespace,
    /// Current names of the files renamed so far; others have their names in
    /// `before`.
    names: HashMap<FileId, Vec<Edge>>,
    /// Current holder of the names changed so far; others as in `before`.
    edges: BTreeMap<Edge, Option<FileId>>,
    steps: Vec<NsStep>,
}

impl Work<'_> {
    fn names(&self, id: FileId) -> &[Edge] {
        match self.names.get(&id) {
            Some(v) => v,
            None => self.before.names(id),
        }
    }

    fn at(&self, edge: &Edge) -> Option<FileId> {
        match self.edges.get(edge) {
            Some(holder) => *holder,
            None => self.before.at(edge),
        }
    }

    fn kind(&self, id: FileId) -> Option<FileKind> {
        self.before.kind(id).or_else(|| self.after.kind(id))
    }

    fn is_dir(&self, id: FileId) -> bool {
        self.kind(id) == Some(FileKind::Dir)
    }

    fn exists(&self, id: FileId) -> bool {
        id == FileId::ROOT || !self.names(id).is_empty()
    }

    /// The parent of a directory (its only name), `None` for the root.
    fn parent(&self, id: FileId) -> Option<FileId> {
        self.names(id).first().map(|(p, _)| *p)
    }

    fn dir_path(&self, id: FileId) -> PathBuf {
        let mut parts: Vec<&Name> = Vec::new();
        let mut cur = id;
        while let Some((p, n)) = self.names(cur).first() {
            parts.push(n);
            cur = *p;
            // A cycle cannot arise from consistent trees; the bound keeps
            // damaged input from hanging.
            if parts.len() > 4096 {
                break;
            }
        }
        parts.iter().rev().map(|n| n.as_os()).collect()
    }

    fn edge_path(&self, edge: &Edge) -> PathBuf {
        let mut p = self.dir_path(edge.0);
        p.push(edge.1.as_os());
        p
    }

    /// Whether `dir` is `ancestor` or lies below it now.
    fn within(&self, dir: FileId, ancestor: FileId) -> bool {
        let mut cur = dir;
        for _ in 0..4096 {
            if cur == ancestor {
                return true;
            }
            match self.parent(cur) {
                Some(p) => cur = p,
                None => return false,
            }
        }
        true
    }

    fn has_children(&self, dir: FileId) -> bool {
        if self.edges.range(under(dir)).any(|(_, h)| h.is_some()) {
            return true;
        }
        self.before
            .children(dir)
            .any(|(n, _)| !self.edges.contains_key(&(dir, n.clone())))
    }

    fn add(&mut self, id: FileId, edge: Edge) {
        let before = self.before;
        self.names
            .entry(id)
            .or_insert_with(|| before.names(id).to_vec())
            .push(edge.clone());
        self.edges.insert(edge, Some(id));
    }

    fn drop_name(&mut self, id: FileId, edge: &Edge) {
        let before = self.before;
        self.names
            .entry(id)
            .or_insert_with(|| before.names(id).to_vec())
            .retain(|e| e != edge);
        self.edges.insert(edge.clone(), None);
    }

    /// Current names that `to` does not have, sorted.
    fn misplaced(&self, id: FileId) -> Vec<Edge> {
        let want = self.after.names(id);
        let mut v: Vec<Edge> = self
            .names(id)
            .iter()
            .filter(|e| !want.contains(e))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Names at `to` that are not there yet, sorted.
    fn missing(&self, id: FileId) -> Vec<Edge> {
        let cur = self.names(id);
        let mut v: Vec<Edge> = self
            .after
            .names(id)
            .iter()
            .filter(|e| !cur.contains(e))
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn done(&self, id: FileId) -> bool {
        self.misplaced(id).is_empty() && self.missing(id).is_empty()
    }

    /// Whether `id` has more names to lose than to gain, so losing one more
    /// (to a replacing rename) leaves it what it needs.
    fn surplus(&self, id: FileId) -> bool {
        self.misplaced(id).len() > self.missing(id).len()
    }

    /// Whether `id` can take the name `t` now.
    fn target(&self, id: FileId, t: &Edge, can_replace: bool) -> Target {
        if !self.exists(t.0) || !self.is_dir(t.0) {
            return Target::NoParent;
        }
        if let Some(holder) = self.at(t) {
            if can_replace && !self.is_dir(holder) && holder != id && self.surplus(holder) {
                return Target::Ready(Some(holder));
            }
            return Target::Held(holder);
        }
        if self.is_dir(id) && self.within(t.0, id) {
            return Target::Inside;
        }
        Target::Ready(None)
    }

    /// Gives `id` every name at `to` that it can take now: a create, renames
    /// of names it must lose, links. Returns whether it did anything.
    fn place(&mut self, id: FileId) -> bool {
        let mut did = false;
        'names: loop {
            let missing = self.missing(id);
            if missing.is_empty() {
                return did;
            }
            let Some(kind) = self.kind(id) else {
                return did;
            };
            let misplaced = self.misplaced(id);
            let exists = !self.names(id).is_empty();
            // A rename or a create may replace a non-directory; a link may not.
            let can_replace = (!exists || !misplaced.is_empty()) && kind != FileKind::Dir;
            for t in missing {
                let Target::Ready(replaced) = self.target(id, &t, can_replace) else {
                    continue;
                };
                let path = self.edge_path(&t);
                if !exists {
                    if let Some(r) = replaced {
                        self.drop_name(r, &t);
                    }
                    self.add(id, t);
                    self.steps.push(NsStep::Create {
                        id,
                        kind,
                        path,
                        replaced,
                    });
                } else if let Some(m) = misplaced.first() {
                    let from = self.edge_path(m);
                    if let Some(r) = replaced {
                        self.drop_name(r, &t);
                    }
                    self.drop_name(id, m);
                    self.add(id, t);
                    self.steps.push(NsStep::Rename {
                        id,
                        from,
                        to: path,
                        replaced,
                    });
                } else if kind == FileKind::Dir {
                    // A directory has one name; with nothing misplaced there
                    // is nothing missing either.
                    return did;
                } else {
                    let existing = self.edge_path(&self.names(id)[0]);
                    self.add(id, t);
                    self.steps.push(NsStep::Link {
                        id,
                        existing,
                        new: path,
                    });
                }
                did = true;
                continue 'names;
            }
            return did;
        }
    }

    /// Takes away the names of `id` that nobody needs now: surplus names of a
    /// non-directory, an empty directory that is gone at `to`.
    fn remove(&mut self, id: FileId) -> bool {
        if self.is_dir(id) {
            if self.after.contains(id) || self.has_children(id) {
                return false;
            }
            let Some(edge) = self.names(id).first().cloned() else {
                return false;
            };
            let path = self.edge_path(&edge);
            self.drop_name(id, &edge);
            self.steps.push(NsStep::Rmdir { id, path });
            return true;
        }
        let mut did = false;
        loop {
            let misplaced = self.misplaced(id);
            if misplaced.len() <= self.missing(id).len() {
                return did;
            }
            // Drop first the names someone else needs.
            let edge = misplaced
                .iter()
                .find(|e| self.after.lookup(e.0, &e.1).is_some())
                .or(misplaced.last())
                .cloned()
                .expect("misplaced is longer than missing, so not empty");
            let path = self.edge_path(&edge);
            self.drop_name(id, &edge);
            self.steps.push(NsStep::Unlink { id, path });
            did = true;
        }
    }

    /// Moves one file out of the way when nothing else can be done; returns it.
    ///
    /// When nothing is possible, some name that must be given is held by a
    /// file that must leave it, and that holder steps aside in its own
    /// directory. Why one always exists: every pending file is blocked. A
    /// blocked removal waits for a directory's children, which are pending
    /// and blocked. A create or move waiting for its parent waits for that
    /// directory's create. A directory D that would move below itself (into
    /// E, below D now) waits for a directory on the way down from D to E that
    /// must leave it: one must, or D would be below E and E below D at `to`
    /// (a removed directory on the way has a child on the way that must leave
    /// too). That directory's own move is blocked, below D, so these waits
    /// descend and end. Every chain of waits thus ends at a held name.
    fn break_cycle(&mut self, pending: &BTreeSet<FileId>) -> Option<FileId> {
        for &id in pending {
            let exists = !self.names(id).is_empty();
            let can_replace = (!exists || !self.misplaced(id).is_empty()) && !self.is_dir(id);
            for t in self.missing(id) {
                if let Target::Held(holder) = self.target(id, &t, can_replace) {
                    self.aside(holder, &t, t.0);
                    return Some(holder);
                }
            }
        }
        None
    }

    /// Renames `id`'s name `edge` to a temporary name in directory `dir`.
    fn aside(&mut self, id: FileId, edge: &Edge, dir: FileId) {
        let base = format!("{TEMP_PREFIX}{}", id.0);
        let mut name = Name(base.clone().into_bytes());
        let mut k = 0u64;
        while self.at(&(dir, name.clone())).is_some() || self.after.lookup(dir, &name).is_some() {
            k += 1;
            name = Name(format!("{base}-{k}").into_bytes());
        }
        let to_edge = (dir, name);
        let from = self.edge_path(edge);
        let to = self.edge_path(&to_edge);
        self.drop_name(id, edge);
        self.add(id, to_edge);
        self.steps.push(NsStep::Rename {
            id,
            from,
            to,
            replaced: None,
        });
    }
}
