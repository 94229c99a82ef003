//! What a push needs from the journal: a barrier that fixes the sequence
//! number a batch goes up to, the tree at the replica's sequence number and
//! the records after it, a brief per-file freeze while a file's content is
//! read, and the cache of what each replica holds.
//!
//! The tree at a replica's sequence number is the log replayed up to it. So
//! that a push costs what changed rather than the whole history, the journal
//! keeps, once a push has run, the tree at that push's end and every record
//! made since ([`History`]); the next push from that point starts there.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::RawRwLock;
use parking_lot::lock_api::ArcRwLockWriteGuard;

use crate::changeset::Namespace;
use crate::error::JournalError;
use crate::id::{FileId, InodeKey, Seq};
use crate::journal::{Journal, Shared};
use crate::log::{segment_name, segment_starts};
use crate::reader::read_records;
use crate::record::{Op, Origin, Record};
use crate::recovery::log_dir;
use crate::state::{CLEAN, FileState};

/// Past this many records kept for the next push, the history is dropped
/// (the next push replays the log instead) so memory stays bounded when
/// pushes stop.
const MAX_HISTORY: usize = 1 << 20;

/// The tree at `since` (once a push has ended there) and every record after
/// `since`, in order.
pub(crate) struct History {
    base: Option<Namespace>,
    since: Seq,
    tail: Vec<Record>,
}

impl History {
    pub(crate) fn record(&mut self, r: &Record) {
        if self.tail.len() >= MAX_HISTORY {
            self.base = None;
            self.tail = Vec::new();
            self.since = r.seq;
            return;
        }
        self.tail.push(r.clone());
    }
}

/// What a push from `before.seq()` to `to` works from.
pub struct Pending {
    /// The tree at the replica's sequence number. A push advances it in
    /// place to the tree at `to` ([`Namespace::advance`]) and hands that to
    /// [`Journal::remember`].
    pub before: Namespace,
    /// The records in `(before.seq(), to]`, in order.
    pub records: Vec<Record>,
    pub to: Seq,
}

impl Journal {
    /// Records every pending range and returns the last record's sequence
    /// number: a batch may go up to it once [`durable`](Self::durable)
    /// returns for it.
    pub fn barrier(&self) -> Seq {
        self.shared.emit_pending();
        let mut live = self.shared.live.lock();
        let to = Seq(live.next_seq - 1);
        live.history.get_or_insert_with(|| History {
            base: None,
            since: to,
            tail: Vec::new(),
        });
        to
    }

    /// Waits until the log is durable up to `to`, so that a replica that
    /// applied a batch up to it can never be ahead of the log after a crash.
    pub fn durable(&self, to: Seq) -> Result<(), JournalError> {
        self.shared.wait_durable(to)
    }

    /// The tree at `from` and the records of `(from, to]` (`to` from
    /// [`barrier`](Self::barrier)). From the history when it covers `from`,
    /// else by reading the log from its start.
    pub fn pending(&self, from: Seq, to: Seq) -> Result<Pending, JournalError> {
        if from > to {
            return Err(JournalError::Ahead {
                replica: from,
                journal: to,
            });
        }
        {
            let mut live = self.shared.live.lock();
            if let Some(h) = &mut live.history
                && h.since == from
                && let Some(base) = h.base.take()
            {
                // Taken, not copied (a copy of a large tree costs tens of
                // milliseconds): `remember` puts the tree at `to` back, and
                // a push that fails leaves the next one to read the log.
                let records = h.tail.iter().take_while(|r| r.seq <= to).cloned().collect();
                return Ok(Pending {
                    before: base,
                    records,
                    to,
                });
            }
        }
        self.pending_from_log(from, to)
    }

    /// Whether the records of `(from, to]` are known (from the history) to
    /// change nothing on a replica: a push's own `Clean` records, mount
    /// starts and stops. Answers without copying the tree.
    pub fn nothing_to_push(&self, from: Seq, to: Seq) -> bool {
        let live = self.shared.live.lock();
        let Some(h) = &live.history else {
            return false;
        };
        h.since <= from
            && h.tail
                .iter()
                .skip_while(|r| r.seq <= from)
                .take_while(|r| r.seq <= to)
                .all(|r| {
                    matches!(
                        r.op,
                        Op::Clean { .. } | Op::MountStart { .. } | Op::MountStop
                    )
                })
    }

