//! The operations the differential suite generates, and how each one runs on
//! a tree: through plain syscalls on absolute paths, so the mount and the
//! native directory see exactly the same calls.

use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use proptest::prelude::*;

use crate::util::{PYTHON, cstr, errno};

/// Relative paths the operations pick from: few enough that operations
/// collide (rename over existing files and directories, rmdir of non-empty
/// directories, ...).
pub const PATHS: &[&str] = &["a", "b", "c", "d", "a/x", "b/x", "b/y", "d/x", "b/x/y"];

pub const XATTRS: &[&str] = &["user.k", "user.other"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameFlags {
    Plain,
    NoReplace,
    Exchange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    Set(i64, i64),
    Omit,
}

/// An operation a non-root user (uid/gid 65534) makes, in a child process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Nobody {
    Create(&'static str),
    Write(&'static str),
    Read(&'static str),
    Mkdir(&'static str),
    Unlink(&'static str),
    Rename(&'static str, &'static str),
    Chmod(&'static str, u32),
    List(&'static str),
    Truncate(&'static str),
    Touch(&'static str),
    SetXattr(&'static str),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Create {
        path: &'static str,
        excl: bool,
        trunc: bool,
        mode: u32,
    },
    Write {
        path: &'static str,
        offset: u64,
        len: usize,
        byte: u8,
        append: bool,
    },
    Truncate {
        path: &'static str,
        size: u64,
    },
    Mkdir {
        path: &'static str,
        mode: u32,
    },
    Rmdir {
        path: &'static str,
    },
    Unlink {
        path: &'static str,
    },
    Rename {
        from: &'static str,
        to: &'static str,
        flags: RenameFlags,
    },
    Link {
        from: &'static str,
        to: &'static str,
    },
    Symlink {
        target: &'static str,
        path: &'static str,
    },
    Chmod {
        path: &'static str,
        mode: u32,
    },
    Utimens {
        path: &'static str,
        atime: Time,
        mtime: Time,
    },
    SetXattr {
        path: &'static str,
        name: &'static str,
        value: u8,
        flags: i32,
    },
    RemoveXattr {
        path: &'static str,
        name: &'static str,
    },
    Read {
        path: &'static str,
        offset: u64,
        len: usize,
    },
    Stat {
        path: &'static str,
    },
    Readdir {
        path: &'static str,
    },
    PunchHole {
        path: &'static str,
        offset: u64,
        len: u64,
    },
    CopyRange {
        from: &'static str,
        to: &'static str,
        off_in: u64,
        off_out: u64,
        len: usize,
    },
    AsNobody(Nobody),
}

/// What a call returned, in a form both trees must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ret {
    Done,
    Count(u64),
    Data(Digest),
    Stat(StatView),
    Names(Vec<String>),
    /// What the non-root child printed.
    Child(String),
}

pub type Outcome = Result<Ret, Errno>;

/// An errno with its name, for readable failures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl std::fmt::Debug for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({})",
            std::io::Error::from_raw_os_error(self.0),
            self.0
        )
    }
}

/// Bytes, compared by length and hash, shown by their start.
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    pub len: usize,
    pub hash: u64,
    pub head: Vec<u8>,
}

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        let mut h = std::hash::DefaultHasher::new();
        data.hash(&mut h);
        Digest {
            len: data.len(),
            hash: h.finish(),
            head: data[..data.len().min(24)].to_vec(),
        }
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes #{:016x} starting {:?}",
            self.len,
            self.hash,
            String::from_utf8_lossy(&self.head)
        )
    }
}

/// The stat fields that must match between the mount and native. Not
/// compared: st_ino/st_dev (different files), atime/ctime (the mount may
/// touch them differently; atime/mtime are compared where set explicitly),
/// st_blocks (allocation granularity may differ; sparseness is checked on
/// its own), and st_size of directories (a property of the backing
/// directory's history, not of the tree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatView {
    pub mode: u32,
    pub size: Option<u64>,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    /// Only filled in right after an explicit utimensat.
    pub times: Option<((i64, i64), (i64, i64))>,
}

