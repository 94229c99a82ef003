//! Reading the source tree for a batch: entries by their path relative to
//! the source root, checked to be the inode the journal knows (a name may
//! have been given to another file since the journal's records), never
//! following a symlink at the last component.

use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use journal::InodeKey;
use xattr::FileExt;

pub(super) struct Source {
    root: PathBuf,
}

fn is_file(md: &Metadata, key: Option<InodeKey>) -> bool {
    key.is_none_or(|k| k.dev == md.dev() && k.ino == md.ino())
}

fn absent(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

impl Source {
    pub fn new(root: &Path) -> Source {
        Source {
            root: root.to_path_buf(),
        }
    }

    pub fn path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    /// The metadata of `rel` (not following a symlink), if it holds the
    /// inode `key`; `None` if it is gone or holds another file now.
    pub fn stat(&self, rel: &Path, key: Option<InodeKey>) -> io::Result<Option<Metadata>> {
        match std::fs::symlink_metadata(self.path(rel)) {
            Ok(md) if is_file(&md, key) => Ok(Some(md)),
            Ok(_) => Ok(None),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The regular file at `rel` opened for reading, if it is the inode
    /// `key` (see `open_for_reading`).
    pub fn open(&self, rel: &Path, key: Option<InodeKey>) -> io::Result<Option<(File, Metadata)>> {
        let file = match open_for_reading(&self.path(rel)) {
            Ok(f) => f,
            Err(e) if absent(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let md = file.metadata()?;
        Ok((md.is_file() && is_file(&md, key)).then_some((file, md)))
    }

    pub fn read_link(&self, rel: &Path) -> io::Result<Vec<u8>> {
        Ok(std::fs::read_link(self.path(rel))?
            .into_os_string()
            .into_encoded_bytes())
    }

    /// Every extended attribute of `rel` (not following a symlink), by name.
    pub fn xattrs(&self, rel: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let path = self.path(rel);
        named_values(xattr::list(&path)?, |name| xattr::get(&path, name))
    }

    /// One extended attribute of `rel`, `None` if it is not set.
    pub fn xattr(&self, rel: &Path, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        xattr::get(self.path(rel), OsStr::from_bytes(name))
    }
}

/// Opens `path` for reading, not following a symlink at its last
/// component and without blocking: a FIFO put in a file's place would
/// otherwise hold the caller until something writes to it (a regular file
/// reads the same either way). Reads do not move its atime (`O_NOATIME`
/// where permitted: the caller owns the file or is privileged).
pub(super) fn open_for_reading(path: &Path) -> io::Result<File> {
    let open = |extra: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | extra)
            .open(path)
    };
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// Every extended attribute of the open `file`, by name.
pub(super) fn xattrs_of(file: &File) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    named_values(file.list_xattr()?, |name| file.get_xattr(name))
}

/// The value of each of `names` that is still set.
fn named_values(
    names: impl Iterator<Item = OsString>,
    get: impl Fn(&OsStr) -> io::Result<Option<Vec<u8>>>,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in names {
        if let Some(v) = get(&name)? {
            out.push((name.into_vec(), v));
        }
    }
    Ok(out)
}

/// Reads into `buf` what of it the page cache holds at `offset` of `file`,
/// without waiting for the disk: the bytes read (0 at the end of the
/// file), or `None` when its first page is not cached (or the filesystem
/// cannot say).
pub(super) fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over `buf`, which outlives the call, on a
    // descriptor we own.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    match io::Error::last_os_error() {
        e if matches!(
            e.raw_os_error(),
            Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::EINTR)
        ) =>
        {
            Ok(None)
        }
        e => Err(e),
    }
}

/// The data extents of `file` (size `size`) as `(offset, len)`: everything
/// but its holes.
pub(super) fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: i32| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            // A filesystem without SEEK_DATA: all data.
            e if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(off)),
            e => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(start) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            break;
        }
        out.push((start, end - start));
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_in_a_files_place_is_not_opened_as_it() {
        let dir = tempfile::tempdir().unwrap();
        let source = Source::new(dir.path());
        nix::unistd::mkfifo(
            &dir.path().join("was-a-file"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        // Without O_NONBLOCK the open waits for a writer that never comes
        // (a liveness bound, not a timing: it returns at once or never).
        let (done, opened) = std::sync::mpsc::channel();
        let fifo = Source::new(dir.path());
        std::thread::spawn(move || {
            let _ = done.send(fifo.open(Path::new("was-a-file"), None).unwrap().is_none());
        });
        let refused = opened.recv_timeout(std::time::Duration::from_secs(60));
        assert_eq!(refused, Ok(true), "the FIFO was opened, or its open waited");
        std::fs::write(dir.path().join("file"), b"content").unwrap();
        let (file, md) = source.open(Path::new("file"), None).unwrap().unwrap();
        assert_eq!(
            (md.len(), std::io::read_to_string(file).unwrap()),
            (7, "content".into())
        );
    }
}
