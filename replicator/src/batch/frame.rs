//! Frames: `[kind: u8][len: u32 LE][payload: len bytes][check: 8 bytes]`,
//! where `check` is XXH3-64(kind || len || payload), little-endian.
//!
//! The check only has to catch accidental damage: an unkeyed hash of any
//! strength can be recomputed by whoever alters a frame on purpose. What
//! guards content is the BLAKE3 hash of each file carried in the operations,
//! and what guards a remote stream is its transport (ssh, or the daemon's
//! MACs). XXH3 costs a small fraction of BLAKE3 per byte, and every content
//! byte passes through it at both ends.

use std::fmt;
use std::io::{self, Read, Write};

use super::limits::{MAX_HEADER_PAYLOAD, MAX_OP_PAYLOAD, MAX_TRAILER_PAYLOAD};

/// Bytes before the payload.
pub(crate) const HEAD_LEN: usize = 5;
/// Bytes after the payload.
pub(crate) const CHECK_LEN: usize = 8;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Header = 1,
    Op = 2,
    Trailer = 3,
}

impl FrameKind {
    pub(crate) fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Header),
            2 => Some(FrameKind::Op),
            3 => Some(FrameKind::Trailer),
            _ => None,
        }
    }

    /// The largest payload a frame of this kind may have.
    pub(crate) fn max_payload(self) -> u32 {
        match self {
            FrameKind::Header => MAX_HEADER_PAYLOAD,
            FrameKind::Op => MAX_OP_PAYLOAD,
            FrameKind::Trailer => MAX_TRAILER_PAYLOAD,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameKind::Header => "header",
            FrameKind::Op => "op",
            FrameKind::Trailer => "trailer",
        })
    }
}

pub(crate) fn head(kind: FrameKind, len: u32) -> [u8; HEAD_LEN] {
    let mut h = [0u8; HEAD_LEN];
    h[0] = kind as u8;
    h[1..].copy_from_slice(&len.to_le_bytes());
    h
}

pub(crate) fn check(head: &[u8; HEAD_LEN], payload: &[u8]) -> [u8; CHECK_LEN] {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(head);
    h.update(payload);
    h.digest().to_le_bytes()
}

/// Writes one frame and feeds its head and check to `hasher` (the trailer
/// hash: see `writer::Trailer`).
/// The caller has checked the payload length against the kind's limit.
pub(crate) fn write_frame(
    w: &mut impl Write,
    hasher: Option<&mut blake3::Hasher>,
    kind: FrameKind,
    payload: &[u8],
) -> io::Result<u64> {
    let len = u32::try_from(payload.len()).expect("caller checked the payload length");
    let head = head(kind, len);
    let check = check(&head, payload);
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.write_all(&check)?;
    if let Some(h) = hasher {
        h.update(&head);
        h.update(&check);
    }
    Ok((HEAD_LEN + payload.len() + CHECK_LEN) as u64)
}

/// Reads until `buf` is full or the input ends; returns how much it read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
