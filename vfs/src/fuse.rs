//! The FUSE adapter: the only module that sees fuser's callback and reply
//! types. Each callback converts its arguments, calls `JournalingFs`, and
//! turns the result into a reply. Nothing here decides anything.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Caller, DirItem, JournalingFs, Opened, SetAttr, SetTime};
use crate::open::BackingToken;

/// How long the kernel may trust an entry or attributes without asking.
/// Every change goes through the mount, so the kernel's copy stays right;
/// the bound only limits how long a change made behind the mount's back
/// stays invisible through it.
const TTL: Duration = Duration::from_secs(1);

/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;

pub struct FuseAdapter {
    fs: Arc<JournalingFs>,
    passthrough: Arc<AtomicBool>,
    io_uring: bool,
    /// Set at init: handles whose reads and writes come to ferry bypass the
    /// kernel's page cache (`fopen_flags`).
    uncached_journaled: bool,
}

impl FuseAdapter {
    /// `passthrough` is set at init when the kernel accepts kernel
    /// passthrough; `io_uring` asks for FUSE over io_uring.
    pub fn new(fs: Arc<JournalingFs>, passthrough: Arc<AtomicBool>, io_uring: bool) -> FuseAdapter {
        FuseAdapter {
            fs,
            passthrough,
            io_uring,
            uncached_journaled: false,
        }
    }
}

fn errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::from_nanos(nsec as u64)
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => SetTime::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(before) => {
                let d = before.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                SetTime::At(sec, nsec)
            }
        },
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn kind_type(kind: journal::FileKind) -> FileType {
    use journal::FileKind as K;
    match kind {
        K::File => FileType::RegularFile,
        K::Dir => FileType::Directory,
        K::Symlink => FileType::Symlink,
        K::Fifo => FileType::NamedPipe,
        K::Socket => FileType::Socket,
        K::CharDevice => FileType::CharDevice,
        K::BlockDevice => FileType::BlockDevice,
    }
}

fn attr(st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// An attribute block for `.` and `..` in readdirplus: the kernel uses only
/// the inode number and type of those entries.
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn xattr_reply(result: Result<Vec<u8>, nix::errno::Errno>, size: u32, reply: ReplyXattr) {
    match result {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(e)),
    }
}

