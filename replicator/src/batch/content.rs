//! File content as it travels in a batch: raw or zstd-compressed chunks,
//! and sparse files as extents, so holes cost nothing.
//!
//! Decoding is streaming and bounded: a zstd chunk is decompressed in
//! pieces of at most [`PIECE`] bytes and refused as soon as it produces more
//! than the length it declares (a "zstd bomb"), or at its end if it
//! produced less.
//!
//! Encoding compresses a piece only where that pays, and keeps a
//! per-thread account of what compression saved lately: when it stops
//! saving (a tree of media or archives), pieces go out raw for a while
//! without zstd looking at them.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use super::limits::{MAX_CHUNK_LEN, MAX_EXTENTS, MAX_FILE_SIZE, ZSTD_WINDOW_LOG_MAX};
use super::wire::bounded_vec;

/// Size of the pieces decoded content is handed out in.
const PIECE: usize = 128 << 10;

/// Data shorter than this is never compressed.
const MIN_COMPRESS: usize = 128;

/// The zstd level [`Chunk::compress_if_it_pays`] uses.
const ZSTD_LEVEL: i32 = 3;

/// One run of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    /// The bytes themselves.
    Raw(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A zstd stream that decompresses to exactly `len` bytes.
    Zstd {
        len: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// A chunk placed at an offset of a sparse file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub data: Chunk,
}

/// The whole content of a new file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// The bytes themselves.
    Raw(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A zstd stream that decompresses to exactly `len` bytes.
    Zstd {
        len: u64,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A file of `size` bytes that is zero (a hole) except for the extents,
    /// which are in increasing offset order, non-empty, non-overlapping and
    /// within `size`.
    Sparse {
        size: u64,
        #[serde(deserialize_with = "extents")]
        extents: Vec<Extent>,
    },
}

fn extents<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Extent>, D::Error> {
    bounded_vec::<D, Extent, MAX_EXTENTS>(d)
}

/// Content that does not decode to what it declares.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("zstd data does not decode: {0}")]
    Zstd(io::Error),
    #[error("zstd data decodes to more than the declared {declared} bytes")]
    TooLong { declared: u64 },
    #[error("zstd data decodes to {actual} bytes, not the declared {declared}")]
    TooShort { declared: u64, actual: u64 },
    #[error("writing decoded content: {0}")]
    Sink(io::Error),
}

/// A borrowed view of a chunk, shared by [`Chunk`] and the whole-file
/// variants of [`Content`].
#[derive(Clone, Copy)]
enum ChunkRef<'a> {
    Raw(&'a [u8]),
    Zstd { len: u64, bytes: &'a [u8] },
}

impl ChunkRef<'_> {
    fn len(self) -> u64 {
        match self {
            ChunkRef::Raw(b) => b.len() as u64,
            ChunkRef::Zstd { len, .. } => len,
        }
    }

    fn wire_len(self) -> u64 {
        match self {
            ChunkRef::Raw(b) | ChunkRef::Zstd { bytes: b, .. } => b.len() as u64,
        }
    }

    fn validate(self) -> Result<(), String> {
        if self.len() > MAX_CHUNK_LEN {
            return Err(format!(
                "chunk of {} bytes (at most {MAX_CHUNK_LEN})",
                self.len()
            ));
        }
        Ok(())
    }

    /// Hands out the decoded bytes in order, as `(offset, piece)` with
    /// offsets counted from `base`.
    fn for_each_piece(
        self,
        base: u64,
        f: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ContentError> {
        match self {
            ChunkRef::Raw(bytes) => {
                let mut off = base;
                for piece in bytes.chunks(PIECE) {
                    f(off, piece).map_err(ContentError::Sink)?;
                    off = off.saturating_add(piece.len() as u64);
                }
                Ok(())
            }
            ChunkRef::Zstd { len, bytes } => {
                if len > MAX_CHUNK_LEN {
                    return Err(ContentError::TooLong { declared: len });
                }
                let mut dec =
                    zstd::stream::read::Decoder::with_buffer(bytes).map_err(ContentError::Zstd)?;
                dec.window_log_max(ZSTD_WINDOW_LOG_MAX)
                    .map_err(ContentError::Zstd)?;
                let mut buf = vec![0u8; PIECE.min(len as usize + 1)];
                let mut done = 0u64;
                loop {
                    let n = match dec.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(ContentError::Zstd(e)),
                    };
                    if done + n as u64 > len {
                        return Err(ContentError::TooLong { declared: len });
                    }
                    f(base.saturating_add(done), &buf[..n]).map_err(ContentError::Sink)?;
                    done += n as u64;
                }
                if done != len {
                    return Err(ContentError::TooShort {
                        declared: len,
                        actual: done,
                    });
                }
                Ok(())
            }
        }
    }
}

fn compress(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < MIN_COMPRESS || data.len() as u64 > MAX_CHUNK_LEN {
        return None;
    }
    COMPRESSION.with(|c| c.borrow_mut().compress(data))
}

thread_local! {
    /// One per thread: a push plans (and compresses) on one thread, and a
    /// new zstd context per piece costs more than compressing a few
    /// kilobytes.
    static COMPRESSION: std::cell::RefCell<Compression> =
        const { std::cell::RefCell::new(Compression::new()) };
}

/// Bytes of a large piece compressed to decide whether the rest is worth
/// compressing.
const PROBE: usize = 64 << 10;

/// Compressing `len` bytes to `compressed` pays when it saves at least a
/// sixteenth.
fn pays(len: usize, compressed: usize) -> bool {
    compressed <= len - len / 16
}

/// Bytes of pieces compression was tried on (a probed piece counts whole)
/// before the account judges whether it is paying: a hundred or more small
/// files, or one large piece, so one odd file does not decide; and little
/// enough that finding out costs at most 1 MiB of zstd.
const ACCOUNT_WINDOW: u64 = 1 << 20;

/// Compression that saved less than this share of a window's bytes, in
/// percent, is not worth its CPU. zstd (level 3) spends about 1.2 ms per
/// MiB of data it cannot shrink (8 KiB pieces, one core of a 2-CPU Xeon);
/// 3% of a MiB is 31 KB, which takes that long to send only on a link
/// slower than about 25 MB/s, while a seed over ssh on a faster one is
/// CPU-bound (sender, ssh, sshd and receiver share the CPUs).
const MIN_SAVING_PERCENT: u64 = 3;

/// Bytes of pieces sent raw, without trying zstd, after a window that did
/// not pay; then the account tries again. zstd then looks at one byte in
/// nine of a tree that does not compress (less where large pieces are
/// probed), and a tree that turns compressible (text after media) is
/// compressed again within this much.
const PAUSE: u64 = 8 << 20;

/// A thread's zstd context and its account of what compression has been
/// saving lately. The decision depends only on the pieces this thread
/// compressed before (no clock), so the same pieces in the same order
/// encode the same.
struct Compression {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    /// Bytes of the pieces tried in the current window.
    tried: u64,
    /// How many bytes smaller than those pieces their encoding is (0 for a
    /// piece that went out raw).
    saved: u64,
    /// Bytes of pieces still to send raw without trying.
    pause: u64,
    /// Pieces sent raw without trying (for tests).
    #[cfg(test)]
    skipped: u64,
}

impl Compression {
    const fn new() -> Compression {
        Compression {
            zstd: None,
            tried: 0,
            saved: 0,
            pause: 0,
            #[cfg(test)]
            skipped: 0,
        }
    }

    /// `data` compressed, if compression is paying lately and pays for it.
    fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        let len = data.len() as u64;
        if self.pause > 0 {
            self.pause = self.pause.saturating_sub(len);
            #[cfg(test)]
            {
                self.skipped += 1;
            }
            return None;
        }
        let c = self.try_compress(data);
        self.tried += len;
        self.saved += c.as_ref().map_or(0, |c| len - c.len() as u64);
        if self.tried >= ACCOUNT_WINDOW {
            if self.saved * 100 < self.tried * MIN_SAVING_PERCENT {
                self.pause = PAUSE;
            }
            self.tried = 0;
            self.saved = 0;
        }
        c
    }

    fn try_compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        // Data that does not compress (media, archives, encrypted files:
        // most large files) costs zstd as much CPU as data that does: a
        // sample at the start decides for a large piece.
        if data.len() > 4 * PROBE {
            let sample = self.zstd(&data[..PROBE])?;
            if !pays(PROBE, sample.len()) {
                return None;
            }
        }
        let c = self.zstd(data)?;
        pays(data.len(), c.len()).then_some(c)
    }

    /// zstd at `ZSTD_LEVEL`.
    fn zstd(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?);
        }
        self.zstd.as_mut()?.compress(data).ok()
    }
}