    pub(crate) fn pending_from_log(&self, from: Seq, to: Seq) -> Result<Pending, JournalError> {
        let state_dir = state_dir_of(&self.shared);
        let base = self.index()?.load_base()?;
        let base_seq = base.as_ref().map_or(Seq(0), |t| t.last_seq());
        let (mut before, mut records) = match base {
            // The records before the base are gone: a replica that starts
            // from nothing gets the base as an inventory.
            Some(table) if from == Seq(0) => {
                let base = Namespace::from_table(table);
                (Namespace::new(), base.inventory(base_seq))
            }
            Some(_) if from < base_seq => {
                return Err(JournalError::Compacted {
                    replica: from,
                    base: base_seq,
                });
            }
            Some(table) => (Namespace::from_table(table), Vec::new()),
            None => (Namespace::new(), Vec::new()),
        };
        for r in read_records(state_dir)? {
            let r = r?;
            if r.seq <= base_seq {
                continue;
            }
            if r.seq > to {
                break;
            }
            if r.seq <= from {
                before.apply(&r);
            } else {
                records.push(r);
            }
        }
        if before.seq() < from && records.is_empty() && from > Seq(0) {
            // The log does not reach the replica's sequence number.
            return Err(JournalError::Ahead {
                replica: from,
                journal: before.seq(),
            });
        }
        Ok(Pending {
            before,
            records,
            to,
        })
    }

    /// Drops the log segments whose records every replica has applied (and
    /// the index has checkpointed), after writing the tree at the end of
    /// the last of them as the log's new base. Returns the new base's
    /// sequence number, if it moved. Costs a directory listing when there
    /// is nothing to drop; a replay of the dropped records when there is.
    pub fn compact(&self) -> Result<Option<Seq>, JournalError> {
        let index = self.index()?;
        let Some(applied) = index.replicas()?.into_iter().map(|(_, s)| s).min() else {
            return Ok(None);
        };
        let limit = applied.min(Seq(index.meta()?.checkpoint_seq));
        let dir = log_dir(state_dir_of(&self.shared));
        let segs = segment_starts(&dir).map_err(|e| JournalError::io(&dir, e))?;
        // A segment ends where the next begins; the last one is open.
        let droppable: Vec<(u64, Seq)> = segs
            .windows(2)
            .map(|w| (w[0].0, Seq(w[1].1 - 1)))
            .take_while(|(_, last)| *last <= limit)
            .collect();
        let Some(&(_, new_base)) = droppable.last() else {
            return Ok(None);
        };
        let base_seq = index.load_base()?.map_or(Seq(0), |t| t.last_seq());
        if new_base <= base_seq {
            return Ok(None);
        }
        let base = self.pending_from_log(new_base, new_base)?.before;
        // The base first: a crash before the segments go leaves both, and
        // replay skips what the base holds.
        index.write_base(base.table())?;
        for (seg, _) in &droppable {
            let path = dir.join(segment_name(*seg));
            std::fs::remove_file(&path).map_err(|e| JournalError::io(&path, e))?;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| JournalError::io(&dir, e))?;
        Ok(Some(new_base))
    }

    /// Keeps `after`, the tree at the end of a push, as the start of the
    /// next one.
    pub fn remember(&self, after: Namespace) {
        let mut live = self.shared.live.lock();
        let Some(h) = &mut live.history else { return };
        let at = after.seq();
        if at < h.since {
            return;
        }
        h.tail.retain(|r| r.seq > at);
        h.since = at;
        h.base = Some(after);
    }

    /// Stops changes through the mount to `id` until the returned guard is
    /// settled or dropped, after recording its pending ranges. `None` for a
    /// file the journal no longer knows.
    pub fn freeze(&self, id: FileId) -> Option<Frozen> {
        let file = self.file_state(id)?;
        let guard = file.changes.write_arc();
        Shared::flush_locked(&mut self.shared.live.lock(), &file);
        Some(Frozen {
            journal: self.clone(),
            file,
            _guard: guard,
        })
    }

    /// The cache entries (what replicas hold) of `ids` that exist.
    pub fn cached(
        &self,
        ids: impl Iterator<Item = FileId>,
    ) -> Result<HashMap<FileId, Vec<u8>>, JournalError> {
        let dir = cache_dir(state_dir_of(&self.shared));
        let mut out = HashMap::new();
        for id in ids {
            let path = dir.join(id.0.to_string());
            match std::fs::read(&path) {
                Ok(v) => {
                    out.insert(id, v);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::io(&path, e)),
            }
        }
        Ok(out)
    }

    /// Records that `replica` applied everything up to `seq` and now holds
    /// what `cache` describes (entries set, or removed for `None`).
    ///
    /// Entries are files (`journal/replica-cache/<file id>`): a tree and a
    /// signature take 0.5% of the file they describe, and in redb a value
    /// of megabytes takes a power-of-two region, twice while a transaction
    /// replaces it. They are replaced by rename and not fsynced: an entry
    /// lost or left old by a crash makes the replica refuse its base and
    /// the file is sent whole; one torn does not decode and is not used.
    pub fn acknowledge(
        &self,
        replica: &str,
        seq: Seq,
        cache: &[(FileId, Option<Vec<u8>>)],
    ) -> Result<(), JournalError> {
        self.record_replica(replica, seq, cache, false)
    }

