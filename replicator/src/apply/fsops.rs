//! Confined filesystem access beneath the replica root.
//!
//! Every path of a batch is resolved by [`Root::parent`]: the parent
//! directory is opened with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS) relative to an `O_PATH` descriptor of the root, so
//! a symlink anywhere in the path (even one pointing back inside) fails the
//! lookup with `ELOOP`, and nothing outside the root can be reached. The
//! last component is then acted on with the `*at` calls, none of which
//! follow a symlink in that position either.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, fstatat};

use crate::batch::RelPath;

/// Flags for every confined lookup.
fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// The kind of an entry, as far as the applier cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    pub fn of(st: &FileStat) -> Kind {
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFREG => Kind::File,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

/// Turns an errno from a confined lookup into an error that says why.
pub fn describe(e: Errno) -> String {
    match e {
        Errno::ELOOP => "a symlink in the path (paths are never resolved through symlinks)".into(),
        Errno::EXDEV => "the path leaves the replica root".into(),
        Errno::ENOTDIR => "a path component is not a directory".into(),
        e => e.desc().to_string(),
    }
}

/// The replica root, opened once; every lookup starts from it.
pub struct Root {
    fd: OwnedFd,
    pub dev: u64,
}

/// A confined parent directory and the name of the entry in it.
pub struct Parent {
    pub dir: OwnedFd,
    pub name: CString,
}

impl Parent {
    /// lstat of the entry; `None` when it does not exist.
    pub fn stat(&self) -> Result<Option<FileStat>, Errno> {
        match fstatat(
            &self.dir,
            self.name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A path through `/proc/self/fd` that names the entry without any
    /// lookup beyond the already-confined parent (for the l*xattr calls,
    /// which take only paths; the final component is not followed).
    pub fn proc_path(&self) -> PathBuf {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        p.push(OsStr::from_bytes(self.name.as_bytes()));
        p
    }

    /// Opens the entry, which must be a regular file, for reading and
    /// writing, without following a symlink.
    pub fn open_file(&self, write: bool) -> Result<File, Errno> {
        let acc = if write {
            OFlag::O_RDWR
        } else {
            OFlag::O_RDONLY
        };
        let how = OpenHow::new()
            .flags(acc | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        let fd = openat2(&self.dir, self.name.as_c_str(), how)?;
        let file = File::from(fd);
        Ok(file)
    }
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&fd)?;
        Ok(Root { fd, dev: st.st_dev })
    }

    /// Opens the directory `dir` (the root when empty) beneath the root,
    /// as an `O_PATH` descriptor, refusing symlinks anywhere (with `ELOOP`;
    /// not `O_NOFOLLOW`, which with `O_DIRECTORY` makes a final symlink a
    /// misleading `ENOTDIR`).
    pub fn open_dir(&self, dir: &RelPath) -> Result<OwnedFd, Errno> {
        if dir.is_root() {
            return self
                .fd
                .try_clone()
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
        }
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        openat2(&self.fd, dir.to_path_buf().as_path(), how)
    }

    /// The parent directory of `path` and its last component. For the
    /// root itself, the parent is the root and the name is `.`.
    pub fn parent(&self, path: &RelPath) -> Result<Parent, Errno> {
        let (dir, name) = match (path.parent(), path.file_name()) {
            (Some(dir), Some(name)) => (self.open_dir(&dir)?, name.to_vec()),
            _ => (self.open_dir(path)?, b".".to_vec()),
        };
        let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
        Ok(Parent { dir, name })
    }

    /// lstat of `path`; `None` when it (or its parent) does not exist.
    pub fn stat(&self, path: &RelPath) -> Result<Option<FileStat>, Errno> {
        match self.parent(path) {
            Ok(p) => p.stat(),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// fsync of a directory given by path.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}