pub fn stat_view(md: &std::fs::Metadata) -> StatView {
    StatView {
        mode: md.mode(),
        size: (!md.is_dir()).then(|| md.size()),
        nlink: md.nlink(),
        uid: md.uid(),
        gid: md.gid(),
        times: None,
    }
}

fn check(ret: libc::c_int) -> Result<(), Errno> {
    if ret < 0 { Err(Errno(errno())) } else { Ok(()) }
}

fn check_size(ret: isize) -> Result<u64, Errno> {
    if ret < 0 {
        Err(Errno(errno()))
    } else {
        Ok(ret as u64)
    }
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd is owned by this guard.
        unsafe { libc::close(self.0) };
    }
}

fn open(path: &CString, flags: i32, mode: u32) -> Result<Fd, Errno> {
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        Err(Errno(errno()))
    } else {
        Ok(Fd(fd))
    }
}

/// Closes explicitly, so that an error from close (the journal's or the
/// backing file's flush) is part of the outcome.
fn close(fd: Fd) -> Result<(), Errno> {
    let raw = fd.0;
    std::mem::forget(fd);
    // SAFETY: the fd was owned by the guard we just forgot.
    check(unsafe { libc::close(raw) })
}

pub fn pattern(byte: u8, len: usize, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| byte.wrapping_add(((offset as usize + i) % 251) as u8))
        .collect()
}

