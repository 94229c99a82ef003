//! Finding ferry mounts in /proc/self/mountinfo.
//!
//! A ferry mount's source field is `ferry:<state dir>`, so the state
//! directory of any live (or dead, after kill -9) mount is found from its
//! mountpoint alone.

use std::io;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;

pub const FSNAME_PREFIX: &str = "ferry:";

#[derive(Debug, Clone)]
pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    /// The state directory when this is a ferry mount.
    pub fn ferry_state(&self) -> Option<PathBuf> {
        // The direct mount(2) path of fuser does not apply the subtype, so
        // the type may be plain "fuse"; the source prefix is what names ferry.
        let fuse = self.fstype == "fuse" || self.fstype == "fuse.ferry";
        fuse.then(|| self.source.strip_prefix(FSNAME_PREFIX).map(PathBuf::from))
            .flatten()
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
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
    String::from_utf8_lossy(&out).into_owned()
}

fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let source = right.next()?;
            Some(MountEntry {
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: unescape(fstype),
                source: unescape(source),
            })
        })
        .collect()
}

pub fn all() -> anyhow::Result<Vec<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
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
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].ferry_state(), Some(PathBuf::from("/var/lib/st x")));
        assert_eq!(m[1].ferry_state(), None);
    }
}
