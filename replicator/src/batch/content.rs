//! File content as it travels in a batch: raw or zstd-compressed chunks,
//! and sparse files as extents, so holes cost nothing.
//!
//! Decoding is streaming and bounded: a zstd chunk is decompressed in
//! pieces of at most [`PIECE`] bytes and refused as soon as it produces more
//! than the length it declares (a "zstd bomb"), or at its end if it
//! produced less.

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
    // Data that does not compress (media, archives, encrypted files: most
    // large files) costs zstd as much CPU as data that does: a sample at
    // the start decides for a large piece.
    if data.len() > 4 * PROBE {
        let sample = zstd_compress(&data[..PROBE])?;
        if !pays(PROBE, sample.len()) {
            return None;
        }
    }
    let c = zstd_compress(data)?;
    pays(data.len(), c.len()).then_some(c)
}

/// zstd at `ZSTD_LEVEL` with a context kept per thread: a seed compresses
/// (or tries to) every small file, and a new context each time costs more
/// than compressing a few kilobytes.
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?);
        }
        c.as_mut()?.compress(data).ok()
    })
}

/// Bytes of a large piece compressed to decide whether the rest is worth
/// compressing.
const PROBE: usize = 64 << 10;

/// Compressing `len` bytes to `compressed` pays when it saves at least a
/// sixteenth.
fn pays(len: usize, compressed: usize) -> bool {
    compressed <= len - len / 16
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
    /// compressed (and a writer refuses it: split it).
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
    /// smaller.
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
