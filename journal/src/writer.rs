//! The writer thread: the only code that writes the log and the index.
//!
//! It receives records (already numbered, in order) over a channel, appends
//! each group with one write, fdatasyncs when someone waits for durability or
//! the sync timer fires (one fdatasync serves every waiter: group commit),
//! and checkpoints its own copy of the table into redb on the checkpoint
//! timer and at close. Keeping its own copy, updated by the records it
//! writes, means a checkpoint never takes the mount's table lock.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Condvar, Mutex};

use crate::error::{Failure, JournalError};
use crate::id::{FileId, InodeKey};
use crate::index::Index;
use crate::journal::Shared;
use crate::log::Appender;
use crate::record::Record;
use crate::table::{Snapshot, Table, touched};

/// What the mount sends the writer. Sent under the table lock, so the
/// channel's order is the sequence order.
pub(crate) enum Msg {
    Record(Record),
    /// Stat snapshots a scan took (they are not in records).
    Snapshots(Vec<(FileId, InodeKey, Snapshot)>),
    /// Someone waits for everything sent so far to be durable.
    Sync,
    /// The baseline scan's records are all sent: sync, then checkpoint the
    /// flag so the next open does not scan again.
    BaselineDone,
    /// Clean stop: write, sync, checkpoint, mark clean, reply, exit.
    Close(Sender<Result<(), JournalError>>),
}

/// Durability progress, shared between the writer and waiting threads.
/// Lock order: after the table lock and any FileState lock.
pub(crate) struct Progress {
    pub state: Mutex<Durable>,
    pub cv: Condvar,
    pub log_bytes: AtomicU64,
}

pub(crate) struct Durable {
    /// Every record up to this seq is fdatasync'd.
    pub durable: u64,
    /// The writer failed; the journal accepts no more durable work.
    pub failed: Option<Failure>,
    /// The writer thread has exited.
    pub stopped: bool,
}

impl Progress {
    pub fn new(durable: u64, log_bytes: u64) -> Progress {
        Progress {
            state: Mutex::new(Durable {
                durable,
                failed: None,
                stopped: false,
            }),
            cv: Condvar::new(),
            log_bytes: AtomicU64::new(log_bytes),
        }
    }
}

/// Most messages folded into one group (one write(2)); bounds the latency a
/// burst adds to the waiter at its head.
/// How long the writer gathers records after the first of a group arrives.
const GROUP_WINDOW: Duration = Duration::from_millis(1);

const MAX_GROUP: usize = 4096;

pub(crate) struct Writer {
    pub rx: Receiver<Msg>,
    pub log: Appender,
    pub index: std::sync::Arc<Index>,
    pub table: Table,
    /// Files changed since the last checkpoint.
    pub changed: HashSet<FileId>,
    pub baseline_done: bool,
    pub written: u64,
    pub durable: u64,
    pub progress: Arc<Progress>,
    /// Weak: the writer must not keep the journal alive (dropping the last
    /// handle disconnects the channel, which stops the writer).
    pub shared: Weak<Shared>,
    pub sync_interval: Duration,
    pub checkpoint_interval: Duration,
}

impl Writer {
    pub fn run(mut self) {
        let mut next_sync = Instant::now() + self.sync_interval;
        let mut next_checkpoint = Instant::now() + self.checkpoint_interval;
        let mut failed = false;
        loop {
            let first = match self.rx.recv_deadline(next_sync.min(next_checkpoint)) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if matches!(first, Some(Msg::Record(_))) {
                // Let the group fill: senders find the writer busy rather than
                // parked and need not wake it, and one write(2) carries many
                // records. A kill in this window loses at most these records,
                // which recovery's reconcile scan finds (docs/DURABILITY.md).
                std::thread::sleep(GROUP_WINDOW);
            }
            let now = Instant::now();
            let mut want_sync = false;
            let mut want_checkpoint = now >= next_checkpoint;
            let mut close = None;
            if now >= next_sync {
                // Pending ranges become Write records on the timer. Upgrading
                // may make this thread the last owner; `Shared::drop` knows
                // not to join itself then.
                if let Some(shared) = self.shared.upgrade() {
                    shared.emit_pending();
                }
                want_sync = true;
                next_sync = now + self.sync_interval;
            }
            let mut first = first;
            for _ in 0..MAX_GROUP {
                let m = match first.take() {
                    Some(m) => m,
                    None => match self.rx.try_recv() {
                        Ok(m) => m,
                        Err(_) => break,
                    },
                };
                match m {
                    Msg::Record(r) => {
                        if !failed && let Err(e) = self.log.push(&r) {
                            failed = self.fail(&e);
                        }
                        self.written = r.seq.0;
                        self.changed.extend(touched(&r.op));
                        self.table.apply(&r);
                    }
                    Msg::Snapshots(v) => {
                        for (id, key, snap) in v {
                            self.table.set_snapshot(id, key, snap);
                            self.changed.insert(id);
                        }
                    }
                    Msg::Sync => want_sync = true,
                    Msg::BaselineDone => {
                        self.baseline_done = true;
                        want_checkpoint = true;
                    }
                    Msg::Close(reply) => {
                        close = Some(reply);
                        break;
                    }
                }
            }
            if failed {
                if let Some(reply) = close {
                    let _ = reply.send(Err(self.failure_error()));
                    break;
                }
                continue;
            }
            let res = self.log.write().and_then(|()| {
                self.progress
                    .log_bytes
                    .store(self.log.total_bytes(), Ordering::Relaxed);
                if want_sync || want_checkpoint || close.is_some() {
                    self.sync()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res {
                failed = self.fail(&e);
                if let Some(reply) = close {
                    let _ = reply.send(Err(e));
                    break;
                }
                continue;
            }
            if want_checkpoint || close.is_some() {
                next_checkpoint = Instant::now() + self.checkpoint_interval;
                let res = self.index.checkpoint(
                    &self.table,
                    &self.changed,
                    self.baseline_done,
                    close.is_some(),
                );
                match res {
                    Ok(()) => self.changed.clear(),
                    // A failed checkpoint loses nothing: the log holds it all
                    // and the next open replays more.
                    Err(e) if close.is_none() => {
                        tracing::error!(error = %e, "journal checkpoint failed")
                    }
                    Err(e) => {
                        if let Some(reply) = close.take() {
                            let _ = reply.send(Err(e));
                        }
                        break;
                    }
                }
            }
            if let Some(reply) = close {
                let _ = reply.send(Ok(()));
                break;
            }
        }
        let mut st = self.progress.state.lock();
        st.stopped = true;
        self.progress.cv.notify_all();
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        if self.written > self.durable {
            self.log.sync()?;
            self.durable = self.written;
        }
        let mut st = self.progress.state.lock();
        st.durable = self.durable;
        self.progress.cv.notify_all();
        Ok(())
    }

    /// After a failed write or fdatasync the log's state on disk is unknown
    /// (a later fdatasync may report success for lost pages), so the journal
    /// stops taking durable work for good.
    fn fail(&self, e: &JournalError) -> bool {
        tracing::error!(error = %e, "journal writer failed; the journal stops");
        let mut st = self.progress.state.lock();
        st.failed = Some(Failure::from_error(e));
        self.progress.cv.notify_all();
        true
    }

    fn failure_error(&self) -> JournalError {
        self.progress
            .state
            .lock()
            .failed
            .as_ref()
            .map(Failure::to_error)
            .unwrap_or(JournalError::Closed)
    }
}
