//! Finding ferry mounts in /proc/self/mountinfo.
//!
//! A ferry mount's source field is `ferry:<state dir>`, so the state
//! directory of any live (or dead, after kill -9) mount is found from its
//! mountpoint alone.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::Context;

pub const FSNAME_PREFIX: &str = "ferry:";

/// One line of mountinfo; paths byte for byte (they need not be UTF-8).
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: OsString,
}

impl MountEntry {
    /// The state directory when this is a ferry mount.
    pub fn ferry_state(&self) -> Option<PathBuf> {
        // The direct mount(2) path of fuser does not apply the subtype, so
        // the type may be plain "fuse"; the source prefix is what names ferry.
        let fuse = self.fstype == "fuse" || self.fstype == "fuse.ferry";
        let state = self
            .source
            .as_bytes()
            .strip_prefix(FSNAME_PREFIX.as_bytes())?;
        fuse.then(|| PathBuf::from(OsString::from_vec(state.to_vec())))
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The entries of mountinfo's `text` (proc(5): the mount point is field 5;
/// the filesystem type and source follow ` - `). Taken as bytes: a path
/// that is not UTF-8 anywhere on the system must not hide the others.
fn parse(text: &[u8]) -> Vec<MountEntry> {
    text.split(|b| *b == b'\n')
        .filter_map(|line| {
            let dash = line.windows(3).position(|w| w == b" - ")?;
            let (left, right) = (&line[..dash], &line[dash + 3..]);
            let mountpoint = left.split(|b| *b == b' ').nth(4)?;
            let mut right = right.split(|b| *b == b' ');
            let fstype = right.next()?;
            let source = right.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(OsString::from_vec(unescape(mountpoint))),
                fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
                source: OsString::from_vec(unescape(source)),
            })
        })
        .collect()
}

pub fn all() -> anyhow::Result<Vec<MountEntry>> {
    let text = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse(&text))
}

/// The topmost mount at exactly `path`.
pub fn at(path: &Path) -> anyhow::Result<Option<MountEntry>> {
    let path = resolve(path)?;
    Ok(all()?.into_iter().rev().find(|m| m.mountpoint == path))
}

/// An absolute path with symlinks resolved in every component that can be
/// stat'ed; the last component is kept as given so that a dead FUSE mount
/// (where stat fails with ENOTCONN) still resolves.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    let mut clean = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    match (clean.parent(), clean.file_name()) {
        (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)?.join(name)),
        _ => Ok(clean),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escaped_fields() {
        let text = "36 35 98:0 / /mnt/a\\040b rw - fuse.ferry ferry:/var/lib/st\\040x rw\n\
                    37 35 98:0 / /proc rw - proc proc rw\n";
        let m = parse(text.as_bytes());
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].ferry_state(), Some(PathBuf::from("/var/lib/st x")));
        assert_eq!(m[1].ferry_state(), None);
    }

    #[test]
    fn paths_that_are_not_utf8_are_kept_byte_for_byte() {
        let m = parse(
            b"36 35 98:0 / /mnt/\\377x rw - fuse ferry:/st/\\376 rw\n\
                        37 35 98:1 / /mnt/\xfe rw - ext4 /dev/vdb rw\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint.as_os_str().as_bytes(), b"/mnt/\xffx");
        assert_eq!(
            m[0].ferry_state().unwrap().as_os_str().as_bytes(),
            b"/st/\xfe"
        );
        // The kernel escapes only space, tab, newline and backslash: other
        // bytes come as they are.
        assert_eq!(m[1].mountpoint.as_os_str().as_bytes(), b"/mnt/\xfe");
    }
}