    /// As [`acknowledge`](Self::acknowledge), for a destination that
    /// cannot tell what it holds (a directory of batch files, applied
    /// later elsewhere): what was sent is recorded durably, entries
    /// included, since the next batch is made against them and nothing
    /// would repair a lost one.
    pub fn record_sent(
        &self,
        destination: &str,
        seq: Seq,
        cache: &[(FileId, Option<Vec<u8>>)],
    ) -> Result<(), JournalError> {
        self.record_replica(destination, seq, cache, true)
    }

    fn record_replica(
        &self,
        replica: &str,
        seq: Seq,
        cache: &[(FileId, Option<Vec<u8>>)],
        durable: bool,
    ) -> Result<(), JournalError> {
        let dir = cache_dir(state_dir_of(&self.shared));
        if cache.iter().any(|(_, v)| v.is_some()) {
            std::fs::create_dir_all(&dir).map_err(|e| JournalError::io(&dir, e))?;
        }
        for (id, entry) in cache {
            let path = dir.join(id.0.to_string());
            match entry {
                Some(v) => {
                    let tmp = dir.join(format!("{}.tmp", id.0));
                    write_entry(&tmp, v, durable)
                        .and_then(|()| std::fs::rename(&tmp, &path))
                        .map_err(|e| JournalError::io(&path, e))?;
                }
                None => match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(JournalError::io(&path, e));
                    }
                    _ => {}
                },
            }
        }
        if durable && !cache.is_empty() {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| JournalError::io(&dir, e))?;
        }
        self.index()?.acknowledge(replica, seq, durable)
    }

    fn index(&self) -> Result<Arc<crate::index::Index>, JournalError> {
        self.shared.index.lock().clone().ok_or(JournalError::Closed)
    }

    /// Where the file is now: its path (through its first name) and its
    /// inode, to check that what a push opens is that file.
    pub fn locate(&self, id: FileId) -> Option<(std::path::PathBuf, Option<InodeKey>)> {
        let live = self.shared.live.lock();
        let key = live.table.get(id)?.key;
        Some((live.table.path_of(id)?, key))
    }

    /// A push could not read the file as it is (it went away or changed
    /// identity under it): the next push must send its content again.
    pub fn resend(&self, id: FileId) {
        let mut live = self.shared.live.lock();
        if live.table.contains(id) {
            Shared::emit_locked(
                &mut live,
                Op::Rewritten {
                    id,
                    origin: Origin::Mount,
                },
            );
        }
    }

    /// The journal's identity, carried by batches as their source id.
    pub fn journal_id(&self) -> Result<[u8; 16], JournalError> {
        if let Some(id) = self.shared.journal_id.get() {
            return Ok(*id);
        }
        let id = self.index()?.journal_id()?;
        Ok(*self.shared.journal_id.get_or_init(|| id))
    }

    /// Every replica's acknowledged sequence number, by name.
    pub fn replicas(&self) -> Result<Vec<(String, Seq)>, JournalError> {
        self.index()?.replicas()
    }
}

fn write_entry(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_data()?;
    }
    Ok(())
}

fn cache_dir(state_dir: &Path) -> std::path::PathBuf {
    crate::recovery::journal_dir(state_dir).join("replica-cache")
}

fn state_dir_of(shared: &Shared) -> &Path {
    // index_path is <state>/journal/index.redb.
    shared
        .index_path
        .parent()
        .and_then(Path::parent)
        .expect("the index lives two levels below the state directory")
}

/// A file whose changes through the mount wait while a push reads it.
pub struct Frozen {
    journal: Journal,
    file: Arc<FileState>,
    _guard: ArcRwLockWriteGuard<RawRwLock, ()>,
}

impl Frozen {
    /// The push has read what it needs. Changes from here on are recorded
    /// afresh: the file is taken clean (its next write records `Dirty`
    /// durably first, then ranges). A file open for writes ferry cannot see
    /// stays dirty and is marked rewritten again, so the next push reads it
    /// again.
    pub fn settle(self) {
        let id = self.file.id();
        if self.file.unjournaled_writers.load(Ordering::Acquire) > 0 {
            self.journal.shared.emit(Op::Rewritten {
                id,
                origin: Origin::Mount,
            });
            return;
        }
        if !self.file.is_dirty() && !self.file.rewritten.load(Ordering::Acquire) {
            return; // clean already: nothing to record
        }
        let mut live = self.journal.shared.live.lock();
        self.file.rewritten.store(false, Ordering::Release);
        self.file.state.store(CLEAN, Ordering::Release);
        Shared::emit_locked(&mut live, Op::Clean { id });
    }
}
