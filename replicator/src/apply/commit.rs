//! The commit log and the metadata phase: the steps that make a staged
//! batch visible, each one idempotent.
//!
//! Every step names the inode it acts on (recorded during staging), and
//! acts only while the path it names still holds that inode; an install
//! acts only while its entry is still in staging. The commit runs the steps
//! in batch order from the commit marker on (see the module docs of
//! `apply`), so the only step that can find itself already done is the one
//! a crash interrupted, and for it the check is exact. No step creates an
//! inode (new entries were made in staging), so an inode number cannot be
//! reused by the commit itself.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, renameat, renameat2};
use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags, fchmodat, fstatat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, linkat, unlinkat};
use serde::{Deserialize, Serialize};

use super::fsops::{Kind, Root};
use crate::batch::{RelPath, Timestamp, WriteRange};

/// Staged entries live in buckets of this many below `staging/`: one
/// directory of 100,000 entries makes every create and rename in it slower
/// (measured: ext4 spends most of a seed allocating inodes near one
/// directory), and buckets spread them.
pub const STAGING_BUCKET: u32 = 4096;

/// The bucket of staged entry `id`, relative to `staging/`.
pub fn staged_bucket(id: u32) -> CString {
    CString::new((id / STAGING_BUCKET).to_string()).expect("digits")
}

/// The name of staged entry `id`, relative to `staging/`.
pub fn staged_name(id: u32) -> CString {
    CString::new(format!("{}/{id}", id / STAGING_BUCKET)).expect("digits")
}

/// A metadata change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Meta {
    Chmod(u32),
    Chown(u32, u32),
    Utimes(Timestamp, Timestamp),
    SetXattr(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    RemoveXattr(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// One step of the metadata phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Rename the staged entry `staging/<id>` (inode `ino`) to `path`.
    /// When it replaces the file `replaces` there (a delta's result), the
    /// staged file first takes that file's owner, mode and xattrs as they
    /// are at this point of the commit.
    Install {
        id: u32,
        path: RelPath,
        ino: u64,
        replaces: Option<u64>,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        from_ino: u64,
        /// What `to` held, for an exchange.
        to_ino: Option<u64>,
        exchange: bool,
    },
    Link {
        existing: RelPath,
        new: RelPath,
        ino: u64,
    },
    Unlink {
        path: RelPath,
        ino: u64,
    },
    Rmdir {
        path: RelPath,
        ino: u64,
    },
    Write {
        path: RelPath,
        ino: u64,
        ranges: Vec<WriteRange>,
    },
    Truncate {
        path: RelPath,
        ino: u64,
        size: u64,
    },
    /// Copy the content of the staged file `staging/<id>` into the file
    /// (inode `ino`) at `path`, keeping its inode and so its other links.
    CopyInto {
        id: u32,
        path: RelPath,
        ino: u64,
    },
    Meta {
        path: RelPath,
        ino: u64,
        kind: Kind,
        meta: Meta,
    },
}

impl Step {
    /// The path named in error messages.
    pub fn path(&self) -> &RelPath {
        match self {
            Step::Install { path, .. }
            | Step::Unlink { path, .. }
            | Step::Rmdir { path, .. }
            | Step::Write { path, .. }
            | Step::Truncate { path, .. }
            | Step::CopyInto { path, .. }
            | Step::Meta { path, .. } => path,
            Step::Rename { from, .. } => from,
            Step::Link { new, .. } => new,
        }
    }

    /// The inode this step takes a name from (which changes its ctime):
    /// an unlinked file, a file a rename replaces, a file a delta's result
    /// replaces.
    pub fn released(&self) -> Option<u64> {
        match self {
            Step::Unlink { ino, .. } => Some(*ino),
            Step::Rename {
                to_ino,
                exchange: false,
                ..
            } => *to_ino,
            Step::Install { replaces, .. } => *replaces,
            _ => None,
        }
    }

    pub fn is_install(&self) -> bool {
        matches!(self, Step::Install { .. })
    }

    pub fn is_meta(&self) -> bool {
        matches!(self, Step::Meta { .. })
    }

    pub fn is_utimes(&self) -> bool {
        matches!(
            self,
            Step::Meta {
                meta: Meta::Utimes(..),
                ..
            }
        )
    }
}

/// A step with the batch operation it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The op frame number (1-based) in the batch.
    pub index: u64,
    pub op: String,
    pub step: Step,
}