/// Runs `op` on the tree at `root`.
pub fn apply(root: &Path, op: &Op) -> Outcome {
    let p = |rel: &str| cstr(&root.join(rel));
    match op {
        Op::Create {
            path,
            excl,
            trunc,
            mode,
        } => {
            let mut flags = libc::O_CREAT | libc::O_WRONLY;
            if *excl {
                flags |= libc::O_EXCL;
            }
            if *trunc {
                flags |= libc::O_TRUNC;
            }
            let fd = open(&p(path), flags, *mode)?;
            close(fd)?;
            Ok(Ret::Done)
        }
        Op::Write {
            path,
            offset,
            len,
            byte,
            append,
        } => {
            let flags = libc::O_WRONLY | if *append { libc::O_APPEND } else { 0 };
            let fd = open(&p(path), flags, 0)?;
            let data = pattern(*byte, *len, *offset);
            // SAFETY: buffer valid for len bytes.
            let n = if *append {
                check_size(unsafe { libc::write(fd.0, data.as_ptr().cast(), data.len()) })?
            } else {
                check_size(unsafe {
                    libc::pwrite(fd.0, data.as_ptr().cast(), data.len(), *offset as i64)
                })?
            };
            close(fd)?;
            Ok(Ret::Count(n))
        }
        Op::Truncate { path, size } => {
            // SAFETY: valid C string.
            check(unsafe { libc::truncate(p(path).as_ptr(), *size as i64) })?;
            Ok(Ret::Done)
        }
        Op::Mkdir { path, mode } => {
            // SAFETY: valid C string.
            check(unsafe { libc::mkdir(p(path).as_ptr(), *mode) })?;
            Ok(Ret::Done)
        }
        Op::Rmdir { path } => {
            // SAFETY: valid C string.
            check(unsafe { libc::rmdir(p(path).as_ptr()) })?;
            Ok(Ret::Done)
        }
        Op::Unlink { path } => {
            // SAFETY: valid C string.
            check(unsafe { libc::unlink(p(path).as_ptr()) })?;
            Ok(Ret::Done)
        }
        Op::Rename { from, to, flags } => {
            let f = match flags {
                RenameFlags::Plain => 0,
                RenameFlags::NoReplace => libc::RENAME_NOREPLACE,
                RenameFlags::Exchange => libc::RENAME_EXCHANGE,
            };
            let (a, b) = (p(from), p(to));
            // SAFETY: valid C strings; AT_FDCWD with absolute paths.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    f,
                )
            };
            check(r as i32)?;
            Ok(Ret::Done)
        }
        Op::Link { from, to } => {
            // SAFETY: valid C strings.
            check(unsafe { libc::link(p(from).as_ptr(), p(to).as_ptr()) })?;
            Ok(Ret::Done)
        }
        Op::Symlink { target, path } => {
            let t = CString::new(*target).expect("no NUL");
            // SAFETY: valid C strings.
            check(unsafe { libc::symlink(t.as_ptr(), p(path).as_ptr()) })?;
            Ok(Ret::Done)
        }
        Op::Chmod { path, mode } => {
            // SAFETY: valid C string.
            check(unsafe { libc::chmod(p(path).as_ptr(), *mode) })?;
            Ok(Ret::Done)
        }
        Op::Utimens { path, atime, mtime } => {
            let ts = |t: &Time| match t {
                Time::Set(s, n) => libc::timespec {
                    tv_sec: *s,
                    tv_nsec: *n,
                },
                Time::Omit => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
            };
            let times = [ts(atime), ts(mtime)];
            // SAFETY: valid C string and two timespecs.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, p(path).as_ptr(), times.as_ptr(), 0) })?;
            let md = std::fs::metadata(root.join(path))
                .map_err(|e| Errno(e.raw_os_error().unwrap_or(0)))?;
            let mut v = stat_view(&md);
            // Only times set explicitly must match; UTIME_OMIT keeps whatever was there.
            let pick = |t: &Time, got: (i64, i64)| {
                if matches!(t, Time::Omit) {
                    (-1, -1)
                } else {
                    got
                }
            };
            v.times = Some((
                pick(atime, (md.atime(), md.atime_nsec())),
                pick(mtime, (md.mtime(), md.mtime_nsec())),
            ));
            Ok(Ret::Stat(v))
        }
        Op::SetXattr {
            path,
            name,
            value,
            flags,
        } => {
            let n = CString::new(*name).expect("no NUL");
            let v = vec![*value; (*value as usize % 7) + 1];
            // SAFETY: valid C strings and buffer.
            check(unsafe {
                libc::lsetxattr(
                    p(path).as_ptr(),
                    n.as_ptr(),
                    v.as_ptr().cast(),
                    v.len(),
                    *flags,
                )
            })?;
            Ok(Ret::Done)
        }
        Op::RemoveXattr { path, name } => {
            let n = CString::new(*name).expect("no NUL");
            // SAFETY: valid C strings.
            check(unsafe { libc::lremovexattr(p(path).as_ptr(), n.as_ptr()) })?;
            Ok(Ret::Done)
        }
        Op::Read { path, offset, len } => {
            let fd = open(&p(path), libc::O_RDONLY, 0)?;
            let mut buf = vec![0u8; *len];
            // SAFETY: buffer valid for len bytes.
            let n = check_size(unsafe {
                libc::pread(fd.0, buf.as_mut_ptr().cast(), buf.len(), *offset as i64)
            })?;
            close(fd)?;
            Ok(Ret::Data(Digest::of(&buf[..n as usize])))
        }
        Op::Stat { path } => {
            let md = std::fs::symlink_metadata(root.join(path))
                .map_err(|e| Errno(e.raw_os_error().unwrap_or(0)))?;
            Ok(Ret::Stat(stat_view(&md)))
        }
        Op::Readdir { path } => {
            let rd = std::fs::read_dir(root.join(path))
                .map_err(|e| Errno(e.raw_os_error().unwrap_or(0)))?;
            let mut names = Vec::new();
            for e in rd {
                let e = e.map_err(|e| Errno(e.raw_os_error().unwrap_or(0)))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            Ok(Ret::Names(names))
        }
        Op::PunchHole { path, offset, len } => {
            let fd = open(&p(path), libc::O_WRONLY, 0)?;
            // SAFETY: plain fd call.
            check(unsafe {
                libc::fallocate(
                    fd.0,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    *offset as i64,
                    *len as i64,
                )
            })?;
            close(fd)?;
            Ok(Ret::Done)
        }
        Op::CopyRange {
            from,
            to,
            off_in,
            off_out,
            len,
        } => {
            let fin = open(&p(from), libc::O_RDONLY, 0)?;
            let fout = open(&p(to), libc::O_WRONLY, 0)?;
            let (mut a, mut b) = (*off_in as i64, *off_out as i64);
            // SAFETY: fds are open; offsets are valid pointers.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_copy_file_range,
                    fin.0,
                    &mut a as *mut i64,
                    fout.0,
                    &mut b as *mut i64,
                    *len,
                    0u32,
                )
            };
            let n = check_size(n as isize)?;
            close(fin)?;
            close(fout)?;
            Ok(Ret::Count(n))
        }
        Op::AsNobody(op) => Ok(Ret::Child(as_nobody(root, op))),
    }
}

