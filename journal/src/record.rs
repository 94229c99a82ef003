//! The journal's records: one `Record` per change, in sequence order.
//!
//! Namespace records name parents by `FileId` and children by name (raw
//! bytes: names need not be UTF-8). Content records carry byte ranges;
//! metadata records say which attribute changed. The encoding on disk is
//! postcard, framed by the log (see docs/FORMAT.md, "journal log").

use serde::{Deserialize, Serialize};

use crate::id::{FileId, FileKind, InodeKey, Seq};

/// A file name inside a directory: one path component, never empty, never
/// containing `/` or NUL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Name(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Name {
    pub fn from_os(name: &std::ffi::OsStr) -> Name {
        use std::os::unix::ffi::OsStrExt;
        Name(name.as_bytes().to_vec())
    }

    pub fn as_os(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }

    /// The name for display and JSON: lossless when UTF-8, with U+FFFD otherwise.
    pub fn display(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

/// Who noticed a change: the mount saw the operation happen, or a reconcile
/// scan inferred it from the backing tree after the fact.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    Mount,
    Reconcile,
}

/// A half-open byte range `[offset, offset + len)`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// A timestamp as the kernel gives it: seconds and nanoseconds since the epoch.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// Which attributes a metadata change set, and to what.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrChange {
    /// Permission bits (the low 12 bits of `st_mode`).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// How a rename behaved (renameat2 flags that change its meaning).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenameMode {
    /// Plain rename: replaces the target if there is one.
    Replace,
    /// RENAME_NOREPLACE: there was no target.
    NoReplace,
    /// RENAME_EXCHANGE: the two names swapped their files.
    Exchange,
}

/// One change to the source tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Inventory: the file existed when the journal was started (the first
    /// scan of a source). Says nothing changed.
    Exists {
        id: FileId,
        parent: FileId,
        name: Name,
        kind: FileKind,
        key: InodeKey,
    },
    /// A new file of any kind appeared at `parent/name`.
    Create {
        id: FileId,
        parent: FileId,
        name: Name,
        kind: FileKind,
        key: InodeKey,
        origin: Origin,
    },
    /// A new hard link to an existing file.
    Link {
        id: FileId,
        parent: FileId,
        name: Name,
        origin: Origin,
    },
    /// One name of a non-directory went away (the file is gone with its last name).
    Unlink {
        id: FileId,
        parent: FileId,
        name: Name,
        origin: Origin,
    },
    /// An empty directory went away.
    Rmdir {
        id: FileId,
        parent: FileId,
        name: Name,
        origin: Origin,
    },
    /// `from_parent/from_name` moved to `to_parent/to_name`. With `Replace`,
    /// `replaced` is the file that lost the target name (it is gone with its
    /// last name). With `Exchange`, `replaced` is the file that moved the other way.
    Rename {
        id: FileId,
        from_parent: FileId,
        from_name: Name,
        to_parent: FileId,
        to_name: Name,
        mode: RenameMode,
        replaced: Option<FileId>,
        origin: Origin,
    },
    /// The file is about to change in place; its ranges follow in `Write`
    /// records. Made durable before the first such write reaches the backing file.
    Dirty { id: FileId },
    /// Byte ranges written in place (coalesced).
    Write { id: FileId, ranges: Vec<ByteRange> },
    /// The file's size was set.
    Truncate { id: FileId, size: u64 },
    /// The whole content must be treated as new (written through kernel
    /// passthrough, mapped shared, or found changed by a reconcile scan).
    Rewritten { id: FileId, origin: Origin },
    /// Mode, owner or times changed.
    SetAttr {
        id: FileId,
        change: AttrChange,
        origin: Origin,
    },
    /// An extended attribute (including POSIX ACLs) was set.
    SetXattr {
        id: FileId,
        name: Name,
        origin: Origin,
    },
    /// An extended attribute was removed.
    RemoveXattr {
        id: FileId,
        name: Name,
        origin: Origin,
    },
    /// A mount session began; `recovered` says whether the previous one ended
    /// uncleanly and recovery ran.
    MountStart { recovered: bool },
    /// A mount session ended cleanly.
    MountStop,
    /// A push read the file's content for a replica: changes from here on
    /// are recorded afresh (a `Dirty` before the next write, then ranges).
    Clean { id: FileId },
}

impl Op {
    /// The operation's name as `ferry log` prints it.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Op::Exists { .. } => "exists",
            Op::Create { .. } => "create",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Dirty { .. } => "dirty",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Rewritten { .. } => "rewritten",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::MountStart { .. } => "mount-start",
            Op::MountStop => "mount-stop",
            Op::Clean { .. } => "clean",
        }
    }

    /// The file the record is about, if any.
    pub fn file_id(&self) -> Option<FileId> {
        match self {
            Op::Exists { id, .. }
            | Op::Create { id, .. }
            | Op::Link { id, .. }
            | Op::Unlink { id, .. }
            | Op::Rmdir { id, .. }
            | Op::Rename { id, .. }
            | Op::Dirty { id }
            | Op::Write { id, .. }
            | Op::Truncate { id, .. }
            | Op::Rewritten { id, .. }
            | Op::SetAttr { id, .. }
            | Op::SetXattr { id, .. }
            | Op::RemoveXattr { id, .. }
            | Op::Clean { id } => Some(*id),
            Op::MountStart { .. } | Op::MountStop => None,
        }
    }
}

/// A record as stored: its place in the order, when it was made, and what changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: Seq,
    /// Wall-clock time the record was made, in nanoseconds since the epoch.
    pub unix_ns: i64,
    pub op: Op,
}
