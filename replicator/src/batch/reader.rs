//! [`BatchReader`]: decodes a batch from any reader, one operation at a
//! time, and [`validate`]: checks a whole batch without applying it.

use std::io::Read;

use serde::de::DeserializeOwned;

use super::error::{BatchError, BatchErrorKind, Part};
use super::frame::{CHECK_LEN, FrameKind, HEAD_LEN, check, head, read_full};
use super::op::{Op, Sequence};
use super::wire;
use super::writer::Trailer;
use super::{BatchHeader, MAGIC, VERSION};

/// Running totals of what a reader has read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Operation frames.
    pub ops: u64,
    /// Content bytes, as [`Op::data_len`] counts them.
    pub content_bytes: u64,
    /// Bytes of the batch (the trailer included once it is read).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ops,
    Done,
    Failed,
}

/// Reads a batch: [`new`](Self::new) reads the magic, the version and the
/// header; [`next_op`](Self::next_op) yields the operations one by one.
///
/// Memory is bounded by one frame (at most 64 MiB, allocated as its bytes
/// arrive, not as its length field claims). The reader never panics on any
/// input and every call makes progress or fails; after a failure it only
/// fails. It reads exactly the batch's bytes from `R`, without reading
/// ahead: wrap a file or socket in a `BufReader`.
pub struct BatchReader<R: Read> {
    r: R,
    header: BatchHeader,
    hasher: blake3::Hasher,
    /// Offset of the next frame.
    offset: u64,
    /// Offset of the last op frame returned.
    last_op_offset: u64,
    stats: BatchStats,
    sequence: Sequence,
    buf: Vec<u8>,
    state: State,
    expect_eof: bool,
}

impl<R: Read> BatchReader<R> {
    /// Reads the start of a batch that ends where `r` ends: anything after
    /// the trailer is an error.
    pub fn new(r: R) -> Result<BatchReader<R>, BatchError> {
        BatchReader::open(r, true)
    }

    /// Reads the start of a batch embedded in a longer stream (a protocol
    /// connection): the reader stops right after the trailer, and
    /// [`into_inner`](Self::into_inner) gives back `r` positioned there.
    pub fn in_stream(r: R) -> Result<BatchReader<R>, BatchError> {
        BatchReader::open(r, false)
    }