/// The child's program: one operation, printing `ok:<result>` or `err:<errno>`.
const NOBODY_PY: &str = r#"
import os, sys
op, a = sys.argv[1], sys.argv[2:]
try:
    r = ''
    if op == 'create':
        os.close(os.open(a[0], os.O_CREAT | os.O_WRONLY, 0o644))
    elif op == 'write':
        fd = os.open(a[0], os.O_WRONLY); r = str(os.write(fd, b'nobody')); os.close(fd)
    elif op == 'read':
        fd = os.open(a[0], os.O_RDONLY); r = os.read(fd, 64).hex(); os.close(fd)
    elif op == 'mkdir':
        os.mkdir(a[0], 0o755)
    elif op == 'unlink':
        os.unlink(a[0])
    elif op == 'rename':
        os.rename(a[0], a[1])
    elif op == 'chmod':
        os.chmod(a[0], int(a[1], 8))
    elif op == 'list':
        r = ','.join(sorted(os.listdir(a[0])))
    elif op == 'truncate':
        os.truncate(a[0], 3)
    elif op == 'touch':
        os.utime(a[0])
    elif op == 'setxattr':
        os.setxattr(a[0], 'user.nobody', b'v', follow_symlinks=False)
    print('ok:' + r)
except OSError as e:
    print('err:%d %s' % (e.errno, os.strerror(e.errno)))
"#;

fn as_nobody(root: &Path, op: &Nobody) -> String {
    let j = |rel: &str| root.join(rel).into_os_string();
    let (name, args): (&str, Vec<std::ffi::OsString>) = match op {
        Nobody::Create(p) => ("create", vec![j(p)]),
        Nobody::Write(p) => ("write", vec![j(p)]),
        Nobody::Read(p) => ("read", vec![j(p)]),
        Nobody::Mkdir(p) => ("mkdir", vec![j(p)]),
        Nobody::Unlink(p) => ("unlink", vec![j(p)]),
        Nobody::Rename(a, b) => ("rename", vec![j(a), j(b)]),
        Nobody::Chmod(p, m) => ("chmod", vec![j(p), format!("{m:o}").into()]),
        Nobody::List(p) => ("list", vec![j(p)]),
        Nobody::Truncate(p) => ("truncate", vec![j(p)]),
        Nobody::Touch(p) => ("touch", vec![j(p)]),
        Nobody::SetXattr(p) => ("setxattr", vec![j(p)]),
    };
    use std::os::unix::process::CommandExt;
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(NOBODY_PY)
        .arg(name)
        .args(args)
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run python3 as nobody");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        text.starts_with("ok:") || text.starts_with("err:"),
        "python3 as nobody failed: {out:?}"
    );
    text
}

// ---- generation ----

fn path() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(PATHS)
}

fn file_mode() -> impl Strategy<Value = u32> {
    proptest::sample::select(&[0o644u32, 0o600, 0o666, 0o755, 0o400, 0o000][..])
}

fn dir_mode() -> impl Strategy<Value = u32> {
    proptest::sample::select(&[0o755u32, 0o777, 0o700, 0o1777, 0o555][..])
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => proptest::sample::select(&[0u64, 1, 100, 4095, 4096, 5000, 8191][..]),
        1 => proptest::sample::select(&[65_536u64, 1 << 20, (1 << 24) + 3][..]),
    ]
}

fn length() -> impl Strategy<Value = usize> {
    proptest::sample::select(&[1usize, 10, 100, 4096, 5000, 70_000][..])
}

fn time() -> impl Strategy<Value = Time> {
    prop_oneof![
        4 => (0i64..2_000_000_000, 0i64..1_000_000_000).prop_map(|(s, n)| Time::Set(s, n)),
        1 => Just(Time::Omit),
    ]
}