/// Pieces this thread has sent raw without trying zstd, because recent
/// compression did not pay.
#[cfg(test)]
pub(super) fn skipped_pieces() -> u64 {
    COMPRESSION.with(|c| c.borrow().skipped)
}

impl Chunk {
    fn view(&self) -> ChunkRef<'_> {
        match self {
            Chunk::Raw(b) => ChunkRef::Raw(b),
            Chunk::Zstd { len, bytes } => ChunkRef::Zstd { len: *len, bytes },
        }
    }

    /// `data` compressed with zstd if that makes it noticeably smaller,
    /// else as is. `data` longer than [`MAX_CHUNK_LEN`] is never
    /// compressed (and a writer refuses it: split it). After a run of
    /// pieces that compression did not shrink, this thread sends the next
    /// 8 MiB of pieces raw without trying.
    pub fn compress_if_it_pays(data: &[u8]) -> Chunk {
        match compress(data) {
            Some(bytes) => Chunk::Zstd {
                len: data.len() as u64,
                bytes,
            },
            None => Chunk::Raw(data.to_vec()),
        }
    }

    /// The number of bytes the chunk decodes to (as declared).
    pub fn len(&self) -> u64 {
        self.view().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of payload bytes the chunk carries.
    pub fn wire_len(&self) -> u64 {
        self.view().wire_len()
    }

    /// Checks the declared length against the limit (not the data: see
    /// [`verify`](Self::verify)).
    pub fn validate(&self) -> Result<(), String> {
        self.view().validate()
    }

    /// Decodes the chunk, handing out `(offset, piece)` in order with
    /// offsets counted from `base`; fails if it does not decode to exactly
    /// its declared length.
    pub fn for_each_piece(
        &self,
        base: u64,
        mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ContentError> {
        self.view().for_each_piece(base, &mut f)
    }

    /// Decodes the chunk into memory (at most [`MAX_CHUNK_LEN`] bytes).
    pub fn to_vec(&self) -> Result<Vec<u8>, ContentError> {
        let mut out = Vec::new();
        self.for_each_piece(0, |_, p| {
            out.extend_from_slice(p);
            Ok(())
        })?;
        Ok(out)
    }

    /// Checks that the chunk decodes to exactly its declared length,
    /// without keeping the bytes.
    pub fn verify(&self) -> Result<(), ContentError> {
        self.for_each_piece(0, |_, _| Ok(()))
    }
}

impl Content {
    /// `data` as one chunk, zstd-compressed if that makes it noticeably
    /// smaller and compression has been paying lately, as for
    /// [`Chunk::compress_if_it_pays`].
    pub fn compress_if_it_pays(data: &[u8]) -> Content {
        match compress(data) {
            Some(bytes) => Content::Zstd {
                len: data.len() as u64,
                bytes,
            },
            None => Content::Raw(data.to_vec()),
        }
    }

    fn whole(&self) -> Option<ChunkRef<'_>> {
        match self {
            Content::Raw(b) => Some(ChunkRef::Raw(b)),
            Content::Zstd { len, bytes } => Some(ChunkRef::Zstd { len: *len, bytes }),
            Content::Sparse { .. } => None,
        }
    }

    /// The size of the file this content makes.
    pub fn size(&self) -> u64 {
        match self {
            Content::Raw(b) => b.len() as u64,
            Content::Zstd { len, .. } => *len,
            Content::Sparse { size, .. } => *size,
        }
    }

    /// The number of data bytes (after decompression, holes excluded).
    pub fn data_len(&self) -> u64 {
        match self {
            Content::Raw(b) => b.len() as u64,
            Content::Zstd { len, .. } => *len,
            Content::Sparse { extents, .. } => extents
                .iter()
                .map(|e| e.data.len())
                .fold(0, u64::saturating_add),
        }
    }

    /// The number of payload bytes the content carries.
    pub fn wire_len(&self) -> u64 {
        match self {
            Content::Raw(b) | Content::Zstd { bytes: b, .. } => b.len() as u64,
            Content::Sparse { extents, .. } => extents.iter().map(|e| e.data.wire_len()).sum(),
        }
    }

    /// Checks declared lengths, the extent layout and the limits (not the
    /// compressed data: see [`verify`](Self::verify)).
    pub fn validate(&self) -> Result<(), String> {
        let Content::Sparse { size, extents } = self else {
            return self.whole().map_or(Ok(()), ChunkRef::validate);
        };
        if *size > MAX_FILE_SIZE {
            return Err(format!("size {size} exceeds {MAX_FILE_SIZE}"));
        }
        if extents.len() > MAX_EXTENTS {
            return Err(format!("{} extents (at most {MAX_EXTENTS})", extents.len()));
        }
        let mut next = 0u64;
        let mut total = 0u64;
        for (i, e) in extents.iter().enumerate() {
            e.data.validate().map_err(|m| format!("extent {i}: {m}"))?;
            if e.data.is_empty() {
                return Err(format!("extent {i} is empty"));
            }
            if e.offset < next {
                return Err(format!("extent {i} overlaps or precedes the one before it"));
            }
            next = match e.offset.checked_add(e.data.len()) {
                Some(end) if end <= *size => end,
                _ => return Err(format!("extent {i} ends beyond the size {size}")),
            };
            total += e.data.len();
            if total > MAX_CHUNK_LEN {
                return Err(format!("more than {MAX_CHUNK_LEN} data bytes"));
            }
        }
        Ok(())
    }

    /// Decodes the content, handing out `(offset, piece)` in increasing
    /// offset order; the bytes between pieces, and after the last one up
    /// to [`size`](Self::size), are zero. A caller writing a file writes
    /// each piece at its offset and then sets the length to `size()`.
    pub fn for_each_piece(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<(), ContentError> {
        if let Some(c) = self.whole() {
            return c.for_each_piece(0, &mut f);
        }
        if let Content::Sparse { extents, .. } = self {
            for e in extents {
                e.data.view().for_each_piece(e.offset, &mut f)?;
            }
        }
        Ok(())
    }

    /// The whole file in memory, holes filled with zeros. For small files
    /// and tests: the size of a sparse file is bounded by the caller's
    /// `max_size`, not by the format.
    pub fn to_vec(&self, max_size: u64) -> Result<Vec<u8>, ContentError> {
        if self.size() > max_size {
            return Err(ContentError::Sink(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("content of {} bytes exceeds {max_size}", self.size()),
            )));
        }
        let mut out = vec![0u8; self.size() as usize];
        self.for_each_piece(|off, p| {
            let range = usize::try_from(off)
                .ok()
                .and_then(|start| Some(start..start.checked_add(p.len())?));
            match range.and_then(|r| out.get_mut(r)) {
                Some(dst) => {
                    dst.copy_from_slice(p);
                    Ok(())
                }
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "piece beyond the content's size",
                )),
            }
        })?;
        Ok(out)
    }

    /// Checks that every chunk decodes to exactly its declared length.
    pub fn verify(&self) -> Result<(), ContentError> {
        self.for_each_piece(|_, _| Ok(()))
    }
}
