//! The journal's error type: one enum for every way opening, writing or
//! reading the journal can fail, each variant naming the path it concerns.

use std::io;
use std::path::PathBuf;

use crate::id::Seq;

/// An error of the journal. Every variant that concerns a file names it, so
/// the message alone tells the user where to look.
#[derive(thiserror::Error, Debug)]
pub enum JournalError {
    /// A replica claims a sequence number the log does not reach: it was
    /// fed by another journal (or this state directory was replaced).
    #[error(
        "the replica has applied up to seq {} but this journal's log ends at seq {}: \
         the replica was not made from this journal", replica.0, journal.0
    )]
    Ahead { replica: Seq, journal: Seq },
    /// A replica needs records the journal dropped (every replica it knew
    /// of had applied them): it must be seeded again.
    #[error(
        "the replica has applied up to seq {} but this journal keeps records only from seq {} on \
         (earlier ones were compacted once every known replica had them): seed the replica again \
         into an empty directory",
        replica.0, base.0
    )]
    Compacted { replica: Seq, base: Seq },
    /// Another process (or another `Journal` in this process) holds the state
    /// directory. Only one mount may journal a source at a time.
    #[error(
        "{}: the journal is in use{}; stop the other ferry mount first",
        state_dir.display(),
        holder.map(|p| format!(" by process {p}")).unwrap_or_default()
    )]
    Locked {
        state_dir: PathBuf,
        holder: Option<u32>,
    },

    /// The state directory journals a different source tree.
    #[error(
        "{}: this journal belongs to source {}, not {}; use another state directory",
        state_dir.display(),
        expected.display(),
        found.display()
    )]
    WrongSource {
        state_dir: PathBuf,
        expected: PathBuf,
        found: PathBuf,
    },

    /// A system call on a journal file or a source file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The log holds a frame that fails its checksum or breaks the sequence,
    /// and it is not a torn tail that recovery may cut off.
    #[error("{}: corrupt journal log at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// The log or index was written by a newer ferry.
    #[error("{}: unsupported journal format version {version}", path.display())]
    Version { path: PathBuf, version: u32 },

    /// The redb index failed.
    #[error("{}: index {context}: {source}", path.display())]
    Index {
        path: PathBuf,
        context: &'static str,
        #[source]
        source: Box<redb::Error>,
    },

    /// The journal was closed (or its writer stopped after an I/O error was
    /// already reported).
    #[error("the journal is closed")]
    Closed,
}

impl JournalError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> JournalError {
        JournalError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn index(
        path: impl Into<PathBuf>,
        context: &'static str,
        e: impl Into<redb::Error>,
    ) -> JournalError {
        JournalError::Index {
            path: path.into(),
            context,
            source: Box::new(e.into()),
        }
    }
}

/// An I/O failure of the writer thread, kept so that every later waiter can be
/// told about it (`io::Error` is not `Clone`). After a failed fdatasync the
/// log's durable state is unknown, so the failure is permanent.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub path: PathBuf,
    pub kind: io::ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn from_error(e: &JournalError) -> Failure {
        match e {
            JournalError::Io { path, source } => Failure {
                path: path.clone(),
                kind: source.kind(),
                message: source.to_string(),
            },
            other => Failure {
                path: PathBuf::new(),
                kind: io::ErrorKind::Other,
                message: other.to_string(),
            },
        }
    }

    pub fn to_error(&self) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source: io::Error::new(self.kind, self.message.clone()),
        }
    }
}