    fn open(mut r: R, expect_eof: bool) -> Result<BatchReader<R>, BatchError> {
        let mut pre = [0u8; 12];
        let n = read_full(&mut r, &mut pre)
            .map_err(|e| BatchError::new(0, Part::Preamble, BatchErrorKind::Io(e)))?;
        // A short batch whose bytes are not a prefix of the magic is not a
        // batch at all; a prefix of one is a truncated batch.
        if pre[..n.min(8)] != MAGIC[..n.min(8)] {
            return Err(BatchError::new(0, Part::Preamble, BatchErrorKind::BadMagic));
        }
        if n < pre.len() {
            return Err(BatchError::new(
                0,
                Part::Preamble,
                BatchErrorKind::Truncated { at: n as u64 },
            ));
        }
        let version = u32::from_le_bytes(pre[8..].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(BatchError::new(
                8,
                Part::Preamble,
                BatchErrorKind::UnsupportedVersion(version),
            ));
        }
        let mut reader = BatchReader {
            r,
            header: BatchHeader::default(),
            hasher: blake3::Hasher::new(),
            offset: pre.len() as u64,
            last_op_offset: 0,
            stats: BatchStats::default(),
            sequence: Sequence::default(),
            buf: Vec::new(),
            state: State::Ops,
            expect_eof,
        };
        reader.hasher.update(&pre);
        let at = reader.offset;
        let err = |kind: BatchErrorKind| BatchError::new(at, Part::Header, kind);
        let kind = reader.read_frame(Part::Header)?;
        if kind != FrameKind::Header {
            return Err(err(BatchErrorKind::UnexpectedFrame {
                expected: "the header frame",
                found: kind,
            }));
        }
        let header: BatchHeader = reader.decode(at, Part::Header)?;
        header
            .validate()
            .map_err(|m| err(BatchErrorKind::InvalidHeader(m)))?;
        reader.header = header;
        reader.stats.bytes = reader.offset;
        Ok(reader)
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// What has been read so far.
    pub fn stats(&self) -> BatchStats {
        self.stats
    }

    /// The byte offset of the frame of the last operation returned (for
    /// error messages about it).
    pub fn last_op_offset(&self) -> u64 {
        self.last_op_offset
    }

    /// Whether the trailer has been read and matched.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Gives back the underlying reader (positioned after the trailer once
    /// the batch is done).
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The next operation, or `Ok(None)` once the trailer has been read and
    /// its operation count, content byte count and hash match the batch
    /// (and, for [`new`](Self::new), nothing follows it).
    pub fn next_op(&mut self) -> Result<Option<Op>, BatchError> {
        match self.state {
            State::Done => return Ok(None),
            State::Failed => {
                return Err(BatchError::new(
                    self.offset,
                    Part::Frame(self.stats.ops + 1),
                    BatchErrorKind::Failed,
                ));
            }
            State::Ops => {}
        }
        let result = self.step();
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self) -> Result<Option<Op>, BatchError> {
        let at = self.offset;
        let index = self.stats.ops + 1;
        match self.read_frame(Part::Frame(index))? {
            FrameKind::Op => {
                let part = Part::Op(index);
                let err = |kind: BatchErrorKind| BatchError::new(at, part, kind);
                let op: Op = self.decode(at, part)?;
                op.validate().map_err(|e| err(e.into()))?;
                self.sequence
                    .check(&op)
                    .map_err(|m| err(BatchErrorKind::Sequence(m)))?;
                if index > self.header.op_count {
                    return Err(err(BatchErrorKind::TooManyOps(self.header.op_count)));
                }
                let content_bytes = self.stats.content_bytes.saturating_add(op.data_len());
                if content_bytes > self.header.content_bytes {
                    return Err(err(BatchErrorKind::TooMuchContent(
                        self.header.content_bytes,
                    )));
                }
                self.stats.ops = index;
                self.stats.content_bytes = content_bytes;
                self.stats.bytes = self.offset;
                self.last_op_offset = at;
                Ok(Some(op))
            }
            FrameKind::Trailer => {
                let err = |kind: BatchErrorKind| BatchError::new(at, Part::Trailer, kind);
                let trailer: Trailer = self.decode(at, Part::Trailer)?;
                self.sequence
                    .check_end()
                    .map_err(|m| err(BatchErrorKind::Sequence(m)))?;
                if trailer.op_count != self.stats.ops {
                    return Err(err(BatchErrorKind::TrailerMismatch {
                        what: "operation count",
                        trailer: trailer.op_count,
                        actual: self.stats.ops,
                    }));
                }
                if trailer.content_bytes != self.stats.content_bytes {
                    return Err(err(BatchErrorKind::TrailerMismatch {
                        what: "content byte count",
                        trailer: trailer.content_bytes,
                        actual: self.stats.content_bytes,
                    }));
                }
                // The trailer hash covers every byte before the trailer
                // frame, which `read_frame` does not feed to it.
                if trailer.hash != *self.hasher.finalize().as_bytes() {
                    return Err(err(BatchErrorKind::TrailerHash));
                }
                if self.expect_eof {
                    let mut one = [0u8; 1];
                    let n = read_full(&mut self.r, &mut one).map_err(|e| {
                        BatchError::new(self.offset, Part::AfterTrailer, BatchErrorKind::Io(e))
                    })?;
                    if n != 0 {
                        return Err(BatchError::new(
                            self.offset,
                            Part::AfterTrailer,
                            BatchErrorKind::TrailingData,
                        ));
                    }
                }
                self.stats.bytes = self.offset;
                self.state = State::Done;
                Ok(None)
            }
            FrameKind::Header => Err(BatchError::new(
                at,
                Part::Frame(index),
                BatchErrorKind::UnexpectedFrame {
                    expected: "an op or the trailer frame",
                    found: FrameKind::Header,
                },
            )),
        }
    }

    /// Reads the frame at `self.offset` into `self.buf` (payload only),
    /// checks its length limit and checksum, feeds it (unless it is the
    /// trailer) to the trailer hash, and advances `self.offset`.
    fn read_frame(&mut self, part: Part) -> Result<FrameKind, BatchError> {
        let at = self.offset;
        let err = |kind: BatchErrorKind| BatchError::new(at, part, kind);
        let mut h = [0u8; HEAD_LEN];
        let n = read_full(&mut self.r, &mut h).map_err(|e| err(BatchErrorKind::Io(e)))?;
        if n < HEAD_LEN {
            return Err(err(BatchErrorKind::Truncated { at: at + n as u64 }));
        }
        let kind = FrameKind::from_byte(h[0])
            .ok_or_else(|| err(BatchErrorKind::UnknownFrameKind(h[0])))?;
        let len = u32::from_le_bytes(h[1..].try_into().expect("4 bytes"));
        let max = kind.max_payload();
        if len > max {
            return Err(err(BatchErrorKind::FrameTooLong { len, max }));
        }
        let want = len as usize + CHECK_LEN;
        self.buf.clear();
        // `take` + `read_to_end` grows the buffer as bytes arrive: a length
        // field that lies costs no more memory than the bytes really sent.
        let got = (&mut self.r)
            .take(want as u64)
            .read_to_end(&mut self.buf)
            .map_err(|e| err(BatchErrorKind::Io(e)))?;
        if got < want {
            return Err(err(BatchErrorKind::Truncated {
                at: at + (HEAD_LEN + got) as u64,
            }));
        }
        let (payload, sum) = self.buf.split_at(len as usize);
        debug_assert_eq!(h, head(kind, len));
        if check(&h, payload) != sum {
            return Err(err(BatchErrorKind::FrameChecksum));
        }
        if kind != FrameKind::Trailer {
            self.hasher.update(&h);
            self.hasher.update(sum);
        }
        self.offset = at + (HEAD_LEN + want) as u64;
        Ok(kind)
    }

    /// Decodes the payload in `self.buf`, which must be exactly one value.
    fn decode<T: DeserializeOwned>(&self, at: u64, part: Part) -> Result<T, BatchError> {
        let payload = &self.buf[..self.buf.len() - CHECK_LEN];
        wire::clear_reason();
        match postcard::take_from_bytes::<T>(payload) {
            Ok((value, [])) => Ok(value),
            Ok((_, rest)) => Err(BatchError::new(
                at,
                part,
                BatchErrorKind::TrailingPayload(rest.len()),
            )),
            Err(e) => {
                let reason = match (e, wire::take_reason()) {
                    (postcard::Error::SerdeDeCustom, Some(reason)) => reason,
                    (e, _) => e.to_string(),
                };
                Err(BatchError::new(at, part, BatchErrorKind::Decode(reason)))
            }
        }
    }
}

/// A batch that passed [`validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub header: BatchHeader,
    pub stats: BatchStats,
}

/// Reads a whole batch and checks everything that can be checked without a
/// replica: magic, version, every frame's length and checksum, every
/// operation's fields and order, the header's bounds, that compressed data
/// decodes to exactly its declared length, the trailer's counts and hash,
/// and that nothing follows the trailer. Memory is bounded as for
/// [`BatchReader`]. Base hashes and the expected replica state are the
/// applier's to check.
pub fn validate(r: impl Read) -> Result<Validated, BatchError> {
    let mut reader = BatchReader::new(r)?;
    while let Some(op) = reader.next_op()? {
        op.verify_content().map_err(|e| {
            BatchError::new(
                reader.last_op_offset(),
                Part::Op(reader.stats().ops),
                e.into(),
            )
        })?;
    }
    Ok(Validated {
        header: reader.header().clone(),
        stats: reader.stats(),
    })
}
