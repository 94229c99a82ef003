//! The operations a batch carries, and the checks every decoded operation
//! passes before anyone sees it.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::content::{Chunk, Content, ContentError};
use super::limits::{
    MAX_CHUNK_LEN, MAX_FILE_SIZE, MAX_RANGES, MAX_SYMLINK_TARGET, MAX_XATTR_NAME, MAX_XATTR_VALUE,
};
use super::path::{PathError, RelPath};
use super::wire::bounded_vec;

/// A blake3 hash of a file's whole content.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The blake3 hash of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 lowercase hex digits, as [`Display`](fmt::Display)
    /// writes them.
    pub fn from_hex(s: &str) -> Option<Hash> {
        blake3::Hash::from_hex(s)
            .ok()
            .filter(|_| s.bytes().all(|b| !b.is_ascii_uppercase()))
            .map(Hash::from)
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Hash {
        Hash(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

/// A point in time: seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    /// Below 1,000,000,000.
    pub nsec: u32,
}

/// The type of a special file made by [`Op::Mknod`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    Fifo,
    Socket,
    Char,
    Block,
}

/// Bytes to write at an offset of an existing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRange {
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// One change to the replica.
///
/// Modes are permission bits only (at most `0o7777`): the file type is
/// given by the operation. Content operations carry the blake3 of the
/// content they apply to (`base`) and of the content they must produce
/// (`result`), so the applier can refuse to corrupt a file that changed
/// behind its back.
///
/// The variant order is the wire format (postcard's variant index): never
/// reorder; only append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Mkdir {
        path: RelPath,
        mode: u32,
    },
    Symlink {
        path: RelPath,
        /// Any bytes but NUL (it may be absolute or contain `..`: it is
        /// stored, never followed by the applier).
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    Mknod {
        path: RelPath,
        kind: NodeKind,
        mode: u32,
        /// Zero for a FIFO or socket.
        rdev: u64,
    },
    /// A hard link `new` to the file at `existing`.
    Link {
        existing: RelPath,
        new: RelPath,
    },
    /// rename(2), or renameat2(RENAME_EXCHANGE) when `exchange`.
    Rename {
        from: RelPath,
        to: RelPath,
        exchange: bool,
    },
    Unlink {
        path: RelPath,
    },
    Rmdir {
        path: RelPath,
    },
    /// A new file with its whole content in this one frame.
    CreateFile {
        path: RelPath,
        mode: u32,
        content: Content,
        result: Hash,
    },
    /// In-place writes to the file whose content hashes to `base`. The
    /// ranges are non-empty, in increasing offset order and do not overlap.
    WriteRanges {
        path: RelPath,
        #[serde(deserialize_with = "ranges")]
        ranges: Vec<WriteRange>,
        base: Hash,
        result: Hash,
    },
    Truncate {
        path: RelPath,
        size: u64,
    },
    /// A librsync-format delta (as fast_rsync makes) against the file whose
    /// content hashes to `base`.
    Delta {
        path: RelPath,
        base: Hash,
        #[serde(with = "serde_bytes")]
        delta: Vec<u8>,
        result: Hash,
    },
    Chmod {
        path: RelPath,
        mode: u32,
    },
    Chown {
        path: RelPath,
        uid: u32,
        gid: u32,
    },
    Utimes {
        path: RelPath,
        atime: Timestamp,
        mtime: Timestamp,
    },
    SetXattr {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    RemoveXattr {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// A new file too large for one frame: `size` bytes, zero except where
    /// the [`Op::FileData`] operations that follow put data, up to an
    /// [`Op::EndFile`]. Nothing else may come between.
    BeginFile {
        path: RelPath,
        mode: u32,
        size: u64,
    },
    /// Data of the file the last [`Op::BeginFile`] opened; offsets increase
    /// and pieces do not overlap.
    FileData {
        offset: u64,
        data: Chunk,
    },
    /// Ends the file the last [`Op::BeginFile`] opened, whose content
    /// must hash to `result` (given at the end, so that a sender reads the
    /// file once, hashing it as it sends it).
    EndFile {
        result: Hash,
    },
    /// A new file at `path` whose content is a librsync-format delta
    /// applied to the regular file at `basis` as it is at this point of the
    /// batch (its content hashes to `base`): a file saved by writing a new
    /// one and renaming it over the old, sent as a delta against the old.
    CreateFromDelta {
        path: RelPath,
        basis: RelPath,
        base: Hash,
        #[serde(with = "serde_bytes")]
        delta: Vec<u8>,
        mode: u32,
        result: Hash,
    },
    /// A new file whose content the replica kept from an earlier transfer
    /// that was cut off before its commit, found by its hash `result` (the
    /// replica lists what it kept when a connection opens). Only a sender
    /// that was told the replica holds it sends this; a batch file never
    /// holds one.
    CreateFromKept {
        path: RelPath,
        mode: u32,
        result: Hash,
    },
    /// As [`Op::BeginFile`], for the file whose first `from` bytes the
    /// replica kept from a transfer cut off inside it (it lists the file
    /// when a connection opens): the [`Op::FileData`] that follow start at
    /// `from`, and the [`Op::EndFile`]'s hash covers the whole file. Only
    /// a sender told of that file sends this; a batch file never holds one.
    ResumeFile {
        path: RelPath,
        mode: u32,
        size: u64,
        from: u64,
    },
}

fn ranges<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<WriteRange>, D::Error> {
    bounded_vec::<D, WriteRange, MAX_RANGES>(d)
}

/// An operation that breaks a rule of the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {field}: {reason}")]
pub struct OpError {
    /// The operation's name (`Rename`, ...).
    pub op: &'static str,
    /// The offending field.
    pub field: &'static str,
    pub reason: String,
}

/// The magic number a librsync delta starts with (big-endian).
const DELTA_MAGIC: [u8; 4] = 0x7273_0236u32.to_be_bytes();

impl Op {
    /// The operation's name, as in error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Mkdir { .. } => "Mkdir",
            Op::Symlink { .. } => "Symlink",
            Op::Mknod { .. } => "Mknod",
            Op::Link { .. } => "Link",
            Op::Rename { .. } => "Rename",
            Op::Unlink { .. } => "Unlink",
            Op::Rmdir { .. } => "Rmdir",
            Op::CreateFile { .. } => "CreateFile",
            Op::WriteRanges { .. } => "WriteRanges",
            Op::Truncate { .. } => "Truncate",
            Op::Delta { .. } => "Delta",
            Op::Chmod { .. } => "Chmod",
            Op::Chown { .. } => "Chown",
            Op::Utimes { .. } => "Utimes",
            Op::SetXattr { .. } => "SetXattr",
            Op::RemoveXattr { .. } => "RemoveXattr",
            Op::BeginFile { .. } => "BeginFile",
            Op::FileData { .. } => "FileData",
            Op::EndFile { .. } => "EndFile",
            Op::CreateFromDelta { .. } => "CreateFromDelta",
            Op::CreateFromKept { .. } => "CreateFromKept",
            Op::ResumeFile { .. } => "ResumeFile",
        }
    }

    /// The path(s) the operation names (none for `FileData` and `EndFile`,
    /// which continue the last `BeginFile`).
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Op::Link {
                existing: a,
                new: b,
            }
            | Op::Rename { from: a, to: b, .. }
            | Op::CreateFromDelta {
                path: a, basis: b, ..
            } => vec![a, b],
            Op::Mkdir { path, .. }
            | Op::Symlink { path, .. }
            | Op::Mknod { path, .. }
            | Op::Unlink { path }
            | Op::Rmdir { path }
            | Op::CreateFile { path, .. }
            | Op::WriteRanges { path, .. }
            | Op::Truncate { path, .. }
            | Op::Delta { path, .. }
            | Op::Chmod { path, .. }
            | Op::Chown { path, .. }
            | Op::Utimes { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::BeginFile { path, .. }
            | Op::CreateFromKept { path, .. }
            | Op::ResumeFile { path, .. } => vec![path],
            Op::FileData { .. } | Op::EndFile { .. } => vec![],
        }
    }

    /// The content bytes the operation carries, counted after
    /// decompression and without holes: what the header's and the
    /// trailer's `content_bytes` add up. Symlink targets and xattr values
    /// are not counted.
    pub fn data_len(&self) -> u64 {
        match self {
            Op::CreateFile { content, .. } => content.data_len(),
            Op::FileData { data, .. } => data.len(),
            Op::WriteRanges { ranges, .. } => ranges.iter().map(|r| r.data.len() as u64).sum(),
            Op::Delta { delta, .. } | Op::CreateFromDelta { delta, .. } => delta.len() as u64,
            _ => 0,
        }
    }

    /// Checks every field against the format's rules and limits. The reader
    /// calls this on every operation it decodes, the writer on every
    /// operation it is given. Compressed data is checked by
    /// [`verify_content`](Self::verify_content).
    pub fn validate(&self) -> Result<(), OpError> {
        let op = self.name();
        let err = |field: &'static str, reason: String| OpError { op, field, reason };
        let not_root = |field: &'static str, p: &RelPath| {
            if p.is_root() {
                Err(err(field, PathError::Root.to_string()))
            } else {
                Ok(())
            }
        };
        let mode = |m: u32| {
            if m & !0o7777 != 0 {
                Err(err("mode", format!("{m:#o} has bits beyond 0o7777")))
            } else {
                Ok(())
            }
        };
        let file_offset = |field: &'static str, off: u64, len: u64| match off.checked_add(len) {
            Some(end) if end <= MAX_FILE_SIZE => Ok(()),
            _ => Err(err(field, format!("ends beyond {MAX_FILE_SIZE}"))),
        };
        let delta_bytes = |delta: &[u8]| {
            if !delta.starts_with(&DELTA_MAGIC) {
                return Err(err("delta", "does not start with the delta magic".into()));
            }
            if delta.len() as u64 > MAX_CHUNK_LEN {
                return Err(err("delta", format!("more than {MAX_CHUNK_LEN} bytes")));
            }
            Ok(())
        };
        let xattr_name = |name: &[u8]| {
            if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) {
                Err(err(
                    "name",
                    format!("must be 1 to {MAX_XATTR_NAME} bytes without NUL"),
                ))
            } else {
                Ok(())
            }
        };
        match self {
            Op::Mkdir { path, mode: m } | Op::Chmod { path, mode: m } => {
                if matches!(self, Op::Mkdir { .. }) {
                    not_root("path", path)?;
                }
                mode(*m)
            }
            Op::Symlink { path, target } => {
                not_root("path", path)?;
                if target.is_empty() || target.len() > MAX_SYMLINK_TARGET || target.contains(&0) {
                    return Err(err(
                        "target",
                        format!("must be 1 to {MAX_SYMLINK_TARGET} bytes without NUL"),
                    ));
                }
                Ok(())
            }
            Op::Mknod {
                path,
                kind,
                mode: m,
                rdev,
            } => {
                not_root("path", path)?;
                mode(*m)?;
                if matches!(kind, NodeKind::Fifo | NodeKind::Socket) && *rdev != 0 {
                    return Err(err("rdev", format!("{rdev} for a {kind:?}")));
                }
                Ok(())
            }
            Op::Link { existing, new } => {
                not_root("existing", existing)?;
                not_root("new", new)
            }
            Op::Rename { from, to, .. } => {
                not_root("from", from)?;
                not_root("to", to)
            }
            Op::Unlink { path } | Op::Rmdir { path } => not_root("path", path),
            Op::CreateFile {
                path,
                mode: m,
                content,
                ..
            } => {
                not_root("path", path)?;
                mode(*m)?;
                content.validate().map_err(|r| err("content", r))
            }
            Op::WriteRanges { path, ranges, .. } => {
                not_root("path", path)?;
                if ranges.len() > MAX_RANGES {
                    return Err(err("ranges", format!("more than {MAX_RANGES}")));
                }
                let mut next = 0u64;
                let mut total = 0u64;
                for (i, r) in ranges.iter().enumerate() {
                    let len = r.data.len() as u64;
                    if len == 0 {
                        return Err(err("ranges", format!("range {i} is empty")));
                    }
                    if r.offset < next {
                        return Err(err(
                            "ranges",
                            format!("range {i} overlaps or precedes the one before it"),
                        ));
                    }
                    file_offset("ranges", r.offset, len)?;
                    next = r.offset + len;
                    total += len;
                }
                if total > MAX_CHUNK_LEN {
                    return Err(err("ranges", format!("more than {MAX_CHUNK_LEN} bytes")));
                }
                Ok(())
            }
            Op::Truncate { path, size } => {
                not_root("path", path)?;
                file_offset("size", *size, 0)
            }
            Op::Delta { path, delta, .. } => {
                not_root("path", path)?;
                delta_bytes(delta)
            }
            Op::CreateFromDelta {
                path,
                basis,
                delta,
                mode: m,
                ..
            } => {
                not_root("path", path)?;
                not_root("basis", basis)?;
                mode(*m)?;
                delta_bytes(delta)
            }
            Op::Chown { .. } => Ok(()),
            Op::Utimes { atime, mtime, .. } => {
                for (field, t) in [("atime", atime), ("mtime", mtime)] {
                    if t.nsec >= 1_000_000_000 {
                        return Err(err(field, format!("{} nanoseconds", t.nsec)));
                    }
                }
                Ok(())
            }
            Op::SetXattr { name, value, .. } => {
                xattr_name(name)?;
                if value.len() > MAX_XATTR_VALUE {
                    return Err(err(
                        "value",
                        format!("{} bytes (at most {MAX_XATTR_VALUE})", value.len()),
                    ));
                }
                Ok(())
            }
            Op::RemoveXattr { name, .. } => xattr_name(name),
            Op::CreateFromKept { path, mode: m, .. } => {
                not_root("path", path)?;
                mode(*m)
            }
            Op::ResumeFile {
                path,
                mode: m,
                size,
                from,
            } => {
                not_root("path", path)?;
                mode(*m)?;
                file_offset("size", *size, 0)?;
                if from > size {
                    return Err(err("from", format!("{from} is beyond the size {size}")));
                }
                Ok(())
            }
            Op::BeginFile {
                path,
                mode: m,
                size,
                ..
            } => {
                not_root("path", path)?;
                mode(*m)?;
                file_offset("size", *size, 0)
            }
            Op::FileData { offset, data } => {
                data.validate().map_err(|r| err("data", r))?;
                if data.is_empty() {
                    return Err(err("data", "empty".into()));
                }
                file_offset("offset", *offset, data.len())
            }
            Op::EndFile { .. } => Ok(()),
        }
    }

    /// Checks that compressed data decodes to exactly the length it
    /// declares (decompressing it, in bounded memory, without keeping it).
    pub fn verify_content(&self) -> Result<(), ContentError> {
        match self {
            Op::CreateFile { content, .. } => content.verify(),
            Op::FileData { data, .. } => data.verify(),
            _ => Ok(()),
        }
    }
}

