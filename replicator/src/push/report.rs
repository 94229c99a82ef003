//! What a push is asked to do, what it tells while it runs, and what it did.

use serde::{Deserialize, Serialize};

/// How to push.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PushOptions {
    /// Plan the batch and count it, but change nothing on the replica and
    /// record nothing in the journal.
    pub dry_run: bool,
    /// Report [`Progress`]: the files and bytes the batch sends are
    /// counted (a stat of each, beside the sending) and reported as they go.
    /// Without it nothing is counted and no progress is reported.
    pub progress: bool,
}

/// Where a push stands, for a progress bar. Sent after planning and then as
/// content is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Files whose content the batch carries, and how many are done.
    pub files_total: u64,
    pub files_done: u64,
    /// Content bytes to read from the source, and how many are read.
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// What a push did. The field names are a contract (`ferry push --json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    /// The replica's applied sequence number before the push.
    pub from_seq: u64,
    /// ... and after it (the journal's last record when the push began).
    pub to_seq: u64,
    /// Files, directories, symlinks and special files created on the replica.
    pub files_created: u64,
    /// ... and removed.
    pub files_removed: u64,
    /// Renames of existing entries (a directory moved with its subtree
    /// counts once).
    pub renames: u64,
    /// Bytes of file content read from the source to make the batch.
    pub content_bytes_read: u64,
    /// Bytes of the batch (what a remote transport would carry).
    pub bytes_sent: u64,
    /// Files sent as a delta against what the replica held.
    pub delta_files: u64,
    /// Files sent with their whole content.
    pub full_files: u64,
    /// Files changed in place by byte ranges.
    pub range_files: u64,
    /// Files whose base on the replica did not match (changed behind
    /// ferry's back) and were sent again with full content.
    pub repaired_files: u64,
    /// Operations in the batch.
    pub ops: u64,
    /// First to last visible change on the replica, in microseconds.
    pub commit_window_us: u64,
    /// The whole push, in milliseconds.
    pub elapsed_ms: u64,
    /// Of which the replica spent reading the batch and staging it (while
    /// the source is read), and making it durable.
    pub staging_ms: u64,
    pub sync_ms: u64,
    /// New files the replica already held, kept from a push cut off
    /// before its commit, and not sent again; and their bytes.
    pub resumed_files: u64,
    pub resumed_bytes: u64,
    /// The push went through a connection an earlier push kept open (no
    /// new ssh connection was made).
    #[serde(default)]
    pub reused_connection: bool,
    /// The batch file written (`--batch-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_file: Option<String>,
    /// Nothing was applied: the batch was only planned.
    pub dry_run: bool,
    /// Metadata the replica could not set (reported, not fatal).
    pub warnings: Vec<String>,
}

/// Why a push failed. Nothing on the replica is half-applied whatever the
/// cause: the applier's commit protocol sees to that.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("journal: {0}")]
    Journal(#[from] journal::JournalError),
    #[error("reading the source {path}: {source}")]
    Source {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("applying on the replica {replica}: {source}")]
    Apply {
        replica: std::path::PathBuf,
        source: crate::apply::ApplyError,
    },
    /// The receiver at the other end of a connection refused, failed or
    /// went away.
    #[error("the replica {replica}: {message}")]
    Remote { replica: String, message: String },
    /// The replica side stopped taking the batch; its own error says why.
    #[error("the replica stopped taking the batch")]
    ReplicaStopped,
    #[error("{0}")]
    Other(String),
}

impl From<crate::batch::BatchError> for PushError {
    /// A closed channel means the replica side stopped; anything else is a
    /// batch the planner could not write.
    fn from(e: crate::batch::BatchError) -> PushError {
        match &e.kind {
            crate::batch::BatchErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                PushError::ReplicaStopped
            }
            _ => PushError::Other(format!("writing the batch: {e}")),
        }
    }
}
