//! The `Journal` handle the mount calls: record numbering, the live table,
//! per-file dirty state and durability waits. Opening is in `recovery`, the
//! writing in `writer`.
//!
//! Lock order (never take an earlier lock while holding a later one):
//! 1. `Shared::live` (the table lock: sequence numbers, the table, the
//!    channel to the writer),
//! 2. a `FileState::pending`,
//! 3. `Progress::state` (durability).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::error::JournalError;
use crate::id::{FileId, FileKind, InodeKey, Seq};
use crate::lock::LockFile;
use crate::record::{AttrChange, ByteRange, Name, Op, Origin, Record, RenameMode};
use crate::state::{CLEAN, DIRTY, FileState, MARKING};
use crate::table::{Snapshot, Table, touched};
use crate::writer::{Msg, Progress};

/// How to open a journal.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Run the reconcile scan even after a clean stop.
    pub force_reconcile: bool,
    /// How often pending ranges are recorded and the log fdatasync'd when
    /// nobody asks for it.
    pub sync_interval: Duration,
    /// How often the table is checkpointed into the index.
    pub checkpoint_interval: Duration,
    /// Size at which a log segment is closed and the next one started.
    pub segment_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            force_reconcile: false,
            sync_interval: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(30),
            segment_bytes: crate::log::DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// What opening the journal found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The state directory was new: the source was scanned for the baseline.
    pub fresh: bool,
    /// The previous session did not close: recovery and a reconcile ran.
    pub unclean: bool,
    /// Log records replayed over the index checkpoint.
    pub replayed: u64,
    /// Records a reconcile scan made (escalations and differences found).
    pub reconciled: u64,
    /// Entries of the source tree a scan looked at.
    pub scanned: u64,
}

/// A summary for `ferry status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub last_seq: Seq,
    pub files: u64,
    pub dirty_files: u64,
    pub log_bytes: u64,
    pub index_bytes: u64,
}

/// The mount's live state, behind the table lock.
pub(crate) struct Live {
    pub table: Table,
    pub states: HashMap<FileId, Arc<FileState>>,
    pub next_seq: u64,
    /// `None` once closed: nothing more is recorded.
    pub tx: Option<Sender<Msg>>,
    /// The records since the last push, kept once a push has run (see
    /// `replication`).
    pub history: Option<crate::replication::History>,
}

/// How the mount met a file it did not hold yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Met {
    /// The mount made it (create, mkdir, mknod, symlink).
    Created,
    /// A lookup or a listing found it.
    Found,
}

impl Live {
    /// The shared state of a file known to the table.
    fn state(&mut self, id: FileId) -> Option<Arc<FileState>> {
        let e = self.table.get(id)?;
        let (dirty, rewritten) = (e.dirty, e.rewritten);
        Some(
            self.states
                .entry(id)
                .or_insert_with(|| Arc::new(FileState::new(id, dirty, rewritten)))
                .clone(),
        )
    }

    /// See [`Journal::identify`]. A known file at a known name, the case of
    /// every lookup and listing, allocates nothing.
    fn identify(&mut self, parent: FileId, name: &OsStr, key: InodeKey, kind: FileKind) -> FileId {
        use std::os::unix::ffi::OsStrExt;
        if let Some(id) = self.table.lookup(key)
            && let Some(e) = self.table.get(id)
            && e.kind == kind
        {
            let known = |(p, n): &(FileId, Name)| *p == parent && n.0 == name.as_bytes();
            if e.names.iter().any(known) {
                return id;
            }
            let name = Name::from_os(name);
            let op = match (kind, e.names.first()) {
                (FileKind::Dir, Some((p0, n0))) => Op::Rename {
                    id,
                    from_parent: *p0,
                    from_name: n0.clone(),
                    to_parent: parent,
                    to_name: name,
                    mode: RenameMode::Replace,
                    replaced: None,
                    origin: Origin::Reconcile,
                },
                _ => Op::Link {
                    id,
                    parent,
                    name,
                    origin: Origin::Reconcile,
                },
            };
            Shared::emit_locked(self, op);
            return id;
        }
        self.create(parent, name, key, kind, Origin::Reconcile)
    }

