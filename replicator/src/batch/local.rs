//! A batch handed over within one process: the planner's operations go to
//! the applier's thread as values, checked as [`BatchReader`] checks them
//! (fields, order) but never encoded. Nothing travels, so nothing needs
//! framing or checksums, and content is not copied four times through an
//! encoder, a pipe and a decoder (measured: the seed of 1.6 GB spent more
//! time hashing frames than copying files). The size the encoded batch
//! would have is counted all the same.
//!
//! [`OpSink`] and [`OpSource`] are what a planner writes to and an applier
//! reads from; the byte format ([`BatchWriter`], [`BatchReader`]) and this
//! in-process form both implement them.
//!
//! [`BatchReader`]: super::BatchReader
//! [`BatchWriter`]: super::BatchWriter

use std::io;
use std::io::Read;
use std::io::Write;

use crossbeam_channel::{Receiver, Sender};

use super::error::{BatchError, BatchErrorKind, Part};
use super::frame::{CHECK_LEN, HEAD_LEN};
use super::op::{Op, Sequence};
use super::reader::{BatchReader, BatchStats};
use super::writer::BatchWriter;
use super::{BatchHeader, MAGIC};

/// Where a planner puts a batch's operations.
pub trait OpSink {
    /// Checks `op` and adds it to the batch.
    fn send(&mut self, op: Op) -> Result<(), BatchError>;
    /// Operations added so far.
    fn ops_sent(&self) -> u64;
}

/// Where an applier takes a batch's operations from.
pub trait OpSource {
    fn header(&self) -> &BatchHeader;
    /// The next operation; `Ok(None)` once the batch is known complete and
    /// intact.
    fn next_op(&mut self) -> Result<Option<Op>, BatchError>;
    fn stats(&self) -> BatchStats;
}

impl<W: Write> OpSink for BatchWriter<W> {
    fn send(&mut self, op: Op) -> Result<(), BatchError> {
        self.push(&op)
    }

    fn ops_sent(&self) -> u64 {
        self.ops_written()
    }
}

impl<R: Read> OpSource for BatchReader<R> {
    fn header(&self) -> &BatchHeader {
        BatchReader::header(self)
    }

    fn next_op(&mut self) -> Result<Option<Op>, BatchError> {
        BatchReader::next_op(self)
    }

    fn stats(&self) -> BatchStats {
        BatchReader::stats(self)
    }
}

enum Msg {
    Ops(Vec<Op>),
    /// The sender finished: every operation was sent.
    End,
}

/// Operations go over in groups (a wake-up of the other thread per
/// operation cost a tenth of a seed's applying): a group is sent once it
/// holds this many operations or this many content bytes.
const GROUP_OPS: usize = 256;
const GROUP_BYTES: u64 = 8 << 20;
/// Groups in flight between the threads.
const IN_FLIGHT: usize = 4;

/// A connected pair: the planner sends on the first, the applier reads
/// from the second.
pub fn local(header: BatchHeader) -> (LocalSender, LocalReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(IN_FLIGHT);
    let header_bytes =
        (MAGIC.len() + 4) as u64 + frame_len(postcard::to_stdvec(&header).map_or(0, |v| v.len()));
    (
        LocalSender {
            tx,
            group: Vec::new(),
            group_bytes: 0,
            sequence: Sequence::default(),
            ops: 0,
            content_bytes: 0,
            bytes: header_bytes,
        },
        LocalReceiver {
            rx,
            group: Vec::new().into_iter(),
            header,
            stats: BatchStats::default(),
            done: false,
        },
    )
}

fn frame_len(payload: usize) -> u64 {
    (HEAD_LEN + payload + CHECK_LEN) as u64
}

/// The sending half.
pub struct LocalSender {
    tx: Sender<Msg>,
    /// Operations not handed over yet.
    group: Vec<Op>,
    group_bytes: u64,
    sequence: Sequence,
    ops: u64,
    content_bytes: u64,
    /// What the encoded batch would be so far.
    bytes: u64,
}

impl LocalSender {
    /// Ends the batch; returns the size the encoded batch would have (with
    /// its trailer).
    pub fn finish(mut self) -> Result<u64, BatchError> {
        self.sequence
            .check_end()
            .map_err(|m| BatchError::new(self.bytes, Part::Trailer, BatchErrorKind::Sequence(m)))?;
        self.flush(Part::Trailer)?;
        self.tx
            .send(Msg::End)
            .map_err(|_| gone(self.bytes, Part::Trailer))?;
        // The trailer: two varints and a 32-byte hash.
        Ok(self.bytes + frame_len(2 * 10 + 32))
    }

    fn flush(&mut self, part: Part) -> Result<(), BatchError> {
        if self.group.is_empty() {
            return Ok(());
        }
        self.group_bytes = 0;
        let group = std::mem::take(&mut self.group);
        self.tx
            .send(Msg::Ops(group))
            .map_err(|_| gone(self.bytes, part))
    }
}

fn gone(offset: u64, part: Part) -> BatchError {
    BatchError::new(
        offset,
        part,
        BatchErrorKind::Io(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the applier stopped reading the batch",
        )),
    )
}

impl OpSink for LocalSender {
    fn send(&mut self, op: Op) -> Result<(), BatchError> {
        let part = Part::Op(self.ops + 1);
        let err = |kind: BatchErrorKind| BatchError::new(self.bytes, part, kind);
        op.validate().map_err(|e| err(e.into()))?;
        self.sequence
            .check(&op)
            .map_err(|m| err(BatchErrorKind::Sequence(m)))?;
        let payload = postcard::serialize_with_flavor(&op, postcard::ser_flavors::Size::default())
            .expect("an op always serializes");
        self.content_bytes = self.content_bytes.saturating_add(op.data_len());
        self.group_bytes += op.data_len();
        self.group.push(op);
        self.ops += 1;
        self.bytes += frame_len(payload);
        if self.group.len() >= GROUP_OPS || self.group_bytes >= GROUP_BYTES {
            self.flush(part)?;
        }
        Ok(())
    }

    fn ops_sent(&self) -> u64 {
        self.ops
    }
}

/// The receiving half.
pub struct LocalReceiver {
    rx: Receiver<Msg>,
    /// The rest of the group being read.
    group: std::vec::IntoIter<Op>,
    header: BatchHeader,
    stats: BatchStats,
    done: bool,
}

impl OpSource for LocalReceiver {
    fn header(&self) -> &BatchHeader {
        &self.header
    }

    fn next_op(&mut self) -> Result<Option<Op>, BatchError> {
        loop {
            if let Some(op) = self.group.next() {
                self.stats.ops += 1;
                self.stats.content_bytes = self.stats.content_bytes.saturating_add(op.data_len());
                return Ok(Some(op));
            }
            if self.done {
                return Ok(None);
            }
            match self.rx.recv() {
                Ok(Msg::Ops(group)) => self.group = group.into_iter(),
                Ok(Msg::End) => self.done = true,
                // The sender went away without finishing: like a batch
                // cut short, nothing may be committed.
                Err(_) => {
                    return Err(BatchError::new(
                        0,
                        Part::Frame(self.stats.ops + 1),
                        BatchErrorKind::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the batch ended before its end (the planner stopped)",
                        )),
                    ));
                }
            }
        }
    }

    fn stats(&self) -> BatchStats {
        self.stats
    }
}
