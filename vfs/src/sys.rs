//! Thin, safe wrappers over the `*at` system calls the mount runs on the
//! backing tree.
//!
//! Every backing inode is held as an `O_PATH` descriptor; operations on it go
//! through `AT_EMPTY_PATH` or through its `/proc/self/fd/N` magic link, and
//! operations on names go through the parent's descriptor with one path
//! component. Nothing here resolves a multi-component path.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

pub type SysResult<T> = Result<T, Errno>;

/// Turns a name from the kernel into a C string; a name with a NUL cannot exist.
pub fn cname(name: &OsStr) -> SysResult<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `/proc/self/fd/N`: re-opens or acts on the inode behind an `O_PATH` descriptor.
pub struct ProcPath(CString);

impl ProcPath {
    pub fn of(fd: BorrowedFd<'_>) -> ProcPath {
        ProcPath(
            CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .expect("a formatted number contains no NUL"),
        )
    }

    pub fn as_c(&self) -> &CStr {
        &self.0
    }
}

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_size(ret: libc::ssize_t) -> SysResult<usize> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret as usize)
    }
}

fn owned(fd: libc::c_int) -> SysResult<OwnedFd> {
    // SAFETY: `fd` was just returned by a successful open call and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(check(fd)?) })
}

/// Opens one name beneath `dir` as an `O_PATH` handle, never following a symlink.
pub fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<OwnedFd> {
    // SAFETY: valid descriptor and NUL-terminated name.
    owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

/// Opens the directory `dir/name` for listing, never following a symlink,
/// and without updating its atime where the process may ask that (owner
/// or CAP_FOWNER).
pub fn open_dir_noatime(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<File> {
    let open = |flags| {
        // SAFETY: valid descriptor and NUL-terminated name.
        owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })
    };
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let fd = match open(flags | libc::O_NOATIME) {
        Err(Errno::EPERM) => open(flags),
        other => other,
    }?;
    Ok(File::from(fd))
}

/// Opens a directory as an `O_PATH` handle.
pub fn open_path(path: &CStr) -> SysResult<OwnedFd> {
    // SAFETY: NUL-terminated path.
    owned(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })
}

/// Re-opens the inode behind an `O_PATH` handle for I/O with `flags`.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> SysResult<File> {
    let path = ProcPath::of(fd);
    let flags = (flags | libc::O_CLOEXEC)
        & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    // SAFETY: NUL-terminated path.
    let fd = owned(unsafe { libc::open(path.as_c().as_ptr(), flags) })?;
    Ok(File::from(fd))
}

/// Creates and opens a regular file beneath `dir`.
pub fn create_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> SysResult<File> {
    let flags = flags | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and NUL-terminated name.
    let fd = owned(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) })?;
    Ok(File::from(fd))
}

/// A kernel file handle (`struct file_handle`, header and opaque bytes):
/// names an inode durably, without holding a descriptor open.
pub struct FileHandle(Box<[u32]>);

/// Words of a `struct file_handle` buffer: the 8-byte header plus the
/// largest handle the kernel makes.
const HANDLE_WORDS: usize = (8 + libc::MAX_HANDLE_SZ as usize) / 4;

/// The file handle of the inode behind `fd`, or `None` when its filesystem
/// does not make them.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> SysResult<Option<FileHandle>> {
    handle_at(fd, c"", libc::AT_EMPTY_PATH)
}

/// The file handle of `dir/name` (never following a symlink), or `None`
/// when its filesystem does not make them.
pub fn name_to_handle_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<Option<FileHandle>> {
    handle_at(dir, name, 0)
}

fn handle_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<Option<FileHandle>> {
    let mut buf = vec![0u32; HANDLE_WORDS].into_boxed_slice();
    buf[0] = libc::MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: the buffer is a `struct file_handle` whose `handle_bytes`
    // (first word) says how much room follows the 8-byte header; the name
    // is NUL-terminated.
    let ret = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            &mut mount_id,
            flags,
        )
    };
    match check(ret) {
        Ok(_) => Ok(Some(FileHandle(buf))),
        Err(Errno::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the inode a file handle names as an `O_PATH` descriptor;
/// `mount` is any descriptor on the same filesystem.
pub fn open_by_handle(mount: BorrowedFd<'_>, handle: &FileHandle) -> SysResult<OwnedFd> {
    let mut buf = handle.0.clone();
    // SAFETY: the buffer holds a `struct file_handle` filled by
    // name_to_handle_at; the kernel only reads it.
    owned(unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })
}

impl PartialEq for FileHandle {
    fn eq(&self, other: &Self) -> bool {
        // handle_bytes, handle_type, then handle_bytes of opaque data.
        let len = 2 + (self.0[0] as usize).div_ceil(4);
        self.0[..len.min(self.0.len())] == other.0[..len.min(other.0.len())]
    }
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the attributes of the inode itself.
pub fn stat_fd(fd: BorrowedFd<'_>) -> SysResult<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor, empty NUL-terminated path, and `st` is written on success.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid descriptor and name; `st` is written on success.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: valid descriptor and name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> SysResult<()> {
    // SAFETY: valid descriptor and name.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: valid descriptor and NUL-terminated strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Hard-links the inode behind an `O_PATH` handle as `dir/name`.
pub fn link_fd_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: valid descriptors and names; AT_EMPTY_PATH links the descriptor's inode itself.
    check(unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> SysResult<()> {
    // SAFETY: valid descriptor and name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    flags: u32,
) -> SysResult<()> {
    // SAFETY: valid descriptors and names.
    check(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn readlink_fd(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the buffer is valid for its length; AT_EMPTY_PATH semantics via "".
    let n = check_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    let path = ProcPath::of(fd);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::chmod(path.as_c().as_ptr(), mode) }).map(drop)
}

/// Changes owner and group; `u32::MAX` (as `-1`) leaves one unchanged.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    // SAFETY: valid descriptor; AT_EMPTY_PATH acts on the descriptor's own inode.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// A time to set: `UTIME_OMIT`, `UTIME_NOW`, or an exact time.
pub fn timespec(time: Option<Option<(i64, u32)>>) -> libc::timespec {
    match time {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some((sec, nsec))) => libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec as i64,
        },
    }
}

pub fn utimens_fd(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> SysResult<()> {
    // SAFETY: valid descriptor and a two-element array as utimensat requires.
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn truncate_path(fd: BorrowedFd<'_>, size: u64) -> SysResult<()> {
    let path = ProcPath::of(fd);
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::truncate(path.as_c().as_ptr(), size as libc::off_t) }).map(drop)
}

pub fn ftruncate(file: &File, size: u64) -> SysResult<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::ftruncate(file.as_raw_fd(), size as libc::off_t) }).map(drop)
}