    /// A new id for a file the journal did not know, with its `Create`.
    fn create(
        &mut self,
        parent: FileId,
        name: &OsStr,
        key: InodeKey,
        kind: FileKind,
        origin: Origin,
    ) -> FileId {
        let id = self.table.alloc_id();
        // `apply` drops a stale mapping of `key` (a reused inode number).
        Shared::emit_locked(
            self,
            Op::Create {
                id,
                parent,
                name: Name::from_os(name),
                kind,
                key,
                origin,
            },
        );
        id
    }
}

pub(crate) struct Shared {
    pub live: Mutex<Live>,
    pub progress: Arc<Progress>,
    /// Files with pending ranges (a FileId may appear more than once or be
    /// stale; emitting is idempotent). A lock-free queue, so the write path
    /// never takes a global lock.
    pub pending_tx: Sender<FileId>,
    pub pending_rx: Receiver<FileId>,
    pub closed: AtomicBool,
    pub writer: Mutex<Option<JoinHandle<()>>>,
    pub writer_thread: Mutex<Option<ThreadId>>,
    pub index_path: PathBuf,
    /// Shared with the writer; pushes read and write its cache tables.
    /// `None` once closed, so that the database is closed with the journal
    /// even while clones of the handle live on.
    pub index: Mutex<Option<Arc<crate::index::Index>>>,
    pub journal_id: std::sync::OnceLock<[u8; 16]>,
    pub lock: Mutex<Option<LockFile>>,
}

