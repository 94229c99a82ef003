//! [`BatchError`]: what is wrong with a batch, and where.

use std::fmt;
use std::io;

use super::VERSION;
use super::content::ContentError;
use super::frame::FrameKind;
use super::op::OpError;

/// The part of a batch an error concerns. Frames are numbered from 0 (the
/// header); op frame `n` is frame `n`, and holds the `n`th operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The magic and the version.
    Preamble,
    Header,
    /// A frame whose kind is not known yet (or is unknown).
    Frame(u64),
    /// An operation frame.
    Op(u64),
    Trailer,
    /// Whatever follows the trailer.
    AfterTrailer,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Preamble => f.write_str("magic/version"),
            Part::Header => f.write_str("header frame"),
            Part::Frame(n) => write!(f, "frame {n}"),
            Part::Op(n) => write!(f, "op frame {n}"),
            Part::Trailer => f.write_str("trailer frame"),
            Part::AfterTrailer => f.write_str("after the trailer"),
        }
    }
}

/// A batch that cannot be read or written, with the byte offset (of the
/// frame concerned, from the start of the batch) and the part of the batch.
#[derive(Debug, thiserror::Error)]
#[error("batch byte {offset}, {part}: {kind}")]
pub struct BatchError {
    pub offset: u64,
    pub part: Part,
    pub kind: BatchErrorKind,
}

impl BatchError {
    pub(crate) fn new(offset: u64, part: Part, kind: BatchErrorKind) -> BatchError {
        BatchError { offset, part, kind }
    }
}

/// What is wrong.
#[derive(Debug, thiserror::Error)]
pub enum BatchErrorKind {
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("the batch is truncated: it ends at byte {at}")]
    Truncated { at: u64 },
    #[error("not a ferry batch (bad magic)")]
    BadMagic,
    #[error("unsupported batch format version {0} (this ferry reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("unknown frame kind {0:#04x}")]
    UnknownFrameKind(u8),
    #[error("expected {expected}, found a {found} frame")]
    UnexpectedFrame {
        expected: &'static str,
        found: FrameKind,
    },
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLong { len: u32, max: u32 },
    #[error("frame checksum mismatch: the frame is corrupt")]
    FrameChecksum,
    #[error("payload does not decode: {0}")]
    Decode(String),
    #[error("{0} unused bytes at the end of the payload")]
    TrailingPayload(usize),
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    #[error("invalid operation: {0}")]
    InvalidOp(#[from] OpError),
    #[error("operation out of order: {0}")]
    Sequence(String),
    #[error("more operations than the header's bound of {0}")]
    TooManyOps(u64),
    #[error("more content bytes than the header's bound of {0}")]
    TooMuchContent(u64),
    #[error("the trailer's {what} is {trailer}, but the batch has {actual}")]
    TrailerMismatch {
        what: &'static str,
        trailer: u64,
        actual: u64,
    },
    #[error("the trailer's hash does not match the batch: it was altered")]
    TrailerHash,
    #[error("data follows the trailer")]
    TrailingData,
    #[error("content: {0}")]
    Content(#[from] ContentError),
    #[error("an earlier error ended this batch")]
    Failed,
}