pub fn pread(file: &File, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    // SAFETY: the buffer is valid for its length.
    check_size(unsafe {
        libc::pread(
            file.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

pub fn pwrite(file: &File, buf: &[u8], offset: u64) -> SysResult<usize> {
    // SAFETY: the buffer is valid for its length.
    check_size(unsafe {
        libc::pwrite(
            file.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    })
}

pub fn fsync(file: &File, datasync: bool) -> SysResult<()> {
    // SAFETY: valid descriptor.
    check(unsafe {
        if datasync {
            libc::fdatasync(file.as_raw_fd())
        } else {
            libc::fsync(file.as_raw_fd())
        }
    })
    .map(drop)
}

pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> SysResult<()> {
    // SAFETY: valid descriptor.
    check(unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(drop)
}

pub fn lseek(file: &File, offset: i64, whence: i32) -> SysResult<i64> {
    // SAFETY: valid descriptor.
    let ret = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

pub fn copy_file_range(
    from: &File,
    from_offset: u64,
    to: &File,
    to_offset: u64,
    len: usize,
) -> SysResult<usize> {
    let mut off_in = from_offset as libc::loff_t;
    let mut off_out = to_offset as libc::loff_t;
    // SAFETY: valid descriptors and offsets owned by this frame.
    check_size(unsafe {
        libc::copy_file_range(
            from.as_raw_fd(),
            &mut off_in,
            to.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    })
}

pub fn statvfs_fd(fd: BorrowedFd<'_>) -> SysResult<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid descriptor; `st` is written on success.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded and filled the buffer.
    Ok(unsafe { st.assume_init() })
}

/// Extended attributes act on the inode through its `/proc/self/fd` link,
/// which reaches the inode itself even when it is a symlink.
pub fn getxattr(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    let path = ProcPath::of(fd);
    // SAFETY: NUL-terminated strings; the buffer is valid for its length (may be empty).
    check_size(unsafe {
        libc::getxattr(
            path.as_c().as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

pub fn setxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> SysResult<()> {
    let path = ProcPath::of(fd);
    // SAFETY: NUL-terminated strings; the value is valid for its length.
    check(unsafe {
        libc::setxattr(
            path.as_c().as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<usize> {
    let path = ProcPath::of(fd);
    // SAFETY: NUL-terminated path; the buffer is valid for its length (may be empty).
    check_size(unsafe { libc::listxattr(path.as_c().as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    let path = ProcPath::of(fd);
    // SAFETY: NUL-terminated strings.
    check(unsafe { libc::removexattr(path.as_c().as_ptr(), name.as_ptr()) }).map(drop)
}

/// Whether a directory carries a default ACL (then the umask does not apply
/// to what is created in it, as on the native filesystem).
pub fn has_default_acl(dir: BorrowedFd<'_>) -> bool {
    getxattr(dir, c"system.posix_acl_default", &mut []).is_ok()
}

/// One directory entry as `getdents64` returns it.
pub struct DirEntry {
    pub ino: u64,
    /// The cookie that resumes the stream right after this entry.
    pub next_offset: i64,
    pub kind: u8,
    pub name: CString,
}

/// Reads the next batch of entries of a directory opened for reading.
pub fn getdents(dir: &File, buf: &mut [u8], out: &mut Vec<DirEntry>) -> SysResult<usize> {
    // SAFETY: the buffer is valid for its length; getdents64 writes whole records.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(Errno::last());
    }
    let n = n as usize;
    let mut pos = 0;
    while pos < n {
        // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name (NUL-terminated).
        let rec = &buf[pos..n];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
        let off = i64::from_ne_bytes(rec[8..16].try_into().expect("8 bytes"));
        let reclen = u16::from_ne_bytes(rec[16..18].try_into().expect("2 bytes")) as usize;
        let kind = rec[18];
        let name_bytes = &rec[19..reclen];
        let name = CStr::from_bytes_until_nul(name_bytes).map_err(|_| Errno::EIO)?;
        out.push(DirEntry {
            ino,
            next_offset: off,
            kind,
            name: name.to_owned(),
        });
        pos += reclen;
    }
    Ok(n)
}

/// Converts an `io::Error` to the errno it carries (EIO when it carries none).
pub fn errno_of(err: &io::Error) -> Errno {
    err.raw_os_error()
        .map(Errno::from_raw)
        .unwrap_or(Errno::EIO)
}
