//! The scan of the source tree: the baseline inventory of a new journal, and
//! the reconcile after an unclean stop (or on request) that finds what
//! changed behind the journal's back by comparing inode identity and stat
//! snapshots with the table.
//!
//! The walk never follows symlinks, stays on the root's device, and uses
//! names as raw bytes. The normal path never scans.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::JournalError;
use crate::id::{FileId, FileKind, InodeKey};
use crate::journal::Journal;
use crate::record::{AttrChange, Name, Op, Origin, RenameMode};
use crate::table::{Snapshot, Table};

#[derive(Debug, Default)]
pub(crate) struct ScanStats {
    pub scanned: u64,
    /// Records the scan made, other than the baseline's `Exists`.
    pub reconciled: u64,
}

/// Snapshots are handed over in chunks so one message stays small.
const SNAP_CHUNK: usize = 4096;

/// Scans `root` and records every difference from the table. With
/// `baseline`, files the table does not know are recorded as `Exists` (the
/// inventory of a new journal, or the rest of one cut short by a crash)
/// rather than `Create`.
pub(crate) fn scan(
    j: &Journal,
    root: &Path,
    root_key: InodeKey,
    baseline: bool,
) -> Result<ScanStats, JournalError> {
    let before = j.table_copy();
    let mut stats = ScanStats::default();
    let emit = |op: Op, stats: &mut ScanStats| {
        if !matches!(op, Op::Exists { .. }) {
            stats.reconciled += 1;
        }
        j.emit_op(op);
    };

    // Every name each known file was seen at.
    let mut seen: HashMap<FileId, Vec<(FileId, Name)>> = HashMap::new();
    // Inodes first met in this scan (a second name is a hard link).
    let mut new_ids: HashMap<InodeKey, FileId> = HashMap::new();
    // Directories not walked (unreadable, or another device): what the table
    // holds under them must not be taken as deleted.
    let mut unwalked: HashSet<FileId> = HashSet::new();
    let mut snaps: Vec<(FileId, InodeKey, Snapshot)> = Vec::new();
    let mut stat_of: HashMap<FileId, Snapshot> = HashMap::new();

    let mut stack: Vec<(PathBuf, FileId)> = vec![(root.to_path_buf(), FileId::ROOT)];
    while let Some((dir, dir_id)) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if dir_id == FileId::ROOT => return Err(JournalError::io(&dir, e)),
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot read directory; its contents are left as they were");
                unwalked.insert(dir_id);
                continue;
            }
        };
        let mut entries = Vec::new();
        for ent in rd {
            match ent {
                Ok(ent) => entries.push(ent),
                Err(e) => {
                    tracing::warn!(path = %dir.display(), error = %e, "directory read failed part way");
                    unwalked.insert(dir_id);
                }
            }
        }
        // A stable order makes the records of a scan reproducible.
        entries.sort_by_key(|e| e.file_name());
        for ent in entries {
            // DirEntry::metadata does not follow symlinks.
            let md = match ent.metadata() {
                Ok(md) => md,
                Err(e) => {
                    // Vanished between readdir and stat: treat as absent.
                    tracing::debug!(path = %ent.path().display(), error = %e, "entry vanished during scan");
                    continue;
                }
            };
            let Some(kind) = FileKind::from_mode(md.mode()) else {
                continue;
            };
            stats.scanned += 1;
            let name = Name::from_os(&ent.file_name());
            let key = InodeKey {
                dev: md.dev(),
                ino: md.ino(),
            };
            let snap = Snapshot::of(&md);
            let known = before
                .lookup(key)
                .filter(|id| before.get(*id).is_some_and(|e| e.kind == kind));
            let id = if let Some(id) = known {
                seen.entry(id).or_default().push((dir_id, name));
                id
            } else if let Some(&id) = new_ids.get(&key) {
                let op = if baseline {
                    Op::Exists {
                        id,
                        parent: dir_id,
                        name,
                        kind,
                        key,
                    }
                } else {
                    Op::Link {
                        id,
                        parent: dir_id,
                        name,
                        origin: Origin::Reconcile,
                    }
                };
                emit(op, &mut stats);
                id
            } else {
                let id = j.alloc_id();
                new_ids.insert(key, id);
                let op = if baseline {
                    Op::Exists {
                        id,
                        parent: dir_id,
                        name,
                        kind,
                        key,
                    }
                } else {
                    Op::Create {
                        id,
                        parent: dir_id,
                        name,
                        kind,
                        key,
                        origin: Origin::Reconcile,
                    }
                };
                emit(op, &mut stats);
                id
            };
            stat_of.insert(id, snap);
            snaps.push((id, key, snap));
            if kind == FileKind::Dir {
                if md.dev() == root_key.dev {
                    stack.push((ent.path(), id));
                } else {
                    unwalked.insert(id);
                }
            }
        }
    }

    let under_unwalked = |id: FileId| -> bool {
        let mut cur = id;
        for _ in 0..4096 {
            let Some((parent, _)) = before.get(cur).and_then(|e| e.names.first()) else {
                return false;
            };
            if unwalked.contains(parent) {
                return true;
            }
            cur = *parent;
        }
        false
    };

    // Known files: compare names, then content and attributes.
    let mut gone_files = Vec::new();
    let mut gone_dirs = Vec::new();
    let mut moves = Vec::new();
    let mut extra_unlinks = Vec::new();
    // Files whose names changed: that alone moves a ctime.
    let mut renamed: HashSet<FileId> = HashSet::new();
    let mut ids: Vec<FileId> = before
        .entries()
        .map(|(id, _)| id)
        .filter(|id| *id != FileId::ROOT)
        .collect();
    ids.sort_unstable();
    for id in ids {
        let entry = before.get(id).expect("id listed from this table");
        let Some(names) = seen.get(&id) else {
            if under_unwalked(id) {
                continue;
            }
            if entry.kind == FileKind::Dir {
                gone_dirs.push((depth(&before, id), id));
            } else {
                gone_files.push(id);
            }
            continue;
        };
        let missing: Vec<&(FileId, Name)> =
            entry.names.iter().filter(|n| !names.contains(n)).collect();
        let added: Vec<&(FileId, Name)> =
            names.iter().filter(|n| !entry.names.contains(n)).collect();
        if !missing.is_empty() || !added.is_empty() {
            renamed.insert(id);
        }
        for i in 0..missing.len().max(added.len()) {
            match (missing.get(i), added.get(i)) {
                (Some(from), Some(to)) => moves.push(Op::Rename {
                    id,
                    from_parent: from.0,
                    from_name: from.1.clone(),
                    to_parent: to.0,
                    to_name: to.1.clone(),
                    mode: RenameMode::Replace,
                    replaced: None,
                    origin: Origin::Reconcile,
                }),
                (None, Some(to)) => moves.push(Op::Link {
                    id,
                    parent: to.0,
                    name: to.1.clone(),
                    origin: Origin::Reconcile,
                }),
                (Some(from), None) => extra_unlinks.push(Op::Unlink {
                    id,
                    parent: from.0,
                    name: from.1.clone(),
                    origin: Origin::Reconcile,
                }),
                (None, None) => {}
            }
        }
    }

    // Files have no children: their removal can come first. Moves come
    // before directories go, so nothing is moved out of a removed directory.
    for id in gone_files {
        let names = before.get(id).map(|e| e.names.clone()).unwrap_or_default();
        for (parent, name) in names {
            emit(
                Op::Unlink {
                    id,
                    parent,
                    name,
                    origin: Origin::Reconcile,
                },
                &mut stats,
            );
        }
    }
    for op in moves.into_iter().chain(extra_unlinks) {
        emit(op, &mut stats);
    }
    gone_dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, id) in gone_dirs {
        if let Some((parent, name)) = before.get(id).and_then(|e| e.names.first()).cloned() {
            emit(
                Op::Rmdir {
                    id,
                    parent,
                    name,
                    origin: Origin::Reconcile,
                },
                &mut stats,
            );
        }
    }

    // Content and attributes of files still there, against their snapshot.
    let mut known: Vec<FileId> = seen.keys().copied().collect();
    known.push(FileId::ROOT);
    known.sort_unstable();
    let root_md = fs::symlink_metadata(root).map_err(|e| JournalError::io(root, e))?;
    stat_of.insert(FileId::ROOT, Snapshot::of(&root_md));
    snaps.push((FileId::ROOT, root_key, Snapshot::of(&root_md)));
    for id in known {
        let (Some(entry), Some(now)) = (before.get(id), stat_of.get(&id)) else {
            continue;
        };
        let Some(old) = entry.snap else { continue };
        let mut change = AttrChange::default();
        if now.mode & 0o7777 != old.mode & 0o7777 {
            change.mode = Some(now.mode & 0o7777);
        }
        if now.uid != old.uid {
            change.uid = Some(now.uid);
        }
        if now.gid != old.gid {
            change.gid = Some(now.gid);
        }
        if entry.kind != FileKind::Dir && !entry.dirty {
            // A ctime change with the same size and mtime may be content
            // written with the mtime put back; but a link, rename or chmod
            // moves the ctime too, and then explains it.
            let explained =
                renamed.contains(&id) || change != AttrChange::default() || !old.ctime_valid;
            let content = now.size != old.size
                || now.mtime != old.mtime
                || (!explained && now.ctime != old.ctime);
            if content {
                emit(
                    Op::Rewritten {
                        id,
                        origin: Origin::Reconcile,
                    },
                    &mut stats,
                );
            }
        }
        if change != AttrChange::default()
            || (entry.kind == FileKind::Dir && now.mtime != old.mtime)
        {
            if now.mtime != old.mtime {
                change.mtime = Some(now.mtime);
            }
            emit(
                Op::SetAttr {
                    id,
                    change,
                    origin: Origin::Reconcile,
                },
                &mut stats,
            );
        }
    }

    // Fresh snapshots, after the records above (which invalidate ctimes).
    while !snaps.is_empty() {
        let rest = snaps.split_off(snaps.len().saturating_sub(SNAP_CHUNK));
        j.set_snapshots(rest);
    }
    Ok(stats)
}

fn depth(t: &Table, id: FileId) -> usize {
    t.path_of(id).map(|p| p.components().count()).unwrap_or(0)
}
