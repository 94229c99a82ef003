//! The journaling passthrough filesystem, as plain Rust: every method is one
//! FUSE operation, takes node ids and names, acts on the backing tree through
//! `sys`, tells the journal what changed, and returns what the kernel needs.
//! `fuse.rs` only translates fuser's callbacks to these methods.
//!
//! Ordering rules (docs/DURABILITY.md):
//! - content: the journal is told *before* the backing file changes
//!   (`note_write`, `truncate`, `mark_rewritten` make the dirty mark durable
//!   first when the file was clean);
//! - namespace and metadata: the backing operation runs first and the record
//!   is made only when it succeeded, before the kernel gets the reply. The
//!   kernel serialises conflicting namespace operations (it holds the parent
//!   directories' locks across the request), so record order matches the
//!   order in which the tree changed.
//!
//! Permission checks are the kernel's (`default_permissions`): the server runs
//! as root and performs what the kernel has already allowed, then gives new
//! files the caller's ownership.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use journal::{
    AttrChange, FileId, FileKind, InodeKey, Journal, Met, Origin, RenameMode, Timestamp,
};
use nix::errno::Errno;
use parking_lot::Mutex;

use crate::handles::HandleTable;
use crate::inode::{Backing, Inode, InodeTable, ROOT_NODE};
use crate::open::{BackingToken, IoPath};
use crate::statahead::{Statahead, Subdir};
use crate::sys;

pub type FsResult<T> = Result<T, Errno>;

/// An entry handed to the kernel: its node id and attributes (with `st_ino`
/// already set to what `stat` through the mount must show).
pub struct Entry {
    pub node: u64,
    pub attr: libc::stat,
}

/// Who is asking, as the kernel reports it.
#[derive(Copy, Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set with setattr.
#[derive(Copy, Clone, Debug)]
pub enum SetTime {
    Now,
    At(i64, u32),
}

/// The attributes a setattr asks to change.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub fh: Option<u64>,
}

/// The result of an open or create.
pub struct Opened {
    pub fh: u64,
    /// When set, the kernel is to do this file's reads and writes itself.
    pub passthrough: Option<BackingToken>,
    /// Whether `flush` matters for this handle; when not, the kernel can
    /// skip the round trip on every close.
    pub needs_flush: bool,
}

/// One directory entry for readdir(plus).
pub struct DirItem<'a> {
    pub name: &'a [u8],
    pub ino: u64,
    pub kind: FileKind,
    /// The offset that resumes the listing after this entry.
    pub next_offset: i64,
    /// For readdirplus: the looked-up entry (one kernel reference taken).
    pub entry: Option<Entry>,
}

/// An open regular file.
pub struct FileHandle {
    inode: Arc<Inode>,
    file: Arc<File>,
    path: IoPath,
    writable: bool,
}

/// An open directory and its position in the backing directory stream.
pub struct DirHandle {
    inode: Arc<Inode>,
    stream: Mutex<DirStream>,
}

struct DirStream {
    dir: File,
    buf: Vec<u8>,
    entries: Vec<sys::DirEntry>,
    next: usize,
    /// The offset at which `entries[next]` sits in the stream.
    position: i64,
}

/// Registers a backing file with the kernel for passthrough.
pub type Register<'a> = &'a dyn Fn(&File) -> std::io::Result<BackingToken>;

/// The journaling passthrough filesystem over one source directory.
pub struct JournalingFs {
    journal: Journal,
    inodes: InodeTable,
    files: HandleTable<FileHandle>,
    dirs: HandleTable<DirHandle>,
    invalidate_attrs: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    statahead: Statahead,
}