/// What the commit log holds: everything needed to finish the batch
/// without the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitLog {
    pub source_id: [u8; 16],
    pub replica_id: [u8; 16],
    pub from_seq: u64,
    pub to_seq: u64,
    pub entries: Vec<Entry>,
}

/// Whether `path` currently holds inode `ino`; its lstat if so.
fn holds(root: &Root, path: &RelPath, ino: u64) -> Result<Option<nix::sys::stat::FileStat>, Errno> {
    match root.stat(path) {
        Ok(Some(st)) if st.st_ino == ino => Ok(Some(st)),
        Ok(_) | Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

fn ts(t: Timestamp) -> TimeSpec {
    TimeSpec::new(t.sec, i64::from(t.nsec))
}

/// Runs one step (or finds it done).
pub fn run(root: &Root, staging: BorrowedFd<'_>, step: &Step) -> Result<(), Errno> {
    match step {
        Step::Install {
            id,
            path,
            ino,
            replaces,
        } => {
            // Still in staging: not installed yet. Gone from staging: it
            // was installed, and maybe moved or removed by a later step.
            let name = staged_name(*id);
            match fstatat(staging, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if st.st_ino == *ino => {
                    let p = root.parent(path)?;
                    if let Some(old) = replaces
                        && holds(root, path, *old)?.is_some()
                    {
                        let from = p.open_file(false)?;
                        check_ino(&from, *old)?;
                        let to = std::fs::File::from(nix::fcntl::openat(
                            staging,
                            name.as_c_str(),
                            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                            Mode::empty(),
                        )?);
                        copy_meta(&from, &to).map_err(io_errno)?;
                    }
                    renameat(staging, name.as_c_str(), &p.dir, p.name.as_c_str())
                }
                Ok(_) | Err(Errno::ENOENT) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Step::Rename {
            from,
            to,
            from_ino,
            to_ino,
            exchange,
        } => {
            // Done when `from` no longer holds the inode (it moved, or a
            // later step moved its directory).
            if holds(root, from, *from_ino)?.is_none() {
                return Ok(());
            }
            if *exchange && to_ino.is_some_and(|i| holds(root, to, i).ok().flatten().is_none()) {
                return Ok(());
            }
            let pf = root.parent(from)?;
            let pt = root.parent(to)?;
            let flags = if *exchange {
                RenameFlags::RENAME_EXCHANGE
            } else {
                RenameFlags::empty()
            };
            renameat2(
                &pf.dir,
                pf.name.as_c_str(),
                &pt.dir,
                pt.name.as_c_str(),
                flags,
            )
        }
        Step::Link { existing, new, ino } => {
            // The simulation saw `new` free: anything there now, or its
            // directory gone, means the link was made and later steps ran.
            let pn = match root.parent(new) {
                Ok(pn) => pn,
                Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(()),
                Err(e) => return Err(e),
            };
            if pn.stat()?.is_some() || holds(root, existing, *ino)?.is_none() {
                return Ok(());
            }
            let pe = root.parent(existing)?;
            linkat(
                &pe.dir,
                pe.name.as_c_str(),
                &pn.dir,
                pn.name.as_c_str(),
                AtFlags::empty(),
            )
        }
        Step::Unlink { path, ino } | Step::Rmdir { path, ino } => {
            if holds(root, path, *ino)?.is_none() {
                return Ok(());
            }
            let p = root.parent(path)?;
            let flag = if matches!(step, Step::Rmdir { .. }) {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            unlinkat(&p.dir, p.name.as_c_str(), flag)
        }
        Step::Write { path, ino, ranges } => {
            if holds(root, path, *ino)?.is_none() {
                return Ok(());
            }
            let f = root.parent(path)?.open_file(true)?;
            check_ino(&f, *ino)?;
            for r in ranges {
                f.write_all_at(&r.data, r.offset).map_err(io_errno)?;
            }
            Ok(())
        }
        Step::Truncate { path, ino, size } => {
            if holds(root, path, *ino)?.is_none() {
                return Ok(());
            }
            let f = root.parent(path)?.open_file(true)?;
            check_ino(&f, *ino)?;
            f.set_len(*size).map_err(io_errno)
        }
        Step::CopyInto { id, path, ino } => {
            if holds(root, path, *ino)?.is_none() {
                return Ok(());
            }
            let f = root.parent(path)?.open_file(true)?;
            check_ino(&f, *ino)?;
            let name = staged_name(*id);
            let src = nix::fcntl::openat(
                staging,
                name.as_c_str(),
                OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            let src = std::fs::File::from(src);
            let len = src.metadata().map_err(io_errno)?.len();
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0u64;
            while at < len {
                let n = src.read_at(&mut buf, at).map_err(io_errno)?;
                if n == 0 {
                    break;
                }
                f.write_all_at(&buf[..n], at).map_err(io_errno)?;
                at += n as u64;
            }
            f.set_len(len).map_err(io_errno)
        }
        Step::Meta {
            path,
            ino,
            kind,
            meta,
        } => {
            if holds(root, path, *ino)?.is_none() {
                return Ok(());
            }
            let p = root.parent(path)?;
            set_meta(p.dir.as_fd(), &p.name, || p.proc_path(), *kind, meta)
        }
    }
}

/// Sets `meta` on the entry `name` of `dir` (`proc_path` names the same
/// entry, for the xattr calls, which take only paths; made only for them),
/// not following a symlink.
pub fn set_meta(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
    proc_path: impl FnOnce() -> std::path::PathBuf,
    kind: Kind,
    meta: &Meta,
) -> Result<(), Errno> {
    match meta {
        // Linux has no permission bits on symlinks.
        Meta::Chmod(_) if kind == Kind::Symlink => Ok(()),
        Meta::Chmod(mode) => fchmodat(
            dir,
            name,
            Mode::from_bits_retain(*mode),
            FchmodatFlags::NoFollowSymlink,
        ),
        Meta::Chown(uid, gid) => fchownat(
            dir,
            name,
            Some(Uid::from_raw(*uid)),
            Some(Gid::from_raw(*gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ),
        Meta::Utimes(a, m) => {
            utimensat(dir, name, &ts(*a), &ts(*m), UtimensatFlags::NoFollowSymlink)
        }
        Meta::SetXattr(n, v) => xattr::set(proc_path(), OsStr::from_bytes(n), v).map_err(io_errno),
        Meta::RemoveXattr(n) => match xattr::remove(proc_path(), OsStr::from_bytes(n)) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
            r => r.map_err(io_errno),
        },
    }
}

/// `f` is inode `ino` (else ESTALE).
pub fn check_ino(f: &std::fs::File, ino: u64) -> Result<(), Errno> {
    let st = nix::sys::stat::fstat(f.as_fd())?;
    if st.st_ino != ino {
        return Err(Errno::ESTALE);
    }
    Ok(())
}

pub fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Gives `to` the owner, permission bits and xattrs of `from` (exactly:
/// xattrs `from` lacks are removed).
pub fn copy_meta(from: &std::fs::File, to: &std::fs::File) -> std::io::Result<()> {
    use xattr::FileExt as _;
    let st = nix::sys::stat::fstat(from.as_fd())?;
    nix::unistd::fchown(
        to.as_fd(),
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )?;
    // After the chown, which clears set-ID bits.
    nix::sys::stat::fchmod(to.as_fd(), Mode::from_bits_retain(st.st_mode & 0o7777))?;
    let keep: Vec<_> = from.list_xattr()?.collect();
    for name in to.list_xattr()? {
        if !keep.contains(&name) {
            to.remove_xattr(&name)?;
        }
    }
    for name in keep {
        if let Some(v) = from.get_xattr(&name)? {
            to.set_xattr(&name, &v)?;
        }
    }
    Ok(())
}
