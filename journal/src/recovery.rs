//! Opening a journal: lock the state directory, check the source, load the
//! index checkpoint, replay the log after it, start the writer, and run the
//! baseline or reconcile scan that the previous session's end calls for.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;

use crate::error::JournalError;
use crate::id::{FileKind, InodeKey};
use crate::index::Index;
use crate::journal::{Journal, Live, OpenOptions, Recovery, Shared};
use crate::lock::LockFile;
use crate::log::{self, Appender, FsStore, LogStore};
use crate::record::Op;
use crate::table::{Snapshot, touched};
use crate::writer::{Msg, Progress, Writer};

pub(crate) fn journal_dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("journal")
}

pub(crate) fn log_dir(state_dir: &Path) -> std::path::PathBuf {
    journal_dir(state_dir).join("log")
}

pub(crate) fn index_path(state_dir: &Path) -> std::path::PathBuf {
    journal_dir(state_dir).join("index.redb")
}

impl Journal {
    /// Opens or creates the journal kept in `state_dir` for the source tree
    /// `source`.
    pub fn open(
        state_dir: &Path,
        source: &Path,
        opts: &OpenOptions,
    ) -> Result<(Journal, Recovery), JournalError> {
        let dir = log_dir(state_dir);
        fs::create_dir_all(&dir).map_err(|e| JournalError::io(&dir, e))?;
        let lock = LockFile::acquire(state_dir)?;
        open_with(state_dir, source, opts, lock, Box::new(FsStore::new(dir)))
    }
}

/// `open` with the log's storage given: tests pass a crash-simulating store.
pub(crate) fn open_with(
    state_dir: &Path,
    source: &Path,
    opts: &OpenOptions,
    lock: LockFile,
    mut store: Box<dyn LogStore>,
) -> Result<(Journal, Recovery), JournalError> {
    let jdir = journal_dir(state_dir);
    fs::create_dir_all(&jdir).map_err(|e| JournalError::io(&jdir, e))?;
    let source = fs::canonicalize(source).map_err(|e| JournalError::io(source, e))?;
    let root_md = fs::symlink_metadata(&source).map_err(|e| JournalError::io(&source, e))?;
    if !root_md.is_dir() {
        return Err(JournalError::io(
            &source,
            std::io::Error::from(std::io::ErrorKind::NotADirectory),
        ));
    }

    let index_path = index_path(state_dir);
    let index = Arc::new(Index::open(&index_path)?);
    let meta = index.meta()?;
    if let Some(expected) = &meta.source
        && *expected != source
    {
        return Err(JournalError::WrongSource {
            state_dir: state_dir.to_path_buf(),
            expected: expected.clone(),
            found: source,
        });
    }
    let mut table = index.load_table(&meta)?;
    let mut changed = HashSet::new();
    let replayed = log::replay(store.as_mut(), meta.checkpoint_seq, |r| {
        changed.extend(touched(&r.op));
        table.apply(r);
    })?;
    let fresh = meta.source.is_none() && replayed.last_seq == 0;
    let unclean = !fresh && !meta.clean;
    if unclean {
        tracing::warn!(state_dir = %state_dir.display(), replayed = replayed.applied, "the previous session did not close; recovering");
    }
    let root_key = InodeKey {
        dev: root_md.dev(),
        ino: root_md.ino(),
    };
    table.set_root(root_key, Snapshot::of(&root_md));
    changed.insert(crate::id::FileId::ROOT);

    // From here on a crash is detected at the next open.
    index.begin_session(&source)?;
    let last_seq = replayed.last_seq.max(meta.checkpoint_seq);
    let appender = Appender::new(store, &replayed, opts.segment_bytes)?;

    let (tx, rx) = crossbeam_channel::unbounded();
    let (pending_tx, pending_rx) = crossbeam_channel::unbounded();
    let progress = Arc::new(Progress::new(last_seq, appender.total_bytes()));
    let shared = Arc::new(Shared {
        live: Mutex::new(Live {
            table: table.clone(),
            states: HashMap::new(),
            next_seq: last_seq + 1,
            tx: Some(tx),
            history: None,
        }),
        progress: progress.clone(),
        pending_tx,
        pending_rx,
        closed: AtomicBool::new(false),
        writer: Mutex::new(None),
        writer_thread: Mutex::new(None),
        index_path,
        index: Mutex::new(Some(index.clone())),
        journal_id: std::sync::OnceLock::new(),
        lock: Mutex::new(Some(lock)),
    });
    let writer = Writer {
        rx,
        log: appender,
        index,
        table,
        changed,
        baseline_done: meta.baseline_done,
        written: last_seq,
        durable: last_seq,
        progress,
        shared: Arc::downgrade(&shared),
        sync_interval: opts.sync_interval,
        checkpoint_interval: opts.checkpoint_interval,
    };
    let handle = std::thread::Builder::new()
        .name("ferry-journal".into())
        .spawn(move || writer.run())
        .map_err(|e| JournalError::io(state_dir, e))?;
    *shared.writer_thread.lock() = Some(handle.thread().id());
    *shared.writer.lock() = Some(handle);
    let journal = Journal { shared };

    let recovered = unclean || opts.force_reconcile;
    journal.emit_op(Op::MountStart { recovered: unclean });
    let mut rec = Recovery {
        fresh,
        unclean,
        replayed: replayed.applied,
        ..Recovery::default()
    };
    if !meta.baseline_done || recovered {
        // Ranges can only have been lost if the last session did not close;
        // a forced reconcile after a clean stop keeps them.
        if unclean {
            rec.reconciled += escalate_dirty(&journal);
        }
        let stats = crate::reconcile::scan(&journal, &source, root_key, !meta.baseline_done)?;
        rec.scanned = stats.scanned;
        rec.reconciled += stats.reconciled;
    }
    journal.sync()?;
    if !meta.baseline_done {
        journal.send(Msg::BaselineDone);
    }
    Ok((journal, rec))
}

/// After an unclean stop a dirty file's ranges may be lost (they live in
/// memory until recorded): treat each as wholly changed.
fn escalate_dirty(j: &Journal) -> u64 {
    let table = j.table_copy();
    let mut ids: Vec<_> = table
        .entries()
        .filter(|(_, e)| e.dirty && !e.rewritten && e.kind == FileKind::File)
        .map(|(id, _)| id)
        .collect();
    ids.sort_unstable();
    for id in &ids {
        j.emit_op(Op::Rewritten {
            id: *id,
            origin: crate::record::Origin::Reconcile,
        });
    }
    ids.len() as u64
}