impl JournalingFs {
    /// Serves `source` (already validated as a directory) with `journal`.
    pub fn new(source: &Path, journal: Journal) -> std::io::Result<JournalingFs> {
        let c = std::ffi::CString::new(source.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
        let root_fd = sys::open_path(&c).map_err(std::io::Error::from)?;
        let st = sys::stat_fd(root_fd.as_fd()).map_err(std::io::Error::from)?;
        let root_file = journal
            .file_state(FileId::ROOT)
            .ok_or_else(|| std::io::Error::other("the journal has no root directory entry"))?;
        let root_key = key_of(&st);
        Ok(JournalingFs {
            journal,
            inodes: InodeTable::new(root_fd, root_key, root_file).map_err(std::io::Error::from)?,
            files: HandleTable::new(),
            dirs: HandleTable::new(),
            invalidate_attrs: std::sync::OnceLock::new(),
            statahead: Statahead::start()?,
        })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// How many inodes and open handles the kernel holds (for status and tests).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.inodes.len(), self.files.len(), self.dirs.len())
    }

    fn inode(&self, node: u64) -> FsResult<Arc<Inode>> {
        self.inodes.get(node).ok_or(Errno::ESTALE)
    }

    fn file_handle(&self, fh: u64) -> FsResult<Arc<FileHandle>> {
        self.files.get(fh).ok_or(Errno::EBADF)
    }

    fn entry_of(&self, inode: &Inode, mut attr: libc::stat) -> Entry {
        attr.st_ino = inode.node;
        Entry {
            node: inode.node,
            attr,
        }
    }

    /// Takes a kernel reference on the inode at `dir/name`, opening it.
    fn reference_child(
        &self,
        dir: &Arc<Inode>,
        name: &OsStr,
    ) -> FsResult<(Arc<Inode>, libc::stat)> {
        let c = sys::cname(name)?;
        let fd = sys::open_path_at(dir.fd()?.as_fd(), &c)?;
        self.reference_fd(dir, name, fd, Met::Found)
    }

    /// Takes a kernel reference on the inode at `dir/name` for a listing,
    /// without opening it where a handle can reopen it later.
    fn reference_listed(
        &self,
        dir: &Arc<Inode>,
        dir_fd: BorrowedFd<'_>,
        name: &CStr,
    ) -> FsResult<(Arc<Inode>, libc::stat)> {
        let st = sys::stat_at(dir_fd, name)?;
        let key = key_of(&st);
        let kind = kind_of(&st)?;
        let handle = match self.inodes.reopens_by_handle(key) {
            true => sys::name_to_handle_at(dir_fd, name)?,
            false => None,
        };
        let os_name = OsStr::from_bytes(name.to_bytes());
        let Some(handle) = handle else {
            let fd = sys::open_path_at(dir_fd, name)?;
            return self.reference_fd(dir, os_name, fd, Met::Found);
        };
        let inode = self
            .inodes
            .reference(key, kind, Backing::Handle(handle), || {
                self.journal
                    .met(Met::Found, dir.file.id(), os_name, key, kind)
            })?;
        Ok((inode, st))
    }

    /// Takes a kernel reference on the inode `fd` opens at `dir/name`. The
    /// journal meets a file it does not know as `how` says: made by this
    /// operation, or found (it appeared behind the mount's back).
    fn reference_fd(
        &self,
        dir: &Arc<Inode>,
        name: &OsStr,
        fd: OwnedFd,
        how: Met,
    ) -> FsResult<(Arc<Inode>, libc::stat)> {
        let st = sys::stat_fd(fd.as_fd())?;
        let key = key_of(&st);
        let kind = kind_of(&st)?;
        let inode = self.inodes.reference(key, kind, Backing::Fd(fd), || {
            self.journal.met(how, dir.file.id(), name, key, kind)
        })?;
        Ok((inode, st))
    }

    /// The journal id of whatever `dir/name` is now, identifying it if new.
    fn id_at(&self, dir: &Arc<Inode>, name: &OsStr) -> FsResult<(FileId, libc::stat)> {
        let st = sys::stat_at(dir.fd()?.as_fd(), &sys::cname(name)?)?;
        let key = key_of(&st);
        let id = match self.journal.lookup(key) {
            Some(id) => id,
            None => self
                .journal
                .identify(dir.file.id(), name, key, kind_of(&st)?),
        };
        Ok((id, st))
    }

    // ---- lookups and attributes ------------------------------------------

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Entry> {
        let dir = self.inode(parent)?;
        let (inode, st) = self.reference_child(&dir, name)?;
        Ok(self.entry_of(&inode, st))
    }

    pub fn forget(&self, node: u64, n: u64) {
        self.inodes.forget(node, n);
    }

    pub fn getattr(&self, node: u64) -> FsResult<libc::stat> {
        let inode = self.inode(node)?;
        let mut st = sys::stat_fd(inode.fd()?.as_fd())?;
        st.st_ino = inode.node;
        Ok(st)
    }

    pub fn setattr(&self, caller: Caller, node: u64, set: &SetAttr) -> FsResult<libc::stat> {
        let inode = self.inode(node)?;
        let handle = set.fh.and_then(|fh| self.files.get(fh));
        let mut change = AttrChange::default();
        if let Some(mode) = set.mode {
            sys::chmod_fd(inode.fd()?.as_fd(), mode & 0o7777)?;
            change.mode = Some(mode & 0o7777);
        }
        if set.uid.is_some() || set.gid.is_some() {
            sys::chown_fd(inode.fd()?.as_fd(), set.uid, set.gid)?;
            change.uid = set.uid;
            change.gid = set.gid;
        }
        if let Some(size) = set.size {
            // fuser does not pass the kernel's kill flag; a truncate by an
            // unprivileged caller clears set-ID bits natively.
            if set.mode.is_none() {
                self.drop_privileges(&inode, caller)?;
            }
            let _changing = inode.file.change_guard();
            self.journal
                .truncate(&inode.file, size)
                .map_err(journal_errno)?;
            match &handle {
                Some(h) if h.writable => sys::ftruncate(&h.file, size)?,
                _ => sys::truncate_path(inode.fd()?.as_fd(), size)?,
            }
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let spec = |t: Option<SetTime>| match t {
                None => sys::timespec(None),
                Some(SetTime::Now) => sys::timespec(Some(None)),
                Some(SetTime::At(s, ns)) => sys::timespec(Some(Some((s, ns)))),
            };
            sys::utimens_fd(inode.fd()?.as_fd(), &[spec(set.atime), spec(set.mtime)])?;
        }
        let mut st = sys::stat_fd(inode.fd()?.as_fd())?;
        if set.atime.is_some() {
            change.atime = Some(Timestamp {
                sec: st.st_atime,
                nsec: st.st_atime_nsec as u32,
            });
        }
        if set.mtime.is_some() {
            change.mtime = Some(Timestamp {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            });
        }
        if change != AttrChange::default() {
            self.journal.attr_changed(inode.file.id(), change);
        }
        st.st_ino = inode.node;
        Ok(st)
    }

    pub fn readlink(&self, node: u64) -> FsResult<Vec<u8>> {
        sys::readlink_fd(self.inode(node)?.fd()?.as_fd())
    }

    pub fn statfs(&self, node: u64) -> FsResult<libc::statvfs> {
        sys::statvfs_fd(self.inode(node)?.fd()?.as_fd())
    }

    // ---- creating names ---------------------------------------------------

    /// Gives a new entry the caller's ownership. The server creates as root;
    /// the group comes from the parent when it is set-group-ID, as natively.
    fn give_to_caller(
        &self,
        dir: &Arc<Inode>,
        fd: &OwnedFd,
        caller: Caller,
        mode: Option<u32>,
    ) -> FsResult<()> {
        let dir_st = sys::stat_fd(dir.fd()?.as_fd())?;
        let gid = if dir_st.st_mode & libc::S_ISGID != 0 {
            None
        } else {
            Some(caller.gid)
        };
        if caller.uid == 0 && gid.is_none_or(|g| g == 0) {
            return Ok(());
        }
        sys::chown_fd(fd.as_fd(), Some(caller.uid), gid)?;
        // chown clears set-user/group-ID bits; a creator who asked for them keeps them.
        if let Some(mode) = mode.filter(|m| m & 0o6000 != 0) {
            sys::chmod_fd(fd.as_fd(), mode & 0o7777)?;
        }
        Ok(())
    }

    /// The mode a new entry gets: the caller's umask applies unless the
    /// directory has a default ACL (then the ACL decides, as natively).
    fn creation_mode(dir: &Arc<Inode>, mode: u32, umask: u32) -> FsResult<u32> {
        Ok(if sys::has_default_acl(dir.fd()?.as_fd()) {
            mode
        } else {
            mode & !umask
        })
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> FsResult<Entry> {
        let dir = self.inode(parent)?;
        let c = sys::cname(name)?;
        let mode = Self::creation_mode(&dir, mode & 0o7777, umask)?;
        sys::mkdir_at(dir.fd()?.as_fd(), &c, mode)?;
        self.finish_create(&dir, name, &c, caller, Some(mode))
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> FsResult<Entry> {
        let dir = self.inode(parent)?;
        let c = sys::cname(name)?;
        let perm = Self::creation_mode(&dir, mode & 0o7777, umask)?;
        sys::mknod_at(
            dir.fd()?.as_fd(),
            &c,
            (mode & libc::S_IFMT) | perm,
            rdev as u64,
        )?;
        self.finish_create(&dir, name, &c, caller, Some(perm))
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> FsResult<Entry> {
        let dir = self.inode(parent)?;
        let c = sys::cname(name)?;
        let target = sys::cname(target.as_os_str())?;
        sys::symlink_at(&target, dir.fd()?.as_fd(), &c)?;
        self.finish_create(&dir, name, &c, caller, None)
    }

    fn finish_create(
        &self,
        dir: &Arc<Inode>,
        name: &OsStr,
        c: &std::ffi::CStr,
        caller: Caller,
        mode: Option<u32>,
    ) -> FsResult<Entry> {
        let fd = sys::open_path_at(dir.fd()?.as_fd(), c)?;
        self.give_to_caller(dir, &fd, caller, mode)?;
        let (inode, st) = self.reference_fd(dir, name, fd, Met::Created)?;
        Ok(self.entry_of(&inode, st))
    }

    pub fn link(&self, node: u64, new_parent: u64, new_name: &OsStr) -> FsResult<Entry> {
        let inode = self.inode(node)?;
        let dir = self.inode(new_parent)?;
        sys::link_fd_at(
            inode.fd()?.as_fd(),
            dir.fd()?.as_fd(),
            &sys::cname(new_name)?,
        )?;
        self.journal
            .linked(inode.file.id(), dir.file.id(), new_name);
        let st = sys::stat_fd(inode.fd()?.as_fd())?;
        // Last, so that no error path leaves a reference the kernel never got.
        self.inodes.reference_known(&inode);
        Ok(self.entry_of(&inode, st))
    }

    // ---- removing and moving names -----------------------------------------

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.inode(parent)?;
        let (id, _) = self.id_at(&dir, name)?;
        sys::unlink_at(dir.fd()?.as_fd(), &sys::cname(name)?, 0)?;
        self.journal.unlinked(id, dir.file.id(), name);
        Ok(())
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        let dir = self.inode(parent)?;
        let (id, _) = self.id_at(&dir, name)?;
        sys::unlink_at(dir.fd()?.as_fd(), &sys::cname(name)?, libc::AT_REMOVEDIR)?;
        self.journal.rmdired(id, dir.file.id(), name);
        Ok(())
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let from = self.inode(parent)?;
        let to = self.inode(new_parent)?;
        let mode = if flags & libc::RENAME_EXCHANGE != 0 {
            RenameMode::Exchange
        } else if flags & libc::RENAME_NOREPLACE != 0 {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        let (moved, moved_st) = self.id_at(&from, name)?;
        let target = match self.id_at(&to, new_name) {
            Ok((id, st)) => Some((id, st)),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(e),
        };
        sys::rename_at(
            from.fd()?.as_fd(),
            &sys::cname(name)?,
            to.fd()?.as_fd(),
            &sys::cname(new_name)?,
            flags,
        )?;
        // Renaming (or exchanging) a name with another name of the same
        // inode does nothing, natively: record nothing.
        let replaced = target
            .filter(|(_, st)| key_of(st) != key_of(&moved_st))
            .map(|(id, _)| id);
        if target.is_some() && replaced.is_none() {
            return Ok(());
        }
        self.journal.renamed(
            moved,
            from.file.id(),
            name,
            to.file.id(),
            new_name,
            mode,
            replaced,
        );
        Ok(())
    }

    // ---- extended attributes -----------------------------------------------

    pub fn getxattr(&self, node: u64, name: &OsStr, size: u32) -> FsResult<Vec<u8>> {
        let inode = self.inode(node)?;
        let c = sys::cname(name)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::getxattr(inode.fd()?.as_fd(), &c, &mut buf)?;
        buf.truncate(n);
        if size == 0 {
            // The caller asks for the size only.
            return Ok(vec![0u8; n]);
        }
        Ok(buf)
    }

    pub fn listxattr(&self, node: u64, size: u32) -> FsResult<Vec<u8>> {
        let inode = self.inode(node)?;
        let mut buf = vec![0u8; size as usize];
        let n = sys::listxattr(inode.fd()?.as_fd(), &mut buf)?;
        if size == 0 {
            return Ok(vec![0u8; n]);
        }
        buf.truncate(n);
        Ok(buf)
    }

    pub fn setxattr(&self, node: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        let inode = self.inode(node)?;
        sys::setxattr(inode.fd()?.as_fd(), &sys::cname(name)?, value, flags)?;
        self.journal.xattr_set(inode.file.id(), name);
        Ok(())
    }

    pub fn removexattr(&self, node: u64, name: &OsStr) -> FsResult<()> {
        let inode = self.inode(node)?;
        sys::removexattr(inode.fd()?.as_fd(), &sys::cname(name)?)?;
        self.journal.xattr_removed(inode.file.id(), name);
        Ok(())
    }

    // ---- open files ---------------------------------------------------------

    // The arguments of FUSE_CREATE, one for one.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        register: Option<Register<'_>>,
    ) -> FsResult<(Entry, Opened)> {
        let dir = self.inode(parent)?;
        let c = sys::cname(name)?;
        let perm = Self::creation_mode(&dir, mode & 0o7777, umask)?;
        // Create exclusively so that `created` is true; a name that appeared
        // behind the kernel's back is opened as an existing file instead.
        let own_flags = flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT);
        let file = match sys::create_at(dir.fd()?.as_fd(), &c, own_flags | libc::O_EXCL, perm) {
            Ok(file) => file,
            Err(Errno::EEXIST) if flags & libc::O_EXCL == 0 => {
                let (inode, st) = self.reference_child(&dir, name)?;
                let opened = self.open_inode(caller, &inode, flags, false, None, register);
                return self.entry_and_open(inode, st, opened);
            }
            Err(e) => return Err(e),
        };
        let fd = sys::open_path_at(dir.fd()?.as_fd(), &c)?;
        self.give_to_caller(&dir, &fd, caller, Some(perm))?;
        let (inode, st) = self.reference_fd(&dir, name, fd, Met::Created)?;
        let opened = self.open_inode(caller, &inode, flags, true, Some(file), register);
        self.entry_and_open(inode, st, opened)
    }

    /// The reply of a create; a failed open gives back the reference the
    /// kernel will not receive.
    fn entry_and_open(
        &self,
        inode: Arc<Inode>,
        st: libc::stat,
        opened: FsResult<Opened>,
    ) -> FsResult<(Entry, Opened)> {
        match opened {
            Ok(opened) => Ok((self.entry_of(&inode, st), opened)),
            Err(e) => {
                self.inodes.forget(inode.node, 1);
                Err(e)
            }
        }
    }

    pub fn open(
        &self,
        caller: Caller,
        node: u64,
        flags: i32,
        register: Option<Register<'_>>,
    ) -> FsResult<Opened> {
        let inode = self.inode(node)?;
        self.open_inode(caller, &inode, flags, false, None, register)
    }

    /// Opens a regular file, choosing its io path (see `open.rs`), and makes
    /// the journal know about content that will change before the kernel can
    /// write through the returned handle.
    fn open_inode(
        &self,
        caller: Caller,
        inode: &Arc<Inode>,
        flags: i32,
        created: bool,
        created_file: Option<File>,
        register: Option<Register<'_>>,
    ) -> FsResult<Opened> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags & libc::O_TRUNC != 0;
        // Our descriptor never appends (the kernel gives every write its offset)
        // and never bypasses the cache with unaligned buffers.
        let own_flags = flags & !(libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECT);
        let file = match created_file {
            Some(f) => f,
            None => sys::reopen(inode.fd()?.as_fd(), own_flags)?,
        };
        let st = sys::stat_fd(file.as_fd())?;
        let empty = !created && !truncate && writable && st.st_size == 0;
        let anew = created || truncate || empty;
        // The server clears set-ID bits (FUSE_HANDLE_KILLPRIV_V2): a writer
        // without CAP_FSETID must go through ferry, whose writes carry the
        // kernel's kill flag, and its O_TRUNC drops the bits at once.
        let drops_privileges = privileges_to_drop(&st, caller) != 0;

        // Held until an unseen writer is counted: a push that freezes the
        // file sees either none of this open or all of it.
        let changing = inode.file.change_guard();
        let mut state = inode.open.lock();
        let path = match register {
            Some(_) if writable && drops_privileges => state.choose_in_place(),
            Some(_) => state.choose(writable, anew),
            None => IoPath::Journaled,
        };
        let unknown_ranges = writable && (path == IoPath::Passthrough || anew);
        // A created file is new content already; O_TRUNC empties an existing
        // one even when opened read-only, as Linux does when permitted.
        let truncate = truncate && !created;
        if (unknown_ranges || truncate) && !created {
            self.journal
                .mark_rewritten(&inode.file, Origin::Mount)
                .map_err(journal_errno)?;
        }
        if truncate {
            if drops_privileges {
                self.drop_privileges(inode, caller)?;
            }
            match writable {
                true => sys::ftruncate(&file, 0)?,
                false => sys::truncate_path(inode.fd()?.as_fd(), 0)?,
            }
        }
        let (file, passthrough) = match path {
            IoPath::Journaled => (Arc::new(file), None),
            IoPath::Passthrough => {
                let (shared, token) = state.passthrough(|| {
                    // One backing file per inode, opened read-write when the
                    // filesystem allows it: every passthrough open shares it.
                    let backing = sys::reopen(inode.fd()?.as_fd(), libc::O_RDWR)
                        .or_else(|_| sys::reopen(inode.fd()?.as_fd(), libc::O_RDONLY))?;
                    let register = register.expect("passthrough is chosen only with a registrar");
                    let token = register(&backing).map_err(|e| sys::errno_of(&e))?;
                    Ok((Arc::new(backing), token))
                })?;
                (shared, Some(token))
            }
        };
        state.opened(path);
        drop(state);
        if writable && path == IoPath::Passthrough {
            inode.file.unjournaled_writer_opened();
        }
        drop(changing);
        // Only a writer through ferry has ranges to record on close.
        let needs_flush = writable && path == IoPath::Journaled;
        let fh = self.files.insert(FileHandle {
            inode: inode.clone(),
            file,
            path,
            writable,
        });
        Ok(Opened {
            fh,
            passthrough,
            needs_flush,
        })
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.file_handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = sys::pread(&h.file, &mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// `kill_privileges`: the kernel asks the server to clear set-ID bits,
    /// as a write by a user without CAP_FSETID does natively.
    pub fn write(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_privileges: bool,
    ) -> FsResult<u32> {
        let h = self.file_handle(fh)?;
        let changing = h.inode.file.change_guard();
        self.journal
            .note_write(&h.inode.file, offset, data.len() as u64)
            .map_err(journal_errno)?;
        let mut done = 0;
        while done < data.len() {
            match sys::pwrite(&h.file, &data[done..], offset + done as u64) {
                Ok(n) => done += n,
                // Like write(2): what was written counts, the error comes next time.
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        drop(changing);
        if kill_privileges {
            self.drop_privileges(&h.inode, caller)?;
        }
        Ok(done as u32)
    }

    /// Clears the set-ID bits a write or truncate by `caller` clears natively,
    /// and tells the kernel its cached mode is stale.
    fn drop_privileges(&self, inode: &Arc<Inode>, caller: Caller) -> FsResult<()> {
        let st = sys::stat_fd(inode.fd()?.as_fd())?;
        let drop = privileges_to_drop(&st, caller);
        if drop == 0 {
            return Ok(());
        }
        let mode = st.st_mode & 0o7777 & !drop;
        sys::chmod_fd(inode.fd()?.as_fd(), mode)?;
        let change = AttrChange {
            mode: Some(mode),
            ..AttrChange::default()
        };
        self.journal.attr_changed(inode.file.id(), change);
        if let Some(invalidate) = self.invalidate_attrs.get() {
            invalidate(inode.node);
        }
        Ok(())
    }

    /// Sets how to tell the kernel that a node's cached attributes are stale
    /// (the FUSE adapter's notifier); without it, the cache expires by itself.
    pub fn set_attr_invalidator(&self, invalidate: Box<dyn Fn(u64) + Send + Sync>) {
        let _ = self.invalidate_attrs.set(invalidate);
    }

    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        if h.writable && h.path == IoPath::Journaled {
            self.journal.flush_file(&h.inode.file);
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let Some(h) = self.files.remove(fh) else {
            return Err(Errno::EBADF);
        };
        let mut state = h.inode.open.lock();
        state.released(h.path);
        drop(state);
        match h.path {
            IoPath::Journaled if h.writable => self.journal.flush_file(&h.inode.file),
            // A push does not take a file with an open passthrough writer
            // clean (it marks it rewritten again after reading it); this
            // covers a writer that wrote after a push took it clean anyway.
            IoPath::Passthrough if h.writable => {
                h.inode.file.unjournaled_writer_closed();
                if !h.inode.file.is_dirty() {
                    let _changing = h.inode.file.change_guard();
                    self.journal
                        .mark_rewritten(&h.inode.file, Origin::Mount)
                        .map_err(journal_errno)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        self.journal.sync().map_err(journal_errno)?;
        sys::fsync(&h.file, datasync)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let h = self.file_handle(fh)?;
        let _changing = h.inode.file.change_guard();
        if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            // Content after the range moves: no range describes that.
            self.journal
                .mark_rewritten(&h.inode.file, Origin::Mount)
                .map_err(journal_errno)?;
        } else {
            self.journal
                .note_write(&h.inode.file, offset, len)
                .map_err(journal_errno)?;
        }
        sys::fallocate(&h.file, mode, offset, len)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> FsResult<i64> {
        let h = self.file_handle(fh)?;
        sys::lseek(&h.file, offset, whence)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u32> {
        let from = self.file_handle(fh_in)?;
        let to = self.file_handle(fh_out)?;
        let len = len.min(u32::MAX as u64 & !0xfff);
        let _changing = to.inode.file.change_guard();
        self.journal
            .note_write(&to.inode.file, offset_out, len)
            .map_err(journal_errno)?;
        let n = sys::copy_file_range(&from.file, offset_in, &to.file, offset_out, len as usize)?;
        Ok(n as u32)
    }

    // ---- directories ----------------------------------------------------------

    pub fn opendir(&self, node: u64) -> FsResult<u64> {
        let inode = self.inode(node)?;
        let dir = sys::reopen(inode.fd()?.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let stream = DirStream {
            dir,
            buf: vec![0u8; 32 * 1024],
            entries: Vec::new(),
            next: 0,
            position: 0,
        };
        Ok(self.dirs.insert(DirHandle {
            inode,
            stream: Mutex::new(stream),
        }))
    }

    /// Lists entries from `offset`, handing each to `add` until it reports a
    /// full buffer (returns false). With `plus`, each entry but `.` and `..`
    /// is looked up and carries one kernel reference, dropped again if the
    /// kernel did not take the entry.
    pub fn readdir(
        &self,
        fh: u64,
        offset: i64,
        plus: bool,
        add: &mut dyn FnMut(DirItem<'_>) -> bool,
    ) -> FsResult<()> {
        let handle = self.dirs.get(fh).ok_or(Errno::EBADF)?;
        let mut subdirs = Vec::new();
        let listed = self.list(&handle, offset, plus, add, &mut subdirs);
        // A program that asks for attributes with the names is likely
        // walking the tree: read the subdirectories ahead.
        self.statahead.ahead(subdirs);
        listed
    }

    /// `readdir` proper; with `plus`, the subdirectories handed over are
    /// added to `subdirs`.
    fn list(
        &self,
        handle: &DirHandle,
        offset: i64,
        plus: bool,
        add: &mut dyn FnMut(DirItem<'_>) -> bool,
        subdirs: &mut Vec<Subdir>,
    ) -> FsResult<()> {
        // Entries are looked up beneath the directory's own descriptor.
        let dir_fd = match plus {
            true => Some(handle.inode.fd()?),
            false => None,
        };
        let mut guard = handle.stream.lock();
        let s = &mut *guard;
        if offset != s.position {
            sys::lseek(&s.dir, offset, libc::SEEK_SET)?;
            s.entries.clear();
            s.next = 0;
            s.position = offset;
        }
        // Once an entry was handed over, an error must not fail the reply:
        // the kernel would drop the entries (and with readdirplus, the
        // references they carry). End the batch instead; the next call
        // resumes at the failing entry and reports the error then.
        let mut added = false;
        let stop = |err: Errno, added: bool| if added { Ok(()) } else { Err(err) };
        loop {
            if s.next == s.entries.len() {
                s.entries.clear();
                s.next = 0;
                match sys::getdents(&s.dir, &mut s.buf, &mut s.entries) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(err) => return stop(err, added),
                }
            }
            let e = &s.entries[s.next];
            let name = OsStr::from_bytes(e.name.as_bytes());
            let dot = name == "." || name == "..";
            let (ino, kind, entry) = if let Some(dir_fd) = dir_fd.as_ref().filter(|_| !dot) {
                match self.reference_listed(&handle.inode, dir_fd.as_fd(), &e.name) {
                    Ok((inode, st)) => {
                        if inode.kind == FileKind::Dir {
                            subdirs.push(Subdir {
                                parent: dir_fd.clone(),
                                name: e.name.clone(),
                                key: inode.key,
                            });
                        }
                        (inode.node, inode.kind, Some(self.entry_of(&inode, st)))
                    }
                    // Gone since the listing was read: skip it, as a fresh listing would.
                    Err(Errno::ENOENT) => {
                        s.position = e.next_offset;
                        s.next += 1;
                        continue;
                    }
                    Err(err) => return stop(err, added),
                }
            } else {
                let ino = if name == "." {
                    handle.inode.node
                } else {
                    e.ino
                };
                (ino, kind_of_dtype(e.kind), None)
            };
            let referenced = entry.as_ref().map(|en| en.node);
            let item = DirItem {
                name: e.name.as_bytes(),
                ino,
                kind,
                next_offset: e.next_offset,
                entry,
            };
            let next_offset = item.next_offset;
            if !add(item) {
                if let Some(node) = referenced {
                    self.inodes.forget(node, 1);
                }
                return Ok(());
            }
            added = true;
            s.position = next_offset;
            s.next += 1;
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(fh);
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let handle = self.dirs.get(fh).ok_or(Errno::EBADF)?;
        self.journal.sync().map_err(journal_errno)?;
        let stream = handle.stream.lock();
        sys::fsync(&stream.dir, datasync)
    }

    /// The node of the source root (for tests that drive the logic directly).
    pub fn root(&self) -> u64 {
        ROOT_NODE
    }
}

/// The set-ID bits that a write or truncate by `caller` clears, as the
/// kernel's `setattr_should_drop_suidgid` decides: none for root
/// (CAP_FSETID); set-user-ID always; set-group-ID when group-executable or
/// when the caller is not in the file's group (judged by the caller's
/// primary group: FUSE does not pass supplementary groups).
fn privileges_to_drop(st: &libc::stat, caller: Caller) -> u32 {
    if caller.uid == 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return 0;
    }
    let mut drop = st.st_mode & libc::S_ISUID;
    let group_exec = st.st_mode & libc::S_IXGRP != 0;
    if st.st_mode & libc::S_ISGID != 0 && (group_exec || caller.gid != st.st_gid) {
        drop |= libc::S_ISGID;
    }
    drop
}

pub fn key_of(st: &libc::stat) -> InodeKey {
    InodeKey {
        dev: st.st_dev,
        ino: st.st_ino,
    }
}

fn kind_of(st: &libc::stat) -> FsResult<FileKind> {
    FileKind::from_mode(st.st_mode).ok_or(Errno::EIO)
}

fn kind_of_dtype(t: u8) -> FileKind {
    match t {
        libc::DT_DIR => FileKind::Dir,
        libc::DT_LNK => FileKind::Symlink,
        libc::DT_FIFO => FileKind::Fifo,
        libc::DT_SOCK => FileKind::Socket,
        libc::DT_CHR => FileKind::CharDevice,
        libc::DT_BLK => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

/// A journal that cannot record a change must stop the change: the caller
/// gets EIO and the backing file is left untouched.
fn journal_errno(err: journal::JournalError) -> Errno {
    tracing::error!(%err, "journal failure; refusing the change");
    Errno::EIO
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing pairs a stat and a handle taken by name: were the name
    /// replaced in between, the handle would name another inode. A reopen
    /// by handle must then refuse, not serve the other file under this node.
    #[test]
    fn a_handle_that_names_another_inode_is_never_reopened() {
        let src = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), b"a").unwrap();
        std::fs::write(src.path().join("b"), b"b").unwrap();
        let options = journal::OpenOptions::default();
        let (journal, _) = Journal::open(state.path(), src.path(), &options).unwrap();
        let fs = JournalingFs::new(src.path(), journal.clone()).unwrap();
        let root = fs.inode(ROOT_NODE).unwrap();
        let root_fd = root.fd().unwrap();
        let st_a = sys::stat_at(root_fd.as_fd(), c"a").unwrap();
        let handle_b = sys::name_to_handle_at(root_fd.as_fd(), c"b")
            .unwrap()
            .expect("the test filesystem makes handles");
        let key = key_of(&st_a);
        let inode = fs
            .inodes
            .reference(key, FileKind::File, Backing::Handle(handle_b), || {
                journal.met(
                    Met::Found,
                    FileId::ROOT,
                    OsStr::new("a"),
                    key,
                    FileKind::File,
                )
            })
            .unwrap();
        assert_eq!(inode.fd().err(), Some(Errno::ESTALE));
        journal.close().unwrap();
    }
}
