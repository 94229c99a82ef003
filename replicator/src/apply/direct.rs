//! Writing a large staged file around the page cache.
//!
//! A staged file is synced before the commit anyway, so its pages in the
//! page cache serve nothing but the writeback. Writing the pages costs
//! more than the data's copy on a machine whose memory is backed on first
//! touch (a virtual machine that hands freed pages back to its host: there
//! a seed's `pwrite` of fresh page-cache memory ran at a tenth of memcpy's
//! speed, a third of the applier's time). So a streamed file's data is
//! gathered in one aligned buffer, reused from file to file, and written
//! with `O_DIRECT` in large aligned pieces: one copy into memory that is
//! already backed, then the device reads it. What does not fill an aligned
//! block (a file's tail, a piece that starts off the alignment) goes
//! through the file's ordinary descriptor; both write the same file, at
//! offsets that never overlap.
//!
//! A filesystem that refuses `O_DIRECT` (EINVAL at open) gets ordinary
//! writes: the caller keeps no `DirectWriter` then.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Offsets, lengths and the buffer's address are multiples of this for
/// `O_DIRECT` (the largest logical block size in common use).
const ALIGN: usize = 4096;

/// How much is gathered before one direct write.
const GATHER: usize = 4 << 20;

/// `GATHER` bytes starting at a multiple of `ALIGN`: a slice of a vector
/// `ALIGN` bytes longer.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let bytes = vec![0u8; GATHER + ALIGN];
        // For bytes an offset is always found, and it is below ALIGN.
        let start = bytes.as_ptr().align_offset(ALIGN);
        AlignedBuf { bytes, start }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[self.start..self.start + GATHER]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + GATHER]
    }
}

/// Gathers the pieces of one file, written in increasing offsets, and
/// writes them with `O_DIRECT`.
pub(super) struct DirectWriter {
    buf: AlignedBuf,
    /// The file being written, opened with `O_DIRECT`.
    direct: Option<File>,
    /// Where `buf[0]` goes in the file (a multiple of `ALIGN`).
    start: u64,
    /// Bytes gathered in `buf`.
    filled: usize,
}

impl DirectWriter {
    pub fn new() -> DirectWriter {
        DirectWriter {
            buf: AlignedBuf::new(),
            direct: None,
            start: 0,
            filled: 0,
        }
    }

    /// Starts a file: `direct` is it opened with `O_DIRECT`.
    pub fn begin(&mut self, direct: File) {
        self.direct = Some(direct);
        self.filled = 0;
    }

    /// Whether a file is being written.
    pub fn active(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes `data` at `offset`; `file` is the file's ordinary descriptor,
    /// for what cannot go directly.
    pub fn write_at(&mut self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
        if self.filled > 0 && offset != self.start + self.filled as u64 {
            self.flush(file)?;
        }
        if self.filled == 0 {
            if !offset.is_multiple_of(ALIGN as u64) {
                return file.write_all_at(data, offset);
            }
            self.start = offset;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let n = rest.len().min(GATHER - self.filled);
            let at = self.filled;
            self.buf.bytes_mut()[at..at + n].copy_from_slice(&rest[..n]);
            self.filled += n;
            rest = &rest[n..];
            if self.filled == GATHER {
                self.write_direct(GATHER)?;
                self.start += GATHER as u64;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is gathered: the aligned part directly, the rest through
    /// `file`.
    pub fn flush(&mut self, file: &File) -> io::Result<()> {
        let aligned = self.filled / ALIGN * ALIGN;
        self.write_direct(aligned)?;
        let (start, filled) = (self.start, self.filled);
        let tail = &self.buf.bytes()[aligned..filled];
        file.write_all_at(tail, start + aligned as u64)?;
        self.start += filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is gathered and ends the file.
    pub fn finish(&mut self, file: &File) -> io::Result<()> {
        let flushed = self.flush(file);
        self.direct = None;
        flushed
    }

    fn write_direct(&self, len: usize) -> io::Result<()> {
        let direct = self.direct.as_ref().expect("a file was begun");
        direct.write_all_at(&self.buf.bytes()[..len], self.start)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    /// Writes `pieces` (offset, length) of `content` through a writer and
    /// returns what the file then holds.
    fn write_through(content: &[u8], pieces: &[(usize, usize)]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create_new(&path).unwrap();
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .expect("the test directory's filesystem takes O_DIRECT");
        let mut w = DirectWriter::new();
        w.begin(direct);
        for &(at, len) in pieces {
            w.write_at(&file, &content[at..at + len], at as u64)
                .unwrap();
        }
        w.finish(&file).unwrap();
        assert!(!w.active());
        file.set_len(content.len() as u64).unwrap();
        std::fs::read(&path).unwrap()
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
    }

    /// Contiguous pieces from `start` to `end`, each `step` long but the
    /// last.
    fn pieces(start: usize, end: usize, step: usize) -> Vec<(usize, usize)> {
        (start..end)
            .step_by(step)
            .map(|at| (at, step.min(end - at)))
            .collect()
    }

    #[test]
    fn pieces_in_order_make_the_file_with_its_unaligned_tail() {
        let c = content(2 * GATHER + 12_345);
        assert_eq!(write_through(&c, &pieces(0, c.len(), 128 << 10)), c);
    }

    #[test]
    fn pieces_that_do_not_divide_the_alignment_still_gather() {
        let c = content(GATHER + 3 * ALIGN);
        assert_eq!(write_through(&c, &pieces(0, c.len(), 1000)), c);
    }

    #[test]
    fn a_gap_or_an_unaligned_start_goes_around_the_gathering() {
        let c = content(3 * GATHER);
        let mut p = pieces(0, GATHER / 2 + 100, 64 << 10);
        // A hole, then a piece starting off the alignment, then aligned
        // again after another hole.
        p.extend(pieces(GATHER + 17, GATHER + 17 + 5000, 5000));
        p.extend(pieces(2 * GATHER, 3 * GATHER, 1 << 20));
        let got = write_through(&c, &p);
        let mut want = vec![0u8; c.len()];
        for &(at, len) in &p {
            want[at..at + len].copy_from_slice(&c[at..at + len]);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn one_writer_serves_file_after_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirectWriter::new();
        for (i, len) in [GATHER + 1, 3 * ALIGN, 10].into_iter().enumerate() {
            let path = dir.path().join(i.to_string());
            let file = File::create_new(&path).unwrap();
            let direct = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap();
            let c = content(len);
            w.begin(direct);
            for (at, n) in pieces(0, len, 4096 * 3) {
                w.write_at(&file, &c[at..at + n], at as u64).unwrap();
            }
            w.finish(&file).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), c, "file {i}");
        }
    }
}