fn nobody() -> impl Strategy<Value = Nobody> {
    prop_oneof![
        path().prop_map(Nobody::Create),
        path().prop_map(Nobody::Write),
        path().prop_map(Nobody::Read),
        path().prop_map(Nobody::Mkdir),
        path().prop_map(Nobody::Unlink),
        (path(), path()).prop_map(|(a, b)| Nobody::Rename(a, b)),
        (path(), proptest::sample::select(&[0o777u32, 0o600][..]))
            .prop_map(|(p, m)| Nobody::Chmod(p, m)),
        proptest::sample::select(&["", "a", "b", "d"][..]).prop_map(Nobody::List),
        path().prop_map(Nobody::Truncate),
        path().prop_map(Nobody::Touch),
        path().prop_map(Nobody::SetXattr),
    ]
}

pub fn op() -> impl Strategy<Value = Op> {
    let rename_flags = prop_oneof![
        3 => Just(RenameFlags::Plain),
        1 => Just(RenameFlags::NoReplace),
        1 => Just(RenameFlags::Exchange),
    ];
    prop_oneof![
        4 => (path(), any::<bool>(), any::<bool>(), file_mode())
            .prop_map(|(path, excl, trunc, mode)| Op::Create { path, excl, trunc, mode }),
        6 => (path(), offset(), length(), any::<u8>(), prop::bool::weighted(0.25))
            .prop_map(|(path, offset, len, byte, append)| Op::Write { path, offset, len, byte, append }),
        2 => (path(), proptest::sample::select(&[0u64, 1, 4096, 5000, 100_000, (1 << 24) + 7][..]))
            .prop_map(|(path, size)| Op::Truncate { path, size }),
        3 => (path(), dir_mode()).prop_map(|(path, mode)| Op::Mkdir { path, mode }),
        2 => path().prop_map(|path| Op::Rmdir { path }),
        2 => path().prop_map(|path| Op::Unlink { path }),
        5 => (path(), path(), rename_flags).prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        2 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (proptest::sample::select(&["a", "b/x", "x/y", "nonexistent"][..]), path())
            .prop_map(|(target, path)| Op::Symlink { target, path }),
        2 => (path(), prop_oneof![file_mode(), dir_mode()]).prop_map(|(path, mode)| Op::Chmod { path, mode }),
        2 => (path(), time(), time()).prop_map(|(path, atime, mtime)| Op::Utimens { path, atime, mtime }),
        2 => (path(), proptest::sample::select(XATTRS), any::<u8>(),
              proptest::sample::select(&[0, libc::XATTR_CREATE, libc::XATTR_REPLACE][..]))
            .prop_map(|(path, name, value, flags)| Op::SetXattr { path, name, value, flags }),
        1 => (path(), proptest::sample::select(XATTRS)).prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        2 => (path(), offset(), length()).prop_map(|(path, offset, len)| Op::Read { path, offset, len }),
        1 => path().prop_map(|path| Op::Stat { path }),
        1 => proptest::sample::select(&["", "a", "b", "d", "b/x"][..]).prop_map(|path| Op::Readdir { path }),
        1 => (path(), offset(), proptest::sample::select(&[1u64, 4096, 10_000][..]))
            .prop_map(|(path, offset, len)| Op::PunchHole { path, offset, len }),
        1 => (path(), path(), offset(), offset(), length())
            .prop_map(|(from, to, off_in, off_out, len)| Op::CopyRange { from, to, off_in, off_out, len }),
        2 => nobody().prop_map(Op::AsNobody),
    ]
}

/// The tree both sides start from: a file with content and an xattr, a
/// directory with a file, a hard link, a symlink; the root open to all so
/// that the non-root child can work in it.
pub fn populate(root: &Path) {
    std::fs::write(root.join("a"), pattern(b'A', 5000, 0)).expect("write a");
    std::fs::create_dir(root.join("b")).expect("mkdir b");
    std::fs::write(root.join("b/x"), pattern(b'X', 300, 0)).expect("write b/x");
    std::fs::hard_link(root.join("a"), root.join("b/y")).expect("link b/y");
    std::os::unix::fs::symlink("b/x", root.join("c")).expect("symlink c");
    xattr::set(root.join("a"), "user.k", b"initial").expect("set user.k");
    crate::util::chmod(root, 0o777);
    crate::util::chmod(&root.join("b"), 0o755);
    crate::util::chmod(&root.join("a"), 0o644);
    crate::util::chmod(&root.join("b/x"), 0o666);
}