/// The order rules between operations: `FileData` only between a
/// `BeginFile` and its `EndFile`, in increasing offsets within the file's
/// size, and nothing else there.
#[derive(Debug, Default)]
pub(crate) struct Sequence {
    /// The open `BeginFile`'s size, and the lowest offset the next
    /// `FileData` may start at.
    open: Option<(u64, u64)>,
}

impl Sequence {
    pub(crate) fn check(&mut self, op: &Op) -> Result<(), String> {
        match (op, self.open) {
            (Op::FileData { offset, data }, Some((size, next))) => {
                if *offset < next {
                    return Err(format!(
                        "FileData at offset {offset} overlaps or precedes the data before it"
                    ));
                }
                match offset.checked_add(data.len()) {
                    Some(end) if end <= size => {
                        self.open = Some((size, end));
                        Ok(())
                    }
                    _ => Err(format!("FileData ends beyond the file's size {size}")),
                }
            }
            (Op::EndFile { .. }, Some(_)) => {
                self.open = None;
                Ok(())
            }
            (_, Some(_)) => Err(format!(
                "{} inside a BeginFile (only FileData and EndFile may follow it)",
                op.name()
            )),
            (Op::FileData { .. } | Op::EndFile { .. }, None) => {
                Err(format!("{} without a BeginFile", op.name()))
            }
            (Op::BeginFile { size, .. }, None) => {
                self.open = Some((*size, 0));
                Ok(())
            }
            (Op::ResumeFile { size, from, .. }, None) => {
                self.open = Some((*size, *from));
                Ok(())
            }
            (_, None) => Ok(()),
        }
    }

    pub(crate) fn check_end(&self) -> Result<(), String> {
        match self.open {
            Some(_) => Err("the batch ends inside a BeginFile (no EndFile)".into()),
            None => Ok(()),
        }
    }
}
