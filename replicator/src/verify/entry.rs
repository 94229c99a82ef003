//! One entry as verify sees it: its metadata read without following
//! symlinks, and the parts that need their own calls (symlink target,
//! xattrs).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::MetadataExt;

use journal::FileKind;
use std::path::{Path, PathBuf};

use super::{Ids, Timestamp, VerifyError};

/// What `lstat` says about an entry, reduced to what is compared or needed
/// to compare.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub owner: Ids,
    pub size: u64,
    pub mtime: Timestamp,
    pub rdev: u64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

impl Entry {
    pub fn from_metadata(m: &Metadata) -> Entry {
        Entry {
            // Linux has no other type; anything else would be compared as a file.
            kind: FileKind::from_mode(m.mode()).unwrap_or(FileKind::File),
            mode: m.mode() & 0o7777,
            owner: Ids {
                uid: m.uid(),
                gid: m.gid(),
            },
            size: m.size(),
            mtime: Timestamp {
                secs: m.mtime(),
                // The kernel keeps nanoseconds in 0..1e9.
                nanos: m.mtime_nsec().clamp(0, 999_999_999) as u32,
            },
            rdev: m.rdev(),
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
        }
    }
}

/// The entry at `path`, not following a symlink there.
pub(super) fn lstat(path: &Path) -> Result<Entry, VerifyError> {
    std::fs::symlink_metadata(path)
        .map(|m| Entry::from_metadata(&m))
        .map_err(VerifyError::io("reading metadata of", path))
}

pub(super) fn read_target(path: &Path) -> Result<PathBuf, VerifyError> {
    std::fs::read_link(path).map_err(VerifyError::io("reading symlink", path))
}

/// Every xattr of the entry at `path` (not following a symlink), by name.
/// As root this includes `trusted.*`, `security.*` and the POSIX ACLs
/// (`system.posix_acl_access`, `system.posix_acl_default`). A filesystem
/// without xattr support has none.
pub(super) fn read_xattrs(path: &Path) -> Result<BTreeMap<OsString, Vec<u8>>, VerifyError> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => return Ok(BTreeMap::new()),
        Err(e) => return Err(VerifyError::io("listing xattrs of", path)(e)),
    };
    let mut values = BTreeMap::new();
    for name in names {
        // `None`: removed between the list and the read; it is gone.
        if let Some(value) =
            xattr::get(path, &name).map_err(VerifyError::io("reading xattrs of", path))?
        {
            values.insert(name, value);
        }
    }
    Ok(values)
}
