//! The redb index: a checkpoint of the inode/path table plus the journal's
//! metadata (which source it belongs to, whether the last session closed
//! cleanly, the checkpoint's sequence number, the next FileId).
//!
//! The index is never ahead of the durable log (the writer fdatasyncs the log
//! before each checkpoint), so recovery is "load the checkpoint, replay the
//! log after it". Only the writer thread writes it once the journal is open.

use std::collections::HashSet;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::JournalError;
use crate::id::{FileId, Seq};
use crate::table::{Entry, Table};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FILES: TableDefinition<u64, &[u8]> = TableDefinition::new("files");

const FORMAT: u32 = 1;
const K_FORMAT: &str = "format";
const K_SOURCE: &str = "source";
const K_SESSION: &str = "session";
const K_SEQ: &str = "checkpoint_seq";
const K_NEXT_ID: &str = "next_id";
const K_BASELINE: &str = "baseline_done";
const K_JOURNAL_ID: &str = "journal_id";
const K_BASE_SEQ: &str = "base_seq";
const K_BASE_NEXT_ID: &str = "base_next_id";
/// The table at `base_seq`: where the log starts once compacted.
const BASE: TableDefinition<u64, &[u8]> = TableDefinition::new("base_files");

/// The index's metadata as read at open.
#[derive(Debug, Default)]
pub(crate) struct Meta {
    /// The canonical source path; `None` for a new index.
    pub source: Option<PathBuf>,
    /// The last session ended with `close`.
    pub clean: bool,
    pub checkpoint_seq: u64,
    pub next_id: u64,
    /// The first scan of the source finished and its records are durable.
    pub baseline_done: bool,
}

pub(crate) struct Index {
    db: Database,
    path: PathBuf,
}

fn u64_of(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_le_bytes).unwrap_or(0)
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, JournalError> {
        let db = Database::create(path).map_err(|e| JournalError::index(path, "open", e))?;
        Ok(Index {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, context: &'static str) -> impl Fn(redb::Error) -> JournalError + '_ {
        move |e| JournalError::Index {
            path: self.path.clone(),
            context,
            source: Box::new(e),
        }
    }

    pub fn meta(&self) -> Result<Meta, JournalError> {
        let e = self.err("read metadata");
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Meta::default()),
            Err(x) => return Err(e(x.into())),
        };
        let get = |k: &str| -> Result<Option<Vec<u8>>, JournalError> {
            Ok(table
                .get(k)
                .map_err(|x| e(x.into()))?
                .map(|v| v.value().to_vec()))
        };
        if let Some(v) = get(K_FORMAT)? {
            let version = v
                .as_slice()
                .try_into()
                .map(u32::from_le_bytes)
                .unwrap_or(u32::MAX);
            if version != FORMAT {
                return Err(JournalError::Version {
                    path: self.path.clone(),
                    version,
                });
            }
        }
        Ok(Meta {
            source: get(K_SOURCE)?.map(|v| PathBuf::from(std::ffi::OsString::from_vec(v))),
            clean: get(K_SESSION)?.as_deref() == Some(b"clean"),
            checkpoint_seq: get(K_SEQ)?.map(|v| u64_of(&v)).unwrap_or(0),
            next_id: get(K_NEXT_ID)?.map(|v| u64_of(&v)).unwrap_or(0),
            baseline_done: get(K_BASELINE)?.is_some(),
        })
    }

    /// Loads the checkpointed table.
    pub fn load_table(&self, meta: &Meta) -> Result<Table, JournalError> {
        let e = self.err("load table");
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let table = match txn.open_table(FILES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Table::new()),
            Err(x) => return Err(e(x.into())),
        };
        let entries = self.entries(&table, "table", &e)?;
        Ok(Table::from_parts(
            entries,
            meta.next_id,
            Seq(meta.checkpoint_seq),
        ))
    }

    /// Every entry of a table of files (the checkpoint or the base).
    fn entries(
        &self,
        table: &impl ReadableTable<u64, &'static [u8]>,
        what: &str,
        e: &impl Fn(redb::Error) -> JournalError,
    ) -> Result<Vec<(FileId, Entry)>, JournalError> {
        let mut entries = Vec::new();
        for row in table.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let entry: Entry =
                postcard::from_bytes(v.value()).map_err(|x| JournalError::Corrupt {
                    path: self.path.clone(),
                    offset: 0,
                    reason: format!("{what} entry {} undecodable: {x}", FileId(k.value())),
                })?;
            entries.push((FileId(k.value()), entry));
        }
        Ok(entries)
    }

    /// Marks a session open (so that a crash is detected at the next open)
    /// and records the source the journal belongs to.
    pub fn begin_session(&self, source: &Path) -> Result<(), JournalError> {
        let e = self.err("begin session");
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut m = txn.open_table(META).map_err(|x| e(x.into()))?;
            m.insert(K_FORMAT, FORMAT.to_le_bytes().as_slice())
                .map_err(|x| e(x.into()))?;
            m.insert(K_SOURCE, source.as_os_str().as_bytes())
                .map_err(|x| e(x.into()))?;
            m.insert(K_SESSION, b"open".as_slice())
                .map_err(|x| e(x.into()))?;
        }
        txn.commit().map_err(|x| e(x.into()))
    }

    /// Writes the entries of `changed` (or removes those no longer in the
    /// table) and the checkpoint's sequence number, in one transaction.
    pub fn checkpoint(
        &self,
        table: &Table,
        changed: &HashSet<FileId>,
        baseline_done: bool,
        clean: bool,
    ) -> Result<(), JournalError> {
        let e = self.err("checkpoint");
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut files = txn.open_table(FILES).map_err(|x| e(x.into()))?;
            let mut buf = Vec::new();
            for id in changed {
                match table.get(*id) {
                    Some(entry) => {
                        buf.clear();
                        buf = postcard::to_extend(entry, buf)
                            .expect("postcard encodes into a Vec without failing");
                        files
                            .insert(id.0, buf.as_slice())
                            .map_err(|x| e(x.into()))?;
                    }
                    None => {
                        files.remove(id.0).map_err(|x| e(x.into()))?;
                    }
                }
            }
            let mut m = txn.open_table(META).map_err(|x| e(x.into()))?;
            m.insert(K_SEQ, table.last_seq().0.to_le_bytes().as_slice())
                .map_err(|x| e(x.into()))?;
            m.insert(K_NEXT_ID, table.next_id().to_le_bytes().as_slice())
                .map_err(|x| e(x.into()))?;
            if baseline_done {
                m.insert(K_BASELINE, b"1".as_slice())
                    .map_err(|x| e(x.into()))?;
            }
            if clean {
                m.insert(K_SESSION, b"clean".as_slice())
                    .map_err(|x| e(x.into()))?;
            }
        }
        txn.commit().map_err(|x| e(x.into()))
    }
}