fn empty_reply(result: Result<(), nix::errno::Errno>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn entry_reply(result: Result<crate::fs::Entry, nix::errno::Errno>, reply: ReplyEntry) {
    match result {
        Ok(e) => reply.entry(&TTL, &attr(&e.attr), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

/// The open flags of a reply. `uncached_journaled`: a handle whose io comes
/// to ferry skips the kernel's page cache (FOPEN_DIRECT_IO). ferry's own
/// pread and pwrite go through the backing file's page cache, so a cached
/// handle would hold every byte it touches twice, and fill the second copy
/// at the caller's expense (docs/ARCHITECTURE.md, "Invariants").
fn fopen_flags(opened: &Opened, uncached_journaled: bool) -> FopenFlags {
    let mut flags = if opened.needs_flush {
        FopenFlags::empty()
    } else {
        FopenFlags::FOPEN_NOFLUSH
    };
    if uncached_journaled && opened.passthrough.is_none() {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    flags
}

fn backing(token: &BackingToken) -> &BackingId {
    token
        .downcast_ref::<BackingId>()
        .expect("every token this adapter makes is a BackingId")
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            // The server clears set-ID bits on write and truncate (fs.rs).
            // This lets the kernel skip asking for security.capability on
            // every write, which costs a round trip per write otherwise.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        for flag in wanted.iter() {
            if config.add_capabilities(flag).is_err() {
                tracing::warn!(
                    ?flag,
                    "kernel lacks a FUSE capability; continuing without it"
                );
            }
        }
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        if !passthrough {
            tracing::warn!("kernel FUSE passthrough unavailable: all file I/O goes through ferry");
        }
        self.passthrough.store(passthrough, Ordering::Release);
        // Uncached handles may still be mapped shared only with this flag
        // (Linux 6.6); without passthrough every read comes to ferry, and
        // the kernel's cache is then what keeps reads fast.
        self.uncached_journaled = passthrough
            && config
                .add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
                .is_ok();
        // Requests then reach a thread on the CPU that made them, which
        // saves a cross-CPU wakeup each way (docs/ARCHITECTURE.md).
        if self.io_uring {
            match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
                Ok(()) => tracing::info!("FUSE requests come through per-CPU io_uring queues"),
                Err(_) => tracing::debug!(
                    "the kernel does not offer FUSE over io_uring (fuse module parameter enable_uring)"
                ),
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry_reply(self.fs.lookup(parent.0, name), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(st) => reply.attr(&TTL, &attr(&st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            fh: fh.map(|f| f.0),
        };
        match self.fs.setattr(caller(req), ino.0, &set) {
            Ok(st) => reply.attr(&TTL, &attr(&st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        entry_reply(
            self.fs
                .mknod(caller(req), parent.0, name, mode, umask, rdev),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        entry_reply(
            self.fs.mkdir(caller(req), parent.0, name, mode, umask),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty_reply(self.fs.unlink(parent.0, name), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty_reply(self.fs.rmdir(parent.0, name), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        entry_reply(
            self.fs.symlink(caller(req), parent.0, link_name, target),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty_reply(
            self.fs
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
            reply,
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry_reply(self.fs.link(ino.0, newparent.0, newname), reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let register = |file: &std::fs::File| -> std::io::Result<BackingToken> {
            Ok(Arc::new(reply.open_backing(file)?))
        };
        let result = self.fs.open(
            caller(req),
            ino.0,
            flags.0,
            self.passthrough_register(&register),
        );
        match result {
            Ok(opened) => {
                let flags = fopen_flags(&opened, self.uncached_journaled);
                match &opened.passthrough {
                    Some(token) => {
                        reply.opened_passthrough(FileHandle(opened.fh), flags, backing(token))
                    }
                    None => reply.opened(FileHandle(opened.fh), flags),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.fs.write(caller(req), fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        empty_reply(self.fs.flush(fh.0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty_reply(self.fs.release(fh.0), reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty_reply(self.fs.fsync(fh.0, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut add = |item: DirItem<'_>| {
            !reply.add(
                INodeNo(item.ino),
                item.next_offset as u64,
                kind_type(item.kind),
                OsStr::from_bytes(item.name),
            )
        };
        match self.fs.readdir(fh.0, offset as i64, false, &mut add) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let mut add = |item: DirItem<'_>| {
            let a = match &item.entry {
                Some(entry) => attr(&entry.attr),
                None => dot_attr(item.ino),
            };
            !reply.add(
                INodeNo(item.ino),
                item.next_offset as u64,
                OsStr::from_bytes(item.name),
                &TTL,
                &a,
                Generation(0),
            )
        };
        match self.fs.readdir(fh.0, offset as i64, true, &mut add) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty_reply(self.fs.fsyncdir(fh.0, datasync), reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty_reply(self.fs.setxattr(ino.0, name, value, flags), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.fs.getxattr(ino.0, name, size), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.fs.listxattr(ino.0, size), size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty_reply(self.fs.removexattr(ino.0, name), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has checked already.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let register = |file: &std::fs::File| -> std::io::Result<BackingToken> {
            Ok(Arc::new(reply.open_backing(file)?))
        };
        let result = self.fs.create(
            caller(req),
            parent.0,
            name,
            mode,
            umask,
            flags,
            self.passthrough_register(&register),
        );
        match result {
            Ok((entry, opened)) => {
                let (attr, fh, flags) = (
                    attr(&entry.attr),
                    FileHandle(opened.fh),
                    fopen_flags(&opened, self.uncached_journaled),
                );
                match &opened.passthrough {
                    Some(token) => reply.created_passthrough(
                        &TTL,
                        &attr,
                        Generation(0),
                        fh,
                        flags,
                        backing(token),
                    ),
                    None => reply.created(&TTL, &attr, Generation(0), fh, flags),
                }
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty_reply(self.fs.fallocate(fh.0, offset, length, mode), reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .fs
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl FuseAdapter {
    /// The registration callback, or one that declines when the kernel has no passthrough.
    fn passthrough_register<'a>(
        &self,
        register: &'a dyn Fn(&std::fs::File) -> std::io::Result<BackingToken>,
    ) -> Option<crate::fs::Register<'a>> {
        self.passthrough.load(Ordering::Acquire).then_some(register)
    }
}
