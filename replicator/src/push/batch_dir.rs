//! Pushing to a directory of batch files (offline replication): each push
//! writes what the journal recorded since the last batch it wrote there as
//! one self-contained batch file, and records it as sent; `ferry apply`
//! applies the files on the replica later, anywhere.
//!
//! A batch file is written under a temporary name, fsynced, renamed to
//! [`batch_file_name`] (so that `ls` lists the files in the order they
//! apply) and the directory fsynced, and only then recorded as sent
//! (durably: the next batch starts where this one ends, and is made
//! against what this one leaves on the replica). A push that dies between
//! the rename and the record leaves a file the journal does not know of;
//! the next push makes one from the same sequence number to a later one,
//! which replaces it.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use journal::{FileId, Journal, JournalError, Seq};

use super::{
    Attempt, Delivered, Destination, Plan, Progress, PushError, PushOptions, PushReport,
    ReplicaState,
};
use crate::apply::{Applied, ApplyReport};
use crate::batch::{BatchHeader, BatchWriter, WriteSummary};

/// The name of the batch file taking a replica from `from` to `to`:
/// zero-padded, so that names sort as the batches apply.
pub fn batch_file_name(from: u64, to: u64) -> String {
    format!("{from:020}-{to:020}.ferry")
}

/// The `(from, to)` of a file named by [`batch_file_name`].
fn parse_batch_file_name(name: &str) -> Option<(u64, u64)> {
    let (from, to) = name.strip_suffix(".ferry")?.split_once('-')?;
    if from.len() != 20 || to.len() != 20 {
        return None;
    }
    Some((from.parse().ok()?, to.parse().ok()?))
}

/// Writes what the journal recorded since the last batch written to `dir`
/// as a new batch file there, and records it as sent. The report's
/// `batch_file` names the file (none when there was nothing to send).
pub fn push_batch_dir(
    journal: &Journal,
    source: &Path,
    dir: &Path,
    opts: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PushReport, PushError> {
    let dir = dir
        .canonicalize()
        .map_err(|e| PushError::Other(format!("the batch directory {}: {e}", dir.display())))?;
    let mut destination = BatchDir {
        journal,
        dir,
        written: None,
    };
    let mut report = super::push_to(journal, source, &mut destination, opts, progress)?;
    report.batch_file = destination
        .written
        .map(|p| p.to_string_lossy().into_owned());
    Ok(report)
}

struct BatchDir<'j> {
    journal: &'j Journal,
    dir: PathBuf,
    /// The batch file written.
    written: Option<PathBuf>,
}

impl BatchDir<'_> {
    fn io(&self, path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> PushError {
        let msg = format!("{what} {}", path.display());
        move |e| PushError::Other(format!("{msg}: {e}"))
    }

    /// Writes the batch to `tmp` and makes it durable.
    fn write(
        &self,
        tmp: &Path,
        plan: &Plan<'_>,
        header: BatchHeader,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(super::Written, WriteSummary), PushError> {
        let file = File::create(tmp).map_err(self.io(tmp, "creating"))?;
        let mut out = BatchWriter::new(BufWriter::with_capacity(1 << 20, file), header)?;
        let written = plan.write(&mut out, progress, &mut Vec::new())?;
        let (w, summary) = out.finish()?;
        let file = w
            .into_inner()
            .map_err(|e| self.io(tmp, "writing")(e.into_error()))?;
        file.sync_all().map_err(self.io(tmp, "syncing"))?;
        Ok((written, summary))
    }

    /// Removes the batch files from `from` other than `keep`: written by a
    /// push that died before recording them, and replaced by `keep`.
    fn remove_unrecorded(&self, from: u64, keep: &Path) -> Result<(), PushError> {
        for e in fs::read_dir(&self.dir).map_err(self.io(&self.dir, "listing"))? {
            let path = e.map_err(self.io(&self.dir, "listing"))?.path();
            let starts_here = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_batch_file_name)
                .is_some_and(|(f, _)| f == from);
            if starts_here && path != keep {
                fs::remove_file(&path).map_err(self.io(&path, "removing"))?;
            }
        }
        Ok(())
    }
}

impl Destination for BatchDir<'_> {
    fn name(&self) -> String {
        format!("batches:{}", self.dir.display())
    }

    fn state(&mut self) -> Result<ReplicaState, PushError> {
        let name = self.name();
        let sent = self
            .journal
            .replicas()?
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, seq)| seq);
        let source_id = self.journal.journal_id()?;
        let applied = sent.map(|seq| Applied {
            seq: seq.0,
            source_id,
            replica_id: self.replica_id(source_id),
        });
        Ok(ReplicaState {
            applied,
            ..ReplicaState::default()
        })
    }

    fn compress(&self) -> bool {
        true
    }

    /// The batches of one directory are a stream of their own: a replica
    /// fed by it refuses batches made for another.
    fn replica_id(&self, journal_id: [u8; 16]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_derive_key("ferry batch directory stream v1");
        h.update(&journal_id);
        h.update(self.dir.as_os_str().as_encoded_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        id
    }

    fn send(
        &mut self,
        plan: &Plan<'_>,
        header: BatchHeader,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Delivered, Attempt> {
        let (from, to) = (header.from_seq, header.to_seq);
        let tmp = self.dir.join(format!(".{}.tmp", batch_file_name(from, to)));
        let (written, summary) = match self.write(&tmp, plan, header, progress) {
            Ok(w) => w,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(Attempt::Failed(e));
            }
        };
        let path = self.dir.join(batch_file_name(from, to));
        fs::rename(&tmp, &path).map_err(self.io(&path, "renaming the batch to"))?;
        self.remove_unrecorded(from, &path)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io(&self.dir, "syncing"))?;
        self.written = Some(path);
        // Nothing is applied yet: the report counts the batch's operations.
        Ok(Delivered {
            written,
            bytes: summary.bytes,
            applied: ApplyReport {
                from_seq: from,
                to_seq: to,
                ops: summary.ops,
                content_bytes: summary.content_bytes,
                ..ApplyReport::default()
            },
        })
    }

    fn record(
        &self,
        journal: &Journal,
        to: Seq,
        cache: &[(FileId, Option<Vec<u8>>)],
    ) -> Result<(), JournalError> {
        journal.record_sent(&self.name(), to, cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_as_batches_apply_and_parse_back() {
        let mut names = [
            batch_file_name(100, 2000),
            batch_file_name(0, 9),
            batch_file_name(9, 100),
        ];
        names.sort();
        assert_eq!(
            names
                .iter()
                .map(|n| parse_batch_file_name(n))
                .collect::<Vec<_>>(),
            vec![Some((0, 9)), Some((9, 100)), Some((100, 2000))]
        );
        assert_eq!(parse_batch_file_name("1-2.ferry"), None);
        assert_eq!(parse_batch_file_name(&format!(".{}.tmp", names[0])), None);
    }
}
