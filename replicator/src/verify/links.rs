//! Hard-link structure: which paths share an inode, on each side.
//!
//! Only paths present on both sides with the same type are noted: a path
//! missing from one side is already a difference of its own, and counting
//! it here too would report it twice. Two trees have the same structure when
//! these paths fall into the same groups on both sides.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use super::entry::Entry;
use super::{Difference, What};
use journal::FileKind;

/// The paths of one side that share an inode, by (st_dev, st_ino).
#[derive(Debug, Default)]
pub(super) struct Links {
    groups: HashMap<(u64, u64), Vec<PathBuf>>,
}

impl Links {
    /// Notes `path`, which is on both sides. Directories cannot be hard
    /// linked; an entry with one link shares its inode with nothing.
    pub fn note(&mut self, entry: &Entry, path: &std::path::Path) {
        if entry.kind != FileKind::Dir && entry.nlink > 1 {
            self.groups
                .entry((entry.dev, entry.ino))
                .or_default()
                .push(path.to_path_buf());
        }
    }

    /// Each path to its sorted group, for groups of two or more paths (an
    /// inode whose other links are all outside the compared paths is, here,
    /// not linked).
    fn by_path(self) -> HashMap<PathBuf, Vec<PathBuf>> {
        let mut by_path = HashMap::new();
        for mut group in self.groups.into_values() {
            if group.len() < 2 {
                continue;
            }
            group.sort();
            for path in &group {
                by_path.insert(path.clone(), group.clone());
            }
        }
        by_path
    }
}

/// One difference for each place where the groups disagree, in path order.
/// A difference names both sides' groups in full, so the paths it names are
/// not reported again.
pub(super) fn compare(source: Links, replica: Links) -> Vec<Difference> {
    let source = source.by_path();
    let replica = replica.by_path();
    let paths: BTreeSet<&PathBuf> = source.keys().chain(replica.keys()).collect();
    let mut reported = BTreeSet::new();
    let mut differences = Vec::new();
    for path in paths {
        if reported.contains(path) {
            continue;
        }
        let alone = || vec![path.clone()];
        let in_source = source.get(path).cloned().unwrap_or_else(alone);
        let in_replica = replica.get(path).cloned().unwrap_or_else(alone);
        if in_source == in_replica {
            continue;
        }
        reported.extend(in_source.iter().chain(&in_replica).cloned());
        differences.push(Difference {
            path: path.clone(),
            what: What::Links {
                source: in_source,
                replica: in_replica,
            },
        });
    }
    differences
}
