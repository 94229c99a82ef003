//! Pushing: what the journal recorded since a replica's applied sequence
//! number, made into one batch and applied on the replica.
//!
//! The same steps whatever carries the batch; a `Destination` carries
//! it: `local` (a replica directory here: the applier on its own thread
//! takes the operations as values, `batch::local`), `remote` (a receiver
//! at the other end of a connection, `crate::remote`) or `batch_dir` (a
//! batch file, recorded as sent).
//!
//! 1. Ask the destination for the replica's applied sequence number `from`
//!    (and what it kept of a push cut off) and fix `to` with the journal's
//!    barrier. Equal, or only records that change nothing on a replica in
//!    between: nothing to do (this path costs what the records since the
//!    last push cost, whatever the tree's size).
//! 2. The tree at `from` and the records of `(from, to]` (the journal keeps
//!    both from the previous push, so this costs what changed), their
//!    changeset, and its namespace steps (`journal::Changeset`).
//! 3. `plan` makes the batch's operations while the replica side stages
//!    them as they come: the batch is never held whole in memory or on
//!    disk. The applier commits only once the batch is complete.
//! 4. A base that does not match on the replica (its copy was changed
//!    behind ferry's back) stops the apply before anything is visible; the
//!    file is then sent with full content and the batch made again.
//! 5. On success the journal records the replica's new sequence number and
//!    the trees and signatures of what it now holds, keeps the tree at `to`
//!    for the next push, and drops log segments every replica has applied
//!    (`Journal::compact`).

mod batch_dir;
mod cache;
mod local;
mod plan;
mod read_ahead;
mod remote;
mod report;
mod source;

pub use batch_dir::{batch_file_name, push_batch_dir};
pub use remote::push_remote;
pub use report::{Progress, PushError, PushOptions, PushReport};

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use journal::{Changeset, FileId, Journal, JournalError, NsStep, Seq};

use crate::apply::{Applied, ApplyReport, Partial};
use crate::batch::{ANY_REPLICA, BatchHeader, BatchWriter, Hash};
use cache::ReplicaCopy;
use plan::{Plan, Written};
use source::Source;

