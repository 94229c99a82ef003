//! Pushing: what the journal recorded since a replica's applied sequence
//! number, made into one batch and applied on the replica.
//!
//! (Being written: see `report` for the API the CLI and the control socket
//! use.)

mod report;

pub use report::{Progress, PushError, PushOptions, PushReport};

use std::path::Path;

use journal::Journal;

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
    let _ = (journal, source, replica, opts, progress);
    Err(PushError::Other("push is being written".into()))
}
