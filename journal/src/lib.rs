//! The durable journal of a ferry mount.
//!
//! It owns every file's stable identity ([`FileId`]), the ordered record of
//! every change made to the source tree ([`Record`]), the inode/path table
//! (which names each file has), and each file's dirty state. Storage is an
//! append-only checksummed log that ferry owns, plus an index in redb that is
//! a checkpoint of the in-memory table and can always be rebuilt from the log.
//!
//! Durability invariant (docs/DURABILITY.md): no write reaches a backing file
//! before the journal durably holds "this file is dirty" — see
//! [`Journal::note_write`] and [`Journal::mark_rewritten`].
//!
//! Code map: `journal` (the handle the mount calls, lock order), `state`
//! (per-file dirty flag and ranges), `table` (the inode/path table and the one
//! `apply`), `changeset` (the net effect of the records between two sequence
//! numbers, and its namespace steps in a valid order), `log` (segments and
//! framing), `writer` (the thread that writes the log and checkpoints),
//! `index` (redb), `recovery` (open), `reconcile` (scans), `reader`
//! (read-only access), `lock`, `error`.

mod changeset;
mod error;
mod id;
mod index;
mod journal;
mod lock;
mod log;
mod reader;
mod reconcile;
mod record;
mod recovery;
mod replication;
mod state;
mod table;
mod writer;

#[cfg(test)]
mod tests;

pub use changeset::{
    Changeset, ContentChange, Edge, FileChange, MetadataChange, Namespace, NsStep, PlanError,
    Rewound, TEMP_PREFIX, Undo, merge_ranges,
};
pub use error::JournalError;
pub use id::{FileId, FileKind, InodeKey, Seq};
pub use journal::{Journal, Met, OpenOptions, Recovery, Status};
pub use reader::{PathTracker, read_records, summarize};
pub use record::{AttrChange, ByteRange, Name, Op, Origin, Record, RenameMode, Timestamp};
pub use replication::{Frozen, Pending as PendingChanges};
pub use state::FileState;
