//! Identities: the journal's stable `FileId`s, record sequence numbers, and the
//! backing filesystem's inode keys that map to them.

use serde::{Deserialize, Serialize};

/// A file's stable identity in the journal.
///
/// Invariants: a `FileId` is never reused, and all hard links of one inode
/// share one `FileId`. `FileId::ROOT` is always the source's root directory.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FileId(pub u64);

impl FileId {
    pub const ROOT: FileId = FileId(1);
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Position of a record in the journal. Records are totally ordered by it;
/// sequence numbers start at 1 and have no gaps in a healthy log.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

/// The backing filesystem's identity of a live inode: `(st_dev, st_ino)`.
/// It maps to a `FileId` only while the inode lives; inode numbers are reused
/// by the filesystem, `FileId`s are not.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InodeKey {
    pub dev: u64,
    pub ino: u64,
}

/// What kind of file an identity names. Fixed for the life of the `FileId`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// The kind of a `st_mode`, or `None` for a mode no file can have.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "chardev",
            FileKind::BlockDevice => "blockdev",
        }
    }
}