/// Where a push's batch goes: a replica directory on this machine, a
/// receiver at the other end of a connection, or a directory of batch
/// files.
trait Destination {
    /// The name the journal records this destination's progress under.
    fn name(&self) -> String;
    /// The replica's applied state, and what it kept from a transfer cut
    /// off before its commit.
    fn state(&mut self) -> Result<ReplicaState, PushError>;
    /// Whether content is compressed where it pays (the bytes travel).
    fn compress(&self) -> bool;
    /// The replica the batches are made for ([`ANY_REPLICA`] unless the
    /// destination is a stream of its own).
    fn replica_id(&self, _journal_id: [u8; 16]) -> [u8; 16] {
        ANY_REPLICA
    }
    /// Carries the batch `plan` writes to the replica and has it applied.
    fn send(
        &mut self,
        plan: &Plan<'_>,
        header: BatchHeader,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Delivered, Attempt>;
    /// Records in the journal what the destination now holds.
    fn record(
        &self,
        journal: &Journal,
        to: Seq,
        cache: &[(FileId, Option<Vec<u8>>)],
    ) -> Result<(), JournalError> {
        journal.acknowledge(&self.name(), to, cache)
    }
}

/// What a destination says of its replica before a push.
#[derive(Default)]
struct ReplicaState {
    applied: Option<Applied>,
    /// Content kept from a transfer cut off before its commit, by hash.
    kept: HashSet<Hash>,
    /// The start of the file such a transfer was cut off in.
    partial: Option<Partial>,
}

/// A batch carried and applied.
struct Delivered {
    written: Written,
    /// The batch's size.
    bytes: u64,
    applied: ApplyReport,
}

/// Pushes everything the journal recorded that `replica` has not applied:
/// plans one batch from the journal (renames as renames, changed ranges,
/// deltas against what the replica holds, full content for new files),
/// applies it with the commit protocol, and records the result.
///
/// `source` is the (canonical) source directory the journal belongs to;
/// `replica` an absolute path to the replica directory. `progress` is
/// called from this thread as content is read.
pub fn push(
    journal: &Journal,
    source: &Path,
    replica: &Path,
    opts: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PushReport, PushError> {
    push_to(
        journal,
        source,
        &mut local::Local { replica },
        opts,
        progress,
    )
}

fn push_to(
    journal: &Journal,
    source: &Path,
    destination: &mut dyn Destination,
    opts: &PushOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let journal_id = journal.journal_id()?;
    let ReplicaState {
        applied,
        kept,
        partial,
    } = destination.state()?;
    if let Some(a) = applied
        && a.source_id != journal_id
    {
        return Err(PushError::Other(format!(
            "{} is a replica of another source (journal {}), not of {}",
            destination.name(),
            crate::apply::hex(&a.source_id),
            source.display()
        )));
    }
    let from = Seq(applied.map_or(0, |a| a.seq));
    let to = journal.barrier();
    let mut report = PushReport {
        from_seq: from.0,
        to_seq: to.0,
        dry_run: opts.dry_run,
        ..PushReport::default()
    };
    if from == to || journal.nothing_to_push(from, to) {
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }
    journal.durable(to)?;

    let mut pending = journal.pending(from, to)?;
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        records = pending.records.len(),
        "push: tree and records"
    );
    // The tree at `from` becomes the tree at `to` in place; the planner sees
    // the tree at `from` through what the records replaced. No copy of the
    // tree: a push costs what changed (a replica's first push, what the tree
    // at `to` holds, once).
    let mut after = std::mem::take(&mut pending.before);
    let Some((changes, undo)) = Changeset::compute_and_advance(&mut after, &pending.records) else {
        // Only records that change nothing on a replica (a push's own
        // bookkeeping, mount starts and stops): nothing to apply. The
        // replica keeps its sequence number; the next push starts there,
        // from the tree at `from`, which goes back to the journal as it was.
        journal.remember(after);
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    };
    let steps = changes
        .namespace_plan(after.rewound(&undo), &after)
        .map_err(|e| PushError::Other(format!("planning the namespace changes: {e}")))?;
    let cache = load_cache(journal, &changes, &steps)?;
    tracing::debug!(
        ms = started.elapsed().as_millis(),
        files = changes.files.len(),
        steps = steps.len(),
        "push: planned"
    );

    let header = BatchHeader {
        source_id: journal_id,
        replica_id: destination.replica_id(journal_id),
        from_seq: from.0,
        to_seq: to.0,
        expected_state: [0; 32],
        created_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        // Streamed: the counts are known at the trailer only.
        op_count: u64::MAX,
        content_bytes: u64::MAX,
    };
    let src = Source::new(source);
    let mut whole: HashSet<FileId> = HashSet::new();
    let delivered = loop {
        let plan = Plan {
            journal,
            source: &src,
            changes: &changes,
            steps: &steps,
            after: &after,
            cache: &cache,
            whole: &whole,
            kept: &kept,
            partial: partial.as_ref(),
            live: !opts.dry_run,
            compress: destination.compress(),
            progress: opts.progress,
        };
        let attempt = if opts.dry_run {
            dry_run(&plan, header.clone(), progress)
        } else {
            destination.send(&plan, header.clone(), progress)
        };
        match attempt {
            Ok(done) => break done,
            Err(Attempt::Mismatch { file }) if whole.insert(file) => {
                // The replica's copy is not what the journal thinks: send it whole.
                report.repaired_files += 1;
                tracing::warn!(%file, "replica copy changed behind ferry's back; sending it whole");
            }
            Err(Attempt::Mismatch { file, .. }) => {
                return Err(PushError::Other(format!(
                    "file {file} does not match on the replica even when sent whole"
                )));
            }
            Err(Attempt::Failed(e)) => return Err(e),
        }
    };
    let Delivered {
        written,
        bytes,
        applied,
    } = delivered;
    report.files_created = written.files_created;
    report.files_removed = written.files_removed;
    report.renames = written.renames;
    report.content_bytes_read = written.content_bytes_read;
    report.delta_files = written.delta_files;
    report.full_files = written.full_files;
    report.range_files = written.range_files;
    report.resumed_files = written.kept_files;
    report.resumed_bytes = written.kept_bytes;
    report.bytes_sent = bytes;
    if !opts.dry_run {
        report.ops = applied.ops;
        report.commit_window_us = applied.commit_window_us;
        report.staging_ms = applied.staging_us / 1000;
        report.sync_ms = applied.sync_us / 1000;
        report.warnings = applied.warnings;
        destination.record(journal, to, &written.cache)?;
        journal.remember(after);
        if let Some(base) = journal.compact()? {
            tracing::info!(base = base.0, "compacted the journal's log");
        }
        tracing::debug!(ms = started.elapsed().as_millis(), "push: acknowledged");
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    // The records, the changeset, its steps and the undo hold an entry per
    // record or changed file: after a first push of a large tree, freeing
    // them takes tens of milliseconds, not on the way to the answer. (The
    // tree itself went back to the journal, but after a dry run.)
    let _ = std::thread::Builder::new()
        .name("ferry-free".into())
        .spawn(move || drop((pending, changes, steps, undo)));
    Ok(report)
}

/// The cache entries of every file whose content the batch may carry, and
/// of the files new files replace (their delta basis).
fn load_cache(
    journal: &Journal,
    changes: &Changeset,
    steps: &[NsStep],
) -> Result<HashMap<FileId, ReplicaCopy>, PushError> {
    let replaced = steps.iter().filter_map(|s| match s {
        NsStep::Create { replaced, .. } => *replaced,
        _ => None,
    });
    // A file new in this batch has no entry (its id was never pushed).
    let existing = changes
        .files
        .iter()
        .filter(|(_, c)| c.existed_before)
        .map(|(id, _)| *id);
    let ids: Vec<FileId> = existing.chain(replaced).collect();
    Ok(journal
        .cached(ids.into_iter())?
        .into_iter()
        .filter_map(|(id, b)| Some((id, ReplicaCopy::decode(&b)?)))
        .collect())
}

/// Why one attempt at a batch did not go through.
enum Attempt {
    /// The replica's copy of `file` did not match the batch's base.
    Mismatch {
        file: FileId,
    },
    Failed(PushError),
}

impl From<PushError> for Attempt {
    fn from(e: PushError) -> Attempt {
        Attempt::Failed(e)
    }
}

/// Counts what the batch would be, writing it nowhere.
fn dry_run(
    plan: &Plan<'_>,
    header: BatchHeader,
    progress: &mut dyn FnMut(Progress),
) -> Result<Delivered, Attempt> {
    let mut out = BatchWriter::new(io::sink(), header).map_err(PushError::from)?;
    let written = plan.write(&mut out, progress, &mut Vec::new())?;
    let (_, summary) = out.finish().map_err(PushError::from)?;
    Ok(Delivered {
        written,
        bytes: summary.bytes,
        applied: ApplyReport::default(),
    })
}

/// The file a content operation the replica refused was about.
fn refused_file(owners: &[(u64, FileId)], index: u64) -> Attempt {
    match owners.iter().find(|(i, _)| *i == index) {
        Some((_, file)) => Attempt::Mismatch { file: *file },
        None => Attempt::Failed(PushError::Other(format!(
            "the replica refused op {index} as a base mismatch, but it carries no content"
        ))),
    }
}