impl Drop for Shared {
    /// Dropping the last handle without `close` is an unclean stop, like a
    /// killed process: the writer writes what it was sent and exits without
    /// marking the session clean.
    fn drop(&mut self) {
        self.live.get_mut().tx = None;
        let me = std::thread::current().id();
        if *self.writer_thread.get_mut() != Some(me)
            && let Some(h) = self.writer.get_mut().take()
        {
            let _ = h.join();
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Shared {
    /// Numbers a record, applies it to the table and hands it to the writer,
    /// all under the table lock, so the log's order is the table's order.
    pub fn emit_locked(live: &mut Live, op: Op) -> Option<Seq> {
        let Some(tx) = live.tx.as_ref() else {
            // Closed: nothing more reaches the log, but the in-memory table
            // stays truthful for a mount still finishing its last calls.
            tracing::warn!(op = op.kind_name(), "journal closed; change not recorded");
            let r = Record {
                seq: Seq(live.next_seq - 1),
                unix_ns: now_ns(),
                op,
            };
            live.table.apply(&r);
            return None;
        };
        let seq = Seq(live.next_seq);
        live.next_seq += 1;
        let r = Record {
            seq,
            unix_ns: now_ns(),
            op,
        };
        live.table.apply(&r);
        for id in touched(&r.op) {
            if !live.table.contains(id) {
                live.states.remove(&id);
            }
        }
        if let Some(h) = &mut live.history {
            h.record(&r);
        }
        // The writer only goes away after close (tx is None then) or when
        // this Shared is dropped, so the send cannot fail here.
        let _ = tx.send(Msg::Record(r));
        Some(seq)
    }

    pub fn emit(&self, op: Op) -> Option<Seq> {
        Shared::emit_locked(&mut self.live.lock(), op)
    }

    /// Turns a file's pending ranges into a Write record.
    pub(crate) fn flush_locked(live: &mut Live, file: &FileState) {
        let mut p = file.pending.lock();
        p.queued = false;
        if p.ranges.is_empty() {
            return;
        }
        let ranges: Vec<ByteRange> = p.ranges.clone();
        p.ranges.clear();
        drop(p);
        if live.table.contains(file.id()) {
            Shared::emit_locked(
                live,
                Op::Write {
                    id: file.id(),
                    ranges,
                },
            );
        }
    }

    /// Records the ranges of every file in the pending queue.
    pub fn emit_pending(&self) {
        if self.pending_rx.is_empty() {
            return;
        }
        let mut live = self.live.lock();
        while let Ok(id) = self.pending_rx.try_recv() {
            if let Some(st) = live.states.get(&id).cloned() {
                Shared::flush_locked(&mut live, &st);
            }
        }
    }

    /// Waits until every record up to `seq` is fdatasync'd.
    pub fn wait_durable(&self, seq: Seq) -> Result<(), JournalError> {
        {
            let st = self.progress.state.lock();
            if let Some(f) = &st.failed {
                return Err(f.to_error());
            }
            if st.durable >= seq.0 {
                return Ok(());
            }
        }
        if let Some(tx) = &self.live.lock().tx {
            let _ = tx.send(Msg::Sync);
        }
        // Without a channel (closing), `close` syncs everything it was sent.
        let mut st = self.progress.state.lock();
        loop {
            if let Some(f) = &st.failed {
                return Err(f.to_error());
            }
            if st.durable >= seq.0 {
                return Ok(());
            }
            if st.stopped {
                return Err(JournalError::Closed);
            }
            self.progress.cv.wait(&mut st);
        }
    }

    /// Makes `file` durably dirty. If it was clean, records `first` (Dirty or
    /// Rewritten) and waits for it to be fdatasync'd; returns whether it did.
    pub fn ensure_dirty(
        &self,
        file: &FileState,
        first: impl FnOnce() -> Op,
    ) -> Result<bool, JournalError> {
        loop {
            match file.state.load(Ordering::Acquire) {
                DIRTY => return Ok(false),
                CLEAN => {
                    if file
                        .state
                        .compare_exchange(CLEAN, MARKING, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    let res = match self.emit(first()) {
                        Some(seq) => self.wait_durable(seq),
                        None => Err(JournalError::Closed),
                    };
                    // Under the progress lock, so that a thread about to wait
                    // for this file cannot miss the wake-up.
                    let _st = self.progress.state.lock();
                    file.state
                        .store(if res.is_ok() { DIRTY } else { CLEAN }, Ordering::Release);
                    self.progress.cv.notify_all();
                    return res.map(|()| true);
                }
                _ => {
                    let mut st = self.progress.state.lock();
                    while file.state.load(Ordering::Acquire) == MARKING {
                        if let Some(f) = &st.failed {
                            return Err(f.to_error());
                        }
                        self.progress.cv.wait(&mut st);
                    }
                }
            }
        }
    }
}

/// The journal of one source tree. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct Journal {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("index", &self.shared.index_path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    pub fn lookup(&self, key: InodeKey) -> Option<FileId> {
        self.shared.live.lock().table.lookup(key)
    }

    /// The shared state of a file known to the table.
    pub fn file_state(&self, id: FileId) -> Option<Arc<FileState>> {
        self.shared.live.lock().state(id)
    }

    /// The shared state of a file the mount just met: one it made
    /// (`created`) or one it found (`identify`), under one lock.
    pub fn met(
        &self,
        how: Met,
        parent: FileId,
        name: &OsStr,
        key: InodeKey,
        kind: FileKind,
    ) -> Arc<FileState> {
        let mut live = self.shared.live.lock();
        let id = match how {
            Met::Created => live.create(parent, name, key, kind, Origin::Mount),
            Met::Found => live.identify(parent, name, key, kind),
        };
        live.state(id).expect("the journal returns a live id")
    }

    /// The path relative to the source root ("" for the root), through the
    /// file's first name.
    pub fn path_of(&self, id: FileId) -> Option<PathBuf> {
        self.shared.live.lock().table.path_of(id)
    }

    fn emit(&self, op: Op) {
        self.shared.emit(op);
    }

    /// The mount met a file by lookup or readdir. A known inode keeps its
    /// id; one that appeared behind the mount's back gets a new id and a
    /// `Create{Reconcile}`; a known inode at a name the table does not know
    /// gets a `Link` (a directory, which has one name, a `Rename`).
    pub fn identify(&self, parent: FileId, name: &OsStr, key: InodeKey, kind: FileKind) -> FileId {
        self.shared.live.lock().identify(parent, name, key, kind)
    }

    /// The mount created a file (any kind). It is dirty from birth.
    pub fn created(&self, parent: FileId, name: &OsStr, key: InodeKey, kind: FileKind) -> FileId {
        self.shared
            .live
            .lock()
            .create(parent, name, key, kind, Origin::Mount)
    }

    pub fn linked(&self, id: FileId, parent: FileId, name: &OsStr) {
        self.emit(Op::Link {
            id,
            parent,
            name: Name::from_os(name),
            origin: Origin::Mount,
        });
    }

    /// One name went away; with its last name the file and its key mapping go.
    pub fn unlinked(&self, id: FileId, parent: FileId, name: &OsStr) {
        self.emit(Op::Unlink {
            id,
            parent,
            name: Name::from_os(name),
            origin: Origin::Mount,
        });
    }

    pub fn rmdired(&self, id: FileId, parent: FileId, name: &OsStr) {
        self.emit(Op::Rmdir {
            id,
            parent,
            name: Name::from_os(name),
            origin: Origin::Mount,
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub fn renamed(
        &self,
        id: FileId,
        from_parent: FileId,
        from_name: &OsStr,
        to_parent: FileId,
        to_name: &OsStr,
        mode: RenameMode,
        replaced: Option<FileId>,
    ) {
        self.emit(Op::Rename {
            id,
            from_parent,
            from_name: Name::from_os(from_name),
            to_parent,
            to_name: Name::from_os(to_name),
            mode,
            replaced,
            origin: Origin::Mount,
        });
    }

    pub fn attr_changed(&self, id: FileId, change: AttrChange) {
        self.emit(Op::SetAttr {
            id,
            change,
            origin: Origin::Mount,
        });
    }

    pub fn xattr_set(&self, id: FileId, name: &OsStr) {
        self.emit(Op::SetXattr {
            id,
            name: Name::from_os(name),
            origin: Origin::Mount,
        });
    }

    pub fn xattr_removed(&self, id: FileId, name: &OsStr) {
        self.emit(Op::RemoveXattr {
            id,
            name: Name::from_os(name),
            origin: Origin::Mount,
        });
    }

    fn check_open(&self) -> Result<(), JournalError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(JournalError::Closed)
        } else {
            Ok(())
        }
    }

    /// Call before writing `[offset, offset+len)` of the backing file. A
    /// clean file is first made durably dirty (this waits for an fdatasync,
    /// shared with other waiters); a dirty file costs one uncontended lock.
    pub fn note_write(&self, file: &FileState, offset: u64, len: u64) -> Result<(), JournalError> {
        self.check_open()?;
        let id = file.id();
        self.shared.ensure_dirty(file, || Op::Dirty { id })?;
        if len == 0 || file.rewritten.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut p = file.pending.lock();
        p.add(ByteRange { offset, len });
        if !p.queued {
            p.queued = true;
            drop(p);
            // Unbounded and lock-free: never blocks the write.
            let _ = self.shared.pending_tx.send(id);
        }
        Ok(())
    }

    /// Call before truncating the backing file.
    pub fn truncate(&self, file: &FileState, size: u64) -> Result<(), JournalError> {
        self.check_open()?;
        let id = file.id();
        self.shared.ensure_dirty(file, || Op::Dirty { id })?;
        let mut live = self.shared.live.lock();
        // Ranges written before the truncate are recorded before it.
        Shared::flush_locked(&mut live, file);
        Shared::emit_locked(&mut live, Op::Truncate { id, size });
        Ok(())
    }

    /// Call before the whole content may change without ranges being known
    /// (kernel passthrough, shared mmap). Durable if the file was clean.
    pub fn mark_rewritten(&self, file: &FileState, origin: Origin) -> Result<(), JournalError> {
        self.check_open()?;
        if file.rewritten.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let id = file.id();
        let recorded = match self
            .shared
            .ensure_dirty(file, || Op::Rewritten { id, origin })
        {
            Ok(r) => r,
            Err(e) => {
                file.rewritten.store(false, Ordering::Release);
                return Err(e);
            }
        };
        let mut live = self.shared.live.lock();
        // Ranges are subsumed by the rewrite.
        file.pending.lock().ranges.clear();
        if !recorded {
            Shared::emit_locked(&mut live, Op::Rewritten { id, origin });
        }
        Ok(())
    }

    /// Records the file's pending ranges now (e.g. on close of the file).
    pub fn flush_file(&self, file: &FileState) {
        Shared::flush_locked(&mut self.shared.live.lock(), file);
    }

    /// Records all pending ranges and returns once everything recorded so far
    /// is fdatasync'd (a program fsync'd a file on the mount).
    pub fn sync(&self) -> Result<(), JournalError> {
        self.check_open()?;
        self.shared.emit_pending();
        let last = Seq(self.shared.live.lock().next_seq - 1);
        self.shared.wait_durable(last)
    }

    pub fn status(&self) -> Status {
        let (last_seq, files, dirty_files) = {
            let live = self.shared.live.lock();
            (
                Seq(live.next_seq - 1),
                live.table.len(),
                live.table.dirty_count(),
            )
        };
        Status {
            last_seq,
            files,
            dirty_files,
            log_bytes: self.shared.progress.log_bytes.load(Ordering::Relaxed),
            index_bytes: std::fs::metadata(&self.shared.index_path)
                .map(|m| m.len())
                .unwrap_or(0),
        }
    }

    /// Clean stop: records pending ranges and MountStop, fdatasyncs,
    /// checkpoints the index, marks the session clean and releases the lock.
    /// Other clones of this handle see `Closed` afterwards.
    pub fn close(self) -> Result<(), JournalError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Err(JournalError::Closed);
        }
        self.shared.emit_pending();
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        {
            let mut live = self.shared.live.lock();
            Shared::emit_locked(&mut live, Op::MountStop);
            match live.tx.take() {
                Some(tx) => {
                    let _ = tx.send(Msg::Close(reply_tx));
                }
                None => return Err(JournalError::Closed),
            }
        }
        let res = reply_rx.recv().unwrap_or(Err(JournalError::Closed));
        if let Some(h) = self.shared.writer.lock().take() {
            let _ = h.join();
        }
        *self.shared.index.lock() = None;
        *self.shared.lock.lock() = None;
        res
    }

    /// Sets scan snapshots in the live table and the writer's copy.
    pub(crate) fn set_snapshots(&self, v: Vec<(FileId, InodeKey, Snapshot)>) {
        let mut live = self.shared.live.lock();
        for (id, key, snap) in &v {
            live.table.set_snapshot(*id, *key, *snap);
        }
        if let Some(tx) = &live.tx {
            let _ = tx.send(Msg::Snapshots(v));
        }
    }

    pub(crate) fn send(&self, msg: Msg) {
        if let Some(tx) = &self.shared.live.lock().tx {
            let _ = tx.send(msg);
        }
    }

    pub(crate) fn table_copy(&self) -> Table {
        self.shared.live.lock().table.clone()
    }

    pub(crate) fn emit_op(&self, op: Op) -> Option<Seq> {
        self.shared.emit(op)
    }

    pub(crate) fn alloc_id(&self) -> FileId {
        self.shared.live.lock().table.alloc_id()
    }
}
