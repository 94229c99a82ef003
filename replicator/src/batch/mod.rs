//! The batch format: a self-contained, versioned, framed and checksummed byte
//! stream that takes a replica from one journal sequence number to a later
//! one (docs/FORMAT.md, "Batches", is the byte-by-byte specification).
//!
//! This module owns the encoding and the decoding, and the checks that make
//! a decoded batch safe to hand to the applier: every byte of a batch is
//! hostile input. It does not touch any filesystem.
//!
//! - [`BatchWriter`] writes a header, operations ([`Op`]) one by one, and a
//!   trailer.
//! - [`BatchReader`] yields the operations one by one from any [`Read`],
//!   holding at most one frame in memory. It returns `Ok(None)` only after
//!   a trailer whose counts and whole-batch hash match. Operations it yields
//!   before that point have passed their frame checksum and every field
//!   check, but the batch as a whole is not yet known to be intact: an
//!   applier must run [`validate`] over the whole batch (or stage everything
//!   and commit only after `Ok(None)`) before changing anything visible.
//! - Every path in an operation is a [`RelPath`]: its constructor and its
//!   deserializer refuse anything that could name a place outside the
//!   replica root (absolute paths, `..`, `.`, empty components, `/` or NUL
//!   inside a component, over-long names).
//!
//! [`Read`]: std::io::Read

mod content;
mod error;
mod frame;
mod local;
mod op;
mod path;
mod reader;
mod wire;
mod writer;

#[cfg(test)]
mod tests;

pub use content::{Chunk, Content, ContentError, Extent};
pub use error::{BatchError, BatchErrorKind, Part};
pub use frame::FrameKind;
pub(crate) use frame::read_full;
pub use local::{LocalReceiver, LocalSender, OpSink, OpSource, local};
pub use op::{Hash, NodeKind, Op, OpError, Timestamp, WriteRange};
pub use path::{PathError, RelPath};
pub use reader::{BatchReader, BatchStats, Validated, validate};
pub use writer::{BatchWriter, WriteSummary};

use serde::{Deserialize, Serialize};

/// The first eight bytes of every batch.
pub const MAGIC: [u8; 8] = *b"FERRYBT\n";

/// The format version this code writes and the only one it reads.
/// Version 3 checks each frame with XXH3-64 where version 2 used BLAKE3;
/// version 1 carried `result` in `BeginFile`, not `EndFile`.
pub const VERSION: u32 = 3;

/// The `replica_id` of a batch made for any fresh replica.
pub const ANY_REPLICA: [u8; 16] = [0; 16];

/// Limits the decoder enforces (and the writer respects), each checked
/// before the memory it bounds is allocated.
pub mod limits {
    /// Largest payload of an operation frame.
    pub const MAX_OP_PAYLOAD: u32 = 64 << 20;
    /// Largest payload of the header frame.
    pub const MAX_HEADER_PAYLOAD: u32 = 1024;
    /// Largest payload of the trailer frame.
    pub const MAX_TRAILER_PAYLOAD: u32 = 128;
    /// Longest path, counted as its components joined with `/`.
    pub const MAX_PATH_LEN: usize = 4096;
    /// Longest path component (NAME_MAX).
    pub const MAX_COMPONENT_LEN: usize = 255;
    /// Longest symlink target (PATH_MAX without the terminating NUL).
    pub const MAX_SYMLINK_TARGET: usize = 4095;
    /// Longest extended attribute name.
    pub const MAX_XATTR_NAME: usize = 255;
    /// Largest extended attribute value.
    pub const MAX_XATTR_VALUE: usize = 64 << 10;
    /// Most ranges in one `WriteRanges`.
    pub const MAX_RANGES: usize = 1 << 16;
    /// Most extents in one sparse `Content`.
    pub const MAX_EXTENTS: usize = 1 << 16;
    /// Most bytes one chunk of content decodes to, and most data bytes
    /// (after decompression) one operation carries.
    pub const MAX_CHUNK_LEN: u64 = 64 << 20;
    /// Largest file size or offset (off_t is signed).
    pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;
    /// The zstd decoder refuses frames that need a window above 2^this
    /// bytes, which bounds its memory.
    pub const ZSTD_WINDOW_LOG_MAX: u32 = 26;

    /// The most bytes a delta of `delta_len` bytes against a base of
    /// `base_len` bytes may produce: the applier refuses more (a hostile
    /// delta must not fill the disk by copying one block over and over),
    /// so a sender makes no delta that needs more.
    pub fn delta_output_limit(base_len: u64, delta_len: u64) -> u64 {
        base_len
            .saturating_add(delta_len)
            .saturating_mul(16)
            .max(1 << 20)
    }
}

/// What a batch says about itself: where it comes from, which replica and
/// state it applies to, and bounds on what follows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Random bytes identifying the source journal.
    pub source_id: [u8; 16],
    /// The replica the batch was made for, or [`ANY_REPLICA`] for any
    /// fresh replica.
    pub replica_id: [u8; 16],
    /// The sequence number the replica must have applied (its state before
    /// the batch).
    pub from_seq: u64,
    /// The sequence number the replica has applied after the batch.
    pub to_seq: u64,
    /// A digest of the replica state the batch expects; opaque to the
    /// format.
    pub expected_state: [u8; 32],
    /// When the batch was made, in nanoseconds since the Unix epoch.
    pub created_unix_ns: i64,
    /// At most this many operation frames follow (the exact number when the
    /// writer knew it, which is the usual case). The reader refuses the
    /// batch as soon as it exceeds the bound; the trailer holds the exact
    /// count.
    pub op_count: u64,
    /// At most this many content bytes follow, counted as
    /// [`Op::data_len`] does; an upper bound like `op_count`.
    pub content_bytes: u64,
}

impl BatchHeader {
    /// Checks the header's own consistency.
    pub fn validate(&self) -> Result<(), String> {
        if self.from_seq > self.to_seq {
            return Err(format!(
                "from_seq {} is after to_seq {}",
                self.from_seq, self.to_seq
            ));
        }
        Ok(())
    }
}
