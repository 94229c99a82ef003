//! The walk: both trees side by side, one directory at a time, entries in
//! byte order of their names.
//!
//! Directories are visited from an explicit stack rather than by recursion,
//! so that a deep tree cannot overflow the thread's stack. A directory's
//! entries are all compared before its subdirectories are entered, and
//! subdirectories are entered in name order, so the report's order is
//! stable.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::content::{Hashers, Target};
use super::entry::{self, Entry};
use super::links::{self, Links};
use super::{Difference, Options, Report, Side, Skipped, VerifyError, What};
use journal::FileKind;

pub(super) fn run(source: &Path, replica: &Path, options: &Options) -> Result<Report, VerifyError> {
    let mut walk = Walk {
        source: Root::open("SOURCE", source)?,
        replica: Root::open("REPLICA", replica)?,
        options,
        report: Report::default(),
        source_links: Links::default(),
        replica_links: Links::default(),
        hashers: Hashers::new(),
    };
    let mut pending = Vec::new();
    let (source_root, replica_root) = (walk.source.entry.clone(), walk.replica.entry.clone());
    if walk.compare(Path::new(""), &source_root, &replica_root) {
        pending.push(PathBuf::new());
    }
    while let Some(dir) = pending.pop() {
        let subdirs = walk.compare_dir(&dir);
        // Reversed, so that the first subdirectory is popped first.
        pending.extend(subdirs.into_iter().rev());
    }
    let mut report = walk.report;
    report
        .differences
        .extend(links::compare(walk.source_links, walk.replica_links));
    Ok(report)
}

/// One side's root directory.
struct Root {
    /// Canonical, so that joining a relative path to it never passes through
    /// a symlink.
    path: PathBuf,
    entry: Entry,
}

impl Root {
    fn open(role: &'static str, path: &Path) -> Result<Root, VerifyError> {
        let root_error = |source| VerifyError::Root {
            role,
            path: path.to_path_buf(),
            source,
        };
        let canonical = std::fs::canonicalize(path).map_err(root_error)?;
        let meta = std::fs::symlink_metadata(&canonical).map_err(root_error)?;
        let entry = Entry::from_metadata(&meta);
        if entry.kind != FileKind::Dir {
            return Err(VerifyError::RootNotDirectory {
                role,
                path: path.to_path_buf(),
            });
        }
        Ok(Root {
            path: canonical,
            entry,
        })
    }

    /// The path on disk of `rel`; the empty path is the root itself (joining
    /// it would add a trailing slash, which makes `lstat` follow a symlink).
    fn path_of(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    /// The names in directory `rel`, sorted by their bytes.
    fn list(&self, rel: &Path) -> Result<Vec<OsString>, VerifyError> {
        let path = self.path_of(rel);
        let mut names = Vec::new();
        for dirent in
            std::fs::read_dir(&path).map_err(VerifyError::io("reading directory", &path))?
        {
            let dirent = dirent.map_err(VerifyError::io("reading directory", &path))?;
            names.push(dirent.file_name());
        }
        names.sort_unstable();
        Ok(names)
    }
}

/// Where a name appears.
enum Pairing {
    Source(OsString),
    Replica(OsString),
    Both(OsString),
}

/// Merges two sorted name lists into one sorted list of pairings.
fn pair_names(source: Vec<OsString>, replica: Vec<OsString>) -> Vec<Pairing> {
    let mut out = Vec::with_capacity(source.len().max(replica.len()));
    let mut source = source.into_iter().peekable();
    let mut replica = replica.into_iter().peekable();
    loop {
        let order = match (source.peek(), replica.peek()) {
            (Some(s), Some(r)) => s.cmp(r),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => return out,
        };
        let pairing = match order {
            Ordering::Less => source.next().map(Pairing::Source),
            Ordering::Greater => replica.next().map(Pairing::Replica),
            Ordering::Equal => {
                replica.next();
                source.next().map(Pairing::Both)
            }
        };
        out.extend(pairing);
    }
}

struct Walk<'a> {
    source: Root,
    replica: Root,
    options: &'a Options,
    report: Report,
    source_links: Links,
    replica_links: Links,
    hashers: Hashers,
}