/// The sequence number each replica acknowledged, by the replica's name.
const REPLICAS: TableDefinition<&str, u64> = TableDefinition::new("replicas");

impl Index {
    /// The journal's identity: random bytes made the first time they are
    /// asked for, which batches carry as their source id.
    pub fn journal_id(&self) -> Result<[u8; 16], JournalError> {
        let e = self.err("read the journal id");
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        let id = {
            let mut m = txn.open_table(META).map_err(|x| e(x.into()))?;
            let existing = m
                .get(K_JOURNAL_ID)
                .map_err(|x| e(x.into()))?
                .and_then(|v| <[u8; 16]>::try_from(v.value()).ok());
            match existing {
                Some(id) => id,
                None => {
                    let id = random_id();
                    m.insert(K_JOURNAL_ID, id.as_slice())
                        .map_err(|x| e(x.into()))?;
                    id
                }
            }
        };
        txn.commit().map_err(|x| e(x.into()))?;
        Ok(id)
    }

    /// Records that `replica` has applied everything up to `seq`.
    pub fn acknowledge(&self, replica: &str, seq: Seq, durable: bool) -> Result<(), JournalError> {
        let e = self.err("record a replica's acknowledgement");
        let mut txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        if !durable {
            // A replica knows its own seq and only compaction reads this:
            // made durable by the next checkpoint; lost, a compaction
            // waits for the next push. (Refused only for a transaction
            // that touched savepoints; it then commits durably.)
            let _ = txn.set_durability(redb::Durability::None);
        }
        {
            let mut replicas = txn.open_table(REPLICAS).map_err(|x| e(x.into()))?;
            replicas.insert(replica, seq.0).map_err(|x| e(x.into()))?;
        }
        txn.commit().map_err(|x| e(x.into()))
    }

    /// Replaces the base: the table at its last sequence number, from which
    /// the log's later records are replayed once earlier ones are gone.
    pub fn write_base(&self, table: &Table) -> Result<(), JournalError> {
        let e = self.err("write the log's base");
        let txn = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            txn.delete_table(BASE).map_err(|x| e(x.into()))?;
            let mut base = txn.open_table(BASE).map_err(|x| e(x.into()))?;
            let mut buf = Vec::new();
            for (id, entry) in table.entries() {
                buf.clear();
                buf = postcard::to_extend(entry, buf)
                    .expect("postcard encodes into a Vec without failing");
                base.insert(id.0, buf.as_slice()).map_err(|x| e(x.into()))?;
            }
            let mut m = txn.open_table(META).map_err(|x| e(x.into()))?;
            m.insert(K_BASE_SEQ, table.last_seq().0.to_le_bytes().as_slice())
                .map_err(|x| e(x.into()))?;
            m.insert(K_BASE_NEXT_ID, table.next_id().to_le_bytes().as_slice())
                .map_err(|x| e(x.into()))?;
        }
        txn.commit().map_err(|x| e(x.into()))
    }

    /// The base, if the log was ever compacted.
    pub fn load_base(&self) -> Result<Option<Table>, JournalError> {
        let e = self.err("load the log's base");
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x.into())),
        };
        let get = |k: &str| -> Result<Option<u64>, JournalError> {
            Ok(meta
                .get(k)
                .map_err(|x| e(x.into()))?
                .map(|v| u64_of(v.value())))
        };
        let (Some(seq), Some(next_id)) = (get(K_BASE_SEQ)?, get(K_BASE_NEXT_ID)?) else {
            return Ok(None);
        };
        let base = txn.open_table(BASE).map_err(|x| e(x.into()))?;
        let entries = self.entries(&base, "base", &e)?;
        Ok(Some(Table::from_parts(entries, next_id, Seq(seq))))
    }

    /// Every replica's acknowledged sequence number.
    pub fn replicas(&self) -> Result<Vec<(String, Seq)>, JournalError> {
        let e = self.err("read the replicas");
        let txn = self.db.begin_read().map_err(|x| e(x.into()))?;
        let table = match txn.open_table(REPLICAS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x.into())),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            out.push((k.value().to_string(), Seq(v.value())));
        }
        Ok(out)
    }
}

/// 16 bytes from the kernel's random source.
fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    let mut filled = 0;
    while filled < id.len() {
        // SAFETY: writes at most the remaining bytes of `id`.
        let n = unsafe { libc::getrandom(id[filled..].as_mut_ptr().cast(), id.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
    id
}
