//! Comparing two trees: what `ferry verify` reports.
//!
//! [`verify`] walks a source and a replica side by side in sorted name order
//! and returns a [`Report`]: plain data that the CLI formats. It compares, for
//! every path present on both sides, the entry type, permission bits
//! (setuid/setgid/sticky included), owner, mtime to the nanosecond, xattrs in
//! every namespace the caller can read, and by type: size and blake3 content
//! for regular files, the target for symlinks, the device number for char and
//! block devices. Across the whole tree it compares the hard-link structure:
//! which paths share an inode must be the same on both sides. This is the
//! fidelity of `rsync -aHAX`; sparseness is not compared (equal content is
//! what a reader sees), nor are atimes, ctimes or directory sizes, which no
//! copy can reproduce.
//!
//! The walk never follows a symlink and never descends into another
//! filesystem mounted below a root: such entries are skipped and listed in
//! [`Report::skipped`]. An entry that cannot be read is listed in
//! [`Report::errors`] with its path, and the walk goes on.

mod content;
mod entry;
mod links;
mod walk;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use journal::FileKind;

/// What to compare beyond the metadata.
#[derive(Debug, Clone)]
pub struct Options {
    /// Hash regular files whose type and size match (on by default). Off,
    /// files are compared by size and metadata only, as rsync does without
    /// `-c`.
    pub content: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { content: true }
    }
}

/// The outcome of a comparison. The trees are equal when there are no
/// differences and no errors (see [`Report::is_equal`]).
#[derive(Debug, Default)]
pub struct Report {
    /// In walk order: a directory's entries in name order, then its
    /// subdirectories; hard-link differences come last.
    pub differences: Vec<Difference>,
    /// Entries that could not be read; their comparison is incomplete.
    pub errors: Vec<VerifyError>,
    /// Entries on another filesystem than their root, which were not
    /// compared.
    pub skipped: Vec<Skipped>,
    /// Entries present on both sides and compared, the roots included.
    pub files: u64,
    /// Bytes of content hashed, counted once per pair of files.
    pub bytes_compared: u64,
}

impl Report {
    pub fn is_equal(&self) -> bool {
        self.differences.is_empty() && self.errors.is_empty()
    }
}

/// One difference between the trees. `path` is relative to the roots; the
/// empty path is the roots themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: PathBuf,
    pub what: What,
}

/// The kind of a difference, with the source's and the replica's values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    MissingInReplica(FileKind),
    ExtraInReplica(FileKind),
    Type {
        source: FileKind,
        replica: FileKind,
    },
    Size {
        source: u64,
        replica: u64,
    },
    Content {
        source: blake3::Hash,
        replica: blake3::Hash,
    },
    /// Permission bits, `0o7777` of `st_mode`.
    Mode {
        source: u32,
        replica: u32,
    },
    Owner {
        source: Ids,
        replica: Ids,
    },
    Mtime {
        source: Timestamp,
        replica: Timestamp,
    },
    Symlink {
        source: PathBuf,
        replica: PathBuf,
    },
    /// `st_rdev` of a char or block device.
    Rdev {
        source: u64,
        replica: u64,
    },
    /// One xattr whose value differs; `None` where it is absent.
    Xattr {
        name: OsString,
        source: Option<Vec<u8>>,
        replica: Option<Vec<u8>>,
    },
    /// The paths (among those on both sides) that share the inode of `path`
    /// on each side, sorted; `[path]` alone when it has no other link.
    Links {
        source: Vec<PathBuf>,
        replica: Vec<PathBuf>,
    },
}

impl What {
    /// A stable name for scripts (the `kind` of `ferry verify --json`).
    pub fn kind(&self) -> &'static str {
        match self {
            What::MissingInReplica(_) => "missing_in_replica",
            What::ExtraInReplica(_) => "extra_in_replica",
            What::Type { .. } => "type",
            What::Size { .. } => "size",
            What::Content { .. } => "content",
            What::Mode { .. } => "mode",
            What::Owner { .. } => "owner",
            What::Mtime { .. } => "mtime",
            What::Symlink { .. } => "symlink",
            What::Rdev { .. } => "rdev",
            What::Xattr { .. } => "xattr",
            What::Links { .. } => "links",
        }
    }
}

/// An owner: user and group id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

impl fmt::Display for Ids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// A point in time as `stat` gives it: seconds since the epoch and
/// nanoseconds (always `0..1e9`, also before the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.secs, self.nanos)
    }
}

/// Which tree an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Replica,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Replica => "replica",
        }
    }
}

/// An entry not compared because it is on another filesystem than its root
/// (a mount point below the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub side: Side,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A root cannot be used; nothing was compared.
    #[error("{role} {}: {source}", path.display())]
    Root {
        role: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{role} {} is not a directory", path.display())]
    RootNotDirectory { role: &'static str, path: PathBuf },
    /// Reading one entry failed (`op` says what was being done).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The entry was replaced or resized while it was being read: the trees
    /// are being written to, and this comparison means nothing for it.
    #[error("{} changed while it was being compared", path.display())]
    Changed { path: PathBuf },
}

impl VerifyError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VerifyError + 'a {
        move |source| VerifyError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Compares the tree at `source` with the tree at `replica`. Both must be
/// directories (a symlink naming one is followed, as rsync follows
/// `SOURCE/`). Fails only when a root cannot be used; every later problem is
/// in the report.
pub fn verify(source: &Path, replica: &Path, options: &Options) -> Result<Report, VerifyError> {
    walk::run(source, replica, options)
}
