//! [`BatchWriter`]: writes a batch frame by frame.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::error::{BatchError, BatchErrorKind, Part};
use super::frame::{FrameKind, write_frame};
use super::op::{Hash, Op, Sequence};
use super::{BatchHeader, MAGIC, VERSION};

/// The trailer frame's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Trailer {
    pub(crate) op_count: u64,
    pub(crate) content_bytes: u64,
    /// BLAKE3 of the preamble, then of each frame before the trailer its
    /// head and check, in order. Each frame's check already covers its
    /// payload, so every byte is covered without hashing the content a
    /// second time; the chain catches a frame damaged, lost, added or
    /// moved. (Against a forger, who could write any batch, the transport
    /// protects: ssh, or the daemon's MACs.)
    pub(crate) hash: [u8; 32],
}

/// What a finished batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    /// Bytes written, trailer included.
    pub bytes: u64,
    /// Operation frames written.
    pub ops: u64,
    /// Content bytes, as [`Op::data_len`] counts them.
    pub content_bytes: u64,
    /// The trailer's hash.
    pub hash: Hash,
}

/// Writes a batch: [`new`](Self::new) writes the magic and the header,
/// [`push`](Self::push) one operation frame, [`finish`](Self::finish) the
/// trailer. The writer checks each operation as the reader will (fields,
/// order, the header's bounds), so what it writes is a batch the reader
/// accepts; after an error it refuses to go on.
///
/// Every `push` makes small writes: give it a `BufWriter` for files and
/// sockets.
pub struct BatchWriter<W: Write> {
    w: W,
    header: BatchHeader,
    hasher: blake3::Hasher,
    offset: u64,
    ops: u64,
    content_bytes: u64,
    sequence: Sequence,
    buf: Vec<u8>,
    failed: bool,
}

impl<W: Write> BatchWriter<W> {
    /// Checks the header and writes the magic, the version and the header
    /// frame.
    pub fn new(mut w: W, header: BatchHeader) -> Result<BatchWriter<W>, BatchError> {
        header
            .validate()
            .map_err(|m| BatchError::new(12, Part::Header, BatchErrorKind::InvalidHeader(m)))?;
        let mut hasher = blake3::Hasher::new();
        let mut pre = [0u8; 12];
        pre[..8].copy_from_slice(&MAGIC);
        pre[8..].copy_from_slice(&VERSION.to_le_bytes());
        let io = |e| BatchError::new(0, Part::Preamble, BatchErrorKind::Io(e));
        w.write_all(&pre).map_err(io)?;
        hasher.update(&pre);
        let payload = postcard::to_stdvec(&header).expect("a header always serializes");
        debug_assert!(payload.len() <= FrameKind::Header.max_payload() as usize);
        let n = write_frame(&mut w, Some(&mut hasher), FrameKind::Header, &payload)
            .map_err(|e| BatchError::new(12, Part::Header, BatchErrorKind::Io(e)))?;
        Ok(BatchWriter {
            w,
            header,
            hasher,
            offset: 12 + n,
            ops: 0,
            content_bytes: 0,
            sequence: Sequence::default(),
            buf: Vec::new(),
            failed: false,
        })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Operation frames written so far.
    pub fn ops_written(&self) -> u64 {
        self.ops
    }

    /// Checks `op` and writes it as the next operation frame.
    pub fn push(&mut self, op: &Op) -> Result<(), BatchError> {
        let (offset, part) = (self.offset, Part::Op(self.ops + 1));
        let err = |kind: BatchErrorKind| BatchError::new(offset, part, kind);
        if self.failed {
            return Err(err(BatchErrorKind::Failed));
        }
        op.validate().map_err(|e| err(e.into()))?;
        if self.ops + 1 > self.header.op_count {
            return Err(err(BatchErrorKind::TooManyOps(self.header.op_count)));
        }
        let content_bytes = self.content_bytes.saturating_add(op.data_len());
        if content_bytes > self.header.content_bytes {
            return Err(err(BatchErrorKind::TooMuchContent(
                self.header.content_bytes,
            )));
        }
        self.buf.clear();
        let buf = std::mem::take(&mut self.buf);
        self.buf = postcard::to_extend(op, buf).expect("an op always serializes to a Vec");
        let max = FrameKind::Op.max_payload();
        if self.buf.len() > max as usize {
            return Err(err(BatchErrorKind::FrameTooLong {
                len: u32::try_from(self.buf.len()).unwrap_or(u32::MAX),
                max,
            }));
        }
        // Checked last: a refused operation leaves the sequence as it was.
        self.sequence
            .check(op)
            .map_err(|m| err(BatchErrorKind::Sequence(m)))?;
        match write_frame(
            &mut self.w,
            Some(&mut self.hasher),
            FrameKind::Op,
            &self.buf,
        ) {
            Ok(n) => {
                self.offset += n;
                self.ops += 1;
                self.content_bytes = content_bytes;
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(err(BatchErrorKind::Io(e)))
            }
        }
    }

    /// Writes the trailer, flushes, and returns the inner writer.
    pub fn finish(mut self) -> Result<(W, WriteSummary), BatchError> {
        let offset = self.offset;
        let err = |kind: BatchErrorKind| BatchError::new(offset, Part::Trailer, kind);
        if self.failed {
            return Err(err(BatchErrorKind::Failed));
        }
        self.sequence
            .check_end()
            .map_err(|m| err(BatchErrorKind::Sequence(m)))?;
        let hash = *self.hasher.finalize().as_bytes();
        let trailer = Trailer {
            op_count: self.ops,
            content_bytes: self.content_bytes,
            hash,
        };
        let payload = postcard::to_stdvec(&trailer).expect("a trailer always serializes");
        let n = write_frame(&mut self.w, None, FrameKind::Trailer, &payload)
            .and_then(|n| self.w.flush().map(|()| n))
            .map_err(|e| err(BatchErrorKind::Io(e)))?;
        let summary = WriteSummary {
            bytes: self.offset + n,
            ops: self.ops,
            content_bytes: self.content_bytes,
            hash: Hash(hash),
        };
        Ok((self.w, summary))
    }
}