impl Walk<'_> {
    fn root(&self, side: Side) -> &Root {
        match side {
            Side::Source => &self.source,
            Side::Replica => &self.replica,
        }
    }

    fn differ(&mut self, rel: &Path, what: What) {
        self.report.differences.push(Difference {
            path: rel.to_path_buf(),
            what,
        });
    }

    fn fail(&mut self, error: VerifyError) {
        self.report.errors.push(error);
    }

    /// Compares the entries of directory `rel`, present on both sides, and
    /// returns its subdirectories to enter.
    fn compare_dir(&mut self, rel: &Path) -> Vec<PathBuf> {
        let (source_names, replica_names) = match (self.source.list(rel), self.replica.list(rel)) {
            (Ok(s), Ok(r)) => (s, r),
            (s, r) => {
                // Without both listings, nothing below can be paired up.
                self.report.errors.extend(s.err());
                self.report.errors.extend(r.err());
                return Vec::new();
            }
        };
        let mut subdirs = Vec::new();
        for pairing in pair_names(source_names, replica_names) {
            match pairing {
                Pairing::Source(name) => {
                    let rel = rel.join(name);
                    if let Some(entry) = self.entry_at(Side::Source, &rel) {
                        self.differ(&rel, What::MissingInReplica(entry.kind));
                    }
                }
                Pairing::Replica(name) => {
                    let rel = rel.join(name);
                    if let Some(entry) = self.entry_at(Side::Replica, &rel) {
                        self.differ(&rel, What::ExtraInReplica(entry.kind));
                    }
                }
                Pairing::Both(name) => {
                    let rel = rel.join(name);
                    let source = self.entry_at(Side::Source, &rel);
                    let replica = self.entry_at(Side::Replica, &rel);
                    if let (Some(s), Some(r)) = (source, replica)
                        && self.compare(&rel, &s, &r)
                    {
                        subdirs.push(rel);
                    }
                }
            }
        }
        subdirs
    }

    /// The entry `rel` on `side`, or `None` when it cannot be compared: it
    /// could not be read (an error is recorded) or it is on another
    /// filesystem (it is recorded as skipped).
    fn entry_at(&mut self, side: Side, rel: &Path) -> Option<Entry> {
        let root = self.root(side);
        let root_dev = root.entry.dev;
        match entry::lstat(&root.path_of(rel)) {
            Err(e) => {
                self.fail(e);
                None
            }
            Ok(entry) if entry.dev != root_dev => {
                self.report.skipped.push(Skipped {
                    path: rel.to_path_buf(),
                    side,
                });
                None
            }
            Ok(entry) => Some(entry),
        }
    }

    /// Compares one pair of entries and says whether to enter them (both
    /// are directories).
    fn compare(&mut self, rel: &Path, source: &Entry, replica: &Entry) -> bool {
        self.report.files += 1;
        if source.kind != replica.kind {
            // Nothing else is comparable between a file and a directory.
            self.differ(
                rel,
                What::Type {
                    source: source.kind,
                    replica: replica.kind,
                },
            );
            return false;
        }
        match source.kind {
            FileKind::File => self.compare_content(rel, source, replica),
            FileKind::Symlink => self.compare_targets(rel),
            FileKind::CharDevice | FileKind::BlockDevice if source.rdev != replica.rdev => self
                .differ(
                    rel,
                    What::Rdev {
                        source: source.rdev,
                        replica: replica.rdev,
                    },
                ),
            _ => {}
        }
        self.compare_metadata(rel, source, replica);
        self.compare_xattrs(rel);
        self.source_links.note(source, rel);
        self.replica_links.note(replica, rel);
        source.kind == FileKind::Dir
    }

    /// Mode, owner and mtime, which every type has. Symlinks too: `rsync -a`
    /// sets their owner and mtime, and their mode is always 0777 on Linux.
    fn compare_metadata(&mut self, rel: &Path, source: &Entry, replica: &Entry) {
        if source.mode != replica.mode {
            self.differ(
                rel,
                What::Mode {
                    source: source.mode,
                    replica: replica.mode,
                },
            );
        }
        if source.owner != replica.owner {
            self.differ(
                rel,
                What::Owner {
                    source: source.owner,
                    replica: replica.owner,
                },
            );
        }
        if source.mtime != replica.mtime {
            self.differ(
                rel,
                What::Mtime {
                    source: source.mtime,
                    replica: replica.mtime,
                },
            );
        }
    }

    /// Sizes first: content is hashed only when they match, since otherwise
    /// the files differ anyway and reading them would be wasted.
    fn compare_content(&mut self, rel: &Path, source: &Entry, replica: &Entry) {
        if source.size != replica.size {
            self.differ(
                rel,
                What::Size {
                    source: source.size,
                    replica: replica.size,
                },
            );
            return;
        }
        if !self.options.content {
            return;
        }
        let (source_path, replica_path) = (self.source.path_of(rel), self.replica.path_of(rel));
        let hashes = self.hashers.hash_pair(
            Target {
                path: &source_path,
                entry: source,
            },
            Target {
                path: &replica_path,
                entry: replica,
            },
        );
        let Some((s, r)) = self.both(hashes) else {
            return;
        };
        self.report.bytes_compared += source.size;
        if s != r {
            self.differ(
                rel,
                What::Content {
                    source: s,
                    replica: r,
                },
            );
        }
    }

    /// Both sides' results, or `None` once whichever failed is recorded.
    fn both<T>(
        &mut self,
        results: (Result<T, VerifyError>, Result<T, VerifyError>),
    ) -> Option<(T, T)> {
        match results {
            (Ok(s), Ok(r)) => Some((s, r)),
            (s, r) => {
                self.report.errors.extend(s.err());
                self.report.errors.extend(r.err());
                None
            }
        }
    }

    fn compare_targets(&mut self, rel: &Path) {
        let source = entry::read_target(&self.source.path_of(rel));
        let replica = entry::read_target(&self.replica.path_of(rel));
        let Some((s, r)) = self.both((source, replica)) else {
            return;
        };
        if s != r {
            self.differ(
                rel,
                What::Symlink {
                    source: s,
                    replica: r,
                },
            );
        }
    }

    /// One difference per xattr name whose value differs or that only one
    /// side has.
    fn compare_xattrs(&mut self, rel: &Path) {
        let source = entry::read_xattrs(&self.source.path_of(rel));
        let replica = entry::read_xattrs(&self.replica.path_of(rel));
        let Some((source, replica)) = self.both((source, replica)) else {
            return;
        };
        let names: BTreeSet<&OsString> = source.keys().chain(replica.keys()).collect();
        for name in names {
            let (s, r) = (source.get(name), replica.get(name));
            if s != r {
                self.differ(
                    rel,
                    What::Xattr {
                        name: name.clone(),
                        source: s.cloned(),
                        replica: r.cloned(),
                    },
                );
            }
        }
    }
}
