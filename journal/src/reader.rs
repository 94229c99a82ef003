//! Read-only access to the log for `ferry log` and `ferry status`, safe while
//! a mount holds the journal: it takes no lock and writes nothing. A frame
//! the writer has not finished is simply not returned.

use std::path::{Path, PathBuf};

use crate::error::JournalError;
use crate::id::{FileId, Seq};
use crate::journal::Status;
use crate::log::{self, BadHeader, Frames};
use crate::record::Record;
use crate::recovery::{index_path, log_dir};
use crate::table::Table;

/// Every record of the log in sequence order. Reads one segment at a time.
pub fn read_records(
    state_dir: &Path,
) -> Result<impl Iterator<Item = Result<Record, JournalError>>, JournalError> {
    let dir = log_dir(state_dir);
    let segs = log::list_segments(&dir).map_err(|e| JournalError::io(&dir, e))?;
    Ok(RecordIter {
        dir,
        segs,
        next_seg: 0,
        buf: Vec::new(),
        records: Vec::new().into_iter(),
        expected: None,
        done: false,
    })
}

struct RecordIter {
    dir: PathBuf,
    segs: Vec<u64>,
    next_seg: usize,
    buf: Vec<u8>,
    records: std::vec::IntoIter<Result<Record, JournalError>>,
    expected: Option<u64>,
    done: bool,
}

impl RecordIter {
    /// Decodes the next segment into `records`.
    fn load(&mut self) {
        let seg = self.segs[self.next_seg];
        self.next_seg += 1;
        let is_last = self.next_seg == self.segs.len();
        let path = self.dir.join(log::segment_name(seg));
        self.buf = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                self.done = true;
                self.records = vec![Err(JournalError::io(path, e))].into_iter();
                return;
            }
        };
        let mut out = Vec::new();
        match log::decode_header(&self.buf) {
            Ok(_) => {}
            // A segment being created right now: nothing in it yet.
            Err(BadHeader::Torn) if is_last => {
                self.records = out.into_iter();
                return;
            }
            Err(BadHeader::Torn) => out.push(Err(JournalError::Corrupt {
                path: path.clone(),
                offset: 0,
                reason: "bad segment header".into(),
            })),
            Err(BadHeader::Version(version)) => out.push(Err(JournalError::Version {
                path: path.clone(),
                version,
            })),
        }
        if out.is_empty() {
            for frame in Frames::new(&self.buf) {
                match frame {
                    Ok((off, r)) => {
                        if let Some(exp) = self.expected
                            && r.seq.0 != exp
                        {
                            out.push(Err(JournalError::Corrupt {
                                path: path.clone(),
                                offset: off,
                                reason: format!("record has seq {}, expected {exp}", r.seq.0),
                            }));
                            break;
                        }
                        self.expected = Some(r.seq.0 + 1);
                        out.push(Ok(r));
                    }
                    // The tail the writer is still writing (or a crash left).
                    Err(stop) if stop.tail && is_last => break,
                    Err(stop) => {
                        out.push(Err(JournalError::Corrupt {
                            path: path.clone(),
                            offset: stop.offset,
                            reason: stop.reason,
                        }));
                        break;
                    }
                }
            }
        }
        if out.last().is_some_and(|r| r.is_err()) {
            self.done = true;
        }
        self.records = out.into_iter();
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record, JournalError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.records.next() {
                return Some(r);
            }
            if self.done || self.next_seg >= self.segs.len() {
                return None;
            }
            self.load();
        }
    }
}

/// Follows the table through records, for tools that print paths.
#[derive(Clone, Debug, Default)]
pub struct PathTracker {
    table: Table,
}

impl PathTracker {
    pub fn new() -> Self {
        PathTracker {
            table: Table::new(),
        }
    }

    pub fn apply(&mut self, r: &Record) {
        self.table.apply(r);
    }

    /// The path of `id` relative to the source root, after the records applied so far.
    pub fn path_of(&self, id: FileId) -> Option<PathBuf> {
        self.table.path_of(id)
    }

    pub fn dirty_files(&self) -> u64 {
        self.table.dirty_count()
    }

    pub fn files(&self) -> u64 {
        self.table.len()
    }

    pub fn last_seq(&self) -> Seq {
        self.table.last_seq()
    }
}

/// The journal's status from its log alone (no lock needed).
pub fn summarize(state_dir: &Path) -> Result<Status, JournalError> {
    let mut t = PathTracker::new();
    for r in read_records(state_dir)? {
        t.apply(&r?);
    }
    let dir = log_dir(state_dir);
    let mut log_bytes = 0;
    for seg in log::list_segments(&dir).map_err(|e| JournalError::io(&dir, e))? {
        let p = dir.join(log::segment_name(seg));
        log_bytes += std::fs::metadata(&p)
            .map_err(|e| JournalError::io(&p, e))?
            .len();
    }
    Ok(Status {
        last_seq: t.last_seq(),
        files: t.files(),
        dirty_files: t.dirty_files(),
        log_bytes,
        index_bytes: std::fs::metadata(index_path(state_dir))
            .map(|m| m.len())
            .unwrap_or(0),
    })
}
